"""The documented command lines, run as subprocesses from a temp working directory on a persistent instance."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import dagster as dg
import numpy as np
import pytest

from flow_pipeline.core.checkpoint import load_checkpoint, sha256_file
from flow_pipeline_tests.helpers import (REPO_ROOT, TINY_DATASET, TINY_TRAIN, assert_ok, cli_env, dagster_cli,
                                         materialize, run_config)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_cli_materialize_then_partition_then_dg_launch(dagster_home, artifacts_root, tmp_path):
    workdir = tmp_path / "work"
    workdir.mkdir()
    assert_ok(materialize(workdir, "dataset_splits,normalization_stats", run_config(dataset=TINY_DATASET)))
    # A partition-only selection in a later command finds its upstream files (fixed root, persistent instance).
    assert_ok(materialize(workdir, "trained_checkpoint", run_config(train=TINY_TRAIN), partition="dit-icfm"))
    dg_cli = str(Path(sys.executable).parent / "dg")
    launched = subprocess.run(
        [dg_cli, "launch", "--target-path", str(REPO_ROOT), "--assets", "trained_checkpoint", "--partition", "mlp-vp",
         "--config-json", json.dumps(run_config(train=TINY_TRAIN))],
        cwd=workdir, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert_ok(launched)

    with dg.DagsterInstance.get() as instance:
        for partition in ("dit-icfm", "mlp-vp"):
            record = instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=dg.AssetKey("trained_checkpoint"), asset_partitions=[partition]),
                limit=1).records[0]
            metadata = record.asset_materialization.metadata
            path = Path(metadata["checkpoint_path"].value)
            assert path.is_relative_to(artifacts_root) and path.parent.name == f"{partition}-full-none-tiny"
            assert sha256_file(path) == metadata["sha256"].value
            assert load_checkpoint(path)["config"]["arch"] == partition.split("-")[0]


def test_pool_limit_one_serialises_three_partitions(dagster_home, artifacts_root, tmp_path):
    """Three partitions launched at once from separate processes; the gpu pool (limit 1) lets one train at a time."""
    assert_ok(materialize(tmp_path, "dataset_splits,normalization_stats", run_config(dataset=TINY_DATASET)))
    partitions = ["mlp-icfm", "dit-otcfm", "unet-fm"]
    command = [dagster_cli(), "asset", "materialize", "-m", "flow_pipeline.definitions", "--select",
               "trained_checkpoint", "--config-json", json.dumps(run_config(train=TINY_TRAIN)), "--partition"]
    processes = [subprocess.Popen(command + [p], cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for p in partitions]
    outputs = [process.communicate(timeout=600)[0] for process in processes]
    assert all(process.returncode == 0 for process in processes), "\n".join(o[-2000:] for o in outputs)

    # The training processes' own clocks, written by each process into its result.json.
    spans = []
    for partition in partitions:
        result = json.loads((artifacts_root / "checkpoints" / f"{partition}-full-none-tiny" / "result.json").read_text())
        spans.append((result["process"]["started_at"], result["process"]["finished_at"], partition))
    spans.sort()
    for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
        assert start >= end, f"{second} started at {start:.2f} before {first} finished at {end:.2f}"


def test_bad_source_file_fails_clearly_and_keeps_existing_splits(dagster_home, artifacts_root, tmp_path):
    assert_ok(materialize(tmp_path, "dataset_splits", run_config(dataset=TINY_DATASET)))
    splits_dir = artifacts_root / "data" / "splits"
    before = {p.name: sha256_file(p) for p in splits_dir.iterdir()}

    missing = tmp_path / "nowhere.npy"
    wrong_dim = tmp_path / "wrong_dim.npy"
    np.save(wrong_dim, np.random.default_rng(0).normal(size=(50, 512)).astype(np.float32))
    with_nan = tmp_path / "with_nan.npy"
    rows = np.random.default_rng(1).normal(size=(60, 1024)).astype(np.float32)
    rows[[3, 17]] = np.nan
    np.save(with_nan, rows)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(b"PK\x03\x04 not really a zip")
    for source, expected in ((missing, "not found"), (wrong_dim, "expected 1024, got 512"),
                             (with_nan, "2 of 60 rows"), (truncated, "truncated.pt")):
        process = materialize(tmp_path, "dataset_splits", run_config(dataset={**TINY_DATASET, "source": str(source)}))
        assert process.returncode != 0
        output = process.stdout + process.stderr
        assert str(source) in output and expected in output, output[-3000:]
    assert {p.name: sha256_file(p) for p in splits_dir.iterdir()} == before
