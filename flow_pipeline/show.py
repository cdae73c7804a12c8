"""``python -m flow_pipeline.show PARTITION``: print the latest trained checkpoint of a partition from the instance."""

from __future__ import annotations

import argparse
import math
import sys

import dagster as dg

from flow_pipeline.ablations import ablation_for
from flow_pipeline.config import zero_predictor_loss_of
from flow_pipeline.defs.materializations import latest_metadata
from flow_pipeline.replicates import replicates_from_metadata

SHOWN = ("checkpoint_path", "best_val_loss", "best_epoch", "epochs_run", "stopped_early", "train_seconds", "device", "precision",
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
        metadata = latest_metadata(instance, dg.AssetKey("trained_checkpoint"), args.partition)
    if metadata is None:
        print(f"partition {args.partition} has no materialization of trained_checkpoint yet", file=sys.stderr)
        return 1
    zero_loss = zero_predictor_loss_of(metadata["config"]) if "config" in metadata else math.nan
    print(f"trained_checkpoint[{args.partition}]  (zero predictor's val loss: {zero_loss:.4f})")
    for key in SHOWN:
        if key in metadata:
            print(f"  {key:20s} {metadata[key]}")
    replicates = replicates_from_metadata(metadata)
    if len(replicates) > 1:
        print(f"  replicates           {len(replicates)}: best val loss {metadata['best_val_loss_mean']:.4f} "
              f"(95% CI {metadata['best_val_loss_ci95_low']:.4f} .. {metadata['best_val_loss_ci95_high']:.4f})")
        for entry in replicates:
            print(f"    seed {entry['seed']:<6} {entry['best_val_loss']:.4f}  ({entry['best_val_loss'] / zero_loss:.3f} of "
                  f"zero)  {entry['global_step']} steps  {entry['checkpoint_path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
