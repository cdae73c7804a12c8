"""Score a training recipe by held-out likelihood on the built-in data's val split (never its test split).

Trains ``mlp-icfm`` with the product's trainer on the quickstart's built-in splits (25,600 rows, 0.6 / 0.2 / 0.2,
seed 0; ``--n-synthetic`` for fewer, ``--source`` for a file of real vectors split the same way; the default
recipe in bf16 unless set otherwise) and prints one JSON line: the recipe, training seconds, the best EMA val loss, the model's mean log-likelihood minus ``gaussian-full``'s (shrinkage chosen on val)
on the first ``--rows`` val rows with its standard error, both KLs to the known truth and the share of
``gaussian-full``'s KL the model closes. Used to choose recipes on val (RESULTS.md, issue 28).

    python research/recipe_likelihood.py --set principal_dims=384 --set max_steps=3000
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np
import torch

from flow_pipeline.config import TrainConfig
from flow_pipeline.core.baselines import fit_baseline
from flow_pipeline.core.checkpoint import load_ema_model
from flow_pipeline.core.data.normalization import Normalizer
from flow_pipeline.core.data.sources import build_splits
from flow_pipeline.core.data.truth import truth_of
from flow_pipeline.core.likelihood import model_log_likelihood
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
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    changes = dict(parse_setting(text) for text in args.set)
    config = TrainConfig(**{**RECIPE, **changes})
    splits = build_splits(args.source, 1024, args.n_synthetic, 0, (0.6, 0.2, 0.2))
    train_rows, val_rows = np.asarray(splits.train), np.asarray(splits.val)
    normalizer = Normalizer.fit(train_rows, config.normalization, val=val_rows)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as run_dir:
        result = train(config, TrainData(torch.from_numpy(train_rows), torch.from_numpy(val_rows), normalizer),
                       run_dir)
        ema = load_ema_model(result.checkpoint_path, saved_train_config)
    seconds = time.perf_counter() - start
    scored = val_rows[: args.rows]
    gaussian = fit_baseline("gaussian-full", train_rows, val_rows).log_prob(scored)
    summary = {"recipe": changes, "source": args.source, "train_rows": len(train_rows), "val_rows_scored": len(scored),
               "train_s": round(seconds, 1), "best_val_loss": round(result.best_loss, 4),
               "best_epoch": result.best_epoch}
    if splits.truth is None:
        # No truth: the paired difference at each guidance w (w = 0 is the model's own Gaussian part). Choosing w
        # on these same rows flatters every recipe alike; the product chooses w on val and scores test.
        for w in (0.0, 0.5, 1.0):
            model = model_log_likelihood(ema.model, ema.flow, ema.normalizer, torch.from_numpy(scored),
                                         guidance=w).log_prob.numpy()
            difference = model - gaussian
            summary[f"w{w:g}_minus_gaussian_full"] = round(float(difference.mean()), 1)
            summary[f"w{w:g}_se"] = round(float(difference.std(ddof=1) / np.sqrt(difference.size)), 1)
        print(json.dumps(summary))
        return
    model = model_log_likelihood(ema.model, ema.flow, ema.normalizer, torch.from_numpy(scored)).log_prob.numpy()
    truth = truth_of(splits.truth).log_prob(scored)
    difference = model - gaussian
    kl_model, kl_gaussian = float(np.mean(truth - model)), float(np.mean(truth - gaussian))
    print(json.dumps({**summary, "model_minus_gaussian_full": round(float(difference.mean()), 1),
                      "se": round(float(difference.std(ddof=1) / np.sqrt(difference.size)), 1),
                      "kl_model": round(kl_model, 1), "kl_gaussian_full": round(kl_gaussian, 1),
                      "kl_closed": round(1 - kl_model / kl_gaussian, 3)}))

if __name__ == "__main__":
    main()
