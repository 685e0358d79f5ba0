"""CUDA-graph replay of a repair forward (`body -> gather target rows -> vocab head`).

The body is the masked LM's base model (`MaskedLMRepairer`) or the host decoder (`SelfRepairer`, which passes
it a prepared 4D mask so that nothing in it depends on data on the host).

Shapes are bucketed: a call with B windows of L MLM tokens runs the graph captured for the smallest
(batch bucket >= B, length bucket >= L), padding the extra rows and columns in preallocated static input
buffers. Each bucket is captured once (after a warm-up on a side stream) into a memory pool shared by all
buckets, then replayed: no Python dispatch, no allocation, no host synchronisation per call. Padding rows keep
their first column visible so no attention row is fully masked.

Off CUDA (or for shapes beyond the largest bucket) the same computation runs eagerly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

DEFAULT_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
DEFAULT_LENGTH_BUCKETS = (64, 128, 256, 512)


def _bucket(value: int, buckets: Sequence[int]) -> int | None:
    for b in buckets:
        if value <= b:
            return b
    return None


@dataclass
class _Captured:
    graph: "torch.cuda.CUDAGraph"
    input_ids: torch.Tensor  # int64 [Bb, Lb]
    attention_mask: torch.Tensor  # int64 [Bb, Lb]
    target_rows: torch.Tensor  # int64 [Bb]
    scale: torch.Tensor | None  # float [Bb, Lb] (soft guidance graphs only)
    logits: torch.Tensor  # [Bb, V] written by every replay


class GraphedRepairForward:
    """Callable `(input_ids [B, L], attention_mask [B, L], target_rows [B], scale [B, L] | None) -> logits [B, V]`.

    Args:
        base: called with `input_ids` or `inputs_embeds` and `attention_mask` [B, L]; returns hidden states
            [B, L, H], or a tuple / model output holding them first (e.g. an MLM's `model.base_model`).
        head: hidden [N, H] -> logits [N, V] (e.g. `masked_lm.masked_lm_head(model)`).
        pad_token_id: id written into padding.
        embeddings: the input embedding module (soft guidance: `inputs_embeds = embeddings(ids) * scale`).
        batch_buckets, length_buckets: the static shapes captured on demand.
        max_length: length buckets above it are dropped (the MLM's position limit).
        warmup: eager iterations on a side stream before each capture.
    """

    def __init__(self, base: torch.nn.Module, head: Callable[[torch.Tensor], torch.Tensor], *, pad_token_id: int = 0,
                 embeddings: torch.nn.Module | None = None, batch_buckets: Sequence[int] = DEFAULT_BATCH_BUCKETS,
                 length_buckets: Sequence[int] = DEFAULT_LENGTH_BUCKETS, max_length: int = 512, warmup: int = 2):
        self.base = base
        self.head = head
        self.embeddings = embeddings
        self.pad_token_id = int(pad_token_id)
        self.batch_buckets = tuple(sorted(batch_buckets))
        self.length_buckets = tuple(sorted(b for b in length_buckets if b <= max_length)) or (int(max_length),)
        self.warmup = int(warmup)
        self._graphs: dict[tuple[int, int, bool], _Captured] = {}
        self._pool = None

    @property
    def captured_shapes(self) -> list[tuple[int, int, bool]]:
        """The (batch bucket, length bucket, soft) graphs captured so far."""
        return sorted(self._graphs)

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               scale: torch.Tensor | None = None) -> torch.Tensor:
        """The body's hidden states [B, L, H] (soft guidance: input embeddings scaled by `scale` [B, L])."""
        if scale is None:
            out = self.base(input_ids=input_ids, attention_mask=attention_mask)
        else:
            emb = self.embeddings(input_ids)
            out = self.base(inputs_embeds=emb * scale.to(emb.dtype)[..., None], attention_mask=attention_mask)
        return out if isinstance(out, torch.Tensor) else out[0]

    def eager(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, target_rows: torch.Tensor,
              scale: torch.Tensor | None = None) -> torch.Tensor:
        """The same computation without graphs: logits [B, V] at the target rows."""
        hidden = self.hidden(input_ids, attention_mask, scale)
        picked = hidden[torch.arange(input_ids.shape[0], device=input_ids.device), target_rows]
        return self.head(picked)

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, target_rows: torch.Tensor,
                 scale: torch.Tensor | None = None) -> torch.Tensor:
        b, length = input_ids.shape
        bb, lb = _bucket(b, self.batch_buckets), _bucket(length, self.length_buckets)
        soft = scale is not None
        if input_ids.device.type != "cuda" or bb is None or lb is None or (soft and self.embeddings is None):
            return self.eager(input_ids, attention_mask, target_rows, scale)
        cap = self._graphs.get((bb, lb, soft))
        if cap is None:
            cap = self._capture(bb, lb, soft, input_ids.device)
            self._graphs[(bb, lb, soft)] = cap
        cap.input_ids.fill_(self.pad_token_id)
        cap.input_ids[:b, :length].copy_(input_ids)
        cap.attention_mask.zero_()
        cap.attention_mask[:, 0] = 1
        cap.attention_mask[:b, :length].copy_(attention_mask)
        cap.target_rows.zero_()
        cap.target_rows[:b].copy_(target_rows)
        if soft:
            cap.scale.fill_(1.0)
            cap.scale[:b, :length].copy_(scale)
        cap.graph.replay()
        return cap.logits[:b].clone()

    def _capture(self, bb: int, lb: int, soft: bool, device: torch.device) -> _Captured:
        ids = torch.full((bb, lb), self.pad_token_id, dtype=torch.int64, device=device)
        attn = torch.zeros(bb, lb, dtype=torch.int64, device=device)
        attn[:, 0] = 1
        rows = torch.zeros(bb, dtype=torch.int64, device=device)
        scale = torch.ones(bb, lb, dtype=torch.float32, device=device) if soft else None

        def run():
            return self.eager(ids, attn, rows, scale)

        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                run()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = run()
        self._pool = graph.pool()
        return _Captured(graph, ids, attn, rows, scale, logits)
