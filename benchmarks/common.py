"""Shared helpers of the benchmark scripts: machine description, load gating, timing statistics, result tables/JSON.

The scripts are plain programs (``python benchmarks/bench_*.py``), not part of the pytest run. Each one prints a
table and writes ``benchmarks/results/<name>.json`` holding the machine description, the arguments, the raw timings
and the summary, so a number in BENCHMARKS.md can be traced back to its run.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------------------------------------------------------
# Machine and load
# ---------------------------------------------------------------------------------------------------------------


def cpu_model() -> str:
    """The ``model name`` line of /proc/cpuinfo (``unknown`` where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# The /proc/cpuinfo flags that move these benchmarks' speed ratios (vector width, native bf16).
SPEED_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")


def cpu_speed_flags() -> list[str]:
    """Which of SPEED_FLAGS the first CPU's /proc/cpuinfo ``flags`` line lists (empty where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                listed = set(line.split(":", 1)[1].split())
                return [flag for flag in SPEED_FLAGS if flag in listed]
    except OSError:
        pass
    return []


def mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def machine_info() -> dict:
    """What the numbers were measured on: cores, CPU model, memory, library versions, thread counts, load now.

    Versions come from package metadata, so describing the machine does not import torch (a parent process that
    spawns measured children stays small: a child's ``ru_maxrss`` starts from its parent's size at fork).
    """
    info = {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model(),
        "cpu_flags": cpu_speed_flags(),
        "mem_total_gib": mem_total_gib(),
        "python": platform.python_version(),
        **{name: _version(name) for name in ("torch", "numpy", "scipy", "dagster")},
        "loadavg_start": os.getloadavg(),
        "started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    torch = sys.modules.get("torch")
    if torch is not None:
        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return info


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def wait_for_low_load(max_load: float, timeout_s: float, poll_s: float = 30.0) -> tuple[float, bool]:
    """Block until the 1-minute load average is below ``max_load`` or ``timeout_s`` passed.

    Returns (load average when we stopped waiting, whether it was below the threshold). ``max_load <= 0`` skips the
    wait. The machine is shared, so the final recorded runs should start when others are quiet.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        load = os.getloadavg()[0]
        if max_load <= 0 or load < max_load:
            return load, True
        if time.monotonic() >= deadline:
            print(f"[load] still {load:.2f} >= {max_load} after {timeout_s:.0f} s: running anyway", file=sys.stderr)
            return load, False
        print(f"[load] 1-min load average {load:.2f} >= {max_load}: waiting {poll_s:.0f} s", file=sys.stderr)
        time.sleep(poll_s)


def add_common_args(parser: argparse.ArgumentParser, repeats: int) -> None:
    parser.add_argument("--repeats", type=int, default=repeats, help="interleaved repeats; medians are reported")
    parser.add_argument("--wait-load", type=float, default=0.0, metavar="L",
                        help="wait until the 1-min load average is below L before starting (0: do not wait)")
    parser.add_argument("--wait-timeout", type=float, default=1500.0, metavar="S",
                        help="give up waiting for low load after S seconds and run anyway")
    parser.add_argument("--out", type=Path, default=None, help="result JSON path (default benchmarks/results/<name>.json)")


def add_run_arguments(parser: argparse.ArgumentParser, threads: int = 1) -> None:
    """The options every single-process benchmark shares: torch threads and the load gate read by start_run."""
    parser.add_argument("--threads", type=int, default=threads, help="torch intra-op threads")
    parser.add_argument("--wait-load", type=float, default=0.0, metavar="L",
                        help="wait until the 1-min load average is below L before starting (0: do not wait)")
    parser.add_argument("--wait-timeout", type=float, default=600.0, metavar="S")


def start_run(args: argparse.Namespace) -> dict:
    """Wait for low load if asked, then describe the machine; returns the ``machine`` block of the result."""
    load, below = wait_for_low_load(args.wait_load, args.wait_timeout)
    info = machine_info()
    info["load_gate"] = {"threshold": args.wait_load, "load_when_started": load, "met": below}
    return info


def finish_run(machine: dict) -> dict:
    """Adds the end-of-run load average to the machine block."""
    machine["loadavg_end"] = os.getloadavg()
    machine["finished_utc"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return machine


# ---------------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def spread(values: Sequence[float]) -> dict:
    """min / median / max of a sample, for the JSON (the tables show medians)."""
    return {"min": float(min(values)), "median": median(values), "max": float(max(values)), "n": len(values)}


def time_calls(fn: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls (CPU ops are synchronous)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


# ---------------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------------


def format_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """A plain-text table (also valid Markdown) of ``rows`` restricted to ``columns``; floats get 4 significant
    digits."""

    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(cell(row.get(column, "")) for column in columns) + " |")
    return "\n".join(lines)


def write_result(name: str, payload: dict, out: Path | None = None) -> Path:
    """Write ``payload`` as JSON to ``out`` or ``benchmarks/results/<name>.json``; returns the path."""
    path = out or RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
    return path


def _json_default(value):
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def command_line() -> str:
    """The command that produced a result, as typed (for BENCHMARKS.md)."""
    return shlex.join(["python", *sys.argv])


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------


def synthetic_train_data(n_train: int, n_val: int, dim: int = 1024, seed: int = 0):
    """A :class:`flow_pipeline.core.trainer.TrainData` from the built-in SONAR-like generator, with the pipeline's
    normalisation (``Normalizer.fit``: streamed mean/std of the train rows, floored std)."""
    import torch

    from flow_pipeline.core.data.normalization import Normalizer
    from flow_pipeline.core.data.sonar_like import synthetic_sonar_like
    from flow_pipeline.core.trainer import TrainData

    rows = synthetic_sonar_like(n_train + n_val, dim=dim, seed=seed)
    normalizer = Normalizer.fit(rows[:n_train])
    return TrainData(train=torch.from_numpy(rows[:n_train].copy()), val=torch.from_numpy(rows[n_train:].copy()),
                     normalizer=normalizer)
