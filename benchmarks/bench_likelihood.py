"""Cost of the held-out log-likelihood on a quickstart-shaped model, and RK4's step error on it.

    OMP_NUM_THREADS=2 python benchmarks/bench_likelihood.py            # n = 5,120, 8 steps, exact
    OMP_NUM_THREADS=2 python benchmarks/bench_likelihood.py --n 1000 --steps 8 16 32 --reference-steps 64

The model is the quickstart's architecture (mlp ``matched`` on 64 principal coordinates inside a linear skip path,
dim 1,024) with random weights and random skip variances around 1: the cost does not depend on training (the step
error does: measure it on a trained model). Rows are whitened-space draws N(0, I). ``--divergence hutchinson
--probes 4`` times the estimate instead of the exact trace. Prints, per step count, the seconds for all rows and the
largest and mean absolute per-row difference from ``--reference-steps`` on the first ``--error-rows`` rows.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from flow_pipeline.core.likelihood import log_likelihood
from flow_pipeline.core.models import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5120)
    parser.add_argument("--steps", type=int, nargs="+", default=[8])
    parser.add_argument("--reference-steps", type=int, default=0, help="0: no error measurement")
    parser.add_argument("--error-rows", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--divergence", default="exact", choices=["exact", "hutchinson"])
    parser.add_argument("--probes", type=int, default=4)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build_model("mlp", dim=1024, size="matched", linear_skip=True, principal_dims=64).eval()
    model.start_at(torch.empty(1024).uniform_(0.5, 1.5))
    x = torch.randn(args.n, 1024, generator=torch.Generator().manual_seed(1))
    reference = None
    if args.reference_steps:
        reference = log_likelihood(model, x[: args.error_rows], steps=args.reference_steps, divergence="exact").log_prob
    for steps in args.steps:
        start = time.perf_counter()
        result = log_likelihood(model, x, steps=steps, batch_size=args.batch_size, divergence=args.divergence,
                                probes=args.probes)
        row = {"n": args.n, "steps": steps, "divergence": result.divergence, "integrated_dims": result.integrated_dims,
               "seconds": round(time.perf_counter() - start, 2), "threads": torch.get_num_threads()}
        if reference is not None:
            error = (result.log_prob[: args.error_rows] - reference).abs()
            row.update(max_abs_error=float(error.max()), mean_abs_error=float(error.mean()))
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
