"""Cost of the evaluation's distances at the default n = 5 x dim on 1024-d built-in data, in one process.

    python benchmarks/bench_distances.py                 # n = 5120, dim = 1024, one thread
    python benchmarks/bench_distances.py --n 2048 --threads 2

Times, on held-out real rows against test rows of the built-in generator: KID with its jackknife se and 200
bootstrap replicates (train-normalised space), FD∞ (4 sizes), the whole ``evaluate_samples`` (every metric), and
the two baseline fits (Ledoit–Wolf covariance + eigendecomposition, per-dimension). Prints the values too.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from common import add_run_arguments, command_line, finish_run, format_table, start_run, write_result
from flow_pipeline.core.baselines import fit_baseline
from flow_pipeline.core.data.sonar_like import synthetic_sonar_like
from flow_pipeline.core.metrics.distances import TrainSpace, fd_infinity, kid
from flow_pipeline.core.metrics.real_side import evaluate_samples

NAME = "bench_distances"


def timed(fn, *args, **kwargs):
    started = time.perf_counter()
    value = fn(*args, **kwargs)
    return value, round(time.perf_counter() - started, 2)


def size_arguments(description: str) -> argparse.Namespace:
    """--n, --dim, --n-train and the run options (threads, load gate), parsed; torch's threads set from them."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--n", type=int, default=5120)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--n-train", type=int, default=15_360)
    add_run_arguments(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    return args


def built_in_rows(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, held_out, test) rows of the built-in generator: n_train, n and n rows of width dim."""
    x = synthetic_sonar_like(args.n_train + 2 * args.n, dim=args.dim, seed=0)
    return x[: args.n_train], x[args.n_train : args.n_train + args.n], x[args.n_train + args.n :]


def main() -> int:
    args = size_arguments(__doc__.splitlines()[0])
    machine = start_run(args)
    train, held_out, test = built_in_rows(args)
    space, fit_seconds = timed(TrainSpace.fit, train)
    z_held, z_test = space.transform(held_out), space.transform(test)
    rows = []
    result, seconds = timed(kid, z_held, z_test)
    rows.append({"step": "kid (+ jackknife se, 200 bootstrap)", "seconds": seconds, **result})
    result, seconds = timed(fd_infinity, z_held, z_test)
    rows.append({"step": "fd_infinity (4 sizes)", "seconds": seconds, **result})
    result, seconds = timed(evaluate_samples, held_out, train, test, train_space=space)
    rows.append({"step": "evaluate_samples (all metrics)", "seconds": seconds,
                 **{k: result[k] for k in ("ranking_kid", "kid_se", "fd_inf", "variance_ratio", "coverage")}})
    for name in ("gaussian-full", "gaussian-diag"):
        _, seconds = timed(fit_baseline, name, train)
        rows.append({"step": f"fit {name}", "seconds": seconds})
    rows.append({"step": "TrainSpace.fit", "seconds": fit_seconds})
    summary = {"command": command_line(), "n": args.n, "dim": args.dim, "n_train": args.n_train,
               "threads": args.threads, "rows": rows, "machine": finish_run(machine)}
    keys = sorted({key for row in rows for key in row} - {"step", "seconds"})
    print(format_table(rows, ["step", "seconds", *keys]))
    print(f"result: {write_result(NAME, summary)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
