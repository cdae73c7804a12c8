"""The ``dataset_splits`` source (``synthetic``, an embeddings file, Phase-1 split files) -> a validated split set."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from flow_pipeline.core.data import DataError
from flow_pipeline.core.data.files import load_embeddings
from flow_pipeline.core.data.split_files import SplitsRoot, is_splits_root, load_split_dir, load_splits_root
from flow_pipeline.core.data.splits import Splits, split_array, validate_embeddings
from flow_pipeline.core.data.synthetic import synthetic_sonar_mixture
from flow_pipeline.core.data.truth import truth_record

SYNTHETIC = "synthetic"
# A split with fewer rows than this cannot train, validate or be evaluated meaningfully.
MIN_SPLIT_ROWS = 2


def build_splits(source: str, dim: int, n_synthetic: int, seed: int,
                 fractions: tuple[float, float, float]) -> Splits | SplitsRoot:
    """Splits from ``source``: ``synthetic``, an embeddings file (``.npy``/``.pt``), one size directory of split
    files (used as given), or a ``splits/`` root (every complete size directory in it, as given).

    Every split is validated (dimension, finite values, at least :data:`MIN_SPLIT_ROWS` rows) before anything is
    written, so bad input never replaces an existing split set.
    """
    if source == SYNTHETIC:
        embeddings = synthetic_sonar_mixture(n_synthetic, dim=dim, seed=seed)
        splits = split_array(embeddings, fractions, seed, source=f"synthetic SONAR-like mixture (n={n_synthetic}, seed={seed})")
        splits = replace(splits, truth=truth_record(dim, seed))
    else:
        path = Path(source).expanduser().resolve()
        if path.is_dir() and is_splits_root(path):
            root = load_splits_root(path, dim)
            for splits in root.sizes.values():
                _validate(splits, dim)
            return root
        if path.is_dir():
            splits = load_split_dir(path, dim)
        elif path.exists():
            embeddings = load_embeddings(path)
            validate_embeddings(embeddings, dim, str(path), min_rows=3 * MIN_SPLIT_ROWS)
            splits = split_array(embeddings, fractions, seed, source=str(path))
        else:
            raise DataError(f"{path}: source not found (expected 'synthetic', an .npy/.pt file or a split directory)")
    _validate(splits, dim)
    return splits


def _validate(splits: Splits, dim: int) -> None:
    for name, array in splits.arrays().items():
        validate_embeddings(array, dim, f"{splits.source} [{name} split]", min_rows=MIN_SPLIT_ROWS)
