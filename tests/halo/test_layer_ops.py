"""The per-layer step operations equal the token-level ones applied to each layer on its own."""

import pytest
import torch

from halo.brightness import update_brightness, update_brightness_layers
from halo.compact import compact_, compact_layers_
from halo.cull import cull_scores, select_unit_victims, select_victims
from halo.layer_cull import FREE_POSITION, cull_scores_layers, select_unit_victims_layers, select_victims_layers


def ragged_rows(seed: int, layers: int, width: int):
    """Per-layer rows with their own counts: positions distinct per layer (FREE_POSITION past the count)."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, width + 1, (layers,), generator=g)
    positions = torch.full((layers, width), FREE_POSITION, dtype=torch.int64)
    for layer in range(layers):
        c = int(counts[layer])
        positions[layer, :c] = torch.randperm(3 * width, generator=g)[:c]
    brightness = torch.randint(0, 8, (layers, width), generator=g).float() * 30  # ties on purpose
    units = torch.randint(-1, width // 3 + 1, (layers, width), generator=g)
    units[torch.arange(width)[None, :] >= counts[:, None]] = -1  # free slots belong to no unit
    return g, counts, positions, brightness, units


@pytest.mark.parametrize("layers,width", [(1, 1), (3, 17), (4, 64)])
@pytest.mark.parametrize("seed", range(4))
def test_cull_scores_layers_equals_each_layer_alone(layers, width, seed):
    _, counts, positions, brightness, _ = ragged_rows(seed, layers, width)
    scores = cull_scores_layers(brightness, positions, counts, 0.5, 3)
    for layer in range(layers):
        c = int(counts[layer])
        torch.testing.assert_close(scores[layer, :c], cull_scores(brightness[layer], positions[layer], c, 0.5, 3))


@pytest.mark.parametrize("seed", range(6))
def test_select_victims_layers_equals_each_layer_alone(seed):
    g, _, positions, brightness, _ = ragged_rows(seed, 3, 40)
    counts = torch.full((3,), 40)
    positions = torch.stack([torch.randperm(90, generator=g)[:40] for _ in range(3)])
    protected = torch.rand(3, 40, generator=g) < 0.3
    k = 7
    victims = select_victims_layers(brightness, positions, protected, k)
    assert victims.shape == (3, k)
    for layer in range(3):
        expected = select_victims(brightness[layer], positions[layer], protected[layer], int(counts[layer]), k)
        assert victims[layer].tolist() == expected.tolist()


@pytest.mark.parametrize("threshold", [None, 45.0])
@pytest.mark.parametrize("seed", range(8))
def test_select_unit_victims_layers_equals_each_layer_alone(seed, threshold):
    g, counts, positions, brightness, units = ragged_rows(seed, 4, 30)
    free = torch.arange(30)[None, :] >= counts[:, None]
    protected = (torch.rand(4, 30, generator=g) < 0.2) | free
    scores = brightness + torch.rand(4, 30, generator=g)
    open_slots = (~protected).sum(1)
    need = torch.minimum(torch.randint(0, 8, (4,), generator=g), open_slots)
    victims = select_unit_victims_layers(scores, positions, brightness, protected, units, need, threshold)
    for layer in range(4):
        c = int(counts[layer])
        expected = select_unit_victims(scores[layer, :c], positions[layer], brightness[layer, :c],
                                       protected[layer, :c], units[layer, :c], int(need[layer]), threshold)
        row = victims[layer]
        assert row[row >= 0].tolist() == expected.tolist()
        assert (row[row.numel() - int((row < 0).sum()):] < 0).all()  # padding only at the end


def test_select_unit_victims_layers_names_the_row_that_cannot_cull():
    scores = torch.zeros(2, 4)
    protected = torch.tensor([[False] * 4, [True, True, True, False]])
    with pytest.raises(RuntimeError, match=r"in row 1 \(a layer"):
        select_unit_victims_layers(scores, torch.arange(4).repeat(2, 1), scores, protected,
                                   torch.full((2, 4), -1), torch.tensor([2, 2]), None)


@pytest.mark.parametrize("seed", range(30))
def test_compact_layers_equals_each_layer_alone(seed):
    g = torch.Generator().manual_seed(seed)
    layers, capacity = 3, 21
    counts = torch.randint(5, capacity + 1, (layers,), generator=g)
    kv = torch.randn(layers, 2, 2, capacity, 3, generator=g)
    field = torch.arange(layers * capacity).view(layers, capacity).clone()
    k = int(torch.randint(0, 6, (), generator=g))
    rows = []
    for layer in range(layers):
        own = int(torch.randint(0, min(k, int(counts[layer])) + 1, (), generator=g))
        chosen = torch.randperm(int(counts[layer]), generator=g)[:own]
        rows.append(torch.cat([chosen, torch.full((k - own,), -1)]))
    victims = torch.stack(rows)
    kv_all, field_all = kv.clone(), field.clone()
    new_counts = compact_layers_(kv_all, [field_all], victims, counts)
    for layer in range(layers):
        kv_one, field_one = kv[layer:layer + 1].clone(), field[layer].clone()
        row = victims[layer]
        n = compact_(kv_one, [field_one], row[row >= 0], int(counts[layer]))
        assert n == int(new_counts[layer])
        assert torch.equal(kv_one[0, :, :, :n], kv_all[layer, :, :, :n])
        assert torch.equal(field_one[:n], field_all[layer, :n])


def test_update_brightness_layers_is_the_token_rule_per_layer():
    g = torch.Generator().manual_seed(0)
    layers, width, t_rows = 3, 12, 3
    n_past = torch.tensor([9, 7, 5])
    brightness = torch.rand(layers, width, generator=g) * 255
    mass = torch.rand(layers, width, generator=g) * 4
    decay = torch.rand(layers, width, generator=g)
    out = brightness.clone()
    update_brightness_layers(out, mass, decay, n_past, t_rows, 2.0)
    for layer in range(layers):
        one = brightness[layer].clone()
        n = int(n_past[layer]) + t_rows
        update_brightness(one, mass[layer], decay[layer], int(n_past[layer]), t_rows, 2.0, 1)
        torch.testing.assert_close(out[layer, :n], one[:n])


@pytest.mark.parametrize("threshold", [None, 45.0])
@pytest.mark.parametrize("seed", range(10))
def test_word_victims_equal_unit_victims_when_units_are_runs_of_positions(seed, threshold):
    """In a cache a unit covers a run of positions: the two-sort path must pick exactly what the general one does."""
    from halo.layer_cull import position_order_layers, select_word_victims_layers

    g = torch.Generator().manual_seed(seed)
    layers, width = 4, 40
    counts = torch.randint(10, width + 1, (layers,), generator=g)
    positions = torch.full((layers, width), FREE_POSITION, dtype=torch.int64)
    units = torch.full((layers, width), -1, dtype=torch.int64)
    starts = torch.rand(200, generator=g) < 0.4
    starts[0] = True
    single = starts & torch.cat([starts[1:], torch.tensor([True])])  # one-token words may be plain tokens (-1)
    word_of_position = torch.where(single & (torch.rand(200, generator=g) < 0.5), -1, torch.cumsum(starts.long(), 0))
    for layer in range(layers):
        c = int(counts[layer])
        held = torch.sort(torch.randperm(200, generator=g)[:c]).values
        slots = torch.randperm(c, generator=g)
        positions[layer, slots] = held
        units[layer, slots] = word_of_position[held]
    free = torch.arange(width)[None, :] >= counts[:, None]
    protected = (torch.rand(layers, width, generator=g) < 0.1) | free
    brightness = torch.randint(0, 8, (layers, width), generator=g).float() * 30
    scores = brightness + torch.randint(0, 3, (layers, width), generator=g).float()
    need = torch.randint(0, 4, (layers,), generator=g)
    general = select_unit_victims_layers(scores, positions, brightness, protected, units, need, threshold)
    fast = select_word_victims_layers(scores, position_order_layers(positions), brightness, protected, units, need,
                                      threshold)
    if fast is None:  # only when some layer must cut protected units
        opened = [(~protected[l]).sum() for l in range(layers)]
        assert any(int((general[l] >= 0).sum()) > 0 for l in range(layers)) and opened
        return
    assert fast.tolist() == general.tolist()


@pytest.mark.parametrize("seed", range(6))
def test_run_means_equal_unit_means_when_units_are_runs_of_positions(seed):
    """Pooling a cache's rows by runs in position order gives `unit_means` without its sort."""
    from halo.cull import unit_means
    from halo.layer_cull import position_order_layers, run_means_layers

    g = torch.Generator().manual_seed(seed)
    layers, width = 5, 37
    starts = torch.rand(150, generator=g) < 0.4
    starts[0] = True
    single = starts & torch.cat([starts[1:], torch.tensor([True])])  # one-token words may be plain tokens (-1)
    word = torch.where(single & (torch.rand(150, generator=g) < 0.5), -1, torch.cumsum(starts.long(), 0))
    counts = torch.randint(1, width + 1, (layers,), generator=g)
    positions = torch.full((layers, width), FREE_POSITION, dtype=torch.int64)
    units = torch.full((layers, width), -1, dtype=torch.int64)
    for layer in range(layers):
        c = int(counts[layer])
        held = torch.sort(torch.randperm(150, generator=g)[:c]).values
        slots = torch.randperm(c, generator=g)
        positions[layer, slots], units[layer, slots] = held, word[held]
    scores = torch.rand(layers, width, generator=g) * 300
    pooled = units % 3 != 0  # per unit, as a source is (e.g. lines only)
    expected = unit_means(scores, units, pooled)
    got = run_means_layers(scores, position_order_layers(positions), units, pooled)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
