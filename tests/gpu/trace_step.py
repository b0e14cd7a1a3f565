"""Timeline of one Lattice-CUDA decode step, from the LT_TRACE build of the backend (kernels.cuh):
each block's start and dependency-release times, and marks inside k_gemv, k_gdn_decode,
k_attention and k_sample.

    python3 tests/gpu/trace_step.py MODEL.gguf OUT.txt [TOKENS]

Per kernel of the second-to-last complete decode step: threads, grid, phase = its first release
minus the previous kernel's first release (what the chain spent on the previous kernel), when its
blocks started relative to the previous release (first / last), how many started after their own
release (their weight loads could not overlap the previous kernel), its release spread, what the
chain spent on it (own) and thread 0's marks 1-5 and end (median block, after its release). Then
the phase time per kernel class, with thread 0's marks (median block, ns after its release) and
the time from a grid's last end to the next grid's release. TOKENS (48) tokens follow a 16-token
prompt: the traced step's position is a little under 16 + TOKENS. (Before the marks 1-5 columns,
the rows' "mark1" and "mark2" columns held marks 2 and 3.) Decode runs ~6% slower traced.

Environment: LOAD=N traces under N GPU load processes (lattice.bench.load; LOAD_PYTHON names an
interpreter with torch); RAW=FILE keeps the ring itself (tests/gpu/trace_load.py compares rings)."""
import gc
import os
import sys
import tempfile

import numpy as np


def read_ring(path):
    """The kernel instances of a LT_TRACE ring, in release order: a dict per instance with threads,
    size, n (records), t0min / t0max (block starts), t1min / t1max (releases), late (blocks that
    started after the first release), and, for kernels that mark their end, marks (thread 0's marks
    1-5 and end, median block, ns after its release), end_abs_max, dur_med and dur_max (block
    release to end); then the records written and the ring's capacity. Times are ns after the ring's
    first release."""
    raw = np.fromfile(path, dtype=np.uint32)
    n = int(raw[-1])
    cap = (len(raw) - 1) // 16
    begin, end = raw[:8 * cap].reshape(cap, 8), raw[8 * cap:16 * cap].reshape(cap, 8)
    keep = np.arange(min(n, cap))
    begin, end = begin[keep].astype(np.int64), end[keep].astype(np.int64)
    grid_id, gsize, t0, t1, threads = (begin[:, i] for i in (0, 3, 4, 5, 6))
    base = int(t1.min())
    rel = lambda v: (v - base) % 2**32  # noqa: E731
    t0, t1 = rel(t0), rel(t1)
    has_end = end[:, 6] == 1
    # a graph replays the same grid ids every step: one kernel instance = one grid id's records
    # whose releases are within 20 us of each other
    order = np.lexsort((t1, grid_id))
    inst = np.zeros(len(t1), dtype=np.int64)
    for j in range(1, len(order)):
        a, b = order[j - 1], order[j]
        inst[b] = inst[a] + (grid_id[a] != grid_id[b] or t1[b] - t1[a] > 20000)
    grids = []
    for g in np.unique(inst):
        s = inst == g
        d = dict(threads=int(threads[s][0]), size=int(gsize[s][0]), n=int(s.sum()), t0min=int(t0[s].min()),
                 t0max=int(t0[s].max()), t1min=int(t1[s].min()), t1max=int(t1[s].max()),
                 late=int((t0[s] > t1[s].min()).sum()), marks=None)
        e = s & has_end
        if e.any():  # thread 0's marks 1-5 and its end, after its block's release (median block)
            m = [(end[e, c] - begin[e, 5]) % 2**32 for c in range(6)]
            d["marks"] = [int(np.median(v[end[e, c] != 0])) if (end[e, c] != 0).any() else -1
                          for c, v in enumerate(m)]
            d["end_abs_max"] = int(rel(end[e, 5]).max())
            d["dur_med"], d["dur_max"] = int(np.median(m[5])), int(m[5].max())
        grids.append(d)
    grids.sort(key=lambda d: d["t1min"])
    return grids, n, cap


def step_period(grids):
    """The step's period in kernels: the shortest p whose last two periods repeat the same kernels
    (0: none found)."""
    sig = [(d["threads"], d["size"]) for d in grids]
    last = len(grids) - 1
    for p in range(20, len(grids) // 3):
        if sig[last - 2 * p + 1:last - p + 1] == sig[last - p + 1:last + 1]:
            return p
    return 0


def trace(model, tokens):
    """Decodes TOKENS tokens with the traced library (under LOAD load processes if set); returns the
    ring's path."""
    path = os.path.join(tempfile.mkdtemp(), "trace.bin")
    os.environ["LATTICE_CUDA_TRACE_OUT"] = path
    os.environ["LATTICE_CUDA_TRACE"] = "1"  # builds (and caches) the traced library
    import lattice
    m = lattice.load(model, backend="cuda", context=max(512, tokens + 64))
    if os.environ.get("LOAD"):
        from lattice.bench.load import LoadProcesses
        with LoadProcesses(int(os.environ["LOAD"]), "cuda", python=os.environ.get("LOAD_PYTHON")):
            m.session().generate(list(range(100, 116)), max_tokens=tokens, ignore_eos=True)
    else:
        m.session().generate(list(range(100, 116)), max_tokens=tokens, ignore_eos=True)
    del m
    gc.collect()  # the library writes the ring when the model is freed
    if os.environ.get("RAW"):
        import shutil
        shutil.copy(path, os.environ["RAW"])
    return path


def main():
    model, out = sys.argv[1], sys.argv[2]
    tokens = int(sys.argv[3]) if len(sys.argv) > 3 else 48
    grids, n, cap = read_ring(trace(model, tokens))
    p = step_period(grids)
    last = len(grids) - 1
    lines = [f"{len(grids)} kernel instances, {n} records (ring {cap}), step period {p} kernels"]
    if p:
        lo = last - 2 * p + 1  # the second-to-last complete step
        step = grids[lo - 1:lo + p]
        lines.append(f"step: {step[-1]['t1min'] - step[0]['t1min']} ns from kernel {lo} to {lo + p}")
        lines.append(" i thr grid  rec phase_ns start_first start_last late rel_spread   own_ns  mark1  mark2  mark3"
                     "  mark4  mark5    end")
        classes = {}
        for i in range(1, len(step)):
            d, prev = step[i], step[i - 1]
            phase = d["t1min"] - prev["t1min"]
            own = step[i + 1]["t1min"] - d["t1min"] if i + 1 < len(step) else -1  # its release to the next's
            mk = d.get("marks") or [-1] * 6
            lines.append(f"{i:3d} {d['threads']:3d} {d['size']:5d} {d['n']:4d} {phase:8d} "
                         f"{d['t0min'] - prev['t1min']:11d} {d['t0max'] - prev['t1min']:10d} {d['late']:4d} "
                         f"{d['t1max'] - d['t1min']:10d} {own:8d} " + " ".join(f"{v:6d}" for v in mk))
            c = classes.setdefault((prev["threads"], prev["size"]), [0, 0, []])
            c[0] += 1
            c[1] += phase
            if prev.get("marks"):  # thread 0's marks after its release, and the grid's end to the next release
                c[2].append(prev["marks"] + [d["t1min"] - prev["end_abs_max"]])
        lines.append("phase time by the kernel that ran it (threads, grid): count, total ns, mean")
        for k, (cnt, tot, mk) in sorted(classes.items(), key=lambda kv: -kv[1][1]):
            lines.append(f"  {k}: {cnt} {tot} {tot // cnt}")
            if mk:
                lines.append("      marks 1-5, end (median block, ns after its release); last end -> next release: "
                             + " ".join(str(int(v)) for v in np.mean(np.array(mk), axis=0)))
    open(out, "w").write("\n".join(lines) + "\n")
    print("\n".join(lines[:3] + lines[-20:]))


if __name__ == "__main__":
    main()
