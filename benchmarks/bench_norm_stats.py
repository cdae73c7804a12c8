"""Normalization statistics at scale: ``streaming_mean_std`` over a >= 4 GB memory-mapped .npy vs plain NumPy.

    python benchmarks/bench_norm_stats.py                       # 1.05M x 1024 float32 (4.3 GB) in /tmp, deleted after
    python benchmarks/bench_norm_stats.py --path /data/x.npy --keep --rows 2100000

The file is written in chunks (never whole in memory) after checking free disk space, fsynced, then read by:

- ``stream``: ``flow_pipeline.core.data.stats.streaming_mean_std(np.load(path, mmap_mode="r"), chunk_rows)`` for each
  ``--chunk-rows`` value (one pass: BLAS column sums around each chunk's mean in the data's float32, one reused
  buffer, one short-lived mapping per chunk, chunk moments merged in float64 with Chan's update);
- ``numpy mean``: ``a.mean(axis=0, dtype=np.float64)`` on the memmap: one pass that only sums, the fastest
  possible read of the file, which gives no std (an upper bound for any one-pass method);
- ``numpy 2-pass``: the textbook plain-NumPy mean and std without a full-size temporary: ``a.mean(0, float64)``, then
  ``((chunk - mean) ** 2).sum(0)`` over row chunks. (``a.std(0)`` in one call would materialise an (N, D) float64
  temporary, 8.6 GB here, so it is not a fair or safe baseline on this machine.)
- ``numpy one-go``: what a NumPy user types, ``a.mean(0)`` and ``a.std(0, ddof=1)`` on the memmap, in NumPy's
  default float32 (a file-sized float32 temporary; skipped when MemAvailable < 2 x the file + 2 GiB).

Every pass runs in its own child process, which reports its time (measured inside, so interpreter start-up and
imports are excluded), its peak RSS (``ru_maxrss`` from ``getrusage``, and ``VmHWM``, which unlike ru_maxrss does not
carry over the parent's size from before exec; the parent stays small so both agree) and the peaks of
``RssAnon`` / ``RssFile`` sampled from /proc/self/status every 20 ms. RssFile counts the file's pages mapped into the process: they are page cache, shared
and reclaimable, and grow with any memmap read; RssAnon is the memory the pass itself allocates. An ``imports``
child gives the baseline of the interpreter and imports.

Page cache: "cold" passes run right after ``posix_fadvise(DONTNEED)`` drops this file's cached pages (only this
file; the fraction still resident is checked with ``fincore`` where installed), so they read from disk; "warm"
passes follow other passes and read from the page cache (the file fits in RAM here). Throughput = file bytes / time.
Goals (issue 7): stream >= 0.5 x numpy's throughput, stream's RSS < 1 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from common import add_common_args, command_line, finish_run, format_table, median, start_run, write_result

NAME = "norm_stats"
GENERATE_CHUNK_ROWS = 65536


# ---------------------------------------------------------------------------------------------------------------
# The file
# ---------------------------------------------------------------------------------------------------------------


def generate(path: Path, rows: int, dim: int, seed: int = 0) -> float:
    """Write a (rows, dim) float32 .npy with SONAR-like scales, chunk by chunk; returns seconds."""
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    mean = rng.normal(0.0, 0.0035, dim).astype(np.float32)
    std = (0.0053 * rng.uniform(0.6, 1.6, dim)).astype(np.float32)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, dim))
    for start in range(0, rows, GENERATE_CHUNK_ROWS):
        n = min(GENERATE_CHUNK_ROWS, rows - start)
        chunk = rng.standard_normal((n, dim), dtype=np.float32)
        chunk *= std
        chunk += mean
        out[start : start + n] = chunk
    out.flush()
    del out
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())
    return time.perf_counter() - started


def drop_from_page_cache(path: Path) -> None:
    """Evict this file's clean pages from the page cache (this file only; nothing else on the machine)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def resident_fraction(path: Path) -> float | None:
    """Share of the file's pages in the page cache (``fincore``), or None where fincore is missing."""
    if shutil.which("fincore") is None:
        return None
    process = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                             capture_output=True, text=True)
    if process.returncode != 0 or not process.stdout.strip():
        return None
    return int(process.stdout.split()[0]) / path.stat().st_size


# ---------------------------------------------------------------------------------------------------------------
# Child process: one pass, measured from inside
# ---------------------------------------------------------------------------------------------------------------


class RssSampler:
    """Peaks of RssAnon and RssFile (bytes) of this process, sampled from /proc/self/status every ``interval`` s."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak = interval, {"RssAnon": 0, "RssFile": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        for line in Path("/proc/self/status").read_text().splitlines():
            key = line.split(":", 1)[0]
            if key in self.peak:
                self.peak[key] = max(self.peak[key], int(line.split()[1]) * 1024)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> "RssSampler":
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def status_bytes(key: str) -> int:
    """A size field of /proc/self/status (``VmHWM``: peak RSS of this process image, reset at exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def numpy_two_pass(array: np.ndarray, chunk_rows: int) -> tuple[np.ndarray, np.ndarray]:
    mean = array.mean(axis=0, dtype=np.float64)
    m2 = np.zeros_like(mean)
    for start in range(0, array.shape[0], chunk_rows):
        m2 += ((array[start : start + chunk_rows] - mean) ** 2).sum(axis=0)
    return mean, np.sqrt(m2 / (array.shape[0] - 1))


def child(kind: str, path: Path, chunk_rows: int) -> dict:
    """One measured pass in this (child) process; returns seconds, RSS peaks and a digest of the result."""
    from flow_pipeline.core.data.stats import streaming_mean_std  # imported before timing: part of the baseline

    array = np.load(path, mmap_mode="r")
    with RssSampler() as rss:
        started = time.perf_counter()
        if kind == "imports":
            mean = std = None
        elif kind == "stream":
            mean, std, _ = streaming_mean_std(array, chunk_rows=chunk_rows)
        elif kind == "numpy mean":
            mean, std = array.mean(axis=0, dtype=np.float64), None
        elif kind == "numpy 2-pass":
            mean, std = numpy_two_pass(array, chunk_rows)
        elif kind == "numpy one-go":
            mean, std = array.mean(axis=0), array.std(axis=0, ddof=1)  # float32 as NumPy does by default
        else:
            raise ValueError(f"unknown pass {kind!r}")
        seconds = time.perf_counter() - started
    return {"seconds": seconds, "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "vm_hwm_bytes": status_bytes("VmHWM"),
            "peak_rss_anon_bytes": rss.peak["RssAnon"], "peak_rss_file_bytes": rss.peak["RssFile"],
            "mean": None if mean is None else mean.tolist(), "std": None if std is None else std.tolist()}


def run_generate(path: Path, rows: int, dim: int) -> float:
    """:func:`generate` in a child process, so this (parent) process never maps the file: a child's ``ru_maxrss``
    starts from its parent's size at fork."""
    process = subprocess.run([sys.executable, __file__, "--child", "generate", "--path", str(path), "--rows", str(rows),
                              "--dim", str(dim)], capture_output=True, text=True)
    if process.returncode != 0:
        raise RuntimeError(f"generating {path} failed:\n{process.stderr[-3000:]}")
    return float(process.stdout.strip().splitlines()[-1])


def mem_available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def run_child(kind: str, path: Path, chunk_rows: int) -> dict:
    command = [sys.executable, __file__, "--child", kind, "--path", str(path), "--child-chunk-rows", str(chunk_rows)]
    process = subprocess.run(command, capture_output=True, text=True)
    if process.returncode != 0:
        raise RuntimeError(f"child {kind} failed:\n{process.stderr[-3000:]}")
    return json.loads(process.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_050_000)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--path", type=Path, default=None, help="the .npy to write (default: a temp file in /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the file (and reuse it if it exists)")
    parser.add_argument("--chunk-rows", default="2048", help="streaming_mean_std chunk sizes to time (comma-separated)")
    parser.add_argument("--numpy-chunk-rows", type=int, default=8192, help="chunk of the numpy 2-pass baseline")
    parser.add_argument("--skip-cold", action="store_true")
    parser.add_argument("--skip-numpy-one-go", action="store_true", help="skip the file-sized-temporary baseline")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-chunk-rows", type=int, default=0, help=argparse.SUPPRESS)
    add_common_args(parser, repeats=2)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.child == "generate":
        print(generate(args.path, args.rows, args.dim))
        return
    if args.child:
        print(json.dumps(child(args.child, args.path, args.child_chunk_rows)))
        return
    path = args.path or Path(tempfile.gettempdir()) / "bench_norm_stats.npy"
    size = args.rows * args.dim * 4
    reuse = args.keep and path.exists() and np.load(path, mmap_mode="r").shape == (args.rows, args.dim)
    free = shutil.disk_usage(path.parent).free
    if not reuse and free < size + 2 * 2**30:
        raise SystemExit(f"{path.parent}: {free / 2**30:.1f} GiB free, need {size / 2**30:.1f} GiB + 2 GiB margin")
    print(f"{path.parent}: {free / 2**30:.1f} GiB free; file {size / 1e9:.2f} GB", flush=True)
    machine = start_run(args)
    chunk_sizes = [int(c) for c in args.chunk_rows.split(",")]
    passes: list[dict] = []

    def measure(kind: str, chunk_rows: int, cache: str) -> dict:
        if cache == "cold":
            drop_from_page_cache(path)
        resident = resident_fraction(path)
        result = run_child(kind, path, chunk_rows)
        label = f"{kind} ({chunk_rows} rows)" if kind in ("stream", "numpy 2-pass") else kind
        result.update(kind=kind, label=label, chunk_rows=chunk_rows, cache=cache, resident_before=resident)
        passes.append(result)
        print(f"{cache:4s} {label:24s} {result['seconds']:7.2f} s  {size / result['seconds'] / 1e9:5.2f} GB/s  "
              f"maxrss {result['ru_maxrss_bytes'] / 2**20:6.0f} MiB  hwm {result['vm_hwm_bytes'] / 2**20:6.0f} MiB  anon {result['peak_rss_anon_bytes'] / 2**20:6.0f}"
              f" MiB  (resident before: {'?' if resident is None else f'{100 * resident:.0f}%'})", flush=True)
        return result

    generate_s = None
    one_go = not args.skip_numpy_one_go and mem_available_bytes() > 2 * size + 2 * 2**30
    try:
        if not reuse:
            generate_s = run_generate(path, args.rows, args.dim)
            print(f"generated {path} in {generate_s:.1f} s", flush=True)
        measure("imports", 0, "warm")
        if not args.skip_cold:
            measure("stream", chunk_sizes[0], "cold")
            measure("numpy mean", 0, "cold")
        for _ in range(args.repeats):
            for chunk_rows in chunk_sizes:
                measure("stream", chunk_rows, "warm")
            measure("numpy mean", 0, "warm")
            measure("numpy 2-pass", args.numpy_chunk_rows, "warm")
            if one_go:
                measure("numpy one-go", 0, "warm")
    finally:
        if not args.keep:
            path.unlink(missing_ok=True)
    machine = finish_run(machine)

    # Correctness: every mean/std against the numpy 2-pass result.
    reference = next(p for p in passes if p["kind"] == "numpy 2-pass")
    ref_mean, ref_std = np.array(reference["mean"]), np.array(reference["std"])
    for p in passes:
        if p["mean"] is not None and p["kind"] != "numpy mean":
            p["max_rel_err_mean_vs_2pass"] = float(np.max(np.abs(np.array(p["mean"]) - ref_mean)) / np.max(ref_std))
        if p["std"] is not None and p["kind"] != "numpy mean":
            p["max_rel_err_std_vs_2pass"] = float(np.max(np.abs(np.array(p["std"]) - ref_std) / ref_std))
        p.pop("mean"), p.pop("std")

    groups: dict[tuple[str, str], list[dict]] = {}
    for p in passes:
        groups.setdefault((p["cache"], p["label"]), []).append(p)
    warm_numpy = median([p["seconds"] for p in groups[("warm", "numpy mean")]])
    warm_2pass = median([p["seconds"] for (cache, label), ps in groups.items() if label.startswith("numpy 2-pass")
                         for p in ps])
    one_go_runs = groups.get(("warm", "numpy one-go"), [])
    warm_one_go = median([p["seconds"] for p in one_go_runs]) if one_go_runs else None
    rows = []
    for (cache, label), ps in groups.items():
        seconds = median([p["seconds"] for p in ps])
        row = {"cache": cache, "pass": label, "n": len(ps), "seconds": seconds,
               "GB/s": size / seconds / 1e9 if label != "imports" else "",
               "maxrss MiB": median([p["ru_maxrss_bytes"] for p in ps]) / 2**20,
               "VmHWM MiB": median([p["vm_hwm_bytes"] for p in ps]) / 2**20,
               "peak anon MiB": median([p["peak_rss_anon_bytes"] for p in ps]) / 2**20,
               "peak file MiB": median([p["peak_rss_file_bytes"] for p in ps]) / 2**20}
        if label != "imports" and cache == "warm":
            row["vs numpy mean"] = warm_numpy / seconds
            row["vs numpy 2-pass"] = warm_2pass / seconds
            if warm_one_go:
                row["vs numpy one-go"] = warm_one_go / seconds
        rows.append(row)
    print(f"\n{args.rows:,} x {args.dim} float32 = {size / 1e9:.2f} GB; load {machine['loadavg_start'][0]:.2f} -> "
          f"{machine['loadavg_end'][0]:.2f}; warm = median of {args.repeats}")
    print(format_table(rows, ["cache", "pass", "n", "seconds", "GB/s", "vs numpy mean", "vs numpy 2-pass", "vs numpy one-go",
                              "maxrss MiB", "VmHWM MiB", "peak anon MiB", "peak file MiB"]))
    errors = {p["label"]: (p.get("max_rel_err_mean_vs_2pass"), p.get("max_rel_err_std_vs_2pass")) for p in passes
              if p["kind"] == "stream"}
    print("\nstream vs numpy 2-pass, max error (mean: / max std; std: relative): "
          + "; ".join(f"{label}: {m:.1e}, {s:.1e}" for label, (m, s) in errors.items()))
    out = write_result(NAME, {"command": command_line(), "machine": machine, "args": vars(args), "file_bytes": size,
                              "path": str(path), "disk_free_bytes_before": free, "generate_s": generate_s,
                              "passes": passes, "table": rows}, args.out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
