"""Triton kernels against their plain-PyTorch references, in the same run (pytest-benchmark).

Shapes are TinyLlama-1.1B's (22 layers, 32 query heads, 4 KV heads, head dim 64, bf16) on CUDA at N = 2k, 32k
and 128k retained slots. Each kernel and its reference share a benchmark `group`, so
`pytest benchmarks/bench_kernels.py --benchmark-group-by=group` shows them side by side; on CUDA the halo
benchmark also records `extra_info["ratio"]` (reference time / halo time, medians of CUDA-event timings) and
`benchmarks/gpu_suite.sh` prints a table from the JSON.

On CPU (no CUDA) the kernels run in the Triton interpreter, which measures nothing useful: there the file
only checks that every benchmark body runs (use `--benchmark-disable`), at N = 2k with 2 layers, in fp32.
"""

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before halo_kernels imports triton kernels

import halo_kernels  # noqa: E402
from halo import archive_mass as ref_archive  # noqa: E402
from halo import brightness as ref_brightness  # noqa: E402
from halo import compact as ref_compact  # noqa: E402
from halo import cull as ref_cull  # noqa: E402

pytestmark = pytest.mark.skipif(not halo_kernels.available(), reason="Triton unavailable")

DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
LAYERS = 22 if CUDA else 2
HQ, HKV, D = 32, 4, 64
SIZES = [2048, 32768, 131072] if CUDA else [2048]
MID = 32768 if CUDA else 2048  # compaction and victim selection size
EVICT = 64
ALPHA = 30.0


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def cuda_median_ms(fn, reps=20, warmup=1):
    """Median CUDA-event time of fn in ms, synchronising after every rep (CUDA only; bench_targets uses it too)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return sorted(times)[len(times) // 2]


def _record_ratio(benchmark, halo_fn, ref_fn, **info):
    benchmark.extra_info.update(info)
    if CUDA and not benchmark.disabled:
        halo_ms, ref_ms = cuda_median_ms(halo_fn), cuda_median_ms(ref_fn)
        benchmark.extra_info.update(halo_ms=halo_ms, reference_ms=ref_ms, ratio=ref_ms / halo_ms)


def _decode_state(n, seed=0):
    """One decode step (T = 1) at n retained slots: per-layer query rows and the [L, 2, Hkv, C, D] cache."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    capacity = n + 16
    kv = torch.randn(LAYERS, 2, HKV, capacity, D, generator=gen, device=DEVICE, dtype=DTYPE)
    query = torch.randn(LAYERS, HQ, 1, D, generator=gen, device=DEVICE, dtype=DTYPE)
    brightness = torch.rand(capacity, generator=gen, device=DEVICE) * 255
    decay = torch.full((capacity,), 0.25, device=DEVICE)
    mass = torch.zeros(capacity, device=DEVICE)
    return kv, query, brightness, decay, mass


# ------------------------------------------------------------------ brightness: column mass x L + update
def brightness_step(keys, query, brightness, decay, mass, n_past):
    """The kernel path of one decode step's brightness (no sync, so bench_targets can graph-capture it): column
    mass of every layer but the last, then the last layer's mass fused with the brightness update.

    keys: one [Hkv, n_past + 1, D] key tensor per layer; query: [L, Hq, 1, D].
    """
    scale = query.shape[-1] ** -0.5
    mass.zero_()
    for layer in range(len(keys) - 1):
        halo_kernels.attention_column_mass(query[layer], keys[layer], scale, n_past, mass)
    halo_kernels.attention_column_mass_and_update(query[-1], keys[-1], scale, n_past, mass, brightness, decay,
                                                  ALPHA, len(keys))


def _halo_brightness(kv, query, brightness, decay, mass, n_past):
    brightness_step([kv[layer, 0, :, : n_past + 1] for layer in range(LAYERS)], query, brightness, decay, mass,
                    n_past)
    _sync()


def _ref_brightness(kv, query, brightness, decay, mass, n_past):
    mass.zero_()
    for layer in range(LAYERS):
        ref_brightness.attention_column_mass(query[layer], kv[layer, 0, :, : n_past + 1], D ** -0.5, n_past, mass)
    ref_brightness.update_brightness(brightness, mass, decay, n_past, 1, ALPHA, LAYERS)
    _sync()


@pytest.mark.parametrize("n", SIZES)
def test_brightness_halo(benchmark, n):
    benchmark.group = f"brightness L={LAYERS} N={n}"
    state = _decode_state(n)
    n_past = n - 1
    benchmark(_halo_brightness, *state, n_past)
    # same result as the reference on the same inputs
    kv, query, brightness, decay, mass = _decode_state(n)
    want_b, want_m = brightness.clone(), mass.clone()
    _halo_brightness(kv, query, brightness, decay, mass, n_past)
    _ref_brightness(kv, query, want_b, decay, want_m, n_past)
    torch.testing.assert_close(mass, want_m, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(brightness, want_b, rtol=1e-3, atol=1e-2)
    _record_ratio(benchmark, lambda: _halo_brightness(*state, n_past), lambda: _ref_brightness(*state, n_past),
                  kernel="brightness", shape=f"L={LAYERS} Hq={HQ} Hkv={HKV} D={D} T=1 N={n} {DTYPE}")


@pytest.mark.parametrize("n", SIZES)
def test_brightness_reference(benchmark, n):
    benchmark.group = f"brightness L={LAYERS} N={n}"
    state = _decode_state(n)
    benchmark(_ref_brightness, *state, n - 1)


# ------------------------------------------------------------------ compaction: k evictions from N
def _compaction_state(n, seed=1):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    capacity = n + 16
    kv = torch.randn(LAYERS, 2, HKV, capacity, D, generator=gen, device=DEVICE, dtype=DTYPE)
    positions = torch.arange(capacity, device=DEVICE)
    token_ids = torch.randint(0, 32000, (capacity,), generator=gen, device=DEVICE)
    brightness = torch.rand(capacity, generator=gen, device=DEVICE) * 255
    victims = torch.randperm(n, generator=gen, device=DEVICE)[:EVICT]
    return kv, [positions, token_ids, brightness], victims


def _halo_compact(kv, slots, victims, n):
    halo_kernels.compact_(kv, slots, victims, n)
    _sync()


def _ref_compact(kv, slots, victims, n):
    ref_compact.compact_(kv, slots, victims, n)
    _sync()


def index_select_copy(kv, slots, victims, n):
    """The naive alternative: gather every survivor of every layer into a fresh cache (O(cache), new address)."""
    keep = torch.ones(n, dtype=torch.bool, device=kv.device)
    keep[victims] = False
    survivors = keep.nonzero().flatten()
    return kv.index_select(3, survivors), [t.index_select(0, survivors) for t in slots]


def _index_select_compact(kv, slots, victims, n):
    out = index_select_copy(kv, slots, victims, n)
    _sync()
    return out


def test_compaction_halo(benchmark):
    benchmark.group = f"compaction k={EVICT} N={MID}"
    kv, slots, victims = _compaction_state(MID)
    # every call compacts from the same n_valid (same moves; the data just keeps shuffling)
    benchmark(_halo_compact, kv, slots, victims, MID)
    kv2, slots2, victims2 = _compaction_state(MID)
    ref_kv, ref_slots = kv2.clone(), [t.clone() for t in slots2]
    _halo_compact(kv2, slots2, victims2, MID)
    _ref_compact(ref_kv, ref_slots, victims2, MID)
    assert torch.equal(kv2, ref_kv) and all(torch.equal(a, b) for a, b in zip(slots2, ref_slots))
    _record_ratio(benchmark, lambda: _halo_compact(kv, slots, victims, MID),
                  lambda: _index_select_compact(kv, slots, victims, MID),
                  kernel="compaction", reference="index_select copy", shape=f"L={LAYERS} Hkv={HKV} D={D} N={MID} k={EVICT} {DTYPE}")
    if CUDA and not benchmark.disabled:
        benchmark.extra_info["reference_compact_ms"] = cuda_median_ms(lambda: _ref_compact(kv, slots, victims, MID))


def test_compaction_reference(benchmark):
    benchmark.group = f"compaction k={EVICT} N={MID}"
    kv, slots, victims = _compaction_state(MID)
    benchmark(_ref_compact, kv, slots, victims, MID)


def test_compaction_index_select_copy(benchmark):
    benchmark.group = f"compaction k={EVICT} N={MID}"
    kv, slots, victims = _compaction_state(MID)
    out, _ = benchmark(_index_select_compact, kv, slots, victims, MID)
    assert out.shape[3] == MID - EVICT


# ------------------------------------------------------------------ victim selection (and cull scores) at N
def _victim_state(n, seed=2):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    brightness = torch.randint(0, 256, (n,), generator=gen, device=DEVICE).float()  # many ties
    positions = torch.randperm(2 * n, generator=gen, device=DEVICE)[:n]
    protected = (positions < 4) | (positions >= 2 * n - 64)
    return brightness, positions, protected


def _halo_victims(brightness, positions, protected, n, k):
    out = halo_kernels.select_victims(halo_kernels.cull_scores(brightness, positions, n, 0.5, 4), positions, protected, n, k)
    _sync()
    return out


def _ref_victims(brightness, positions, protected, n, k):
    out = ref_cull.select_victims(ref_cull.cull_scores(brightness, positions, n, 0.5, 4), positions, protected, n, k)
    _sync()
    return out


@pytest.mark.parametrize("k", [1, EVICT])
def test_victims_halo(benchmark, k):
    benchmark.group = f"cull scores + victims N={MID} k={k}"
    state = _victim_state(MID)
    got = benchmark(_halo_victims, *state, MID, k)
    assert got.tolist() == _ref_victims(*state, MID, k).tolist()
    _record_ratio(benchmark, lambda: _halo_victims(*state, MID, k), lambda: _ref_victims(*state, MID, k),
                  kernel="cull scores + select_victims", shape=f"N={MID} k={k}")


@pytest.mark.parametrize("k", [1, EVICT])
def test_victims_reference(benchmark, k):
    benchmark.group = f"cull scores + victims N={MID} k={k}"
    state = _victim_state(MID)
    benchmark(_ref_victims, *state, MID, k)


def test_select_victims_only_halo(benchmark):
    benchmark.group = f"select_victims N={MID} k={EVICT}"
    brightness, positions, protected = _victim_state(MID)
    got = benchmark(halo_kernels.select_victims, brightness, positions, protected, MID, EVICT)
    assert got.tolist() == ref_cull.select_victims(brightness, positions, protected, MID, EVICT).tolist()
    _record_ratio(benchmark, lambda: halo_kernels.select_victims(brightness, positions, protected, MID, EVICT),
                  lambda: ref_cull.select_victims(brightness, positions, protected, MID, EVICT),
                  kernel="select_victims", shape=f"N={MID} k={EVICT}")


def test_select_victims_only_reference(benchmark):
    benchmark.group = f"select_victims N={MID} k={EVICT}"
    brightness, positions, protected = _victim_state(MID)
    benchmark(ref_cull.select_victims, brightness, positions, protected, MID, EVICT)


# ------------------------------------------------------------------ archive mass: score A archived keys
ARCHIVE_ROWS = [1, 64]  # decode step and a prefill chunk


def _archive_state(a, t, seed=3):
    """Query rows, A archived keys (10% holes), and the row lse / weights of a 2k-slot retained cache."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    n_past = 2048
    query = torch.randn(HQ, t, D, generator=gen, device=DEVICE, dtype=DTYPE)
    retained = torch.randn(HKV, n_past + t, D, generator=gen, device=DEVICE, dtype=DTYPE)
    keys = torch.randn(HKV, a, D, generator=gen, device=DEVICE, dtype=DTYPE)
    valid = torch.rand(a, generator=gen, device=DEVICE) >= 0.1
    row_lse = ref_archive.retained_rows(query, retained, D ** -0.5, n_past)[0]
    weight = ref_archive.row_weights(n_past, t, DEVICE)
    return query, keys, valid, D ** -0.5, row_lse, weight


def _archive_args(op, t):
    """The arguments of archive_{op}: `_archive_state`, and for "ratio" a per-head scale, pooled by KV head group."""
    state = _archive_state(MID, t)
    if op == "mass":
        return state
    gen = torch.Generator(device=DEVICE).manual_seed(4)
    return (*state, torch.rand(HQ, generator=gen, device=DEVICE) + 0.5, "group")


ARCHIVE_OPS = {"mass": (halo_kernels.archive_mass, ref_archive.archive_mass),
               "ratio": (halo_kernels.archive_ratio, ref_archive.archive_ratio)}
"""archive_mass ([Hq, A] out) and archive_ratio (scored and pooled over heads, [A] out): (kernel, reference)."""


def _synced(fn, *args):
    out = fn(*args)
    _sync()
    return out


@pytest.mark.parametrize("op", list(ARCHIVE_OPS))
@pytest.mark.parametrize("t", ARCHIVE_ROWS)
def test_archive_halo(benchmark, t, op):
    benchmark.group = f"archive {op} T={t} A={MID}"
    kernel, reference = ARCHIVE_OPS[op]
    args = _archive_args(op, t)
    got = benchmark(_synced, kernel, *args)
    torch.testing.assert_close(got, _synced(reference, *args), rtol=2e-3, atol=2e-3)
    _record_ratio(benchmark, lambda: _synced(kernel, *args), lambda: _synced(reference, *args),
                  kernel=f"archive_{op}", shape=f"Hq={HQ} Hkv={HKV} D={D} T={t} A={MID} {DTYPE}")


@pytest.mark.parametrize("op", list(ARCHIVE_OPS))
@pytest.mark.parametrize("t", ARCHIVE_ROWS)
def test_archive_reference(benchmark, t, op):
    benchmark.group = f"archive {op} T={t} A={MID}"
    benchmark(_synced, ARCHIVE_OPS[op][1], *_archive_args(op, t))


# ------------------------------------------------------------------ retained rows: what recall's bars are read from
def _retained_state(t, n_past=2048, seed=5):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    query = torch.randn(HQ, t, D, generator=gen, device=DEVICE, dtype=DTYPE)
    key = torch.randn(HKV, n_past + t, D, generator=gen, device=DEVICE, dtype=DTYPE)
    return query, key, D ** -0.5, n_past


def _retained_halo(query, key, scaling, n_past):
    lse = halo_kernels.retained_lse(query, key, scaling, n_past)
    return lse, halo_kernels.retained_mass(query, key, scaling, n_past, lse)


@pytest.mark.parametrize("t", ARCHIVE_ROWS)
def test_retained_rows_halo(benchmark, t):
    """Row lse and per-head mass of the retained slots (two launches, no [Hq, T, N] logits in memory) against the
    reference `retained_rows` (fp32 logits, logsumexp, exp and a weighted sum)."""
    benchmark.group = f"retained rows T={t} N=2048"
    args = _retained_state(t)
    lse, mass = benchmark(_synced, _retained_halo, *args)
    want_lse, want_mass = ref_archive.retained_rows(*args)
    torch.testing.assert_close(lse, want_lse, rtol=2e-3, atol=2e-2)
    torch.testing.assert_close(mass, want_mass, rtol=2e-2, atol=2e-3)
    _record_ratio(benchmark, lambda: _synced(_retained_halo, *args), lambda: _synced(ref_archive.retained_rows, *args),
                  kernel="retained_rows", shape=f"Hq={HQ} Hkv={HKV} D={D} T={t} N=2048 {DTYPE}")


@pytest.mark.parametrize("t", ARCHIVE_ROWS)
def test_retained_rows_reference(benchmark, t):
    benchmark.group = f"retained rows T={t} N=2048"
    benchmark(_synced, ref_archive.retained_rows, *_retained_state(t))


# ------------------------------------------------------------------ bars: recall's 75th percentiles of a [Hq, N] mass
def _bar_rows():
    gen = torch.Generator(device=DEVICE).manual_seed(6)
    return torch.rand(HQ + 1, 2048, generator=gen, device=DEVICE) ** 3


def test_bars_halo(benchmark):
    """Bitwise-search quantile, one launch for all 33 rows, against two `kthvalue` selections (the reference)."""
    benchmark.group = f"bars {HQ + 1}x2048"
    rows = _bar_rows()
    got = benchmark(_synced, halo_kernels.bars, rows, 0.75, 1e-6)
    torch.testing.assert_close(got, ref_archive.bars(rows, 0.75, 1e-6), rtol=1e-6, atol=0)
    _record_ratio(benchmark, lambda: _synced(halo_kernels.bars, rows, 0.75, 1e-6),
                  lambda: _synced(ref_archive.bars, rows, 0.75, 1e-6), kernel="bars", shape=f"{HQ + 1}x2048 fp32")


def test_bars_reference(benchmark):
    benchmark.group = f"bars {HQ + 1}x2048"
    benchmark(_synced, ref_archive.bars, _bar_rows(), 0.75, 1e-6)
