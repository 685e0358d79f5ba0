"""halo_kernels.archive_mass and archive_ratio: the fused archive scoring equals its reference (halo.archive_mass)."""

import pytest
import torch

from halo.archive_mass import archive_mass as reference
from halo.archive_mass import archive_ratio as reference_ratio
from halo.archive_mass import retained_rows, row_weights
from halo_kernels import archive_mass, archive_ratio
from halo_kernels.archive_mass import launch

TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float16: dict(rtol=1e-3, atol=1e-3),
       torch.bfloat16: dict(rtol=2e-3, atol=2e-3)}

# (Hq, Hkv, T, A, D, dtype): GQA groups 1/3/8, decode (T = 1) and chunk rows (T = 37: 111 rows per KV head, two
# row blocks), one entry, odd and non-power-of-two archive sizes, head dims 64/96 (masked)/128.
CASES = [
    (1, 1, 1, 1, 64, torch.float32),
    (4, 4, 1, 7, 64, torch.float32),
    (6, 2, 1, 1023, 96, torch.float16),
    (9, 3, 37, 1023, 64, torch.float32),
    (3, 1, 37, 100, 96, torch.float16),
    (4, 4, 37, 300, 96, torch.float32),
    (32, 4, 1, 1000, 128, torch.float16),
    (9, 3, 5, 513, 128, torch.float32),
]


def _inputs(hq, hkv, t, a, d, dtype, device, seed=0, peak=1.0, n_past=20, invalid=0.25):
    """Query rows, archived keys, a valid mask with some holes, and the row lse / weights of a retained cache."""
    gen = torch.Generator().manual_seed(seed)
    query = (torch.randn(hq, t, d, generator=gen) * peak).to(dtype).to(device)
    retained = torch.randn(hkv, n_past + t, d, generator=gen).to(dtype).to(device)
    keys = torch.randn(hkv, a, d, generator=gen).to(dtype).to(device)
    valid = (torch.rand(a, generator=gen) >= invalid).to(device)
    if a > 1:
        valid[0] = True
    scaling = d ** -0.5
    row_lse = retained_rows(query, retained, scaling, n_past)[0]
    weight = row_weights(n_past, t, device)
    return query, keys, valid, scaling, row_lse, weight


def _ids(value):
    return str(value).replace("torch.", "") if isinstance(value, torch.dtype) else None


@pytest.mark.parametrize("hq,hkv,t,a,d,dtype", CASES, ids=_ids)
def test_matches_reference(device, hq, hkv, t, a, d, dtype):
    args = _inputs(hq, hkv, t, a, d, dtype, device)
    got = archive_mass(*args)
    want = reference(*args)
    assert got.dtype == torch.float32 and got.shape == (hq, a) and got.device == want.device
    torch.testing.assert_close(got, want, **TOL[dtype])
    valid = args[2]
    assert torch.all(got[:, ~valid] == 0)
    assert torch.all(got[:, valid] > 0)


@pytest.mark.parametrize("block_a", [16, 32])
def test_small_blocks(device, block_a):
    """Many programs, the last one partly past A."""
    args = _inputs(6, 2, 3, 203, 64, torch.float32, device, seed=block_a, peak=2.0)
    torch.testing.assert_close(launch(*args, block_a=block_a), reference(*args), rtol=1e-4, atol=1e-4)


def test_bfloat16(device):
    """bf16 inputs (under the interpreter they are upcast right after loading)."""
    args = _inputs(8, 2, 5, 777, 64, torch.bfloat16, device, seed=5)
    torch.testing.assert_close(archive_mass(*args), reference(*args), **TOL[torch.bfloat16])


@pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")  # the interpreter's numpy exp2
def test_saturated_logits(device):
    """Large logits push the sigmoid to 0 and 1 without NaN or inf."""
    query, keys, valid, scaling, row_lse, weight = _inputs(4, 2, 3, 150, 64, torch.float32, device, seed=3, peak=30.0)
    keys[:, 7] = query[0, 0] * 4  # an entry far brighter than anything retained
    got = archive_mass(query, keys, valid, scaling, row_lse, weight)
    want = reference(query, keys, valid, scaling, row_lse, weight)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_invalid_entries_are_not_read(device):
    """NaN keys in holes score 0, like the reference; an all-invalid archive scores 0 everywhere."""
    query, keys, valid, scaling, row_lse, weight = _inputs(6, 3, 2, 90, 64, torch.float16, device, seed=4, invalid=0.5)
    keys[:, ~valid] = float("nan")
    got = archive_mass(query, keys, valid, scaling, row_lse, weight)
    want = reference(query, keys, valid, scaling, row_lse, weight)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, **TOL[torch.float16])
    none = torch.zeros_like(valid)
    assert torch.equal(archive_mass(query, keys, none, scaling, row_lse, weight).cpu(), torch.zeros(6, 90))


def test_strided_views(device):
    """query as transformers hands it ([T, Hq, D] transposed), keys a view into a larger archive buffer, strided
    lse, weight and valid."""
    gen = torch.Generator().manual_seed(11)
    hq, hkv, t, d, a, n_past = 12, 4, 5, 64, 70, 30
    query = torch.randn(t, hq, d, generator=gen).to(device).transpose(0, 1)
    store = torch.randn(2, hkv, 2 * a, d, generator=gen).to(device)
    keys = store[1, :, ::2]
    assert not keys.is_contiguous() and not query.is_contiguous()
    retained = torch.randn(hkv, n_past + t, d, generator=gen).to(device)
    row_lse = retained_rows(query, retained, d ** -0.5, n_past)[0].t().contiguous().t()
    weight = row_weights(n_past, 2 * t, device)[::2]
    valid = (torch.rand(2 * a, generator=gen) > 0.3).to(device)[1::2]
    assert row_lse.stride(0) == 1 and weight.stride(0) == 2 and valid.stride(0) == 2
    got = archive_mass(query, keys, valid, d ** -0.5, row_lse, weight)
    torch.testing.assert_close(got, reference(query, keys, valid, d ** -0.5, row_lse, weight), rtol=1e-4, atol=1e-4)


def test_mixed_dtypes(device):
    """fp16 query rows against fp32 archived keys (both upcast to fp32)."""
    query, keys, valid, scaling, row_lse, weight = _inputs(6, 2, 3, 129, 96, torch.float32, device, seed=6)
    query = query.half()
    got = archive_mass(query, keys, valid, scaling, row_lse, weight)
    torch.testing.assert_close(got, reference(query, keys, valid, scaling, row_lse, weight), rtol=1e-4, atol=1e-4)


def test_one_row_unit_lse_reads_sigmoid(device):
    """Orthogonal keys, lse 0, weight 1: each entry's mass at every head is sigmoid(0) = 1 / 2."""
    hq, hkv, d, a = 4, 2, 64, 33
    query = torch.zeros(hq, 1, d, device=device)
    query[:, 0, 0] = 1.0
    keys = torch.zeros(hkv, a, d, device=device)
    keys[:, :, 1] = 1.0
    valid = torch.ones(a, dtype=torch.bool, device=device)
    got = archive_mass(query, keys, valid, 0.125, torch.zeros(hq, 1, device=device), torch.ones(1, device=device))
    torch.testing.assert_close(got.cpu(), torch.full((hq, a), 0.5))


def test_empty(device):
    query, keys, valid, scaling, row_lse, weight = _inputs(4, 2, 1, 5, 64, torch.float32, device)
    got = archive_mass(query, keys[:, :0], valid[:0], scaling, row_lse, weight)
    assert got.shape == (4, 0) and got.dtype == torch.float32
    got = archive_mass(query[:, :0], keys, valid, scaling, row_lse[:, :0], weight[:0])
    assert torch.equal(got.cpu(), torch.zeros(4, 5))
    assert torch.equal(reference(query[:, :0], keys, valid, scaling, row_lse[:, :0], weight[:0]).cpu(),
                       torch.zeros(4, 5))


def test_errors(device):
    query, keys, valid, scaling, row_lse, weight = _inputs(4, 2, 2, 10, 64, torch.float32, device)
    with pytest.raises(ValueError, match="does not fit"):
        archive_mass(query, keys[..., :32], valid, scaling, row_lse, weight)
    with pytest.raises(ValueError, match="does not fit"):
        archive_mass(query, torch.randn(3, 10, 64, device=device), valid, scaling, row_lse, weight)
    with pytest.raises(ValueError, match=r"\[Hq, T, D\]"):
        archive_mass(query[0], keys, valid, scaling, row_lse, weight)
    with pytest.raises(ValueError, match="valid"):
        archive_mass(query, keys, valid.float(), scaling, row_lse, weight)
    with pytest.raises(ValueError, match="valid"):
        archive_mass(query, keys, valid[:9], scaling, row_lse, weight)
    with pytest.raises(ValueError, match="row_lse"):
        archive_mass(query, keys, valid, scaling, row_lse.double(), weight)
    with pytest.raises(ValueError, match="row_lse"):
        archive_mass(query, keys, valid, scaling, row_lse[:, :1], weight)
    with pytest.raises(ValueError, match="row_weight"):
        archive_mass(query, keys, valid, scaling, row_lse, weight[:1])
    with pytest.raises(ValueError, match="fp16/bf16/fp32"):
        archive_mass(query.double(), keys, valid, scaling, row_lse, weight)
    with pytest.raises(ValueError, match="scaling"):
        archive_mass(query, keys, valid, None, row_lse, weight)
    if device == "cuda":
        with pytest.raises(ValueError, match="device"):
            archive_mass(query, keys, valid.cpu(), scaling, row_lse, weight)


def test_no_host_sync(device):
    if device != "cuda":
        pytest.skip("CUDA sync debug mode")
    args = _inputs(8, 2, 3, 500, 64, torch.float16, device)
    archive_mass(*args)  # compile outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        archive_mass(*args)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    """Outside the interpreter, CPU tensors are refused with a clear error (the dispatcher never sends them)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    args = _inputs(2, 1, 1, 5, 64, torch.float32, "cpu")
    with pytest.raises(ValueError, match="CUDA"):
        archive_mass(*args)


@pytest.mark.parametrize("hq,hkv,t,dtype", [(32, 4, 1, torch.float32), (6, 2, 3, torch.float32),
                                             (9, 3, 5, torch.float32), (4, 4, 16, torch.float32),
                                             (1, 1, 1, torch.float32), (32, 4, 1, torch.bfloat16),
                                             (6, 2, 3, torch.float16)], ids=_ids)
def test_grouped_and_per_head_paths_agree(device, hq, hkv, t, dtype):
    """The grouped path (a KV head's query group in one dot) and the per-head path compute the same mass (on CUDA
    the 16-bit cases run both on tensor cores)."""
    args = _inputs(hq, hkv, t, 301, 64, dtype, device, seed=hq + t)
    grouped = launch(*args, grouped=True)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else TOL[dtype]
    torch.testing.assert_close(grouped, launch(*args, grouped=False), **tol)
    torch.testing.assert_close(grouped, reference(*args), **TOL[dtype])


def test_grouped_path_refuses_too_many_rows(device):
    args = _inputs(8, 1, 9, 40, 64, torch.float32, device)  # 8 x 16 padded rows > GROUPED_ROWS
    with pytest.raises(ValueError, match="grouped path"):
        launch(*args, grouped=True)


# the default pooling ("group") on every case; the other two on a grouped and a per-head case (fewer CUDA JITs)
RATIO_CASES = [("group", *case) for case in CASES] + [(heads, *CASES[i]) for heads in ("mean", "each") for i in (3, 6)]


@pytest.mark.parametrize("heads,hq,hkv,t,a,d,dtype", RATIO_CASES, ids=_ids)
def test_ratio_matches_reference(device, heads, hq, hkv, t, a, d, dtype):
    """archive_ratio (mass and head pooling in one launch) equals the reference's mass, scaled and pooled."""
    args = _inputs(hq, hkv, t, a, d, dtype, device, seed=a + t)
    scale = torch.rand(hq, generator=torch.Generator().manual_seed(hq)).add_(0.5).to(device)
    got = archive_ratio(*args, scale, heads)
    want = reference_ratio(*args, scale, heads)
    assert got.dtype == torch.float32 and got.shape == (a,)
    torch.testing.assert_close(got, want, **TOL[dtype])
    assert torch.all(got[~args[2]] == 0)


@pytest.mark.parametrize("heads", ["mean", "group", "each"])
@pytest.mark.parametrize("grouped", [True, False])
def test_ratio_on_both_paths(device, heads, grouped):
    args = _inputs(12, 4, 2, 257, 64, torch.float32, device, seed=7)
    scale = torch.linspace(0.5, 2.0, 12).to(device)
    got = launch(*args, scale, heads, grouped=grouped)
    torch.testing.assert_close(got, reference_ratio(*args, scale, heads), rtol=1e-4, atol=1e-4)


def test_ratio_names_bad_heads_and_scales(device):
    args = _inputs(4, 2, 1, 30, 64, torch.float32, device)
    with pytest.raises(ValueError, match="heads"):
        archive_ratio(*args, torch.ones(4, device=device), "max")
    with pytest.raises(ValueError, match=r"head_scale must be a float32 \[Hq\] = \[4\]"):
        archive_ratio(*args, torch.ones(3, device=device), "group")
    with pytest.raises(ValueError, match="head_scale"):
        archive_ratio(*args, torch.ones(4, dtype=torch.float64, device=device), "group")
