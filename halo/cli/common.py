"""Options and helpers shared by subcommands: model choice and the engine configuration."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from ..config import GRANULARITIES, ROPE_POSITIONS, HaloConfig


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="hub name or local folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """Engine flags. Their parser defaults are None so that `--config FILE` values apply unless a flag is given."""
    d = HaloConfig()
    parser.add_argument("--config", type=Path, default=None, metavar="TOML",
                        help="TOML file of HaloConfig fields (budget, sink_tokens, recent_tokens, chunk_size, alpha, "
                        "dark_bias, cull_threshold, marker_text, unit_sources, ...) and a [sources.NAME] table per "
                        "source (initial, decay, pinned); flags given on the command line override it")
    parser.add_argument("--budget", type=int, default=None, help=f"tokens kept in the KV cache (default {d.budget})")
    parser.add_argument("--sinks", type=int, default=None, help=f"attention-sink tokens always kept (default {d.sink_tokens})")
    parser.add_argument("--recent", type=int, default=None, help=f"grace window of newest tokens always kept (default {d.recent_tokens})")
    parser.add_argument("--chunk", type=int, default=None, help=f"most tokens per forward when feeding (default {d.chunk_size})")
    parser.add_argument("--dark-bias", type=float, default=None, help=f"weight of the dark-neighbourhood term in the cull score (default {d.dark_bias})")
    parser.add_argument("--cull-threshold", type=float, default=None, help="brightness at which tokens die of neglect even under budget (default: off)")
    parser.add_argument("--granularity", choices=GRANULARITIES, default=None,
                        help="'layer': every layer keeps its own budget of tokens by its own attention; 'head': every "
                        f"KV head of every layer; 'token': one token set for all layers (default {d.granularity})")
    parser.add_argument("--repair", default=None, metavar="BACKEND",
                        help="single-pass repair of dim tokens next to the holes: 'self' (the host model) or a "
                        "masked-LM name or folder (default: off)")
    parser.add_argument("--repair-threshold", type=float, default=None,
                        help=f"tokens dimmer than this may be repaired (default {d.repair_threshold})")
    parser.add_argument("--recall", action="store_true", default=None,
                        help="bring forgotten text back when the conversation points at it (needs --granularity "
                        "layer, the default, or head; default: off)")
    parser.add_argument("--rope-positions", choices=ROPE_POSITIONS, default=None,
                        help="what RoPE sees: each token's position in the text, or its rank in the remembered "
                        "memory, so culled stretches leave no gap; auto: memory with --recall, else text "
                        f"(default {d.rope_positions})")
    parser.add_argument("--reference", action="store_true", help="force the plain-PyTorch reference path (no fused kernels)")


_FLAG_FIELDS = {"budget": "budget", "sinks": "sink_tokens", "recent": "recent_tokens", "chunk": "chunk_size",
                "dark_bias": "dark_bias", "cull_threshold": "cull_threshold", "repair": "repair",
                "repair_threshold": "repair_threshold", "granularity": "granularity", "recall": "recall",
                "rope_positions": "rope_positions"}


def read_config_file(path: Path) -> dict:
    """HaloConfig keyword arguments from a TOML file (sources merged over the defaults); ValueError on bad keys."""
    import tomllib

    from ..config import SourcePolicy

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such config file: {path}")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path}: invalid TOML: {err}") from None
    fields = {f.name for f in dataclasses.fields(HaloConfig)}
    unknown = set(data) - fields
    if unknown:
        raise ValueError(f"{path}: unknown config keys {sorted(unknown)}; known: {sorted(fields)}")
    if "sources" in data:
        tables = data["sources"]
        if not isinstance(tables, dict):
            raise ValueError(f"{path}: 'sources' must be tables [sources.NAME]")
        sources = dict(HaloConfig().sources)
        policy_fields = {f.name for f in dataclasses.fields(SourcePolicy)}
        for name, table in tables.items():
            if not isinstance(table, dict) or set(table) - policy_fields:
                raise ValueError(f"{path}: [sources.{name}] may only set {sorted(policy_fields)}")
            base = dataclasses.asdict(sources[name]) if name in sources else {}
            sources[name] = SourcePolicy(**(base | table))
        data["sources"] = sources
    if "unit_sources" in data:
        data["unit_sources"] = tuple(data["unit_sources"])
    return data


def config_from_args(args) -> HaloConfig:
    """HaloConfig from defaults, then `--config` (if any), then the flags given."""
    values = read_config_file(args.config) if getattr(args, "config", None) is not None else {}
    for flag, field in _FLAG_FIELDS.items():
        value = getattr(args, flag, None)
        if value is not None:
            values[field] = value
    if getattr(args, "reference", False):
        values["kernels"] = "reference"
    try:
        return HaloConfig(**values)
    except TypeError as err:
        raise ValueError(f"bad config: {err}") from None


def read_transcript(path: Path) -> list[tuple[str, str]]:
    """(source, text) pairs from a text file (one `user` message) or a JSON/JSONL chat transcript.

    A transcript is a list of {"role": ..., "content": ...} objects; roles map to sources of the same name.
    """
    raw = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        messages = [json.loads(line) for line in raw.splitlines() if line.strip()]
    elif path.suffix == ".json":
        messages = json.loads(raw)
    else:
        return [("user", raw)]
    try:
        return [(m["role"], m["content"]) for m in messages]
    except (TypeError, KeyError) as err:
        raise ValueError(f"{path}: a transcript is a list of {{'role', 'content'}} objects ({err})") from None


def print_stats(stats: dict) -> None:
    """One `key: value` line per stat, keys right-aligned, floats to three decimals."""
    for key, value in stats.items():
        print(f"{key:>18}: {value:.3f}" if isinstance(value, float) else f"{key:>18}: {value}")
