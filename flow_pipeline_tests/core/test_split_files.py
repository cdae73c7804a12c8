"""Phase-1 split files (one size directory or a splits/ root), their validation, the per-size store, sentences and
the training rows a run uses."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from flow_pipeline.core.data import DataError
from flow_pipeline.core.data.split_files import load_split_dir, load_splits_root
from flow_pipeline.core.data.split_set import load_saved_splits, load_sentences
from flow_pipeline.core.data.split_store import SIZES_MANIFEST, load_run_splits, store_splits, training_rows
from flow_pipeline.core.data.splits import split_array
from flow_pipeline_tests.phase1_files import MALFORMED, sentence, write_malformed, write_splits_root

DIM = 16
LAYOUT = {"1k": (40, 6, 5), "full": (90, 10, 10)}


@pytest.fixture
def pool():
    return np.random.default_rng(3).normal(0.0, 0.01, size=(200, DIM)).astype(np.float32)


def test_size_directory_is_read_as_given_with_its_sentences(tmp_path, pool):
    written = write_splits_root(tmp_path, pool, {"1k": (12, 4, 3)})["1k"]
    splits = load_split_dir(tmp_path / "1k", dim=DIM)
    for split, ids in written.items():
        np.testing.assert_array_equal(splits.arrays()[split], pool[ids])
        np.testing.assert_array_equal(splits.indices()[split], ids)
        assert splits.indices()[split].dtype == np.int64
        assert splits.sentences[split] == [sentence(i) for i in ids]


def test_root_keeps_complete_sizes_and_says_what_partial_ones_lack(tmp_path, pool):
    write_splits_root(tmp_path, pool, {**LAYOUT, "5k": (50, 8, 8)}, partial={"5k": ("val", "test")})
    root = load_splits_root(tmp_path, dim=DIM)
    assert list(root.sizes) == ["1k", "full"]
    assert root.incomplete == {"5k": "missing train.pt (has val.pt, test.pt)"}
    assert root.sizes["1k"].train.shape == (40, DIM) and root.sizes["1k"].size == "1k"
    # A root with no complete size names what each one lacks.
    only_partial = tmp_path / "partial"
    write_splits_root(only_partial, pool, {"10k": (5, 2, 2)}, partial={"10k": ("test",)})
    with pytest.raises(DataError, match=re.escape("10k: missing train.pt, val.pt (has test.pt)")):
        load_splits_root(only_partial, dim=DIM)


def test_a_missing_split_file_lists_what_the_directory_has(tmp_path, pool):
    write_splits_root(tmp_path, pool, {"1k": (12, 4, 3)}, partial={"1k": ("train", "test")})
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / '1k'}: missing val.pt (the directory has: "
                                                  "test.pt, train.pt)")):
        load_split_dir(tmp_path / "1k", dim=DIM)


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_each_malformed_key_is_named_with_its_file(tmp_path, pool, case):
    written = write_splits_root(tmp_path, pool, {"1k": (12, 4, 3)})["1k"]
    path = tmp_path / "1k" / "train.pt"
    expected = write_malformed(path, pool, written["train"], case)
    for load in (lambda: load_split_dir(tmp_path / "1k", dim=DIM), lambda: load_splits_root(tmp_path, dim=DIM)):
        with pytest.raises(DataError) as info:
            load()
        assert str(info.value).startswith(f"{path}: "), str(info.value)
        assert expected in str(info.value), str(info.value)


def test_per_size_store_gives_each_dataset_its_own_rows_and_sentences(tmp_path, pool):
    written = write_splits_root(tmp_path / "src", pool, LAYOUT)
    store = tmp_path / "store"
    store_splits(load_splits_root(tmp_path / "src", dim=DIM), store)
    for size, (n_train, n_val, n_test) in LAYOUT.items():
        run = load_run_splits(store, size)
        np.testing.assert_array_equal(run.splits.train, pool[written[size]["train"]])
        np.testing.assert_array_equal(run.splits.test, pool[written[size]["test"]])
        assert f"size {size}" in run.subset and str(n_train) in run.subset
        for split in ("train", "val", "test"):
            lines = (store / size / f"{split}.jsonl").read_text(encoding="utf-8").split("\n")
            assert lines[-1] == "" and len(lines) - 1 == len(written[size][split])  # one line per row
            assert [json.loads(line) for line in lines[:-1]] == [
                {"index": i, "text": sentence(i)} for i in written[size][split]]
        rows, ids, sentences = training_rows(store, size)
        np.testing.assert_array_equal(rows, pool[written[size]["train"]])
        assert ids.tolist() == written[size]["train"] and sentences == [sentence(i) for i in ids]
    with pytest.raises(DataError, match=re.escape("dataset: '5k' is not in the splits root") + ".*has 1k, full"):
        load_run_splits(store, "5k")


def test_one_split_set_keeps_the_first_n_rule_and_replaces_a_per_size_store(tmp_path, pool):
    write_splits_root(tmp_path / "src", pool, LAYOUT)
    store = tmp_path / "store"
    store_splits(load_splits_root(tmp_path / "src", dim=DIM), store)
    rows = np.random.default_rng(0).normal(size=(1500, 4)).astype(np.float32)
    store_splits(split_array(rows, (0.8, 0.1, 0.1), seed=1, source="matrix"), store)
    assert not (store / SIZES_MANIFEST).exists() and not (store / "1k").exists()
    whole = load_saved_splits(store)
    run = load_run_splits(store, "1k")
    np.testing.assert_array_equal(run.splits.train, whole.train[:1000])
    np.testing.assert_array_equal(run.splits.val, whole.val)
    assert run.subset.startswith("first 1000 of 1200 train rows")
    assert training_rows(store, "full")[2] is None  # a source without text has no sentences
    assert load_sentences(store, "train") is None and not list(store.glob("*.jsonl"))
    with pytest.raises(DataError, match=re.escape("dataset: '5k' needs 5000 training rows") + ".*has 1200"):
        load_run_splits(store, "5k")
