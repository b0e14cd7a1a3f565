#!/bin/bash
# Builds and runs tests/gpu/gemm_check.cu (k_gemm of lattice/cuda/gemm.cuh against a float64
# reference, then timings) on the GPU of this machine. Extra arguments go to the check (--time).
set -euo pipefail
cd "$(dirname "$0")/../.."
NVCC=${LATTICE_NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
OUT=$(mktemp -d)
"$NVCC" -O3 -arch=${LATTICE_CUDA_ARCH:-sm_90} -std=c++17 -Xcompiler -fopenmp -o "$OUT/gemm_check" tests/gpu/gemm_check.cu -lgomp
"$OUT/gemm_check" "$@"
