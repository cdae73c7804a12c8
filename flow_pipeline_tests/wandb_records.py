"""Reads an offline Wandb run's ``run-<id>.wandb`` transaction log back, for tests.

wandb 0.31 has no Python reader (the Go ``wandb-core`` writes the file), so this is a small independent one. The
format is LevelDB's log format: a 7-byte file header (``:W&B``, magic 0xBEE1, version 0), then 32 KiB blocks of
chunks. Each chunk is ``crc32 (uint32 LE) | length (uint16 LE) | type (uint8)`` followed by ``length`` bytes; a
record is one FULL chunk or FIRST, MIDDLE…, LAST chunks; fewer than 7 bytes left in a block are zero padding. The
crc32 covers the type byte and the data. Records are ``wandb_internal_pb2.Record`` protobufs.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2

FILE_HEADER = struct.Struct("<4sHB")  # ident, magic, version
CHUNK_HEADER = struct.Struct("<IHB")  # crc32, length, type
BLOCK_SIZE = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: str | Path) -> list[wandb_internal_pb2.Record]:
    """Every complete record in the file, in order. A torn chunk at the end (a killed writer) ends the read;
    a bad header or checksum elsewhere raises ``ValueError`` naming the file and offset."""
    data = Path(path).read_bytes()
    ident, magic, version = FILE_HEADER.unpack_from(data, 0)
    if (ident, magic, version) != (b":W&B", 0xBEE1, 0):
        raise ValueError(f"{path}: not a Wandb transaction log (header {ident!r} {magic:#x} v{version})")
    records, pending, offset = [], None, FILE_HEADER.size
    while offset < len(data):
        left_in_block = BLOCK_SIZE - offset % BLOCK_SIZE
        if left_in_block < CHUNK_HEADER.size:  # block trailer: zero padding
            offset += left_in_block
            continue
        if offset + CHUNK_HEADER.size > len(data):
            break
        crc, length, kind = CHUNK_HEADER.unpack_from(data, offset)
        body = data[offset + CHUNK_HEADER.size : offset + CHUNK_HEADER.size + length]
        if len(body) < length:
            break
        if zlib.crc32(body, zlib.crc32(bytes([kind]))) != crc:
            raise ValueError(f"{path}: checksum mismatch in the chunk at byte {offset}")
        offset += CHUNK_HEADER.size + length
        if kind == FULL:
            pending = body
        elif kind == FIRST:
            pending = body
            continue
        elif kind in (MIDDLE, LAST) and pending is not None:
            pending += body
            if kind == MIDDLE:
                continue
        else:
            raise ValueError(f"{path}: unexpected chunk type {kind} at byte {offset}")
        record = wandb_internal_pb2.Record()
        record.ParseFromString(pending)
        records.append(record)
        pending = None
    return records


def _items(items) -> dict[str, Any]:
    """HistoryItem/SummaryItem/ConfigItem list -> {key: decoded JSON value}; nested keys joined with '/'."""
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


@dataclass
class OfflineRun:
    """What one offline run directory recorded: the run record's fields, history rows, final summary, exit."""

    run_id: str = ""
    name: str = ""
    group: str = ""
    job_type: str = ""
    project: str = ""
    notes: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    metric_defs: list[Any] = field(default_factory=list)
    exit_code: int | None = None
    records: list[Any] = field(default_factory=list)


def read_offline_run(run_dir: str | Path) -> OfflineRun:
    """Parse ``<run_dir>/run-*.wandb``. Later run records (tag/notes updates) override earlier ones."""
    files = sorted(Path(run_dir).glob("run-*.wandb"))
    if len(files) != 1:
        raise ValueError(f"{run_dir}: expected one run-*.wandb file, found {[f.name for f in files]}")
    run = OfflineRun(records=read_records(files[0]))
    for record in run.records:
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run.run_id = r.run_id or run.run_id
            run.name = r.display_name or run.name
            run.group = r.run_group or run.group
            run.job_type = r.job_type or run.job_type
            run.project = r.project or run.project
            run.notes = r.notes or run.notes
            run.tags = list(r.tags) or run.tags
            run.config.update(_items(r.config.update))
        elif kind == "config":
            run.config.update(_items(record.config.update))
        elif kind == "history":
            run.history.append(_items(record.history.item))
        elif kind == "summary":
            run.summary.update(_items(record.summary.update))
        elif kind == "metric":
            run.metric_defs.append(record.metric)
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
    return run
