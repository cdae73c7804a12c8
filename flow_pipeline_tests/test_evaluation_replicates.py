"""The evaluation asset over the replicates of one partition: each replicate samples with its own seed, a replicate
whose checkpoint no longer reads stays in the study with its error and ranks its row worst, and when none reads the
asset fails naming the file."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import dagster as dg
import pytest

from flow_pipeline.artifacts import EVALUATION_JSON
from flow_pipeline.defs.assets import trained_checkpoint
from flow_pipeline.defs.evaluation_assets import ablation_report, evaluation
from flow_pipeline.defs.materializations import latest_metadata
from flow_pipeline.evaluation.report import LOSES_TO_BASELINE
from flow_pipeline_tests.helpers import TINY_TRAIN, run_config
from flow_pipeline_tests.test_pipeline import materialize_data, resources
from flow_pipeline_tests.test_report import step_failure_message

PARTITION = "mlp-icfm"
SEED = 5  # the evaluation's seed: replicate i samples with SEED + i
EVALUATE = {"solver": "euler", "steps": 4, "seed": SEED}


def evaluate_again(instance, **kwargs):
    """Only the evaluation of the partition, on the checkpoints its latest training recorded."""
    return dg.materialize([evaluation], instance=instance, resources=resources(), partition_key=PARTITION,
                          run_config={"ops": {"evaluation": {"config": EVALUATE}}}, **kwargs)


@pytest.mark.slow
def test_replicates_sample_with_their_own_seed_and_a_failed_one_stays_in_its_row(artifacts_root, tmp_path):
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        assert materialize_data(instance).success
        config = run_config(train={**TINY_TRAIN, "max_epochs": 1, "replicates": 2})
        config["ops"]["evaluation"] = {"config": EVALUATE}
        assert dg.materialize([trained_checkpoint, evaluation], instance=instance, resources=resources(),
                              partition_key=PARTITION, run_config=config).success
        replicates = latest_metadata(instance, trained_checkpoint.key, PARTITION)["replicates"]
        saved = [json.loads((artifacts_root / "evaluation" / entry["run_name"] / EVALUATION_JSON).read_text())
                 for entry in replicates]
        training_seeds = [entry["seed"] for entry in replicates]
        assert training_seeds[1] == training_seeds[0] + 1 and SEED not in training_seeds
        assert [evaluation_json["seed"] for evaluation_json in saved] == [SEED, SEED + 1]

        # Replicate 1's best.pt is damaged after its training: the evaluation goes on without it, and says why.
        damaged = Path(replicates[1]["checkpoint_path"])
        damaged.write_bytes(damaged.read_bytes()[:1000])
        assert evaluate_again(instance).success
        meta = latest_metadata(instance, evaluation.key, PARTITION)
        assert meta["n_replicates"] == 2 and [entry["seed"] for entry in meta["replicates"]] == training_seeds
        assert "evaluation_error" not in meta["replicates"][0] and meta["replicates"][0]["metrics"]
        assert meta["replicates"][1]["metrics"] == {} and str(damaged) in meta["replicates"][1]["evaluation_error"]
        assert len(meta["failed_replicates"]) == 1 and str(damaged) in meta["failed_replicates"][0]
        assert meta["seed"] == SEED  # the headline numbers: replicate 0's

        # In the report the failed replicate counts: the row's test NLL is the worst value, below every reference
        # row with a likelihood, and it does not beat gaussian-full.
        assert dg.materialize([ablation_report], instance=instance, resources=resources()).success
        report = latest_metadata(instance, ablation_report.key)
        with open(report["csv_path"], newline="") as handle:
            rows = list(csv.DictReader(handle))
        order = [row["partition"] for row in rows]
        row = rows[order.index(PARTITION)]
        assert int(row["n_replicates"]) == 2 and float(row["test_nll"]) == math.inf
        assert row["note"].startswith(LOSES_TO_BASELINE) and report["not_beating_gaussian_full"] == [PARTITION]
        scored = [r["partition"] for r in rows if r["test_nll"] and math.isfinite(float(r["test_nll"]))]
        assert sorted(scored) == ["reference: gaussian-diag", "reference: gaussian-full", "reference: gaussian-mixture",
                                  "reference: truth"]
        assert order.index(PARTITION) == len(scored)
        assert "1 of 2 replicates failed" in report["report"]

        # No replicate reads: the evaluation fails, naming the file.
        missing = Path(replicates[0]["checkpoint_path"])
        missing.unlink()
        failed = evaluate_again(instance, raise_on_error=False)
        assert not failed.success and str(missing) in step_failure_message(failed)
