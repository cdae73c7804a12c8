"""Embedding sources, splits and validation: generator statistics, file loading, errors, atomic split sets."""

import dataclasses
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from flow_pipeline.core.data import DataError
from flow_pipeline.core.data.files import load_embeddings
from flow_pipeline.core.data.sonar_like import synthetic_sonar_like
from flow_pipeline.core.data.split_set import load_saved_splits, save_splits
from flow_pipeline.core.data.splits import Splits, make_splits, split_array, validate_embeddings, validate_splits

REAL_DATA_DIR = Path(__file__).resolve().parents[3] / "shared" / "data"
REAL_EMBEDDINGS = REAL_DATA_DIR / "sonar_embeddings_real.npy"


class RecordingRows:
    """Array-like that records the largest row slice read and can fail on the k-th read (to simulate a crash)."""

    def __init__(self, array: np.ndarray, fail_on_read: int | None = None):
        self._array = array
        self.shape, self.ndim, self.dtype, self.size = array.shape, array.ndim, array.dtype, array.size
        self.max_rows_read = 0
        self._reads = 0
        self._fail_on_read = fail_on_read

    def __getitem__(self, key):
        self._reads += 1
        if self._fail_on_read is not None and self._reads >= self._fail_on_read:
            raise OSError("simulated disk failure")
        chunk = self._array[key]
        self.max_rows_read = max(self.max_rows_read, chunk.shape[0])
        return chunk


def summary(x: np.ndarray) -> dict[str, float]:
    """The statistics the generator promises, computed independently of it."""
    x = x.astype(np.float64)
    norms = np.linalg.norm(x, axis=1)
    std = x.std(axis=0, ddof=1)
    cov = np.cov(x, rowvar=False)
    return {
        "norm_mean": norms.mean(),
        "norm_std": norms.std(),
        "median_dim_std": float(np.median(std)),
        "mean_vector_norm": float(np.linalg.norm(x.mean(axis=0))),
        # sum(eig)^2 / sum(eig^2) = trace(C)^2 / ||C||_F^2, without an eigendecomposition
        "participation_ratio": float(np.trace(cov) ** 2 / (cov**2).sum()),
        "near_constant_dims": int((std < 0.1 * np.median(std)).sum()),
    }


@pytest.fixture(scope="module")
def generated() -> np.ndarray:
    return synthetic_sonar_like(3000, seed=0)


# ---------------------------------------------------------------------------------------------------------------
# Generator
# ---------------------------------------------------------------------------------------------------------------


def test_generator_matches_sonar_target_statistics(generated):
    s = summary(generated)
    assert generated.shape == (3000, 1024) and generated.dtype == np.float32
    assert s["norm_mean"] == pytest.approx(0.204, rel=0.05)
    assert s["norm_std"] == pytest.approx(0.016, rel=0.10)
    assert s["median_dim_std"] == pytest.approx(0.0053, rel=0.10)
    assert s["mean_vector_norm"] == pytest.approx(0.11, rel=0.10)
    assert s["participation_ratio"] == pytest.approx(65, rel=0.20)


def test_generator_has_two_near_constant_dimensions(generated):
    std = generated.astype(np.float64).std(axis=0, ddof=1)
    order = np.argsort(std)
    assert std[order[:2]].max() < 5e-4  # near-constant, like real SONAR's ~2e-5 and ~2e-4
    assert std[order[:2]].min() > 1e-6  # not exactly constant either
    assert std[order[2]] > 2e-3  # every other dimension is ordinary


def test_generator_per_dimension_scale_holds_for_other_dims():
    x = synthetic_sonar_like(3000, dim=128, seed=1).astype(np.float64)
    assert x.shape == (3000, 128)
    assert np.median(x.std(axis=0, ddof=1)) == pytest.approx(0.0053, rel=0.15)
    assert np.linalg.norm(x.mean(axis=0)) == pytest.approx(0.113 * np.sqrt(128 / 1024), rel=0.15)


@pytest.mark.skipif(not REAL_EMBEDDINGS.is_file(), reason="../shared/data is absent (not part of the repository)")
def test_generator_matches_real_sonar_embeddings():
    real = summary(np.load(REAL_EMBEDDINGS))
    fake = summary(synthetic_sonar_like(800, seed=0))  # same row count: the PR estimate depends on it
    for key in ("norm_mean", "norm_std", "median_dim_std", "mean_vector_norm"):
        assert fake[key] == pytest.approx(real[key], rel=0.10), key
    assert fake["participation_ratio"] == pytest.approx(real["participation_ratio"], rel=0.20)
    assert fake["near_constant_dims"] == real["near_constant_dims"]


def test_generator_is_deterministic_per_seed_and_differs_across_seeds():
    a = synthetic_sonar_like(200, dim=64, seed=3)
    assert np.array_equal(a, synthetic_sonar_like(200, dim=64, seed=3))
    assert not np.allclose(a, synthetic_sonar_like(200, dim=64, seed=4))
    assert not np.allclose(a, synthetic_sonar_like(200, dim=64, seed=3, n_clusters=16))


def test_generator_rejects_bad_arguments():
    with pytest.raises(ValueError, match="n_clusters"):
        synthetic_sonar_like(10, n_clusters=0)
    with pytest.raises(ValueError, match="dim"):
        synthetic_sonar_like(10, dim=0)


# ---------------------------------------------------------------------------------------------------------------
# load_embeddings
# ---------------------------------------------------------------------------------------------------------------


def _rows(n: int = 20, dim: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32) * 0.01 + 0.003


def test_load_npy_is_memory_mapped(tmp_path):
    x = _rows()
    np.save(tmp_path / "e.npy", x)
    loaded = load_embeddings(tmp_path / "e.npy")
    assert isinstance(loaded, np.memmap)
    np.testing.assert_array_equal(loaded, x)


def test_load_pt_tensor_and_dict(tmp_path):
    x = _rows()
    torch.save(torch.from_numpy(x), tmp_path / "t.pt")
    torch.save({"embeddings": torch.from_numpy(x).double(), "other": [1, 2]}, tmp_path / "d.pt")
    np.testing.assert_array_equal(load_embeddings(tmp_path / "t.pt"), x)
    from_dict = load_embeddings(tmp_path / "d.pt")
    assert from_dict.dtype == np.float32
    np.testing.assert_array_equal(from_dict, x)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    ("name", "write", "problem"),
    [
        ("missing.npy", lambda p: None, "file not found"),
        ("e.csv", lambda p: p.write_text("1,2\n"), "unknown extension '.csv'"),
        ("t.pt", lambda p: (torch.save(torch.ones(4, 3), p), _truncate(p)), "truncated or corrupt"),
        ("t.npy", lambda p: (np.save(p, _rows()), _truncate(p)), "truncated or corrupt"),
        ("list.pt", lambda p: torch.save([1.0, 2.0], p), "holds a list, expected a tensor"),
        ("d.pt", lambda p: torch.save({"vectors": torch.ones(2, 2)}, p), "no 'embeddings' key"),
        ("v.npy", lambda p: np.save(p, np.ones(5, np.float32)), "expected a 2-D array"),
        ("i.pt", lambda p: torch.save(torch.ones(3, 4, dtype=torch.int64), p), "floating point"),
        ("i.npy", lambda p: np.save(p, np.ones((3, 4), np.int32)), "floating point, got dtype int32"),
    ],
)
def test_load_embeddings_errors_name_the_file_and_the_problem(tmp_path, name, write, problem):
    path = tmp_path / name
    write(path)
    with pytest.raises(DataError) as info:
        load_embeddings(path)
    message = str(info.value)
    assert message.startswith(str(path.absolute()))
    assert problem in message


# ---------------------------------------------------------------------------------------------------------------
# validate_embeddings
# ---------------------------------------------------------------------------------------------------------------


def test_validate_accepts_good_array():
    validate_embeddings(_rows(10, 8), expected_dim=8, name="train", min_rows=2)


def test_validate_wrong_dim_says_expected_and_got():
    with pytest.raises(DataError, match=r"^/data/e\.npy: wrong embedding dim: expected 1024, got 8$"):
        validate_embeddings(_rows(10, 8), expected_dim=1024, name="/data/e.npy")


def test_validate_reports_nonfinite_row_count_and_first_indices(tmp_path):
    x = _rows(200, 8)
    bad = [3, 17, 40, 41, 90, 150]
    x[bad[:3], 1] = np.nan
    x[bad[3:], 5] = np.inf
    x[bad[0], 2] = np.nan  # two bad values in one row still count as one row
    np.save(tmp_path / "x.npy", x)
    mapped = RecordingRows(np.load(tmp_path / "x.npy", mmap_mode="r"))
    with pytest.raises(DataError) as info:
        validate_embeddings(mapped, expected_dim=8, name="x.npy", chunk_rows=16)
    assert "6 of 200 rows contain NaN or inf" in str(info.value)
    assert "first row indices: 3, 17, 40, 41, 90)" in str(info.value)
    assert mapped.max_rows_read == 16  # chunked: constant memory however large the file


@pytest.mark.parametrize(("rows", "min_rows"), [(0, 1), (0, 0), (1, 2)])
def test_validate_too_few_rows(rows, min_rows):
    with pytest.raises(DataError, match=rf"val split: too few rows: has {rows}, needs at least {max(1, min_rows)}"):
        validate_embeddings(_rows(rows, 8), expected_dim=8, name="val split", min_rows=min_rows)


def test_validate_splits_names_the_empty_split():
    splits = split_array(_rows(40, 8), seed=0, source="/data/e.npy")
    empty_val = dataclasses.replace(splits, val=splits.val[:0], val_indices=splits.val_indices[:0])
    validate_splits(splits, expected_dim=8)
    with pytest.raises(DataError, match=re.escape("/data/e.npy [val split]: too few rows: has 0, needs at least 2")):
        validate_splits(empty_val, expected_dim=8)


# ---------------------------------------------------------------------------------------------------------------
# make_splits
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "sizes"), [(1000, (800, 100, 100)), (1001, (801, 100, 100)), (10, (8, 1, 1))])
def test_make_splits_is_a_partition_with_the_right_sizes(n, sizes):
    parts = make_splits(n, (0.8, 0.1, 0.1), seed=5)
    assert tuple(len(p) for p in parts) == sizes
    combined = np.concatenate(parts)
    assert np.array_equal(np.sort(combined), np.arange(n))  # disjoint and covering
    assert all(p.dtype == np.int64 and np.all(np.diff(p) > 0) for p in parts)


def test_make_splits_is_seeded():
    a = make_splits(500, seed=1)
    assert all(np.array_equal(x, y) for x, y in zip(a, make_splits(500, seed=1)))
    assert not np.array_equal(a[1], make_splits(500, seed=2)[1])


@pytest.mark.parametrize(
    ("fractions", "problem"),
    [((0.8, 0.1), "got 2 values"), ((0.8, 0.3, 0.1), "sum to 1"), ((1.1, -0.05, -0.05), ">= 0"),
     ((0.8, float("nan"), 0.2), "finite")],
)
def test_make_splits_validates_fractions(fractions, problem):
    with pytest.raises(ValueError, match=problem):
        make_splits(100, fractions)


def test_make_splits_rejects_too_few_rows_for_nonempty_splits():
    with pytest.raises(DataError, match="4 rows cannot be split"):
        make_splits(4, (0.8, 0.1, 0.1))


# ---------------------------------------------------------------------------------------------------------------
# save_splits / load_saved_splits
# ---------------------------------------------------------------------------------------------------------------


def _splits(seed: int = 0, n: int = 300, dim: int = 32) -> Splits:
    return split_array(synthetic_sonar_like(n, dim=dim, seed=seed), (0.8, 0.1, 0.1), seed=seed, source=f"gen-{seed}")


def test_save_load_round_trip(tmp_path):
    splits = _splits()
    save_splits(splits, tmp_path / "set", chunk_rows=7)
    loaded = load_saved_splits(tmp_path / "set")
    for name in ("train", "val", "test"):
        assert isinstance(loaded.arrays()[name], np.memmap)
        np.testing.assert_array_equal(loaded.arrays()[name], splits.arrays()[name])
        np.testing.assert_array_equal(loaded.indices()[name], splits.indices()[name])
    assert (loaded.source, loaded.seed, loaded.fractions) == ("gen-0", 0, (0.8, 0.1, 0.1))
    manifest = json.loads((tmp_path / "set" / "splits.json").read_text())
    assert manifest["counts"] == {"train": 240, "val": 30, "test": 30} and manifest["dim"] == 32
    assert not list((tmp_path / "set").glob(".tmp-*"))


def test_split_array_rows_match_indices():
    source = synthetic_sonar_like(100, dim=16, seed=9)
    splits = split_array(source, seed=9)
    for name in ("train", "val", "test"):
        np.testing.assert_array_equal(splits.arrays()[name], source[splits.indices()[name]])


def test_failed_save_leaves_previous_set_intact(tmp_path):
    old = _splits(seed=0)
    save_splits(old, tmp_path)
    new = _splits(seed=1)
    failing = dataclasses.replace(new, val=RecordingRows(np.asarray(new.val), fail_on_read=2))
    with pytest.raises(OSError, match="simulated disk failure"):
        save_splits(failing, tmp_path, chunk_rows=5)
    assert not list(tmp_path.glob(".tmp-*"))
    loaded = load_saved_splits(tmp_path)
    assert loaded.source == "gen-0"
    np.testing.assert_array_equal(loaded.val, old.val)


def test_interrupted_replace_is_reported_as_an_incomplete_set(tmp_path, monkeypatch):
    save_splits(_splits(seed=0), tmp_path)
    real_replace, calls = os.replace, []

    def replace_then_fail(src, dst):
        calls.append(dst)
        if len(calls) == 3:
            raise OSError("simulated crash while moving files into place")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_then_fail)
    with pytest.raises(OSError, match="simulated crash"):
        save_splits(_splits(seed=1), tmp_path)
    monkeypatch.undo()
    # Two new files and four old ones are in place: the reader must refuse the mix, not read it.
    with pytest.raises(DataError, match="splits.json: file not found"):
        load_saved_splits(tmp_path)
    save_splits(_splits(seed=1), tmp_path)
    assert load_saved_splits(tmp_path).source == "gen-1"
    assert not list(tmp_path.glob(".tmp-*"))


def test_save_overwrites_a_previous_set(tmp_path):
    save_splits(_splits(seed=0), tmp_path)
    new = _splits(seed=1, n=200)
    save_splits(new, tmp_path)
    loaded = load_saved_splits(tmp_path)
    assert loaded.source == "gen-1" and loaded.train.shape == (160, 32)
    np.testing.assert_array_equal(loaded.test, new.test)


def test_load_saved_splits_detects_incomplete_or_damaged_sets(tmp_path):
    save_splits(_splits(), tmp_path)
    _truncate(tmp_path / "test.npy")
    damaged = "^" + re.escape(str(tmp_path / "test.npy")) + r": size \d+ bytes does not match"
    with pytest.raises(DataError, match=damaged):
        load_saved_splits(tmp_path)
    (tmp_path / "splits.json").unlink()
    with pytest.raises(DataError, match="^" + re.escape(f"{tmp_path / 'splits.json'}: file not found")):
        load_saved_splits(tmp_path)
