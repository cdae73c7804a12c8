"""The held-out likelihood of a checkpoint, the yardstick the report ranks by: per-row log-densities of test rows
under the model, beside the closed-form Gaussian baselines' on the same rows, and on data drawn from a known
distribution (the built-in generator) the distance of each to the truth.

    test rows (raw) ──► log p_model (probability-flow ODE, :func:`~flow_pipeline.core.likelihood.model_log_likelihood`)
                    ──► log p_gaussian-full, log p_gaussian-diag (closed form, fitted to the run's training rows)
                    ──► log p_gaussian-mixture (EM on the training rows, K chosen on val; none without val)
                    ──► log p_true (the generator's mixture, when the split set records it)
        ──► paired per-row differences with 95% intervals (:mod:`flow_pipeline.core.paired`), KL to the truth,
            the share of gaussian-full's KL the model closes, and for a principal_dims model where the nats go

Everything is per row, so it needs no n >= 5 x dim: a few hundred test rows still give a paired interval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from flow_pipeline.core.baselines import BASELINES, fit_baseline
from flow_pipeline.core.checkpoint import EMAModel
from flow_pipeline.core.data.synthetic import GaussianMixture
from flow_pipeline.core.likelihood import LogLikelihood, model_log_likelihood
from flow_pipeline.core.likelihood_parts import subspace_parts
from flow_pipeline.core.mixture_baseline import MIXTURE
from flow_pipeline.core.models.skip import LinearSkip
from flow_pipeline.core.paired import PairedDifference, kl_closed_fraction, kl_to_truth, paired_difference
from flow_pipeline.evaluation.mixture_reference import MixtureReference, mixture_reference

PRIMARY_BASELINE = "gaussian-full"
TRUTH = "truth"
LN2 = math.log(2)


def _key(name: str) -> str:
    return name.replace("-", "_")


@dataclass
class LikelihoodEvaluation:
    """Held-out log-likelihood of one model and its references on the same ``n`` test rows (raw space, nats).

    model_nll: mean -log p_model per row; model_se: its Hutchinson standard error (0 when the divergence is
    exact); method: how the density was integrated; reference_nll: name -> mean -log p of each baseline (and the
    truth, when known); versus: baseline name -> model - baseline per-row difference; kl: name -> KL(truth || name)
    for the model ("model") and every baseline (truth known only); closed_fraction: 1 - KL(model) / KL(gaussian-full)
    with its interval (dict, truth known only), and reference_closed the same of each baseline and the truth; parts:
    for a principal_dims model, the paired difference against gaussian-full split into the network's coordinates and
    the rest, and the network's gain over its own Gaussian; skipped: baseline name -> why it was not scored.
    """

    n: int
    dim: int
    model_nll: float
    model_se: float
    method: str
    seconds: float
    guidance: float
    reference_nll: dict[str, float]
    versus: dict[str, PairedDifference]
    kl: dict[str, PairedDifference] = field(default_factory=dict)
    closed_fraction: dict | None = None
    parts: dict[str, PairedDifference] = field(default_factory=dict)
    reference_closed: dict[str, dict] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def bits_per_dim(self, nll: float) -> float:
        return nll / (self.dim * LN2)

    def metrics(self) -> dict[str, float | str | int]:
        """The model's flat metadata keys: test_nll, test_bits_per_dim, loglik_vs_<baseline> (+ _ci_low, _ci_high,
        _verdict), kl_to_truth (+ interval) and kl_closed_fraction (+ interval) when the truth is known, the
        principal_dims split, how it was computed, and <baseline>_note for a baseline that was skipped."""
        values: dict[str, float | str | int] = {
            "test_nll": self.model_nll, "test_bits_per_dim": self.bits_per_dim(self.model_nll),
            "test_nll_se": self.model_se, "likelihood_rows": self.n, "likelihood_method": self.method,
            "likelihood_seconds": self.seconds}
        for name, difference in self.versus.items():
            values.update(_interval(difference, f"loglik_vs_{_key(name)}"))
        if "model" in self.kl:
            values.update(_interval(self.kl["model"], "kl_to_truth"))
        if self.closed_fraction is not None:
            values.update(self.closed_fraction)
        for name, difference in self.parts.items():
            values.update(_interval(difference, name))
        values.update({f"{_key(name)}_note": note for name, note in self.skipped.items()})
        return values

    def reference_metrics(self, name: str) -> dict[str, float]:
        """A reference row's likelihood keys (test_nll, test_bits_per_dim, kl_to_truth and kl_closed_fraction with
        their intervals)."""
        nll = self.reference_nll[name]
        values = {"test_nll": nll, "test_bits_per_dim": self.bits_per_dim(nll)}
        if name in self.kl:
            values.update(_interval(self.kl[name], "kl_to_truth"))
        values.update(self.reference_closed.get(name, {}))
        return values


def _interval(difference: PairedDifference, prefix: str) -> dict:
    return {prefix: difference.mean, f"{prefix}_ci_low": difference.low, f"{prefix}_ci_high": difference.high,
            f"{prefix}_verdict": difference.verdict}


def _method(result: LogLikelihood) -> str:
    divergence = ("exact divergence" if result.divergence == "exact"
                  else f"Hutchinson divergence, {result.probes} Rademacher probes per row")
    closed = result.dim - result.integrated_dims
    where = f" on {result.integrated_dims} integrated coordinates, {closed} in closed form" if closed else ""
    return f"probability-flow ODE, {result.solver} {result.steps} steps, {divergence}{where}"


def _model_log_prob(ema: EMAModel, rows: np.ndarray, guidance: float, options: dict) -> LogLikelihood:
    x = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32))
    return model_log_likelihood(ema.model, ema.flow, ema.normalizer, x, guidance=guidance, **options)


def _network_parts(ema: EMAModel, model: LogLikelihood, rows: np.ndarray, baseline) -> dict[str, PairedDifference]:
    """For a model whose network integrates fewer than all coordinates: model - gaussian-full in the network's
    coordinates and in the rest, and the network's gain over the model's own Gaussian there."""
    if model.integrated_dims == model.dim or not isinstance(ema.model, LinearSkip):
        return {}
    parts = subspace_parts(model, rows, ema.normalizer, baseline, ema.model.variances())
    zeros = np.zeros(rows.shape[0])  # each part's mean and interval: a paired difference against 0
    found = {"loglik_vs_gaussian_full_network_coords": paired_difference(parts.network_coordinates, zeros),
             "loglik_vs_gaussian_full_other_coords": paired_difference(parts.other_coordinates, zeros)}
    if parts.network_over_own_gaussian is not None:
        found["network_over_own_gaussian"] = paired_difference(parts.network_over_own_gaussian, zeros)
    return found


def _closed_fraction(log_true: np.ndarray, log_model: np.ndarray, log_reference: np.ndarray) -> dict:
    """kl_closed_fraction with its interval; -inf when the model gives some row no density (it closes nothing and
    loses without bound), NaN when the reference is not farther from the truth than 0."""
    if not np.isfinite(log_model).all():
        return {"kl_closed_fraction": -math.inf, "kl_closed_fraction_ci_low": -math.inf,
                "kl_closed_fraction_ci_high": -math.inf}
    try:
        fraction = kl_closed_fraction(log_true, log_model, log_reference)
    except ValueError:
        return {"kl_closed_fraction": math.nan, "kl_closed_fraction_ci_low": math.nan,
                "kl_closed_fraction_ci_high": math.nan}
    return {"kl_closed_fraction": fraction.value, "kl_closed_fraction_ci_low": fraction.low,
            "kl_closed_fraction_ci_high": fraction.high}


def evaluate_likelihood(ema: EMAModel, rows: np.ndarray, train_rows, truth: GaussianMixture | None,
                        guidance: float = 1.0, val=None, mixture: MixtureReference | None = None,
                        **options) -> LikelihoodEvaluation:
    """Score test ``rows`` (n, dim) raw under the checkpoint's model (with ``guidance`` w, as it is sampled), under
    the Gaussian baselines fitted to the run's ``train_rows`` (gaussian-full's shrinkage chosen on ``val`` when
    given, as the reference rows' is) and under the gaussian-mixture (``mixture``: fitted here when not given;
    skipped without val rows); with ``truth`` (the distribution the rows were drawn from), the KL of each to it.
    ``options`` go to :func:`~flow_pipeline.core.likelihood.log_likelihood` (divergence, probes, steps, batch_size,
    seed)."""
    rows = np.asarray(rows, dtype=np.float64)
    model = _model_log_prob(ema, rows, guidance, options)
    # A row the model's ODE cannot score (NaN: a diverged trajectory) gets no density: -inf, the worst score, so the
    # model ranks last instead of the evaluation failing.
    log_p = {"model": np.nan_to_num(model.log_prob.double().numpy(), nan=-np.inf)}
    baselines = {name: fit_baseline(name, train_rows, val) for name in BASELINES}
    mixture = mixture or mixture_reference(train_rows, val)
    if mixture.baseline is not None:
        baselines[MIXTURE] = mixture.baseline
    log_p.update({name: baseline.log_prob(rows) for name, baseline in baselines.items()})
    versus = {name: paired_difference(log_p["model"], log_p[name]) for name in baselines}
    reference_nll = {name: float(-log_p[name].mean()) for name in baselines}
    kl, closed, reference_closed = {}, None, {}
    if truth is not None:
        log_true = truth.log_prob(rows)
        reference_nll[TRUTH] = float(-log_true.mean())
        kl = {name: kl_to_truth(log_true, values) for name, values in log_p.items()}
        kl[TRUTH] = kl_to_truth(log_true, log_true)
        closed = _closed_fraction(log_true, log_p["model"], log_p[PRIMARY_BASELINE])
        references = {**{name: log_p[name] for name in baselines}, TRUTH: log_true}
        reference_closed = {name: _closed_fraction(log_true, values, log_p[PRIMARY_BASELINE])
                            for name, values in references.items()}
    se = float(np.sqrt(np.sum(model.std_error.double().numpy() ** 2)) / rows.shape[0])
    return LikelihoodEvaluation(
        n=rows.shape[0], dim=rows.shape[1], model_nll=float(-log_p["model"].mean()), model_se=se,
        method=_method(model),
        seconds=model.seconds, guidance=guidance, reference_nll=reference_nll, versus=versus, kl=kl,
        closed_fraction=closed, parts=_network_parts(ema, model, rows, baselines[PRIMARY_BASELINE]),
        reference_closed=reference_closed, skipped={} if mixture.baseline else {MIXTURE: mixture.note})
