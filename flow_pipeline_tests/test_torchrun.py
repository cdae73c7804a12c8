"""Data-parallel training under ``torchrun --nproc_per_node=2`` on the CPU (gloo backend), as real processes.

One uninterrupted 2-process run is the reference: it learns, only rank 0 logs and writes, it follows the
single-process trajectory to float rounding, and its checkpoint loads in a single process. A second 2-process run is
SIGKILLed (both ranks and the torchrun agent) mid-run and resumed: it ends bit-identical to the reference.
Small unit tests at the end cover how a batch is split across ranks, without starting process groups.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from flow_pipeline.artifacts import ArtifactLayout
from flow_pipeline.config import TrainConfig
from flow_pipeline.core import checkpoint as ckpt
from flow_pipeline.core.data.normalization import Normalizer, save_normalizer
from flow_pipeline.core.data.sources import build_splits
from flow_pipeline.core.data.split_set import save_splits
from flow_pipeline.core.distributed import DistInfo
from flow_pipeline.core.models import build_model
from flow_pipeline.core.trainer import TrainData, train
from flow_pipeline.artifacts import LOSS_CURVE_NAME, RESULT_NAME, TrainJob
from flow_pipeline.train import load_train_data
from flow_pipeline_tests.helpers import REPO_ROOT, TINY_DATASET, alive, descendants

NPROC = 2
# 512 training rows / 64 = 8 steps per epoch, 32 steps; last.pt after every step so a kill lands mid-epoch.
# fp32: bf16 autocast (precision auto on a CPU with native bf16) rounds each rank's half batch on its own, so the
# two-process and one-process histories would differ by more than the order of a float sum.
CONFIG = TrainConfig(arch="mlp", flow="icfm", model_size="tiny", dim=TINY_DATASET["dim"], max_epochs=4, batch_size=64,
                     warmup_steps=4, log_every=2, device="cpu", lr=0.002, save_every_steps=1, precision="fp32",
                     normalization="zscore", linear_skip=False)
HISTORY_KEYS = ("epoch", "step", "train_loss", "val_loss", "ema_val_loss", "lr")
RUN_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """Splits and normalisation stats on disk, as the data assets write them."""
    layout = ArtifactLayout(tmp_path_factory.mktemp("artifacts"))
    splits = build_splits("synthetic", TINY_DATASET["dim"], TINY_DATASET["n_synthetic"], TINY_DATASET["seed"],
                          (0.8, 0.1, 0.1))
    save_splits(splits, layout.splits_dir)
    save_normalizer(layout.stats_path("full", "zscore"), Normalizer.fit(splits.train))
    return layout.root


def write_job(root: Path, name: str, config: TrainConfig = CONFIG) -> Path:
    layout = ArtifactLayout(root)
    run_dir = layout.run_dir(name)
    run_dir.mkdir(parents=True, exist_ok=True)
    return TrainJob(config=config.model_dump(), splits_dir=str(layout.splits_dir), stats_path=str(layout.stats_path("full", "zscore")),
                    run_dir=str(run_dir)).save()


def torchrun(job_path: Path, log_dir: Path) -> subprocess.Popen:
    """``python -m torch.distributed.run --standalone --nproc_per_node=2 -m flow_pipeline.train --job …`` with each
    rank's stdout/stderr in its own file under ``log_dir`` (``--redirects 3``), in a new process group."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={NPROC}",
               "--log-dir", str(log_dir), "--redirects", "3", "-m", "flow_pipeline.train", "--job", str(job_path)]
    env = {key: value for key, value in os.environ.items() if key not in ("WANDB_API_KEY", "DAGSTER_PIPES_CONTEXT")}
    return subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def kill_all(process: subprocess.Popen) -> None:
    """SIGKILL the torchrun agent and every rank, as a lost node would."""
    for pid in [*descendants(process.pid), process.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def finish(process: subprocess.Popen) -> str:
    output = process.communicate(timeout=RUN_TIMEOUT_S)[0]
    assert process.returncode == 0, output[-4000:]
    return output


def rank_logs(log_dir: Path) -> dict[int, str]:
    """rank -> its stdout + stderr, from torchrun's ``<log_dir>/<run id>/attempt_0/<rank>/std{out,err}.log``."""
    logs = {}
    for rank_dir in log_dir.glob("*/attempt_0/*"):
        logs[int(rank_dir.name)] = "".join((rank_dir / name).read_text() for name in ("stdout.log", "stderr.log"))
    return logs


def epoch_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if f"/{CONFIG.max_epochs} train_loss=" in line]


@pytest.fixture(scope="module")
def reference(data_root, tmp_path_factory) -> dict:
    """The uninterrupted 2-process run: its run dir, per-rank logs and best.pt state."""
    job_path = write_job(data_root, "reference")
    log_dir = tmp_path_factory.mktemp("reference-logs")
    finish(torchrun(job_path, log_dir))
    run_dir = job_path.parent
    return {"run_dir": run_dir, "job": job_path, "logs": rank_logs(log_dir),
            "state": ckpt.load_checkpoint(run_dir / ckpt.BEST_NAME)}


@pytest.mark.slow
@pytest.mark.e2e
def test_two_processes_learn_and_only_rank_zero_logs_and_writes(reference):
    history = reference["state"]["history"]
    assert [row["epoch"] for row in history] == [1, 2, 3, 4]
    assert [row["step"] for row in history] == [8, 16, 24, 32]  # 8 global batches of 64 per epoch, not 16 of 32
    train_losses = [row["train_loss"] for row in history]
    assert train_losses == sorted(train_losses, reverse=True) and train_losses[-1] < train_losses[0] - 0.1
    assert history[-1]["ema_val_loss"] < history[0]["ema_val_loss"]
    assert reference["state"]["world_size"] == NPROC

    logs = reference["logs"]
    assert sorted(logs) == [0, 1]
    assert len(epoch_lines(logs[0])) == CONFIG.max_epochs
    assert epoch_lines(logs[1]) == []
    # Files: rank 0's alone (a second writer would leave a second result, temp files or a stale last.pt).
    assert sorted(p.name for p in reference["run_dir"].iterdir()) == sorted(
        ["job.json", ckpt.BEST_NAME, RESULT_NAME, LOSS_CURVE_NAME])
    result = json.loads((reference["run_dir"] / RESULT_NAME).read_text())
    assert result["world_size"] == NPROC and result["tracking"] == "disabled"
    assert result["sha256"] == ckpt.sha256_file(reference["run_dir"] / ckpt.BEST_NAME)


@pytest.mark.slow
@pytest.mark.e2e
def test_checkpoint_loads_and_matches_the_single_process_run(reference, data_root, tmp_path):
    """One process, same config: the global batch and every row's noise are the same, so only the order in which
    the two ranks' gradients are added differs — the histories agree to float rounding."""
    state = reference["state"]
    model = build_model(CONFIG.arch, dim=CONFIG.dim, size=CONFIG.model_size)
    model.load_state_dict(state["model_state_dict"])  # plain keys: DDP's "module." prefix never reaches the file
    with torch.no_grad():
        velocity = model(torch.randn(5, CONFIG.dim), torch.rand(5))
    assert velocity.shape == (5, CONFIG.dim) and torch.isfinite(velocity).all()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like each torchrun rank (OMP_NUM_THREADS=1)
    try:
        single = train(CONFIG, load_train_data(TrainJob.load(reference["job"])), tmp_path)
    finally:
        torch.set_num_threads(threads)
    assert single.global_step == state["global_step"]
    for one, two in zip(single.history, state["history"], strict=True):
        for key in HISTORY_KEYS:
            assert one[key] == pytest.approx(two[key], rel=1e-5, abs=1e-6), (one["epoch"], key)
    single_state = ckpt.load_checkpoint(single.checkpoint_path)
    for name, tensor in state["model_state_dict"].items():
        torch.testing.assert_close(single_state["model_state_dict"][name], tensor, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.e2e
def test_killed_two_process_run_resumes_bit_exactly(reference, data_root, tmp_path):
    job_path = write_job(data_root, "killed")
    run_dir = job_path.parent
    last = run_dir / ckpt.LAST_NAME
    process = torchrun(job_path, tmp_path / "logs-killed")
    # Kill once epoch 1 is validated and saved (best.pt exists): the kill lands in epoch 2, between last.pt writes.
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not (run_dir / ckpt.BEST_NAME).exists():
        assert process.poll() is None, process.communicate()[0][-4000:]
        assert time.monotonic() < deadline, "no best.pt appeared"
        time.sleep(0.02)
    ranks = descendants(process.pid)
    kill_all(process)
    process.communicate(timeout=60)
    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in ranks):
        assert time.monotonic() < deadline, "ranks still running after SIGKILL"
        time.sleep(0.05)
    # The resume point: last.pt once a step of epoch 2 was saved; best.pt if the kill came first (an improving
    # epoch removes the older last.pt rather than writing the same state twice).
    killed_at = ckpt.load_checkpoint(last if last.exists() else run_dir / ckpt.BEST_NAME)["global_step"]
    assert 8 <= killed_at < 32 and not (run_dir / RESULT_NAME).exists(), f"not killed mid-run: step {killed_at}"

    resumed_job = write_job(data_root, "killed", CONFIG.model_copy(update={"resume": True}))
    finish(torchrun(resumed_job, tmp_path / "logs-resumed"))
    assert "resumed from" in rank_logs(tmp_path / "logs-resumed")[0]

    state, ref = ckpt.load_checkpoint(run_dir / ckpt.BEST_NAME), reference["state"]
    assert state["global_step"] == ref["global_step"] == 32
    for key in ("model_state_dict", "ema_shadow"):
        assert state[key].keys() == ref[key].keys()
        for name, tensor in ref[key].items():
            assert torch.equal(state[key][name], tensor), f"{key}[{name}] differs after kill at step {killed_at}"
    for name, tensor in ref["optimizer_state_dict"]["state"][0].items():
        assert torch.equal(state["optimizer_state_dict"]["state"][0][name], tensor), name
    strip = [{key: row[key] for key in HISTORY_KEYS} for row in state["history"]]
    assert strip == [{key: row[key] for key in HISTORY_KEYS} for row in ref["history"]]
    assert state["best_loss"] == ref["best_loss"]
    assert not last.exists()


# --- without process groups ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,world_size", [(64, 2), (13, 2), (10, 4), (3, 4)])
def test_rank_blocks_concatenate_to_the_batch(n, world_size):
    blocks = [DistInfo(rank=rank, world_size=world_size).shard(n) for rank in range(world_size)]
    assert [row for block in blocks for row in range(n)[block]] == list(range(n))
    sizes = [block.stop - block.start for block in blocks]
    assert max(sizes) - min(sizes) <= 1


def test_batch_size_must_split_evenly_across_processes(tmp_path):
    data = TrainData(train=torch.randn(64, 8), val=torch.randn(8, 8),
                     normalizer=Normalizer(torch.zeros(8), torch.ones(8)))
    config = CONFIG.model_copy(update={"dim": 8, "batch_size": 63})
    with pytest.raises(ValueError, match=r"batch_size: 63 is not a multiple of the 2 training processes"):
        train(config, data, tmp_path, dist=DistInfo(rank=0, world_size=2))
    assert not any(tmp_path.iterdir())
