"""Pool slot claims on a SQLite instance are serialised across processes, so a pool of limit N never runs N + 1 steps.

Dagster 1.13.27 (the pinned version) claims a slot in separate statements: it counts the assigned steps
(``has_unassigned_slots``), then inserts the step as assigned, then picks a free slot row and updates it without
re-checking that the row is still free. SQLite ignores ``SELECT ... FOR UPDATE``, so two runs that claim at the same
moment both see the free slot and both take it: CI saw two of three partitions launched at once train together under
``gpu`` limit 1. An exclusive ``flock`` on a file beside the event log database makes each claim (and each free, which
re-assigns the queue) one step at a time for every process on the machine, which is all a SQLite instance serves.
Postgres instances are left to Dagster's row locks. :func:`install` is applied when the definitions load (run
workers and the CLI, the processes that claim slots).
"""

from __future__ import annotations

import fcntl
import functools
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from dagster._core.storage.event_log.sqlite.sqlite_event_log import SqliteEventLogStorage

LOCK_FILE_NAME = "pool-claims.lock"
SERIALISED_METHODS = ("claim_concurrency_slot", "free_concurrency_slot_for_step", "free_concurrency_slots_for_run")


@contextmanager
def exclusive_pool_lock(storage: SqliteEventLogStorage) -> Iterator[None]:
    """Hold the instance-wide pool lock (``<event log dir>/pool-claims.lock``) for the duration of the block."""
    # ``_base_dir`` is where this storage keeps its databases: one lock per instance, whatever DAGSTER_HOME is.
    with open(os.path.join(storage._base_dir, LOCK_FILE_NAME), "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)  # released when the file closes, also if the process dies
        yield


def _serialised(method: Callable) -> Callable:
    @functools.wraps(method)
    def under_pool_lock(self: SqliteEventLogStorage, *args, **kwargs):
        with exclusive_pool_lock(self):
            return method(self, *args, **kwargs)

    under_pool_lock.serialised_by_flow_pipeline = True
    return under_pool_lock


def install() -> None:
    """Wrap SQLite storage's claim and free methods in :func:`exclusive_pool_lock` (once, however often called)."""
    for name in SERIALISED_METHODS:
        method = getattr(SqliteEventLogStorage, name)
        if not getattr(method, "serialised_by_flow_pipeline", False):
            setattr(SqliteEventLogStorage, name, _serialised(method))
