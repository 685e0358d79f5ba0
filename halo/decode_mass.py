"""Column mass of a decode row on CPU through the compiled operator `torch.ops.halo.decode_column_mass`.

Same signatures and semantics as `halo.brightness.attention_column_mass`, `attention_column_mass_and_update`
and `attention_column_mass_heads` (per-head memory: `torch.ops.halo.decode_column_mass_heads`, every KV head of a
layer in one call, each over its own count of slots). A decode step (one float32 query row on CPU) runs the C++
operator of `halo._C` (csrc/decode_column_mass.cpp: one batched matmul, ATen's softmax and one weighted column
sum over heads, in one call); every other case (several rows, another dtype or device) runs the PyTorch reference. On
CPU the reference spends a decode step's Halo time mostly in per-op dispatch (a dozen small ops per layer on
every layer), which is what the operator removes. Equal to the reference within float32 rounding (the sum over
heads is taken in another order).
"""

from __future__ import annotations

import functools

import torch

from . import brightness as reference
from .extension import load_operators


@functools.lru_cache(maxsize=None)
def operator_available() -> bool:
    """True when `halo._C` registers `torch.ops.halo.decode_column_mass` and `decode_column_mass_heads` (one source
    file builds both; a stale build without the second is not used)."""
    # They only write their arguments in place: nothing to shape for FakeTensor / torch.compile / opcheck.
    return load_operators({
        "decode_column_mass": lambda query, key, scaling, mass, last_row_mass: None,
        "decode_column_mass_heads": lambda query, key, scaling, counts, mass, last_row_mass: None,
    })


def _takes(query: torch.Tensor, key: torch.Tensor) -> bool:
    """True when the operator computes this call: one float32 query row on CPU."""
    return (query.dim() == 3 and query.shape[1] == 1 and query.device.type == "cpu" and key.device.type == "cpu"
            and query.dtype == torch.float32 and key.dtype == torch.float32 and operator_available())


def attention_column_mass(query: torch.Tensor, key: torch.Tensor, scaling: float, n_past: int, mass: torch.Tensor,
                          last_row_mass: torch.Tensor | None = None) -> None:
    """`halo.brightness.attention_column_mass`, a decode row through the operator (query [Hq, 1, D] float32)."""
    if not _takes(query, key):
        reference.attention_column_mass(query, key, scaling, n_past, mass, last_row_mass)
        return
    reference.check_mass_inputs(query, key, n_past, mass)
    torch.ops.halo.decode_column_mass(query[:, 0], key[:, : n_past + 1], scaling, mass, last_row_mass)


def attention_column_mass_heads(query: torch.Tensor, key: torch.Tensor, scaling: float, counts: list[int],
                                mass: torch.Tensor, last_row_mass: torch.Tensor | None = None) -> None:
    """`halo.brightness.attention_column_mass_heads`, a decode row of every KV head in one operator call
    (`torch.ops.halo.decode_column_mass_heads`) where the operator takes it, else head by head."""
    if not _takes(query, key):
        reference.attention_column_mass_heads(query, key, scaling, counts, mass, last_row_mass,
                                              per_head=attention_column_mass)
        return
    torch.ops.halo.decode_column_mass_heads(query[:, 0], key, scaling, torch.tensor(counts, dtype=torch.int64),
                                            mass, last_row_mass)


def attention_column_mass_and_update(query: torch.Tensor, key: torch.Tensor, scaling: float, n_past: int,
                                     mass: torch.Tensor, brightness: torch.Tensor, decay: torch.Tensor, alpha: float,
                                     num_layers: int, last_row_mass: torch.Tensor | None = None) -> None:
    """`halo.brightness.attention_column_mass_and_update` with this module's column mass."""
    attention_column_mass(query, key, scaling, n_past, mass, last_row_mass)
    reference.update_brightness(brightness, mass, decay, n_past, query.shape[1], alpha, num_layers)
