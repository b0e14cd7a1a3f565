"""Does a paused load slow an engine down? Measures whether ten load processes holding a CUDA
context but doing nothing leave an engine as fast as no load process at all. (Under MPS they slowed
llama.cpp by 6-13%, which is why lattice-bench stops its load instead of pausing it.)

Phases, each RUNS runs of every engine (interleaved): alone (no load process yet), paused, running,
paused again, alone again (processes stopped). Prints each phase's median decode tok/s per engine
and writes them as JSON. On a GPU machine, with MPS on or off:

    python3 tests/gpu/paused_load.py MODEL.gguf OUT.json [RUNS]
"""
import json
import statistics
import sys

from lattice.bench.load import LoadProcesses
from lattice.bench.runner import EngineWorker, Settings
from lattice.bench.stats import slope_rates


def main(gguf: str, out: str, runs: int = 6):
    s = Settings(n1=64, n2=320, warmup=1, runs=runs, pp=64, prompt_tokens=16, threads=16)
    hosts = [EngineWorker(spec, {"gguf": gguf}, s) for spec in ("llama.cpp:gpu", "lattice:cuda")]
    result = {}
    try:
        for h in hosts:
            rec = h.open()
            if rec["status"] != "ok":
                raise SystemExit(f"{h.spec}: {rec.get('reason')}")
            h.run(0)                                   # warm-up

        def phase(name):
            times = {h.spec: [] for h in hosts}
            for r in range(runs):
                for h in hosts if r % 2 == 0 else hosts[::-1]:
                    times[h.spec].append(h.run(r))
            result[name] = {k: statistics.median(slope_rates(s.n1, s.n2, [t["n1"] for t in v], [t["n2"] for t in v]))
                            for k, v in times.items()}
            print(name.ljust(8), "  ".join(f"{k} {v:8.1f}" for k, v in result[name].items()), flush=True)

        phase("alone")
        with LoadProcesses(10, "cuda") as lp:
            lp.pause()
            phase("paused")
            lp.resume()
            phase("running")
            lp.pause()
            phase("paused2")
        phase("alone2")
    finally:
        for h in hosts:
            h.close()
    with open(out, "w") as f:
        json.dump({"runs": runs, "model": gguf, "tok_s": result}, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *(int(a) for a in sys.argv[3:4]))
