"""The research plan's Phase-1 split files through the pipeline: a splits/ root or one size directory as the
``dataset_splits`` source, training on one size with that size's own statistics, malformed files refused without
touching existing artifacts, and the real 800-vector sample trained to below the zero predictor."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import dagster as dg
import numpy as np
import pytest
import torch

from flow_pipeline.core.data.normalization import load_normalizer
from flow_pipeline.core.data.sonar_like import synthetic_sonar_like
from flow_pipeline.defs.assets import dataset_splits, normalization_stats, trained_checkpoint
from flow_pipeline_tests.helpers import (SHARED_DATA, TINY_TRAIN, cli_env, dagster_cli, resources, run_config,
                                         sha256_of)
from flow_pipeline_tests.phase1_files import MALFORMED, sentence, write_malformed, write_splits_root

pytestmark = pytest.mark.slow

DIM = 64
LAYOUT = {"1k": (160, 24, 24), "full": (400, 50, 50), "5k": (300, 30, 30)}
TRAIN = {**TINY_TRAIN, "batch_size": 32}


def materialize(instance, assets, dataset=None, train=None, partition=None):
    selection = [trained_checkpoint] if partition else None
    return dg.materialize(assets, instance=instance, resources=resources(), partition_key=partition,
                          run_config=run_config(dataset=dataset, train=train), selection=selection,
                          raise_on_error=False)


def failure_message(result) -> str:
    failure = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"][0]
    return failure.step_failure_data.error.message + str(failure.step_failure_data.user_failure_data)


def latest_metadata(instance, key: str, partition: str | None = None) -> dict:
    records = instance.fetch_materializations(dg.AssetRecordsFilter(
        asset_key=dg.AssetKey(key), asset_partitions=[partition] if partition else None), limit=1).records
    return {name: value.value for name, value in records[0].asset_materialization.metadata.items()}


def file_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): sha256_of(p) for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def source(tmp_path):
    """A splits/ root (1k and full complete, 5k with only val.pt and test.pt) over one pool: (root, pool, ids)."""
    pool = synthetic_sonar_like(600, dim=DIM, seed=1)
    root = tmp_path / "phase1" / "splits"
    written = write_splits_root(root, pool, LAYOUT, partial={"5k": ("val", "test")})
    return root, pool, written


def test_splits_root_trains_one_size_on_its_own_files_and_statistics(artifacts_root, tmp_path, source):
    root, pool, written = source
    ids = written["1k"]["train"]
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        assert materialize(instance, [dataset_splits, normalization_stats], {"source": str(root), "dim": DIM}).success
        meta = latest_metadata(instance, "dataset_splits")
        assert meta["sizes"] == ["1k", "full"] and meta["1k/n_train"] == 160 and meta["1k/sentences"] is True
        assert meta["incomplete_sizes"] == {"5k": "missing train.pt (has val.pt, test.pt)"}
        lines = (artifacts_root / "data" / "splits" / "1k" / "train.jsonl").read_text(encoding="utf-8").split("\n")
        assert len(lines) - 1 == 160 and sentence(ids[0]) in lines[0]

        # The 1k statistics are those of the 1k training rows only (not of the full split's).
        stats = load_normalizer(artifacts_root / "data" / "normalization_stats" / "1k-zscore.npz")
        np.testing.assert_allclose(stats.mean.numpy(), pool[ids].astype(np.float64).mean(0), rtol=1e-5, atol=1e-8)
        assert not np.allclose(stats.mean.numpy(), pool[written["full"]["train"]].mean(0), rtol=1e-3, atol=1e-7)

        assert materialize(instance, [trained_checkpoint], train={**TRAIN, "dataset": "1k", "normalization": "zscore"},
                           partition="mlp-icfm").success
        meta = latest_metadata(instance, "trained_checkpoint", "mlp-icfm")
        assert "size 1k" in meta["dataset_subset"] and "160 train rows" in meta["dataset_subset"]
        assert meta["data_identity"]["train_rows"] == 160 and meta["data_identity"]["normalization"] == "zscore"
        state = torch.load(meta["checkpoint_path"], weights_only=True)
        assert torch.equal(state["normalization_stats"]["mean"], stats.mean)
        assert state["data_identity"] == meta["data_identity"]

        result = materialize(instance, [trained_checkpoint], train={**TRAIN, "dataset": "5k"}, partition="mlp-icfm")
        assert not result.success
        message = failure_message(result)
        assert "has 1k, full" in message and "5k: missing train.pt" in message, message

        # One size directory as the source: the whole data, and `dataset: 1k` is all of it. Trained whitened: the
        # run picks the (1k, whiten) statistics, stores the transform and has its own name.
        assert materialize(instance, [dataset_splits, normalization_stats],
                           {"source": str(root / "1k"), "dim": DIM}).success
        assert not (artifacts_root / "data" / "splits" / "1k").exists()
        assert materialize(instance, [trained_checkpoint], train={**TRAIN, "dataset": "1k", "normalization": "whiten"},
                           partition="mlp-icfm").success
        meta = latest_metadata(instance, "trained_checkpoint", "mlp-icfm")
        assert meta["dataset_subset"].startswith("all 160 train rows") and meta["run_name"] == "mlp-icfm-1k-none-tiny"
        whiten = load_normalizer(artifacts_root / "data" / "normalization_stats" / "1k-whiten.npz")
        state = torch.load(meta["checkpoint_path"], weights_only=True)["normalization_stats"]
        assert state["method"] == "whiten" and torch.equal(state["components"], whiten.components)
        np.testing.assert_allclose(whiten.mean.numpy(), pool[ids].astype(np.float64).mean(0), rtol=1e-5, atol=1e-8)


def test_malformed_files_fail_naming_file_and_key_and_leave_artifacts_untouched(artifacts_root, tmp_path, source):
    root, pool, written = source
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        assert materialize(instance, [dataset_splits, normalization_stats], {"source": str(root), "dim": DIM}).success
        before = file_hashes(artifacts_root)
        bad_root = tmp_path / "bad" / "splits"
        # Every case is checked on the loader itself (core/test_split_files.py); here a few, through the asset, from
        # a root and from a size directory.
        cases = {"size is a count": bad_root, "duplicate indices": bad_root / "full",
                 "non-finite rows": bad_root, "split disagrees with file name": bad_root / "full"}
        assert set(cases) <= set(MALFORMED)
        for case, bad_source in cases.items():
            write_splits_root(bad_root, pool, LAYOUT)
            expected = write_malformed(bad_root / "full" / "train.pt", pool, written["full"]["train"], case, "full")
            result = materialize(instance, [dataset_splits, normalization_stats], {"source": str(bad_source), "dim": DIM})
            assert not result.success, case
            message = failure_message(result)
            assert str(bad_root / "full" / "train.pt") in message and expected in message, (case, message)
        (bad_root / "full" / "val.pt").unlink()
        result = materialize(instance, [dataset_splits], {"source": str(bad_root / "full"), "dim": DIM})
        assert "missing val.pt (the directory has: test.pt, train.pt)" in failure_message(result)
        assert file_hashes(artifacts_root) == before


@pytest.mark.e2e
def test_cli_exits_non_zero_on_a_malformed_file_and_keeps_the_splits(dagster_home, artifacts_root, tmp_path, source):
    root, pool, written = source
    command = [dagster_cli(), "asset", "materialize", "-m", "flow_pipeline.definitions", "--select", "dataset_splits",
               "--config-json"]
    good = subprocess.run(command + [json.dumps(run_config(dataset={"source": str(root), "dim": DIM}))],
                          cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert good.returncode == 0, good.stderr[-3000:]
    before = file_hashes(artifacts_root)
    expected = write_malformed(root / "1k" / "train.pt", pool, written["1k"]["train"], "size is a count")
    bad = subprocess.run(command + [json.dumps(run_config(dataset={"source": str(root), "dim": DIM}))],
                         cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0
    output = bad.stdout + bad.stderr
    assert str(root / "1k" / "train.pt") in output and expected in output, output[-3000:]
    assert file_hashes(artifacts_root) == before


@pytest.mark.skipif(not SHARED_DATA.is_file(), reason="../shared/data is absent (not part of the repository)")
def test_real_sonar_sample_in_phase1_format_trains_below_the_zero_predictor(artifacts_root, tmp_path):
    real = np.load(SHARED_DATA)
    root = tmp_path / "real" / "splits"
    write_splits_root(root, real, {"1k": (600, 100, 100)}, seed=0)
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        assert materialize(instance, [dataset_splits, normalization_stats], {"source": str(root)}).success
        train = {**TINY_TRAIN, "dataset": "1k", "max_epochs": 8, "batch_size": 64}
        assert materialize(instance, [trained_checkpoint], train=train, partition="mlp-icfm").success
        meta = latest_metadata(instance, "trained_checkpoint", "mlp-icfm")
        assert meta["data_identity"]["train_rows"] == 600
        assert meta["best_val_loss"] < 2.0  # a model predicting zero scores 2.0 (z-scored data, unit noise)
