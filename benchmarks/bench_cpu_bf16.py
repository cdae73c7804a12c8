"""CPU bf16 autocast vs fp32: training steps/s of the project's trainer, the two precisions interleaved in one process.

    python benchmarks/bench_cpu_bf16.py                        # quickstart recipe and mlp small, 1 and 2 threads
    python benchmarks/bench_cpu_bf16.py --models quickstart --threads 2 --steps 200 --repeats 3

Each timed run is ``flow_pipeline.core.trainer.train`` for ``--steps`` steps on built-in rows (15,360 train, 512
val); steps/s comes from the trainer's own log stamps (every 10 steps), so the set-up, the validation and the
checkpoint at the end are not in it. Precisions alternate fp32, bf16, bf16, fp32, ... so a drift in the machine's
speed hits both. Only CPUs that multiply bf16 natively (``avx512_bf16`` or ``amx_bf16`` in /proc/cpuinfo) are
expected to gain; elsewhere autocast emulates bf16 and is slower. The learning-parity side (best validation loss and
the ranking KID over seeds) is ``research/recipe_search.py --precision bf16``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from bench_trainer_vs_reference import StepClock
from common import command_line, finish_run, format_table, median, start_run, write_result
from flow_pipeline.config import TrainConfig
from flow_pipeline.core.data.normalization import Normalizer
from flow_pipeline.core.data.sonar_like import synthetic_sonar_like
from flow_pipeline.core.precision import native_cpu_bf16_flags
from flow_pipeline.core.trainer import TrainData, train

NAME = "bench_cpu_bf16"
QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.json"


def model_configs() -> dict[str, dict]:
    """name -> TrainConfig fields: the quickstart recipe as shipped, and the issue's `mlp` small on z-scored rows."""
    quickstart = json.loads(QUICKSTART.read_text())["ops"]["trained_checkpoint"]["config"]
    return {"quickstart": {"arch": "mlp", **quickstart},
            "mlp-small": {"arch": "mlp", "model_size": "small", "batch_size": 256}}


def timed_run(fields: dict, precision: str, steps: int, data: dict[str, TrainData]) -> float:
    """Steps/s of one training run of ``steps`` steps at ``precision``."""
    config = TrainConfig(**{**fields, "precision": precision, "max_steps": steps, "eval_every_steps": 0,
                            "warmup_steps": min(fields.get("warmup_steps", 10), steps // 2), "log_every": 10,
                            "patience": 10_000, "device": "cpu"})
    clock = StepClock()
    with tempfile.TemporaryDirectory(prefix="bench-bf16-") as run_dir:
        train(config, data[config.normalization], run_dir, clock)
    return clock.steps_per_second()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(model_configs()), choices=list(model_configs()))
    parser.add_argument("--thread-counts", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=2, help="fp32/bf16 pairs per model and thread count")
    parser.add_argument("--wait-load", type=float, default=0.0)
    parser.add_argument("--wait-timeout", type=float, default=600.0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    machine = start_run(args)
    machine["native_bf16_flags"] = native_cpu_bf16_flags()

    rows = synthetic_sonar_like(15_360 + 512, dim=1024, seed=0)
    train_rows, val_rows = torch.from_numpy(rows[:15_360].copy()), torch.from_numpy(rows[15_360:].copy())
    data = {method: TrainData(train_rows, val_rows, Normalizer.fit(rows[:15_360], method))
            for method in ("zscore", "whiten")}
    configs, results = model_configs(), []
    for name in args.models:
        for threads in args.thread_counts:
            torch.set_num_threads(threads)
            rates = {"fp32": [], "bf16": []}
            timed_run(configs[name], "fp32", 20, data)  # warm-up: first-call allocations and kernels
            for repeat in range(args.repeats):
                for precision in (("fp32", "bf16") if repeat % 2 == 0 else ("bf16", "fp32")):
                    rates[precision].append(timed_run(configs[name], precision, args.steps, data))
                    print(f"{name} {threads} thread(s) {precision}: {rates[precision][-1]:.2f} steps/s", flush=True)
            paired = [b / f for f, b in zip(rates["fp32"], rates["bf16"])]
            results.append({"model": name, "threads": threads, "fp32_steps_per_s": median(rates["fp32"]),
                            "bf16_steps_per_s": median(rates["bf16"]), "bf16_speedup": median(paired),
                            "runs": rates})
    print(format_table(results, ("model", "threads", "fp32_steps_per_s", "bf16_steps_per_s", "bf16_speedup")))
    path = write_result(NAME, {"command": command_line(), "machine": finish_run(machine), "steps": args.steps,
                               "results": results}, args.out)
    print(f"result: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
