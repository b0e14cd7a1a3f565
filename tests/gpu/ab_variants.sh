#!/usr/bin/env bash
# One device call for an A/B of Lattice-CUDA decode: builds this tree and the package copies named
# in VARIANTS (in parallel), writes shape-exact random models, runs the CUDA tests, then
# decode_variants.py per model with this tree ("" = as is), each copy and each ENVS variant.
#
#   git archive REV lattice setup.py pyproject.toml metal README.md | tar -x -C vx_rev   # a copy
#   OUT=... VARIANTS="vx_rev" ENVS="LATTICE_CUDA_EAGER=1" ROUNDS=3 bash tests/gpu/ab_variants.sh
#
# Options (environment): VARIANTS (package copies, untracked directories: they travel with the
# tree; delete them before committing), ENVS (space-separated variants, each
# NAME=VALUE[,NAME=VALUE...]), MODELS (default "qwen3.5-0.8b smollm2-135m"), ROUNDS (3), TESTS=0 (skip the tests), TESTK (pytest -k,
# default "cuda or Cuda"), TEST_TIMEOUT (240 s), AB_TIMEOUT (200 s per model), MPS=1 (start the
# CUDA MPS daemon first), LOAD=N (each model's A/B again under N GPU load processes, into
# $OUT/ab_<model>_load.txt; LOAD_PYTHON: an interpreter with torch). Carry .whl where
# the machine lacks the wheels. Results: $OUT/tests.txt, $OUT/ab_<model>.txt. A call with two
# models, tests and three variants takes about 2.5-3.5 minutes on an H100.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/lattice-ab}
mkdir -p "$OUT"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 LATTICE_CUDA_CACHE=$PWD/build/cuda-cache
VARIANTS=${VARIANTS-}
MODELS=${MODELS:-"qwen3.5-0.8b smollm2-135m"}
nvidia-smi -L
if [ "${MPS:-0}" = 1 ]; then  # as peers_bench.sh MPS=1
    export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
    mkdir -p /tmp/mps-pipe /tmp/mps-log
    nvidia-cuda-mps-control -d && sleep 1
fi
for v in $VARIANTS; do
    (cd "$v" && python3 setup.py build_ext --inplace >/dev/null 2>&1 \
        && PYTHONPATH=/tmp/site:$PWD python3 -c 'import lattice.cuda as c; c.build_library()' >"$OUT/build_$v.log" 2>&1) &
done
python3 setup.py build_ext --inplace >"$OUT/build_ext.log" 2>&1 || { tail -20 "$OUT/build_ext.log"; exit 1; }
python3 -c 'import lattice.cuda as c; c.build_library()' || exit 1
mkdir -p /tmp/models
for m in $MODELS; do
    [ -f "/tmp/models/$m.gguf" ] || python3 -m lattice.bench.cli make-model "$m" --random "/tmp/models/$m" --gguf q8_0 \
        >"$OUT/make-model-$m.log" 2>&1 &
done
if [ "${TESTS:-1}" = 1 ]; then
    timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -x -p no:cacheprovider -n 12 tests/test_cuda.py \
        tests/test_backends.py -k "${TESTK:-cuda or Cuda}" 2>&1 | tail -15 | tee "$OUT/tests.txt"
fi
wait
for m in $MODELS; do
    args=("")
    for v in $VARIANTS; do args+=("PYTHONPATH=/tmp/site:$PWD/$v"); done
    for e in ${ENVS-}; do args+=("$e"); done
    timeout "${AB_TIMEOUT:-200}" python3 tests/gpu/decode_variants.py "/tmp/models/$m.gguf" "${args[@]}" \
        -r "${ROUNDS:-3}" 2>&1 | tee "$OUT/ab_$m.txt"
    if [ "${LOAD:-0}" -gt 0 ]; then
        timeout "${AB_TIMEOUT:-200}" python3 tests/gpu/decode_variants.py "/tmp/models/$m.gguf" "${args[@]}" \
            -r "${ROUNDS:-3}" --load "$LOAD" ${LOAD_PYTHON:+--load-python "$LOAD_PYTHON"} 2>&1 | tee "$OUT/ab_${m}_load.txt"
    fi
done
[ "${MPS:-0}" = 1 ] && echo quit | nvidia-cuda-mps-control
