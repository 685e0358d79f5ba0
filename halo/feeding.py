"""Feeds: what `Session.feed` / `Session.feed_ids` stream in, checked, tokenised and cut into stream forwards.

Text of a source in HaloConfig.unit_sources (log, tool) is tokenised once with the index of the line each token
starts in, and each line becomes one unit (culled whole, its culled runs marked by `[...]`); other text is
tokenised plainly (its word units are given per forward by the session, halo.units.WordTracker). A feed then
goes into the cache in forwards of at most HaloConfig.chunk_size tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .config import HaloConfig
from .inputs import check_pinned_fits, check_token_ids
from .units import tokenize_lines


@dataclass(frozen=True)
class Feed:
    """Tokens about to be streamed as one source, checked.

    Attributes:
        token_ids: int64 [T], T >= 1 (on the CPU for text; where the caller's ids were for `of_ids`).
        source: the source name (known to the config).
        lines: the line index (0, 1, ...) of each token for a source split into line units, else None.
    """

    token_ids: torch.Tensor
    source: str
    lines: list[int] | None = None

    @classmethod
    def of_text(cls, tokenizer, config: HaloConfig, text: str, source: str, *, first: bool) -> "Feed":
        """Tokenise `text` fed as `source` (`first`: the stream's first feed, the tokenizer's special tokens added).

        Raises TypeError (not a str) or ValueError (empty text, an unknown source, text that tokenises to
        nothing), in that order.
        """
        if not isinstance(text, str):
            raise TypeError(f"feed() takes text as str, got {type(text).__name__}")
        if not text:
            raise ValueError("feed() got empty text")
        config.source_code(source)
        if source in config.unit_sources:
            ids, lines = tokenize_lines(tokenizer, text, add_special_tokens=first)
        else:
            ids, lines = tokenizer(text, add_special_tokens=first)["input_ids"], None
        if not ids:
            raise ValueError(f"feed() text {text[:40]!r} tokenises to nothing")
        return cls(torch.tensor(ids, dtype=torch.int64), source, lines)

    @classmethod
    def of_ids(cls, token_ids: torch.Tensor, source: str, config: HaloConfig, vocab_size: int,
               device: torch.device) -> "Feed":
        """Already-tokenised ids (int64 or int32 [T] on the CPU or `device`, each in [0, vocab_size)) as `source`;
        TypeError/ValueError naming the problem (halo.inputs.check_token_ids), then ValueError for an unknown
        source."""
        check_token_ids(token_ids, vocab_size, device)
        config.source_code(source)
        return cls(token_ids.to(torch.int64), source)

    def __len__(self) -> int:
        return int(self.token_ids.numel())

    def pinned_tokens_after(self, config: HaloConfig, pinned_tokens: int) -> int:
        """The session's count of pinned tokens once this feed is in (`pinned_tokens` before; it grows only for a
        pinned source). ValueError when a pinned feed would leave the budget below the protected set
        (halo.inputs.check_pinned_fits)."""
        check_pinned_fits(config, pinned_tokens, self.source, len(self))
        return pinned_tokens + len(self) if config.sources[self.source].pinned else pinned_tokens

    def forwards(self, chunk_size: int, new_unit_ids) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """The feed's stream forwards, in order: (token ids int64 [<= chunk_size], their units int64 or None).

        A feed in lines reserves one fresh unit id per line with `new_unit_ids(count)` (HaloCache.new_unit_ids)
        before its first forward; other feeds carry no units (None).
        """
        units = None if self.lines is None else new_unit_ids(max(self.lines) + 1)[torch.tensor(self.lines)]
        for start in range(0, len(self), chunk_size):
            yield self.token_ids[start:start + chunk_size], None if units is None else units[start:start + chunk_size]
