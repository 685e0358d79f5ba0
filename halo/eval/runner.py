"""The evaluator: perplexity under budget, planted-fact recall and per-step cost, for every policy and budget.

Every policy runs on the same HaloCache machinery with the same budget, protected set and model; `full` is the
same session with a budget of at least the text length (nothing is ever evicted).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from fractions import Fraction

import torch

from ..baselines import make_policy
from ..config import HaloConfig
from ..session import Session
from .coherence import session_coherence
from .plant import boundary_offsets, plant_fact, question_ids, recalled

RECORD_KEYS = ("policy", "budget", "ppl", "ppl_ratio", "recall", "coherence", "coherence_run", "halo_seconds",
               "model_seconds", "tokens")
"""The exact key set of one evaluation record (one per policy and budget)."""

ANSWER_TOKENS = 8


@dataclass
class StreamResult:
    """One token-by-token pass: `nll[i]` is -log p(ids[i + 1] | retained cache after feeding ids[: i + 1]);
    `coherence` is the host model's perplexity of the memory left at the end (halo.eval.coherence);
    `coherence_run` the geometric mean of that perplexity sampled every `COHERENCE_EVERY` fed tokens while the
    cache is at its budget (for `full`, over the whole text): one end state is a noisy sample of how a memory reads."""

    nll: list[float]
    halo_seconds: float
    model_seconds: float
    steps: int
    max_retained: int = 0
    coherence: float = float("nan")
    coherence_run: float = float("nan")


COHERENCE_EVERY = 25
"""Fed tokens between two samples of `StreamResult.coherence_run`."""


def parse_budget(spec: str | int) -> int | Fraction:
    """`256` -> 256 tokens; `1/4` or `0.25` -> a fraction of each text's length."""
    if isinstance(spec, int):
        return spec
    spec = str(spec).strip()
    if "/" in spec or "." in spec:
        value = Fraction(spec)
        if not 0 < value <= 1:
            raise ValueError(f"a fractional budget must be in (0, 1], got {spec}")
        return value
    return int(spec)


def resolve_budget(spec: int | Fraction, length: int) -> int:
    return spec if isinstance(spec, int) else max(1, int(length * spec))


def budget_label(spec: int | Fraction) -> str:
    return str(spec)


def eval_config(budget: int, *, sinks: int = 4, recent: int | None = None, chunk: int = 1, **extra) -> HaloConfig:
    """The config every policy shares at a budget: `recent` defaults to min(64, budget // 4)."""
    if recent is None:
        recent = min(HaloConfig().recent_tokens, budget // 4)
    return HaloConfig(budget=budget, sink_tokens=sinks, recent_tokens=recent, chunk_size=chunk, **extra)


REPAIR_SUFFIX = "+repair"
"""`halo+repair` (any policy name plus this suffix) runs that policy with single-pass self repair switched on."""
RECALL_SUFFIX = "+recall"
"""`halo+recall` runs that policy per layer with recall switched on (HaloConfig(recall=True), halo.recall);
`halo-head+recall` per KV head."""
EXTRA_SUFFIXES = {REPAIR_SUFFIX: {"repair": "self"}, RECALL_SUFFIX: {"recall": True, "granularity": "layer"}}
HALO_POLICIES = ("halo", "halo-mean")
"""Rows that run with the config's granularity when the name has no granularity suffix."""
GRANULARITY_SUFFIXES = {"-layer": "layer", "-token": "token", "-head": "head"}
"""`tova-layer` (any evicting policy plus `-layer`) runs that policy with one retained set per layer
(HaloConfig(granularity="layer")), `halo-head` with one per KV head, `halo-token` with one set for all layers.
Without a suffix the published baselines run token-level, as published, and `halo` runs with the config's
granularity (per layer by default)."""


def policy_setup(name: str, config: HaloConfig) -> tuple[str, HaloConfig]:
    """(the cull policy's name, the config it runs with) for an evaluator row name such as `halo`, `tova-layer`,
    `halo-token`, `halo+repair` or `halo+recall` (suffixes stack: `halo+recall+repair`)."""
    base, extras = _split_extras(name)
    for suffix, granularity in GRANULARITY_SUFFIXES.items():
        if base.endswith(suffix):
            return base.removesuffix(suffix), _with_granularity(config.replace(**extras), granularity)
    if base not in HALO_POLICIES and "recall" not in extras:
        config = _with_granularity(config, "token")  # the baselines as published (and `full`: nothing to cull)
    return base, config.replace(**extras)


def _with_granularity(config: HaloConfig, granularity: str) -> HaloConfig:
    """`config` at `granularity`; a token-level row drops `value_weight`, which only per-layer and per-head
    memory read."""
    if granularity == "token":
        return config.replace(granularity=granularity, value_weight=0.0)
    return config.replace(granularity=granularity)


def base_policy(name: str) -> str:
    """The row's cull policy (or `full` / `oracle`) without its extras: `halo+recall` -> `halo`."""
    return _split_extras(name)[0]


def _split_extras(name: str) -> tuple[str, dict]:
    """(the name without its `+repair` / `+recall` suffixes, the config changes they ask for)."""
    extras: dict = {}
    while suffix := next((s for s in EXTRA_SUFFIXES if name.endswith(s)), None):
        name, extras = name.removesuffix(suffix), {**extras, **EXTRA_SUFFIXES[suffix]}
    return name, extras


def check_policies(policies, overrides: dict | None = None, own_rows=("full",)) -> None:
    """ValueError, before any row runs, naming the first policy that is neither a row of its own (`own_rows`) nor
    a cull policy, or whose config (the overrides, then its suffixes) HaloConfig refuses."""
    for name in policies:
        if name not in own_rows:
            base, _ = policy_setup(name, HaloConfig(**(overrides or {})))
            if base not in own_rows:
                make_policy(base)


def _session(model, tokenizer, config: HaloConfig, policy_name: str, seed: int) -> Session:
    base, config = policy_setup(policy_name, config)
    policy = None if base == "full" else make_policy(base, seed=seed)
    return Session(model, tokenizer, config, policy=policy)


def full_config(config: HaloConfig, length: int) -> HaloConfig:
    """`config` with a budget no text of `length` tokens ever exceeds (the `full` baseline)."""
    return config.replace(budget=max(config.budget, length + config.chunk_size + 1))


def stream_nll(model, tokenizer, ids: list[int], config: HaloConfig, policy_name: str, *, seed: int = 0,
               on_step=None) -> StreamResult:
    """Feed `ids` one token per forward (cache culled back to the budget after each) and score every next token."""
    if policy_name == "full":
        config = full_config(config, len(ids))
    session = _session(model, tokenizer, config, policy_name, seed)
    tokens = torch.tensor(ids, dtype=torch.int64)
    nll: list[float] = []
    samples: list[float] = []  # log memory ppl every COHERENCE_EVERY tokens at the budget
    max_retained = 0
    for i in range(len(ids)):
        logits = session.step(tokens[i:i + 1], "user")
        max_retained = max(max_retained, session.cache.n_valid)
        if i + 1 < len(ids):
            nll.append(float(-torch.log_softmax(logits.float(), -1)[ids[i + 1]]))
        if (i + 1) % COHERENCE_EVERY == 0 and i > 0 and (policy_name == "full" or session.cache.seen > config.budget):
            samples.append(math.log(session_coherence(session)))
        if on_step is not None:
            on_step(session)
    stats = session.stats()
    run = math.exp(sum(samples) / len(samples)) if samples else float("nan")
    return StreamResult(nll, stats["halo_seconds"], stats["model_seconds"], stats["steps"], max_retained,
                        session_coherence(session), run)


def perplexity(nll: list[float], skip: int) -> float:
    """exp(mean nll) over the targets at token index >= skip (nll[i] scores token i + 1)."""
    tail = nll[max(0, skip - 1):]
    return math.exp(sum(tail) / len(tail)) if tail else float("nan")


def recall_probe(model, tokenizer, planted_ids: list[int], key: str, config: HaloConfig, policy_name: str, *,
                 seed: int = 0, chunk: int = 1, on_feed=None) -> tuple[bool, str]:
    """Stream the planted text `chunk` tokens per forward, ask for the key, greedy-read it back."""
    total = len(planted_ids) + len(question_ids(tokenizer)) + ANSWER_TOKENS
    config = config.replace(chunk_size=chunk)
    if policy_name == "full":
        config = full_config(config, total)
    session = _session(model, tokenizer, config, policy_name, seed)
    for start in range(0, len(planted_ids), chunk):
        piece = planted_ids[start:start + chunk]
        session.feed_ids(torch.tensor(piece, dtype=torch.int64))
        if on_feed is not None:
            on_feed(len(piece))
    session.feed_ids(torch.tensor(question_ids(tokenizer), dtype=torch.int64))
    reply = session.generate(ANSWER_TOKENS)
    return recalled(reply, key), reply


@dataclass
class _Acc:
    nll: float = 0.0
    count: int = 0
    halo: float = 0.0
    model: float = 0.0
    steps: int = 0
    recall: dict = field(default_factory=dict)
    coherence: list = field(default_factory=list)
    coherence_run: list = field(default_factory=list)
    budgets: set = field(default_factory=set)


ESSAY_POLICIES = ("full", "streaming", "h2o", "tova", "random", "h2o-layer", "tova-layer", "halo-token", "halo")
"""The rows `halo eval` reports by default: the published baselines, their per-layer variants, and Halo with one
token set for all layers and with its default (one per layer)."""


def evaluate(model, tokenizer, texts: list[str], *, budgets=("1/4", "1/8"), policies=ESSAY_POLICIES,
             depths=(0.1, 0.5, 0.9), seed: int = 0, max_tokens: int | None = 600, recent: int | None = None,
             sinks: int = 4, recall_chunk: int = 16, progress: bool = True, config_overrides: dict | None = None) -> list[dict]:
    """Run every policy at every budget on every text; one record per (policy, budget), keys `RECORD_KEYS`.

    ppl is over the tokens after the first `budget` of each text (pooled over texts), ppl_ratio is ppl / full's
    ppl on the same tokens, recall maps each depth (as a string) to the fraction of texts whose key came back,
    coherence is the mean over texts of the host model's perplexity of the memory each perplexity pass ends with
    (read from scratch, holes and markers included: lower reads more fluently; for `full`, the whole text),
    coherence_run the mean over texts of `StreamResult.coherence_run` (the same, sampled along the run),
    halo_seconds / model_seconds / tokens are the totals of the perplexity passes (per-step cost = s / tokens).
    """
    from tqdm import tqdm

    policies = list(policies)
    overrides = dict(config_overrides or {})
    check_policies(policies, overrides)
    specs = [parse_budget(b) for b in budgets]
    encoded = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = ids[:max_tokens] if max_tokens else ids
        if len(ids) < 8:
            raise ValueError(f"text too short to evaluate ({len(ids)} tokens)")
        encoded.append(ids)
    rng = random.Random(seed)
    plan = []  # (text index, spec, budget)
    for t, ids in enumerate(encoded):
        for spec in specs:
            plan.append((t, spec, resolve_budget(spec, len(ids))))
    keys = [[make_key_for(rng) for _ in depths] for _ in encoded]
    evicting = [p for p in policies if p != "full"]
    n_ppl = sum(len(ids) for ids in encoded) * ((1 if "full" in policies or evicting else 0) + len(evicting) * len(specs))
    n_rec = sum(len(ids) for ids in encoded) * len(depths) * ((1 if evicting else 0) + len(evicting) * len(specs))
    accs: dict[tuple[str, str], _Acc] = {}
    with tqdm(total=n_ppl + n_rec, unit="tok", desc="eval", disable=not progress) as bar:
        full_runs: dict[int, StreamResult] = {}
        full_recall: dict[tuple[int, int], bool] = {}
        planted_cache: dict[tuple[int, int], object] = {}
        for t, ids in enumerate(encoded):
            base = eval_config(len(ids) + 1, sinks=sinks, recent=0, **overrides)
            full_runs[t] = stream_nll(model, tokenizer, ids, base, "full", seed=seed, on_step=lambda s: bar.update(1))
            bounds = boundary_offsets(tokenizer, ids)
            for d, depth in enumerate(depths):
                planted_cache[t, d] = plant_fact(tokenizer, ids, depth, keys[t][d], boundaries=bounds)
                if evicting or "full" in policies:
                    p = planted_cache[t, d]
                    full_recall[t, d], _ = recall_probe(model, tokenizer, p.ids, p.key, base, "full", seed=seed,
                                                        chunk=recall_chunk, on_feed=bar.update)
        for t, spec, budget in plan:
            ids = encoded[t]
            config = eval_config(budget, sinks=sinks, recent=recent, chunk=1, **overrides)
            skip = budget
            full = full_runs[t]
            for name in policies:
                acc = accs.setdefault((name, budget_label(spec)), _Acc())
                acc.budgets.add(budget)
                if name == "full":
                    run = full
                    rec = [full_recall[t, d] for d in range(len(depths))]
                else:
                    bar.set_postfix(policy=name, budget=budget)
                    run = stream_nll(model, tokenizer, ids, config, name, seed=seed, on_step=lambda s: bar.update(1))
                    rec = []
                    for d in range(len(depths)):
                        p = planted_cache[t, d]
                        hit, _ = recall_probe(model, tokenizer, p.ids, p.key, config, name, seed=seed,
                                              chunk=recall_chunk, on_feed=bar.update)
                        rec.append(hit)
                tail = run.nll[max(0, skip - 1):]
                acc.nll += sum(tail)
                acc.count += len(tail)
                acc.coherence.append(run.coherence)
                acc.coherence_run.append(run.coherence_run)
                acc.halo += run.halo_seconds
                acc.model += run.model_seconds
                acc.steps += run.steps
                for d, depth in enumerate(depths):
                    acc.recall.setdefault(str(depth), []).append(1.0 if rec[d] else 0.0)
    records = []
    for spec in specs:
        label = budget_label(spec)
        full_nll = 0.0
        full_count = 0
        for t, ids in enumerate(encoded):
            tail = full_runs[t].nll[max(0, resolve_budget(spec, len(ids)) - 1):]
            full_nll += sum(tail)
            full_count += len(tail)
        full_ppl = math.exp(full_nll / full_count) if full_count else float("nan")
        for name in policies:
            acc = accs[name, label]
            ppl = math.exp(acc.nll / acc.count) if acc.count else float("nan")
            budget_value = next(iter(acc.budgets)) if len(acc.budgets) == 1 else label
            records.append({
                "policy": name,
                "budget": budget_value,
                "ppl": ppl,
                "ppl_ratio": ppl / full_ppl if full_ppl else float("nan"),
                "recall": {k: sum(v) / len(v) for k, v in acc.recall.items()},
                "coherence": sum(acc.coherence) / len(acc.coherence) if acc.coherence else float("nan"),
                "coherence_run": sum(acc.coherence_run) / len(acc.coherence_run) if acc.coherence_run else float("nan"),
                "halo_seconds": acc.halo,
                "model_seconds": acc.model,
                "tokens": acc.steps,
            })
    return records


def make_key_for(rng: random.Random) -> str:
    from .plant import make_key

    return make_key(rng)


def format_table(records: list[dict]) -> str:
    """A Markdown table of the records."""
    depths = list(records[0]["recall"]) if records else []
    head = ["policy", "budget", "ppl", "ppl / full"] + [f"recall@{d}" for d in depths] + ["recall mean", "memory ppl",
                                                                                     "memory ppl (run)", "halo ms/step",
                                                                                     "model ms/step"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in records:
        rec = [r["recall"][d] for d in depths]
        steps = max(1, r["tokens"])
        row = [r["policy"], str(r["budget"]), f"{r['ppl']:.3f}", f"{r['ppl_ratio']:.3f}"] + [f"{v:.2f}" for v in rec]
        row += [f"{sum(rec) / len(rec):.2f}" if rec else "-", f"{r['coherence']:.2f}", f"{r['coherence_run']:.2f}",
                f"{1000 * r['halo_seconds'] / steps:.1f}", f"{1000 * r['model_seconds'] / steps:.1f}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot(records: list[dict], path) -> None:
    """PNG: perplexity ratio vs budget per policy (left), recall vs depth per policy and budget (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    policies = list(dict.fromkeys(r["policy"] for r in records))
    budgets = list(dict.fromkeys(str(r["budget"]) for r in records))
    styles = ["-", "--", ":", "-."]
    for name in policies:
        rows = [r for r in records if r["policy"] == name]
        left.plot([budgets.index(str(r["budget"])) for r in rows], [r["ppl_ratio"] for r in rows], marker="o", label=name)
        for r in rows:
            depths = list(r["recall"])
            style = styles[budgets.index(str(r["budget"])) % len(styles)]
            right.plot([float(d) for d in depths], [r["recall"][d] for d in depths], style, marker="o",
                       label=f"{name} @ {r['budget']}")
    left.set_xticks(range(len(budgets)), budgets)
    left.set_xlabel("budget")
    left.set_ylabel("perplexity / full")
    left.set_title("Perplexity under budget")
    left.legend(fontsize=8)
    right.set_xlabel("fact depth")
    right.set_ylabel("recall")
    right.set_ylim(-0.05, 1.05)
    right.set_title("Planted-fact recall")
    right.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
