"""The memory-bandwidth roofline of Lattice-CUDA decode on shape-exact random checkpoints: weight
bytes one decode step reads (every GEMV and LM-head matrix of the program, scales included) over
the device-to-device copy bandwidth measured here (bytes read + written, through torch).

    python -m lattice.cuda.bench --model qwen3.5-0.8b --model smollm2-135m --quant q8 --json out.json

Decode throughput itself is measured by lattice-bench (tests/gpu/peers_bench.sh runs it next to
llama.cpp and transformers); the time of each kernel of a step by tests/gpu/profile_step.sh.
"""
from __future__ import annotations

import argparse
import json
import tempfile

import numpy as np

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
    return 2 * nbytes / float(np.median(times))


def main(argv=None):
    from ..bench.make_model import model_spec, write_hf
    from ..formats import open_checkpoint
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", action="append", default=None)
    ap.add_argument("--quant", default="q8")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    bw = copy_bandwidth()
    out = {"copy_bandwidth_gb_s": bw / 1e9, "quant": args.quant, "models": {}}
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s (read + write)")
    for name in args.model or ["smollm2-135m", "qwen3.5-0.8b"]:
        with tempfile.TemporaryDirectory() as tmp:
            write_hf(model_spec(name), tmp, seed=0)
            prog = build(open_checkpoint(tmp), quant=args.quant, context=64, prefill_chunk=16)
        wb = weight_bytes_per_step(prog)
        out["models"][name] = {"weight_bytes_per_step": wb, "roofline_tok_s": bw / wb,
                               "dispatches_per_step": len(prog.dispatches["decode"])}
        print(f"{name} {args.quant}: {wb / 1e6:.1f} MB of weights per step, roofline {bw / wb:.0f} tok/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
