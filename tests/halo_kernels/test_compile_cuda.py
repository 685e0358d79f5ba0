"""Every kernel compiles for a real GPU target (sm_90, H100), even on a machine without one.

The interpreter does not check what only the compiler rejects (non-constexpr globals, tl.dot shape and dtype
rules, tuple arguments, loop-carried types), so the CPU run also lowers each kernel through Triton's NVIDIA
backend to a cubin, in the configurations the launchers use. It runs in a subprocess with the interpreter off:
in an interpreter process even triton.language's own @jit helpers are interpreted functions the compiler
cannot lower. Skipped where the NVIDIA backend is missing.
"""

import os
import subprocess
import sys
import textwrap

import pytest

triton = pytest.importorskip("triton")

try:
    from triton.backends import backends as _backends

    HAVE_NVIDIA = "nvidia" in _backends
except Exception:  # pragma: no cover - other Triton layouts
    HAVE_NVIDIA = False

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCRIPT = textwrap.dedent('''
    import importlib, sys, traceback
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from halo_kernels import brightness_update as bu, column_mass as cm, compact as co, scores as sc, victims as vi

    TARGET = GPUTarget("cuda", 90, 32)
    failures = []

    def compile_(label, kernel, types, constexprs, num_warps=4):
        assert isinstance(kernel, triton.runtime.JITFunction), label
        signature, constants = {}, {}
        for i, name in enumerate(kernel.arg_names):
            if name in constexprs:
                signature[name] = "constexpr"
                constants[(i,)] = constexprs[name]
            else:
                signature[name] = types(name)
        try:
            out = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constants), target=TARGET,
                                 options={"num_warps": num_warps, "enable_fp_fusion": True})
            assert out.asm.get("cubin"), "no cubin"
            print("ok", label, "shared", out.metadata.shared)
        except Exception:
            failures.append(label)
            print("FAILED", label)
            traceback.print_exc()

    def column_types(dtype):
        def types(name):
            if name in ("q_ptr", "k_ptr"):
                return "*" + dtype
            if name.endswith("_ptr"):
                return "*fp32"
            return "fp32" if name in ("qk_scale", "inv_hq", "gain") else "i32"
        return types

    # decode (T=1, few rows) at TinyLlama's head dim, a prefill chunk at head dim 128, and the exact fp32 path
    for dtype, d, block_n, block_m in [("bf16", 64, 128, 16), ("fp16", 128, 64, 64), ("fp32", 64, 128, 64)]:
        exact = dtype == "fp32"
        common = dict(D=d, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=d, UPCAST=exact, IEEE=exact)
        warps = 4 if d <= 64 else 8
        for final in (True, False):
            compile_(f"stats {dtype} d={d} bm={block_m} final={final}", cm._column_mass_stats_kernel,
                     column_types(dtype), dict(common, FINAL=final, LSE=False), warps)
        if dtype == "bf16":  # retained_lse: decode rows, one split
            compile_(f"stats lse {dtype} d={d} bm={block_m}", cm._column_mass_stats_kernel, column_types(dtype),
                     dict(common, FINAL=True, LSE=True), warps)
        for last, update in ((True, True), (False, False)):
            compile_(f"accum {dtype} d={d} bm={block_m} last={last}", cm._column_mass_accum_kernel,
                     column_types(dtype), dict(common, HAS_LAST=last, UPDATE=update), warps)
    for lse in (False, True):
        compile_(f"merge lse={lse}", cm._column_mass_merge_kernel, column_types("fp32"), dict(BLOCK=256, LSE=lse))
    compile_("update", bu._update_brightness_kernel,
             lambda n: "*fp32" if n.endswith("_ptr") else ("fp32" if n == "gain" else "i32"), dict(BLOCK=1024))
    compile_("victim keys", vi._victim_key_kernel,
             lambda n: {"scores_ptr": "*fp32", "positions_ptr": "*i64", "protected_ptr": "*u8",
                        "keys_ptr": "*i64"}.get(n, "i32"), dict(BLOCK=1024))
    compile_("cull scores", sc._cull_scores_kernel,
             lambda n: {"bright_ptr": "*fp32", "order_ptr": "*i64", "out_ptr": "*fp32",
                        "dark_bias": "fp32"}.get(n, "i32"), dict(BLOCK=512))
    for slots, d in ((("*i64", "*i64", "*i32", "*u8"), 64), ((), 128)):
        types = {"kv_ptr": "*i16", "victims_ptr": "*i64", "slot_ptrs": slots,
                 "slot_strides": tuple("i32" for _ in slots)}
        compile_(f"compact slots={len(slots)} d={d}", co._compact_kernel, lambda n, t=types: t.get(n, "i32"),
                 dict(D=d, BLOCK_K=32, BLOCK_D=d, NUM_SLOT=len(slots)))
    am = importlib.import_module("halo_kernels.archive_mass")  # the package attribute is the op, not the module
    # decode at TinyLlama's head dim on tensor cores (bf16; fp16 is the same code), and a chunk at head dim
    # 96 -> 128 (masked) on the upcast IEEE fp32 path (fp32, or two different dtypes)
    # (block_g, block_t): None is the per-head path; (16, 1) is decode's T=1 of up to 16 heads per KV head, grouped.
    # pool: 0 the [Hq, A] mass (archive_mass), 1/2/3 pooled over heads by mean/group/each (archive_ratio);
    # softmax: the retained keys' per-head mass (retained_mass), decode grouped and a chunk per head
    for q_dtype, k_dtype, d, block_a, block_m, upcast, grouping, pool, softmax in [
            ("bf16", "bf16", 64, 128, 16, False, None, 0, False), ("fp16", "fp32", 96, 64, 64, True, None, 0, False),
            ("bf16", "bf16", 64, 128, 16, False, (16, 1), 0, False), ("fp16", "fp32", 96, 64, 16, True, (4, 8), 0, False),
            ("bf16", "bf16", 64, 128, 16, False, (16, 1), 2, False), ("bf16", "bf16", 64, 128, 64, False, None, 2, False),
            ("bf16", "bf16", 64, 128, 16, False, (16, 1), 1, False), ("fp16", "fp16", 128, 64, 64, False, None, 3, False),
            ("bf16", "bf16", 64, 128, 16, False, (16, 1), 0, True), ("fp16", "fp16", 128, 64, 64, False, None, 0, True)]:
        types = {"q_ptr": "*" + q_dtype, "k_ptr": "*" + k_dtype, "valid_ptr": "*u8", "lse_ptr": "*fp32",
                 "w_ptr": "*fp32", "scale_ptr": "*fp32", "out_ptr": "*fp32", "qk_scale": "fp32"}
        block_g, block_t = grouping or (1, 1)
        compile_(f"archive_mass q={q_dtype} k={k_dtype} d={d} ba={block_a} bm={block_m} grouped={grouping} "
                 f"pool={pool} softmax={softmax}", am._archive_mass_kernel, lambda n, t=types: t.get(n, "i32"),
                 dict(D=d, BLOCK_M=block_m, BLOCK_A=block_a, BLOCK_D=max(16, triton.next_power_of_2(d)),
                      UPCAST=upcast, IEEE=upcast, GROUPED=grouping is not None, BLOCK_G=block_g, BLOCK_T=block_t,
                      POOL=pool, SOFTMAX=softmax),
                 4 if d <= 64 else 8)
    ba = importlib.import_module("halo_kernels.bars")
    for block, chunked in ((2048, False), (8192, True)):  # a row of a 2k cache in registers; a long row in chunks
        compile_(f"bars block={block} chunked={chunked}", ba._bars_kernel,
                 lambda n: {"x_ptr": "*fp32", "out_ptr": "*fp32", "frac": "fp32", "minimum": "fp32"}.get(n, "i32"),
                 dict(BLOCK=block, CHUNKED=chunked), 4 if block <= 2048 else 8)
    sys.exit(1 if failures else 0)
''')


@pytest.mark.skipif(not HAVE_NVIDIA, reason="Triton's NVIDIA backend is not installed")
def test_every_kernel_compiles_for_sm90():
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    assert proc.stdout.count("ok ") == 32, proc.stdout
