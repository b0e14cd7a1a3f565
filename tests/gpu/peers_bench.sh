#!/usr/bin/env bash
# Lattice-CUDA side by side with llama.cpp (CUDA, built here from .peers/llama.cpp), Lattice-CUDA
# with eager launches (the graph-replay ablation) and transformers (bf16, static cache: its decode
# step compiled with CUDA graphs), interleaved in one lattice-bench run under one load, on
# shape-exact random checkpoints, alone and under --load N. On a GPU machine:
#
#   OUT=... LOAD=10 RUNS=5 tests/gpu/peers_bench.sh
#
# Carry .peers (tests/gpu/prepare_llama_cpp.sh) and, where the machine lacks them, .whl (gguf,
# click, diskcache, cython, pytest-xdist, execnet wheels). Options (environment):
#   LLAMA_LIB=dir, or .peers/libs/llama-libs.tgz.* (what PACK=1 returned): prebuilt llama.cpp
#     libraries instead of building them; PACK=1: return the built ones as $OUT/llama-libs.tgz.*
#   TESTS=1: run the CUDA tests first; NCU=1: per-kernel times of one decode step (profile_step.sh);
#   ROOFLINE=0: skip the copy-bandwidth roofline (lattice.cuda.bench); PP=64: prefill prompt length (512)
#   MAIN=0 / LLAMA=0 / EAGER=0: leave those engines out; TRANSFORMERS=static (default) / dynamic /
#     0: transformers with a static or a dynamic cache, or not at all; N1, N2: the decode slope's
#     two lengths (64, 320); TF_CACHES=1: then transformers' two caches alone, side by side (is the
#     static cache faster?); MPS=1: every run again under CUDA MPS; TIMESLICE=0: only the MPS runs
#     (skip those under the GPU's default time-slicing); ONE_AT_A_TIME=1: lattice-bench --one-at-a-time
#     (each engine measured with no other engine loaded, its own load included)
# Everything else lands in $OUT/results.tgz (the device tool returns at most 8 files).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/lattice-peers}
R=$OUT/res
mkdir -p "$R"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD:$PWD/.peers/py${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export LATTICE_CUDA_CACHE=$PWD/build/cuda-cache
MODELS=${MODELS:-"smollm2-135m qwen3.5-0.8b"}
RUNS=${RUNS:-5}
LOAD=${LOAD:-10}
{ nvidia-smi; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv; nproc; } >"$R/machine.txt" 2>&1
head -12 "$R/machine.txt"

if [ -z "${LLAMA_LIB:-}" ] && ls .peers/libs/llama-libs.tgz.* >/dev/null 2>&1; then  # returned by PACK=1
    mkdir -p /tmp/llama-libs && cat .peers/libs/llama-libs.tgz.* | tar xzf - -C /tmp/llama-libs
    LLAMA_LIB=/tmp/llama-libs
fi
if [ -z "${LLAMA_LIB:-}" ]; then
    echo "== llama.cpp build (background)"
    (BUILD=/tmp/llama-build JOBS=${JOBS:-14} bash tests/gpu/build_llama_cpp.sh >"$R/llama-build.txt" 2>&1; echo "rc=$?" >>"$R/llama-build.txt") &
    build_pid=$!
fi

echo "== Lattice: runtime extension and CUDA bridge"
python3 setup.py build_ext --inplace >"$R/build_ext.log" 2>&1 || { tail -20 "$R/build_ext.log"; exit 1; }
python3 -c 'import lattice.cuda as c; print(c.build_library()); print(c.device_name())' 2>&1 | tee "$R/cuda_build.log"

if [ "${TESTS:-0}" = 1 ]; then
    echo "== tests"
    timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -q -p no:cacheprovider -n "${WORKERS:-4}" tests/test_cuda.py \
        tests/test_backends.py -k "cuda or Cuda" >"$R/pytest.log" 2>&1
    tail -15 "$R/pytest.log"
fi

if [ "${ROOFLINE:-1}" = 1 ]; then
    python3 -m lattice.cuda.bench --model smollm2-135m --model qwen3.5-0.8b --quant q8 --json "$R/roofline.json" \
        2>&1 | tail -3
fi

echo "== models"
mkdir -p /tmp/models
for m in $MODELS; do
    [ -f "/tmp/models/$m.gguf" ] || python3 -m lattice.bench.cli make-model "$m" --random "/tmp/models/$m" --gguf q8_0 \
        >>"$R/make-model.log" 2>&1 || { tail -20 "$R/make-model.log"; exit 1; }
done
ls -la /tmp/models

if [ "${NCU:-0}" = 1 ]; then
    echo "== one decode step's kernels (Nsight Compute)"
    for m in $MODELS; do
        case $m in smollm2*) n=183 ;; *) n=129 ;; esac
        bash tests/gpu/profile_step.sh "/tmp/models/$m.gguf" "$R/ncu-$m.csv" "$n" 2>&1 | tee "$R/ncu-$m.txt"
    done
fi

if [ -z "${LLAMA_LIB:-}" ]; then
    wait "$build_pid"
    tail -3 "$R/llama-build.txt"
    LLAMA_LIB=$(cat /tmp/llama-build/libdir 2>/dev/null || true)
fi
export LLAMA_CPP_LIB_PATH=$LLAMA_LIB
export LD_LIBRARY_PATH=$LLAMA_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
[ -f /tmp/llama-cublas-libdir ] && export LD_LIBRARY_PATH=$(cat /tmp/llama-cublas-libdir):$LD_LIBRARY_PATH

bench() {  # tag, extra lattice-bench args...
    local tag=$1
    shift
    timeout "${BENCH_TIMEOUT:-560}" python3 -m lattice.bench.cli run --warmup 1 --runs "$RUNS" --pp "${PP:-512}" "$@" \
        --json "$R/$tag.json" >"$R/$tag.txt" 2>&1
    echo "-- $tag (rc $?)"
    grep -v "^\s*$" "$R/$tag.txt" | tail -14
}

measure() {  # model, tag suffix: every engine in one run, under one load
    local m=$1 sfx=$2 M=/tmp/models/$1 engines=()
    [ "${MAIN:-1}" = 1 ] && engines+=(-e lattice:cuda)  # first: the loss differences are against it
    # llama.cpp's worker imports llama_cpp before lattice (lattice/bench/runner.py: WORKER says why)
    [ "${LLAMA:-1}" = 1 ] && engines+=(-e llama.cpp:gpu)
    [ "${EAGER:-1}" = 1 ] && engines+=(-e lattice:cuda:eager)
    case ${TRANSFORMERS:-static} in
        static | 1) engines+=(-e transformers:bf16:cuda:static) ;;  # torch.compile'd decode, CUDA graphs
        dynamic) engines+=(-e transformers:bf16:cuda) ;;        # Python-bound: ~30 tok/s, use N2=48
    esac
    [ ${#engines[@]} -gt 0 ] && bench "$m$sfx" --gguf "$M.gguf" --hf "$M" "${engines[@]}" \
        --n1 "${N1:-64}" --n2 "${N2:-320}" --load "$LOAD" --load-device cuda \
        $([ "${ONE_AT_A_TIME:-0}" = 1 ] && echo --one-at-a-time)
    # the issue's "static cache if it helps it": transformers with each cache, alone, in one short run
    [ "${TF_CACHES:-0}" = 1 ] && bench "$m$sfx-transformers-caches" --hf "$M" -e transformers:bf16:cuda \
        -e transformers:bf16:cuda:static --n1 16 --n2 48
    return 0
}

if [ "${TIMESLICE:-1}" = 1 ]; then
    for m in $MODELS; do measure "$m" ""; done
fi

if [ "${MPS:-0}" = 1 ]; then
    echo "== the same under CUDA MPS (every CUDA process of the machine through one MPS server)"
    export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
    mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
    nvidia-cuda-mps-control -d && sleep 1
    for m in $MODELS; do measure "$m" "-mps"; done
    echo quit | nvidia-cuda-mps-control
fi

if [ "${PACK:-0}" = 1 ] && [ -n "$LLAMA_LIB" ]; then
    (cd "$LLAMA_LIB" && tar czf - ./*.so*) | split -b 15m - "$OUT/llama-libs.tgz."
    ls -la "$OUT"
fi
tar czf "$OUT/results.tgz" -C "$OUT" res
