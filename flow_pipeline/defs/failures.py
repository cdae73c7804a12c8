"""Why a training run failed, as a run tag, so the retry schedule re-runs only what a retry can fix.

The kind is written as the run tag ``flow_pipeline/failure`` by ``trained_checkpoint`` (from the training process's
``failure.json``, or from its own validation), by ``evaluation`` (from the exception it caught) and by the
``fail_orphaned_runs`` sensor (``killed``). A run failed with no tag (the run worker itself died, the instance database
went away) counts as ``killed``.

Not retried — the same config on the same data fails the same way (and resume is bit-exact, so a diverged run
diverges again): ``config``, ``data``, ``diverged``. Retried up to the attempt cap: everything else.
"""

from __future__ import annotations

import errno

import dagster as dg

from flow_pipeline.core.checkpoint import CheckpointError
from flow_pipeline.core.data import DataError, DatasetChoiceError, MissingDataError

FAILURE_KIND_TAG = "flow_pipeline/failure"

CONFIG = "config"  # the run config does not validate, or does not match the checkpoint it must resume
DATA = "data"  # malformed input data or an unreadable checkpoint
DIVERGED = "diverged"  # non-finite loss or gradient
DISK_FULL = "disk_full"  # a write hit ENOSPC: succeeds once space is freed
MISSING_INPUT = "missing_input"  # an upstream asset is not materialized yet
KILLED = "killed"  # the process was killed (SIGKILL, OOM killer) or vanished without a report
ERROR = "error"  # any other exception

NOT_RETRIED = {
    CONFIG: "bad config: a retry would fail the same way",
    DATA: "bad data: a retry would fail the same way",
    DIVERGED: "diverged: a bit-exact resume would diverge again; change lr/grad_clip and launch it yourself",
}

# Exception class names of the training process (failure.json's "error") and what they mean.
_KIND_OF_ERROR = {
    "ValidationError": CONFIG,
    "ValueError": CONFIG,
    "DataError": DATA,
    "MissingDataError": DATA,
    "DatasetChoiceError": DATA,
    "CheckpointError": DATA,
    "TrainingDiverged": DIVERGED,
    "MemoryError": KILLED,
}


def classify_training_failure(failure: dict | None) -> str:
    """The kind of a training process's failure from its ``failure.json`` (``error``: exception class name,
    ``errno`` when it was an OSError); None — the process left no report — means it was killed."""
    if failure is None:
        return KILLED
    if failure.get("errno") == errno.ENOSPC:
        return DISK_FULL
    return _KIND_OF_ERROR.get(str(failure.get("error")), ERROR)


def data_failure_kind(error: DataError) -> str:
    """The kind of a data problem found before training starts: the run's ``dataset`` does not fit the splits
    (config), an upstream file is not there yet (missing input), or the data is bad."""
    if isinstance(error, DatasetChoiceError):
        return CONFIG
    return MISSING_INPUT if isinstance(error, MissingDataError) else DATA


def evaluation_failure_kind(error: Exception) -> str:
    """The kind of an evaluation's (or the report's) failure: an unreadable checkpoint or bad data (``data``, or the
    kinds of :func:`data_failure_kind`), an invalid setting (``ValueError``: ``config``), a full disk, or anything
    else."""
    if isinstance(error, CheckpointError):
        return DATA
    if isinstance(error, DataError):
        return data_failure_kind(error)
    if isinstance(error, ValueError):
        return CONFIG
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return DISK_FULL
    return ERROR


def tagged_failure(context: dg.AssetExecutionContext, kind: str, description: str) -> dg.Failure:
    """A Failure whose run carries the failure kind as a tag (read by the retry schedules)."""
    context.instance.add_run_tags(context.run.run_id, {FAILURE_KIND_TAG: kind})
    return dg.Failure(description=f"{description} [failure: {kind}]")


def retry_verdict(kind: str | None) -> str | None:
    """None if a run that failed with ``kind`` (None: untagged) should be retried, else why it is not."""
    return NOT_RETRIED.get(kind or KILLED)
