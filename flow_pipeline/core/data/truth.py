"""The known truth behind a split set drawn by the built-in generator.

A split set records how its rows were generated (``Splits.truth``, kept in its manifest), so an evaluation can
rebuild the exact distribution and measure a model's distance to it. Real data has no such record.
"""

from __future__ import annotations

from flow_pipeline.core.data import DataError
from flow_pipeline.core.data.synthetic import GaussianMixture, sonar_mixture

GENERATOR = "sonar_mixture"


def truth_record(dim: int, seed: int) -> dict:
    """What :func:`truth_of` needs to rebuild :func:`~flow_pipeline.core.data.synthetic.sonar_mixture` (dim, seed)."""
    return {"generator": GENERATOR, "dim": int(dim), "seed": int(seed)}


def truth_of(record: dict | None) -> GaussianMixture | None:
    """The distribution a split set's rows were drawn from, or None when the set records none (real data).

    Raises DataError for a record this code cannot rebuild (another generator's name, missing fields)."""
    if record is None:
        return None
    try:
        if record["generator"] != GENERATOR:
            raise DataError(f"split truth: unknown generator {record['generator']!r} (this code knows {GENERATOR!r})")
        return sonar_mixture(dim=int(record["dim"]), seed=int(record["seed"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"split truth: malformed record {record!r}: {exc!r}") from exc
