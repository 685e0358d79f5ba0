"""HaloCache on the Triton backend (interpreter on CPU, compiled on CUDA) equals the reference backend.

On CPU `kernels="auto"` never picks the kernels (they are for CUDA tensors), so the test asks for
`kernels="triton"` and runs a whole generate: column mass on every layer's captured q/K, brightness update, victim selection, and
compaction of the K/V buffers and the slot metadata, every step, at a budget that culls on every step.
"""

import pytest
import torch

import halo_kernels
from halo import HaloCache, HaloConfig
from tiny import tiny_llama


def _run(model, ids, kernels, device):
    config = HaloConfig(budget=24, recent_tokens=4, sink_tokens=2, chunk_size=8, granularity="token",
                        kernels="triton" if kernels else "reference")
    cache = HaloCache(model, config)
    assert cache.backend.name == ("triton" if kernels else "reference")
    out = model.generate(ids, max_new_tokens=24, do_sample=False, past_key_values=cache)
    n = cache.n_valid
    order = torch.sort(cache.positions[:n]).indices
    return out, cache, order


def test_generate_with_kernels_equals_reference(device, monkeypatch):
    if not halo_kernels.available():
        pytest.skip("no Triton backend")
    model = tiny_llama(seed=3, layers=2, heads=4, kv_heads=2, hidden=64).to(device)
    ids = torch.randint(0, 128, (1, 30), generator=torch.Generator().manual_seed(4)).to(device)
    calls = []
    original = halo_kernels.compact_
    monkeypatch.setattr(halo_kernels, "compact_", lambda *a: calls.append(1) or original(*a))
    fused_calls = []
    fused = halo_kernels.attention_column_mass_and_update
    monkeypatch.setattr(halo_kernels, "attention_column_mass_and_update",
                        lambda *a: fused_calls.append(1) or fused(*a))

    out_k, cache_k, order_k = _run(model, ids, True, device)
    assert calls, "the kernel path was not taken"
    assert fused_calls, "the last layer should fuse its column mass with the brightness update"
    out_r, cache_r, order_r = _run(model, ids, False, device)

    assert torch.equal(out_k, out_r)
    assert cache_k.n_valid == cache_r.n_valid == 24
    # same victims and the same move list: even the slot layout is identical
    assert torch.equal(cache_k.positions[:24], cache_r.positions[:24])
    assert torch.equal(cache_k.token_ids[:24], cache_r.token_ids[:24])
    assert torch.equal(cache_k.kv[:, :, :, :24][:, :, :, order_k], cache_r.kv[:, :, :, :24][:, :, :, order_r])
    torch.testing.assert_close(cache_k.brightness[:24][order_k], cache_r.brightness[:24][order_r], rtol=1e-4, atol=1e-3)
    assert len(cache_k.journal) == len(cache_r.journal) > 0


@pytest.mark.parametrize("granularity", ["layer", "head"])
def test_per_layer_generate_with_kernels_equals_reference(device, granularity):
    """Per-layer (and per-head) memory without units (plain generate): every row's victims, compaction and
    brightness update run on the kernels and leave every row's slots as the reference leaves them."""
    if not halo_kernels.available():
        pytest.skip("no Triton backend")
    model = tiny_llama(seed=5, layers=3, heads=4, kv_heads=2, hidden=64).to(device)
    ids = torch.randint(0, 128, (1, 30), generator=torch.Generator().manual_seed(6)).to(device)
    caches = []
    for kernels in ("triton", "reference"):
        config = HaloConfig(budget=24, recent_tokens=4, sink_tokens=2, chunk_size=8, granularity=granularity,
                            kernels=kernels)
        cache = HaloCache(model, config)
        caches.append((model.generate(ids, max_new_tokens=20, do_sample=False, past_key_values=cache), cache))
    (out_k, cache_k), (out_r, cache_r) = caches
    assert cache_k.backend.name == "triton" and torch.equal(out_k, out_r)
    assert cache_k.layer_counts.tolist() == cache_r.layer_counts.tolist() == [24] * cache_k.num_rows
    assert torch.equal(cache_k.positions[:, :24], cache_r.positions[:, :24])
    assert torch.equal(cache_k.kv[:, :, :, :24], cache_r.kv[:, :, :, :24])
    torch.testing.assert_close(cache_k.brightness[:, :24], cache_r.brightness[:, :24], rtol=1e-4, atol=1e-3)
    assert [e.position for e in cache_k.journal] == [e.position for e in cache_r.journal]
