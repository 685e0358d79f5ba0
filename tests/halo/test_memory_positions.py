"""Memory positions (HaloConfig(rope_positions="memory"), halo.memory_positions): RoPE reads the remembered
tokens at their ranks, with the cached keys rotated exactly to them after every cull, recall and marker."""

import pytest
import torch
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from tiny import tiny_llama
from halo import HaloConfig, Session, SourcePolicy, default_sources
from halo.memory_positions import RERANK_SLACK, gapped_ranks, per_head_delta, rope_inv_freq, rotate_keys, rotate_keys_

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]

TEXT = ("the quick brown fox jumps over the lazy dog and keeps running far away into the night while "
        "seven small owls count 48213 stars above the quiet river bank. ")


def memory_session(model, tok, **changes):
    sources = {**default_sources(), "user": SourcePolicy(initial=128.0, decay=1.0, priority=320.0)}
    config = HaloConfig(**{"budget": 40, "sink_tokens": 2, "recent_tokens": 6, "chunk_size": 4, "sources": sources,
                           "rope_positions": "memory", **changes})
    return Session(model, tok, config)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(1, 1, 1023, 64), (3, 2, 7, 32), (2, 5, 16)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 4e-3), (torch.bfloat16, 3e-2)])
def test_rotate_keys_matches_transformers_rope_and_composes(shape, dtype, tol, device):
    torch.manual_seed(0)
    head_dim = shape[-1]
    config = tiny_llama(hidden=4 * head_dim, heads=4, kv_heads=2).config
    rotary = LlamaRotaryEmbedding(config).to(device)
    keys = torch.randn(shape, device=device)
    delta = torch.randint(-40, 400, shape[:-1], device=device)
    cos, sin = rotary(keys, delta.reshape(1, -1))
    expected = apply_rotary_pos_emb(keys.reshape(1, 1, -1, head_dim), keys.reshape(1, 1, -1, head_dim),
                                    cos, sin)[0].reshape(shape)
    got = keys.clone().to(dtype)
    rotate_keys_(got, delta, rotary.inv_freq)
    torch.testing.assert_close(got.float(), expected, atol=tol * 8, rtol=tol)
    twice = keys.clone()  # R(a) R(b) = R(a + b)
    rotate_keys_(twice, delta // 3, rotary.inv_freq)
    rotate_keys_(twice, delta - delta // 3, rotary.inv_freq)
    torch.testing.assert_close(twice, expected, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("n", [5, 0])
@pytest.mark.parametrize("rows", ["token", "layer", "head"])
def test_per_head_delta_gives_each_kv_head_its_rows_rotation(rows, n):
    layers, heads, d = 3, 2, 8
    delta = torch.randint(-4, 5, {"token": (n,), "layer": (layers, n), "head": (layers * heads, n)}[rows])
    keys = torch.randn(layers, heads, n, d)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    rotated = keys.clone()
    rotate_keys_(rotated, per_head_delta(delta, layers, heads), inv_freq)
    for layer in range(layers):
        for head in range(heads):
            row = delta if rows == "token" else delta[layer] if rows == "layer" else delta[layer * heads + head]
            torch.testing.assert_close(rotated[layer, head], rotate_keys(keys[layer, head], row, inv_freq))


@pytest.mark.parametrize("granularity", ["token", "layer", "head"])
def test_rotating_every_slot_gives_the_keys_of_rotating_the_moved_ones(tiny_tok, granularity, monkeypatch):
    """The CUDA path (every held key rotated by its head's delta), forced onto the CPU, against the CPU path."""
    import halo.memory_positions as memory_positions

    model = tiny_llama(layers=2, vocab=len(tiny_tok))
    keys = {}
    for every in (False, True):
        monkeypatch.setattr(memory_positions, "rotates_every_slot", lambda device, every=every: every)
        session = memory_session(model, tiny_tok, granularity=granularity)
        for _ in range(2):
            session.feed(TEXT, "user")
            session.feed("2026-11-22 worker 3 processed batch 7 ok\n" * 3, "tool")
        session.generate(3, stop_on_eos=False)
        assert session.stats()["evicted"] > 0
        keys[every] = session.cache.kv[:, 0].clone()
    torch.testing.assert_close(keys[True], keys[False], atol=1e-6, rtol=1e-6)


def _gapped_ranks_reference(numbering: list[int], position: int, gap: int) -> int:
    """Walk the memory: one RoPE position per held token, at most `gap` per hole, then the hole before `position`."""
    rope, previous = -1, -1
    for held in numbering:
        if held >= position:
            break
        rope, previous = rope + min(held - previous - 1, gap) + 1, held
    return rope + min(position - previous - 1, gap) + 1


@pytest.mark.parametrize("gap", [0, 1, 3, 1000])
@pytest.mark.parametrize("m,shape", [(1, (1,)), (7, (3, 5)), (1023, (1, 1, 1023))])
def test_gapped_ranks_match_a_walk_through_the_memory(m, shape, gap):
    torch.manual_seed(m + gap)
    numbering = torch.unique(torch.randint(0, 4 * m + 3, (m,)))
    positions = torch.randint(0, 4 * m + 8, shape)
    got = gapped_ranks(numbering, positions, gap)
    assert got.shape == positions.shape and got.dtype == torch.int64
    held = numbering.tolist()
    assert got.flatten().tolist() == [_gapped_ranks_reference(held, p, gap) for p in positions.flatten().tolist()]
    at_held = gapped_ranks(numbering, numbering, gap)
    if gap == 0:
        assert torch.equal(at_held, torch.arange(len(numbering)))
    if gap >= int(numbering.diff(prepend=torch.tensor([-1])).max()):
        assert torch.equal(at_held, numbering)
    with pytest.raises(ValueError, match="rope_gap"):
        HaloConfig(rope_gap=-1)


def test_models_without_whole_head_rope_are_refused():
    with pytest.raises(ValueError, match="rotary"):
        rope_inv_freq(torch.nn.Linear(4, 4), 4)
    model = tiny_llama()
    with pytest.raises(ValueError, match="whole head"):
        rope_inv_freq(model, 2 * model.config.hidden_size)
    with pytest.raises(ValueError, match="rope_positions"):
        HaloConfig(rope_positions="slots")


def _layer0_keys_match_a_fresh_run(model, session):
    """Layer 0's keys depend only on the token and its RoPE position: every layer-0 slot's key must equal the key
    a fresh run of the same tokens at their `rope` positions computes (per-head memory: each KV head of layer 0
    over its own slots). Those positions keep the text order, never lie further apart than the text positions,
    and with holes capped at `rope_gap` positions (the ranks among what was remembered when the last forward
    began with 0; the holes its cull left close at the next forward, or once they add up to RERANK_SLACK) they
    stay below the text positions."""
    cache = session.cache
    gap = cache.config.rope_gap
    rows = cache.positions.dim() == 2
    heads = cache.kv.shape[2]
    per_head = cache.config.granularity == "head"
    counts = cache.layer_counts[:heads].tolist() if per_head else [cache.layer_length(0)] * heads
    tol = 2e-5 if cache.device.type == "cpu" else 2e-4
    for head, count in enumerate(counts):
        row = head if per_head else 0
        positions = (cache.positions[row] if rows else cache.positions)[:count]
        rope = (cache.slot_field("rope")[row] if rows else cache.slot_field("rope"))[:count]
        tokens = (cache.token_ids[row] if rows else cache.token_ids)[:count]
        assert torch.equal(torch.sort(rope).indices, torch.sort(positions).indices)
        assert len(torch.unique(rope)) == count
        order = torch.argsort(positions)
        assert bool((rope[order].diff() <= positions[order].diff()).all())
        assert int(rope.max()) < int(positions.max())
        if gap == 0:
            assert int(rope.max()) < 2 * cache.config.budget + RERANK_SLACK < int(positions.max())
        fresh = DynamicCache()
        with torch.no_grad():
            model(input_ids=tokens[None], position_ids=rope[None], past_key_values=fresh, use_cache=True)
        torch.testing.assert_close(cache.kv[0, 0, head, :count], fresh.layers[0].keys[0, head], atol=tol, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("granularity,gap", [("token", 0), ("layer", 0), ("head", 0), ("token", 3), ("layer", 2),
                                             ("head", 16)])
def test_keys_sit_at_their_memory_ranks_after_culls_markers_and_recall(tiny_tok, granularity, gap, device,
                                                                        monkeypatch):
    model = tiny_llama(layers=2, vocab=len(tiny_tok)).to(device)
    recall = {"recall": True, "recall_threshold": 0.0, "recall_tokens": 6, "recall_context": 2,
              "recall_grace": 8} if granularity != "token" else {}
    session = memory_session(model, tiny_tok, granularity=granularity, rope_gap=gap, **recall)
    # count the marker forwards: whether a marker is still held at a given check depends on near ties (an H200 run
    # held none at the three checks; the CPU run holds 6 at the first check only, then they die too)
    marker_forwards, spec = [], session.markers.spec

    def counted_spec(cache, runs):
        marker_forwards.append(len(runs))
        return spec(cache, runs)

    monkeypatch.setattr(session.markers, "spec", counted_spec)
    for _ in range(3):
        session.feed(TEXT, "user")
        session.feed("2026-11-22 worker 3 processed batch 7 ok\n" * 3, "tool")
        _layer0_keys_match_a_fresh_run(model, session)
    session.generate(5, stop_on_eos=False)
    _layer0_keys_match_a_fresh_run(model, session)
    stats = session.stats()
    assert stats["evicted"] > 0 and (marker_forwards or recall)  # with recall at threshold 0 every line comes back
    if recall:
        assert stats["recalled"] > 0


@pytest.mark.parametrize("granularity", ["token", "layer", "head"])
def test_memory_positions_change_nothing_before_the_first_cull(tiny_tok, granularity):
    model = tiny_llama(layers=2, vocab=len(tiny_tok))
    logits = {}
    for mode in ("text", "memory"):
        session = memory_session(model, tiny_tok, granularity=granularity, rope_positions=mode, budget=400)
        session.feed(TEXT * 2, "user")
        logits[mode] = session.last_logits
        assert session.stats()["evicted"] == 0
    torch.testing.assert_close(logits["memory"], logits["text"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("granularity", ["layer", "head"])
def test_a_saved_memory_session_continues_exactly(tiny_tok, tmp_path, granularity):
    model = tiny_llama(layers=2, vocab=len(tiny_tok))
    original = memory_session(model, tiny_tok, granularity=granularity)
    original.feed(TEXT * 2, "user")
    restored = Session.load(original.save(tmp_path / "s.halo"), model, tiny_tok)
    n = original.cache.n_valid
    assert torch.equal(restored.cache.slot_field("rope")[..., :n], original.cache.slot_field("rope")[..., :n])
    for session in (original, restored):
        session.feed(TEXT, "user")
    torch.testing.assert_close(restored.last_logits, original.last_logits)


def test_cli_flag_sets_memory_positions():
    from halo.cli import build_parser
    from halo.cli.common import config_from_args

    for command in ("run", "chat"):
        for mode in ("memory", "text", "auto"):
            args = build_parser().parse_args([command, "--rope-positions", mode])
            assert config_from_args(args).rope_positions == mode
    assert config_from_args(build_parser().parse_args(["run"])).rope_positions == "auto"


@pytest.mark.parametrize("granularity", ["layer", "head"])
def test_auto_positions_are_memory_positions_with_recall_only(tiny_tok, granularity):
    from halo import HaloCache

    model = tiny_llama(layers=2, vocab=len(tiny_tok))
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    for recall, memory in ((True, True), (False, False)):
        session = memory_session(model, tiny_tok, granularity=granularity, rope_positions="auto", recall=recall,
                                 recall_tokens=8)
        assert session.cache.memory_positions is memory
        session.feed(TEXT * 2, "user")
        assert session.stats()["evicted"] > 0
        if memory:  # the keys sit at their gapped ranks (holes of up to RERANK_SLACK may stay open), not in the text
            held, n = session.memory(), session.cache.n_valid
            newest = int(session.cache.slot_field("rope")[..., :n].max())
            remembered = torch.unique(held.positions)
            settled = int(gapped_ranks(remembered, remembered[-1:], session.cache.config.rope_gap))
            assert settled <= newest <= settled + RERANK_SLACK
            assert newest < int(held.positions.max())
    text = memory_session(model, tiny_tok, granularity=granularity, rope_positions="text", recall=True,
                          recall_tokens=8)
    assert not text.cache.memory_positions
    # a model whose RoPE does not turn the whole head: "auto" keeps text positions, "memory" is refused
    config = dict(budget=64, recent_tokens=8, granularity=granularity, recall=True)
    assert not HaloCache(model, HaloConfig(**config), head_dim=2 * head_dim).memory_positions
    with pytest.raises(ValueError, match="whole head"):
        HaloCache(model, HaloConfig(**config, rope_positions="memory"), head_dim=2 * head_dim)


def test_plain_generate_is_refused_with_memory_positions():
    from halo import HaloCache

    model = tiny_llama(layers=2)
    cache = HaloCache(model, HaloConfig(budget=40, sink_tokens=2, recent_tokens=6, rope_positions="memory"))
    with pytest.raises(RuntimeError, match="Session"):
        model.generate(torch.tensor([[1, 2, 3, 4]]), max_new_tokens=2, do_sample=False, past_key_values=cache)
