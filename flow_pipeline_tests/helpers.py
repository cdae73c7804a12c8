"""Helpers the tests share: tiny configs that train in seconds, run config, CLI environment, free ports, process
trees, a small disk. Fixtures live in conftest.py."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data" / "sonar_embeddings_real.npy"


# Small enough to train in seconds on two CPU cores, large enough to learn something.
TINY_DATASET = {"n_synthetic": 640, "dim": 1024, "seed": 0, "val_fraction": 0.1, "test_fraction": 0.1}
TINY_TRAIN = {"model_size": "tiny", "max_epochs": 2, "batch_size": 64, "warmup_steps": 4, "log_every": 2,
              "device": "cpu", "lr": 0.002}


def resources(root: str | Path | None = None) -> dict:
    """The project's Dagster resources with the artifact root ``root`` (default: FLOW_PIPELINE_ROOT, which the
    ``artifacts_root`` fixture sets)."""
    from flow_pipeline.definitions import defs
    from flow_pipeline.defs.resources import ArtifactsResource, default_root

    return {**defs.resources, "artifacts": ArtifactsResource(root=str(root) if root is not None else default_root())}


def sha256_of(path: str | Path) -> str:
    """sha256 of a file, written independently of the project's ``sha256_file``."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on right now (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def run_config(dataset: dict | None = None, train: dict | None = None) -> dict:
    """Dagster run config for the pipeline assets (only the ops given)."""
    ops = {}
    if dataset is not None:
        ops["dataset_splits"] = {"config": dataset}
    if train is not None:
        ops["trained_checkpoint"] = {"config": train}
    return {"ops": ops}


def dagster_cli() -> str:
    return str(Path(sys.executable).parent / "dagster")


def cli_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, **extra}
    env.pop("WANDB_API_KEY", None)
    return env


# --- process trees (Linux /proc) ------------------------------------------------------------------------------------


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid``, not ``pid`` itself (from /proc parent links). Needed where children run in
    sessions of their own (torchrun's ranks, Dagster's training process), so a process-group kill would miss them."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    """Whether ``pid`` is a running (not exited, not zombie) process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


# --- a full disk ------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def small_disk(mount_point: Path, size_kb: int):
    """A real tmpfs of ``size_kb`` mounted at ``mount_point`` (created if needed); needs root, and the test is skipped
    where mounting is refused. Unmounted afterwards."""
    mount_point.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(directory: Path, leave_bytes: int = 0) -> Path:
    """Use up the free space of the filesystem of ``directory`` but ``leave_bytes`` (rounded to 4 KiB); returns the
    filler file, whose removal gives the space back."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as handle, contextlib.suppress(OSError):
        while True:
            free = os.statvfs(directory).f_bavail * os.statvfs(directory).f_frsize
            if free <= leave_bytes:
                break
            handle.write(b"\0" * min(4096, max(free - leave_bytes, 1)))
    return filler


# --- the dagster CLI ------------------------------------------------------------------------------------------------


def materialize(cwd: Path, select: str, config: dict, partition: str | None = None, check: bool = True):
    command = [dagster_cli(), "asset", "materialize", "-m", "flow_pipeline.definitions", "--select", select,
               "--config-json", json.dumps(config)]
    if partition:
        command += ["--partition", partition]
    return subprocess.run(command, cwd=cwd, env=cli_env(), capture_output=True, text=True, check=False, timeout=600)


def assert_ok(process: subprocess.CompletedProcess) -> None:
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
