"""Recipe search: which training recipe makes a flow beat the full-covariance Gaussian baseline?

Datasets: ``builtin`` (the built-in generator, 25,600 rows split 0.6/0.2/0.2 like the quickstart's dataset_splits,
scored with n = 1,000 generated rows against the test split, to keep runs short) and ``real`` (the 800 real SONAR vectors in
../shared/data, 600 fit / 200 held out, scored with n = 200). Every run prints one JSON line with the config, steps,
wall time (and training time, and the load average at the start), ranking KID, FD / floor, precision, recall, density, coverage, train-copy fraction, and the median nearest-train
distance of the generated rows relative to the held-out rows' (``nn_train_ratio``: < 1 means closer to training rows
than unseen real rows are, the sign of memorisation). Reference rows: ``--model gaussian-full`` (Ledoit-Wolf
covariance of the fit rows) and ``--model heldout`` (real held-out rows, or for ``builtin`` fresh rows of the true
distribution).

    python research/recipe_search.py --data real --norm whiten --time logit_normal --skip --steps 1500
    python research/recipe_search.py --trainer project --size matched --skip --pca-dims 64 --steps 3000 --batch 256
    python research/recipe_search.py calibrate   # the generator's calibration against the real vectors

Single-threaded (torch.set_num_threads(1)) so a shared 2-core machine keeps a core for others.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from flow_pipeline.core.atomic import write_bytes_atomic
from flow_pipeline.core.data.normalization import Normalizer
from flow_pipeline.core.data.splits import split_array
from flow_pipeline.core.data.synthetic import (frechet_to_gaussian, ledoit_wolf_gaussian, sonar_mixture,
                                               synthetic_sonar_mixture)
from flow_pipeline.core.flows import exact_ot_permutation
from flow_pipeline.core.metrics.prdc import nearest_distance, prdc
from flow_pipeline.core.metrics.real_side import evaluate_samples
from flow_pipeline.core.models import build_model
from flow_pipeline.core.models.mlp import MLPConfig, ResidualMLP
from flow_pipeline.core.models.skip import LinearSkip
from flow_pipeline.core.time_sampling import sample_times

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


class ProjectNormalizer:
    """The project's Normalizer (zscore or whiten, Ledoit-Wolf shrunk eigenvalues) on NumPy arrays."""

    def __init__(self, x: np.ndarray, method: str):
        self.normalizer = Normalizer.fit(np.asarray(x, np.float32), method)

    def normalize(self, x):
        return self.normalizer.normalize(torch.from_numpy(np.asarray(x, np.float32))).numpy()

    def denormalize(self, z):
        return self.normalizer.denormalize(torch.from_numpy(np.asarray(z, np.float32))).double().numpy()


def train_flow(z: np.ndarray, a: argparse.Namespace, scales: np.ndarray | None = None) -> nn.Module:
    """``scales``: (dim,) raw-space std of each normalised coordinate, for ``--loss-weight-power``."""
    torch.manual_seed(a.seed)
    weight = torch.ones(z.shape[1])
    if a.loss_weight_power and scales is not None:
        weight = torch.from_numpy(np.asarray(scales, np.float64) ** (2 * a.loss_weight_power)).float()
        weight = weight / weight.mean()
    if a.width:
        model = ResidualMLP(z.shape[1], MLPConfig(width=a.width, depth=a.depth, mlp_ratio=2, time_dim=128))
    else:
        model = build_model("mlp", z.shape[1], a.size)
    if a.skip:
        model = LinearSkip(model, z.shape[1])
    ema = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=a.weight_decay)
    warm = max(1, min(100, a.steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1, (s + 1) / warm) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / a.steps)))))
    data, g = torch.from_numpy(z), torch.Generator().manual_seed(a.seed)
    for step in range(a.steps):
        x1 = data[torch.randint(len(data), (a.batch,), generator=g)]
        x0 = torch.randn(x1.shape, generator=g)
        if a.flow == "otcfm":
            x1 = x1[exact_ot_permutation(x0, x1)]
        t = sample_times(len(x1), a.time, g)
        xt = (1 - t[:, None]) * x0 + t[:, None] * x1
        loss = ((model(xt, t) - (x1 - x0)).pow(2) * weight).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        decay = min(a.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema, model.parameters()):
                e.lerp_(p, 1 - decay)
    with torch.no_grad():
        for e, p in zip(ema, model.parameters()):
            p.copy_(e)
    return model


@torch.no_grad()
def sample_flow(model: nn.Module, n: int, dim: int, steps: int, seed: int) -> np.ndarray:
    x = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed + 1000))
    for i in range(steps):  # midpoint rule
        t = torch.full((n,), i / steps)
        mid = x + 0.5 / steps * model(x, t)
        x = x + model(mid, t + 0.5 / steps) / steps
    return x.numpy()


def project_trainer_samples(fit: np.ndarray, a: argparse.Namespace, n: int,
                            held_val: np.ndarray | None = None) -> list[tuple[np.ndarray, dict]]:
    """Train with the project's own trainer (TrainConfig, EMA, best.pt) and sample its EMA model like the
    evaluation asset does (midpoint, ``--sample-steps``), once per ``--guidance`` setting (an "auto" one fitted to
    the val rows' variance). Validation rows: the built-in val split; for ``real``, ``held_val``
    (``--real-val``), else 64 of the fit rows (there are no others).
    Returns [(samples, {train_s, best_val_loss, guidance})] in the order of ``--guidance``."""
    import tempfile

    from flow_pipeline.config import TrainConfig
    from flow_pipeline.core.trainer import TrainData, train
    from flow_pipeline.core.checkpoint import load_ema_model
    from flow_pipeline.evaluation.evaluate import saved_train_config
    from flow_pipeline.evaluation.guidance import fit_sampler_guidance
    from flow_pipeline.evaluation.samplers import SamplerSpec, draw_samples

    val = load(a.data, a.split_seed, val=True) if a.data == "builtin" else held_val if held_val is not None else fit[:64]
    config = TrainConfig(arch="mlp", flow=a.flow, model_size=a.size, normalization=a.norm, linear_skip=a.skip,
                         time_sampling=a.time, principal_dims=a.pca_dims, batch_size=a.batch, lr=a.lr, max_steps=a.steps,
                         eval_every_steps=a.eval_every, warmup_steps=min(200, a.steps // 10), patience=10_000, seed=a.seed, device="cpu",
                         precision=a.precision, weight_decay=a.weight_decay)
    normalizer = Normalizer.fit(np.asarray(fit, np.float32), a.norm)
    data = TrainData(torch.from_numpy(np.asarray(fit, np.float32)), torch.from_numpy(np.asarray(val, np.float32)),
                     normalizer)
    with tempfile.TemporaryDirectory() as tmp:
        result = train(config, data, tmp)
        if a.keep:  # the trained best.pt, for sampler experiments after this run (never half-written)
            Path(a.keep).parent.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(a.keep, Path(result.checkpoint_path).read_bytes())
        ema = load_ema_model(result.checkpoint_path, saved_train_config)
        trained = {"train_s": round(result.train_seconds, 1), "best_val_loss": round(result.best_loss, 5)}
        sets = []
        for guidance in a.guidance.split(","):
            spec = SamplerSpec.parse(f"midpoint:{a.sample_steps}@{guidance}")
            fitted = {}
            if spec.guidance is None:  # as the evaluation asset fits it (val rows: see above)
                fitted = fit_sampler_guidance(ema, spec, fit, val, seed=a.seed + 1).as_dict()
                spec = spec.resolved(fitted["guidance"])
            samples = draw_samples(ema, spec, n, seed=a.seed).x.numpy()
            sets.append((samples, {**trained, "guidance": f"{guidance}={spec.guidance:g}",
                                   **({"target_variance": round(fitted["target_variance"], 4),
                                       "unguided_variance": round(fitted["unguided_variance"], 4),
                                       "guidance_note": fitted["note"]} if fitted else {})}))
    return sets


def run(a: argparse.Namespace) -> list[dict]:
    """One row per sample set: one, or one per ``--guidance`` setting of a project-trainer model."""
    fit, held, n = load(a.data, a.split_seed)
    held_val = None
    if a.data == "real" and a.real_val:  # held out of the fit rows: a val set the model never trains on
        fit, held_val = fit[: -a.real_val], fit[-a.real_val:]
    start, extra = time.perf_counter(), {"load": round(os.getloadavg()[0], 1)}
    if a.model == "gaussian-full":
        mean, cov = ledoit_wolf_gaussian(fit)
        gen = np.random.default_rng(a.seed).multivariate_normal(mean, cov, size=n, method="cholesky")
    elif a.model == "heldout":
        # real: 200 of the fit rows (only 800 real rows: no third set); builtin: fresh rows of the true mixture.
        gen = fit[np.random.default_rng(a.seed).permutation(len(fit))[:n]] if a.data == "real" else \
            sonar_mixture(1024, 0).sample(n, np.random.default_rng(a.seed + 7))[0]
    elif a.trainer == "project":
        extra["autocast"] = a.precision
        sets = project_trainer_samples(fit, a, n, held_val)
        wall = time.perf_counter() - start  # training and every set's sampling
        return [score_row(a, gen, fit, held, n, wall, {**extra, **trained}) for gen, trained in sets]
    else:
        norm = ProjectNormalizer(fit, a.norm)
        train_start = time.perf_counter()
        k = a.pca_dims or fit.shape[1]  # a flow on the top-k whitened coordinates, a unit Gaussian on the rest
        model = train_flow(norm.normalize(fit)[:, :k], a, norm.normalizer.std.numpy()[:k])
        extra["train_s"] = round(time.perf_counter() - train_start, 1)
        z = sample_flow(model.eval(), n, k, a.sample_steps, a.seed)
        rest = np.random.default_rng(a.seed + 2000).standard_normal((n, fit.shape[1] - k)).astype(np.float32)
        gen = norm.denormalize(np.concatenate([z, rest], axis=1))
    return [score_row(a, gen, fit, held, n, time.perf_counter() - start, extra)]


def score_row(a: argparse.Namespace, gen: np.ndarray, fit: np.ndarray, held: np.ndarray, n: int, wall: float,
              extra: dict) -> dict:
    """The results row of one generated set (n, dim): metrics against the held-out rows, the run's settings."""
    m = evaluate_samples(gen, fit, held, k=5, seed=0)
    nn_gen, nn_held = nearest_distance(gen, fit), nearest_distance(held[:n], fit)
    keys = ("ranking_kid", "fd_ratio", "precision", "recall", "density", "coverage", "train_copy_fraction")
    row = {"data": a.data, "model": a.model if a.model != "flow" else f"{a.flow}/{a.trainer}", "norm": a.norm, "time": a.time, "skip": a.skip, "size": f"w{a.width}d{a.depth}" if a.width else a.size,
           "steps": a.steps, "batch": a.batch, "lr": a.lr, "ema": a.ema, "lw": a.loss_weight_power, "pca_dims": a.pca_dims, "seed": a.seed, "split_seed": a.split_seed, "fit_rows": fit.shape[0],
           "wall_s": round(wall, 1), **{k: float(f"{m[k]:.4g}") for k in keys},
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


TABLE_KEYS = ("data", "model", "norm", "time", "skip", "pca_dims", "lw", "size", "steps", "batch", "lr", "ema", "seed",
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
    p.add_argument("--trainer", choices=("harness", "project"), default="harness",
                   help="harness: this file's minimal loop (any width); project: flow_pipeline's trainer (presets)")
    p.add_argument("--flow", choices=("icfm", "otcfm"), default="icfm")
    p.add_argument("--norm", choices=("zscore", "whiten"), default="whiten")
    p.add_argument("--time", choices=("uniform", "logit_normal"), default="uniform")
    p.add_argument("--skip", action="store_true")
    p.add_argument("--size", default="small")
    p.add_argument("--width", type=int, default=0, help="custom MLP width (0: the --size preset)")
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW's decoupled weight decay")
    p.add_argument("--eval-every", type=int, default=0, help="project trainer: validate every N steps (0: epochs)")
    p.add_argument("--pca-dims", type=int, default=0, help="flow on the top-k whitened coordinates only (0: all)")
    p.add_argument("--loss-weight-power", type=float, default=0.0,
                   help="weight each normalised coordinate's loss by its raw variance ** power (mean 1); 1: raw-space MSE")
    p.add_argument("--sample-steps", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="project trainer: autocast dtype")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--keep", default="", help="project trainer: copy the run's best.pt to this path")
    p.add_argument("--real-val", type=int, default=0, help="real data: hold this many of the 600 fit rows out "
                   "as val rows (validation loss, the guidance target); the model and baselines fit the rest")
    p.add_argument("--guidance", default="1", help="project trainer: comma-separated guidance settings, each a "
                   "number or 'auto' (one row each), e.g. '1,auto'")
    for row in run(p.parse_args(argv)):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
