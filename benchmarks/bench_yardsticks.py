"""Cost and values of the classifier two-sample test and the RBF KID at n = 5 x dim on 1024-d built-in data.

    OMP_NUM_THREADS=2 python benchmarks/bench_yardsticks.py --threads 2
    python benchmarks/bench_yardsticks.py --n 2048 --threads 1

Sets scored against the test rows (all z-scored with the training rows' statistics, as the evaluation does): held-out
real rows, ``gaussian-full`` and ``gaussian-diag`` samples (fitted on the training rows), and copies of training rows.
Per set: C2ST accuracy with its interval and seconds, RBF KID ± se with its bandwidth and seconds, the RBF KID at a
fifth of the median bandwidth, and the cubic KID ± se beside them.
"""

from __future__ import annotations

import sys

from bench_distances import size_arguments, timed
from common import command_line, finish_run, format_table, start_run, write_result
from flow_pipeline.core.baselines import fit_baseline
from flow_pipeline.core.data.synthetic import synthetic_sonar_mixture
from flow_pipeline.core.metrics.c2st import c2st
from flow_pipeline.core.metrics.distances import TrainSpace, kid
from flow_pipeline.core.metrics.rbf_kid import rbf_kid

NAME = "bench_yardsticks"


def main() -> int:
    args = size_arguments(__doc__.splitlines()[0])
    machine = start_run(args)
    # The product's built-in data (the calibrated mixture), split as train / held-out / test.
    x = synthetic_sonar_mixture(args.n_train + 2 * args.n, dim=args.dim, seed=0)
    train, held_out, test = x[: args.n_train], x[args.n_train : args.n_train + args.n], x[args.n_train + args.n :]
    space = TrainSpace.fit(train)
    sets = {"held-out real": held_out, "copies of train": train[: args.n],
            **{name: fit_baseline(name, train).sample(args.n, seed=1) for name in ("gaussian-full", "gaussian-diag")}}
    z_test, rows = space.transform(test), []
    for name, rows_of_set in sets.items():
        z = space.transform(rows_of_set)
        classifier, c2st_seconds = timed(c2st, z_test, z, seed=0)
        rbf, rbf_seconds = timed(rbf_kid, z, z_test)
        narrow = rbf_kid(z, z_test, bandwidth_scale=0.2)
        cubic, cubic_seconds = timed(kid, z, z_test)
        rows.append({"set": name, "c2st_accuracy": round(classifier.accuracy, 4),
                     "c2st_ci": f"[{classifier.ci_low:.3f}, {classifier.ci_high:.3f}]", "c2st_s": c2st_seconds,
                     "rbf_kid": f"{rbf.kid:.3g} ± {rbf.se:.2g}", "bandwidth": round(rbf.bandwidth, 2),
                     "rbf_kid_s": rbf_seconds, "rbf_kid_0.2": f"{narrow.kid:.3g} ± {narrow.se:.2g}", "cubic_kid": f"{cubic['kid']:.3g} ± {cubic['kid_se']:.2g}",
                     "cubic_kid_s": cubic_seconds})
    summary = {"command": command_line(), "n": args.n, "dim": args.dim, "n_train": args.n_train,
               "threads": args.threads, "rows": rows, "machine": finish_run(machine)}
    print(format_table(rows, list(rows[0])))
    print(f"result: {write_result(NAME, summary)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
