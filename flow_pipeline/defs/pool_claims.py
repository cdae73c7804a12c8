"""Pool slot claims are serialised across processes, on SQLite and on PostgreSQL instances, so a pool of limit N never
runs N + 1 steps.

Dagster 1.13.27 (the pinned version) claims a slot in separate statements: it counts the assigned steps
(``has_unassigned_slots``), then inserts the step as assigned, then picks a free slot row with ``SELECT ... FOR UPDATE
SKIP LOCKED`` and updates it without re-checking that the row is still free. Two runs that claim at the same moment
both see the free row and both take it:

- SQLite ignores ``FOR UPDATE``: CI saw two of three partitions launched at once train together under ``gpu`` limit 1.
- PostgreSQL storage runs every statement in autocommit, so the row lock ends with the ``SELECT``, before the update
  (as a review of dagster-io/dagster#34092 notes for the same storage). Measured on a real server: of six threads
  claiming a limit-2 pool at once, 3 to 5 were told they hold a slot in 12 of 20 rounds (RELIABILITY.md).

So each claim, and each free (which re-assigns the queue), holds an exclusive lock for the whole instance:

- SQLite: an ``flock`` on a file beside the event log database (every process of the machine, which is all a SQLite
  instance serves);
- PostgreSQL: a transaction-level advisory lock (``pg_advisory_xact_lock``) on its own connection, shared by every
  process and machine using the database; the server drops it if the holder dies.

Dagster's supported settings do not close the race: ``concurrency: pools: granularity: run`` skips the step's claim
(then a ``dagster asset materialize`` run, which bypasses the queue, is not limited at all), and the queue's pool
check (``block_op_concurrency_limited_runs``, ``op_granularity_run_buffer``) gates only queued runs and counts a
started run for its first 5 s, so more runs than slots can still claim together. :func:`install` is applied when the
definitions load (run workers and the CLI: the processes that claim slots).
"""

from __future__ import annotations

import fcntl
import functools
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

import sqlalchemy
from dagster._core.storage.event_log.sqlite.sqlite_event_log import SqliteEventLogStorage

LOCK_FILE_NAME = "pool-claims.lock"
# Any 64-bit key works as long as every process uses the same one: the bytes of "gpu-pool", read as an integer.
POSTGRES_LOCK_KEY = int.from_bytes(b"gpu-pool", "big")
SERIALISED_METHODS = ("claim_concurrency_slot", "free_concurrency_slot_for_step", "free_concurrency_slots_for_run")


@contextmanager
def exclusive_pool_lock(storage: SqliteEventLogStorage) -> Iterator[None]:
    """Hold the instance-wide pool lock (``<event log dir>/pool-claims.lock``) for the duration of the block."""
    # ``_base_dir`` is where this storage keeps its databases: one lock per instance, whatever DAGSTER_HOME is.
    with open(os.path.join(storage._base_dir, LOCK_FILE_NAME), "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)  # released when the file closes, also if the process dies
        yield


@contextmanager
def postgres_pool_lock(storage) -> Iterator[None]:
    """Hold the database-wide pool lock (advisory lock :data:`POSTGRES_LOCK_KEY`) for the duration of the block.

    ``storage``: a ``dagster_postgres.PostgresEventLogStorage``. The lock lives in a transaction of its own connection,
    so it ends with that transaction: at the end of the block, or when the connection dies with its process.
    """
    with storage.index_transaction() as connection:
        connection.execute(sqlalchemy.text("SELECT pg_advisory_xact_lock(:key)"), {"key": POSTGRES_LOCK_KEY})
        yield


def _serialised(method: Callable, lock: Callable[[object], AbstractContextManager]) -> Callable:
    @functools.wraps(method)
    def under_pool_lock(self, *args, **kwargs):
        with lock(self):
            return method(self, *args, **kwargs)

    under_pool_lock.serialised_by_flow_pipeline = True
    return under_pool_lock


def locked_storages() -> dict[type, Callable[[object], AbstractContextManager]]:
    """Each event log storage class whose claims :func:`install` serialises, with its lock (PostgreSQL's only where
    the ``postgres`` extra, dagster-postgres, is installed: without it no instance can use PostgreSQL)."""
    locks: dict[type, Callable[[object], AbstractContextManager]] = {SqliteEventLogStorage: exclusive_pool_lock}
    try:
        from dagster_postgres import PostgresEventLogStorage
    except ImportError:
        return locks
    locks[PostgresEventLogStorage] = postgres_pool_lock
    return locks


def install() -> None:
    """Wrap each storage's claim and free methods in its pool lock (once, however often called)."""
    for storage_class, lock in locked_storages().items():
        for name in SERIALISED_METHODS:
            method = getattr(storage_class, name)
            if not getattr(method, "serialised_by_flow_pipeline", False):
                setattr(storage_class, name, _serialised(method, lock))
