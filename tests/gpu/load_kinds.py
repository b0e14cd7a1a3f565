"""Which part of the GPU load slows Lattice's decode: the matmul load of `lattice-bench --load`
(torch 512x512 fp32 matmuls: registers, shared memory, L2 traffic) against loads with the same
blocks and threads on the SMs and no memory traffic: kernels of independent FMA chains. With 96
chains a thread (`spin96`) they hold about as many registers as the matmul; with 8 (`spin8`) they
keep the FMA rate with few registers, which separates register residency from issue slots. A
diagnostic: it needs a GPU, torch and cupy (the device machine has both).

    python3 tests/gpu/load_kinds.py /tmp/models/qwen3.5-0.8b.gguf -n 10 -r 4 --chains 96,8

Each round measures decode alone, under N matmul load processes and under N spin processes of each
chain count (the order rotates between rounds; the load starts and stops around each measurement);
a measurement is the median of five 64 -> 320 token slopes. Prints, per kind, the median rate, the
loss and the decode time per token that the load added. Under MPS, start its daemon first.
"""
import argparse
import contextlib
import json
import os
import signal
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, "..", ".."), HERE]

from decode_variants import decode_rate  # noqa: E402
from lattice.bench.load import LoadProcesses, _on_signal, duty_cycle  # noqa: E402

# 256 blocks of 128 threads and ~13 KB of shared memory, like the matmul's main kernel
# (sm80_xmma_gemm_f32f32 64x64x8, bench/results/cuda-load-session14-2026-11-26.md); CHAINS
# independent FMA chains per thread hold the registers
SPIN_SRC = r"""
extern "C" __global__ void __launch_bounds__(128) spin(float *out, int iters) {
    extern __shared__ float sm[];
    float a[CHAINS];
#pragma unroll
    for (int j = 0; j < CHAINS; j++)
        a[j] = threadIdx.x * 1e-3f + j;
    for (int i = 0; i < iters; i++)
#pragma unroll
        for (int j = 0; j < CHAINS; j++)
            a[j] = fmaf(a[j], 0.999999f, 1e-7f);
    float s = 0.0f;
#pragma unroll
    for (int j = 0; j < CHAINS; j++)
        s += a[j];
    sm[threadIdx.x] = s;
    __syncthreads();
    if (sm[(threadIdx.x + 1) & 127] == 1234.5f)  /* never: keeps the work */
        out[blockIdx.x] = s;
}
"""
SPIN_BLOCKS, SPIN_THREADS, SPIN_SMEM = 256, 128, 13 * 1024


def serve_spin(duty: float, period: float, parent: int, chains: int):
    """One spin load process, with lattice.bench.load's protocol ("ready", pause/run, a JSON report)."""
    import cupy as cp
    kernel = cp.RawKernel(f"#define CHAINS {chains}\n" + SPIN_SRC, "spin")
    out = cp.zeros(SPIN_BLOCKS, dtype=cp.float32)
    start, end = cp.cuda.Event(), cp.cuda.Event()

    def burst(k, iters):
        start.record()
        for _ in range(k):
            kernel((SPIN_BLOCKS,), (SPIN_THREADS,), (out, cp.int32(iters)), shared_mem=SPIN_SMEM)
        end.record()
        end.synchronize()
        return cp.cuda.get_elapsed_time(start, end) / 1e3

    burst(5, 64)
    iters = 64                              # one kernel about as long as one 512x512 matmul (~8 us)
    while burst(1, iters) < 8e-6 and iters < 1 << 20:
        iters *= 2
    per = min(burst(20, iters) for _ in range(3)) / 20
    k = max(1, round(duty * period / per))
    alone = min(burst(k, iters) for _ in range(5))
    print("ready", flush=True)
    bursts, measured, wall = duty_cycle(lambda: burst(k, iters), period, parent)
    print(json.dumps({"device": "cuda-spin", "registers": kernel.num_regs, "iters": iters, "kernels_per_burst": k,
                      "burst_alone_s": alone, "bursts": bursts, "wall_s": wall, "share": bursts * alone / wall,
                      "share_events": measured / wall}), flush=True)


def spin_load(n: int, chains: int) -> LoadProcesses:
    """n spin load processes, run by lattice.bench.load's LoadProcesses with this file's command."""
    return LoadProcesses(n, "cuda", command=[sys.executable, os.path.abspath(__file__), "--serve-spin", str(chains),
                                             "--parent", str(os.getpid())])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?")
    ap.add_argument("-n", type=int, default=10, help="load processes")
    ap.add_argument("-r", type=int, default=4, help="rounds")
    ap.add_argument("--chains", default="96", help="spin kernels' FMA chains per thread (registers), comma-separated")
    ap.add_argument("--serve-spin", type=int, default=0)
    ap.add_argument("--parent", type=int, default=None)
    a = ap.parse_args()
    if a.serve_spin:
        signal.signal(signal.SIGTERM, _on_signal)
        serve_spin(0.02, 0.01, a.parent or os.getppid(), a.serve_spin)
        return
    import lattice
    model = lattice.load(a.model, backend="cuda", context=512)
    kinds = {"alone": contextlib.nullcontext, "matmul": lambda: LoadProcesses(a.n, "cuda")}
    for c in map(int, a.chains.split(",")):
        kinds[f"spin{c}"] = lambda c=c: spin_load(a.n, c)
    rates, shares = {k: [] for k in kinds}, {k: [] for k in kinds}
    names = list(kinds)
    for r in range(a.r):
        for kind in names[r % len(names):] + names[:r % len(names)]:
            with kinds[kind]() as load:
                rates[kind].append(decode_rate(model, median=True))
            if load is None:  # alone
                continue
            s = load.summary()
            shares[kind].append(s["share_pct"])
            if kind.startswith("spin") and r == 0:
                print(f"  {kind} kernel: {s['reports'][0]['registers']} registers a thread", flush=True)
        print(f"round {r + 1}: " + ", ".join(f"{k} {rates[k][-1]:.1f}" for k in names), flush=True)
    med = {k: sorted(v)[len(v) // 2] for k, v in rates.items()}
    print(f"{os.path.basename(a.model)}, {a.n} load processes, {a.r} rounds (median decode tok/s over rounds):")
    for k in names:
        share = f", load share {sorted(shares[k])[len(shares[k]) // 2]:.1f}%" if shares[k] else ""
        lost = 1e6 / med[k] - 1e6 / med["alone"]
        print(f"  {k:8s} {med[k]:8.1f}  loss {100 * (1 - med[k] / med['alone']):5.2f}%  "
              f"{lost:6.1f} us/token lost{share}  (rounds: {' '.join(f'{x:.0f}' for x in rates[k])})")


if __name__ == "__main__":
    main()
