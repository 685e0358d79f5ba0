"""halo.archive usual scores: a forward scores an archived token against what it usually draws."""

import pytest
import torch

from halo.backend import REFERENCE
from recall_session import one_ring_archive, ring_forward


def _ratios(archive, seed):
    archive.score(1, *ring_forward(seed), 0.5, 9, "group", REFERENCE)
    taken = archive.take_scores()
    return taken["mass"] / taken["floor"]


@pytest.mark.parametrize("history", [0, 1, 3])
def test_a_score_is_the_ratio_less_the_mean_of_the_earlier_ones_once_there_are_history_of_them(history):
    """Each forward's discounted score equals the plain ratio less 0.5 x the mean of the plain ratios before it,
    once `history` forwards have scored the entry; the plain archive's means are those ratios' means."""
    plain, discounted = one_ring_archive(0.0, history), one_ring_archive(0.5, history)
    seen = []
    for seed in range(5):
        ratio = _ratios(plain, seed)
        want = ratio if len(seen) < history or not seen else (ratio - 0.5 * torch.stack(seen).mean(0)).clamp(min=0)
        torch.testing.assert_close(_ratios(discounted, seed), want, rtol=1e-5, atol=1e-6)
        seen.append(ratio)
    assert plain.scored[0, :3].tolist() == [5.0] * 3 and plain.scored[0, 3] == 0  # the empty entry is not counted
    torch.testing.assert_close(plain.usual[0, :3], torch.stack(seen).mean(0))


def test_a_token_that_draws_the_same_every_forward_stops_scoring():
    archive = one_ring_archive(1.0, 2)
    first = _ratios(archive, 0)
    assert float(first.max()) > 0
    _ratios(archive, 0)
    assert torch.all(_ratios(archive, 0) <= 1e-5)


def test_a_new_entry_in_a_reused_slot_and_a_dropped_one_start_with_no_history():
    archive = one_ring_archive(1.0, 1, capacity=3)
    _ratios(archive, 0)
    archive.drop(torch.tensor([1]))
    assert archive.scored[0].tolist() == [1.0, 0.0, 1.0] and archive.usual[0, 1] == 0
    s = torch.tensor([5])
    archive.add(1, torch.randn(2, 1, 4), {"serials": s, "positions": s + 10, "token_ids": s, "sources": s * 0,
                                          "units": s * 0 - 1})
    slot = int((archive.fields["serials"][0] == 5).nonzero())
    assert archive.scored[0, slot] == 0 and archive.usual[0, slot] == 0


def test_usual_scores_are_saved_and_a_corrupted_or_older_file_is_handled():
    archive = one_ring_archive(1.0, 1)
    for seed in range(3):
        _ratios(archive, seed)
    state = archive.state_dict()
    other = one_ring_archive(1.0, 1)
    other.clear()
    other.load_state_dict(state, next_serial=3, seen=13)
    assert torch.equal(other.usual, archive.usual) and torch.equal(other.scored, archive.scored)
    for name, bad in (("usual", float("nan")), ("scored", -1.0)):
        broken = dict(state, **{name: state[name].clone()})
        broken[name][0, 0] = bad
        with pytest.raises(ValueError, match=f"saved archive {name} must be finite, non-negative float32"):
            other.load_state_dict(broken, next_serial=3, seen=13)
    with pytest.raises(ValueError, match="saved archive usual"):
        other.load_state_dict(dict(state, usual=state["usual"][:, :2]), next_serial=3, seen=13)
    assert torch.equal(other.usual, archive.usual)  # unchanged by the refusals
    older = {name: value for name, value in state.items() if name not in ("usual", "scored")}
    other.load_state_dict(older, next_serial=3, seen=13)
    assert other.scored.sum() == 0 and other.usual.sum() == 0


@pytest.mark.parametrize("name,value", [("recall_discount", -0.5), ("recall_discount", float("nan")),
                                        ("recall_history", -1), ("recall_history", 1.5)])
def test_config_names_a_bad_discount_or_history(name, value):
    from halo import HaloConfig

    with pytest.raises(ValueError, match=name):
        HaloConfig(recall=True, **{name: value})
