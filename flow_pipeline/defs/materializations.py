"""Reading the instance's materializations: the one place that fetches a partition's latest materialization."""

from __future__ import annotations

import dagster as dg


def latest_materialization(instance: dg.DagsterInstance, asset_key: dg.AssetKey,
                           partition: str | None = None) -> dg.EventLogRecord | None:
    """The latest materialization record of one partition (``None``: an unpartitioned asset), or None if it was
    never materialized."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=asset_key, asset_partitions=[partition] if partition is not None else None),
        limit=1,
    ).records
    return records[0] if records else None


def plain_metadata(record: dg.EventLogRecord) -> dict:
    """A materialization record's metadata as plain values (``MetadataValue.value``)."""
    return {key: value.value for key, value in record.asset_materialization.metadata.items()}


def latest_metadata(instance: dg.DagsterInstance, asset_key: dg.AssetKey, partition: str | None = None) -> dict | None:
    """Plain values of the latest materialization's metadata of one partition (``None``: an unpartitioned asset),
    or None if it was never materialized."""
    record = latest_materialization(instance, asset_key, partition)
    return None if record is None else plain_metadata(record)
