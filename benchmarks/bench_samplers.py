"""ODE solvers at the default n = 5 x dim: NFE, wall time, and how far each moves the metrics from dopri5.

    python benchmarks/bench_samplers.py --checkpoint <best.pt> --splits <splits dir> \
        --samplers dopri5 rk4:10 midpoint:20 euler:40 midpoint:10

Every sampler starts from the same noise (seed 0) and is scored against the same prepared real side (test split,
the checkpoint run's training rows), so the differences are the solvers' alone. For each it prints NFE, seconds,
ranking KID ± se with its bootstrap CI, precision, coverage and FD∞, and the change of each from the first sampler
in units of the first sampler's KID standard error. Also times one function evaluation at a few batch sizes.
Results are appended to benchmarks/results/bench_samplers.json after every sampler (the run is long on a CPU).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from common import add_run_arguments, command_line, finish_run, format_table, start_run, write_result
from flow_pipeline.core.metrics.distances import TrainSpace
from flow_pipeline.core.metrics.real_side import RealSide
from flow_pipeline.core.sampling import initial_noise, velocity_field
from flow_pipeline.core.data.split_set import load_saved_splits
from flow_pipeline.core.checkpoint import load_ema_model
from flow_pipeline.evaluation.evaluate import run_training_rows, saved_train_config
from flow_pipeline.evaluation.samplers import SamplerSpec, draw_samples

NAME = "bench_samplers"
SHOWN = ("ranking_kid", "kid_se", "kid_ci_low", "kid_ci_high", "precision", "recall", "coverage", "fd_inf")


def time_batch_sizes(ema, sizes, repeats: int = 1) -> list[dict]:
    """Seconds per model evaluation of 5,120 rows when they are fed ``size`` rows at a time."""
    v = velocity_field(ema.model, ema.flow)
    x = initial_noise(max(sizes), ema.config.dim, 0)
    rows = []
    with torch.inference_mode():
        for size in sizes:
            best = float("inf")
            for _ in range(repeats):
                started = time.perf_counter()
                for batch in x.split(size):
                    v(batch, 0.5)
                best = min(best, time.perf_counter() - started)
            rows.append({"batch_size": size, "seconds_per_nfe_5120_rows": round(best, 3)})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--splits", required=True, help="directory of the saved splits the run trained on")
    parser.add_argument("--samplers", nargs="+", default=["dopri5", "rk4:10", "midpoint:20", "euler:40"])
    parser.add_argument("--n", type=int, default=5120)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--batch-sizes", type=int, nargs="*", default=[256, 1024, 5120])
    add_run_arguments(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    machine = start_run(args)
    ema = load_ema_model(args.checkpoint, saved_train_config)
    splits = load_saved_splits(args.splits)
    train = run_training_rows(splits.train, ema.config)
    summary = {"command": command_line(), "checkpoint": args.checkpoint, "n": args.n, "threads": args.threads,
               "batch_sizes": time_batch_sizes(ema, args.batch_sizes), "rows": []}
    print(format_table(summary["batch_sizes"], ["batch_size", "seconds_per_nfe_5120_rows"]), flush=True)
    started = time.perf_counter()
    side = RealSide.prepare(train, np.asarray(splits.test), args.n, train_space=TrainSpace.fit(train))
    summary["prepare_seconds"] = round(time.perf_counter() - started, 1)
    first = None
    for text in args.samplers:
        drawn = draw_samples(ema, SamplerSpec.parse(text), args.n, seed=0, batch_size=args.batch_size)
        metrics = side.score(drawn.x.numpy())
        first = first or {"metrics": metrics, "x": drawn.x}
        row = {"sampler": text, "nfe": drawn.nfe, "seconds": round(drawn.seconds, 1),
               **{key: metrics[key] for key in SHOWN},
               "d_kid_in_se": (metrics["kid"] - first["metrics"]["kid"]) / first["metrics"]["kid_se"],
               "d_precision": metrics["precision"] - first["metrics"]["precision"],
               "d_coverage": metrics["coverage"] - first["metrics"]["coverage"],
               "rms_gap_to_first": float((drawn.x - first["x"]).pow(2).sum(1).mean().sqrt()),
               "rms_norm": float(drawn.x.pow(2).sum(1).mean().sqrt())}
        summary["rows"].append(row)
        print(format_table([row], list(row)), flush=True)
        write_result(NAME, summary)
    summary["machine"] = finish_run(machine)
    print(format_table(summary["rows"], list(summary["rows"][0])))
    print(f"result: {write_result(NAME, summary)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
