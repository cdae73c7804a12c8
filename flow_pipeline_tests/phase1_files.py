"""Writes split files in exactly the research plan's Phase-1 format (written independently of the loader).

Per file ``<root>/<size>/<split>.pt``: a ``torch.save``d dict with ``embeddings`` (float32 tensor (N, dim)),
``instructions`` (Python list of N str), ``indices`` (Python list of N int, unique), ``split`` (its name) and
``size`` (the label string, e.g. ``"1k"``, not a count).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

SPLITS = ("train", "val", "test")


def sentence(row_id: int) -> str:
    """The sentence of pool row ``row_id`` (non-ASCII and a line separator included: they must survive)."""
    return f"phrase n°{row_id}: «{row_id * 7 % 13}»\u2028end"


def write_split_file(path: Path, pool: np.ndarray, ids: list[int], split: str, size: str,
                     override: dict | None = None) -> None:
    """One split file; ``override`` replaces keys of the record (to write malformed files)."""
    record = {
        "embeddings": torch.from_numpy(np.ascontiguousarray(pool[ids], dtype=np.float32)),
        "instructions": [sentence(i) for i in ids],
        "indices": [int(i) for i in ids],
        "split": split,
        "size": size,
    }
    record.update(override or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(record, path)


def write_splits_root(root: Path, pool: np.ndarray, layout: dict[str, tuple[int, int, int]],
                      partial: dict[str, tuple[str, ...]] | None = None, seed: int = 0) -> dict[str, dict[str, list[int]]]:
    """Size directories under ``root`` drawn from one ``pool`` of rows (a shared id is the same row).

    layout: size label -> (n_train, n_val, n_test); partial: size label -> the split files it keeps (the others are
    not written). Returns size -> split -> the pool ids written (row order of the file).
    """
    rng = np.random.default_rng(seed)
    written = {}
    for size, counts in layout.items():
        ids = rng.permutation(pool.shape[0])[: sum(counts)].tolist()
        bounds = np.cumsum((0, *counts))
        written[size] = {}
        for split, start, end in zip(SPLITS, bounds[:-1], bounds[1:]):
            if partial and size in partial and split not in partial[size]:
                continue
            written[size][split] = ids[start:end]
            write_split_file(root / size / f"{split}.pt", pool, ids[start:end], split, size)
    return written


def _nan_rows(pool: np.ndarray, ids: list[int]) -> torch.Tensor:
    rows = torch.from_numpy(pool[ids].copy())
    rows[[2, 5], 1] = float("nan")
    return rows


# case -> (pool, ids) -> (keys that replace the good record's, or "not a dict" / "drop" markers; expected message
# part). Each breaks one key of a train.pt whose ids are ``ids`` (at least 6 rows).
MALFORMED = {
    "not a dict": lambda pool, ids: ([1, 2], "expected a dict with keys embeddings, instructions"),
    "missing key": lambda pool, ids: ("drop instructions", "missing key 'instructions'"),
    "embeddings not a tensor": lambda pool, ids: ({"embeddings": pool[ids].tolist()}, "key 'embeddings' is a list"),
    "integer embeddings": lambda pool, ids: ({"embeddings": torch.ones(len(ids), pool.shape[1], dtype=torch.int64)},
                                            "key 'embeddings' must be floating point"),
    "wrong dim": lambda pool, ids: ({"embeddings": torch.ones(len(ids), pool.shape[1] + 3)},
                                    f"key 'embeddings' has wrong dim: expected {pool.shape[1]}, got {pool.shape[1] + 3}"),
    "non-finite rows": lambda pool, ids: ({"embeddings": _nan_rows(pool, ids)},
                                          f"key 'embeddings': 2 of {len(ids)} rows contain NaN or inf (first row "
                                          "indices: 2, 5)"),
    "instructions not a list": lambda pool, ids: ({"instructions": "one sentence"}, "key 'instructions' is a str"),
    "instructions of non-str": lambda pool, ids: ({"instructions": ["a", "b", 3] + ["c"] * (len(ids) - 3)},
                                                  "key 'instructions' must hold str, item 2 is a int"),
    "instructions too short": lambda pool, ids: ({"instructions": ["a"] * (len(ids) - 1)},
                                                 f"key 'instructions' has {len(ids) - 1} items but 'embeddings' has "
                                                 f"{len(ids)} rows"),
    "indices of floats": lambda pool, ids: ({"indices": [float(i) for i in ids]},
                                            "key 'indices' must hold int, item 0 is a float"),
    "indices too long": lambda pool, ids: ({"indices": list(ids) + [10**9]},
                                           f"key 'indices' has {len(ids) + 1} items but 'embeddings' has {len(ids)} rows"),
    "duplicate indices": lambda pool, ids: ({"indices": [ids[0]] + list(ids[:-1])},
                                            f"key 'indices' has duplicates: 1 ids appear more than once (first: {ids[0]})"),
    "split disagrees with file name": lambda pool, ids: ({"split": "val"},
                                                         "key 'split' is 'val' but the file is the 'train' split"),
    "size is a count": lambda pool, ids: ({"size": len(ids)},
                                          f"key 'size' is {len(ids)}, not a known label (1k, 5k, 10k, full)"),
    "size unknown label": lambda pool, ids: ({"size": "2k"}, "key 'size' is '2k', not a known label"),
}


def write_malformed(path: Path, pool: np.ndarray, ids: list[int], case: str, size: str = "1k") -> str:
    """Write ``path`` (a train.pt) broken as MALFORMED[case] says; returns the expected part of the error."""
    change, expected = MALFORMED[case](pool, ids)
    if isinstance(change, dict):
        write_split_file(path, pool, ids, "train", size, change)
    elif change == "drop instructions":
        write_split_file(path, pool, ids, "train", size)
        record = torch.load(path, weights_only=True)
        del record["instructions"]
        torch.save(record, path)
    else:
        torch.save(change, path)
    return expected
