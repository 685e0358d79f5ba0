import pytest
import torch

from halo.brightness import attention_column_mass, rows_seeing, update_brightness


def naive_mass(query, key, scaling, n_past):
    """Row by row, head by head, straight from the definition."""
    hq, t_rows, _ = query.shape
    hkv = key.shape[0]
    group = hq // hkv
    n = n_past + t_rows
    mass = torch.zeros(n, dtype=torch.float64)
    for t in range(t_rows):
        visible = n_past + t + 1
        for h in range(hq):
            logits = (query[h, t].double() @ key[h // group, :visible].double().T) * scaling
            mass[:visible] += torch.softmax(logits, -1) * visible / hq
    return mass


@pytest.mark.parametrize("hq,hkv,t_rows,n_past", [(4, 2, 1, 9), (6, 2, 5, 0), (3, 3, 7, 4), (8, 1, 3, 1)])
def test_column_mass_matches_definition(hq, hkv, t_rows, n_past):
    torch.manual_seed(hq * 100 + t_rows)
    query = torch.randn(hq, t_rows, 16)
    key = torch.randn(hkv, n_past + t_rows + 3, 16)  # 3 free slots must be ignored
    mass = torch.zeros(n_past + t_rows + 3)
    last = torch.zeros_like(mass)
    attention_column_mass(query, key, 0.25, n_past, mass, last)
    expected = naive_mass(query, key, 0.25, n_past)
    torch.testing.assert_close(mass[: n_past + t_rows].double(), expected, rtol=1e-5, atol=1e-5)
    assert mass[n_past + t_rows:].abs().sum() == 0
    last_expected = naive_mass(query[:, -1:], key[:, : n_past + t_rows], 0.25, n_past + t_rows - 1)
    torch.testing.assert_close(last[: n_past + t_rows].double(), last_expected, rtol=1e-5, atol=1e-5)


def test_uniform_attention_reads_one_per_row():
    query = torch.zeros(2, 4, 8)  # zero queries: uniform attention over the visible slots
    key = torch.randn(2, 10, 8)
    mass = torch.zeros(10)
    attention_column_mass(query, key, 1.0, 6, mass)
    # slot j is seen by rows t >= j - 6, and each row gives it exactly 1.0
    torch.testing.assert_close(mass, rows_seeing(6, 4, "cpu"))


def test_column_mass_accumulates_and_rejects_bad_shapes():
    query, key = torch.randn(4, 2, 8), torch.randn(2, 5, 8)
    mass = torch.ones(5)
    attention_column_mass(query, key, 0.3, 3, mass)
    assert mass.sum() > 5
    with pytest.raises(ValueError, match="multiple"):
        attention_column_mass(torch.randn(3, 2, 8), key, 0.3, 3, mass)
    with pytest.raises(ValueError, match="exceeds"):
        attention_column_mass(query, key, 0.3, 4, mass)
    with pytest.raises(ValueError, match="float32"):
        attention_column_mass(query, key, 0.3, 3, torch.zeros(5, dtype=torch.float64))


def test_update_brightness_clamps_and_counts_tics():
    brightness = torch.tensor([250.0, 10.0, 100.0, 100.0, 7.0])
    mass = torch.tensor([20.0, 0.0, 4.0, 2.0, 0.0])  # summed over 2 layers
    decay = torch.tensor([1.0, 5.0, 1.0, 0.0, 9.0])
    update_brightness(brightness, mass, decay, n_past=2, t_rows=2, alpha=1.0, num_layers=2)
    # tics: old slots 2, new slot 0 -> 2, new slot 1 -> 1; slot 4 is free and untouched
    assert brightness.tolist() == [255.0, 0.0, 100.0, 101.0, 7.0]
