"""HaloLayer: one layer's view of a HaloCache, in the shape transformers' Cache expects of its layers."""

from __future__ import annotations

from transformers.cache_utils import CacheLayerMixin


class HaloLayer(CacheLayerMixin):
    """One layer's view of the shared HaloCache buffers."""

    is_compileable = False
    is_sliding = False
    supports_early_init = False

    def __init__(self, cache: "halo.cache.HaloCache", layer_idx: int):
        super().__init__()
        self.cache = cache
        self.layer_idx = layer_idx
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:
        """Buffers are preallocated by the cache."""

    @property
    def keys(self):
        return self.cache.kv[self.layer_idx, 0, None, :, : self.cache.layer_length(self.layer_idx)]

    @keys.setter
    def keys(self, value):
        if value is not None:
            raise AttributeError("HaloCache buffers are fixed; write through update()")

    @property
    def values(self):
        return self.cache.kv[self.layer_idx, 1, None, :, : self.cache.layer_length(self.layer_idx)]

    @values.setter
    def values(self, value):
        if value is not None:
            raise AttributeError("HaloCache buffers are fixed; write through update()")

    def update(self, key_states, value_states, *args, **kwargs):
        return self.cache.layer_update(self.layer_idx, key_states, value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cache.n_valid + query_length, self.cache.seen - self.cache.n_valid

    def get_seq_length(self) -> int:
        return self.cache.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        if self.layer_idx == 0:
            self.cache.reset()

    def reorder_cache(self, beam_idx) -> None:
        raise ValueError("HaloCache holds one conversation; beam search is not supported")
