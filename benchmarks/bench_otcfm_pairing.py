"""OT-CFM's exact minibatch pairing as a share of the training step, and a prototype that hides it.

    python benchmarks/bench_otcfm_pairing.py                          # mlp small + dit small, batch 256 and 1024
    python benchmarks/bench_otcfm_pairing.py --models mlp-small --batches 256

For each model and batch size, interleaved: the trainer's step (data, flow.sample, forward, backward, clip, fused
AdamW, LR schedule, EMA) with ``icfm`` and with ``otcfm``, and ``exact_ot_permutation`` alone (split into its
float64 ``cdist`` and scipy's ``linear_sum_assignment``). Share = pairing / otcfm step. Goal: <= 15% at batch 256.

Prototype (``prefetch`` rows): the assignment of batch k+1 is solved in a worker thread while step k runs (draw the
next batch first, submit its pairing, then compute the current step with the pairing submitted one step earlier).
It only helps if ``linear_sum_assignment`` releases the GIL, which this script checks (see :func:`gil_check`).
"""

from __future__ import annotations

import argparse
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from common import (add_common_args, command_line, finish_run, format_table, median, start_run, synthetic_train_data,
                    write_result)
from flow_pipeline.core.ema import EMA
from flow_pipeline.core.flows import exact_ot_permutation, get_flow
from flow_pipeline.core.models import build_model, count_parameters
from flow_pipeline.core.schedule import warmup_cosine_schedule

NAME = "otcfm_pairing"


class StepRunner:
    """The trainer's step with one model, fused AdamW, warmup-cosine LR and EMA; batches drawn from ``train_z``."""

    def __init__(self, arch: str, size: str, train_z: torch.Tensor, batch_size: int, seed: int = 42):
        torch.manual_seed(seed)
        self.model = build_model(arch, dim=train_z.shape[1], size=size)
        self.params = count_parameters(self.model)
        self.ema = EMA(self.model)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3, weight_decay=0.01, fused=True)
        self.scheduler = warmup_cosine_schedule(self.optimizer, 20, 10_000)
        self.train_z, self.batch_size = train_z, batch_size
        self.generator = torch.Generator().manual_seed(seed + 1)
        self.icfm, self.otcfm = get_flow("icfm"), get_flow("otcfm")

    def draw(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_0, x_1, t) of one batch: random rows (index selection, as the trainer), noise, times."""
        rows = torch.randint(self.train_z.shape[0], (self.batch_size,), generator=self.generator)
        x_1 = self.train_z[rows]
        x_0 = torch.randn(x_1.shape, generator=self.generator)
        t = torch.rand(x_1.shape[0], generator=self.generator)
        return x_0, x_1, t

    def update(self, path) -> None:
        loss = F.mse_loss(self.model(path.x_t, path.t), path.target)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        loss.item()  # the trainer's per-step finite check on the CPU
        self.optimizer.step()
        self.scheduler.step()
        self.ema.update(self.model)

    def step(self, flow_name: str) -> None:
        """One synchronous step; with ``otcfm`` the pairing runs inside flow.sample on the critical path."""
        x_0, x_1, t = self.draw()
        flow = self.otcfm if flow_name == "otcfm" else self.icfm
        self.update(flow.sample(x_0, x_1, t, generator=self.generator))

    def prefetched_steps(self, n: int, pool: ThreadPoolExecutor) -> float:
        """``n`` otcfm steps whose pairing was solved in ``pool`` during the previous step; returns seconds.

        With the permutation known, the OT-CFM path is the ICFM path on (x_0, x_1[perm]).
        """
        pending = self.draw()
        future = pool.submit(exact_ot_permutation, pending[0], pending[1])
        start = time.perf_counter()
        for _ in range(n):
            x_0, x_1, t = pending
            perm = future.result()
            pending = self.draw()  # the next batch, whose pairing overlaps this step's forward/backward
            future = pool.submit(exact_ot_permutation, pending[0], pending[1])
            self.update(self.icfm.sample(x_0, x_1[perm], t, generator=self.generator))
        elapsed = time.perf_counter() - start
        future.result()
        return elapsed


def time_steps(fn, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n


def pairing_parts(x_0: torch.Tensor, x_1: torch.Tensor) -> tuple[float, float, float]:
    """Seconds of (exact_ot_permutation, its cdist part, its linear_sum_assignment part) for one batch."""
    start = time.perf_counter()
    exact_ot_permutation(x_0, x_1)
    total = time.perf_counter() - start
    start = time.perf_counter()
    cost = torch.cdist(x_0.double(), x_1.double()).pow_(2).numpy()
    cdist = time.perf_counter() - start
    start = time.perf_counter()
    linear_sum_assignment(cost)
    return total, cdist, time.perf_counter() - start


def longest_stall(work) -> tuple[float, float]:
    """(seconds ``work()`` took in a worker thread, longest gap between two iterations of a pure-Python loop in the
    main thread meanwhile)."""
    done = threading.Event()
    worker = threading.Thread(target=lambda: (work(), done.set()))
    started = last = time.perf_counter()
    worker.start()
    longest = 0.0
    while not done.is_set():
        now = time.perf_counter()
        longest, last = max(longest, now - last), now
    worker.join()
    return time.perf_counter() - started, longest


def gil_check(n: int = 1024) -> dict:
    """Does ``linear_sum_assignment`` release the GIL? Longest stall of the main thread while a worker thread solves
    an n x n assignment, as a fraction of the solve time.

    If the solve held the GIL, the main thread could not run a single bytecode until it ended: stall ~ 1. If it
    releases the GIL, the main thread only waits for the OS scheduler (a few ms, more under load): stall << 1.
    Unlike a throughput ratio this does not depend on whether a core is free. Control: ``sum(range(k))``, a C loop
    that holds the GIL, must show a stall near 1.
    """
    cost = np.random.default_rng(0).random((n, n))
    solve_s, solve_stall = longest_stall(lambda: linear_sum_assignment(cost))
    control_s, control_stall = longest_stall(lambda: sum(range(20_000_000)))
    return {"n": n, "solve_s": solve_s, "solve_stall_s": solve_stall, "solve_stall_fraction": solve_stall / solve_s,
            "control_s": control_s, "control_stall_fraction": control_stall / control_s,
            "gil_released": solve_stall / solve_s < 0.5 <= control_stall / control_s}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp-small,dit-small", help="comma-separated arch-size pairs")
    parser.add_argument("--batches", default="256,1024", help="comma-separated batch sizes")
    parser.add_argument("--steps", type=int, default=4, help="steps per variant per round")
    parser.add_argument("--no-prefetch", action="store_true", help="skip the background-pairing prototype")
    add_common_args(parser, repeats=3)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    machine = start_run(args)
    models = [tuple(m.split("-")) for m in args.models.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    data = synthetic_train_data(max(batches) * 8, 2, seed=0)
    train_z = data.normalizer.normalize(data.train)
    gil = gil_check()
    print(f"GIL check: a background {gil['n']}x{gil['n']} solve ({1000 * gil['solve_s']:.0f} ms) stalls the main "
          f"thread {100 * gil['solve_stall_fraction']:.0f}% of its time (control holding the GIL: "
          f"{100 * gil['control_stall_fraction']:.0f}%) -> GIL {'released' if gil['gil_released'] else 'held'}")

    rows, raw = [], []
    pool = ThreadPoolExecutor(max_workers=1)
    for arch, size in models:
        for batch in batches:
            runner = StepRunner(arch, size, train_z, batch)
            runner.step("icfm"), runner.step("otcfm")  # warm-up
            timings = {"icfm": [], "otcfm": [], "prefetch": [], "pairing": [], "cdist": [], "lsa": []}
            for _ in range(args.repeats):
                timings["icfm"].append(time_steps(lambda: runner.step("icfm"), args.steps))
                timings["otcfm"].append(time_steps(lambda: runner.step("otcfm"), args.steps))
                if not args.no_prefetch:
                    timings["prefetch"].append(runner.prefetched_steps(args.steps, pool) / args.steps)
                for _ in range(args.steps):
                    x_0, x_1, _t = runner.draw()
                    total, cdist, lsa = pairing_parts(x_0, x_1)
                    timings["pairing"].append(total), timings["cdist"].append(cdist), timings["lsa"].append(lsa)
            med = {key: 1000 * median(values) for key, values in timings.items() if values}
            row = {"model": f"{arch}-{size}", "params": runner.params, "batch": batch,
                   "icfm step ms": med["icfm"], "otcfm step ms": med["otcfm"], "pairing ms": med["pairing"],
                   "cdist ms": med["cdist"], "lsa ms": med["lsa"],
                   "pairing / otcfm step %": 100 * med["pairing"] / med["otcfm"],
                   "otcfm - icfm %": 100 * (med["otcfm"] - med["icfm"]) / med["otcfm"]}
            if "prefetch" in med:
                row["prefetch step ms"] = med["prefetch"]
                row["prefetch saves %"] = 100 * (med["otcfm"] - med["prefetch"]) / med["otcfm"]
            rows.append(row)
            raw.append({"model": f"{arch}-{size}", "batch": batch, "seconds": timings})
            print(f"{arch}-{size} batch {batch}: pairing {med['pairing']:.1f} ms = "
                  f"{row['pairing / otcfm step %']:.1f}% of the otcfm step ({med['otcfm']:.1f} ms)", flush=True)
    pool.shutdown()
    machine = finish_run(machine)

    print(f"\nload {machine['loadavg_start'][0]:.2f} -> {machine['loadavg_end'][0]:.2f}; medians of "
          f"{args.repeats} rounds x {args.steps} steps")
    columns = ["model", "batch", "icfm step ms", "otcfm step ms", "pairing ms", "cdist ms", "lsa ms",
               "pairing / otcfm step %", "otcfm - icfm %"]
    if not args.no_prefetch:
        columns += ["prefetch step ms", "prefetch saves %"]
    print(format_table(rows, columns))
    path = write_result(NAME, {"command": command_line(), "machine": machine, "args": vars(args), "gil_check": gil,
                               "table": rows, "raw": raw}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
