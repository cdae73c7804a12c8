"""What makes a run the run it is: its name, its replicate identity, what a resume must match, and its data.

- :func:`run_name`: the checkpoint directory and tracking run of one config, ``{arch}-{flow}-{dataset}-{aug}`` plus
  the knobs that change what a loss means or which run it is, when they differ from their defaults.
- :func:`identity_of` / :func:`identity_key`: a run's *identity* is its full training config minus
  :data:`NOT_IDENTITY`; runs of one identity differ only by seed, so they are replicates of each other and may be
  pooled, runs of different identities never are.
- :data:`RESUME_MUST_MATCH` / :func:`resume_mismatches`: the config fields a checkpoint must share with the run that
  continues it, so that the resumed run follows the same trajectory.
- :func:`data_identity`: which training rows and statistics a run uses; stored in its checkpoint and metadata and
  checked on resume.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from flow_pipeline.core.data.normalization import load_normalizer, load_normalizer_info, normalizer_sha256
from flow_pipeline.core.train_config import TrainSettings

# Config fields that do not change what a run computes: a replicate differs by seed, a resume continues the same run.
NOT_IDENTITY = ("seed", "resume")
# The identity's fields a reader sees first (the rest is in the hash).
IDENTITY_FIELDS = ("arch", "flow", "dataset", "aug", "model_size")

# Config fields that must match for a resume to continue the same trajectory.
RESUME_MUST_MATCH = ("arch", "flow", "model_size", "dim", "batch_size", "seed", "dataset", "aug", "normalization",
                     "max_steps", "eval_every_steps", "rest_variance", "prototypes", "time_sampling")
# What a knob was, in effect, for checkpoints written before it existed.
BEFORE_THE_KNOB_EXISTED = {"normalization": "zscore", "max_steps": 0, "eval_every_steps": 0,
                           "rest_variance": "learned", "prototypes": 0, "time_sampling": "uniform"}


# The knobs a run name carries when they differ from their defaults, and how.
NAME_SUFFIXES = {
    "normalization": lambda value: f"-{value}",
    "linear_skip": lambda value: "-skip" if value else "-noskip",
    "time_sampling": lambda value: f"-t{value.replace('_', '')}",
    "principal_dims": lambda value: f"-pd{value}",
    "prototypes": lambda value: f"-proto{value}",
    "rest_variance": lambda value: f"-rest{value}",
    "model_size": lambda value: f"-{value}",
    "seed": lambda value: f"-seed{value}",
}


def _default(name: str) -> Any:
    return next(field.default for field in dataclasses.fields(TrainSettings) if field.name == name)


def _unset_value(config: Any, name: str) -> Any:
    """What knob ``name`` of ``config`` is when left unset: its default, or for a knob whose default (None) depends
    on the others (principal_dims, prototypes) what None resolves to among ``config``'s other values. So a config
    and its resolved copy (the one checkpoints store) have the same name."""
    default = _default(name)
    if default is not None:
        return default
    values = {field.name: getattr(config, field.name) for field in dataclasses.fields(TrainSettings)
              if field.name != "run_name" and hasattr(config, field.name)}
    return getattr(TrainSettings(**{**values, name: None}).resolved(), name)


def run_name(config: Any) -> str:
    """``{arch}-{flow}-{dataset}-{aug}`` of ``config`` (any object with the knobs as attributes), plus a suffix for
    each knob of :data:`NAME_SUFFIXES` set to other than what it is when unset (normalisation, skip path, time
    sampling, principal dims, prototypes, model size, seed), so two runs never share a checkpoint directory (losses
    under different normalisations are not the same quantity)."""
    name = f"{config.arch}-{config.flow}-{config.dataset}-{config.aug}"
    for knob, suffix in NAME_SUFFIXES.items():
        value = getattr(config, knob)
        if value is not None and value != _unset_value(config, knob):
            name += suffix(value)
    return name


def identity_of(config: dict) -> dict:
    """The config minus :data:`NOT_IDENTITY`, as a plain dict sorted by key."""
    return {key: value for key, value in sorted(config.items()) if key not in NOT_IDENTITY}


def identity_key(config: dict) -> str:
    """Short readable key of the identity: ``arch-flow-dataset-aug-size#hash`` (hash of every identity field)."""
    identity = identity_of(config)
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return "-".join(str(identity.get(field, "?")) for field in IDENTITY_FIELDS) + f"#{digest}"


def resume_mismatches(saved_config: dict, config: Any) -> list[str]:
    """``field: checkpoint X vs run Y`` for every field of :data:`RESUME_MUST_MATCH` in which a checkpoint's stored
    config differs from ``config`` (an object with the knobs as attributes); empty when the run may resume."""
    saved = {key: saved_config.get(key, BEFORE_THE_KNOB_EXISTED.get(key)) for key in RESUME_MUST_MATCH}
    return [f"{key}: checkpoint {saved[key]!r} vs run {getattr(config, key)!r}"
            for key in RESUME_MUST_MATCH if saved[key] != getattr(config, key)]


def data_identity(dataset: str, normalization: str, stats_path: Path) -> dict:
    """Which rows and which statistics a run trains with: the subset and row count the statistics at
    ``stats_path`` were fitted on, the file, and the sha256 of their content."""
    info = load_normalizer_info(stats_path)
    return {"dataset": dataset, "subset": info.get("subset", "unknown"), "train_rows": info.get("rows"),
            "normalization": normalization, "normalization_stats": str(stats_path),
            "normalization_sha256": normalizer_sha256(load_normalizer(stats_path))}
