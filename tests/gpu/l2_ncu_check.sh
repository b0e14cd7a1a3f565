#!/usr/bin/env bash
# Whether the L2 prefetch lands: DRAM bytes and L2 hit rate of one decode step's GEMVs (Nsight
# Compute, application replay, caches not flushed), LATTICE_CUDA_L2_PREFETCH=0 vs 1.
set -uo pipefail
cd "$(dirname "$0")/../.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 LATTICE_CUDA_CACHE=$PWD/build/cuda-cache
python3 setup.py build_ext --inplace >/dev/null 2>&1 || exit 1
python3 -m lattice.bench.cli make-model qwen3.5-0.8b --random /tmp/m/q --gguf q8_0 >/dev/null 2>&1 || exit 1
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
for mode in ${MODES:-0 1}; do
    LATTICE_CUDA_L2_PREFETCH=$mode timeout 150 "$NCU" --cache-control none --replay-mode application --csv \
        --page raw -k regex:'^k_gemv' --launch-skip 600 --launch-count 100 \
        --metrics gpu__time_duration.sum,dram__bytes_read.sum,lts__t_sector_hit_rate.pct \
        python3 -c "
import lattice
m = lattice.load('/tmp/m/q.gguf', backend='cuda', context=512)
m.session().generate(list(range(100, 116)), max_tokens=40, ignore_eos=True)
" >"$OUT/ncu$mode.csv" 2>"$OUT/ncu$mode.err"
    python3 - "$OUT/ncu$mode.csv" "$mode" <<'PY'
import csv, sys
rows = [r for r in csv.DictReader(l for l in open(sys.argv[1]) if l.startswith('"'))][1:]
num = lambda s: float(s.replace(",", ""))
us = [num(r["gpu__time_duration.sum"]) / 1e3 for r in rows]
mb = [num(r["dram__bytes_read.sum"]) / 1e6 for r in rows]
hit = [num(r["lts__t_sector_hit_rate.pct"]) for r in rows]
big = [i for i in range(len(rows)) if us[i] < 50]  # GEMVs, not the LM head
print(f"mode {sys.argv[2]}: {len(rows)} GEMVs, {sum(us):.0f} us, DRAM read {sum(mb):.1f} MB, "
      f"L2 hit {sum(hit[i] for i in big) / max(len(big), 1):.1f}% (mean over GEMVs < 50 us)")
PY
    tail -3 "$OUT/ncu$mode.err"
done
