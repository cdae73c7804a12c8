"""Study rows of the ablation report: one row per run identity (config minus seed), its replicates pooled, every
metric as mean and 95% t-interval, and every row compared with a baseline row (Holm-corrected).

Pure (no Dagster): the evaluation asset writes :func:`evaluation_study_metadata` beside its headline numbers; the
report asset passes the plain metadata of every evaluation materialization, newest first, to :func:`study_rows`.
"""

from __future__ import annotations

import math

from flow_pipeline.config import TrainConfig, zero_predictor_loss_of
from flow_pipeline.core.run_identity import IDENTITY_FIELDS, identity_key, identity_of
from flow_pipeline.core.study_stats import (METHOD, NOT_TESTABLE, compare_rows, decode_value, encode_value,
                                            replicate_interval)

DEFAULT_BASELINE = "mlp-icfm"
# Metrics pooled over replicates (keys of each replicate's ``metrics``, plus the training's values); lower is better
# for all but these.
HIGHER_IS_BETTER = frozenset({"precision", "recall", "density", "coverage", "loglik_vs_gaussian_full",
                              "loglik_vs_gaussian_diag", "loglik_vs_gaussian_mixture", "kl_closed_fraction",
                              "network_over_own_gaussian",
                              "loglik_vs_gaussian_full_network_coords", "loglik_vs_gaussian_full_other_coords"})
VAL_LOSS_RATIO = "val_loss_ratio"  # best EMA val loss / the flow's zero-predictor loss: comparable across flows
EVALUATION_ERROR = "evaluation_error"  # a replicate entry's key: why its evaluation failed (its metrics: none)
NONFINITE_MEANING = {"ranking_kid": "copying"}  # what a +inf value of a metric says, in the report's words


def describe_run(config: dict) -> dict:
    """What a row needs beside its metrics: parameters and forward FLOPs per sample of the model, and the flow's
    zero-predictor loss (the scale of its validation loss)."""
    from flow_pipeline.core.checkpoint import model_from_config
    from flow_pipeline.core.models import count_parameters, flops_per_sample

    model = model_from_config(config)
    return {"num_params": count_parameters(model), "flops_per_sample": flops_per_sample(model, config["dim"]),
            "zero_predictor_loss": zero_predictor_loss_of(config)}


def evaluation_study_metadata(config: dict, replicates: list[tuple[dict, dict]]) -> dict:
    """Metadata of one evaluation materialization for the report: the run identity of ``config`` (a replicate's
    training config), the model's size, and per replicate (``(replicate entry, primary metrics)``) its seed,
    checkpoint, training values and metrics. A replicate whose evaluation failed is kept: its entry carries
    ``evaluation_error`` (the reason) and its metrics are ``{}``; it ranks its row worst on every metric."""
    # Non-finite values (ranking_kid is +inf for a copying model) are encoded as strings: strict JSON has no inf.
    listed = [{**entry, "metrics": {name: encode_value(value) for name, value in metrics.items()
                                    if isinstance(value, (int, float))}}
              for entry, metrics in replicates]
    return {"identity": identity_key(config), "identity_config": identity_of(config), "n_replicates": len(listed),
            "replicates": listed, **describe_run(config)}


def _replicate_values(replicate: dict, zero_loss: float) -> dict[str, float]:
    values = {name: decode_value(value) for name, value in replicate.get("metrics", {}).items()}
    if replicate.get("best_val_loss") is not None:
        values["best_val_loss"] = float(replicate["best_val_loss"])
        values[VAL_LOSS_RATIO] = values["best_val_loss"] / zero_loss
    return values


def _row(partition: str, metadata: dict) -> dict:
    """One identity's row: its fields, size, steps, and per metric the mean (``metric``) and the CI bounds
    (``metric_ci_low``/``_high``); ``per_seed`` keeps ``metric -> {seed: value}`` for the comparisons. Every
    replicate counts: a non-finite value or a failed evaluation (NaN on every metric) makes the mean the worst value
    and is said in ``metric_replicates_note``."""
    config = metadata["identity_config"]
    zero_loss = metadata.get("zero_predictor_loss") or zero_predictor_loss_of(config)
    replicates = metadata["replicates"]
    metric_names = {name for replicate in replicates for name in replicate.get("metrics", {})}
    per_seed: dict[str, dict[int, float]] = {}
    for replicate in replicates:
        values = _replicate_values(replicate, zero_loss)
        if replicate.get(EVALUATION_ERROR):
            values.update({name: math.nan for name in metric_names})
        for name, value in values.items():
            per_seed.setdefault(name, {})[int(replicate["seed"])] = float(value)
    row = {"partition": partition, "identity": metadata["identity"], "evaluation": metadata, **{f: config.get(f) for f in IDENTITY_FIELDS},
           "max_steps": config.get("max_steps"), "num_params": metadata.get("num_params"),
           "flops_per_sample": metadata.get("flops_per_sample"), "zero_predictor_loss": zero_loss,
           "n_replicates": len(replicates), "seeds": sorted(int(r["seed"]) for r in replicates),
           "steps": _mean([r.get("global_step") for r in replicates]),
           "stopped_early": f"{sum(bool(r.get('stopped_early')) for r in replicates)}/{len(replicates)}",
           "train_seconds": _mean([r.get("train_seconds") for r in replicates]), "per_seed": per_seed,
           "replicates": replicates,
           "is_default_config": _is_default(config)}
    failed = sum(bool(r.get(EVALUATION_ERROR)) for r in replicates)
    bounds = {f"{name}_ci_{side}" for name in per_seed for side in ("low", "high")}
    for name, by_seed in per_seed.items():
        if name in bounds:  # a replicate's own interval of another metric: the row's comes from the replicates
            continue
        interval = replicate_interval(list(by_seed.values()), lower_is_better=name not in HIGHER_IS_BETTER)
        row[name], row[f"{name}_ci_low"], row[f"{name}_ci_high"] = interval.mean, interval.low, interval.high
        if interval.n < 2 and f"{name}_ci_low" in per_seed:  # one replicate: its own (e.g. paired per-row) interval
            row[f"{name}_ci_low"], row[f"{name}_ci_high"] = (next(iter(per_seed[f"{name}_ci_{side}"].values()))
                                                             for side in ("low", "high"))
        if interval.n_nonfinite:
            row[f"{name}_replicates_note"] = _nonfinite_note(name, list(by_seed.values()),
                                                             failed if name in metric_names else 0)
    return row


def _nonfinite_note(name: str, values: list[float], failed: int) -> str:
    """What the non-finite replicates of a metric are: "1 of 3 replicates copying (+inf)", "1 of 3 replicates
    failed", or "2 of 3 replicates non-finite: 1 copying (+inf), 1 failed"."""
    positive, negative = sum(v == math.inf for v in values), sum(v == -math.inf for v in values)
    kinds = [(positive, f"{NONFINITE_MEANING.get(name, 'infinite')} (+inf)"), (negative, "-inf"),
             (sum(math.isnan(v) for v in values) - failed, "NaN"), (failed, "failed")]
    kinds = [(count, label) for count, label in kinds if count]
    total = sum(count for count, _ in kinds)
    if len(kinds) == 1:
        return f"{total} of {len(values)} replicates {kinds[0][1]}"
    return f"{total} of {len(values)} replicates non-finite: " + ", ".join(f"{c} {label}" for c, label in kinds)


def _mean(values) -> float | None:
    present = [float(v) for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _is_default(config: dict) -> bool:
    """Whether the identity is the default training config on its data (arch, flow and the data's dim and training
    rows aside; the unset knobs those size resolve as they did for the run)."""
    data = {key: config[key] for key in ("dim", "train_rows") if config.get(key) is not None}
    defaults = identity_of(TrainConfig(**data).to_core().to_dict())
    return all(config.get(key) == value for key, value in defaults.items()
               if key not in ("arch", "flow", "dim", "train_rows", "device"))


def study_rows(evaluations: list[tuple[str, dict]]) -> list[dict]:
    """One row per run identity among ``evaluations`` (``(partition, plain metadata)``, newest first): the newest
    evaluation of each identity stands; evaluations written before identities existed are skipped."""
    rows: dict[str, dict] = {}
    for partition, metadata in evaluations:
        if "identity" in metadata and "replicates" in metadata and metadata["identity"] not in rows:
            rows[metadata["identity"]] = _row(partition, metadata)
    return list(rows.values())


def pick_baseline(rows: list[dict], baseline: str) -> dict | None:
    """The baseline row: the row whose identity is ``baseline``, else among the rows of partition ``baseline`` the
    one with the default config, else that partition's newest. None if there is none."""
    for row in rows:
        if row["identity"] == baseline:
            return row
    candidates = [row for row in rows if row["partition"] == baseline]
    defaults = [row for row in candidates if row["is_default_config"]]
    return (defaults or candidates or [None])[0]


def add_comparisons(rows: list[dict], baseline: dict | None, metric: str) -> None:
    """Set ``vs_baseline`` (verdict), ``difference``, ``difference_ci_low``/``_high``, ``test`` and ``p_holm`` of
    ``metric`` on every row (the baseline row says "baseline"); rows lacking the metric get "—"."""
    if baseline is None:
        for row in rows:
            row["vs_baseline"] = "no baseline row"
        return
    samples = {row["identity"]: row["per_seed"].get(metric, {}) for row in rows}
    samples = {name: values for name, values in samples.items() if values}
    results = compare_rows(samples, baseline["identity"], metric not in HIGHER_IS_BETTER) \
        if baseline["identity"] in samples else {}
    for row in rows:
        if row is baseline:
            row["vs_baseline"] = "baseline"
            continue
        if row["identity"] not in results:
            row["vs_baseline"] = "—"
            continue
        comparison, p_holm, verdict = results[row["identity"]]
        row.update(vs_baseline=verdict, difference=comparison.difference, difference_ci_low=comparison.low,
                   difference_ci_high=comparison.high, test=comparison.test, p_holm=p_holm)


def _interval_text(row: dict, name: str, fmt: str) -> str:
    if row.get(name) is None:
        return "—"
    if f"{name}_replicates_note" in row:
        return f"{'∞' if row[name] > 0 else '-∞'} ({row[f'{name}_replicates_note']})"
    low, high = row.get(f"{name}_ci_low"), row.get(f"{name}_ci_high")
    if low is None or math.isnan(low):
        return f"{row[name]:{fmt}} (n=1)"
    return f"{row[name]:{fmt}} ± {(high - low) / 2:{fmt}}"


def statistics_markdown(rows: list[dict], baseline: dict | None, metric: str) -> str:
    """The report's statistics section: method, baseline, and per row the metric's and val-loss ratio's mean ± CI
    half-width, the difference to the baseline with its CI, the test, the Holm-corrected p and the verdict."""
    lines = [f"### Replicates and comparison with the baseline ({metric})", "", f"Method: {METHOD}.", ""]
    if baseline is None:
        lines += ["No baseline row in this instance: no comparison.", ""]
    else:
        lines += [f"Baseline: `{baseline['identity']}` (seeds {baseline['seeds']}).", ""]
    if all(row["n_replicates"] < 2 for row in rows):
        lines += [f"Every row has one replicate: {NOT_TESTABLE}; the order of the table is not a ranking.", ""]
    lines += [f"| identity | replicates | {metric} (mean ± 95% CI) | val loss / zero predictor | zero predictor | "
              "difference [95% CI] | test | p (Holm) | vs baseline |", "|---|---:|---:|---:|---:|---:|---|---:|---|"]
    for row in rows:
        difference = "—" if row.get("difference") is None else (
            f"{row['difference']:+.4g}" + ("" if math.isnan(row["difference_ci_low"]) else
                                            f" [{row['difference_ci_low']:+.4g}, {row['difference_ci_high']:+.4g}]"))
        p_holm = row.get("p_holm")
        p_text = "—" if p_holm is None or math.isnan(p_holm) else f"{p_holm:.3g}"
        lines.append(f"| `{row['identity']}` | {row['n_replicates']} | {_interval_text(row, metric, '.4g')} | "
                     f"{_interval_text(row, VAL_LOSS_RATIO, '.4f')} | {row['zero_predictor_loss']:.4f} | "
                     f"{difference} | {row.get('test') or '—'} | {p_text} | {row['vs_baseline']} |")
    return "\n".join(lines) + "\n"
