"""Asset checks on each partition of ``trained_checkpoint``: is best.pt the file that was reported, safe to load,
finite, and better than predicting zero? And on each partition of ``evaluation``: does the model beat the
``gaussian-full`` baseline on the ranking metric (non-blocking, evaluated in the evaluation's own step)?

Three checks, evaluated in one step (one process and one read of the file instead of three) and recorded per
partition (``partitions_def`` on a check spec, a preview feature in Dagster 1.13): the UI shows each check's status
per ablation. The two integrity checks are blocking with ERROR severity: a failure fails the run and stops downstream
assets (evaluation) of that partition. The learning check is non-blocking: an untrained model is a (bad) research
result to report, not a corrupt artifact.

The verdicts are pure functions of a path and the reported sha256, tested without Dagster.
"""

import math
import warnings
from pathlib import Path

import dagster as dg
import torch

from flow_pipeline.config import zero_predictor_loss_of
from flow_pipeline.core.checkpoint import CheckpointError, VerifiedCheckpoint, verify
from flow_pipeline.defs.assets import ablation_partitions, trained_checkpoint
from flow_pipeline.defs.materializations import latest_metadata
from flow_pipeline.replicates import replicates_from_metadata

WEIGHT_GROUPS = ("model_state_dict", "ema_shadow")


# --- verdicts (pure) ---------------------------------------------------------------------------------------------

FILE_INTACT = "checkpoint_file_intact"
WEIGHTS_FINITE = "checkpoint_weights_finite"
BEATS_ZERO_PREDICTOR = "checkpoint_beats_zero_predictor"


def file_intact(path: Path, reported_sha256: str, checkpoint: VerifiedCheckpoint | None,
                load_error: str | None) -> dg.AssetCheckResult:
    """best.pt exists, its sha256 equals the one reported at materialization, and it loads with weights_only=True."""
    metadata = {"path": dg.MetadataValue.path(str(path)), "reported_sha256": reported_sha256}
    if checkpoint is None:
        return _failed(FILE_INTACT, load_error or f"checkpoint not loaded: {path}", metadata)
    metadata.update(actual_sha256=checkpoint.sha256, size_bytes=path.stat().st_size)
    if checkpoint.sha256 != reported_sha256:
        return _failed(FILE_INTACT, f"{path} changed since it was materialized: sha256 {checkpoint.sha256} != "
                                    f"reported {reported_sha256}", metadata)
    return dg.AssetCheckResult(check_name=FILE_INTACT, passed=True, metadata=metadata)


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


def weights_finite(state: dict | None, load_error: str | None) -> dg.AssetCheckResult:
    """Every floating-point tensor of model_state_dict and ema_shadow is finite."""
    if state is None:
        return _failed(WEIGHTS_FINITE, load_error or "checkpoint not loaded")
    bad = nonfinite_tensors(state)
    metadata = {"n_tensors": sum(len(state[group]) for group in WEIGHT_GROUPS),
                "n_nonfinite_values": sum(bad.values()),
                "nonfinite_tensors": ", ".join(sorted(bad)[:10]) or "none"}
    return dg.AssetCheckResult(check_name=WEIGHTS_FINITE, passed=not bad, metadata=metadata)


def beats_zero_predictor(state: dict | None, load_error: str | None) -> dg.AssetCheckResult:
    """The best EMA validation loss (``best_loss``) is below the loss of a model that always predicts zero."""
    if state is None:
        return _failed(BEATS_ZERO_PREDICTOR, load_error or "checkpoint not loaded")
    flow = state["config"]["flow"]
    try:  # E||target||^2 / dim of the run's own flow (Flow.zero_predictor_loss): 2.0 for icfm, pi^2/4 for vp
        baseline = zero_predictor_loss_of(state["config"])
    except ValueError as exc:
        return _failed(BEATS_ZERO_PREDICTOR, f"no zero-predictor loss for flow {flow!r}: {exc}")
    best_loss = float(state["best_loss"])
    return dg.AssetCheckResult(
        check_name=BEATS_ZERO_PREDICTOR,
        passed=math.isfinite(best_loss) and best_loss < baseline,
        metadata={"best_ema_val_loss": best_loss, "zero_predictor_loss": baseline, "flow": flow,
                  "ratio_to_zero_predictor": best_loss / baseline},
    )


def verify_checkpoint(path: Path, reported_sha256: str) -> list[dg.AssetCheckResult]:
    """The three verdicts on one checkpoint file (read once, hashed once). The weights are judged even when the
    file is not the one reported, so that the verdicts say what is wrong with it."""
    checkpoint, load_error = None, None
    try:
        checkpoint = verify(path)
    except CheckpointError as exc:
        load_error = str(exc)
    state = None if checkpoint is None else checkpoint.state
    return [file_intact(path, reported_sha256, checkpoint, load_error), weights_finite(state, load_error),
            beats_zero_predictor(state, load_error)]


def _failed(check_name: str, error: str, metadata: dict | None = None) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(check_name=check_name, passed=False, metadata={**(metadata or {}), "error": error})


# --- Dagster wrapper ---------------------------------------------------------------------------------------------


def _spec(name: str, blocking: bool, description: str) -> dg.AssetCheckSpec:
    # partitions_def on a check spec is a preview feature of Dagster 1.13 whose warning would print on every import;
    # it is silenced here, where it is known and accepted.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dg.PreviewWarning)
        return dg.AssetCheckSpec(name, asset=trained_checkpoint, blocking=blocking, description=description,
                                 partitions_def=ablation_partitions)


CHECK_SPECS = [
    _spec(FILE_INTACT, blocking=True, description=file_intact.__doc__),
    _spec(WEIGHTS_FINITE, blocking=True, description=weights_finite.__doc__),
    _spec(BEATS_ZERO_PREDICTOR, blocking=False, description=beats_zero_predictor.__doc__),
]


def reported_checkpoints(instance: dg.DagsterInstance, partition: str) -> list[tuple[Path, str]] | None:
    """(checkpoint_path, sha256) of every replicate of the partition's latest materialization, or None."""
    metadata = latest_metadata(instance, trained_checkpoint.key, partition)
    if metadata is None:
        return None
    return [(Path(entry["checkpoint_path"]), str(entry["sha256"])) for entry in replicates_from_metadata(metadata)]


def combine_replicates(per_replicate: list[list[dg.AssetCheckResult]]) -> list[dg.AssetCheckResult]:
    """One result per check over all replicates: passed only if every replicate passed; with several replicates the
    metadata says how many failed and which (the first failure's metadata is kept whole)."""
    if len(per_replicate) == 1:
        return per_replicate[0]
    combined = []
    for results in zip(*per_replicate):
        failed = [index for index, result in enumerate(results) if not result.passed]
        shown = results[failed[0]] if failed else results[0]
        metadata = {**shown.metadata, "n_replicates": len(results), "n_failed": len(failed),
                    "failed_replicates": ", ".join(map(str, failed)) or "none"}
        combined.append(dg.AssetCheckResult(check_name=results[0].check_name, passed=not failed, metadata=metadata))
    return combined


@dg.multi_asset_check(specs=CHECK_SPECS, name="verify_trained_checkpoint")
def verify_trained_checkpoint(context: dg.AssetCheckExecutionContext):
    """Verifies every replicate's best.pt against the partition's latest materialization (see the module
    docstring); a check passes only if it passes for every replicate."""
    reported = reported_checkpoints(context.instance, context.partition_key)
    if reported is None:
        error = f"trained_checkpoint[{context.partition_key}] has no materialization to check"
        yield from (_failed(spec.name, error) for spec in CHECK_SPECS)
        return
    yield from combine_replicates([verify_checkpoint(path, sha256) for path, sha256 in reported])


trained_checkpoint_checks = [verify_trained_checkpoint]


# --- evaluation: does the model beat the closed-form baseline? ----------------------------------------------------

BEATS_GAUSSIAN_FULL = "evaluation_beats_gaussian_full"


def beats_gaussian_full(model: dict) -> dg.AssetCheckResult:
    """The model's held-out log-likelihood beats ``gaussian-full``'s (mean and Ledoit–Wolf covariance of the run's
    training rows, closed form) on the same test rows: the 95% interval of the per-row difference lies above 0.
    Non-blocking: a model that loses to a Gaussian is a research result to report, not a broken artifact."""
    if "loglik_vs_gaussian_full" not in model:
        return _failed(BEATS_GAUSSIAN_FULL, "no held-out likelihood in this evaluation (likelihood_rows: 0?)")
    low, high = float(model["loglik_vs_gaussian_full_ci_low"]), float(model["loglik_vs_gaussian_full_ci_high"])
    return dg.AssetCheckResult(
        check_name=BEATS_GAUSSIAN_FULL,
        passed=low > 0,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"metric": "held-out log-likelihood, model - gaussian-full, nats per row (95% paired t-interval)",
                  "difference": float(model["loglik_vs_gaussian_full"]), "ci_low": low, "ci_high": high,
                  "verdict": str(model.get("loglik_vs_gaussian_full_verdict", "")),
                  "rows": int(model.get("likelihood_rows", 0))},
    )


def _evaluation_spec() -> dg.AssetCheckSpec:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dg.PreviewWarning)
        return dg.AssetCheckSpec(BEATS_GAUSSIAN_FULL, asset=dg.AssetKey("evaluation"), blocking=False,
                                 description=beats_gaussian_full.__doc__)


# Evaluated inside the evaluation asset's step (the numbers are there), so no second read of anything.
EVALUATION_CHECK_SPECS = [_evaluation_spec()]
