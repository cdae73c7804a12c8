"""Every metric of :func:`flow_pipeline.core.metrics.real_side.evaluate_samples`, with the real side prepared once.

An evaluation scores several sample sets of the same size n against the same held-out rows: the model's samples
under each sampler and the reference rows (held-out real, gaussian-full, gaussian-diag). Everything that depends
only on the real rows is computed once in :meth:`RealSide.prepare`: the seeded test and train subsamples, the copy
threshold, FD's floor, the real halves of FD, FD∞ and KID (:mod:`flow_pipeline.core.metrics.reference_stats`), the real
rows' k-NN radii. :meth:`RealSide.score` then pays only for the sample set's own work, and shares its distance
blocks between metrics: one pass over sample-vs-test distances gives precision, recall, density, coverage, the
nearest-test distances of both memorisation measures and the nearest-neighbour cosine; one scan of the training
rows gives both the copy fraction and the memorisation ratio's nearest-train distances.

The numbers are those of the metric functions in :mod:`flow_pipeline.core.metrics` and
:mod:`flow_pipeline.core.metrics.distances` (same definitions, subsamples and seeds), up to floating-point round-off.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from flow_pipeline.core.data.stats import row_chunks
from flow_pipeline.core.metrics.copies import COPY_FRACTION_LIMIT, COPY_TRAIN_TEST_RATIO, copy_threshold
from flow_pipeline.core.metrics.distances import FD_INF_SIZES, TrainSpace, _as_float64, dispersion
from flow_pipeline.core.metrics.prdc import kth_neighbour_distance, norm_stats
from flow_pipeline.core.metrics.ranking import RANKING_METRIC
from flow_pipeline.core.metrics.reference_stats import FrechetReference, KidReference

# Sample rows per distance block: (512, 5,120) float64 blocks are 21 MB, a few of them live at once.
SCORE_CHUNK = 512
TRAIN_CHUNK_ROWS = 8192


def subsample_index(rows: int, n: int, rng: np.random.Generator) -> np.ndarray | None:
    """The sorted row indices :func:`~flow_pipeline.core.metrics.distances.subsample` draws (the same rng calls), or None
    when it keeps all ``rows``."""
    return None if rows <= n else np.sort(rng.choice(rows, size=n, replace=False))


def _take(x, index: np.ndarray | None) -> np.ndarray:
    return _as_float64(x if index is None else x[index])


@dataclass
class RealSide:
    """The held-out side of every metric for sample sets of n rows (see the module docstring).

    train, test: the rows given to :meth:`prepare` (the run's training rows, possibly memory-mapped and then
    scanned in chunks; the whole held-out split); test_n (n_t, dim) float64: test subsampled to n; train_n_index:
    the rows of train subsampled to n (None: all); fd_inf_subsets: (size, sample-row index or None,
    FrechetReference of the matching test subset in train-normalised space) per FD∞ size;
    memorisation_train_index (rows of train) and memorisation_test_index (rows of test_n, None: all) are the
    equal-sized sets of :func:`~flow_pipeline.core.metrics.copies.memorization_ratio`.
    """

    n: int
    k: int
    seed: int
    train: object
    test: object
    test_n: np.ndarray
    train_n_index: np.ndarray | None
    space: TrainSpace
    threshold: float
    fd_floor: float
    frechet: FrechetReference
    fd_inf_subsets: list[tuple[int, np.ndarray | None, FrechetReference]]
    kid_reference: KidReference
    real_radii: torch.Tensor
    memorisation_train_index: np.ndarray
    memorisation_test_index: np.ndarray | None

    @classmethod
    def prepare(cls, train, test: np.ndarray, n: int, k: int = 5, seed: int = 0,
                train_copy_threshold: float | None = None, train_space: TrainSpace | None = None,
                statistics: dict[str, np.ndarray] | None = None) -> "RealSide":
        """Prepare for sample sets of n rows against test (n_test, dim), with the run's training rows train
        (n_train, dim). ``train_copy_threshold`` / ``train_space`` / ``statistics`` (:meth:`statistics` of a side
        prepared before): reuse values computed before for the same rows, n, k and seed. The subsamples are drawn
        exactly as ``evaluate_samples`` draws them."""
        rng = np.random.default_rng(seed)
        test_n = _take(test, subsample_index(test.shape[0], n, rng))
        train_n_index = subsample_index(train.shape[0], n, rng)
        space = TrainSpace.fit(train) if train_space is None else train_space
        z_test = space.transform(test_n)
        kid_rows = z_test[: min(n, z_test.shape[0])]
        if statistics is None:
            frechet = FrechetReference.fit(test_n)
            fd_floor = frechet.distance(_take(train, train_n_index))
            fd_inf_subsets = _fd_inf_subsets(z_test, n, seed)
            kid_reference = KidReference.fit(kid_rows, seed=seed)
            real_radii = torch.from_numpy(kth_neighbour_distance(test_n, k))
        else:
            frechet = FrechetReference.from_arrays(statistics, "frechet")
            fd_floor = float(statistics["fd_floor"])
            fd_inf_subsets = _fd_inf_subsets(z_test, n, seed, statistics)
            kid_reference = KidReference.from_reduced(kid_rows, statistics["kid.row_sums"],
                                                      statistics["kid.quadratic"], seed=seed)
            real_radii = torch.from_numpy(statistics["real_radii"])
        memorisation_rng = np.random.default_rng(seed)
        n_train_n = train.shape[0] if train_n_index is None else train_n_index.shape[0]
        size = min(n_train_n, test_n.shape[0])
        within_train_n = subsample_index(n_train_n, size, memorisation_rng)
        all_train_n = np.arange(train.shape[0]) if train_n_index is None else train_n_index
        return cls(
            n=n, k=k, seed=seed, train=train, test=test, test_n=test_n, train_n_index=train_n_index, space=space,
            threshold=copy_threshold(train, test_n) if train_copy_threshold is None else train_copy_threshold,
            fd_floor=fd_floor, frechet=frechet, fd_inf_subsets=fd_inf_subsets, kid_reference=kid_reference,
            real_radii=real_radii,
            memorisation_train_index=all_train_n if within_train_n is None else all_train_n[within_train_n],
            memorisation_test_index=subsample_index(test_n.shape[0], size, memorisation_rng),
        )

    def statistics(self) -> dict[str, np.ndarray]:
        """The costly part of :meth:`prepare` as named arrays (FD's covariance roots, K_yy's reductions, the real
        k-NN radii; several seconds at n = 5,120), for ``prepare(..., statistics=...)`` on the same rows, n, k and
        seed. The subsamples and indices are cheap and redrawn."""
        arrays = {"fd_floor": np.array(self.fd_floor), "real_radii": self.real_radii.numpy(),
                  "kid.row_sums": self.kid_reference.row_sums.numpy(),
                  "kid.quadratic": self.kid_reference.quadratic.numpy(), **self.frechet.to_arrays("frechet")}
        for i, (_, _, reference) in enumerate(self.fd_inf_subsets):
            arrays.update(reference.to_arrays(f"fd_inf.{i}"))
        return arrays

    def score(self, generated: np.ndarray) -> dict[str, float]:
        """Every metric of generated (n, dim), as :func:`~flow_pipeline.core.metrics.real_side.evaluate_samples` returns it."""
        generated = _as_float64(generated)
        if generated.shape[0] != self.n or generated.shape[1] != self.test_n.shape[1]:
            raise ValueError(f"prepared for {self.n} samples of dim {self.test_n.shape[1]}, got {generated.shape}")
        z_generated = self.space.transform(generated)
        kernel = self.kid_reference.kid(z_generated)
        neighbours = _test_neighbours(generated, self.test_n, self.real_radii, self.k, self.memorisation_test_index)
        near_train, near_memorisation_train = _train_neighbours(generated, self.train, self.memorisation_train_index)
        is_copy = (near_train < self.threshold) & (near_train <= COPY_TRAIN_TEST_RATIO * neighbours.pop("near_test"))
        copies = float(np.mean(is_copy))
        memorising = copies > COPY_FRACTION_LIMIT
        fd = self.frechet.distance(generated)
        gen_norms, real_norms = norm_stats(generated), norm_stats(self.test_n)
        memorisation = near_memorisation_train / (neighbours.pop("near_memorisation_test") + 1e-12)
        return {
            **kernel,
            RANKING_METRIC: float("inf") if memorising else kernel["kid"],
            **self._fd_infinity(z_generated),
            **dispersion(generated, self.test_n),
            "fd": fd,
            "fd_floor": self.fd_floor,
            "fd_ratio": fd / self.fd_floor if self.fd_floor > 0 else float("inf"),
            **{name: neighbours[name] for name in ("precision", "recall", "density", "coverage")},
            "memorization_ratio": float(np.median(memorisation)),
            "train_copy_fraction": copies,
            "copy_threshold": self.threshold,
            "memorising": float(memorising),
            "norm_mean": gen_norms["mean"],
            "norm_std": gen_norms["std"],
            "real_norm_mean": real_norms["mean"],
            "real_norm_std": real_norms["std"],
            "nn_cosine": neighbours["nn_cosine"],
            "n": self.n,
        }

    def _fd_infinity(self, z_generated: np.ndarray) -> dict[str, float]:
        """:func:`~flow_pipeline.core.metrics.distances.fd_infinity` with the test subsets' roots prepared."""
        sizes = np.array([size for size, _, _ in self.fd_inf_subsets], dtype=float)
        values = [reference.distance(_take(z_generated, index)) for _, index, reference in self.fd_inf_subsets]
        slope, intercept = np.polyfit(1.0 / sizes, values, deg=1)
        return {"fd_inf": float(intercept), "fd_inf_slope": float(slope)}


def _fd_inf_subsets(z_test: np.ndarray, n: int, seed: int, statistics: dict[str, np.ndarray] | None = None,
                    ) -> list[tuple[int, np.ndarray | None, FrechetReference]]:
    """The subsets :func:`~flow_pipeline.core.metrics.distances.fd_infinity` draws for n samples against z_test (the same
    sizes and rng calls: per size, the samples' rows, then the test rows), with the test subsets fitted, or read
    from ``statistics`` (:meth:`RealSide.statistics`)."""
    m = min(n, z_test.shape[0])
    if m < 8:
        raise ValueError(f"FD∞ needs at least 8 rows per set, got m={m}")
    rng = np.random.default_rng(seed)
    subsets = []
    for i, size in enumerate(np.unique(np.linspace(m // 2, m, FD_INF_SIZES).astype(int))):
        sample_index = subsample_index(n, int(size), rng)
        test_index = subsample_index(z_test.shape[0], int(size), rng)
        reference = (FrechetReference.fit(_take(z_test, test_index)) if statistics is None
                     else FrechetReference.from_arrays(statistics, f"fd_inf.{i}"))
        subsets.append((int(size), sample_index, reference))
    return subsets


def _pairwise_distances(a: torch.Tensor, a_sq: torch.Tensor, b: torch.Tensor, b_sq: torch.Tensor):
    """(Euclidean distances (c, m), inner products (c, m)) float64 of a (c, d) and b (m, d) float32, given their
    squared row norms (float64, of the float64 rows); the matmul form cdist uses, negative round-off clamped to 0.

    The product is float32 (half the time of float64 on these CPUs; it is most of scoring) and the rest float64. Its
    error is ~1e-7 of |a||b|: on embeddings whose nearest neighbours lie at a fair fraction of their norm, distances
    move by ~1e-7 relative, which decides a k-NN ball or a nearest neighbour only at a near-exact tie. A distance
    near 0 (a copy) has an absolute error ~3e-4 |a| instead, so the nearest-neighbour distances the metrics report are
    recomputed in float64 from the rows found (:func:`_exact_distances`)."""
    inner = (a @ b.T).double()
    return (a_sq[:, None] + b_sq[None, :] - 2.0 * inner).clamp_min_(0.0).sqrt_(), inner


def _exact_distances(x: torch.Tensor, neighbours: np.ndarray) -> torch.Tensor:
    """Row-wise Euclidean distances (n,) float64 between x (n, d) float64 and neighbours (n, d)."""
    return (x - torch.from_numpy(_as_float64(neighbours))).norm(dim=1)


def _test_neighbours(generated: np.ndarray, test_n: np.ndarray, real_radii: torch.Tensor, k: int,
                     memorisation_test_index: np.ndarray | None) -> dict:
    """One pass over the sample-vs-test distances: PRDC (:func:`~flow_pipeline.core.metrics.prdc.prdc` with
    real = test_n), nn_cosine, and the nearest-test distances (n,) of the copy test and of memorisation."""
    g, t = torch.from_numpy(generated), torch.from_numpy(test_n)
    g_sq, t_sq = (g * g).sum(dim=1), (t * t).sum(dim=1)
    g_norm, t_norm = g_sq.sqrt().clamp_min(1e-12), t_sq.sqrt().clamp_min(1e-12)
    g32, t32 = g.float(), t.float()  # the distance products' operands (see _pairwise_distances)
    fake_radii = torch.from_numpy(kth_neighbour_distance(generated, k))
    n = g.shape[0]
    in_some_real_ball, real_ball_count = torch.empty(n, dtype=torch.bool), torch.empty(n, dtype=torch.float64)
    real_ball_has_fake = torch.zeros(t.shape[0], dtype=torch.bool)
    real_in_some_fake_ball = torch.zeros(t.shape[0], dtype=torch.bool)
    cosine = torch.empty(n, dtype=torch.float64)
    nearest, nearest_memorisation = (torch.empty(n, dtype=torch.long) for _ in range(2))  # rows of test_n
    memorisation_columns = None if memorisation_test_index is None else torch.from_numpy(memorisation_test_index)
    for start in range(0, n, SCORE_CHUNK):
        rows = slice(start, min(start + SCORE_CHUNK, n))
        dist, inner = _pairwise_distances(g32[rows], g_sq[rows], t32, t_sq)  # (c, n_t)
        inside_real_ball = dist < real_radii[None, :]
        in_some_real_ball[rows] = inside_real_ball.any(dim=1)
        real_ball_count[rows] = inside_real_ball.sum(dim=1)
        real_ball_has_fake |= inside_real_ball.any(dim=0)
        real_in_some_fake_ball |= (dist < fake_radii[rows, None]).any(dim=0)
        nearest[rows] = dist.argmin(dim=1)
        nearest_memorisation[rows] = (nearest[rows] if memorisation_columns is None
                                      else memorisation_columns[dist[:, memorisation_columns].argmin(dim=1)])
        cosine[rows] = (inner / (g_norm[rows, None] * t_norm[None, :])).max(dim=1).values
    return {
        "precision": float(in_some_real_ball.double().mean()),
        "recall": float(real_in_some_fake_ball.double().mean()),
        "density": float(real_ball_count.mean()) / k,
        "coverage": float(real_ball_has_fake.double().mean()),
        "nn_cosine": float(cosine.mean()),
        "near_test": _exact_distances(g, test_n[nearest.numpy()]).numpy(),
        "near_memorisation_test": _exact_distances(g, test_n[nearest_memorisation.numpy()]).numpy(),
    }


def _train_neighbours(generated: np.ndarray, train, memorisation_index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One scan of the training rows (read ``TRAIN_CHUNK_ROWS`` at a time, so a memory-mapped split never becomes
    resident): the nearest-train distance of every sample (n,), and the nearest among the rows
    ``memorisation_index`` (sorted indices into train) (n,).

    Only which row is nearest is searched for, on |b|^2 - 2 a.b in float32 (|a - b|^2 less the sample's own |a|^2,
    the same for every row; no float64 (c, m) matrix, no square roots); the distances are then computed in float64
    from the rows found (:func:`_exact_distances`). float32 decides between two rows only when their distances agree
    to ~1e-7 relative, where either is the nearest for every metric here."""
    g = torch.from_numpy(generated)
    g32 = g.float()
    best, best_subset = (torch.full((g.shape[0],), float("inf"), dtype=torch.float32) for _ in range(2))
    nearest, nearest_subset = (torch.zeros(g.shape[0], dtype=torch.long) for _ in range(2))  # rows of train
    start = 0
    for chunk in row_chunks(train, TRAIN_CHUNK_ROWS):
        t32 = torch.from_numpy(_as_float64(chunk)).float()
        t_sq = (t32 * t32).sum(dim=1)
        lo, hi = np.searchsorted(memorisation_index, [start, start + t32.shape[0]])
        columns = torch.from_numpy(memorisation_index[lo:hi] - start)
        for rows in range(0, g.shape[0], SCORE_CHUNK):
            block = slice(rows, min(rows + SCORE_CHUNK, g.shape[0]))
            score = torch.addmm(t_sq[None, :], g32[block], t32.T, alpha=-2.0)  # |a - b|^2 - |a|^2, (c, m)
            _keep_nearer(best, nearest, block, *score.min(dim=1), start)
            if columns.numel():
                value, column = score[:, columns].min(dim=1)
                _keep_nearer(best_subset, nearest_subset, block, value, columns[column], start)
        start += t32.shape[0]
    return _exact_distances(g, train[nearest.numpy()]).numpy(), _exact_distances(g, train[nearest_subset.numpy()]).numpy()


def _keep_nearer(best: torch.Tensor, nearest: torch.Tensor, block: slice, value: torch.Tensor, row: torch.Tensor,
                 offset: int) -> None:
    """Where ``value`` (c,) beats ``best[block]``, take it and its row (``row + offset``) into ``nearest[block]``."""
    nearer = value < best[block]
    best[block] = torch.where(nearer, value, best[block])
    nearest[block] = torch.where(nearer, row + offset, nearest[block])


def evaluate_samples(
    generated: np.ndarray, train: np.ndarray, test: np.ndarray, k: int = 5, seed: int = 0,
    train_copy_threshold: float | None = None, train_space: TrainSpace | None = None,
) -> dict[str, float]:
    """All metrics of generated (n, dim) against held-out test, and against train: the rows the model was trained
    on (for the floor, the normalisation of the kernel distances, and both memorisation measures).

    Every comparison uses the same n: test and train are subsampled (seeded by ``seed``, without replacement) to n
    rows when they are larger, because FD and the k-NN metrics depend strongly on sample size. The real reference
    for every distance is the test subsample, so memorizing train is not rewarded there.

    Returns a flat dict (spaces: :data:`METRIC_SPACES`):
    kid, kid_se, kid_ci_low, kid_ci_high (:func:`~flow_pipeline.core.metrics.distances.kid` against test_n, in the space
    z-scored with train's statistics; pass ``train_space`` to reuse them); ranking_kid (:data:`RANKING_RULE`);
    fd_inf, fd_inf_slope (:func:`~flow_pipeline.core.metrics.distances.fd_infinity`, same space); variance_ratio,
    norm_ratio (:func:`~flow_pipeline.core.metrics.distances.dispersion` against test_n);
    fd: FD(generated, test_n); fd_floor: FD(train_n, test_n), what two real sets of this size score, since FD is far
    from 0 when n ~ dim; fd_ratio = fd / fd_floor (biased: rewards shrunk samples, kept for comparison); precision,
    recall, density, coverage (:func:`prdc` with real = test_n); memorization_ratio (about 1 for fresh samples,
    near 0 for train copies); train_copy_fraction against all of train (about 0.01 for fresh samples, 1 for copies
    of any training row) and its copy_threshold (:func:`copy_threshold` of test_n; pass it back as
    ``train_copy_threshold`` to skip recomputing it for more samples of the same n and seed); memorising (1.0 when
    train_copy_fraction > :data:`COPY_FRACTION_LIMIT`); norm_mean, norm_std of generated norms; real_norm_mean,
    real_norm_std of test_n norms; nn_cosine of generated to test_n; n = len(generated).

    Several sample sets of the same size against the same rows: prepare the real side once
    (:meth:`flow_pipeline.core.metrics.real_side.RealSide.prepare`) and :meth:`~flow_pipeline.core.metrics.real_side.RealSide.score`
    each set; this function does both for one set.
    """
    generated = _as_float64(generated)
    side = RealSide.prepare(train, test, generated.shape[0], k=k, seed=seed,
                            train_copy_threshold=train_copy_threshold, train_space=train_space)
    return side.score(generated)
