"""Normalizer, the resumable epoch batch sampler and data augmentation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from flow_pipeline.core.data.batching import AUGMENTATIONS, EpochBatchSampler, augment
from flow_pipeline.core.data.normalization import Normalizer

# --- Normalizer ------------------------------------------------------------------------------------------------


def _raw(seed: int, n: int = 200, dim: int = 48) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(dim, generator=g) * 0.01 + 0.001
    offset = torch.randn(dim, generator=g) * 0.01
    return torch.randn(n, dim, generator=g) * scale + offset


def test_normalizer_round_trip_and_z_scores():
    x = _raw(0)
    mean, std = x.mean(0), x.std(0)
    norm = Normalizer(mean, std)
    z = norm.normalize(x)
    torch.testing.assert_close(z, (x - mean) / std, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(z.mean(0), torch.zeros(48), rtol=0, atol=1e-5)
    torch.testing.assert_close(z.std(0), torch.ones(48), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(norm.denormalize(z), x, rtol=1e-5, atol=1e-8)
    # And the other way round on fresh z-scores.
    w = torch.randn(10, 48, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(norm.normalize(norm.denormalize(w)), w, rtol=1e-4, atol=1e-4)
    assert norm.dim == 48


def test_normalizer_fit_zscore_floors_near_constant_dimensions_once():
    x = _raw(2)
    x[:, 3] = 0.25  # a constant dimension: std 0
    x[:, 7] = 0.1 + 1e-9 * torch.randn(x.shape[0], generator=torch.Generator().manual_seed(3))  # nearly constant
    norm = Normalizer.fit(x.numpy(), "zscore")
    rows = x.double().numpy()
    std = rows.std(0, ddof=1)
    floor = 0.1 * np.median(std)  # the one floor rule (core.data.normalization.floor_std), written out
    np.testing.assert_allclose(norm.mean.numpy(), rows.mean(0), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(norm.std.numpy(), np.maximum(std, floor), rtol=1e-5)
    assert norm.std[3] == pytest.approx(floor, rel=1e-5) and norm.std[7] == pytest.approx(floor, rel=1e-5)
    z = norm.normalize(x)
    assert torch.isfinite(z).all() and z[:, 3].abs().max() < 1e-3 and z[:, 7].abs().max() < 1e-3
    assert norm.details["n_floored"] == 2 and norm.details["rows"] == 200


def test_normalizer_refuses_a_zero_std_instead_of_flooring_it_again():
    with pytest.raises(ValueError, match="std must be finite and > 0"):
        Normalizer(torch.zeros(3), torch.tensor([1.0, 0.0, 1.0]))


def test_normalizer_state_round_trip():
    x = _raw(4)
    norm = Normalizer(x.mean(0), x.std(0))
    tensors = {k: v.tolist() for k, v in norm.state_dict().items() if k != "method"}
    buffer = json.dumps({**tensors, "method": norm.state_dict()["method"]})
    restored = Normalizer.from_state_dict({k: v if k == "method" else torch.tensor(v)
                                           for k, v in json.loads(buffer).items()})
    torch.testing.assert_close(restored.normalize(x), norm.normalize(x), rtol=0, atol=0)
    restored2 = Normalizer.from_state_dict(norm.state_dict())
    assert torch.equal(restored2.mean, norm.mean) and torch.equal(restored2.std, norm.std)


def test_normalizer_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="mean and std"):
        Normalizer(torch.randn(5), torch.rand(6))
    with pytest.raises(ValueError):
        Normalizer(torch.randn(2, 3), torch.rand(2, 3))


# --- EpochBatchSampler -----------------------------------------------------------------------------------------

N_ROWS, BATCH, SEED = 103, 10, 17


def _epoch(sampler: EpochBatchSampler) -> list[torch.Tensor]:
    return list(sampler.epoch_batches())


def test_each_epoch_is_disjoint_batches_of_a_permutation():
    sampler = EpochBatchSampler(N_ROWS, BATCH, SEED)
    assert sampler.steps_per_epoch == 10
    epochs = []
    for e in range(3):
        batches = _epoch(sampler)
        assert len(batches) == 10
        assert all(b.shape == (BATCH,) and b.dtype == torch.int64 for b in batches)
        flat = torch.cat(batches)
        assert flat.unique().numel() == flat.numel() == 100  # disjoint: no row twice in an epoch
        assert flat.min() >= 0 and flat.max() < N_ROWS
        # Consecutive slices of one permutation of all rows (the last incomplete batch dropped).
        expected = torch.randperm(N_ROWS, generator=torch.Generator().manual_seed(SEED + e))
        assert torch.equal(flat, expected[:100])
        epochs.append(flat)
        assert sampler.epoch == e + 1 and sampler.position == 0
    assert not torch.equal(epochs[0], epochs[1])  # reshuffled every epoch
    # Same seed, same order.
    again = EpochBatchSampler(N_ROWS, BATCH, SEED)
    assert torch.equal(torch.cat(_epoch(again)), epochs[0])
    assert not torch.equal(torch.cat(_epoch(EpochBatchSampler(N_ROWS, BATCH, SEED + 100))), epochs[0])


@pytest.mark.parametrize("consumed", [0, 1, 4, 9])
def test_state_dict_mid_epoch_resumes_the_remaining_batches(consumed):
    reference = EpochBatchSampler(N_ROWS, BATCH, SEED)
    _epoch(reference)  # finish epoch 0 so the resume happens in epoch 1
    ref_batches = _epoch(reference) + _epoch(reference)

    sampler = EpochBatchSampler(N_ROWS, BATCH, SEED)
    _epoch(sampler)
    iterator = sampler.epoch_batches()
    taken = [next(iterator) for _ in range(consumed)]
    state = json.loads(json.dumps(sampler.state_dict()))  # plain types only
    assert state["epoch"] == 1 and state["position"] == consumed

    fresh = EpochBatchSampler(N_ROWS, BATCH, seed=999)  # the seed must come from the state
    fresh.load_state_dict(state)
    rest = _epoch(fresh) + _epoch(fresh)
    assert len(rest) == 20 - consumed
    for got, want in zip(taken + rest, ref_batches):
        assert torch.equal(got, want)


def test_load_state_dict_rejects_a_different_shape():
    state = EpochBatchSampler(N_ROWS, BATCH, SEED).state_dict()
    with pytest.raises(ValueError, match="batch_size"):
        EpochBatchSampler(N_ROWS, 20, SEED).load_state_dict(state)
    with pytest.raises(ValueError, match="n_rows"):
        EpochBatchSampler(N_ROWS + 1, BATCH, SEED).load_state_dict(state)


def test_two_ranks_concatenate_to_the_single_process_batches():
    single = EpochBatchSampler(N_ROWS, BATCH, SEED)
    ranks = [EpochBatchSampler(N_ROWS, BATCH, SEED, rank=r, world_size=2) for r in range(2)]
    for _ in range(2):
        want = _epoch(single)
        got = [_epoch(r) for r in ranks]
        assert len(got[0]) == len(got[1]) == len(want)
        for step, batch in enumerate(want):
            assert got[0][step].shape == (BATCH // 2,)
            assert torch.equal(torch.cat([got[0][step], got[1][step]]), batch)


def test_sampler_argument_errors():
    with pytest.raises(ValueError, match="empty"):
        EpochBatchSampler(0, 1, SEED)
    with pytest.raises(ValueError, match="larger"):
        EpochBatchSampler(5, 6, SEED)
    with pytest.raises(ValueError, match="world size"):
        EpochBatchSampler(100, 9, SEED, rank=0, world_size=2)


# --- augmentation ----------------------------------------------------------------------------------------------


def _z(seed: int = 0, n: int = 64, dim: int = 32) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)) + 0.5


def test_none_is_identity():
    x = _z()
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    assert torch.equal(augment(x, "none", g), x)
    assert torch.equal(g.get_state(), state)  # and draws nothing


@pytest.mark.parametrize("aug", [a for a in AUGMENTATIONS if a != "none"])
def test_each_mode_changes_data_and_is_reproducible(aug):
    x = _z(1)
    original = x.clone()
    a = augment(x, aug, torch.Generator().manual_seed(5))
    b = augment(x, aug, torch.Generator().manual_seed(5))
    c = augment(x, aug, torch.Generator().manual_seed(6))
    assert torch.equal(x, original)  # the input is not modified in place
    assert a.shape == x.shape and a.dtype == x.dtype
    assert not torch.equal(a, x)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_noise_adds_gaussian_noise_of_the_given_std():
    x = _z(2, n=400, dim=64)
    out = augment(x, "noise", torch.Generator().manual_seed(0), noise_std=0.3)
    diff = out - x
    assert diff.std().item() == pytest.approx(0.3, rel=0.03)
    assert abs(diff.mean().item()) < 0.01


def test_dropout_zeroes_and_rescales():
    x = _z(3, n=400, dim=64)
    p = 0.25
    out = augment(x, "dropout", torch.Generator().manual_seed(0), dropout_p=p)
    dropped = out == 0
    assert dropped.float().mean().item() == pytest.approx(p, abs=0.02)
    torch.testing.assert_close(out[~dropped], x[~dropped] / (1 - p), rtol=1e-6, atol=1e-6)


def test_mixup_rows_are_convex_combinations_with_small_weight():
    x = _z(4, n=50, dim=16)
    mixup_max = 0.2
    out = augment(x, "mixup", torch.Generator().manual_seed(0), mixup_max=mixup_max)
    # Each row is (1 - lam) x_i + lam x_j for some partner j and lam in [0, mixup_max]: solve for lam per partner.
    for i in range(x.shape[0]):
        found = False
        for j in range(x.shape[0]):
            direction = x[j] - x[i]
            if i == j or direction.norm() == 0:
                if torch.allclose(out[i], x[i], atol=1e-6):
                    found = True
                continue
            lam = torch.dot(out[i] - x[i], direction) / direction.dot(direction)
            if -1e-6 <= lam <= mixup_max + 1e-6 and torch.allclose(out[i], x[i] + lam * direction, atol=1e-5):
                found = True
                break
        assert found, f"row {i} is not a small mixup of two input rows"


@pytest.mark.parametrize("bad", ["foo", "Noise", "mixup+dropout"])
def test_unknown_augmentation_lists_valid_names(bad):
    with pytest.raises(ValueError) as info:
        augment(_z(), bad, torch.Generator().manual_seed(0))
    message = str(info.value)
    assert repr(bad) in message
    for name in AUGMENTATIONS:
        assert name in message
