"""halo_kernels.brightness_layers: the per-layer brightness update equals halo.brightness.update_brightness_layers
bit for bit (same fp32 operations in the same order, no FMA contraction)."""

import pytest
import torch

from halo.brightness import update_brightness_layers as ref_update
from halo_kernels import update_brightness_layers


def _state(layers, capacity, device, seed):
    gen = torch.Generator().manual_seed(seed)
    brightness = (torch.rand(layers, capacity, generator=gen) * 255).to(device)
    mass = (torch.rand(layers, capacity, generator=gen) * 40).to(device)
    decay = (torch.rand(layers, capacity, generator=gen) * 2).to(device)
    return brightness, mass, decay


def _n_past(layers, n, t_rows, seed, device):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, max(1, n - t_rows + 1), (layers,), generator=gen).to(device)


def _assert_twin(brightness, mass, decay, n_past, t_rows, alpha):
    want = brightness.clone()
    ref_update(want, mass, decay, n_past, t_rows, alpha)
    update_brightness_layers(brightness, mass, decay, n_past, t_rows, alpha)
    assert torch.equal(brightness.cpu(), want.cpu())


@pytest.mark.parametrize("layers,n,t_rows", [(1, 1, 1), (1, 7, 0), (3, 1023, 7), (30, 40, 1), (2, 2049, 33)])
@pytest.mark.parametrize("alpha", [1.0, 30.0, 0.1])
def test_matches_reference(device, layers, n, t_rows, alpha):
    brightness, mass, decay = _state(layers, n, device, seed=layers * n + t_rows)
    _assert_twin(brightness, mass, decay, _n_past(layers, n, t_rows, seed=n, device=device), t_rows, alpha)


def test_ragged_layers_on_views_of_longer_buffers(device):
    """n_past differs per layer (0, mid, full); the [L, n] views of [L, C] buffers leave columns >= n untouched."""
    layers, capacity, n, t_rows = 3, 1100, 1023, 5
    brightness, mass, decay = _state(layers, capacity, device, seed=3)
    n_past = torch.tensor([0, 511, n - t_rows], device=device)
    tail = brightness[:, n:].clone()
    _assert_twin(brightness[:, :n], mass[:, :n], decay[:, :n], n_past, t_rows, 30.0)
    assert torch.equal(brightness[:, n:], tail)


def test_transposed_storage(device):
    """Row and column strides other than (n, 1): [L, n] views of [n, L] storage."""
    brightness, mass, decay = (t.t() for t in _state(40, 3, device, seed=5))  # [3, 40], strides (1, 3)
    _assert_twin(brightness, mass, decay, torch.tensor([10, 0, 35], device=device), 5, 2.5)


def test_clamps_tics_and_slots_past_a_layer(device):
    """Saturation at 255 and 0, new slot s decays T - s tics, slots past a layer's n_past + T decay 0 tics."""
    brightness = torch.full((2, 9), 100.0, device=device)
    mass = torch.zeros(2, 9, device=device)
    mass[0, 0] = 1e6
    mass[1, 8] = 2.0  # past layer 1's slots: still gains alpha * mass, as in the reference
    decay = torch.ones(2, 9, device=device)
    decay[0, 1] = 1e6
    n_past = torch.tensor([4, 1], device=device)
    update_brightness_layers(brightness, mass, decay, n_past, 3, 1.0)
    expected = torch.tensor([[255.0, 0.0, 97.0, 97.0, 97.0, 98.0, 99.0, 100.0, 100.0],
                             [97.0, 97.0, 98.0, 99.0, 100.0, 100.0, 100.0, 100.0, 102.0]])
    assert torch.equal(brightness.cpu(), expected)


def test_nan_propagates_like_torch_clamp(device):
    brightness, mass, decay = _state(2, 16, device, seed=7)
    mass[0, 3] = float("nan")
    decay[1, 5] = float("inf")
    want = brightness.clone()
    ref_update(want, mass, decay, torch.tensor([4, 10], device=device), 2, 1.0)
    update_brightness_layers(brightness, mass, decay, torch.tensor([4, 10], device=device), 2, 1.0)
    assert torch.equal(brightness.isnan(), want.isnan()) and bool(brightness[0, 3].isnan())
    assert torch.equal(brightness.nan_to_num(-1.0), want.nan_to_num(-1.0))


def test_empty_shapes(device):
    for layers, n in ((0, 5), (3, 0)):
        brightness, mass, decay = _state(layers, n, device, seed=1)
        update_brightness_layers(brightness, mass, decay, torch.zeros(layers, dtype=torch.int64, device=device), 1, 1.0)


def test_errors(device):
    b = torch.zeros(2, 10, device=device)
    n_past = torch.tensor([2, 3], device=device)
    with pytest.raises(ValueError, match="brightness must be a float32"):
        update_brightness_layers(b.double(), b, b, n_past, 3, 1.0)
    with pytest.raises(ValueError, match=r"brightness must be a float32 \[L, n\]"):
        update_brightness_layers(b[0], b[0], b[0], n_past, 3, 1.0)
    with pytest.raises(ValueError, match="mass must be a float32"):
        update_brightness_layers(b, b[:, :5], b, n_past, 3, 1.0)
    with pytest.raises(ValueError, match="decay must be a float32"):
        update_brightness_layers(b, b, b.half(), n_past, 3, 1.0)
    with pytest.raises(ValueError, match="n_past must be an int64"):
        update_brightness_layers(b, b, b, n_past.int(), 3, 1.0)
    with pytest.raises(ValueError, match="n_past must be an int64"):
        update_brightness_layers(b, b, b, n_past[:1], 3, 1.0)
    with pytest.raises(ValueError, match="t_rows"):
        update_brightness_layers(b, b, b, n_past, -1, 1.0)
    with pytest.raises(ValueError, match="alpha"):
        update_brightness_layers(b, b, b, n_past, 1, None)
    if device == "cuda":
        with pytest.raises(ValueError, match="device"):
            update_brightness_layers(b, b, b, n_past.cpu(), 3, 1.0)
    else:
        with pytest.raises(ValueError, match="device"):
            update_brightness_layers(b, b, b.to("meta"), n_past, 3, 1.0)
