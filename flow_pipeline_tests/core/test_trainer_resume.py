"""Resume: an interrupted run ends bit-identical to an uninterrupted one, wherever it was interrupted; a resume
reads the newer checkpoint and refuses another config."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest
import torch

from flow_pipeline.config import TrainConfig
from flow_pipeline.core import checkpoint as ckpt
from flow_pipeline.core.run_identity import RESUME_MUST_MATCH, resume_mismatches
from flow_pipeline.core.tracking import RecordingTracker
from flow_pipeline.core.trainer import TrainResult, train
from flow_pipeline_tests.core.trainer_helpers import (STEPS_PER_EPOCH, Interrupted, InterruptingTracker, data,
                                                     one_thread, tiny_config, train_rows, val_rows)


# --- bit-exact resume --------------------------------------------------------------------------------------------

_reference_runs: dict[str, tuple[TrainResult, dict]] = {}


def _reference(config: TrainConfig, data, tmp_path_factory) -> tuple[TrainResult, dict]:
    """The uninterrupted run of ``config`` (cached per config: several interruption points share it)."""
    key = config.model_dump_json()
    if key not in _reference_runs:
        run_dir = tmp_path_factory.mktemp("reference")
        tracker = RecordingTracker()
        result = train(config, data, run_dir, tracker=tracker)
        _reference_runs[key] = (result, {"state": ckpt.load_checkpoint(result.checkpoint_path), "tracker": tracker})
    return _reference_runs[key]


def _without_seconds(history):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


def _interrupt_and_resume(config, data, run_dir, when) -> tuple[TrainResult, RecordingTracker, RecordingTracker]:
    first = InterruptingTracker(when)
    with pytest.raises(Interrupted):
        train(config, data, run_dir, tracker=first)
    assert (run_dir / ckpt.LAST_NAME).exists() or (run_dir / ckpt.BEST_NAME).exists()
    second = RecordingTracker()
    result = train(config.model_copy(update={"resume": True}), data, run_dir, tracker=second)
    return result, first, second


def _assert_bit_identical(result, reference):
    ref_result, ref = reference
    state = ckpt.load_checkpoint(result.checkpoint_path)
    assert ref_result.best_epoch == 4, "test precondition: the last epoch should be the best one"
    assert state["epoch"] == ref["state"]["epoch"]
    for key in ("model_state_dict", "ema_shadow"):
        assert state[key].keys() == ref["state"][key].keys()
        for name, tensor in ref["state"][key].items():
            assert torch.equal(state[key][name], tensor), f"{key}[{name}] differs after resume"
    assert result.best_loss == ref_result.best_loss
    assert result.global_step == ref_result.global_step
    assert _without_seconds(result.history) == _without_seconds(ref_result.history)
    assert not (result.checkpoint_path.parent / ckpt.LAST_NAME).exists()


def _assert_steps_continue(first: RecordingTracker, second: RecordingTracker, resumed_from: int, total: int):
    """The resumed run logs from the step after its resume point on (never from 1), and together the two runs
    cover every step once (the step that was lost with the crash is re-done under the same number)."""
    pre = [step for step, _ in train_rows(first)]
    post = [step for step, _ in train_rows(second)]
    assert post[0] == resumed_from + 1 > 1
    assert post == list(range(resumed_from + 1, total + 1))
    assert sorted(set(pre) | set(post)) == list(range(1, total + 1))
    assert [s for s, _ in val_rows(second)] == sorted(s for s, _ in val_rows(second))
    assert all(s > resumed_from for s, _ in second.rows)


RESUME_CONFIG = dict(max_epochs=4)


@pytest.mark.slow
def test_resume_at_an_epoch_boundary_is_bit_exact(data, tmp_path, tmp_path_factory):
    config = tiny_config(**RESUME_CONFIG)
    reference = _reference(config, data, tmp_path_factory)
    # Crash right after epoch 2 was validated and saved.
    result, first, second = _interrupt_and_resume(config, data, tmp_path,
                                                  lambda step, m: "val/loss" in m and m["epoch"] == 2)
    _assert_bit_identical(result, reference)
    _assert_steps_continue(first, second, resumed_from=20, total=40)


@pytest.mark.slow
def test_resume_just_after_an_epoch_boundary_is_bit_exact(data, tmp_path, tmp_path_factory):
    config = tiny_config(**RESUME_CONFIG)
    reference = _reference(config, data, tmp_path_factory)
    # Crash during the first step of epoch 3: last.pt is still the end of epoch 2, step 21 is redone.
    result, first, second = _interrupt_and_resume(config, data, tmp_path,
                                                  lambda step, m: "train/loss" in m and step == 21)
    _assert_bit_identical(result, reference)
    _assert_steps_continue(first, second, resumed_from=20, total=40)


MID_EPOCH_CASES = {
    "mlp-icfm": dict(),
    "otcfm-sigma": dict(flow="otcfm", sigma=0.1),
    "mixup+noise": dict(aug="mixup+noise"),
    "dit-fm": dict(arch="dit", flow="fm"),
    # bf16 autocast (what precision: auto picks on a CPU with native bf16) resumes bit-exactly too.
    "bf16": dict(precision="bf16"),
    # EMA updates at steps 5, 10, ... and at the saves (8, 16, 24) and epoch ends: the resume point is one of them.
    "ema-every-5": dict(ema_every=5, save_every_steps=8),
    # warmup_steps unset: the resumed run derives the same warmup (4 of the 40 steps) as the run it continues.
    "default-warmup": dict(warmup_steps=None),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(MID_EPOCH_CASES))
def test_resume_mid_epoch_is_bit_exact(case, data, tmp_path, tmp_path_factory):
    config = tiny_config(**{**RESUME_CONFIG, "save_every_steps": 1, **MID_EPOCH_CASES[case]})
    reference = _reference(config, data, tmp_path_factory)
    # Crash at step 25 (middle of epoch 3) before its last.pt write: the resume starts after step 24.
    result, first, second = _interrupt_and_resume(config, data, tmp_path,
                                                  lambda step, m: "train/loss" in m and step == 25)
    _assert_bit_identical(result, reference)
    _assert_steps_continue(first, second, resumed_from=24, total=40)


@pytest.mark.slow
def test_resume_prefers_the_newer_checkpoint_over_a_stale_last_pt(data, tmp_path, tmp_path_factory):
    """A kill between writing best.pt and removing the older last.pt leaves both: the resume must continue from
    the newer best.pt, not replay from the stale last.pt."""
    config = tiny_config(**RESUME_CONFIG, save_every_steps=1)
    reference = _reference(config, data, tmp_path_factory)
    stale = tmp_path / "stale.pt"

    def when(step, metrics):
        if "train/loss" in metrics and step == 15:  # last.pt now holds step 14
            shutil.copyfile(tmp_path / ckpt.LAST_NAME, stale)
        return "val/loss" in metrics and metrics["epoch"] == 2

    with pytest.raises(Interrupted):
        train(config, data, tmp_path, tracker=InterruptingTracker(when))
    assert not (tmp_path / ckpt.LAST_NAME).exists(), "test precondition: epoch 2 improved and removed last.pt"
    assert ckpt.load_checkpoint(tmp_path / ckpt.BEST_NAME)["global_step"] == 20
    stale.rename(tmp_path / ckpt.LAST_NAME)  # the state a kill inside that window leaves
    second = RecordingTracker()
    result = train(config.model_copy(update={"resume": True}), data, tmp_path, tracker=second)
    assert train_rows(second)[0][0] == 21
    _assert_bit_identical(result, reference)


@pytest.mark.slow
def test_resume_twice(data, tmp_path, tmp_path_factory):
    config = tiny_config(**RESUME_CONFIG, save_every_steps=3, aug="noise")
    reference = _reference(config, data, tmp_path_factory)
    with pytest.raises(Interrupted):
        train(config, data, tmp_path, tracker=InterruptingTracker(lambda step, m: step == 8))
    resumed = config.model_copy(update={"resume": True})
    with pytest.raises(Interrupted):
        train(resumed, data, tmp_path, tracker=InterruptingTracker(lambda step, m: step == 31))
    result = train(resumed, data, tmp_path, tracker=RecordingTracker())
    _assert_bit_identical(result, reference)


def test_resume_with_a_different_config_names_the_field(data, tmp_path):
    train(tiny_config(max_epochs=1), data, tmp_path)
    with pytest.raises(ValueError) as info:
        train(tiny_config(max_epochs=2, batch_size=16, resume=True), data, tmp_path)
    assert "batch_size" in str(info.value)
    assert str(tmp_path) in str(info.value)
    with pytest.raises(ValueError, match="arch"):
        train(tiny_config(max_epochs=2, arch="dit", resume=True), data, tmp_path)
    started = tiny_config(max_epochs=1).time_sampling
    other = "uniform" if started != "uniform" else "logit_normal"
    with pytest.raises(ValueError, match=f"time_sampling: checkpoint {started!r} vs run {other!r}"):
        train(tiny_config(max_epochs=2, time_sampling=other, resume=True), data, tmp_path)


def test_a_checkpoint_from_before_the_time_sampling_knob_resumes_only_with_uniform_times():
    uniform, logit_normal = (SimpleNamespace(**{**dict.fromkeys(RESUME_MUST_MATCH), "time_sampling": how})
                             for how in ("uniform", "logit_normal"))
    saved = {key: None for key in RESUME_MUST_MATCH if key != "time_sampling"}  # no time_sampling stored
    assert resume_mismatches(saved, uniform) == []
    assert resume_mismatches(saved, logit_normal) == ["time_sampling: checkpoint 'uniform' vs run 'logit_normal'"]


def test_resume_without_checkpoint_starts_from_scratch(data, tmp_path, tmp_path_factory):
    fresh = train(tiny_config(max_epochs=1), data, tmp_path_factory.mktemp("fresh"))
    resumed = train(tiny_config(max_epochs=1, resume=True), data, tmp_path)
    assert resumed.best_loss == fresh.best_loss
    assert resumed.global_step == fresh.global_step == STEPS_PER_EPOCH


@pytest.mark.slow
def test_resume_with_step_cadence_is_bit_exact(data, tmp_path, tmp_path_factory):
    # Evaluations at steps 7, 14, 21, 28 and 33 (10 steps per epoch): most fall inside an epoch.
    config = tiny_config(max_steps=33, eval_every_steps=7, warmup_steps=5, patience=50)
    ref_result, ref = _reference(config, data, tmp_path_factory)
    assert [row["step"] for row in ref_result.history] == [7, 14, 21, 28, 33]
    # Crash right after the mid-epoch evaluation at step 14 was saved.
    result, first, second = _interrupt_and_resume(config, data, tmp_path,
                                                  lambda step, m: "val/loss" in m and step == 14)
    state = ckpt.load_checkpoint(result.checkpoint_path)
    for key in ("model_state_dict", "ema_shadow"):
        for name, tensor in ref["state"][key].items():
            assert torch.equal(state[key][name], tensor), f"{key}[{name}] differs after resume"
    assert (result.best_loss, result.global_step) == (ref_result.best_loss, 33)
    assert _without_seconds(result.history) == _without_seconds(ref_result.history)
    _assert_steps_continue(first, second, resumed_from=14, total=33)
