"""Units of a request's tokens inside vLLM: which tokens live and die together (words, log and tool lines).

The rules are those of Halo's Hugging Face path (halo.session / halo.feeding / halo.units), applied to the token
ids vLLM schedules (the worker never sees the request's text):

* prompt tokens of a source in `HaloConfig.unit_sources` (`log`, `tool`) are split into **lines**: a token
  belongs to the line it starts in, and a token that starts on a newline belongs to the line that newline ends
  (`halo.units.tokenize_lines`), so token i's line is the number of newlines in tokens 0 .. i - 1. Newlines per
  token come from the bytes each token adds to running text (`halo.repair.bridge.token_pieces`), so the lines
  equal `tokenize_lines` of the decoded text whenever the ids are that text's tokenisation. A line unit ends any
  word (the next word starts fresh, as after `Session.feed` of line text);
* other tokens, with `HaloConfig.word_units`, are split into **words** by `halo.units.WordTracker` (a
  whitespace-delimited run of at most 24 tokens, continuing across chunks and from the prompt into the
  generated tokens, as in `Session.step`);
* generated tokens of a line source, and every token with `word_units` off outside line sources, are plain
  (unit -1): `Session.generate` gives such tokens no unit either.

Unit ids are fresh per request (0, 1, ...); only their equality matters.
"""

from __future__ import annotations

import weakref

import torch

from halo.repair.bridge import token_pieces
from halo.units import WordState, WordTracker

from .settings import ServingConfig

_NEWLINE_TABLES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def newline_table(tokenizer, size: int) -> torch.Tensor:
    """int64 [size]: newlines in the text each token id adds (0 for special tokens and ids past the vocabulary),
    computed once per tokenizer object."""
    table = _NEWLINE_TABLES.get(tokenizer)
    if table is None or table.numel() != size:
        pieces = token_pieces(tokenizer)
        table = torch.zeros(size, dtype=torch.int64)
        n = min(size, len(pieces))
        table[:n] = torch.tensor([data.count(b"\n") for data in pieces.bytes[:n]], dtype=torch.int64)
        _NEWLINE_TABLES[tokenizer] = table
    return table


def unit_kinds(serving: ServingConfig) -> tuple[bool, bool, bool]:
    """(prompt in lines, prompt in words, generated tokens in words) for a request's settings."""
    cfg = serving.halo
    prompt_lines = serving.prompt_source in cfg.unit_sources
    return (prompt_lines, cfg.word_units and not prompt_lines,
            cfg.word_units and serving.output_source not in cfg.unit_sources)


def needs_tokenizer(serving: ServingConfig) -> bool:
    """Whether a request with these settings has units (and so needs the tokenizer's tables)."""
    return any(unit_kinds(serving))


class RequestUnits:
    """Gives each token a request feeds its unit id (int64, -1 for a plain token), in feeding order.

    Args:
        serving: the request's settings (unit_sources, word_units, prompt_source, output_source).
        num_prompt_tokens: positions below it are prompt tokens, the rest generated tokens.
        tokenizer: the model's Hugging Face tokenizer, or None when `needs_tokenizer(serving)` is False.
        vocab_size: the model's vocabulary size (the length of the token tables).
    """

    def __init__(self, serving: ServingConfig, num_prompt_tokens: int, tokenizer, vocab_size: int):
        self.num_prompt_tokens = num_prompt_tokens
        self.prompt_lines, self.prompt_words, self.output_words = unit_kinds(serving)
        if tokenizer is None and needs_tokenizer(serving):
            raise ValueError("word and line units need the model's tokenizer; start the engine without "
                             "skip_tokenizer_init, or set word_units to false and use a prompt source outside "
                             "unit_sources")
        self.words = WordTracker(tokenizer, vocab_size) if (self.prompt_words or self.output_words) else None
        self.newlines = newline_table(tokenizer, vocab_size) if self.prompt_lines else None
        self.next_unit = 0
        self._line_unit = -1  # unit id of the line the next prompt token continues (-1: a new line starts)

    def new_unit_ids(self, count: int) -> torch.Tensor:
        """int64 [count] fresh unit ids."""
        ids = torch.arange(self.next_unit, self.next_unit + count, dtype=torch.int64)
        self.next_unit += count
        return ids

    def units(self, start: int, token_ids: torch.Tensor) -> torch.Tensor:
        """int64 [T] unit ids of the tokens at positions start .. start + T - 1 (token_ids int64 [T]).

        Calls must come in feeding order, each starting where the previous one stopped."""
        split = min(max(self.num_prompt_tokens - start, 0), token_ids.numel())
        parts = []
        if split:
            prompt = token_ids[:split]
            parts.append(self._lines(prompt) if self.prompt_lines else self._words(prompt, self.prompt_words))
        if split < token_ids.numel():
            parts.append(self._words(token_ids[split:], self.output_words))
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)

    def _words(self, token_ids: torch.Tensor, on: bool) -> torch.Tensor:
        if not on:
            return torch.full((token_ids.numel(),), -1, dtype=torch.int64)
        return self.words.units(token_ids, self.new_unit_ids)

    def _lines(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Line unit ids: a token starts a new line when the token before it added a newline."""
        ends_line = self.newlines[token_ids] > 0
        starts = torch.zeros_like(ends_line)
        starts[0] = self._line_unit < 0
        starts[1:] = ends_line[:-1]
        index = torch.cumsum(starts.long(), 0)  # lines started within this call, up to each token
        fresh = self.new_unit_ids(int(index[-1]))
        units = torch.full_like(index, self._line_unit)
        if fresh.numel():
            units = torch.where(index > 0, fresh[(index - 1).clamp(min=0)], units)
        self._line_unit = -1 if bool(ends_line[-1]) else int(units[-1])
        if self.words is not None:
            self.words.state = WordState()  # a line unit ends any word
        return units
