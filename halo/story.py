"""The story `halo demo` tells: a user states a fact, a long tool output floods the conversation, the user asks.

The same conversation is answered under Halo and under a baseline (StreamingLLM by default) with the same KV
budget, greedy; each run keeps its Session, so the caller can show what each one remembered. Built from the
conversation suite's parts (halo.eval.conversation): the fact is an emphatic `number` fact, the flood one of its
shapes (documentation lines from the embedded text as `tool`, build-log lines as `log`, a JSON tool result as
`tool`), rendered through the chat template by `halo.eval.conversation_runner.render_feeds`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .config import HaloConfig
from .eval.conversation import (FLOOD_SHAPES, SYSTEM_PROMPT, Fact, Message, answer_matches, fact_turns, flood_turns,
                                make_fact)
from .eval.conversation_runner import ANSWER_TOKENS, Feed, answer_session, count_tokens, render_feeds
from .session import Session


@dataclass(frozen=True)
class Story:
    """The demo conversation: `messages` (ending with the question), the asked `fact`, and its rendered `feeds`."""

    messages: tuple[Message, ...]
    fact: Fact
    feeds: tuple[Feed, ...]


@dataclass(frozen=True)
class Telling:
    """One policy's run of the story: its greedy `reply` (after the answer prefix), whether it is `correct`, and
    the `session` it ran in (memory, journal, stats)."""

    policy: str
    reply: str
    correct: bool
    session: Session


def make_story(tokenizer, *, flood: str = "docs", flood_chars: int = 3000, seed: int = 0) -> Story:
    """System prompt, the user's fact (a 5-digit door code, stated with emphasis) and the assistant's note, a
    request for a tool and its `flood_chars`-character output of shape `flood` with the assistant's summary, then
    the question. Seeded: the same seed tells the same story."""
    if flood not in FLOOD_SHAPES:
        raise ValueError(f"unknown flood shape {flood!r}; shapes: {', '.join(FLOOD_SHAPES)}")
    if flood_chars < 2:
        raise ValueError(f"flood_chars must be >= 2, got {flood_chars}")
    from .text import embedded_text

    rng = random.Random(seed)
    fact = make_fact("number", "door code", rng)
    messages = [Message("system", SYSTEM_PROMPT), *fact_turns(fact),
                *flood_turns(flood, flood_chars, rng, embedded_text().splitlines()), Message("user", fact.question)]
    return Story(tuple(messages), fact, tuple(render_feeds(tokenizer, messages, fact.answer_prefix)))


def story_tokens(tokenizer, story: Story, config: HaloConfig) -> int:
    """Tokens the story's feeds make in a fresh session."""
    return count_tokens(tokenizer, list(story.feeds), config.unit_sources)


def tell(model, tokenizer, story: Story, config: HaloConfig, policy: str = "halo", *,
         answer_tokens: int = ANSWER_TOKENS) -> Telling:
    """Feed the story under `policy` (a cull policy name: halo, streaming, h2o, tova, random) at `config.budget`
    and read `answer_tokens` greedy tokens after the answer prefix."""
    reply, session = answer_session(model, tokenizer, list(story.feeds), config, policy, answer_tokens=answer_tokens)
    return Telling(policy, reply, answer_matches(reply, story.fact.answer), session)
