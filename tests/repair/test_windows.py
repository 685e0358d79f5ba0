"""The repair-window builder: C++ operator == PyTorch reference == a brute-force oracle, on random layouts."""

import random

import pytest
import torch

from halo.repair import windows as W
from halo.repair.contract import CONTRACT_KEYS, RepairBatch, validate_contract_dicts

HAS_EXT = W.extension_available()
needs_ext = pytest.mark.skipif(not HAS_EXT, reason="halo._C not built (python setup.py build_ext --inplace)")


def oracle(token_ids, positions, brightness, n_valid, targets, window):
    """Plain Python loops, written from the spec, independent of both implementations."""
    order = sorted(range(n_valid), key=lambda s: (int(positions[s]), s))
    rank = {s: r for r, s in enumerate(order)}
    width = min(window, n_valid)
    rows = []
    for t in targets.tolist():
        if not 0 <= t < n_valid:
            rows.append(([0] * width, [0] * width, [0.0] * width, -1, [-1] * width))
            continue
        start = min(max(rank[t] - width // 2, 0), n_valid - width)
        slots = order[start:start + width]
        rows.append(([int(token_ids[s]) for s in slots], [1] * width, [float(brightness[s]) for s in slots],
                     rank[t] - start, [int(positions[s]) for s in slots]))
    k = len(rows)
    return W.WindowBatch(torch.tensor([r[0] for r in rows], dtype=torch.int64).view(k, width),
                         torch.tensor([r[1] for r in rows], dtype=torch.int64).view(k, width),
                         torch.tensor([r[2] for r in rows], dtype=torch.float32).view(k, width),
                         torch.tensor([r[3] for r in rows], dtype=torch.int64).view(k),
                         torch.tensor([r[4] for r in rows], dtype=torch.int64).view(k, width))


def random_layout(rng: random.Random, *, invalid_targets=False):
    """Slot tensors with holes, shuffled slot order, sometimes duplicates / huge or negative spans."""
    capacity = rng.choice([1, 2, 3, 7, 64, 300, 1000, 2500])
    n_valid = rng.randint(0, capacity)
    kind = rng.choice(["dense", "dense", "holes", "sparse", "duplicates", "negative", "sorted"])
    if kind == "duplicates":
        pos = [rng.randint(0, max(1, n_valid // 3)) for _ in range(n_valid)]
    else:
        span = {"dense": n_valid, "holes": 4 * n_valid + 10, "sparse": 10**12, "negative": 10**6,
                "sorted": 3 * n_valid + 5}[kind]
        pos = rng.sample(range(span + 1), n_valid) if span < 10**7 else [rng.randrange(10**12) * 7 for _ in range(n_valid)]
        if kind == "negative":
            pos = [p - 5 * 10**5 for p in pos]
        if kind == "sorted":
            pos.sort()
    positions = torch.tensor(pos + [rng.randint(-9, 9) for _ in range(capacity - n_valid)], dtype=torch.int64)
    token_ids = torch.tensor([rng.randrange(50000) for _ in range(capacity)], dtype=torch.int64)
    brightness = torch.tensor([rng.uniform(0, 255) for _ in range(capacity)], dtype=torch.float32)
    k = rng.choice([0, 1, 2, 5, 17, 64])
    hi = max(n_valid, 1)
    targets = [rng.randrange(hi) for _ in range(k)] if n_valid else []
    if invalid_targets and k:
        targets = [t if rng.random() < 0.7 else rng.choice([-1, n_valid, n_valid + 3, capacity + 5]) for t in targets]
    targets = torch.tensor(targets if n_valid or invalid_targets else [], dtype=torch.int64)
    window = rng.choice([1, 2, 3, 4, 5, 64, 255, 256, 510, 511, rng.randint(1, 511)])
    return token_ids, positions, brightness, n_valid, targets, window


def _equal(a, b):
    for name, x, y in zip(W.WindowBatch._fields, a, b):
        assert x.dtype == y.dtype, name
        assert x.shape == y.shape, (name, x.shape, y.shape)
        assert torch.equal(x, y), name


IMPLS = ["reference", pytest.param("extension", marks=needs_ext)]


@pytest.mark.parametrize("impl", IMPLS)
def test_matches_oracle_on_random_layouts(impl):
    rng = random.Random(1234)
    for _ in range(150):
        args = random_layout(rng)
        _equal(W.build_windows(*args, impl=impl), oracle(*args))


@needs_ext
def test_extension_equals_reference_including_invalid_targets():
    rng = random.Random(99)
    for _ in range(150):
        args = random_layout(rng, invalid_targets=True)
        _equal(torch.ops.halo.build_windows(*args), W.build_windows_reference(*args))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shuffled", [True, False])
def test_large_cache(impl, shuffled):
    g = torch.Generator().manual_seed(0)
    n = 32768
    pos = torch.randperm(3 * n, generator=g)[:n].sort().values
    if shuffled:
        pos = pos[torch.randperm(n, generator=g)]
    ids = torch.randint(0, 32000, (n + 100,), generator=g)
    positions = torch.cat([pos, torch.full((100,), -1)])
    bright = torch.rand(n + 100, generator=g) * 255
    targets = torch.cat([torch.randint(0, n, (60,), generator=g), torch.tensor([0, n - 1]),
                         pos.argsort()[torch.tensor([0, n - 1])]])
    got = W.build_windows(ids, positions, bright, n, targets, 511, impl=impl)
    ref = oracle(ids, positions, bright, n, targets, 511)
    _equal(got, ref)
    assert got.window_ids.shape == (64, 511)
    # The windows at the sequence ends are full and the targets sit at the edges.
    assert got.target_local[-2:].tolist() == [0, 510]
    assert bool((got.window_positions.diff(dim=1) > 0).all())


def test_centred_and_clipped():
    n = 20
    positions = torch.arange(100, 100 + 2 * n, 2)[torch.randperm(n)]
    ids = positions * 10
    bright = positions.float()
    slot_of = {int(p): s for s, p in enumerate(positions.tolist())}
    targets = torch.tensor([slot_of[100], slot_of[120], slot_of[138]])
    b = W.build_windows(ids, positions, bright, n, targets, 5)
    assert b.window_positions.tolist() == [[100, 102, 104, 106, 108], [116, 118, 120, 122, 124],
                                           [130, 132, 134, 136, 138]]
    assert b.target_local.tolist() == [0, 2, 4]
    assert torch.equal(b.window_ids, b.window_positions * 10)
    assert bool(b.attention_mask.all())
    # W = min(window, n_valid)
    assert W.build_windows(ids, positions, bright, 3, targets[:0], 511).window_ids.shape == (0, 3)


def test_validation_errors():
    ids = torch.zeros(10, dtype=torch.int64)
    pos = torch.arange(10)
    br = torch.zeros(10)
    with pytest.raises(ValueError, match="target 1"):
        W.build_windows(ids, pos, br, 5, torch.tensor([0, 7]), 3)
    with pytest.raises(ValueError, match="window"):
        W.build_windows(ids, pos, br, 5, torch.tensor([0]), 512)
    with pytest.raises(ValueError, match="n_valid"):
        W.build_windows(ids, pos, br, 11, torch.tensor([0]), 3)
    with pytest.raises(ValueError, match="float32"):
        W.build_windows(ids, pos, br.double(), 5, torch.tensor([0]), 3)
    # Without validation an invalid target is an all-padding row.
    b = W.build_windows(ids, pos, br, 5, torch.tensor([7]), 3, validate=False)
    assert b.target_local.tolist() == [-1] and b.window_positions.tolist() == [[-1, -1, -1]]


@needs_ext
def test_operator_checks_arguments():
    ids = torch.zeros(10, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="window"):
        torch.ops.halo.build_windows(ids, torch.arange(10), torch.zeros(10), 5, torch.tensor([0]), 0)
    with pytest.raises(RuntimeError, match="same length"):
        torch.ops.halo.build_windows(ids, torch.arange(9), torch.zeros(10), 5, torch.tensor([0]), 3)


@needs_ext
def test_opcheck():
    rng = random.Random(7)
    cases = [random_layout(rng) for _ in range(6)]
    g = torch.Generator().manual_seed(3)
    n = 300
    cases.append((torch.randint(0, 100, (n,), generator=g), torch.randperm(2 * n, generator=g)[:n],
                  torch.rand(n, generator=g), n, torch.randint(0, n, (9,), generator=g), 64))
    for args in cases:
        torch.library.opcheck(torch.ops.halo.build_windows.default, args)


def test_falls_back_to_reference_without_extension(monkeypatch):
    monkeypatch.setattr(W, "extension_available", lambda: False)
    args = random_layout(random.Random(5))
    _equal(W.build_windows(*args), oracle(*args))
    with pytest.raises(RuntimeError, match="not built"):
        W.build_windows(*args, impl="extension")


def test_contract_dicts_round_trip():
    g = torch.Generator().manual_seed(1)
    n = 200
    pos = torch.randperm(1000, generator=g)[:n]
    ids = torch.randint(0, 500, (n,), generator=g)
    br = torch.rand(n, generator=g) * 255
    targets = torch.randint(0, n, (7,), generator=g)
    b = W.build_windows(ids, pos, br, n, targets, 33)
    dicts = W.windows_to_contract_dicts(b)
    assert [sorted(d) for d in dicts] == [sorted(CONTRACT_KEYS)] * 7
    for d, t in zip(dicts, targets.tolist()):
        assert d["global_cull_position"] == int(pos[t]) and d["original_token_id_at_mask"] == int(ids[t])
        assert d["window_token_ids"][d["masked_position_local"]] == ids[t]
    from_dicts = validate_contract_dicts(dicts)
    direct = RepairBatch.from_windows(b)
    for name in RepairBatch.__dataclass_fields__:
        assert torch.equal(getattr(from_dicts, name), getattr(direct, name)), name
    bad = W.build_windows(ids, pos, br, n, torch.tensor([3, n + 1]), 33, validate=False)
    with pytest.raises(ValueError, match="window 1"):
        W.windows_to_contract_dicts(bad)
    with pytest.raises(ValueError, match="window 1"):
        RepairBatch.from_windows(bad)
