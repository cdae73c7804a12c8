"""Evaluation of a real trained checkpoint: EMA weights, raw-space samples, metrics, determinism, sampler NFE."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from flow_pipeline.config import TrainConfig
from flow_pipeline.core.baselines import fit_baseline
from flow_pipeline.core.checkpoint import CheckpointError, load_ema_model, sha256_file
from flow_pipeline.core.data.normalization import Normalizer, floor_std
from flow_pipeline.core.data.sonar_like import synthetic_sonar_like
from flow_pipeline.core.data.splits import split_array
from flow_pipeline.core.data.stats import streaming_mean_std
from flow_pipeline.core.metrics.distances import TrainSpace
from flow_pipeline.core.metrics.real_side import evaluate_samples
from flow_pipeline.core.metrics.two_sample import two_sample_scores
from flow_pipeline.core.metrics.reference_stats import KidReference
from flow_pipeline.core.mixture_baseline import fit_mixture_baseline
from flow_pipeline.core.trainer import TrainData, train
from flow_pipeline.evaluation.evaluate import (EvaluationData, EvaluationSettings, evaluate_checkpoint, run_training_rows,
                                               saved_train_config)
from flow_pipeline.evaluation import mixture_reference
from flow_pipeline.evaluation.guidance import GUIDANCE_MIN_VAL_ROWS
from flow_pipeline.evaluation.results import sample_count, sample_count_note
from flow_pipeline.evaluation.samplers import SamplerSpec, draw_samples
from flow_pipeline_tests.helpers import TINY_DATASET, TINY_TRAIN

METRIC_KEYS = {"fd", "fd_floor", "fd_ratio", "precision", "recall", "density", "coverage", "memorization_ratio",
               "train_copy_fraction", "copy_threshold",
               "norm_mean", "norm_std", "real_norm_mean", "real_norm_std", "nn_cosine", "n", "kid", "kid_se",
               "kid_ci_low", "kid_ci_high", "ranking_kid", "fd_inf", "fd_inf_slope", "variance_ratio", "norm_ratio",
               "memorising"}
# Every sample set also gets a classifier two-sample test and RBF KID (core/metrics/two_sample.py).
TWO_SAMPLE_KEYS = {"c2st_accuracy", "c2st_accuracy_ci_low", "c2st_accuracy_ci_high", "c2st_p_value", "c2st_n_held_out",
                   "rbf_kid", "rbf_kid_se", "rbf_kid_ci_low", "rbf_kid_ci_high", "rbf_kid_bandwidth", "prdc_note"}
# The primary sampler's model also gets its held-out likelihood against both Gaussians (no truth: real-like data),
# and against the gaussian-mixture when val rows choose its components (else a note says why it is missing).
LIKELIHOOD_KEYS = {"test_nll", "test_bits_per_dim", "test_nll_se", "likelihood_rows", "likelihood_method",
                   "likelihood_seconds", *(f"loglik_vs_{name}{suffix}" for name in ("gaussian_full", "gaussian_diag")
                                           for suffix in ("", "_ci_low", "_ci_high", "_verdict"))}
MIXTURE_KEYS = {f"loglik_vs_gaussian_mixture{suffix}" for suffix in ("", "_ci_low", "_ci_high", "_verdict")}
NO_MIXTURE_KEYS = {"gaussian_mixture_note"}
SAMPLE_SET_KEYS = METRIC_KEYS | TWO_SAMPLE_KEYS


def without_timings(metrics: dict) -> dict:
    """The metrics but the wall-clock ones, which no seed fixes."""
    return {key: value for key, value in metrics.items() if not key.endswith("seconds")}


def assert_scores_match(scored: dict, expected: dict) -> None:
    """Same keys; numbers equal to rel 1e-9, texts (verdicts, notes) equal."""
    assert set(scored) == set(expected)
    texts = {key for key, value in expected.items() if isinstance(value, str)}
    assert {key: scored[key] for key in texts} == {key: expected[key] for key in texts}
    assert {key: scored[key] for key in set(expected) - texts} == \
        pytest.approx({key: expected[key] for key in set(expected) - texts}, rel=1e-9)


def two_sample_expected(samples, train, test, n: int, seed: int) -> dict:
    """two_sample_scores of ``samples`` against the seeded n-row test subsample, in train's z-scored space."""
    rows = test if test.shape[0] <= n else test[np.sort(np.random.default_rng(seed).choice(test.shape[0], n,
                                                                                             replace=False))]
    return two_sample_scores(samples, np.asarray(rows, dtype=np.float64), TrainSpace.fit(train), seed)


def evaluate(path, train, test, samplers, val=None, sentences=None, expected_sha256=None, reference_cache=None,
             **settings):
    """:func:`evaluate_checkpoint` with the data and the settings as keyword arguments."""
    return evaluate_checkpoint(path, EvaluationData(train, test, val, sentences), EvaluationSettings(samplers, **settings),
                               expected_sha256=expected_sha256, reference_cache=reference_cache)


# --------------------------------------------------------------------------------------------- sampler specs


@pytest.mark.parametrize("text, solver, steps, label", [
    ("euler:50", "euler", 50, "euler:50"),
    (" midpoint:3 ", "midpoint", 3, "midpoint:3"),
    ("rk4:10", "rk4", 10, "rk4:10"),
    ("dopri5", "dopri5", 0, "dopri5"),
    ("dopri5@auto", "dopri5", 0, "dopri5@auto"),
    ("euler:8@1.25", "euler", 8, "euler:8@1.25"),
    ("rk4:4@1", "rk4", 4, "rk4:4"),
])
def test_sampler_spec_parses(text, solver, steps, label):
    spec = SamplerSpec.parse(text)
    assert (spec.solver, spec.steps, spec.label) == (solver, steps, label)
    assert spec.guidance == {"dopri5@auto": None, "euler:8@1.25": 1.25}.get(text, 1.0)


@pytest.mark.parametrize("text, fragment", [
    ("heun:10", "unknown solver 'heun'"),
    ("euler", "'euler:STEPS'"),
    ("euler:ten", "'euler:STEPS'"),
    ("rk4:0", "steps must be >= 1"),
    ("dopri5:20", "adaptive"),
    ("dopri5@much", "guidance must be 'likelihood', 'auto' or a number"),
    ("euler:4@-1", "guidance must be 'likelihood', 'auto' or a number"),
])
def test_sampler_spec_rejects_bad_text(text, fragment):
    with pytest.raises(ValueError, match=fragment) as info:
        SamplerSpec.parse(text)
    assert repr(text) in str(info.value)


def test_sample_count_is_the_test_size_capped():
    assert sample_count(64, 1000) == 64
    assert sample_count(5000, 1000) == 1000
    with pytest.raises(ValueError, match="cap"):
        sample_count(64, 1)


# --------------------------------------------------------------------------------------------- a trained checkpoint


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny MLP trained for 2 epochs by the real trainer on synthetic SONAR-like data; (best.pt, splits)."""
    embeddings = synthetic_sonar_like(TINY_DATASET["n_synthetic"], dim=TINY_DATASET["dim"], seed=TINY_DATASET["seed"])
    splits = split_array(embeddings, (0.8, 0.1, 0.1), seed=0, source="synthetic")
    mean, std, _ = streaming_mean_std(splits.train)
    normalizer = Normalizer(torch.from_numpy(mean).float(), torch.from_numpy(floor_std(std)).float())
    data = TrainData(torch.from_numpy(splits.train), torch.from_numpy(splits.val), normalizer)
    # z-scored rows and a plain network (the whitened skip-path model is the fixture below)
    result = train(TrainConfig(**TINY_TRAIN, normalization="zscore", linear_skip=False), data,
                   tmp_path_factory.mktemp("run"))
    return result.checkpoint_path, splits


@pytest.fixture(scope="module")
def trained_skip(tmp_path_factory, trained):
    """The same data and run, with a linear skip path around a network on the first 8 coordinates."""
    _, splits = trained
    normalizer = Normalizer.fit(torch.from_numpy(splits.train), "whiten")
    data = TrainData(torch.from_numpy(splits.train), torch.from_numpy(splits.val), normalizer)
    config = TrainConfig(**TINY_TRAIN, normalization="whiten", linear_skip=True, principal_dims=8)
    return train(config, data, tmp_path_factory.mktemp("skip")).checkpoint_path


@pytest.mark.slow
def test_auto_guidance_matches_the_val_rows_variance_and_is_reported(trained, trained_skip):
    _, splits = trained
    val = np.concatenate([splits.val, splits.val[::-1] * 1.1])  # 128 held-out-like rows: the tiny val split has 64
    specs = [SamplerSpec.parse("euler:8@auto"), SamplerSpec.parse("euler:8")]
    evaluation = evaluate(trained_skip, splits.train, splits.test, specs, n_samples=100, val=val)
    guided, plain = evaluation.results
    fit = guided.guidance_fit
    assert plain.guidance == 1.0 and plain.guidance_fit is None and fit["coordinates"] == 8
    # The target: the val rows' mean variance over the network's 8 coordinates, in the model's normalised space.
    ema = load_ema_model(trained_skip, saved_train_config)
    assert len(val) >= GUIDANCE_MIN_VAL_ROWS
    val_z = ema.normalizer.normalize(torch.from_numpy(val))[:, :8].double()
    assert fit["target_variance"] == pytest.approx(float(val_z.var(dim=0).mean()), rel=1e-6)
    assert "val rows" in fit["note"] and fit["guidance"] > 1.0  # the tiny model is under-dispersed
    assert guided.guidance == fit["guidance"] and guided.sampler == f"euler:8@auto={fit['guidance']:g}"
    # The samples scored are the ones a fixed guidance of the fitted w draws.
    fixed = draw_samples(ema, SamplerSpec("euler", 8, fit["guidance"]), evaluation.n, seed=0).x
    expected = evaluate_samples(fixed.numpy(), np.asarray(splits.train), np.asarray(splits.test), seed=0)
    expected.update(two_sample_expected(fixed.numpy(), splits.train, splits.test, evaluation.n, seed=0))
    assert_scores_match({key: guided.metrics[key] for key in SAMPLE_SET_KEYS}, expected)
    # ... and the held-out likelihood is the model's as that sampler draws from it: with the fitted w.
    assert evaluation.likelihood.guidance == fit["guidance"] and LIKELIHOOD_KEYS | MIXTURE_KEYS <= set(guided.metrics)
    # Other test rows: other metrics, the same w (the test rows take no part in it).
    other = evaluate(trained_skip, splits.train, splits.test[::-1], specs[:1], n_samples=50, val=val)
    assert other.results[0].guidance_fit == fit
    # Too few val rows: the training rows' variance is the target, and the note says so.
    few = evaluate(trained_skip, splits.train, splits.test, specs[:1], n_samples=20,
                              val=val[: GUIDANCE_MIN_VAL_ROWS - 1]).results[0].guidance_fit
    train_z = ema.normalizer.normalize(torch.from_numpy(np.array(splits.train)))[:, :8].double()
    assert few["target_variance"] == pytest.approx(float(train_z.var(dim=0).mean()), rel=1e-6)
    assert "training rows (fewer than" in few["note"]
    # A model without a skip path is sampled as trained, under its plain label.
    no_skip = evaluate(trained[0], splits.train, splits.test, specs[:1], n_samples=20).results[0]
    assert (no_skip.sampler, no_skip.guidance, no_skip.guidance_fit["draws"]) == ("euler:8", 1.0, 0)
    assert json.dumps(no_skip.guidance_fit, allow_nan=False)  # evaluation.json stays strict JSON
    # A fixed w on it is refused, naming what is missing.
    with pytest.raises(ValueError, match="linear skip path"):
        evaluate(trained[0], splits.train, splits.test, [SamplerSpec.parse("euler:8@1.5")], n_samples=20)


@pytest.mark.slow
def test_loaded_model_holds_the_ema_weights(trained):
    path, _ = trained
    state = torch.load(path, weights_only=True)
    model = load_ema_model(path, saved_train_config).model
    params = dict(model.named_parameters())
    assert set(params) == set(state["ema_shadow"])
    for name, tensor in state["ema_shadow"].items():
        torch.testing.assert_close(params[name].detach(), tensor, rtol=0, atol=0)
    # After 16 steps the warmed-up EMA (decay 0.65 at step 16) is not the raw weights: we did not load those.
    assert any(not torch.equal(params[name].detach(), state["model_state_dict"][name]) for name in params)
    assert not model.training


@pytest.mark.slow
def test_evaluation_returns_every_metric_on_raw_space_samples(trained):
    path, splits = trained
    evaluation = evaluate(path, splits.train, splits.test, [SamplerSpec.parse("euler:8")], n_samples=1000)
    n_test = splits.test.shape[0]
    assert evaluation.n == n_test == 64  # the whole test split: fewer rows than the cap
    metrics = evaluation.primary.metrics
    assert set(metrics) == SAMPLE_SET_KEYS | LIKELIHOOD_KEYS | NO_MIXTURE_KEYS
    assert metrics["gaussian_mixture_note"] == "skipped: gaussian-mixture: no val rows to choose its components on"
    assert all(math.isfinite(value) for value in metrics.values() if not isinstance(value, str))
    assert metrics["likelihood_rows"] == n_test and metrics["prdc_note"].startswith("too small to judge")
    assert metrics["n"] == n_test
    assert evaluation.sha256 == sha256_file(path)
    assert (evaluation.arch, evaluation.flow, evaluation.run_name) == ("mlp", "icfm", "mlp-icfm-full-none-zscore-noskip-tiny")

    # Raw space: z-scored 1024-d samples would have norms near sqrt(1024) = 32; raw SONAR-like ones are ~0.2.
    x = draw_samples(load_ema_model(path, saved_train_config), SamplerSpec.parse("euler:8"), n_test, seed=0).x.numpy().astype(np.float64)
    norms = np.linalg.norm(x, axis=1)
    real_norm = np.linalg.norm(np.asarray(splits.test, dtype=np.float64), axis=1).mean()
    assert 0.5 * real_norm < norms.mean() < 2.0 * real_norm
    assert metrics["norm_mean"] == pytest.approx(norms.mean(), rel=1e-6)  # the metrics scored these very samples
    assert metrics["real_norm_mean"] == pytest.approx(real_norm, rel=1e-6)
    # ... and centred on the data mean (norm 0.113), not on 0 as z-scores would be.
    data_mean = np.asarray(splits.train, dtype=np.float64).mean(0)
    assert np.linalg.norm(x.mean(0) - data_mean) < 0.5 * np.linalg.norm(data_mean)


@pytest.mark.slow
def test_evaluation_is_deterministic_for_a_seed(trained):
    path, splits = trained
    samplers = [SamplerSpec.parse("euler:4")]
    first = evaluate(path, splits.train, splits.test, samplers, seed=3)
    again = evaluate(path, splits.train, splits.test, samplers, seed=3)
    other = evaluate(path, splits.train, splits.test, samplers, seed=4)
    assert without_timings(first.primary.metrics) == without_timings(again.primary.metrics)
    assert first.primary.metrics["fd"] != other.primary.metrics["fd"]
    ema = load_ema_model(path, saved_train_config)
    torch.testing.assert_close(draw_samples(ema, samplers[0], 16, seed=3).x,
                               draw_samples(ema, samplers[0], 16, seed=3).x, rtol=0, atol=0)


@pytest.mark.slow
def test_several_samplers_report_their_function_evaluations(trained):
    path, splits = trained
    texts = ["euler:3", "midpoint:3", "rk4:2", "dopri5"]
    evaluation = evaluate(path, splits.train, splits.test, [SamplerSpec.parse(t) for t in texts],
                                     n_samples=20)
    assert [r.sampler for r in evaluation.results] == texts
    assert [r.nfe for r in evaluation.results[:3]] == [3, 6, 8]
    # dopri5 (torchdiffeq): at least the first evaluation, the initial step guess and one 6-stage step.
    assert evaluation.results[3].nfe >= 8
    for result in evaluation.results:
        primary = LIKELIHOOD_KEYS | NO_MIXTURE_KEYS
        assert set(result.metrics) == SAMPLE_SET_KEYS | (primary if result is evaluation.primary else set())
        assert result.metrics["n"] == 20
        assert result.seconds > 0
    # The copy threshold (a scan of the whole train split) is computed once and is what a fresh computation gives.
    dopri_x = draw_samples(load_ema_model(path, saved_train_config), SamplerSpec.parse("dopri5"), 20, seed=0).x.numpy()
    fresh = evaluate_samples(dopri_x, np.asarray(splits.train), np.asarray(splits.test), seed=0)
    assert {r.metrics["copy_threshold"] for r in evaluation.results} == {fresh["copy_threshold"]}
    assert evaluation.results[3].metrics == {**fresh, **two_sample_expected(dopri_x, splits.train, splits.test, 20, 0)}
    # Same noise, same field: the ODE solutions of the different solvers agree closely in raw space.
    ema = load_ema_model(path, saved_train_config)
    rk4 = draw_samples(ema, SamplerSpec.parse("rk4:8"), 20, seed=0).x
    dopri = draw_samples(ema, SamplerSpec.parse("dopri5"), 20, seed=0).x
    euler = draw_samples(ema, SamplerSpec.parse("euler:1"), 20, seed=0).x
    assert (rk4 - dopri).norm() < 0.1 * (rk4 - euler).norm()


@pytest.mark.slow
def test_bad_inputs_raise_clear_errors(trained, tmp_path):
    path, splits = trained
    euler = [SamplerSpec.parse("euler:2")]
    with pytest.raises(CheckpointError, match="not found"):
        evaluate(tmp_path / "missing" / "best.pt", splits.train, splits.test, euler)
    with pytest.raises(CheckpointError, match="changed since it was recorded"):
        evaluate(path, splits.train, splits.test, euler, expected_sha256="0" * 64)
    with pytest.raises(ValueError, match=r"test split has shape \(64, 512\).*dim=1024"):
        evaluate(path, splits.train, splits.test[:, :512], euler)
    with pytest.raises(ValueError, match="at least one sampler"):
        evaluate(path, splits.train, splits.test, [])
    truncated = tmp_path / "best.pt"
    shutil.copyfile(path, truncated)
    truncated.write_bytes(truncated.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=str(truncated)):
        evaluate(truncated, splits.train, splits.test, euler)


# --------------------------------------------------------------------------------------------- references, rows, notes


def test_memorisation_uses_the_rows_the_run_trained_on():
    split = np.arange(3000 * 2, dtype=np.float32).reshape(3000, 2)
    rows = run_training_rows(split, TrainConfig(**{**TINY_TRAIN, "dataset": "1k"}))
    np.testing.assert_array_equal(rows, split[:1000])  # the trainer's rule: the first N rows of the split
    assert run_training_rows(split, TrainConfig(**TINY_TRAIN)).shape[0] == 3000  # dataset "full"


def test_sample_count_note_says_when_n_is_below_five_times_dim():
    assert sample_count_note(5120, 1024, 9000) == ""
    assert sample_count_note(64, 1024, 64).startswith("n = 64 < 5 x dim = 5120 (the test split has only 64 rows)")
    assert "n_samples caps it at 1000" in sample_count_note(1000, 1024, 9000)


@pytest.mark.slow
def test_references_and_sentences_are_scored_like_the_model(trained):
    path, splits = trained
    train_sentences = [f"train {i}" for i in range(splits.train.shape[0])]
    test_sentences = [f"test {i}" for i in range(splits.test.shape[0])]
    evaluation = evaluate(path, splits.train, splits.test, [SamplerSpec.parse("euler:4")], seed=1,
                                     val=splits.val, sentences=(train_sentences, test_sentences), n_sentences=3)
    references = {ref.name: ref for ref in evaluation.references}
    assert list(references) == ["held-out real (val)", "gaussian-full", "gaussian-diag", "gaussian-mixture"]
    threshold = evaluation.primary.metrics["copy_threshold"]
    # Independently: the same n (64 = all val rows), seed and copy threshold through evaluate_samples.
    real = evaluate_samples(splits.val, splits.train, splits.test, seed=1, train_copy_threshold=threshold)
    real.update(two_sample_expected(splits.val, splits.train, splits.test, 64, seed=1))
    assert_scores_match(references["held-out real (val)"].metrics, real)
    # gaussian-full with its shrinkage chosen on the val rows, as a model's guidance may be fitted there.
    baseline = fit_baseline("gaussian-full", splits.train, splits.val)
    full = baseline.sample(64, seed=1)
    expected = evaluate_samples(full, splits.train, splits.test, seed=1, train_copy_threshold=threshold)
    expected.update(two_sample_expected(full, splits.train, splits.test, 64, seed=1))
    # Its held-out likelihood too, on the same test rows as the model's (all 64 of them).
    likelihood = {"test_nll": -float(baseline.log_prob(np.asarray(splits.test, dtype=np.float64)).mean())}
    likelihood["test_bits_per_dim"] = likelihood["test_nll"] / (1024 * math.log(2))
    assert_scores_match(references["gaussian-full"].metrics, {**expected, **likelihood})
    assert "chosen on the val rows' likelihood" in references["gaussian-full"].note
    # The gaussian-mixture fitted to the same training rows (K chosen on val): its draws scored the same way, its
    # density on the model's test rows, and the model's paired difference against it.
    mixture = fit_mixture_baseline(splits.train, splits.val)
    drawn = mixture.sample(64, seed=1)
    expected = evaluate_samples(drawn, splits.train, splits.test, seed=1, train_copy_threshold=threshold)
    expected.update(two_sample_expected(drawn, splits.train, splits.test, 64, seed=1))
    log_p = mixture.log_prob(np.asarray(splits.test, dtype=np.float64))
    likelihood = {"test_nll": -float(log_p.mean()), "test_bits_per_dim": -float(log_p.mean()) / (1024 * math.log(2))}
    assert_scores_match(references["gaussian-mixture"].metrics, {**expected, **likelihood})
    assert references["gaussian-mixture"].note.startswith(f"K = {mixture.components} diagonal components")
    model = evaluation.primary.metrics
    assert model["loglik_vs_gaussian_mixture"] == pytest.approx(likelihood["test_nll"] - model["test_nll"], rel=1e-9)
    # Nearest sentences of the first 3 samples, checked by brute force.
    x = draw_samples(load_ema_model(path, saved_train_config), SamplerSpec.parse("euler:4"), 64, seed=1).x.numpy().astype(np.float64)
    assert len(evaluation.nearest_sentences) == 3
    for shown, sample_row in zip(evaluation.nearest_sentences, x[:3]):
        nearest = np.linalg.norm(np.asarray(splits.train, dtype=np.float64) - sample_row, axis=1).argmin()
        assert shown["train_sentence"] == f"train {nearest}"
        assert shown["copy"] == (shown["train_distance"] < threshold)
    assert evaluation.n_note.startswith("n = 64 < 5 x dim")


@pytest.mark.slow
def test_a_second_evaluation_reads_the_reference_rows_threshold_and_real_side_back(trained, tmp_path, monkeypatch):
    path, splits = trained
    args = (path, splits.train, splits.test, [SamplerSpec.parse("euler:4")])
    fits = []
    monkeypatch.setattr(mixture_reference, "fit_mixture_baseline",
                        lambda *rows: fits.append(1) or fit_mixture_baseline(*rows))
    fresh = evaluate(*args, seed=2, val=splits.val)  # no cache: everything scored, the mixture fitted once for both
    assert len(fits) == 1                            # its reference row and its likelihood
    first = evaluate(*args, seed=2, val=splits.val, reference_cache=tmp_path)
    assert len(fits) == 2 and len(list(tmp_path.glob("*.gaussian-mixture.npz"))) == 1

    def refit(*_, **__):
        raise AssertionError("the real side's K_yy was computed again")

    monkeypatch.setattr(KidReference, "fit", refit)
    second = evaluate(*args, seed=2, val=splits.val, reference_cache=tmp_path)
    assert len(fits) == 2  # the mixture read back, for its likelihood too
    assert len(list(tmp_path.glob("*.json"))) == 1 and len(list(tmp_path.glob("*.real-side.npz"))) == 1
    assert not any(ref.cached for ref in first.references) and all(ref.cached for ref in second.references)
    for evaluation in (first, second):
        assert without_timings(evaluation.primary.metrics) == without_timings(fresh.primary.metrics)
        assert [ref.metrics for ref in evaluation.references] == [ref.metrics for ref in fresh.references]
