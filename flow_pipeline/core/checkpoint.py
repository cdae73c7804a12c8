"""Checkpoint files: atomic writes, sha256, safe loads with clear errors (:func:`verify`: hashed and loaded); the
model a saved config describes and a finished run's EMA model; what a run's checkpoint holds and how a resume finds
and restores it.

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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from flow_pipeline.core.atomic import TEMP_PREFIX, remove_stale_temp_files, write_atomic_with  # noqa: F401 (re-exported)
from flow_pipeline.core.data.normalization import Normalizer
from flow_pipeline.core.flows import Flow, get_flow
from flow_pipeline.core.models import build_model, count_parameters
from flow_pipeline.core.train_config import TrainSettings, flow_params
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


def verify(path: str | os.PathLike, expected_sha256: str | None = None,
           map_location: str | torch.device = "cpu") -> VerifiedCheckpoint:
    """The checkpoint at ``path``, hashed and loaded: it matches its recorded ``expected_sha256`` (None: any) and
    loads with ``weights_only=True``. Raises :class:`CheckpointError` naming the file when it is missing, has
    changed since it was recorded, or does not load."""
    path = Path(path)
    sha256 = sha256_file(path) if path.is_file() else ""
    if expected_sha256 is not None and sha256 and sha256 != expected_sha256:
        raise CheckpointError(f"{path} has changed since it was recorded (sha256 {sha256[:12]}..., expected "
                              f"{expected_sha256[:12]}...): re-materialize trained_checkpoint or wait for its run")
    return VerifiedCheckpoint(path, sha256, load_checkpoint(path, map_location=map_location))


@dataclass(frozen=True)
class VerifiedCheckpoint:
    """A checkpoint file as :func:`verify` read it: its path, its sha256 and its state dict."""

    path: Path
    sha256: str
    state: dict


def model_from_config(config: Mapping[str, Any]) -> nn.Module:
    """The untrained model of a run's saved config (``state["config"]``, or ``TrainSettings.to_dict()``): arch, dim,
    model_size, and the linear skip path and principal subspace of runs that have them."""
    # A config saved before the skip path existed describes a model without one.
    return build_model(config["arch"], dim=config["dim"], size=config["model_size"],
                       linear_skip=config.get("linear_skip", False), principal_dims=config.get("principal_dims", 0),
                       prototypes=config.get("prototypes", 0),
                       rest_variance=config.get("rest_variance", "learned"))


# ---------------------------------------------------------------------------------------------------------------
# The EMA model of a finished run, for sampling
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class EMAModel:
    """Everything needed to sample from one checkpoint.

    model: the architecture with the checkpoint's EMA weights, in eval mode on the requested device.
    flow: the flow method of the run (its ``to_velocity`` turns model output into dx/dt).
    normalizer: the run's normalisation, whose ``denormalize`` maps samples back to raw embedding space.
    config: the saved config as ``read_config`` returned it (:func:`load_ema_model`).
    history: per-epoch dicts (epoch, train_loss, val_loss, ema_val_loss, ...) of the run.
    """

    model: nn.Module
    flow: Flow
    normalizer: Normalizer
    config: Any
    checkpoint_path: Path
    sha256: str
    best_loss: float
    history: list[dict] = field(default_factory=list)


def load_ema_weights(model: nn.Module, state: dict, path: Path) -> None:
    """Raw weights first (they carry any buffers), then every trainable parameter from the EMA shadow."""
    model.load_state_dict(state["model_state_dict"])
    shadow = state["ema_shadow"]
    params = dict(model.named_parameters())
    missing = sorted(name for name, p in params.items() if p.requires_grad and name not in shadow)
    unknown = sorted(set(shadow) - set(params))
    if missing or unknown:
        raise CheckpointError(f"{path}: ema_shadow does not match the {type(model).__name__} model "
                              f"(missing {missing[:5]}, unexpected {unknown[:5]})")
    with torch.no_grad():
        for name, tensor in shadow.items():
            params[name].copy_(tensor)


def load_ema_model(checkpoint_path: str | os.PathLike, read_config: Callable[[dict, Path], Any],
                   device: str | torch.device = "cpu", expected_sha256: str | None = None) -> EMAModel:
    """Rebuild the run's model from ``best.pt`` with the EMA weights (:func:`verify`: CheckpointError naming the
    file, also when its sha256 differs from ``expected_sha256``). ``read_config(saved_config, path)`` validates the
    saved config first (the caller's rules; it raises CheckpointError) and its result is ``EMAModel.config``."""
    checkpoint = verify(checkpoint_path, expected_sha256)
    state, path = checkpoint.state, checkpoint.path
    config = read_config(state["config"], path)
    saved = state["config"]
    model = model_from_config(saved)
    load_ema_weights(model, state, path)
    defaults = TrainSettings()
    params = flow_params(saved["flow"], saved.get("sigma", defaults.sigma), saved.get("sigma_min", defaults.sigma_min))
    return EMAModel(model=model.to(device).eval(), flow=get_flow(saved["flow"], **params),
                    normalizer=Normalizer.from_state_dict(state["normalization_stats"]), config=config,
                    checkpoint_path=path, sha256=checkpoint.sha256, best_loss=float(state["best_loss"]),
                    history=list(state.get("history", [])))


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
