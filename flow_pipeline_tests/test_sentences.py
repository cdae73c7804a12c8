"""Nearest sentences for a person: reading row-aligned JSON-lines files and finding the nearest rows."""

from __future__ import annotations

import json

import numpy as np
import pytest

from flow_pipeline.evaluation.sentences import nearest_rows, nearest_sentences, read_split_sentences, sentences_markdown


def write_lines(path, values):
    path.write_text("".join(json.dumps(value) + "\n" for value in values), encoding="utf-8")


def test_reads_strings_and_objects_and_absent_files(tmp_path):
    write_lines(tmp_path / "train.jsonl", ["a cat", {"text": "a dog"}, {"instruction": "sit | stay", "id": 3}])
    assert read_split_sentences(tmp_path, "train", 3) == ["a cat", "a dog", "sit | stay"]
    assert read_split_sentences(tmp_path, "test", 3) is None


@pytest.mark.parametrize(("values", "rows", "fragment"), [
    (["a", "b"], 3, "2 sentences for a split of 3 rows"),
    (["a", {"other": 1}], 2, "train.jsonl:2: expected a string"),
])
def test_misaligned_or_malformed_files_are_rejected_naming_the_file(tmp_path, values, rows, fragment):
    write_lines(tmp_path / "train.jsonl", values)
    with pytest.raises(ValueError, match=fragment):
        read_split_sentences(tmp_path, "train", rows)


def test_nearest_rows_streams_chunks_and_matches_brute_force():
    rng = np.random.default_rng(0)
    x, reference = rng.normal(size=(6, 5)), rng.normal(size=(50, 5))
    index, dist = nearest_rows(x, reference, chunk_rows=7)
    brute = np.linalg.norm(x[:, None, :] - reference[None, :, :], axis=2)
    np.testing.assert_array_equal(index, brute.argmin(axis=1))
    np.testing.assert_allclose(dist, brute.min(axis=1), rtol=1e-10)


def test_nearest_sentences_show_the_neighbours_and_flag_copies():
    rng = np.random.default_rng(1)
    train, test = rng.normal(size=(20, 8)), rng.normal(size=(10, 8))
    train_sentences, test_sentences = [f"train {i}" for i in range(20)], [f"test {i}" for i in range(10)]
    generated = np.stack([train[4], test[7] + 1e-3])  # a copy of train row 4, a near copy of test row 7
    rows = nearest_sentences(generated, train, train_sentences, test, test_sentences, threshold=0.1)
    assert rows[0]["train_sentence"] == "train 4" and rows[0]["copy"] and rows[0]["train_cosine"] == pytest.approx(1)
    assert rows[1]["test_sentence"] == "test 7" and not rows[1]["copy"]
    assert rows[1]["test_cosine"] == pytest.approx(1.0, abs=1e-5)
    table = sentences_markdown(rows)
    assert "train 4 (1.000)" in table and table.count("**COPY**") == 1
