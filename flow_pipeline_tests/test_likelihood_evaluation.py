"""The held-out likelihood an evaluation ranks by, on a checkpoint trained on the built-in data (whose split set
records its truth): every number of the model's and the reference rows' recomputed from the same test rows with
independent formulas, the beats-gaussian-full check read from the paired interval, and likelihood_rows: 0."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import scipy.special
import torch
from scipy import stats

from flow_pipeline.config import TrainConfig
from flow_pipeline.core.baselines import BASELINES, fit_baseline
from flow_pipeline.core.checkpoint import load_ema_model
from flow_pipeline.core.data.normalization import Normalizer
from flow_pipeline.core.data.sources import build_splits
from flow_pipeline.core.data.synthetic import sonar_mixture
from flow_pipeline.core.likelihood import model_log_likelihood
from flow_pipeline.core.mixture_baseline import MIXTURE, fit_mixture_baseline
from flow_pipeline.core.trainer import TrainData, train
from flow_pipeline.defs.checks import beats_gaussian_full
from flow_pipeline.evaluation.evaluate import EvaluationData, EvaluationSettings, evaluate_checkpoint, saved_train_config
from flow_pipeline.evaluation.samplers import SamplerSpec
from flow_pipeline_tests.helpers import TINY_DATASET, TINY_TRAIN

DIM = TINY_DATASET["dim"]
N_ROWS = 2000  # 1,600 training rows > dim: the whitening is well conditioned
EXACT = {"divergence": "exact"}  # the network's 8 coordinates: no Hutchinson noise, so a recomputation agrees
LIKELIHOOD_KEYS = ("test_nll", "test_bits_per_dim", "loglik_vs_gaussian_full", "loglik_vs_gaussian_diag",
                   "loglik_vs_gaussian_mixture", "kl_to_truth", "kl_closed_fraction")
REFERENCE_BASELINES = (*BASELINES, MIXTURE)


def mixture_log_density(truth, x: np.ndarray) -> np.ndarray:
    """log sum_k w_k N(x; mu_k, Sigma_k) (n,) through each component's dense covariance B diag(l_k) B^T + diag(d)
    and its Cholesky factor, not the mixture's own Woodbury form."""
    joint = []
    for weight, mean, latent in zip(truth.weights, truth.means, truth.latent_var):
        lower = np.linalg.cholesky((truth.basis * latent) @ truth.basis.T + np.diag(truth.diag_var))
        u = scipy.linalg.solve_triangular(lower, (x - mean).T, lower=True)
        log_det = 2 * np.log(np.diag(lower)).sum()
        joint.append(math.log(weight) - 0.5 * ((u * u).sum(0) + log_det + x.shape[1] * math.log(2 * math.pi)))
    return scipy.special.logsumexp(np.stack(joint, axis=1), axis=1)


def t_interval(values: np.ndarray) -> tuple[float, float]:
    """The 95% Student-t interval of the mean of ``values`` (n,)."""
    half = stats.t.ppf(0.975, values.size - 1) * values.std(ddof=1) / math.sqrt(values.size)
    return values.mean() - half, values.mean() + half


@pytest.fixture(scope="module")
def built_in(tmp_path_factory):
    """(best.pt, splits): a tiny linear-skip model with a network on 8 whitened coordinates, trained for 2 epochs
    on the built-in generator's rows."""
    torch.set_num_threads(1)
    splits = build_splits("synthetic", DIM, N_ROWS, TINY_DATASET["seed"], (0.8, 0.1, 0.1))
    normalizer = Normalizer.fit(torch.from_numpy(splits.train), "whiten")
    data = TrainData(torch.from_numpy(splits.train), torch.from_numpy(splits.val), normalizer)
    config = TrainConfig(**TINY_TRAIN, normalization="whiten", linear_skip=True, principal_dims=8)
    return train(config, data, tmp_path_factory.mktemp("built_in")).checkpoint_path, splits


def evaluated(path, splits, **settings):
    data = EvaluationData(splits.train, splits.test, val=splits.val, truth=splits.truth)
    return evaluate_checkpoint(path, data, EvaluationSettings([SamplerSpec.parse("euler:4")], n_samples=64,
                                                               likelihood_options=EXACT, **settings))


@pytest.mark.slow
def test_every_likelihood_number_is_recomputed_from_the_same_test_rows(built_in):
    path, splits = built_in
    evaluation = evaluated(path, splits)
    model = evaluation.primary.metrics
    references = {ref.name: ref.metrics for ref in evaluation.references}
    # The rows the samples are scored against: n = 64 of the 200 test rows, drawn with the evaluation's seed (0).
    scored = np.sort(np.random.default_rng(0).choice(splits.test.shape[0], size=64, replace=False))
    rows = np.asarray(splits.test[scored], dtype=np.float64)
    assert model["likelihood_rows"] == rows.shape[0] == 64 and splits.test.shape[0] == 200
    assert splits.truth == {"generator": "sonar_mixture", "dim": DIM, "seed": TINY_DATASET["seed"]}
    # Each density on the same rows: the baselines fitted to train (gaussian-full's shrinkage chosen on val, the
    # gaussian-mixture's K on val), the generator's mixture, and the model's ODE density recomputed through the core.
    log_p = {name: fit_baseline(name, splits.train, splits.val).log_prob(rows) for name in BASELINES}
    log_p[MIXTURE] = fit_mixture_baseline(splits.train, splits.val).log_prob(rows)
    log_p["truth"] = mixture_log_density(sonar_mixture(dim=DIM, seed=TINY_DATASET["seed"]), rows)
    ema = load_ema_model(path, saved_train_config)
    log_p["model"] = model_log_likelihood(ema.model, ema.flow, ema.normalizer, torch.from_numpy(rows).float(),
                                          **EXACT).log_prob.double().numpy()
    assert model["test_nll"] == pytest.approx(-log_p["model"].mean(), rel=1e-9)
    assert model["test_bits_per_dim"] == pytest.approx(model["test_nll"] / (DIM * math.log(2)), rel=1e-12)
    for name in (*REFERENCE_BASELINES, "truth"):
        assert references[name]["test_nll"] == pytest.approx(-log_p[name].mean(), rel=1e-9)
        assert references[name]["test_bits_per_dim"] == pytest.approx(-log_p[name].mean() / (DIM * math.log(2)))

    # model - baseline per row: the mean is the difference of the NLLs; interval and verdict from the rows.
    for name in REFERENCE_BASELINES:
        key = f"loglik_vs_{name.replace('-', '_')}"
        low, high = t_interval(log_p["model"] - log_p[name])
        assert model[key] == pytest.approx(references[name]["test_nll"] - model["test_nll"], rel=1e-9)
        assert (model[f"{key}_ci_low"], model[f"{key}_ci_high"]) == pytest.approx((low, high), rel=1e-9)
        assert model[f"{key}_verdict"] == ("better" if low > 0 else "worse" if high < 0 else
                                           "no detectable difference")

    # KL to the truth: 0 for the truth itself; the model's minus gaussian-full's is the likelihood gap, sign flipped.
    truth = references["truth"]
    assert (truth["kl_to_truth"], truth["kl_to_truth_ci_low"], truth["kl_to_truth_ci_high"]) == (0.0, 0.0, 0.0)
    kl = {name: float(np.mean(log_p["truth"] - log_p[name])) for name in ("model", *REFERENCE_BASELINES)}
    assert model["kl_to_truth"] == pytest.approx(kl["model"], rel=1e-9)
    for name in REFERENCE_BASELINES:
        assert references[name]["kl_to_truth"] == pytest.approx(kl[name], rel=1e-9)
        assert references[name]["kl_to_truth_ci_low"] == pytest.approx(t_interval(log_p["truth"] - log_p[name])[0])
        # The share of gaussian-full's distance each reference closes: 0 for gaussian-full itself.
        assert references[name]["kl_closed_fraction"] == pytest.approx(1 - kl[name] / kl["gaussian-full"],
                                                                       rel=1e-9, abs=1e-12)
    assert references["gaussian-mixture"]["kl_to_truth"] < references["gaussian-full"]["kl_to_truth"]
    assert references["truth"]["kl_closed_fraction"] == 1.0
    assert model["kl_to_truth"] - references["gaussian-full"]["kl_to_truth"] == \
        pytest.approx(-model["loglik_vs_gaussian_full"], rel=1e-6)
    assert model["kl_closed_fraction"] == pytest.approx(1 - kl["model"] / kl["gaussian-full"], rel=1e-9)
    assert model["kl_closed_fraction_ci_low"] < model["kl_closed_fraction"] < model["kl_closed_fraction_ci_high"]

    # The principal_dims split of the difference: its two parts add up to the whole, row by row.
    parts = model["loglik_vs_gaussian_full_network_coords"] + model["loglik_vs_gaussian_full_other_coords"]
    assert parts == pytest.approx(model["loglik_vs_gaussian_full"], rel=1e-6)

    check = beats_gaussian_full(model)
    assert check.passed == (model["loglik_vs_gaussian_full_ci_low"] > 0)
    assert check.metadata["ci_low"].value == model["loglik_vs_gaussian_full_ci_low"]
    assert check.metadata["rows"].value == 64


@pytest.mark.slow
def test_likelihood_rows_0_scores_no_density_and_the_check_says_why(built_in):
    path, splits = built_in
    evaluation = evaluated(path, splits, likelihood_rows=0)
    assert evaluation.likelihood is None
    assert not set(LIKELIHOOD_KEYS) & set(evaluation.primary.metrics)
    assert [ref.name for ref in evaluation.references] == ["held-out real (val)", *REFERENCE_BASELINES]  # no truth
    assert all("test_nll" not in ref.metrics for ref in evaluation.references)
    assert "c2st_accuracy" in evaluation.primary.metrics  # the sample-set scores stay
    check = beats_gaussian_full(evaluation.primary.metrics)
    assert not check.passed and "likelihood_rows: 0" in check.metadata["error"].value


def test_the_check_passes_exactly_when_the_interval_lies_above_zero():
    rng = np.random.default_rng(27)
    for _ in range(20):
        low, width = rng.normal(scale=5.0), rng.uniform(0.1, 10.0)
        metrics = {"loglik_vs_gaussian_full": low + width / 2, "loglik_vs_gaussian_full_ci_low": low,
                   "loglik_vs_gaussian_full_ci_high": low + width, "likelihood_rows": 100}
        check = beats_gaussian_full(metrics)
        assert check.passed == (low > 0)
        assert (check.metadata["ci_low"].value, check.metadata["ci_high"].value) == (low, low + width)
    # A better mean is not enough: an interval that reaches 0 is no detectable difference.
    touching = {"loglik_vs_gaussian_full": 2.0, "loglik_vs_gaussian_full_ci_low": 0.0,
                "loglik_vs_gaussian_full_ci_high": 4.0}
    assert not beats_gaussian_full(touching).passed


@pytest.mark.slow
def test_a_likelihood_guidance_is_chosen_on_val_and_both_samples_and_likelihood_use_it(built_in):
    """'@likelihood': the w with the highest mean val log-likelihood (recomputed here on the val rows at each w of
    the fit's grid), shown in the sampler's label, and the test NLL is the model's at that w."""
    path, splits = built_in
    data = EvaluationData(splits.train, splits.test, val=splits.val, truth=splits.truth)
    evaluation = evaluate_checkpoint(path, data, EvaluationSettings([SamplerSpec.parse("euler:4@likelihood")],
                                                                    n_samples=64, likelihood_options=EXACT))
    primary = evaluation.primary
    fit = primary.guidance_fit
    ema = load_ema_model(path, saved_train_config)
    val = torch.from_numpy(np.asarray(splits.val, dtype=np.float32))
    recomputed = [float(model_log_likelihood(ema.model, ema.flow, ema.normalizer, val, guidance=w,
                                             **EXACT).log_prob.mean()) for w in fit["grid"]]
    assert fit["rule"] == "val likelihood" and fit["rows"] == val.shape[0]
    np.testing.assert_allclose(fit["val_log_likelihood"], recomputed, rtol=1e-9)
    assert primary.guidance == fit["grid"][int(np.argmax(recomputed))]
    assert primary.sampler == f"euler:4@likelihood={primary.guidance:g}"
    scored = np.sort(np.random.default_rng(0).choice(splits.test.shape[0], size=64, replace=False))
    test_rows = torch.from_numpy(np.asarray(splits.test[scored], dtype=np.float32))
    at_w = model_log_likelihood(ema.model, ema.flow, ema.normalizer, test_rows, guidance=primary.guidance, **EXACT)
    assert primary.metrics["test_nll"] == pytest.approx(-float(at_w.log_prob.mean()), rel=1e-9)
