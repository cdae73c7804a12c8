"""Replicates: one materialization trains seeds seed..seed+N-1; a resumed re-run skips finished ones; the metadata
lists every replicate with the mean and t-interval of the best validation loss."""

from __future__ import annotations

import json
import math
from pathlib import Path

import dagster as dg
import pytest
from scipy.stats import t as student_t

from flow_pipeline.core.checkpoint import LAST_NAME, sha256_file
from flow_pipeline.core.run_identity import identity_key
from flow_pipeline.defs.assets import trained_checkpoint
from flow_pipeline.replicates import (
    completed_result,
    replicate_seeds,
    replicates_from_metadata,
)
from flow_pipeline_tests.helpers import TINY_DATASET, TINY_TRAIN, run_config
from flow_pipeline_tests.test_pipeline import materialize_data, resources

PARTITION = "unet-icfm"  # the fastest tiny model


def materialize(instance, **train):
    return dg.materialize([trained_checkpoint], instance=instance, resources=resources(), partition_key=PARTITION,
                          run_config=run_config(train={**TINY_TRAIN, **train}), selection=[trained_checkpoint])


def latest(instance) -> dict:
    record = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=trained_checkpoint.key, asset_partitions=[PARTITION]), limit=1).records[0]
    return {key: value.value for key, value in record.asset_materialization.metadata.items()}


def test_identity_ignores_seed_and_resume_only():
    config = {"arch": "mlp", "flow": "icfm", "dataset": "1k", "aug": "none", "model_size": "tiny", "lr": 1e-3,
              "seed": 1, "resume": False}
    assert identity_key(config) == identity_key({**config, "seed": 7, "resume": True})
    assert identity_key(config) != identity_key({**config, "lr": 2e-3})
    assert identity_key(config).startswith("mlp-icfm-1k-none-tiny#")
    assert replicate_seeds(5, 3) == [5, 6, 7]
    with pytest.raises(ValueError, match="replicates"):
        replicate_seeds(5, 0)


def test_old_single_checkpoint_metadata_reads_as_one_replicate():
    metadata = {"checkpoint_path": "/x/best.pt", "sha256": "ab", "best_val_loss": 1.5, "global_step": 9,
                "run_name": "r", "config": {"seed": 42}, "stopped_early": False, "train_seconds": 1.0}
    [entry] = replicates_from_metadata(metadata)
    assert (entry["checkpoint_path"], entry["sha256"], entry["seed"]) == ("/x/best.pt", "ab", 42)


@pytest.mark.slow
def test_replicates_train_every_seed_and_a_resumed_rerun_skips_finished_ones(artifacts_root, tmp_path):
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        assert materialize_data(instance).success
        assert materialize(instance, replicates=2, seed=3).success
        first = latest(instance)
        entries = first["replicates"]
        assert [entry["seed"] for entry in entries] == [3, 4] and first["n_replicates"] == 2
        assert len({entry["checkpoint_path"] for entry in entries}) == 2
        for entry in entries:
            assert sha256_file(entry["checkpoint_path"]) == entry["sha256"]
            assert entry["global_step"] == 16
        losses = [entry["best_val_loss"] for entry in entries]
        mean = sum(losses) / 2
        half = student_t.ppf(0.975, 1) * abs(losses[0] - losses[1]) / 2  # s / sqrt(2) = |a - b| / 2 for n = 2
        assert first["best_val_loss_mean"] == pytest.approx(mean)
        assert (first["best_val_loss_ci95_low"], first["best_val_loss_ci95_high"]) == pytest.approx(
            (mean - half, mean + half))
        # Top-level keys stay those of the first replicate, for one-checkpoint readers.
        assert first["checkpoint_path"] == entries[0]["checkpoint_path"]

        # A resumed run with 3 replicates skips the finished seeds 3 and 4 (their files untouched) and trains 5.
        mtimes = [Path(entry["checkpoint_path"]).stat().st_mtime_ns for entry in entries]
        assert materialize(instance, replicates=3, seed=3, resume=True).success
        second = latest(instance)
        assert [entry["seed"] for entry in second["replicates"]] == [3, 4, 5]
        assert second["replicates"][:2] == entries
        assert [Path(entry["checkpoint_path"]).stat().st_mtime_ns for entry in entries] == mtimes
        assert all(sha256_file(e["checkpoint_path"]) == e["sha256"] for e in second["replicates"])
        assert math.isfinite(second["best_val_loss_ci95_low"])


def test_completed_result_rejects_a_changed_file_or_another_config(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = {"arch": "mlp", "seed": 1, "lr": 1e-3, "resume": False}
    assert completed_result(run_dir, config) is None  # nothing there
    (run_dir / "best.pt").write_bytes(b"not a checkpoint")
    result = {"config": config, "checkpoint_path": str(run_dir / "best.pt"), "sha256": sha256_file(run_dir / "best.pt")}
    (run_dir / "result.json").write_text(json.dumps(result))
    assert completed_result(run_dir, config) is None  # the sha256 matches, but it does not load


def test_completed_result_accepts_only_a_finished_intact_run_of_the_same_config(tmp_path):
    """Without last.pt, with the reported sha256, loadable, same identity and seed: done. An interrupted run (last.pt
    beside best.pt), a changed file, another seed or another lr: not done, so it is (re)trained or resumed."""
    from flow_pipeline.core.checkpoint import save_checkpoint
    from flow_pipeline.core.models import build_model

    run_dir = tmp_path / "run"
    config = {"arch": "mlp", "seed": 1, "lr": 1e-3, "resume": False}
    state = {key: 0 for key in ("epoch", "optimizer_state_dict", "scheduler_state_dict", "best_loss",
                                "normalization_stats", "ema_shadow")}
    state.update(model_state_dict=build_model("mlp", dim=8, size="tiny").state_dict(), config=config)
    sha = save_checkpoint(state, run_dir / "best.pt")
    (run_dir / "result.json").write_text(json.dumps(
        {"config": config, "checkpoint_path": str(run_dir / "best.pt"), "sha256": sha}))
    assert completed_result(run_dir, {**config, "resume": True})["sha256"] == sha
    assert completed_result(run_dir, {**config, "seed": 2}) is None
    assert completed_result(run_dir, {**config, "lr": 2e-3}) is None
    (run_dir / LAST_NAME).write_bytes(b"")
    assert completed_result(run_dir, config) is None
    (run_dir / LAST_NAME).unlink()
    with open(run_dir / "best.pt", "ab") as handle:
        handle.write(b"x")
    assert completed_result(run_dir, config) is None


@pytest.mark.slow
def test_equal_max_steps_train_1k_and_full_the_same_optimizer_steps(artifacts_root, tmp_path):
    """A dataset-size ablation with ``max_steps`` measures data, not optimisation length: 1k and full run the same
    number of optimizer steps, though 1k passes over its rows more often (issue: equal budgets)."""
    budget = {"max_steps": 30, "eval_every_steps": 10, "warmup_steps": 5, "max_epochs": 1000, "patience": 1000}
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        assert materialize_data(instance, {**TINY_DATASET, "n_synthetic": 1600}).success  # 1,280 train rows > 1k
        steps, rows = {}, {}
        for dataset in ("1k", "full"):
            assert materialize(instance, dataset=dataset, **budget).success
            metadata = latest(instance)
            assert metadata["config"]["dataset"] == dataset
            steps[dataset], rows[dataset] = metadata["global_step"], metadata["data_identity"]["train_rows"]
    assert rows == {"1k": 1000, "full": 1280}
    assert steps == {"1k": 30, "full": 30}
