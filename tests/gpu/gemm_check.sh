#!/bin/bash
# Builds and runs tests/gpu/gemm_check.cu (k_gemm of lattice/cuda/gemm.cuh against a float64
# reference, then timings) on the GPU of this machine. Extra arguments go to the check (--time:
# timings only). GEMM_BASELINE=<path of another gemm.cuh>: first the timings of that version, for
# an old-vs-new comparison on the same card.
set -euo pipefail
cd "$(dirname "$0")/../.."
NVCC=${LATTICE_NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
FLAGS=(-O3 -arch=${LATTICE_CUDA_ARCH:-sm_90} -std=c++17 -Xcompiler -fopenmp)
OUT=$(mktemp -d)
if [ -n "${GEMM_BASELINE:-}" ]; then
    "$NVCC" "${FLAGS[@]}" -diag-suppress 177 -DGEMM_BASELINE="\"$(realpath "$GEMM_BASELINE")\"" -o "$OUT/gemm_baseline" tests/gpu/gemm_check.cu -lgomp
    "$OUT/gemm_baseline"
fi
"$NVCC" "${FLAGS[@]}" -o "$OUT/gemm_check" tests/gpu/gemm_check.cu -lgomp
"$OUT/gemm_check" "$@"
