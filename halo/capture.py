"""Attention capture: the `halo` attention function registered with transformers' AttentionInterface.

For each layer it computes the output with SDPA exactly as the stock `sdpa` implementation does, and, when a
HaloCache is running the forward, accumulates the per-slot attention mass of this forward's query rows into
the cache (no `output_attentions`, no eager attention matrix, no host sync). A plain decode row on the CPU skips
SDPA: one operator computes its output with the mass (halo.decode_attention), reading the keys once. After the
last layer it closes the forward: brightness update, cull, compaction.

The attention function cannot see the cache (transformers does not pass it), so the cache's layer `update`,
which runs right before the layer's attention, leaves a thread-local note saying which cache owns the keys.
"""

from __future__ import annotations

import threading

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from . import decode_attention

ATTN_IMPLEMENTATION = "halo"

_state = threading.local()


def set_active(cache, layer_idx: int) -> None:
    """Called by HaloCache layer updates: `cache` owns the keys the next attention call of `layer_idx` reads."""
    _state.cache = cache
    _state.layer_idx = layer_idx


def clear_active() -> None:
    _state.cache = None


def record_input_ids(module, args, output) -> None:
    """Forward hook on the input embedding: remember the ids, so a forward no driver describes (plain
    `generate`) still mirrors its text. Forwards run with a ForwardSpec carry their ids in the spec."""
    ids = args[0] if args and isinstance(args[0], torch.Tensor) else None
    _state.input_ids = ids


def take_input_ids():
    ids = getattr(_state, "input_ids", None)
    _state.input_ids = None
    return ids


def halo_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """`fn(module, query [B,Hq,T,D], key/value [B,Hkv,N,D], mask, **kw) -> (out [B,T,Hq,D], None)`."""
    cache = getattr(_state, "cache", None)
    layer_idx = getattr(module, "layer_idx", None)
    if cache is None or getattr(_state, "layer_idx", None) != layer_idx or not cache.holds_keys_of(layer_idx, key):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if not dropout and decode_attention.fuses(cache, query, key, value):
        out = cache.capture_layer(layer_idx, query[0], key[0], scaling, value[0])  # the row's output with its mass
        return out.view(1, 1, *out.shape), None
    mask = cache.attention_mask(layer_idx)
    if mask is not None and mask.shape[1] not in (1, query.shape[1]):  # one mask per KV head (per-head memory)
        mask = mask.repeat_interleave(query.shape[1] // mask.shape[1], dim=1)
    out, _ = sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)
    cache.capture_layer(layer_idx, query[0], key[0], scaling)
    return out, None


AttentionInterface.register(ATTN_IMPLEMENTATION, halo_attention_forward)
# Forwards that no HaloCache drives (e.g. the self-repair pass over padded windows) need the usual SDPA masks;
# forwards a HaloCache drives use the cache's own slot-space mask instead.
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


def enable_capture(model) -> None:
    """Switch `model` to the halo attention function and hook its input embedding (idempotent)."""
    if model.config._attn_implementation != ATTN_IMPLEMENTATION:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
        if model.config._attn_implementation != ATTN_IMPLEMENTATION:
            raise ValueError(
                f"{type(model).__name__} cannot switch to a custom attention function; Halo Weave needs a model "
                "that uses transformers' AttentionInterface (Llama-family models do)"
            )
    embeddings = model.get_input_embeddings()
    if not getattr(embeddings, "_halo_hooked", False):
        embeddings.register_forward_hook(record_input_ids)
        embeddings._halo_hooked = True
