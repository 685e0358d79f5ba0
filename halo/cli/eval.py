"""`halo eval`: every cull policy on the same cache.

`--suite essays` (default): perplexity under budget, planted-fact recall, per-step cost on texts.
`--suite conversation`: exact answers to generated conversations (facts, floods of tool/log output, a question).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


ESSAY_BUDGETS = ("1/4", "1/8")
"""Default budgets of the essays suite (fractions of each text's length)."""


def _csv(kind):
    def parse(value: str):
        try:
            return [kind(v) for v in value.split(",") if v.strip()]
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    return parse


EVAL_OWNED_FIELDS = ("budget", "sink_tokens", "recent_tokens", "chunk_size", "sources")
"""HaloConfig fields `--set` may not change: the budget, protected set and chunking are the evaluator's (their own
flags), sources go through `--decay`."""


def _setting(text: str) -> tuple[str, object]:
    """`KEY=VALUE` -> (a HaloConfig field, its value read as TOML; `none` is None, other bare words strings)."""
    import dataclasses
    import tomllib

    from ..config import HaloConfig

    key, sep, raw = text.partition("=")
    key, raw = key.strip(), raw.strip()
    fields = {f.name for f in dataclasses.fields(HaloConfig)}
    if not sep or key not in fields:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE with KEY a HaloConfig field, got {text!r}")
    if key in EVAL_OWNED_FIELDS:
        raise argparse.ArgumentTypeError(f"{key} is set by the evaluator's own flags, not by --set")
    if raw.lower() == "none":
        return key, None
    try:
        value = tomllib.loads(f"value = {raw}")["value"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, tuple(value) if isinstance(value, list) else value


def add_parser(sub) -> None:
    from ..eval.conversation import FLOOD_SIZES
    from ..eval.conversation_runner import (CONVERSATION_BUDGETS, CONVERSATION_CHUNK, CONVERSATION_COUNT,
                                            CONVERSATION_POLICIES)
    from ..eval.runner import ESSAY_POLICIES

    parser = sub.add_parser("eval", help="compare cull policies: perplexity under budget, fact recall, cost",
                            description="Suite `essays`: stream texts token by token through the model with the KV "
                            "cache held at each budget under each policy (same cache, protected set and accounting); "
                            "report perplexity of the tokens after the first `budget` (and its ratio to the full "
                            "cache), planted pass-key recall per depth, and per-step cost. Suite `conversation`: "
                            "feed seeded generated conversations (system prompt, user facts, floods of tool/log "
                            "output, assistant turns, the question last) through the model's chat template and score "
                            "the greedy answer by exact match, for every policy and an `oracle` memory.",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--suite", choices=("essays", "conversation"), default="essays",
                        help="essays: perplexity and planted recall on texts; conversation: exact answers to "
                        "generated conversations")
    parser.add_argument("--model", default=None, help="hub name or local folder (the embedded SmolLM2-135M-Instruct when not given)")
    parser.add_argument("--device", default=None, help="torch device (cuda if available, else cpu, when not given)")
    parser.add_argument("--budget", type=_csv(str), default=None,
                        help="comma-separated budgets: tokens (256) or fractions of each text's or conversation's "
                        f"length (1/4, 0.125); default {','.join(ESSAY_BUDGETS)} (essays), "
                        f"{','.join(CONVERSATION_BUDGETS)} (conversation)")
    parser.add_argument("--policies", type=_csv(str), default=None,
                        help="comma-separated policies: full, streaming, h2o, tova, random, halo, halo-mean (Halo's "
                        "cull ranked by mean attention income, halo.MeanIncomePolicy), and oracle "
                        "(conversation suite only); add -layer to an evicting policy (tova-layer, h2o-layer) to keep "
                        "one token set per layer, -head for one per KV head (halo-head), -token for one set for all "
                        "layers (halo-token; plain halo and halo-mean follow HaloConfig.granularity, per layer by default), +repair (e.g. halo+repair) to run it with "
                        f"single-pass self repair; default {','.join(ESSAY_POLICIES)} (essays), "
                        f"{','.join(CONVERSATION_POLICIES)} (conversation)")
    parser.add_argument("--text", type=Path, nargs="+", default=None,
                        help="essays: text files (the embedded pydoc text when not given)")
    parser.add_argument("--max-tokens", type=int, default=600, help="essays: tokens of each text to stream (0: all)")
    parser.add_argument("--depths", type=_csv(float), default=[0.1, 0.5, 0.9],
                        help="essays: depths at which a pass key is planted")
    parser.add_argument("--conversations", type=int, default=CONVERSATION_COUNT,
                        help="conversation: how many to generate")
    parser.add_argument("--flood-chars", type=_csv(int), default=list(FLOOD_SIZES),
                        help="conversation: total characters of tool/log output per conversation, cycled")
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds the pass keys or the conversations, and the random policy")
    parser.add_argument("--sinks", type=int, default=4, help="attention-sink tokens (protected, every policy)")
    parser.add_argument("--recent", type=int, default=None, help="recent window (protected, every policy; min(64, budget/4) when not given)")
    parser.add_argument("--recall-chunk", type=int, default=16,
                        help="essays: tokens per forward while streaming recall texts")
    parser.add_argument("--chunk", type=int, default=CONVERSATION_CHUNK,
                        help="conversation: most tokens per forward while feeding a message")
    parser.add_argument("--dark-bias", type=float, default=None, help="override HaloConfig.dark_bias")
    parser.add_argument("--alpha", type=float, default=None, help="override HaloConfig.alpha")
    parser.add_argument("--decay", type=float, default=None, help="override the decay of user text (the source streamed)")
    parser.add_argument("--set", dest="settings", type=_setting, action="append", default=[], metavar="KEY=VALUE",
                        help="set a HaloConfig field for every row (repeatable; VALUE read as TOML, `none` for None), "
                        "e.g. --set repair_margin=1.0 --set repair_rerank=none")
    parser.add_argument("--json", type=Path, default=None, help="write every record to this JSON file")
    parser.add_argument("--plot", type=Path, default=None, help="essays: draw perplexity ratio and recall to this PNG")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=main)


def _overrides(args) -> dict:
    import dataclasses

    from ..config import HaloConfig, default_sources

    out = {}
    if args.dark_bias is not None:
        out["dark_bias"] = args.dark_bias
    if args.alpha is not None:
        out["alpha"] = args.alpha
    if args.decay is not None:
        sources = default_sources()
        sources["user"] = dataclasses.replace(sources["user"], decay=args.decay)  # keeps initial and priority
        out["sources"] = sources
    out.update(dict(args.settings))
    try:
        HaloConfig(**out)  # a bad value fails here, before the model loads
    except TypeError as err:
        raise ValueError(f"--set: a value of the wrong type ({err})") from None
    return out


def main(args) -> int:
    if args.suite == "conversation":
        return conversation_main(args)
    return essays_main(args)


def conversation_main(args) -> int:
    """The conversation suite: a table of exact answers per policy and budget (and `--json` records)."""
    import torch

    from ..eval.conversation_runner import (CONVERSATION_BUDGETS, CONVERSATION_POLICIES, format_conversation_table,
                                            run_conversations)
    from ..models import load_model

    for flag, value in (("--text", args.text), ("--plot", args.plot)):
        if value is not None:
            raise ValueError(f"{flag} belongs to --suite essays")
    overrides = _overrides(args)
    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model, device=args.device)
    records = run_conversations(model, tokenizer, count=args.conversations,
                                budgets=args.budget or CONVERSATION_BUDGETS,
                                policies=args.policies or CONVERSATION_POLICIES, seed=args.seed, sinks=args.sinks,
                                recent=args.recent, chunk=args.chunk, flood_sizes=args.flood_chars,
                                progress=not args.quiet, config_overrides=overrides)
    print(format_conversation_table(records))
    if args.json is not None:
        args.json.write_text(json.dumps(records, indent=2) + "\n", encoding="utf-8")
    return 0


def essays_main(args) -> int:
    """Perplexity under budget and planted recall on texts (the embedded pydoc text by default)."""
    import torch

    from ..eval import evaluate, format_table, plot
    from ..eval.runner import ESSAY_POLICIES
    from ..models import load_model

    if args.text is None:
        from ..text import embedded_text

        texts = [embedded_text(max_chars=max(8 * args.max_tokens, 8000) if args.max_tokens else None)]
    else:
        for path in args.text:
            if not path.is_file():
                raise FileNotFoundError(f"no such text file: {path}")
        texts = [path.read_text(encoding="utf-8") for path in args.text]
    overrides = _overrides(args)
    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model, device=args.device)
    records = evaluate(model, tokenizer, texts, budgets=args.budget or ESSAY_BUDGETS,
                       policies=args.policies or ESSAY_POLICIES, depths=args.depths,
                       seed=args.seed, max_tokens=args.max_tokens or None, recent=args.recent, sinks=args.sinks,
                       recall_chunk=args.recall_chunk, progress=not args.quiet, config_overrides=overrides)
    print(format_table(records))
    if args.json is not None:
        args.json.write_text(json.dumps(records, indent=2) + "\n", encoding="utf-8")
    if args.plot is not None:
        plot(records, args.plot)
    return 0
