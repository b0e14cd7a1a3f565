"""Where Lattice-CUDA decode time goes under GPU load: compares LT_TRACE rings (trace_step.py with
RAW=FILE, then LOAD=N for the loaded ones) of decode alone and under load, step by step.

    python3 tests/gpu/trace_load.py ALONE.bin LOADED.bin [LOADED.bin ...]

Each ring is cut into its complete decode steps (trace_step.step_period). Per kernel class (threads,
grid), alone against loaded: the chain's time on it per step (own: its first release to the next
kernel's), the mean extra per loaded step, the blocks that started after the release (late: no
room on an SM while the previous kernel ran, so their weight loads did not overlap it), and the
median and slowest block's release-to-end time (the slowest: stragglers on SMs that the load's
blocks share)."""
import sys
from collections import defaultdict

import numpy as np

from trace_step import read_ring, step_period


def steps(path):
    """The complete steps of a ring: a list of (kernel instances, own ns of each)."""
    grids = read_ring(path)[0]
    p = step_period(grids)
    if not p:
        raise SystemExit(f"{path}: no repeating decode step found")
    last, out = len(grids) - 1, []
    for k in range(2, len(grids) // p):  # step k from the end; the last one has no successor
        lo = last - k * p + 1
        seg = grids[lo:lo + p + 1]
        if lo < 0 or any(d["n"] != d["size"] for d in seg):  # the ring's oldest records were overwritten
            break
        out.append((seg[:-1], np.array([seg[j + 1]["t1min"] - seg[j]["t1min"] for j in range(p)])))
    return out


def main():
    alone = steps(sys.argv[1])
    loaded = [s for path in sys.argv[2:] for s in steps(path)]
    sig = [(d["threads"], d["size"]) for d in alone[0][0]]
    for seg, _ in loaded:
        if [(d["threads"], d["size"]) for d in seg] != sig:
            raise SystemExit("the rings' steps run different kernels: not the same model or program")
    base = np.median(np.array([own for _, own in alone]), axis=0)
    rows = defaultdict(lambda: {"alone": 0.0, "extra": 0.0, "late": [[], []], "med": [[], []], "max": [[], []]})
    for which, group in ((0, alone), (1, loaded)):
        for seg, own in group:
            for j, d in enumerate(seg):
                r = rows[sig[j]]
                if which:
                    r["extra"] += (own[j] - base[j]) / len(loaded)
                else:
                    r["alone"] += base[j] / len(alone)
                r["late"][which].append(d["late"])
                if "dur_max" in d:
                    r["med"][which].append(d["dur_med"])
                    r["max"][which].append(d["dur_max"])
    step_ns = [own.sum() for _, own in loaded]
    print(f"{len(alone)} steps alone: {base.sum() / 1e3:.1f} us; {len(loaded)} loaded: mean "
          f"{np.mean(step_ns) / 1e3:.1f} us (max {max(step_ns) / 1e3:.1f}), "
          f"{np.mean(step_ns) / base.sum() * 100 - 100:.1f}% longer")
    print("kernel (threads, grid)  alone us/step  extra us/step  late blocks alone/loaded  "
          "block ns median alone/loaded  slowest alone/loaded")
    avg = lambda v: np.mean(v) if v else float("nan")  # noqa: E731
    for k, r in sorted(rows.items(), key=lambda kv: -kv[1]["extra"]):
        print(f"  {str(k):16s} {r['alone'] / 1e3:10.1f} {r['extra'] / 1e3:12.1f} {avg(r['late'][0]):12.1f} "
              f"{avg(r['late'][1]):6.1f} {avg(r['med'][0]):16.0f} {avg(r['med'][1]):6.0f} "
              f"{avg(r['max'][0]):14.0f} {avg(r['max'][1]):6.0f}")


if __name__ == "__main__":
    main()
