"""Failures and recovery with real processes on real sqlite Dagster instances.

- SIGKILL of the training process at random points (one of them mid checkpoint write), then resume: best.pt ends
  bit-identical to an uninterrupted run's, and no checkpoint on disk is ever unreadable.
- Divergence (a NaN planted in the resume file): the run fails at the first step naming step and partition, best.pt
  is untouched, the partition shows FAILED, and the retry schedule re-runs it until its cap.
- The fail_orphaned_runs sensor marks runs whose worker died failed, and only those.
- End to end with dagster-daemon: a SIGKILLed run frees the gpu pool and the waiting run of another partition starts
  within a stated bound.
"""

import contextlib
import json
import multiprocessing
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
from dagster._core.events import EngineEventData  # what a run worker reports its pid with
import pytest
import torch
import yaml

from flow_pipeline.core.checkpoint import BEST_NAME, LAST_NAME, TEMP_PREFIX, load_checkpoint, save_checkpoint, sha256_file
from flow_pipeline.core.trainer import train
from flow_pipeline.defs.assets import (
    TrainRunConfig,
    dataset_splits,
    normalization_stats,
    trained_checkpoint,
)
from flow_pipeline.defs.checks import verify_trained_checkpoint
from flow_pipeline.defs.failures import DIVERGED, FAILURE_KIND_TAG, KILLED
from flow_pipeline.defs.orphans import (ORPHAN_CHECK_INTERVAL_S, RUN_HOST_TAG, RunWorker, fail_orphaned_runs,
                                        process_alive)
from flow_pipeline.defs.retries import RERUN_CRON_ENV, RETRAIN_JOB_NAME, RetrySettings, build_retry_schedule
from flow_pipeline.definitions import defs
from flow_pipeline.artifacts import RESULT_NAME, TrainJob
from flow_pipeline.train import load_train_data
from flow_pipeline.train import main as train_main
from flow_pipeline_tests.helpers import (REPO_ROOT, TINY_DATASET, TINY_TRAIN, alive, cli_env, dagster_cli, descendants,
                                         resources, run_config)

PARTITION = "unet-icfm"  # the fastest tiny model
DATA_DIR = "data"


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """An artifact root holding the tiny dataset's splits and normalisation stats, materialized once by Dagster."""
    root = tmp_path_factory.mktemp("tiny_data")
    with dg.instance_for_test(temp_dir=str(tmp_path_factory.mktemp("data_instance"))) as instance:
        assert dg.materialize([dataset_splits, normalization_stats], instance=instance, resources=resources(root),
                              run_config=run_config(dataset=TINY_DATASET)).success
    return root


@pytest.fixture
def root(tiny_data, artifacts_root) -> Path:
    """This test's artifact root (FLOW_PIPELINE_ROOT), with a copy of the tiny data."""
    shutil.copytree(tiny_data / DATA_DIR, artifacts_root / DATA_DIR)
    return artifacts_root


def weights(path: Path) -> dict:
    state = load_checkpoint(path)
    return {"model": state["model_state_dict"], "ema": state["ema_shadow"], "step": state["global_step"]}


def assert_same_weights(actual: dict, expected: dict) -> None:
    assert actual["step"] == expected["step"]
    for group in ("model", "ema"):
        assert actual[group].keys() == expected[group].keys()
        for name, tensor in expected[group].items():
            assert torch.equal(actual[group][name], tensor), f"{group}/{name} differs"


# --- SIGKILL at random points, then resume -----------------------------------------------------------------------

# 96 steps (512 train rows / 32 per batch x 6 epochs) with last.pt every 3 steps: many mid-epoch resume points.
# z-scored rows and a plain network: it keeps improving for all 6 epochs, so best.pt is the last step's.
KILL_TRAIN = {**TINY_TRAIN, "max_epochs": 6, "batch_size": 32, "save_every_steps": 3, "normalization": "zscore",
              "linear_skip": False}


@pytest.fixture(scope="module")
def trainer_server():
    """Starts training processes that run ``flow_pipeline.train.main`` (what ``python -m flow_pipeline.train``
    runs), forked from a server that imported the module once: a start costs milliseconds instead of the seconds of
    importing torch, scipy and matplotlib again, so the kill loop can afford many starts."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["flow_pipeline.train"])

    def start(job_path: Path) -> multiprocessing.Process:
        process = context.Process(target=train_main, args=(["--job", str(job_path)],))
        process.start()
        return process

    with pytest.MonkeyPatch.context() as patch:
        # Read when the server imports torch; the Dagster-launched process inherits it too: the same thread count
        # everywhere, so the same float sums.
        patch.setenv("OMP_NUM_THREADS", "1")
        yield start


def temp_files(run_dir: Path) -> list[str]:
    return sorted(name for name in os.listdir(run_dir) if name.startswith(TEMP_PREFIX)) if run_dir.exists() else []


def inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino  # os.replace gives every save a new inode
    except FileNotFoundError:
        return None


def kill_after_saves(process: multiprocessing.Process, last: Path, saves: int, delay_s: float,
                     timeout_s: float = 120) -> None:
    """SIGKILL once last.pt has been replaced ``saves`` times by this process, ``delay_s`` later."""
    seen, count, deadline = inode(last), 0, time.monotonic() + timeout_s
    while count < saves:
        assert process.is_alive(), f"the training process ended (exit code {process.exitcode}) before the kill point"
        assert time.monotonic() < deadline, "no checkpoint progress"
        current = inode(last)
        if current is not None and current != seen:
            seen, count = current, count + 1
        time.sleep(0.002)
    time.sleep(delay_s)
    process.kill()
    process.join()


def kill_mid_write(process: multiprocessing.Process, run_dir: Path, timeout_s: float = 120) -> None:
    """SIGKILL as soon as a checkpoint temp file (``.tmp-*``) appears: the kill lands inside save_checkpoint."""
    deadline = time.monotonic() + timeout_s
    while not temp_files(run_dir):
        assert process.is_alive(), f"the training process ended (exit code {process.exitcode}) before the kill point"
        assert time.monotonic() < deadline, "no checkpoint write seen"
    process.kill()
    process.join()


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_is_bit_identical(root, tmp_path, trainer_server):
    config = TrainRunConfig(**KILL_TRAIN, resume=True).to_train_config(PARTITION, dim=1024, device="cpu")
    data = {"splits_dir": str(root / DATA_DIR / "splits"), "stats_path": str(root / DATA_DIR / "normalization_stats" / "full-zscore.npz")}

    # The uninterrupted reference, with the same seed, in its own directory.
    reference_job = TrainJob(config=config.model_dump(), run_dir=str(tmp_path / "reference"), **data).save()
    reference = trainer_server(reference_job)
    reference.join()
    assert (tmp_path / "reference" / RESULT_NAME).exists(), "the reference run failed (see the captured stderr)"
    expected = weights(tmp_path / "reference" / BEST_NAME)
    assert expected["step"] == 96

    # The same job in the asset's run directory, killed again and again; every start resumes (the first from nothing).
    run_dir = root / "checkpoints" / config.run_name
    job = TrainJob(config=config.model_dump(), run_dir=str(run_dir), partition_key=PARTITION, **data).save()
    rng = random.Random(5)
    kills = []
    while len(kills) < 5 or not any(kill["temp_left"] for kill in kills):
        assert len(kills) < 9, f"no kill landed inside a checkpoint write: {kills}"
        process = trainer_server(job)
        if len(kills) >= 2 and not any(kill["temp_left"] for kill in kills):
            kill_mid_write(process, run_dir)
            point = "as a .tmp- file appeared"
        else:
            saves, delay = rng.randint(1, 4), rng.uniform(0.0, 0.1)
            kill_after_saves(process, run_dir / LAST_NAME, saves, delay)
            point = f"{delay * 1000:.0f} ms after save {saves}"
        on_disk = {name: load_checkpoint(run_dir / name)["global_step"]  # never unreadable: loads weights_only
                   for name in (BEST_NAME, LAST_NAME) if (run_dir / name).exists()}
        kills.append({"point": point, "on_disk": on_disk, "temp_left": temp_files(run_dir)})
    resume_steps = [kill["on_disk"].get(LAST_NAME) for kill in kills]
    assert len(set(resume_steps)) >= 4, f"kills did not land at distinct points: {kills}"
    assert any(BEST_NAME in kill["on_disk"] for kill in kills), f"no kill after the first epoch: {kills}"
    print("kill points:", json.dumps(kills, indent=1))

    # The last resume is a Dagster run of the asset (same config): it finishes the run and reports best.pt.
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        result = dg.materialize([trained_checkpoint], instance=instance, resources=resources(root),
                                partition_key=PARTITION, run_config=run_config(train={**KILL_TRAIN, "resume": True}))
        assert result.success
        metadata = result.asset_materializations_for_node("trained_checkpoint")[0].metadata
    best = run_dir / BEST_NAME
    assert metadata["checkpoint_path"].value == str(best)
    assert metadata["sha256"].value == sha256_file(best)
    assert metadata["global_step"].value == 96
    assert_same_weights(weights(best), expected)
    assert not temp_files(run_dir), "stale temp files are removed on resume"
    assert not (run_dir / LAST_NAME).exists(), "a finished run keeps best.pt only"


# --- divergence ----------------------------------------------------------------------------------------------------


def step_failure(result: dg.ExecuteInProcessResult) -> str:
    failure = [event for event in result.all_events if event.event_type_value == "STEP_FAILURE"][0]
    return failure.step_failure_data.user_failure_data.description


@pytest.mark.slow
def test_divergence_fails_at_the_first_bad_step_keeps_best_and_is_not_retried(root, tmp_path):
    one_epoch = {**TINY_TRAIN, "max_epochs": 1}
    # A finished earlier run of the partition (trained here, in process, to save a process start).
    config = TrainRunConfig(**one_epoch).to_train_config(PARTITION, dim=1024, device="cpu")
    best = root / "checkpoints" / config.run_name / BEST_NAME
    job = TrainJob(config=config.model_dump(), run_dir=str(best.parent), splits_dir=str(root / DATA_DIR / "splits"),
                   stats_path=str(root / DATA_DIR / "normalization_stats" / "full-whiten.npz"))
    train(config, load_train_data(job), best.parent)
    best_sha, best_weights = sha256_file(best), weights(best)
    # The resume file holds one NaN weight: a diverged state (the trainer itself checks before every save, so it
    # stands for a file written by other means). Resuming must fail at the first step and leave best.pt alone.
    state = load_checkpoint(best)
    name = sorted(state["model_state_dict"])[0]
    state["model_state_dict"][name].view(-1)[0] = float("nan")
    save_checkpoint(state, best.parent / LAST_NAME)
    resumed = {**one_epoch, "max_epochs": 3, "resume": True}
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        result = dg.materialize([trained_checkpoint], instance=instance, resources=resources(root),
                                partition_key=PARTITION, run_config=run_config(train=resumed), raise_on_error=False)
        assert not result.success
        message = step_failure(result)
        first_bad_step = state["global_step"] + 1  # no step after the resume point completes
        for part in (f"partition {PARTITION}", "TrainingDiverged", "non-finite loss", f"at step {first_bad_step} ",
                     f"run {PARTITION}-full-none-tiny", str(best)):
            assert part in message, f"{part!r} not in {message!r}"
        assert sha256_file(best) == best_sha
        assert_same_weights(weights(best), best_weights)
        status = instance.get_status_by_partition(trained_checkpoint.key, [PARTITION], trained_checkpoint.partitions_def)
        assert status == {PARTITION: dg.AssetPartitionStatus.FAILED}

        # The run is tagged diverged, and the schedule leaves it alone: a bit-exact resume would diverge again.
        assert instance.get_run_by_id(result.run_id).tags[FAILURE_KIND_TAG] == DIVERGED
        schedule = build_retry_schedule(RetrySettings(max_attempts=3))
        context = dg.build_schedule_context(instance=instance, repository_def=defs.get_repository_def())
        tick = schedule.evaluate_tick(context)
        assert not tick.run_requests
        assert any(line.startswith("failed, not retried (diverged") and line.endswith(f": {PARTITION}")
                   for line in tick.skip_message.splitlines()), tick.skip_message
        assert sha256_file(best) == best_sha


# --- orphaned runs ---------------------------------------------------------------------------------------------------


def started_run(instance, pid: int, host: str) -> dg.DagsterRun:
    """A STARTED training run whose worker announced ``pid`` (as a run worker does when it starts)."""
    run = instance.create_run_for_job(defs.resolve_job_def(RETRAIN_JOB_NAME), status=dg.DagsterRunStatus.STARTED,
                                      run_config=run_config(train=TINY_TRAIN),
                                      tags={"dagster/partition": PARTITION, RUN_HOST_TAG: host})
    instance.report_engine_event(f"Started process for run (pid: {pid}).", run,
                                 EngineEventData.in_process(pid))
    return run


def test_process_alive_detects_exit_zombies_and_reused_pids():
    sleeper = subprocess.Popen(["sleep", "30"])
    zombie = subprocess.Popen(["true"])
    exited = subprocess.Popen(["true"])
    exited.wait()
    try:
        time.sleep(0.3)  # `true` has exited; its zombie is not reaped
        now = time.time()
        assert process_alive(RunWorker(sleeper.pid, seen_at=now))
        assert process_alive(RunWorker(os.getpid(), seen_at=now))
        assert not process_alive(RunWorker(zombie.pid, seen_at=now))
        assert not process_alive(RunWorker(exited.pid, seen_at=now))
        # The pid was logged an hour before this process started: it is another process now.
        assert not process_alive(RunWorker(sleeper.pid, seen_at=now - 3600))
    finally:
        sleeper.kill()
        sleeper.wait()
        zombie.wait()


def test_fail_orphaned_runs_marks_only_dead_workers_on_this_host_failed(tmp_path):
    host = socket.gethostname()
    dead = subprocess.Popen(["true"])
    dead.wait()
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        orphan = started_run(instance, dead.pid, host)
        alive = started_run(instance, os.getpid(), host)
        elsewhere = started_run(instance, dead.pid, "another-host")
        result = fail_orphaned_runs(dg.build_sensor_context(instance=instance))
        assert isinstance(result, dg.SkipReason)
        assert orphan.run_id in result.skip_message and f"pid {dead.pid}" in result.skip_message
        status = {run.run_id: instance.get_run_by_id(run.run_id).status for run in (orphan, alive, elsewhere)}
        assert status == {orphan.run_id: dg.DagsterRunStatus.FAILURE, alive.run_id: dg.DagsterRunStatus.STARTED,
                          elsewhere.run_id: dg.DagsterRunStatus.STARTED}
        failure = instance.get_records_for_run(orphan.run_id, of_type=dg.DagsterEventType.RUN_FAILURE).records
        assert f"run worker process {dead.pid}" in failure[0].event_log_entry.dagster_event.message
        assert instance.get_run_by_id(orphan.run_id).tags[FAILURE_KIND_TAG] == KILLED  # a failure the schedule retries
        assert FAILURE_KIND_TAG not in instance.get_run_by_id(alive.run_id).tags
        again = fail_orphaned_runs(dg.build_sensor_context(instance=instance))
        assert again.skip_message.startswith("no orphaned runs: 1 started")


# --- end to end: a SIGKILLed run frees the gpu pool ----------------------------------------------------------------


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def materialize_cli(partition: str, log: Path) -> subprocess.Popen:
    """`dagster asset materialize` of one partition, training until killed: the CLI process is the run worker.
    Steps run in that process (the project's in-process executor) and training uses one torch thread, so that it
    hogs one of the two cores, not both. Early stopping is off in effect: with the default patience a tiny model
    stops within a minute, which on a loaded machine can be before the other partition's run reaches its step."""
    config = run_config(train={**TINY_TRAIN, "max_epochs": 100_000, "patience": 100_000})
    return subprocess.Popen(
        [dagster_cli(), "asset", "materialize", "-m", "flow_pipeline.definitions", "--select", "trained_checkpoint",
         "--partition", partition, "--config-json", json.dumps(config)],
        cwd=REPO_ROOT, env=cli_env(OMP_NUM_THREADS="1"), stdout=log.open("wb"), stderr=subprocess.STDOUT,
        start_new_session=True)


def wait_for(condition, timeout_s: float, what: str, poll_s: float = 0.5, explain=lambda: ""):
    """Poll ``condition`` until it returns something truthy; on timeout, fail with ``explain()`` appended."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}\n{explain()}")


def runs_and_logs(instance, logs: dict[str, Path]) -> str:
    """Each partition's run status and the tail of its CLI log: what a timed-out wait needs to be understood."""
    lines = []
    for partition, log in logs.items():
        run = run_of(instance, partition)
        tail = log.read_text(errors="replace").splitlines()[-15:] if log.exists() else ["(no log)"]
        lines += [f"--- {partition}: run {run.run_id if run else None} {run.status if run else ''}", *tail]
    return "\n".join(lines)


def run_of(instance, partition: str) -> dg.DagsterRun | None:
    runs = instance.get_runs(filters=dg.RunsFilter(tags={"dagster/partition": partition}))
    return runs[0] if runs else None


def step_started_at(instance, run_id: str) -> float | None:
    records = instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.STEP_START).records
    starts = [r.event_log_entry.timestamp for r in records if r.event_log_entry.step_key == "trained_checkpoint"]
    return starts[0] if starts else None


def gpu_pool_holder_and_waiter(instance) -> tuple[set[str], set[str]] | None:
    """(run ids holding a gpu slot, run ids whose step waits for one), once both are non-empty. A waiting step is in
    the pool's queue, unassigned or assigned: when two steps ask at the same moment Dagster can assign both, and the
    one that loses the race for the slot stays assigned but blocked until a slot is free."""
    info = instance.event_log_storage.get_concurrency_info("gpu")
    waiting = {step.run_id for step in info.pending_steps} - info.active_run_ids
    return (info.active_run_ids, waiting) if info.active_run_ids and waiting else None


def test_a_step_that_lost_the_race_for_the_slot_counts_as_waiting(tmp_path):
    """Two steps ask for the one gpu slot at the same moment: both see a free slot and are assigned, one claims it.
    The other is assigned but blocked, so Dagster's ``pending_run_ids`` (unassigned steps only) misses it."""
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        storage = instance.event_log_storage
        storage.set_concurrency_slots("gpu", 1)
        for run_id in ("first", "second"):  # both registered before either claims, as in the race
            storage.add_pending_step(concurrency_key="gpu", run_id=run_id, step_key="trained_checkpoint",
                                     should_assign=True)
        claims = [storage.claim_concurrency_slot("gpu", run_id, "trained_checkpoint") for run_id in ("first", "second")]
        assert [claim.is_claimed for claim in claims] == [True, False]
        assert storage.get_concurrency_info("gpu").pending_run_ids == set()
        assert gpu_pool_holder_and_waiter(instance) == ({"first"}, {"second"})


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_a_training_process_dies_with_its_parent(tmp_path):
    """flow_pipeline.train calls exit_with_parent: when its parent (the run worker) is SIGKILLed, the kernel
    SIGTERMs the training process instead of leaving it on the GPU whose pool slot is given back."""
    pid_file = tmp_path / "child.pid"
    child = ("import os, pathlib, time; from flow_pipeline.train import exit_with_parent; exit_with_parent(); "
             f"pathlib.Path({str(pid_file)!r}).write_text(str(os.getpid())); time.sleep(120)")
    # The parent ignores SIGTERM, as a Dagster run worker started in the background does (Dagster maps SIGTERM to
    # SIGINT's handler, SIG_IGN there): the child inherits that across exec and must still die.
    parent = subprocess.Popen([sys.executable, "-c",
                               "import signal, subprocess, sys; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                               f"subprocess.Popen([sys.executable, '-c', {child!r}]).wait()"],
                              start_new_session=True)
    try:
        child_pid = wait_for(lambda: pid_file.exists() and pid_file.read_text() and int(pid_file.read_text()), 60,
                             "the child to start")
        assert alive(child_pid)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        # 60 s, still half the child's own 120 s: on a loaded 2-core machine 10 s was once not enough.
        wait_for(lambda: not alive(child_pid), 60, "the child to die with its parent")
    finally:
        with contextlib.suppress(ProcessLookupError):  # the group is empty when all went well
            os.killpg(parent.pid, signal.SIGKILL)


# The sensor daemon evaluates sensors on its own loop: a sensor due every N s runs up to this much later.
SENSOR_DAEMON_LOOP_S = 5
# Dagster's longest back-off between two slot claims of a step blocked by a pool.
MAX_CLAIM_BACKOFF_S = 15
# From a granted slot to the step's start event, on two loaded cores.
STEP_STARTUP_S = 15


def recovery_bound_s() -> float:
    """Kill -> the waiting run's training step starts: the orphan sensor's tick, the shipped run-monitoring delays
    (finished -> slots freed, poll interval), the claim back-off of the blocked step, and its start-up."""
    monitoring = yaml.safe_load((REPO_ROOT / "dagster_home" / "dagster.yaml").read_text())["run_monitoring"]
    return (ORPHAN_CHECK_INTERVAL_S + SENSOR_DAEMON_LOOP_S + monitoring["free_slots_after_run_end_seconds"]
            + monitoring["poll_interval_seconds"] + MAX_CLAIM_BACKOFF_S + STEP_STARTUP_S)


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_sigkilled_run_frees_the_gpu_pool_for_the_next_partition(dagster_home, root, tmp_path):
    instance = dg.DagsterInstance.get()  # the temp DAGSTER_HOME: shipped dagster.yaml, gpu pool limit 1
    assert instance.event_log_storage.get_concurrency_info("gpu").slot_count == 1
    # The test evaluates the retry schedule itself: the daemon's own ticks (hourly) must not race it.
    daemon = subprocess.Popen([str(Path(sys.executable).parent / "dagster-daemon"), "run", "-w", "workspace.yaml"],
                              cwd=REPO_ROOT, env=cli_env(**{RERUN_CRON_ENV: "0 0 1 1 *"}),
                              stdout=(tmp_path / "daemon.log").open("wb"), stderr=subprocess.STDOUT,
                              start_new_session=True)
    # Two partitions at once: the first to claim the gpu slot trains, the other waits for it.
    logs = {partition: tmp_path / f"{partition}.log" for partition in (PARTITION, "mlp-fm")}
    clis = {partition: materialize_cli(partition, log) for partition, log in logs.items()}
    explain = lambda: runs_and_logs(instance, logs)  # noqa: E731
    try:
        holding, waiting = wait_for(lambda: gpu_pool_holder_and_waiter(instance), 240,
                                    "one run training and one waiting", explain=explain)
        runs = {partition: run_of(instance, partition) for partition in clis}
        (victim,) = [p for p, run in runs.items() if run.run_id in holding]
        (waiter,) = [p for p, run in runs.items() if run.run_id in waiting]
        training = wait_for(lambda: [p for p in descendants(clis[victim].pid) if "flow_pipeline.train" in cmdline(p)],
                            120, "the training process")

        # SIGKILL the run worker (the CLI process, which runs the step) and the training process below it.
        tree = [clis[victim].pid, *descendants(clis[victim].pid)]
        assert set(training) <= set(tree)
        killed_at = time.time()
        for pid in tree:
            os.kill(pid, signal.SIGKILL)
        clis[victim].wait()

        bound = recovery_bound_s()
        step_start = wait_for(lambda: step_started_at(instance, runs[waiter].run_id), bound + 30,
                              "the waiting run's training step", explain=explain)
        waited = step_start - killed_at
        print(f"gpu slot recovered: the waiting run's step started {waited:.1f} s after the kill (bound {bound} s)")
        assert waited <= bound
        assert instance.event_log_storage.get_concurrency_info("gpu").active_run_ids == {runs[waiter].run_id}
        assert instance.get_run_by_id(runs[victim].run_id).status == dg.DagsterRunStatus.FAILURE
        failure = instance.get_records_for_run(runs[victim].run_id, of_type=dg.DagsterEventType.RUN_FAILURE).records
        assert "fail_orphaned_runs" in failure[0].event_log_entry.dagster_event.message

        # While the other partition trains, the retry schedule resumes the killed one and leaves the running one.
        tick = build_retry_schedule(RetrySettings()).evaluate_tick(
            dg.build_schedule_context(instance=instance, repository_def=defs.get_repository_def()))
        assert [(r.partition_key, r.run_config["ops"]["trained_checkpoint"]["config"]["resume"])
                for r in tick.run_requests] == [(victim, True)]
        status = instance.get_status_by_partition(trained_checkpoint.key, [victim, waiter],
                                                  trained_checkpoint.partitions_def)
        assert status == {victim: dg.AssetPartitionStatus.FAILED, waiter: dg.AssetPartitionStatus.IN_PROGRESS}
    finally:
        # Each process was started in its own session: stop that group only (the waiter trains until stopped).
        for process in [*clis.values(), daemon]:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM if process is daemon else signal.SIGKILL)
                process.wait(timeout=60)
