"""How far is a cull rule from foresight? Perplexity under budget when the victims are chosen by the attention
the full cache will pay each token later in the text (an oracle no online rule can run), against the leaky
brightness of Halo and the mean income of `halo-mean`, all in one masked-attention simulation.

The simulation keeps every K/V and hides the culled tokens from attention with a mask (per layer, or per KV head
of each layer), so it shares the model's numerics with the full run; it has no word or line units, no source
priority, no dark bias, and feeds one token per forward. Run from the repository root (minutes on 2 CPU cores):

    python benchmarks/future_oracle.py --max-tokens 600 --rules oracle,leaky,mean --granularity layer,head
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.integrations.sdpa_attention import repeat_kv

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from halo.models import load_model  # noqa: E402
from halo.text import embedded_text  # noqa: E402


class Simulation:
    """Per-layer state [Hkv, N] of one run: which tokens each (layer, KV head) still sees, and their scores."""

    def __init__(self, layers: int, kv_heads: int, n: int, rule: str, granularity: str, future=None):
        self.rule, self.granularity, self.future = rule, granularity, future
        self.alive = [torch.ones(kv_heads, n, dtype=torch.bool) for _ in range(layers)]
        fill = 128.0 if rule == "leaky" else 0.0  # leaky: conversation text's initial; mean: income since birth
        self.score = [torch.full((kv_heads, n), fill) for _ in range(layers)]
        self.attention = None  # the full run records [Hkv, N(query), N(key)] per layer here
        self.masked = rule != "full"

    def observe(self, layer: int, probs: torch.Tensor) -> None:
        """probs float32 [Hq, T] of the newest query row; update the layer's scores (mean over each GQA group)."""
        kv_heads, t = self.alive[layer].shape[0], probs.shape[-1]
        income = probs.view(kv_heads, -1, t).mean(1)
        if self.attention is not None:
            self.attention[layer][:, t - 1, :t] = income
        if self.rule not in ("leaky", "mean"):
            return
        alive, score = self.alive[layer][:, :t], self.score[layer][:, :t]
        if self.granularity == "layer":
            income = income.mean(0, keepdim=True).expand_as(income)
        seen = alive.sum(-1, keepdim=True).float()
        if self.granularity == "layer":
            seen = seen[:1].expand_as(seen)
        if self.rule == "leaky":  # Halo's rule: b = clamp(b + n * p - decay, 0, 255), decay 0.5, initial 128
            score.copy_(torch.where(alive, (score + seen * income - 0.5).clamp(0, 255), score))
        else:  # the income summed; divided by rows seen + 16 at the cull
            score.add_(torch.where(alive, seen * income, 0.0))

    def cull(self, t: int, budget: int, sinks: int, recent: int) -> None:
        """After the token at position t: every (layer, head) row over budget drops its lowest unprotected scores."""
        keys = torch.arange(t + 1)
        protected = (keys < sinks) | (keys > t - recent)
        for layer, alive in enumerate(self.alive):
            score = self._scores(layer, t)
            rows = range(alive.shape[0]) if self.granularity == "head" else [0]
            for row in rows:
                held = alive[row, : t + 1]
                over = int(held.sum()) - budget
                if over <= 0:
                    continue
                candidates = torch.where(held & ~protected, score[row], math.inf)
                victims = candidates.topk(over, largest=False).indices
                if self.granularity == "head":
                    alive[row, victims] = False
                else:
                    alive[:, victims] = False

    def _scores(self, layer: int, t: int) -> torch.Tensor:
        if self.rule == "oracle":  # attention every later query row of the full run pays each key
            future = self.future[layer][:, t, : t + 1]
            return future if self.granularity == "head" else future.mean(0, keepdim=True)
        score = self.score[layer][:, : t + 1]
        if self.rule == "mean":
            score = score / (t - torch.arange(t + 1) + 1 + 16.0)
        return score if self.granularity == "head" else score.mean(0, keepdim=True)


STATE: dict = {}


def masked_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager attention of one decode row with the simulation's per-head visibility; feeds the scores."""
    sim: Simulation = STATE["sim"]
    groups = query.shape[1] // key.shape[1]
    logits = (query @ repeat_kv(key, groups).transpose(-1, -2)) * scaling  # [1, Hq, 1, T]
    t = key.shape[2]
    if sim.masked:
        hidden = ~sim.alive[module.layer_idx][:, :t].repeat_interleave(groups, 0)
        logits = logits.masked_fill(hidden[None, :, None, :], float("-inf"))
    probs = logits.float().softmax(-1)
    sim.observe(module.layer_idx, probs[0, :, -1])
    return (probs.to(value.dtype) @ repeat_kv(value, groups)).transpose(1, 2).contiguous(), probs


def future_attention(attention: torch.Tensor) -> torch.Tensor:
    """[Hkv, N, N] attention of query row q on key k -> the sum over rows q > t, indexed [Hkv, t, k]."""
    after = attention.flip(1).cumsum(1).flip(1)  # sum over rows q >= t
    return torch.cat([after[:, 1:], torch.zeros_like(after[:, :1])], 1)


@torch.no_grad()
def perplexity(model, ids: list[int], sim: Simulation, budget: int, sinks: int, recent: int) -> float:
    """exp(mean nll) of the tokens after the first `budget`, fed one per forward with culls after each."""
    STATE["sim"] = sim
    cache, nll = DynamicCache(), []
    for t in range(len(ids) - 1):
        out = model(torch.tensor([[ids[t]]]), past_key_values=cache, use_cache=True, position_ids=torch.tensor([[t]]))
        if sim.masked:
            sim.cull(t, budget, sinks, recent)
        if t + 1 >= budget:
            nll.append(-float(out.logits[0, -1].float().log_softmax(-1)[ids[t + 1]]))
    return math.exp(sum(nll) / len(nll))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--text", help="a text file (default: the embedded pydoc text)")
    parser.add_argument("--max-tokens", type=int, default=600)
    parser.add_argument("--fractions", default="4,8", help="budgets as 1/k of the text")
    parser.add_argument("--rules", default="oracle,leaky,mean")
    parser.add_argument("--granularity", default="layer,head")
    args = parser.parse_args()
    model, tokenizer = load_model()
    AttentionInterface.register("halo_future_oracle", masked_attention)
    model.config._attn_implementation = "halo_future_oracle"
    text = Path(args.text).read_text() if args.text else embedded_text()
    ids = tokenizer(text)["input_ids"][: args.max_tokens]
    shape = (model.config.num_hidden_layers, model.config.num_key_value_heads, len(ids))
    print("| budget | rule | granularity | ppl / full |\n|---|---|---|---|")
    for fraction in (int(f) for f in args.fractions.split(",")):
        budget, sinks = len(ids) // fraction, 4
        recent = min(64, budget // 4)
        full = Simulation(*shape, "full", "layer")
        full.attention = [torch.zeros(shape[1], len(ids), len(ids)) for _ in range(shape[0])]
        reference = perplexity(model, ids, full, budget, sinks, recent)
        future = [future_attention(a) for a in full.attention]
        for rule in args.rules.split(","):
            for granularity in args.granularity.split(","):
                sim = Simulation(*shape, rule, granularity, future)
                ratio = perplexity(model, ids, sim, budget, sinks, recent) / reference
                print(f"| 1/{fraction} = {budget} | {rule} | {granularity} | {ratio:.3f} |", flush=True)


if __name__ == "__main__":
    main()
