"""Training throughput: the project's ``train()`` vs a faithful copy of the seed's training loop.

    python benchmarks/bench_trainer_vs_reference.py                      # CPU, mlp small, batch 256, 3 repeats
    python benchmarks/bench_trainer_vs_reference.py --device cuda --arch dit --size base --compile   # GPU + MFU

Both sides train the same model (``build_model``, same init seed) on the same normalised synthetic SONAR-like data
with the same batch size, LR warmup, clipping and EMA decay. They run interleaved in one process (reference, project,
project, reference, ...) so machine load hits both alike; medians over the repeats are reported.

What is timed: steady-state training steps. Each side reports to a tracker every ``--log-every`` steps (the seed logs
to Wandb every 10 steps; the project's trainer calls its Tracker at the same interval) and the tracker stamps the
time. steps/s = (last logged step - first logged step) / (time between the two stamps) within one epoch. This
excludes, on both sides: setup, the first ``log_every`` steps (warm-up), validation and checkpoint writes. The seed's
DataLoader also pays a worker start-up at every epoch; that is excluded from steps/s too (which favours the
reference) and reported on its own as ``epoch_start_s``.

The reference (the seed's loop, ``../shared/seed``): a per-sample ``Dataset`` behind a 4-worker shuffling
``DataLoader``, a dict EMA updated per parameter (``shadow = decay * shadow + (1 - decay) * param``), default AdamW
(on the CPU that is the per-parameter for-loop implementation), ``LambdaLR`` warmup-cosine, ``clip_grad_norm_``,
``loss.item()`` every step and ``.item()`` of loss and grad norm at log steps.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time

import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, Dataset

from common import (add_common_args, command_line, finish_run, format_table, median, spread, start_run,
                    synthetic_train_data, write_result)
from flow_pipeline.config import TrainConfig
from flow_pipeline.core.models import build_model, count_parameters
from flow_pipeline.core.trainer import TrainData, train

NAME = "trainer_vs_reference"
# Dense bf16 tensor-core peaks (no sparsity), for MFU when --peak-tflops is not given.
KNOWN_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "A5000": 111.0, "L4": 121.0}


class StepClock:
    """Tracker that stamps the time of every training-metrics row: {global step: perf_counter seconds}.

    On CUDA both loops call ``.item()`` right before logging, so a stamp is taken after the device caught up.
    """

    def __init__(self) -> None:
        self.stamps: dict[int, float] = {}

    def log(self, metrics: dict[str, float], step: int) -> None:
        if "train/loss" in metrics:
            self.stamps[step] = time.perf_counter()

    def summary(self, **values) -> None:
        pass

    def finish(self, failed: bool = False) -> None:
        pass

    def steps_per_second(self) -> float:
        steps = sorted(self.stamps)
        if len(steps) < 2:
            raise ValueError("need at least two logged steps per epoch: raise --steps or lower --log-every")
        return (steps[-1] - steps[0]) / (self.stamps[steps[-1]] - self.stamps[steps[0]])


# ---------------------------------------------------------------------------------------------------------------
# The seed's loop (reference)
# ---------------------------------------------------------------------------------------------------------------


class SeedFlowDataset(Dataset):
    """The seed's per-sample dataset: one normalised (dim,) row per ``__getitem__``."""

    def __init__(self, embeddings: torch.Tensor):
        self.embeddings = embeddings

    def __len__(self) -> int:
        return self.embeddings.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.embeddings[index]


class SeedEMA:
    """The seed's EMAModel: a dict of shadow tensors, rebuilt per parameter with out-of-place arithmetic."""

    def __init__(self, model: torch.nn.Module, decay: float = 0.9999):
        self.decay = decay
        self.shadow = {name: p.data.clone() for name, p in model.named_parameters() if p.requires_grad}

    def update(self, model: torch.nn.Module) -> None:
        for name, param in model.named_parameters():
            if param.requires_grad and name in self.shadow:
                self.shadow[name] = self.decay * self.shadow[name] + (1 - self.decay) * param.data


def seed_cosine_schedule(optimizer, num_warmup_steps: int, num_training_steps: int, min_lr_ratio: float = 0.1):
    """The seed's get_cosine_schedule_with_warmup (warmup from LR 0, cosine floored at min_lr_ratio)."""

    def lr_lambda(current_step: int) -> float:
        if current_step < num_warmup_steps:
            return float(current_step) / float(max(1, num_warmup_steps))
        progress = float(current_step - num_warmup_steps) / float(max(1, num_training_steps - num_warmup_steps))
        return max(min_lr_ratio, 0.5 * (1.0 + math.cos(math.pi * progress)))

    return LambdaLR(optimizer, lr_lambda)


def run_reference(data: TrainData, args: argparse.Namespace, device: torch.device) -> dict:
    """One epoch of the seed's loop; returns steps/s (from the log stamps) and the DataLoader epoch start cost."""
    train_z = data.normalizer.normalize(data.train.float())  # the seed's dataset holds normalised rows on the CPU
    torch.manual_seed(args.seed)
    model = build_model(args.arch, dim=train_z.shape[1], size=args.size).to(device)
    ema = SeedEMA(model, decay=0.9999)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    loader = DataLoader(SeedFlowDataset(train_z), batch_size=args.batch_size, shuffle=True,
                        num_workers=args.workers, drop_last=True,
                        generator=torch.Generator().manual_seed(args.seed))
    scheduler = seed_cosine_schedule(optimizer, args.warmup_steps, len(loader))
    clock = StepClock()
    global_step, epoch_loss = 0, 0.0
    model.train()
    epoch_started = time.perf_counter()
    first_batch_s = None
    for x1 in loader:
        if first_batch_s is None:
            first_batch_s = time.perf_counter() - epoch_started  # worker start-up + first batch
        x1 = x1.to(device)
        x0 = torch.randn_like(x1)
        t = torch.rand(x1.shape[0], device=device)
        x_t = (1 - t.unsqueeze(1)) * x0 + t.unsqueeze(1) * x1
        v_target = x1 - x0
        v_pred = model(x_t, t)
        loss = F.mse_loss(v_pred, v_target)
        optimizer.zero_grad()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=args.grad_clip)
        optimizer.step()
        scheduler.step()
        ema.update(model)
        epoch_loss += loss.item()
        global_step += 1
        if global_step % args.log_every == 0:
            clock.log({"train/loss": loss.item(), "train/grad_norm": grad_norm.item(),
                       "train/lr": scheduler.get_last_lr()[0], "epoch": 1}, step=global_step)
    return {"steps_per_s": clock.steps_per_second(), "epoch_start_s": first_batch_s,
            "final_loss": epoch_loss / max(1, global_step), "steps": global_step}


# ---------------------------------------------------------------------------------------------------------------
# The project's trainer
# ---------------------------------------------------------------------------------------------------------------


def project_config(args: argparse.Namespace, dim: int) -> TrainConfig:
    return TrainConfig(arch=args.arch, flow="icfm", model_size=args.size, dim=dim, max_epochs=1,
                       batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
                       grad_clip=args.grad_clip, ema_decay=0.9999, seed=args.seed, device=args.device,
                       compile=args.compile, log_every=args.log_every, patience=1000)


def run_project(data: TrainData, args: argparse.Namespace) -> dict:
    """One epoch of ``flow_pipeline.core.trainer.train``; steps/s from the log stamps, plus the whole call's wall."""
    clock = StepClock()
    config = project_config(args, data.train.shape[1])
    with tempfile.TemporaryDirectory(prefix="bench-trainer-") as run_dir:
        started = time.perf_counter()
        result = train(config, data, run_dir, clock)
        wall = time.perf_counter() - started
    return {"steps_per_s": clock.steps_per_second(), "train_call_s": wall,
            "final_loss": result.history[-1]["train_loss"], "steps": result.global_step}


# ---------------------------------------------------------------------------------------------------------------
# FLOPs and MFU
# ---------------------------------------------------------------------------------------------------------------


def flops_per_step(args: argparse.Namespace, dim: int, device: torch.device) -> dict:
    """Model FLOPs of one training step (forward + backward), counted by FlopCounterMode and estimated as
    6 x params x batch (exact for an MLP's matmuls; a token model uses each weight once per token, so there
    the count is the number to trust)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model(args.arch, dim=dim, size=args.size).to(device)
    x = torch.randn(args.batch_size, dim, device=device)
    t = torch.rand(args.batch_size, device=device)
    counter = FlopCounterMode(display=False)
    with counter:
        model(x, t).float().pow(2).mean().backward()
    params = count_parameters(model)
    return {"counted": int(counter.get_total_flops()), "six_n_b": 6 * params * args.batch_size, "params": params}


def peak_flops(args: argparse.Namespace, device: torch.device) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in KNOWN_PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12
    return None


# ---------------------------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="mlp", choices=("mlp", "dit", "unet"))
    parser.add_argument("--size", default="small", choices=("tiny", "small", "base"))
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=80, help="training steps per epoch (one epoch per timed run)")
    parser.add_argument("--n-val", type=int, default=512, help="validation rows (the project's train() validates)")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--grad-clip", type=float, default=1.0)
    parser.add_argument("--workers", type=int, default=4, help="the reference DataLoader's workers (the seed's 4)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--compile", action="store_true", help="torch.compile the project's model (not the seed's)")
    parser.add_argument("--peak-tflops", type=float, default=0.0,
                        help="accelerator peak for MFU (default: known bf16 dense peak of the CUDA device)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--skip-reference", action="store_true", help="time the project's trainer only")
    add_common_args(parser, repeats=3)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available on this machine")
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = start_run(args)
    n_train = args.steps * args.batch_size
    data = synthetic_train_data(n_train, args.n_val, seed=0)
    flops = flops_per_step(args, data.train.shape[1], device)

    runs: dict[str, list[dict]] = {"reference": [], "project": []}
    for repeat in range(args.repeats):
        order = ["reference", "project"] if repeat % 2 == 0 else ["project", "reference"]  # ABBA: cancels drift
        for side in order:
            if side == "reference" and args.skip_reference:
                continue
            result = run_reference(data, args, device) if side == "reference" else run_project(data, args)
            runs[side].append(result)
            print(f"repeat {repeat + 1}/{args.repeats} {side:9s}: {result['steps_per_s']:.2f} steps/s", flush=True)
    machine = finish_run(machine)

    peak = peak_flops(args, device)
    rows = []
    for side, results in runs.items():
        if not results:
            continue
        rate = median([r["steps_per_s"] for r in results])
        row = {"loop": side, "steps/s": rate, "ms/step": 1000 / rate,
               "rows/s": rate * args.batch_size, "model GFLOP/s": rate * flops["counted"] / 1e9}
        if peak:
            row["MFU %"] = 100 * rate * flops["counted"] / peak
        if side == "reference":
            row["epoch start s"] = median([r["epoch_start_s"] for r in results])
        rows.append(row)
    summary = {row["loop"]: row for row in rows}
    ratio = None
    if "reference" in summary:
        ratio = summary["project"]["steps/s"] / summary["reference"]["steps/s"]
    # Ratio per repeat pair: both measured back to back, so the pairs are robust to slow drifts in load.
    paired = [p["steps_per_s"] / r["steps_per_s"] for p, r in zip(runs["project"], runs["reference"])]

    columns = ["loop", "steps/s", "ms/step", "rows/s", "model GFLOP/s"] + (["MFU %"] if peak else []) + ["epoch start s"]
    print()
    print(f"{args.arch}-{args.size} ({flops['params']:,} params), batch {args.batch_size}, {args.steps} steps/epoch, "
          f"{args.repeats} repeats, device {args.device}{' + compile' if args.compile else ''}; "
          f"load {machine['loadavg_start'][0]:.2f} -> {machine['loadavg_end'][0]:.2f}")
    print(format_table(rows, columns))
    if ratio is not None:
        print(f"\nproject / reference steps/s: {ratio:.2f}x (median of medians); per repeat pair: "
              + ", ".join(f"{p:.2f}" for p in paired))
    path = write_result(NAME, {
        "command": command_line(), "machine": machine, "args": vars(args), "flops_per_step": flops,
        "peak_flops": peak, "runs": runs, "summary": summary, "ratio_project_over_reference": ratio,
        "paired_ratios": paired, "paired_ratio_spread": spread(paired) if paired else None,
        "timed": "steady-state training steps between the first and last log stamp of one epoch; "
                 "validation, checkpoints, setup and the first log interval excluded on both sides",
    }, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
