"""The trainer's own configuration: a plain frozen dataclass in which every training knob is declared once, with its
default, description and valid values (:func:`flow_pipeline.core.knobs.knob`).

The layers above derive from it: the validated pydantic model (:class:`flow_pipeline.config.TrainConfig`, which
converts itself with ``to_core()``), the Dagster run config and docs/configuration.md. The core never validates.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

from flow_pipeline.core.data.batching import AUGMENTATIONS
from flow_pipeline.core.data.normalization import NORMALIZATIONS
from flow_pipeline.core.data.splits import DATASET_SIZES
from flow_pipeline.core.flows import FLOWS
from flow_pipeline.core.knobs import knob
from flow_pipeline.core.models import ARCHITECTURES, MODEL_SIZES, REST_VARIANCES
from flow_pipeline.core.precision import PRECISIONS
from flow_pipeline.core.schedule import DEFAULT_WARMUP_CAP, DEFAULT_WARMUP_PERCENT
from flow_pipeline.core.time_sampling import TIME_SAMPLINGS

MODEL, DATA, OPTIMISATION, RUNTIME = "what is trained", "data", "optimisation", "runtime"

# The recipe a run gets when it sets nothing (chosen on the built-in data's val likelihood; RESULTS.md): whitened
# data, the linear skip path, the `small` network on the top 256 principal directions reading 512 prototype
# features, logit-normal training times, 10,000 optimizer steps at LR 2e-3.
RECIPE_PRINCIPAL_DIMS = 256
RECIPE_PROTOTYPES = 512
# Unset principal dims: one per this many training rows, at most RECIPE_PRINCIPAL_DIMS (the built-in data's 15,360
# rows get 256). Val likelihood over gaussian-full at 3,000 steps (RESULTS.md): on 480 real SONAR rows k = 32 / 64 /
# 128 scored +11.9 / +20.2 / +3.9 nats per row; on 1,601 rows of the built-in generator k = 64 / 128 / 256 scored
# +45.7 / +55.8 / -0.2 (the network learned nothing). Fewer than ~7 rows per direction fails; 12 keeps clear of it.
ROWS_PER_PRINCIPAL_DIM = 12
# Unset prototypes: one per this many training rows, at most RECIPE_PROTOTYPES (the built-in data's 15,360 rows get
# 512). With a prototype per training row the network memorises the rows: on 480 real SONAR rows, 512 prototypes lost
# 11 nats per held-out row to gaussian-full (RESULTS.md).
ROWS_PER_PROTOTYPE = 30
RECIPE_LR = 2e-3
DEFAULT_MAX_STEPS = 10_000
# Unset max_steps: at most this many passes over the training rows (the built-in data's 15,360 rows reach
# DEFAULT_MAX_STEPS after 167). On 480 real SONAR rows 3,000 steps (1,600 passes) scored +20 nats per val row over
# gaussian-full and 10,000 steps -70: a small training set is memorised long before the default's steps are done.
MAX_PASSES = 1_600
DEFAULT_MAX_EPOCHS = 50
EVALUATIONS_PER_RUN = 10


@dataclass(frozen=True)
class TrainSettings:
    """One training run's knobs, each declared with its meaning and valid values.

    run_name: the name its checkpoint directory and tracking run carry
    (:func:`flow_pipeline.core.run_identity.run_name`, filled in by the validated config).
    """

    arch: str = knob("mlp", "network architecture (set by the partition)", group=MODEL, choices=ARCHITECTURES)
    flow: str = knob("icfm", "probability path (set by the partition)", group=MODEL, choices=tuple(FLOWS))
    model_size: str = knob(
        "small", "tiny (tests), small (CPU), base (GPU), matched (mlp 1.32M, dit 1.29M, unet 1.33M parameters: "
        "within 4%, an architecture comparison at equal capacity; at small they differ 4.6x). DiT costs ~10x the "
        "FLOPs per parameter (every token passes its layers): the report shows both", group=MODEL, choices=MODEL_SIZES)
    dim: int = knob(1024, "embedding dimension (set by the data's statistics)", group=MODEL, gt=0)
    train_rows: int | None = knob(
        None, "training rows the run sees (set by the data, as dim is; the trainer fills it in when unset): sizes "
        "the unset principal_dims, prototypes and max_steps", group=DATA, ge=1)
    sigma: float = knob(0.0, "icfm/otcfm path noise; 0 is rectified flow", group=MODEL, ge=0)
    sigma_min: float = knob(1e-4, "fm path minimum std", group=MODEL, ge=0, lt=1)
    linear_skip: bool = knob(
        True, "add a linear path g(t) * x_t to the velocity field, g the exact velocity gain of a diagonal Gaussian "
        "with learned per-dimension variances (dim parameters, started at the normalised training rows' "
        "variances): the network then models only what is not Gaussian (meant for whitened data)", group=MODEL)
    principal_dims: int | None = knob(
        None, "k > 0: the network models only the first k whitened coordinates (the top k principal directions, where "
        "the data's cluster structure lives); the rest follow the linear skip path's Gaussian velocity. Needs "
        "normalization whiten and linear_skip true; 0: the network models every coordinate; null: with whiten and "
        f"the skip path one per {ROWS_PER_PRINCIPAL_DIM} training rows, at most {RECIPE_PRINCIPAL_DIMS} and dim, "
        "else 0", group=MODEL, ge=0)
    rest_variance: str = knob(
        "whitening", "with principal_dims k: the variance the linear skip path keeps in the other dim - k whitened "
        "coordinates. whitening: 1, the whitening's Gaussian (its shrinkage chosen on the val rows' likelihood, as "
        "gaussian-full's is); learned: the training rows' variance, 0 in every direction fewer rows than dimensions "
        "do not span", group=MODEL, choices=REST_VARIANCES)
    prototypes: int | None = knob(
        None, "n > 0: the network also reads the soft assignment of its k coordinates to n prototypes (started at n "
        "training rows; the posterior of each under an isotropic cluster on the path): lets it see cluster "
        "structure spread over k of a few hundred coordinates, which it cannot find from the coordinates alone. "
        f"Needs principal_dims > 0; with fewer than n training rows some start at the same row. null: one per "
        f"{ROWS_PER_PROTOTYPE} training rows, at most {RECIPE_PROTOTYPES}, when the network has principal dims, "
        f"else 0", group=MODEL, ge=0)
    time_sampling: str = knob(
        "logit_normal", "training distribution of t: logit_normal (t = sigmoid(N(0, 1)), more steps mid-path, where "
        "the data's clusters are told apart; on the built-in data it closes 0.49 of gaussian-full's KL on val at "
        "10,000 steps against uniform's 0.39), or uniform; validation always uses uniform t", group=MODEL,
        choices=TIME_SAMPLINGS)
    dataset: str = knob(
        "full", "training subset: from a splits/ root, that size's own train/val/test files; otherwise the first N "
        "training rows (all of them for full, or for the label of the one size directory given)", group=DATA,
        choices=tuple(DATASET_SIZES))
    aug: str = knob("none", "augmentation of the data (never of the noise)", group=DATA, choices=AUGMENTATIONS)
    normalization: str = knob(
        "whiten", "zscore: per-dimension mean/std; whiten: PCA whitening with the training rows' full covariance "
        "(eigenvalues shrunk towards their mean with the Ledoit-Wolf weight, so it stays invertible with fewer rows "
        "than dimensions). Statistics come from the training rows the run uses, are stored in the checkpoint and "
        "inverted at sampling", group=DATA, choices=NORMALIZATIONS)
    noise_std: float = knob(0.1, "noise augmentation: x + noise_std * eps", group=DATA, ge=0)
    mixup_max: float = knob(0.2, "mixup augmentation: (1 - lam) x + lam x[perm], lam ~ U(0, mixup_max) per row",
                            group=DATA, ge=0, le=1)
    dropout_p: float = knob(0.1, "dropout augmentation: each coordinate zeroed with this probability, the rest "
                            "rescaled by 1 / (1 - dropout_p)", group=DATA, ge=0, lt=1)
    max_epochs: int | None = knob(
        None, f"training length in passes over the data when max_steps is 0 or null (early stopping may end sooner); "
        f"null: {DEFAULT_MAX_EPOCHS}", group=OPTIMISATION, ge=1)
    max_steps: int | None = knob(
        None, f"optimizer steps of the run and the LR schedule's total, when set the same for every dataset size (a "
        f"study's budget); 0: max_epochs epochs; null: max_epochs epochs when max_epochs is set, else "
        f"{DEFAULT_MAX_STEPS:,} or {MAX_PASSES:,} passes over the training rows if that is fewer (a small set is "
        f"memorised sooner)", group=OPTIMISATION, ge=0)
    eval_every_steps: int | None = knob(
        None, f"validate, keep the best and count patience every N optimizer steps (and after the last); 0: at the "
        f"end of every epoch; null: {EVALUATIONS_PER_RUN} evaluations in a run of max_steps, every epoch in a run of "
        f"epochs", group=OPTIMISATION, ge=0)
    batch_size: int = knob(256, "rows per optimizer step", group=OPTIMISATION, ge=1)
    lr: float = knob(RECIPE_LR, "AdamW (fused) learning rate", group=OPTIMISATION, gt=0, le=1)
    weight_decay: float = knob(0.01, "AdamW weight decay", group=OPTIMISATION, ge=0)
    warmup_steps: int | None = knob(
        None, f"linear LR warmup over this many optimizer steps, then cosine decay to min_lr_ratio of lr; null: "
        f"min({DEFAULT_WARMUP_CAP}, {DEFAULT_WARMUP_PERCENT}% of the run's optimizer steps), so a short run warms "
        f"up too (the training metadata's warmup_steps and warmup_from say which length was used)",
        group=OPTIMISATION, ge=0)
    min_lr_ratio: float = knob(0.1, "the cosine decay's final LR as a share of lr", group=OPTIMISATION, ge=0, le=1)
    grad_clip: float = knob(1.0, "max gradient norm", group=OPTIMISATION, gt=0)
    ema_decay: float = knob(0.9999, "EMA decay, warmed up as min(decay, (1+s)/(10+s))", group=OPTIMISATION,
                            ge=0, lt=1)
    ema_every: int = knob(10, "update the EMA every N steps with the decay of N steps, and always before it is "
                          "validated or saved; 1: every step", group=OPTIMISATION, ge=1)
    patience: int = knob(20, "evaluations without EMA val improvement (counted after warmup) before stopping",
                         group=OPTIMISATION, ge=0)
    min_delta: float = knob(0.0, "smallest decrease of the EMA val loss that counts as an improvement",
                            group=OPTIMISATION, ge=0)
    seed: int = knob(42, "everything is seeded; a resumed run ends bit-identical to an uninterrupted one on CPU",
                     group=OPTIMISATION, ge=0)
    device: str = knob("auto", "auto (the compute resource decides), cpu, cuda or cuda:N", group=RUNTIME)
    precision: str = knob(
        "auto", "auto: bf16 autocast on CUDA and on a CPU that multiplies bf16 natively (avx512_bf16 or amx_bf16 in "
        "/proc/cpuinfo), fp32 on any other CPU (there bf16 is emulated and slower); fp32 or bf16 force one. The "
        "run's metadata says which it used", group=RUNTIME, choices=PRECISIONS)
    compile: bool = knob(False, "torch.compile the model", group=RUNTIME)
    log_every: int = knob(10, "metric logging interval in optimizer steps", group=RUNTIME, ge=1)
    save_every_steps: int = knob(0, "also write last.pt every N steps (0: once per epoch)", group=RUNTIME,
                                 ge=0)
    resume: bool = knob(False, "continue from the run's last.pt (or best.pt)", group=RUNTIME)
    run_name: str = "run"

    def flow_params(self) -> dict[str, float]:
        """The keyword arguments of :func:`flow_pipeline.core.flows.get_flow` for this run's flow."""
        return flow_params(self.flow, self.sigma, self.sigma_min)

    def to_dict(self) -> dict:
        """Every knob as a plain dict (``run_name`` left out): the ``config`` stored in checkpoints."""
        return {key: value for key, value in asdict(self).items() if key != "run_name"}

    def resolved(self) -> "TrainSettings":
        """These settings with every unset (None) length and network knob given the value it stands for (see each
        knob's description). Idempotent: the trainer and checkpoints only ever see resolved settings."""
        principal_dims = self.principal_dims
        if principal_dims is None:
            principal_dims = recipe_principal_dims(self.dim, self.train_rows) if self.normalization == "whiten" \
                and self.linear_skip else 0
        prototypes = self.prototypes
        if prototypes is None:
            prototypes = recipe_prototypes(self.train_rows) if principal_dims else 0
        max_steps = self.max_steps
        if max_steps is None:
            max_steps = 0 if self.max_epochs is not None else recipe_max_steps(self.train_rows, self.batch_size)
        eval_every_steps = self.eval_every_steps
        if eval_every_steps is None:
            eval_every_steps = max(1, max_steps // EVALUATIONS_PER_RUN) if max_steps else 0
        return replace(self, principal_dims=principal_dims, prototypes=prototypes, max_steps=max_steps,
                       max_epochs=DEFAULT_MAX_EPOCHS if self.max_epochs is None else self.max_epochs,
                       eval_every_steps=eval_every_steps)


def recipe_max_steps(train_rows: int | None, batch_size: int) -> int:
    """The optimizer steps an unset ``max_steps`` (with ``max_epochs`` unset too) stands for on ``train_rows``
    training rows in batches of ``batch_size`` (None: not known, :data:`DEFAULT_MAX_STEPS`): at most
    :data:`MAX_PASSES` passes over the rows, at most :data:`DEFAULT_MAX_STEPS`."""
    if train_rows is None:
        return DEFAULT_MAX_STEPS
    return max(1, min(DEFAULT_MAX_STEPS, math.ceil(MAX_PASSES * train_rows / batch_size)))


def recipe_principal_dims(dim: int, train_rows: int | None) -> int:
    """The principal dims an unset ``principal_dims`` stands for (with whitening and the skip path) on data of
    ``dim`` columns and ``train_rows`` training rows (None: not known, the recipe's full count): one per
    :data:`ROWS_PER_PRINCIPAL_DIM` rows, at most :data:`RECIPE_PRINCIPAL_DIMS` and ``dim``, at least 1."""
    if train_rows is None:
        return min(RECIPE_PRINCIPAL_DIMS, dim)
    return max(1, min(RECIPE_PRINCIPAL_DIMS, dim, train_rows // ROWS_PER_PRINCIPAL_DIM))


def recipe_prototypes(train_rows: int | None) -> int:
    """The prototypes an unset ``prototypes`` stands for on ``train_rows`` training rows (None: not known, the
    recipe's full count): one per :data:`ROWS_PER_PROTOTYPE` rows, at most :data:`RECIPE_PROTOTYPES`."""
    if train_rows is None:
        return RECIPE_PROTOTYPES
    return min(RECIPE_PROTOTYPES, train_rows // ROWS_PER_PROTOTYPE)


def flow_params(flow: str, sigma: float, sigma_min: float) -> dict[str, float]:
    """Path parameters of ``flow``: ``sigma`` for icfm/otcfm, ``sigma_min`` for fm, none for vp."""
    if flow in ("icfm", "otcfm"):
        return {"sigma": sigma}
    if flow == "fm":
        return {"sigma_min": sigma_min}
    return {}


