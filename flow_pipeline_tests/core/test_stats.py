"""Streaming mean/std against NumPy's two-pass results, and the std floor against its formula."""

import numpy as np
import pytest
import torch

from flow_pipeline.core.data import DataError
from flow_pipeline.core.data.normalization import floor_std
from flow_pipeline.core.data.stats import streaming_mean_std


def _random_rows(rows: int, dim: int, seed: int) -> np.ndarray:
    # Offset means and unequal scales per dimension, like embeddings; never zeros.
    rng = np.random.default_rng(seed)
    return (rng.normal(3.0, 1.0, dim) + rng.standard_normal((rows, dim)) * rng.uniform(0.1, 2.0, dim)).astype(
        np.float32
    )


def assert_float32_close(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> None:
    """The contract for float32 data: float32 sums around each chunk's mean give the float64 two-pass result to
    ~1e-7 relative (measured worst 1.2e-7 for std, 7e-9 std-units for the mean); 1e-6 leaves room."""
    x64 = x.astype(np.float64)
    reference_std = x64.std(axis=0, ddof=1)
    np.testing.assert_allclose(mean, x64.mean(axis=0), rtol=0, atol=1e-6 * reference_std.min())
    np.testing.assert_allclose(std, reference_std, rtol=1e-6)


@pytest.mark.parametrize("chunk_rows", [1, 7, 64, 101, 257, 1024])  # 64, 101, 257, 1024 leave a short last chunk
def test_streaming_matches_numpy_for_any_chunk_size(chunk_rows):
    x = _random_rows(1001, 13, seed=chunk_rows)
    mean, std, n = streaming_mean_std(x, chunk_rows=chunk_rows)
    assert n == x.shape[0]
    assert mean.dtype == np.float64 and std.dtype == np.float64
    assert_float32_close(x, mean, std)


@pytest.mark.parametrize("chunk_rows", [1, 7, 257])
def test_float64_data_is_summed_in_float64(chunk_rows):
    x = _random_rows(1001, 13, seed=chunk_rows).astype(np.float64) * np.pi  # values float32 cannot hold
    mean, std, _ = streaming_mean_std(x, chunk_rows=chunk_rows)
    np.testing.assert_allclose(mean, x.mean(axis=0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(std, x.std(axis=0, ddof=1), rtol=1e-10)


def test_streaming_uses_sample_std_not_population_std():
    x = _random_rows(5, 4, seed=1)
    _, std, _ = streaming_mean_std(x, chunk_rows=2)
    assert not np.allclose(std, x.astype(np.float64).std(axis=0, ddof=0))


def test_streaming_on_memmapped_npy(tmp_path):
    x = _random_rows(1000, 32, seed=2)
    np.save(tmp_path / "x.npy", x)
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
    mean, std, n = streaming_mean_std(mapped, chunk_rows=99)
    assert n == 1000
    assert_float32_close(x, mean, std)


def test_streaming_accepts_torch_tensor():
    x = _random_rows(50, 6, seed=3)
    mean, std, _ = streaming_mean_std(torch.from_numpy(x), chunk_rows=8)
    assert_float32_close(x, mean, std)
    # Half-precision tensors are widened to float32 (NumPy has no bfloat16).
    for dtype in (torch.float16, torch.bfloat16):
        low = torch.from_numpy(x).to(dtype)
        mean, std, _ = streaming_mean_std(low, chunk_rows=8)
        assert_float32_close(low.float().numpy(), mean, std)


def test_streaming_stays_accurate_with_a_large_mean():
    # sum/sum-of-squares loses all digits here (mean^2 / var = 1e16); the merge update must not.
    rng = np.random.default_rng(4)
    x = 1e6 + rng.standard_normal((3000, 3)) * 1e-2
    _, std, _ = streaming_mean_std(x, chunk_rows=333)
    np.testing.assert_allclose(std, x.std(axis=0, ddof=1), rtol=1e-6)


def test_float32_data_far_from_zero_keeps_its_digits():
    """Mean 1e4, spread 0.1 (mean/std = 1e5) in float32: the centre correction carries the digits a float32 centre
    rounds away. Without the mean's s/k the mean is off by ~0.03 std; without M2's s^2/k the std by ~5e-4."""
    rng = np.random.default_rng(12)
    x = (1e4 + 0.1 * rng.standard_normal((20000, 8))).astype(np.float32)
    x64 = x.astype(np.float64)
    mean, std, _ = streaming_mean_std(x, chunk_rows=2048)
    np.testing.assert_allclose(mean, x64.mean(axis=0), rtol=0, atol=1e-6 * x64.std(axis=0).min())
    np.testing.assert_allclose(std, x64.std(axis=0, ddof=1), rtol=1e-5)


def test_float32_values_whose_squares_overflow_are_summed_in_float64():
    x = _random_rows(300, 4, seed=13) * np.float32(1e20)  # finite in float32; squared deviations are not
    assert np.isfinite(x).all()
    mean, std, _ = streaming_mean_std(x, chunk_rows=64)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(mean, x64.mean(axis=0), rtol=1e-10)
    np.testing.assert_allclose(std, x64.std(axis=0, ddof=1), rtol=1e-10)


def test_streaming_rejects_too_few_rows_and_nonfinite_values():
    with pytest.raises(DataError, match="at least 2 rows"):
        streaming_mean_std(np.ones((1, 4), dtype=np.float32))
    x = _random_rows(20, 4, seed=5)
    x[7, 2] = np.nan
    with pytest.raises(DataError, match="NaN or inf"):
        streaming_mean_std(x, chunk_rows=6)


def test_floor_std_lifts_only_dimensions_below_the_relative_floor():
    rng = np.random.default_rng(6)
    std = rng.uniform(0.004, 0.007, 101)
    std[[3, 50]] = [2e-5, 2e-4]
    floored = floor_std(std, rel_floor=0.1)
    expected = np.where(std < 0.1 * np.median(std), 0.1 * np.median(std), std)
    np.testing.assert_allclose(floored, expected, rtol=0, atol=0)
    assert floored[3] == floored[50] == pytest.approx(0.1 * np.median(std))
    assert np.array_equal(np.delete(floored, [3, 50]), np.delete(std, [3, 50]))


def test_floor_std_absolute_floor_applies_when_median_is_zero():
    std = np.array([0.0, 0.0, 0.0, 0.5])
    np.testing.assert_array_equal(floor_std(std, rel_floor=0.1, abs_floor=1e-6), [1e-6, 1e-6, 1e-6, 0.5])


def test_floor_std_rejects_bad_arguments():
    with pytest.raises(ValueError, match="1-D"):
        floor_std(np.ones((2, 2)))
    with pytest.raises(ValueError, match="abs_floor"):
        floor_std(np.ones(3), abs_floor=0.0)
