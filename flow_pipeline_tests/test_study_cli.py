"""``python -m flow_pipeline.study``: knobs from a run config file and flags, and a real study that ends in a report."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys

import pytest

from flow_pipeline.study import PRESET_KNOBS, parse_args, study_run_config, training_knobs
from flow_pipeline_tests.helpers import REPO_ROOT, cli_env


def test_knobs_come_from_the_preset_then_the_file_then_flags_then_set(tmp_path):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"ops": {"trained_checkpoint": {"config": {"lr": 0.005, "max_steps": 900,
                                                                              "normalization": "zscore"}}}}))
    args = parse_args(["--config", str(config), "--max-steps", "120", "--set", "normalization=whiten",
                       "--set", "linear_skip=false", "--set", "time_sampling=logit_normal"])
    knobs = training_knobs(args)
    assert knobs["lr"] == 0.005  # the file over the preset
    assert knobs["max_steps"] == 120  # a flag over the file
    assert knobs["normalization"] == "whiten" and knobs["linear_skip"] is False  # --set over everything, JSON-typed
    assert knobs["time_sampling"] == "logit_normal"  # not JSON: kept as text
    assert knobs["model_size"] == PRESET_KNOBS["model_size"]  # untouched preset knobs stay
    train = study_run_config(args)["ops"]["trained_checkpoint"]["config"]
    assert train["replicates"] == 3 and train["resume"] is True


def test_a_flat_knob_file_is_read_too(tmp_path):
    config = tmp_path / "flat.json"
    config.write_text(json.dumps({"model_size": "tiny"}))
    assert training_knobs(parse_args(["--config", str(config)]))["model_size"] == "tiny"


@pytest.mark.parametrize("content, words", [("{not json", "cannot read it as JSON"),
                                            ('{"ops": {"evaluation": {}}}', "no ops.trained_checkpoint.config"),
                                            ("[1, 2]", "expected a JSON object")])
def test_a_bad_config_file_is_named(tmp_path, content, words):
    config = tmp_path / "bad.json"
    config.write_text(content)
    with pytest.raises(SystemExit, match=words) as raised:
        training_knobs(parse_args(["--config", str(config)]))
    assert str(config) in str(raised.value)


def test_an_unknown_knob_is_named_before_anything_runs(tmp_path):
    config = tmp_path / "typo.json"
    config.write_text(json.dumps({"learning_rate": 0.01}))
    with pytest.raises(SystemExit, match="unknown training knob.*learning_rate") as raised:
        training_knobs(parse_args(["--config", str(config)]))
    assert "lr" in str(raised.value)  # the valid names are listed
    with pytest.raises(SystemExit, match="normalisation"):
        training_knobs(parse_args(["--set", "normalisation=whiten"]))


def test_a_set_without_equals_is_refused():
    with pytest.raises(SystemExit, match="expected KNOB=VALUE"):
        training_knobs(parse_args(["--set", "normalization"]))


@pytest.mark.slow
@pytest.mark.e2e
def test_the_shipped_recipe_studied_with_replicates_ends_in_a_report(tmp_path):
    """The README's study command on the shipped recipe, with fewer built-in rows and samples to stay quick."""
    env = cli_env(DAGSTER_HOME=str(tmp_path / "home"), FLOW_PIPELINE_ROOT=str(tmp_path / "artifacts"))
    (tmp_path / "home").mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "flow_pipeline.study", "--config", "configs/quickstart.json", "--archs", "mlp",
         "--flows", "icfm", "vp", "--replicates", "2", "--max-steps", "200", "--n-synthetic", "6400",
         "--n-samples", "256"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    reports = tmp_path / "artifacts" / "reports"
    report = next(reports.glob("*.md")).read_text()
    for partition in ("mlp-icfm", "mlp-vp"):
        assert partition in report
    assert "-matched#" in report and "-small#" not in report  # the recipe's identity (its size), not the default
    assert "study: 2 partitions x 2 replicates" in done.stdout
    # Ranked by held-out likelihood, each row over its 2 replicates, beside gaussian-full and the truth.
    assert "Sorted by **test_nll**" in report and "comparison with the baseline (test_nll)" in report
    with open(next(reports.glob("*.csv")), newline="") as handle:
        rows = {row["partition"]: row for row in csv.DictReader(handle)}
    for partition in ("mlp-icfm", "mlp-vp"):
        row = {key: float(rows[partition][key]) for key in ("n_replicates", "test_nll", "loglik_vs_gaussian_full",
                                                             "loglik_vs_gaussian_full_ci_low",
                                                             "loglik_vs_gaussian_full_ci_high", "kl_to_truth",
                                                             "c2st_accuracy")}
        assert row["n_replicates"] == 2 and math.isfinite(row["test_nll"]) and row["kl_to_truth"] > 0
        assert row["loglik_vs_gaussian_full_ci_low"] < row["loglik_vs_gaussian_full"] < \
            row["loglik_vs_gaussian_full_ci_high"]
        assert 0 <= row["c2st_accuracy"] <= 1
        # Each replicate samples with its own seed: evaluation seed 0 + replicate index.
        saved = [json.loads(path.read_text()) for path in (tmp_path / "artifacts" / "evaluation").glob(
            f"{partition}-*/evaluation.json")]
        assert sorted(evaluation["seed"] for evaluation in saved) == [0, 1]
    assert rows["reference: truth"]["kl_to_truth"] == "0.0"
