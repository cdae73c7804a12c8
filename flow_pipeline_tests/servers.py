"""A real ``dagster-webserver`` + ``dagster-daemon`` for end-to-end tests, and a small GraphQL helper to drive them.

:func:`dagster_servers` starts both on 127.0.0.1 (a free port) against a given DAGSTER_HOME, waits until the
webserver answers ``/server_info``, the code location is loaded and the daemon reports healthy, and always stops
them again (their whole process groups: code servers, run workers and training processes included; if the test
process itself is killed, Linux sends the servers SIGTERM). Their output goes to ``webserver.log`` / ``daemon.log``
in a directory the caller chooses, so a failed test can be debugged.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import requests
from dagster_graphql import DagsterGraphQLClient

from flow_pipeline_tests.helpers import free_port

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKSPACE = REPO_ROOT / "workspace.yaml"
BIN = Path(sys.executable).parent
HOST = "127.0.0.1"
PR_SET_PDEATHSIG = 1  # from <sys/prctl.h>

FINISHED_RUN_STATUSES = {"SUCCESS", "FAILURE", "CANCELED"}
FINISHED_BACKFILL_STATUSES = {"COMPLETED", "COMPLETED_SUCCESS", "COMPLETED_FAILED", "FAILED", "CANCELED"}

WORKSPACE_QUERY = """
{ workspaceOrError { __typename
    ... on Workspace { locationEntries { name loadStatus
        locationOrLoadError { __typename ... on PythonError { message } } } }
    ... on PythonError { message } } }
"""
DAEMON_HEALTH_QUERY = """
{ instance { daemonHealth { allDaemonStatuses { daemonType required healthy } } } }
"""
RUN_QUERY = """
query ($runId: ID!) { runOrError(runId: $runId) { __typename
    ... on Run { runId status parentRunId rootRunId runConfigYaml tags { key value }
                 stepStats { stepKey status } }
    ... on RunNotFoundError { message } ... on PythonError { message } } }
"""
BACKFILL_QUERY = """
query ($backfillId: String!) { partitionBackfillOrError(backfillId: $backfillId) { __typename
    ... on PartitionBackfill { id status partitionNames runs(limit: 100) { runId status tags { key value } } }
    ... on PythonError { message } ... on BackfillNotFoundError { message } } }
"""


def prepare_dagster_home(home: Path, gpu_slots: int = 1) -> Path:
    """A persistent instance in ``home``: the project's dagster.yaml and the ``gpu`` pool limit set explicitly
    (pools are enforced reliably only with an explicit limit; see DESIGN.md)."""
    home.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(REPO_ROOT / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    subprocess.run([str(BIN / "dagster"), "instance", "concurrency", "set", "gpu", str(gpu_slots)], check=True,
                   cwd=REPO_ROOT, env={**os.environ, "DAGSTER_HOME": str(home)}, capture_output=True)
    return home


class ServerError(RuntimeError):
    """A server died, never became ready, or GraphQL answered with an error."""


@dataclass
class DagsterServers:
    """Handle on the running webserver + daemon: URL, GraphQL access, waiting for runs and backfills."""

    port: int
    home: Path
    log_dir: Path
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def client(self) -> DagsterGraphQLClient:
        return DagsterGraphQLClient(HOST, port_number=self.port, timeout=60)

    def graphql(self, query: str, variables: Mapping | None = None) -> dict:
        """The ``data`` of a GraphQL answer; raises :class:`ServerError` on transport or GraphQL errors."""
        response = requests.post(f"{self.url}/graphql", json={"query": query, "variables": dict(variables or {})},
                                 timeout=60)
        response.raise_for_status()
        body = response.json()
        if body.get("errors"):
            raise ServerError(f"GraphQL errors: {body['errors']}")
        return body["data"]

    def log_tail(self, chars: int = 4000) -> str:
        """The end of both server logs, for failure messages."""
        parts = []
        for name in self.processes:
            path = self.log_dir / f"{name}.log"
            text = path.read_text(errors="replace") if path.exists() else ""
            parts.append(f"--- {path} (last {chars} chars) ---\n{text[-chars:]}")
        return "\n".join(parts)

    def check_alive(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                raise ServerError(f"dagster {name} exited with code {process.returncode}\n{self.log_tail()}")

    # --- readiness -----------------------------------------------------------------------------------------------

    def wait_until_ready(self, timeout_s: float) -> None:
        """Webserver answers /server_info, every code location is LOADED (a load error is raised at once, with its
        message) and the daemon's run coordinator is healthy (runs would otherwise stay QUEUED)."""
        deadline = time.monotonic() + timeout_s
        steps = (("webserver /server_info", self._server_info_ok), ("code location loaded", self._locations_loaded),
                 ("daemon healthy", self._daemon_healthy))
        for what, ready in steps:
            while not ready():
                self.check_alive()
                if time.monotonic() > deadline:
                    raise ServerError(f"not ready after {timeout_s:.0f} s: waiting for {what}\n{self.log_tail()}")
                time.sleep(0.5)

    def _server_info_ok(self) -> bool:
        try:
            return requests.get(f"{self.url}/server_info", timeout=5).ok
        except requests.ConnectionError:
            return False

    def _locations_loaded(self) -> bool:
        workspace = self.graphql(WORKSPACE_QUERY)["workspaceOrError"]
        if workspace["__typename"] != "Workspace":
            raise ServerError(f"workspace error: {workspace.get('message')}")
        entries = workspace["locationEntries"]
        for entry in entries:
            location = entry["locationOrLoadError"] or {}
            if location.get("__typename") == "PythonError":
                raise ServerError(f"code location {entry['name']} failed to load:\n{location['message']}")
        return bool(entries) and all(entry["loadStatus"] == "LOADED" for entry in entries)

    def _daemon_healthy(self) -> bool:
        statuses = self.graphql(DAEMON_HEALTH_QUERY)["instance"]["daemonHealth"]["allDaemonStatuses"]
        return any(s["daemonType"] == "QUEUED_RUN_COORDINATOR" and s["healthy"] for s in statuses)

    # --- runs and backfills --------------------------------------------------------------------------------------

    def run(self, run_id: str) -> dict:
        """The run's GraphQL record: status, parentRunId, rootRunId, runConfigYaml, tags, stepStats."""
        answer = self.graphql(RUN_QUERY, {"runId": run_id})["runOrError"]
        if answer["__typename"] != "Run":
            raise ServerError(f"run {run_id}: {answer}")
        return answer

    def wait_for_run(self, run_id: str, timeout_s: float) -> dict:
        """Poll until the run has finished (SUCCESS, FAILURE or CANCELED); returns its record."""
        deadline = time.monotonic() + timeout_s
        while True:
            run = self.run(run_id)
            if run["status"] in FINISHED_RUN_STATUSES:
                return run
            self.check_alive()
            if time.monotonic() > deadline:
                raise ServerError(f"run {run_id} still {run['status']} after {timeout_s:.0f} s\n{self.log_tail()}")
            time.sleep(1.0)

    def wait_for_backfill(self, backfill_id: str, timeout_s: float) -> dict:
        """Poll until the backfill has finished and none of its runs is still going; returns its record."""
        deadline = time.monotonic() + timeout_s
        while True:
            answer = self.graphql(BACKFILL_QUERY, {"backfillId": backfill_id})["partitionBackfillOrError"]
            if answer["__typename"] != "PartitionBackfill":
                raise ServerError(f"backfill {backfill_id}: {answer}")
            runs_done = all(run["status"] in FINISHED_RUN_STATUSES for run in answer["runs"])
            if answer["status"] in FINISHED_BACKFILL_STATUSES and runs_done:
                return answer
            self.check_alive()
            if time.monotonic() > deadline:
                raise ServerError(f"backfill {backfill_id} still {answer['status']} after {timeout_s:.0f} s "
                                  f"(runs: {answer['runs']})\n{self.log_tail()}")
            time.sleep(1.0)


def _start(name: str, command: list[str], env: Mapping[str, str], log_dir: Path) -> subprocess.Popen:
    log = open(log_dir / f"{name}.log", "wb")  # noqa: SIM115 - closed below: the child keeps its own copy
    try:
        # A new session makes the server the leader of a process group that also holds its code server, run
        # workers and training processes, so one killpg stops everything it started.
        return subprocess.Popen(command, cwd=REPO_ROOT, env=dict(env), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                preexec_fn=_terminate_with_parent(os.getpid()))
    finally:
        log.close()


def _terminate_with_parent(parent_pid: int):
    """A preexec_fn asking Linux to SIGTERM the child when the test process dies (a killed pytest never runs its
    finally blocks; without this the servers would outlive it). A no-op where prctl is unavailable."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None

    def set_death_signal() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)

    return set_death_signal


def _stop(process: subprocess.Popen, grace_s: float = 15.0) -> None:
    """SIGTERM the server's process group, give it ``grace_s`` to shut down, then SIGKILL whatever is left of the
    group (run workers or training processes that outlived their parent)."""
    _signal_group(process, signal.SIGTERM)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    _signal_group(process, signal.SIGKILL)
    process.wait(timeout=10)


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:  # the whole group is gone already
        pass


@contextmanager
def dagster_servers(home: Path, log_dir: Path, env: Mapping[str, str] | None = None,
                    startup_timeout_s: float = 240.0, workspace: Path = WORKSPACE) -> Iterator[DagsterServers]:
    """Run ``dagster-webserver`` and ``dagster-daemon`` on ``workspace`` (default: workspace.yaml of the repo) with
    DAGSTER_HOME=``home``.

    ``env``: the servers' environment (default: this process's), e.g. with FLOW_PIPELINE_ROOT set; DAGSTER_HOME is
    always ``home``. Both are stopped on exit, whatever happens; logs stay in ``log_dir``.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {**(os.environ if env is None else env), "DAGSTER_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    servers = DagsterServers(port=free_port(HOST), home=home, log_dir=log_dir)
    try:
        servers.processes["webserver"] = _start("webserver", [
            str(BIN / "dagster-webserver"), "-w", str(workspace), "-h", HOST, "-p", str(servers.port),
        ], env, log_dir)
        servers.processes["daemon"] = _start("daemon", [str(BIN / "dagster-daemon"), "run", "-w", str(workspace)],
                                             env, log_dir)
        servers.wait_until_ready(startup_timeout_s)
        yield servers
    finally:
        for process in servers.processes.values():
            _stop(process)
