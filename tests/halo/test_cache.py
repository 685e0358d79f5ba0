"""HaloCache against the model's own default cache and eager attention (the exactness oracles)."""

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from tiny import tiny_llama
from halo import HaloCache, HaloConfig, SourcePolicy, default_sources


def clone(model):
    twin = tiny_llama(layers=model.config.num_hidden_layers, heads=model.config.num_attention_heads,
                      kv_heads=model.config.num_key_value_heads, hidden=model.config.hidden_size,
                      vocab=model.config.vocab_size)
    twin.load_state_dict(model.state_dict())
    return twin


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_generate_with_large_budget_equals_default_cache(kv_heads):
    model = tiny_llama(seed=kv_heads, kv_heads=kv_heads)
    ids = torch.randint(0, 128, (1, 23), generator=torch.Generator().manual_seed(1))
    expected = model.generate(ids, max_new_tokens=40, do_sample=False)
    twin = clone(model)
    cache = HaloCache(twin, HaloConfig(granularity="token", budget=100, recent_tokens=8))
    got = twin.generate(ids, max_new_tokens=40, do_sample=False, past_key_values=cache)
    assert torch.equal(got, expected)
    assert cache.n_valid == 23 + 39 and cache.seen == 23 + 39 and len(cache.journal) == 0
    assert cache.token_ids[: cache.n_valid].tolist() == got[0, :-1].tolist()


@pytest.mark.parametrize("kv_heads", [1, 4])
def test_per_layer_generate_with_large_budget_equals_default_cache(kv_heads):
    model = tiny_llama(seed=kv_heads, kv_heads=kv_heads, layers=3)
    ids = torch.randint(0, 128, (1, 23), generator=torch.Generator().manual_seed(2))
    expected = model.generate(ids, max_new_tokens=30, do_sample=False)
    twin = clone(model)
    cache = HaloCache(twin, HaloConfig(budget=100, recent_tokens=8))  # the default: one memory per layer
    assert cache.per_layer
    got = twin.generate(ids, max_new_tokens=30, do_sample=False, past_key_values=cache)
    assert torch.equal(got, expected)
    assert cache.layer_counts.tolist() == [23 + 29] * 3 and len(cache.journal) == 0
    assert cache.snapshot()["token_ids"].tolist() == got[0, :-1].tolist()


def test_generate_compacts_long_prompt_to_budget():
    model = tiny_llama()
    cache = HaloCache(model, HaloConfig(granularity="token", budget=16, recent_tokens=4, sink_tokens=2, chunk_size=4))
    ids = torch.randint(0, 128, (1, 40))
    out = model.generate(ids, max_new_tokens=10, do_sample=False, past_key_values=cache)
    assert out.shape == (1, 50)
    assert cache.n_valid == 16 and cache.seen == 49
    assert cache.capacity >= 40  # grew once for the oversized prompt forward
    kept = sorted(cache.positions[: cache.n_valid].tolist())
    assert kept[:2] == [0, 1] and kept[-4:] == [45, 46, 47, 48]


def test_per_layer_generate_compacts_long_prompt_to_budget():
    """The oversized prompt forward grows the buffers; every layer's new slots start free (FREE_POSITION)."""
    from halo.layer_cull import FREE_POSITION

    model = tiny_llama(layers=3)
    cache = HaloCache(model, HaloConfig(budget=16, recent_tokens=4, sink_tokens=2, chunk_size=4))
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(3))
    model.generate(ids, max_new_tokens=10, do_sample=False, past_key_values=cache)
    assert cache.capacity >= 40 and cache.layer_counts.tolist() == [16] * 3 and cache.seen == 49
    for layer in range(3):
        kept = sorted(cache.positions[layer, :16].tolist())
        assert kept[:2] == [0, 1] and kept[-4:] == [45, 46, 47, 48] and len(set(kept)) == 16
        assert (cache.positions[layer, 16:] == FREE_POSITION).all() and (cache.serials[layer, 16:] == -1).all()
    remembered = cache.snapshot()["positions"].tolist()
    assert sorted(remembered + [e.position for e in cache.journal.evicted]) == list(range(49))


def eager_brightness(model, ids, initial, decay, alpha):
    """Brightness from eager attention weights of the same model, per the definition."""
    eager = clone(model)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        out = eager(ids, output_attentions=True)
    t_rows = ids.shape[1]
    mass = torch.zeros(t_rows, dtype=torch.float64)
    for attn in out.attentions:  # [1, H, T, T]
        weights = torch.arange(1, t_rows + 1, dtype=torch.float64)[:, None]  # n_t = t + 1
        mass += (attn[0].double().mean(0) * weights).sum(0)
    mass /= len(out.attentions)
    tics = torch.arange(t_rows, 0, -1, dtype=torch.float64)
    return (initial + alpha * mass - decay * tics).clamp(0, 255)


def unclamped_config(**kw):
    sources = default_sources()
    sources["user"] = SourcePolicy(initial=120.0, decay=0.5)
    return HaloConfig(granularity="token", budget=200, recent_tokens=8, sources=sources, **kw)


def test_brightness_equals_eager_attention_weights():
    model = tiny_llama(seed=3)
    ids = torch.randint(0, 128, (1, 30), generator=torch.Generator().manual_seed(2))
    expected = eager_brightness(model, ids, 120.0, 0.5, 1.7)
    twin = clone(model)
    cache = HaloCache(twin, unclamped_config(alpha=1.7))
    with torch.no_grad():
        twin(ids, past_key_values=cache)
    torch.testing.assert_close(cache.brightness[:30].double(), expected, rtol=0, atol=1e-4)


def test_chunked_and_token_by_token_brightness_agree():
    model = tiny_llama(seed=4)
    ids = torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(3))
    results = []
    for step in (24, 5, 1):
        cache = HaloCache(model, unclamped_config())
        with torch.no_grad():
            for start in range(0, 24, step):
                model(ids[:, start:start + step], past_key_values=cache)
        results.append(cache.brightness[:24].clone())
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=1e-4)
    torch.testing.assert_close(results[2], results[0], rtol=0, atol=1e-4)


def layer0_keys(model, token_ids, positions):
    """[Hkv, n, D] layer-0 keys from scratch: they depend only on the token and its position."""
    layer = model.model.layers[0]
    with torch.no_grad():
        hidden = layer.input_layernorm(model.model.embed_tokens(token_ids[None]))
        attn = layer.self_attn
        k = attn.k_proj(hidden).view(1, len(token_ids), -1, attn.head_dim).transpose(1, 2)
        cos, sin = model.model.rotary_emb(hidden, positions[None])
        _, k = apply_rotary_pos_emb(k, k, cos, sin)
    return k[0]


def test_decode_eviction_stays_position_exact_over_hundreds_of_steps():
    model = tiny_llama(seed=5)
    config = HaloConfig(granularity="token", budget=24, sink_tokens=3, recent_tokens=6, chunk_size=4)
    cache = HaloCache(model, config)
    stream = torch.randint(0, 128, (300,), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        model(stream[None, :4], past_key_values=cache)
        for step in range(4, 300):
            model(stream[None, step:step + 1], past_key_values=cache)
            n = cache.n_valid
            assert n <= config.budget
            positions = cache.positions[:n]
            assert torch.equal(cache.token_ids[:n], stream[positions])
            assert set(range(3)) <= set(positions.tolist())
            assert set(range(max(0, step + 1 - 6), step + 1)) <= set(positions.tolist())
    n = cache.n_valid
    expected = layer0_keys(model, cache.token_ids[:n], cache.positions[:n])
    torch.testing.assert_close(cache.kv[0, 0, :, :n], expected, rtol=1e-5, atol=1e-5)
    journal = cache.journal.evicted
    assert sorted([e.position for e in journal] + cache.positions[:n].tolist()) == list(range(300))
    assert all(e.token_id == int(stream[e.position]) for e in journal)


def test_cache_rejects_batches_and_foreign_dtypes():
    model = tiny_llama()
    cache = HaloCache(model, HaloConfig(granularity="token", budget=32, recent_tokens=4))
    with pytest.raises(ValueError, match="batch size"):
        model(torch.randint(0, 128, (2, 5)), past_key_values=cache)
    assert cache.n_valid == 0
    model(torch.randint(0, 128, (1, 5)), past_key_values=cache)
    assert cache.n_valid == 5
