"""halo_kernels.victims_layers: per layer, the same victims in the same order as
halo.layer_cull.select_victims_layers (free slots protected and at FREE_POSITION, ties, signed zeros, NaN)."""

import pytest
import torch

from halo.layer_cull import FREE_POSITION
from halo.layer_cull import select_victims_layers as ref_select
from halo_kernels import select_victims_layers
from halo_kernels.victims_layers import victim_keys_layers


def _rows(layers, n, device, seed, levels=None, counts=None, duplicate_positions=False, guard=0.25):
    """scores, positions, protected [L, n]; slots past counts[l] are free (protected, FREE_POSITION)."""
    gen = torch.Generator().manual_seed(seed)
    if levels is None:
        scores = torch.rand(layers, n, generator=gen) * 255
    else:  # few distinct values: many ties
        scores = torch.randint(0, levels, (layers, n), generator=gen).float()
    if duplicate_positions:
        positions = torch.randint(0, max(1, n // 3), (layers, n), generator=gen)
    else:
        positions = torch.stack([torch.randperm(3 * n + 5, generator=gen)[:n] for _ in range(layers)]) if layers \
            else torch.zeros(0, n, dtype=torch.int64)
    protected = torch.rand(layers, n, generator=gen) < guard
    if counts is not None:
        free = torch.arange(n)[None, :] >= torch.as_tensor(counts)[:, None]
        positions[free] = FREE_POSITION
        protected |= free
    return scores.to(device), positions.to(device), protected.to(device)


def _check(scores, positions, protected, k):
    want = ref_select(scores, positions, protected, k)
    got = select_victims_layers(scores, positions, protected, k)
    assert got.dtype == torch.int64 and got.shape == (scores.shape[0], k) and got.device == scores.device
    assert got.is_contiguous()
    assert got.tolist() == want.tolist()
    return got


def _ks(protected):
    least = int((~protected).sum(1).min())
    return sorted({0, min(1, least), min(5, least), least // 2, least})


@pytest.mark.parametrize("layers,n,counts", [
    (1, 1, None),
    (1, 7, [5]),
    (3, 1023, [1023, 600, 40]),
    (30, 40, None),
    pytest.param(2, 4097, [4097, 3000], marks=pytest.mark.slow_kernel),
])
@pytest.mark.parametrize("levels", [None, 3, 1], ids=["distinct", "ties", "all-equal"])
def test_matches_reference(device, layers, n, counts, levels):
    scores, positions, protected = _rows(layers, n, device, seed=layers * n, levels=levels, counts=counts)
    for k in _ks(protected):
        got = _check(scores, positions, protected, k)
        assert not torch.gather(protected, 1, got).any()


def test_ragged_counts_with_every_layer_culled_to_the_bone(device):
    """k equal to the smallest layer's unprotected slots: that layer loses all of them, free slots never die."""
    scores, positions, protected = _rows(5, 64, device, seed=2, levels=4, counts=[64, 10, 33, 3, 50], guard=0.0)
    protected[:, 0] = True  # a sink per layer
    got = _check(scores, positions, protected, 0)
    got = _check(scores, positions, protected, int((~protected).sum(1).min()))
    assert (torch.gather(positions, 1, got) < FREE_POSITION).all()


def test_all_equal_scores_is_oldest_first(device):
    positions = torch.tensor([[9, 3, 15, 0, 12, 1, 7, 19, 2, 5], [4, 18, 6, 17, 10, 8, 16, 14, 13, 11]], device=device)
    scores = torch.full((2, 10), 7.0, device=device)
    protected = torch.zeros(2, 10, dtype=torch.bool, device=device)
    protected[0, 3] = True  # position 0
    got = select_victims_layers(scores, positions, protected, 4)
    assert torch.gather(positions, 1, got).tolist() == [[1, 2, 3, 5], [4, 6, 8, 10]]


def test_signed_zero_nan_and_inf_order_like_torch_sort(device):
    row = [0.0, -0.0, float("nan"), float("-inf"), -1.0, 2.0, float("inf"), -0.0, 3.0, -2.5]
    scores = torch.tensor([row, row[::-1]], device=device)
    positions = torch.tensor([[50, 10, 0, 90, 30, 20, 60, 5, 70, 80], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]], device=device)
    protected = torch.zeros(2, 10, dtype=torch.bool, device=device)
    protected[0, 8] = True
    for k in range(10):
        _check(scores, positions, protected, k)


def test_unprotected_inf_ties_with_protected_and_free_slots(device):
    """+inf scores tie with protected slots on the key; position decides, and FREE_POSITION still sorts last."""
    scores = torch.tensor([[1.0, float("inf"), 2.0, float("inf"), 5.0, 0.0]], device=device)
    positions = torch.tensor([[3, 9, 4, 1, FREE_POSITION, FREE_POSITION]], device=device)
    protected = torch.tensor([[False, False, True, False, True, True]], device=device)
    for k in range(7):
        _check(scores, positions, protected, k)


def test_duplicate_positions_break_by_slot(device):
    scores, positions, protected = _rows(3, 300, device, seed=4, levels=2, duplicate_positions=True)
    _check(scores, positions, protected, 100)


def test_large_positions(device):
    """Positions up to 2**32 - 2 keep their order (the key keeps 32 bits of position)."""
    scores, _, protected = _rows(2, 50, device, seed=5, levels=2)
    positions = torch.stack([torch.randperm(50) * 87_000_000 + 123, torch.randperm(50) + (2 ** 32 - 60)]).to(device)
    assert int(positions.max()) < 2 ** 32 - 1
    _check(scores, positions, protected, 30)


def test_strided_inputs(device):
    """[L, n] views of [L, C] buffers (the first n columns) and of transposed storage."""
    scores, positions, protected = _rows(3, 400, device, seed=8, levels=4, counts=[400, 350, 390])
    _check(scores[:, :390], positions[:, :390], protected[:, :390], 40)
    _check(scores[:, ::2], positions[:, ::2], protected[:, ::2], 20)
    t_scores, t_positions, t_protected = (t.t().contiguous().t() for t in (scores, positions, protected))
    assert t_scores.stride() == (1, 3)
    _check(t_scores, t_positions, t_protected, 25)


def test_keys_order_like_score_then_position(device):
    scores = torch.tensor([[1.0, 1.0, -3.0, 0.5]], device=device)
    positions = torch.tensor([[7, 2, 9, FREE_POSITION]], device=device)
    keys = victim_keys_layers(scores, positions, torch.zeros(1, 4, dtype=torch.bool, device=device))
    assert torch.argsort(keys[0]).tolist() == [2, 3, 1, 0]
    assert int(keys[0, 3]) & 0xFFFFFFFF == 0xFFFFFFFF  # FREE_POSITION saturates


def test_empty_shapes(device):
    scores, positions, protected = _rows(0, 8, device, seed=1)
    assert select_victims_layers(scores, positions, protected, 3).shape == (0, 3)
    scores, positions, protected = _rows(4, 0, device, seed=1)
    assert _check(scores, positions, protected, 0).shape == (4, 0)


def test_errors(device):
    scores, positions, protected = _rows(2, 10, device, seed=6)
    with pytest.raises(ValueError, match="cannot select"):
        select_victims_layers(scores, positions, protected, 11)
    with pytest.raises(ValueError, match="cannot select"):
        select_victims_layers(scores, positions, protected, -1)
    with pytest.raises(ValueError, match="cannot select"):
        select_victims_layers(scores, positions, protected, 2.0)
    with pytest.raises(ValueError, match="scores"):
        select_victims_layers(scores.double(), positions, protected, 1)
    with pytest.raises(ValueError, match=r"scores must be a float32 \[L, n\]"):
        select_victims_layers(scores[0], positions[0], protected[0], 1)
    with pytest.raises(ValueError, match="positions"):
        select_victims_layers(scores, positions.int(), protected, 1)
    with pytest.raises(ValueError, match="protected"):
        select_victims_layers(scores, positions, protected[:, :5], 1)
    with pytest.raises(ValueError, match="protected"):
        select_victims_layers(scores, positions, protected[:1], 1)
    other = "cpu" if device == "cuda" else "meta"
    with pytest.raises(ValueError, match="device"):
        select_victims_layers(scores, positions.to(other), protected, 1)
