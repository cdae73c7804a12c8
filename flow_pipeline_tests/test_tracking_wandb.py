"""Wandb tracking of training runs, read back from the offline ``.wandb`` files the runs write.

Nothing here touches the network: every test points WANDB_BASE_URL at a closed 127.0.0.1 port, and the runs that
need a key get a bogus one.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest
import torch
import wandb

import flow_pipeline.tracking_wandb as tracking_wandb
from flow_pipeline.config import TrainConfig
from flow_pipeline.core.checkpoint import load_checkpoint
from flow_pipeline.core.data.split_store import load_run_splits
from flow_pipeline.core.data.normalization import Normalizer, save_normalizer
from flow_pipeline.core.data.sonar_like import synthetic_sonar_like
from flow_pipeline.core.data.split_set import save_splits
from flow_pipeline.core.data.splits import split_array
from flow_pipeline.definitions import defs
from flow_pipeline.defs.assets import dataset_splits, normalization_stats, trained_checkpoint
from flow_pipeline.defs.resources import ArtifactsResource
from flow_pipeline.defs.tracking import WandbResource
from flow_pipeline.artifacts import FAILURE_NAME, JOB_NAME, RESULT_NAME, TrainJob
from flow_pipeline.train import run_job
from flow_pipeline_tests.helpers import TINY_DATASET, TINY_TRAIN, free_port, run_config
from flow_pipeline_tests.wandb_records import OfflineRun, read_offline_run

BOGUS_KEY = "bogus-key-123" + "0123456789abcdef" * 3  # 40+ characters: passes Wandb's format check, so init dials
TRAIN_KEYS = {"train/loss", "train/grad_norm", "train/lr", "epoch", "global_step"}
VAL_KEYS = {"val/loss", "val/ema_loss", "val/best_loss", "epoch", "global_step"}
# Small data for the in-process runs: 512 train rows / batch 32 = 16 steps per epoch, 3 epochs = 48 steps.
DIM, N_ROWS, BATCH, EPOCHS, LOG_EVERY = 64, 640, 32, 3, 10
STEPS_PER_EPOCH = int(N_ROWS * 0.8) // BATCH
TOTAL_STEPS = EPOCHS * STEPS_PER_EPOCH


def quiet_wandb_env(monkeypatch) -> None:
    """Quiet, fast Wandb that cannot reach any server; no API key unless a test sets one."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    monkeypatch.setenv("WANDB_X_DISABLE_STATS", "true")


@pytest.fixture(autouse=True)
def _quiet_wandb(monkeypatch):
    quiet_wandb_env(monkeypatch)
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a shared 2-core machine
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data_files(tmp_path_factory) -> tuple[Path, Path]:
    """Saved splits and normalisation stats of a small synthetic set: (splits_dir, stats_path)."""
    root = tmp_path_factory.mktemp("data")
    splits = split_array(synthetic_sonar_like(N_ROWS, dim=DIM, seed=0), (0.8, 0.1, 0.1), seed=0, source="test")
    save_splits(splits, root / "splits")
    save_normalizer(root / "stats.npz", Normalizer.fit(splits.train))
    return root / "splits", root / "stats.npz"


def make_job(tmp_path: Path, data_files, **overrides) -> TrainJob:
    config = TrainConfig(arch="mlp", flow="icfm", model_size="tiny", dim=DIM, batch_size=BATCH, max_epochs=EPOCHS,
                         warmup_steps=4, log_every=LOG_EVERY, device="cpu", lr=3e-3, patience=50,
                         **{"normalization": "zscore", **overrides})  # the stats file holds z-score statistics
    resource = WandbResource(mode="auto", group="architectures", init_timeout_s=5.0)
    return TrainJob(config=config.model_dump(), splits_dir=str(data_files[0]), stats_path=str(data_files[1]),
                    run_dir=str(tmp_path / "checkpoints" / config.run_name), partition_key="mlp-icfm",
                    tracking=resource.job_settings(config, "mlp-icfm", tmp_path / "wandb"))


def run_and_close(job: TrainJob):
    """``run_job`` in this process, then shut Wandb's service down: ``run.finish()`` returns before the service has
    written the last records, a training process's exit (atexit teardown) waits for them, and so does this."""
    try:
        return run_job(job)
    finally:
        wandb.teardown()


def offline_runs(wandb_dir: Path, run_id: str) -> list[Path]:
    """Offline run directories of ``run_id`` (one per process that opened it), oldest first."""
    return sorted((wandb_dir / "wandb").glob(f"offline-run-*-{run_id}*"))


def steps_of(run: OfflineRun, key: str) -> list[int]:
    return [row["global_step"] for row in run.history if key in row]


# --- fast checks ---------------------------------------------------------------------------------------------------


def test_auto_mode_is_online_only_with_a_key():
    assert tracking_wandb.resolve_mode("auto", {}) == "offline"
    assert tracking_wandb.resolve_mode("auto", {"WANDB_API_KEY": BOGUS_KEY}) == "online"
    assert tracking_wandb.resolve_mode("offline", {"WANDB_API_KEY": BOGUS_KEY}) == "offline"
    assert WandbResource().mode == "auto"


def test_job_settings_validate_and_hold_no_key(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_API_KEY", BOGUS_KEY)
    config = TrainConfig(model_size="tiny")
    settings = WandbResource().job_settings(config, "mlp-icfm", tmp_path / "wandb")
    assert BOGUS_KEY not in json.dumps(settings)
    assert settings["dir"] == str(tmp_path / "wandb") and settings["flush_interval_s"] > 0
    with pytest.raises(dg.Failure, match="wandb.mode: unknown value 'sometimes'"):
        WandbResource(mode="sometimes").job_settings(config, "mlp-icfm", tmp_path)
    with pytest.raises(dg.Failure, match="wandb.init_timeout_s: must be > 0"):
        WandbResource(init_timeout_s=0).job_settings(config, "mlp-icfm", tmp_path)


def test_run_id_is_stable_and_valid():
    plain = TrainConfig(model_size="tiny", aug="mixup+noise", seed=3)
    assert tracking_wandb.wandb_run_id(plain) == "mlp-icfm-full-mixup_noise-tiny-seed3"
    assert tracking_wandb.wandb_run_id(TrainConfig(model_size="tiny", aug="mixup+noise", seed=3)) == \
        tracking_wandb.wandb_run_id(plain)
    assert tracking_wandb.wandb_run_id(TrainConfig(model_size="tiny", seed=4)) != tracking_wandb.wandb_run_id(plain)


# --- training through the real trainer, read back from the .wandb file ----------------------------------------------


@pytest.mark.slow
def test_offline_run_records_metrics_summary_and_identity(tmp_path, data_files):
    job = make_job(tmp_path, data_files)
    result = run_and_close(job)

    info = json.loads((Path(job.run_dir) / RESULT_NAME).read_text())
    assert info["tracking"] == "offline" and "wandb_url" not in info  # auto without a key
    run_dir = Path(info["wandb_run_dir"])
    assert run_dir.parent == tmp_path / "wandb" / "wandb"
    assert info["wandb_sync_command"] == f"wandb sync {run_dir}"
    run = read_offline_run(run_dir)

    # identity
    config = TrainConfig(**job.config)
    assert (run.run_id, run.name, run.group, run.project, run.job_type) == (
        "mlp-icfm-full-none-zscore-tiny", "mlp-icfm-full-none-zscore-tiny", "architectures", "flow-matching-study", "train")
    assert run.tags == ["mlp", "icfm", "full", "none"]
    logged_config = {key: value for key, value in run.config.items() if key != "_wandb"}
    # The job names no train_rows: Wandb logs the sizes resolved from the run's rows, exactly as the checkpoint
    # stores them, and the metadata's config is the same record.
    assert config.train_rows is None
    trained = load_checkpoint(result.checkpoint_path)["config"]
    assert trained["train_rows"] == load_run_splits(data_files[0], "full").splits.train.shape[0]
    assert logged_config == {**trained, "partition": "mlp-icfm"}
    assert info["config"] == trained

    # history: train rows every LOG_EVERY steps, one validation row at the end of every epoch
    train_rows = [row for row in run.history if "train/loss" in row]
    assert steps_of(run, "train/loss") == list(range(LOG_EVERY, TOTAL_STEPS + 1, LOG_EVERY))
    assert all(TRAIN_KEYS <= set(row) for row in train_rows)
    assert [row["epoch"] for row in train_rows] == [(step - 1) // STEPS_PER_EPOCH + 1 for step in steps_of(run, "train/loss")]
    val_rows = [row for row in run.history if "val/loss" in row]
    assert steps_of(run, "val/loss") == [STEPS_PER_EPOCH * epoch for epoch in range(1, EPOCHS + 1)]
    assert all(VAL_KEYS <= set(row) for row in val_rows)
    # the logged validation losses are the ones the trainer kept in its history (checkpointed, independent path)
    assert [row["val/loss"] for row in val_rows] == pytest.approx([h["val_loss"] for h in result.history])
    assert [row["val/ema_loss"] for row in val_rows] == pytest.approx([h["ema_val_loss"] for h in result.history])
    assert len({row["val/loss"] for row in val_rows}) == EPOCHS  # distinct values: min != last is observable

    # every metric is plotted against global_step; the losses are summarised by their minimum
    assert any(m.glob_name == "*" and m.step_metric == "global_step" for m in run.metric_defs)
    summary_min = {m.name for m in run.metric_defs if m.summary.min}
    assert {"val/loss", "train/loss"} <= summary_min
    assert run.summary["val/loss"]["min"] == pytest.approx(min(row["val/loss"] for row in val_rows))
    assert run.summary["train/loss"]["min"] == pytest.approx(min(row["train/loss"] for row in train_rows))

    # the final summary, and a clean exit
    assert run.summary["best_val_loss"] == pytest.approx(result.best_loss)
    assert run.summary["best_val_loss"] == pytest.approx(min(row["val/ema_loss"] for row in val_rows))
    assert run.summary["final_epoch"] == EPOCHS and run.summary["stopped_early"] is False
    assert run.summary["checkpoint_path"] == str(result.checkpoint_path)
    assert run.exit_code == 0 and "failed" not in run.tags
    assert not any(path.suffix == ".pt" for path in run_dir.rglob("*"))  # checkpoints are never uploaded


class Preempted(Exception):
    pass


@pytest.mark.slow
def test_failed_run_is_marked_and_resume_continues_its_steps(tmp_path, data_files, monkeypatch):
    interrupt_at = 3 * LOG_EVERY  # last.pt is written every LOG_EVERY steps: the resume starts at step 20
    real_log = tracking_wandb.WandbTracker.log

    def log_until_preempted(self, metrics, step):
        if step == interrupt_at:
            raise Preempted(f"simulated preemption at step {step}")
        real_log(self, metrics, step)

    monkeypatch.setattr(tracking_wandb.WandbTracker, "log", log_until_preempted)
    job = make_job(tmp_path, data_files, save_every_steps=LOG_EVERY)
    with pytest.raises(Preempted):
        run_and_close(job)
    assert (Path(job.run_dir) / FAILURE_NAME).exists()
    [first_dir] = offline_runs(tmp_path / "wandb", "mlp-icfm-full-none-zscore-tiny")
    first = read_offline_run(first_dir)
    assert first.exit_code == 1
    assert "failed" in first.tags and set(first.tags) - {"failed"} == {"mlp", "icfm", "full", "none"}
    assert "Preempted: simulated preemption at step 30" in first.notes
    assert steps_of(first, "train/loss") == [10, 20]

    monkeypatch.setattr(tracking_wandb.WandbTracker, "log", real_log)
    resumed_job = make_job(tmp_path, data_files, save_every_steps=LOG_EVERY, resume=True)
    run_and_close(resumed_job)
    second_dir = Path(json.loads((Path(job.run_dir) / RESULT_NAME).read_text())["wandb_run_dir"])
    assert second_dir != first_dir and offline_runs(tmp_path / "wandb", "mlp-icfm-full-none-zscore-tiny") == [first_dir, second_dir]
    second = read_offline_run(second_dir)
    assert second.run_id == first.run_id and second.exit_code == 0 and "failed" not in second.tags
    # the resumed segment starts where the checkpoint left off (step 20) and continues past the interrupted one
    assert steps_of(second, "train/loss") == [30, 40]
    assert steps_of(first, "train/loss") + steps_of(second, "train/loss") == list(range(10, TOTAL_STEPS + 1, 10))
    assert steps_of(second, "val/loss") == [32, 48]  # epoch 1 ended before the interruption
    assert steps_of(first, "val/loss") == [16]


@pytest.mark.slow
def test_a_killed_training_process_keeps_metrics_up_to_the_flush_interval(tmp_path, data_files):
    """The process logs 3 rows, waits 3 flush intervals and SIGKILLs itself: the rows are on disk.
    (With Wandb's default 15 s flush interval none of them would be.)"""
    job = make_job(tmp_path, data_files)
    job.tracking["flush_interval_s"] = 0.5
    script = f"""
import os, signal, time
from flow_pipeline.config import TrainConfig
from flow_pipeline.tracking_wandb import open_wandb_tracker
tracker, info = open_wandb_tracker({job.tracking!r}, TrainConfig(**{job.config!r}), "mlp-icfm")
for step in (10, 20, 30):
    tracker.log({{"train/loss": 1.0 / step}}, step=step)
print(info["wandb_run_dir"], flush=True)
time.sleep(1.5)
os.kill(os.getpid(), signal.SIGKILL)
"""
    process = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert process.returncode == -9, process.stderr
    run = read_offline_run(process.stdout.strip())
    assert [(row["global_step"], row["train/loss"]) for row in run.history] == [(10, 0.1), (20, 0.05), (30, 1 / 30)]
    assert run.exit_code is None  # it really was killed before finishing


# --- the pipeline with a bogus key: falls back offline, in bounded time, and never leaks the key ---------------------


@contextlib.contextmanager
def stderr_to_file(path: Path):
    """Send this process's file descriptor 2, inherited by the training subprocess, to ``path``."""
    saved = os.dup(2)
    with open(path, "wb") as handle:
        os.dup2(handle.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


@pytest.fixture(scope="module")
def bogus_key_run(tmp_path_factory):
    """Materialize the data assets and one training partition with WANDB_API_KEY=BOGUS_KEY (auto mode: online
    is tried against a closed port, with a 3 s init timeout). Yields (instance, temp dir, artifacts root, result,
    seconds the training materialization took); the training process's stderr is in ``<temp dir>/stderr.log``."""
    tmp = tmp_path_factory.mktemp("bogus_key")
    root = tmp / "artifacts"
    (tmp / "instance").mkdir()
    with pytest.MonkeyPatch.context() as monkeypatch, dg.instance_for_test(temp_dir=str(tmp / "instance")) as instance:
        quiet_wandb_env(monkeypatch)
        monkeypatch.setenv("WANDB_API_KEY", BOGUS_KEY)
        resources = {**defs.resources, "artifacts": ArtifactsResource(root=str(root)),
                     "wandb": WandbResource(mode="auto", init_timeout_s=3.0)}
        assert dg.materialize([dataset_splits, normalization_stats], instance=instance, resources=resources,
                              run_config=run_config(dataset={**TINY_DATASET, "dim": DIM})).success
        started = time.monotonic()
        with stderr_to_file(tmp / "stderr.log"):
            result = dg.materialize([trained_checkpoint], instance=instance, resources=resources,
                                    partition_key="mlp-icfm", run_config=run_config(train={**TINY_TRAIN, "log_every": 4}),
                                    selection=[trained_checkpoint], raise_on_error=False)
        yield instance, tmp, root, result, time.monotonic() - started


@pytest.mark.slow
def test_bogus_key_falls_back_to_offline_with_a_warning_in_bounded_time(bogus_key_run):
    instance, _, root, result, seconds = bogus_key_run
    assert result.success
    assert seconds < 120, f"the training materialization took {seconds:.0f} s"
    [materialization] = result.asset_materializations_for_node("trained_checkpoint")
    metadata = {key: value.value for key, value in materialization.metadata.items()}
    assert metadata["tracking"] == "offline" and "wandb_url" not in metadata
    assert metadata["wandb_sync_command"] == f"wandb sync {metadata['wandb_run_dir']}"
    warnings = [entry.user_message for entry in instance.all_logs(result.run_id) if entry.level >= 30]
    assert any("online tracking could not start" in message and "offline" in message for message in warnings), warnings
    # the offline run holds the training: 2 epochs x 8 steps, logged every 4 steps
    run = read_offline_run(metadata["wandb_run_dir"])
    assert steps_of(run, "train/loss") == [4, 8, 12, 16]
    assert run.summary["checkpoint_path"] == metadata["checkpoint_path"]


@pytest.mark.slow
def test_the_api_key_appears_nowhere(bogus_key_run):
    instance, tmp, root, result, _ = bogus_key_run
    assert result.success
    run_dir = root / "checkpoints" / "mlp-icfm-full-none-tiny"
    assert BOGUS_KEY not in (run_dir / JOB_NAME).read_text()
    assert BOGUS_KEY not in (run_dir / RESULT_NAME).read_text()
    for node in ("dataset_splits", "normalization_stats", "trained_checkpoint"):
        records = instance.fetch_materializations(dg.AssetKey(node), limit=10).records
        assert records
        for record in records:
            for key, value in record.asset_materialization.metadata.items():
                assert BOGUS_KEY not in json.dumps(str(value.value)), key
    for run in instance.get_runs():
        for entry in instance.all_logs(run.run_id):
            assert BOGUS_KEY not in entry.user_message
            assert BOGUS_KEY not in str(entry.dagster_event or "")
    # every file either side wrote: event log dbs, captured compute logs, the training process's stderr, Wandb's
    # debug logs and .wandb files, checkpoints
    assert "online tracking could not start" in (tmp / "stderr.log").read_text()  # the child's log lines are there
    files = [path for path in tmp.rglob("*") if path.is_file()]
    assert {".wandb", ".err", ".db", ".pt"} <= {path.suffix for path in files}
    leaked = [path for path in files if BOGUS_KEY.encode() in path.read_bytes()]
    assert not leaked, leaked
