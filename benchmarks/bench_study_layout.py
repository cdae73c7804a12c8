"""Wall time of a small study by pool layout: one training at a time with all cores, or several at once with a
share of the cores each (the gpu pool limit and ``compute.threads_per_training`` auto).

    python benchmarks/bench_study_layout.py                       # 4 partitions of mlp small, pools 1 and 2
    python benchmarks/bench_study_layout.py --pools 1 2 --partitions mlp-icfm dit-icfm unet-icfm mlp-fm

For each pool limit, in its own temp DAGSTER_HOME (the repo's dagster.yaml) and FLOW_PIPELINE_ROOT: the data assets
are materialized (untimed), then every partition is launched at once as its own ``dagster asset materialize``
process; the gpu pool lets ``pool`` of them train at a time, each with cores // pool threads. Timed: from the
launch until the last process exits. The layouts alternate over repeats.
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

NAME = "study_layout"
REPO_ROOT = Path(__file__).resolve().parents[1]
DAGSTER = str(Path(sys.executable).parent / "dagster")


def materialize(select: str, config: dict, env: dict, partition: str | None = None) -> subprocess.Popen:
    command = [DAGSTER, "asset", "materialize", "-m", "flow_pipeline.definitions", "--select", select,
               "--config-json", json.dumps(config)]
    if partition:
        command += ["--partition", partition]
    return subprocess.Popen(command, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def must_succeed(process: subprocess.Popen, what: str) -> None:
    output, _ = process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"{what} failed ({process.returncode}):\n{output[-3000:]}")


def run_layout(pool: int, args: argparse.Namespace) -> dict:
    """Wall seconds of training every partition with the gpu pool at ``pool``."""
    with tempfile.TemporaryDirectory(prefix=f"study-pool{pool}-") as tmp:
        home, root = Path(tmp) / "dagster_home", Path(tmp) / "artifacts"
        home.mkdir()
        shutil.copy(REPO_ROOT / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
        env = {**os.environ, "DAGSTER_HOME": str(home), "FLOW_PIPELINE_ROOT": str(root), "WANDB_MODE": "disabled"}
        env.pop("OMP_NUM_THREADS", None)
        subprocess.run([DAGSTER, "instance", "concurrency", "set", "gpu", str(pool)], env=env, check=True,
                       capture_output=True)
        data = {"ops": {"dataset_splits": {"config": {"n_synthetic": args.n_synthetic}}}}
        must_succeed(materialize("dataset_splits,normalization_stats", data, env), "data assets")
        train = {"model_size": args.model_size, "max_epochs": args.max_epochs, "patience": 10_000}
        config = {"ops": {"trained_checkpoint": {"config": train}},
                  "resources": {"wandb": {"config": {"mode": "disabled"}}}}
        start = time.perf_counter()
        processes = {p: materialize("trained_checkpoint", config, env, partition=p) for p in args.partitions}
        for partition, process in processes.items():
            must_succeed(process, f"partition {partition}")
        wall = time.perf_counter() - start
        threads = sorted({json.loads(path.read_text()).get("threads") for path in root.glob("checkpoints/*/result.json")})
    return {"pool": pool, "wall_s": wall, "threads_per_training": threads}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pools", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--partitions", nargs="+", default=["mlp-icfm", "mlp-fm", "mlp-otcfm", "mlp-vp"])
    parser.add_argument("--model-size", default="small")
    parser.add_argument("--max-epochs", type=int, default=12)
    parser.add_argument("--n-synthetic", type=int, default=12_000)
    add_common_args(parser, repeats=1)
    args = parser.parse_args()
    machine = start_run(args)
    runs = []
    for repeat in range(args.repeats):
        order = args.pools if repeat % 2 == 0 else list(reversed(args.pools))
        for pool in order:
            runs.append({**run_layout(pool, args), "repeat": repeat})
            print(f"repeat {repeat}: pool {pool}: {runs[-1]['wall_s']:.1f} s", flush=True)
    reference = median([run["wall_s"] for run in runs if run["pool"] == args.pools[0]])
    summary = [{"pool": pool, "threads": sorted({t for run in runs if run["pool"] == pool for t in run["threads_per_training"]}),
                "median_wall_s": round(median([run["wall_s"] for run in runs if run["pool"] == pool]), 1),
                "speedup_vs_first": round(reference / median([run["wall_s"] for run in runs if run["pool"] == pool]), 3)}
               for pool in args.pools]
    print(format_table(summary, ["pool", "threads", "median_wall_s", "speedup_vs_first"]))
    path = write_result(NAME, {"command": command_line(), "args": vars(args), "machine": finish_run(machine),
                               "runs": runs, "summary": summary}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
