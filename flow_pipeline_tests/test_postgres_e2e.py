"""The scale-out instance end to end: a real PostgreSQL server, the documented deploy/dagster-postgres.yaml, a real
``dagster-daemon`` dequeuing runs submitted by separate ``dagster job launch`` processes, and the ``gpu`` pool
(limit 1) serialising the training processes — one of them a 2-process torchrun run, which holds one slot."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest
import torch

from flow_pipeline.core.checkpoint import sha256_file
from flow_pipeline.defs.assets import dataset_splits, normalization_stats
from flow_pipeline.defs.resources import ArtifactsResource, default_root
from flow_pipeline.defs.retries import RETRAIN_JOB_NAME
from flow_pipeline.definitions import defs
from flow_pipeline_tests.helpers import REPO_ROOT, TINY_DATASET, TINY_TRAIN, cli_env, dagster_cli, run_config

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

WORKSPACE = REPO_ROOT / "workspace.yaml"
# partition -> training processes of its run; the pool counts the 2-process run as one slot like the others.
PARTITIONS = {"mlp-icfm": 2, "mlp-fm": 1, "mlp-vp": 1}
RUNS_TIMEOUT_S = 420


def launch_command(partition: str, processes: int) -> list[str]:
    """Submit one training run to the instance's queue (the QueuedRunCoordinator); the daemon launches it."""
    config = run_config(train={**TINY_TRAIN, "gpus_per_run": processes})
    return [dagster_cli(), "job", "launch", "-w", str(WORKSPACE), "-j", RETRAIN_JOB_NAME,
            "--tags", json.dumps({"dagster/partition": partition}), "--config-json", json.dumps(config)]


def wait_for_runs(instance: dg.DagsterInstance, count: int, timeout_s: float, daemon: subprocess.Popen,
                  daemon_log: Path) -> list[dg.DagsterRun]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        runs = instance.get_runs(filters=dg.RunsFilter(job_name=RETRAIN_JOB_NAME))
        if len(runs) == count and all(run.is_finished for run in runs):
            return runs
        if daemon.poll() is not None:
            pytest.fail(f"dagster-daemon exited ({daemon.returncode}):\n{daemon_log.read_text()[-3000:]}")
        time.sleep(1)
    states = [(run.tags.get("dagster/partition"), run.status.value) for run in runs]
    pytest.fail(f"runs not finished after {timeout_s}s: {states}\n{daemon_log.read_text()[-3000:]}")


def start_daemon(cwd: Path, env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """``dagster-daemon run`` on the project's workspace, in its own process group (see stop_daemon)."""
    with log_path.open("w") as log:
        return subprocess.Popen([str(Path(sys.executable).parent / "dagster-daemon"), "run", "-w", str(WORKSPACE)],
                                cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def stop_daemon(daemon: subprocess.Popen) -> None:
    """SIGTERM to the daemon's own process group (it and the code server it started), then SIGKILL to whatever of
    that group is left (a code server can outlive the daemon)."""
    if daemon.poll() is None:
        os.killpg(daemon.pid, signal.SIGTERM)
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(daemon.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    daemon.wait(timeout=30)


def test_gpu_pool_holds_across_processes_on_postgres(postgres, postgres_home, artifacts_root, tmp_path):
    env = cli_env()
    daemon_log = tmp_path / "daemon.log"
    # In deploy/README.md's order: the first command creates the database's tables, then the daemon starts. Both at
    # once on an empty database can fail (Dagster 1.13 retries a "table exists" clash, not "type exists").
    setup = subprocess.run([dagster_cli(), "instance", "concurrency", "set", "gpu", "1"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
    assert setup.returncode == 0, setup.stderr[-3000:]
    daemon = start_daemon(tmp_path, env, daemon_log)  # its start-up overlaps the set-up below
    try:
        with dg.DagsterInstance.get() as instance:
            assert type(instance.run_storage).__name__ == "PostgresRunStorage"
            assert instance.event_log_storage.get_concurrency_info("gpu").slot_count == 1
            data = dg.materialize([dataset_splits, normalization_stats], instance=instance,
                                  resources={**defs.resources, "artifacts": ArtifactsResource(root=default_root())},
                                  run_config=run_config(dataset=TINY_DATASET))
            assert data.success

        # Three submitting processes at once; the daemon starts the runs, each in its own run worker process.
        launches = [subprocess.Popen(launch_command(partition, processes), cwd=tmp_path, env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                    for partition, processes in PARTITIONS.items()]
        outputs = [launch.communicate(timeout=300)[0] for launch in launches]
        assert all(launch.returncode == 0 for launch in launches), "\n".join(o[-2000:] for o in outputs)
        with dg.DagsterInstance.get() as instance:
            runs = wait_for_runs(instance, len(PARTITIONS), RUNS_TIMEOUT_S, daemon, daemon_log)
            assert {run.status for run in runs} == {dg.DagsterRunStatus.SUCCESS}, [
                (run.tags.get("dagster/partition"), run.status.value) for run in runs]
            for run in runs:  # submitted to the queue and started by the daemon, not executed by the CLI
                assert instance.get_records_for_run(run.run_id, of_type=dg.DagsterEventType.RUN_ENQUEUED).records
    finally:
        stop_daemon(daemon)

    # No overlap, judged by the training processes' own clocks (each writes result.json at its end).
    spans = []
    for partition, processes in PARTITIONS.items():
        result = json.loads((artifacts_root / "checkpoints" / f"{partition}-full-none-tiny" / "result.json").read_text())
        assert result["world_size"] == processes
        spans.append((result["process"]["started_at"], result["process"]["finished_at"], partition))
    spans.sort()
    for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
        assert start >= end, f"{second} started at {start:.2f} before {first} finished at {end:.2f}"

    # A fresh instance on the same yaml reads the 2-process partition's metadata back from PostgreSQL.
    with dg.DagsterInstance.from_config(str(postgres_home)) as fresh:
        record = fresh.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey("trained_checkpoint"), asset_partitions=["mlp-icfm"]),
            limit=1).records[0]
    metadata = record.asset_materialization.metadata
    path = Path(metadata["checkpoint_path"].value)
    assert path == artifacts_root / "checkpoints" / "mlp-icfm-full-none-tiny" / "best.pt"
    assert metadata["sha256"].value == sha256_file(path)
    assert metadata["world_size"].value == 2
    assert metadata["best_val_loss"].value == pytest.approx(torch.load(path, weights_only=True)["best_loss"])
    # The same facts straight from the database, and no sqlite file anywhere under DAGSTER_HOME.
    with contextlib.closing(postgres.connect()) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT status, COUNT(*) FROM runs WHERE pipeline_name = %s GROUP BY status",
                       (RETRAIN_JOB_NAME,))
        assert dict(cursor.fetchall()) == {"SUCCESS": len(PARTITIONS)}
        cursor.execute("SELECT COUNT(*) FROM event_logs WHERE dagster_event_type = 'ASSET_MATERIALIZATION' "
                       "AND asset_key = %s AND partition = 'mlp-icfm'", (dg.AssetKey("trained_checkpoint").to_string(),))
        assert cursor.fetchone()[0] == 1
    assert not list(postgres_home.rglob("*.db"))
