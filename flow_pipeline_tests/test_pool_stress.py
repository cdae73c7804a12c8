"""The gpu pool under simultaneous claims (pool_stress.py): six runs at limit 2 meet at a barrier and claim the pool in
the same instant, from ``dagster job execute`` processes and through the daemon's queue (and six threads of one
process), on SQLite and on a real PostgreSQL server. Never more than 2 hold it at once, and every run succeeds. The full stress (20 rounds per path)
is ``python -m benchmarks.pool_stress``; its figures are in RELIABILITY.md."""

from __future__ import annotations

import random

import pytest

from flow_pipeline_tests.pool_stress import StressSettings, max_holding, run_stress
from flow_pipeline_tests.postgres_server import PostgresUnavailable, find_bin_dir


def holding_at(spans: list[dict], moment: float) -> int:
    return sum(span["start"] <= moment < span["end"] for span in spans)


def test_max_holding_is_the_most_spans_open_at_any_start():
    rng = random.Random()
    for _ in range(50):
        spans = []
        for _ in range(rng.randint(1, 12)):
            start = rng.choice([rng.uniform(0, 10), float(rng.randint(0, 10))])  # whole numbers: shared ends/starts
            spans.append({"start": start, "end": start + rng.choice([1.0, rng.uniform(0.1, 3)])})
        # The count can only rise at a start, so the most open at any start is the most at any moment.
        assert max_holding(spans) == max(holding_at(spans, span["start"]) for span in spans)
    assert max_holding([{"start": 0.0, "end": 1.0}, {"start": 1.0, "end": 2.0}]) == 1  # back to back: not together
    assert max_holding([]) == 0


def test_settings_that_cannot_work_are_named():
    for bad, field in [({"storage": "mysql"}, "storage"), ({"runs": 2, "limit": 2}, "runs"),
                       ({"runs": 9, "limit": 2}, "runs: 9 > 8"), ({"paths": ["ui"]}, "paths")]:
        with pytest.raises(ValueError, match=field):
            StressSettings(**bad).check()


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize("storage", ["sqlite", "postgres"])
def test_six_simultaneous_claims_never_exceed_a_gpu_pool_of_two(storage, tmp_path):
    if storage == "postgres":
        try:
            find_bin_dir()
        except PostgresUnavailable as exc:
            pytest.skip(str(exc))
    settings = StressSettings(storage=storage, runs=6, limit=2, rounds=1, paths=("cli", "queue", "threads"))
    report = run_stress(settings, tmp_path)
    explained = "\n".join(str(r) for r in report.rounds)
    assert [r.path for r in report.rounds] == ["cli", "queue", "threads"], explained
    assert report.runs_failed == 0, f"{explained}\nlogs under {tmp_path}"
    assert report.claims_tried == 18
    # The pool is full (two hold it together) and never over-full, in every round.
    assert [r.max_holding for r in report.rounds] == [2, 2, 2], explained
