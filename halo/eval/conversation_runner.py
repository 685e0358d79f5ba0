"""The conversation suite: every policy answers the generated conversations at every budget; exact-match scores.

Each conversation is rendered with the tokenizer's chat template (plain `role: text` lines when it has none) into
feeds, each fed as its message's role (`system` is pinned, `tool`/`log` live by lines); then the question, the
generation prompt and the answer's prefix, and a greedy reply. Rows:

- `full`: the whole conversation in an unlimited cache (what the model does with everything).
- `streaming`, `h2o`, `tova`, `random`, `halo` (optionally `+repair`): the cache held at the budget.
- `oracle`: an ideal memory fed to an unlimited cache: the system prompt, the user's fact statements, one
  elision marker and the most recent lines of the last flood that fit, so that memory, question and answer fit
  the budget. It says what the model can do at that budget.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..baselines import make_policy
from ..config import HaloConfig
from ..session import Session
from ..units import tokenize_lines
from .coherence import session_coherence
from .conversation import FACT_KINDS, FLOOD_SIZES, Conversation, Message, answer_matches, make_conversations
from .runner import base_policy, budget_label, check_policies, eval_config, parse_budget, policy_setup, resolve_budget

CONVERSATION_POLICIES = ("full", "streaming", "h2o", "tova", "halo", "oracle")
"""Default rows of the conversation suite."""

CONVERSATION_BUDGETS = ("192",)
"""Default budgets (tokens) of the conversation suite."""

CONVERSATION_COUNT = 6
"""Default number of conversations (every fact kind and flood shape appears; a few minutes on 2 CPU cores)."""

CONVERSATION_CHUNK = 64
"""Default most tokens per forward while feeding a message (HaloConfig's default chunk_size)."""

CONVERSATION_RECORD_KEYS = ("policy", "budget", "answered", "total", "score", "by_kind", "coherence", "replies")
"""The key set of one conversation-suite record (one per policy and budget)."""

ANSWER_TOKENS = 8
"""Greedy tokens read back after the answer prefix (every answer the generator makes fits in SmolLM2's tokens)."""

UNLIMITED = ("full", "oracle")
"""Rows that run on a cache that never evicts."""


@dataclass(frozen=True)
class Feed:
    """One `Session.feed(text, source)` call."""

    text: str
    source: str


def _template_role(role: str) -> str:
    return "tool" if role == "log" else role


def template_feeds(tokenizer, messages: list[Message], answer_prefix: str) -> list[Feed]:
    """Feeds from the chat template: each message's share of the rendering, then the generation prompt and the
    answer prefix as `assistant`. ValueError when the template does not render prefix by prefix."""
    dicts = [{"role": _template_role(m.role), "content": m.text} for m in messages]
    feeds: list[Feed] = []
    rendered = ""
    for i, message in enumerate(messages):
        full = tokenizer.apply_chat_template(dicts[: i + 1], tokenize=False, add_generation_prompt=False)
        if not full.startswith(rendered) or len(full) == len(rendered):
            raise ValueError("the chat template does not render one message at a time")
        feeds.append(Feed(full[len(rendered):], message.role))
        rendered = full
    prompt = tokenizer.apply_chat_template(dicts, tokenize=False, add_generation_prompt=True)
    if not prompt.startswith(rendered):
        raise ValueError("the chat template's generation prompt does not extend the conversation")
    feeds.append(Feed(prompt[len(rendered):] + answer_prefix, "assistant"))
    return feeds


def plain_feeds(messages: list[Message], answer_prefix: str) -> list[Feed]:
    """Feeds without a template: one `role: text` block per message, then `assistant: <answer prefix>`."""
    feeds = [Feed(f"{m.role}: {m.text.rstrip(chr(10))}\n", m.role) for m in messages]
    return feeds + [Feed(f"assistant: {answer_prefix}", "assistant")]


def render_feeds(tokenizer, messages: list[Message], answer_prefix: str) -> list[Feed]:
    """The feeds of a conversation: the chat template's when the tokenizer has one that renders, else plain."""
    if getattr(tokenizer, "chat_template", None):
        from jinja2 import TemplateError

        try:
            return template_feeds(tokenizer, messages, answer_prefix)
        except (TemplateError, ValueError):  # a template that refuses these roles or this order
            pass
    return plain_feeds(messages, answer_prefix)


def count_tokens(tokenizer, feeds: list[Feed], unit_sources=HaloConfig().unit_sources) -> int:
    """Tokens `Session.feed` makes of `feeds` in a fresh session (special tokens on the first feed only)."""
    total = 0
    for i, feed in enumerate(feeds):
        if feed.source in unit_sources:
            total += len(tokenize_lines(tokenizer, feed.text, add_special_tokens=i == 0)[0])
        else:
            total += len(tokenizer(feed.text, add_special_tokens=i == 0)["input_ids"])
    return total


def oracle_messages(conversation: Conversation, recent_lines: int, marker: str) -> list[Message]:
    """The ideal memory: system prompt, the fact statements, a marker and the last `recent_lines` flood lines,
    then the question."""
    out = [conversation.messages[0]] + [Message("user", fact.statement) for fact in conversation.facts]
    if conversation.floods and recent_lines > 0:
        last = conversation.floods[-1]
        out.append(Message(last.role, marker + "".join(last.text.splitlines(keepends=True)[-recent_lines:])))
    return out + [conversation.messages[-1]]


def oracle_feeds(tokenizer, conversation: Conversation, config: HaloConfig, *,
                 answer_tokens: int = ANSWER_TOKENS) -> list[Feed]:
    """The oracle's feeds at `config.budget`: as many recent flood lines as let memory + question + answer fit.

    ValueError when even the system prompt, the facts, the question and the answer do not fit.
    """
    def feeds(k: int) -> list[Feed]:
        messages = oracle_messages(conversation, k, config.marker_text)
        return render_feeds(tokenizer, messages, conversation.answer_prefix)

    def fits(k: int) -> bool:
        return count_tokens(tokenizer, feeds(k), config.unit_sources) + answer_tokens <= config.budget

    if not fits(0):
        raise ValueError(f"budget {config.budget} cannot hold the oracle's system prompt, facts, question and answer")
    low, high = 0, len(conversation.floods[-1].text.splitlines()) if conversation.floods else 0
    while low < high:  # the largest k that fits (more lines never take fewer tokens)
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return feeds(low)


def answer_session(model, tokenizer, feeds: list[Feed], config: HaloConfig, policy_name: str, *, seed: int = 0,
                   answer_tokens: int = ANSWER_TOKENS) -> tuple[str, Session]:
    """Feed `feeds` under `policy_name` (`full`/`oracle`: an unlimited cache) and greedy-read the answer.

    Returns (reply, the session it ran in)."""
    base, config = policy_setup(policy_name, config)
    if base in UNLIMITED:
        length = count_tokens(tokenizer, feeds, config.unit_sources) + answer_tokens
        config = config.replace(budget=max(config.budget, length + config.chunk_size + 1))
        session = Session(model, tokenizer, config)
    else:
        session = Session(model, tokenizer, config, policy=make_policy(base, seed=seed))
    for feed in feeds:
        session.feed(feed.text, source=feed.source)
    return session.generate(answer_tokens), session


def answer(model, tokenizer, feeds: list[Feed], config: HaloConfig, policy_name: str, *, seed: int = 0,
           answer_tokens: int = ANSWER_TOKENS) -> tuple[str, dict]:
    """`answer_session`, returning (reply, session stats with `coherence`: the host model's perplexity of the
    memory after the reply, halo.eval.coherence)."""
    reply, session = answer_session(model, tokenizer, feeds, config, policy_name, seed=seed,
                                    answer_tokens=answer_tokens)
    return reply, dict(session.stats(), coherence=session_coherence(session))


def run_conversations(model, tokenizer, *, count: int = CONVERSATION_COUNT, budgets=CONVERSATION_BUDGETS,
                      policies=CONVERSATION_POLICIES, seed: int = 0, sinks: int = 4, recent: int | None = None,
                      chunk: int = CONVERSATION_CHUNK, flood_sizes=FLOOD_SIZES, answer_tokens: int = ANSWER_TOKENS,
                      progress: bool = True, config_overrides: dict | None = None) -> list[dict]:
    """Answer `count` generated conversations (seeded) under every policy at every budget.

    Budgets are tokens (`160`) or fractions of each conversation's token length (`1/4`). One record per
    (policy, budget), keys `CONVERSATION_RECORD_KEYS`: `answered` of `total` exact answers, `score` their ratio,
    `by_kind` fact kind -> [answered, total], `replies` per conversation (index, kind, flood, answer, reply,
    correct, tokens fed, coherence); `coherence` their mean: the host model's perplexity of each memory after its
    reply (halo.eval.coherence). `full` runs once per conversation and is reported at every budget. `answer_tokens`
    greedy tokens are read back after the answer prefix.
    """
    from tqdm import tqdm

    policies = list(policies)
    overrides = dict(config_overrides or {})
    check_policies(policies, overrides, UNLIMITED)
    specs = [parse_budget(b) for b in budgets]
    conversations = make_conversations(count, seed, flood_sizes=flood_sizes)
    per_budget = [p for p in policies if base_policy(p) != "full"]
    runs = len(conversations) * (len(policies) - len(per_budget) + len(per_budget) * len(specs))
    results: dict[tuple[str, str], list[dict]] = {}
    with tqdm(total=runs, unit="run", desc="conversations", disable=not progress) as bar:
        for conversation in conversations:
            feeds = render_feeds(tokenizer, list(conversation.messages), conversation.answer_prefix)
            length = count_tokens(tokenizer, feeds)
            once: dict[str, dict] = {}
            for spec in specs:
                budget = resolve_budget(spec, length)
                config = eval_config(budget, sinks=sinks, recent=recent, chunk=chunk, **overrides)
                for name in policies:
                    bar.set_postfix(conversation=conversation.index, policy=name, budget=budget)
                    if name in once:
                        row = once[name]
                    else:
                        row = _answer_row(model, tokenizer, conversation, feeds, config, name, seed, answer_tokens)
                        bar.update(1)
                        if base_policy(name) == "full":
                            once[name] = row
                    results.setdefault((name, budget_label(spec)), []).append(dict(row, budget=budget))
    return [_record(name, budget_label(spec), results[name, budget_label(spec)]) for spec in specs for name in policies]


def _answer_row(model, tokenizer, conversation: Conversation, feeds: list[Feed], config: HaloConfig, name: str,
                seed: int, answer_tokens: int) -> dict:
    """One conversation answered under one policy: what was asked, what came back, whether it matched."""
    if base_policy(name) == "oracle":
        feeds = oracle_feeds(tokenizer, conversation, config, answer_tokens=answer_tokens)
    reply, stats = answer(model, tokenizer, feeds, config, name, seed=seed, answer_tokens=answer_tokens)
    return {"conversation": conversation.index, "kind": conversation.target.kind, "flood": conversation.flood,
            "answer": conversation.answer, "reply": reply, "correct": answer_matches(reply, conversation.answer),
            "tokens": stats["tokens_fed"], "coherence": stats["coherence"]}


def _record(policy: str, label: str, rows: list[dict]) -> dict:
    """The record of one policy at one budget from its rows (one per conversation)."""
    answered = sum(row["correct"] for row in rows)
    budgets = {row["budget"] for row in rows}
    by_kind = {kind: [sum(r["correct"] for r in rows if r["kind"] == kind), sum(r["kind"] == kind for r in rows)]
               for kind in FACT_KINDS}
    return {"policy": policy, "budget": budgets.pop() if len(budgets) == 1 else label, "answered": answered,
            "total": len(rows), "score": answered / len(rows) if rows else float("nan"),
            "by_kind": {k: v for k, v in by_kind.items() if v[1]},
            "coherence": sum(row["coherence"] for row in rows) / len(rows) if rows else float("nan"),
            "replies": [{k: v for k, v in row.items() if k != "budget"} for row in rows]}


def format_conversation_table(records: list[dict]) -> str:
    """A Markdown table: policy, budget, answered/total, score, answered/total per fact kind, memory ppl."""
    kinds = [k for k in FACT_KINDS if any(k in r["by_kind"] for r in records)]
    head = ["policy", "budget", "answered", "score"] + kinds + ["memory ppl"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in records:
        per_kind = [("{}/{}".format(*r["by_kind"][k]) if k in r["by_kind"] else "-") for k in kinds]
        row = [r["policy"], str(r["budget"]), f"{r['answered']}/{r['total']}", f"{r['score']:.2f}"] + per_kind
        row.append(f"{r['coherence']:.2f}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)
