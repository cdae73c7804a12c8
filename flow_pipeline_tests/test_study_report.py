"""Study rows on real (tiny) trainings: one row per identity, intervals over replicates, and verdicts that are right
by construction: an untrained model is "worse" than a trained one, the same config on other seeds is not
distinguishable from itself."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from flow_pipeline.config import TrainConfig
from flow_pipeline.core.study_stats import NO_DIFFERENCE, NOT_TESTABLE, SIGN_NONFINITE, WORSE
from flow_pipeline.core.trainer import train
from flow_pipeline.core.run_identity import identity_key
from flow_pipeline.evaluation.study_report import (
    EVALUATION_ERROR,
    VAL_LOSS_RATIO,
    add_comparisons,
    evaluation_study_metadata,
    pick_baseline,
    statistics_markdown,
    study_rows,
)
from flow_pipeline_tests.core.mixture_data import mixture_train_data

DIM = 64


@pytest.fixture(scope="module")
def data():
    torch.set_num_threads(1)
    return mixture_train_data(320, 64, DIM, seed=3)


def config(**overrides) -> TrainConfig:
    values = dict(arch="mlp", model_size="tiny", dim=DIM, batch_size=32, max_steps=30, warmup_steps=5, patience=50,
                  device="cpu", lr=3e-3, log_every=100)
    return TrainConfig(**{**values, **overrides})


def evaluated(base: TrainConfig, seeds, data, tmp_path) -> dict:
    """Evaluation-like metadata of ``base`` trained with each seed (the metrics: just the loss ratio here)."""
    replicates = []
    for seed in seeds:
        run = base.model_copy(update={"seed": seed})
        result = train(run, data, tmp_path / run.run_name)
        entry = {"seed": seed, "run_name": run.run_name, "checkpoint_path": str(result.checkpoint_path),
                 "sha256": result.sha256, "best_val_loss": result.best_loss, "global_step": result.global_step,
                 "stopped_early": result.stopped_early, "train_seconds": result.train_seconds}
        replicates.append((entry, {}))
    return evaluation_study_metadata(run.model_dump(), replicates)


@pytest.mark.slow
def test_untrained_is_worse_and_other_seeds_are_no_different(data, tmp_path):
    trained = evaluated(config(), [0, 1, 2], data, tmp_path)
    untrained = evaluated(config(max_steps=1, warmup_steps=0), [0, 1, 2], data, tmp_path)
    other_seeds = evaluated(config(), [3, 4, 5], data, tmp_path)
    assert other_seeds["identity"] == trained["identity"] != untrained["identity"]
    # The same identity twice: one row, the newest evaluation's replicates.
    rows = study_rows([("mlp-icfm", other_seeds), ("mlp-icfm", untrained), ("mlp-icfm", trained)])
    assert len(rows) == 2 and rows[0]["seeds"] == [3, 4, 5]
    # Compare both seed ranges of the trained config as rows of their own.
    trained_rows = study_rows([("mlp-icfm", trained)])
    rows = trained_rows + study_rows([("mlp-icfm", untrained)]) + [
        {**row, "identity": row["identity"] + " (seeds 3-5)"} for row in study_rows([("mlp-icfm", other_seeds)])]
    baseline = pick_baseline(rows, trained["identity"])
    assert baseline is trained_rows[0]
    add_comparisons(rows, baseline, VAL_LOSS_RATIO)
    untrained_row, other_row = rows[1], rows[2]
    assert untrained_row["vs_baseline"] == WORSE and untrained_row["test"] == "paired t"
    assert other_row["vs_baseline"] == NO_DIFFERENCE and other_row["test"] == "Welch t"
    # Holm over the two comparisons: the smaller raw p doubled, the larger at least that.
    assert untrained_row["p_holm"] < 0.05 <= other_row["p_holm"]
    # Rows carry the identity, the interval and the loss on the flow's zero-predictor scale (2.0 for icfm).
    losses = [entry["best_val_loss"] for entry in trained["replicates"]]
    assert baseline["best_val_loss"] == pytest.approx(sum(losses) / 3)
    assert baseline[VAL_LOSS_RATIO] == pytest.approx(sum(losses) / 3 / 2.0)
    assert baseline["steps"] == 30 and baseline["n_replicates"] == 3 and baseline["model_size"] == "tiny"
    assert baseline["num_params"] > 0 and baseline["flops_per_sample"] > baseline["num_params"]
    markdown = statistics_markdown(rows, baseline, VAL_LOSS_RATIO)
    assert "paired t-test" in markdown and "Holm" in markdown and "worse" in markdown


def replicate_metadata(config_values: dict, seeds, losses, zero_loss=None) -> dict:
    replicates = [({"seed": s, "run_name": "r", "checkpoint_path": f"/c/{s}", "sha256": str(s), "best_val_loss": v,
                    "global_step": 10, "stopped_early": False, "train_seconds": 1.0}, {"fd_ratio": v})
                  for s, v in zip(seeds, losses)]
    return {"identity": identity_key(config_values), "identity_config": config_values,
            "n_replicates": len(replicates), "zero_predictor_loss": zero_loss,
            "replicates": [{**entry, "metrics": metrics} for entry, metrics in replicates]}


def test_one_replicate_rows_say_no_significance_can_be_claimed():
    values = {**TrainConfig(dim=8).model_dump(), "flow": "vp"}
    rows = study_rows([("mlp-vp", replicate_metadata(values, [0], [2.0])),
                       ("mlp-icfm", replicate_metadata({**values, "flow": "icfm"}, [0], [1.5]))])
    baseline = pick_baseline(rows, "mlp-icfm")  # the default config's row of that partition
    add_comparisons(rows, baseline, "fd_ratio")
    assert rows[0]["vs_baseline"] == NOT_TESTABLE and math.isnan(rows[0]["fd_ratio_ci_low"])
    markdown = statistics_markdown(rows, baseline, "fd_ratio")
    assert "no significance can be claimed" in markdown
    # vp's validation loss is read against pi^2/4, derived from the flow, not 2.0.
    assert rows[0]["zero_predictor_loss"] == pytest.approx(math.pi**2 / 4)
    assert rows[0][VAL_LOSS_RATIO] == pytest.approx(2.0 / (math.pi**2 / 4))
    assert "2.4674" in markdown


def test_a_row_is_stale_when_its_partition_was_trained_again_under_the_same_identity():
    from flow_pipeline.evaluation.ablation_report import scaled_curve, staleness_notes
    from flow_pipeline.core.run_identity import identity_key

    rng = np.random.default_rng(5)
    config = {"arch": "mlp", "flow": "icfm", "dataset": "full", "aug": "none", "model_size": "small", "seed": 0}
    study = {"identity": identity_key(config), "replicates": [{"sha256": "a" * 64}]}
    same = {"config": config, "replicates": [{"sha256": "a" * 64}]}
    again = {"config": {**config, "seed": 1}, "replicates": [{"sha256": "b" * 64}]}
    other = {"config": {**config, "model_size": "tiny"}, "replicates": [{"sha256": "c" * 64}]}
    assert staleness_notes(study, same) == [] and staleness_notes(study, other) == []
    assert staleness_notes(study, again) == ["trained again since this evaluation: re-materialize evaluation"]
    assert staleness_notes(study, None) == ["no trained_checkpoint materialization"]
    history = [{"epoch": i, "val_loss": float(v), "ema_val_loss": float(e)} for i, (v, e) in enumerate(rng.random((4, 2)))]
    scaled = scaled_curve(history, 2.0)
    assert [row["val_loss"] * 2.0 for row in scaled] == pytest.approx([row["val_loss"] for row in history])
    assert [row["ema_val_loss"] * 2.0 for row in scaled] == pytest.approx([row["ema_val_loss"] for row in history])


def through_strict_json(metadata: dict) -> dict:
    """What the report reads back: Dagster metadata is JSON, and JSON has no inf or NaN."""
    return json.loads(json.dumps(metadata, allow_nan=False))


def kid_evaluation(lr: float, kids: list[float], failed_seeds=()) -> dict:
    """Evaluation metadata of one identity (a tiny config differing in ``lr``) with one ranking KID per seed."""
    values = TrainConfig(dim=8, model_size="tiny", lr=lr).model_dump()
    replicates = []
    for seed, value in enumerate(kids):
        entry = {"seed": seed, "run_name": f"r{seed}", "checkpoint_path": f"/c/{seed}", "sha256": str(seed),
                 "best_val_loss": 1.0 + 0.01 * seed, "global_step": 10, "stopped_early": False, "train_seconds": 1.0}
        if seed in failed_seeds:
            replicates.append(({**entry, EVALUATION_ERROR: "sampler diverged"}, {}))
        else:
            replicates.append((entry, {"ranking_kid": value, "coverage": 0.5}))
    return through_strict_json(evaluation_study_metadata(values, replicates))


def test_a_copying_replicate_keeps_its_row_last_and_not_better():
    """The issue's example: {0.002, 0.0021, +inf} against {0.010, 0.011, 0.012} on the same seeds used to come out
    as 3 replicates, mean 0.00205, "better", Holm p 0.004."""
    copying = kid_evaluation(1e-3, [0.002, 0.0021, math.inf])
    assert copying["replicates"][2]["metrics"]["ranking_kid"] == "inf"
    rows = study_rows([("mlp-icfm", copying), ("mlp-icfm", kid_evaluation(2e-3, [0.010, 0.011, 0.012]))])
    add_comparisons(rows, rows[1], "ranking_kid")
    row = rows[0]
    assert row["n_replicates"] == 3 and row["per_seed"]["ranking_kid"][2] == math.inf
    assert row["ranking_kid"] == math.inf and math.isnan(row["ranking_kid_ci_low"])
    assert row["ranking_kid_replicates_note"] == "1 of 3 replicates copying (+inf)"
    assert row["vs_baseline"] == NO_DIFFERENCE and row["test"] == SIGN_NONFINITE and row["p_holm"] == 1.0
    assert row["coverage"] == pytest.approx(0.5)  # the other metrics of the replicate are untouched
    markdown = statistics_markdown(rows, rows[1], "ranking_kid")
    line = next(line for line in markdown.splitlines() if line.startswith(f"| `{row['identity']}`"))
    assert "∞ (1 of 3 replicates copying (+inf))" in line and line.endswith("| no detectable difference |")


def test_a_failed_evaluation_counts_as_the_worst_replicate_of_every_metric():
    rows = study_rows([("mlp-icfm", kid_evaluation(1e-3, [0.002, 0.003, 0.004], failed_seeds=[1])),
                       ("mlp-icfm", kid_evaluation(2e-3, [0.010, 0.011, 0.012]))])
    row = rows[0]
    assert row["n_replicates"] == 3 and math.isnan(row["per_seed"]["ranking_kid"][1])
    assert row["ranking_kid"] == math.inf and row["coverage"] == -math.inf  # coverage: higher is better
    assert row["ranking_kid_replicates_note"] == "1 of 3 replicates failed"
    assert row["best_val_loss"] == pytest.approx(1.01)  # the training of that replicate did not fail
    add_comparisons(rows, rows[1], "coverage")
    assert row["vs_baseline"] == NO_DIFFERENCE and row["test"] == SIGN_NONFINITE


def test_older_metadata_with_none_for_a_non_finite_value_still_counts_the_replicate():
    metadata = kid_evaluation(1e-3, [0.002, 0.003, 0.004])
    metadata["replicates"][0]["metrics"]["ranking_kid"] = None
    row = study_rows([("mlp-icfm", metadata)])[0]
    assert row["ranking_kid"] == math.inf and row["ranking_kid_replicates_note"] == "1 of 3 replicates NaN"
