"""halo_kernels.brightness_update: the elementwise brightness update equals halo.brightness.update_brightness."""

import pytest
import torch

from halo.brightness import update_brightness as ref_update
from halo_kernels import update_brightness


def _state(capacity, device, seed):
    gen = torch.Generator().manual_seed(seed)
    brightness = (torch.rand(capacity, generator=gen) * 255).to(device)
    mass = (torch.rand(capacity, generator=gen) * 40).to(device)
    decay = (torch.rand(capacity, generator=gen) * 2).to(device)
    return brightness, mass, decay


@pytest.mark.parametrize("n_past,t_rows,capacity", [(0, 1, 1), (6, 1, 7), (0, 33, 40), (1000, 5, 1023), (4064, 33, 4097),
                                                    (3000, 1, 4097)])
@pytest.mark.parametrize("alpha,num_layers", [(1.0, 1), (30.0, 22)])
def test_matches_reference(device, n_past, t_rows, capacity, alpha, num_layers):
    brightness, mass, decay = _state(capacity, device, seed=n_past + t_rows)
    want = brightness.clone()
    ref_update(want, mass, decay, n_past, t_rows, alpha, num_layers)
    update_brightness(brightness, mass, decay, n_past, t_rows, alpha, num_layers)
    torch.testing.assert_close(brightness, want, rtol=1e-6, atol=1e-4)
    # slots beyond the forward are untouched (bit for bit)
    assert torch.equal(brightness[n_past + t_rows:].cpu(), want[n_past + t_rows:].cpu())


def test_clamps_and_tics(device):
    """Large gains saturate at 255, large decays at 0, and new slot s decays T - s tics."""
    n_past, t_rows = 4, 3
    brightness = torch.full((9,), 100.0, device=device)
    mass = torch.tensor([1e6, 0, 0, 0, 0, 0, 0, 0, 0], dtype=torch.float32, device=device)
    decay = torch.tensor([0.0, 1e6, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0], device=device)
    update_brightness(brightness, mass, decay, n_past, t_rows, 1.0, 1)
    expected = torch.tensor([255.0, 0.0, 97.0, 97.0, 97.0, 98.0, 99.0, 100.0, 100.0])
    assert torch.equal(brightness.cpu(), expected)


def test_decay_only_as_long_as_the_forward(device):
    """decay may be exactly n_past + T long (the cache passes decay_table[sources[:n]])."""
    brightness, mass, _ = _state(50, device, seed=1)
    decay = torch.rand(30).to(device)
    want = brightness.clone()
    ref_update(want, mass, decay, 25, 5, 3.0, 2)
    update_brightness(brightness, mass, decay, 25, 5, 3.0, 2)
    torch.testing.assert_close(brightness, want, rtol=1e-6, atol=1e-4)


def test_errors(device):
    b = torch.zeros(10, device=device)
    with pytest.raises(ValueError, match="float32"):
        update_brightness(b.double(), b, b, 2, 3, 1.0, 1)
    with pytest.raises(ValueError, match="at least 12"):
        update_brightness(b, b, b, 9, 3, 1.0, 1)
    with pytest.raises(ValueError, match="num_layers"):
        update_brightness(b, b, b, 2, 3, 1.0, 0)
    with pytest.raises(ValueError, match="contiguous"):
        update_brightness(torch.zeros(20, device=device)[::2], b, b, 2, 3, 1.0, 1)
