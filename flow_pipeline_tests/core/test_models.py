"""Tests for the velocity-field architectures in flow_pipeline.core.models."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

from flow_pipeline.core.models import (
    ARCHITECTURES,
    MODEL_SIZES,
    PRESET_PARAM_COUNTS,
    build_model,
    count_parameters,
    flops_per_sample,
    dit,
    mlp,
    unet,
)

BATCH = 4
DIMS = (1024, 256)  # default dim and a non-default one
# The final Linear of each architecture (zero-initialised for dit and unet).
OUTPUT_LAYERS = {"mlp": "output_projection", "dit": "final_layer.linear", "unet": "output_projection"}


def _inputs(dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x_t = torch.randn(BATCH, dim, generator=generator)
    t = torch.rand(BATCH, generator=generator)
    return x_t, t


def _build(arch: str, dim: int, size: str = "tiny", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(arch, dim=dim, size=size)


def _perturb(model: nn.Module, seed: int = 1, std: float = 0.05) -> nn.Module:
    """Move every parameter away from its (possibly zero) init."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(std * torch.randn(parameter.shape, generator=generator))
    return model


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_tiny_output_shape_and_finite(arch: str, dim: int) -> None:
    model = _perturb(_build(arch, dim))
    x_t, t = _inputs(dim)
    v_t = model(x_t, t)
    assert v_t.shape == (BATCH, dim)
    assert torch.isfinite(v_t).all()


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_small_output_shape(arch: str, dim: int) -> None:
    model = _build(arch, dim, size="small")
    x_t, t = _inputs(dim)
    with torch.no_grad():
        v_t = model(x_t, t)
    assert v_t.shape == (BATCH, dim)
    assert torch.isfinite(v_t).all()


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_gradients_reach_every_parameter(arch: str, dim: int) -> None:
    # Perturbed so that zero-initialised gates/read-outs do not block the gradient.
    model = _perturb(_build(arch, dim))
    x_t, t = _inputs(dim)
    loss = (model(x_t, t) - torch.randn_like(x_t)).pow(2).mean()
    assert loss.item() > 0
    loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, f"{name} got no gradient"
        assert parameter.grad.abs().sum() > 0, f"{name} got an all-zero gradient"


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_training_from_init_reaches_every_parameter(arch: str) -> None:
    # From the real (zero-)init, a few optimiser steps must open every gradient path:
    # zero read-outs/gates only delay learning, they must not freeze parameters.
    dim = 256
    model = _build(arch, dim)
    x_t, t = _inputs(dim)
    target = torch.randn_like(x_t)
    for _ in range(4):
        model.zero_grad()
        (model(x_t, t) - target).pow(2).mean().backward()
        # Sign-SGD (like Adam's first step) instead of torch.optim, whose first step
        # imports torch._dynamo and costs seconds.
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.sub_(1e-2 * parameter.grad.sign())
    model.zero_grad()
    (model(x_t, t) - target).pow(2).mean().backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, f"{name} is not learning"


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_output_layer_gets_gradient_at_init(arch: str) -> None:
    model = _build(arch, 256)
    x_t, t = _inputs(256)
    (model(x_t, t) - torch.randn_like(x_t)).pow(2).mean().backward()
    output_layer = model.get_submodule(OUTPUT_LAYERS[arch])
    assert output_layer.weight.grad is not None and output_layer.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_output_depends_on_t(arch: str, dim: int) -> None:
    model = _perturb(_build(arch, dim))
    x_t, _ = _inputs(dim)
    with torch.no_grad():
        v_early = model(x_t, torch.full((BATCH,), 0.1))
        v_late = model(x_t, torch.full((BATCH,), 0.9))
    assert not torch.allclose(v_early, v_late)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_scalar_t_broadcasts(arch: str) -> None:
    model = _perturb(_build(arch, 256))
    x_t, _ = _inputs(256)
    with torch.no_grad():
        assert torch.equal(model(x_t, torch.tensor(0.3)), model(x_t, torch.full((BATCH,), 0.3)))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_bad_t_shape_raises(arch: str) -> None:
    model = _build(arch, 256)
    x_t, _ = _inputs(256)
    with pytest.raises(ValueError, match="t must have shape"):
        model(x_t, torch.rand(BATCH + 1))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_deterministic_and_stateless(arch: str) -> None:
    # Same seed -> same weights -> same output; no dropout (train == eval); no buffers.
    first, second = _perturb(_build(arch, 256)), _perturb(_build(arch, 256))
    x_t, t = _inputs(256)
    with torch.no_grad():
        train_output = first.train()(x_t, t)
        assert torch.equal(train_output, second.train()(x_t, t))
        assert torch.equal(train_output, first.eval()(x_t, t))
    assert list(first.buffers()) == []
    assert not any(isinstance(module, nn.Dropout) for module in first.modules())


@pytest.mark.parametrize("dim", DIMS)
def test_dit_zero_init_outputs_exactly_zero(dim: int) -> None:
    model = _build("dit", dim)
    x_t, t = _inputs(dim)
    with torch.no_grad():
        v_t = model(x_t, t)
    assert torch.equal(v_t, torch.zeros_like(v_t))


def test_unet_zero_init_outputs_exactly_zero() -> None:
    model = _build("unet", 256)
    x_t, t = _inputs(256)
    with torch.no_grad():
        v_t = model(x_t, t)
    assert torch.equal(v_t, torch.zeros_like(v_t))


def test_unknown_architecture_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="unknown architecture 'foo'; valid: mlp, dit, unet"):
        build_model("foo")


def test_unknown_size_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="unknown model size 'huge'; valid: tiny, small, base, matched"):
        build_model("mlp", size="huge")


@pytest.mark.parametrize("dim", [57, 1000])
def test_dit_pads_a_dim_that_the_tokens_do_not_divide(dim: int) -> None:
    """A DiT on ``dim`` coordinates (not a multiple of its 16 tokens) is the DiT of the next multiple of 16 on the
    input with zeros appended, its extra outputs dropped: compared with that model, weights shared."""
    torch.manual_seed(dim)
    odd = build_model("dit", dim=dim, size="tiny")
    whole = build_model("dit", dim=-(-dim // 16) * 16, size="tiny")
    with torch.no_grad():
        for parameter in odd.parameters():  # away from the zero start, so the output depends on the input
            parameter.normal_(0, 0.1)
    whole.load_state_dict(odd.state_dict())
    x, t = torch.randn(5, dim), torch.rand(5)
    padded = torch.cat([x, torch.zeros(5, whole.dim - dim)], dim=1)
    out = odd(x, t)
    assert out.shape == (5, dim)
    torch.testing.assert_close(out, whole(padded, t)[:, :dim])
    assert out.std() > 0


def test_dit_needs_at_least_two_tokens() -> None:
    for size, config in dit.DIT_PRESETS.items():
        assert config.num_tokens >= 2, size
    with pytest.raises(ValueError, match="num_tokens >= 2"):
        dit.DiTConfig(num_tokens=1, hidden_size=64, depth=1, num_heads=4, mlp_ratio=2)


@pytest.mark.parametrize("size", MODEL_SIZES)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_preset_param_counts_match_stated(arch: str, size: str) -> None:
    # Built on the CPU rather than the meta device: the meta device imports
    # torch._dynamo (seconds), while initialising even a base preset takes < 1 s.
    measured = count_parameters(build_model(arch, dim=1024, size=size))
    assert measured == PRESET_PARAM_COUNTS[(arch, size)]
    module = {"mlp": mlp, "dit": dit, "unet": unet}[arch]
    assert measured == module.PRESET_PARAM_COUNTS[size]
    # The preset comment states the same number.
    assert f"# {measured:,} params at dim=1024" in inspect.getsource(module)


def test_tiny_presets_are_small() -> None:
    for arch in ARCHITECTURES:
        assert PRESET_PARAM_COUNTS[(arch, "tiny")] < 200_000, arch



def test_matched_presets_are_parameter_matched_within_15_percent() -> None:
    counts = [PRESET_PARAM_COUNTS[(arch, "matched")] for arch in ARCHITECTURES]
    reference = sum(counts) / len(counts)
    for arch, count in zip(ARCHITECTURES, counts):
        assert abs(count - reference) / reference <= 0.15, (arch, count, reference)
    assert max(counts) / min(counts) <= 1.15


@pytest.mark.parametrize("arch", ["mlp", "unet"])
def test_flops_per_sample_of_linear_models_is_twice_their_matmul_weights(arch: str) -> None:
    # mlp and unet are Linear layers plus elementwise ops: one sample costs 2 FLOPs per Linear weight.
    model = build_model(arch, dim=1024, size="tiny")
    linear_weights = sum(module.weight.numel() for module in model.modules() if isinstance(module, nn.Linear))
    assert flops_per_sample(model, 1024) == 2 * linear_weights


def test_dit_flops_include_attention_over_tokens() -> None:
    model = build_model("dit", dim=1024, size="tiny")
    linear_weights = sum(module.weight.numel() for module in model.modules() if isinstance(module, nn.Linear))
    # Token-wise layers run once per token, so a DiT costs far more than 2 FLOPs per weight.
    assert flops_per_sample(model, 1024) > 4 * linear_weights
