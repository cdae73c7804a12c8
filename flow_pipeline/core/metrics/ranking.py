"""The ranking rule of sample sets and the space each metric is computed in (named here, computed in
:mod:`flow_pipeline.core.metrics.real_side`)."""

from __future__ import annotations

from flow_pipeline.core.metrics.copies import COPY_FRACTION_LIMIT


RANKING_METRIC = "ranking_kid"
RANKING_RULE = (f"{RANKING_METRIC} = KID (unbiased MMD², cubic kernel, train-normalised space; E = 0 for held-out "
                f"real data) for sample sets whose train_copy_fraction is at most {COPY_FRACTION_LIMIT}; +inf for "
                f"sets above it (memorising: exact or near copies of training rows, which a distribution distance "
                f"cannot tell from held-out real rows), so they rank below every non-copying set. Lower is better.")
# The ranking of models: held-out likelihood (flow_pipeline.core.likelihood), a proper scoring rule.
LIKELIHOOD_RULE = ("test_nll = -mean log p(x) over the held-out test rows, raw embedding space, nats per row (the "
                   "model's density by its probability-flow ODE, the baselines' in closed form, all on the same "
                   "rows); a row's verdict against gaussian-full comes from the 95% interval of the paired per-row "
                   "difference (over replicates when there are several). A non-finite value or a failed evaluation "
                   "ranks its row last. Lower is better; the sample-set distances (KID, C2ST, PRDC) are diagnostics.")
# The space every metric is computed in (the evaluation's metadata repeats this next to the numbers).
METRIC_SPACES = {
    "train-normalised (z-scored with the training rows' mean and floored std)": (
        "kid", "kid_se", "kid_ci_low", "kid_ci_high", "ranking_kid", "fd_inf", "fd_inf_slope", "c2st_accuracy",
        "rbf_kid"),
    "raw embedding space": (
        "test_nll", "test_bits_per_dim", "loglik_vs_gaussian_full", "loglik_vs_gaussian_diag",
        "loglik_vs_gaussian_mixture", "kl_to_truth", "kl_closed_fraction",
        "fd", "fd_floor", "fd_ratio", "precision", "recall", "density", "coverage", "memorization_ratio",
        "train_copy_fraction", "copy_threshold", "variance_ratio", "norm_ratio", "norm_mean", "norm_std",
        "real_norm_mean", "real_norm_std", "nn_cosine"),
}
