"""Soak a whole study: every partition as one backfill on PostgreSQL + daemon (gpu pool 2) while training processes
and run workers are SIGKILLed at random moments and PostgreSQL restarts; prints and saves the figures.

    python -m benchmarks.soak                                  # 12 partitions, replicates 2, 10 + 1 kills, 1 restart
    python -m benchmarks.soak --partitions mlp-icfm dit-fm --training-kills 2   # a short one

Needs root-free PostgreSQL binaries (Debian package postgresql; scripts/install.sh test installs it as root). Results:
benchmarks/results/soak.json; see RELIABILITY.md.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
from pathlib import Path

from benchmarks.common import command_line, machine_info, write_result
from flow_pipeline_tests.soak import SoakSettings, run_soak


def main() -> None:
    defaults = SoakSettings()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--partitions", nargs="+", default=defaults.partitions)
    parser.add_argument("--pool", type=int, default=defaults.pool)
    parser.add_argument("--replicates", type=int, default=defaults.replicates)
    parser.add_argument("--training-kills", type=int, default=defaults.training_kills)
    parser.add_argument("--worker-kills", type=int, default=defaults.worker_kills)
    parser.add_argument("--postgres-restarts", type=int, default=defaults.postgres_restarts)
    parser.add_argument("--verify-resumed", type=int, default=defaults.verify_resumed)
    parser.add_argument("--timeout-s", type=float, default=defaults.timeout_s)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--workdir", type=Path, default=None, help="where the instance, artifacts and logs go "
                        "(kept; default: a new temp directory)")
    args = parser.parse_args()
    settings = SoakSettings(partitions=args.partitions, pool=args.pool, replicates=args.replicates,
                            training_kills=args.training_kills, worker_kills=args.worker_kills,
                            postgres_restarts=args.postgres_restarts, verify_resumed=args.verify_resumed,
                            timeout_s=args.timeout_s, seed=args.seed)
    # A SIGTERM (timeout, Ctrl-C from a wrapper) must still stop PostgreSQL and the servers in their finally blocks.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    machine = machine_info()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="soak-"))
    report = run_soak(settings, workdir)
    print(f"instance, artifacts and server logs kept in {workdir}")
    for key, value in report.as_dict().items():
        if key != "events":
            print(f"{key:28} {value}")
    print("\n".join(report.events))
    path = write_result("soak", {"command": command_line(), "settings": vars(args), "machine": machine,
                                 "report": report.as_dict()}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
