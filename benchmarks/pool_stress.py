"""Stress the gpu pool with simultaneous claims: rounds of runs that meet at a barrier and claim the pool in the same
instant, from ``dagster job execute`` processes and through the daemon's queue; prints and saves the figures.

    python -m benchmarks.pool_stress --storage sqlite --runs 6 --limit 2 --rounds 20
    python -m benchmarks.pool_stress --storage postgres --runs 6 --limit 2 --rounds 20
    python -m benchmarks.pool_stress --storage postgres --rounds 3 --without-lock   # Dagster's claims alone

PostgreSQL needs the server binaries (Debian package postgresql). Harness: flow_pipeline_tests/pool_stress.py; results:
benchmarks/results/pool_stress-<storage>.json; see RELIABILITY.md.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
from pathlib import Path

from benchmarks.common import command_line, machine_info, write_result
from flow_pipeline_tests.pool_stress import PATHS, STORAGES, StressSettings, run_stress


def main() -> None:
    defaults = StressSettings()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--storage", choices=STORAGES, default=defaults.storage)
    parser.add_argument("--runs", type=int, default=defaults.runs, help="runs started at once per round")
    parser.add_argument("--limit", type=int, default=defaults.limit, help="the gpu pool's limit")
    parser.add_argument("--rounds", type=int, default=defaults.rounds, help="rounds per path")
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(defaults.paths))
    parser.add_argument("--hold-s", type=float, default=defaults.hold_s, help="seconds each run holds the pool")
    parser.add_argument("--without-lock", action="store_true", help="leave the claims to Dagster alone")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--workdir", type=Path, default=None, help="where the instance, rounds and logs go (kept; "
                        "default: a new temp directory)")
    args = parser.parse_args()
    settings = StressSettings(storage=args.storage, runs=args.runs, limit=args.limit, rounds=args.rounds,
                              paths=args.paths, hold_s=args.hold_s, with_lock=not args.without_lock)
    try:
        settings.check()
    except ValueError as exc:
        parser.error(str(exc))
    # A SIGTERM must still stop PostgreSQL and the servers in their finally blocks.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    machine = machine_info()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="pool-stress-"))
    report = run_stress(settings, workdir)
    print(f"instance, rounds and server logs kept in {workdir}")
    print(f"{'path':6} {'round':>5} {'ok':>5} {'holding':>7} {'spread s':>8} {'seconds':>7}")
    for r in report.rounds:
        print(f"{r.path:6} {r.round:5d} {r.succeeded:2d}/{r.runs:<2d} {r.max_holding:7d} {r.claim_spread_s:8.3f} "
              f"{r.seconds:7.1f}")
    summary = {key: value for key, value in report.as_dict().items() if key != "rounds"}
    print("  ".join(f"{key}={value}" for key, value in summary.items()))
    suffix = "" if settings.with_lock else "-without-lock"
    path = write_result(f"pool_stress-{settings.storage}{suffix}", {
        "command": command_line(), "settings": vars(args), "machine": machine, "report": report.as_dict()}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
