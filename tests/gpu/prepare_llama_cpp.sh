#!/usr/bin/env bash
# Copies what a CUDA build of llama.cpp needs out of the llama-cpp-python source package into
# .peers/ (ignored through .git/info/exclude, carried to the GPU machine with `carry`): the C/C++
# sources (ggml with its CPU and CUDA backends, src, include, cmake, the small vendored headers)
# and the llama_cpp Python package, without the vocabulary/model test files (most of the 73 MB).
#
#   tests/gpu/prepare_llama_cpp.sh [/opt/lattice-peers/src/llama_cpp_python-0.3.36]
set -euo pipefail
cd "$(dirname "$0")/../.."
PKG=${1:-/opt/lattice-peers/src/llama_cpp_python-0.3.36}
S=$PKG/vendor/llama.cpp
D=.peers/llama.cpp
grep -qx "/.peers/" .git/info/exclude || echo "/.peers/" >> .git/info/exclude
rm -rf "$D" .peers/py
mkdir -p "$D/ggml/src" "$D/vendor" .peers/py
cp -r "$S/CMakeLists.txt" "$S/LICENSE" "$S/cmake" "$S/include" "$S/src" "$D/"
cp -r "$S/ggml/CMakeLists.txt" "$S/ggml/cmake" "$S/ggml/include" "$D/ggml/"
(cd "$S/ggml/src" && cp -r ./*.c ./*.cpp ./*.h ./*.in CMakeLists.txt ggml-cpu ggml-cuda "$OLDPWD/$D/ggml/src/")
cp "$S/vendor/CMakeLists.txt" "$D/vendor/"
cp -r "$S/vendor/hash" "$S/vendor/miniaudio" "$S/vendor/nlohmann" "$S/vendor/sheredom" "$S/vendor/stb" "$D/vendor/"
cp -r "$PKG/llama_cpp" .peers/py/
rm -rf .peers/py/llama_cpp/lib .peers/py/llama_cpp/server
du -sh .peers
