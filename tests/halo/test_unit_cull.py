"""The vectorised unit-aware victim selection equals a plain loop over slots written from its specification."""

import pytest
import torch

from halo.cull import select_unit_victims, select_victims


def loop_reference(scores: torch.Tensor, positions: torch.Tensor, brightness: torch.Tensor,
                        protected: torch.Tensor, units: torch.Tensor, need: int, threshold: float | None
                        ) -> tuple[list[int], list[int], dict[int, list[int]]]:
    """Victims when some retained slots belong to units (host path): a unit lives and dies whole.

    A unit scores as its best-scoring token, counts as bright as its brightest token and is protected when any
    of its tokens is. Slots die in `select_victims` order (score, then position) until `need` slots are chosen;
    with `threshold`, every unprotected slot (or unit) whose brightness is at most it dies too. Only when the
    units protected whole leave fewer than `need` slots (a budget too small for the protected set and the
    words or lines around its edges) are such units cut, at their own unprotected tokens, dimmest first.

    Args:
        scores: float32 [n] cull scores; positions: int64 [>= n]; brightness: float32 [n];
        protected: bool [n]; units: int64 [n] unit id per slot (-1 for plain tokens); need: slots to free.
    Returns:
        (victim slots, culled unit ids, unit id -> its retained slots). RuntimeError if fewer than `need`
        slots are unprotected.
    """
    n = units.numel()
    own_protected_l = protected.tolist()
    scores, brightness, protected = scores[:n].clone(), brightness.clone(), protected.clone()
    in_unit = units >= 0
    if bool(in_unit.any()):
        ids, inverse = torch.unique(units[in_unit], return_inverse=True)
        best = torch.full((ids.numel(),), float("-inf"), device=scores.device).scatter_reduce(0, inverse, scores[in_unit], "amax")
        brightest = torch.zeros(ids.numel(), device=scores.device).scatter_reduce(0, inverse, brightness[in_unit], "amax")
        guarded = torch.zeros(ids.numel(), dtype=torch.bool, device=scores.device).scatter_reduce(0, inverse, protected[in_unit], "amax")
        scores[in_unit] = best[inverse]
        brightness[in_unit] = brightest[inverse]
        protected[in_unit] = guarded[inverse]
    ranked = select_victims(scores, positions, protected, n, n).tolist()  # every slot, dying order first
    units_l, protected_l, bright_l = units.tolist(), protected.tolist(), brightness.tolist()
    members: dict[int, list[int]] = {}
    for slot, unit in enumerate(units_l):
        if unit >= 0:
            members.setdefault(unit, []).append(slot)
    chosen: list[int] = []
    culled: list[int] = []
    taken: set[int] = set()
    for slot in ranked:
        if protected_l[slot]:
            break  # protected slots rank last
        neglected = threshold is not None and bright_l[slot] <= threshold
        if len(chosen) >= need and not neglected:
            if threshold is None:
                break
            continue
        unit = units_l[slot]
        if unit < 0:
            chosen.append(slot)
        elif unit not in taken:
            taken.add(unit)
            culled.append(unit)
            chosen.extend(members[unit])
    if len(chosen) < need:  # units protected whole leave too little: cut them at their unprotected tokens
        taken_slots = set(chosen)
        for slot in ranked:
            if len(chosen) >= need:
                break
            if not own_protected_l[slot] and slot not in taken_slots:
                chosen.append(slot)
    if len(chosen) < need:
        raise RuntimeError(f"cannot cull {need} tokens: only {len(chosen)} are unprotected")
    return chosen, culled, members


@pytest.mark.parametrize("seed", range(40))
@pytest.mark.parametrize("threshold", [None, 60.0])
def test_vectorised_unit_cull_equals_the_loop(seed, threshold):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 90, (1,), generator=g))
    units = torch.randint(-1, max(2, n // 3), (n,), generator=g)
    units[torch.rand(n, generator=g) < 0.3] = -1
    scores = torch.randint(0, 40, (n,), generator=g).float()  # ties on purpose
    brightness = torch.rand(n, generator=g) * 255
    positions = torch.randperm(n, generator=g) + 5
    protected = torch.rand(n, generator=g) < 0.2
    need = int(torch.randint(0, n + 1, (1,), generator=g))
    try:
        expected, _, _ = loop_reference(scores, positions, brightness, protected, units, need, threshold)
    except RuntimeError:
        with pytest.raises(RuntimeError, match="cannot cull"):
            select_unit_victims(scores, positions, brightness, protected, units, need, threshold)
        return
    got = select_unit_victims(scores, positions, brightness, protected, units, need, threshold)
    assert got.tolist() == expected
