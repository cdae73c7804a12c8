"""Whitening: Ledoit-Wolf shrinkage, the fitted transform against independent formulas, its state and the run name."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from flow_pipeline.config import TrainConfig
from flow_pipeline.core.data.normalization import Normalizer
from flow_pipeline.core.data.stats import ledoit_wolf_shrinkage, streaming_scatter


def _correlated_rows(n: int, dim: int, seed: int) -> np.ndarray:
    """(n, dim) float32 rows with a strongly non-diagonal covariance and an offset mean."""
    rng = np.random.default_rng(seed)
    mixing = rng.standard_normal((dim, dim)) * np.linspace(1.0, 0.05, dim)
    return (rng.standard_normal((n, dim)) @ mixing.T * 0.01 + rng.standard_normal(dim) * 0.1).astype(np.float32)


def _ledoit_wolf_by_definition(x: np.ndarray) -> float:
    """Ledoit & Wolf (2004), eq. for the shrinkage intensity, with one explicit outer product per row."""
    n, p = x.shape
    centred = x - x.mean(0)
    s = centred.T @ centred / n
    mu = np.trace(s) / p
    d2 = np.linalg.norm(s - mu * np.eye(p), "fro") ** 2 / p
    b2 = sum(np.linalg.norm(np.outer(row, row) - s, "fro") ** 2 for row in centred) / n**2 / p
    return min(b2, d2) / d2


def _shrunk_covariance(x: np.ndarray) -> np.ndarray:
    """The covariance whitening must invert: unbiased sample covariance shrunk towards its mean eigenvalue."""
    alpha = _ledoit_wolf_by_definition(x)
    cov = np.cov(x.T)
    return (1 - alpha) * cov + alpha * np.trace(cov) / cov.shape[0] * np.eye(cov.shape[0])


@pytest.mark.parametrize("n, dim", [(400, 12), (30, 40)])
def test_ledoit_wolf_weight_matches_the_definition(n, dim):
    x = _correlated_rows(n, dim, seed=n).astype(np.float64)
    scatter, fourth, rows = streaming_scatter(x, x.mean(0), chunk_rows=7)
    assert rows == n
    np.testing.assert_allclose(scatter, (x - x.mean(0)).T @ (x - x.mean(0)), rtol=1e-10, atol=1e-14)
    assert ledoit_wolf_shrinkage(scatter, fourth, rows) == pytest.approx(_ledoit_wolf_by_definition(x), rel=1e-8)


def test_shrinkage_is_large_for_few_rows_and_small_for_many():
    few, many = _correlated_rows(30, 40, seed=1), _correlated_rows(4000, 40, seed=1)
    weights = [ledoit_wolf_shrinkage(*streaming_scatter(x, x.astype(np.float64).mean(0))) for x in (few, many)]
    assert 0 < weights[1] < weights[0] <= 1


@pytest.mark.parametrize("n, dim", [(500, 16), (40, 64)])
def test_whitening_inverts_the_shrunk_covariance(n, dim):
    x = _correlated_rows(n, dim, seed=dim)
    norm = Normalizer.fit(x, "whiten")
    assert norm.method == "whiten" and norm.details["shrinkage"] == pytest.approx(_ledoit_wolf_by_definition(
        x.astype(np.float64)), rel=1e-6)
    mean = torch.from_numpy(x.astype(np.float64).mean(0)).float()
    # Row i of the linear map is normalize(mean + e_i): W^T C W = I for the shrunk covariance C.
    w = (norm.normalize(mean + torch.eye(dim)) - norm.normalize(mean[None])).double().numpy()
    np.testing.assert_allclose(w.T @ _shrunk_covariance(x.astype(np.float64)) @ w, np.eye(dim), atol=2e-4)
    # Exactly invertible, both ways, even when rows < dim.
    rows = torch.from_numpy(x)
    torch.testing.assert_close(norm.denormalize(norm.normalize(rows)), rows, rtol=1e-4, atol=1e-5)
    z = torch.randn(8, dim, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(norm.normalize(norm.denormalize(z)), z, rtol=1e-3, atol=1e-3)


def test_whitening_decorrelates_training_rows_unlike_zscore():
    x = _correlated_rows(3000, 10, seed=3)
    off_diagonal = ~np.eye(10, dtype=bool)
    for method, expect_decorrelated in (("whiten", True), ("zscore", False)):
        z = Normalizer.fit(x, method).normalize(torch.from_numpy(x)).double().numpy()
        largest = np.abs(np.corrcoef(z.T)[off_diagonal]).max()
        assert (largest < 0.01) == expect_decorrelated, (method, largest)


def test_whitening_state_survives_a_weights_only_checkpoint_round_trip():
    x = _correlated_rows(100, 8, seed=4)
    norm = Normalizer.fit(x, "whiten")
    buffer = io.BytesIO()
    torch.save({"normalization_stats": norm.state_dict()}, buffer)
    buffer.seek(0)
    restored = Normalizer.from_state_dict(torch.load(buffer, weights_only=True)["normalization_stats"])
    assert restored.method == "whiten"
    rows = torch.from_numpy(x)
    assert torch.equal(restored.normalize(rows), norm.normalize(rows))
    # A state written before normalisation was a choice has no method: it is z-scoring.
    old = Normalizer.from_state_dict({"mean": torch.zeros(8), "std": torch.ones(8)})
    assert old.method == "zscore"


def test_unknown_method_is_rejected_naming_the_field():
    with pytest.raises(ValueError, match="normalization: unknown value 'pca'"):
        Normalizer.fit(_correlated_rows(10, 4, seed=0), "pca")


def test_run_name_carries_a_non_default_normalization():
    assert TrainConfig().run_name == TrainConfig(normalization="whiten").run_name == "mlp-icfm-full-none"
    assert TrainConfig(normalization="zscore").run_name == "mlp-icfm-full-none-zscore"


def test_trainer_stores_the_whitening_in_the_checkpoint_and_refuses_mismatched_statistics(tmp_path, one_torch_thread):
    from dataclasses import replace

    from flow_pipeline.core import checkpoint as ckpt
    from flow_pipeline.core.trainer import train
    from flow_pipeline_tests.core.mixture_data import mixture_train_data

    data = mixture_train_data(256, 64, 32, seed=5)
    data = replace(data, normalizer=Normalizer.fit(data.train.numpy(), "whiten"))
    config = TrainConfig(arch="mlp", model_size="tiny", dim=32, batch_size=32, max_epochs=1, warmup_steps=2,
                         device="cpu", normalization="whiten")
    with pytest.raises(ValueError, match="normalization: config says 'zscore'"):
        train(config.model_copy(update={"normalization": "zscore"}), data, tmp_path / "mismatch")
    assert not (tmp_path / "mismatch" / ckpt.BEST_NAME).exists()

    result = train(config, data, tmp_path / config.run_name)
    state = ckpt.load_checkpoint(result.checkpoint_path)["normalization_stats"]
    assert state["method"] == "whiten" and torch.equal(state["components"], data.normalizer.components)
    restored = Normalizer.from_state_dict(state)  # what evaluation does before sampling
    torch.testing.assert_close(restored.denormalize(restored.normalize(data.val)), data.val, rtol=1e-4, atol=1e-4)
