#!/usr/bin/env bash
# Runs the CUDA backend's tests (tests/test_cuda.py and the CUDA cases of tests/test_backends.py)
# on a machine with an NVIDIA GPU and nvcc, then prints the decode roofline. Needs python3 with
# numpy, Cython, setuptools, pytest (pytest-xdist for WORKERS > 1), safetensors, and torch for the
# copy bandwidth. Logs go to $OUT (default /tmp/lattice-gpu). Benchmarks: tests/gpu/peers_bench.sh.
#
#   tests/gpu/run_gpu_tests.sh              # tests + roofline
#   ROOFLINE=0 tests/gpu/run_gpu_tests.sh   # tests only
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/lattice-gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export LATTICE_CUDA_CACHE=${LATTICE_CUDA_CACHE:-$PWD/build/cuda-cache}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"

echo "== build: CPU runtime extension (the oracle) and the CUDA bridge"
python3 setup.py build_ext --inplace >"$OUT/build_ext.log" 2>&1 || { tail -30 "$OUT/build_ext.log"; exit 1; }
python3 -c 'import lattice.cuda as c; print(c.build_library()); print(c.device_name())' 2>&1 | tee "$OUT/cuda_build.log"

echo "== tests"
timeout "${TEST_TIMEOUT:-420}" python3 -m pytest -q -p no:cacheprovider --maxfail=30 -n "${WORKERS:-8}" tests/test_cuda.py \
    tests/test_backends.py -k "cuda or Cuda" 2>&1 | tee "$OUT/pytest.log" | tail -25
status=${PIPESTATUS[0]}

if [ "${ROOFLINE:-1}" = 1 ]; then
    echo "== roofline"
    python3 -m lattice.cuda.bench --model smollm2-135m --model qwen3.5-0.8b --quant q8 --json "$OUT/roofline.json"
fi
exit "$status"
