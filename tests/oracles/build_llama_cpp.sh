#!/bin/bash
# Builds llama.cpp through llama-cpp-python 0.3.36 from the PyPI source package, CPU only,
# into a dedicated venv used by the oracle scripts (tests/oracles/) and the benchmarks.
# The built wheel is kept so other venvs can install the same build without recompiling:
#   pip install "$LATTICE_PEERS/wheels/llama_cpp_python-0.3.36-*.whl"
# 5 to 30 minutes on 2 cores (29 min on a busy shared machine). Usage: bash tests/oracles/build_llama_cpp.sh
#
# No llama-quantize binary is built; quantize through the library instead, e.g. SmolLM2 Q4_1 -> Q8_0
# (allow_requantize because the source is already quantized; the result holds the Q4_1 values):
#   p = llama_cpp.llama_model_quantize_default_params(); p.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
#   p.allow_requantize = True; llama_cpp.llama_model_quantize(b"in.gguf", b"out.gguf", p)  # 0 = ok
# HF -> GGUF: $PEERS/src/llama_cpp_python-$VERSION/vendor/llama.cpp/convert_hf_to_gguf.py (needs gguf,
# torch, transformers).
set -euo pipefail

VERSION=0.3.36
PEERS=${LATTICE_PEERS:-/opt/lattice-peers}
VENV=${LLAMA_VENV:-$PEERS/llama-venv}
WHEELS=$PEERS/wheels
SRC=$PEERS/src
PYTHON=${PYTHON:-python3}

# CPU only; GGML_NATIVE tunes for this CPU (AVX2/AVX-512 where present), like a local llama.cpp build.
export CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_BLAS=OFF -DLLAMA_CURL=OFF"
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2}

mkdir -p "$WHEELS" "$SRC"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
# numpy is what the oracle scripts need besides llama_cpp; gguf for llama.cpp's converter.
"$VENV/bin/pip" install -q numpy gguf

sdist=$(ls "$SRC"/llama_cpp_python-$VERSION.tar.gz 2>/dev/null || true)
if [ -z "$sdist" ]; then
    "$VENV/bin/pip" download --no-deps --no-binary :all: -d "$SRC" "llama-cpp-python==$VERSION"
    sdist=$(ls "$SRC"/llama_cpp_python-$VERSION.tar.gz)
fi
# Unpacked source: vendor/llama.cpp/convert_hf_to_gguf.py and the tools' sources live there.
tar -xzf "$sdist" -C "$SRC"

# The wheel is kept: a second run only reinstalls it (LLAMA_REBUILD=1 compiles again).
if [ -n "${LLAMA_REBUILD:-}" ] || ! ls "$WHEELS"/llama_cpp_python-$VERSION-*.whl >/dev/null 2>&1; then
    start=$(date +%s)
    "$VENV/bin/pip" wheel -v --no-deps -w "$WHEELS" "$sdist"
    echo "wheel built in $(( $(date +%s) - start )) s"
fi
"$VENV/bin/pip" install --force-reinstall --no-deps "$WHEELS"/llama_cpp_python-$VERSION-*.whl
"$VENV/bin/pip" install -q "typing-extensions>=4.5" "diskcache>=5.6.1" "jinja2>=2.11.3"
"$VENV/bin/python" -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__, llama_cpp.llama_print_system_info().decode())"
