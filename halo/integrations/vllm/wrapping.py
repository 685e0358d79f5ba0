"""How the plugin patches vLLM: each patched method becomes a wrapper that receives vLLM's own method first."""

from __future__ import annotations

import functools


def wrap(cls, name: str, wrapper) -> None:
    """Replace `cls.name` by `wrapper(original, self, *args, **kwargs)`; the original stays on
    `cls.name.__halo_original__`."""
    original = getattr(cls, name)

    @functools.wraps(original)
    def patched(self, *args, **kwargs):
        return wrapper(original, self, *args, **kwargs)

    patched.__halo_original__ = original
    setattr(cls, name, patched)
