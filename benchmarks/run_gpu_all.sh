#!/usr/bin/env bash
# Every GPU-only check of the project, in one go, for a session that has a CUDA GPU for a few
# minutes (target: under 8 minutes on an H100). Writes logs and JSON results under $OUT and a
# one-line-per-section summary in $OUT/summary.txt; exits non-zero if any section failed.
#
#   OUT=/some/dir bash benchmarks/run_gpu_all.sh
#
# The GPU machine has torch, triton, cupy and numpy and the checkout on PYTHONPATH; nothing is
# pip-installed there. pytest is pure Python: if the machine lacks it, carry these paths of the
# local .venv and this script links them in (nothing else of the venv, whose torch is CPU-only):
#   .venv/lib/python3.11/site-packages/{pytest,_pytest,pluggy,iniconfig,packaging,py.py}
#
# Adding a benchmark: append a section at the end with `run NAME SECONDS command...`; keep the
# sum of the limits under ~8.5 minutes (now 505 s without TensorRT; with TensorRT its section
# takes 240 s instead of 30 s, 715 s in all: over one 600 s device call, so on a TensorRT machine
# run `tests/test_trt_gpu.py` in a call of its own). The sections usually take far less.
set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$ROOT/benchmarks/results/gpu}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
cd "$ROOT" || exit 1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
: >"$OUT/summary.txt"
failed=0

# run NAME LIMIT_SECONDS COMMAND...: log to $OUT/NAME.log, record the exit status.
run() {
    local name=$1 limit=$2
    shift 2
    echo
    echo "=== $name (limit ${limit}s) ==="
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "$name rc=$rc $((SECONDS - t0))s" | tee -a "$OUT/summary.txt"
    [ "$rc" -eq 0 ] || failed=1
}

# ---------------------------------------------------------------- environment
run environment 30 bash -c 'nvidia-smi; "$0" -c "import sys, torch, triton
print(sys.version); print(torch.__version__, torch.version.cuda, triton.__version__)
print(torch.cuda.get_device_name())"' "$PY"

if ! "$PY" -c "import pytest" 2>/dev/null; then
    site="$ROOT/.venv/lib/python3.11/site-packages"
    vendored="$OUT/.pytest-only"
    mkdir -p "$vendored"
    for p in pytest _pytest pluggy iniconfig packaging py.py; do
        [ -e "$site/$p" ] && ln -sfn "$site/$p" "$vendored/$p"
    done
    export PYTHONPATH="$PYTHONPATH:$vendored"
    "$PY" -c "import pytest" 2>/dev/null ||
        echo "pytest missing and not carried: the test sections below will fail" |
        tee -a "$OUT/summary.txt"
fi

# ------------------------------------------------ re-ranking kernel (issue 5)
# Compiled kernels on the GPU (gpu marker), then the interpreter tests too (one mode a process).
run rerank_gpu_tests 90 "$PY" -m pytest -q -p no:cacheprovider --noconftest -m gpu \
    tests/test_rerank_triton.py
run rerank_interpreter_tests 60 env TRITON_INTERPRET=1 "$PY" -m pytest -q -p no:cacheprovider \
    --noconftest -m "not gpu" tests/test_rerank_triton.py
run rerank_benchmark 170 "$PY" benchmarks/rerank_gpu.py --json "$OUT/rerank_gpu.json" --budget-s 140

# ------------------------------------------------ encoder: PyTorch reference on the GPU (issue 6 baseline)
run encoder_torch_gpu 80 "$PY" benchmarks/encoder_gpu.py --json "$OUT/encoder_gpu.json"

# ------------------------------------------------ TensorRT engines (issue 11)
# Builds fp16 and fp32 engines for the tiny bundle, reads back every pinned layer's precision,
# replays CUDA graphs over alternating batch sizes, compares fp16 with fp32. Without TensorRT
# (or without onnx for the export) every test is skipped with its reason and the section passes:
# 30 s is enough to say so; with TensorRT the builds take minutes.
if "$PY" -c "import tensorrt; tensorrt.Builder" 2>/dev/null; then trt_limit=240; else trt_limit=30; fi
run trt_gpu_tests "$trt_limit" "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_trt_gpu.py

# ------------------------------------------------ re-rank graph: ONNX Runtime CUDA EP, TensorRT engine, Triton (issue 13)
# The tests skip, saying why, without onnxruntime-gpu / TensorRT; the benchmark's sections too.
run rerank_graph_gpu 45 bash -c '"$0" -m pytest -q -p no:cacheprovider -m gpu -rs \
    tests/test_rerank_onnx.py tests/test_rerank_trt_cpu.py; t=$?
    "$0" benchmarks/rerank_onnx.py --gpu-only --json "$1/rerank_onnx_gpu.json" || t=1; exit $t' \
    "$PY" "$OUT"

# ------------------------------------------------ more GPU benchmarks go here

echo
cat "$OUT/summary.txt"
exit $failed
