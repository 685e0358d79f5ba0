"""Scheduler-side patches (vLLM 0.32.0, V1 engine core).

The scheduler keeps counting every request logically (`Request.num_computed_tokens` is the true length: it
schedules, stops at max_tokens / max_model_len and streams as usual). Only the KV accounting is physical
(halo.integrations.vllm.accounting). Patched, each a wrapper around vLLM's own method:

* `vllm.v1.core.sched.scheduler.Scheduler.__init__`: reads the engine's Halo settings, refuses configurations
  the integration cannot serve (prefix caching, async scheduling, speculative decoding, the V2 model runner,
  a non-CPU platform, more than one KV cache group) and hands the settings to its KVCacheManager.
* `vllm.v1.core.kv_cache_manager.KVCacheManager.allocate_slots`: for a Halo request, allocates for
  `physical + new tokens` instead of `logical + new tokens` (num_computed_tokens is lowered by the shift for
  the duration of the call only). At admission (the scheduler's `full_sequence_must_fit` gate, on while
  `scheduler_reserve_full_isl` is, vLLM's default) a Halo request is admitted by its peak, not its whole
  length: for the duration of the call, the request's `FullAttentionManager.max_admission_blocks_per_request`
  (vLLM's own per-request admission cap, the one sliding-window layers use; None for full attention) is set
  to ceil((budget + largest chunk) / block_size), so vLLM's gate reserves
  min(ceil(length / block_size), that cap) blocks. Requests served plainly keep vLLM's gate untouched.
* `Scheduler.update_from_output`: after vLLM's bookkeeping, frees each Halo request's blocks past
  ceil(min(logical, budget) / block_size) back to the block pool (the worker cut the same blocks from its
  block table when it compacted).
"""

from __future__ import annotations

from . import accounting
from .settings import ServingConfig, engine_settings, request_settings
from .wrapping import wrap

_installed = False
_ATTR = "_halo_engine"


def install() -> None:
    """Wrap the three methods above (idempotent)."""
    global _installed
    if _installed:
        return
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.core.sched.scheduler import Scheduler

    wrap(Scheduler, "__init__", _scheduler_init)
    wrap(Scheduler, "update_from_output", _update_from_output)
    wrap(KVCacheManager, "allocate_slots", _allocate_slots)
    _installed = True


def check_engine(vllm_config) -> None:
    """Raise ValueError naming the first engine setting a Halo engine cannot run with."""
    from vllm.platforms import current_platform

    if vllm_config.cache_config.enable_prefix_caching:
        raise ValueError("Halo compacts blocks in place, so they no longer match their prefix hashes: start the "
                         "engine with enable_prefix_caching=False")
    if vllm_config.scheduler_config.async_scheduling:
        raise ValueError("Halo frees and reuses blocks between steps; start the engine with async_scheduling=False")
    if vllm_config.speculative_config is not None:
        raise ValueError("Halo does not support speculative decoding (rejected draft tokens would have been culled "
                         "against); start the engine without speculative_config")
    if vllm_config.use_v2_model_runner:
        raise ValueError("Halo patches vLLM's V1 model runner; set VLLM_USE_V2_MODEL_RUNNER=0")
    if not current_platform.is_cpu():
        raise NotImplementedError("the Halo vLLM integration wraps the CPU attention backend (CPU_ATTN) only; "
                                  f"this engine runs on {current_platform.device_name!r}")
    if vllm_config.parallel_config.tensor_parallel_size != 1 or vllm_config.parallel_config.pipeline_parallel_size != 1:
        raise NotImplementedError("the Halo vLLM integration runs with tensor_parallel_size=1 and "
                                  "pipeline_parallel_size=1 (see docs/serving.md for the path to tensor parallel)")


def _scheduler_init(original, scheduler, vllm_config, *args, **kwargs):
    engine = engine_settings(vllm_config)
    if engine is not None:
        check_engine(vllm_config)
    original(scheduler, vllm_config, *args, **kwargs)
    if engine is not None:
        managers = scheduler.kv_cache_manager.coordinator.single_type_managers
        if len(managers) != 1:
            raise ValueError(f"Halo serves models with one KV cache group; this one has {len(managers)}")
        # the most tokens one step schedules for a request (long_prefill_token_threshold is lifted when a
        # request runs alone, so the step's token budget is the bound): a Halo request's peak is budget + this
        scheduler.kv_cache_manager._halo_chunk = scheduler.max_num_scheduled_tokens
    setattr(scheduler.kv_cache_manager, _ATTR, engine)


def _settings(manager, request) -> ServingConfig | None:
    engine = getattr(manager, _ATTR, None)
    if engine is None:
        return None
    cache = manager.__dict__.setdefault("_halo_requests", {})
    if request.request_id not in cache:
        cache[request.request_id] = request_settings(engine, request.sampling_params)
    return cache[request.request_id]


def _allocate_slots(original, manager, request, num_new_tokens, *args, **kwargs):
    serving = _settings(manager, request)
    if serving is None:
        return original(manager, request, num_new_tokens, *args, **kwargs)
    shift = accounting.shift(request.num_computed_tokens, serving.budget)
    # vLLM 0.32's scheduler passes full_sequence_must_fit by keyword (its admission gate for waiting requests)
    admission = bool(kwargs.get("full_sequence_must_fit"))
    if admission:
        single = manager.coordinator.single_type_managers[0]
        cap = single.max_admission_blocks_per_request
        peak = accounting.blocks_needed(accounting.peak_slots(serving.budget, manager._halo_chunk),
                                        single.block_size)
        single.max_admission_blocks_per_request = peak if cap is None else min(cap, peak)
    request.num_computed_tokens -= shift
    try:
        return original(manager, request, num_new_tokens, *args, **kwargs)
    finally:
        request.num_computed_tokens += shift
        if admission:
            single.max_admission_blocks_per_request = cap


def _update_from_output(original, scheduler, scheduler_output, model_runner_output, *args, **kwargs):
    result = original(scheduler, scheduler_output, model_runner_output, *args, **kwargs)
    manager = scheduler.kv_cache_manager
    if getattr(manager, _ATTR, None) is None:
        return result
    single = manager.coordinator.single_type_managers[0]
    cache = manager.__dict__.setdefault("_halo_requests", {})
    for request_id in scheduler_output.num_scheduled_tokens:
        request = scheduler.requests.get(request_id)
        if request is None or request.is_finished():
            cache.pop(request_id, None)
            continue
        serving = _settings(manager, request)
        if serving is None:
            continue
        physical = accounting.physical_length(request.num_computed_tokens, serving.budget)
        free_tail(single, manager.block_pool, request_id, accounting.blocks_needed(physical, single.block_size))
    for request_id in scheduler_output.finished_req_ids:
        cache.pop(request_id, None)
    return result


def free_tail(single_type_manager, block_pool, request_id: str, keep: int) -> int:
    """Return a request's blocks past the first `keep` to the pool (tail first); returns how many were freed."""
    blocks = single_type_manager.req_to_blocks.get(request_id)
    if not blocks or len(blocks) <= keep:
        return 0
    tail = blocks[keep:]
    del blocks[keep:]
    cached = single_type_manager.num_cached_block.get(request_id)
    if cached is not None and cached > keep:
        single_type_manager.num_cached_block[request_id] = keep
    block_pool.free_blocks(reversed(tail))
    return len(tail)
