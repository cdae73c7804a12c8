"""Classifier two-sample test (C2ST; Lopez-Paz & Oquab 2017, the sample-set judge of the sbibm benchmarks).

A small MLP is trained to tell generated from real rows on one part of both sets; its accuracy on the held-out part
measures how far apart the two distributions are: 0.5 means the classifier found nothing to tell them apart by, 1.0
means it separates them perfectly. Unlike a kernel distance with a polynomial kernel, it sees any difference the
classifier can learn (e.g. a bimodal mixture against the Gaussian with its mean and covariance).

Protocol (one seeded train/held-out split, so the held-out predictions are independent given the trained classifier
and the interval is an exact binomial one):

* Both sets are cut to the same number of rows m (a seeded subsample of the larger), so chance level is exactly 0.5.
* Each class is split alike: ``held_out_fraction`` of its rows held out, the rest train the classifier.
* Rows are z-scored with the mean and (floored) std of the classifier's training rows, both classes pooled.
* The MLP (dim -> hidden -> hidden -> 1, ReLU) trains with Adam for a fixed number of minibatch steps (reshuffled
  epochs): the cost is fixed whatever n, and nothing is tuned on the held-out rows. (sbibm's C2ST uses 10 x dim
  hidden units and early stopping; a width of 128 and 500 steps keep this one cheap enough for every evaluation.)
* The accuracy on the held-out rows, its 95% Clopper–Pearson interval and the one-sided binomial p-value of
  accuracy > 0.5.

What it does not catch: a generator that copies real (training) rows scores ≈ 0.5, since copies follow the data's
distribution. Copying is judged by the copy rule of the ranking metric, not here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats

from flow_pipeline.core.data.normalization import floor_std

C2ST_HIDDEN = 128
# Optimizer steps: 25 epochs of the 5,120 training rows at n = 5,120 per set; a fixed count keeps the cost
# independent of n, and small sets get the many epochs they need to learn anything.
C2ST_STEPS = 500
C2ST_BATCH = 256
C2ST_LR = 1e-3
C2ST_WEIGHT_DECAY = 1e-4
C2ST_HELD_OUT_FRACTION = 0.5
CONFIDENCE = 0.95


@dataclass(frozen=True)
class C2STResult:
    """Held-out accuracy of the classifier and how it was obtained.

    ``accuracy`` in [0, 1] (0.5: indistinguishable); ``ci_low``/``ci_high``: its 95% Clopper–Pearson interval;
    ``p_value``: one-sided exact binomial p of accuracy > 0.5; ``n_per_class``: rows used from each set (m);
    ``n_train``/``n_held_out``: rows (both classes together) that trained / scored the classifier."""

    accuracy: float
    ci_low: float
    ci_high: float
    p_value: float
    n_per_class: int
    n_train: int
    n_held_out: int
    hidden: int
    steps: int

    def as_metrics(self, prefix: str = "c2st") -> dict[str, float | int]:
        """Flat metadata: ``c2st_accuracy``, ``c2st_accuracy_ci_low``/``_ci_high``, ``c2st_p_value``,
        ``c2st_n_held_out``."""
        return {f"{prefix}_accuracy": self.accuracy, f"{prefix}_accuracy_ci_low": self.ci_low,
                f"{prefix}_accuracy_ci_high": self.ci_high, f"{prefix}_p_value": self.p_value,
                f"{prefix}_n_held_out": self.n_held_out}


@dataclass(frozen=True)
class _Split:
    """Rows (float32, z-scored with the training part's statistics) and labels (1 = generated) of both parts."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    held_out_x: torch.Tensor
    held_out_y: torch.Tensor


def _validated(name: str, x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"c2st: {name} must be an (n, dim) array with n >= 2, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"c2st: {name} has non-finite values")
    return x


def _split(real: np.ndarray, generated: np.ndarray, held_out_fraction: float, rng: np.random.Generator) -> _Split:
    """Balanced classes (m rows each), the same held-out count per class, z-scored with the training part's stats."""
    m = min(real.shape[0], generated.shape[0])
    n_held_out = int(round(held_out_fraction * m))
    if not 1 <= n_held_out <= m - 1:
        raise ValueError(f"c2st: held_out_fraction {held_out_fraction} leaves no rows to train or to score "
                         f"with {m} rows per class")
    parts = []
    for rows in (real, generated):
        order = rng.permutation(rows.shape[0])[:m]
        parts.append((rows[order[n_held_out:]], rows[order[:n_held_out]]))  # (train, held out)
    train_x = np.concatenate([parts[0][0], parts[1][0]])
    mean, std = train_x.mean(axis=0), floor_std(train_x.std(axis=0))
    held_out_x = np.concatenate([parts[0][1], parts[1][1]])
    labels = lambda n: torch.cat([torch.zeros(n), torch.ones(n)])  # noqa: E731  (real first, then generated)
    as_tensor = lambda a: torch.from_numpy(((a - mean) / std).astype(np.float32))  # noqa: E731
    return _Split(as_tensor(train_x), labels(m - n_held_out), as_tensor(held_out_x), labels(n_held_out))


def _classifier(dim: int, hidden: int) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, hidden),
                               torch.nn.ReLU(), torch.nn.Linear(hidden, 1))


def _train(split: _Split, hidden: int, steps: int, batch: int, seed: int, device: torch.device) -> torch.nn.Module:
    """A classifier trained on the split's training part with a fixed budget; deterministic given the seed (for a
    fixed thread count); the global torch RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _classifier(split.train_x.shape[1], hidden).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=C2ST_LR, weight_decay=C2ST_WEIGHT_DECAY)
    generator = torch.Generator().manual_seed(seed)
    x, y = split.train_x.to(device), split.train_y.to(device)
    done = 0
    while done < steps:
        for index in torch.randperm(x.shape[0], generator=generator).split(batch)[:steps - done]:
            index = index.to(device)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x[index]).squeeze(1), y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            done += 1
    return model


def c2st(real, generated, *, seed: int, held_out_fraction: float = C2ST_HELD_OUT_FRACTION, hidden: int = C2ST_HIDDEN,
         steps: int = C2ST_STEPS, batch: int = C2ST_BATCH, device: str | torch.device = "cpu") -> C2STResult:
    """Classifier two-sample test of ``real`` (n_r, dim) against ``generated`` (n_g, dim); see the module docstring.

    Deterministic given ``seed`` and torch's thread count (it uses torch's current setting and changes nothing
    global). Cost: ``steps`` minibatches of ``batch`` rows through a dim x hidden MLP, whatever n (about 6 x
    steps x batch x dim x hidden flops); measured in BENCHMARKS.md.
    """
    real, generated = _validated("real", real), _validated("generated", generated)
    if min(hidden, steps, batch) < 1:
        raise ValueError(f"c2st: hidden, steps and batch must be >= 1, got {hidden}, {steps}, {batch}")
    if real.shape[1] != generated.shape[1]:
        raise ValueError(f"c2st: dimension mismatch: real has {real.shape[1]}, generated {generated.shape[1]}")
    split = _split(real, generated, held_out_fraction, np.random.default_rng(seed))
    model = _train(split, hidden, steps, batch, seed, torch.device(device))
    with torch.no_grad():
        predicted = (model(split.held_out_x.to(device)).squeeze(1) > 0).float().cpu()
    correct, n = int((predicted == split.held_out_y).sum()), split.held_out_y.shape[0]
    test = stats.binomtest(correct, n, 0.5, alternative="greater")
    interval = stats.binomtest(correct, n, 0.5).proportion_ci(confidence_level=CONFIDENCE, method="exact")
    return C2STResult(accuracy=correct / n, ci_low=float(interval.low), ci_high=float(interval.high),
                      p_value=float(test.pvalue), n_per_class=split.train_y.shape[0] // 2 + n // 2,
                      n_train=split.train_y.shape[0], n_held_out=n, hidden=hidden, steps=steps)
