"""halo_kernels.compact: in-place compaction equals halo.compact.compact_ and keeps survivors exact.

(Named test_compact_kernel.py, not test_compact.py, so it never collides with the reference's test module:
tests/ has no __init__.py files, and pytest's default import mode needs unique basenames.)
"""

import pytest
import torch

from halo.compact import compact_ as ref_compact
from halo.cull import select_victims as ref_select_victims
from halo_kernels import compact_, select_victims


def _cache(layers, kv_heads, capacity, dim, device, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    kv = torch.randn(layers, 2, kv_heads, capacity, dim, generator=gen).to(dtype).to(device)
    positions = torch.randperm(4 * capacity, generator=gen)[:capacity].to(device)
    token_ids = torch.randint(0, 50_000, (capacity,), generator=gen).to(device)
    brightness = (torch.rand(capacity, generator=gen) * 255).to(device)
    flags = (torch.rand(capacity, generator=gen) < 0.5).to(device)
    return kv, [positions, token_ids, brightness, flags]


def _survivor_rows(kv, slots, n_valid, exclude=()):
    """Retained slots as position-sorted tensors: (positions, token ids, brightness, flags, K/V rows [L, 2, H, n, D])."""
    keep = torch.tensor([s for s in range(n_valid) if s not in set(exclude)], dtype=torch.int64)
    positions, token_ids, brightness, flags = (t.cpu()[keep] for t in slots)
    order = torch.sort(positions).indices
    assert positions.unique().numel() == positions.numel()
    rows = kv.cpu()[:, :, :, keep][:, :, :, order]
    return positions[order], token_ids[order], brightness[order], flags[order], rows


def _assert_same_survivors(before, after):
    for want, got in zip(before, after):
        if want.dtype == torch.bfloat16:
            want, got = want.view(torch.int16), got.view(torch.int16)
        assert torch.equal(want, got)


def _victims(n_valid, k, seed, where="any"):
    gen = torch.Generator().manual_seed(seed)
    if where == "head":
        pool = torch.randperm(n_valid - k, generator=gen)[:k]  # all victims below keep: every one is a hole
    elif where == "tail":
        pool = torch.arange(n_valid - k, n_valid)[torch.randperm(k, generator=gen)]  # nothing to fill
    else:
        pool = torch.randperm(n_valid, generator=gen)[:k]
    return pool


@pytest.mark.parametrize("layers,kv_heads,capacity,n_valid,dim,k,where", [
    (2, 2, 8, 1, 64, 1, "any"),
    (2, 2, 9, 7, 64, 3, "any"),
    (1, 4, 40, 33, 128, 0, "any"),
    (3, 1, 40, 33, 64, 33, "any"),
    (2, 3, 1100, 1023, 64, 64, "any"),
    (2, 3, 1100, 1023, 64, 64, "head"),
    (2, 3, 1100, 1023, 64, 64, "tail"),
    (1, 2, 4097, 4097, 128, 700, "any"),
    pytest.param(2, 1, 4100, 4097, 64, 2048, "any", marks=pytest.mark.slow_kernel),
])
def test_matches_reference_and_keeps_survivors(device, layers, kv_heads, capacity, n_valid, dim, k, where):
    kv, slots = _cache(layers, kv_heads, capacity, dim, device, seed=n_valid + k)
    victims = _victims(n_valid, k, seed=k, where=where).to(device)
    ref_kv, ref_slots = kv.clone(), [t.clone() for t in slots]
    before = _survivor_rows(kv, slots, n_valid, exclude=set(victims.tolist()))
    evicted_positions = set(slots[0][victims].tolist())
    pointers = [kv.data_ptr()] + [t.data_ptr() for t in slots]

    new_n = compact_(kv, slots, victims, n_valid)
    assert new_n == ref_compact(ref_kv, ref_slots, victims, n_valid) == n_valid - k
    assert pointers == [kv.data_ptr()] + [t.data_ptr() for t in slots]
    # identical buffers to the reference (same move list), including everything beyond n_valid - k
    assert torch.equal(kv, ref_kv)
    for got, want in zip(slots, ref_slots):
        assert torch.equal(got, want)
    # survivors exact: same multiset of (position, token, brightness, flag, K rows, V rows)
    after = _survivor_rows(kv, slots, new_n)
    _assert_same_survivors(before, after)
    assert evicted_positions.isdisjoint(after[0].tolist())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_rows_move_bit_exact(device, dtype):
    kv, slots = _cache(2, 2, 70, 64, device, seed=3, dtype=dtype)
    kv[0, 0, 0, 5, 0] = float("nan")  # moved as bits, not as floats
    victims = torch.tensor([3, 64, 10, 0, 41], device=device)
    ref_kv, ref_slots = kv.clone(), [t.clone() for t in slots]
    compact_(kv, slots, victims, 66)
    ref_compact(ref_kv, ref_slots, victims, 66)
    assert torch.equal(kv.view(torch.int16), ref_kv.view(torch.int16))


def test_strided_buffers_and_no_slot_tensors(device):
    """A kv view with non-standard strides (permuted storage) and an empty metadata list."""
    gen = torch.Generator().manual_seed(9)
    storage = torch.randn(50, 2, 3, 2, 64, generator=gen).to(device)  # [C, 2, Hkv, L, D] in memory
    kv = storage.permute(3, 1, 2, 0, 4)  # [L, 2, Hkv, C, D] view
    ref_kv = kv.clone()
    victims = torch.tensor([1, 30, 7, 44], device=device)
    assert compact_(kv, [], victims, 45) == 41
    ref_compact(ref_kv, [], victims, 45)
    assert torch.equal(kv, ref_kv)


def test_repeated_evictions_against_position_oracle(device):
    """Decode-time eviction over many steps: after each step the retained (position -> row) map is exact."""
    layers, kv_heads, capacity, dim, budget = 2, 2, 64, 64, 48
    gen = torch.Generator().manual_seed(21)
    kv = torch.zeros(layers, 2, kv_heads, capacity, dim, device=device)
    positions = torch.zeros(capacity, dtype=torch.int64, device=device)
    brightness = torch.zeros(capacity, device=device)
    oracle = {}  # position -> (row vector, brightness)
    n_valid, next_pos = 0, 0
    for step in range(120):
        t_rows = 3 if step % 10 == 0 else 1
        rows = torch.randn(t_rows, layers, 2, kv_heads, dim, generator=gen)
        bright = torch.randint(0, 6, (t_rows,), generator=gen).float()  # ties on purpose
        for r in range(t_rows):
            kv[:, :, :, n_valid] = rows[r].to(device)
            positions[n_valid] = next_pos
            brightness[n_valid] = bright[r]
            oracle[next_pos] = (rows[r], float(bright[r]))
            n_valid, next_pos = n_valid + 1, next_pos + 1
        need = n_valid - budget
        if need > 0:
            protected = positions[:n_valid] >= next_pos - 4  # recent window
            victims = select_victims(brightness, positions, protected, n_valid, need)
            assert victims.tolist() == ref_select_victims(brightness, positions, protected, n_valid, need).tolist()
            for pos in positions[victims].tolist():
                del oracle[pos]
            n_valid = compact_(kv, [positions, brightness], victims, n_valid)
        assert n_valid == len(oracle) <= budget
        kept = positions[:n_valid].cpu().tolist()
        assert sorted(kept) == sorted(oracle)
        kv_cpu, bright_cpu = kv.cpu(), brightness.cpu()
        for slot, pos in enumerate(kept):
            row, b = oracle[pos]
            assert torch.equal(kv_cpu[:, :, :, slot], row) and float(bright_cpu[slot]) == b


def test_errors(device):
    kv, slots = _cache(1, 1, 10, 64, device, seed=0)
    victims = torch.tensor([1, 2], device=device)
    with pytest.raises(ValueError, match=r"\[L, 2, Hkv, C, D\]"):
        compact_(kv[0], slots, victims, 8)
    with pytest.raises(ValueError, match="int64"):
        compact_(kv, slots, victims.int(), 8)
    with pytest.raises(ValueError, match="n_valid"):
        compact_(kv, slots, victims, 11)
    with pytest.raises(ValueError, match="victims among"):
        compact_(kv, slots, torch.arange(3, device=device), 2)
    with pytest.raises(ValueError, match=r"slot_tensors\[1\]"):
        compact_(kv, [slots[0], slots[1][:4]], victims, 8)
    if device == "cuda":
        with pytest.raises(ValueError, match="device"):
            compact_(kv, [slots[0].cpu()], victims, 8)
