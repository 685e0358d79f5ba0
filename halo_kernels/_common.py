"""Helpers shared by the kernel launchers (no kernels here): interpreter detection, validation, block sizing."""

from __future__ import annotations

import functools
import os

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Integer dtype of the same width, used to move data bit-exactly (bf16/fp16/fp32/fp64/bool payloads).
_BITS_DTYPE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1, read at kernel import time)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def check_device(op: str, **tensors: torch.Tensor) -> torch.device:
    """All tensors on one device, CUDA (or CPU under the Triton interpreter); returns it."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        raise ValueError(f"{op}: tensors must share one device, got " + ", ".join(f"{n}={d}" for n, d in devices.items()))
    if first.type != "cuda" and not interpreting():
        raise ValueError(f"{op}: Triton kernels need CUDA tensors (got {first}); CPU tensors run only under TRITON_INTERPRET=1")
    return first


def as_bits(tensor: torch.Tensor) -> torch.Tensor:
    """Same storage viewed as an integer dtype of the same width (bit-exact copies, no float arithmetic)."""
    if tensor.dtype.is_floating_point or tensor.dtype == torch.bool or tensor.dtype.is_complex:
        size = tensor.element_size()
        if size not in _BITS_DTYPE:
            raise ValueError(f"unsupported element size {size} for dtype {tensor.dtype}")
        return tensor.view(_BITS_DTYPE[size])
    return tensor


@functools.lru_cache(maxsize=None)
def sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def parallel_target(device: torch.device) -> int:
    """Programs worth launching to fill the device (2 per SM on CUDA; a handful under the interpreter)."""
    if device.type == "cuda" and not interpreting():
        return 2 * sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4
