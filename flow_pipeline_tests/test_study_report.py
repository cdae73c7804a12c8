"""Study rows on real (tiny) trainings: one row per identity, intervals over replicates, and verdicts that are right
by construction: an untrained model is "worse" than a trained one, the same config on other seeds is not
distinguishable from itself."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import stats

from flow_pipeline.config import TrainConfig
from flow_pipeline.core.study_stats import BETTER, NO_DIFFERENCE, NOT_TESTABLE, SIGN_NONFINITE, WORSE
from flow_pipeline.core.trainer import train
from flow_pipeline.core.run_identity import identity_key, identity_of
from flow_pipeline.evaluation.study_report import (
    EVALUATION_ERROR,
    _is_default,
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
                  device="cpu", lr=3e-3, log_every=100, normalization="zscore", linear_skip=False)  # z-scored data
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


# --------------------------------------------------------------------------------------------- a study ranked by likelihood

GAUSSIAN_FULL_NLL, MIXTURE_NLL, TRUTH_NLL = -2400.0, -2520.0, -3000.0  # nats per row on the test rows scored
MIXTURE_NOTE = "K = 64 diagonal components on the leading r = 512 of 1024 gaussian-full-whitened coordinates"
STUDY_REFERENCES = {"gaussian-full": {"test_nll": GAUSSIAN_FULL_NLL, "kl_to_truth": GAUSSIAN_FULL_NLL - TRUTH_NLL,
                                      "c2st_accuracy": 0.9, "n": 64},
                    "gaussian-mixture": {"test_nll": MIXTURE_NLL, "kl_to_truth": MIXTURE_NLL - TRUTH_NLL,
                                         "kl_closed_fraction": 0.2, "n": 64, "note": MIXTURE_NOTE},
                    "truth": {"test_nll": TRUTH_NLL, "kl_to_truth": 0.0, "n": 64},
                    "held-out real (val)": {"c2st_accuracy": 0.51, "ranking_kid": 1e-4, "n": 64}}
STUDY_ORDER = ["mlp-icfm", "mlp-vp", "dit-icfm", "unet-icfm", "unet-fm"]


def likelihood_replicate(rng: np.random.Generator, mean_nll: float, copying: bool = False) -> dict:
    """One replicate's primary metrics as an evaluation reports them: its test NLL (random around ``mean_nll``),
    model - gaussian-full with its own per-row interval, KL to the truth and the share closed, C2ST, ranking KID.
    A copying replicate gives a test row zero density: +inf NLL and KL, -inf likelihood gain, +inf ranking KID."""
    nll = math.inf if copying else mean_nll + rng.normal(scale=4.0)
    gain, half = GAUSSIAN_FULL_NLL - nll, rng.uniform(1.0, 3.0)
    kl, accuracy = nll - TRUTH_NLL, rng.uniform(0.6, 0.95)
    return {"test_nll": nll, "test_bits_per_dim": nll / (1024 * math.log(2)), "loglik_vs_gaussian_full": gain,
            "loglik_vs_gaussian_full_ci_low": gain - half, "loglik_vs_gaussian_full_ci_high": gain + half,
            "loglik_vs_gaussian_mixture": MIXTURE_NLL - nll,
            "loglik_vs_gaussian_mixture_ci_low": MIXTURE_NLL - nll - half,
            "loglik_vs_gaussian_mixture_ci_high": MIXTURE_NLL - nll + half,
            "kl_to_truth": kl, "kl_to_truth_ci_low": kl - half, "kl_to_truth_ci_high": kl + half,
            "kl_closed_fraction": 1 - kl / (GAUSSIAN_FULL_NLL - TRUTH_NLL), "c2st_accuracy": accuracy,
            "c2st_accuracy_ci_low": accuracy - 0.1, "c2st_accuracy_ci_high": accuracy + 0.05,
            "ranking_kid": math.inf if copying else rng.uniform(1e-3, 1e-2)}


def likelihood_evaluation(partition: str, replicates: list[dict]) -> dict:
    """The evaluation metadata of one partition (the report reads it back as strict JSON): the first replicate's
    keys, the references, and the study over every replicate."""
    arch, flow = partition.split("-")
    values = TrainConfig(dim=16, model_size="tiny", arch=arch, flow=flow).model_dump()
    entries = [({"seed": seed, "run_name": f"{partition}-{seed}", "checkpoint_path": f"/c/{partition}/{seed}",
                 "sha256": f"{partition}{seed}", "best_val_loss": 1.0 + 0.01 * seed, "global_step": 10,
                 "stopped_early": False, "train_seconds": 1.0}, metrics) for seed, metrics in enumerate(replicates)]
    study = evaluation_study_metadata(values, entries)
    return through_strict_json({**replicates[0], "references": STUDY_REFERENCES, "dataset": "full", "seed": 0,
                                **study})


def replicate_t_interval(values: list[float]) -> tuple[float, float, float]:
    """(mean, low, high) of the 95% Student-t interval over replicates."""
    values = np.asarray(values)
    half = stats.t.ppf(0.975, values.size - 1) * values.std(ddof=1) / math.sqrt(values.size)
    return values.mean(), values.mean() - half, values.mean() + half


def test_a_small_studys_report_ranks_by_held_out_likelihood_with_a_copying_replicate_last(tmp_path):
    from flow_pipeline.evaluation.ablation_report import build_ablation_report
    from flow_pipeline.evaluation.report import COLUMNS, LOSES_TO_BASELINE
    from flow_pipeline_tests.test_report import table_rows

    rng = np.random.default_rng(2027)
    replicates = {"mlp-icfm": [likelihood_replicate(rng, -2450.0) for _ in range(3)],
                  "mlp-vp": [likelihood_replicate(rng, -2401.0) for _ in range(3)],  # about gaussian-full's level
                  "dit-icfm": [likelihood_replicate(rng, -2550.0) for _ in range(3)],
                  "unet-icfm": [likelihood_replicate(rng, -2600.0) for _ in range(2)]
                  + [likelihood_replicate(rng, 0.0, copying=True)],  # the best two, and one that copies
                  "unet-fm": [likelihood_replicate(rng, -2500.0)]}
    evaluations = [(partition, likelihood_evaluation(partition, values)) for partition, values in replicates.items()]
    report = build_ablation_report(evaluations, lambda partition: None, STUDY_ORDER, "mlp-icfm", tmp_path)
    rows = {row["partition"]: row for row in report.rows}

    # Every row keeps every replicate; its numbers are intervals over them (the replicates' own per-row
    # intervals are not pooled), except a one-replicate row, which keeps its own paired interval.
    for partition in ("mlp-icfm", "mlp-vp", "dit-icfm"):
        row = rows[partition]
        for key in ("test_nll", "loglik_vs_gaussian_full", "loglik_vs_gaussian_mixture", "kl_to_truth",
                    "c2st_accuracy"):
            expected = replicate_t_interval([values[key] for values in replicates[partition]])
            assert (row[key], row[f"{key}_ci_low"], row[f"{key}_ci_high"]) == pytest.approx(expected, rel=1e-9)
        assert row["loglik_vs_gaussian_full"] == pytest.approx(GAUSSIAN_FULL_NLL - row["test_nll"], rel=1e-9)
        marked = row["note"].startswith(LOSES_TO_BASELINE)
        assert marked == (row["loglik_vs_gaussian_full_ci_low"] <= 0)  # the verdict from the interval
    assert not rows["dit-icfm"]["note"].startswith(LOSES_TO_BASELINE) and rows["mlp-vp"]["note"].startswith(
        LOSES_TO_BASELINE)
    single, own = rows["unet-fm"], replicates["unet-fm"][0]
    assert (single["loglik_vs_gaussian_full_ci_low"], single["loglik_vs_gaussian_full_ci_high"]) == \
        pytest.approx((own["loglik_vs_gaussian_full_ci_low"], own["loglik_vs_gaussian_full_ci_high"]), rel=1e-12)

    # The copying replicate: counted, its row's NLL the worst value, never called better, marked against gaussian-full.
    copying = rows["unet-icfm"]
    assert copying["n_replicates"] == 3 and copying["test_nll"] == math.inf
    assert copying["test_nll_replicates_note"] == "1 of 3 replicates infinite (+inf)"
    assert copying["ranking_kid_replicates_note"] == "1 of 3 replicates copying (+inf)"
    assert copying["vs_baseline"] == NO_DIFFERENCE and copying["test"] == SIGN_NONFINITE
    assert copying["note"].startswith(LOSES_TO_BASELINE) and "unet-icfm" in report.losing
    assert rows["dit-icfm"]["vs_baseline"] == BETTER and rows["dit-icfm"]["test"] == "paired t"

    # The table: sorted by test NLL, the truth first, the copying row below every row with a finite NLL.
    markdown = report.files.markdown
    assert markdown.startswith("Sorted by **test_nll**")
    order = [cells[0] for cells in table_rows(markdown)]
    assert order == ["reference: truth", "dit-icfm", "reference: gaussian-mixture", "unet-fm", "mlp-icfm", "mlp-vp",
                     "reference: gaussian-full", "unet-icfm", "reference: held-out real (val)"]
    headers = [column.header for column in COLUMNS]
    cells = {row[0]: row for row in table_rows(markdown)}
    for partition in ("dit-icfm", "mlp-vp"):
        row = rows[partition]
        assert cells[partition][headers.index("test NLL (nats/row)")] == f"{row['test_nll']:.2f}"
        assert cells[partition][headers.index("CI low")] == f"{row['loglik_vs_gaussian_full_ci_low']:+.2f}"
        assert cells[partition][headers.index("vs gaussian-mixture (nats/row)")] == \
            f"{row['loglik_vs_gaussian_mixture']:+.2f}"
        assert cells[partition][headers.index("mixture CI high")] == f"{row['loglik_vs_gaussian_mixture_ci_high']:+.2f}"
        assert cells[partition][headers.index("KL to truth")] == f"{row['kl_to_truth']:.1f}"
        assert cells[partition][headers.index("C2ST acc.")] == f"{row['c2st_accuracy']:.3f}"
    assert cells["unet-icfm"][headers.index("test NLL (nats/row)")] == "∞"
    assert cells["reference: truth"][headers.index("KL to truth")] == "0.0"
    mixture = cells["reference: gaussian-mixture"]
    assert (mixture[headers.index("KL to truth")], mixture[headers.index("KL closed")]) == ("480.0", "0.200")
    assert mixture[headers.index("note")].endswith(f"(as dit-icfm); {MIXTURE_NOTE}")
    statistics = markdown[markdown.index("### Replicates and comparison with the baseline (test_nll)"):]
    line = next(line for line in statistics.splitlines() if line.startswith(f"| `{copying['identity']}`"))
    assert "∞ (1 of 3 replicates infinite (+inf))" in line and line.endswith("| no detectable difference |")


@pytest.mark.parametrize("seed", range(4))
def test_the_default_config_is_recognised_at_its_own_training_rows(seed):
    """The defaults size principal_dims, prototypes and max_steps from the training rows: a run of the defaults on a
    small set is the default config there, and the sizes of one set are not the default on another."""
    rng = np.random.default_rng(seed)
    small, large = int(rng.integers(200, 1_000)), int(rng.integers(20_000, 40_000))

    def defaults_at(rows):
        return identity_of(TrainConfig(train_rows=rows).to_core().to_dict())

    at_small = defaults_at(small)
    # the rule written out: a direction per 12 rows, a prototype per 30, at most 1,600 passes of batch 256
    assert (at_small["principal_dims"], at_small["prototypes"], at_small["max_steps"]) == (
        small // 12, small // 30, -(-1_600 * small // 256))
    assert _is_default(at_small) and _is_default(defaults_at(large))
    assert not _is_default({**at_small, "train_rows": large})  # small-data sizes on a large set
    assert not _is_default({**defaults_at(large), "train_rows": small})
    assert not _is_default({**at_small, "lr": at_small["lr"] * 2})
