"""Decode throughput of the CUDA backend on shape-exact random checkpoints, graph replay vs eager
launches, alone and under GPU load, with the memory-bandwidth roofline.

    python -m lattice.cuda.bench --model qwen3.5-0.8b --model smollm2-135m --quant q8 \
        --runs 5 --n1 64 --n2 320 --load 10 --json out.json

Decode tok/s is the slope method of lattice.bench: (N2 - N1) / (T(N2) - T(N1)) over paired
generate() calls (greedy, no stop tokens), so prefill and per-call costs cancel. The roofline is
weight bytes read per decode step (every GEMV / LM-head matrix of the decode program, scales
included) over the device-to-device copy bandwidth measured here (bytes read + written).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np

from . import CudaRuntime, device_name
from ..bench.stats import degradation_pct, slope_rates, summarize
from ..program import build

GEMV_KERNELS = (3, 8)  # LT_K_GEMV, LT_K_LM_HEAD
F32, F16, Q8, Q4 = range(4)


def weight_bytes_per_step(prog) -> int:
    """Bytes of weight planes the decode program's GEMVs read once per step."""
    from ..program import ARGS_DTYPES
    total = 0
    gemv_dtype = ARGS_DTYPES["gemv"][1]
    for rec in prog.dispatches["decode"]:
        if rec["kernel"] not in GEMV_KERNELS:
            continue
        a = np.frombuffer(prog.consts[rec["args_offset"]:rec["args_offset"] + gemv_dtype.itemsize].tobytes(),
                          gemv_dtype)[0]
        rows, cols, fmt = int(a["rows"]), int(a["cols"]), int(a["wformat"])
        kp = -(-cols // 32) * 32
        total += {F32: rows * cols * 4, F16: rows * cols * 2, Q8: rows * kp + rows * kp // 16,
                  Q4: rows * kp // 2 + rows * kp // 8}[fmt]
    return total


def copy_bandwidth(nbytes=1 << 30, reps=20) -> float:
    """Device-to-device copy rate in bytes/s (read + write), through torch, median of reps."""
    import torch
    a = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").normal_()
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    del a, b
    torch.cuda.empty_cache()
    return 2 * nbytes / float(np.median(times))


def decode_rates(rt, prompt, n1, n2, runs):
    t1s, t2s = [], []
    rt.generate(prompt, n1)  # warm up (graph capture, clocks)
    for _ in range(runs):
        r1 = rt.generate(prompt, n1)
        r2 = rt.generate(prompt, n2)
        assert len(r1["tokens"]) == n1 and len(r2["tokens"]) == n2
        t1s.append(r1["decode_seconds"])
        t2s.append(r2["decode_seconds"])
    return slope_rates(n1, n2, t1s, t2s)


def profile(rt, reps=200):
    """Per kernel kind: dispatches per step and microseconds per step, each dispatch replayed
    alone reps times as a one-node graph (an upper bound: a graph launch costs ~2 us by itself)."""
    prog = rt.program
    decode = prog.dispatches["decode"]
    rt._set_sampling(None)  # greedy, no penalties: the sampler's benchmark path
    per_kind = {}
    for i, (kind, layer, _, _) in enumerate(prog.notes["decode"]):
        idx = rt.be.add_program(decode[i:i + 1], prog.consts, 1)
        for _ in range(2):
            rt.step["pos"], rt.step["step"], rt.step["error"] = 16, 0, 0
            rt.be.write(3, 0, rt.step)
            rt.be.run(idx, 5)
            rt.step["pos"] = 16
            rt.be.write(3, 0, rt.step)
            t0 = time.perf_counter()
            err = rt.be.run(idx, reps)
            dt = (time.perf_counter() - t0) / reps * 1e6
        assert err == 0, (i, kind, err)
        n, us = per_kind.get(kind, (0, 0.0))
        per_kind[kind] = (n + 1, us + dt)
    rt.step["pos"], rt.step["step"] = 16, 0
    rt.be.write(3, 0, rt.step)
    t0 = time.perf_counter()
    rt.be.run(rt.progs["decode"], reps)
    whole = (time.perf_counter() - t0) / reps * 1e6
    return {"per_kind_us": {k: {"dispatches": n, "us_per_step": us} for k, (n, us) in per_kind.items()},
            "whole_step_us": whole}


def bench_model(name, quant, args, bandwidth):
    from ..bench.make_model import model_spec, write_hf
    from ..formats import open_checkpoint
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        write_hf(model_spec(name), tmp, seed=0)
        prog = build(open_checkpoint(tmp), quant=quant, context=args.context, prefill_chunk=64)
        made = time.perf_counter() - t0
    rt = CudaRuntime(prog, steps_ahead=args.steps_ahead)
    prompt = [int(t) for t in np.random.default_rng(0).integers(0, prog.vocab, 16)]
    wbytes = weight_bytes_per_step(prog)
    res = {"model": name, "quant": quant, "context": args.context, "steps_ahead": args.steps_ahead,
           "dispatches_per_step": int(len(prog.dispatches["decode"])), "weight_bytes_per_step": wbytes,
           "roofline_tok_s": bandwidth / wbytes, "build_seconds": made, "modes": {}}
    if args.profile:
        res["profile"] = profile(rt)
        print(json.dumps(res["profile"], indent=1), flush=True)
    loads = [0] + ([args.load] if args.load else [])
    for load in loads:
        ctx = None
        if load:
            from ..bench.load import LoadProcesses
            ctx = LoadProcesses(load, device="cuda")
            ctx.__enter__()
        try:
            for mode in ("graph", "eager"):
                rt.be.set_eager(mode == "eager")
                rates = decode_rates(rt, prompt, args.n1, args.n2, args.runs)
                s = summarize(rates).to_dict()
                s["rates"] = rates
                res["modes"][f"{mode}@load{load}"] = s
        finally:
            if ctx is not None:
                ctx.__exit__(None, None, None)
                res[f"load{load}"] = ctx.summary()
    for mode in ("graph", "eager"):
        m = res["modes"][f"{mode}@load0"]
        m["roofline_pct"] = 100.0 * m["median"] / res["roofline_tok_s"]
        if args.load:
            res["modes"][f"{mode}@load{args.load}"]["loss_pct"] = degradation_pct(
                m["median"], res["modes"][f"{mode}@load{args.load}"]["median"])
    rt.close()
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", action="append", default=None)
    ap.add_argument("--quant", default="q8")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps-ahead", type=int, default=32)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--n1", type=int, default=64)
    ap.add_argument("--n2", type=int, default=320)
    ap.add_argument("--load", type=int, default=0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--profile", action="store_true", help="time every kernel kind of a decode step")
    args = ap.parse_args(argv)
    models = args.model or ["smollm2-135m", "qwen3.5-0.8b"]
    bw = copy_bandwidth()
    out = {"device": device_name(), "copy_bandwidth_gb_s": bw / 1e9, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "command": "python -m lattice.cuda.bench " + " ".join(argv if argv is not None else os.sys.argv[1:]),
           "results": []}
    print(f"# {out['device']}: copy bandwidth {bw / 1e9:.0f} GB/s", flush=True)
    for name in models:
        r = bench_model(name, args.quant, args, bw)
        out["results"].append(r)
        for k, m in r["modes"].items():
            extra = f" roofline {m['roofline_pct']:.1f}%" if "roofline_pct" in m else ""
            extra += f" loss {m['loss_pct']:.1f}%" if "loss_pct" in m else ""
            print(f"{name} {args.quant} {k}: {m['median']:.1f} tok/s (spread {m['spread_pct']:.1f}%){extra}",
                  flush=True)
        print(f"{name}: {r['dispatches_per_step']} dispatches/step, {r['weight_bytes_per_step'] / 1e6:.1f} MB "
              f"weights/step, roofline {r['roofline_tok_s']:.0f} tok/s", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
