"""Checkpoint files: atomic writes, sha256, safe loads with clear errors; what a run's checkpoint holds and how a
resume finds and restores it.

``TEMP_PREFIX`` and ``remove_stale_temp_files`` are re-exported from :mod:`flow_pipeline.core.atomic`.

``best.pt`` keeps the keys the research code's consumers read (:data:`REQUIRED_KEYS`) plus resume state;
``last.pt`` beside it is the rolling resume point while a run is in progress and has moved past its best epoch
(after an improving epoch best.pt is the resume point and last.pt is removed rather than written a second time).
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from flow_pipeline.core.atomic import TEMP_PREFIX, remove_stale_temp_files, write_atomic_with  # noqa: F401 (re-exported)
from flow_pipeline.core.models import count_parameters
from flow_pipeline.core.run_identity import resume_mismatches

logger = logging.getLogger(__name__)

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


# ---------------------------------------------------------------------------------------------------------------
# A training run's state: capture, restore, and the choice of the resume file
# ---------------------------------------------------------------------------------------------------------------


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> Any: ...


@dataclass
class RunPieces:
    """Every stateful piece of a training run: what a checkpoint captures and a resume restores.

    loop: the loop's own counters (:class:`flow_pipeline.core.trainer.TrainState`), whose ``state_dict`` keys are
    top-level keys of the checkpoint; ema: :class:`flow_pipeline.core.ema.EMA`; stopper:
    :class:`flow_pipeline.core.early_stopping.EarlyStopping`; sampler:
    :class:`flow_pipeline.core.data.EpochBatchSampler`; noise_generator: the generator of every x_0, t and
    augmentation draw.
    """

    loop: Stateful
    model: nn.Module
    ema: Any
    optimizer: torch.optim.Optimizer
    scheduler: Stateful
    stopper: Any
    sampler: Stateful
    noise_generator: torch.Generator


def capture(pieces: RunPieces, *, config: dict, normalization_stats: dict, data_identity: dict,
            world_size: int) -> dict:
    """The checkpoint dict of a run now: :data:`REQUIRED_KEYS` (what the research code's consumers read) plus every
    piece a resume needs, the global RNG streams included."""
    return {
        "format_version": FORMAT_VERSION,
        **pieces.loop.state_dict(),  # epoch, global_step, best_epoch, history, epoch_loss_sum, epoch_steps, ...
        "model_state_dict": pieces.model.state_dict(),
        "ema_shadow": pieces.ema.shadow_dict(),
        "ema_state": pieces.ema.state_dict(),
        "optimizer_state_dict": pieces.optimizer.state_dict(),
        "scheduler_state_dict": pieces.scheduler.state_dict(),
        "best_loss": pieces.stopper.best_loss,
        "config": config,
        "normalization_stats": normalization_stats,
        "data_identity": data_identity,
        "early_stopping": pieces.stopper.state_dict(),
        "sampler": pieces.sampler.state_dict(),
        "rng": rng_state(pieces.noise_generator),
        "world_size": world_size,
        "num_params": count_parameters(pieces.model),
    }


def restore(pieces: RunPieces, state: dict) -> None:
    """Load every piece of ``pieces`` from a checkpoint dict written by :func:`capture`."""
    pieces.model.load_state_dict(state["model_state_dict"])
    pieces.ema.load_state_dict(state["ema_state"])
    pieces.optimizer.load_state_dict(state["optimizer_state_dict"])
    pieces.scheduler.load_state_dict(state["scheduler_state_dict"])
    pieces.stopper.load_state_dict(state["early_stopping"])
    pieces.sampler.load_state_dict(state["sampler"])
    set_rng_state(state["rng"], pieces.noise_generator)
    pieces.loop.load_state_dict(state)


def rng_state(noise_generator: torch.Generator) -> dict:
    """The global torch, NumPy and Python RNG states and ``noise_generator``'s, as weights_only-loadable values."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "noise": noise_generator.get_state(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }


def set_rng_state(state: dict, noise_generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    noise_generator.set_state(state["noise"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def resume_point(run_dir: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[Path, dict] | None:
    """The checkpoint of ``run_dir`` to continue from, loaded: of last.pt and best.pt the one with the higher global
    step; None if there is neither.

    Normally last.pt exists only while it is newer than best.pt, but a kill between writing best.pt and removing
    the older last.pt leaves both: the step, not the name, says which one to continue from.
    """
    paths = [Path(run_dir) / LAST_NAME, Path(run_dir) / BEST_NAME]
    loaded = [(path, load_checkpoint(path, map_location=map_location)) for path in paths if path.exists()]
    # At equal steps (a last.pt saved at an epoch's final step, then best.pt after its validation) the later epoch.
    return max(loaded, key=lambda item: (item[1]["global_step"], item[1]["epoch"]), default=None)


def check_resumable(state: dict, path: Path, config: Any, data_identity: dict, world_size: int,
                    warn: bool = True) -> None:
    """Refuse (ValueError naming ``path`` and the fields) a checkpoint of another config or other data; warn (when
    ``warn``: rank 0 only) when the number of training processes changed."""
    wrong = resume_mismatches(state["config"], config)
    if wrong:
        raise ValueError(f"cannot resume from {path}: it was trained with a different config ({'; '.join(wrong)})")
    if state.get("data_identity") and data_identity and state["data_identity"] != data_identity:
        raise ValueError(f"cannot resume from {path}: it was trained on other data or statistics "
                         f"({state.get('data_identity')} vs {data_identity})")
    if warn and state.get("world_size", 1) != world_size:
        # Same batches and noise, so the run continues its trajectory; only the order in which gradients are
        # summed changes, so it is no longer bit-identical to an uninterrupted run.
        logger.warning("resuming a run trained by %d processes with %d", state.get("world_size", 1), world_size)
