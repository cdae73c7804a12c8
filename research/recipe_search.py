"""Recipe search: which training recipe makes a flow beat the full-covariance Gaussian baseline?

Datasets: ``builtin`` (the built-in generator, 25,600 rows split 0.6/0.2/0.2 like the quickstart's dataset_splits,
scored with n = 1,000 generated rows against the test split, to keep runs short) and ``real`` (the 800 real SONAR
vectors in ../shared/data, 600 fit / 200 held out, scored with n = 200). Every sample set (one per ``--guidance``
setting of a trained flow) prints one JSON line with the config, steps, wall time (and training time, and the load
average at the start), ranking KID, FD / floor, precision, recall, density, coverage, train-copy fraction, and the
median nearest-train distance of the generated rows relative to the held-out rows' (``nn_train_ratio``: < 1 means
closer to training rows than unseen real rows are, the sign of memorisation). Reference rows: ``--model
gaussian-full`` (Ledoit-Wolf covariance of the fit rows) and ``--model heldout`` (real held-out rows, or for
``builtin`` fresh rows of the true distribution).

Flows are trained by the product's trainer (:func:`flow_pipeline.core.trainer.train` on a validated
:class:`flow_pipeline.config.TrainConfig`, rows normalised by the product's ``Normalizer``) and sampled from the EMA
model of its ``best.pt`` as the evaluation asset does (:func:`flow_pipeline.evaluation.samplers.draw_samples`); each
option below maps onto one TrainConfig knob or sampler setting, and model sizes are the product's presets.

    python research/recipe_search.py --data real --norm whiten --time logit_normal --skip --steps 1500
    python research/recipe_search.py --size matched --skip --pca-dims 64 --steps 3000 --batch 256
    python research/recipe_search.py calibrate   # the generator's calibration against the real vectors

Single-threaded (torch.set_num_threads(1)) so a shared 2-core machine keeps a core for others.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from pydantic import ValidationError

from flow_pipeline.config import TrainConfig, format_validation_error
from flow_pipeline.core.atomic import write_bytes_atomic
from flow_pipeline.core.checkpoint import EMAModel, load_ema_model
from flow_pipeline.core.data.normalization import Normalizer
from flow_pipeline.core.data.splits import split_array
from flow_pipeline.core.data.synthetic import (frechet_to_gaussian, ledoit_wolf_gaussian, sonar_mixture,
                                               synthetic_sonar_mixture)
from flow_pipeline.core.metrics.prdc import nearest_distance, prdc
from flow_pipeline.core.metrics.real_side import evaluate_samples
from flow_pipeline.core.trainer import TrainData, train
from flow_pipeline.evaluation.evaluate import saved_train_config
from flow_pipeline.evaluation.guidance import fit_sampler_guidance
from flow_pipeline.evaluation.samplers import SamplerSpec, draw_samples

# ../shared/data beside the checkout; REAL_SONAR_EMBEDDINGS overrides (e.g. from a git worktree elsewhere).
REAL = Path(os.environ.get("REAL_SONAR_EMBEDDINGS",
                           Path(__file__).resolve().parents[2] / "shared" / "data" / "sonar_embeddings_real.npy"))
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


def load(data: str, seed: int = 0, val: bool = False):
    """(fit rows, held-out rows, n generated) for a dataset; with ``val`` the built-in val split only."""
    if data == "real":
        x = np.load(REAL).astype(np.float32)
        perm = np.random.default_rng(seed).permutation(len(x))
        return x[perm[:600]], x[perm[600:800]], 200
    splits = split_array(synthetic_sonar_mixture(25_600, 1024, seed=0), (0.6, 0.2, 0.2), seed=0)
    if val:
        return np.asarray(splits.val)
    return np.asarray(splits.train), np.asarray(splits.test), 1000


def train_config(a: argparse.Namespace) -> TrainConfig:
    """The validated product config of a run's options (pydantic ValidationError on a bad combination). Knobs
    without an option keep the product's defaults (warm-up: 10% of the steps, at most 200; ``--ema`` unset: its
    EMA decay)."""
    return TrainConfig(arch="mlp", flow=a.flow, model_size=a.size, normalization=a.norm, linear_skip=a.skip,
                       time_sampling=a.time, principal_dims=a.pca_dims, batch_size=a.batch, lr=a.lr,
                       max_steps=a.steps, eval_every_steps=a.eval_every, patience=10_000, seed=a.seed, device="cpu",
                       precision=a.precision, weight_decay=a.weight_decay,
                       **({} if a.ema is None else {"ema_decay": a.ema}))


def project_trainer_samples(fit: np.ndarray, a: argparse.Namespace, n: int,
                            held_val: np.ndarray | None = None) -> list[tuple[np.ndarray, dict]]:
    """Train with the product's trainer (TrainConfig, EMA, best.pt) on ``fit`` (rows, dim) normalised by the
    product's Normalizer, and sample its EMA model like the evaluation asset does (midpoint, ``--sample-steps``),
    once per ``--guidance`` setting (an "auto" one fitted to the val rows' variance). Validation rows: the built-in
    val split; for ``real``, ``held_val`` (``--real-val``), else 64 of the fit rows (there are no others).
    Returns [(samples (n, dim), {train_s, best_val_loss, ema, guidance})] in the order of ``--guidance``."""
    if a.data == "builtin":
        val = load(a.data, a.split_seed, val=True)
    else:
        val = held_val if held_val is not None else fit[:64]
    config = train_config(a)
    fit_rows, val_rows = (torch.from_numpy(np.asarray(rows, np.float32)) for rows in (fit, val))
    data = TrainData(fit_rows, val_rows, Normalizer.fit(fit_rows.numpy(), a.norm))
    with tempfile.TemporaryDirectory() as tmp:
        result = train(config, data, tmp)
        if a.keep:  # the trained best.pt, for sampler experiments after this run (never half-written)
            Path(a.keep).parent.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(a.keep, Path(result.checkpoint_path).read_bytes())
        ema = load_ema_model(result.checkpoint_path, saved_train_config)
    trained = {"train_s": round(result.train_seconds, 1), "best_val_loss": round(result.best_loss, 5),
               "ema": config.ema_decay}
    return [guided_samples(ema, guidance, fit, val, n, a, trained) for guidance in a.guidance.split(",")]


def guided_samples(ema: EMAModel, guidance: str, fit: np.ndarray, val: np.ndarray, n: int, a: argparse.Namespace,
                   trained: dict) -> tuple[np.ndarray, dict]:
    """n samples (n, dim) of the EMA model at one guidance setting (a number or "auto", fitted as the evaluation
    asset fits it) with ``trained`` and the guidance used added to its row fields."""
    spec = SamplerSpec.parse(f"midpoint:{a.sample_steps}@{guidance}")
    fitted = {}
    if spec.guidance is None:
        fitted = fit_sampler_guidance(ema, spec, fit, val, seed=a.seed + 1).as_dict()
        spec = spec.resolved(fitted["guidance"])
    samples = draw_samples(ema, spec, n, seed=a.seed).x.numpy()
    return samples, {**trained, "guidance": f"{guidance}={spec.guidance:g}",
                     **({"target_variance": round(fitted["target_variance"], 4),
                         "unguided_variance": round(fitted["unguided_variance"], 4),
                         "guidance_note": fitted["note"]} if fitted else {})}


def run(a: argparse.Namespace) -> list[dict]:
    """One row per sample set: one for a reference model, one per ``--guidance`` setting of a trained flow."""
    fit, held, n = load(a.data, a.split_seed)
    held_val = None
    if a.data == "real" and a.real_val:  # held out of the fit rows: a val set the model never trains on
        fit, held_val = fit[: -a.real_val], fit[-a.real_val:]
    start, extra = time.perf_counter(), {"load": round(os.getloadavg()[0], 1)}
    if a.model == "flow":
        extra["autocast"] = a.precision
        sets = project_trainer_samples(fit, a, n, held_val)
        wall = time.perf_counter() - start  # training and every set's sampling
        return [score_row(a, gen, fit, held, n, wall, {**extra, **trained}) for gen, trained in sets]
    if a.model == "gaussian-full":
        mean, cov = ledoit_wolf_gaussian(fit)
        gen = np.random.default_rng(a.seed).multivariate_normal(mean, cov, size=n, method="cholesky")
    else:  # heldout. real: 200 of the fit rows (only 800 real rows: no third set); builtin: fresh rows of the truth
        gen = fit[np.random.default_rng(a.seed).permutation(len(fit))[:n]] if a.data == "real" else \
            sonar_mixture(1024, 0).sample(n, np.random.default_rng(a.seed + 7))[0]
    return [score_row(a, gen, fit, held, n, time.perf_counter() - start, extra)]


def score_row(a: argparse.Namespace, gen: np.ndarray, fit: np.ndarray, held: np.ndarray, n: int, wall: float,
              extra: dict) -> dict:
    """The results row of one generated set (n, dim): metrics against the held-out rows, the run's settings."""
    m = evaluate_samples(gen, fit, held, k=5, seed=0)
    nn_gen, nn_held = nearest_distance(gen, fit), nearest_distance(held[:n], fit)
    keys = ("ranking_kid", "fd_ratio", "precision", "recall", "density", "coverage", "train_copy_fraction")
    row = {"data": a.data, "model": a.flow if a.model == "flow" else a.model, "norm": a.norm, "time": a.time,
           "skip": a.skip, "size": a.size, "steps": a.steps, "batch": a.batch, "lr": a.lr, "pca_dims": a.pca_dims,
           "seed": a.seed, "split_seed": a.split_seed, "fit_rows": fit.shape[0], "wall_s": round(wall, 1),
           **{k: float(f"{m[k]:.4g}") for k in keys},
           "nn_train_ratio": round(float(np.median(nn_gen) / np.median(nn_held)), 3), **extra}
    if a.data == "builtin":  # known truth: FD to the generator's true mean and covariance, over held-out rows' FD
        truth = sonar_mixture(1024, 0)
        mean, cov = truth.mean(), truth.covariance()
        row["fd_true_ratio"] = round(frechet_to_gaussian(gen, mean, cov) / frechet_to_gaussian(held[:n], mean, cov), 3)
    return row


def calibrate(seeds=(0, 1, 2, 3, 4)) -> dict:
    """LW-Gaussian precision / coverage and held-out -> fit nearest-neighbour distance quantiles at 600 / 200 rows,
    averaged over split seeds, for the real vectors and for 800 rows of the generator."""
    out = {}
    for name, x in (("real", np.load(REAL)), ("generator", synthetic_sonar_mixture(800, 1024, seed=0))):
        out[name] = np.mean([calibration_stats(x, s) for s in seeds], axis=0).round(3).tolist()
    return out


def calibration_stats(x: np.ndarray, seed: int) -> list[float]:
    """[precision, coverage, *NN quantiles] of a Ledoit-Wolf Gaussian on a 600 / 200 split of x (800, dim)."""
    x = np.asarray(x, np.float64)
    perm = np.random.default_rng(seed).permutation(len(x))
    fit, held = x[perm[:600]], x[perm[600:800]]
    mean, cov = ledoit_wolf_gaussian(fit)
    gen = mean + np.random.default_rng(seed + 10).standard_normal((200, x.shape[1])) @ np.linalg.cholesky(cov).T
    scores = prdc(held, gen, k=5)
    return [scores["precision"], scores["coverage"], *np.quantile(nearest_distance(held, fit), QUANTILES)]


TABLE_KEYS = ("data", "model", "norm", "time", "skip", "pca_dims", "size", "steps", "batch", "lr", "ema", "seed",
              "wall_s", "train_s", "load", "ranking_kid", "fd_ratio",
              "precision", "recall", "coverage", "train_copy_fraction", "nn_train_ratio", "fd_true_ratio", "note")


def markdown_table(paths: list[str]) -> str:
    lines = [line for path in paths for line in Path(path).read_text().splitlines() if line.startswith("{")]
    rows = ["| " + " | ".join(TABLE_KEYS) + " |", "|" + "---|" * len(TABLE_KEYS)]
    for line in lines:
        row = json.loads(line)
        rows.append("| " + " | ".join(str(row.get(key, "")) for key in TABLE_KEYS) + " |")
    return "\n".join(rows)


def main(argv=None) -> None:
    torch.set_num_threads(1)
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["table"]:  # JSON lines (files or stdin) -> the RESULTS.md table rows
        print(markdown_table(argv[1:]))
        return
    if argv[:1] == ["calibrate"]:
        print(json.dumps(calibrate()))
        return
    p = argparse.ArgumentParser()
    p.add_argument("--data", choices=("builtin", "real"), default="builtin")
    p.add_argument("--model", choices=("flow", "gaussian-full", "heldout"), default="flow")
    p.add_argument("--flow", choices=("icfm", "otcfm"), default="icfm")
    p.add_argument("--norm", choices=("zscore", "whiten"), default="whiten")
    p.add_argument("--time", choices=("uniform", "logit_normal"), default="uniform")
    p.add_argument("--skip", action="store_true")
    p.add_argument("--size", default="small", help="the product's model_size preset")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema", type=float, default=None, help="EMA decay (default: the product's ema_decay)")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW's decoupled weight decay")
    p.add_argument("--eval-every", type=int, default=0, help="validate every N steps (0: every epoch)")
    p.add_argument("--pca-dims", type=int, default=0, help="flow on the top-k whitened coordinates only (0: all); "
                   "needs --norm whiten and --skip")
    p.add_argument("--sample-steps", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="autocast dtype")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--keep", default="", help="copy the run's best.pt to this path")
    p.add_argument("--real-val", type=int, default=0, help="real data: hold this many of the 600 fit rows out "
                   "as val rows (validation loss, the guidance target); the model and baselines fit the rest")
    p.add_argument("--guidance", default="1", help="comma-separated guidance settings, each a "
                   "number or 'auto' (one row each), e.g. '1,auto'")
    args = p.parse_args(argv)
    if args.model == "flow":
        try:
            train_config(args)
        except ValidationError as exc:
            p.error(f"these options make no valid TrainConfig: {format_validation_error(exc)}")
    for row in run(args):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
