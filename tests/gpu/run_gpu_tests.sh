#!/usr/bin/env bash
# Runs the CUDA backend's tests, then its benchmark, on a machine with an NVIDIA GPU and nvcc.
# Needs python3 with numpy, Cython, setuptools, pytest, safetensors (and torch for the copy
# bandwidth and the GPU load processes). Logs and results go to $OUT (default /tmp/lattice-gpu).
#
#   tests/gpu/run_gpu_tests.sh            # tests + benchmark
#   BENCH=0 tests/gpu/run_gpu_tests.sh    # tests only
#   LOAD=10 tests/gpu/run_gpu_tests.sh    # benchmark also under 10 GPU load processes
#   BENCH_ARGS=--profile ...              # extra benchmark options (per-kernel timings)
#   PDL_ABLATION=1 ...                    # also benchmark with LATTICE_CUDA_PDL=0
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/lattice-gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export LATTICE_CUDA_CACHE=${LATTICE_CUDA_CACHE:-$PWD/build/cuda-cache}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c 'import sys, numpy; print(sys.version.split()[0], "numpy", numpy.__version__)'

echo "== build: CPU runtime extension (the oracle) and the CUDA bridge"
python3 setup.py build_ext --inplace >"$OUT/build_ext.log" 2>&1 || { tail -30 "$OUT/build_ext.log"; exit 1; }
python3 -c 'import lattice.cuda as c; print(c.build_library()); print(c.device_name())' 2>&1 | tee "$OUT/cuda_build.log"

echo "== tests"
timeout "${TEST_TIMEOUT:-420}" python3 -m pytest -q -p no:cacheprovider --maxfail=30 -n "${WORKERS:-8}" tests/test_cuda.py 2>&1 \
    | tee "$OUT/pytest.log" | tail -40
status=${PIPESTATUS[0]}

if [ "${BENCH:-1}" = 1 ]; then
    echo "== benchmark"
    timeout "${BENCH_TIMEOUT:-400}" python3 -m lattice.cuda.bench --model smollm2-135m --model qwen3.5-0.8b \
        --quant q8 --runs "${RUNS:-5}" --load "${LOAD:-0}" --json "$OUT/cuda-bench.json" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"
    if [ "${PDL_ABLATION:-0}" = 1 ]; then
        echo "== benchmark without programmatic dependent launch"
        LATTICE_CUDA_PDL=0 timeout 200 python3 -m lattice.cuda.bench --model qwen3.5-0.8b --model smollm2-135m \
            --quant q8 --runs 3 --json "$OUT/cuda-bench-nopdl.json" 2>&1 | tee "$OUT/bench-nopdl.log"
    fi
fi
exit "$status"
