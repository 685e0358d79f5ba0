"""halo.archive (the rings of evicted keys) and halo.archive_mass (how the archive is scored)."""

import pytest
import torch

from halo.archive import RecallArchive
from halo.archive_mass import archive_mass, pool_heads, ratio_scales, retained_rows, row_weights


def _archive(capacity=5, layers=(1, 3)):
    return RecallArchive(layers, capacity, num_kv_heads=2, head_dim=4, dtype=torch.float32, device=torch.device("cpu"))


def _values(serials):
    s = torch.tensor(serials, dtype=torch.int64)
    return {"serials": s, "positions": s + 100, "token_ids": s + 7, "sources": torch.zeros_like(s),
            "units": torch.full_like(s, -1)}


def test_a_ring_keeps_the_newest_entries_when_full():
    archive = _archive(capacity=5)
    for first in (0, 3, 6):
        archive.add(1, torch.randn(2, 3, 4), _values(range(first, first + 3)))
    assert sorted(archive.fields["serials"][0].tolist()) == [4, 5, 6, 7, 8]
    assert archive.fields["serials"][1].tolist() == [-1] * 5  # the other ring untouched
    assert len(archive) == 5


def test_keys_are_stored_in_half_precision_and_the_cost_is_reported():
    archive = _archive()
    keys = torch.randn(2, 2, 4)
    archive.add(3, keys, _values([0, 1]))
    assert archive.keys.dtype == torch.float16
    assert torch.equal(archive.keys[1, :, :2], keys.half())
    assert archive.bytes_per_token == 2 * (2 * 4 * 2 + 8 * 5 + 4 + 4)  # keys, fields, usual score and count


def test_drop_forgets_recalled_serials_in_every_ring():
    archive = _archive()
    archive.add(1, torch.randn(2, 3, 4), _values([0, 1, 2]))
    archive.add(3, torch.randn(2, 2, 4), _values([1, 2]))
    archive.drop(torch.tensor([1]))
    assert 1 not in archive.fields["serials"].flatten().tolist() and len(archive) == 3


def test_state_round_trips_and_corruption_is_refused_without_change():
    archive = _archive()
    archive.add(1, torch.randn(2, 3, 4), _values([0, 1, 2]))
    state = archive.state_dict()
    other = _archive()
    other.load_state_dict(state, next_serial=3, seen=103)
    assert torch.equal(other.keys, archive.keys) and other.fields["serials"].tolist() == archive.fields["serials"].tolist()
    bad_keys = dict(state, keys=state["keys"].clone())
    bad_keys["keys"][0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        other.load_state_dict(bad_keys, next_serial=3, seen=103)
    with pytest.raises(ValueError, match="never fed"):
        other.load_state_dict(state, next_serial=2, seen=103)
    with pytest.raises(ValueError, match="ring counters"):
        other.load_state_dict(dict(state, filled=[1, 0]), next_serial=3, seen=103)
    with pytest.raises(ValueError, match="retrieval layers"):
        _archive(layers=(0, 3)).load_state_dict(state, next_serial=3, seen=103)
    assert other.fields["serials"].tolist() == archive.fields["serials"].tolist()  # unchanged by the refusals


@pytest.mark.parametrize("hq,hkv,t_rows,n_past", [(4, 2, 1, 9), (6, 2, 5, 7), (3, 3, 3, 1)])
def test_archive_mass_is_the_probability_each_key_would_get_if_put_back_alone(hq, hkv, t_rows, n_past):
    torch.manual_seed(0)
    d, entries, scaling = 8, 6, 8 ** -0.5
    query, key = torch.randn(hq, t_rows, d), torch.randn(hkv, n_past + t_rows, d)
    archived = torch.randn(hkv, entries, d)
    valid = torch.tensor([True, True, False, True, True, True])
    got = archive_mass(query, archived, valid, scaling, retained_rows(query, key, scaling, n_past)[0],
                       row_weights(n_past, t_rows, "cpu"))
    group = hq // hkv
    want = torch.zeros(hq, entries)
    for a in range(entries):
        for t in range(t_rows):
            seen = n_past + t + 1  # row t sees the retained slots and the new rows up to itself
            for h in range(hq):
                keys = torch.cat([key[h // group, :seen], archived[h // group, a:a + 1]])
                p = torch.softmax(keys @ query[h, t] * scaling, 0)[-1]
                want[h, a] += seen * p
    want[:, ~valid] = 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_archive_mass_does_not_depend_on_the_archive_size():
    torch.manual_seed(1)
    query, key, archived = torch.randn(4, 2, 8), torch.randn(2, 10, 8), torch.randn(2, 50, 8)
    lse, weight = retained_rows(query, key, 0.3, 8)[0], row_weights(8, 2, "cpu")
    whole = archive_mass(query, archived, torch.ones(50, dtype=torch.bool), 0.3, lse, weight)
    part = archive_mass(query, archived[:, :7], torch.ones(7, dtype=torch.bool), 0.3, lse, weight)
    torch.testing.assert_close(whole[:, :7], part)


def test_archive_mass_names_a_shape_mismatch():
    with pytest.raises(ValueError, match="does not fit"):
        archive_mass(torch.randn(3, 1, 8), torch.randn(2, 4, 8), torch.ones(4, dtype=torch.bool), 1.0,
                     torch.zeros(3, 1), torch.ones(1))


@pytest.mark.parametrize("hq,hkv,t_rows,n_past", [(4, 2, 1, 9), (6, 3, 5, 7)])
def test_retained_mass_per_head_is_brightness_column_mass_before_the_head_mean(hq, hkv, t_rows, n_past):
    from halo.brightness import attention_column_mass

    torch.manual_seed(2)
    query, key = torch.randn(hq, t_rows, 8), torch.randn(hkv, n_past + t_rows, 8)
    _, retained = retained_rows(query, key, 0.4, n_past)
    column = torch.zeros(n_past + t_rows)
    attention_column_mass(query, key, 0.4, n_past, column)
    assert retained.shape == (hq, n_past)
    torch.testing.assert_close(retained.mean(0), column[:n_past], rtol=1e-5, atol=1e-6)


def pooled_ratio(head_mass, retained, heads, num_kv_heads):
    """Each archived token's mass over the bar as recall reads it (`archive_ratio` without the floor)."""
    return pool_heads(head_mass * ratio_scales(retained, heads)[:, None], heads, num_kv_heads)


def test_pooled_ratio_reads_a_head_the_mean_drowns():
    """One head of four looks hard at entry 0: the head mean dilutes it, reading heads apart does not."""
    retained = torch.ones(4, 10)  # every head's bar is 1
    head_mass = torch.full((4, 3), 0.5)
    head_mass[2, 0] = 8.0
    torch.testing.assert_close(pooled_ratio(head_mass, retained, "mean", 2), torch.tensor([(8.0 + 1.5) / 4, 0.5, 0.5]))
    torch.testing.assert_close(pooled_ratio(head_mass, retained, "each", 2), torch.tensor([8.0, 0.5, 0.5]))
    torch.testing.assert_close(pooled_ratio(head_mass, retained, "group", 2), torch.tensor([4.25, 0.5, 0.5]))


def test_pooled_ratio_reads_each_head_against_its_own_bar():
    retained = torch.stack([torch.full((8,), 4.0), torch.full((8,), 0.5)])  # head 0 spreads mass, head 1 not
    head_mass = torch.tensor([[4.0], [1.5]])
    torch.testing.assert_close(pooled_ratio(head_mass, retained, "each", 1), torch.tensor([3.0]))  # head 1
    torch.testing.assert_close(pooled_ratio(head_mass, retained, "group", 1), torch.tensor([(1.0 + 3.0) / 2]))
    torch.testing.assert_close(pooled_ratio(head_mass, retained, "mean", 1), torch.tensor([2.75 / 2.25]))
    with pytest.raises(ValueError, match="KV heads"):
        pooled_ratio(head_mass, retained, "group", 3)
    with pytest.raises(ValueError, match="heads must be"):
        pooled_ratio(head_mass, retained, "max", 1)


def test_take_scores_with_a_bar_hands_out_nothing_unless_some_entry_reaches_it():
    """With a threshold, take_scores returns every held entry once some entry outside `skip` reaches the bar, and
    None (the scores dropped) otherwise."""
    from halo.backend import REFERENCE

    def scored():
        gen = torch.Generator().manual_seed(0)
        archive = _archive(capacity=4, layers=(1,))
        values = _values([0, 1, 2])
        values["sources"] = torch.tensor([0, 0, 3])
        archive.add(1, torch.randn(2, 3, 4, generator=gen), values)
        archive.score(1, torch.randn(4, 1, 4, generator=gen), torch.randn(2, 9, 4, generator=gen), 0.5, 8, "group",
                      REFERENCE)
        return archive

    first = scored().take_scores()
    ratio = first["mass"] / first["floor"]
    top = int(ratio.argmax())
    source = int(first["sources"][top])
    others = ratio[first["sources"] != source]
    bar = (float(ratio[top]) + float(others.max())) / 2  # only the top entry's source reaches it
    assert float(ratio[top]) > float(others.max())
    archive = scored()
    taken = archive.take_scores(threshold=bar)
    assert taken["serials"].tolist() == [0, 1, 2] and archive.take_scores() is None  # every entry, once
    archive = scored()
    assert archive.take_scores(threshold=float(ratio.max()) * 1.01) is None and archive.take_scores() is None
    assert scored().take_scores(threshold=bar, skip=torch.tensor([source])) is None
    assert scored().take_scores(threshold=bar, skip=torch.tensor([7]))["serials"].numel() == 3


@pytest.mark.parametrize("shape", [(1,), (2,), (5,), (1023,), (3, 7), (4, 2048)])
def test_bars_are_torch_quantile_clamped(shape):
    """`bars` (two kthvalue selections) is `torch.quantile(.., BAR_QUANTILE)` along the last dim, at least 1e-6."""
    from halo.archive_mass import BAR_QUANTILE, bars

    values = torch.rand(shape, generator=torch.Generator().manual_seed(len(shape))) ** 3
    want = torch.quantile(values, BAR_QUANTILE, dim=-1).clamp(min=1e-6)
    torch.testing.assert_close(bars(values), want, rtol=1e-6, atol=0)
    assert torch.all(bars(torch.zeros(shape)) == torch.tensor(1e-6))


@pytest.mark.parametrize("heads", ["mean", "group", "each"])
def test_scores_with_the_brightness_mass_equal_scores_computed_alone(heads):
    """score() given the head-mean mass the step's brightness pass computed equals score() computing it itself."""
    from halo.backend import REFERENCE
    from halo.brightness import attention_column_mass

    gen = torch.Generator().manual_seed(4)
    query, key = torch.randn(4, 3, 4, generator=gen), torch.randn(2, 12, 4, generator=gen)
    column = torch.zeros(12)
    attention_column_mass(query, key, 0.5, 9, column)
    runs = []
    for mass in (column, None):
        archive = _archive(capacity=4, layers=(1,))
        archive.add(1, torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(5)), _values([0, 1, 2]))
        archive.score(1, query, key, 0.5, 9, heads, REFERENCE, mass)
        runs.append(archive.take_scores())
    for name in ("mass", "floor", "serials"):
        torch.testing.assert_close(runs[0][name], runs[1][name], rtol=1e-5, atol=1e-7)


def test_score_names_a_bad_retained_mass_and_keeps_its_scores():
    """A retained mass that is not float32, too short or elsewhere is refused before anything is scored."""
    from halo.backend import REFERENCE

    gen = torch.Generator().manual_seed(6)
    query, key = torch.randn(4, 1, 4, generator=gen), torch.randn(2, 9, 4, generator=gen)
    archive = _archive(capacity=4, layers=(1,))
    archive.add(1, torch.randn(2, 3, 4, generator=gen), _values([0, 1, 2]))
    for bad in (torch.zeros(8, dtype=torch.float64), torch.zeros(5), torch.zeros(2, 8)):
        with pytest.raises(ValueError, match="retained_mass must be a float32 vector of at least 8"):
            archive.score(1, query, key, 0.5, 8, "mean", REFERENCE, bad)
    assert archive.take_scores() is None
    with pytest.raises(ValueError, match="row_lse must be"):
        from halo.archive_mass import retained_mass
        retained_mass(query, key, 0.5, 8, torch.zeros(1, 1))
    with pytest.raises(ValueError, match="quantile must lie"):
        from halo.archive_mass import bars
        bars(torch.rand(3, 4), 1.5)
