"""Worker-side patches (vLLM 0.32.0, V1 model runner, CPU attention backend).

Patched, each a wrapper that calls vLLM's own method first and is a no-op for engines without Halo settings:

* `vllm.v1.worker.gpu_model_runner.GPUModelRunner._update_states`: drops the Halo memory of finished requests
  (keeping their report) and resets it for requests resumed after preemption (vLLM recomputes them from token 0).
* `GPUModelRunner._prepare_inputs`: `HaloRunner.plan_step` (physical seq_lens and slot mapping, logical positions).
* `GPUModelRunner.execute_model`: marks the runner active for the attention wrapper during the forward, then
  `HaloRunner.finish_step` (brightness, cull, paged compaction, block table rows cut).
* `vllm.v1.attention.backends.cpu_attn.CPUAttentionBackendImpl.forward`: before vLLM's kernel, `HaloRunner.observe`
  (column mass of each Halo request's query rows over its keys).

CPUModelRunner (vllm.v1.worker.cpu_model_runner) subclasses GPUModelRunner without overriding these methods.
Added (not wrapped): `vllm.v1.worker.gpu_worker.Worker.halo_reports`, which `halo.integrations.vllm.reports`
reaches through `collective_rpc("halo_reports")`.
"""

from __future__ import annotations

import threading

from .wrapping import wrap

_active = threading.local()
_installed = False


def active_runner():
    """The model runner whose forward is in flight on this thread, or None."""
    return getattr(_active, "runner", None)


def halo_of(runner):
    """The runner's HaloRunner, created on first use; None when the engine has no Halo settings."""
    halo = runner.__dict__.get("_halo_runner", False)
    if halo is False:
        from .settings import engine_settings

        engine = engine_settings(runner.vllm_config)
        halo = None
        if engine is not None:
            from .runner_state import HaloRunner

            halo = HaloRunner(runner, engine)
        runner._halo_runner = halo
    return halo


def install() -> None:
    """Wrap the four methods above and add the worker's report method (idempotent)."""
    global _installed
    if _installed:
        return
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.gpu_worker import Worker

    from .reports import METHOD, worker_reports

    wrap(GPUModelRunner, "_update_states", _update_states)
    wrap(GPUModelRunner, "_prepare_inputs", _prepare_inputs)
    wrap(GPUModelRunner, "execute_model", _execute_model)
    wrap(CPUAttentionBackendImpl, "forward", _attention_forward)
    setattr(Worker, METHOD, worker_reports)
    _installed = True


def _engine_on(runner) -> bool:
    """Whether this runner serves a Halo engine (decided once its KV cache exists)."""
    return getattr(runner, "kv_cache_config", None) is not None and halo_of(runner) is not None


def _update_states(original, runner, scheduler_output, *args, **kwargs):
    if _engine_on(runner):
        halo = halo_of(runner)
        for request_id in scheduler_output.finished_req_ids:
            halo.forget(request_id, finished=True)
        for request_id in scheduler_output.scheduled_cached_reqs.resumed_req_ids:
            halo.forget(request_id, finished=False)  # recomputed from token 0: its memory starts again
    return original(runner, scheduler_output, *args, **kwargs)


def _prepare_inputs(original, runner, scheduler_output, num_scheduled_tokens, *args, **kwargs):
    result = original(runner, scheduler_output, num_scheduled_tokens, *args, **kwargs)
    if _engine_on(runner):
        halo_of(runner).plan_step(runner, num_scheduled_tokens)
    return result


def _execute_model(original, runner, scheduler_output, *args, **kwargs):
    if not _engine_on(runner):
        return original(runner, scheduler_output, *args, **kwargs)
    halo = halo_of(runner)
    halo.clear_plan()
    _active.runner = runner
    try:
        result = original(runner, scheduler_output, *args, **kwargs)
    finally:
        _active.runner = None
    halo.finish_step(runner)
    return result


def _attention_forward(original, impl, layer, query, key, value, kv_cache, attn_metadata, *args, **kwargs):
    # Before vLLM's kernel: the step's K/V are already in the cache (do_kv_cache_update ran), and the CPU kernel
    # may scale the query in place.
    runner = active_runner()
    if runner is not None and attn_metadata is not None and impl.attn_type == "decoder":
        halo = halo_of(runner)
        if halo is not None and halo.plan:
            halo.observe(impl, layer, query, kv_cache, attn_metadata)
    return original(impl, layer, query, key, value, kv_cache, attn_metadata, *args, **kwargs)
