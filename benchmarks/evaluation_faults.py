"""SIGKILL evaluations and the report at random moments and at every atomic write, then check that nothing on disk is
torn, the old results stay byte for byte and a re-run completes; prints and saves the figures.

    python -m benchmarks.evaluation_faults                      # 6 random kills per target + every write point
    python -m benchmarks.evaluation_faults --random-kills 20 --seed 3

Harness: flow_pipeline_tests/evaluation_faults.py; results: benchmarks/results/evaluation_faults.json; see
RELIABILITY.md.
"""

from __future__ import annotations

import argparse
import collections
import tempfile
from pathlib import Path

from benchmarks.common import command_line, machine_info, write_result
from flow_pipeline_tests.evaluation_faults import TARGETS, WRITE_POINTS, FaultSettings, run_faults


def main() -> None:
    defaults = FaultSettings()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--random-kills", type=int, default=defaults.random_kills, help="per target")
    parser.add_argument("--write-points", nargs="*", choices=WRITE_POINTS, default=list(defaults.write_points))
    parser.add_argument("--targets", nargs="+", choices=TARGETS, default=list(defaults.targets))
    parser.add_argument("--seed", type=int, default=defaults.seed, help="of the random kill moments")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--workdir", type=Path, default=None, help="kept; default: a new temp directory")
    args = parser.parse_args()
    settings = FaultSettings(random_kills=args.random_kills, write_points=tuple(args.write_points),
                             targets=tuple(args.targets), seed=args.seed)
    machine = machine_info()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="evaluation-faults-"))
    report = run_faults(settings, workdir)
    print(f"instance and artifacts kept in {workdir}")
    by_point = collections.Counter((kill["target"], kill.get("point", "random moment")) for kill in report.kills)
    for (target, point), count in sorted(by_point.items()):
        print(f"{target:15} {point:14} {count:3d} kills")
    summary = {key: value for key, value in report.as_dict().items() if key not in ("kills", "writes")}
    summary["kills"] = len(report.kills)
    for key, value in summary.items():
        print(f"{key:26} {value}")
    path = write_result("evaluation_faults", {"command": command_line(), "settings": vars(args), "machine": machine,
                                              "report": report.as_dict()}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
