"""Asset checks on each partition of ``trained_checkpoint``: is best.pt the file that was reported, safe to load,
finite, and better than predicting zero?

Each check is evaluated and recorded per partition (``partitions_def`` on an asset check, a preview feature in
Dagster 1.13): the UI shows a check's status per ablation. The two integrity checks are blocking with ERROR severity:
a failure fails the run and stops downstream assets (evaluation) of that partition. The learning check is
non-blocking: an untrained model is a (bad) research result to report, not a corrupt artifact.

The verdicts are pure functions of a path and the reported metadata, tested without Dagster.
"""


import math
import warnings
from pathlib import Path

import dagster as dg
import torch

from flow_pipeline.core.checkpoint import CheckpointError, load_checkpoint, sha256_file
from flow_pipeline.defs.assets import ablation_partitions, trained_checkpoint

# Flow-matching loss of a model that predicts zero on z-scored data: E||u_t||^2 / dim with x_0 ~ N(0, I).
# icfm and fm regress x_1 - x_0 (variance 1 + 1; otcfm's minibatch pairing lowers it slightly, so 2.0 is a loose
# bound there); vp regresses (pi/2)(cos x_1 - sin x_0), variance pi^2/4.
ZERO_PREDICTOR_LOSS = {"icfm": 2.0, "otcfm": 2.0, "fm": 2.0, "vp": math.pi**2 / 4}
WEIGHT_GROUPS = ("model_state_dict", "ema_shadow")


# --- verdicts (pure) ---------------------------------------------------------------------------------------------


def check_file_intact(path: Path, reported_sha256: str) -> dg.AssetCheckResult:
    """best.pt exists, its sha256 equals the one reported at materialization, and it loads with weights_only=True."""
    metadata = {"path": dg.MetadataValue.path(str(path)), "reported_sha256": reported_sha256}
    if not path.is_file():
        return dg.AssetCheckResult(passed=False, metadata={**metadata, "error": f"checkpoint not found: {path}"})
    actual = sha256_file(path)
    metadata.update(actual_sha256=actual, size_bytes=path.stat().st_size)
    if actual != reported_sha256:
        return dg.AssetCheckResult(passed=False, metadata={
            **metadata, "error": f"{path} changed since it was materialized: sha256 {actual} != reported {reported_sha256}"})
    try:
        load_checkpoint(path)
    except CheckpointError as exc:
        return dg.AssetCheckResult(passed=False, metadata={**metadata, "error": str(exc)})
    return dg.AssetCheckResult(passed=True, metadata=metadata)


def nonfinite_tensors(state: dict) -> dict[str, int]:
    """``group/name`` -> number of NaN/inf values, for every tensor of the weight groups that has any."""
    bad = {}
    for group in WEIGHT_GROUPS:
        for name, tensor in state[group].items():
            if torch.is_tensor(tensor) and tensor.is_floating_point():
                count = int((~torch.isfinite(tensor)).sum())
                if count:
                    bad[f"{group}/{name}"] = count
    return bad


def check_weights_finite(path: Path) -> dg.AssetCheckResult:
    """Every floating-point tensor of model_state_dict and ema_shadow is finite."""
    try:
        state = load_checkpoint(path)
    except CheckpointError as exc:
        return dg.AssetCheckResult(passed=False, metadata={"error": str(exc)})
    bad = nonfinite_tensors(state)
    n_tensors = sum(len(state[group]) for group in WEIGHT_GROUPS)
    metadata = {"n_tensors": n_tensors, "n_nonfinite_values": sum(bad.values()),
                "nonfinite_tensors": ", ".join(sorted(bad)[:10]) or "none"}
    return dg.AssetCheckResult(passed=not bad, metadata=metadata)


def check_beats_zero_predictor(path: Path) -> dg.AssetCheckResult:
    """The best EMA validation loss is below the loss of a model that always predicts zero for its flow."""
    try:
        state = load_checkpoint(path)
    except CheckpointError as exc:
        return dg.AssetCheckResult(passed=False, metadata={"error": str(exc)})
    flow = state["config"]["flow"]
    if flow not in ZERO_PREDICTOR_LOSS:
        return dg.AssetCheckResult(passed=False, metadata={"error": f"no zero-predictor loss known for flow {flow!r}"})
    baseline = ZERO_PREDICTOR_LOSS[flow]
    best_loss = float(state["best_loss"])
    return dg.AssetCheckResult(
        passed=math.isfinite(best_loss) and best_loss < baseline,
        metadata={"best_ema_val_loss": best_loss, "zero_predictor_loss": baseline, "flow": flow,
                  "ratio_to_zero_predictor": best_loss / baseline},
    )


# --- Dagster wrappers --------------------------------------------------------------------------------------------


def reported_checkpoint(context: dg.AssetCheckExecutionContext) -> tuple[Path, str] | None:
    """(checkpoint_path, sha256) from the latest materialization of the check's partition, or None."""
    records = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=trained_checkpoint.key, asset_partitions=[context.partition_key]), limit=1
    ).records
    if not records:
        return None
    metadata = records[0].asset_materialization.metadata
    return Path(metadata["checkpoint_path"].value), str(metadata["sha256"].value)


def _not_materialized(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(passed=False, metadata={
        "error": f"trained_checkpoint[{context.partition_key}] has no materialization to check"})


def _per_partition_check(name: str, blocking: bool, description: str):
    """``@dg.asset_check`` on trained_checkpoint, evaluated per partition. ``partitions_def`` on a check is a preview
    feature of Dagster 1.13 whose warning would print on every import: it is silenced here, where it is accepted."""

    def decorate(fn):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", dg.PreviewWarning)
            return dg.asset_check(asset=trained_checkpoint, name=name, blocking=blocking, description=description,
                                  partitions_def=ablation_partitions)(fn)

    return decorate


@_per_partition_check("checkpoint_file_intact", blocking=True, description=check_file_intact.__doc__)
def checkpoint_file_intact(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    reported = reported_checkpoint(context)
    return check_file_intact(*reported) if reported else _not_materialized(context)


@_per_partition_check("checkpoint_weights_finite", blocking=True, description=check_weights_finite.__doc__)
def checkpoint_weights_finite(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    reported = reported_checkpoint(context)
    return check_weights_finite(reported[0]) if reported else _not_materialized(context)


@_per_partition_check("checkpoint_beats_zero_predictor", blocking=False, description=check_beats_zero_predictor.__doc__)
def checkpoint_beats_zero_predictor(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    reported = reported_checkpoint(context)
    return check_beats_zero_predictor(reported[0]) if reported else _not_materialized(context)


trained_checkpoint_checks = [checkpoint_file_intact, checkpoint_weights_finite, checkpoint_beats_zero_predictor]
