"""Checkpoint files: atomic writes, sha256, safe loads with clear errors.

``TEMP_PREFIX`` and ``remove_stale_temp_files`` are re-exported from :mod:`flow_pipeline.core.atomic`.

``best.pt`` keeps the keys the research code's consumers read (:data:`REQUIRED_KEYS`) plus resume state;
``last.pt`` beside it is the rolling resume point while a run is in progress and has moved past its best epoch
(after an improving epoch best.pt is the resume point and last.pt is removed rather than written a second time).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from flow_pipeline.core.atomic import TEMP_PREFIX, remove_stale_temp_files, write_atomic_with  # noqa: F401 (re-exported)

FORMAT_VERSION = 1
BEST_NAME = "best.pt"
LAST_NAME = "last.pt"

REQUIRED_KEYS = (
    "epoch",
    "model_state_dict",
    "ema_shadow",
    "optimizer_state_dict",
    "scheduler_state_dict",
    "best_loss",
    "config",
    "normalization_stats",
)


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable or not one of ours; the message names the file."""


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def save_checkpoint(state: dict, path: str | os.PathLike) -> str:
    """Write ``state`` to ``path`` atomically (:mod:`flow_pipeline.core.atomic`) and return the file's sha256.

    A crash at any point leaves either the old file or the new one, never a torn one; a failed write (a full disk)
    raises :class:`~flow_pipeline.core.atomic.AtomicWriteError` naming the file and leaves the old one untouched.
    The digest is taken from what was written, before the rename, so it can never describe another file.
    """
    digest = ""

    def write(handle) -> None:
        nonlocal digest
        torch.save(state, handle)
        handle.flush()
        digest = sha256_file(handle.name)

    write_atomic_with(path, write)
    return digest


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint with ``weights_only=True``; raise :class:`CheckpointError` naming the file and the fault."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint is empty (0 bytes): {path}")
    # Arbitrary bytes make torch.load fail in open-ended ways (OSError on a cut zip, IndexError from the unpickler on
    # text, ...): any failure to read an existing file is reported as a bad checkpoint naming the file.
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"checkpoint is truncated, corrupt or not a safe torch file: {path} ({exc})") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint holds a {type(state).__name__}, not a checkpoint dict: {path}")
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if missing:
        raise CheckpointError(f"not a flow_pipeline checkpoint (missing keys {missing}): {path}")
    version = state.get("format_version")
    if version is not None and version > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint format {version} is newer than this code's {FORMAT_VERSION}: {path}")
    return state
