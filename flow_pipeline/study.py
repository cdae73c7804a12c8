"""``python -m flow_pipeline.study``: a small full ablation study in one command.

Materializes the data assets, then for every ``{arch}-{flow}`` partition of the grid ``trained_checkpoint`` with
``replicates`` seeds at an equal ``max_steps`` budget and its ``evaluation`` (every replicate), then
``ablation_report`` with the statistics against the baseline. It runs in this process on the Dagster instance of
``DAGSTER_HOME`` (a temporary one when unset), so the runs and the report are visible in the UI afterwards.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from flow_pipeline.core.flows import FLOWS
from flow_pipeline.core.knobs import knobs_of
from flow_pipeline.core.models import ARCHITECTURES, MODEL_SIZES
from flow_pipeline.core.train_config import TrainSettings

# The preset studies the shipped recipe (the defaults: whitened data, the linear skip path, the network on the top
# 256 principal directions with 512 prototype features) across every architecture and flow, three seeds each, every
# run the same optimizer steps; at the `matched` size (the architectures within 5% in parameters) and 3,000 steps, so
# the 36 runs compare at equal capacity and fit a CPU.
PRESET_KNOBS = {"model_size": "matched", "max_steps": 3000, "dataset": "full"}
PRESET = {"archs": list(ARCHITECTURES), "flows": list(FLOWS), "replicates": 3}
# Flags that set one training knob each (argparse dest -> knob); unset flags leave the preset's or the file's value.
KNOB_FLAGS = {"model_size": "model_size", "max_steps": "max_steps", "eval_every_steps": "eval_every_steps",
              "warmup_steps": "warmup_steps", "lr": "lr", "batch_size": "batch_size", "patience": "patience",
              "dataset": "dataset", "device": "device"}


# Knobs a file or --set may name: every training knob (the study sets replicates and seed itself).
KNOWN_KNOBS = tuple(knob.name for knob in knobs_of(TrainSettings))


def read_config_file(path: str) -> dict:
    """The training knobs of a run config file: Dagster's shape ``{"ops": {"trained_checkpoint": {"config": {...}}}}``
    (as configs/quickstart.json) or a flat ``{knob: value}`` dict. Raises SystemExit naming the file and the problem."""
    try:
        content = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"study: --config {path}: cannot read it as JSON: {exc}") from None
    if isinstance(content, dict) and "ops" in content:
        try:
            content = content["ops"]["trained_checkpoint"]["config"]
        except (KeyError, TypeError):
            raise SystemExit(f"study: --config {path}: has 'ops' but no ops.trained_checkpoint.config") from None
    if not isinstance(content, dict):
        raise SystemExit(f"study: --config {path}: expected a JSON object of training knobs")
    return content


def parse_setting(text: str) -> tuple[str, object]:
    """``KNOB=VALUE`` -> (knob, value): VALUE read as JSON (numbers, true/false) when it parses, else as a string."""
    knob, equals, value = text.partition("=")
    if not equals or not knob.strip():
        raise SystemExit(f"study: --set {text!r}: expected KNOB=VALUE, e.g. --set normalization=zscore")
    try:
        return knob.strip(), json.loads(value)
    except ValueError:
        return knob.strip(), value


def training_knobs(args: argparse.Namespace) -> dict:
    """The study's training knobs: the preset, then the --config file, then the knob flags given, then --set."""
    knobs = dict(PRESET_KNOBS)
    if args.config:
        knobs.update(read_config_file(args.config))
    knobs.update({knob: getattr(args, dest) for dest, knob in KNOB_FLAGS.items() if getattr(args, dest) is not None})
    knobs.update(parse_setting(text) for text in args.set)
    unknown = sorted(set(knobs) - set(KNOWN_KNOBS))
    if unknown:
        raise SystemExit(f"study: unknown training knob(s) {', '.join(unknown)} (from --config or --set); valid: "
                         f"{', '.join(KNOWN_KNOBS)}")
    return knobs


def study_run_config(args: argparse.Namespace) -> dict:
    """Run config of trained_checkpoint + evaluation for one partition of the study (validated by the assets'
    config, which names a bad knob)."""
    train = {**training_knobs(args), "replicates": args.replicates, "seed": args.seed,
             "resume": True}  # a re-run of the study skips finished replicates
    return {"ops": {"trained_checkpoint": {"config": train},
                    "evaluation": {"config": {"n_samples": args.n_samples}}}}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m flow_pipeline.study", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="a run config file whose training knobs every partition uses, e.g. "
                        "configs/quickstart.json (the quickstart's: the defaults)")
    parser.add_argument("--set", action="append", default=[], metavar="KNOB=VALUE",
                        help="any training knob, e.g. --set normalization=zscore (repeatable; wins over the rest)")
    parser.add_argument("--archs", nargs="+", default=PRESET["archs"], choices=ARCHITECTURES)
    parser.add_argument("--flows", nargs="+", default=PRESET["flows"], choices=list(FLOWS))
    parser.add_argument("--replicates", type=int, default=PRESET["replicates"], help="seeds per partition")
    parser.add_argument("--model-size", choices=MODEL_SIZES)
    parser.add_argument("--max-steps", type=int, help="optimizer steps of every run")
    parser.add_argument("--eval-every-steps", type=int)
    parser.add_argument("--warmup-steps", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--patience", type=int, help="evaluations without improvement")
    parser.add_argument("--dataset")
    parser.add_argument("--device")
    parser.add_argument("--seed", type=int, default=0, help="first seed; replicates use seed, seed+1, ...")
    parser.add_argument("--n-samples", type=int, default=5120, help="samples per evaluation (5 x dim: PRDC and FD "
                        "are lenient below)")
    parser.add_argument("--n-synthetic", type=int, default=25_600, help="rows of the built-in data (60/20/20 split)")
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
                why = "; ".join(event.step_failure_data.error.message.strip().splitlines()[-1]
                                for event in result.get_step_failure_events() if event.step_failure_data.error)
                raise SystemExit(f"study: {', '.join(a.key.to_user_string() for a in assets)} "
                                 f"{kwargs.get('partition_key', '')} failed: {why or 'see the run in the Dagster UI'}")

        materialize([dataset_splits, normalization_stats],
                    run_config={"ops": {"dataset_splits": {"config": {"n_synthetic": args.n_synthetic}}}})
        for index, partition in enumerate(partitions, 1):
            print(f"[{time.perf_counter() - started:7.0f} s] {index}/{len(partitions)} {partition}: "
                  f"{args.replicates} replicate(s), then evaluation", flush=True)
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
