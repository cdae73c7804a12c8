"""``python -m flow_pipeline.show PARTITION``: print the latest trained checkpoint of a partition from the instance."""

from __future__ import annotations

import argparse
import math
import sys

import dagster as dg

from flow_pipeline.ablations import ablation_for
from flow_pipeline.config import zero_predictor_loss_of

SHOWN = ("checkpoint_path", "best_val_loss", "best_epoch", "epochs_run", "stopped_early", "train_seconds", "device",
         "sha256", "wandb_url", "wandb_run_dir", "wandb_sync_command")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flow_pipeline.show", description=__doc__)
    parser.add_argument("partition", help="ablation partition key, e.g. dit-icfm")
    args = parser.parse_args(argv)
    try:
        ablation_for(args.partition)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    with dg.DagsterInstance.get() as instance:
        records = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey("trained_checkpoint"), asset_partitions=[args.partition]),
            limit=1).records
    if not records:
        print(f"partition {args.partition} has no materialization of trained_checkpoint yet", file=sys.stderr)
        return 1
    metadata = records[0].asset_materialization.metadata
    zero_loss = zero_predictor_loss_of(metadata["config"].value) if "config" in metadata else math.nan
    print(f"trained_checkpoint[{args.partition}]  (zero predictor's val loss: {zero_loss:.4f})")
    for key in SHOWN:
        if key in metadata:
            print(f"  {key:20s} {metadata[key].value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
