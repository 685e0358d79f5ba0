"""torch.ops.halo.word_victims_rows, cull_scores_rows and run_means_rows against their reference twins
(halo.layer_cull)."""

import pytest
import torch

from halo import layer_cull
from halo.layer_cull import FREE_POSITION, position_order_layers
from halo.cull_ops import cull_scores_layers, operator_available, run_means_layers, select_word_victims_layers

pytestmark = pytest.mark.skipif(not operator_available(), reason="halo._C without the cull operators")


def _rows(seed: int, rows: int, width: int, *, need_max: int = 4, protect: float = 0.1):
    """A cache-like case: each row holds a random subset of 3 * width positions in shuffled slots, words are runs
    of positions (some one-token words plain, unit -1), free slots protected, integer scores with ties."""
    g = torch.Generator().manual_seed(seed)
    span = 3 * width
    starts = torch.rand(span, generator=g) < 0.4
    starts[0] = True
    single = starts & torch.cat([starts[1:], torch.tensor([True])])
    word = torch.where(single & (torch.rand(span, generator=g) < 0.5), -1, torch.cumsum(starts.long(), 0))
    counts = torch.randint(max(1, width // 4), width + 1, (rows,), generator=g)
    positions = torch.full((rows, width), FREE_POSITION, dtype=torch.int64)
    units = torch.full((rows, width), -1, dtype=torch.int64)
    for r in range(rows):
        c = int(counts[r])
        held = torch.sort(torch.randperm(span, generator=g)[:c]).values
        slots = torch.randperm(c, generator=g)
        positions[r, slots], units[r, slots] = held, word[held]
    free = torch.arange(width)[None, :] >= counts[:, None]
    protected = (torch.rand(rows, width, generator=g) < protect) | free
    brightness = torch.randint(0, 8, (rows, width), generator=g).float() * 30
    scores = brightness + torch.randint(0, 3, (rows, width), generator=g).float()
    need = torch.randint(0, need_max + 1, (rows,), generator=g)
    return scores, position_order_layers(positions), brightness, protected, units, need


def _both(case, threshold):
    expected = layer_cull.select_word_victims_layers(*case, threshold)
    got = select_word_victims_layers(*case, threshold)
    return expected, got


@pytest.mark.parametrize("threshold", [None, 45.0])
@pytest.mark.parametrize("seed", range(12))
def test_operator_equals_reference(seed, threshold):
    expected, got = _both(_rows(seed, 5, 40), threshold)
    assert (got is None) == (expected is None)
    if expected is not None:
        assert got.tolist() == expected.tolist()


@pytest.mark.parametrize("rows,width", [(1, 1), (1, 1023), (90, 513), (3, 7)])
def test_odd_shapes(rows, width):
    for seed in range(3):
        expected, got = _both(_rows(seed, rows, width, need_max=max(1, width // 8), protect=0.05), None)
        assert (got is None) == (expected is None)
        if expected is not None:
            assert got.tolist() == expected.tolist()


def test_rows_that_must_cut_protected_units_return_none():
    case = list(_rows(0, 4, 30))
    case[3] = torch.ones_like(case[3])  # everything protected
    case[5] = torch.tensor([0, 1, 0, 0])
    assert select_word_victims_layers(*case, None) is None
    assert layer_cull.select_word_victims_layers(*case, None) is None


def test_float64_and_empty_rows_take_the_reference():
    scores, order, brightness, protected, units, need = _rows(1, 3, 20)
    got = select_word_victims_layers(scores.double(), order, brightness.double(), protected, units, need, None)
    assert got.tolist() == layer_cull.select_word_victims_layers(scores, order, brightness, protected, units, need,
                                                                 None).tolist()
    empty = select_word_victims_layers(scores[:, :0], order[:, :0], brightness[:, :0], protected[:, :0],
                                       units[:, :0], need, None)
    assert empty.shape == (3, 0)


def test_opcheck():
    scores, order, brightness, protected, units, need = _rows(2, 4, 24)
    for threshold in (None, 45.0):
        torch.library.opcheck(torch.ops.halo.word_victims_rows.default,
                              (scores, order, brightness, protected, units, need, threshold))


def test_errors_name_the_argument():
    scores, order, brightness, protected, units, need = _rows(3, 2, 10)
    with pytest.raises(RuntimeError, match="units must be"):
        torch.ops.halo.word_victims_rows(scores, order, brightness, protected, units.int(), need, None)
    with pytest.raises(RuntimeError, match=r"order must be \[2, 10\]"):
        torch.ops.halo.word_victims_rows(scores, order[:, :5], brightness, protected, units, need, None)
    with pytest.raises(RuntimeError, match="need must be"):
        torch.ops.halo.word_victims_rows(scores, order, brightness, protected, units, need[:1], None)
    bad = order.clone()
    bad[0, 0] = 99
    with pytest.raises(RuntimeError, match="outside"):
        torch.ops.halo.word_victims_rows(scores, bad, brightness, protected, units, need, None)


def _score_case(seed: int, rows: int, width: int):
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, width + 1, (rows,), generator=g)
    positions = torch.full((rows, width), FREE_POSITION, dtype=torch.int64)
    for r in range(rows):
        c = int(counts[r])
        positions[r, torch.randperm(c, generator=g)] = torch.sort(torch.randperm(4 * width, generator=g)[:c]).values
    brightness = torch.rand(rows, width, generator=g) * 255
    return brightness, positions, counts


@pytest.mark.parametrize("rows,width", [(1, 1023), (90, 513), (3, 7), (2, 2)])
@pytest.mark.parametrize("dark_bias,radius", [(0.5, 4), (1.25, 1), (0.5, 600)])
def test_scores_equal_reference(rows, width, dark_bias, radius):
    for seed in range(3):
        brightness, positions, counts = _score_case(seed, rows, width)
        order = position_order_layers(positions)
        expected = layer_cull.cull_scores_layers(brightness, positions, counts, dark_bias, radius, order)
        torch.testing.assert_close(cull_scores_layers(brightness, positions, counts, dark_bias, radius, order),
                                   expected, rtol=1e-6, atol=1e-4)
        torch.testing.assert_close(cull_scores_layers(brightness, positions, counts, dark_bias, radius), expected,
                                   rtol=1e-6, atol=1e-4)


def test_scores_without_bias_take_the_reference_and_opcheck():
    brightness, positions, counts = _score_case(4, 3, 20)
    assert torch.equal(cull_scores_layers(brightness, positions, counts, 0.0, 4), brightness)
    order = position_order_layers(positions)
    torch.library.opcheck(torch.ops.halo.cull_scores_rows.default, (brightness, order, counts, 0.5, 4))
    with pytest.raises(RuntimeError, match="counts must be"):
        torch.ops.halo.cull_scores_rows(brightness, order, counts[:1], 0.5, 4)
    with pytest.raises(RuntimeError, match="brightness must be"):
        torch.ops.halo.cull_scores_rows(brightness.double(), order, counts, 0.5, 4)


@pytest.mark.parametrize("threshold", [None, 45.0])
def test_nan_scores_die_last_as_in_the_reference(threshold):
    for seed in range(6):
        case = list(_rows(seed, 4, 30))
        g = torch.Generator().manual_seed(100 + seed)
        case[0] = case[0].masked_fill(torch.rand(case[0].shape, generator=g) < 0.2, float("nan"))
        case[2] = case[2].masked_fill(torch.rand(case[2].shape, generator=g) < 0.1, float("nan"))
        expected, got = _both(case, threshold)
        assert (got is None) == (expected is None)
        if expected is not None:
            assert got.tolist() == expected.tolist()


def _means_case(seed: int, rows: int, width: int):
    """`_rows`' words (runs of positions in shuffled slots, plain tokens -1) with float scores and a pooled mask."""
    scores, order, _, _, units, _ = _rows(seed, rows, width)
    g = torch.Generator().manual_seed(50 + seed)
    scores = scores + torch.rand(scores.shape, generator=g) * 7
    pooled = torch.rand(scores.shape, generator=g) < 0.7
    return scores, order, units, pooled


@pytest.mark.parametrize("rows,width", [(1, 1), (1, 1023), (90, 513), (3, 7), (2, 2)])
def test_run_means_equal_reference_bit_for_bit(rows, width):
    for seed in range(3):
        case = _means_case(seed, rows, width)
        expected = layer_cull.run_means_layers(*case)
        got = run_means_layers(*case)
        assert torch.equal(got, expected)


def test_run_means_opcheck_nan_and_errors():
    scores, order, units, pooled = _means_case(5, 4, 24)
    torch.library.opcheck(torch.ops.halo.run_means_rows.default, (scores, order, units, pooled))
    scores[0, :5] = float("nan")
    torch.testing.assert_close(run_means_layers(scores, order, units, pooled),
                               layer_cull.run_means_layers(scores, order, units, pooled), equal_nan=True)
    with pytest.raises(RuntimeError, match="pooled must be"):
        torch.ops.halo.run_means_rows(scores, order, units, pooled[:1])
    with pytest.raises(RuntimeError, match="units must be"):
        torch.ops.halo.run_means_rows(scores, order, units.int(), pooled)
    bad = order.clone()
    bad[1, 2] = -3
    with pytest.raises(RuntimeError, match="outside"):
        torch.ops.halo.run_means_rows(scores, bad, units, pooled)
    empty = run_means_layers(scores[:, :0], order[:, :0], units[:, :0], pooled[:, :0])
    assert empty.shape == (4, 0)
