"""Recall: evicted text comes back when the conversation needs it.

The per-layer (or per-head) cache archives the keys its retrieval layers evict (halo.recall_memory; per KV head, each
head's own in a ring of its own, read by that head's query heads) and, during every stream
forward of a recall source (user and tool text by default), scores the archive with that forward's query rows:
the mass each archived token would draw were it alone put back, normalised like brightness (halo.archive_mass),
less what it usually draws (its mean over the forwards that scored it before: halo.archive, usual scores); per
KV head also each partly held token's held copies, by the mass they drew, less their own usual (held reads,
HaloConfig.recall_held_reads).
After the forward has been culled and its markers placed, `Recall.after_step`:

1. scores each archived token that is not whole (some layer, or per head some KV head, lost it, a retrieval layer
   included; per-layer memory often keeps a fact in a few layers only) by its best ring's mass over that ring's
   bar (the 75th percentile of the mass the retained tokens drew in the same forward, so a hit out-shines them)
   and each unit (a word, a line) by its best token; units at `recall_threshold` or more are hits;
2. takes the best hits, whole, each with the rest of its sentence (the session passes a table of the tokens that
   end one), then the units within `recall_context` positions of each, forgotten or held by only some layers
   (those copies are evicted first, so every picked token comes back whole in every layer), up to
   `recall_tokens` tokens;
3. runs one service forward that recomputes their K/V at their original positions against the retained tokens
   before them (each sees the recalled tokens before it too), and, as patch rows, recomputes the K/V of the
   forward that asked, so that its tokens, and the next token's logits, see what came back;
4. gives the recalled tokens a brightness from their hit's mass (`alpha * mass`, at most 255), protects them for
   `recall_grace` fed positions, journals them as "recalled", and culls back to the budget (markers settled).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .brightness import MAX_BRIGHTNESS
from .forward import CullResult, ForwardSpec


@dataclass
class RecallPick:
    """Tokens chosen to come back, sorted by position (CPU tensors, [k] each).

    Attributes: serials (before eviction), positions, token_ids, sources, units, brightness (float32, what they
    come back with).
    """

    serials: torch.Tensor
    positions: torch.Tensor
    token_ids: torch.Tensor
    sources: torch.Tensor
    units: torch.Tensor
    brightness: torch.Tensor

    def __len__(self) -> int:
        return int(self.serials.numel())


_PICK_FIELDS = ("serials", "positions", "token_ids", "sources", "units")
"""The fields of a token recall can bring back (the archive's and the memory snapshot's)."""


def pick_units(scores: dict[str, torch.Tensor], held: dict[str, torch.Tensor], *, num_rows: int, marker: int,
               threshold: float, most: int, context: int, alpha: float, priority: torch.Tensor | None = None,
               displaced: torch.Tensor | None = None, skip: torch.Tensor | None = None,
               sentence_ends: torch.Tensor | None = None, words: torch.Tensor | None = None) -> RecallPick | None:
    """Choose what comes back from one forward's archive scores (RecallArchive.take_scores()).

    Args:
        scores: per archive entry (over every ring): mass and floor (float32; the ring's bar: a quantile of what
            the retained tokens drew) and serials, positions, token_ids, sources, units (int64).
        held: the remembered tokens (cache.snapshot(): serials, positions, token_ids, sources, units, layers).
        num_rows: the rows that may hold a token, L per layer, L * Hkv per KV head (a token every row holds is
            whole already); marker: the marker source code (never picked).
        threshold, most, context, alpha: HaloConfig.recall_threshold, recall_tokens, recall_context, alpha.
        priority, displaced: recall never pushes out text that outranks it. A unit comes back only when its
            source's priority (`priority`: float32 per source code) is at least that of what its tokens would push
            out (`displaced[j]`: the priority of the j-th token the cull after a recall evicts, ascending,
            LayeredHaloCache.displaced_priority; past its end only protected text is left, and the cull
            falls back on it as it does without recall).
            None: no check (tool output recalled during a flood may then push out what the user said).
        skip: source codes (int64) never picked, as hits or as context (a tool forward skips tool and log lines).
        sentence_ends: bool [V] per token id (halo.units.sentence_end_table), or None. Given, every hit comes back
            with the rest of its sentence first (a fact read by two hits, `The pass key is 52445. ... 52445 is the
            pass key.`, comes back as its two sentences, not as two windows whose words crowd out the number),
            then, room left, the units within `context` positions of each hit; None: each hit with its window.
        words: bool [V] per token id, the tokens with a letter or a digit (halo.units.word_table), or None. Given,
            only they can be hits: newlines and punctuation draw attention as structure (traced in `halo demo
            --recall`, the question's best hits were two newlines of the tool output), not as content; they still
            come back inside a hit's sentence or window.
    Returns:
        The tokens to make whole in every layer, or None: the hit units (archived, and not whole: forgotten, or
        held by some layers only) by score, each with the rest of its sentence and the units within `context`
        positions of it, likewise.
    """
    scores = {name: value.cpu() for name, value in scores.items()}
    # the pool: archived tokens, and remembered tokens some layer lost, once each (the cache's fields win)
    partial = (held["layers"] < num_rows) & (held["sources"] != marker)
    pool = {name: torch.cat([held[name][partial], scores[name]]) for name in _PICK_FIELDS}
    if skip is not None:
        pool = {name: value[~torch.isin(pool["sources"], skip)] for name, value in pool.items()}
    serials, first = _first_of(pool["serials"])
    pool = {name: value[first] for name, value in pool.items()}
    whole = torch.isin(serials, held["serials"][held["layers"] >= num_rows])
    pool = {name: value[~whole] for name, value in pool.items()}
    if pool["serials"].numel() == 0:
        return None
    # a token's score: its best ring's mass over that ring's bar (a retrieval layer that would look is enough)
    if words is not None:  # the rest score nothing: not a hit, nor a hit's brightness
        is_word = words.cpu()[scores["token_ids"].clamp(0, words.numel() - 1)]
        scores["mass"] = torch.where(is_word, scores["mass"], torch.zeros_like(scores["mass"]))
    ratio = scores["mass"].float() / scores["floor"].float().clamp(min=1e-6)
    at = torch.searchsorted(pool["serials"], scores["serials"]).clamp(max=pool["serials"].numel() - 1)
    found = pool["serials"][at] == scores["serials"]  # archived and not whole
    token_score = torch.zeros(pool["serials"].numel()).scatter_reduce_(0, at[found], ratio[found], "amax")
    gain = torch.zeros(pool["serials"].numel()).scatter_reduce_(0, at[found], scores["mass"][found].float(), "amax")
    unit = torch.where(pool["units"] >= 0, pool["units"], -2 - pool["serials"])  # a plain token is its own unit
    unit_ids, unit_of = torch.unique(unit, return_inverse=True)
    units = unit_ids.numel()
    best = torch.zeros(units).scatter_reduce_(0, unit_of, token_score, "amax")
    best_gain = torch.zeros(units).scatter_reduce_(0, unit_of, gain, "amax")
    hits = torch.nonzero(best >= threshold).flatten()
    if hits.numel() == 0:
        return None
    hits = hits[torch.argsort(best[hits], descending=True)]
    sizes = torch.bincount(unit_of, minlength=units)
    lo = torch.full((units,), 2 ** 62).scatter_reduce(0, unit_of, pool["positions"], "amin")
    hi = torch.full((units,), -1).scatter_reduce(0, unit_of, pool["positions"], "amax")
    own, pushed = None, torch.zeros(0)  # each unit's source priority; what the j-th recalled token pushes out
    if priority is not None and displaced is not None:
        own = priority.cpu()[torch.zeros(units).scatter_reduce_(0, unit_of, pool["sources"].float(), "amax").long()]
        pushed = displaced.cpu()

    def fits(unit: int, total: int) -> bool:
        """Whether `unit` fits after `total` tokens and outranks (or ties) what it would push out."""
        end = total + int(sizes[unit]) - 1
        return end < most and (end >= pushed.numel() or bool(own[unit] >= pushed[end]))

    sentence = None if sentence_ends is None else _unit_sentences(pool, held, unit_of, units, sentence_ends)
    chosen: dict[int, float] = {}  # unit -> the gain it comes back with
    total = 0

    def bring(hit: int, group) -> None:
        nonlocal total
        for other in sorted(group, key=lambda u: abs(int(lo[u]) - int(lo[hit]))):
            if other not in chosen and fits(other, total):
                chosen[other] = float(best_gain[hit])
                total += int(sizes[other])

    def window(hit: int) -> list[int]:
        return torch.nonzero((hi >= lo[hit] - context) & (lo <= hi[hit] + context)).flatten().tolist()

    taken = []
    for hit in hits.tolist():
        if not fits(hit, total):
            continue
        taken.append(hit)
        bring(hit, [hit])
        bring(hit, window(hit) if sentence is None else torch.nonzero(sentence == sentence[hit]).flatten().tolist())
    if sentence is not None:  # the windows once every hit's sentence is in
        for hit in taken:
            bring(hit, window(hit))
    if not chosen:
        return None
    take = torch.isin(unit_of, torch.tensor(list(chosen)))
    order = torch.argsort(pool["positions"][take])
    gains = torch.tensor([chosen[u] for u in unit_of[take].tolist()])
    bright = (alpha * gains).clamp(max=MAX_BRIGHTNESS)
    picked = {name: value[take][order] for name, value in pool.items()}
    return RecallPick(picked["serials"], picked["positions"], picked["token_ids"], picked["sources"], picked["units"],
                      bright[order])


def _unit_sentences(pool: dict, held: dict, unit_of: torch.Tensor, units: int,
                    sentence_ends: torch.Tensor) -> torch.Tensor:
    """int64 [units]: the sentence each pool unit starts in, counted over every known token (remembered or
    archived) in position order; a token ending a sentence belongs to it. (The lines a marker stands for end in
    newlines, which end sentences, so a marker needs no rule of its own.)"""
    positions, inverse = torch.unique(torch.cat([held["positions"], pool["positions"]]), return_inverse=True)
    known = torch.cat([held["token_ids"], pool["token_ids"]]).long()
    token_ids = torch.empty_like(positions).scatter_(0, inverse, known)
    inside = (token_ids >= 0) & (token_ids < sentence_ends.numel())
    ends = ~inside | sentence_ends.cpu()[token_ids.clamp(0, sentence_ends.numel() - 1)]
    index = ends.long().cumsum(0) - ends.long()
    of_token = index[inverse[held["positions"].numel():]]
    return torch.full((units,), 2 ** 62).scatter_reduce(0, unit_of, of_token, "amin")


def _first_of(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted distinct values, the index of each one's first occurrence in `values`)."""
    distinct, inverse = torch.unique(values, return_inverse=True)
    first = torch.full((distinct.numel(),), values.numel(), dtype=torch.int64)
    return distinct, first.scatter_reduce_(0, inverse, torch.arange(values.numel()), "amin")


def recall_spec(cache, pick: RecallPick, patch_slots: torch.Tensor) -> ForwardSpec:
    """The service forward that writes `pick` as new slots at its positions (row i sees the retained tokens before
    its position and the picked rows before it) and recomputes `patch_slots` (int64 [k] of `cache.token_view()`,
    ascending position, all after the picked positions) in place, seeing everything before them."""
    device, n, k = cache.device, cache.n_valid, len(pick)
    view = cache.token_view()
    patch_positions = view.positions[patch_slots]
    positions = torch.cat([pick.positions.to(device), patch_positions])
    rows = positions.numel()
    visible = torch.zeros(rows, n + k, dtype=torch.bool, device=device)
    visible[:k, n:] = torch.tril(torch.ones(k, k, dtype=torch.bool, device=device))
    visible[k:, n:] = True
    visible[:k, :n] = cache.retained_visibility(positions[:k])
    visible[k:, :n] = cache.retained_visibility(patch_positions, own_slots=patch_slots)
    ids = torch.cat([pick.token_ids.to(device), view.token_ids[patch_slots]])
    return ForwardSpec(ids, positions, int(pick.sources[0]), k, n, pick.units.to(device), visible,
                       patch_slots if patch_slots.numel() else None, positions, streams=False)


class Recall:
    """The session's recall driver (HaloConfig.recall).

    Attributes:
        events: recall forwards run so far; recalled: tokens brought back so far.
    """

    def __init__(self, config, sentence_ends: torch.Tensor | None = None, words: torch.Tensor | None = None):
        """config: the session's HaloConfig; sentence_ends, words: bool [V] (halo.units.sentence_end_table,
        word_table), or None (see pick_units)."""
        self.config = config
        self.sentence_ends, self.words = sentence_ends, words
        self.priority = torch.tensor(config.source_priorities(), dtype=torch.float32)
        self.line_codes = torch.tensor(config.line_source_codes(), dtype=torch.int64)
        self.events = 0
        self.recalled = 0

    def after_step(self, cache, runner, markers, new_positions: torch.Tensor,
                   source: int | None = None) -> tuple[torch.Tensor | None, CullResult]:
        """Recall what the last stream forward's rows (at `new_positions`, int64 [T]; of source code `source`)
        point at, if anything. A forward of tool or log text (`unit_sources`) recalls no tool or log lines: output
        read once does not bring back older output (during a flood it would keep re-reading itself).

        Returns (logits [V] of the last of those rows recomputed after the recall, or None when nothing came
        back; what the cull back to budget evicted).
        """
        archive, cfg = cache.archive, self.config
        skip = self.line_codes if source in self.line_codes.tolist() else None
        # None also when nothing that may come back reaches the bar: then the memory is not read
        scores = None if archive is None else archive.take_scores(cfg.recall_threshold, skip)
        if scores is None:
            return None, CullResult()
        held = cache.snapshot()
        pick = pick_units(scores, held, num_rows=cache.num_rows, marker=cfg.source_code("marker"),
                          threshold=cfg.recall_threshold, most=cfg.recall_tokens, context=cfg.recall_context,
                          alpha=cfg.alpha, priority=self.priority,
                          displaced=cache.displaced_priority(cfg.recall_tokens, self.priority), skip=skip,
                          sentence_ends=self.sentence_ends, words=self.words)
        if pick is None:
            return None, CullResult()
        done = CullResult()
        if bool(torch.isin(pick.serials, held["serials"]).any()):
            done.evictions.append(cache.evict_serials(pick.serials))  # copies some layers hold: all come back whole
        where = cache.slot_of_position()
        patch = [where[p] for p in new_positions.tolist() if p in where]
        patch_slots = torch.tensor(patch, dtype=torch.int64, device=cache.device)
        first = cache.next_serial
        spec = recall_spec(cache, pick, patch_slots)
        logits, _ = runner(spec, torch.tensor([spec.rows - 1], device=cache.device))
        cache.adopt_recalled(first, pick.serials, pick.sources, pick.brightness)
        self.events += 1
        self.recalled += len(pick)
        done.extend(cache.cull())
        done.extend(markers.settle(cache, done.culled_runs, runner))
        return (logits[0, -1] if patch else None), done
