"""Split sampling of a principal-subspace model vs integrating every coordinate: time, NFE and the samples.

    python benchmarks/bench_subspace_sampling.py --checkpoint <best.pt> --splits <splits dir> --threads 2

A ``LinearSkip(PrincipalSubspace)`` model (the quickstart's recipe) is sampled the way the evaluation does it now
(dopri5 on the k network coordinates, the other dim - k solved exactly, the error RMS over all dim) and the way it
was before (dopri5 on all dim coordinates: the same model behind a wrapper that hides its split), interleaved,
``--repeats`` times each, from the same noise. A tighter split solve (``--reference-tol``) is the reference both are
measured against: RMS gap of the samples, and the change of ranking KID, precision and coverage in units of the
reference's KID standard error (scored against the same prepared real side).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from common import add_run_arguments, command_line, finish_run, format_table, median, spread, start_run, write_result
from flow_pipeline.core.data.split_set import load_saved_splits
from flow_pipeline.core.metrics.distances import TrainSpace
from flow_pipeline.core.metrics.real_side import RealSide
from flow_pipeline.core.sampling import sample
from flow_pipeline.core.checkpoint import load_ema_model
from flow_pipeline.evaluation.evaluate import run_training_rows, saved_train_config
from flow_pipeline.evaluation.samplers import DOPRI5_ATOL, DOPRI5_RTOL

NAME = "bench_subspace_sampling"


class EveryCoordinate(nn.Module):
    """The same velocity without ``subspace_velocity``: the sampler integrates all dim coordinates."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x_t, t):
        return self.model(x_t, t)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--splits", required=True, help="directory of the saved splits the run trained on")
    parser.add_argument("--n", type=int, default=5120)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--reference-tol", type=float, default=1e-6)
    parser.add_argument("--out", type=Path, default=None, help="result JSON path (default benchmarks/results/<name>.json)")
    add_run_arguments(parser, threads=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    machine = start_run(args)
    ema = load_ema_model(args.checkpoint, saved_train_config)
    if not hasattr(ema.model, "subspace_velocity") or ema.model.subspace_velocity() is None:
        print(f"{args.checkpoint}: not a linear_skip + principal_dims model; nothing to compare", file=sys.stderr)
        return 2
    ways = {"split (now)": ema.model, "every coordinate (before)": EveryCoordinate(ema.model)}

    def draw(model, tol):
        return sample(model, ema.flow, n=args.n, dim=ema.config.dim, solver="dopri5", seed=0, rtol=tol, atol=tol,
                      denormalize=ema.normalizer.denormalize)

    seconds, drawn = {name: [] for name in ways}, {}
    for _ in range(args.repeats):
        for name, model in ways.items():
            drawn[name] = draw(model, DOPRI5_RTOL)
            seconds[name].append(drawn[name].seconds)
    reference = draw(ema.model, args.reference_tol)
    splits = load_saved_splits(args.splits)
    train = run_training_rows(splits.train, ema.config)
    side = RealSide.prepare(train, np.asarray(splits.test), args.n, train_space=TrainSpace.fit(train))
    truth = side.score(reference.x.numpy())
    rows = []
    for name, result in [*drawn.items(), (f"split at {args.reference_tol:g} (reference)", reference)]:
        metrics = side.score(result.x.numpy())
        rows.append({"sampling": name, "nfe": result.nfe,
                     "seconds": round(median(seconds[name]), 2) if name in seconds else round(result.seconds, 2),
                     "ranking_kid": round(metrics["ranking_kid"], 6),
                     "d_kid_in_se": round((metrics["kid"] - truth["kid"]) / truth["kid_se"], 2),
                     "d_precision": round(metrics["precision"] - truth["precision"], 4),
                     "d_coverage": round(metrics["coverage"] - truth["coverage"], 4),
                     "rms_gap_to_reference": float((result.x - reference.x).pow(2).sum(1).mean().sqrt())})
    speedup = median(seconds["every coordinate (before)"]) / median(seconds["split (now)"])
    summary = {"command": command_line(), "checkpoint": args.checkpoint, "n": args.n, "threads": args.threads,
               "tolerance": DOPRI5_RTOL, "seconds": {name: spread(values) for name, values in seconds.items()},
               "speedup": speedup, "rows": rows, "machine": finish_run(machine)}
    print(format_table(rows, list(rows[0])))
    print(f"split vs every coordinate: {speedup:.2f}x (median of {args.repeats} interleaved)")
    print(f"result: {write_result(NAME, summary, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
