"""The training loop end to end on tiny configs: results and files, bit-exact resume, tracking, divergence, config
errors, and the rule that flow_pipeline.core never imports dagster or wandb."""

from __future__ import annotations

import ast
import hashlib
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

import flow_pipeline.core.trainer as trainer_module
import flow_pipeline.core.training_run as training_run_module
from flow_pipeline.config import TrainConfig, format_validation_error
from flow_pipeline.core import checkpoint as ckpt
from flow_pipeline.core.data.batching import AUGMENTATIONS
from flow_pipeline.core.models import build_model, count_parameters
from flow_pipeline.core.tracking import RecordingTracker
from flow_pipeline.core.trainer import TrainData, TrainResult, TrainingDiverged, train
from flow_pipeline_tests.core.mixture_data import mixture_train_data

DIM, N_TRAIN, N_VAL, BATCH = 64, 320, 64, 32
STEPS_PER_EPOCH = N_TRAIN // BATCH  # 10
REPO_ROOT = Path(__file__).resolve().parents[2]
CORE_DIR = REPO_ROOT / "flow_pipeline" / "core"


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Every test here runs with one torch thread (see conftest)."""


@pytest.fixture(scope="module")
def data():
    return mixture_train_data(N_TRAIN, N_VAL, DIM, seed=3)


def tiny_config(**overrides) -> TrainConfig:
    values = dict(arch="mlp", model_size="tiny", dim=DIM, batch_size=BATCH, max_epochs=3, warmup_steps=5,
                  log_every=1, device="cpu", lr=3e-3)
    values.update(overrides)
    return TrainConfig(**values)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- trackers ----------------------------------------------------------------------------------------------------


class Interrupted(Exception):
    """Stands in for a crash (SIGKILL, pre-emption) at a chosen point of a run."""


class InterruptingTracker(RecordingTracker):
    """Records rows, then raises :class:`Interrupted` once ``when(step, metrics)`` is true."""

    def __init__(self, when):
        super().__init__()
        self.when = when

    def log(self, metrics, step):
        super().log(metrics, step)
        if self.when(step, metrics):
            raise Interrupted(f"interrupted at step {step}")


def train_rows(tracker: RecordingTracker) -> list[tuple[int, dict]]:
    return [(step, m) for step, m in tracker.rows if "train/loss" in m]


def val_rows(tracker: RecordingTracker) -> list[tuple[int, dict]]:
    return [(step, m) for step, m in tracker.rows if "val/loss" in m]


# --- a finished run ----------------------------------------------------------------------------------------------


def test_train_returns_result_with_verified_best_checkpoint(data, tmp_path):
    config = tiny_config()
    stale = tmp_path / f"{ckpt.TEMP_PREFIX}best.pt.killed"
    stale.write_bytes(b"half a checkpoint")  # left by a killed write: removed at start
    result = train(config, data, tmp_path)

    assert isinstance(result, TrainResult)
    assert not stale.exists()
    best = tmp_path / ckpt.BEST_NAME
    assert result.checkpoint_path == best
    assert sorted(p.name for p in tmp_path.iterdir()) == [ckpt.BEST_NAME]  # last.pt removed at the end
    assert result.sha256 == _sha(best) and result.size_bytes == best.stat().st_size

    state = ckpt.load_checkpoint(best)
    torch.load(best, weights_only=True)
    for key in ckpt.REQUIRED_KEYS:
        assert key in state, key
    assert result.epochs_run == 3 and not result.stopped_early
    assert result.global_step == 3 * STEPS_PER_EPOCH
    assert result.device == "cpu"

    # History: one row per epoch, steps at epoch ends, the best EMA val loss is the result's.
    assert [row["epoch"] for row in result.history] == [1, 2, 3]
    assert [row["step"] for row in result.history] == [10, 20, 30]
    ema_losses = [row["ema_val_loss"] for row in result.history]
    assert all(math.isfinite(v) for v in ema_losses)
    assert result.best_loss == min(ema_losses) == state["best_loss"]
    assert result.best_epoch == ema_losses.index(min(ema_losses)) + 1 == state["epoch"]
    assert result.best_loss < 2.0  # better than predicting zero, even after 30 tiny steps

    # The weights load into the architecture; the EMA shadow covers every trainable parameter.
    model = build_model("mlp", dim=DIM, size="tiny")
    model.load_state_dict(state["model_state_dict"])
    assert set(state["ema_shadow"]) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert result.num_params == count_parameters(model)
    assert state["config"]["batch_size"] == BATCH and state["config"]["arch"] == "mlp"
    assert torch.equal(state["normalization_stats"]["mean"], data.normalizer.mean)
    assert torch.equal(state["normalization_stats"]["std"], data.normalizer.std)


@pytest.mark.parametrize("ema_every", [1, 3, 1000])
def test_saved_ema_accounts_for_every_step(ema_every, data, tmp_path):
    """Whatever ``ema_every`` is, the EMA is brought up to date before it is validated and saved. With an
    interval longer than the run, that single update is the first one: it copies the final weights."""
    train(tiny_config(max_epochs=1, ema_every=ema_every), data, tmp_path)
    state = ckpt.load_checkpoint(tmp_path / ckpt.BEST_NAME)
    assert state["ema_state"]["num_updates"] == state["global_step"] == STEPS_PER_EPOCH
    weights, shadow = state["model_state_dict"], state["ema_shadow"]
    same = [torch.equal(shadow[name], weights[name]) for name in shadow]
    assert all(same) if ema_every > STEPS_PER_EPOCH else not any(same)


class CheckpointWatcher(RecordingTracker):
    """At every epoch's validation row (logged after the epoch's saves): the global step of each checkpoint file."""

    def __init__(self, run_dir: Path):
        super().__init__()
        self.run_dir, self.on_disk = run_dir, []

    def log(self, metrics, step):
        super().log(metrics, step)
        if "val/loss" in metrics:
            self.on_disk.append({path.name: ckpt.load_checkpoint(path)["global_step"]
                                 for path in sorted(self.run_dir.glob("*.pt"))})


def test_last_pt_exists_only_while_newer_than_best_pt(data, tmp_path):
    # min_delta larger than any improvement: epoch 1 is the best, epochs 2 and 3 are not.
    watcher = CheckpointWatcher(tmp_path)
    train(tiny_config(max_epochs=3, min_delta=10.0, patience=5), data, tmp_path, tracker=watcher)
    best, last = ckpt.BEST_NAME, ckpt.LAST_NAME
    assert watcher.on_disk == [{best: 10}, {best: 10, last: 20}, {best: 10, last: 30}]


def test_an_improving_epoch_removes_the_older_last_pt(data, tmp_path):
    # last.pt every 3 steps, and every epoch the new best (min_delta 0, the loss falls): at each epoch's end the
    # mid-epoch last.pt (step 9, 18, 27) is gone and best.pt is the resume point.
    watcher = CheckpointWatcher(tmp_path)
    result = train(tiny_config(max_epochs=3, save_every_steps=3), data, tmp_path, tracker=watcher)
    improving = [row["epoch"] for row in result.history
                 if row["ema_val_loss"] == min(r["ema_val_loss"] for r in result.history[: row["epoch"]])]
    assert improving[:1] == [1] and len(improving) >= 2, "test precondition: at least two improving epochs"
    for epoch, files in enumerate(watcher.on_disk, start=1):
        if epoch in improving:
            assert files == {ckpt.BEST_NAME: 10 * epoch}
        else:
            assert files[ckpt.LAST_NAME] == 10 * epoch > files[ckpt.BEST_NAME]


def test_a_mid_epoch_last_pt_holds_an_up_to_date_ema(data, tmp_path):
    # last.pt every 4 steps, EMA every 5: the save at step 24 must first fold steps 21-24 into the EMA.
    config = tiny_config(max_epochs=3, save_every_steps=4, ema_every=5)
    with pytest.raises(Interrupted):
        train(config, data, tmp_path, tracker=InterruptingTracker(lambda step, m: "train/loss" in m and step == 25))
    state = ckpt.load_checkpoint(tmp_path / ckpt.LAST_NAME)
    assert state["global_step"] == state["ema_state"]["num_updates"] == 24


def test_early_stopping_ends_the_run(data, tmp_path):
    # min_delta larger than any possible improvement: epoch 1 sets the best, every later epoch is bad.
    config = tiny_config(max_epochs=6, patience=2, min_delta=100.0)
    result = train(config, data, tmp_path)
    assert result.stopped_early
    assert result.epochs_run == 3 and len(result.history) == 3
    assert result.best_epoch == 1
    assert ckpt.load_checkpoint(result.checkpoint_path)["epoch"] == 1


def test_tracker_rows(data, tmp_path):
    config = tiny_config(log_every=3, max_epochs=3)
    tracker = RecordingTracker()
    result = train(config, data, tmp_path, tracker=tracker)
    rows = train_rows(tracker)
    assert [step for step, _ in rows] == list(range(3, 31, 3))
    for step, metrics in rows:
        assert {"train/loss", "train/grad_norm", "train/lr", "epoch"} <= set(metrics)
        assert math.isfinite(metrics["train/loss"]) and metrics["train/lr"] > 0
        assert metrics["epoch"] == (step - 1) // STEPS_PER_EPOCH + 1
    vals = val_rows(tracker)
    assert [step for step, _ in vals] == [10, 20, 30]
    best_so_far = math.inf
    for (step, metrics), row in zip(vals, result.history):
        best_so_far = min(best_so_far, metrics["val/ema_loss"])
        assert metrics["val/best_loss"] == best_so_far
        assert metrics["val/loss"] == row["val_loss"] and metrics["val/ema_loss"] == row["ema_val_loss"]
    steps = [step for step, _ in tracker.rows]
    assert steps == sorted(steps)  # never decreasing (Wandb drops rows logged with a lower step)


def test_logged_lr_is_the_lr_of_the_logged_step(data, tmp_path):
    """train/lr at step s is the LR the s-th optimizer step used: linear warmup (s / warmup) * lr, then cosine."""
    config = tiny_config(max_epochs=2, warmup_steps=8, min_lr_ratio=0.1)
    tracker = RecordingTracker()
    train(config, data, tmp_path, tracker=tracker)
    total = 2 * STEPS_PER_EPOCH
    for step, metrics in train_rows(tracker):
        if step <= 8:
            want = config.lr * step / 8
        else:
            progress = (step - 1 - 8) / (total - 8)
            want = config.lr * (0.1 + 0.9 * (1 + math.cos(math.pi * progress)) / 2)
        assert metrics["train/lr"] == pytest.approx(want, rel=1e-9), step


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
    # EMA updates at steps 5, 10, ... and at the saves (8, 16, 24) and epoch ends: the resume point is one of them.
    "ema-every-5": dict(ema_every=5, save_every_steps=8),
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


def test_resume_without_checkpoint_starts_from_scratch(data, tmp_path, tmp_path_factory):
    fresh = train(tiny_config(max_epochs=1), data, tmp_path_factory.mktemp("fresh"))
    resumed = train(tiny_config(max_epochs=1, resume=True), data, tmp_path)
    assert resumed.best_loss == fresh.best_loss
    assert resumed.global_step == fresh.global_step == STEPS_PER_EPOCH


# --- divergence --------------------------------------------------------------------------------------------------


def _on_trained_model(monkeypatch, install) -> None:
    """Call ``install(model)`` on the model the trainer trains: the first one it builds (the second is the EMA
    evaluation copy)."""
    real_build = training_run_module.build_model
    built = []

    def build(*args, **kwargs):
        model = real_build(*args, **kwargs)
        if not built:
            install(model)
        built.append(model)
        return model

    monkeypatch.setattr(training_run_module, "build_model", build)


def _nan_at_training_call(monkeypatch, bad_call: int):
    """Make the trained model's output NaN at its ``bad_call``-th training forward pass (1-based)."""
    calls = {"n": 0}

    def hook(module, inputs, output):
        if module.training:
            calls["n"] += 1
            if calls["n"] == bad_call:
                return output * math.nan
        return output

    _on_trained_model(monkeypatch, lambda model: model.register_forward_hook(hook))


def test_nan_loss_raises_naming_the_step_and_keeps_best(data, tmp_path, monkeypatch):
    bad_step = 14  # in epoch 2, after best.pt was written at the end of epoch 1
    _nan_at_training_call(monkeypatch, bad_step)
    best = tmp_path / ckpt.BEST_NAME
    hashes = {}

    class HashAtEpochEnd(RecordingTracker):
        def log(self, metrics, step):
            super().log(metrics, step)
            if "val/loss" in metrics:
                hashes[metrics["epoch"]] = _sha(best)

    tracker = HashAtEpochEnd()
    with pytest.raises(TrainingDiverged) as info:
        train(tiny_config(), data, tmp_path, tracker=tracker)
    message = str(info.value)
    assert f"step {bad_step}" in message
    assert str(best) in message
    assert list(hashes) == [1]
    assert _sha(best) == hashes[1]
    ckpt.load_checkpoint(best)
    # Nothing at or after the bad step reached the tracker.
    assert max(step for step, _ in tracker.rows) == bad_step - 1


def test_nan_before_any_checkpoint_writes_no_best(data, tmp_path, monkeypatch):
    _nan_at_training_call(monkeypatch, 3)
    with pytest.raises(TrainingDiverged, match="step 3"):
        train(tiny_config(), data, tmp_path)
    assert not (tmp_path / ckpt.BEST_NAME).exists()


# --- the accelerator path, exercised on the CPU ---------------------------------------------------------------------


@pytest.fixture
def without_per_step_reads(monkeypatch):
    """The loop as it runs on CUDA: no host read of loss or norm between logging steps, clipping never branches."""
    monkeypatch.setattr(trainer_module, "reads_values_every_step", lambda device: False)


def test_accelerator_path_trains_bit_identically(data, tmp_path, monkeypatch):
    """Rescaling by exactly 1.0 is the identity and the clip coefficient is the same on both paths, so the
    sync-free path must give the very same weights, with steps on both sides of ``grad_clip``."""
    config = tiny_config(max_epochs=2, grad_clip=0.8)
    on_cpu = RecordingTracker()
    train(config, data, tmp_path / "cpu", tracker=on_cpu)
    norms = [m["train/grad_norm"] for _, m in train_rows(on_cpu)]
    assert min(norms) < config.grad_clip < max(norms), f"test precondition: some steps clipped, some not: {norms}"
    monkeypatch.setattr(trainer_module, "reads_values_every_step", lambda device: False)
    train(config, data, tmp_path / "accelerator")
    cpu, accelerator = (ckpt.load_checkpoint(tmp_path / run / ckpt.BEST_NAME) for run in ("cpu", "accelerator"))
    for key in ("model_state_dict", "ema_shadow"):
        for name, tensor in cpu[key].items():
            assert torch.equal(accelerator[key][name], tensor), f"{key}[{name}]"


def test_accelerator_path_catches_divergence_at_the_next_log_step(data, tmp_path, monkeypatch, without_per_step_reads):
    _nan_at_training_call(monkeypatch, 14)
    with pytest.raises(TrainingDiverged, match="step 15"):
        train(tiny_config(log_every=5), data, tmp_path)
    assert ckpt.load_checkpoint(tmp_path / ckpt.BEST_NAME)["global_step"] == 10  # epoch 1's, untouched


def _inf_gradient_at_training_call(monkeypatch, bad_call: int):
    """Give the trained model's first parameter an infinite gradient at its ``bad_call``-th backward pass, with a
    finite loss: clipping turns it into NaN (inf x 0), and the optimizer step into NaN weights."""
    calls = {"n": 0}

    def hook(grad):
        calls["n"] += 1
        return torch.full_like(grad, math.inf) if calls["n"] == bad_call else grad

    _on_trained_model(monkeypatch, lambda model: next(model.parameters()).register_hook(hook))


@pytest.mark.parametrize("breakage", ["nan_loss", "inf_gradient_finite_loss"])
def test_accelerator_path_never_saves_a_diverged_last_pt(breakage, data, tmp_path, monkeypatch, without_per_step_reads):
    # A NaN loss shows in the epoch's loss sum; an infinite gradient with a finite loss only in that step's norm.
    break_at = _nan_at_training_call if breakage == "nan_loss" else _inf_gradient_at_training_call
    break_at(monkeypatch, 14)
    with pytest.raises(TrainingDiverged, match="before a checkpoint save at step 14"):
        train(tiny_config(log_every=5, save_every_steps=1), data, tmp_path)
    last = ckpt.load_checkpoint(tmp_path / ckpt.LAST_NAME)
    assert last["global_step"] == 13
    assert all(torch.isfinite(tensor).all() for tensor in last["model_state_dict"].values())


def test_cpu_path_stops_at_an_infinite_gradient_before_the_optimizer_step(data, tmp_path, monkeypatch):
    _inf_gradient_at_training_call(monkeypatch, 14)
    with pytest.raises(TrainingDiverged, match="grad norm inf at step 14"):
        train(tiny_config(log_every=5, save_every_steps=1), data, tmp_path)
    assert ckpt.load_checkpoint(tmp_path / ckpt.LAST_NAME)["global_step"] == 13


def test_bf16_autocast_trains_with_float32_weights(data, tmp_path, monkeypatch):
    """precision: bf16 runs the training forward passes in bfloat16 (on the CPU too) and keeps the weights float32."""
    output_dtypes = set()

    def record(module, inputs, output):
        if module.training:
            output_dtypes.add(output.dtype)

    _on_trained_model(monkeypatch, lambda model: model.register_forward_hook(record))
    result = train(tiny_config(precision="bf16"), data, tmp_path)
    assert output_dtypes == {torch.bfloat16}
    assert result.best_loss < 2.0
    weights = ckpt.load_checkpoint(result.checkpoint_path)["model_state_dict"]
    assert {tensor.dtype for tensor in weights.values()} == {torch.float32}


def test_huge_data_values_diverge(data, tmp_path):
    """Raw values that overflow float32 once normalised: caught as divergence, not trained on silently."""
    raw = data.train.clone()
    raw[5] = 1e38
    bad = trainer_module.TrainData(raw, data.val, data.normalizer)
    with pytest.raises(TrainingDiverged, match=r"step \d+"):
        train(tiny_config(max_epochs=2), bad, tmp_path)


# --- config and data errors name the field -----------------------------------------------------------------------


@pytest.mark.parametrize("field,value", [("batch_size", 0), ("lr", -1.0), ("lr", 2.0), ("patience", -1),
                                         ("max_epochs", 0), ("ema_decay", 1.0), ("ema_every", 0), ("dim", 0)])
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValidationError) as info:
        tiny_config(**{field: value})
    assert field in str(info.value)
    formatted = format_validation_error(info.value)
    assert formatted.startswith("invalid training config: ")
    assert f"{field}:" in formatted


@pytest.mark.parametrize("field,value,valid", [("aug", "foo", AUGMENTATIONS),
                                               ("arch", "resnet", ("mlp", "dit", "unet")),
                                               ("flow", "ddpm", ("icfm", "otcfm", "fm", "vp")),
                                               ("dataset", "2k", ("1k", "5k", "10k", "full"))])
def test_unknown_names_list_valid_values(field, value, valid):
    with pytest.raises(ValidationError) as info:
        tiny_config(**{field: value})
    message = format_validation_error(info.value)
    assert field in message and repr(value) in message
    for name in valid:
        assert name in message


def test_unknown_fields_are_rejected():
    with pytest.raises(ValidationError, match="learning_rate"):
        tiny_config(learning_rate=0.1)


def test_dim_mismatch_names_dim(data, tmp_path):
    with pytest.raises(ValueError, match="dim"):
        train(tiny_config(dim=32), data, tmp_path)


# --- core never imports dagster, wandb, pydantic, nor flow_pipeline outside core -----------------------------------

FORBIDDEN = ("dagster", "wandb", "pydantic")


def _forbidden(name: str) -> bool:
    """A module the core must not import: a forbidden package, or any of flow_pipeline outside flow_pipeline.core."""
    return name.split(".")[0] in FORBIDDEN or (name.startswith("flow_pipeline") and name != "flow_pipeline"
                                               and not name.startswith("flow_pipeline.core"))


def _core_modules() -> list[str]:
    modules = []
    for path in sorted(CORE_DIR.rglob("*.py")):
        parts = path.relative_to(REPO_ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules.append(".".join(parts))
    return modules


def test_core_sources_never_import_dagster_wandb_pydantic_or_the_layers_above():
    files = sorted(CORE_DIR.rglob("*.py"))
    assert len(files) >= 10
    offenders = []
    for path in files:
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                    "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
                names = [str(node.args[0].value)]
            offenders += [f"{path}:{node.lineno} {name}" for name in names if _forbidden(name)]
    assert offenders == []


def test_importing_all_of_core_loads_no_dagster_wandb_pydantic_or_the_layers_above():
    modules = _core_modules()
    assert "flow_pipeline.core.trainer" in modules and "flow_pipeline.core.models.dit" in modules
    code = "; ".join(f"import {m}" for m in modules) + (
        "; import sys; bad = sorted(m for m in sys.modules if m.split('.')[0] in ('dagster', 'wandb', 'pydantic')"
        " or (m.startswith('flow_pipeline.') and not m.startswith('flow_pipeline.core')))"
        "; assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


# --- equal budgets: max_steps and eval_every_steps ------------------------------------------------------------------


def test_max_steps_trains_every_data_size_the_same_steps_and_schedule(data, tmp_path):
    small = TrainData(train=data.train[:64], val=data.val, normalizer=data.normalizer)  # 2 steps per epoch
    config = tiny_config(max_steps=12, eval_every_steps=4, warmup_steps=5, min_lr_ratio=0.1, patience=50)
    results = {name: train(config, d, tmp_path / name) for name, d in (("full", data), ("small", small))}
    for result in results.values():
        assert result.global_step == 12
        assert [row["step"] for row in result.history] == [4, 8, 12]
        # After 12 steps: warmup over (5), cosine progress (12 - 5) / (12 - 5) = 1 -> min_lr_ratio * lr.
        assert result.history[-1]["lr"] == pytest.approx(0.1 * config.lr)
        # After 4 steps the scheduler stands at 0-based step 4, the last warmup step: factor (4 + 1) / 5. After 8:
        # cosine progress (8 - 5) / 7.
        assert result.history[0]["lr"] == pytest.approx(config.lr * 5 / 5)
        assert result.history[1]["lr"] == pytest.approx(config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 3 / 7))))
    assert results["full"].epochs_run == 1 and results["small"].epochs_run == 6


def test_max_steps_ends_a_run_inside_an_epoch_with_a_final_evaluation(data, tmp_path):
    result = train(tiny_config(max_steps=15, warmup_steps=5), data, tmp_path)  # 10 steps per epoch
    assert result.global_step == 15
    assert [row["step"] for row in result.history] == [10, 15]  # epoch end, then the final step


def test_warmup_longer_than_the_run_is_rejected_naming_both_fields(data, tmp_path):
    with pytest.raises(ValidationError, match="warmup_steps.*max_steps"):
        tiny_config(max_steps=10, warmup_steps=10)
    # In epochs the total depends on the data: 64 rows / batch 32 x 3 epochs = 6 steps.
    small = TrainData(train=data.train[:64], val=data.val, normalizer=data.normalizer)
    with pytest.raises(ValueError, match="warmup_steps: 6 >= the run's 6 optimizer steps .max_epochs"):
        train(tiny_config(warmup_steps=6), small, tmp_path)


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
