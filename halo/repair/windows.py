"""Repair windows: the padded window batch built straight from the cache's slot tensors.

`build_windows` dispatches to the C++/CUDA operator `torch.ops.halo.build_windows` (extension `halo._C`) when it
is importable and to `build_windows_reference` (plain PyTorch, same signature, same results) otherwise.
`windows_to_contract_dicts` turns a batch into the Step 3d contract's list of dicts for the dict path.

Semantics (shared by every implementation):

* Slots `0 .. n_valid - 1` are retained, in arbitrary slot order. Position order is the order of
  `(position, slot)` ascending (ties between equal positions keep slot order).
* W = min(window, n_valid). Each window holds W consecutive retained tokens of that order, centred on its
  target (first rank = rank(target) - W // 2) and shifted to stay inside the retained sequence, so it is always
  full near either end.
* A target slot outside `0 .. n_valid - 1` yields an all-padding row (ids 0, mask 0, brightness 0,
  positions -1) with `target_local = -1`. `build_windows` raises `ValueError` for such targets when it can check
  without a device synchronisation (CPU tensors) or when asked to (`validate=True`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from ..extension import load_operators

MAX_WINDOW = 511


class WindowBatch(NamedTuple):
    """A padded batch of K repair windows of width W.

    Attributes:
        window_ids: int64 [K, W] host token ids in position order, right padded with 0.
        attention_mask: int64 [K, W] 1 for a real token, 0 for padding.
        window_brightness: float32 [K, W] brightness of each token, 0 on padding.
        target_local: int64 [K] index of the target inside its window, -1 for an invalid target.
        window_positions: int64 [K, W] absolute sequence positions, -1 on padding.
    """

    window_ids: torch.Tensor
    attention_mask: torch.Tensor
    window_brightness: torch.Tensor
    target_local: torch.Tensor
    window_positions: torch.Tensor


def _check_args(token_ids, positions, brightness, n_valid, targets, window) -> None:
    for name, t, dtype in (("token_ids", token_ids, torch.int64), ("positions", positions, torch.int64),
                           ("brightness", brightness, torch.float32), ("targets", targets, torch.int64)):
        if not isinstance(t, torch.Tensor) or t.dim() != 1:
            raise ValueError(f"build_windows: {name} must be a 1-D tensor")
        if t.dtype != dtype:
            raise ValueError(f"build_windows: {name} must be {dtype}, got {t.dtype}")
    capacity = token_ids.shape[0]
    if positions.shape[0] != capacity or brightness.shape[0] != capacity:
        raise ValueError(f"build_windows: token_ids, positions and brightness must have the same length, got "
                         f"{capacity}, {positions.shape[0]}, {brightness.shape[0]}")
    if not 0 <= int(n_valid) <= capacity:
        raise ValueError(f"build_windows: n_valid={n_valid} outside 0..{capacity}")
    if not 1 <= int(window) <= MAX_WINDOW:
        raise ValueError(f"build_windows: window={window} outside 1..{MAX_WINDOW}")
    devices = {t.device for t in (token_ids, positions, brightness, targets)}
    if len(devices) != 1:
        raise ValueError(f"build_windows: all tensors must be on the same device, got {sorted(map(str, devices))}")


def build_windows_reference(token_ids: torch.Tensor, positions: torch.Tensor, brightness: torch.Tensor,
                            n_valid: int, targets: torch.Tensor, window: int) -> WindowBatch:
    """Plain-PyTorch window builder: the fallback and the test oracle of `torch.ops.halo.build_windows`.

    Args:
        token_ids: int64 [C] host token id of every slot.
        positions: int64 [C] absolute position of every slot.
        brightness: float32 [C] brightness of every slot.
        n_valid: slots 0 .. n_valid - 1 are retained (arbitrary slot order).
        targets: int64 [K] slot indices of the repair targets.
        window: tokens per window, 1 .. 511.

    Returns:
        `WindowBatch` with W = min(window, n_valid) (see the module docstring for the exact semantics).
    """
    _check_args(token_ids, positions, brightness, n_valid, targets, window)
    n, k = int(n_valid), targets.shape[0]
    width = min(int(window), n)
    dev = token_ids.device
    if n == 0 or k == 0:
        z = torch.zeros(k, width, dtype=torch.int64, device=dev)
        return WindowBatch(z, z.clone(), torch.zeros(k, width, dtype=torch.float32, device=dev),
                           torch.full((k,), -1, dtype=torch.int64, device=dev), z.clone() - 1)
    order = torch.sort(positions[:n], stable=True).indices  # slots in (position, slot) order
    rank = torch.empty_like(order)
    rank[order] = torch.arange(n, device=dev)
    valid = (targets >= 0) & (targets < n)
    r = rank[targets.clamp(0, n - 1)]
    start = (r - width // 2).clamp(0, n - width)
    slots = order[start[:, None] + torch.arange(width, device=dev)]  # [K, W]
    vmask = valid[:, None]
    ids = torch.where(vmask, token_ids[slots], 0)
    mask = vmask.expand(k, width).to(torch.int64)
    bright = torch.where(vmask, brightness[slots], 0.0)
    wpos = torch.where(vmask, positions[slots], -1)
    local = torch.where(valid, r - start, -1)
    return WindowBatch(ids, mask, bright, local, wpos)


@functools.lru_cache(maxsize=None)
def extension_available() -> bool:
    """True when `halo._C` imports and registers `torch.ops.halo.build_windows`."""
    return load_operators({"build_windows": _fake_build_windows})


def extension_has_cuda() -> bool:
    """True when the loaded extension was compiled with its CUDA kernel."""
    if not extension_available():
        return False
    import halo._C

    return bool(getattr(halo._C, "with_cuda", False))


def _fake_build_windows(token_ids, positions, brightness, n_valid, targets, window):
    """Shape-only build_windows for FakeTensor / torch.compile / opcheck (W depends only on the int args)."""
    k = targets.shape[0]
    width = torch.sym_min(window, n_valid)
    long2 = token_ids.new_empty((k, width), dtype=torch.int64)
    return (long2, long2.new_empty((k, width)), token_ids.new_empty((k, width), dtype=torch.float32),
            token_ids.new_empty((k,), dtype=torch.int64), long2.new_empty((k, width)))


def build_windows(token_ids: torch.Tensor, positions: torch.Tensor, brightness: torch.Tensor, n_valid: int,
                  targets: torch.Tensor, window: int = MAX_WINDOW, *, impl: str = "auto",
                  validate: bool | None = None) -> WindowBatch:
    """Build the padded repair-window batch (C++/CUDA operator when available, else the PyTorch reference).

    Args: as `build_windows_reference`, plus
        impl: "auto" (operator when `halo._C` is importable), "extension" (operator, error if missing) or
            "reference".
        validate: raise `ValueError` for targets outside 0 .. n_valid - 1. Default: only for CPU tensors (on
            CUDA the check would synchronise the host); invalid targets otherwise give all-padding rows.
    """
    _check_args(token_ids, positions, brightness, n_valid, targets, window)
    if validate is None:
        validate = targets.device.type == "cpu"
    if validate and targets.numel():
        bad = (targets < 0) | (targets >= int(n_valid))
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"build_windows: target {i} is slot {int(targets[i])}, not a retained slot "
                             f"(0..{int(n_valid) - 1})")
    if impl not in ("auto", "extension", "reference"):
        raise ValueError(f"build_windows: impl must be 'auto', 'extension' or 'reference', got {impl!r}")
    use_ext = impl == "extension" or (impl == "auto" and extension_available())
    if use_ext and not extension_available():
        raise RuntimeError("build_windows: impl='extension' but halo._C is not built (python setup.py build_ext --inplace)")
    if use_ext and token_ids.device.type == "cuda" and not extension_has_cuda():
        use_ext = impl == "extension"  # no CUDA kernel compiled: the reference runs on the device instead
    if use_ext:
        return WindowBatch(*torch.ops.halo.build_windows(token_ids, positions, brightness, int(n_valid), targets,
                                                         int(window)))
    return build_windows_reference(token_ids, positions, brightness, n_valid, targets, window)


def windows_to_contract_dicts(batch: WindowBatch) -> list[dict]:
    """The Step 3d contract's input dicts for a window batch (one per row, in row order).

    Each dict holds `global_cull_position` (the target's absolute position), `window_token_ids` int64 [W],
    `window_attention_mask` int64 [W], `window_brightness_map` float32 [W], `masked_position_local` and
    `original_token_id_at_mask` (the target's current host id). Rows are moved to CPU.

    Raises:
        ValueError: a row has `target_local == -1` (invalid target slot), naming the row.
    """
    ids, mask, bright, local, wpos = (t.detach().cpu() for t in batch)
    out = []
    for i in range(ids.shape[0]):
        j = int(local[i])
        if j < 0:
            raise ValueError(f"window {i}: invalid target (target_local == -1), cannot form a contract dict")
        out.append({
            "global_cull_position": int(wpos[i, j]),
            "window_token_ids": ids[i].clone(),
            "window_attention_mask": mask[i].clone(),
            "window_brightness_map": bright[i].clone(),
            "masked_position_local": j,
            "original_token_id_at_mask": int(ids[i, j]),
        })
    return out
