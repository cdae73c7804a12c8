"""Warmup-cosine LR from a real AdamW + LambdaLR, against the closed form written here."""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import pytest
import torch

from flow_pipeline.core.schedule import plan_steps, warmup_cosine_schedule

BASE_LR = 3e-3


def expected_lr(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR of the optimizer step with 0-based index ``step``: linear warmup reaching the base LR on the last warmup
    step, then a half cosine from the base LR down to ``min_ratio`` * base at ``total``, flat afterwards."""
    if step < warmup:
        return BASE_LR * (step + 1) / warmup
    span = max(1, total - warmup)
    p = min(step - warmup, span) / span
    return BASE_LR * (min_ratio + (1 - min_ratio) * (1 + math.cos(math.pi * p)) / 2)


def _lrs_used_by_each_step(warmup: int, total: int, min_ratio: float, n_steps: int) -> list[float]:
    """Run a real AdamW on a small random regression for ``n_steps`` steps; the LR each step was taken with."""
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Linear(6, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=BASE_LR, weight_decay=0.01)
    scheduler = warmup_cosine_schedule(optimizer, warmup, total, min_ratio)
    used = []
    for _ in range(n_steps):
        x = torch.randn(8, 6, generator=g)
        loss = (model(x) - x[:, :3]).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        used.append(optimizer.param_groups[0]["lr"])
        before = model.weight.detach().clone()
        optimizer.step()
        if used[-1] > 0:
            assert not torch.equal(model.weight, before), "an optimizer step with LR > 0 did not move the weights"
        scheduler.step()
    return used


@pytest.mark.parametrize("warmup,total,min_ratio", [(10, 50, 0.1), (7, 40, 0.0), (4, 23, 0.25)])
def test_lr_at_chosen_steps_matches_closed_form(warmup, total, min_ratio):
    n_steps = total + 6
    used = _lrs_used_by_each_step(warmup, total, min_ratio, n_steps)
    chosen = {
        "first": 0,
        "mid_warmup": warmup // 2,
        "end_of_warmup": warmup - 1,
        "start_of_cosine": warmup,
        "mid_cosine": warmup + (total - warmup) // 2,
        "end": total,
        "past_end": total + 5,
    }
    for label, step in chosen.items():
        assert used[step] == pytest.approx(expected_lr(step, warmup, total, min_ratio), rel=1e-9, abs=1e-15), label
    # Anchors that do not depend on how the closed form is written.
    assert used[warmup - 1] == pytest.approx(BASE_LR, rel=1e-9)
    assert used[total] == pytest.approx(min_ratio * BASE_LR, rel=1e-9, abs=1e-15)
    assert used[total + 5] == pytest.approx(min_ratio * BASE_LR, rel=1e-9, abs=1e-15)
    if (total - warmup) % 2 == 0:
        assert used[chosen["mid_cosine"]] == pytest.approx(BASE_LR * (1 + min_ratio) / 2, rel=1e-9)
    # Every step: the closed form, warmup increasing, cosine non-increasing.
    for step, lr in enumerate(used):
        assert lr == pytest.approx(expected_lr(step, warmup, total, min_ratio), rel=1e-9, abs=1e-15), step
    assert all(a < b for a, b in zip(used[:warmup], used[1:warmup]))
    assert all(a >= b for a, b in zip(used[warmup:], used[warmup + 1 :]))


def test_first_step_lr_is_positive():
    used = _lrs_used_by_each_step(warmup=100, total=1000, min_ratio=0.1, n_steps=1)
    assert used[0] > 0
    assert used[0] == pytest.approx(BASE_LR / 100, rel=1e-9)


def test_no_warmup_starts_at_base_lr():
    used = _lrs_used_by_each_step(warmup=0, total=20, min_ratio=0.1, n_steps=21)
    assert used[0] == pytest.approx(BASE_LR, rel=1e-9)
    assert used[20] == pytest.approx(0.1 * BASE_LR, rel=1e-9)
    for step, lr in enumerate(used):
        assert lr == pytest.approx(expected_lr(step, 0, 20, 0.1), rel=1e-9), step


def test_scheduler_state_dict_resumes_the_same_lr():
    """A scheduler restored from state_dict continues the same LR sequence (no re-warm after a resume).

    Order as in a resume: build optimizer and scheduler, then load the optimizer (its param groups carry the LR of
    the next step), then the scheduler (its step counter)."""
    model = torch.nn.Linear(3, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=BASE_LR)
    scheduler = warmup_cosine_schedule(optimizer, 5, 30, 0.1)
    for _ in range(12):
        optimizer.step()
        scheduler.step()
    state = scheduler.state_dict()
    model2 = torch.nn.Linear(3, 3)
    optimizer2 = torch.optim.AdamW(model2.parameters(), lr=BASE_LR)
    scheduler2 = warmup_cosine_schedule(optimizer2, 5, 30, 0.1)
    optimizer2.load_state_dict(optimizer.state_dict())
    scheduler2.load_state_dict(state)
    assert optimizer2.param_groups[0]["lr"] == pytest.approx(expected_lr(12, 5, 30, 0.1), rel=1e-9)
    for step in range(12, 20):
        assert optimizer2.param_groups[0]["lr"] == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-12)
        optimizer.step(), scheduler.step()
        optimizer2.step(), scheduler2.step()


# --- the run's steps and its warmup --------------------------------------------------------------------------------


def test_an_unset_warmup_is_a_tenth_of_the_run_at_most_200_steps():
    rng = random.Random(5)
    for _ in range(200):
        epochs, per_epoch = rng.randint(1, 80), rng.randint(1, 300)
        plan = plan_steps(SimpleNamespace(max_steps=0, max_epochs=epochs, warmup_steps=None), per_epoch)
        total = epochs * per_epoch
        assert plan.total_steps == total
        assert plan.warmup_steps == min(200, math.floor(total / 10)) < total
        assert plan.warmup_from.startswith("default") and str(total) in plan.warmup_from
    # The built-in data (15,360 training rows, batch 256: 60 steps per epoch): 3 epochs warm up over 18 steps, the
    # default 50 over 200.
    assert plan_steps(SimpleNamespace(max_steps=0, max_epochs=3, warmup_steps=None), 60).warmup_steps == 18
    assert plan_steps(SimpleNamespace(max_steps=0, max_epochs=50, warmup_steps=None), 60).warmup_steps == 200
    by_steps = plan_steps(SimpleNamespace(max_steps=1234, max_epochs=1, warmup_steps=None), 60)
    assert (by_steps.total_steps, by_steps.warmup_steps) == (1234, 123)


def test_a_set_warmup_is_kept_and_one_longer_than_the_run_names_the_field():
    plan = plan_steps(SimpleNamespace(max_steps=0, max_epochs=3, warmup_steps=150), 60)
    assert (plan.total_steps, plan.warmup_steps, plan.warmup_from) == (180, 150, "config")
    with pytest.raises(ValueError, match=r"warmup_steps: 200 >= the run's 180 optimizer steps \(max_epochs"):
        plan_steps(SimpleNamespace(max_steps=0, max_epochs=3, warmup_steps=200), 60)
