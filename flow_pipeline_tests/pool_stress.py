"""The gpu pool under simultaneous claims: the harness behind ``benchmarks/pool_stress.py`` and test_pool_stress.py.

On a persistent instance (the project's SQLite ``dagster_home/dagster.yaml``, or ``deploy/dagster-postgres.yaml`` on
a throwaway PostgreSQL server) with the ``gpu`` pool at ``limit``, each round starts ``runs`` runs of the stress job
(pool_stress_defs.py) at once, either

- ``cli``: as ``dagster job execute`` processes (each process is its own run worker, no queue), or
- ``queue``: submitted over GraphQL to a ``dagster-webserver``; ``dagster-daemon`` dequeues them (QueuedRunCoordinator)
  and its code server starts a run worker for each.

The runs meet at a barrier, then claim the pool in the same instant and hold it ``hold_s``. From the spans each run
writes while it holds the pool, a round's figure is the most runs holding it at one moment; it must never exceed
the limit, and every run must succeed.

A third path, ``threads``, claims from ``runs`` threads of this process released by one barrier (microseconds apart,
where separate processes on a loaded machine are tens of milliseconds apart): its figure is how many claims were told
they hold a slot.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import dagster as dg

from flow_pipeline.defs.pool_claims import SERIALISED_METHODS, locked_storages
from flow_pipeline_tests.pool_stress_defs import (READY_PREFIX, SPANS_NAME, WITHOUT_LOCK_ENV, gpu_pool_stress,
                                                  hold_the_gpu)
from flow_pipeline_tests.postgres_server import start_postgres
from flow_pipeline_tests.servers import BIN, FINISHED_RUN_STATUSES, REPO_ROOT, DagsterServers, dagster_servers

STORAGES = ("sqlite", "postgres")
PATHS = ("cli", "queue", "threads")
INSTANCE_YAML = {"sqlite": REPO_ROOT / "dagster_home" / "dagster.yaml",
                 "postgres": REPO_ROOT / "deploy" / "dagster-postgres.yaml"}
STRESS_WORKSPACE = Path(__file__).with_name("pool_stress_workspace.yaml")
QUEUE_MAX_RUNS = 8  # max_concurrent_runs of both instance files: more queued runs could never all meet


@dataclass
class StressSettings:
    storage: str = "sqlite"
    runs: int = 6  # launched at once per round
    limit: int = 2  # the gpu pool's limit
    rounds: int = 20  # per path
    paths: Sequence[str] = ("cli", "queue")
    hold_s: float = 1.0
    round_timeout_s: float = 300.0
    with_lock: bool = True  # False: Dagster's claims alone (POOL_STRESS_WITHOUT_LOCK=1 in every process)

    def check(self) -> None:
        """ValueError naming the setting that cannot work."""
        if self.storage not in STORAGES:
            raise ValueError(f"storage: {self.storage!r} is not one of {', '.join(STORAGES)}")
        unknown = [path for path in self.paths if path not in PATHS]
        if unknown:
            raise ValueError(f"paths: {unknown} not among {', '.join(PATHS)}")
        if self.limit < 1 or self.runs <= self.limit:
            raise ValueError(f"runs ({self.runs}) must exceed limit ({self.limit} >= 1), or nothing waits for a slot")
        if "queue" in self.paths and self.runs > QUEUE_MAX_RUNS:
            raise ValueError(f"runs: {self.runs} > {QUEUE_MAX_RUNS}, the instance's max_concurrent_runs: the queue "
                             "would hold some back and the others would wait for them at the barrier")


@dataclass
class RoundResult:
    path: str
    round: int
    runs: int
    succeeded: int
    max_holding: int  # most runs holding the pool at one moment (threads: told they hold a slot)
    claim_spread_s: float  # from the first run's first claim to the last run's first claim
    seconds: float


@dataclass
class StressReport:
    storage: str
    limit: int
    with_lock: bool
    rounds: list[RoundResult] = field(default_factory=list)

    @property
    def claims_tried(self) -> int:
        return sum(r.runs for r in self.rounds)

    @property
    def max_holding(self) -> int:
        return max((r.max_holding for r in self.rounds), default=0)

    @property
    def rounds_over_limit(self) -> int:
        return sum(r.max_holding > self.limit for r in self.rounds)

    @property
    def runs_failed(self) -> int:
        return sum(r.runs - r.succeeded for r in self.rounds)

    def as_dict(self) -> dict:
        return {"storage": self.storage, "limit": self.limit, "with_lock": self.with_lock,
                "claims_tried": self.claims_tried, "max_holding": self.max_holding,
                "rounds_over_limit": self.rounds_over_limit, "runs_failed": self.runs_failed,
                "rounds": [asdict(r) for r in self.rounds]}


def max_holding(spans: Sequence[dict]) -> int:
    """The most spans ({start, end}) open at one moment; a span that ends when another starts does not overlap it."""
    events = sorted([(span["start"], 1) for span in spans] + [(span["end"], -1) for span in spans])  # -1 first on ties
    most = holding = 0
    for _, change in events:
        holding += change
        most = max(most, holding)
    return most


# --- the instance ----------------------------------------------------------------------------------------------------


@contextmanager
def stress_instance(settings: StressSettings, workdir: Path) -> Iterator[dict[str, str]]:
    """A DAGSTER_HOME in ``workdir`` with the storage's instance file and the gpu pool at ``settings.limit``; yields
    the environment of the processes that use it (PostgreSQL, when asked for, runs until the block ends)."""
    home = workdir / "dagster_home"
    home.mkdir(parents=True)
    shutil.copyfile(INSTANCE_YAML[settings.storage], home / "dagster.yaml")
    env = {**os.environ, "DAGSTER_HOME": str(home), "PYTHONPATH": _python_path(), "OMP_NUM_THREADS": "1"}
    if not settings.with_lock:
        env[WITHOUT_LOCK_ENV] = "1"
    postgres = start_postgres() if settings.storage == "postgres" else None
    try:
        if postgres is not None:
            env.update(postgres.dagster_env())
        with instance_in(env) as instance:
            instance.event_log_storage.set_concurrency_slots("gpu", settings.limit)
        yield env
    finally:
        if postgres is not None:
            postgres.stop()


@contextmanager
def instance_in(env: dict[str, str]) -> Iterator[dg.DagsterInstance]:
    """The instance of ``env``'s DAGSTER_HOME, reading its DAGSTER_PG_* variables from ``env``."""
    names = [key for key in env if key.startswith("DAGSTER_")]
    before = {name: os.environ.get(name) for name in names}
    os.environ.update({name: env[name] for name in names})
    try:
        with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
            yield instance
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _python_path() -> str:
    return os.pathsep.join([str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])


# --- rounds -----------------------------------------------------------------------------------------------------------


def round_config(settings: StressSettings, directory: Path) -> dict:
    return {"ops": {"meet_the_other_runs": {"config": {"directory": str(directory), "parties": settings.runs}},
                    "hold_the_gpu": {"config": {"hold_s": settings.hold_s}}}}


def read_spans(directory: Path) -> list[dict]:
    path = directory / SPANS_NAME
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def claim_spread_s(env: dict[str, str], directory: Path) -> float:
    """Seconds between the first and the last of the round's runs to ask for the pool: each run's first event of the
    pool step (blocked, or started at once) in the instance's event log."""
    run_ids = [path.name.removeprefix(READY_PREFIX) for path in directory.glob(f"{READY_PREFIX}*")]
    firsts = []
    with instance_in(env) as instance:
        for run_id in run_ids:
            times = [record.timestamp for record in instance.all_logs(run_id)
                     if record.step_key == hold_the_gpu.name and record.dagster_event is not None]
            firsts += [min(times)] if times else []
    return max(firsts) - min(firsts) if firsts else float("nan")


def cli_round(settings: StressSettings, env: dict[str, str], directory: Path) -> int:
    """``runs`` ``dagster job execute`` processes at once; how many exited 0 (their output goes to cli-<i>.log)."""
    config = directory / "run_config.yaml"  # JSON is YAML
    config.write_text(json.dumps(round_config(settings, directory)))
    command = [str(BIN / "dagster"), "job", "execute", "-m", "flow_pipeline_tests.pool_stress_defs",
               "-j", gpu_pool_stress.name, "--config", str(config)]
    processes = []
    for index in range(settings.runs):
        with open(directory / f"cli-{index}.log", "wb") as log:
            processes.append(subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + settings.round_timeout_s
    for process in processes:
        try:
            process.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return sum(process.returncode == 0 for process in processes)


def queue_round(settings: StressSettings, servers: DagsterServers, directory: Path) -> int:
    """``runs`` runs submitted to the queue at once; how many ended in SUCCESS."""
    client = servers.client()
    run_ids = [client.submit_job_execution(gpu_pool_stress.name, run_config=round_config(settings, directory))
               for _ in range(settings.runs)]
    deadline = time.monotonic() + settings.round_timeout_s
    statuses: dict[str, str] = {}
    while len(statuses) < len(run_ids) and time.monotonic() < deadline:
        time.sleep(1.0)
        servers.check_alive()
        for run_id in run_ids:
            status = servers.run(run_id)["status"]
            if status in FINISHED_RUN_STATUSES:
                statuses[run_id] = status
    return sum(status == "SUCCESS" for status in statuses.values())


@contextmanager
def claims_left_to_dagster(left: bool) -> Iterator[None]:
    """Within the block, this process's claims go without the project's lock when ``left`` (restored afterwards)."""
    saved = {(storage, name): getattr(storage, name) for storage in locked_storages() for name in SERIALISED_METHODS}
    try:
        if left:
            for (storage, name), method in saved.items():
                setattr(storage, name, getattr(method, "__wrapped__", method))
        yield
    finally:
        for (storage, name), method in saved.items():
            setattr(storage, name, method)


def thread_round(settings: StressSettings, env: dict[str, str], index: int) -> RoundResult:
    """``runs`` threads claim the pool at one barrier, one run id each, then free it again."""
    run_ids = [f"threads-{index}-{i}" for i in range(settings.runs)]
    barrier, told, asked_at = threading.Barrier(settings.runs), {}, {}
    started = time.monotonic()
    with instance_in(env) as instance, claims_left_to_dagster(not settings.with_lock):
        storage = instance.event_log_storage

        def claim(run_id: str) -> None:
            barrier.wait()
            asked_at[run_id] = time.time()
            told[run_id] = storage.claim_concurrency_slot("gpu", run_id, hold_the_gpu.name).is_claimed

        threads = [threading.Thread(target=claim, args=(run_id,)) for run_id in run_ids]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for run_id in run_ids:
            storage.free_concurrency_slots_for_run(run_id)
    return RoundResult("threads", index, settings.runs, len(told), sum(told.values()),
                       round(max(asked_at.values()) - min(asked_at.values()), 4), round(time.monotonic() - started, 1))


def _play(settings: StressSettings, report: StressReport, path: str, workdir: Path, env: dict[str, str],
          start_round) -> None:
    for index in range(settings.rounds):
        directory = workdir / "rounds" / f"{path}-{index:02d}"
        directory.mkdir(parents=True)
        started = time.monotonic()
        succeeded = start_round(directory)
        seconds = time.monotonic() - started
        report.rounds.append(RoundResult(path, index, settings.runs, succeeded, max_holding(read_spans(directory)),
                                         round(claim_spread_s(env, directory), 3), round(seconds, 1)))


def run_stress(settings: StressSettings, workdir: Path) -> StressReport:
    """Play ``settings.rounds`` rounds on each path in ``workdir`` (instance home, round directories, server logs)."""
    settings.check()
    report = StressReport(settings.storage, settings.limit, settings.with_lock)
    with stress_instance(settings, workdir) as env:
        if "cli" in settings.paths:
            _play(settings, report, "cli", workdir, env, lambda directory: cli_round(settings, env, directory))
        if "queue" in settings.paths:
            with dagster_servers(Path(env["DAGSTER_HOME"]), workdir / "logs", env=env,
                                 workspace=STRESS_WORKSPACE) as servers:
                _play(settings, report, "queue", workdir, env,
                      lambda directory: queue_round(settings, servers, directory))
        if "threads" in settings.paths:
            report.rounds += [thread_round(settings, env, index) for index in range(settings.rounds)]
    return report
