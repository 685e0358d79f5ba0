"""halo_kernels.bars: a row quantile by bitwise search equals the reference (halo.archive_mass.bars, which is
torch.quantile clamped) at odd lengths, ties, negatives and rows longer than one register block."""

import pytest
import torch

from halo.archive_mass import bars as reference
from halo_kernels import bars
from halo_kernels.bars import MAX_BLOCK

# (rows, n): one value, two, odd and non-power-of-two lengths, a [Hq, n] block of 32 heads, and a row longer
# than MAX_BLOCK (the chunked path)
SHAPES = [(1, 1), (1, 2), (3, 5), (1, 1023), (32, 2047), (2, MAX_BLOCK + 37)]


@pytest.mark.parametrize("rows,n", SHAPES)
@pytest.mark.parametrize("quantile", [0.75, 0.0, 1.0, 0.5])
def test_matches_reference(device, rows, n, quantile):
    gen = torch.Generator().manual_seed(n + rows)
    values = (torch.rand(rows, n, generator=gen) ** 3).to(device)
    got = bars(values, quantile, 1e-6)
    want = reference(values.cpu(), quantile, 1e-6)
    assert got.shape == (rows,) and got.dtype == torch.float32 and got.device == values.device
    torch.testing.assert_close(got.cpu(), want, rtol=1e-6, atol=0)
    torch.testing.assert_close(want, torch.quantile(values.cpu(), quantile, dim=-1).clamp(min=1e-6))


def test_ties_negatives_strides_and_the_minimum(device):
    values = torch.tensor([[3.0, -1.0, 3.0, 3.0, -0.0, 0.0, 2.0], [5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0]])
    wide = torch.zeros(2, 14)
    wide[:, ::2] = values
    for quantile in (0.0, 0.2, 0.5, 0.75, 0.9, 1.0):
        want = torch.quantile(values, quantile, dim=-1)
        torch.testing.assert_close(bars(wide.to(device)[:, ::2], quantile, -10.0).cpu(), want)
        torch.testing.assert_close(reference(values, quantile, -10.0), want)
    assert float(bars(-torch.ones(5, device=device), 0.75, 1e-6)) == pytest.approx(1e-6)  # 1-D in, 0-d out
    assert bars(torch.rand(2, 3, 9, device=device), 0.75, 0.0).shape == (2, 3)


def test_names_bad_input(device):
    with pytest.raises(ValueError, match="bars: values must be a float32"):
        bars(torch.zeros(3, 4, dtype=torch.float64, device=device), 0.75, 1e-6)
    with pytest.raises(ValueError, match="no entries"):
        bars(torch.zeros(3, 0, device=device), 0.75, 1e-6)
    with pytest.raises(ValueError, match="quantile must lie"):
        bars(torch.zeros(3, 4, device=device), 1.5, 1e-6)
