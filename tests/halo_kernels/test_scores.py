"""halo_kernels.scores (cull_scores): dark-neighbourhood cull scores equal halo.cull.cull_scores (position order)."""

import pytest
import torch

from halo.cull import cull_scores as ref_cull_scores
from halo.cull import select_victims as ref_select_victims
from halo_kernels import cull_scores, select_victims


@pytest.mark.parametrize("n_valid", [1, 2, 7, 1023, 4097])
@pytest.mark.parametrize("radius,dark_bias", [(0, 0.5), (1, 0.5), (4, 0.5), (4, 0.0), (40, 2.0)])
def test_matches_reference(device, n_valid, radius, dark_bias):
    gen = torch.Generator().manual_seed(n_valid * 7 + radius)
    brightness = (torch.rand(n_valid + 4, generator=gen) * 255).to(device)
    positions = torch.randperm(4 * n_valid + 8, generator=gen)[: n_valid + 4].to(device)
    want = ref_cull_scores(brightness, positions, n_valid, dark_bias, radius)
    got = cull_scores(brightness, positions, n_valid, dark_bias, radius)
    assert got.shape == want.shape == (n_valid,)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-4)


def test_feeds_select_victims(device):
    """The two kernels chained give the reference chain's victims."""
    brightness = torch.randint(0, 4, (500,)).float().to(device)  # ties
    positions = torch.randperm(2000)[:500].to(device)
    protected = (torch.rand(500) < 0.2).to(device)
    want = ref_select_victims(ref_cull_scores(brightness, positions, 480, 0.5, 4), positions, protected, 480, 30)
    got = select_victims(cull_scores(brightness, positions, 480, 0.5, 4), positions, protected, 480, 30)
    assert got.tolist() == want.tolist()


def test_dark_neighbourhood_scores_lower(device):
    """A dim slot among dim neighbours scores below an equally dim slot among bright ones (position order, not slot order)."""
    brightness = torch.tensor([10.0, 200.0, 10.0, 10.0, 200.0, 10.0, 200.0], device=device)
    positions = torch.tensor([3, 0, 4, 5, 1, 6, 2], device=device)  # position order: 200,200,200,10,10,10,10
    scores = cull_scores(brightness, positions, 7, 1.0, 1)
    # slot 0 (pos 3) has neighbours pos 2 (200) and pos 4 (10); slot 2 (pos 4) has pos 3 and pos 5 (both 10)
    assert scores[2] < scores[0]
    torch.testing.assert_close(scores.cpu(), torch.tensor([115.0, 400.0, 20.0, 20.0, 400.0, 20.0, 305.0]))


def test_errors(device):
    b = torch.rand(10, device=device)
    p = torch.arange(10, device=device)
    with pytest.raises(ValueError, match="brightness"):
        cull_scores(b.half(), p, 10, 0.5, 4)
    with pytest.raises(ValueError, match="positions"):
        cull_scores(b, p[:5], 10, 0.5, 4)
    with pytest.raises(ValueError, match="radius"):
        cull_scores(b, p, 10, 0.5, -1)
