"""Where a training step's time goes: data, forward+backward, clipping, optimizer, LR schedule, EMA, logging.

    python benchmarks/bench_step_breakdown.py                 # mlp small, batch 256, 150 timed steps
    python benchmarks/bench_step_breakdown.py --arch dit

An instrumented copy of the project trainer's inner loop (flow_pipeline/core/trainer.py), built from the same
components: EpochBatchSampler index selection, flow.sample, the model, fused AdamW, the trainer's clipping, LambdaLR
warmup-cosine, EMA.update every ``--ema-every`` steps, the per-step finite check the trainer does on the CPU and the
tracker call with ``.item()`` every ``--log-every`` steps. Every section is timed with perf_counter; on the CPU
every op is synchronous, so a section's time is its own (this script refuses CUDA, where it would not be).

Goal (issue 7): everything but forward+backward and the optimizer step is at most 5% of the step.

A second table times what the trainer does once per epoch (validating raw and EMA weights, writing best.pt
or last.pt) and its share of an epoch. A third table times the seed's versions of the replaced pieces in the same process, on the same model, for
comparison: its dict EMA, default (for-loop) AdamW and a 4-worker DataLoader over a per-sample Dataset.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from bench_trainer_vs_reference import SeedEMA, SeedFlowDataset
from common import (add_common_args, command_line, finish_run, format_table, median, start_run, synthetic_train_data,
                    time_calls, write_result)
from flow_pipeline.config import TrainConfig
from flow_pipeline.core.data.batching import EpochBatchSampler, augment
from flow_pipeline.core.ema import EMA
from flow_pipeline.core.flows import get_flow
from flow_pipeline.core.models import build_model, count_parameters
from flow_pipeline.core.schedule import warmup_cosine_schedule
from flow_pipeline.core.tracking import NullTracker

NAME = "step_breakdown"
SECTIONS = ("data", "forward+backward", "clip", "finite check", "optimizer", "lr schedule", "ema", "logging")
CORE = ("forward+backward", "optimizer")


def clip(model: torch.nn.Module, max_norm: float, mode: str) -> torch.Tensor:
    """Gradient clipping; returns the total grad norm.

    ``trainer``: what the trainer does on the CPU: the norm, then a rescale only when the norm is over ``max_norm``
    (``clip_grad_norm_``'s coefficient, bit-identical gradients). ``clip_grad_norm_``: the plain call, which always
    rescales every gradient (by exactly 1.0 below the limit) so that CUDA never has to wait for the norm.
    """
    if mode == "clip_grad_norm_":
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads)
    if (max_norm / (total + 1e-6)).item() < 1.0:  # clip_grad_norm_'s very coefficient is below 1
        torch.nn.utils.clip_grads_with_norm_(model.parameters(), max_norm, total)
    return total


def instrumented_steps(train_z: torch.Tensor, args: argparse.Namespace) -> tuple[dict[str, list[float]], list[float]]:
    """Run ``args.warmup + args.steps`` steps of the trainer's loop; returns per-section seconds of the timed steps
    and the total wall of each timed step (perf_counter around the whole step)."""
    torch.manual_seed(args.seed)
    model = build_model(args.arch, dim=train_z.shape[1], size=args.size)
    ema = EMA(model, decay=0.9999)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, fused=True)
    total_steps = args.warmup + args.steps
    scheduler = warmup_cosine_schedule(optimizer, warmup_steps=20, total_steps=total_steps)
    sampler = EpochBatchSampler(train_z.shape[0], args.batch_size, args.seed)
    flow = get_flow(args.flow)
    generator = torch.Generator().manual_seed(args.seed + 1)
    tracker = NullTracker()
    autocast = nullcontext()
    sections: dict[str, list[float]] = defaultdict(list)
    step_walls: list[float] = []

    batches = iter(())
    for step in range(1, total_steps + 1):
        times = {}
        t0 = time.perf_counter()
        # --- data: next index batch (a new epoch's randperm when one ends), gather, noise, times, path ----------
        rows = next(batches, None)
        if rows is None:
            batches = sampler.epoch_batches("cpu")
            rows = next(batches)
        x_1 = augment(train_z[rows], "none", generator)
        x_0 = torch.randn(x_1.shape, generator=generator)
        t = torch.rand(x_1.shape[0], generator=generator)
        path = flow.sample(x_0, x_1, t, generator=generator)
        t1 = time.perf_counter()
        # --- forward + backward (zero_grad included) ----------------------------------------------------------
        with autocast:
            prediction = model(path.x_t, path.t)
        loss = F.mse_loss(prediction.float(), path.target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t2 = time.perf_counter()
        grad_norm = clip(model, 1.0, args.clip_mode)
        t3 = time.perf_counter()
        if not (math.isfinite(loss.item()) and math.isfinite(grad_norm.item())):  # the trainer's CPU check
            raise RuntimeError("diverged")
        step_lr = optimizer.param_groups[0]["lr"]
        t4 = time.perf_counter()
        optimizer.step()
        t5 = time.perf_counter()
        scheduler.step()
        t6 = time.perf_counter()
        if step % args.ema_every == 0:  # the trainer's ema_every
            ema.update(model, steps=args.ema_every)
        t7 = time.perf_counter()
        if step % args.log_every == 0:
            tracker.log({"train/loss": loss.item(), "train/grad_norm": grad_norm.item(), "train/lr": step_lr,
                         "epoch": 1}, step=step)
        t8 = time.perf_counter()
        if step > args.warmup:
            for name, (a, b) in zip(SECTIONS, ((t0, t1), (t1, t2), (t2, t3), (t3, t4), (t4, t5), (t5, t6),
                                               (t6, t7), (t7, t8))):
                sections[name].append(b - a)
            step_walls.append(t8 - t0)
    return sections, step_walls


def epoch_end_costs(train_z: torch.Tensor, val_z: torch.Tensor, args: argparse.Namespace) -> list[dict]:
    """Median seconds of what the trainer does once per epoch: validate the raw and the EMA weights on ``val_z``
    (the trainer's ``validate``), then write one checkpoint (``save_checkpoint``: atomic, fsynced, hashed) with the
    trainer's checkpoint content (model, EMA, optimizer state, ...): best.pt in an improving epoch, last.pt in any
    other (the trainer never writes the same state to both)."""
    from flow_pipeline.core import checkpoint as ckpt
    from flow_pipeline.core.distributed import DistInfo
    from flow_pipeline.core.trainer import validate

    torch.manual_seed(args.seed)
    model = build_model(args.arch, dim=train_z.shape[1], size=args.size)
    ema_model = build_model(args.arch, dim=train_z.shape[1], size=args.size).eval()
    ema = EMA(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, fused=True)
    model(train_z[:8], torch.rand(8)).pow(2).mean().backward()
    optimizer.step()  # creates the optimizer state that the checkpoint carries
    flow, dist = get_flow(args.flow), DistInfo()

    def state() -> dict:
        return {"model_state_dict": model.state_dict(), "ema_shadow": ema.shadow_dict(), "ema_state": ema.state_dict(),
                "optimizer_state_dict": optimizer.state_dict(), "epoch": 1, "best_loss": 1.0}

    def validate_ema():
        ema.copy_to(ema_model)
        validate(ema_model, flow, val_z, args.batch_size, 0, nullcontext(), dist)

    with tempfile.TemporaryDirectory(prefix="bench-epoch-end-") as directory:
        parts = {"validate (raw weights)": lambda: validate(model, flow, val_z, args.batch_size, 0, nullcontext(), dist),
                 "validate (EMA weights)": validate_ema,
                 "save best.pt or last.pt": lambda: ckpt.save_checkpoint(state(), Path(directory) / "last.pt")}
        rows = [{"part": name, "median s": median(time_calls(fn, 3, warmup=1))} for name, fn in parts.items()]
        size = (Path(directory) / "last.pt").stat().st_size
    rows.append({"part": "TOTAL per epoch", "median s": sum(row["median s"] for row in rows)})
    return rows, size


def seed_components(train_z: torch.Tensor, args: argparse.Namespace) -> list[dict]:
    """Median ms of the seed's EMA, default AdamW step and DataLoader batch vs the project's replacements."""
    torch.manual_seed(args.seed)
    model = build_model(args.arch, dim=train_z.shape[1], size=args.size)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    n = args.micro_repeats
    seed_ema, project_ema = SeedEMA(model), EMA(model)
    project_ema.update(model)  # the first update is a copy; time the blending ones
    adamw_default = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    adamw_fused = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, fused=True)

    sampler = EpochBatchSampler(train_z.shape[0], args.batch_size, args.seed)
    sampler_iter = sampler.epoch_batches()

    def next_index_batch():
        nonlocal sampler_iter
        rows = next(sampler_iter, None)
        if rows is None:
            sampler_iter = sampler.epoch_batches()
            rows = next(sampler_iter)
        return train_z[rows]

    rows = [compare("EMA update", "dict loop (seed)", lambda: seed_ema.update(model), "foreach lerp (EMA)",
                    lambda: project_ema.update(model), n),
            compare("AdamW step", "default for-loop (seed)", adamw_default.step, "fused=True", adamw_fused.step, n)]
    # Not interleaved: the DataLoader's workers keep prefetching in the background and would slow down whatever
    # else is timed while they exist. So: index batches, then the loader (alive only for its own timing).
    project_s = time_calls(next_index_batch, 3 * n, warmup=2)
    loader = DataLoader(SeedFlowDataset(train_z), batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                        drop_last=True, persistent_workers=True)
    loader_iter = iter(loader)
    next(loader_iter)  # worker start-up is not part of the per-batch cost

    def next_loader_batch():
        nonlocal loader_iter
        batch = next(loader_iter, None)
        if batch is None:
            loader_iter = iter(loader)
            batch = next(loader_iter)
        return batch

    seed_s = time_calls(next_loader_batch, 3 * n, warmup=2)
    seed_ms, project_ms = 1000 * median(seed_s), 1000 * median(project_s)
    rows.append({"component": "batch of rows", "seed": f"DataLoader {args.workers} workers (seed)", "seed ms": seed_ms,
                 "project": "EpochBatchSampler + index", "project ms": project_ms, "speed-up": seed_ms / project_ms})
    del loader_iter, loader  # shuts the persistent workers down
    return rows


def compare(what: str, seed_name: str, seed_fn, project_name: str, project_fn, calls: int) -> dict:
    """Median ms per call of a seed component and its replacement, timed in 3 interleaved rounds."""
    seed_s, project_s = [], []
    for _ in range(3):
        seed_s += time_calls(seed_fn, calls, warmup=2)
        project_s += time_calls(project_fn, calls, warmup=2)
    seed_ms, project_ms = 1000 * median(seed_s), 1000 * median(project_s)
    return {"component": what, "seed": seed_name, "seed ms": seed_ms, "project": project_name,
            "project ms": project_ms, "speed-up": seed_ms / project_ms}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="mlp", choices=("mlp", "dit", "unet"))
    parser.add_argument("--size", default="small", choices=("tiny", "small", "base"))
    parser.add_argument("--flow", default="icfm", choices=("icfm", "otcfm", "fm", "vp"))
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--n-train", type=int, default=8192, help="training rows (an epoch boundary every n/batch)")
    parser.add_argument("--n-val", type=int, default=1200, help="validation rows for the per-epoch costs")
    parser.add_argument("--steps-per-epoch", type=int, default=37,
                        help="epoch length for the per-epoch share (37: the default 12k-row synthetic dataset)")
    parser.add_argument("--steps", type=int, default=150, help="timed steps")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--clip-mode", default="trainer", choices=("trainer", "clip_grad_norm_"),
                        help="trainer: norm, rescale only above the limit; clip_grad_norm_: always rescale")
    parser.add_argument("--ema-every", type=int, default=TrainConfig.model_fields["ema_every"].default,
                        help="EMA update interval in steps (the trainer's ema_every)")
    parser.add_argument("--workers", type=int, default=4, help="the seed DataLoader's workers in the second table")
    parser.add_argument("--micro-repeats", type=int, default=20, help="calls per round in the second table")
    parser.add_argument("--skip-seed-components", action="store_true")
    parser.add_argument("--seed", type=int, default=42)
    add_common_args(parser, repeats=1)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    machine = start_run(args)
    data = synthetic_train_data(args.n_train, args.n_val, seed=0)
    train_z, val_z = data.normalizer.normalize(data.train), data.normalizer.normalize(data.val)
    all_sections: dict[str, list[float]] = defaultdict(list)
    walls: list[float] = []
    for _ in range(args.repeats):
        sections, step_walls = instrumented_steps(train_z, args)
        for name, values in sections.items():
            all_sections[name] += values
        walls += step_walls

    # Means, not medians, so the sections add up to the mean step (logging and epoch starts are periodic spikes).
    mean_ms = {name: 1000 * sum(v) / len(v) for name, v in all_sections.items()}
    step_ms = sum(mean_ms.values())
    rows = [{"section": name, "mean ms": mean_ms[name], "median ms": 1000 * median(all_sections[name]),
             "share %": 100 * mean_ms[name] / step_ms} for name in SECTIONS]
    overhead = sum(mean_ms[name] for name in SECTIONS if name not in CORE)
    rows.append({"section": "TOTAL (sum of sections)", "mean ms": step_ms, "median ms": 1000 * median(walls),
                 "share %": 100.0})
    overhead_share = 100 * overhead / step_ms
    epoch_rows, checkpoint_bytes = epoch_end_costs(train_z, val_z, args)
    seed_rows = [] if args.skip_seed_components else seed_components(train_z, args)
    machine = finish_run(machine)
    step_s = step_ms / 1000
    for row in epoch_rows:
        row["in steps"] = row["median s"] / step_s
        row["share of epoch %"] = 100 * row["median s"] / (args.steps_per_epoch * step_s + epoch_rows[-1]["median s"])

    model_params = count_parameters(build_model(args.arch, size=args.size))
    print(f"\n{args.arch}-{args.size} ({model_params:,} params), {args.flow}, clip {args.clip_mode}, batch {args.batch_size}, "
          f"{args.steps * args.repeats} timed steps; load {machine['loadavg_start'][0]:.2f} -> "
          f"{machine['loadavg_end'][0]:.2f}")
    print(format_table(rows, ["section", "mean ms", "median ms", "share %"]))
    print(f"\neverything but forward+backward and optimizer: {overhead:.2f} ms = {overhead_share:.2f}% of the step "
          f"(goal <= 5%)")
    print(f"\nonce per epoch ({args.n_val} validation rows, checkpoint {checkpoint_bytes / 1e6:.0f} MB each); share of "
          f"an epoch of {args.steps_per_epoch} steps (12k synthetic rows, 80% train, batch 256):")
    print(format_table(epoch_rows, ["part", "median s", "in steps", "share of epoch %"]))
    if seed_rows:
        print("\nseed components vs their replacements (median ms per call, interleaved):")
        print(format_table(seed_rows, ["component", "seed", "seed ms", "project", "project ms", "speed-up"]))
    path = write_result(NAME, {
        "command": command_line(), "machine": machine, "args": vars(args), "params": model_params,
        "sections_ms": {name: [1000 * v for v in values] for name, values in all_sections.items()},
        "step_wall_ms": [1000 * w for w in walls], "table": rows, "overhead_ms": overhead,
        "overhead_share_pct": overhead_share, "seed_components": seed_rows, "epoch_end": epoch_rows,
        "checkpoint_bytes": checkpoint_bytes,
    }, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
