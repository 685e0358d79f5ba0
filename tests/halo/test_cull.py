import torch

from halo.cull import cull_scores, position_order, select_victims


def test_scores_follow_position_order_not_slot_order():
    positions = torch.tensor([30, 10, 20, 0, 40])
    brightness = torch.tensor([50.0, 0.0, 0.0, 100.0, 100.0])
    scores = cull_scores(brightness, positions, 5, dark_bias=1.0, radius=1)
    # in position order: 100(0) 0(10) 0(20) 50(30) 100(40)
    expected_ordered = torch.tensor([100 + 0.0, 0 + 50.0, 0 + 25.0, 50 + 50.0, 100 + 50.0])
    assert torch.allclose(scores[position_order(positions, 5)], expected_ordered)


def test_dark_bias_prefers_dark_regions():
    positions = torch.arange(9)
    brightness = torch.tensor([200.0, 10.0, 200.0, 200.0, 200.0, 5.0, 5.0, 12.0, 5.0])
    plain = select_victims(cull_scores(brightness, positions, 9, 0.0, 2), positions, torch.zeros(9, dtype=torch.bool), 9, 1)
    biased = select_victims(cull_scores(brightness, positions, 9, 1.0, 2), positions, torch.zeros(9, dtype=torch.bool), 9, 1)
    assert plain.tolist() == [5]
    assert biased.tolist() == [8]  # the dim token deepest in the dim region (8: neighbours 5, 12) goes first


def test_ties_break_by_position_and_protected_never_chosen():
    positions = torch.tensor([5, 3, 9, 1, 7, 0])
    scores = torch.zeros(6)
    protected = torch.tensor([False, False, False, True, False, False])
    victims = select_victims(scores, positions, protected, 6, 3)
    assert victims.tolist() == [5, 1, 0]  # positions 0, 3, 5; position 1 is protected
    assert select_victims(scores, positions, torch.ones(6, dtype=torch.bool), 6, 0).numel() == 0


def test_unit_means_equals_a_loop():
    from halo.cull import unit_means

    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        n = int(torch.randint(1, 40, (1,), generator=g))
        scores = torch.rand(n, generator=g) * 300
        units = torch.randint(-1, 6, (n,), generator=g)
        pooled = torch.rand(n, generator=g) < 0.6
        got = unit_means(scores, units, pooled)
        for j in range(n):
            if units[j] < 0 or not pooled[j]:
                assert got[j] == scores[j]
            else:
                members = [i for i in range(n) if units[i] == units[j] and pooled[i]]
                assert torch.isclose(got[j], scores[members].mean(), rtol=1e-6)
