"""Helpers shared by the repair tests (imported by name: this directory is on sys.path under pytest)."""

from __future__ import annotations

import re

import torch


def tiny_distilbert(vocab_size: int, seed: int = 0, max_positions: int = 512):
    from transformers import DistilBertConfig, DistilBertForMaskedLM

    torch.manual_seed(seed)
    config = DistilBertConfig(vocab_size=vocab_size, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                              max_position_embeddings=max_positions, pad_token_id=0)
    return DistilBertForMaskedLM(config).eval()


def contract_dict(ids, target: int, position: int, brightness=None, mask=None) -> dict:
    """A well-formed contract dict for window `ids` (list of host ids) with the target at `target`."""
    ids = torch.as_tensor(ids, dtype=torch.int64)
    w = ids.shape[0]
    return {
        "global_cull_position": position,
        "window_token_ids": ids,
        "window_attention_mask": torch.ones(w, dtype=torch.int64) if mask is None else torch.as_tensor(mask),
        "window_brightness_map": torch.full((w,), 200.0) if brightness is None else torch.as_tensor(brightness),
        "masked_position_local": target,
        "original_token_id_at_mask": int(ids[target]),
    }


def tiny_llama(vocab_size: int, seed: int = 0):
    """A randomly initialised Llama small enough for CPU tests (GQA)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return LlamaForCausalLM(config).eval()


class CallCounter:
    """Counts forward calls of modules through forward hooks (use as a context manager)."""

    def __init__(self, *modules):
        self.modules = modules
        self.calls = [0] * len(modules)
        self.inputs = [[] for _ in modules]
        self._handles = []

    def __enter__(self):
        for i, m in enumerate(self.modules):
            def hook(module, args, kwargs, output, i=i):
                self.calls[i] += 1
                self.inputs[i].append((args, kwargs))
            self._handles.append(m.register_forward_hook(hook, with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()


BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


def word_shape(tokenizer, token_id: int, style: str):
    """(starts a word, has a letter or digit) of a host token, read from its own spelling.

    An oracle independent of `halo.repair.kinds` for SentencePiece (`▁`, style "sentencepiece") and byte-level
    BPE (`Ġ`, style "byte_level") vocabularies. None for what repair must leave alone: special tokens, byte
    pieces, partial characters, whitespace, and pieces with inner whitespace.
    """
    if token_id in set(tokenizer.all_special_ids):
        return None
    tok = tokenizer.convert_ids_to_tokens(token_id)
    if style == "sentencepiece":
        if BYTE_PIECE.match(tok):
            return None
        starts = tok.startswith("\u2581")
        body = (tok[1:] if starts else tok).replace("\u2581", " ")
    else:
        text = tokenizer.decode([token_id])
        if "\ufffd" in text:
            return None
        starts = tok.startswith("\u0120")
        body = text[1:] if starts else text
    if not body or any(c.isspace() for c in body):
        return None
    return starts, any(c.isalnum() for c in body)


def mlm_word_shape(mlm_tokenizer, mlm_id: int):
    """(starts a word, has a letter or digit) of a WordPiece MLM token (`##` marks a continuation)."""
    tok = mlm_tokenizer.convert_ids_to_tokens(mlm_id)
    starts = not tok.startswith("##")
    body = tok if starts else tok[2:]
    return starts, any(c.isalnum() for c in body)
