"""``python -m flow_pipeline.study``: a small full ablation study in one command.

Materializes the data assets, then for every ``{arch}-{flow}`` partition of the grid ``trained_checkpoint`` with
``replicates`` seeds at an equal ``max_steps`` budget and its ``evaluation`` (every replicate), then
``ablation_report`` with the statistics against the baseline. It runs in this process on the Dagster instance of
``DAGSTER_HOME`` (a temporary one when unset), so the runs and the report are visible in the UI afterwards.
"""

from __future__ import annotations

import argparse
import sys
import time

from flow_pipeline.core.flows import FLOWS
from flow_pipeline.core.models import ARCHITECTURES, MODEL_SIZES

# The CPU preset: three architectures x two flows whose zero-predictor losses differ (2 and pi^2/4), three seeds
# each, every run the same 300 optimizer steps (tiny presets: the three architectures within 7% of 150k parameters).
PRESET = {"archs": list(ARCHITECTURES), "flows": ["icfm", "vp"], "replicates": 3, "model_size": "tiny",
          "max_steps": 300, "eval_every_steps": 50, "warmup_steps": 50, "lr": 2e-3, "batch_size": 256,
          "patience": 20, "dataset": "full"}


def study_run_config(args: argparse.Namespace) -> dict:
    """Run config of trained_checkpoint + evaluation for one partition of the study."""
    train = {"replicates": args.replicates, "model_size": args.model_size, "max_steps": args.max_steps,
             "eval_every_steps": args.eval_every_steps, "warmup_steps": args.warmup_steps, "lr": args.lr,
             "batch_size": args.batch_size, "patience": args.patience, "dataset": args.dataset, "seed": args.seed,
             "device": args.device, "resume": True}  # a re-run of the study skips finished replicates
    return {"ops": {"trained_checkpoint": {"config": train},
                    "evaluation": {"config": {"n_samples": args.n_samples}}}}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m flow_pipeline.study", description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=PRESET["archs"], choices=ARCHITECTURES)
    parser.add_argument("--flows", nargs="+", default=PRESET["flows"], choices=list(FLOWS))
    parser.add_argument("--replicates", type=int, default=PRESET["replicates"], help="seeds per partition")
    parser.add_argument("--model-size", default=PRESET["model_size"], choices=MODEL_SIZES)
    parser.add_argument("--max-steps", type=int, default=PRESET["max_steps"], help="optimizer steps of every run")
    parser.add_argument("--eval-every-steps", type=int, default=PRESET["eval_every_steps"])
    parser.add_argument("--warmup-steps", type=int, default=PRESET["warmup_steps"])
    parser.add_argument("--lr", type=float, default=PRESET["lr"])
    parser.add_argument("--batch-size", type=int, default=PRESET["batch_size"])
    parser.add_argument("--patience", type=int, default=PRESET["patience"], help="evaluations without improvement")
    parser.add_argument("--dataset", default=PRESET["dataset"])
    parser.add_argument("--seed", type=int, default=0, help="first seed; replicates use seed, seed+1, ...")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--n-samples", type=int, default=1000, help="samples per evaluation")
    parser.add_argument("--n-synthetic", type=int, default=6400, help="rows of the built-in data (60/20/20 split; "
                        "validation every eval_every_steps runs over the whole val split)")
    parser.add_argument("--baseline", default="", help="report baseline: a partition key or an identity "
                        "(default: the first partition of the grid)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import dagster as dg

    from flow_pipeline.defs.assets import trained_checkpoint
    from flow_pipeline.defs.data_assets import dataset_splits, normalization_stats
    from flow_pipeline.defs.evaluation_assets import ablation_report, evaluation
    from flow_pipeline.defs.materializations import latest_metadata
    from flow_pipeline.definitions import defs

    started = time.perf_counter()
    partitions = [f"{arch}-{flow}" for arch in args.archs for flow in args.flows]
    with dg.DagsterInstance.get() as instance:
        def materialize(assets, **kwargs) -> None:
            result = dg.materialize(assets, instance=instance, resources=defs.resources, raise_on_error=False,
                                    **kwargs)
            if not result.success:
                raise SystemExit(f"study: {', '.join(a.key.to_user_string() for a in assets)} "
                                 f"{kwargs.get('partition_key', '')} failed (see the run in the Dagster UI)")

        materialize([dataset_splits, normalization_stats],
                    run_config={"ops": {"dataset_splits": {"config": {"n_synthetic": args.n_synthetic}}}})
        for index, partition in enumerate(partitions, 1):
            print(f"[{time.perf_counter() - started:7.0f} s] {index}/{len(partitions)} {partition}: "
                  f"{args.replicates} replicate(s) x {args.max_steps} steps, then evaluation", flush=True)
            materialize([trained_checkpoint, evaluation], partition_key=partition, run_config=study_run_config(args))
        baseline = args.baseline or partitions[0]
        materialize([ablation_report], run_config={"ops": {"ablation_report": {"config": {"baseline": baseline}}}})
        metadata = latest_metadata(instance, ablation_report.key)
    print(metadata["report"])
    print(f"study: {len(partitions)} partitions x {args.replicates} replicates in "
          f"{time.perf_counter() - started:.0f} s; report: {metadata['markdown_path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
