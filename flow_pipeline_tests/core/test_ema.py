"""EMA against a hand-computed average with decay warm-up, on a real model whose weights change between updates."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from flow_pipeline.core.ema import EMA


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.GELU(), nn.Linear(7, 3)).double()
    model[1].bias.requires_grad_(False)  # frozen parameters are not averaged
    return model


def _trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def _randomize(model: nn.Module, g: torch.Generator) -> None:
    for p in model.parameters():
        p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype, device=p.device) * 2 + 0.5)


def _hand_ema(snapshots: list[dict[str, torch.Tensor]], decay: float) -> dict[str, torch.Tensor]:
    """shadow_1 = p_1; shadow_n = d_n shadow_{n-1} + (1 - d_n) p_n with d_n = min(decay, (1 + n) / (10 + n))."""
    shadow = {k: v.clone() for k, v in snapshots[0].items()}
    for n, params in enumerate(snapshots[1:], start=2):
        d = min(decay, (1 + n) / (10 + n))
        shadow = {k: d * shadow[k] + (1 - d) * params[k] for k in shadow}
    return shadow


@pytest.mark.parametrize("decay,k", [(0.6, 25), (0.9999, 15), (0.0, 4)])
def test_shadow_equals_hand_computed_ema(decay, k):
    model = _model(0)
    ema = EMA(model, decay=decay)
    g = torch.Generator().manual_seed(1)
    snapshots = []
    for _ in range(k):
        _randomize(model, g)
        snapshots.append(_trainable(model))
        ema.update(model)
    want = _hand_ema(snapshots, decay)
    got = ema.shadow_dict()
    assert set(got) == set(want)
    assert "1.bias" not in got
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-12, atol=1e-12)
    assert ema.num_updates == k
    # The shadow is its own storage, not the live weights.
    assert got["0.weight"].data_ptr() != model[0].weight.data_ptr()
    if decay > 0:
        assert not torch.equal(got["0.weight"], model[0].weight)


def test_first_update_copies_the_parameters():
    model = _model(2)
    ema = EMA(model, decay=0.9999)
    _randomize(model, torch.Generator().manual_seed(3))
    ema.update(model)
    for name, p in _trainable(model).items():
        assert torch.equal(ema.shadow_dict()[name], p)


def test_warmup_makes_early_updates_count():
    """With decay 0.9999 and no warm-up, 10 updates would keep ~99.9% of the first weights; with warm-up the
    first weights' share after n updates is prod_{m=2..n} (1+m)/(10+m), well below 1."""
    model = _model(4)
    ema = EMA(model, decay=0.9999)
    first = _trainable(model)["0.weight"]
    ema.update(model)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    for _ in range(9):
        ema.update(model)
    share = 1.0
    for m in range(2, 11):
        share *= (1 + m) / (10 + m)
    torch.testing.assert_close(ema.shadow_dict()["0.weight"], share * first, rtol=1e-12, atol=1e-12)
    assert share < 0.1


def test_copy_to_writes_the_shadow_into_another_model():
    model = _model(5)
    ema = EMA(model, decay=0.7)
    g = torch.Generator().manual_seed(6)
    for _ in range(5):
        _randomize(model, g)
        ema.update(model)
    other = _model(7)
    frozen_before = other[1].bias.detach().clone()
    ema.copy_to(other)
    for name, p in other.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, ema.shadow_dict()[name])
    assert torch.equal(other[1].bias, frozen_before)  # frozen parameters are left alone
    # copy_to copies: changing the target afterwards leaves the shadow alone.
    shadow_before = {k: v.clone() for k, v in ema.shadow_dict().items()}
    _randomize(other, g)
    for name, value in ema.shadow_dict().items():
        assert torch.equal(value, shadow_before[name])


def test_state_dict_round_trip_continues_identically():
    model = _model(8)
    ema = EMA(model, decay=0.8)
    g = torch.Generator().manual_seed(9)
    for _ in range(6):
        _randomize(model, g)
        ema.update(model)
    # Through bytes with weights_only=True, as a checkpoint would carry it.
    buffer = io.BytesIO()
    torch.save(ema.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    restored = EMA(_model(10), decay=0.5)  # different init and decay: both must come from the state
    restored.load_state_dict(state)
    assert restored.decay == 0.8 and restored.num_updates == 6
    for _ in range(8):
        _randomize(model, g)
        ema.update(model)
        restored.update(model)
    for name, value in ema.shadow_dict().items():
        assert torch.equal(restored.shadow_dict()[name], value), name
    assert restored.num_updates == ema.num_updates == 14


def test_load_state_dict_rejects_missing_parameters():
    model = _model(11)
    ema = EMA(model)
    state = ema.state_dict()
    state["shadow"] = {k: v for k, v in state["shadow"].items() if k != "3.weight"}
    with pytest.raises(KeyError, match="3.weight"):
        EMA(model).load_state_dict(state)


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5])
def test_decay_must_be_in_unit_interval(bad):
    with pytest.raises(ValueError, match="decay"):
        EMA(_model(12), decay=bad)


DEVICES = ["meta"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_shadow_lives_on_the_model_device(device):
    model = _model(13).to(device)
    ema = EMA(model)
    for value in ema.shadow_dict().values():
        assert value.device.type == torch.device(device).type
        assert value.dtype == torch.float64
    if device != "meta":
        _randomize(model, torch.Generator(device=device).manual_seed(0))
        ema.update(model)
        ema.update(model)
        assert all(v.device.type == "cuda" for v in ema.shadow_dict().values())


@pytest.mark.parametrize("decay,every,total", [(0.9999, 10, 47), (0.95, 3, 20), (0.5, 7, 7)])
def test_update_every_k_steps_equals_k_single_updates_of_the_kth_iterate(decay, every, total):
    """``update(model, steps=k)`` after every k-th iterate equals the hand EMA in which each of those iterates
    is repeated k times (the remainder: repeated as often as steps were left)."""
    model = _model(14)
    ema = EMA(model, decay=decay)
    g = torch.Generator().manual_seed(15)
    snapshots = []
    for done in range(every, total + every, every):
        steps = min(every, total - (done - every))
        _randomize(model, g)
        snapshots += [_trainable(model)] * steps
        ema.update(model, steps=steps)
    assert ema.num_updates == len(snapshots) == total
    want = _hand_ema(snapshots, decay)
    for name, value in ema.shadow_dict().items():
        torch.testing.assert_close(value, want[name], rtol=1e-12, atol=1e-12)


def test_update_rejects_zero_steps():
    with pytest.raises(ValueError, match="steps"):
        EMA(_model(16)).update(_model(16), steps=0)
