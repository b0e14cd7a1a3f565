"""Does holding the SMs through a decode step protect it from other processes' GPU load? Runs
resident_load.cu's synthetic decode step (64 dependent GEMV-like phases, ~120 registers a thread,
two blocks an SM) as a chain of kernels (also with narrow phases that leave half the SMs idle, as
Lattice's GDN recurrence does, and with either extreme of the L1 / shared-memory carveout), as one
persistent kernel a step and as one for 8 steps
(with cooperative_groups' grid barrier, with counter barriers of four kinds, without barriers: the
phases' floor, with activations that carry their phase, which the next phase polls, and with barriers
of fewer arrivals at one address: a tree of counters, and thread-block clusters that meet at the
hardware cluster barrier first; persistent8-cluster4 names a cluster size), alone and
under lattice-bench's load processes (N processes of 512x512 fp32
torch matmuls, 2% of every 10 ms). A diagnostic: it needs a GPU, nvcc and an interpreter with torch
for the load.

    python3 tests/gpu/resident_load.py -n 10 -r 4 [--pads 68:52,40:52] [--shapes 4:64,1:32] [--forms kernels,persistent8]

Each round measures every form alone, then every form under one start of the load (the order of
the forms rotates between rounds, and which phase comes first alternates); a measurement is the
mean time per step over a 1.5 s window. Prints, per form, the median over rounds of its time per
step alone and loaded, the loss and the time per step that the load added. Under MPS, start its
daemon first. Results: bench/results/cuda-load-session{18,19,20,21}-2026-11-27.md.
"""
import argparse
import contextlib
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, "..", "..")]

from lattice.bench.load import LoadProcesses  # noqa: E402

FORMS = ("kernels", "kernels-narrow", "kernels-l1", "kernels-shared", "persistent", "persistent8",
         "persistent8-counter", "persistent8-red", "persistent8-flag", "persistent8-flagsleep", "persistent8-none",
         "persistent8-ll", "persistent8-tree", "persistent8-cluster", "persistent8-clusteronly", "persistent8-split",
         "persistent8-split-relaxed", "persistent8-split-warp", "persistent8-split-spread", "persistent8-split-late0",
         "persistent8-llx", "persistent8-onecluster", "persistent8-onecluster-pipe", "persistent8-onecluster-tma")


def build(out: str, pads: str, shape: str, threads: int, stages: int = 3) -> str:
    """The program with PAD_PHASE:PAD_STEP values held live per thread and phases of shape
    ROWS_PER_WARP:ROW_VECS ("" = the file's defaults), blocks of `threads`."""
    exe = os.path.join(out, "resident_load" + "".join(f"_{v.replace(':', '_')}" for v in (pads, shape) if v)
                       + f"_t{threads}_s{stages}")
    defs = [f"-DPAD_PHASE={pads.split(':')[0]}", f"-DPAD_STEP={pads.split(':')[1]}"] if pads else []
    defs += [f"-DROWS_PER_WARP={shape.split(':')[0]}", f"-DROW_VECS={shape.split(':')[1]}"] if shape else []
    defs += [f"-DTHREADS={threads}", f"-DPIPE_STAGES={stages}"]
    subprocess.run(["nvcc", "-O3", "-std=c++17", "-arch=sm_90", *defs, os.path.join(HERE, "resident_load.cu"),
                    "-o", exe], check=True)
    return exe


def step_us(exe: str, form: str, seconds: float) -> tuple[float, str]:
    """Mean us per step over the window, and the program's line (run at the default MPS client
    priority, whatever the load's)."""
    env = {k: v for k, v in os.environ.items() if k != "CUDA_MPS_CLIENT_PRIORITY"}
    r = subprocess.run([exe, form, str(seconds)], capture_output=True, text=True, env=env)
    if r.returncode:
        raise SystemExit(f"{exe} {form}: exit {r.returncode}: {r.stderr.strip()}")
    line = r.stdout.strip()
    f = line.split()
    return float(f[f.index("us_per_step_mean") + 1]), line


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=10, help="load processes")
    ap.add_argument("-r", type=int, default=4, help="rounds")
    ap.add_argument("-s", type=float, default=1.5, help="seconds per measurement")
    ap.add_argument("--load-python", default=None, help="an interpreter with torch for the load processes")
    ap.add_argument("--pads", default="", help="comma-separated PAD_PHASE:PAD_STEP builds (0:0 = the kernels' "
                    "own registers); default: the file's (~120 registers)")
    ap.add_argument("--shapes", default="", help="comma-separated ROWS_PER_WARP:ROW_VECS builds (1:32: phases "
                    "of 1/8 the bytes); default: the file's (4:64)")
    ap.add_argument("--pipe-stages", type=int, default=3, help="phases the -pipe form requests ahead")
    ap.add_argument("--threads", type=int, default=256, help="threads a block (one block an SM at 512)")
    ap.add_argument("--forms", default=",".join(FORMS), help="comma-separated forms (resident_load.cu's modes)")
    ap.add_argument("--no-load", action="store_true", help="alone only")
    ap.add_argument("--load-priority", type=int, choices=(0, 1), default=None,
                    help="the load processes' CUDA_MPS_CLIENT_PRIORITY (0 normal, 1 below normal); the "
                    "measured program keeps the default")
    ap.add_argument("--out", default="/tmp")
    a = ap.parse_args()
    if a.load_priority is not None:  # inherited by the load processes only (step_us drops it)
        os.environ["CUDA_MPS_CLIENT_PRIORITY"] = str(a.load_priority)
    exes = {(p, sh): build(a.out, p, sh, a.threads, a.pipe_stages) for p in a.pads.split(",") for sh in a.shapes.split(",")}
    forms = [(f, b) for b in exes for f in a.forms.split(",")]
    name = {(f, b): f + (f"@{b[0]}" if b[0] else "") + (f"#{b[1]}" if b[1] else "") for f, b in forms}
    us = {(k, ph): [] for k in forms for ph in ("alone", "loaded")}
    shares = []
    for r in range(a.r):
        order = forms[r % len(forms):] + forms[:r % len(forms)]
        phases = ("alone",) if a.no_load else ("alone", "loaded") if r % 2 == 0 else ("loaded", "alone")
        for ph in phases:
            load = LoadProcesses(a.n, "cuda", python=a.load_python) if ph == "loaded" else contextlib.nullcontext()
            with load as lp:
                for form in order:
                    t, line = step_us(exes[form[1]], form[0], a.s)
                    us[(form, ph)].append(t)
                    if r == 0:
                        print(f"  {ph}: {line}", flush=True)
            if lp is not None:
                shares.append(lp.summary()["share_pct"])
        print(f"round {r + 1}: " + ", ".join(
            f"{name[k]} " + " / ".join(f"{us[(k, ph)][-1]:.1f}" for ph in ("alone", "loaded") if ph in phases) + " us"
            for k in forms), flush=True)

    def med(v):
        return sorted(v)[len(v) // 2]
    prio = f", load at MPS client priority {a.load_priority}" if a.load_priority is not None else ""
    print(("alone only" if a.no_load else f"{a.n} load processes{prio}") + f", {a.r} rounds"
          + (f", load share {med(shares):.1f}% (median)" if shares else "")
          + "; us per step, median over rounds:")
    for f in forms:
        al = med(us[(f, "alone")])
        line = f"  {name[f]:26s} alone {al:7.1f}"
        if us[(f, "loaded")]:
            lo = med(us[(f, "loaded")])
            line += f"  loaded {lo:7.1f}  loss {100 * (1 - al / lo):5.2f}%  {lo - al:6.1f} us/step lost"
        print(line + "  (" + "; ".join(f"{ph}: " + " ".join(f"{x:.1f}" for x in us[(f, ph)])
                                      for ph in ("alone", "loaded") if us[(f, ph)]) + ")")


if __name__ == "__main__":
    main()
