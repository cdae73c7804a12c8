"""The short soak: two partitions with two replicates each on PostgreSQL + daemon (gpu pool 2), while two training
processes and one run worker are SIGKILLed and PostgreSQL restarts. Everything must end materialized, no checkpoint
corrupt, the pool never exceeded, and a killed-and-resumed replicate equal to an uninterrupted run bit for bit.
The full soak (12 partitions, >= 10 kills) is ``python -m benchmarks.soak``; its figures are in RELIABILITY.md."""

from __future__ import annotations

import pytest

from flow_pipeline_tests.postgres_server import PostgresUnavailable, find_bin_dir
from flow_pipeline_tests.soak import SoakSettings, run_soak

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_a_short_soak_ends_with_everything_materialized_and_intact(tmp_path):
    try:
        find_bin_dir()
    except PostgresUnavailable as exc:
        pytest.skip(str(exc))
    settings = SoakSettings(partitions=["mlp-icfm", "dit-fm"], replicates=2, training_kills=2, worker_kills=1,
                            postgres_restarts=1, verify_resumed=1, timeout_s=900)
    report = run_soak(settings, tmp_path)
    explained = "\n".join(report.events)
    assert report.not_materialized == [], explained
    assert report.corrupt_checkpoints == [], explained
    assert report.checkpoints_checked == 4, explained
    assert 1 <= report.max_concurrent_trainings <= settings.pool, explained
    assert (report.training_kills, report.worker_kills, report.postgres_restarts) == (2, 1, 1), explained
    assert report.retry_runs >= 1, explained
    assert report.bit_identical and all(report.bit_identical.values()), (report.bit_identical, explained)
