#!/usr/bin/env bash
O=$OUT; export OUT=/tmp/o; mkdir -p $OUT
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 LATTICE_CUDA_CACHE=$PWD/build/cuda-cache
(LATTICE_CUDA_TRACE=1 python3 -c 'import lattice.cuda as c; c.build_library()' > /tmp/o/trace_build.log 2>&1 &)
TESTS=1 TEST_TIMEOUT=300 MODELS="qwen3.5-0.8b smollm2-135m" VARIANTS="vx_h" ROUNDS=${ROUNDS:-9} AB_TIMEOUT=290 bash tests/gpu/ab_variants.sh > /tmp/o/ab.log 2>&1
cp /tmp/o/ab_*.txt /tmp/o/tests.txt $O/; tail -3 /tmp/o/tests.txt; tail -3 /tmp/o/ab_qwen3.5-0.8b.txt; tail -3 /tmp/o/ab_smollm2-135m.txt
timeout 120 python3 tests/gpu/trace_step.py /tmp/models/qwen3.5-0.8b.gguf $O/trace_rope.txt 240 > /tmp/o/tr.log 2>&1 || { echo trace failed; tail -5 /tmp/o/tr.log; }
