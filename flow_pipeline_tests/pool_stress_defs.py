"""The code location of the gpu pool stress test (pool_stress.py): runs of ``gpu_pool_stress`` first wait for one
another at a barrier, then all claim the ``gpu`` pool in the same instant and hold it for a moment, each appending
when its step held the pool to ``spans.jsonl``. A tiny op stands in for a training, so the CPU stays free for the
Dagster processes themselves.

Loading this module applies the project's pool fixes as ``flow_pipeline.definitions`` does; with
``POOL_STRESS_WITHOUT_LOCK=1`` in the environment the claims are left to Dagster alone (to show what the lock stops).
"""

import json
import os
import time
from pathlib import Path

import dagster as dg

from flow_pipeline.defs.pool_claims import install as serialise_pool_claims
from flow_pipeline.defs.pool_wait import install as sleep_while_waiting_for_a_pool_slot

WITHOUT_LOCK_ENV = "POOL_STRESS_WITHOUT_LOCK"
SPANS_NAME = "spans.jsonl"
READY_PREFIX = "ready-"
POLL_S = 0.01


class BarrierConfig(dg.Config):
    directory: str  # the round's directory, shared by its runs
    parties: int  # how many runs meet there
    timeout_s: float = 180.0  # then go on alone (a run that never started must not hang the others)


@dg.op
def meet_the_other_runs(context: dg.OpExecutionContext, config: BarrierConfig) -> str:
    """Mark this run ready in the round's directory and wait until ``parties`` runs are; returns the directory."""
    directory = Path(config.directory)
    (directory / f"{READY_PREFIX}{context.run_id}").touch()
    deadline = time.monotonic() + config.timeout_s
    while len(list(directory.glob(f"{READY_PREFIX}*"))) < config.parties:
        if time.monotonic() > deadline:
            context.log.warning(f"went on after {config.timeout_s:.0f} s without all {config.parties} runs")
            break
        time.sleep(POLL_S)
    return config.directory


class HoldConfig(dg.Config):
    hold_s: float = 1.0


@dg.op(pool="gpu")
def hold_the_gpu(context: dg.OpExecutionContext, config: HoldConfig, directory: str) -> None:
    """Hold the pool slot ``hold_s`` seconds; append {run_id, pid, start, end} (wall clock) as one line."""
    start = time.time()
    time.sleep(config.hold_s)
    span = {"run_id": context.run_id, "pid": os.getpid(), "start": start, "end": time.time()}
    with open(Path(directory) / SPANS_NAME, "a", encoding="utf-8") as spans:  # one short O_APPEND write per run
        spans.write(json.dumps(span) + "\n")


@dg.job(executor_def=dg.in_process_executor)
def gpu_pool_stress():
    hold_the_gpu(meet_the_other_runs())


if os.environ.get(WITHOUT_LOCK_ENV) != "1":
    serialise_pool_claims()
sleep_while_waiting_for_a_pool_slot()

defs = dg.Definitions(jobs=[gpu_pool_stress])
