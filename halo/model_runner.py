"""ModelRunner: the model's forwards through a HaloCache, each described by a ForwardSpec, and their time.

Every forward a session makes goes through here: the stream forwards of fed and generated tokens (pending repair
patches riding along), the elision markers' service forwards, and the flush of pending patches. The runner calls
the model with the spec's rows at their RoPE positions (HaloCache.model_positions) and the cache as
`past_key_values`, inside `HaloCache.run`, and counts the model's share of the time (the cache's own step work,
`cache.halo_seconds`, left out).
"""

from __future__ import annotations

import time

import torch

from .forward import ForwardSpec, StepResult, stream_spec


class ModelRunner:
    """Runs `model` over ForwardSpecs through `cache`.

    Args:
        model: a transformers causal LM using the `halo` attention function; cache: its HaloCache.

    Attributes:
        seconds: wall time of the forwards so far, less the cache's own step work (saved with a session).
    """

    def __init__(self, model, cache):
        self.model = model
        self.cache = cache
        self.seconds = 0.0

    def __call__(self, spec: ForwardSpec, logits_to_keep: int | torch.Tensor = 1) -> tuple[torch.Tensor, StepResult]:
        """Run one forward under `spec`; returns (logits [1, K, V], StepResult).

        `logits_to_keep`: the last K rows (an int) or the rows given (int64 [K]) whose logits are computed. A
        forward that raises is dropped uncommitted (HaloCache.run).
        """
        halo_before = self.cache.halo_seconds
        t0 = time.perf_counter()
        positions = self.cache.model_positions(spec)  # RoPE's view: the text positions or the memory ranks

        def forward():
            with torch.inference_mode():
                return self.model(input_ids=spec.input_ids[None], position_ids=positions[None],
                                  past_key_values=self.cache, use_cache=True, logits_to_keep=logits_to_keep).logits

        out = self.cache.run(spec, forward)
        self.seconds += time.perf_counter() - t0 - (self.cache.halo_seconds - halo_before)
        return out

    def stream(self, spec: ForwardSpec) -> tuple[torch.Tensor, StepResult]:
        """Run a stream forward (`stream_spec`); returns (logits [V] of its last new token, StepResult).

        Patch rows follow the new tokens, so with patches only the last new token's row is computed.
        """
        keep = 1 if spec.patch_slots is None else torch.tensor([spec.new_rows - 1], device=self.cache.device)
        logits, result = self(spec, keep)
        return logits[0, -1], result

    def flush_patches(self, repairs) -> int:
        """Recompute the K/V of `repairs`' pending patches (RepairScheduler.patch_slots) in place, in one service
        forward with no new token; returns the number of slots patched (0: nothing was pending)."""
        patch_slots = repairs.patch_slots(self.cache)
        if patch_slots is None:
            return 0
        self(stream_spec(self.cache, patch_slots.new_empty(0), self.cache.config.source_names[0],
                         patch_slots=patch_slots))
        repairs.patches_done()
        return patch_slots.numel()
