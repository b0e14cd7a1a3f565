"""A/B decode throughput of Lattice-CUDA under environment variants, interleaved in rounds, one
process per measurement (the backend reads its environment when created):

    python3 tests/gpu/decode_variants.py /tmp/models/qwen3.5-0.8b.gguf "" LATTICE_CUDA_EAGER=1 -r 3

Each variant is a list of NAME=VALUE separated by spaces or commas ("" = as is). To A/B two
commits, put the other one's package in a directory (`git archive REV lattice setup.py
pyproject.toml metal README.md | tar -x -C old`, then `python3 setup.py build_ext --inplace` in old/
on the GPU machine; an untracked directory travels with the working tree) and pass the variant
"PYTHONPATH=$PWD/old" (plus the wheels' directory, if any): the CUDA library is cached per source
hash, so both builds coexist. Decode tok/s is the slope between 64 and 320 generated tokens
(16-token prompt, greedy); the table gives the median and the spread (max - min) / median over the
rounds. Prefill tok/s of 64- and 512-token prompts alongside
(prompt + first token).

--load N runs every round under N GPU load processes (lattice.bench.load; --load-python names an
interpreter with torch), started once for the whole A/B, so that all variants share one load; each
measurement is then the median of five pairs instead of the fastest of three (the fastest would
pick the runs the load missed). Under MPS, start its daemon first.
"""
import argparse
import os
import subprocess
import sys
import time


def decode_rate(m, median: bool) -> float:
    """Decode tok/s of a lattice Model, by the slope between 64 and 320 generated tokens from a
    16-token prompt: the median of five pairs (under load: the fastest would pick the runs the load
    missed), else the fastest of three (alone: the least disturbed)."""
    prompt = list(range(100, 116))

    def run(n):
        s = m.session()
        t0 = time.perf_counter()
        s.generate(prompt, max_tokens=n, ignore_eos=True)
        return time.perf_counter() - t0

    run(64)
    n1, n2 = 64, 320
    if median:
        return sorted((n2 - n1) / (run(n2) - run(n1)) for _ in range(5))[2]
    return min((n2 - n1) / (run(n2) - run(n1)) for _ in range(3))


def child(model, context, loaded):
    import lattice
    m = lattice.load(model, backend="cuda", context=context)
    dec = decode_rate(m, median=loaded)
    pp = []
    for n in (64, 512):
        prompt = list(range(200, 200 + n))
        m.session().generate(prompt, max_tokens=1)  # warm-up (graph capture, first launches)
        t0 = time.perf_counter()
        m.session().generate(prompt, max_tokens=1)
        pp.append(n / (time.perf_counter() - t0))
    print(f"RESULT {dec:.2f} {pp[0]:.1f} {pp[1]:.1f}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("variants", nargs="+")
    ap.add_argument("-r", "--rounds", type=int, default=3)
    ap.add_argument("-c", "--context", type=int, default=1024)
    ap.add_argument("--load", type=int, default=0)
    ap.add_argument("--load-python", default=None)
    a = ap.parse_args()
    if a.load:
        from lattice.bench.load import LoadProcesses
        with LoadProcesses(a.load, "cuda", python=a.load_python):
            measure(a)
    else:
        measure(a)


def measure(a):
    res = {v: [] for v in a.variants}
    for _ in range(a.rounds):
        for v in a.variants:
            env = dict(os.environ)
            env.update(kv.split("=", 1) for kv in v.replace(",", " ").split())
            out = subprocess.run([sys.executable, __file__, "--child", a.model, str(a.context),
                                  str(int(a.load > 0))], env=env,
                                 capture_output=True, text=True, timeout=300)
            line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT")]
            if not line:
                print(f"variant {v!r} failed:\n{out.stderr[-2000:]}")
                res[v].append((float("nan"),) * 3)
                continue
            res[v].append(tuple(float(x) for x in line[0].split()[1:]))
    print(f"{os.path.basename(a.model)}{f' under --load {a.load}' if a.load else ''}: decode tok/s (median, spread) | prefill tok/s pp64, pp512")
    for v, r in res.items():
        d, p64, p512 = (sorted(x[i] for x in r) for i in range(3))
        med = d[len(d) // 2]
        print(f"  {v or '(as is)':40s} {med:9.1f} {100 * (d[-1] - d[0]) / med:5.1f}% | "
              f"{p64[len(p64) // 2]:9.1f} {p512[len(p512) // 2]:9.1f}")


if __name__ == "__main__":
    if sys.argv[1] == "--child":
        child(sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1")
    else:
        main()
