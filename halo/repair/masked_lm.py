"""Masked-LM repair backend: a bidirectional MLM (DistilBERT by default) re-predicts each target.

Per `repair` call, for K windows:

1. Window text: every real host token contributes its text (`TokenPieces.bytes`, decoded incrementally so
   multi-byte characters split across tokens stay whole). The target, and under hard guidance every dim
   context token, is replaced by one MLM mask token (a word-start token keeps its leading space), so the i-th
   mask of the text is the i-th masked host position: the MLM row of the target is known exactly.
2. One batched forward: the MLM *base* model to hidden states [K, L, H], gather the K target rows, and apply the
   vocabulary head to those rows only ([K, V_mlm] logits; the head never runs over every position).
3. Restrict to bridged MLM tokens (`bridge.py`) of the target's kind (`kinds.py`: a whole word only by a whole
   word, a suffix only by a suffix, a symbol only by a symbol; one [K', V_mlm] mask on device, no host sync),
   take the top-1, map it to its host id. The margin is its logit minus the logit of the MLM token spelling the
   current host token (+inf when the MLM cannot spell it, so the gate only holds back suggestions against
   current tokens the MLM can score); a suggestion that spells the current token (e.g. `the` for `▁The` under an
   uncased MLM) counts as "no change", so an uncased MLM never flips case alone.

Targets whose host token spells no word (whitespace, special tokens, byte pieces) get no suggestion.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .base import Repairer, Suggestions
from .bridge import NO_PIECE, WORD_START, BridgeTable, build_bridge, token_pieces
from .contract import RepairBatch
from .errors import RepairModelError
from .kinds import TokenKind, candidate_mask, token_kinds
from .offline import load_mlm_model, load_mlm_tokenizer, require_masked_lm


def masked_lm_head(model) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The vocabulary head of a `*ForMaskedLM` as a function hidden [N, H] -> logits [N, V], or None if unknown.

    Known layouts: DistilBERT (`vocab_transform`/`activation`/`vocab_layer_norm`/`vocab_projector`), BERT
    (`cls`), RoBERTa/XLM-R/CamemBERT/ModernBERT-style (`lm_head`, ModernBERT `head` + `decoder`), ALBERT
    (`predictions`).
    """
    if all(hasattr(model, a) for a in ("vocab_transform", "activation", "vocab_layer_norm", "vocab_projector")):
        return lambda h: model.vocab_projector(model.vocab_layer_norm(model.activation(model.vocab_transform(h))))
    if hasattr(model, "head") and hasattr(model, "decoder"):
        return lambda h: model.decoder(model.head(h))
    for name in ("cls", "lm_head", "predictions"):
        head = getattr(model, name, None)
        if isinstance(head, torch.nn.Module):
            return head
    return None


def mlm_candidate_kinds(bridge: BridgeTable, host_kinds: torch.Tensor) -> torch.Tensor:
    """int8 [V_mlm] the kind of the host token each MLM token bridges to; `SPECIAL` (never a candidate) if none.

    Args:
        bridge: the (host, MLM) bridge, on any device.
        host_kinds: int8 [V_host] `token_kinds` of the host vocabulary; the result lives on its device.
    """
    to_host = bridge.mlm_to_host.to(host_kinds.device)
    special = torch.full_like(to_host, int(TokenKind.SPECIAL), dtype=torch.int8)
    return torch.where(to_host >= 0, host_kinds[to_host.clamp(min=0)], special)


@dataclass(frozen=True)
class MLMInputs:
    """The MLM batch for K' (<= K) windows that have a suggestion to make.

    Attributes:
        rows: int64 [K'] which windows of the `RepairBatch` these are.
        input_ids: int64 [K', L] MLM ids, right padded with the MLM pad id.
        attention_mask: int64 [K', L].
        target_rows: int64 [K'] index of each target's mask token.
        scale: float32 [K', L] embedding scale (soft guidance) or None.
        texts: the window texts given to the MLM tokenizer.
    """

    rows: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    target_rows: torch.Tensor
    scale: torch.Tensor | None
    texts: list


class MaskedLMRepairer(Repairer):
    """Repair with any `AutoModelForMaskedLM`, bridged to the host vocabulary.

    Args:
        model_name_or_path: a masked LM's folder or cached hub name, loaded from local files only
            (`offline.py`) unless `model` and `tokenizer` are given.
        host_tokenizer: the host model's tokenizer (SentencePiece `▁`, byte-level `Ġ` or WordPiece vocabularies).
        model, tokenizer: an already built MLM and its tokenizer (soft guidance needs a fast tokenizer).
        guidance, repair_threshold, min_margin: see `halo.repair.base`.
        device: where the MLM runs (default: where its parameters are).
        cuda_graphs: replay captured CUDA graphs of the forward for bucketed shapes (`graphs.py`); None (the
            default) does on CUDA.

    Raises:
        RepairModelError: the model is not found offline, is not a masked LM, or its vocabulary has no bridge to
            the host tokenizer (checked before the weights are loaded).
    """

    def __init__(self, model_name_or_path: str = "distilbert-base-uncased", host_tokenizer=None, *, model=None,
                 tokenizer=None, guidance: str = "hard", repair_threshold: float = 64.0, min_margin: float = 0.0,
                 device=None, cuda_graphs: bool | None = None):
        super().__init__(guidance=guidance, repair_threshold=repair_threshold, min_margin=min_margin)
        if host_tokenizer is None:
            raise TypeError("MaskedLMRepairer needs the host tokenizer (host_tokenizer=...)")
        name = model_name_or_path if model is None else getattr(model, "name_or_path", "") or model_name_or_path
        if model is None:
            require_masked_lm(model_name_or_path)
        if tokenizer is None:
            tokenizer = load_mlm_tokenizer(model_name_or_path)
        if tokenizer.mask_token_id is None:
            raise RepairModelError(name, "not a masked LM (its tokenizer has no mask token)")
        if guidance == "soft" and not getattr(tokenizer, "is_fast", False):
            raise ValueError("guidance='soft' needs a fast MLM tokenizer (offset mappings)")
        self.host_pieces = token_pieces(host_tokenizer)
        self.mlm_pieces = token_pieces(tokenizer)
        self.bridge = build_bridge(self.host_pieces, self.mlm_pieces)
        if not bool(self.bridge.bridged.any()):
            raise RepairModelError(name, f"its vocabulary has no bridge to the host tokenizer (none of its "
                                         f"{len(self.mlm_pieces)} tokens spells a {self.host_pieces.style} host token)")
        if model is None:
            model = load_mlm_model(model_name_or_path)
        if device is not None:
            model = model.to(device)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self._bridge_dev = self.bridge.to(self.device)
        self.host_kinds = token_kinds(self.host_pieces).to(self.device)
        self.mlm_kinds = mlm_candidate_kinds(self.bridge, self.host_kinds)
        self.mask_token = tokenizer.mask_token
        self.mask_id = int(tokenizer.mask_token_id)
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
        limits = [getattr(model.config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
        self.max_length = min(int(x) for x in limits if isinstance(x, int) and 0 < x < 1_000_000) if any(
            isinstance(x, int) and 0 < x < 1_000_000 for x in limits) else 512
        self._n_prefix, self._n_suffix = self._special_layout()
        self._head = masked_lm_head(model)
        self._graphs = None
        if cuda_graphs is not False and self.device.type == "cuda" and self._head is not None:
            from .graphs import GraphedRepairForward

            self._graphs = GraphedRepairForward(self.model.base_model, self._head, pad_token_id=self.pad_id,
                                                embeddings=self.model.get_input_embeddings(),
                                                max_length=self.max_length)

    @property
    def host_vocab_size(self) -> int:
        return len(self.host_pieces)

    def _special_layout(self) -> tuple[int, int]:
        """How many special tokens the MLM tokenizer puts before and after a sequence ([CLS] ... [SEP]: 1, 1)."""
        with_specials = list(self.tokenizer("a", add_special_tokens=True)["input_ids"])
        body = list(self.tokenizer("a", add_special_tokens=False)["input_ids"])
        for at in range(len(with_specials) - len(body) + 1):
            if body and with_specials[at: at + len(body)] == body:
                return at, len(with_specials) - at - len(body)
        return 0, 0

    # ---------------------------------------------------------------- inputs
    def window_texts(self, batch: RepairBatch) -> tuple[list, list, list]:
        """The MLM text of every window.

        Returns:
            (texts, mask_ordinals, char_owners): texts[k] is the window text with masked tokens replaced by the
            mask token (None when the target spells nothing); mask_ordinals[k] is how many masks precede the
            target's; char_owners[k] is an int list giving, per character of texts[k], the window index of the
            host token it came from (-1 for mask tokens).
        """
        ids = batch.token_ids.cpu().tolist()
        real = batch.attention_mask.cpu().tolist()
        local = batch.target_local.cpu().tolist()
        masked = (torch.zeros_like(batch.attention_mask) if self.guidance == "soft" else self.dim_context(batch))
        masked = masked.cpu().tolist()
        pieces = self.host_pieces
        texts, ordinals, owners = [], [], []
        for k in range(len(ids)):
            target = local[k]
            if pieces.kinds[ids[k][target]] == NO_PIECE:
                texts.append(None)
                ordinals.append(-1)
                owners.append(None)
                continue
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            parts, owner, n_masks, ordinal = [], [], 0, -1
            for j, (tok, is_real) in enumerate(zip(ids[k], real[k])):
                if not is_real:
                    continue
                piece = decoder.decode(pieces.bytes[tok])
                if (j == target or masked[k][j]) and pieces.kinds[tok] != NO_PIECE:
                    if j == target:
                        ordinal = n_masks
                    n_masks += 1
                    lead = " " if pieces.kinds[tok] == WORD_START or piece[:1].isspace() else ""
                    parts.append(lead + self.mask_token)
                    owner.extend([j] * len(lead) + [-1] * len(self.mask_token))
                else:
                    parts.append(piece)
                    owner.extend([j] * len(piece))
            tail = decoder.decode(b"", final=True)
            parts.append(tail)
            owner.extend([owner[-1] if owner else -1] * len(tail))
            texts.append("".join(parts))
            ordinals.append(ordinal)
            owners.append(owner)
        return texts, ordinals, owners

    def build_inputs(self, batch: RepairBatch) -> MLMInputs:
        """Tokenises the window texts for the MLM and locates each target's mask token (see `MLMInputs`)."""
        texts, ordinals, owners = self.window_texts(batch)
        rows = [k for k, t in enumerate(texts) if t is not None]
        soft = self.guidance == "soft"
        enc = self.tokenizer([texts[k] for k in rows], add_special_tokens=True, truncation=False, padding=False,
                             return_offsets_mapping=soft) if rows else {"input_ids": []}
        scale_full = self.soft_scale(batch).cpu() if soft else None
        seqs, targets, scales = [], [], []
        for n, k in enumerate(rows):
            seq = list(enc["input_ids"][n])
            mask_at = [i for i, t in enumerate(seq) if t == self.mask_id]
            if ordinals[k] >= len(mask_at):
                raise RuntimeError(f"window {k}: the MLM tokenizer did not keep the mask tokens of the window text")
            row = mask_at[ordinals[k]]
            sc = None
            if soft:
                sc = [1.0] * len(seq)
                for i, (a, b) in enumerate(enc["offset_mapping"][n]):
                    if b > a and seq[i] != self.mask_id:
                        j = owners[k][a]
                        if j >= 0:
                            sc[i] = float(scale_full[k, j])
            if len(seq) > self.max_length:  # keep the specials and the body centred on the target
                body = self.max_length - self._n_prefix - self._n_suffix
                lo_body, hi_body = self._n_prefix, len(seq) - self._n_suffix
                start = min(max(row - body // 2, lo_body), hi_body - body)
                keep = list(range(self._n_prefix)) + list(range(start, start + body)) + list(
                    range(hi_body, len(seq)))
                row = self._n_prefix + (row - start)
                seq = [seq[i] for i in keep]
                sc = [sc[i] for i in keep] if sc is not None else None
            seqs.append(seq)
            targets.append(row)
            scales.append(sc)
        length = max((len(s) for s in seqs), default=0)
        input_ids = torch.full((len(seqs), length), self.pad_id, dtype=torch.int64)
        attn = torch.zeros(len(seqs), length, dtype=torch.int64)
        scale = torch.ones(len(seqs), length, dtype=torch.float32) if soft else None
        for n, s in enumerate(seqs):
            input_ids[n, : len(s)] = torch.tensor(s, dtype=torch.int64)
            attn[n, : len(s)] = 1
            if soft:
                scale[n, : len(s)] = torch.tensor(scales[n], dtype=torch.float32)
        return MLMInputs(torch.tensor(rows, dtype=torch.int64), input_ids, attn,
                         torch.tensor(targets, dtype=torch.int64), scale, [texts[k] for k in rows])

    # ---------------------------------------------------------------- forward
    @torch.no_grad()
    def target_logits(self, inputs: MLMInputs) -> torch.Tensor:
        """float32 [K', V_mlm] logits at the targets' mask tokens, from one forward of the MLM."""
        dev = self.device
        ids = inputs.input_ids.to(dev)
        attn = inputs.attention_mask.to(dev)
        rows = inputs.target_rows.to(dev)
        scale = inputs.scale.to(dev) if inputs.scale is not None else None
        if self._graphs is not None:
            return self._graphs(ids, attn, rows, scale).float()
        if self._head is None:  # unknown head layout: full logits, then the target rows
            kwargs = self._embed_kwargs(ids, scale)
            logits = self.model(attention_mask=attn, **kwargs).logits
            return logits[torch.arange(ids.shape[0], device=dev), rows].float()
        hidden = self.model.base_model(attention_mask=attn, **self._embed_kwargs(ids, scale))[0]
        picked = hidden[torch.arange(ids.shape[0], device=dev), rows]  # [K', H]
        return self._head(picked).float()

    def _embed_kwargs(self, ids: torch.Tensor, scale: torch.Tensor | None) -> dict:
        if scale is None:
            return {"input_ids": ids}
        emb = self.model.get_input_embeddings()(ids)
        return {"inputs_embeds": emb * scale.to(emb.dtype)[..., None]}

    def suggest(self, batch: RepairBatch) -> Suggestions:
        return self.predict(batch)[0]

    def predict(self, batch: RepairBatch) -> tuple[Suggestions, torch.Tensor]:
        """Suggestions plus the MLM-side top-1 (int64 [K] MLM ids, -1 where none) of one batched forward."""
        k = batch.size
        dev = self.device
        mlm_top = torch.full((k,), -1, dtype=torch.int64, device=dev)
        new = torch.full((k,), -1, dtype=torch.int64, device=dev)
        margin = torch.full((k,), float("inf"), dtype=torch.float32, device=dev)
        inputs = self.build_inputs(batch)
        if inputs.rows.numel() == 0:
            return Suggestions(new, margin), mlm_top
        logits = self.target_logits(inputs)  # [K', V]
        bridge = self._bridge_dev
        rows = inputs.rows.to(logits.device)
        orig = batch.original_ids.to(logits.device)[rows]
        allowed = candidate_mask(self.host_kinds[orig], self.mlm_kinds)  # [K', V]: bridged and of the target's kind
        restricted = logits.masked_fill(~allowed, float("-inf"))
        top_logit, top = restricted.max(dim=-1)
        cur_mlm = bridge.host_to_mlm[orig]
        has_cur = cur_mlm >= 0
        cur_logit = logits.gather(1, cur_mlm.clamp(min=0)[:, None])[:, 0]
        host = torch.where(torch.isfinite(top_logit), bridge.mlm_to_host[top], -1)
        host = torch.where(has_cur & (cur_mlm == top), orig, host)  # spells the current token: no change
        m = torch.where(has_cur, top_logit - cur_logit, torch.full_like(top_logit, float("inf")))
        new[rows] = host
        margin[rows] = m
        mlm_top[rows] = torch.where(torch.isfinite(top_logit), top, -1)
        return Suggestions(new, margin), mlm_top
