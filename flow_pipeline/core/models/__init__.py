"""Velocity-field architectures for flow matching on embedding vectors.

Every model maps ``x_t`` (batch, dim) and ``t`` (batch,) in [0, 1] to a
velocity ``v_t`` (batch, dim). Build one with :func:`build_model`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import dit, mlp, unet
from .prototypes import PrototypeFeatures
from .skip import LinearSkip
from .subspace import PrincipalSubspace

ARCHITECTURES = ("mlp", "dit", "unet")
# "matched": the three architectures within ±15% of one parameter count (the presets say how close), so an
# architecture comparison is not a capacity comparison; "small" differs 4.6x between them.
MODEL_SIZES = ("tiny", "small", "base", "matched")
# What the linear skip path's variances are outside a principal_dims network's coordinates (see LinearSkip).
REST_VARIANCES = ("whitening", "learned")

# Parameter counts of every (architecture, size) preset at dim=1024, as stated
# in each module's preset comments.
PRESET_PARAM_COUNTS: dict[tuple[str, str], int] = {
    (arch, size): count
    for arch, module in (("mlp", mlp), ("dit", dit), ("unet", unet))
    for size, count in module.PRESET_PARAM_COUNTS.items()
}


def build_model(arch: str, dim: int = 1024, size: str = "small", linear_skip: bool = False,
                principal_dims: int = 0, prototypes: int = 0, rest_variance: str = "learned") -> nn.Module:
    """Build the velocity field ``arch`` at preset ``size`` for vectors of length ``dim``; ``principal_dims`` k > 0
    builds it on the first k coordinates only (:class:`PrincipalSubspace`, zero velocity on the rest), and
    ``prototypes`` n > 0 adds n soft-assignment features to its input (:class:`PrototypeFeatures`, n * k + 1
    parameters); ``linear_skip`` wraps the result in :class:`LinearSkip` (adds ``dim`` parameters), whose variances
    outside the k coordinates are learned (``rest_variance`` "learned") or stay 1 ("whitening")."""
    if rest_variance not in REST_VARIANCES:
        raise ValueError(f"rest_variance: unknown value {rest_variance!r}; valid: {', '.join(REST_VARIANCES)}")
    if prototypes and not principal_dims:
        raise ValueError("prototypes: needs principal_dims > 0 (the features are computed on those coordinates)")
    if principal_dims:
        features = PrototypeFeatures(principal_dims, prototypes) if prototypes else None
        network = _build_preset(arch, principal_dims + prototypes, size)
        model = PrincipalSubspace(network, dim, principal_dims, features)
    else:
        model = _build_preset(arch, dim, size)
    if not linear_skip:
        return model
    fixed = principal_dims if principal_dims and rest_variance == "whitening" else None
    return LinearSkip(model, dim, fixed_from=fixed)


def start_prototypes(model: nn.Module, rows: Tensor, seed: int) -> None:
    """Start a model's prototype features (if it has any) at its normalised training rows (n_rows, dim), drawn with a
    generator seeded by ``seed``; any other model is left as it is."""
    net = model.net if isinstance(model, LinearSkip) else model
    if isinstance(net, PrincipalSubspace) and net.features is not None:
        generator = torch.Generator(device=rows.device).manual_seed(seed)
        net.features.start_at(rows[:, : net.k], generator)


def _build_preset(arch: str, dim: int, size: str) -> nn.Module:
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; valid: {', '.join(ARCHITECTURES)}")
    if size not in MODEL_SIZES:
        raise ValueError(f"unknown model size {size!r}; valid: {', '.join(MODEL_SIZES)}")
    if dim < 1:
        raise ValueError(f"dim must be positive; got {dim}")
    if arch == "mlp":
        return mlp.ResidualMLP(dim, mlp.MLP_PRESETS[size])
    if arch == "dit":
        return dit.DiT(dim, dit.DIT_PRESETS[size])
    return unet.MLPUNet(dim, unet.UNET_PRESETS[size])


def flops_per_sample(model: nn.Module, dim: int) -> int:
    """Floating-point operations of one forward pass on one sample (x_t (1, dim), t (1,)), counted by
    ``torch.utils.flop_counter`` (a multiply-add is 2 FLOPs; matmuls, attention and convolutions only)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    parameter = next(model.parameters())
    x_t = torch.zeros(1, dim, dtype=parameter.dtype, device=parameter.device)
    t = torch.full((1,), 0.5, dtype=parameter.dtype, device=parameter.device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x_t, t)
    return int(counter.get_total_flops())


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (those with requires_grad)."""
    return sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)


__all__ = [
    "ARCHITECTURES",
    "MODEL_SIZES",
    "PRESET_PARAM_COUNTS",
    "REST_VARIANCES",
    "build_model",
    "count_parameters",
    "flops_per_sample",
    "start_prototypes",
]
