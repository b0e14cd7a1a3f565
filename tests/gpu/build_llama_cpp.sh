#!/usr/bin/env bash
# Builds llama.cpp's shared libraries with CUDA (sm_90, CUDA graphs on) from .peers/llama.cpp
# (tests/gpu/prepare_llama_cpp.sh) on the GPU machine, only the targets llama-cpp-python loads.
# cuBLAS comes from the CUDA toolkit, else from the nvidia-cublas wheel next to torch.
# Prints the folder to use as LLAMA_CPP_LIB_PATH (also written to $BUILD/libdir).
#
#   BUILD=/tmp/llama-build JOBS=16 tests/gpu/build_llama_cpp.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
SRC=$PWD/.peers/llama.cpp
BUILD=${BUILD:-/tmp/llama-build}
JOBS=${JOBS:-16}
extra=()
if ! ls /usr/local/cuda/lib64/libcublas.so* >/dev/null 2>&1; then
    wheel=$(python3 -c 'import glob, site
for d in site.getsitepackages():
    for p in sorted(glob.glob(d + "/nvidia/**/libcublas.so*", recursive=True)):
        print(p.rsplit("/lib/", 1)[0]); raise SystemExit' 2>/dev/null || true)
    [ -n "$wheel" ] || { echo "no cuBLAS found (toolkit or nvidia wheel)"; exit 1; }
    lib=$(ls "$wheel"/lib/libcublas.so* | head -1)
    lt=$(ls "$wheel"/lib/libcublasLt.so* | head -1)
    echo "cuBLAS from $wheel"
    extra+=("-DCUDA_cublas_LIBRARY=$lib" "-DCUDA_cublasLt_LIBRARY=$lt"
            "-DCMAKE_CXX_FLAGS=-I$wheel/include" "-DCMAKE_CUDA_FLAGS=-I$wheel/include")
    echo "$wheel/lib" > /tmp/llama-cublas-libdir
fi
cmake -S "$SRC" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
    -DGGML_CUDA_GRAPHS=ON -DLLAMA_BUILD_COMMON=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF "${extra[@]}" >"$BUILD.configure.log" 2>&1 \
    || { tail -30 "$BUILD.configure.log"; exit 1; }
ninja -C "$BUILD" -j "$JOBS" llama ggml-cuda ggml-cpu >"$BUILD.build.log" 2>&1 || { tail -40 "$BUILD.build.log"; exit 1; }
dir=$(dirname "$(find "$BUILD" -name 'libllama.so' | head -1)")
echo "$dir" > "$BUILD/libdir"
echo "$dir"
