#!/usr/bin/env bash
# GPU suite: build the CUDA extension in place, run the CUDA tests, time every benchmark, print a summary table
# LAST, all inside one wall-clock budget (default 480 s: a lent GPU comes with 15 minutes of device time in all,
# machine start included, so one call of the suite must end within 8 minutes).
#
# Run from anywhere on a CUDA machine whose python3 already has torch (CUDA build), triton, transformers, pytest
# and pytest-benchmark (nothing is installed; nothing is downloaded: HF_HUB_OFFLINE=1). Results go to $OUT
# (default benchmarks/out/), at most 8 files so that all of them come back from a device call:
#   table.txt (the summary), tests.log, build.log, bench.log (every benchmark file's output), bench_*.json (one
#   per benchmark phase: bench_kernels.json also holds the per-layer kernels of bench_layers.py, and
#   bench_targets.json the recall cases of bench_recall.py, so that the suite still writes 8 files).
# Copy table.txt into benchmarks/RESULTS.md.
#
#   bash benchmarks/gpu_suite.sh                        # everything, within 480 s
#   SUITE_BUDGET_S=300 bash benchmarks/gpu_suite.sh     # a smaller budget: every share scales down
#   SKIP_BUILD=1 SKIP_TESTS=1 BENCHES="bench_kernels" bash benchmarks/gpu_suite.sh   # bench_kernels + bench_layers
#   SKIP_BUILD=1 SKIP_TESTS=1 BENCHES="bench_layers" bash benchmarks/gpu_suite.sh    # the per-layer kernels alone
#   SUITE_ALLOW_CPU=1 PYTHON=.venv/bin/python SKIP_BUILD=1 SUITE_BUDGET_S=90 bash benchmarks/gpu_suite.sh
#                                             # check the script itself on a CPU machine (numbers mean nothing)
#
# Knobs (environment): SUITE_BUDGET_S (480), SUITE_RESERVE_S (30, kept for the summary and kill grace),
# SKIP_BUILD / SKIP_TESTS / SKIP_BENCH (=1), BENCHES (phases or file stems to time), HALO_BENCH_ROUNDS (20: pedantic rounds
# and best-of repeats, read by the bench files; unset there, each keeps its own default), HALO_BENCH_MAX_TIME (0.5 s
# per plain `benchmark(fn)` case), HALO_BENCH_MIN_ROUNDS (3), MAX_JOBS (nproc), TORCH_CUDA_ARCH_LIST (the device's
# capability, 9.0 on H100/H200), PYTHON (python3), OUT, SUITE_ALLOW_CPU (=1: run the phases without CUDA).
#
# ---------------------------------------------------------------------------------------------------------------
# Budget. Phases run in order under `timeout` (TERM, then KILL after GRACE_S). Phase i may use its share plus
# whatever earlier phases left unused, never the shares of later phases:
#     limit_i = SUITE_BUDGET_S - SUITE_RESERVE_S - sum(shares after i) - elapsed
# so the suite ends within the budget however any phase behaves; a phase whose limit is under MIN_PHASE_S is
# skipped and reported as skipped. pytest phases turn SIGTERM into KeyboardInterrupt, so a benchmark file stopped
# at its limit still writes the JSON of the cases it finished. Shares (s, at 480; scaled to other budgets):
#     versions 25 | build 45 | tests 215 | bench_kernels 40 | bench_targets 45 | bench_repair 35 | bench_step 55
#     = 460, + 30 reserve = 480 (the others scale to 425 s: versions' share is taken first). The 2026-11-30 run
#     (shares 15 | 50 | 185 | 45 | 60 | 40 | 55) used versions 5 (stopped at 15 minus the 10 s grace in a cold
#     torch import), build 36, tests 181 of its 194 s limit (237 tests), bench_kernels 39, bench_targets 34,
#     bench_repair 29, bench_step 51: 390 s; the tests have grown since (retained rows, bars, the scoring's host
#     syncs), so their share took what the bench phases left unused. Measured on the H200 (2026-11-29, run 2 at a 450 s budget): versions 9, build 46,
#     tests 141 (cut at its limit with 200 of ~215 tests done), bench_kernels 40, bench_targets 47 (with
#     bench_recall), bench_repair 38, bench_step 58 (a random TinyLlama-shaped model); each phase still inherits
#     what earlier phases leave.
#
# Estimate (H200, fresh machine). Plain `benchmark(fn)` cases run max(ceil(0.5 s / t), 3) rounds after one
# calibration call and one warm-up call (--benchmark-max-time=0.5 --benchmark-min-rounds=3 --benchmark-warmup=on
# --benchmark-warmup-iterations=1), so each costs about 0.5 s or 6 calls, whichever is longer; pedantic cases run
# HALO_BENCH_ROUNDS=20 rounds (+2 or 3 warm-up). GPU ms are estimated from launch counts (~10 us per torch op,
# ~20 us per Triton launch, host-bound below ~1 GB moved; 4.3 TB/s, ~790 TFLOP/s bf16); CPU ms were measured on
# the 2-core development box (--benchmark-disable run, 2026-11), which the 16-core host should beat.
#
#   file / phase   cases  case                                   rounds x est. ms per round (how)           est. s
#   versions           -  torch + CUDA init, package metadata, nvidia-smi                                      ~10
#   build              3  TUs, ninja -j16, sm_90 only              .cpp ~40 s in parallel with .cu ~60 s, link  50-70
#   tests           ~250  -k cuda over CUDA_TESTS (the H200 run   ~120 Triton JITs x ~1 s, tiny-model graph / 150-170
#                         of 2026-11-29 did 200 in 120 s, then     generate and CPU-vs-CUDA session tests,
#                         the archive and session cases grew)      imports ~10 s
#   bench_kernels      3  brightness halo N=2k/32k/128k            ~250 x 2 (67 Triton launches, host-bound)       3
#                         + 42 CUDA-event reps, a check, inputs up to 2 x 3 GB
#                      3  brightness reference                     ~200 x 2.5 (~225 torch ops)                   1.5
#                      3  compaction halo/ref/index_select N=32k   0.5 s each (0.1 / 1 / 0.4 ms) + 63 reps         2
#                      4  cull scores + victims k=1/64             0.5 s each (~0.2 ms)                          2.5
#                      2  select_victims halo/ref                  0.5 s each (~0.1 ms)                            1
#                      8  archive mass / ratio halo|ref, T=1|64   0.5 s each (0.1-2 ms; the H200 run: 0.15 / 1.8 ms   4
#                         A=32k                                    at T=64)
#   (bench_layers      4  brightness layers halo/ref N=2k/32k      0.5 s each (< 0.1 ms) + 40 event reps each    2.5
#    in the same       4  select_victims_layers halo/ref k=1/64    0.5 s each (~0.2 / ~1 ms: [22, 32k] sorts)      2
#    phase)            2  compact_layers_ halo/ref k=64 N=32k      0.5 s each (~0.1 / ~1 ms) + 40 event reps       1
#                         imports ~10 s (shared), Triton JIT ~15 x 1 s (fewer after the tests phase)  phase ~55
#   bench_targets      4  brightness / decode step, eager|graph    23 x 1.5; per N: eager step (~330 ops, 4 ms),  2
#                         x N=2k/32k                               capture, 2 x 23 event reps
#                      1  full copy bandwidth N=32k                22 x 0.4; 1 GiB copy_ x 23                     <1
#                      2  repair forward vs matmul, eager|graphed  22 x 3; 8192^3 mm x 23 x 1.4 ms; capture       ~3
#                      1  repair per token vs decode step          22 x 1; captures at batch 1 and 8              ~2
#                         imports ~10 s, TinyLlama-1.1B init on GPU + 8-step check ~8 s, DistilBERT ~2 s    ~30
#   (bench_recall      1  recall scoring 100k x 2 layers / step    TinyLlama init ~8 s, fused and unfused: 4 x  ~18
#                         (fused and unfused pooling, profiled)    20 event reps and 2 captures, a profile
#    in the same       4  Session decode step, recall on|off       random TinyLlama (no embedded model): 4 feeds  ~30
#    phase)               (and scored every step)                  of 576 tokens, 23 x ~40 ms eager steps)
#   bench_repair       2  build_windows cpu ref|ext                ~7 x 292, 0.5 s x 35 (CPU, measured)          2.6
#                      2  build_windows cuda ref|ext               0.5 s each (< 1 ms)                           1.2
#                      1  build_windows speedup, best of N         21 x (292 + 35) (N was 300: 98 s)             7.5
#                      4  repair forward cpu eager|halo x 1|8      ~7 x 368 / 822 (CPU, measured)                 15
#                      6  repair forward cuda eager|halo|graph     0.5 s each (1-4 ms), model init, captures      ~7
#                         x 1|8
#                      2  self repair left context ref|halo        7 x 2270, 7 x 316 + 2270 (CPU, measured)       20
#                         imports ~10 s                                          file total (2-core rates)  ~63
#   bench_step        11  decode / repaired / generate steps       the embedded SmolLM2 package (94 MB) is not   ~70
#                         (token, layer, layer+memory positions,   on the device: a random TinyLlama-shaped model
#                         head, head with halo-mean), and the      (session_models.py); 11 x 23 x 15-50 ms + feeds
#                         HaloCache step under the torch profiler  (58 s for 8 of them on the H200; the two head
#                         (table -> bench_step.json)               steps, new, are last in their group and may be cut)
#   summary            -  JSON -> table (no torch import)                                                       ~1
#   expected total  ~420 s (the H200 run of 2026-11-29: 396 s at a 450 s budget); hard bound SUITE_BUDGET_S = 480 s
# ---------------------------------------------------------------------------------------------------------------
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
# a relative PYTHON (.venv/bin/python) names a file under the caller's folder: make it absolute before the cd
# (without resolving links: a venv's python is a link out of the venv)
case "$PY" in */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; esac
OUT="${OUT:-$ROOT/benchmarks/out}"
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)"
cd "$ROOT" || exit 1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
unset TRITON_INTERPRET  # real kernels, never the interpreter (benchmarks/conftest.py sets it again without CUDA)
export HALO_BENCH_ROUNDS="${HALO_BENCH_ROUNDS:-20}"
BENCH_MAX_TIME="${HALO_BENCH_MAX_TIME:-0.5}"
BENCH_MIN_ROUNDS="${HALO_BENCH_MIN_ROUNDS:-3}"
# the interpreter's own folder first: a venv's ninja lives there
PYDIR="$(dirname "$(command -v "$PY" 2>/dev/null || echo "$PY")")"
[ -d "$PYDIR" ] && export PATH="$PYDIR:$PATH"

SECONDS=0
BUDGET="${SUITE_BUDGET_S:-480}"
RESERVE="${SUITE_RESERVE_S:-30}"
(( RESERVE > BUDGET / 4 )) && RESERVE=$(( BUDGET / 4 ))
GRACE_S="${SUITE_GRACE_S:-10}"
MIN_PHASE_S=$(( GRACE_S + 5 ))

# Phase shares in seconds at a 480 s budget (see the estimate above). The versions phase keeps its 25 s (at most
# half of what there is: a cold first import of torch on a fresh machine is slow); the others scale to what is left
# of BUDGET - RESERVE.
PHASES=(versions build tests bench_kernels bench_targets bench_repair bench_step)
BASE_SHARES=(25 45 215 40 45 35 55)
avail=$(( BUDGET - RESERVE ))
first=$(( BASE_SHARES[0] < avail / 2 ? BASE_SHARES[0] : avail / 2 ))
rest_base=0
for s in "${BASE_SHARES[@]:1}"; do rest_base=$(( rest_base + s )); done
SHARES=("$first")
for s in "${BASE_SHARES[@]:1}"; do SHARES+=( $(( s * (avail - first) / rest_base )) ); done

# Only the files named here come out of the suite (the device returns at most 8 files).
rm -f "$OUT"/table.txt "$OUT"/tests.log "$OUT"/build.log "$OUT"/bench.log "$OUT"/bench_*.json "$OUT"/bench_*.log
TMP="$(mktemp -d "${TMPDIR:-/tmp}/halo_suite.XXXXXX")"

HAVE_TIMEOUT=1
command -v timeout >/dev/null 2>&1 || { HAVE_TIMEOUT=0; echo "WARNING: no timeout(1): phases run unbounded"; }

# pytest with SIGTERM (and SIGINT, even where the parent ignores it) raising KeyboardInterrupt: pytest then ends
# the session normally, so pytest-benchmark still writes the JSON of the finished cases. A case stopped before its
# first timed round is dropped first (its empty stats would make pytest-benchmark fail to write any JSON).
read -r -d '' PYTEST_CODE <<'EOF'
import signal, sys
import pytest


class DropUnfinishedBenchmarks:
    @pytest.hookimpl(hookwrapper=True, tryfirst=True)
    def pytest_sessionfinish(self, session):
        bs = getattr(session.config, "_benchmarksession", None)
        if bs is not None:
            bs.benchmarks[:] = [b for b in bs.benchmarks if getattr(getattr(b, "stats", None), "data", None)]
        yield


for sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(sig, signal.default_int_handler)
sys.exit(int(pytest.main(sys.argv[1:], plugins=[DropUnfinishedBenchmarks()])))
EOF
PYTEST=("$PY" -c "$PYTEST_CODE")

# ------------------------------------------------------------------ phase bookkeeping
P_NAME=(); P_STATUS=(); P_SECS=(); P_LIMIT=(); P_DETAIL=()
status=0
record() {  # name status seconds limit detail
    P_NAME+=("$1"); P_STATUS+=("$2"); P_SECS+=("$3"); P_LIMIT+=("$4"); P_DETAIL+=("$5")
    case "$2" in ok | skipped) ;; *) status=1 ;; esac
}

phase_index() {
    local i
    for i in "${!PHASES[@]}"; do [ "${PHASES[$i]}" = "$1" ] && { echo "$i"; return; }; done
    echo -1
}

# Seconds phase $1 may use now: its share, what earlier phases left, never a later phase's share.
allowed_for() {
    local i later=0 j
    i="$(phase_index "$1")"
    for (( j = i + 1; j < ${#SHARES[@]}; j++ )); do later=$(( later + SHARES[j] )); done
    echo $(( BUDGET - RESERVE - later - SECONDS ))
}

pytest_summary() {  # the last pytest result line of a log, without the ===
    grep -aE "[0-9]+ (passed|failed|skipped|error|errors|deselected)|no tests ran|Interrupted|KeyboardInterrupt" "$1" 2>/dev/null \
        | tail -n 1 | sed -E 's/^=+ ?//; s/ ?=+$//' | cut -c1-90
}

# run_phase NAME DEST_LOG QUIET CMD...: run CMD under the phase's limit, appending its output to DEST_LOG (and to
# the terminal unless QUIET=1); sets PHASE_RC (124: timed out, 99: skipped for budget) and PHASE_LOG.
run_phase() {
    local name="$1" dest="$2" quiet="$3" allowed limit t0 secs
    shift 3
    PHASE_LOG="$TMP/$name.log"
    : >"$PHASE_LOG"
    allowed="$(allowed_for "$name")"
    if (( allowed < MIN_PHASE_S )); then
        echo "== $name: SKIPPED (${allowed} s left for it, under ${MIN_PHASE_S} s)"
        record "$name" SKIPPED 0 "$allowed" "over budget: ${allowed} s left for it"
        PHASE_RC=99
        return
    fi
    limit=$(( allowed - GRACE_S ))
    echo "== $name (limit ${limit} s, +${GRACE_S} s grace; at ${SECONDS} s of ${BUDGET} s)"
    t0=$SECONDS
    if [ "$HAVE_TIMEOUT" = 1 ]; then
        if [ "$quiet" = 1 ]; then
            timeout -s TERM -k "$GRACE_S" "$limit" "$@" 2>&1 | tee -a "$dest" >"$PHASE_LOG"
        else
            timeout -s TERM -k "$GRACE_S" "$limit" "$@" 2>&1 | tee -a "$dest" "$PHASE_LOG"
        fi
    else
        if [ "$quiet" = 1 ]; then "$@" 2>&1 | tee -a "$dest" >"$PHASE_LOG"; else "$@" 2>&1 | tee -a "$dest" "$PHASE_LOG"; fi
    fi
    PHASE_RC=${PIPESTATUS[0]}
    secs=$(( SECONDS - t0 ))
    PHASE_SECS=$secs
    PHASE_LIMIT=$allowed
    if (( PHASE_RC == 124 || PHASE_RC == 137 )); then
        echo "== $name: TIMEOUT after ${secs} s (limit ${limit} s)"
    fi
}

finish_phase() {  # name detail-when-ok [detail-when-failed]
    local name="$1" ok_detail="$2" bad_detail="${3:-$2}"
    case "$PHASE_RC" in
        99) ;;  # already recorded as skipped
        0) record "$name" ok "$PHASE_SECS" "$PHASE_LIMIT" "$ok_detail" ;;
        124 | 137) record "$name" TIMEOUT "$PHASE_SECS" "$PHASE_LIMIT" "$bad_detail" ;;
        *) record "$name" "FAILED" "$PHASE_SECS" "$PHASE_LIMIT" "rc $PHASE_RC: $bad_detail" ;;
    esac
}

skip_phase() {  # name reason
    echo "== $1: skipped ($2)"
    record "$1" skipped 0 - "$2"
}

# ------------------------------------------------------------------ summary, printed last, whatever happened
SUMMARY_DONE=0
summary() {
    [ "$SUMMARY_DONE" = 1 ] && return
    SUMMARY_DONE=1
    {
        echo
        echo "== summary ($(date -u '+%Y-%m-%d %H:%M UTC'); budget ${BUDGET} s)"
        grep -aE "^(device|python|triton|transformers|pytest|pytest-benchmark|build:|nvidia-smi) " "$TMP/versions.log" 2>/dev/null
        echo
        echo "median times in ms; ratio = reference / halo (> 1: halo is faster); rounds = halo / reference"
        if [ "$HAVE_TIMEOUT" = 1 ]; then
            timeout -k 5 20 "$PY" - "$OUT" <"$TMP/summary.py" 2>&1 || echo "(benchmark table failed: rc $?)"
        else
            "$PY" - "$OUT" <"$TMP/summary.py" 2>&1 || echo "(benchmark table failed: rc $?)"
        fi
        echo
        echo "phases"
        printf '%-14s | %-8s | %5s | %5s | %s\n' phase status s limit detail
        printf '%s\n' "---------------+----------+-------+-------+------------------------------------------"
        local i
        for i in "${!P_NAME[@]}"; do
            printf '%-14s | %-8s | %5s | %5s | %s\n' "${P_NAME[$i]}" "${P_STATUS[$i]}" "${P_SECS[$i]}" \
                "${P_LIMIT[$i]}" "${P_DETAIL[$i]}"
        done
        echo "total ${SECONDS} s of ${BUDGET} s; suite status ${status}"
    } | tee "$OUT/table.txt"
    rm -rf "$TMP"
}
trap 'echo "suite interrupted"; status=1; exit 1' INT TERM
trap 'summary' EXIT

cat >"$TMP/summary.py" <<'EOF'
import glob, json, math, os, re, sys

FAST = {"halo", "extension", "graph"}  # name tokens of the fast path (halo kernel, C++/CUDA op, CUDA graph)


def role(b):
    """'halo' or 'reference': extra_info['role'] (benchmarks/conftest.py record_ratio) or the benchmark's name."""
    info = b.get("extra_info", {})
    if info.get("role") in ("halo", "reference"):
        return info["role"]
    if "extension_us" in info:  # bench_build_windows_speedup times the extension
        return "halo"
    return "halo" if FAST & set(re.split(r"[\[\]_\-]", b["name"])) else "reference"


def label(b):
    name = re.sub(r"^(test|bench)_", "", b["name"])
    return name if len(name) <= 44 else name[:41] + "..."


def ms(value):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.3f}" if value >= 0.1 else f"{value:.4f}"


rows, targets, missing = [], [], []
for path in sorted(glob.glob(os.path.join(sys.argv[1], "bench_*.json"))):
    try:
        with open(path) as fh:
            data = json.load(fh)
    except Exception as exc:  # a file cut short by a kill
        missing.append(f"{os.path.basename(path)}: unreadable ({exc.__class__.__name__})")
        continue
    groups = {}
    for b in data.get("benchmarks", []):
        info = b.get("extra_info", {})
        if "target_case" in info:
            met = {True: "yes", False: "NO", None: "-"}.get(info.get("target_met"), "?")
            targets.append((info["target_case"], info.get("target_shape", ""),
                            f"{info['target_measured']:.3f}{info.get('target_unit', '')}", info.get("target", ""),
                            met, info.get("target_detail", "")))
            continue
        for group in info.get("ratio_groups") or [b.get("group") or b["name"]]:  # conftest.py's record_ratio
            groups.setdefault(group, []).append(b)
    for group, items in groups.items():
        fast = [b for b in items if role(b) == "halo"]
        refs = [b for b in items if role(b) == "reference"]
        for f in fast or [None]:
            for r in refs or [None]:
                f_ms = f["stats"]["median"] * 1e3 if f else None
                r_ms = r["stats"]["median"] * 1e3 if r else None
                ratio = f"{r_ms / f_ms:.2f}x" if f_ms and r_ms else "-"
                rounds = f"{f['stats']['rounds'] if f else '-'}/{r['stats']['rounds'] if r else '-'}"
                rows.append((group, label(f) if f else "-", ms(f_ms), label(r) if r else "-", ms(r_ms), ratio, rounds))
        for f in fast:
            info = f.get("extra_info", {})
            if "ratio" in info and "halo_ms" in info:  # CUDA-event medians measured in the same test
                rows.append((group, label(f) + " [cuda events]", ms(info["halo_ms"]), info.get("reference", "reference"),
                             ms(info["reference_ms"]), f"{info['ratio']:.2f}x", "20/20"))
        for b in items:
            info = b.get("extra_info", {})
            if "speedup" in info and "reference_us" in info:  # best-of-N timings measured in the same test
                rows.append((group, label(b) + " [best of N]", ms(info["extension_us"] / 1e3), "reference",
                             ms(info["reference_us"] / 1e3), f"{info['speedup']:.2f}x", "-"))


def table(header, rows):
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    fmt = " | ".join("{:<%d}" % w for w in widths)
    print(fmt.format(*header))
    print("-+-".join("-" * w for w in widths))
    for r in rows:
        print(fmt.format(*map(str, r)))


if rows:
    table(("group", "halo", "ms", "reference", "ms", "ratio", "rounds"), rows)
else:
    print("no benchmark results found")
for line in missing:
    print(line)
if targets:
    print()
    print("absolute targets (bench_targets.py; measured with CUDA events, reported, never asserted)")
    table(("target", "shape", "measured", "wanted", "met", "detail"), targets)
EOF

# ------------------------------------------------------------------ 1. versions (and: is there a CUDA device?)
phase_versions() {
    "$PY" - <<'PYEOF'
import platform, shutil
from importlib import metadata

import torch

n = torch.cuda.device_count() if torch.cuda.is_available() else 0
print(f"cuda_devices={n}", flush=True)  # first: the suite reads it even if the rest times out
if n:
    p = torch.cuda.get_device_properties(0)
    print(f"capability={p.major}.{p.minor}")
    print("device", p.name, f"{p.total_memory / 2**30:.0f} GiB", f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs")
else:
    print("WARNING: torch sees no CUDA device; the kernels will not run")
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda)
for dist in ("triton", "transformers", "pytest", "pytest-benchmark"):
    try:
        print(dist, metadata.version(dist))
    except Exception as exc:
        print(dist, "unavailable:", exc)
try:
    from torch.utils.cpp_extension import CUDA_HOME, is_ninja_available
    print("build: ninja", "yes" if is_ninja_available() else "NO (slow serial build)", "| nvcc",
          shutil.which("nvcc") or (CUDA_HOME and CUDA_HOME + "/bin/nvcc") or "not found")
except Exception as exc:
    print("build: cpp_extension unavailable:", exc)
PYEOF
    local rc=$?
    if command -v nvidia-smi >/dev/null 2>&1; then
        echo "nvidia-smi $(timeout 10 nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader 2>&1 | head -n 1)"
    fi
    return $rc
}
export -f phase_versions
export PY
run_phase versions /dev/null 0 bash -c phase_versions
VERSIONS_LOG="$PHASE_LOG"  # $TMP/versions.log, also read by the summary
CUDA_N="$(sed -n 's/^cuda_devices=//p' "$VERSIONS_LOG" | tail -n 1)"
if [ -z "$CUDA_N" ]; then  # the versions phase died before torch answered: ask the driver
    CUDA_N="$(timeout 10 nvidia-smi -L 2>/dev/null | grep -c '^GPU')"
    echo "torch did not answer in time; nvidia-smi lists ${CUDA_N:-0} GPU(s)"
fi
CUDA_N="${CUDA_N:-0}"
CAPABILITY="$(sed -n 's/^capability=//p' "$VERSIONS_LOG" | tail -n 1)"
device_line="$(grep -a '^device ' "$VERSIONS_LOG" | cut -c8-70)"
finish_phase versions "${device_line:-no CUDA device}" "$(tail -n 1 "$VERSIONS_LOG" | cut -c1-90)"
if (( CUDA_N > 0 )) || [ "${SUITE_ALLOW_CPU:-0}" = 1 ]; then
    RUN_CUDA=1
    (( CUDA_N > 0 )) || echo "no CUDA device: SUITE_ALLOW_CPU=1, running the phases anyway (numbers mean nothing)"
else
    RUN_CUDA=0
    status=1
fi
NO_CUDA="no CUDA device (set SUITE_ALLOW_CPU=1 to run anyway)"

# ------------------------------------------------------------------ 2. build the extension (ninja, this GPU's arch only)
if [ "${SKIP_BUILD:-0}" = 1 ]; then
    skip_phase build "SKIP_BUILD=1"
elif [ "$RUN_CUDA" = 0 ]; then
    skip_phase build "$NO_CUDA"
else
    ARCH="${TORCH_CUDA_ARCH_LIST:-${CAPABILITY:-9.0}}"
    JOBS="${MAX_JOBS:-$(nproc 2>/dev/null || echo 8)}"
    if (( CUDA_N > 0 )); then
        build_env=(FORCE_CUDA=1 "TORCH_CUDA_ARCH_LIST=$ARCH"); build_what="sm ${ARCH}"
    else
        build_env=(); build_what="CPU only"
    fi
    echo "building halo._C: ${build_env[*]:-CPU only} MAX_JOBS=$JOBS (log: $OUT/build.log)"
    run_phase build "$OUT/build.log" 1 env "${build_env[@]}" "MAX_JOBS=$JOBS" "$PY" setup.py build_ext --inplace
    if [ "$PHASE_RC" = 0 ]; then
        ext="$(timeout 30 "$PY" -c 'from halo.repair.windows import extension_available as a, extension_has_cuda as c
print("halo._C", "loads" if a() else "does NOT load", "| CUDA ops:", "yes" if c() else "no")' 2>&1 | tail -n 1)"
        echo "built: $ext"
        grep -aq "Falling back to using the slow distutils backend" "$PHASE_LOG" && ext="$ext (no ninja: serial build)"
        finish_phase build "$build_what, $JOBS jobs; $ext"
    else
        echo "extension build failed or timed out (continuing: every op has a fallback); tail of $OUT/build.log:"
        tail -n 15 "$PHASE_LOG"
        err="$(grep -aiE 'error' "$PHASE_LOG" | head -n 1 | cut -c1-90)"
        finish_phase build "" "${err:-see build.log}"
    fi
fi

# ------------------------------------------------------------------ 3. CUDA tests (explicit files; -k cuda inside them)
# Inside these files `-k cuda` selects the tests parametrised over device=cuda (tests/halo_kernels/conftest.py marks
# them `cuda`), the tests marked `cuda`, and the tests named *cuda* that skip without a device. The rest of the suite
# runs on CPU in CI; tests/halo_kernels/test_compile_cuda.py (sm_90 compile check without a GPU) is left out on purpose.
CUDA_TESTS=(
    tests/halo_kernels/test_archive_mass.py
    tests/halo_kernels/test_retained_rows.py
    tests/halo_kernels/test_bars.py
    tests/halo_kernels/test_brightness_layers.py
    tests/halo_kernels/test_brightness_update.py
    tests/halo_kernels/test_cache_integration.py
    tests/halo_kernels/test_column_mass.py
    tests/halo_kernels/test_compact_kernel.py
    tests/halo_kernels/test_compact_layers.py
    tests/halo_kernels/test_scores.py
    tests/halo_kernels/test_victims.py
    tests/halo_kernels/test_victims_layers.py
    tests/halo_kernels/test_pipeline_cuda.py
    tests/repair/test_graphs.py
    tests/halo/test_repair_loop.py
    tests/halo/test_memory_positions.py
    tests/halo/test_archive_positions.py
    tests/halo/test_cuda_session.py
)
if [ "${SKIP_TESTS:-0}" = 1 ]; then
    skip_phase tests "SKIP_TESTS=1"
elif [ "$RUN_CUDA" = 0 ]; then
    skip_phase tests "$NO_CUDA"
else
    present=()
    for f in "${CUDA_TESTS[@]}"; do
        if [ -f "$f" ]; then present+=("$f"); else echo "WARNING: $f is gone: update CUDA_TESTS in $0"; fi
    done
    # files that mention CUDA but are not listed (a test moved by someone?): say so, and keep the list explicit
    for f in $(grep -rlE "cuda\.is_available|mark\.cuda" tests --include='test_*.py' 2>/dev/null | sort); do
        [[ " ${CUDA_TESTS[*]} " == *" $f "* || "$f" == *test_compile_cuda.py ]] || echo "NOTE: $f mentions CUDA but is not in CUDA_TESTS"
    done
    per_test=()  # pytest-timeout (where installed and autoloaded): a hung test fails with its stack, not the phase
    [ -z "${PYTEST_DISABLE_PLUGIN_AUTOLOAD:-}" ] && "$PY" -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout=120)
    if (( ${#present[@]} == 0 )); then
        record tests FAILED 0 - "none of CUDA_TESTS exists"
    else
        run_phase tests "$OUT/tests.log" 0 "${PYTEST[@]}" "${present[@]}" --maxfail=10 -q -rfEs -p no:cacheprovider -k cuda \
            --durations=10 "${per_test[@]}"
        detail="$(pytest_summary "$PHASE_LOG")"
        missing=$(( ${#CUDA_TESTS[@]} - ${#present[@]} ))
        (( missing > 0 )) && detail="$detail; $missing file(s) missing"
        finish_phase tests "$detail"
        [ "$PHASE_RC" = 5 ] && P_STATUS[${#P_STATUS[@]}-1]="NO TESTS"  # nothing selected: -k cuda matched nothing
    fi
fi

# ------------------------------------------------------------------ 4. benchmarks, one phase (and one JSON) each
# The files each phase times (stems under benchmarks/): one, except bench_kernels, which also times the per-layer
# kernels of bench_layers.py, and bench_targets, which also times bench_recall.py (a phase of their own would write
# a ninth file, which a device call does not return).
bench_stems() {
    case "$1" in
        bench_kernels) echo "bench_kernels bench_layers" ;;
        bench_targets) echo "bench_targets bench_recall" ;;
        *) echo "$1" ;;
    esac
}
for name in "${PHASES[@]:3}"; do  # bench_kernels bench_targets bench_repair bench_step, in the order of PHASES
    if [ "${SKIP_BENCH:-0}" = 1 ]; then
        skip_phase "$name" "SKIP_BENCH=1"; continue
    fi
    stems=()  # BENCHES names a phase (all its files) or single files
    for stem in $(bench_stems "$name"); do
        if [ -z "${BENCHES:-}" ] || [[ " $BENCHES " == *" $name "* || " $BENCHES " == *" $stem "* ]]; then
            stems+=("$stem")
        fi
    done
    if (( ${#stems[@]} == 0 )); then
        skip_phase "$name" "not in BENCHES"; continue
    fi
    if [ "$RUN_CUDA" = 0 ]; then
        skip_phase "$name" "$NO_CUDA"; continue
    fi
    benches=(); gone=()
    for stem in "${stems[@]}"; do
        if [ -f "benchmarks/$stem.py" ]; then benches+=("benchmarks/$stem.py"); else gone+=("benchmarks/$stem.py"); fi
    done
    if (( ${#benches[@]} == 0 )); then
        skip_phase "$name" "${gone[*]} missing"; continue
    fi
    echo "-- ${benches[*]}" >>"$OUT/bench.log"
    run_phase "$name" "$OUT/bench.log" 0 "${PYTEST[@]}" "${benches[@]}" -q -rfEs -p no:cacheprovider --benchmark-only \
        --benchmark-group-by=group --benchmark-columns=min,median,mean,stddev,rounds \
        --benchmark-max-time="$BENCH_MAX_TIME" --benchmark-min-rounds="$BENCH_MIN_ROUNDS" \
        --benchmark-warmup=on --benchmark-warmup-iterations=1 --benchmark-json="$OUT/$name.json" --durations=5
    detail="$(pytest_summary "$PHASE_LOG")"
    [ -f "$OUT/$name.json" ] || detail="$detail; no JSON"
    (( ${#gone[@]} > 0 )) && detail="$detail; ${gone[*]} missing"
    finish_phase "$name" "$detail"
done

exit $status
