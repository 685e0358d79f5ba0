"""`halo run`: stream a text (or chat transcript) through the model at a fixed budget and show what stayed."""

from __future__ import annotations

import time
from pathlib import Path

from .common import add_config_options, add_model_options, config_from_args, print_stats, read_transcript


def add_parser(sub) -> None:
    parser = sub.add_parser("run", help="stream a text through the model at a fixed KV budget",
                            description="Stream a text file or chat transcript through the model with the KV cache "
                            "held at --budget tokens; print the remembered text, what was forgotten, and stats.")
    add_model_options(parser)
    add_config_options(parser)
    parser.add_argument("--text", type=Path, default=None, help="text file, or .json/.jsonl transcript of {role, content} "
                        "messages (default: the embedded pydoc_data.topics text)")
    parser.add_argument("--source", default="user", help="source of a plain text file: user (default), assistant, system, tool, log, ...")
    parser.add_argument("--max-tokens", type=int, default=2000, help="stop streaming after this many tokens (default 2000; 0: no limit)")
    parser.add_argument("--step", type=int, default=16, help="tokens per feed call while streaming (default 16)")
    parser.add_argument("--generate", type=int, default=0, metavar="N", help="generate N tokens after the text (default 0)")
    parser.add_argument("--journal", type=Path, default=None, help="append every evicted token to this JSONL file as it happens")
    parser.add_argument("--html", type=Path, default=None, metavar="OUT.html",
                        help="write a self-contained page of the remembered text coloured by brightness, and the journal")
    parser.add_argument("--png", type=Path, default=None, metavar="OUT.png",
                        help="plot brightness over position and the retained size over time")
    parser.add_argument("--save", type=Path, default=None, metavar="FILE", help="save the session (memory, journal) to FILE at the end")
    parser.add_argument("--quiet", action="store_true", help="print only the stats")
    parser.set_defaults(func=main)


def _messages(args) -> list[tuple[str, str]]:
    if args.text is None:
        from ..text import embedded_text

        return [(args.source, embedded_text(max_chars=max(4 * args.max_tokens, 4000) if args.max_tokens else None))]
    if not args.text.is_file():
        raise FileNotFoundError(f"no such text file: {args.text}")
    messages = read_transcript(args.text)
    return [(args.source if args.text.suffix not in (".json", ".jsonl") else role, text) for role, text in messages]


def main(args) -> int:
    import torch
    from tqdm import tqdm

    from ..models import load_model
    from ..session import Session

    config = config_from_args(args)
    messages = _messages(args)
    model, tokenizer = load_model(args.model, device=args.device)
    session = Session(model, tokenizer, config)
    if args.journal is not None:
        session.journal.open_sink(args.journal)
    limit = args.max_tokens or None
    encoded = [(source, tokenizer(text, add_special_tokens=False)["input_ids"]) for source, text in messages]
    total = sum(len(ids) for _, ids in encoded)
    total = min(total, limit) if limit else total
    started = time.perf_counter()
    retained: list[int] = []  # retained count after every feed call / generated token
    with tqdm(total=total, unit="tok", desc="streaming", disable=args.quiet) as bar:
        fed = 0
        for source, ids in encoded:
            for start in range(0, len(ids), args.step):
                piece = ids[start:start + args.step][: total - fed]
                if not piece:
                    break
                session.feed_ids(torch.tensor(piece), source=source)
                fed += len(piece)
                retained.append(session.cache.n_valid)
                bar.update(len(piece))
                bar.set_postfix(retained=session.cache.n_valid, evicted=session.journal.count("evicted"))
    produced = [0]

    def on_token(_token_id: int) -> None:  # called before each generated token is fed: record the previous step
        if produced[0]:
            retained.append(session.cache.n_valid)
        produced[0] += 1

    reply = session.generate(args.generate, on_token=on_token) if args.generate else None
    if produced[0]:
        retained.append(session.cache.n_valid)
    elapsed = time.perf_counter() - started
    session.journal.close()
    stats = session.stats()
    if args.html is not None:
        session.render_html(args.html)
    if args.png is not None:
        from ..render import write_png

        write_png(session, args.png, retained)
    if args.save is not None:
        session.save(args.save)
    if not args.quiet:
        print("=== remembered text ===")
        print(session.memory_text())
        if reply is not None:
            print("=== generated ===")
            print(reply)
        forgotten = session.journal.evicted
        print(f"=== forgotten: {len(forgotten)} tokens ===")
        print(tokenizer.decode([e.token_id for e in sorted(forgotten, key=lambda e: e.position)][:200]) +
              (" ..." if len(forgotten) > 200 else ""))
    print("=== stats ===")
    stats["tokens_per_second"] = stats["tokens_fed"] / elapsed if elapsed else 0.0
    print_stats(stats)
    return 0
