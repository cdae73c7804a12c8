"""What Dagster costs on top of training: one partition through ``dagster asset materialize`` vs the same job run
directly, and where the difference goes.

    python benchmarks/bench_orchestration.py                 # tiny config, 3 interleaved repeats
    python benchmarks/bench_orchestration.py --model-size small --max-epochs 2

Setup (untimed): a temp DAGSTER_HOME with the repo's dagster_home/dagster.yaml and the gpu pool set to 1, a temp
FLOW_PIPELINE_ROOT, and ``dataset_splits,normalization_stats`` materialized once. Wandb is disabled in every variant
(``resources.wandb.config.mode = disabled``) so only orchestration differs.

Timed, interleaved (the order rotates every repeat), all training the same job (partition ``--partition``):

- ``dagster``: ``dagster asset materialize -m flow_pipeline.definitions --select trained_checkpoint --partition P``;
- ``python -m``: ``python -m flow_pipeline.train --job job.json`` (the job.json Dagster wrote, run_dir moved);
- ``run_job``: ``flow_pipeline.train.run_job(job)`` in this (warm) process: data load, train, verify, plot, result;
- ``train()``: loading the splits and ``flow_pipeline.core.trainer.train`` alone, in this process.

Where the time goes: interpreter and import costs (``python -c 'import X'``, timed, and ``import
flow_pipeline.definitions`` split by package with ``python -X importtime``), and for the Dagster run a timeline from its
event log (run start, step worker, step start, the training process's own start/end from result.json, step success,
run success) measured from the moment the CLI was launched.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import add_common_args, command_line, finish_run, format_table, median, start_run, write_result

NAME = "orchestration"
REPO_ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
IMPORTS = {
    "python -c pass": "pass",
    "import torch": "import torch",
    "import dagster": "import dagster",
    "import flow_pipeline.train": "import flow_pipeline.train",
    "import flow_pipeline.definitions": "import flow_pipeline.definitions",
}
# Events that mark the Dagster run's timeline (per step where they carry a step key).
TIMELINE_EVENTS = {"PIPELINE_START": "run start", "STEP_WORKER_STARTED": "worker started",
                   "STEP_START": "start", "STEP_SUCCESS": "success", "PIPELINE_SUCCESS": "run success"}


def run(command: list[str], env: dict, cwd: Path) -> tuple[float, float, float]:
    """(launch unix time, exit unix time, wall seconds) of a subprocess that must succeed."""
    launched, start = time.time(), time.perf_counter()
    process = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:6])} ... failed ({process.returncode}):\n{process.stderr[-3000:]}")
    return launched, time.time(), wall


def materialize_command(select: str, config: dict, partition: str | None = None) -> list[str]:
    command = [str(BIN / "dagster"), "asset", "materialize", "-m", "flow_pipeline.definitions", "--select", select,
               "--config-json", json.dumps(config)]
    return command + (["--partition", partition] if partition else [])


def run_config(args: argparse.Namespace) -> dict:
    train = {"model_size": args.model_size, "max_epochs": args.max_epochs, "batch_size": args.batch_size,
             "warmup_steps": 4, "log_every": 2, "device": "cpu", "lr": 0.002}
    return {"ops": {"trained_checkpoint": {"config": train}},
            "resources": {"wandb": {"config": {"mode": "disabled"}}}}


def dagster_timeline(home: Path, launched: float, exited: float, run_dir: Path) -> dict[str, float]:
    """Seconds from the CLI launch to each mark of the latest run, in time order: the run and step events of its
    event log (``<step key> start`` ...), the training process's own start/end (from the job's result.json) and the
    CLI's exit."""
    from dagster import DagsterInstance

    with DagsterInstance.from_config(str(home)) as instance:
        record = instance.get_runs(limit=1)[0]
        events = instance.all_logs(record.run_id)
    marks: dict[str, float] = {"cli launched": launched}
    for event in events:
        kind = event.dagster_event.event_type_value if event.dagster_event is not None else None
        if kind in TIMELINE_EVENTS:
            step = event.dagster_event.step_key
            marks.setdefault(f"{step} {TIMELINE_EVENTS[kind]}" if step else TIMELINE_EVENTS[kind], event.timestamp)
    process = json.loads((run_dir / "result.json").read_text())["process"]
    marks["training process started"] = process["started_at"]
    marks["training process finished"] = process["finished_at"]
    marks["cli exited"] = exited
    ordered = sorted(marks.items(), key=lambda item: item[1])
    return {"marks": {name: value - launched for name, value in ordered}, "events": len(events)}


def timeline_segments(timelines: list[dict]) -> list[dict]:
    """Median seconds between consecutive marks, in the order of the first run (all runs have the same steps)."""
    names = list(timelines[0]["marks"])
    segments = []
    for a, b in zip(names, names[1:]):
        values = [t["marks"][b] - t["marks"][a] for t in timelines if a in t["marks"] and b in t["marks"]]
        segments.append({"segment": f"{a} -> {b}", "median s": median(values)})
    return segments


def import_times(env: dict, repeats: int) -> dict[str, float]:
    """Median wall seconds of ``python -c <statement>`` for each entry of IMPORTS (fresh interpreter each time)."""
    samples: dict[str, list[float]] = {name: [] for name in IMPORTS}
    for _ in range(repeats):
        for name, statement in IMPORTS.items():
            samples[name].append(run([sys.executable, "-c", statement], env, REPO_ROOT)[2])
    return {name: median(values) for name, values in samples.items()}


def import_cost_by_package(env: dict, module: str = "flow_pipeline.definitions", top: int = 8) -> list[dict]:
    """Where ``import module`` spends its time, by top-level package (torch, dagster, ...), from one
    ``python -X importtime`` run: the sum of the modules' *self* times, so the packages add up to the total."""
    process = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import {module}"], env=env, cwd=REPO_ROOT,
                             capture_output=True, text=True, check=True)
    by_package: dict[str, int] = {}
    for line in process.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        self_us, _cumulative, name = line.removeprefix("import time:").split("|")
        package = name.strip().split(".")[0]
        by_package[package] = by_package.get(package, 0) + int(self_us)
    total = sum(by_package.values())
    rows = sorted(({"package": name, "self s": us / 1e6, "share %": 100 * us / total} for name, us in
                   by_package.items()), key=lambda row: row["self s"], reverse=True)
    return rows[:top] + [{"package": "TOTAL", "self s": total / 1e6, "share %": 100.0}]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--partition", default="mlp-icfm")
    parser.add_argument("--n-synthetic", type=int, default=640, help="rows of the built-in generator (80%% train)")
    parser.add_argument("--model-size", default="tiny", choices=("tiny", "small", "base"))
    parser.add_argument("--max-epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--import-repeats", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="keep the temp DAGSTER_HOME and artifacts root")
    add_common_args(parser, repeats=3)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    machine = start_run(args)
    work = Path(tempfile.mkdtemp(prefix="bench-orchestration-"))
    home, root = work / "dagster_home", work / "artifacts"
    home.mkdir()
    shutil.copy(REPO_ROOT / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    env = {**os.environ, "DAGSTER_HOME": str(home), "FLOW_PIPELINE_ROOT": str(root)}
    env.pop("WANDB_API_KEY", None)
    config = run_config(args)
    try:
        # --- setup, untimed ----------------------------------------------------------------------------------------
        run([str(BIN / "dagster"), "instance", "concurrency", "set", "gpu", "1"], env, work)
        run(materialize_command("dataset_splits,normalization_stats",
                                {"ops": {"dataset_splits": {"config": {"n_synthetic": args.n_synthetic}}}}), env, work)
        # One untimed partition run writes the job.json the direct variants reuse (and warms the page cache).
        run(materialize_command("trained_checkpoint", config, args.partition), env, work)
        from flow_pipeline.config import TrainConfig
        from flow_pipeline.core.trainer import train
        from flow_pipeline.artifacts import TrainJob
        from flow_pipeline.train import load_train_data, run_job

        dagster_run_dir = next((root / "checkpoints").iterdir())
        job = TrainJob.load(dagster_run_dir / "job.json")
        direct_dir = work / "direct" / dagster_run_dir.name
        direct_dir.mkdir(parents=True)
        direct_job = TrainJob(**{**job.__dict__, "run_dir": str(direct_dir)})
        direct_job_path = direct_job.save()

        def dagster_variant() -> dict:
            launched, exited, wall = run(materialize_command("trained_checkpoint", config, args.partition), env, work)
            return {"wall_s": wall, "timeline": dagster_timeline(home, launched, exited, dagster_run_dir)}

        def python_m_variant() -> dict:
            launched, exited, wall = run([sys.executable, "-m", "flow_pipeline.train", "--job", str(direct_job_path)],
                                         env, work)
            process = json.loads((direct_dir / "result.json").read_text())["process"]
            return {"wall_s": wall, "before_run_job_s": process["started_at"] - launched,
                    "run_job_s": process["finished_at"] - process["started_at"],
                    "after_run_job_s": exited - process["finished_at"]}

        def run_job_variant() -> dict:
            start = time.perf_counter()
            run_job(direct_job)
            return {"wall_s": time.perf_counter() - start}

        def train_variant() -> dict:
            start = time.perf_counter()
            result = train(TrainConfig(**direct_job.config), load_train_data(direct_job), direct_dir)
            return {"wall_s": time.perf_counter() - start, "train_seconds": result.train_seconds}

        variants = {"dagster": dagster_variant, "python -m": python_m_variant, "run_job": run_job_variant,
                    "train()": train_variant}
        results: dict[str, list[dict]] = {name: [] for name in variants}
        names = list(variants)
        for repeat in range(args.repeats):
            order = names[repeat % len(names):] + names[:repeat % len(names)]
            for name in order:
                results[name].append(variants[name]())
                print(f"repeat {repeat + 1}/{args.repeats} {name:10s}: {results[name][-1]['wall_s']:.2f} s", flush=True)
        imports = import_times(env, args.import_repeats)
        biggest = import_cost_by_package(env)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    machine = finish_run(machine)

    wall = {name: median([r["wall_s"] for r in rs]) for name, rs in results.items()}
    rows = [{"variant": name, "median wall s": seconds, "minus train() s": seconds - wall["train()"]}
            for name, seconds in wall.items()]
    timelines = [r["timeline"] for r in results["dagster"]]
    segments = timeline_segments(timelines)
    python_m = results["python -m"]
    python_m_rows = [{"part": part, "median s": median([r[key] for r in python_m])}
                     for part, key in (("launch -> run_job starts (interpreter + imports)", "before_run_job_s"),
                                       ("run_job", "run_job_s"), ("run_job ends -> exit", "after_run_job_s"))]
    import_rows = [{"command": name, "median s": seconds} for name, seconds in imports.items()]

    print(f"\npartition {args.partition}, model {args.model_size}, {args.max_epochs} epochs, batch {args.batch_size}, "
          f"{args.repeats} repeats; load {machine['loadavg_start'][0]:.2f} -> {machine['loadavg_end'][0]:.2f}")
    print(format_table(rows, ["variant", "median wall s", "minus train() s"]))
    print("\nDagster run timeline (median seconds per segment; marks from the run's event log):")
    print(format_table(segments, ["segment", "median s"]))
    print("\npython -m flow_pipeline.train:")
    print(format_table(python_m_rows, ["part", "median s"]))
    print("\nfresh-interpreter import costs:")
    print(format_table(import_rows, ["command", "median s"]))
    print("\nimport flow_pipeline.definitions by package (python -X importtime, one run; self times):")
    print(format_table(biggest, ["package", "self s", "share %"]))
    path = write_result(NAME, {"command": command_line(), "machine": machine, "args": vars(args),
                               "results": results, "summary": rows, "dagster_segments": segments,
                               "python_m_parts": python_m_rows, "imports": import_rows, "import_cost_by_package": biggest,
                               "events_per_run": [t["events"] for t in timelines]}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
