"""halo_kernels.retained_lse and retained_mass: the rows' logsumexp over the slots they see and the mass each
retained slot drew at each head equal their references (halo.archive_mass), split keys, decode and chunk rows."""

import pytest
import torch

from halo.archive_mass import retained_lse as reference
from halo.archive_mass import retained_rows
from halo_kernels import retained_lse, retained_mass
from halo_kernels.column_mass import row_stats

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-4), torch.float16: dict(rtol=1e-3, atol=2e-3),
       torch.bfloat16: dict(rtol=4e-3, atol=1e-2)}

# (Hq, Hkv, T, n_past, D, dtype): GQA groups 1/3/8, decode and chunk rows (T = 37 over several row blocks), odd
# and non-power-of-two lengths, head dims 64/96 (masked)/128.
CASES = [
    (1, 1, 1, 1, 64, torch.float32),
    (4, 4, 1, 1023, 64, torch.float32),
    (6, 2, 1, 1023, 96, torch.float16),
    (9, 3, 37, 300, 64, torch.float32),
    (3, 1, 5, 0, 96, torch.float16),
    (32, 4, 1, 2047, 64, torch.bfloat16),
    (8, 2, 3, 77, 128, torch.float32),
]


def _inputs(hq, hkv, t, n_past, d, dtype, device, seed=0, peak=3.0):
    gen = torch.Generator().manual_seed(seed)
    query = (torch.randn(hq, t, d, generator=gen) * peak).to(dtype).to(device)
    key = torch.randn(hkv, n_past + t + 3, d, generator=gen).to(dtype).to(device)  # 3 slots past the rows: not read
    return query, key, d ** -0.5, n_past


def _ids(value):
    return str(value).replace("torch.", "") if isinstance(value, torch.dtype) else None


@pytest.mark.parametrize("hq,hkv,t,n_past,d,dtype", CASES, ids=_ids)
def test_matches_reference(device, hq, hkv, t, n_past, d, dtype):
    query, key, scaling, n_past = _inputs(hq, hkv, t, n_past, d, dtype, device)
    key[:, n_past + t:] = float("nan")  # never read
    got = retained_lse(query, key, scaling, n_past)
    want = reference(query.float(), key.float()[:, : n_past + t], scaling, n_past)
    assert got.dtype == torch.float32 and got.shape == (hq, t) and got.device == query.device
    torch.testing.assert_close(got, want, **TOL[dtype])
    torch.testing.assert_close(want, retained_rows(query.float(), key.float(), scaling, n_past)[0])


@pytest.mark.parametrize("block_n,splits", [(16, 3), (32, 7)])
@pytest.mark.parametrize("t", [1, 4])
def test_split_keys_merge(device, block_n, splits, t):
    """Pass 1 split over key ranges and merged gives the same lse (rows in kernel order: kvh, t, head in group)."""
    hq, hkv, n_past, d = 6, 2, 150, 64
    query, key, scaling, n_past = _inputs(hq, hkv, t, n_past, d, torch.float32, device, seed=block_n)
    lse = row_stats(query, key, scaling, n_past, lse=True, block_n=block_n, splits=splits)[1]
    got = lse.view(hkv, t, hq // hkv).transpose(1, 2).reshape(hq, t)
    torch.testing.assert_close(got, reference(query, key, scaling, n_past), **TOL[torch.float32])


def test_strided_query_and_keys(device):
    """Views of a cache buffer: keys [Hkv, N, D] sliced from a wider buffer, the query transposed."""
    gen = torch.Generator().manual_seed(3)
    buffer = torch.randn(2, 2, 4, 200, 64, generator=gen).to(device)  # [layer, k/v, Hkv, N, D]
    key = buffer[1, 0]
    query = torch.randn(1, 8, 64, generator=gen).to(device).transpose(0, 1)  # [8, 1, 64], stride 64 on dim 0
    torch.testing.assert_close(retained_lse(query, key, 0.125, 150), reference(query, key, 0.125, 150),
                               **TOL[torch.float32])


def test_names_bad_input(device):
    query, key = torch.randn(4, 1, 16, device=device), torch.randn(2, 9, 16, device=device)
    with pytest.raises(ValueError, match="retained_lse: n_past"):
        retained_lse(query, key, 0.25, 9)
    with pytest.raises(ValueError, match="retained_lse: query heads"):
        retained_lse(torch.randn(3, 1, 16, device=device), key, 0.25, 4)
    with pytest.raises(ValueError, match="retained_lse: query and key must share one dtype"):
        retained_lse(query.half(), key, 0.25, 4)
    with pytest.raises(ValueError, match="retained_lse: n_past must be an int"):
        retained_lse(query, key, 0.25, 4.0)
    with pytest.raises(ValueError, match="head dim"):
        reference(query, torch.randn(2, 9, 8, device=device), 0.25, 4)


@pytest.mark.parametrize("hq,hkv,t,n_past,d,dtype", [c for c in CASES if c[3] > 0], ids=_ids)
def test_mass_matches_reference(device, hq, hkv, t, n_past, d, dtype):
    """Per-head mass of the retained slots from the rows' lse equals the reference, and its head mean is the
    brightness column mass of those slots."""
    from halo.archive_mass import retained_mass as reference_mass
    from halo.brightness import attention_column_mass

    query, key, scaling, n_past = _inputs(hq, hkv, t, n_past, d, dtype, device, peak=1.0)
    key[:, n_past:] = float("nan")  # the rows' own slots and beyond: not read
    clean = torch.nan_to_num(key.float())
    lse = reference(query.float(), clean, scaling, n_past)
    got = retained_mass(query, key, scaling, n_past, lse)
    want = reference_mass(query.float(), clean, scaling, n_past, lse)
    assert got.dtype == torch.float32 and got.shape == (hq, n_past)
    torch.testing.assert_close(got, want, **TOL[dtype])
    column = torch.zeros(n_past + t)
    attention_column_mass(query.float().cpu(), clean.cpu(), scaling, n_past, column)
    torch.testing.assert_close(want.mean(0).cpu(), column[:n_past], rtol=1e-4, atol=1e-5)


def test_mass_names_bad_row_lse(device):
    query, key = torch.randn(4, 2, 16, device=device), torch.randn(2, 9, 16, device=device)
    with pytest.raises(ValueError, match=r"retained_mass: row_lse must be a float32 \[Hq, T\] = \[4, 2\]"):
        retained_mass(query, key, 0.25, 4, torch.zeros(4, 1, device=device))
    with pytest.raises(ValueError, match="retained_mass: row_lse must be a float32"):
        retained_mass(query, key, 0.25, 4, torch.zeros(4, 2, dtype=torch.float64, device=device))


@pytest.mark.parametrize("heads", ["mean", "group"])
def test_a_recall_scoring_has_no_host_sync(device, heads):
    """RecallArchive.score on CUDA with the kernels (retained_lse, retained_mass, bars, archive_ratio) and the
    brightness column mass: no host sync (issue 14's CUDA path)."""
    if device != "cuda":
        pytest.skip("CUDA sync debug mode")
    from halo.archive import RecallArchive
    from halo.backend import select_backend

    backend = select_backend("triton", torch.device(device))
    gen = torch.Generator().manual_seed(7)
    archive = RecallArchive((1,), 300, 2, 64, torch.bfloat16, torch.device(device))
    serials = torch.arange(250, device=device)
    archive.add(1, torch.randn(2, 250, 64, generator=gen).to(device), {
        "serials": serials, "positions": serials, "token_ids": serials, "sources": torch.zeros_like(serials),
        "units": torch.full_like(serials, -1)})
    query, key, scaling, n_past = _inputs(8, 2, 1, 700, 64, torch.bfloat16, device)
    mass = torch.zeros(n_past + 1, device=device)
    backend.attention_column_mass(query, key, scaling, n_past, mass)
    archive.score(1, query, key, scaling, n_past, heads, backend, mass)  # compile outside the check
    assert archive.take_scores() is not None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        archive.score(1, query, key, scaling, n_past, heads, backend, mass)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    scored = archive.take_scores()
    assert scored["mass"].shape == (250,) and bool(torch.isfinite(scored["mass"]).all())
