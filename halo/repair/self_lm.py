"""Self repair backend: the host causal LM re-predicts each target from its left context in the window.

One batched forward per `repair` call over the right-padded windows (same vocabulary, no bridge): the decoder
runs to hidden states, the K rows at `target - 1` are gathered, and only they go through the LM head. A target
at window index 0 has no left context and gets no suggestion. With the host tokenizer, candidates are restricted
to the target's kind (`kinds.py`: a whole word only by a whole word, a suffix by a suffix, a symbol by a
symbol; whitespace, byte and special targets get none) by one [K, V] mask on device. Hard guidance zeroes the
attention mask at dim context positions (position ids stay those of the full window); soft guidance scales their
input embeddings.

Right-context re-ranking (`rerank_top=c`). Picking the top c of the left-context distribution and then scoring
them would need the forward's own output as its input, i.e. a second pass. Instead the candidates are fixed
before the pass: the current token plus its c - 1 nearest neighbours in the host's output-embedding space
(cosine over the LM head rows, the model's own notion of interchangeable tokens). The batch holds K * c
sequences (window k with candidate i at the target), truncated after `rerank_span` right-context tokens (a
causal LM never looks further), and the single forward scores every candidate by
`log p(x | left) + sum_t log p(w_t | left, x, w_<t)` over the right context. The suggestion is the best-scoring
candidate; its margin is its score minus the current token's. Neighbours of another kind than the current
token are never candidates (with fewer than c - 1 of its kind, the remaining slots score -inf).
"""

from __future__ import annotations

import torch

from .base import Repairer, Suggestions
from .contract import RepairBatch
from .graphs import GraphedRepairForward
from .kinds import candidate_mask, token_kinds


class SelfRepairer(Repairer):
    """Repair with the host causal LM itself (Llama-family `*ForCausalLM`).

    Args:
        model: the host causal LM (its decoder is `model.get_decoder()` / `model.base_model`, its head
            `model.get_output_embeddings()`).
        tokenizer: the host tokenizer (its pad id fills padding, its pieces give each token's kind); optional:
            without it candidates are not restricted by kind.
        rerank_top: None, or c >= 2 candidates to re-rank with the right context (see the module docstring).
        rerank_span: right-context tokens scored per candidate.
        guidance, repair_threshold, min_margin: see `halo.repair.base`.
        cuda_graphs: replay captured CUDA graphs of the left-context forward for bucketed shapes
            (`graphs.py`); None (the default) does on CUDA. The re-ranking forward always runs eagerly.
    """

    def __init__(self, model, tokenizer=None, *, rerank_top: int | None = None, rerank_span: int = 32,
                 guidance: str = "hard", repair_threshold: float = 64.0, min_margin: float = 0.0,
                 cuda_graphs: bool | None = None):
        super().__init__(guidance=guidance, repair_threshold=repair_threshold, min_margin=min_margin)
        if rerank_top is not None and int(rerank_top) < 2:
            raise ValueError(f"rerank_top must be None or >= 2, got {rerank_top}")
        if rerank_span < 1:
            raise ValueError(f"rerank_span must be >= 1, got {rerank_span}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.rerank_top = None if rerank_top is None else int(rerank_top)
        self.rerank_span = int(rerank_span)
        self.decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
        self.head = model.get_output_embeddings()
        self.vocab_size = int(self.head.weight.shape[0])
        pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
        self.pad_id = int(pad) if pad is not None and 0 <= pad < self.vocab_size else 0
        self.softcap = getattr(model.config, "final_logit_softcapping", None)
        self._neighbour_cache = None
        # int8 [V] kind of every host id (`kinds.py`), or None without a tokenizer
        self.kinds = token_kinds(tokenizer, size=self.vocab_size).to(self.device) if tokenizer is not None else None
        graphed = GraphedRepairForward(self.decoder_body, self._logits, pad_token_id=self.pad_id,
                                       embeddings=self.decoder.get_input_embeddings(), max_length=512)
        # `(ids, attn, rows, scale) -> logits [K, V]` at the given rows: graph replay, or the same computation eagerly
        self.row_logits = graphed if cuda_graphs is not False and self.device.type == "cuda" else graphed.eager
        self._forward = graphed.hidden  # `(ids, attn, scale) -> hidden [B, L, H]`, one call of the decoder

    @property
    def host_vocab_size(self) -> int:
        return self.vocab_size

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def decoder_body(self, input_ids=None, inputs_embeds=None, attention_mask=None) -> torch.Tensor:
        """Hidden states [B, L, H] for the key mask attention_mask [B, L].

        With SDPA-style attention (`sdpa`, `halo`) the mask goes in as a prepared 4D causal & key mask, so the
        decoder does no data-dependent mask work (nothing that syncs the host or breaks CUDA-graph capture);
        other attention implementations get the 2D mask.
        """
        keys = attention_mask
        b, length = keys.shape
        mask = keys
        if getattr(self.model.config, "_attn_implementation", None) in ("sdpa", "halo"):
            causal = torch.ones(length, length, dtype=torch.bool, device=keys.device).tril()
            mask = (causal[None] & keys.bool()[:, None, :])[:, None]  # [B, 1, L, L]
        pos = torch.arange(length, device=keys.device).expand(b, -1)
        return self.decoder(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=pos,
                            use_cache=False)[0]

    def _inputs(self, batch: RepairBatch):
        """(ids, attention, scale) for the batch on the model's device; dim context handled per guidance."""
        dev = self.device
        ids = torch.where(batch.attention_mask, batch.token_ids, self.pad_id).to(dev)
        attn = batch.attention_mask.clone()
        scale = None
        if self.guidance != "soft":
            attn &= ~self.dim_context(batch)  # hard guidance; nothing is dim without guidance
        else:
            scale = self.soft_scale(batch).to(dev)
        return ids, attn.long().to(dev), scale

    @torch.no_grad()
    def suggest(self, batch: RepairBatch) -> Suggestions:
        if self.rerank_top is not None:
            return self._suggest_rerank(batch)
        ids, attn, scale = self._inputs(batch)
        local = batch.target_local.to(self.device)
        has_left = local > 0
        if ids.device.type != "cuda":
            # Causal: nothing at or after a target matters, so off CUDA (where reading the width costs no
            # device sync) the forward stops at the last target; centred windows halve their cost.
            width = max(int(local.max()), 1)
            ids, attn = ids[:, :width], attn[:, :width]
            scale = scale[:, :width] if scale is not None else None
        logits = self.row_logits(ids, attn, (local - 1).clamp(min=0), scale)  # [K, V], the row before each target
        orig = batch.original_ids.to(ids.device)
        allowed = self.allowed_candidates(orig)
        restricted = logits if allowed is None else logits.masked_fill(~allowed, float("-inf"))
        top_logit, top = restricted.max(dim=-1)
        margin = top_logit - logits.gather(1, orig[:, None])[:, 0]
        new = torch.where(has_left & torch.isfinite(top_logit), top, -1)
        return Suggestions(new, margin)

    def allowed_candidates(self, original_ids: torch.Tensor) -> torch.Tensor | None:
        """bool [K, V]: host ids that may replace each current token (its kind), or None without a tokenizer."""
        if self.kinds is None:
            return None
        if self.kinds.device != original_ids.device:
            self.kinds = self.kinds.to(original_ids.device)
        return candidate_mask(self.kinds[original_ids], self.kinds)

    # ---------------------------------------------------------------- re-ranking
    def candidates(self, original_ids: torch.Tensor, c: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each current token first, then its c - 1 nearest output-embedding neighbours of its kind.

        Returns:
            (ids, valid): int64 [K, c] candidate ids and bool [K, c] whether each may replace the current token
            (the current token itself always; a neighbour only if of its kind, see `allowed_candidates`).
        """
        weight = self.head.weight
        key = (weight.data_ptr(), weight._version, weight.shape)
        if self._neighbour_cache is None or self._neighbour_cache[0] != key:
            self._neighbour_cache = (key, torch.nn.functional.normalize(weight.detach().float(), dim=-1))
        unit = self._neighbour_cache[1]
        orig = original_ids.to(weight.device)
        sims = unit[orig] @ unit.T  # [K, V]
        allowed = self.allowed_candidates(orig)
        if allowed is not None:
            sims = sims.masked_fill(~allowed, float("-inf"))
        rows = torch.arange(orig.shape[0], device=orig.device)
        sims[rows, orig] = float("inf")
        ids = sims.topk(min(c, self.vocab_size), dim=-1).indices
        valid = torch.ones_like(ids, dtype=torch.bool) if allowed is None else allowed.gather(1, ids)
        valid[:, 0] = True
        return ids, valid

    def _suggest_rerank(self, batch: RepairBatch) -> Suggestions:
        k, c = batch.size, min(self.rerank_top, self.vocab_size)
        ids, attn, scale = self._inputs(batch)
        dev = ids.device
        local = batch.target_local.to(dev)
        lengths = batch.attention_mask.long().sum(1).to(dev)
        span = torch.minimum(lengths - 1 - local, torch.full_like(local, self.rerank_span))  # right tokens scored
        # Nothing after the last scored token can matter; trimming needs the value on the host, so on CUDA
        # (no sync between batch and diff tensors) the full width runs.
        cut = ids.shape[1] if dev.type == "cuda" else int((local + span).max()) + 1
        ids, attn = ids[:, :cut], attn[:, :cut]
        scale = scale[:, :cut] if scale is not None else None
        cand, valid_cand = self.candidates(batch.original_ids, c)  # [K, c]
        seq = ids.repeat_interleave(c, 0)  # [K*c, L]
        rows = torch.arange(k * c, device=dev)
        t_rep = local.repeat_interleave(c)
        seq[rows, t_rep] = cand.reshape(-1)
        att = attn.repeat_interleave(c, 0)
        att[rows, t_rep] = 1
        sc = scale.repeat_interleave(c, 0) if scale is not None else None
        hidden = self._forward(seq, att, sc)  # the single forward: [K*c, L, H]

        # Rows (t-1 .. t+span-1) predict tokens (t .. t+span): the candidate, then the right context.
        steps = self.rerank_span + 1
        offs = torch.arange(steps, device=dev)
        span_rep = span.repeat_interleave(c)
        pred_rows = (t_rep - 1)[:, None] + offs  # [K*c, steps]
        valid = (offs[None, :] <= span_rep[:, None]) & (t_rep[:, None] > 0)
        tgt_pos = (pred_rows + 1).clamp(max=cut - 1)
        valid &= att.gather(1, tgt_pos).bool()  # masked (dim) right-context tokens are not scored
        pred_rows = pred_rows.clamp(0, cut - 1)
        h = hidden.gather(1, pred_rows[..., None].expand(-1, -1, hidden.shape[-1]))
        logp = torch.log_softmax(self._logits(h), dim=-1)  # [K*c, steps, V]
        tok_lp = logp.gather(2, seq.gather(1, tgt_pos)[..., None])[..., 0]
        score = torch.where(valid, tok_lp, 0.0).sum(1).view(k, c)
        score = score.masked_fill(~valid_cand, float("-inf"))  # neighbours of another kind never win
        best_score, best = score.max(dim=1)
        new = cand.gather(1, best[:, None])[:, 0]
        new = torch.where(local > 0, new, -1)
        margin = best_score - score[:, 0]  # candidate 0 is the current token
        return Suggestions(new, margin)
