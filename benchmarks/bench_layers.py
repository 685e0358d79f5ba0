"""Per-layer memory kernels against their plain-PyTorch references, in the same run (pytest-benchmark).

The three ops of a per-layer memory step (`halo.layered_cache`: every layer keeps its own slots, fields [L, C]):

    update_brightness_layers   halo_kernels.brightness_layers   vs halo.brightness.update_brightness_layers
    select_victims_layers      halo_kernels.victims_layers      vs halo.layer_cull.select_victims_layers
    compact_layers_            halo_kernels.compact_layers      vs halo.compact.compact_layers_

Shapes are TinyLlama-1.1B's (22 layers, 4 KV heads, head dim 64, bf16) on CUDA, with ragged per-layer counts
(every layer a little below N) at N = 2k and 32k slots, and k = 64 evictions per layer (k = 1 too for victim
selection, a decode step's usual cull). Each kernel and its reference share a benchmark `group`; on CUDA the halo
benchmark also records `extra_info["ratio"]` (reference time / halo time, medians of CUDA-event timings) that
`benchmarks/gpu_suite.sh` prints in its table.

On CPU (no CUDA) the kernels would run in the Triton interpreter, which times nothing useful: the halo cases then
skip when timing, and with `--benchmark-disable` only check that their bodies run and match the reference (2
layers, N = 2k, fp32).
"""

import pytest
import torch

# First: bench_kernels sets TRITON_INTERPRET on CPU before halo_kernels imports triton kernels. It also holds the
# shared settings: device, dtype, layers, KV heads, head dim, MID (victim selection and compaction size), EVICT, ALPHA.
from bench_kernels import ALPHA, CUDA, DEVICE, DTYPE, EVICT, HKV, LAYERS, MID, D, _record_ratio, _sync

import halo_kernels
from halo import brightness as ref_brightness
from halo import compact as ref_compact
from halo import layer_cull as ref_layer_cull

pytestmark = pytest.mark.skipif(not halo_kernels.available(), reason="Triton unavailable")

SIZES = [2048, 32768] if CUDA else [2048]  # bench_kernels also times 128k
T_ROWS = 1  # a decode step


def _halo_only_on_cuda(benchmark):
    """Under the interpreter the halo side runs once as a check (--benchmark-disable), never as a timing."""
    if not CUDA and not benchmark.disabled:
        pytest.skip("Triton interpreter: halo kernels are timed on CUDA only (run with --benchmark-disable here)")


def _counts(n, seed):
    """int64 [L]: ragged per-layer counts, every layer somewhat below n (at least n - 256)."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    return n - torch.randint(0, min(256, n // 2), (LAYERS,), generator=gen, device=DEVICE)


# ------------------------------------------------------------------ brightness update over [L, N]
def _brightness_state(n, seed=0):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    brightness = torch.rand(LAYERS, n, generator=gen, device=DEVICE) * 255
    mass = torch.rand(LAYERS, n, generator=gen, device=DEVICE) * 4
    decay = torch.full((LAYERS, n), 0.25, device=DEVICE)
    n_past = _counts(n, seed) - T_ROWS
    return brightness, mass, decay, n_past


def _halo_brightness(brightness, mass, decay, n_past):
    halo_kernels.update_brightness_layers(brightness, mass, decay, n_past, T_ROWS, ALPHA)
    _sync()


def _ref_brightness(brightness, mass, decay, n_past):
    ref_brightness.update_brightness_layers(brightness, mass, decay, n_past, T_ROWS, ALPHA)
    _sync()


@pytest.mark.parametrize("n", SIZES)
def test_brightness_layers_halo(benchmark, n):
    benchmark.group = f"brightness layers L={LAYERS} N={n}"
    _halo_only_on_cuda(benchmark)
    state = _brightness_state(n)
    benchmark(_halo_brightness, *state)
    brightness, mass, decay, n_past = _brightness_state(n)
    want = brightness.clone()
    _halo_brightness(brightness, mass, decay, n_past)
    _ref_brightness(want, mass, decay, n_past)
    assert torch.equal(brightness, want)
    _record_ratio(benchmark, lambda: _halo_brightness(*state), lambda: _ref_brightness(*state),
                  kernel="update_brightness_layers", shape=f"L={LAYERS} N={n} T={T_ROWS}")


@pytest.mark.parametrize("n", SIZES)
def test_brightness_layers_reference(benchmark, n):
    benchmark.group = f"brightness layers L={LAYERS} N={n}"
    benchmark(_ref_brightness, *_brightness_state(n))


# ------------------------------------------------------------------ victim selection per layer at N
def _victim_state(n, seed=2):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    scores = torch.randint(0, 256, (LAYERS, n), generator=gen, device=DEVICE).float()  # many ties
    positions = torch.stack([torch.randperm(2 * n, generator=gen, device=DEVICE)[:n] for _ in range(LAYERS)])
    counts = _counts(n, seed)
    free = torch.arange(n, device=DEVICE)[None, :] >= counts[:, None]
    positions[free] = ref_layer_cull.FREE_POSITION
    protected = free | (positions < 4) | (positions >= 2 * n - 64)  # free slots, sinks, recent window
    return scores, positions, protected


def _halo_victims(scores, positions, protected, k):
    out = halo_kernels.select_victims_layers(scores, positions, protected, k)
    _sync()
    return out


def _ref_victims(scores, positions, protected, k):
    out = ref_layer_cull.select_victims_layers(scores, positions, protected, k)
    _sync()
    return out


@pytest.mark.parametrize("k", [1, EVICT])
def test_victims_layers_halo(benchmark, k):
    benchmark.group = f"select_victims_layers L={LAYERS} N={MID} k={k}"
    _halo_only_on_cuda(benchmark)
    state = _victim_state(MID)
    got = benchmark(_halo_victims, *state, k)
    assert torch.equal(got, _ref_victims(*state, k))
    _record_ratio(benchmark, lambda: _halo_victims(*state, k), lambda: _ref_victims(*state, k),
                  kernel="select_victims_layers", shape=f"L={LAYERS} N={MID} k={k}")


@pytest.mark.parametrize("k", [1, EVICT])
def test_victims_layers_reference(benchmark, k):
    benchmark.group = f"select_victims_layers L={LAYERS} N={MID} k={k}"
    benchmark(_ref_victims, *_victim_state(MID), k)


# ------------------------------------------------------------------ compaction: k evictions per layer from ~N
def _compaction_state(n, seed=1):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    capacity = n + 16
    kv = torch.randn(LAYERS, 2, HKV, capacity, D, generator=gen, device=DEVICE, dtype=DTYPE)
    positions = torch.arange(capacity, device=DEVICE).repeat(LAYERS, 1)
    token_ids = torch.randint(0, 32000, (LAYERS, capacity), generator=gen, device=DEVICE)
    brightness = torch.rand(LAYERS, capacity, generator=gen, device=DEVICE) * 255
    counts = _counts(n, seed)
    # EVICT victims per layer among that layer's slots; every other layer frees half as many (-1 padded)
    victims = torch.stack([torch.randperm(int(c), generator=gen, device=DEVICE)[:EVICT] for c in counts.tolist()])
    victims[1::2, EVICT // 2:] = -1
    return kv, [positions, token_ids, brightness], victims, counts


def _halo_compact(kv, slots, victims, counts):
    halo_kernels.compact_layers_(kv, slots, victims, counts)
    _sync()


def _ref_compact(kv, slots, victims, counts):
    ref_compact.compact_layers_(kv, slots, victims, counts)
    _sync()


def test_compaction_layers_halo(benchmark):
    benchmark.group = f"compact_layers_ L={LAYERS} k={EVICT} N={MID}"
    _halo_only_on_cuda(benchmark)
    state = _compaction_state(MID)
    # every call compacts from the same counts (same moves; the data just keeps shuffling)
    benchmark(_halo_compact, *state)
    kv, slots, victims, counts = _compaction_state(MID)
    ref_kv, ref_slots = kv.clone(), [t.clone() for t in slots]
    _halo_compact(kv, slots, victims, counts)
    _ref_compact(ref_kv, ref_slots, victims, counts)
    assert torch.equal(kv, ref_kv) and all(torch.equal(a, b) for a, b in zip(slots, ref_slots))
    _record_ratio(benchmark, lambda: _halo_compact(*state), lambda: _ref_compact(*state),
                  kernel="compact_layers_", shape=f"L={LAYERS} Hkv={HKV} D={D} N={MID} k={EVICT} {DTYPE}")


def test_compaction_layers_reference(benchmark):
    benchmark.group = f"compact_layers_ L={LAYERS} k={EVICT} N={MID}"
    benchmark(_ref_compact, *_compaction_state(MID))
