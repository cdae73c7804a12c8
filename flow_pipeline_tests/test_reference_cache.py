"""The reference rows are scored once per inputs and read back from a file named by the inputs' sha256; so is the
gaussian-mixture's EM fit."""

from __future__ import annotations

import json

import numpy as np
import pytest

from flow_pipeline.core.metrics.distances import TrainSpace
from flow_pipeline.core.metrics.real_side import RealSide, evaluate_samples
from flow_pipeline.core.metrics.two_sample import two_sample_scores
from flow_pipeline.core.mixture_baseline import MIXTURE, fit_mixture_baseline
from flow_pipeline.evaluation import mixture_reference as mixture_module
from flow_pipeline.evaluation.mixture_reference import mixture_reference
from flow_pipeline.evaluation.references import (
    HELD_OUT_REAL,
    REFERENCES,
    cached_references,
    read_cached,
    read_side_statistics,
    score_references,
    write_side_statistics,
)
from flow_pipeline.evaluation.references import references_key as rows_key


def references_key(side, val):
    return rows_key(side.train, side.test, val, side.n, side.seed, side.k)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(8)
    mixing = rng.normal(size=(16, 16)) / 4
    draw = lambda count: (rng.normal(size=(count, 16)) @ mixing + 0.2).astype(np.float32)  # noqa: E731
    train, test, val = draw(120), draw(70), draw(70)
    return {"train": train, "test": test, "val": val, "side": RealSide.prepare(train, test, 50, k=3, seed=1)}


def test_references_are_scored_once_then_read_back(data, tmp_path):
    side, val = data["side"], data["val"]
    first = cached_references(side, val, tmp_path)
    files = list(tmp_path.glob("*.json"))
    assert [f.name for f in files] == [f"{references_key(side, val)}.json"]
    assert [row.name for row in first] == list(REFERENCES) and not any(row.cached for row in first)
    # Held-out real, independently: the seeded val subsample through the one-set entry point.
    val_rows = val[np.sort(np.random.default_rng(1).choice(70, size=50, replace=False))]
    expected = evaluate_samples(val_rows, data["train"], data["test"], k=3, seed=1)
    # ... and the two-sample tests against the same seeded test subsample, in the training rows' z-scored space.
    test_rows = data["test"][np.sort(np.random.default_rng(1).choice(70, size=50, replace=False))]
    expected.update(two_sample_scores(val_rows, test_rows, TrainSpace.fit(data["train"]), seed=1))
    assert {"c2st_accuracy", "rbf_kid"} <= set(expected) and "n = 50 < 5 × dim = 80" in expected["prdc_note"]
    scored = dict(first[0].metrics)
    assert scored.pop("prdc_note") == expected.pop("prdc_note")
    assert scored == pytest.approx(expected, rel=1e-9)
    second = cached_references(side, val, tmp_path)
    assert all(row.cached for row in second)
    assert read_cached(tmp_path, references_key(side, val)).copy_threshold == side.threshold
    assert [(row.name, row.n, row.metrics, row.note) for row in second] == \
        [(row.name, row.n, row.metrics, row.note) for row in first]


def test_other_inputs_or_a_damaged_file_are_scored_again(data, tmp_path):
    side, val = data["side"], data["val"].copy()
    cached_references(side, val, tmp_path)
    changed = val.copy()
    changed[3, 5] += 1e-3  # one value of one val row
    assert references_key(side, changed) != references_key(side, val)
    other_seed = RealSide.prepare(data["train"], data["test"], 50, k=3, seed=2)
    assert references_key(other_seed, val) != references_key(side, val)
    rescored = cached_references(side, changed, tmp_path)
    assert not any(row.cached for row in rescored) and len(list(tmp_path.glob("*.json"))) == 2
    path = tmp_path / f"{references_key(side, val)}.json"
    path.write_text('{"references": [{"name": "held-out real (val)"')  # truncated
    again = cached_references(side, val, tmp_path)
    assert not any(row.cached for row in again)
    assert [entry["name"] for entry in json.loads(path.read_text())["references"]] == list(REFERENCES)


def test_without_a_cache_directory_nothing_is_written(data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rows = cached_references(data["side"], data["val"], None)
    assert rows[0].name == HELD_OUT_REAL and list(tmp_path.iterdir()) == []
    assert [row.metrics for row in rows] == [row.metrics for row in score_references(data["side"], data["val"])]


def test_the_real_sides_statistics_are_kept_and_a_damaged_file_reads_as_missing(data, tmp_path):
    side, val = data["side"], data["val"]
    key = references_key(side, val)
    assert read_side_statistics(tmp_path, key) is None
    write_side_statistics(tmp_path, key, side)
    kept = read_side_statistics(tmp_path, key)
    assert kept.keys() == side.statistics().keys()
    assert all(np.array_equal(kept[name], value) for name, value in side.statistics().items())
    reused = RealSide.prepare(data["train"], data["test"], 50, k=3, seed=1, statistics=kept)
    assert reused.score(val[:50]) == side.score(val[:50])
    path = next(tmp_path.glob("*.npz"))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # torn
    assert read_side_statistics(tmp_path, key) is None


def test_the_mixture_row_scores_its_draws_and_its_fit_is_kept_under_the_same_key(data, tmp_path, monkeypatch):
    side, val = data["side"], data["val"]
    fits = []
    monkeypatch.setattr(mixture_module, "fit_mixture_baseline",
                        lambda *rows: fits.append(1) or fit_mixture_baseline(*rows))
    rows = {row.name: row for row in cached_references(side, val, tmp_path)}
    key = references_key(side, val)
    assert len(fits) == 1 and (tmp_path / f"{key}.{MIXTURE}.npz").is_file()
    # Independently: the mixture fitted to the side's training rows (K chosen on val), n draws with the side's
    # seed, scored by the one-set entry point and the two-sample tests against the seeded test subsample.
    mixture = fit_mixture_baseline(data["train"], val)
    drawn = mixture.sample(50, seed=1)
    expected = evaluate_samples(drawn, data["train"], data["test"], k=3, seed=1)
    test_rows = data["test"][np.sort(np.random.default_rng(1).choice(70, size=50, replace=False))]
    expected.update(two_sample_scores(drawn, test_rows, TrainSpace.fit(data["train"]), seed=1))
    scored = dict(rows[MIXTURE].metrics)
    assert scored.pop("prdc_note") == expected.pop("prdc_note")
    assert scored == pytest.approx(expected, rel=1e-9)
    assert rows[MIXTURE].n == 50 and rows[MIXTURE].note.startswith(f"K = {mixture.components} diagonal components")
    # Read back for the next evaluation on the same inputs (its likelihood needs the density): no second fit.
    kept = mixture_reference(data["train"], val, tmp_path, key)
    assert len(fits) == 1 and kept.note == rows[MIXTURE].note
    np.testing.assert_array_equal(kept.baseline.log_prob(data["test"]), mixture.log_prob(data["test"]))
    # A torn file is fitted again.
    path = tmp_path / f"{key}.{MIXTURE}.npz"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert mixture_reference(data["train"], val, tmp_path, key).baseline is not None and len(fits) == 2


def test_too_few_training_rows_leave_the_mixture_row_empty_with_the_reason(data):
    side = RealSide.prepare(data["train"][:80], data["test"], 50, k=3, seed=1)
    rows = {row.name: row for row in score_references(side, data["val"])}
    assert list(rows) == list(REFERENCES)
    assert (rows[MIXTURE].n, rows[MIXTURE].metrics) == (0, {})
    assert rows[MIXTURE].note == \
        f"skipped: {MIXTURE}: needs at least 100 training rows (50 per component for 2), got 80"
    assert rows["gaussian-full"].n == 50 and "c2st_accuracy" in rows["gaussian-full"].metrics
    assert mixture_reference(data["train"], None).note == f"skipped: {MIXTURE}: no val rows to choose its components on"
