"""``python -m flow_pipeline.show PARTITION``: print the latest trained checkpoint of a partition from the instance."""

from __future__ import annotations

import argparse
import math
import sys

import dagster as dg

from flow_pipeline.ablations import ablation_for
from flow_pipeline.config import zero_predictor_loss_of
from flow_pipeline.replicates import replicates_from_metadata

SHOWN = ("checkpoint_path", "best_val_loss", "best_epoch", "epochs_run", "stopped_early", "train_seconds", "device",
         "sha256", "wandb_url", "wandb_run_dir", "wandb_sync_command")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flow_pipeline.show", description=__doc__)
    parser.add_argument("partition", help="ablation partition key, e.g. dit-icfm")
    args = parser.parse_args(argv)
    try:
        ablation_for(args.partition)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    with dg.DagsterInstance.get() as instance:
        records = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey("trained_checkpoint"), asset_partitions=[args.partition]),
            limit=1).records
    if not records:
        print(f"partition {args.partition} has no materialization of trained_checkpoint yet", file=sys.stderr)
        return 1
    metadata = records[0].asset_materialization.metadata
    zero_loss = zero_predictor_loss_of(metadata["config"].value) if "config" in metadata else math.nan
    print(f"trained_checkpoint[{args.partition}]  (zero predictor's val loss: {zero_loss:.4f})")
    for key in SHOWN:
        if key in metadata:
            print(f"  {key:20s} {metadata[key].value}")
    replicates = replicates_from_metadata({key: value.value for key, value in metadata.items()})
    if len(replicates) > 1:
        print(f"  replicates           {len(replicates)}: best val loss {metadata['best_val_loss_mean'].value:.4f} "
              f"(95% CI {metadata['best_val_loss_ci95_low'].value:.4f} .. {metadata['best_val_loss_ci95_high'].value:.4f})")
        for entry in replicates:
            print(f"    seed {entry['seed']:<6} {entry['best_val_loss']:.4f}  ({entry['best_val_loss'] / zero_loss:.3f} of "
                  f"zero)  {entry['global_step']} steps  {entry['checkpoint_path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
