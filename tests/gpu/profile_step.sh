#!/usr/bin/env bash
# Per-kernel GPU time of one Lattice-CUDA decode step, from Nsight Compute (no clock control):
# a short greedy generation through the unified runtime; ncu skips the prompt's kernels and the
# first decode steps, then records one step's kernels with their time, DRAM bytes, registers,
# launch shape and achieved occupancy. Prints a summary per kernel kind; the CSV goes to $2.
#
#   tests/gpu/profile_step.sh /tmp/models/qwen3.5-0.8b.gguf $OUT/ncu-qwen.csv [kernels per step]
#   PREFILL=64 tests/gpu/profile_step.sh M.gguf out.csv 400   # every kernel of one 64-token prefill
set -uo pipefail
cd "$(dirname "$0")/../.."
MODEL=$1
CSV=$2
PER_STEP=${3:-130}
PREFILL=${PREFILL:-0}
SKIP=$((PER_STEP * 4)) PROMPT=16 GEN=40
[ "$PREFILL" != 0 ] && SKIP=0 PROMPT=$PREFILL GEN=1
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
timeout 240 "$NCU" --clock-control none --csv --page raw -k regex:'^k_' --launch-skip $SKIP \
    --launch-count "$PER_STEP" \
    --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,launch__registers_per_thread,launch__grid_size,launch__block_size,sm__warps_active.avg.pct_of_peak_sustained_active \
    python3 -c "
import lattice
m = lattice.load('$MODEL', backend='cuda', context=512)
m.session().generate(list(range(100, 100 + $PROMPT)), max_tokens=$GEN, ignore_eos=True)
" >"$CSV" 2>"$CSV.err"
python3 - "$CSV" <<'EOF'
import csv, sys, collections
rows = [r for r in csv.DictReader(l for l in open(sys.argv[1]) if l.startswith('"'))][1:]  # skip units
num = lambda s: float(s.replace(",", ""))  # ncu writes thousands separators
kinds = collections.OrderedDict()
for r in rows:
    name = r["Kernel Name"].split("(")[0]
    k = kinds.setdefault(name, [0, 0.0, 0.0, r["launch__registers_per_thread"], r["launch__grid_size"],
                                r["launch__block_size"], r["sm__warps_active.avg.pct_of_peak_sustained_active"]])
    k[0] += 1
    k[1] += num(r["gpu__time_duration.sum"]) / 1e3  # ns -> us
    k[2] += (num(r["dram__bytes_read.sum"]) + num(r["dram__bytes_write.sum"])) / 1e6
total = sum(k[1] for k in kinds.values())
print(f"{len(rows)} kernels, {total:.1f} us of kernel time")
print(f"{'kernel':60s} {'n':>4s} {'us':>8s} {'us/each':>8s} {'MB':>8s} {'GB/s':>7s} regs grid block occ%")
for name, (n, us, mb, regs, grid, block, occ) in kinds.items():
    print(f"{name[:60]:60s} {n:4d} {us:8.1f} {us / n:8.2f} {mb:8.2f} {mb * 1e3 / us:7.0f} {regs} {grid} {block} {occ}")
EOF
