"""The Step 3d repair contract: validation of the input dicts and the padded batch they become.

`repair(diffuser_input_list) -> list[tuple[int, int, int]]` takes dicts with exactly the keys of
`CONTRACT_KEYS`. `validate_contract_dicts` checks every dict before anything runs (a bad dict raises
`ValueError` naming its window index, so nothing is half-applied) and stacks them into a `RepairBatch`, the
form every backend consumes. `RepairBatch.from_windows` builds the same batch from the C++/PyTorch window
builder without going through dicts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .windows import MAX_WINDOW, WindowBatch

CONTRACT_KEYS = ("global_cull_position", "window_token_ids", "window_attention_mask", "window_brightness_map",
                 "masked_position_local", "original_token_id_at_mask")

Diff = tuple[int, int, int]  # (global_cull_position, original_token_id_at_mask, new_token_id)


@dataclass(frozen=True)
class RepairBatch:
    """K repair windows, right padded to a common width W (CPU or device tensors).

    Attributes:
        token_ids: int64 [K, W] host token ids; padding holds 0.
        attention_mask: bool [K, W] True for a real token.
        brightness: float32 [K, W] brightness of each token; padding holds 0.
        target_local: int64 [K] index of the target inside its window (a real position).
        global_positions: int64 [K] absolute position of each target (`global_cull_position`).
        original_ids: int64 [K] host id currently at each target (`original_token_id_at_mask`).
    """

    token_ids: torch.Tensor
    attention_mask: torch.Tensor
    brightness: torch.Tensor
    target_local: torch.Tensor
    global_positions: torch.Tensor
    original_ids: torch.Tensor

    @property
    def size(self) -> int:
        """K, the number of windows."""
        return int(self.token_ids.shape[0])

    @property
    def width(self) -> int:
        """W, the padded window width."""
        return int(self.token_ids.shape[1])

    def to(self, device) -> "RepairBatch":
        return RepairBatch(*(t.to(device) for t in (self.token_ids, self.attention_mask, self.brightness,
                                                     self.target_local, self.global_positions,
                                                     self.original_ids)))

    @classmethod
    def from_windows(cls, windows: WindowBatch, validate: bool = True) -> "RepairBatch":
        """The batch for the output of `build_windows` (fast path, no dicts).

        validate: check every target is valid (a host sync on CUDA); callers whose targets are retained slots
            by construction pass False.

        Raises:
            ValueError: with `validate`, a row has `target_local == -1` (its target slot was not retained).
        """
        local = windows.target_local
        if validate and local.numel() and bool((local < 0).any()):
            i = int((local < 0).nonzero()[0, 0])
            raise ValueError(f"window {i}: invalid target (target_local == -1)")
        rows = torch.arange(local.shape[0], device=local.device)
        mask = windows.attention_mask.bool()
        return cls(torch.where(mask, windows.window_ids, 0), mask, windows.window_brightness.float(), local,
                   windows.window_positions[rows, local], windows.window_ids[rows, local])


def _as_int(value, what: str, i: int) -> int:
    if isinstance(value, bool):
        raise ValueError(f"window {i}: {what} must be an int, got bool")
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            raise ValueError(f"window {i}: {what} must be an int or a one-element integer tensor, got {value!r}")
        return int(value.item())
    try:
        import numbers

        if isinstance(value, numbers.Integral):
            return int(value)
    except TypeError:
        pass
    raise ValueError(f"window {i}: {what} must be an int, got {type(value).__name__}")


def _as_vector(value, what: str, i: int) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"window {i}: {what} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() != 1:
        raise ValueError(f"window {i}: {what} must be 1-D, got shape {tuple(value.shape)}")
    return value.detach().cpu()


def validate_contract_dict(d, i: int, vocab_size: int | None = None) -> tuple:
    """Checks one contract dict (window index `i`, for messages); returns its CPU tensors and ints.

    Returns:
        (token_ids int64 [W], mask bool [W], brightness float32 [W], masked_position_local, global_position,
        original_token_id).

    Raises:
        ValueError: naming window `i` and the problem.
    """
    if not isinstance(d, Mapping):
        raise ValueError(f"window {i}: expected a dict, got {type(d).__name__}")
    missing = [k for k in CONTRACT_KEYS if k not in d]
    if missing:
        raise ValueError(f"window {i}: missing key(s) {missing}")
    extra = sorted(str(k) for k in d if k not in CONTRACT_KEYS)
    if extra:
        raise ValueError(f"window {i}: unexpected key(s) {extra}; the contract has exactly {list(CONTRACT_KEYS)}")

    ids = _as_vector(d["window_token_ids"], "window_token_ids", i)
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ValueError(f"window {i}: window_token_ids must be an integer (Long) tensor, got {ids.dtype}")
    width = ids.shape[0]
    if not 1 <= width <= MAX_WINDOW:
        raise ValueError(f"window {i}: window length W={width} outside 1..{MAX_WINDOW}")
    mask = _as_vector(d["window_attention_mask"], "window_attention_mask", i)
    bright = _as_vector(d["window_brightness_map"], "window_brightness_map", i)
    if mask.shape[0] != width or bright.shape[0] != width:
        raise ValueError(f"window {i}: length mismatch: window_token_ids has {width}, window_attention_mask "
                         f"{mask.shape[0]}, window_brightness_map {bright.shape[0]}")
    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        raise ValueError(f"window {i}: window_attention_mask must be a Long or Bool tensor, got {mask.dtype}")
    if mask.dtype != torch.bool:
        if bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError(f"window {i}: window_attention_mask must hold only 0 and 1")
        mask = mask != 0
    if not bright.dtype.is_floating_point:
        raise ValueError(f"window {i}: window_brightness_map must be a float tensor, got {bright.dtype}")
    bright = bright.float()
    if bool(torch.isnan(bright).any()):
        raise ValueError(f"window {i}: window_brightness_map holds NaN at index "
                         f"{int(torch.isnan(bright).nonzero()[0, 0])}")
    if bool(torch.isinf(bright).any()):
        raise ValueError(f"window {i}: window_brightness_map holds an infinite value")

    j = _as_int(d["masked_position_local"], "masked_position_local", i)
    if not 0 <= j < width:
        raise ValueError(f"window {i}: masked_position_local={j} outside the window (0..{width - 1})")
    if not bool(mask[j]):
        raise ValueError(f"window {i}: masked_position_local={j} is on padding (window_attention_mask[{j}] == 0)")
    pos = _as_int(d["global_cull_position"], "global_cull_position", i)
    if pos < 0:
        raise ValueError(f"window {i}: global_cull_position={pos} is negative")
    orig = _as_int(d["original_token_id_at_mask"], "original_token_id_at_mask", i)
    ids = ids.long()
    if int(ids[j]) != orig:
        raise ValueError(f"window {i}: original_token_id_at_mask={orig} but window_token_ids[{j}] == {int(ids[j])}")
    real = ids[mask]
    if real.numel() and (int(real.min()) < 0 or (vocab_size is not None and int(real.max()) >= vocab_size)):
        bad = int(real.min()) if int(real.min()) < 0 else int(real.max())
        raise ValueError(f"window {i}: token id {bad} outside the host vocabulary (0..{vocab_size})")
    return ids, mask, bright, j, pos, orig


def validate_contract_dicts(dicts: Sequence, vocab_size: int | None = None) -> RepairBatch:
    """Validates every dict (all of them, before anything runs) and stacks them into a CPU `RepairBatch`.

    Args:
        dicts: the contract's `diffuser_input_list`.
        vocab_size: host vocabulary size; real token ids must lie in 0 .. vocab_size - 1.

    Raises:
        ValueError: the first bad dict, with its window index and the problem.
    """
    if isinstance(dicts, Mapping) or not isinstance(dicts, Sequence):
        raise ValueError(f"repair: expected a list of dicts, got {type(dicts).__name__}")
    rows = [validate_contract_dict(d, i, vocab_size) for i, d in enumerate(dicts)]
    k = len(rows)
    width = max((r[0].shape[0] for r in rows), default=0)
    ids = torch.zeros(k, width, dtype=torch.int64)
    mask = torch.zeros(k, width, dtype=torch.bool)
    bright = torch.zeros(k, width, dtype=torch.float32)
    for i, (t, m, b, _, _, _) in enumerate(rows):
        w = t.shape[0]
        ids[i, :w] = torch.where(m, t, 0)
        mask[i, :w] = m
        bright[i, :w] = torch.where(m, b, 0.0)
    as_long = lambda idx: torch.tensor([r[idx] for r in rows], dtype=torch.int64)  # noqa: E731
    return RepairBatch(ids, mask, bright, as_long(3), as_long(4), as_long(5))
