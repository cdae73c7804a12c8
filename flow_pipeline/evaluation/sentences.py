"""Sentences for a person: for a few generated samples, the nearest training and held-out sentence.

Splits may carry their sentences as one JSON-lines file per split beside its ``.npy`` (``<split>.jsonl``,
row-aligned: line i is the sentence of row i). :func:`read_split_sentences` reads one; without it the evaluation
simply shows no sentences.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from flow_pipeline.core.data.stats import row_chunks

SENTENCE_FIELDS = ("text", "sentence", "instruction")


def sentence_path(splits_dir: str | os.PathLike, split: str) -> Path:
    return Path(splits_dir) / f"{split}.jsonl"


def read_split_sentences(splits_dir: str | os.PathLike, split: str, n_rows: int) -> list[str] | None:
    """The ``n_rows`` sentences of ``split`` from ``<splits_dir>/<split>.jsonl``, or None when the file is absent.

    Each line is a JSON string, or an object with one of the fields :data:`SENTENCE_FIELDS`. A file whose line
    count differs from the split's rows, or a line that is neither, raises ValueError naming the file and line:
    misaligned sentences would show a person the wrong text.
    """
    path = sentence_path(splits_dir, split)
    if not path.is_file():
        return None
    sentences = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not JSON ({exc.msg})") from None
            if isinstance(value, dict):
                value = next((value[key] for key in SENTENCE_FIELDS if isinstance(value.get(key), str)), None)
            if not isinstance(value, str):
                raise ValueError(f"{path}:{number}: expected a string or an object with one of {SENTENCE_FIELDS}")
            sentences.append(value)
    if len(sentences) != n_rows:
        raise ValueError(f"{path}: {len(sentences)} sentences for a split of {n_rows} rows; they must be row-aligned")
    return sentences


def nearest_rows(x: np.ndarray, reference, chunk_rows: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """(index (n,), Euclidean distance (n,)) of the nearest reference row (m, dim) to each row of x (n, dim);
    the reference is read in chunks (it may be memory-mapped)."""
    tx = torch.from_numpy(np.asarray(x, dtype=np.float64))
    best_index, best_dist, offset = np.zeros(len(tx), dtype=np.int64), np.full(len(tx), np.inf), 0
    for chunk in row_chunks(reference, chunk_rows):
        dist = torch.cdist(tx, torch.from_numpy(np.asarray(chunk, dtype=np.float64)))
        value, index = dist.min(dim=1)
        better = value.numpy() < best_dist
        best_dist[better], best_index[better] = value.numpy()[better], index.numpy()[better] + offset
        offset += chunk.shape[0]
    return best_index, best_dist


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-300))


def nearest_sentences(generated: np.ndarray, train_rows, train_sentences: list[str], test: np.ndarray,
                      test_sentences: list[str], threshold: float) -> list[dict]:
    """For each generated row (n, dim): its nearest training row (of the rows the run trained on, with their
    sentences) and nearest test row, each with sentence, cosine similarity and distance, and ``copy`` = the nearest
    training row is closer than ``threshold`` (the evaluation's copy threshold)."""
    train_index, train_dist = nearest_rows(generated, train_rows)
    test_index, test_dist = nearest_rows(generated, test)
    return [{
        "sample": i,
        "train_sentence": train_sentences[train_index[i]],
        "train_cosine": _cosine(generated[i], train_rows[train_index[i]]),
        "train_distance": float(train_dist[i]),
        "test_sentence": test_sentences[test_index[i]],
        "test_cosine": _cosine(generated[i], test[test_index[i]]),
        "test_distance": float(test_dist[i]),
        "copy": bool(train_dist[i] < threshold),
    } for i in range(generated.shape[0])]


def sentences_markdown(rows: list[dict]) -> str:
    """The :func:`nearest_sentences` rows as a Markdown table; copies flagged."""
    lines = ["| sample | nearest train sentence (cosine) | nearest test sentence (cosine) | copy? |",
             "|---:|---|---|---|"]
    for row in rows:
        train = row["train_sentence"].replace("|", "\\|")
        test = row["test_sentence"].replace("|", "\\|")
        flag = "**COPY** (closer than the copy threshold)" if row["copy"] else ""
        lines.append(f"| {row['sample']} | {train} ({row['train_cosine']:.3f}) | {test} ({row['test_cosine']:.3f}) "
                     f"| {flag} |")
    return "\n".join(lines)
