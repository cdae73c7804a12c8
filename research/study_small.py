"""A small replicated study without Dagster: the same training and statistics code as ``python -m flow_pipeline.study``
(core trainer, study_report rows, baseline comparison), on validation loss / zero-predictor loss, for a machine
where the full preset does not fit. Prints the statistics table and the wall time.

    python research/study_small.py --archs mlp unet --flows icfm vp --seeds 3 --max-steps 60
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from flow_pipeline.config import TrainConfig
from flow_pipeline.core.data.normalization import Normalizer
from flow_pipeline.core.data.sonar_like import synthetic_sonar_like
from flow_pipeline.core.trainer import TrainData, train
from flow_pipeline.evaluation.study_report import (VAL_LOSS_RATIO, add_comparisons, evaluation_study_metadata, pick_baseline,
                                        statistics_markdown, study_rows)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--archs", nargs="+", default=["mlp", "unet"])
    parser.add_argument("--flows", nargs="+", default=["icfm", "vp"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--max-steps", type=int, default=60)
    parser.add_argument("--rows", type=int, default=3200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    embeddings = torch.from_numpy(synthetic_sonar_like(args.rows, dim=1024, seed=0))
    n_train = int(0.8 * args.rows)
    train_rows, val_rows = embeddings[:n_train], embeddings[n_train:]
    data = TrainData(train_rows, val_rows, Normalizer.fit(train_rows, "zscore"))
    evaluations = []
    with tempfile.TemporaryDirectory() as root:
        for arch in args.archs:
            for flow in args.flows:
                replicates = []
                for seed in range(args.seeds):
                    config = TrainConfig(arch=arch, flow=flow, model_size="tiny", max_steps=args.max_steps,
                                         eval_every_steps=max(1, args.max_steps // 3), lr=2e-3,
                                         batch_size=256, device="cpu", seed=seed, log_every=1000)
                    result = train(config, data, Path(root) / config.run_name)
                    replicates.append(({"seed": seed, "run_name": config.run_name, "checkpoint_path": "",
                                        "sha256": result.sha256, "best_val_loss": result.best_loss,
                                        "global_step": result.global_step, "stopped_early": result.stopped_early,
                                        "train_seconds": result.train_seconds}, {}))
                evaluations.append((f"{arch}-{flow}", evaluation_study_metadata(config.model_dump(), replicates)))
    rows = study_rows(evaluations)
    baseline = pick_baseline(rows, f"{args.archs[0]}-{args.flows[0]}")
    add_comparisons(rows, baseline, VAL_LOSS_RATIO)
    print(statistics_markdown(rows, baseline, VAL_LOSS_RATIO))
    print(f"wall time: {time.perf_counter() - started:.0f} s for {len(rows)} identities x {args.seeds} seeds x "
          f"{args.max_steps} steps")


if __name__ == "__main__":
    main()
