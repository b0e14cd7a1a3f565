#!/usr/bin/env bash
# The L2 prefetch branch of Lattice-CUDA's decode graphs, on and off, in one call on one GPU:
# builds, runs the CUDA tests, makes shape-exact random Q8 checkpoints, then lattice-bench decode
# (slope 64 -> 320) for each LATTICE_CUDA_L2_PREFETCH mode of MODES (lattice_cuda.h: 0 off,
# 1 / 2 graph branch with bulk / line prefetches, 3 each GEMV prefetching the next), the modes
# interleaved, REPEAT times; GROUP8=1: mode 1 with 8 MB groups once more.
#
#   OUT=... MODES="0 1 3" REPEAT=2 tests/gpu/l2_prefetch_bench.sh   (carry .whl: gguf, click, diskcache)
#
# Prints one line per run (model, mode, median tok/s, spread), also kept in $OUT/summary.txt as it
# goes (with $OUT/pytest.log); JSON and logs in $OUT/results.tgz at the end.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/lattice-l2}
R=$OUT/res
mkdir -p "$R"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export LATTICE_CUDA_CACHE=$PWD/build/cuda-cache
MODELS=${MODELS:-"qwen3.5-0.8b smollm2-135m"}
RUNS=${RUNS:-5}
REPEAT=${REPEAT:-2}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$R/machine.txt"

echo "== build"
python3 setup.py build_ext --inplace >"$R/build_ext.log" 2>&1 || { tail -20 "$R/build_ext.log"; exit 1; }
python3 -c 'import lattice.cuda as c; print(c.build_library()); print(c.device_name())' 2>&1 | tee "$R/cuda_build.log"

mkdir -p /tmp/models
(for m in $MODELS; do
    python3 -m lattice.bench.cli make-model "$m" --random "/tmp/models/$m" --gguf q8_0 >>"$R/make-model.log" 2>&1
done; echo done >>"$R/make-model.log") &
models_pid=$!

if [ "${TESTS:-1}" = 1 ]; then
    echo "== tests"
    timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider -n "${WORKERS:-8}" tests/test_cuda.py \
        tests/test_backends.py -k "cuda or Cuda" >"$R/pytest.log" 2>&1
    tail -6 "$R/pytest.log"
    cp "$R/pytest.log" "$OUT/pytest.log"
fi
wait "$models_pid"
tail -2 "$R/make-model.log"

bench() {  # model, tag, then environment assignments
    local m=$1 tag=$2
    shift 2
    env "$@" timeout 200 python3 -m lattice.bench.cli run --gguf "/tmp/models/$m.gguf" -e lattice:cuda --n1 64 \
        --n2 320 -r "$RUNS" --warmup 1 --pp 64 --json "$R/$m-$tag.json" >"$R/$m-$tag.txt" 2>&1
    python3 -c "
import json, sys
r = json.load(open(sys.argv[1]))['results'][0]
d = r['unloaded']['decode'] if r['status'] == 'ok' else None
print(f'{sys.argv[2]:14s} {sys.argv[3]:10s}', f\"{d['median']:9.1f} tok/s  spread {d['spread_pct']:.1f}%\" if d else r)
" "$R/$m-$tag.json" "$m" "$tag" 2>&1 | tee -a "$OUT/summary.txt" || tail -5 "$R/$m-$tag.txt"
}

echo "== decode (lattice-bench, median of $RUNS)"
for m in $MODELS; do
    for i in $(seq "$REPEAT"); do
        for mode in ${MODES:-0 1 2 3}; do
            bench "$m" "mode$mode-$i" LATTICE_CUDA_L2_PREFETCH=$mode
        done
    done
    [ "${GROUP8:-0}" = 1 ] && bench "$m" "mode1-8MB" LATTICE_CUDA_L2_PREFETCH=1 LATTICE_CUDA_L2_GROUP=8388608
done

if [ "${ROOFLINE:-1}" = 1 ]; then
    timeout 120 python3 -m lattice.cuda.bench --model smollm2-135m --model qwen3.5-0.8b --quant q8 \
        --json "$R/roofline.json" 2>&1 | tail -3
fi
tar czf "$OUT/results.tgz" -C "$OUT" res
