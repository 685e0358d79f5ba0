"""Loading the compiled operators of `halo._C` (csrc/, built by setup.py) for the modules that dispatch to them.

Every compiled operator has a PyTorch reference twin, so a missing or stale build is not an error: the caller asks
`load_operators` and runs its reference when the answer is False.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch


def load_operators(fakes: dict[str, Callable]) -> bool:
    """True when `halo._C` imports and registers every `torch.ops.halo.<name>` of `fakes` (a stale build may lack
    some); each then gets its fake (shape-only) kernel for FakeTensor / torch.compile / opcheck. Idempotent."""
    try:
        import halo._C  # noqa: F401  (loading the library registers the operators)
    except ImportError:
        return False
    if not all(hasattr(torch.ops.halo, name) for name in fakes):
        return False
    for name, fake in fakes.items():
        try:
            torch.library.register_fake(f"halo::{name}")(fake)
        except RuntimeError as exc:  # already registered (a module reloaded)
            if "already" not in str(exc):
                warnings.warn(f"halo: could not register the fake {name}: {exc}", stacklevel=2)
    return True
