"""Read Halo's per-request reports (counters, retained positions, journal) out of a vLLM engine's workers.

The worker side is `halo_reports`, a method the plugin adds to vLLM's worker class
(`vllm.v1.worker.gpu_worker.Worker.halo_reports`, see worker_patch), so `collective_rpc("halo_reports")` reaches
it by name in every executor (in-process, multiprocess) without sending a pickled function.
"""

from __future__ import annotations

METHOD = "halo_reports"


def worker_reports(worker) -> dict[str, dict]:
    """On a vLLM worker: request id -> report of its running and recently finished Halo requests."""
    runner = getattr(worker, "model_runner", None)
    halo = None if runner is None else runner.__dict__.get("_halo_runner")
    return {} if not halo else halo.reports()


def reports(llm) -> dict[str, dict]:
    """request id -> report (see RequestMemory.report) of a `vllm.LLM`'s Halo requests, from every worker.

    Request ids are the engine's internal ids (vLLM 0.32 suffixes the ids of `RequestOutput.request_id`);
    `report_for(reports, output.request_id)` finds one by its output id.
    """
    merged: dict[str, dict] = {}
    for part in llm.collective_rpc(METHOD):
        merged.update(part)
    return merged


def report_for(all_reports: dict[str, dict], request_id: str) -> dict:
    """The report whose internal id is `request_id` or starts with `request_id-`; KeyError when none or several."""
    if request_id in all_reports:
        return all_reports[request_id]
    found = [r for rid, r in all_reports.items() if rid.startswith(f"{request_id}-")]
    if len(found) != 1:
        raise KeyError(f"no single Halo report for request {request_id!r} ({len(found)} match)")
    return found[0]
