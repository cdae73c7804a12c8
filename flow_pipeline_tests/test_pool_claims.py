"""Two runs claiming the last gpu slot at the same moment: one gets it, the other waits (defs/pool_claims.py), on
SQLite and on a real PostgreSQL server."""

import contextlib
import threading
from dataclasses import dataclass

import dagster as dg
import pytest
import sqlalchemy
from dagster_postgres import PostgresEventLogStorage

import flow_pipeline.definitions  # noqa: F401  (installs the fix, as every run worker does by loading the code)
from flow_pipeline.defs.pool_claims import SERIALISED_METHODS
from dagster._core.storage.event_log.sqlite.sqlite_event_log import SqliteEventLogStorage

STEP = "trained_checkpoint"


def claim_at_the_same_moment(storage, run_ids: list[str]) -> dict[str, bool]:
    """Each run claims from its own thread; both pass Dagster's free-slot count before either records its claim.

    The count is where Dagster 1.13 reads without a lock; a barrier makes the threads meet right after it (or, when
    claims are serialised, the first one waits there in vain for a second and goes on alone).
    """
    meet = threading.Barrier(len(run_ids))
    count_free_slots = storage.has_unassigned_slots

    def count_then_meet(concurrency_key):
        free = count_free_slots(concurrency_key)
        try:
            meet.wait(timeout=2)
        except threading.BrokenBarrierError:
            pass
        return free

    storage.has_unassigned_slots = count_then_meet
    claimed: dict[str, bool] = {}

    def claim(run_id):
        claimed[run_id] = storage.claim_concurrency_slot("gpu", run_id, STEP).is_claimed

    threads = [threading.Thread(target=claim, args=(run_id,)) for run_id in run_ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    del storage.has_unassigned_slots
    return claimed


def assigned_runs(storage, run_ids: list[str]) -> list[str]:
    return [r for r in run_ids if storage.check_concurrency_claim("gpu", r, STEP).is_assigned]


def test_simultaneous_claims_on_a_limit_one_pool_give_the_slot_to_one_run():
    with dg.instance_for_test() as instance:
        storage = instance.event_log_storage
        assert isinstance(storage, SqliteEventLogStorage)
        storage.set_concurrency_slots("gpu", 1)
        runs = ["run-a", "run-b"]
        claimed = claim_at_the_same_moment(storage, runs)
        assert sorted(claimed.values()) == [False, True]
        assert len(assigned_runs(storage, runs)) == 1
        winner = next(r for r in runs if claimed[r])
        loser = next(r for r in runs if not claimed[r])
        # The loser gets the slot once the winner frees it, as a queued step should.
        storage.free_concurrency_slot_for_step(winner, STEP)
        assert storage.claim_concurrency_slot("gpu", loser, STEP).is_claimed


def test_without_the_lock_the_pinned_dagster_assigns_one_slot_to_both(monkeypatch):
    """The race the lock removes is real on this Dagster: the harness above does catch it."""
    for name in SERIALISED_METHODS:
        monkeypatch.setattr(SqliteEventLogStorage, name, getattr(SqliteEventLogStorage, name).__wrapped__)
    with dg.instance_for_test() as instance:
        storage = instance.event_log_storage
        storage.set_concurrency_slots("gpu", 1)
        runs = ["run-a", "run-b"]
        claim_at_the_same_moment(storage, runs)
        assert assigned_runs(storage, runs) == runs


@contextlib.contextmanager
def meeting_after_the_free_slot_is_picked(storage, parties: int):
    """Each claiming thread waits for the others (up to 2 s) right after the statement that picks a free slot row
    (``FOR UPDATE SKIP LOCKED``). Without a lock around the claim, all of them have then picked the same row before
    any takes it: PostgreSQL storage runs in autocommit, so the row lock ends with that statement."""
    meet = threading.Barrier(parties)

    def after_execute(conn, cursor, statement, parameters, context, executemany):
        if "SKIP LOCKED" in statement:
            with contextlib.suppress(threading.BrokenBarrierError):
                meet.wait(timeout=2)

    sqlalchemy.event.listen(storage._engine, "after_cursor_execute", after_execute)
    try:
        yield
    finally:
        sqlalchemy.event.remove(storage._engine, "after_cursor_execute", after_execute)


@dataclass
class PostgresClaims:
    told_claimed: dict[str, bool]  # run -> what its claim returned
    holders: list[str]  # the runs the slot table names afterwards


def postgres_claims_at_the_same_moment(home, run_ids: list[str]) -> PostgresClaims:
    """The runs claim the one slot of the pool on the PostgreSQL instance at ``home``, then free it again."""
    with dg.DagsterInstance.from_config(str(home)) as instance:
        storage = instance.event_log_storage
        assert isinstance(storage, PostgresEventLogStorage)
        storage.set_concurrency_slots("gpu", 1)
        with meeting_after_the_free_slot_is_picked(storage, len(run_ids)):
            claimed = claim_at_the_same_moment(storage, run_ids)
        holders = [r for r in run_ids if storage.check_concurrency_claim("gpu", r, STEP).is_claimed]
        for run_id in run_ids:  # the module's server is shared by its tests
            storage.free_concurrency_slots_for_run(run_id)
    return PostgresClaims(claimed, holders)


def test_simultaneous_claims_on_postgres_give_the_one_slot_to_one_run(postgres_home):
    claims = postgres_claims_at_the_same_moment(postgres_home, ["run-a", "run-b"])
    assert sorted(claims.told_claimed.values()) == [False, True]
    assert claims.holders == [run for run, claimed in claims.told_claimed.items() if claimed]


def test_without_the_lock_the_pinned_dagster_on_postgres_lets_both_runs_claim_one_slot(postgres_home, monkeypatch):
    """The race is real on PostgreSQL too: both runs are told they hold the slot, so both would train."""
    for name in SERIALISED_METHODS:
        monkeypatch.setattr(PostgresEventLogStorage, name, getattr(PostgresEventLogStorage, name).__wrapped__)
    claims = postgres_claims_at_the_same_moment(postgres_home, ["run-a", "run-b"])
    assert claims.told_claimed == {"run-a": True, "run-b": True}
    assert len(claims.holders) == 1  # the later update overwrote the earlier one's row


@pytest.mark.parametrize("calls", [1, 2])
def test_install_wraps_each_method_once(calls):
    from flow_pipeline.defs.pool_claims import install

    for _ in range(calls):
        install()
    for storage_class in (SqliteEventLogStorage, PostgresEventLogStorage):
        for name in SERIALISED_METHODS:
            method = getattr(storage_class, name)
            assert method.serialised_by_flow_pipeline
            assert not getattr(method.__wrapped__, "serialised_by_flow_pipeline", False)
