import pytest
import torch

from halo.compact import compact_, compaction_moves


@pytest.mark.parametrize("seed", range(20))
def test_compaction_keeps_survivors_exactly(seed):
    g = torch.Generator().manual_seed(seed)
    capacity = 40
    n_valid = int(torch.randint(1, capacity + 1, (1,), generator=g))
    k = int(torch.randint(0, n_valid + 1, (1,), generator=g))
    victims = torch.randperm(n_valid, generator=g)[:k]
    kv = torch.randn(3, 2, 2, capacity, 4, generator=g)
    positions = torch.randperm(1000, generator=g)[:capacity]
    brightness = torch.rand(capacity, generator=g)
    before_ptr = kv.data_ptr()
    survivors = sorted(set(range(n_valid)) - set(victims.tolist()))
    expected = {int(positions[s]): (kv[:, :, :, s].clone(), float(brightness[s])) for s in survivors}
    new_n = compact_(kv, [positions, brightness], victims, n_valid)
    assert new_n == n_valid - k and kv.data_ptr() == before_ptr
    got = {int(positions[s]) for s in range(new_n)}
    assert got == set(expected)
    for slot in range(new_n):
        rows, bright = expected[int(positions[slot])]
        assert torch.equal(kv[:, :, :, slot], rows) and float(brightness[slot]) == bright


def test_moves_are_o_evicted_and_self_copies_for_tail_victims():
    src, dst = compaction_moves(torch.tensor([1, 9, 4]), n_valid=10, capacity=12)
    # keep = 7: holes 1, 4 are filled from tail survivors 7, 8; victim 9 in the tail copies onto itself
    assert sorted(zip(src.tolist(), dst.tolist())) == [(7, 1), (8, 4), (9, 9)]


@pytest.mark.parametrize("layers,heads,capacity", [(2, 3, 17), (1, 1, 9), (3, 2, 33)])
def test_compact_heads_moves_each_head_like_its_own_layer(layers, heads, capacity):
    """Row l * Hkv + h of a per-head memory compacts head h of layer l exactly as compact_layers_ compacts a
    one-layer, one-head buffer holding only that head."""
    from halo.compact import compact_heads_, compact_layers_
    gen = torch.Generator().manual_seed(layers * 100 + heads)
    kv = torch.randn(layers, 2, heads, capacity, 5, generator=gen)
    rows = layers * heads
    counts = torch.randint(capacity // 2, capacity, (rows,), generator=gen)
    field = torch.arange(rows * capacity).reshape(rows, capacity)
    victims = torch.full((rows, 4), -1, dtype=torch.int64)
    for row in range(rows):
        k = int(torch.randint(0, 5, (1,), generator=gen))
        victims[row, :k] = torch.randperm(int(counts[row]), generator=gen)[:k].sort().values
    expected_kv, expected_field = kv.clone(), field.clone()
    expected_counts = []
    for row in range(rows):
        layer, head = divmod(row, heads)
        one = expected_kv[layer, :, head][None, :, None].clone()  # [1, 2, 1, C, D]
        mine = expected_field[row][None].clone()
        expected_counts += compact_layers_(one, [mine], victims[row][None], counts[row][None]).tolist()
        expected_kv[layer, :, head] = one[0, :, 0]
        expected_field[row] = mine[0]
    new_counts = compact_heads_(kv, [field], victims, counts)
    assert new_counts.tolist() == expected_counts
    assert torch.equal(kv, expected_kv) and torch.equal(field, expected_field)
