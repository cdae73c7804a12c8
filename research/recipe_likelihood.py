"""Score a training recipe by held-out likelihood on the built-in data's val split (never its test split).

Trains ``mlp-icfm`` with the product's trainer on the quickstart's built-in splits (25,600 rows, 0.6 / 0.2 / 0.2,
seed 0; ``--n-synthetic`` for fewer, ``--source`` for a file of real vectors split the same way; the default
recipe in bf16 unless set otherwise) and prints one JSON line: the recipe, training seconds, the best EMA val loss, the model's mean log-likelihood minus ``gaussian-full``'s (shrinkage chosen on val)
on the first ``--rows`` val rows with its standard error, both KLs to the known truth and the share of
``gaussian-full``'s KL the model closes. Used to choose recipes on val (RESULTS.md, issue 28).

    python research/recipe_likelihood.py --set principal_dims=384 --set max_steps=3000
    python research/recipe_likelihood.py --curve     # every evaluation's EMA weights: the learning curve
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from flow_pipeline.config import TrainConfig
from flow_pipeline.core.baselines import fit_baseline
from flow_pipeline.core.checkpoint import load_ema_model
from flow_pipeline.core.data.normalization import Normalizer
from flow_pipeline.core.data.sources import build_splits
from flow_pipeline.core.data.truth import truth_of
from flow_pipeline.core.likelihood import model_log_likelihood
from flow_pipeline.core.tracking import NullTracker
from flow_pipeline.core.trainer import TrainData, train
from flow_pipeline.evaluation.evaluate import saved_train_config

# The defaults (the shipped recipe) on mlp-icfm; --set changes any knob.
RECIPE = dict(arch="mlp", flow="icfm", patience=10_000, seed=0, device="cpu", precision="bf16")


def parse_setting(text: str) -> tuple[str, object]:
    """``KNOB=VALUE`` -> (knob, value as JSON when it parses, else the string)."""
    knob, _, value = text.partition("=")
    try:
        return knob, json.loads(value)
    except json.JSONDecodeError:
        return knob, value


class EvaluationSnapshots(NullTracker):
    """A tracker that copies the checkpoint each of the run's evaluations wrote (best.pt when it improved, else
    last.pt: whichever is newer) to ``folder/step<N>.pt``, so every evaluation's EMA weights can be scored."""

    def __init__(self, run_dir: Path, folder: Path) -> None:
        self.run_dir, self.folder = run_dir, folder

    def log(self, metrics: dict[str, float], step: int) -> None:
        if "val/ema_loss" not in metrics:
            return
        written = [path for path in (self.run_dir / "best.pt", self.run_dir / "last.pt") if path.exists()]
        shutil.copy(max(written, key=lambda path: path.stat().st_mtime), self.folder / f"step{step}.pt")


def scores(ema, scored: np.ndarray, gaussian: np.ndarray, truth: np.ndarray | None) -> dict:
    """The model's paired difference from ``gaussian-full`` on the ``scored`` val rows (n, dim): at w = 0, 0.5 and
    1 without a truth (w = 0 is the model's own Gaussian part; choosing w on these same rows flatters every recipe
    alike, the product chooses w on val and scores test), else at w = 1 with both KLs to the truth."""
    rows = torch.from_numpy(scored)
    if truth is None:
        summary = {}
        for w in (0.0, 0.5, 1.0):
            difference = model_log_likelihood(ema.model, ema.flow, ema.normalizer, rows, guidance=w).log_prob.numpy() \
                - gaussian
            summary[f"w{w:g}_minus_gaussian_full"] = round(float(difference.mean()), 1)
            summary[f"w{w:g}_se"] = round(float(difference.std(ddof=1) / np.sqrt(difference.size)), 1)
        return summary
    model = model_log_likelihood(ema.model, ema.flow, ema.normalizer, rows).log_prob.numpy()
    difference = model - gaussian
    kl_model, kl_gaussian = float(np.mean(truth - model)), float(np.mean(truth - gaussian))
    return {"model_minus_gaussian_full": round(float(difference.mean()), 1),
            "se": round(float(difference.std(ddof=1) / np.sqrt(difference.size)), 1),
            "kl_model": round(kl_model, 1), "kl_gaussian_full": round(kl_gaussian, 1),
            "kl_closed": round(1 - kl_model / kl_gaussian, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", action="append", default=[], help="KNOB=VALUE over the quickstart's recipe")
    parser.add_argument("--rows", type=int, default=512, help="val rows scored")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n-synthetic", type=int, default=25_600,
                        help="rows the built-in generator draws (60%% of them train the model)")
    parser.add_argument("--source", default="synthetic",
                        help="the built-in data, or an embeddings file (e.g. ../shared/data/sonar_embeddings_real.npy: "
                             "no known truth, so no KL; the difference is reported at each guidance w)")
    parser.add_argument("--curve", action="store_true",
                        help="score the EMA weights of every evaluation of the run (one line each), not only the best")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    changes = dict(parse_setting(text) for text in args.set)
    config = TrainConfig(**{**RECIPE, **changes})
    splits = build_splits(args.source, 1024, args.n_synthetic, 0, (0.6, 0.2, 0.2))
    train_rows, val_rows = np.asarray(splits.train), np.asarray(splits.val)
    normalizer = Normalizer.fit(train_rows, config.normalization, val=val_rows)
    scored = val_rows[: args.rows]
    gaussian = fit_baseline("gaussian-full", train_rows, val_rows).log_prob(scored)
    truth = None if splits.truth is None else truth_of(splits.truth).log_prob(scored)
    with tempfile.TemporaryDirectory() as run_dir, tempfile.TemporaryDirectory() as snapshots:
        tracker = EvaluationSnapshots(Path(run_dir), Path(snapshots)) if args.curve else None
        start = time.perf_counter()
        result = train(config, TrainData(torch.from_numpy(train_rows), torch.from_numpy(val_rows), normalizer),
                       run_dir, tracker)
        seconds = time.perf_counter() - start
        summary = {"recipe": changes, "source": args.source, "train_rows": len(train_rows),
                   "val_rows_scored": len(scored), "train_s": round(seconds, 1),
                   "best_val_loss": round(result.best_loss, 4), "best_epoch": result.best_epoch}
        checkpoints = sorted(Path(snapshots).glob("step*.pt"), key=lambda path: int(path.stem[4:])) if args.curve \
            else [result.checkpoint_path]
        for checkpoint in checkpoints:
            ema = load_ema_model(checkpoint, saved_train_config)
            step = {"step": int(checkpoint.stem[4:])} if args.curve else {}
            print(json.dumps({**summary, **step, **scores(ema, scored, gaussian, truth)}), flush=True)


if __name__ == "__main__":
    main()
