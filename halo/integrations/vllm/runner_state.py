"""HaloRunner: the Halo side of one vLLM model runner (worker process): per-request memories and each step's plan.

Per step (all on the worker, in vLLM's V1 `GPUModelRunner` that the CPU runner subclasses):

1. `plan_step`, right after vLLM's `_prepare_inputs`: for each Halo request in the batch, the physical length
   is the slots its memory holds (`RequestMemory.count`, at most min(logical, budget), the scheduler's reservation:
   halo.integrations.vllm.accounting), and the step's token ids go to the memory (units need them). vLLM
   computed positions, sequence lengths and slot mappings from the logical `num_computed_tokens`; positions stay
   logical (RoPE counts from the true length), while `seq_lens`, `optimistic_seq_lens_cpu` and the slot mapping
   are recomputed from physical slots, so new K/V land right after the request's retained slots and attention
   reads exactly those.
2. `observe`, before each layer's CPU attention kernel: the layer's column mass for each Halo request from its
   query rows and its keys gathered from its own blocks (column_mass: the step's decode rows in one batch, each
   prefill chunk by causal query blocks; no matrix over the whole batch).
3. `finish_step`, after the forward: brightness update, cull to budget, compaction of the paged K/V inside the
   request's own blocks (every layer), and the block table row cut to ceil(min(logical, budget) / block_size)
   blocks (the scheduler frees the same blocks back to the pool by the same rule).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from . import accounting
from .column_mass import decode_column_mass_batch
from .paged_kv import BlockLayout, batch_key_blocks, blocks_of_slots, move_slots, probe_layout, request_keys
from .request_memory import RequestMemory
from .request_units import needs_tokenizer
from .settings import ServingConfig, request_settings

KEEP_FINISHED = 4096
"""Reports of finished requests kept per worker for `halo.integrations.vllm.reports`."""

_LAYER_INDEX = re.compile(r"\.(\d+)\.")


@dataclass
class PlannedRow:
    """One Halo request of the running step: its batch row, memory, token count and query slice."""

    row: int
    request_id: str
    memory: RequestMemory
    new_tokens: int
    query_start: int
    batched: bool = False  # a decode row: its column mass runs in the step's DecodeBatch when there is one


@dataclass
class DecodeBatch:
    """The step's decode rows whose column mass runs batched (column_mass.decode_column_mass_batch).

    Attributes:
        planned: the PlannedRows, in batch order; rows: int64 [R] their batch rows (block table rows);
        query_rows: int64 [R] their query rows; lengths: int64 [R] slots each attends (held + 1);
        width: the largest length.
    """

    planned: list[PlannedRow]
    rows: torch.Tensor
    query_rows: torch.Tensor
    lengths: torch.Tensor
    width: int

    @classmethod
    def of(cls, plan: list[PlannedRow]) -> "DecodeBatch | None":
        """The batch of the plan's batched rows, or None when fewer than two (one runs on its own)."""
        rows = [p for p in plan if p.batched]
        if len(rows) < 2:
            return None
        lengths = torch.tensor([p.memory.count + 1 for p in rows], dtype=torch.int64)
        return cls(rows, torch.tensor([p.row for p in rows], dtype=torch.int64),
                   torch.tensor([p.query_start for p in rows], dtype=torch.int64), lengths, int(lengths.max()))


class HaloRunner:
    """Halo state of one vLLM model runner.

    Args:
        runner: the vLLM GPUModelRunner (CPUModelRunner) after its KV cache is initialised.
        engine: the engine's ServingConfig.
    """

    def __init__(self, runner, engine: ServingConfig):
        self.engine = engine
        groups = runner.kv_cache_config.kv_cache_groups
        if len(groups) != 1:
            raise ValueError(f"Halo serves models with one KV cache group (full attention everywhere); this model "
                             f"has {len(groups)}")
        names = list(groups[0].layer_names)
        self.layer_index = {name: _layer_number(name) for name in names}
        if sorted(self.layer_index.values()) != list(range(len(names))):
            raise ValueError(f"cannot number the attention layers {names}")
        self.num_layers = len(names)
        self.layer_names = sorted(names, key=self.layer_index.get)
        self.block_size = runner.input_batch.block_table[0].block_size
        self.memories: dict[str, RequestMemory] = {}
        self.settings: dict[str, ServingConfig | None] = {}
        self.finished: OrderedDict[str, dict] = OrderedDict()
        self.plan: list[PlannedRow] = []
        self.decode: DecodeBatch | None = None  # the plan's decode rows, batched
        self.layout: BlockLayout | None = None  # probed on the first attention call
        self.model_config = runner.model_config
        self._tokenizer = None  # loaded when the first request with word or line units arrives
        self.audit: list[dict] | None = None  # set to [] to record every eviction's blocks (tests)

    # ------------------------------------------------------------ requests
    def request_settings(self, request_id: str, request_state) -> ServingConfig | None:
        if request_id not in self.settings:
            self.settings[request_id] = request_settings(self.engine, request_state.sampling_params)
        return self.settings[request_id]

    def tokenizer(self, serving: ServingConfig):
        """The model's tokenizer when `serving` gives its requests units (loaded once, with vLLM's own loader),
        else None."""
        if self._tokenizer is None and needs_tokenizer(serving):
            from vllm.tokenizers import cached_tokenizer_from_config

            self._tokenizer = cached_tokenizer_from_config(self.model_config)
        return self._tokenizer

    def new_memory(self, request_id: str, serving: ServingConfig, num_prompt_tokens: int) -> RequestMemory:
        """A fresh RequestMemory for a request (its first step, or its first step after a resume)."""
        return RequestMemory(request_id, serving, self.num_layers, num_prompt_tokens, self.tokenizer(serving),
                             self.model_config.get_vocab_size())

    def forget(self, request_id: str, finished: bool) -> None:
        """Drop a request's memory; a finished request leaves its report behind, a preempted one (resumed by a
        recompute from token 0) its journal file emptied for the memory that replaces it."""
        memory = self.memories.pop(request_id, None)
        if finished:
            self.settings.pop(request_id, None)
        if memory is None:
            return
        if not finished:
            memory.discard()
            return
        memory.close()
        self.finished[request_id] = memory.report()
        while len(self.finished) > KEEP_FINISHED:
            self.finished.popitem(last=False)

    def reports(self) -> dict[str, dict]:
        """request id -> report (RequestMemory.report) of running and recently finished requests."""
        out = dict(self.finished)
        out.update({rid: memory.report() for rid, memory in self.memories.items()})
        return out

    # ------------------------------------------------------------ one step
    def plan_step(self, runner, num_scheduled_tokens: np.ndarray) -> None:
        """After vLLM's `_prepare_inputs`: register this step's Halo rows and make slots physical."""
        batch = runner.input_batch
        num_reqs = batch.num_reqs
        query_start = runner.query_start_loc.cpu[: num_reqs + 1].numpy()
        computed = batch.num_computed_tokens_cpu[:num_reqs]
        shifts = np.zeros(num_reqs, dtype=np.int64)
        self.plan = []
        for row, request_id in enumerate(batch.req_ids[:num_reqs]):
            state = runner.requests[request_id]
            serving = self.request_settings(request_id, state)
            if serving is None:
                continue
            logical, new = int(computed[row]), int(num_scheduled_tokens[row])
            memory = self.memories.get(request_id)
            if memory is None:
                memory = self.new_memory(request_id, serving, len(state.prompt_token_ids))
                self.memories[request_id] = memory
            reserved = accounting.physical_length(logical, serving.budget)
            if memory.count > reserved:
                raise RuntimeError(f"request {request_id}: Halo holds {memory.count} slots but the scheduler "
                                   f"reserves {reserved} for {logical} tokens at budget {serving.budget}")
            shifts[row] = logical - memory.count
            start = int(query_start[row])
            memory.begin_step(logical, runner.input_ids.cpu[start:start + new])
            self.plan.append(PlannedRow(row, request_id, memory, new, start, new == 1 and not memory.reference))
        self.decode = DecodeBatch.of(self.plan)
        if not shifts.any():
            return
        total = int(query_start[num_reqs])
        shift_t = torch.from_numpy(shifts)
        runner.seq_lens[:num_reqs] -= shift_t.to(runner.seq_lens.dtype)
        runner.optimistic_seq_lens_cpu[:num_reqs] -= shift_t.to(runner.optimistic_seq_lens_cpu.dtype)
        per_token = torch.from_numpy(np.repeat(shifts, num_scheduled_tokens[:num_reqs]))
        physical = runner.positions[:total] - per_token
        batch.block_table.compute_slot_mapping(num_reqs, runner.query_start_loc.gpu[: num_reqs + 1], physical)

    def observe(self, impl, layer, query: torch.Tensor, kv_cache: torch.Tensor, attn_metadata) -> None:
        """Before one layer's attention kernel: accumulate its column mass for every planned row.

        Args:
            impl: the layer's CPUAttentionBackendImpl; layer: its Attention layer.
            query: [num_tokens, Hq, D] the layer's queries (RoPE applied); kv_cache: the layer's paged cache,
            already holding this step's K/V; attn_metadata: CPUAttentionMetadata of the step.
        """
        index = self.layer_index.get(layer.layer_name)
        if index is None or not self.plan:
            return
        if self.layout is None:
            self.layout = probe_layout(impl, layer, kv_cache)
        if self.decode is not None:
            self._observe_decode(index, impl.scale, query, kv_cache, attn_metadata.block_table)
        for planned in self.plan:
            if self.decode is not None and planned.batched:  # done above
                continue
            n = planned.memory.count + planned.new_tokens
            rows = query[planned.query_start:planned.query_start + planned.new_tokens].transpose(0, 1)
            keys = request_keys(kv_cache, self.layout, attn_metadata.block_table[planned.row], n)
            planned.memory.accumulate(index, rows, keys, impl.scale)

    def _observe_decode(self, index: int, scale: float, query: torch.Tensor, kv_cache: torch.Tensor,
                        block_table: torch.Tensor) -> None:
        """One layer's column mass of every batched decode row at once (one key gather, one softmax)."""
        batch = self.decode
        keys = batch_key_blocks(kv_cache, self.layout, block_table[batch.rows], batch.width)
        mass = decode_column_mass_batch(query[batch.query_rows], keys, scale, batch.lengths)  # [R, >= width]
        for planned, row, n in zip(batch.planned, mass, batch.lengths.tolist()):
            planned.memory.add_mass(index, row[:n])

    def clear_plan(self) -> None:
        """Forget the step's plan (before a forward, and once its cull is done)."""
        self.plan, self.decode = [], None

    def finish_step(self, runner) -> None:
        """After the forward: brightness, cull, compaction in the paged cache, block table rows cut."""
        plan = self.plan
        self.clear_plan()
        if not plan:
            return
        table = runner.input_batch.block_table[0]
        layer_caches = [runner.compilation_config.static_forward_context[name].kv_cache for name in self.layer_names]
        for planned in plan:
            moves = planned.memory.end_step()
            if moves is not None:
                block_ids = torch.from_numpy(
                    table.block_table.np[planned.row, : table.num_blocks_per_row[planned.row]].copy())
                self._move(layer_caches, block_ids, moves)
                if self.audit is not None:
                    self._record_audit(planned, block_ids, moves, table)
            # every step, evictions or not: under a whole unit's shortfall a step may evict nothing while the
            # scheduler reserved min(logical, budget) + new slots for it and frees the surplus block afterwards
            self._cut_row(runner, planned, table)

    def _move(self, layer_caches, block_ids: torch.Tensor, moves) -> None:
        for layer, cache in enumerate(layer_caches):
            row = layer if moves.per_layer else 0
            src, dst = moves.src[row], moves.dst[row]
            real = src != dst
            move_slots(cache, self.layout, block_ids, src[real], dst[real])

    def _cut_row(self, runner, planned: PlannedRow, table) -> None:
        """Drop the row's blocks past ceil(min(logical, budget) / block_size) from the worker's block table and
        request state: the scheduler keeps exactly those (its rule, not the memory's count, which may be lower)."""
        memory = planned.memory
        keep = accounting.blocks_needed(accounting.physical_length(memory.seen, memory.config.budget),
                                        self.block_size)
        held = int(table.num_blocks_per_row[planned.row])
        if held > keep:
            table.block_table.np[planned.row, keep:held] = 0
            table.num_blocks_per_row[planned.row] = keep
        del runner.requests[planned.request_id].block_ids[0][keep:]

    def _record_audit(self, planned: PlannedRow, block_ids: torch.Tensor, moves, table) -> None:
        """Record the blocks this eviction read or wrote, the row's own blocks and every other live row's blocks."""
        touched = set()
        for row in range(moves.src.shape[0]):
            real = moves.src[row] != moves.dst[row]
            touched |= blocks_of_slots(block_ids, moves.src[row][real], self.block_size)
            touched |= blocks_of_slots(block_ids, moves.dst[row][real], self.block_size)
        others = {row: set(table.block_table.np[row, :count].tolist())
                  for row, count in enumerate(table.num_blocks_per_row.tolist()) if row != planned.row and count}
        self.audit.append({"request_id": planned.request_id, "step": planned.memory.steps, "touched": touched,
                           "own": set(block_ids.tolist()), "others": others})


def _layer_number(name: str) -> int:
    """Layer index in a module name such as 'model.layers.12.self_attn.attn'."""
    found = _LAYER_INDEX.findall(name)
    if not found:
        raise ValueError(f"cannot read a layer index from attention layer name {name!r}")
    return int(found[-1])
