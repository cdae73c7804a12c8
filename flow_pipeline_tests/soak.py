"""A whole study under fire: the soak harness behind ``benchmarks/soak.py`` and the short soak in the test suite.

On a real PostgreSQL instance (deploy/dagster-postgres.yaml) with ``dagster-webserver`` and ``dagster-daemon`` and the
``gpu`` pool at ``pool``, it launches every partition of ``trained_checkpoint`` as one backfill, then, while they
train: SIGKILLs training processes at random moments, SIGKILLs run workers, and restarts PostgreSQL. The retry
schedule (cron every minute here) and the ``fail_orphaned_runs`` sensor must bring every partition to success. A
monitor thread samples the live training processes all along (the pool must never be exceeded). At the end every
checkpoint is loaded and checked against its materialization's sha256, and killed-and-resumed runs are retrained
uninterrupted in this process and compared weight for weight.
"""

from __future__ import annotations

import collections
import json
import os
import random
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import dagster as dg
import torch

from flow_pipeline.ablations import PARTITION_KEYS
from flow_pipeline.core.checkpoint import BEST_NAME, CheckpointError, load_checkpoint, sha256_file
from flow_pipeline.defs.assets import trained_checkpoint
from flow_pipeline.defs.failures import FAILURE_KIND_TAG
from flow_pipeline.defs.retries import ATTEMPT_TAG
from flow_pipeline.defs.run_config import TrainRunConfig
from flow_pipeline.replicates import replicates_from_metadata
from flow_pipeline.artifacts import JOB_NAME, TrainJob
from flow_pipeline.train import run_job
from flow_pipeline_tests.postgres_server import PostgresServer, _run as run_as_server_user, start_postgres
from flow_pipeline_tests.servers import BIN, REPO_ROOT, DagsterServers, dagster_servers

INSTANCE_YAML = REPO_ROOT / "deploy" / "dagster-postgres.yaml"
LAUNCH_BACKFILL = """
mutation ($params: LaunchBackfillParams!) { launchPartitionBackfill(backfillParams: $params) { __typename
    ... on LaunchBackfillSuccess { backfillId } ... on PythonError { message } ... on InvalidSubsetError { message }
    ... on UnauthorizedError { message } } }
"""


@dataclass
class SoakSettings:
    partitions: list[str] = field(default_factory=lambda: list(PARTITION_KEYS))
    pool: int = 2
    replicates: int = 2  # used where trained_checkpoint has the knob
    training_kills: int = 10
    worker_kills: int = 1
    postgres_restarts: int = 1
    verify_resumed: int = 3  # killed runs retrained uninterrupted for the bit-identity check
    train: dict = field(default_factory=lambda: {"model_size": "tiny", "max_epochs": 30, "batch_size": 64,
                                                 "warmup_steps": 4, "log_every": 5, "device": "cpu", "lr": 0.002,
                                                 "patience": 1000})
    n_synthetic: int = 1500
    max_attempts: int = 30
    timeout_s: float = 2400.0
    seed: int = 0


@dataclass
class SoakReport:
    partitions: int
    pool: int
    replicates: int
    runs_launched: int = 0
    retry_runs: int = 0
    training_kills: int = 0
    worker_kills: int = 0
    postgres_restarts: int = 0
    max_concurrent_trainings: int = 0
    completion_s: float = 0.0
    failure_kinds: dict = field(default_factory=dict)
    checkpoints_checked: int = 0
    corrupt_checkpoints: list = field(default_factory=list)
    not_materialized: list = field(default_factory=list)
    bit_identical: dict = field(default_factory=dict)  # run dir of a killed-and-resumed run -> weights equal?
    events: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


# --- processes ----------------------------------------------------------------------------------------------------


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def training_processes(root: Path) -> dict[int, Path]:
    """Live training processes of this soak: pid -> run directory (from ``--job <run_dir>/job.json``)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        args = _cmdline(int(entry.name))
        if "flow_pipeline.train" in args and "--job" in args:
            job = Path(args[args.index("--job") + 1])
            if job.is_relative_to(root):
                found[int(entry.name)] = job.parent
    return found


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


class ConcurrencyMonitor(threading.Thread):
    """Samples the live training processes every ``interval_s``; ``max_seen``: the most run directories training at
    one moment (a replicate's processes run one after another, so this counts trainings, not processes)."""

    def __init__(self, root: Path, interval_s: float = 0.2):
        super().__init__(daemon=True)
        self.root, self.interval_s = root, interval_s
        self.max_seen, self.stop = 0, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.max_seen = max(self.max_seen, len(set(training_processes(self.root).values())))
            time.sleep(self.interval_s)


# --- the instance ---------------------------------------------------------------------------------------------------


def _instance_for(home: Path, env: dict) -> dg.DagsterInstance:
    os.environ.update({key: value for key, value in env.items() if key.startswith("DAGSTER_")})
    return dg.DagsterInstance.from_config(str(home))


def _statuses(home: Path, env: dict, partitions: list[str]) -> dict:
    """Partition statuses, or {} while the database is unreachable (it is restarted on purpose)."""
    try:
        with _instance_for(home, env) as instance:
            found = instance.get_status_by_partition(trained_checkpoint.key, partitions,
                                                     trained_checkpoint.partitions_def) or {}
            in_progress = instance.get_runs_count(dg.RunsFilter(statuses=[
                dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
                dg.DagsterRunStatus.STARTED]))
            return {"statuses": found, "in_progress": in_progress}
    except Exception:  # noqa: BLE001 - a restarting database
        return {}


def launch_backfill(servers: DagsterServers, settings: SoakSettings) -> str:
    train = dict(settings.train)
    if settings.replicates > 1 and "replicates" in TrainRunConfig.model_fields:
        train["replicates"] = settings.replicates
    params = {"partitionNames": settings.partitions, "assetSelection": [{"path": ["trained_checkpoint"]}],
              "runConfigData": {"ops": {"trained_checkpoint": {"config": train}}}, "title": "soak"}
    answer = servers.graphql(LAUNCH_BACKFILL, {"params": params})["launchPartitionBackfill"]
    if answer["__typename"] != "LaunchBackfillSuccess":
        raise RuntimeError(f"backfill not launched: {answer}")
    return answer["backfillId"]


def restart_postgres(server: PostgresServer) -> None:
    # -l: the restarted server must not inherit our pipes (the call would wait for their EOF forever).
    run_as_server_user(server, [str(server.bin_dir / "pg_ctl"), "-D", str(server.data_dir), "-l",
                                str(server.root / "server.log"), "-m", "fast", "-w", "-t", "60", "-o", f"-p {server.port} -k {server.root} -c listen_addresses={server.host} "
                                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200",
                                "restart"])


# --- faults ----------------------------------------------------------------------------------------------------------


class FaultInjector:
    """Kills at random moments while trainings run: training processes first, then (interleaved) run workers and a
    database restart. A run directory is killed at most ``max_per_run`` times, so every run can still finish."""

    def __init__(self, settings: SoakSettings, root: Path, postgres: PostgresServer, report: SoakReport,
                 max_per_run: int = 2):
        self.settings, self.root, self.postgres, self.report = settings, root, postgres, report
        self.random = random.Random(settings.seed)
        self.killed_runs: collections.Counter = collections.Counter()
        self.max_per_run = max_per_run

    @property
    def done(self) -> bool:
        s, r = self.settings, self.report
        return (r.training_kills >= s.training_kills and r.worker_kills >= s.worker_kills
                and r.postgres_restarts >= s.postgres_restarts)

    def step(self, started: float) -> None:
        """One chance to inject a fault (called every few seconds): the kind is drawn among those still owed, the
        database restart and worker kills only once some trainings were killed, so they hit a loaded system."""
        live = {pid: run for pid, run in training_processes(self.root).items()
                if self.killed_runs[run] < self.max_per_run}
        if not live or self.done:
            return
        time.sleep(self.random.uniform(0.5, 4.0))  # a random moment of the training
        s, r = self.settings, self.report
        owed = ["training"] * (s.training_kills - r.training_kills)
        if r.training_kills >= s.training_kills // 3:
            owed += ["worker"] * (s.worker_kills - r.worker_kills)
        if r.training_kills >= s.training_kills // 2:
            owed += ["postgres"] * (s.postgres_restarts - r.postgres_restarts)
        if not owed:
            return
        kind, now = self.random.choice(owed), f"{time.monotonic() - started:7.1f}s"
        pid = self.random.choice(sorted(live))
        if kind == "postgres":
            restart_postgres(self.postgres)
            r.postgres_restarts += 1
            r.events.append(f"{now} restarted PostgreSQL")
        elif kind == "worker":
            # The training process's parent is its run worker (Pipes starts training as a child of the step).
            worker = _parent(pid)
            command = " ".join(_cmdline(worker))[:80] if worker else ""  # read before the kill empties it
            if worker and worker > 1 and _signal(worker):
                self.killed_runs[live[pid]] += 1
                r.worker_kills += 1
                r.events.append(f"{now} SIGKILL run worker {worker} {command!r} (training {live[pid].name})")
        elif _signal(pid):
            self.killed_runs[live[pid]] += 1
            r.training_kills += 1
            r.events.append(f"{now} SIGKILL training process {pid} ({live[pid].name})")


def _signal(pid: int) -> bool:
    try:
        os.kill(pid, signal.SIGKILL)
        return True
    except ProcessLookupError:
        return False


# --- checks at the end -------------------------------------------------------------------------------------------------


def check_checkpoints(instance: dg.DagsterInstance, settings: SoakSettings, report: SoakReport) -> list[dict]:
    """Every partition's latest materialization: every checkpoint it names loads and has its recorded sha256."""
    materialized = []
    for partition in settings.partitions:
        records = instance.fetch_materializations(dg.AssetRecordsFilter(
            asset_key=trained_checkpoint.key, asset_partitions=[partition]), limit=1).records
        if not records:
            report.not_materialized.append(partition)
            continue
        metadata = {key: value.value for key, value in records[0].asset_materialization.metadata.items()}
        for replicate in replicates_from_metadata(metadata):
            path, sha = replicate["checkpoint_path"], replicate["sha256"]
            report.checkpoints_checked += 1
            try:
                load_checkpoint(path)
                if sha256_file(path) != sha:
                    raise CheckpointError(f"sha256 differs from the materialization's: {path}")
            except CheckpointError as exc:
                report.corrupt_checkpoints.append(str(exc))
        materialized.append(metadata)
    return materialized


def retrain_uninterrupted(run_dir: Path, scratch: Path) -> bool:
    """Train the run of ``run_dir`` again from scratch, in one go, with its job's data and the threads it trained
    with; True when the final best.pt weights (model and EMA) equal the soaked run's bit for bit."""
    job = TrainJob.load(run_dir / JOB_NAME)
    soaked = load_checkpoint(run_dir / BEST_NAME)
    result = json.loads((run_dir / "result.json").read_text())
    fresh_dir = scratch / run_dir.name
    shutil.rmtree(fresh_dir, ignore_errors=True)
    config = {**job.config, "resume": False}
    torch.set_num_threads(int(result.get("threads") or torch.get_num_threads()))
    run_job(TrainJob(config=config, splits_dir=job.splits_dir, stats_path=job.stats_path, run_dir=str(fresh_dir),
                     partition_key=job.partition_key))
    fresh = load_checkpoint(fresh_dir / BEST_NAME)
    same = all(torch.equal(soaked[key][name], fresh[key][name])
               for key in ("model_state_dict", "ema_shadow") for name in soaked[key])
    return same and soaked["global_step"] == fresh["global_step"]


# --- the soak ----------------------------------------------------------------------------------------------------------


def run_soak(settings: SoakSettings, workdir: Path) -> SoakReport:
    """Run the soak in ``workdir`` (instance home, artifacts, logs) and return its figures."""
    report = SoakReport(partitions=len(settings.partitions), pool=settings.pool, replicates=settings.replicates)
    postgres = start_postgres()
    try:
        home, root = workdir / "dagster_home", workdir / "artifacts"
        home.mkdir(parents=True)
        shutil.copyfile(INSTANCE_YAML, home / "dagster.yaml")
        env = {**os.environ, **postgres.dagster_env(), "DAGSTER_HOME": str(home), "FLOW_PIPELINE_ROOT": str(root),
               "FLOW_PIPELINE_RERUN_CRON": "* * * * *", "FLOW_PIPELINE_MAX_ATTEMPTS": str(settings.max_attempts),
               "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
        env.pop("WANDB_API_KEY", None)
        _prepare_instance_and_data(env, settings)
        with dagster_servers(home, workdir / "logs", env=env) as servers:
            _soak_with_servers(servers, settings, report, postgres, home, root, env)
        with _instance_for(home, env) as instance:
            check_checkpoints(instance, settings, report)
            runs = instance.get_runs()
            report.runs_launched = len(runs)
            report.retry_runs = sum(1 for run in runs if ATTEMPT_TAG in run.tags)
            report.failure_kinds = dict(collections.Counter(run.tags.get(FAILURE_KIND_TAG, "untagged")
                                                            for run in runs if run.status == dg.DagsterRunStatus.FAILURE))
        return report
    finally:
        postgres.stop()


def _prepare_instance_and_data(env: dict, settings: SoakSettings) -> None:
    dagster = str(BIN / "dagster")
    subprocess.run([dagster, "instance", "concurrency", "set", "gpu", str(settings.pool)], env=env, check=True,
                   capture_output=True, cwd=REPO_ROOT, timeout=300)
    config = {"ops": {"dataset_splits": {"config": {"n_synthetic": settings.n_synthetic}}}}
    done = subprocess.run([dagster, "asset", "materialize", "-m", "flow_pipeline.definitions", "--select",
                           "dataset_splits,normalization_stats", "--config-json", json.dumps(config)],
                          env=env, capture_output=True, text=True, cwd=REPO_ROOT, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"data assets failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")


def _soak_with_servers(servers, settings, report, postgres, home, root, env) -> None:
    monitor = ConcurrencyMonitor(root)
    monitor.start()
    injector = FaultInjector(settings, root, postgres, report)
    started = time.monotonic()
    launch_backfill(servers, settings)
    try:
        state, polled = {}, 0.0
        while time.monotonic() - started < settings.timeout_s:
            injector.step(started)
            if time.monotonic() - polled < 5.0:  # an instance per poll is not free: poll every few seconds
                time.sleep(1.0)
                continue
            polled, state = time.monotonic(), _statuses(home, env, settings.partitions)
            statuses = state.get("statuses", {})
            finished = (len(statuses) == len(settings.partitions) and state.get("in_progress") == 0
                        and all(status == dg.AssetPartitionStatus.MATERIALIZED for status in statuses.values()))
            if finished:  # the faults injected by then are the ones reported
                break
            servers.check_alive()
            time.sleep(1.0)
        else:
            report.events.append(f"timed out after {settings.timeout_s:.0f} s: {state}")
        report.completion_s = round(time.monotonic() - started, 1)
    finally:
        monitor.stop.set()
        monitor.join()
        report.max_concurrent_trainings = monitor.max_seen
    killed = [run for run in injector.killed_runs if (run / BEST_NAME).exists() and (run / "result.json").exists()]
    for run_dir in killed[: settings.verify_resumed]:
        report.bit_identical[run_dir.name] = retrain_uninterrupted(run_dir, root / "uninterrupted")
