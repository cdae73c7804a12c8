"""Checkpoint files: round trip, sha256, atomic replacement (also under SIGKILL), clear errors for bad files."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from flow_pipeline.core import checkpoint as ckpt
from flow_pipeline.core.checkpoint import (
    REQUIRED_KEYS,
    CheckpointError,
    load_checkpoint,
    remove_stale_temp_files,
    save_checkpoint,
    sha256_file,
)
from flow_pipeline.core.models import build_model, count_parameters
from flow_pipeline_tests.helpers import sha256_of

REPO_ROOT = Path(__file__).resolve().parents[2]


def _state(seed: int, n: int = 1000) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "format_version": ckpt.FORMAT_VERSION,
        "epoch": 3,
        "global_step": 120,
        "model_state_dict": {"layer.weight": torch.randn(n, 8, generator=g), "layer.bias": torch.randn(8, generator=g)},
        "ema_shadow": {"layer.weight": torch.randn(n, 8, generator=g)},
        "optimizer_state_dict": {"state": {0: {"step": torch.tensor(5.0), "exp_avg": torch.randn(8, generator=g)}},
                                 "param_groups": [{"lr": 1e-3, "params": [0]}]},
        "scheduler_state_dict": {"last_epoch": 5, "_last_lr": [1e-3]},
        "best_loss": 1.2345,
        "config": {"arch": "mlp", "batch_size": 32, "lr": 1e-3},
        "normalization_stats": {"mean": torch.randn(8, generator=g), "std": torch.rand(8, generator=g) + 0.1},
        "rng": {"numpy": ["MT19937", list(range(5)), 3, 0, 0.0]},
    }


def _assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b)
        for key in a:
            _assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a == b


def test_save_load_round_trip_and_sha256(tmp_path):
    state = _state(0)
    path = tmp_path / "run" / ckpt.BEST_NAME  # the directory is created
    digest = save_checkpoint(state, path)
    assert digest == sha256_of(path) == sha256_file(path)
    loaded = load_checkpoint(path)
    _assert_same(state, loaded)
    assert all(key in loaded for key in REQUIRED_KEYS)
    # Overwrite with a different state: a new file, a new hash.
    digest2 = save_checkpoint(_state(1), path)
    assert digest2 != digest and digest2 == sha256_of(path)
    _assert_same(_state(1), load_checkpoint(path))
    assert [p.name for p in path.parent.iterdir()] == [ckpt.BEST_NAME]  # no temp files left behind


def test_sha256_file_reads_in_chunks(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(os.urandom(10_000))
    assert sha256_file(path, chunk_bytes=333) == sha256_of(path)


def test_stale_temp_file_is_removed_and_never_replaces_best(tmp_path):
    best = tmp_path / ckpt.BEST_NAME
    digest = save_checkpoint(_state(2), best)
    # Simulate a write killed midway: half of another checkpoint under the temp prefix.
    other = tmp_path / "other.pt"
    save_checkpoint(_state(3), other)
    stale = tmp_path / f"{ckpt.TEMP_PREFIX}{ckpt.BEST_NAME}.abc123"
    stale.write_bytes(other.read_bytes()[: other.stat().st_size // 2])
    other.unlink()
    removed = remove_stale_temp_files(tmp_path)
    assert removed == [stale]
    assert not stale.exists()
    assert sha256_of(best) == digest
    _assert_same(_state(2), load_checkpoint(best))
    assert remove_stale_temp_files(tmp_path) == []
    assert remove_stale_temp_files(tmp_path / "missing") == []


def test_failed_save_leaves_the_old_file_and_no_temp(tmp_path):
    best = tmp_path / ckpt.BEST_NAME
    digest = save_checkpoint(_state(4), best)
    bad = _state(5)
    bad["config"] = {"not_picklable": lambda: None}
    with pytest.raises(Exception):
        save_checkpoint(bad, best)
    assert sha256_of(best) == digest
    assert sorted(p.name for p in tmp_path.iterdir()) == [ckpt.BEST_NAME]


# --- errors that name the file ---------------------------------------------------------------------------------

def _expect_error(path: Path, *fragments: str) -> None:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message


def test_missing_file(tmp_path):
    _expect_error(tmp_path / "nope.pt", "not found")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.pt"
    path.touch()
    _expect_error(path, "empty")


def test_truncated_file(tmp_path):
    path = tmp_path / "cut.pt"
    save_checkpoint(_state(6), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _expect_error(path, "truncated")


def test_torch_file_holding_a_list(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.randn(3), torch.randn(2)], path)
    _expect_error(path, "list")


def test_dict_without_the_keys(tmp_path):
    path = tmp_path / "foreign.pt"
    torch.save({"weights": torch.randn(4), "epoch": 1}, path)
    _expect_error(path, "missing keys", "model_state_dict", "ema_shadow")


GARBAGE = {
    "random_bytes": random.Random(0).randbytes(5000),
    "text": b"this is not a checkpoint\n" * 10,
    "zip_magic": b"PK\x03\x04" + random.Random(1).randbytes(3000),
    "pickle_header": b"\x80\x02" + random.Random(2).randbytes(3000),
    "json": b'{"epoch": 1, "model_state_dict": {}}',
}


@pytest.mark.parametrize("kind", sorted(GARBAGE))
def test_non_torch_garbage(tmp_path, kind):
    path = tmp_path / f"{kind}.pt"
    path.write_bytes(GARBAGE[kind])
    _expect_error(path)


def test_unsafe_objects_are_refused(tmp_path):
    """A pickle holding arbitrary objects (here a Path) is refused by weights_only=True."""
    path = tmp_path / "unsafe.pt"
    state = _state(7)
    state["config"] = {"run_dir": Path("/tmp")}
    torch.save(state, path)
    _expect_error(path)


def test_newer_format_version(tmp_path):
    path = tmp_path / "future.pt"
    state = _state(8)
    state["format_version"] = ckpt.FORMAT_VERSION + 1
    torch.save(state, path)
    _expect_error(path, "newer")


# --- SIGKILL in the middle of save_checkpoint ----------------------------------------------------------------

# One child python imports torch once and forks a fresh writer process per round (so the test does not pay the
# torch import per kill). Each writer repeatedly overwrites best.pt with a big state via save_checkpoint, printing
# the sha256 of the bytes it is about to write ("pending") and the digest save_checkpoint returned ("done").
_WRITER_HOST = r"""
import hashlib, io, os, sys
import torch
from flow_pipeline.core.checkpoint import save_checkpoint

def writer(path, seed):
    print("pid", os.getpid(), flush=True)
    g = torch.Generator().manual_seed(seed)
    state = {"epoch": 0, "model_state_dict": {"w": torch.randn(6_000_000, generator=g)}, "ema_shadow": {},
             "optimizer_state_dict": {}, "scheduler_state_dict": {}, "best_loss": 1.0, "config": {},
             "normalization_stats": {}}
    i = 0
    while True:
        i += 1
        state["epoch"] = i
        state["model_state_dict"]["w"][i % 1000] = float(i)
        buffer = io.BytesIO()
        torch.save(state, buffer)
        pending = hashlib.sha256(buffer.getvalue()).hexdigest()
        print("pending", pending, flush=True)
        done = save_checkpoint(state, path)
        assert done == pending
        print("done", done, flush=True)

print("ready", flush=True)
for command in sys.stdin:
    pid = os.fork()
    if pid == 0:
        try:
            writer(sys.argv[1], int(command))
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    print("exited", os.waitstatus_to_exitcode(status), flush=True)
"""


class _WriterHost:
    def __init__(self, path: Path):
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen([sys.executable, "-c", _WRITER_HOST, str(path)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.wait_for(lambda line: line == "ready", start=0, timeout=120)

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.strip())

    def wait_for(self, predicate, start: int, timeout: float = 60) -> int:
        """Index of the first line at or after ``start`` that satisfies ``predicate``."""
        deadline = time.monotonic() + timeout
        while True:
            for i in range(start, len(self.lines)):
                if predicate(self.lines[i]):
                    return i
                if self.lines[i].startswith("exited "):
                    raise AssertionError(f"writer exited unexpectedly: {self.lines[start:i + 1][-5:]}")
            if self.proc.poll() is not None:
                raise AssertionError(f"writer host died: {self.proc.stderr.read()}")
            assert time.monotonic() < deadline, f"timed out; last lines: {self.lines[-5:]}"
            time.sleep(0.002)

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.mark.slow
def test_sigkill_during_save_leaves_a_complete_best(tmp_path):
    best = tmp_path / ckpt.BEST_NAME
    rng = random.Random(1234)
    completed: set[str] = set()
    kills = mid_write_kills = 0
    host = _WriterHost(best)
    try:
        while kills < 5 or (mid_write_kills == 0 and kills < 12):
            start = len(host.lines)
            host.proc.stdin.write(f"{kills}\n")
            host.proc.stdin.flush()
            pid_line = host.wait_for(lambda line: line.startswith("pid "), start)
            pid = int(host.lines[pid_line].split()[1])
            try:
                host.wait_for(lambda line: line.startswith("done "), pid_line)
                # A random moment, biased towards the write: shortly after the writer announces its next save.
                time.sleep(rng.uniform(0.0, 0.3))
                announced = host.wait_for(lambda line: line.startswith("pending "), len(host.lines))
                time.sleep(rng.uniform(0.0, 0.08))
            finally:
                os.kill(pid, signal.SIGKILL)
            exited = host.wait_for(lambda line: line.startswith("exited "), announced)
            assert host.lines[exited] == f"exited {-signal.SIGKILL}"
            kills += 1
            round_lines = host.lines[pid_line:exited]
            completed.update(line.split()[1] for line in round_lines if line.startswith("done "))
            pending = [line.split()[1] for line in round_lines if line.startswith("pending ")]
            temps = list(tmp_path.glob(ckpt.TEMP_PREFIX + "*"))
            mid_write_kills += bool(temps)

            # best.pt is always one complete save: loadable with weights_only, and its hash is a completed save's
            # (or the last announced one, if the kill came after its os.replace but before its "done" line).
            digest = sha256_of(best)
            assert digest in completed or digest == pending[-1], f"best.pt is not a completed save after kill {kills}"
            state = torch.load(best, weights_only=True)
            assert state["model_state_dict"]["w"].shape == (6_000_000,)
            load_checkpoint(best)

            removed = remove_stale_temp_files(tmp_path)
            assert sorted(removed) == sorted(temps)
            assert sha256_of(best) == digest
            assert [p.name for p in tmp_path.iterdir()] == [ckpt.BEST_NAME]
    finally:
        host.close()
    assert mid_write_kills >= 1, f"none of {kills} kills landed while a temp file was being written"


# --- verify: sha256 + load ----------------------------------------------------------------------------------------


def test_verify_hashes_and_loads_and_names_a_changed_or_missing_file(tmp_path):
    path = tmp_path / "best.pt"
    save_checkpoint(_state(7), path)
    verified = ckpt.verify(path, sha256_of(path))
    assert verified.sha256 == sha256_of(path) and verified.path == path
    _assert_same(verified.state, _state(7))
    assert ckpt.verify(path).sha256 == sha256_of(path)  # no expectation: any content that loads
    with pytest.raises(CheckpointError, match="changed since it was recorded") as info:
        ckpt.verify(path, "0" * 64)
    assert str(path) in str(info.value)
    with pytest.raises(CheckpointError, match="not found") as info:
        ckpt.verify(tmp_path / "gone.pt", sha256_of(path))
    assert "gone.pt" in str(info.value)


def test_model_from_config_builds_the_saved_architecture():
    config = {"arch": "mlp", "dim": 64, "model_size": "tiny", "linear_skip": True, "principal_dims": 0}
    model = ckpt.model_from_config(config)
    expected = build_model("mlp", dim=64, size="tiny", linear_skip=True)
    assert [(n, p.shape) for n, p in model.named_parameters()] == [(n, p.shape) for n, p in expected.named_parameters()]
    # A config saved before the skip path existed describes a model without one.
    old = ckpt.model_from_config({"arch": "mlp", "dim": 64, "model_size": "tiny"})
    assert count_parameters(old) == count_parameters(build_model("mlp", dim=64, size="tiny"))
    assert count_parameters(old) < count_parameters(model)
