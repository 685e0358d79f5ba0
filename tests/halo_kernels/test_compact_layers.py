"""halo_kernels.compact_layers: per-layer in-place compaction leaves the buffers of halo.compact.compact_layers_
(same move list as halo.compact.compaction_moves_layers) and keeps every layer's survivors exact."""

import pytest
import torch

from halo.compact import compact_layers_ as ref_compact
from halo.compact import compaction_moves_layers as ref_moves
from halo.layer_cull import FREE_POSITION
from halo.layer_cull import select_victims_layers as ref_select
from halo_kernels import compact_layers_, select_victims_layers
from halo_kernels.compact_layers import compaction_moves_layers


def _cache(layers, kv_heads, capacity, dim, device, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    kv = torch.randn(layers, 2, kv_heads, capacity, dim, generator=gen).to(dtype).to(device)
    positions = torch.stack([torch.randperm(4 * capacity, generator=gen)[:capacity] for _ in range(layers)])
    token_ids = torch.randint(0, 50_000, (layers, capacity), generator=gen)
    brightness = torch.rand(layers, capacity, generator=gen) * 255
    flags = torch.rand(layers, capacity, generator=gen) < 0.5
    return kv, [t.to(device) for t in (positions, token_ids, brightness, flags)]


def _victims(counts, evict, k, seed, where="any"):
    """int64 [L, k]: evict[l] distinct victims below counts[l] per row, the rest -1, shuffled within the row."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.full((len(counts), k), -1, dtype=torch.int64)
    for layer, (count, m) in enumerate(zip(counts, evict)):
        if where == "head":  # every victim below keep: each one is a hole
            pool = torch.randperm(count - m, generator=gen)[:m]
        elif where == "tail":  # every victim in the tail: nothing to fill
            pool = torch.arange(count - m, count)
        else:
            pool = torch.randperm(count, generator=gen)[:m]
        rows[layer, :m] = pool
        rows[layer] = rows[layer][torch.randperm(k, generator=gen)]
    return rows


def _survivors(kv, slots, counts, victims):
    """Per layer: {position: (token id, brightness, flag, K/V rows [2, H, D])} of the slots that stay."""
    kv, slots = kv.cpu(), [t.cpu() for t in slots]
    out = []
    for layer, count in enumerate(counts.tolist()):
        gone = set(victims[layer].tolist())
        out.append({int(slots[0][layer, s]): (int(slots[1][layer, s]), float(slots[2][layer, s]),
                                              bool(slots[3][layer, s]), kv[layer, :, :, s].clone())
                    for s in range(count) if s not in gone})
    return out


def _assert_same_survivors(before, after):
    for want, got in zip(before, after):
        assert want.keys() == got.keys()
        for pos, (tok, bright, flag, rows) in want.items():
            g_tok, g_bright, g_flag, g_rows = got[pos]
            assert (tok, bright, flag) == (g_tok, g_bright, g_flag)
            assert torch.equal(rows.view(torch.uint8), g_rows.view(torch.uint8))


def _run(kv, slots, victims, counts):
    """Compact with the kernel and the reference on copies; both must leave identical buffers."""
    ref_kv, ref_slots = kv.clone(), [t.clone() for t in slots]
    counts_before = counts.clone()
    pointers = [kv.data_ptr()] + [t.data_ptr() for t in slots]
    got = compact_layers_(kv, slots, victims, counts)
    want = ref_compact(ref_kv, ref_slots, victims, counts)
    assert got.dtype == torch.int64 and got.device == counts.device and torch.equal(got, want)
    assert torch.equal(counts, counts_before)  # counts is read, never written
    assert pointers == [kv.data_ptr()] + [t.data_ptr() for t in slots]
    assert torch.equal(kv.view(torch.uint8), ref_kv.view(torch.uint8))  # bit-exact, beyond the counts too
    for mine, theirs in zip(slots, ref_slots):
        assert torch.equal(mine, theirs)
    return got


@pytest.mark.parametrize("layers,kv_heads,capacity,dim,counts,evict,k,where", [
    (1, 2, 8, 64, [1], [1], 1, "any"),
    (1, 1, 8, 16, [5], [0], 1, "any"),  # one all-padding row
    (3, 2, 1023, 64, [1023, 600, 7], [64, 9, 7], 64, "any"),  # a layer losing every slot
    (3, 1, 1023, 32, [1023, 1000, 3], [40, 40, 0], 48, "head"),
    (3, 1, 1023, 32, [1023, 900, 30], [40, 13, 30], 40, "tail"),
    (30, 1, 40, 32, None, None, 6, "any"),  # ragged counts and victims per layer, drawn below
    (2, 1, 6, 8, [6, 2], [2, 1], 9, "any"),  # k wider than the capacity (mostly padding)
])
def test_matches_reference_and_keeps_survivors(device, layers, kv_heads, capacity, dim, counts, evict, k, where):
    if counts is None:
        gen = torch.Generator().manual_seed(layers)
        counts = torch.randint(0, capacity + 1, (layers,), generator=gen).tolist()
        evict = [int(torch.randint(0, min(c, k) + 1, (1,), generator=gen)) for c in counts]
    kv, slots = _cache(layers, kv_heads, capacity, dim, device, seed=capacity + k)
    victims = _victims(counts, evict, k, seed=k, where=where).to(device)
    counts = torch.tensor(counts, device=device)
    before = _survivors(kv, slots, counts, victims)

    new_counts = _run(kv, slots, victims, counts)
    assert new_counts.tolist() == [c - m for c, m in zip(counts.tolist(), evict)]
    _assert_same_survivors(before, _survivors(kv, slots, new_counts, torch.full_like(victims, -1)))
    src, dst = compaction_moves_layers(victims, counts, capacity)
    want_src, want_dst = ref_moves(victims, counts, capacity)
    assert torch.equal(src, want_src) and torch.equal(dst, want_dst)


def test_no_victims(device):
    kv, slots = _cache(3, 1, 16, 8, device, seed=1)
    counts = torch.tensor([16, 4, 0], device=device)
    victims = torch.empty(3, 0, dtype=torch.int64, device=device)
    new_counts = _run(kv, slots, victims, counts)
    assert new_counts.tolist() == [16, 4, 0] and new_counts.data_ptr() != counts.data_ptr()
    src, dst = compaction_moves_layers(victims, counts, 16)
    assert src.shape == dst.shape == (3, 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_rows_move_bit_exact(device, dtype):
    kv, slots = _cache(2, 2, 70, 64, device, seed=3, dtype=dtype)
    kv[0, 0, 0, 65, 0] = float("nan")  # a tail survivor: moved as bits, not as floats
    kv[1, 1, 1, 60, 3] = float("nan")
    victims = torch.tensor([[3, 64, -1, 10, 0, 41], [-1, -1, 59, 2, 7, -1]], device=device)
    _run(kv, slots, victims, torch.tensor([66, 61], device=device))


def test_strided_buffers_and_no_slot_tensors(device):
    """kv with permuted storage, slot tensors of transposed storage and wider than C, and an empty slot list."""
    gen = torch.Generator().manual_seed(9)
    storage = torch.randn(50, 2, 3, 2, 64, generator=gen).to(device)  # [C, 2, Hkv, L, D] in memory
    kv = storage.permute(3, 1, 2, 0, 4)  # [L, 2, Hkv, C, D] view
    victims = torch.tensor([[1, 30, 7, 44], [-1, 0, 20, -1]], device=device)
    counts = torch.tensor([45, 21], device=device)
    assert _run(kv, [], victims, counts).tolist() == [41, 19]
    positions = torch.randperm(100, generator=gen)[:100].reshape(50, 2).to(device).t()  # [2, 50], strides (1, 2)
    wide = torch.rand(2, 57, generator=gen).to(device)  # more columns than C: the extra ones are never touched
    _run(kv, [positions, wide], victims, counts)


def test_no_kv_heads_still_moves_slot_rows(device):
    kv = torch.zeros(2, 2, 0, 12, 8, device=device)
    positions = torch.arange(24, device=device).reshape(2, 12)
    _run(kv, [positions], torch.tensor([[0, 5], [2, -1]], device=device), torch.tensor([12, 4], device=device))


def test_repeated_per_layer_evictions_against_position_oracle(device):
    """Decode with per-layer memory: each layer culls its own dimmest slots (select_victims_layers), every step
    leaves each layer's (position -> row) map exact."""
    layers, kv_heads, capacity, dim, budget = 3, 1, 24, 8, [16, 12, 20]
    gen = torch.Generator().manual_seed(21)
    kv = torch.zeros(layers, 2, kv_heads, capacity, dim, device=device)
    positions = torch.full((layers, capacity), FREE_POSITION, dtype=torch.int64, device=device)
    brightness = torch.zeros(layers, capacity, device=device)
    oracle = [{} for _ in range(layers)]  # per layer: position -> row
    counts = torch.zeros(layers, dtype=torch.int64, device=device)
    for step in range(24):
        row = torch.randn(layers, 2, kv_heads, dim, generator=gen)
        bright = torch.randint(0, 4, (layers,), generator=gen).float()  # ties on purpose
        for layer, count in enumerate(counts.tolist()):
            kv[layer, :, :, count] = row[layer].to(device)
            positions[layer, count] = step
            brightness[layer, count] = bright[layer]
            oracle[layer][step] = row[layer]
        counts += 1
        need = [max(0, c - b) for c, b in zip(counts.tolist(), budget)]
        if max(need) == 0:
            continue
        free = torch.arange(capacity, device=device)[None, :] >= counts[:, None]
        protected = free | (positions >= step - 2)  # recent window
        chosen = select_victims_layers(brightness, positions, protected, max(need))
        assert torch.equal(chosen, ref_select(brightness, positions, protected, max(need)))
        victims = torch.where(torch.arange(max(need), device=device)[None, :] < torch.tensor(need, device=device)[:, None],
                              chosen, -1)
        for layer in range(layers):
            for pos in torch.gather(positions[layer], 0, victims[layer][victims[layer] >= 0]).tolist():
                del oracle[layer][pos]
        counts = _run(kv, [positions, brightness], victims, counts)
        positions[torch.arange(capacity, device=device)[None, :] >= counts[:, None]] = FREE_POSITION
        kv_cpu, pos_cpu = kv.cpu(), positions.cpu()
        for layer, count in enumerate(counts.tolist()):
            assert count == len(oracle[layer]) <= budget[layer]
            for slot in range(count):
                assert torch.equal(kv_cpu[layer, :, :, slot], oracle[layer][int(pos_cpu[layer, slot])])


def test_errors(device):
    kv, slots = _cache(2, 1, 10, 16, device, seed=0)
    victims = torch.tensor([[1, 2], [3, -1]], device=device)
    counts = torch.tensor([8, 9], device=device)
    with pytest.raises(ValueError, match=r"\[L, 2, Hkv, C, D\]"):
        compact_layers_(kv[0], slots, victims, counts)
    with pytest.raises(ValueError, match="victims must be an int64"):
        compact_layers_(kv, slots, victims.int(), counts)
    with pytest.raises(ValueError, match=r"victims must be an int64 \[L, k\] tensor with L = 2"):
        compact_layers_(kv, slots, victims[0], counts)
    with pytest.raises(ValueError, match="L = 2"):
        compact_layers_(kv, slots, victims[:1], counts)
    with pytest.raises(ValueError, match="counts must be an int64"):
        compact_layers_(kv, slots, victims, counts.int())
    with pytest.raises(ValueError, match="counts must be an int64"):
        compact_layers_(kv, slots, victims, counts[:1])
    with pytest.raises(ValueError, match=r"slot_tensors\[1\]"):
        compact_layers_(kv, [slots[0], slots[1][:, :4]], victims, counts)
    with pytest.raises(ValueError, match=r"slot_tensors\[0\]"):
        compact_layers_(kv, [slots[0][0]], victims, counts)
    with pytest.raises(ValueError, match="capacity"):
        compaction_moves_layers(victims, counts, 0)
    other = "cpu" if device == "cuda" else "meta"
    with pytest.raises(ValueError, match="device"):
        compact_layers_(kv, slots, victims, counts.to(other))
    with pytest.raises(ValueError, match="device"):
        compact_layers_(kv, [slots[0].to(other)], victims, counts)
    with pytest.raises(ValueError, match="device"):
        compaction_moves_layers(victims, counts.to(other), 10)
