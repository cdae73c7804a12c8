"""Train and evaluate ablation partitions with the ``small`` CPU preset on the built-in synthetic SONAR-like data,
through the real Dagster assets, and print what the evaluation materializations say.

    python -m research.evaluate_small                               # mlp-icfm (3 epochs), dit-icfm (2 epochs)
    python -m research.evaluate_small --partitions mlp-icfm:5 unet-fm:3 --sampler rk4:5 --extra-samplers euler:20
    python -m research.evaluate_small --root /tmp/eval_small --wait-load 3

Steps, all on a persistent sqlite Dagster instance in ``<root>/dagster_home`` (browse it afterwards with
``DAGSTER_HOME=<root>/dagster_home dagster dev -m flow_pipeline.definitions`` and ``FLOW_PIPELINE_ROOT=<root>``):

1. ``dataset_splits`` with its defaults (synthetic, n_synthetic=25,600, 60/20/20) and ``normalization_stats``;
2. per partition ``trained_checkpoint`` (model_size small, device cpu, the given epochs, warm-up ``--warmup-steps``)
   and then, timed on its own, ``evaluation`` (``--sampler``, n = min(test rows, ``--n-samples``), with the
   held-out real and Gaussian baseline reference rows);
3. ``ablation_report`` over every evaluated partition.

It prints, per partition, the ranking KID ± se, FD∞, variance ratio, coverage and memorisation as read back from the latest ``evaluation``
materialization (with the rest of its metadata), the training numbers, and the report table; and writes
``benchmarks/results/evaluate_small.json``. On the CPU, an epoch of the small presets (37 steps of 256 rows) takes
about 40 s (mlp) and 90 s (dit) on an idle 2-core machine, about twice that when the machine is busy; the
euler:20 evaluation of 1,000 samples another 20-60 s.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import dagster as dg

from benchmarks.common import command_line, finish_run, format_table, start_run, write_result
from flow_pipeline.defs.assets import dataset_splits, normalization_stats, trained_checkpoint
from flow_pipeline.defs.evaluation_assets import ablation_report, evaluation, latest_metadata
from flow_pipeline.defs.pipes_reader import WholeLineTempFileMessageReader
from flow_pipeline.defs.resources import ArtifactsResource, ComputeResource
from flow_pipeline.defs.tracking import WandbResource

NAME = "evaluate_small"
HEADLINE = ("ranking_kid", "kid", "kid_se", "fd_inf", "variance_ratio", "norm_ratio", "fd_ratio", "precision",
            "recall", "coverage", "train_copy_fraction", "memorization_ratio", "sampler", "nfe", "seconds", "n")


def parse_partition(text: str, default_epochs: int) -> tuple[str, int]:
    """``"mlp-icfm:3"`` -> ("mlp-icfm", 3); ``"mlp-icfm"`` -> ("mlp-icfm", default_epochs)."""
    key, _, epochs = text.partition(":")
    return key, int(epochs) if epochs else default_epochs


def resources(root: Path) -> dict:
    return {
        "artifacts": ArtifactsResource(root=str(root)),
        "compute": ComputeResource(device="cpu"),
        "wandb": WandbResource(mode="disabled"),
        "pipes_subprocess_client": dg.PipesSubprocessClient(message_reader=WholeLineTempFileMessageReader()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("artifacts/evaluate_small"),
                        help="artifact root (splits, checkpoints, evaluation, reports) and its dagster_home")
    parser.add_argument("--partitions", nargs="+", default=["mlp-icfm:3", "dit-icfm:2"],
                        help="partition keys, each optionally ':EPOCHS'")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of partitions given without ':EPOCHS'")
    parser.add_argument("--warmup-steps", type=int, default=20, help="LR warm-up steps (default run config: 200)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--model-size", default="small", help="model preset (tiny only to smoke-test this script)")
    parser.add_argument("--sampler", default="dopri5", help="headline sampler, e.g. dopri5, euler:20, rk4:5")
    parser.add_argument("--extra-samplers", nargs="*", default=[], help="more sampler settings to compare")
    parser.add_argument("--n-samples", type=int, default=5120, help="cap on the number of generated samples")
    parser.add_argument("--wait-load", type=float, default=0.0, metavar="L",
                        help="wait until the 1-min load average is below L before starting (0: do not wait)")
    parser.add_argument("--wait-timeout", type=float, default=1500.0, metavar="S")
    args = parser.parse_args()

    machine = start_run(args)
    root = args.root.expanduser().resolve()
    home = root / "dagster_home"
    home.mkdir(parents=True, exist_ok=True)
    solver, _, steps = args.sampler.partition(":")
    eval_config = {"solver": solver, "steps": int(steps or 0), "extra_samplers": args.extra_samplers,
                   "n_samples": args.n_samples}
    partitions = [parse_partition(text, args.epochs) for text in args.partitions]
    summary = {"command": command_line(), "root": str(root), "eval_config": eval_config, "partitions": {}}

    with dg.DagsterInstance.local_temp(tempdir=str(home)) as instance:
        started = time.perf_counter()
        dg.materialize([dataset_splits, normalization_stats], instance=instance, resources=resources(root))
        summary["data_seconds"] = round(time.perf_counter() - started, 1)
        for key, epochs in partitions:
            train_config = {"model_size": args.model_size, "device": "cpu", "max_epochs": epochs, "lr": args.lr,
                            "warmup_steps": args.warmup_steps, "patience": 1000}
            started = time.perf_counter()
            dg.materialize([trained_checkpoint], instance=instance, resources=resources(root), partition_key=key,
                           run_config={"ops": {"trained_checkpoint": {"config": train_config}}})
            wall = round(time.perf_counter() - started, 1)
            started = time.perf_counter()
            dg.materialize([evaluation], instance=instance, resources=resources(root), partition_key=key,
                           run_config={"ops": {"evaluation": {"config": eval_config}}})
            evaluation_wall = round(time.perf_counter() - started, 1)
            training = latest_metadata(instance, trained_checkpoint.key, key)
            evaluated = latest_metadata(instance, evaluation.key, key)
            summary["partitions"][key] = {
                "epochs": epochs,
                "wall_seconds_train": wall,
                "wall_seconds_evaluate": evaluation_wall,
                "training": {name: training[name] for name in ("best_val_loss", "best_epoch", "epochs_run",
                                                                "global_step", "train_seconds", "num_params")},
                "evaluation_metadata": {name: value for name, value in evaluated.items()
                                        if name not in ("samplers", "reference_table")},
                "reference_table": evaluated["reference_table"],
                "samplers_table": evaluated["samplers"],
            }
        dg.materialize([ablation_report], instance=instance, resources=resources(root))
        report = latest_metadata(instance, ablation_report.key)
    summary["report"] = report
    summary["machine"] = finish_run(machine)

    rows = [{"partition": key, "epochs": info["epochs"], **info["training"],
             **{name: info["evaluation_metadata"][name] for name in HEADLINE}}
            for key, info in summary["partitions"].items()]
    print("\n== read back from the latest evaluation materializations ==")
    print(format_table(rows, ["partition", "epochs", "best_val_loss", "train_seconds", *HEADLINE]))
    for key, info in summary["partitions"].items():
        print(f"\n-- {key}: full evaluation metadata --")
        for name, value in info["evaluation_metadata"].items():
            print(f"  {name}: {value}")
        print(info["samplers_table"])
        print(info["reference_table"])
        print(f"evaluation wall time: {info['wall_seconds_evaluate']} s")
    print("\n== ablation_report ==")
    print(report["report"])
    print(f"figure: {report['figure_png']}\ncsv:    {report['csv_path']}")
    print(f"result: {write_result(NAME, summary)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
