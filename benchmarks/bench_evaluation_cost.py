"""Cost of scoring sample sets at the default n = 5 x dim: the one-shot metric functions vs the prepared real side.

    python benchmarks/bench_evaluation_cost.py --path both        # timings of both paths in one process
    python benchmarks/bench_evaluation_cost.py --path prepared    # one path per process: its peak RSS
    python benchmarks/bench_evaluation_cost.py --path one-shot

Built-in SONAR-like rows: 15,360 training rows, 5,120 test rows, and 5,120 held-out rows scored as the "samples".
``one-shot`` is the composition of the metric functions an evaluation ran before :mod:`flow_pipeline.core.metrics.real_side`
(every metric on its own subsamples and distance passes; the copy threshold, computed once per evaluation, timed
apart). ``prepared`` is :meth:`RealSide.prepare` once, then :meth:`RealSide.score` per sample set. Both print their
metrics, so that agreement can be read off; peak RSS is the process's (``resource.getrusage``).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

import numpy as np
import torch

from common import add_run_arguments, command_line, finish_run, format_table, start_run, write_result
from flow_pipeline.core.metrics.distances import TrainSpace, dispersion, fd_infinity, frechet_distance, kid, subsample
from flow_pipeline.core.metrics.copies import copy_threshold, memorization_ratio, train_copy_fraction
from flow_pipeline.core.metrics.prdc import nn_cosine, norm_stats, prdc
from flow_pipeline.core.metrics.real_side import RealSide
from flow_pipeline.core.data.sonar_like import synthetic_sonar_like

NAME = "bench_evaluation_cost"
SHOWN = ("kid", "kid_se", "fd_inf", "fd", "fd_floor", "precision", "recall", "density", "coverage",
         "memorization_ratio", "train_copy_fraction", "nn_cosine")


def one_shot(generated, train, test, space, threshold, seed=0, k=5):
    """The metric functions one by one, as evaluate_samples called them before the real side was prepared."""
    n = generated.shape[0]
    rng = np.random.default_rng(seed)
    test_n, train_n = subsample(test, n, rng), subsample(train, n, rng)
    z_generated, z_test = space.transform(generated), space.transform(test_n)
    return {**kid(z_generated, z_test, seed=seed), **fd_infinity(z_generated, z_test, seed=seed),
            **dispersion(generated, test_n), "fd": frechet_distance(generated, test_n),
            "fd_floor": frechet_distance(train_n, test_n), **prdc(test_n, generated, k=k),
            "memorization_ratio": memorization_ratio(generated, train_n, test_n, seed=seed),
            "train_copy_fraction": train_copy_fraction(generated, train, threshold, test_n),
            **{f"norm_{key}": value for key, value in norm_stats(generated).items()},
            "nn_cosine": nn_cosine(generated, test_n)}


def timed(fn, *args, **kwargs):
    """(value, wall seconds, CPU seconds of this process): on a shared machine the CPU time is the steadier one."""
    started, cpu = time.perf_counter(), time.process_time()
    value = fn(*args, **kwargs)
    return value, round(time.perf_counter() - started, 2), round(time.process_time() - cpu, 2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", choices=("both", "prepared", "one-shot"), default="both")
    parser.add_argument("--n", type=int, default=5120)
    parser.add_argument("--n-train", type=int, default=15_360)
    add_run_arguments(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    machine = start_run(args)
    x = synthetic_sonar_like(args.n_train + 2 * args.n, dim=1024, seed=0).astype(np.float32)
    train, held_out, test = x[: args.n_train], x[args.n_train : args.n_train + args.n], x[args.n_train + args.n :]
    space = TrainSpace.fit(train)
    rows, values = [], {}
    if args.path in ("both", "prepared"):
        side, seconds, cpu = timed(RealSide.prepare, train, test, args.n, train_space=space)
        rows.append({"path": "prepared", "step": "RealSide.prepare (once per evaluation)", "seconds": seconds,
                     "cpu_seconds": cpu})
        values["prepared"], seconds, cpu = timed(side.score, held_out)
        rows.append({"path": "prepared", "step": "RealSide.score (per sample set)", "seconds": seconds,
                     "cpu_seconds": cpu})
    if args.path in ("both", "one-shot"):
        rng = np.random.default_rng(0)
        threshold, seconds, cpu = timed(copy_threshold, train, subsample(test, args.n, rng))
        rows.append({"path": "one-shot", "step": "copy_threshold (once per evaluation)", "seconds": seconds,
                     "cpu_seconds": cpu})
        values["one-shot"], seconds, cpu = timed(one_shot, held_out, train, test, space, threshold)
        rows.append({"path": "one-shot", "step": "every metric function (per sample set)", "seconds": seconds,
                     "cpu_seconds": cpu})
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    summary = {"command": command_line(), "n": args.n, "n_train": args.n_train, "threads": args.threads,
               "rows": rows, "values": values, "peak_rss_mib": round(peak), "machine": finish_run(machine)}
    print(format_table(rows, ["path", "step", "seconds", "cpu_seconds"]))
    print(format_table([{"path": path, **{key: v[key] for key in SHOWN}} for path, v in values.items()],
                       ["path", *SHOWN]))
    print(f"peak RSS {peak:.0f} MiB")
    print(f"result: {write_result(NAME, summary)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
