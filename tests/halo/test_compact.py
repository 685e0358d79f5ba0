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
