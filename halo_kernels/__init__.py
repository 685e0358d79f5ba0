"""halo_kernels: Triton kernels for Halo Weave's per-step cache operations.

Every op has a plain-PyTorch reference twin with the same signature (`halo.brightness`, `halo.cull`,
`halo.layer_cull`, `halo.compact`, `halo.archive_mass`); `halo.backend` picks these kernels for CUDA caches when
`available()`.

    attention_column_mass(query, key, scaling, n_past, mass, last_row_mass=None)       column_mass.py
    attention_column_mass_and_update(query, key, scaling, n_past, mass, brightness,
                                     decay, alpha, num_layers, last_row_mass=None)      column_mass.py
    update_brightness(brightness, mass, decay, n_past, t_rows, alpha, num_layers)      brightness_update.py
    cull_scores(brightness, positions, n_valid, dark_bias, radius) -> float32 [n]      scores.py
    select_victims(scores, positions, protected, n_valid, k) -> int64 [k]              victims.py
    compact_(kv, slot_tensors, victims, n_valid) -> int                                compact.py
    archive_mass(query, keys, valid, scaling, row_lse, row_weight) -> float32 [Hq, A]  archive_mass.py
    archive_ratio(query, keys, valid, scaling, row_lse, row_weight, head_scale,
                  heads) -> float32 [A]                                                 archive_mass.py
    retained_lse(query, key, scaling, n_past) -> float32 [Hq, T]                         retained_rows.py
    retained_mass(query, key, scaling, n_past, row_lse) -> float32 [Hq, n_past]          retained_rows.py
    bars(values, quantile, minimum) -> float32 [...]                                    bars.py

Per-layer memory (every layer keeps its own slots; fields are [L, C] and counts int64 [L] on the device):

    update_brightness_layers(brightness, mass, decay, n_past, t_rows, alpha)           brightness_layers.py
    select_victims_layers(scores, positions, protected, k) -> int64 [L, k]             victims_layers.py
    compact_layers_(kv, slot_tensors, victims, counts) -> int64 [L]                    compact_layers.py

Importing this package never fails: without Triton the ops raise RuntimeError and `available()` is False.
Under `TRITON_INTERPRET=1` (set before this import) the kernels run on CPU tensors in Triton's interpreter;
that mode is for tests only.
"""

from __future__ import annotations

import os

import torch

try:  # noqa: SIM105
    import triton  # noqa: F401
    import triton.language  # noqa: F401

    _TRITON_ERROR: Exception | None = None
except Exception as exc:  # ImportError, or a broken install raising something else
    _TRITON_ERROR = exc


def available() -> bool:
    """True when the kernels can run: Triton importable and CUDA present, or the Triton interpreter (tests)."""
    if _TRITON_ERROR is not None:
        return False
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return True
    return torch.cuda.is_available()


if _TRITON_ERROR is None:
    from .archive_mass import archive_mass, archive_ratio
    from .brightness_layers import update_brightness_layers
    from .brightness_update import update_brightness
    from .column_mass import attention_column_mass, attention_column_mass_and_update
    from .bars import bars
    from .retained_rows import retained_lse, retained_mass
    from .compact import compact_
    from .compact_layers import compact_layers_
    from .scores import cull_scores
    from .victims import select_victims
    from .victims_layers import select_victims_layers
else:

    def _missing(name):
        def op(*args, **kwargs):
            raise RuntimeError(f"halo_kernels.{name} needs Triton, which failed to import: {_TRITON_ERROR!r}")

        op.__name__ = name
        return op

    attention_column_mass = _missing("attention_column_mass")
    attention_column_mass_and_update = _missing("attention_column_mass_and_update")
    update_brightness = _missing("update_brightness")
    cull_scores = _missing("cull_scores")
    select_victims = _missing("select_victims")
    compact_ = _missing("compact_")
    update_brightness_layers = _missing("update_brightness_layers")
    select_victims_layers = _missing("select_victims_layers")
    compact_layers_ = _missing("compact_layers_")
    archive_mass = _missing("archive_mass")
    archive_ratio = _missing("archive_ratio")
    retained_lse = _missing("retained_lse")
    retained_mass = _missing("retained_mass")
    bars = _missing("bars")

__all__ = [
    "available",
    "attention_column_mass",
    "attention_column_mass_and_update",
    "update_brightness",
    "cull_scores",
    "select_victims",
    "compact_",
    "update_brightness_layers",
    "select_victims_layers",
    "compact_layers_",
    "archive_mass",
    "archive_ratio",
    "retained_lse",
    "retained_mass",
    "bars",
]
