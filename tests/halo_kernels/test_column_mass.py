"""halo_kernels.column_mass: attention column mass (and the fused last-layer update) equal their references."""

import pytest
import torch

from halo.brightness import attention_column_mass as ref_column_mass
from halo.brightness import update_brightness as ref_update
from halo_kernels import attention_column_mass, attention_column_mass_and_update
from halo_kernels.column_mass import _launch

TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float16: dict(rtol=1e-3, atol=1e-3),
       torch.bfloat16: dict(rtol=1e-3, atol=1e-3)}

# (Hq, Hkv, T, n_past, N, D, dtype): GQA ratios 1/3/8, decode and prefill rows, free slots past n_past + T,
# odd sizes; the large N only with few heads (the interpreter runs programs one by one).
CASES = [
    (1, 1, 1, 0, 1, 64, torch.float32),
    (4, 4, 1, 6, 7, 64, torch.float32),
    (6, 2, 1, 3, 7, 128, torch.float16),
    (3, 1, 5, 2, 7, 64, torch.float32),
    (8, 1, 5, 1000, 1023, 64, torch.float32),
    (9, 3, 33, 900, 1023, 128, torch.float32),
    (24, 8, 33, 500, 1023, 64, torch.float16),
    (32, 4, 1, 1022, 1023, 64, torch.float16),
    (32, 4, 5, 1013, 1023, 128, torch.float32),
    (2, 2, 1, 4096, 4097, 64, torch.float32),
    pytest.param(8, 1, 5, 4000, 4097, 64, torch.float16, marks=pytest.mark.slow_kernel),
    pytest.param(3, 1, 33, 4050, 4097, 128, torch.float32, marks=pytest.mark.slow_kernel),
]


def _inputs(hq, hkv, t, n_past, n, d, dtype, device, seed=0, peak=1.0):
    gen = torch.Generator().manual_seed(seed)
    query = (torch.randn(hq, t, d, generator=gen) * peak).to(dtype).to(device)
    key = torch.randn(hkv, n, d, generator=gen).to(dtype).to(device)
    mass = torch.rand(n + 3, generator=gen).to(device)  # accumulated into, and longer than N
    last = torch.rand(n + 3, generator=gen).to(device)
    return query, key, mass, last


def _ids(value):
    return str(value).replace("torch.", "") if isinstance(value, torch.dtype) else None


@pytest.mark.parametrize("hq,hkv,t,n_past,n,d,dtype", CASES, ids=_ids)
def test_matches_reference(device, hq, hkv, t, n_past, n, d, dtype):
    query, key, mass, last = _inputs(hq, hkv, t, n_past, n, d, dtype, device)
    want, want_last = mass.clone(), last.clone()
    ref_column_mass(query, key, d ** -0.5, n_past, want, want_last)
    attention_column_mass(query, key, d ** -0.5, n_past, mass, last)
    torch.testing.assert_close(mass, want, **TOL[dtype])
    torch.testing.assert_close(last, want_last, **TOL[dtype])
    # slots the forward cannot see are untouched
    assert torch.equal(mass[n_past + t:].cpu(), want[n_past + t:].cpu())


@pytest.mark.parametrize("block_n,splits", [(16, 3), (32, 7), (64, 64)])
@pytest.mark.parametrize("t", [1, 5])
def test_split_keys_merge(device, block_n, splits, t):
    """Pass 1 split over key ranges (partial max/sum merged by the merge kernel) gives the same mass."""
    hq, hkv, d, n = 6, 2, 64, 300
    n_past = n - t - 11
    query, key, mass, last = _inputs(hq, hkv, t, n_past, n, d, torch.float32, device, seed=block_n, peak=3.0)
    want, want_last = mass.clone(), last.clone()
    ref_column_mass(query, key, d ** -0.5, n_past, want, want_last)
    _launch(query, key, d ** -0.5, n_past, mass, last, block_n=block_n, splits=splits)
    torch.testing.assert_close(mass, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(last, want_last, rtol=1e-4, atol=1e-4)


def test_without_last_row_and_peaked_logits(device):
    query, key, mass, _ = _inputs(4, 2, 5, 120, 130, 64, torch.float32, device, seed=3, peak=8.0)
    want = mass.clone()
    ref_column_mass(query, key, 0.125, 120, want)
    attention_column_mass(query, key, 0.125, 120, mass)
    torch.testing.assert_close(mass, want, rtol=1e-4, atol=1e-4)


def test_bfloat16(device):
    query, key, mass, last = _inputs(8, 2, 5, 60, 70, 64, torch.bfloat16, device, seed=5)
    want, want_last = mass.clone(), last.clone()
    ref_column_mass(query, key, 0.125, 60, want, want_last)
    attention_column_mass(query, key, 0.125, 60, mass, last)
    torch.testing.assert_close(mass, want, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(last, want_last, rtol=1e-3, atol=1e-3)


def test_strided_views_of_cache_buffers(device):
    """query as transformers hands it ([T, Hq, D] transposed) and key as a view into the [L, 2, Hkv, C, D] buffer."""
    gen = torch.Generator().manual_seed(11)
    hq, hkv, t, d, capacity, n_past = 12, 4, 5, 64, 96, 70
    kv = torch.randn(3, 2, hkv, capacity, d, generator=gen).to(device)
    key = kv[1, 0, :, : n_past + t]
    assert not key.is_contiguous()
    query = torch.randn(t, hq, d, generator=gen).to(device).transpose(0, 1)
    mass = torch.zeros(capacity, device=device)
    want = mass.clone()
    ref_column_mass(query, key, d ** -0.5, n_past, want)
    attention_column_mass(query, key, d ** -0.5, n_past, mass)
    torch.testing.assert_close(mass, want, rtol=1e-4, atol=1e-4)


def test_uniform_attention_reads_one_per_row(device):
    """Identical keys: every visible slot of row t gets 1/n_t, weighted by n_t -> each row adds 1.0 per slot seen."""
    hq, hkv, t, n_past, d = 4, 2, 5, 10, 64
    query = torch.randn(hq, t, d).to(device)
    key = torch.ones(hkv, n_past + t, d, device=device)
    mass = torch.zeros(n_past + t, device=device)
    attention_column_mass(query, key, d ** -0.5, n_past, mass)
    tics = torch.tensor([t] * n_past + [t - s for s in range(t)], dtype=torch.float32)
    torch.testing.assert_close(mass.cpu(), tics, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hq,hkv,t,n_past,n,d,dtype", [
    (4, 2, 1, 40, 45, 64, torch.float32),
    (9, 3, 33, 200, 240, 128, torch.float16),
], ids=_ids)
def test_fused_last_layer_update(device, hq, hkv, t, n_past, n, d, dtype):
    query, key, mass, last = _inputs(hq, hkv, t, n_past, n, d, dtype, device, seed=7)
    gen = torch.Generator().manual_seed(8)
    # brightness near both clamps so the clamp is exercised
    brightness = (torch.rand(n + 3, generator=gen) * 300 - 20).clamp(0, 255).to(device)
    brightness[:5] = 254.9
    decay = (torch.rand(n_past + t, generator=gen) * 3).to(device)
    decay[5:10] = 80.0
    want_mass, want_last, want_b = mass.clone(), last.clone(), brightness.clone()
    ref_column_mass(query, key, d ** -0.5, n_past, want_mass, want_last)
    ref_update(want_b, want_mass, decay, n_past, t, 40.0, 3)
    attention_column_mass_and_update(query, key, d ** -0.5, n_past, mass, brightness, decay, 40.0, 3, last)
    torch.testing.assert_close(mass, want_mass, **TOL[dtype])
    torch.testing.assert_close(last, want_last, **TOL[dtype])
    torch.testing.assert_close(brightness, want_b, rtol=1e-4, atol=5e-3)
    assert float(brightness.min()) >= 0.0 and float(brightness.max()) <= 255.0


def test_zero_rows_is_a_no_op(device):
    query = torch.randn(4, 0, 64, device=device)
    key = torch.randn(2, 10, 64, device=device)
    mass = torch.rand(10, device=device)
    before = mass.clone()
    attention_column_mass(query, key, 0.125, 10, mass)
    assert torch.equal(mass, before)


def test_errors(device):
    q = torch.randn(4, 1, 64, device=device)
    k = torch.randn(2, 10, 64, device=device)
    m = torch.zeros(10, device=device)
    with pytest.raises(ValueError, match="head dim"):
        attention_column_mass(q, torch.randn(2, 10, 32, device=device), 0.1, 3, m)
    with pytest.raises(ValueError, match="multiple"):
        attention_column_mass(q, torch.randn(3, 10, 64, device=device), 0.1, 3, m)
    with pytest.raises(ValueError, match="exceeds"):
        attention_column_mass(q, k, 0.1, 10, m)
    with pytest.raises(ValueError, match="float32"):
        attention_column_mass(q, k, 0.1, 3, torch.zeros(10, dtype=torch.float64, device=device))
    with pytest.raises(ValueError, match="at least"):
        attention_column_mass(q, k, 0.1, 3, torch.zeros(2, device=device))
    with pytest.raises(ValueError, match="dtype"):
        attention_column_mass(q.half(), k, 0.1, 3, m)
    with pytest.raises(ValueError, match=r"\[Hq, T, D\]"):
        attention_column_mass(q[0], k, 0.1, 3, m)
    with pytest.raises(ValueError, match="num_layers"):
        attention_column_mass_and_update(q, k, 0.1, 3, m, torch.zeros(10, device=device), torch.zeros(10, device=device), 1.0, 0)
    if device == "cuda":
        with pytest.raises(ValueError, match="device"):
            attention_column_mass(q, k, 0.1, 3, m.cpu())


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    """Outside the interpreter, CPU tensors are refused with a clear error (the dispatcher never sends them)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, m = torch.randn(2, 1, 64), torch.randn(2, 5, 64), torch.zeros(5)
    with pytest.raises(ValueError, match="CUDA"):
        attention_column_mass(q, k, 0.1, 4, m)
