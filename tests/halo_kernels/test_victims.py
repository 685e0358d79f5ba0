"""halo_kernels.victims: the same victims in the same order as halo.cull.select_victims."""

import pytest
import torch

from halo.cull import select_victims as ref_select_victims
from halo_kernels import select_victims
from halo_kernels.victims import victim_keys


def _slots(capacity, device, seed, levels=None, duplicate_positions=False):
    gen = torch.Generator().manual_seed(seed)
    if levels is None:
        scores = torch.rand(capacity, generator=gen) * 255
    else:  # few distinct values: many ties
        scores = torch.randint(0, levels, (capacity,), generator=gen).float()
    if duplicate_positions:
        positions = torch.randint(0, max(1, capacity // 3), (capacity,), generator=gen)
    else:
        positions = torch.randperm(3 * capacity + 5, generator=gen)[:capacity]
    protected = torch.rand(capacity, generator=gen) < 0.25
    return scores.to(device), positions.to(device), protected.to(device)


def _check(scores, positions, protected, n_valid, k):
    want = ref_select_victims(scores, positions, protected, n_valid, k)
    got = select_victims(scores, positions, protected, n_valid, k)
    assert got.dtype == torch.int64 and got.shape == (k,) and got.device == scores.device
    assert got.tolist() == want.tolist()
    return got


@pytest.mark.parametrize("n_valid", [1, 7, 1023, 4097])
@pytest.mark.parametrize("levels", [None, 3, 1], ids=["distinct", "ties", "all-equal"])
def test_matches_reference(device, n_valid, levels):
    scores, positions, protected = _slots(n_valid + 9, device, seed=n_valid, levels=levels)
    unprotected = int((~protected[:n_valid]).sum())
    for k in sorted({0, min(1, unprotected), min(5, unprotected), unprotected // 2, unprotected}):
        got = _check(scores, positions, protected, n_valid, k)
        assert not protected[got].any()


def test_all_equal_brightness_is_oldest_first(device):
    scores = torch.full((20,), 7.0, device=device)
    positions = torch.tensor([9, 3, 15, 0, 12, 1, 7, 19, 2, 5, 11, 4, 18, 6, 17, 10, 8, 16, 14, 13], device=device)
    protected = torch.zeros(20, dtype=torch.bool, device=device)
    protected[3] = True  # position 0
    got = select_victims(scores, positions, protected, 20, 4)
    assert positions[got].tolist() == [1, 2, 3, 4]


def test_every_slot_protected(device):
    scores, positions, _ = _slots(64, device, seed=2)
    protected = torch.ones(64, dtype=torch.bool, device=device)
    assert _check(scores, positions, protected, 64, 0).numel() == 0


def test_signed_zero_nan_and_inf_order_like_torch_sort(device):
    scores = torch.tensor([0.0, -0.0, float("nan"), float("-inf"), -1.0, 2.0, float("inf"), -0.0, 3.0, -2.5],
                          device=device)
    positions = torch.tensor([50, 10, 0, 90, 30, 20, 60, 5, 70, 80], device=device)
    protected = torch.zeros(10, dtype=torch.bool, device=device)
    protected[8] = True
    for k in range(0, 10):
        _check(scores, positions, protected, 10, k)


def test_duplicate_positions_break_by_slot(device):
    scores, positions, protected = _slots(300, device, seed=4, levels=2, duplicate_positions=True)
    _check(scores, positions, protected, 290, 100)


def test_longer_buffers_and_large_positions(device):
    """Only the first n_valid slots count; positions up to 2**32 - 1 keep their order."""
    scores, _, protected = _slots(50, device, seed=5, levels=2)
    positions = (torch.randperm(50) * 80_000_000 + 123).to(device)  # up to ~3.9e9
    assert int(positions.max()) < 2 ** 32
    _check(scores, positions, protected, 40, 15)


def test_keys_order_like_score_then_position(device):
    scores = torch.tensor([1.0, 1.0, -3.0, 0.5], device=device)
    positions = torch.tensor([7, 2, 9, 4], device=device)
    keys = victim_keys(scores, positions, torch.zeros(4, dtype=torch.bool, device=device), 4)
    assert torch.argsort(keys).tolist() == [2, 3, 1, 0]


def test_errors(device):
    scores, positions, protected = _slots(10, device, seed=6)
    with pytest.raises(ValueError, match="cannot select"):
        select_victims(scores, positions, protected, 10, 11)
    with pytest.raises(ValueError, match="cannot select"):
        select_victims(scores, positions, protected, 10, -1)
    with pytest.raises(ValueError, match="scores"):
        select_victims(scores.double(), positions, protected, 10, 1)
    with pytest.raises(ValueError, match="positions"):
        select_victims(scores, positions.int(), protected, 10, 1)
    with pytest.raises(ValueError, match="protected"):
        select_victims(scores, positions, protected[:5], 10, 1)


def test_strided_inputs(device):
    """Non-contiguous views (every other slot of longer buffers) are read correctly."""
    scores, positions, protected = _slots(400, device, seed=8, levels=4)
    _check(scores[::2], positions[::2], protected[::2], 190, 40)
