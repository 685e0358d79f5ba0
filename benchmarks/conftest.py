"""Benchmark helpers: pair each fast path with its reference in one run and report the ratio."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

_means: dict[tuple[str, str], float] = {}


def record(benchmark, group: str, role: str) -> None:
    """Remember this benchmark's mean under (group, role); once both 'halo' and 'reference' ran, report the ratio.

    The role and the group also go to `extra_info` ("role", "ratio_groups": one benchmark can be the reference of
    several groups), which benchmarks/gpu_suite.sh reads to pair the two in its table."""
    benchmark.extra_info["role"] = role
    benchmark.extra_info.setdefault("ratio_groups", []).append(group)
    stats = getattr(benchmark, "stats", None)
    if stats is None or not getattr(stats, "stats", None):
        return  # --benchmark-disable: the body ran once as a test, no timing
    _means[(group, role)] = stats.stats.mean
    ref, fast = _means.get((group, "reference")), _means.get((group, "halo"))
    if ref and fast:
        benchmark.extra_info["speedup_vs_reference"] = ref / fast
        print(f"\n[{group}] halo {fast * 1e3:.3f} ms vs reference {ref * 1e3:.3f} ms: ratio {ref / fast:.2f}x")


@pytest.fixture
def record_ratio():
    return record
