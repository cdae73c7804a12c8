"""A run that waits for a ``gpu`` pool slot sleeps between its claim attempts instead of spinning.

Dagster 1.13.27 (the pinned version) computes the time to the next pending claim check as
``min([0, *(ready_at - now ...)])``, which is never positive, so the run worker's execution loop never sleeps while a
step waits for a slot: each waiting run burns about a third of a core (measured: three waiting
``dagster asset materialize`` processes at 37% CPU each beside one training on a 2-core machine). On a CPU-only
machine that is compute taken from the training that holds the slot. Claims themselves are still attempted only when
their back-off (1 s growing to 15 s) expires, so sleeping until then changes no start time. The upstream fix was
proposed in dagster-io/dagster#20367; :func:`install` is applied when the definitions load (run workers and CLI).
"""

from __future__ import annotations

import time

from dagster._core.execution.plan.instance_concurrency_context import InstanceConcurrencyContext


def interval_to_next_pending_claim_check(context: InstanceConcurrencyContext) -> float:
    """Seconds until the earliest pending claim may be attempted again: 0 when one is due or none is pending."""
    now = time.time()
    # A pending claim without a back-off yet is due now (``.get``: the timeouts are a defaultdict).
    waits = [context._pending_timeouts.get(step_key, now) - now for step_key in context._pending_claims]
    return max(0.0, min(waits)) if waits else 0.0


def install() -> None:
    """Replace Dagster's interval computation by :func:`interval_to_next_pending_claim_check`."""
    InstanceConcurrencyContext.interval_to_next_pending_claim_check = interval_to_next_pending_claim_check
