"""The data assets: the split sets (``dataset_splits``) and one normalisation per training subset and method
(``normalization_stats``). Thin wrappers over :mod:`flow_pipeline.core.data.sources` and :mod:`flow_pipeline.core`."""

import dagster as dg
from pydantic import Field

from flow_pipeline.core.data import DataError, DatasetChoiceError
from flow_pipeline.core.data.normalization import NORMALIZATIONS, Normalizer, save_normalizer
from flow_pipeline.core.data.sources import SYNTHETIC, build_splits
from flow_pipeline.core.data.split_store import load_run_splits, store_splits, stored_sizes
from flow_pipeline.core.data.splits import DATASET_SIZES, Splits, validate_embeddings
from flow_pipeline.defs.resources import ArtifactsResource

OWNERS = ["team:flow-matching"]


class DatasetConfig(dg.Config):
    source: str = Field(
        default=SYNTHETIC,
        description="'synthetic' (built-in SONAR-like generator), an N x D .npy/.pt file, one size directory with "
        "the research plan's train.pt/val.pt/test.pt split files (used as given), or their splits/ root (every "
        "complete size directory 1k, 5k, 10k, full; training's `dataset` then picks that size's own splits)",
    )
    dim: int = Field(default=1024, description="embedding dimension every split must have")
    # 25,600 rows at 60/20/20: val and test hold 5,120 = 5 x 1024 rows each, the evaluation's default n (distances
    # and k-NN metrics need n well above dim; val is the held-out real reference row at the same n).
    n_synthetic: int = Field(default=25_600, description="rows drawn by the synthetic generator")
    seed: int = Field(default=0, description="seed of the generator and of the split permutation")
    val_fraction: float = Field(default=0.2, description="share of rows in the val split")
    test_fraction: float = Field(default=0.2, description="share of rows in the test split")


@dg.asset(group_name="data", owners=OWNERS, kinds={"numpy"})
def dataset_splits(context: dg.AssetExecutionContext, config: DatasetConfig, artifacts: ArtifactsResource) -> dg.MaterializeResult:
    """Train/val/test splits saved as memory-mappable .npy files with row indices and, when the source has text,
    one JSON-lines file of sentences per split. Everything is read and validated before anything is written."""
    fractions = (1.0 - config.val_fraction - config.test_fraction, config.val_fraction, config.test_fraction)
    try:
        data = build_splits(config.source, config.dim, config.n_synthetic, config.seed, fractions)
    except (DataError, ValueError) as exc:
        raise dg.Failure(description=f"dataset_splits: {exc}") from exc
    splits_dir = artifacts.layout.splits_dir
    store_splits(data, splits_dir)
    sets = {"": data} if isinstance(data, Splits) else data.sizes
    metadata = {"source": data.source, "dim": next(iter(sets.values())).dim,
                "splits_dir": dg.MetadataValue.path(str(splits_dir))}
    for label, splits in sets.items():
        prefix = f"{label}/" if label else ""
        metadata.update({f"{prefix}n_{name}": int(array.shape[0]) for name, array in splits.arrays().items()})
        metadata[f"{prefix}sentences"] = splits.sentences is not None
    if not isinstance(data, Splits):
        metadata["sizes"] = list(data.sizes)
        metadata["incomplete_sizes"] = dg.MetadataValue.json(data.incomplete)
        for label, why in data.incomplete.items():
            context.log.warning(f"dataset_splits: size {label} of {data.source} is not stored: {why}")
    return dg.MaterializeResult(metadata=metadata)


@dg.asset(deps=[dataset_splits], group_name="data", owners=OWNERS, kinds={"numpy"})
def normalization_stats(context: dg.AssetExecutionContext, artifacts: ArtifactsResource) -> dg.MaterializeResult:
    """One Normalizer per training subset and method (zscore, whiten), fitted on exactly the training rows a run
    with that ``dataset`` uses (streamed in chunks; std floored; whitening eigenvalues shrunk with the intensity the val
    rows' likelihood prefers)."""
    layout = artifacts.layout
    written, skipped = [], {}
    try:
        per_size = stored_sizes(layout.splits_dir) is not None
        for dataset in DATASET_SIZES:
            try:
                run = load_run_splits(layout.splits_dir, dataset)
            except DatasetChoiceError as exc:  # a subset these splits do not have (a damaged set raises on)
                skipped[dataset] = str(exc)
                continue
            rows = run.splits.train
            validate_embeddings(rows, rows.shape[1], f"{run.set_dir / 'train.npy'}", min_rows=2)
            for method in NORMALIZATIONS:
                normalizer = Normalizer.fit(rows, method, val=run.splits.val)
                path = layout.stats_path(dataset, method)
                save_normalizer(path, normalizer, {"dataset": dataset, "subset": run.subset})
                written.append({"dataset": dataset, "normalization": method, "subset": run.subset,
                                **normalizer.details, "path": str(path)})
    except DataError as exc:
        raise dg.Failure(description=f"normalization_stats: {exc}") from exc
    kept = {item["path"] for item in written}
    for stale in layout.stats_dir.glob("*.npz"):  # subsets the current splits no longer have
        if str(stale) not in kept:
            stale.unlink()
    full = [item["rows"] for item in written if item["dataset"] == "full"]
    return dg.MaterializeResult(metadata={
        "dim": int(rows.shape[1]),
        "n": full[0] if full else written[0]["rows"],  # rows behind the `full` statistics (else the first)
        "layout": "one split set per size" if per_size else "one split set (first N train rows per subset)",
        "stats": dg.MetadataValue.md(_stats_table(written)),
        "datasets": list(dict.fromkeys(item["dataset"] for item in written)),
        "skipped_datasets": dg.MetadataValue.json(skipped),
        "stats_dir": dg.MetadataValue.path(str(layout.stats_dir)),
    })


def _stats_table(written: list[dict]) -> str:
    lines = ["| dataset | normalization | rows | shrinkage | min std | median std | floored | subset |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for item in written:
        shrinkage = f"{item['shrinkage']:.3f}" if "shrinkage" in item else "-"
        lines.append(f"| {item['dataset']} | {item['normalization']} | {item['rows']} | {shrinkage} | "
                     f"{item['min_std']:.3g} | {item['median_std']:.3g} | {item['n_floored']} | {item['subset']} |")
    return "\n".join(lines)
