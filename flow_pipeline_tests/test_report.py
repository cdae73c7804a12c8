"""The ablation report: pure table/CSV/figure functions on hand-made rows, then the evaluation and ablation_report
assets over three trained partitions on a real sqlite Dagster instance."""

from __future__ import annotations

import csv
import io
import json
import math
import re

import dagster as dg
import matplotlib.image
import pytest

from flow_pipeline.defs.assets import trained_checkpoint
from flow_pipeline.artifacts import EVALUATION_JSON
from flow_pipeline.core.metrics.ranking import RANKING_METRIC
from flow_pipeline.defs.evaluation_assets import EvaluationConfig, ablation_report, evaluation
from flow_pipeline.evaluation.report import (
    COLUMN_KEYS,
    COLUMNS,
    LOSES_TO_BASELINE,
    MISSING,
    PRIMARY_METRIC,
    build_row,
    csv_text,
    format_cell,
    markdown_report,
    reference_rows,
    sort_rows,
)
from flow_pipeline.evaluation.ablation_report import write_report
from flow_pipeline.evaluation.plots import plot_report
from flow_pipeline_tests.helpers import TINY_TRAIN, run_config
from flow_pipeline_tests.test_plots import embedded_png
from flow_pipeline_tests.test_pipeline import latest_metadata, materialize_data, resources

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def row(partition: str, test_nll, **values) -> dict:
    """A model row whose held-out NLL is ``test_nll`` (nats per row); ``values`` override the other metrics."""
    arch, flow = partition.split("-")
    evaluation_values = {"test_nll": test_nll, "ranking_kid": 0.02, "kid": 0.01, "kid_se": 0.002, "fd_ratio": 2.0, "precision": 0.5,
                         "recall": 0.25, "coverage": 0.75, "memorization_ratio": 1.0, "sampler": "dopri5", "nfe": 50,
                         "n": 64}
    training = {"num_params": 145_232, "best_val_loss": 1.25, "train_seconds": 12.34}
    evaluation_values.update({k: v for k, v in values.items() if k in evaluation_values})
    training.update({k: v for k, v in values.items() if k in training})
    return build_row(partition, arch, flow, evaluation_values, training)


def table_rows(markdown: str, table: int = 0) -> list[list[str]]:
    """Body rows of the ``table``-th Markdown table in ``markdown`` (0: the main table, 1: the statistics), as lists
    of cells."""
    tables, current = [], []
    for line in markdown.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in tables[table][2:]]


def column(name: str) -> int:
    return [c.header for c in COLUMNS].index(name)


# --------------------------------------------------------------------------------------------- pure functions


def test_rows_sort_by_the_metric_with_missing_values_last():
    assert PRIMARY_METRIC == "test_nll"  # the report ranks by held-out likelihood
    rows = [row("a-x", -3.0), row("b-x", None), row("c-x", -4.5), row("d-x", math.nan), row("e-x", -4.5),
            row("f-x", math.inf)]
    assert [r["partition"] for r in sort_rows(rows)] == ["c-x", "e-x", "a-x", "f-x", "b-x", "d-x"]
    descending = sort_rows(rows, PRIMARY_METRIC, ascending=False)
    assert [r["partition"] for r in descending] == ["f-x", "a-x", "c-x", "e-x", "b-x", "d-x"]
    by_recall = sort_rows([row("a-x", 1.0, recall=0.1), row("b-x", 1.0, recall=0.9)], "recall", ascending=False)
    assert [r["partition"] for r in by_recall] == ["b-x", "a-x"]


def test_cells_format_numbers_and_mark_missing_values():
    assert format_cell(None, ".3f") == MISSING
    assert format_cell(math.nan, ".3f") == MISSING
    assert format_cell("", "") == MISSING
    assert format_cell(math.inf, ".3f") == "∞"
    assert format_cell(1234567, ",") == "1,234,567"
    assert format_cell(0.123456, ".3f") == "0.123"
    assert format_cell(7.0, "d") == "7"
    assert format_cell("a|b") == "a\\|b"


def test_markdown_states_the_metric_and_has_one_sorted_row_per_partition():
    rows = [row("mlp-icfm", -2.5, ranking_kid=0.03), row("dit-icfm", -3.125, precision=None, ranking_kid=0.01),
            row("unet-fm", math.nan)]
    markdown = markdown_report(rows)
    header = markdown.splitlines()[0]
    assert "**test_nll**" in header and "ascending" in header and "negative log-likelihood" in header
    # The rule, the protocol (nothing tuned on test) and the meaning of the references are stated above the table.
    assert "Ranking rule" in markdown and "ranks its row last" in markdown
    assert "test rows are scored once" in markdown and "too lenient to judge" in markdown
    body = table_rows(markdown)
    assert [cells[0] for cells in body] == ["dit-icfm", "mlp-icfm", "unet-fm"]
    assert all(len(cells) == len(COLUMNS) for cells in body)
    assert [cells[column("test NLL (nats/row)")] for cells in body] == ["-3.12", "-2.50", MISSING]
    assert [cells[column("ranking KID")] for cells in body] == ["0.01", "0.03", "0.02"]  # shown, not ranked by
    assert body[0][column("precision")] == MISSING
    assert body[1][column("params")] == "145,232"
    assert body[1][column("train time (s)")] == "12.3"


def test_csv_holds_the_same_rows_unrounded():
    rows = sort_rows([row("mlp-icfm", 2.123456789), row("dit-icfm", None)])
    read = list(csv.DictReader(io.StringIO(csv_text(rows))))
    assert list(read[0]) == list(COLUMN_KEYS)
    assert [r["partition"] for r in read] == ["mlp-icfm", "dit-icfm"]
    assert float(read[0]["test_nll"]) == 2.123456789
    assert read[1]["test_nll"] == ""
    assert int(read[0]["num_params"]) == 145_232


def test_figure_is_a_png_that_opens(tmp_path):
    history = [{"epoch": e, "val_loss": 2.0 / e, "ema_val_loss": 1.9 / e} for e in range(1, 6)]
    rows = [row("mlp-icfm", 2.0), row("dit-icfm", None)]
    path = plot_report(sort_rows(rows), {"mlp-icfm": history, "dit-icfm": []}).save(tmp_path / "report.png")
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_write_report_writes_three_consistent_files(tmp_path):
    rows = [row("mlp-icfm", 3.0, ranking_kid=0.01), row("dit-icfm", 1.0, ranking_kid=0.03),
            row("unet-fm", 2.0, ranking_kid=0.02)]
    files = write_report(rows, {}, tmp_path / "reports")
    assert [r["partition"] for r in files.rows] == ["dit-icfm", "unet-fm", "mlp-icfm"]
    assert files.markdown_path.read_text() == files.markdown
    assert [cells[0] for cells in table_rows(files.markdown)] == ["dit-icfm", "unet-fm", "mlp-icfm"]
    assert [r["partition"] for r in csv.DictReader(io.StringIO(files.csv_path.read_text()))] == \
        ["dit-icfm", "unet-fm", "mlp-icfm"]
    assert files.png_path.read_bytes().startswith(PNG_SIGNATURE)
    assert not list((tmp_path / "reports").glob(".tmp-*"))


# --------------------------------------------------------------------------------------------- the assets

# Two architectures and three flows; the slower DiT is exercised by research/evaluate_small.py.
PARTITIONS = ("mlp-icfm", "mlp-vp", "unet-fm")
EVAL_CONFIG = {"solver": "euler", "steps": 4, "extra_samplers": ["rk4:2"], "n_samples": 1000}
METRICS = ("fd", "fd_floor", "fd_ratio", "precision", "recall", "density", "coverage", "memorization_ratio",
           "train_copy_fraction", "copy_threshold", "norm_mean", "norm_std", "real_norm_mean", "real_norm_std", "nn_cosine",
           "kid", "kid_se", "kid_ci_low", "kid_ci_high", "ranking_kid", "fd_inf", "variance_ratio", "norm_ratio",
           "test_nll", "test_bits_per_dim", "loglik_vs_gaussian_full", "loglik_vs_gaussian_full_ci_low",
           "loglik_vs_gaussian_full_ci_high", "loglik_vs_gaussian_diag", "loglik_vs_gaussian_mixture",
           "loglik_vs_gaussian_mixture_ci_low", "loglik_vs_gaussian_mixture_ci_high", "kl_to_truth",
           "kl_closed_fraction", "c2st_accuracy", "rbf_kid")


def train_and_evaluate(instance, partition: str, **kwargs):
    config = run_config(train={**TINY_TRAIN, "max_epochs": 1})
    config["ops"]["evaluation"] = {"config": EVAL_CONFIG}
    return dg.materialize([trained_checkpoint, evaluation], instance=instance, resources=resources(),
                          partition_key=partition, run_config=config, **kwargs)


def step_failure_message(result) -> str:
    failure = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"][0]
    return failure.step_failure_data.error.message + str(failure.step_failure_data.user_failure_data)


@pytest.mark.slow
def test_report_over_three_partitions(artifacts_root, tmp_path):
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        assert materialize_data(instance).success
        # No partition evaluated yet: the report says so instead of writing an empty table.
        empty = dg.materialize([ablation_report], instance=instance, resources=resources(), raise_on_error=False)
        assert not empty.success and "no partition of evaluation" in step_failure_message(empty)
        # Evaluating a partition that was never trained names the missing upstream.
        untrained = dg.materialize([evaluation], instance=instance, resources=resources(), partition_key="unet-vp",
                                   raise_on_error=False)
        assert not untrained.success
        assert "materialize trained_checkpoint[unet-vp] first" in step_failure_message(untrained)
        bad_sampler = dg.materialize([evaluation], instance=instance, resources=resources(), partition_key="unet-vp",
                                     run_config={"ops": {"evaluation": {"config": {"extra_samplers": ["heun:3"]}}}},
                                     raise_on_error=False)
        assert not bad_sampler.success
        assert "config: extra_samplers[0]: " in step_failure_message(bad_sampler)
        assert "unknown solver 'heun'" in step_failure_message(bad_sampler)

        checks = {}
        for partition in PARTITIONS:
            result = train_and_evaluate(instance, partition)
            assert result.success
            checks[partition] = {c.check_name: c for c in result.get_asset_check_evaluations()}

        evaluations = {}
        for partition in PARTITIONS:
            meta = latest_metadata(instance, "evaluation", partition)
            values = {key: value.value for key, value in meta.items()}
            assert set(METRICS) <= set(values)
            assert all(isinstance(values[key], float) for key in METRICS)
            assert values["fd_ratio"] == pytest.approx(values["fd"] / values["fd_floor"])
            assert values["test_bits_per_dim"] == pytest.approx(values["test_nll"] / (1024 * math.log(2)))
            assert values["likelihood_rows"] == 64  # every test row of the tiny split
            assert (values["sampler"], values["nfe"], values["n"]) == ("euler:4", 4, 64)
            assert values["seconds"] > 0
            # Raw space, not z-scores: SONAR-like norms are ~0.2, z-scored 1024-d vectors ~32.
            assert 0.1 < values["norm_mean"] < 0.4
            training = latest_metadata(instance, "trained_checkpoint", partition)
            assert values["checkpoint_path"] == training["checkpoint_path"].value
            assert values["checkpoint_sha256"] == training["sha256"].value
            saved = json.loads((artifacts_root / "evaluation" / values["run_name"] / EVALUATION_JSON).read_text())
            assert saved["partition"] == partition and saved["n"] == 64
            assert [r["sampler"] for r in saved["results"]] == ["euler:4", "rk4:2"]
            assert [r["nfe"] for r in saved["results"]] == [4, 8]
            assert {k: saved["results"][0]["metrics"][k] for k in METRICS} == {k: values[k] for k in METRICS}
            # Memorisation against the rows trained on, the sample-size note next to the numbers, the references.
            assert (values["dataset"], values["n_training_rows"], values["n_target"]) == ("full", 512, 5120)
            assert values["n_note"].startswith("n = 64 < 5 x dim = 5120 (the test split has only 64 rows)")
            # The built-in data records its truth: a reference row for it, at KL 0 and the lowest NLL.
            assert set(values["references"]) == {"held-out real (val)", "gaussian-full", "gaussian-diag",
                                                 "gaussian-mixture", "truth"}
            truth, full = values["references"]["truth"], values["references"]["gaussian-full"]
            assert truth["kl_to_truth"] == 0.0 and truth["test_nll"] < full["test_nll"]
            assert values["loglik_vs_gaussian_full"] == pytest.approx(full["test_nll"] - values["test_nll"])
            assert "kid" in values["metric_spaces"]["train-normalised (z-scored with the training rows' mean and "
                                                    "floored std)"]
            check = checks[partition]["evaluation_beats_gaussian_full"]
            assert check.passed == (values["loglik_vs_gaussian_full_ci_low"] > 0)
            assert check.metadata["ci_low"].value == values["loglik_vs_gaussian_full_ci_low"]
            evaluations[partition] = (values, {key: value.value for key, value in training.items()})
            with open(values["samples_figure_png"], "rb") as handle:
                assert embedded_png(values["samples_figure"]) == handle.read()
            with open(training["loss_curve_png"].value, "rb") as handle:
                assert embedded_png(training["loss_curve"].value) == handle.read()

        report = dg.materialize([ablation_report], instance=instance, resources=resources())
        assert report.success
        meta = {key: value.value for key, value in latest_metadata(instance, "ablation_report").items()}
        with open(meta["csv_path"], newline="") as handle:
            csv_rows = list(csv.DictReader(handle))
        png = open(meta["figure_png"], "rb").read()
        image = matplotlib.image.imread(meta["figure_png"])

        # A newer trained_checkpoint of one partition than the one evaluated: its row says the evaluation is stale.
        stale = PARTITIONS[0]
        instance.report_runless_asset_event(dg.AssetMaterialization(
            asset_key="trained_checkpoint", partition=stale, metadata={"sha256": "0" * 64, "num_params": 1}))
        assert dg.materialize([ablation_report], instance=instance, resources=resources()).success
        stale_markdown = latest_metadata(instance, "ablation_report")["report"].value
    # One row per materialized partition, sorted by the primary metric the header line names.
    markdown = meta["report"]
    assert re.search(r"Sorted by \*\*test_nll\*\*.*ascending", markdown.splitlines()[0])
    all_rows = table_rows(markdown)
    # All three partitions trained on the same rows: one row per reference.
    assert sorted(cells[0] for cells in all_rows if cells[0].startswith("reference")) == [
        "reference: gaussian-diag", "reference: gaussian-full", "reference: gaussian-mixture",
        "reference: held-out real (val)", "reference: truth"]
    body = [cells for cells in all_rows if not cells[0].startswith("reference")]
    assert sorted(cells[0] for cells in body) == sorted(PARTITIONS)
    expected_order = sorted(PARTITIONS, key=lambda p: (evaluations[p][0]["test_nll"], p))
    assert [cells[0] for cells in body] == expected_order == meta["partitions"]
    assert meta["best_partition"] == expected_order[0] and meta["n_partitions"] == 3
    for cells in body:
        values, training = evaluations[cells[0]]
        assert cells[column("FD / floor")] == f"{values['fd_ratio']:.3f}"
        assert cells[column("ranking KID")] == format_cell(values["ranking_kid"], ".4g")
        assert cells[column("test NLL (nats/row)")] == f"{values['test_nll']:.2f}"
        assert cells[column("params")] == f"{training['num_params']:,}"
        assert cells[column("best val loss")] == f"{training['best_val_loss']:.4f}"
        loses = not checks[cells[0]]["evaluation_beats_gaussian_full"].passed
        assert cells[column("note")].startswith(LOSES_TO_BASELINE) == loses
        assert "n = 64 < 5 x dim" in cells[column("note")]
    assert meta["not_beating_gaussian_full"] == [p for p in PARTITIONS
                                                 if not checks[p]["evaluation_beats_gaussian_full"].passed]

    model_csv_rows = [r for r in csv_rows if not r["partition"].startswith("reference")]
    assert [r["partition"] for r in model_csv_rows] == expected_order
    for r in model_csv_rows:
        values, training = evaluations[r["partition"]]
        assert float(r["fd_ratio"]) == values["fd_ratio"] and float(r["recall"]) == values["recall"]
        assert int(r["num_params"]) == training["num_params"]
        assert float(r["train_seconds"]) == training["train_seconds"]

    assert png.startswith(PNG_SIGNATURE) and len(png) > 10_000
    assert image.ndim == 3 and image.shape[0] > 100
    assert embedded_png(meta["summary"]) == png  # the figure below the summary, inline in the UI
    assert expected_order[0] in meta["summary"].split("\n")[2]  # the summary's first row: the best test NLL
    assert str(artifacts_root / "reports") in meta["markdown_path"]

    notes = {cells[0]: cells[column("note")] for cells in table_rows(stale_markdown)}
    assert "trained again since this evaluation" in notes[stale]
    assert all("trained again" not in notes[p] for p in PARTITIONS[1:])


@pytest.mark.parametrize("config,field", [({"solver": "heun"}, "solver"), ({"solver": "euler", "steps": 0}, "solver"),
                                          ({"extra_samplers": ["rk4:4", "euler:x"]}, "extra_samplers[1]")])
def test_a_bad_sampler_setting_names_its_config_field(config, field):
    with pytest.raises(ValueError, match=rf"^{re.escape(field)}: "):
        EvaluationConfig(**config).samplers()


# --------------------------------------------------------------------------------------------- ranking and baselines


def test_report_ranks_held_out_real_above_every_adversary(adversary_scores):
    """The report's sort over evaluate_samples of real data and the adversaries (shrunk, inflated, collapsed,
    train copies): held-out real comes first, and copies rank below every non-copying set."""
    rows = [build_row(name, "—", "—", metrics, {}) for name, metrics in adversary_scores.items()]
    body = table_rows(markdown_report(rows, RANKING_METRIC))
    order = [cells[0] for cells in body]
    assert order[0] == "held-out real"
    assert order[-1] == "train copies" and body[-1][column("ranking KID")] == "∞"
    assert set(order) == set(adversary_scores)


def paired(low: float, high: float) -> dict:
    """An evaluation's interval of model - gaussian-full (nats per row) around its midpoint."""
    return {"loglik_vs_gaussian_full": (low + high) / 2, "loglik_vs_gaussian_full_ci_low": low,
            "loglik_vs_gaussian_full_ci_high": high}


def test_a_model_that_does_not_beat_gaussian_full_is_marked():
    """The mark comes from the interval of the difference, not from two point values: beaten only when its lower
    end lies above 0."""
    loser = build_row("mlp-icfm", "mlp", "icfm", {"test_nll": -10.0, **paired(-3.5, -0.25)}, {})
    winner = build_row("dit-icfm", "dit", "icfm", {"test_nll": -12.0, **paired(0.125, 4.0)}, {})
    # A better mean whose interval reaches 0 is no detectable difference: not a win.
    undecided = build_row("unet-fm", "unet", "fm", {"test_nll": -11.0, **paired(-0.5, 3.0)}, {}, note="stale")
    touching = build_row("unet-icfm", "unet", "icfm", {"test_nll": -11.0, **paired(0.0, 3.0)}, {})
    unknown = build_row("unet-vp", "unet", "vp", {"test_nll": -9.0}, {})
    assert loser["note"].startswith(LOSES_TO_BASELINE) and undecided["note"] == f"{LOSES_TO_BASELINE}; stale"
    assert touching["note"].startswith(LOSES_TO_BASELINE)
    assert winner["note"] == "" and unknown["note"] == ""
    # A study row's interval (over replicates) stands over the first replicate's own paired interval.
    pooled = build_row("mlp-icfm", "mlp", "icfm", paired(0.5, 2.0), {}, study=paired(-1.0, 2.5))
    assert pooled["note"].startswith(LOSES_TO_BASELINE)
    assert pooled["loglik_vs_gaussian_full_ci_low"] == -1.0
    markdown = markdown_report([loser, winner, undecided])
    assert "does not beat gaussian-full" in markdown.split("|")[0]  # the header explains the mark
    cells = table_rows(markdown_report([pooled]))[0]
    assert (cells[column("CI low")], cells[column("CI high")]) == ("-1.00", "+2.50")


def test_reference_rows_appear_once_per_training_set():
    references = {"gaussian-full": {"test_nll": -2100.5, "kl_to_truth": 610.0, "coverage": 0.8, "n": 64},
                  "truth": {"test_nll": -2710.5, "kl_to_truth": 0.0, "n": 64},
                  "held-out real (val)": {"ranking_kid": -0.001, "coverage": 0.97, "n": 64}}
    evaluations = {"mlp-icfm": {"references": references, "dataset": "full", "seed": 0},
                   "dit-icfm": {"references": references, "dataset": "full", "seed": 0},
                   "unet-fm": {"references": references, "dataset": "1k", "seed": 0}}
    rows = reference_rows(evaluations)
    assert sorted(r["partition"] for r in rows) == ["reference: gaussian-full"] * 2 + \
        ["reference: held-out real (val)"] * 2 + ["reference: truth"] * 2
    assert {r["note"].split(",")[0] for r in rows} == {"dataset full", "dataset 1k"}
    # By held-out NLL the truth is the floor; held-out real rows have no density, so they go after every model.
    ordered = sort_rows(rows + [row("mlp-icfm", -2500.0)])
    assert [r["partition"] for r in ordered] == ["reference: truth"] * 2 + ["mlp-icfm"] + \
        ["reference: gaussian-full"] * 2 + ["reference: held-out real (val)"] * 2
    assert {r["coverage"] for r in rows if "gaussian" in r["partition"]} == {0.8}
    assert {r["kl_to_truth"] for r in rows if "truth" in r["partition"]} == {0.0}
