"""Planted-fact recall probe: a pass key planted at a line boundary at a chosen depth of a token stream.

The fact sits on its own line(s) at a sentence (or at least line) boundary, e.g.
`The pass key is 48213. Remember it. 48213 is the pass key.`; after the text, the prompt ends with
`What is the pass key? Answer: The pass key is` and a few greedy tokens are read back.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

FACT_TEMPLATE = "The pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "\nWhat is the pass key? Answer: The pass key is"


def make_key(rng: random.Random) -> str:
    """A 5-digit key (no leading zero) from a seeded `random.Random`."""
    return str(rng.randint(10000, 99999))


def fact_text(key: str) -> str:
    return FACT_TEMPLATE.format(key=key)


@dataclass
class Planted:
    """A token stream with one fact in it.

    Attributes:
        ids: token ids of text + fact; start, end: the fact's token span `ids[start:end]`;
        depth: the depth asked for; key: the planted key.
    """

    ids: list[int]
    start: int
    end: int
    depth: float
    key: str

    @property
    def actual_depth(self) -> float:
        """Where the fact starts, as a fraction of the text's tokens (fact excluded)."""
        text_len = len(self.ids) - (self.end - self.start)
        return self.start / text_len if text_len else 0.0


def boundary_offsets(tokenizer, ids: list[int]) -> tuple[list[int], list[int]]:
    """(sentence_ends, line_ends): token offsets i such that ids[:i] ends with a newline; sentence ends also
    have `.`, `:`, `!`, `?` before the newline, or a blank line."""
    lines, sentences = [], []
    text_so_far = ""
    for i, tid in enumerate(ids):
        text_so_far += tokenizer.decode([tid])
        if text_so_far.endswith("\n"):
            lines.append(i + 1)
            stripped = text_so_far.rstrip(" \t")
            body = stripped.rstrip("\n")
            if stripped.endswith("\n\n") or body[-1:] in (".", ":", "!", "?"):
                sentences.append(i + 1)
        if len(text_so_far) > 64:
            text_so_far = text_so_far[-64:]
    return sentences, lines


def plant_fact(tokenizer, ids: list[int], depth: float, key: str, *, boundaries=None) -> Planted:
    """Insert the fact for `key` at the sentence boundary nearest `depth` (0..1) of `ids`.

    Falls back to the nearest line boundary, then to the exact token offset. The fact is tokenised on its own
    and spliced at token level, so the text's tokens are unchanged around it. A newline is put before the fact
    when the boundary found is not a line boundary.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    target = round(depth * len(ids))
    sentences, lines = boundaries if boundaries is not None else boundary_offsets(tokenizer, ids)
    window = max(8, len(ids) // 20)  # prefer a sentence end within 5% of the text, else any line end
    candidates = [b for b in sentences if abs(b - target) <= window] or lines or [target]
    at = min(candidates, key=lambda b: (abs(b - target), b))
    text = fact_text(key)
    if at not in lines and at > 0:
        text = "\n" + text
    fact = tokenizer(text, add_special_tokens=False)["input_ids"]
    return Planted(ids[:at] + fact + ids[at:], at, at + len(fact), depth, key)


def question_ids(tokenizer) -> list[int]:
    return tokenizer(QUESTION, add_special_tokens=False)["input_ids"]


def recalled(reply: str, key: str) -> bool:
    """Exact match: the first run of digits in the reply is the key."""
    found = re.findall(r"\d+", reply)
    return bool(found) and found[0] == key
