"""The split set of the built-in generator remembers its distribution; real data records none."""

from __future__ import annotations

import numpy as np
import pytest

from flow_pipeline.core.data import DataError
from flow_pipeline.core.data.sources import build_splits
from flow_pipeline.core.data.split_store import load_run_splits, store_splits
from flow_pipeline.core.data.truth import truth_of


def test_synthetic_splits_rebuild_the_mixture_that_drew_their_rows(tmp_path):
    dim, n, seed = 32, 400, 7
    store_splits(build_splits("synthetic", dim, n, seed, (0.6, 0.2, 0.2)), tmp_path)
    run = load_run_splits(tmp_path, "full")
    mixture = truth_of(run.splits.truth)
    # Drawing again from the rebuilt mixture with the generator's stream gives the stored rows at their indices.
    redrawn, _ = mixture.sample(n, np.random.default_rng([seed, 1]))
    np.testing.assert_array_equal(run.splits.test, redrawn[run.splits.test_indices])
    np.testing.assert_array_equal(run.splits.train, redrawn[run.splits.train_indices])


def test_an_embeddings_file_has_no_truth(tmp_path):
    path = tmp_path / "rows.npy"
    np.save(path, np.random.default_rng(0).standard_normal((60, 16)).astype(np.float32))
    store_splits(build_splits(str(path), 16, 0, 0, (0.6, 0.2, 0.2)), tmp_path / "set")
    assert load_run_splits(tmp_path / "set", "full").splits.truth is None
    assert truth_of(None) is None


@pytest.mark.parametrize("record", [{"generator": "other", "dim": 8, "seed": 0}, {"generator": "sonar_mixture"}])
def test_a_record_this_code_cannot_rebuild_is_named(record):
    with pytest.raises(DataError, match="split truth"):
        truth_of(record)
