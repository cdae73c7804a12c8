"""Early stopping: patience counted only after warmup, min_delta, resets, state round trip."""

from __future__ import annotations

import json
import math
import random

import pytest

from flow_pipeline.core.early_stopping import EarlyStopping


def _feed(stopper: EarlyStopping, losses, counting=True) -> list[bool]:
    return [stopper.update(loss, counting=counting) for loss in losses]


@pytest.mark.parametrize("patience", [1, 3, 5])
def test_stops_after_exactly_patience_bad_epochs(patience):
    rng = random.Random(patience)
    stopper = EarlyStopping(patience=patience)
    best = 1.0 + rng.random()
    assert stopper.update(best) is True
    for i in range(patience):
        assert not stopper.should_stop, f"stopped after {i} bad epochs, patience {patience}"
        assert stopper.update(best + rng.random() + 1e-3) is False
    assert stopper.should_stop
    assert stopper.bad_epochs == patience
    assert stopper.best_loss == best


def test_patience_zero_stops_on_the_first_counted_bad_epoch():
    stopper = EarlyStopping(patience=0)
    stopper.update(1.0)
    stopper.update(1.5)
    assert stopper.should_stop


def test_bad_epochs_during_warmup_are_ignored_but_improvements_count():
    stopper = EarlyStopping(patience=2)
    assert _feed(stopper, [1.3, 1.4, 1.5, 1.6, 1.7], counting=False) == [True, False, False, False, False]
    assert stopper.bad_epochs == 0 and not stopper.should_stop
    # An improvement during warmup still updates the best loss.
    assert stopper.update(0.9, counting=False) is True
    assert stopper.best_loss == 0.9
    # After warmup the counting starts from zero.
    stopper.update(1.0)
    assert not stopper.should_stop
    stopper.update(1.0)
    assert stopper.should_stop


def test_min_delta_requires_a_large_enough_improvement():
    stopper = EarlyStopping(patience=2, min_delta=0.05)
    assert stopper.update(1.0)
    assert stopper.update(0.96) is False  # 0.04 better: not enough
    assert stopper.best_loss == 1.0 and stopper.bad_epochs == 1
    assert stopper.update(0.94) is True  # 0.06 better
    assert stopper.best_loss == 0.94 and stopper.bad_epochs == 0
    assert stopper.update(0.90) is False
    assert stopper.update(0.891) is False  # still within min_delta of 0.94
    assert stopper.should_stop
    assert stopper.best_loss == 0.94


def test_improvement_resets_the_count():
    stopper = EarlyStopping(patience=3)
    pattern = [2.0, 2.1, 2.2, 1.9, 2.5, 2.6, 1.8, 2.0, 2.0]
    improved = _feed(stopper, pattern)
    assert improved == [True, False, False, True, False, False, True, False, False]
    assert stopper.bad_epochs == 2 and not stopper.should_stop
    stopper.update(2.0)
    assert stopper.should_stop


def test_nan_loss_is_never_an_improvement():
    stopper = EarlyStopping(patience=1)
    stopper.update(1.0)
    assert stopper.update(math.nan) is False
    assert stopper.best_loss == 1.0


def test_state_dict_round_trip_continues_identically():
    rng = random.Random(7)
    losses = [1.0 + rng.random() for _ in range(30)]
    reference = EarlyStopping(patience=4, min_delta=0.01)
    ref_out = _feed(reference, losses[:3], counting=False) + _feed(reference, losses[3:])

    first = EarlyStopping(patience=4, min_delta=0.01)
    out = _feed(first, losses[:3], counting=False) + _feed(first, losses[3:11])
    state = json.loads(json.dumps(first.state_dict()))  # plain types only
    second = EarlyStopping()  # defaults differ: patience and min_delta must come from the state
    second.load_state_dict(state)
    assert second == first
    out += _feed(second, losses[11:])
    assert out == ref_out
    assert second.state_dict() == reference.state_dict()


def test_state_dict_round_trip_of_infinite_best():
    state = EarlyStopping(patience=3).state_dict()
    restored = EarlyStopping(patience=9)
    restored.load_state_dict(state)
    assert restored.best_loss == math.inf and restored.patience == 3
