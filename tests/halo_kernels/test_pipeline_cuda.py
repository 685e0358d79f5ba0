"""CUDA only: the per-step kernel sequence never synchronises with the host and replays as a CUDA graph.

Sequence (one decode step of a 4-layer GQA model): column mass of layers 0..L-2, the fused last-layer column
mass + brightness update, cull scores, victim selection with a fixed k, compaction of K/V and metadata.
"""

import pytest
import torch

import halo_kernels

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available() or not halo_kernels.available(), reason="needs CUDA and Triton"),
]

LAYERS, HQ, HKV, D, CAPACITY, N_PAST, K = 4, 8, 2, 64, 512, 400, 3


def _state(seed=0):
    gen = torch.Generator().manual_seed(seed)
    n = N_PAST + 1
    return {
        "kv": torch.randn(LAYERS, 2, HKV, CAPACITY, D, generator=gen).to(torch.bfloat16).cuda(),
        "query": torch.randn(LAYERS, HQ, 1, D, generator=gen).to(torch.bfloat16).cuda(),
        "positions": torch.randperm(4 * CAPACITY, generator=gen)[:CAPACITY].cuda(),
        "brightness": (torch.rand(CAPACITY, generator=gen) * 255).cuda(),
        "decay": torch.full((CAPACITY,), 0.5).cuda(),
        "protected": (torch.arange(CAPACITY) >= n - 8).cuda(),
        "mass": torch.zeros(CAPACITY).cuda(),
        "victims_out": torch.zeros(K, dtype=torch.int64).cuda(),
    }


def _step(s):
    n = N_PAST + 1
    s["mass"].zero_()
    for layer in range(LAYERS):
        key = s["kv"][layer, 0, :, :n]
        if layer < LAYERS - 1:
            halo_kernels.attention_column_mass(s["query"][layer], key, D ** -0.5, N_PAST, s["mass"])
        else:
            halo_kernels.attention_column_mass_and_update(s["query"][layer], key, D ** -0.5, N_PAST, s["mass"],
                                                          s["brightness"], s["decay"], 20.0, LAYERS)
    scores = halo_kernels.cull_scores(s["brightness"], s["positions"], n, 0.5, 4)
    victims = halo_kernels.select_victims(scores, s["positions"], s["protected"], n, K)
    s["victims_out"].copy_(victims)
    return halo_kernels.compact_(s["kv"], [s["positions"], s["brightness"], s["decay"]], victims, n)


def _assert_state_equal(a, b):
    for name in ("kv", "positions", "brightness", "mass", "victims_out"):
        assert torch.equal(a[name], b[name]), name


def test_no_host_sync():
    state = _state()
    _step(_state())  # compile outside the checked region
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        new_n = _step(state)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert new_n == N_PAST + 1 - K
    assert not bool(torch.isin(state["victims_out"], torch.arange(N_PAST + 1 - 8, N_PAST + 1, device="cuda")).any())


def test_cuda_graph_replay_equals_eager():
    eager = _state(seed=1)
    _step(eager)
    torch.cuda.synchronize()

    graphed = _state(seed=1)
    initial = {name: t.clone() for name, t in graphed.items()}
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (Triton compiles) on scratch copies, off the capture stream
        _step({name: t.clone() for name, t in graphed.items()})
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _step(graphed)
    for name, t in graphed.items():  # capture does not execute; start from the initial state
        t.copy_(initial[name])
    pointers = {name: t.data_ptr() for name, t in graphed.items()}
    graph.replay()
    torch.cuda.synchronize()
    _assert_state_equal(graphed, eager)
    assert pointers == {name: t.data_ptr() for name, t in graphed.items()}

    # a second replay from the same start is identical again (no hidden state in the graph)
    for name, t in graphed.items():
        t.copy_(initial[name])
    graph.replay()
    torch.cuda.synchronize()
    _assert_state_equal(graphed, eager)
