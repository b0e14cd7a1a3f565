"""The CPU backend's C kernels, one dispatch at a time, against lattice/reference.py.

The kernels are compiled here into a small test-only shared library (cached by source hash) and
called through `lt_cpu_run_one` with ctypes, so these tests need only a C compiler.

Tolerances: dot products are compared with the reference on the *dequantized* weights, so the only
differences are f32 rounding order, |got - ref| <= 3e-5 * sum_k |w_k x_k| (+1e-6), and, for Q8/Q4 on
paths that quantize x to int16 per block, half a quantization step per element (dot_error_limit). Norms, softmax,
RoPE and the GDN recurrence: rtol 1e-4 / atol 1e-5 of the output scale. f16 KV cache entries: equal
to numpy's float16 rounding (bit-exact for V, within one f16 ulp for the rotated K).
"""
import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

from lattice import quant, reference as ref
from lattice.sampling import SamplingParams, apply_penalties

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "lattice" / "csrc"
HEADER = ROOT / "metal" / "lattice_shared.h"

u32, f32 = ctypes.c_uint32, ctypes.c_float
NONE = 0xFFFFFFFF
WEIGHTS, STATE, SCRATCH, STEP, OUTPUT, CONST = range(6)
F32, F16, Q8, Q4 = range(4)
K_EMBED, K_RMSNORM, K_GEMV, K_ROPE_KV, K_ATTENTION, K_GDN, K_ELEMENTWISE, K_LM_HEAD, K_SAMPLE = range(1, 10)
OK, ERR_NONFINITE, ERR_TOKEN, ERR_CONTEXT, ERR_KERNEL, ERR_BINDING, ERR_ARGS = range(7)
MAX_BIND = 12
ARGMAX_BLOCK = 256


def _struct(name, fields):
    return type(name, (ctypes.Structure,), {"_fields_": [(f, f32 if f in _FLOATS else u32) if isinstance(f, str)
                                                         else f for f in fields]})


_FLOATS = {"scale", "eps", "norm_eps", "temperature", "top_p", "min_p", "repetition_penalty",
           "presence_penalty", "frequency_penalty", "next_logprob", "max", "sumexp"}


class Binding(ctypes.Structure):
    _fields_ = [("arena", u32), ("offset", u32)]


class Dispatch(ctypes.Structure):
    _fields_ = [("kernel", u32), ("flags", u32), ("args_offset", u32), ("n_bind", u32),
                ("grid", u32 * 3), ("group", u32 * 3), ("bind", Binding * MAX_BIND)]


EmbedArgs = _struct("EmbedArgs", ["wformat", "dim", "vocab", "out_stride", "scale", ("pad", u32 * 3)])
NormArgs = _struct("NormArgs", ["n_heads", "head_dim", "in_stride", "out_stride", "z_stride", "flags",
                                "eps", "pad"])
GemvArgs = _struct("GemvArgs", ["wformat", "rows", "cols", "flags", "x_stride", "y_stride",
                                "resid_stride", "eps"])
RopeArgs = _struct("RopeArgs", ["n_heads", "n_kv_heads", "head_dim", "rotary_dim", "q_stride", "k_stride",
                                "v_stride", "q_out_stride", "gate_stride", "ctx_cap", "flags", "eps"])
AttnArgs = _struct("AttnArgs", ["n_heads", "n_kv_heads", "head_dim", "ctx_cap", "q_stride", "out_stride",
                                "gate_stride", "flags", "scale", ("pad", u32 * 3)])
GdnArgs = _struct("GdnArgs", ["n_k_heads", "n_v_heads", "k_dim", "v_dim", "conv_kernel", "channels",
                              "q_offset", "k_offset", "v_offset", "x_stride", "z_stride", "a_stride",
                              "b_stride", "out_stride", "norm_eps", "pad"])
EwArgs = _struct("EwArgs", ["op", "n", "a_stride", "b_stride", "out_stride", ("pad", u32 * 3)])
SampleArgs = _struct("SampleArgs", ["vocab", "logits_stride", "flags", "hist_cap", "logits_cap",
                                    ("pad", u32 * 3)])
StepArgs = _struct("StepArgs", ["pos", "token", "n_tokens", "step", "ring_cap", "flags", "seed_lo", "seed_hi",
                                "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                                "presence_penalty", "frequency_penalty", "penalty_last_n", "n_seen", "error",
                                "next_token", "next_logprob", ("pad", u32 * 4)])
Partial = _struct("Partial", ["max", "argmax", "sumexp", "n_nonfinite"])

# (C type name, ctypes mirror) checked against the compiler's sizeof
STRUCTS = [("lt_dispatch", Dispatch), ("lt_embed_args", EmbedArgs), ("lt_rmsnorm_args", NormArgs),
           ("lt_gemv_args", GemvArgs), ("lt_rope_kv_args", RopeArgs), ("lt_attention_args", AttnArgs),
           ("lt_gdn_args", GdnArgs), ("lt_elementwise_args", EwArgs), ("lt_sample_args", SampleArgs),
           ("lt_step_args", StepArgs), ("lt_argmax_partial", Partial)]

SIZES_C = "#include \"lattice_cpu.h\"\nunsigned long lt_test_sizeof(int i) {\n    switch (i) {\n" + "".join(
    f"    case {i}: return sizeof({name});\n" for i, (name, _) in enumerate(STRUCTS)) + "    }\n    return 0;\n}\n"


@pytest.fixture(scope="session")
def lib():
    """The kernels as a shared library, built once per source version."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    assert cc, "a C compiler (cc/gcc) is needed to build the CPU kernels"
    sources = sorted(CSRC.glob("*.c"))
    flags = ["-O2", "-std=gnu11", "-fPIC", "-shared", "-fopenmp"]
    h = hashlib.sha256(" ".join([cc] + flags).encode() + SIZES_C.encode())
    for p in sources + sorted(CSRC.glob("*.h")) + [HEADER]:
        h.update(p.read_bytes())
    out = Path(tempfile.gettempdir()) / "lattice-test-kernels" / h.hexdigest()[:16] / "liblattice_cpu.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        sizes_c = out.parent / "test_sizes.c"
        sizes_c.write_text(SIZES_C)
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        cmd = [cc, *flags, f"-I{CSRC}", *map(str, sources), str(sizes_c), "-o", str(tmp), "-lm"]
        if subprocess.run(cmd, capture_output=True).returncode != 0:   # a compiler without OpenMP
            subprocess.run([a for a in cmd if a != "-fopenmp"], check=True)
        os.replace(tmp, out)
    so = ctypes.CDLL(str(out))
    so.lt_cpu_run_one.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_void_p,
                                  ctypes.c_void_p, ctypes.c_int]
    so.lt_cpu_create.restype = ctypes.c_void_p
    so.lt_cpu_create.argtypes = [ctypes.c_void_p, u32, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_void_p,
                                 ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_int),
                                 ctypes.POINTER(u32)]
    so.lt_cpu_run.argtypes = [ctypes.c_void_p, u32]
    so.lt_cpu_free.argtypes = [ctypes.c_void_p]
    so.lt_cpu_simd.restype = ctypes.c_char_p
    so.lt_cpu_set_simd.argtypes = [ctypes.c_char_p]
    so.lt_cpu_error_string.restype = ctypes.c_char_p
    so.lt_test_sizeof.restype = ctypes.c_ulong
    so.default_simd = so.lt_cpu_simd()
    return so


SIMD_NAMES = ["scalar", "avx2", "avx512", "neon"]


def _available_simd():
    # decided without the library (collection time): the same cpuid facts the C code checks
    found = ["scalar"]
    flags = ""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        pass
    import platform
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        words = set(flags.split())
        if {"avx2", "fma", "f16c"} <= words:
            found.append("avx2")
        if {"avx512f", "avx512bw"} <= words:
            found.append("avx512")
    elif machine in ("arm64", "aarch64"):
        found.append("neon")
    return found


SIMD = _available_simd()


@pytest.fixture(params=SIMD)
def simd(request, lib):
    assert lib.lt_cpu_set_simd(request.param.encode()) == 0
    yield request.param
    lib.lt_cpu_set_simd(lib.default_simd)


# ---------------------------------------------------------------------------------------------- memory

class Ref:
    def __init__(self, arena, offset, dtype, shape):
        self.arena, self.offset, self.dtype, self.shape = arena, offset, np.dtype(dtype), tuple(shape)


class Mem:
    """Arenas for one test: place arrays, run dispatches, read results back."""

    def __init__(self, step=None):
        self.items = {a: [] for a in range(6)}
        self.ends = [0] * 6
        self.bufs = None
        self.step_ref = self.put(STEP, np.frombuffer(bytes(step or StepArgs(n_tokens=1)), np.uint8))

    def put(self, arena, arr):
        arr = np.ascontiguousarray(arr)
        off = -(-self.ends[arena] // 64) * 64
        self.items[arena].append((off, arr))
        self.ends[arena] = off + arr.nbytes
        return Ref(arena, off, arr.dtype, arr.shape)

    def zeros(self, arena, shape, dtype=np.float32):
        return self.put(arena, np.zeros(shape, dtype))

    def build(self):
        self.bufs = []
        for a in range(6):
            size = max(self.ends[a], 64)
            raw = np.zeros(size + 64, np.uint8)
            start = -raw.ctypes.data % 64
            buf = raw[start:start + size]
            for off, arr in self.items[a]:
                buf[off:off + arr.nbytes] = arr.view(np.uint8).reshape(-1)
            self.bufs.append(buf)
        self.ptrs = (ctypes.c_void_p * 6)(*[b.ctypes.data for b in self.bufs])
        self.sizes = (ctypes.c_size_t * 6)(*[b.nbytes for b in self.bufs])

    def view(self, r):
        n = int(np.prod(r.shape, dtype=np.int64)) * r.dtype.itemsize
        return self.bufs[r.arena][r.offset:r.offset + n].view(r.dtype).reshape(r.shape)

    @property
    def step(self):
        return StepArgs.from_buffer(self.view(self.step_ref))


def dispatch(kernel, binds, flags=0, args_offset=0):
    d = Dispatch(kernel=kernel, flags=flags, args_offset=args_offset, n_bind=len(binds))
    for i, r in enumerate(binds):
        d.bind[i] = Binding(r.arena, r.offset) if r is not None else Binding(NONE, 0)
    return d


def run_one(lib, mem, kernel, args, binds, threads=2):
    if mem.bufs is None:
        mem.build()
    d = dispatch(kernel, binds)
    consts = bytes(args)
    return lib.lt_cpu_run_one(ctypes.byref(d), consts, len(consts), mem.ptrs, mem.sizes, threads)


def put_matrix(mem, w, fmt):
    """Weight planes of w [N, K] in format fmt; returns (wq, ws, wm refs, dequantized f32 matrix)."""
    if fmt == F32:
        return mem.put(WEIGHTS, w.astype(np.float32)), None, None, w.astype(np.float32)
    if fmt == F16:
        h = w.astype(np.float16)
        return mem.put(WEIGHTS, h), None, None, h.astype(np.float32)
    qm = quant.quantize(w, "q8" if fmt == Q8 else "q4")
    wm = mem.put(WEIGHTS, qm.mins) if qm.mins is not None else None
    return mem.put(WEIGHTS, qm.qs), mem.put(WEIGHTS, qm.scales), wm, qm.dequantize()


def rand(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


# SIMD paths that quantize x for Q8/Q4 to int16 per block of 32: half a quantization step, as a
# fraction of the block's largest |x|.
# (The CUDA backend's one-token GEMVs do the same: "cuda".)
X_HALF_STEP = {"avx2": 1 / 65534.0, "avx512": 1 / 65534.0, "cuda": 1 / 65534.0}


def dot_error_limit(x, w, fmt, simd):
    """Allowed |error| of x [T, K] @ w [N, K].T: f32 rounding, 3e-5 * sum |w x|; for Q8/Q4 on SIMD
    paths that quantize x per block of 32, plus sum_b max|x_b| * X_HALF_STEP * sum |w_b|."""
    lim = 3e-5 * (np.abs(x) @ np.abs(w).T)
    if fmt in (Q8, Q4) and simd in X_HALF_STEP:
        k = x.shape[1]
        kp = -(-k // 32) * 32
        xp = np.abs(np.pad(x, ((0, 0), (0, kp - k))))
        block_max = np.repeat(xp.reshape(len(x), -1, 32).max(axis=2), 32, axis=1)[:, :k]
        lim = lim + (block_max * X_HALF_STEP[simd]) @ np.abs(w).T
    return lim


def assert_dot_close(got, want, lim):
    err = np.abs(got - want)
    lim = lim + 1e-6
    assert np.all(err <= lim), f"max excess {np.max(err - lim)} (max err {err.max()})"


# ---------------------------------------------------------------------------------------------- basics

def test_struct_layouts_match_the_header(lib):
    for i, (name, mirror) in enumerate(STRUCTS):
        assert lib.lt_test_sizeof(i) == ctypes.sizeof(mirror), name
        assert ctypes.sizeof(mirror) % 16 == 0 or name == "lt_dispatch" or name == "lt_argmax_partial", name


def test_simd_selection(lib):
    assert lib.lt_cpu_simd().decode() in SIMD_NAMES
    assert lib.lt_cpu_set_simd(b"no-such-path") == -1
    for name in SIMD:
        assert lib.lt_cpu_set_simd(name.encode()) == 0
        assert lib.lt_cpu_simd().decode() == name
    for name in set(SIMD_NAMES) - set(SIMD):
        assert lib.lt_cpu_set_simd(name.encode()) == -1
    lib.lt_cpu_set_simd(lib.default_simd)


@pytest.mark.parametrize("fmt", [F32, F16, Q8, Q4])
@pytest.mark.parametrize("dim", [96, 100])
def test_embed(lib, fmt, dim):
    rng = np.random.default_rng(fmt * 7 + dim)
    vocab, ids = 50, np.array([0, 49, 3, 3, 17, 8, 1], np.uint32)
    mem = Mem(StepArgs(n_tokens=len(ids)))
    wq, ws, wm, deq = put_matrix(mem, rand(rng, vocab, dim), fmt)
    r_ids = mem.put(STEP, ids)
    out = mem.zeros(SCRATCH, (len(ids), dim + 5))
    args = EmbedArgs(wformat=fmt, dim=dim, vocab=vocab, out_stride=dim + 5, scale=1.5)
    assert run_one(lib, mem, K_EMBED, args, [r_ids, out, wq, ws, wm]) == OK
    np.testing.assert_allclose(mem.view(out)[:, :dim], ref.embed(deq, ids) * 1.5, rtol=1e-6, atol=1e-7)
    assert np.all(mem.view(out)[:, dim:] == 0)


def test_embed_token_out_of_range(lib):
    mem = Mem(StepArgs(n_tokens=2))
    table = mem.put(WEIGHTS, np.ones((10, 32), np.float32))
    ids = mem.put(STEP, np.array([3, 10], np.uint32))
    out = mem.zeros(SCRATCH, (2, 32))
    args = EmbedArgs(wformat=F32, dim=32, vocab=10, out_stride=32, scale=1.0)
    assert run_one(lib, mem, K_EMBED, args, [ids, out, table]) == ERR_TOKEN
    assert mem.step.error == ERR_TOKEN


@pytest.mark.parametrize("T", [1, 7])
@pytest.mark.parametrize("mode", ["row", "row_add_one", "heads", "gated"])
def test_rmsnorm(lib, T, mode):
    rng = np.random.default_rng(T)
    n_heads, d = (1, 200) if mode.startswith("row") else (3, 80)
    x = rand(rng, T, n_heads * d + 4, scale=3)
    w, z = rand(rng, d), rand(rng, T, n_heads * d)
    mem = Mem(StepArgs(n_tokens=T))
    rx, rw, rz, out = mem.put(SCRATCH, x), mem.put(WEIGHTS, w), mem.put(SCRATCH, z), mem.zeros(SCRATCH, (T, n_heads * d))
    flags = {"row": 0, "row_add_one": 1, "heads": 0, "gated": 2}[mode]
    args = NormArgs(n_heads=n_heads, head_dim=d, in_stride=x.shape[1], out_stride=n_heads * d,
                    z_stride=n_heads * d, flags=flags, eps=1e-5)
    assert run_one(lib, mem, K_RMSNORM, args, [rx, out, rw, rz]) == OK
    xs = x[:, :n_heads * d]
    if mode == "gated":
        want = ref.gated_rms_norm(xs, z, w, n_heads, 1e-5)
    else:
        want = ref.head_rms_norm(xs, w, n_heads, 1e-5, mode == "row_add_one")
    np.testing.assert_allclose(mem.view(out), want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("op", range(4))
def test_elementwise(lib, op):
    rng = np.random.default_rng(op)
    T, n = 3, 300
    a, b = rand(rng, T, n, scale=4), rand(rng, T, n + 3, scale=4)
    mem = Mem(StepArgs(n_tokens=T))
    ra, rb, out = mem.put(SCRATCH, a), mem.put(SCRATCH, b), mem.zeros(SCRATCH, (T, n))
    args = EwArgs(op=op, n=n, a_stride=n, b_stride=n + 3, out_stride=n)
    assert run_one(lib, mem, K_ELEMENTWISE, args, [ra, rb, out]) == OK
    bb = b[:, :n]
    want = [ref.add(a, bb), ref.silu_mul(a, bb), ref.sigmoid_mul(a, bb), a][op]
    np.testing.assert_allclose(mem.view(out), want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- GEMV

def _gemv_case(lib, rng, fmt, rows, cols, T, threads, flags=0, lm_head=False, x_pad=3):
    x = rand(rng, T, cols + x_pad)
    w = rand(rng, rows, cols, scale=0.1)
    mem = Mem(StepArgs(n_tokens=T))
    wq, ws, wm, deq = put_matrix(mem, w, fmt)
    norm_w, bias = rand(rng, cols), rand(rng, rows)
    n_out = rows // 2 if flags & 8 else rows
    resid = rand(rng, T, n_out)
    rx, rn, rb = mem.put(SCRATCH, x), mem.put(WEIGHTS, norm_w), mem.put(WEIGHTS, bias)
    y = mem.put(SCRATCH, resid.copy()) if flags & 16 else mem.zeros(SCRATCH, (T, n_out))
    n_blocks = -(-rows // ARGMAX_BLOCK)
    parts = mem.zeros(SCRATCH, (n_blocks, 4))
    args = GemvArgs(wformat=fmt, rows=rows, cols=cols, flags=flags, x_stride=cols + x_pad, y_stride=n_out,
                    resid_stride=n_out, eps=1e-6)
    # RESID aliases Y: out = resid + W x in place
    binds = [rx, y, wq, ws, wm, rn, rb, y, parts]
    err = run_one(lib, mem, K_LM_HEAD if lm_head else K_GEMV, args, binds, threads)
    assert err == OK
    xin = x[:, :cols]
    if flags & 1:
        xin = ref.rms_norm(xin, norm_w, 1e-6, bool(flags & 2))
    want = xin.astype(np.float64) @ deq.T.astype(np.float64)
    bound = dot_error_limit(xin, deq, fmt, lib.lt_cpu_simd().decode())
    if flags & 4:
        want = want + bias
    if flags & 8:  # error of silu(g) * u from errors in g and u (|silu'| <= 1.1)
        g, u = want[:, 0::2].astype(np.float32), want[:, 1::2].astype(np.float32)
        want = ref.silu_mul(g, u)
        bound = 1.1 * np.abs(u) * bound[:, 0::2] + np.abs(ref.silu_mul(g, np.ones_like(g))) * bound[:, 1::2]
    if flags & 16:
        want = want + resid
    return mem, y, parts, want, bound


@pytest.mark.parametrize("fmt", [F32, F16, Q8, Q4])
@pytest.mark.parametrize("rows,cols", [(19, 64), (40, 80), (48, 576)])
@pytest.mark.parametrize("T", [1, 7])
@pytest.mark.parametrize("threads", [1, 2])
def test_gemv(lib, simd, fmt, rows, cols, T, threads):
    rng = np.random.default_rng(rows * cols + T)
    mem, y, _, want, bound = _gemv_case(lib, rng, fmt, rows, cols, T, threads)
    assert_dot_close(mem.view(y), want, bound)


@pytest.mark.parametrize("fmt", [F16, Q8, Q4])
@pytest.mark.parametrize("flags", [1, 1 | 2, 4, 8, 16, 1 | 4 | 8 | 16])
@pytest.mark.parametrize("T", [1, 7])
def test_gemv_fused(lib, simd, fmt, flags, T):
    rng = np.random.default_rng(flags * 10 + T)
    mem, y, _, want, bound = _gemv_case(lib, rng, fmt, 36, 96, T, 2, flags)
    assert_dot_close(mem.view(y), want, bound)


@pytest.mark.parametrize("fmt", [Q8, Q4])
@pytest.mark.parametrize("T", [16, 37])
def test_gemm_token_tiles(lib, simd, fmt, T):
    """Prefill GEMMs over several token tiles, with rows and columns that are not multiples of the
    micro-tiles (rows x tokens) or of 8 blocks."""
    rng = np.random.default_rng(T + fmt)
    mem, y, _, want, bound = _gemv_case(lib, rng, fmt, 45, 300, T, 2, flags=1 | 4 | 16)
    assert_dot_close(mem.view(y), want, bound)


@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("rows", [1000, 17002])  # 17,002: CUDA streams rows through resident blocks
def test_lm_head_last_token_and_partials(lib, simd, T, threads, rows):
    rng = np.random.default_rng(T + threads)
    cols = 64
    x = rand(rng, T, cols)
    w = rand(rng, rows, cols, scale=0.3)
    mem = Mem(StepArgs(n_tokens=T))
    wq, ws, _, deq = put_matrix(mem, w, Q8)
    norm_w = rand(rng, cols)
    rx, rn = mem.put(SCRATCH, x), mem.put(WEIGHTS, norm_w)
    y = mem.zeros(SCRATCH, (1, rows))
    parts = mem.put(SCRATCH, np.zeros(4 * -(-rows // ARGMAX_BLOCK), np.float32))
    args = GemvArgs(wformat=Q8, rows=rows, cols=cols, flags=1, x_stride=cols, y_stride=rows, eps=1e-5)
    assert run_one(lib, mem, K_LM_HEAD, args, [rx, y, wq, ws, None, rn, None, None, parts], threads) == OK
    xin = ref.rms_norm(x[-1:], norm_w, 1e-5, False)
    want = ref.lm_head(xin, deq)[0]
    got = mem.view(y)[0]
    assert_dot_close(got, want, dot_error_limit(xin, deq, Q8, simd)[0])
    p = mem.view(parts).reshape(-1, 4)
    for b in range(p.shape[0]):
        blk = got[b * ARGMAX_BLOCK:(b + 1) * ARGMAX_BLOCK]
        mx, arg, se, bad = p[b, 0], p[b, 1:2].view(np.uint32)[0], p[b, 2], p[b, 3:4].view(np.uint32)[0]
        assert mx == blk.max() and arg == b * ARGMAX_BLOCK + int(np.argmax(blk)) and bad == 0
        np.testing.assert_allclose(se, np.exp(blk - blk.max()).sum(), rtol=1e-5)


@pytest.mark.parametrize("flags", [32, 32 | 1])
def test_lm_head_all_tokens(lib, simd, flags):
    rng = np.random.default_rng(5)
    mem, y, _, want, bound = _gemv_case(lib, rng, Q4, 300, 64, 5, 2, flags=flags, lm_head=True)
    assert_dot_close(mem.view(y), want, bound)


# ---------------------------------------------------------------------------------------------- attention

def _inv_freq(rotary_dim, theta=10000.0):
    return (1.0 / theta ** (np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim)).astype(np.float32)


@pytest.mark.parametrize("head_dim,partial", [(64, False), (80, True), (128, False)])
@pytest.mark.parametrize("mode", ["plain", "qk_norm", "split_gate"])
@pytest.mark.parametrize("T", [1, 7])
def test_rope_kv(lib, head_dim, partial, mode, T):
    rng = np.random.default_rng(head_dim + T)
    H, Hkv, pos, cap = 4, 2, 5, 16
    rot = head_dim // 2 if partial else head_dim
    qw = head_dim * (2 if mode == "split_gate" else 1)
    q, k, v = rand(rng, T, H * qw), rand(rng, T, Hkv * head_dim), rand(rng, T, Hkv * head_dim, scale=20)
    v[0, :8] = [1e-8, 6e-5, 65519, 65520, -0.0, 3e-7, 1e5, -1e5]  # f16 rounding edge cases
    qn, kn = rand(rng, head_dim), rand(rng, head_dim)
    inv = _inv_freq(rot)
    mem = Mem(StepArgs(n_tokens=T, pos=pos))
    rq, rk, rv = mem.put(SCRATCH, q), mem.put(SCRATCH, k), mem.put(SCRATCH, v)
    q_out, gate_out = mem.zeros(SCRATCH, (T, H * head_dim)), mem.zeros(SCRATCH, (T, H * head_dim))
    sentinel = np.full((Hkv, cap, head_dim), 7, np.float16)
    kc, vc = mem.put(STATE, sentinel), mem.put(STATE, sentinel)
    ri, rqn, rkn = mem.put(WEIGHTS, inv), mem.put(WEIGHTS, qn), mem.put(WEIGHTS, kn)
    flags = {"plain": 0, "qk_norm": 1 | 2, "split_gate": 4}[mode]
    args = RopeArgs(n_heads=H, n_kv_heads=Hkv, head_dim=head_dim, rotary_dim=rot, q_stride=H * qw,
                    k_stride=Hkv * head_dim, v_stride=Hkv * head_dim, q_out_stride=H * head_dim,
                    gate_stride=H * head_dim, ctx_cap=cap, flags=flags, eps=1e-6)
    binds = [rq, rk, rv, q_out, kc, vc, ri, rqn, rkn, gate_out]
    assert run_one(lib, mem, K_ROPE_KV, args, binds) == OK

    positions = np.arange(pos, pos + T)
    qq, gate = (ref.split_heads(q, H, [head_dim, head_dim]) if mode == "split_gate" else (q, None))
    kk = k
    if mode == "qk_norm":
        qq = ref.head_rms_norm(qq, qn, H, 1e-6, True)
        kk = ref.head_rms_norm(kk, kn, Hkv, 1e-6, True)
    want_q = ref.rope(qq, positions, H, head_dim, rot, inv)
    want_k = ref.rope(kk, positions, Hkv, head_dim, rot, inv)
    np.testing.assert_allclose(mem.view(q_out), want_q, rtol=1e-4, atol=1e-5 * np.abs(want_q).max())
    if gate is not None:
        np.testing.assert_array_equal(mem.view(gate_out), gate)
    got_k, got_v = mem.view(kc), mem.view(vc)
    for t in range(T):
        kt = want_k[t].reshape(Hkv, head_dim)
        ulp = np.abs(np.spacing(kt.astype(np.float16)).astype(np.float32))
        assert np.all(np.abs(got_k[:, pos + t].astype(np.float32) - kt) <= ulp + 1e-7)
        with np.errstate(over="ignore"):  # 65520 and 1e5 round to inf on purpose
            want_v = v[t].reshape(Hkv, head_dim).astype(np.float16)
        np.testing.assert_array_equal(got_v[:, pos + t].view(np.uint16), want_v.view(np.uint16))
    untouched = np.ones(cap, bool)
    untouched[pos:pos + T] = False
    assert np.all(got_k[:, untouched] == 7) and np.all(got_v[:, untouched] == 7)


@pytest.mark.parametrize("head_dim", [64, 80, 128])
@pytest.mark.parametrize("H,Hkv", [(4, 2), (3, 3), (9, 3), (16, 1)])
@pytest.mark.parametrize("T,pos", [(1, 0), (1, 9), (7, 4), (37, 21)])  # prefill blocks with remainders
@pytest.mark.parametrize("threads", [1, 2])
def test_attention(lib, simd, head_dim, H, Hkv, T, pos, threads):
    rng = np.random.default_rng(head_dim * 100 + H * 10 + T + pos)
    cap = max(24, pos + T + 5)
    S = pos + T
    q = rand(rng, T, H * head_dim)
    kc = (rng.standard_normal((Hkv, cap, head_dim)) * 0.5).astype(np.float16)
    vc = rng.standard_normal((Hkv, cap, head_dim)).astype(np.float16)
    gate = rand(rng, T, H * head_dim)
    for use_gate in (False, True):
        mem = Mem(StepArgs(n_tokens=T, pos=pos))
        rq, rk, rv, rg = mem.put(SCRATCH, q), mem.put(STATE, kc), mem.put(STATE, vc), mem.put(SCRATCH, gate)
        out = mem.zeros(SCRATCH, (T, H * head_dim))
        args = AttnArgs(n_heads=H, n_kv_heads=Hkv, head_dim=head_dim, ctx_cap=cap, q_stride=H * head_dim,
                        out_stride=H * head_dim, gate_stride=H * head_dim, flags=int(use_gate),
                        scale=head_dim ** -0.5)
        assert run_one(lib, mem, K_ATTENTION, args, [rq, out, rk, rv, rg], threads) == OK
        k2 = kc[:, :S].astype(np.float32).transpose(1, 0, 2).reshape(S, Hkv * head_dim)
        v2 = vc[:, :S].astype(np.float32).transpose(1, 0, 2).reshape(S, Hkv * head_dim)
        want = ref.attention(q, k2, v2, pos, H, Hkv, head_dim, head_dim ** -0.5)
        if use_gate:
            want = ref.sigmoid_mul(want, gate)
        np.testing.assert_allclose(mem.view(out), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("H,Hkv", [(4, 2), (4, 1), (6, 3)])
@pytest.mark.parametrize("threads", [2, 3])
def test_attention_decode_split_over_positions(lib, simd, H, Hkv, threads):
    """One token with a long context: positions are split into chunks across threads and merged."""
    rng = np.random.default_rng(H * 10 + Hkv + threads)
    head_dim, cap, pos = 80, 400, 333
    q = rand(rng, 1, H * head_dim)
    kc = (rng.standard_normal((Hkv, cap, head_dim)) * 0.5).astype(np.float16)
    vc = rng.standard_normal((Hkv, cap, head_dim)).astype(np.float16)
    gate = rand(rng, 1, H * head_dim)
    mem = Mem(StepArgs(n_tokens=1, pos=pos))
    rq, rk, rv, rg = mem.put(SCRATCH, q), mem.put(STATE, kc), mem.put(STATE, vc), mem.put(SCRATCH, gate)
    out = mem.zeros(SCRATCH, (1, H * head_dim))
    args = AttnArgs(n_heads=H, n_kv_heads=Hkv, head_dim=head_dim, ctx_cap=cap, q_stride=H * head_dim,
                    out_stride=H * head_dim, gate_stride=H * head_dim, flags=1, scale=head_dim ** -0.5)
    assert run_one(lib, mem, K_ATTENTION, args, [rq, out, rk, rv, rg], threads) == OK
    S = pos + 1
    k2 = kc[:, :S].astype(np.float32).transpose(1, 0, 2).reshape(S, Hkv * head_dim)
    v2 = vc[:, :S].astype(np.float32).transpose(1, 0, 2).reshape(S, Hkv * head_dim)
    want = ref.sigmoid_mul(ref.attention(q, k2, v2, pos, H, Hkv, head_dim, head_dim ** -0.5), gate)
    np.testing.assert_allclose(mem.view(out), want, rtol=1e-4, atol=1e-5)


def test_attention_context_full(lib):
    mem = Mem(StepArgs(n_tokens=2, pos=7))
    q, out = mem.zeros(SCRATCH, (2, 64)), mem.zeros(SCRATCH, (2, 64))
    kc = mem.zeros(STATE, (1, 8, 64), np.float16)
    args = AttnArgs(n_heads=1, n_kv_heads=1, head_dim=64, ctx_cap=8, q_stride=64, out_stride=64, scale=0.125)
    assert run_one(lib, mem, K_ATTENTION, args, [q, out, kc, kc]) == ERR_CONTEXT


# ---------------------------------------------------------------------------------------------- GDN

@pytest.mark.parametrize("T", [1, 7])
@pytest.mark.parametrize("threads", [1, 2])
def test_gdn(lib, T, threads):
    rng = np.random.default_rng(T * 3 + threads)
    Hk, Hv, Dk, Dv, K = 2, 4, 32, 24, 4
    C = 2 * Hk * Dk + Hv * Dv
    x = rand(rng, T, C + 2)
    z, a, b = rand(rng, T, Hv * Dv), rand(rng, T, Hv), rand(rng, T, Hv)
    conv_w, conv_state = rand(rng, C, K, scale=0.5), rand(rng, K - 1, C)
    a_log, dt_bias, norm_w = rand(rng, Hv, scale=0.5), rand(rng, Hv), rand(rng, Dv)
    S = rand(rng, Hv, Dk, Dv, scale=0.1)
    mem = Mem(StepArgs(n_tokens=T))
    refs = [mem.put(SCRATCH, x), mem.put(SCRATCH, z), mem.put(SCRATCH, a), mem.put(SCRATCH, b),
            mem.zeros(SCRATCH, (T, Hv * Dv)), mem.put(WEIGHTS, conv_w), mem.put(STATE, conv_state),
            mem.put(WEIGHTS, a_log), mem.put(WEIGHTS, dt_bias), mem.put(STATE, S), mem.put(WEIGHTS, norm_w)]
    args = GdnArgs(n_k_heads=Hk, n_v_heads=Hv, k_dim=Dk, v_dim=Dv, conv_kernel=K, channels=C, q_offset=0,
                   k_offset=Hk * Dk, v_offset=2 * Hk * Dk, x_stride=C + 2, z_stride=Hv * Dv, a_stride=Hv,
                   b_stride=Hv, out_stride=Hv * Dv, norm_eps=1e-6)
    assert run_one(lib, mem, K_GDN, args, refs, threads) == OK

    y, want_conv = ref.conv1d_silu(x[:, :C], conv_w, conv_state)
    q, k, v = ref.split(y, [Hk * Dk, Hk * Dk, Hv * Dv])
    o, want_S = ref.gated_delta_rule(q, k, v, a, b, a_log, dt_bias, S, Hk, Hv, Dk, Dv)
    want = ref.gated_rms_norm(o, z, norm_w, Hv, 1e-6)
    np.testing.assert_allclose(mem.view(refs[4]), want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    np.testing.assert_allclose(mem.view(refs[6]), want_conv, rtol=0, atol=0)
    np.testing.assert_allclose(mem.view(refs[9]), want_S, rtol=1e-4, atol=1e-5 * np.abs(want_S).max())


# ---------------------------------------------------------------------------------------------- sampler

M32 = 0xFFFFFFFF


def _mix32(x):
    x ^= x >> 16
    x = (x * 0x7feb352d) & M32
    x ^= x >> 15
    x = (x * 0x846ca68b) & M32
    x ^= x >> 16
    return x


def _uniform(seed_lo, seed_hi, counter):
    r = _mix32(seed_lo ^ _mix32(counter ^ _mix32((seed_hi + 0x9E3779B9) & M32)))
    return np.float32(r >> 8) * np.float32(1.0 / 16777216.0)


def _spec_sample(logits, counts, st):
    """The sampler as documented in metal/lattice_shared.h, in numpy float32 (the spec that CUDA and
    Metal samplers must also follow)."""
    p = SamplingParams(temperature=st.temperature, top_k=st.top_k, top_p=st.top_p, min_p=st.min_p,
                       repetition_penalty=st.repetition_penalty, presence_penalty=st.presence_penalty,
                       frequency_penalty=st.frequency_penalty)
    s = apply_penalties(logits, counts, p) * (np.float32(1) / np.float32(st.temperature))
    ids = np.arange(len(s))
    order = np.lexsort((ids, -s))                     # value desc, id asc
    if 0 < st.top_k < len(s):
        ids = np.sort(order[:st.top_k])
    pr = np.exp(s[ids] - s.max()).astype(np.float32)
    if st.top_p < 1:
        total = np.cumsum(pr, dtype=np.float32)[-1]
        o = np.lexsort((ids, -pr))
        cum = np.cumsum(pr[o], dtype=np.float32)
        keep = int(np.searchsorted(cum >= np.float32(st.top_p) * total, True)) + 1
        sel = np.sort(o[:keep])
        ids, pr = ids[sel], pr[sel]
    if st.min_p > 0:
        sel = pr >= np.float32(st.min_p)
        ids, pr = ids[sel], pr[sel]
    cum = np.cumsum(pr, dtype=np.float32)
    target = _uniform(st.seed_lo, st.seed_hi, st.step) * cum[-1]
    i = min(int(np.searchsorted(cum, target, side="right")), len(ids) - 1)
    return int(ids[i]), float(np.log(pr[i] / cum[-1]))


def _sample_mem(logits, step, counts=None, ids=(5,), hist=None, partials=False):
    V = logits.shape[-1]
    mem = Mem(step)
    rl = mem.put(SCRATCH, logits)
    parts = None
    if partials:
        nb = -(-V // ARGMAX_BLOCK)
        p = np.zeros((nb, 4), np.float32)
        for b in range(nb):
            blk = logits[-1, b * ARGMAX_BLOCK:(b + 1) * ARGMAX_BLOCK]
            p[b, 0], p[b, 2] = blk.max(), np.exp(blk - blk.max()).sum()
            p[b, 1:2].view(np.uint32)[0] = b * ARGMAX_BLOCK + np.argmax(blk)
        parts = mem.put(SCRATCH, p)
    refs = dict(
        ids=mem.put(STEP, np.array(ids, np.uint32)) if ids else None,
        counts=mem.put(STATE, np.zeros(V, np.uint32) if counts is None else counts.astype(np.uint32)),
        hist=mem.put(STATE, np.zeros(8, np.uint32) if hist is None else hist.astype(np.uint32)),
        ring=mem.zeros(OUTPUT, 4, np.uint32), ring_lp=mem.zeros(OUTPUT, 4),
        work=mem.zeros(SCRATCH, 2 * V), ring_logits=mem.zeros(OUTPUT, (2, V)))
    binds = [rl, parts, refs["ids"], refs["counts"], refs["hist"], refs["ring"], refs["ring_lp"], refs["work"],
             refs["ring_logits"]]
    return mem, binds, refs


@pytest.mark.parametrize("partials", [False, True])
def test_sample_greedy(lib, partials):
    rng = np.random.default_rng(1)
    V = 1000
    logits = rand(rng, 2, V, scale=3)
    step = StepArgs(n_tokens=2, pos=10, step=5, ring_cap=4, flags=1, temperature=0.0, top_p=1.0,
                    repetition_penalty=1.0)
    mem, binds, refs = _sample_mem(logits, step, ids=(7, 9), partials=partials)
    args = SampleArgs(vocab=V, logits_stride=V, flags=1, hist_cap=8, logits_cap=2)
    assert run_one(lib, mem, K_SAMPLE, args, binds) == OK
    st, want = mem.step, int(np.argmax(logits[1]))
    assert (st.token, st.next_token, st.pos, st.n_tokens, st.step, st.n_seen) == (want, want, 12, 1, 6, 2)
    lp = logits[1] - logits[1].max()
    lp = lp - np.log(np.exp(lp).sum())
    assert st.next_logprob == pytest.approx(lp[want], abs=1e-5)
    assert mem.view(refs["ring"])[1] == want and mem.view(refs["ring_lp"])[1] == st.next_logprob
    np.testing.assert_array_equal(mem.view(refs["ring_logits"])[1], logits[1])
    counts = mem.view(refs["counts"])
    assert counts[7] == 1 and counts[9] == 1 and counts.sum() == 2


def test_sample_greedy_with_penalties_and_window(lib):
    rng = np.random.default_rng(2)
    V = 300
    logits = rand(rng, 1, V, scale=2)
    top = np.argsort(-logits[0])[:4]
    counts = np.zeros(V, np.uint32)
    counts[top[0]] = 3
    # history holds the last 3 pushes; window 3: pushing 1 more token evicts hist[0] = top[1]
    hist_init = np.array([top[1], top[0], top[0], 0, 0, 0, 0, 0], np.uint32)
    counts[top[1]] = 1
    step = StepArgs(n_tokens=1, ring_cap=4, temperature=0.0, top_p=1.0, repetition_penalty=1.3,
                    presence_penalty=0.5, frequency_penalty=0.2, penalty_last_n=3, n_seen=3)
    mem, binds, refs = _sample_mem(logits, step, counts=counts, ids=(top[2],), hist=hist_init)
    args = SampleArgs(vocab=V, logits_stride=V, hist_cap=8)
    assert run_one(lib, mem, K_SAMPLE, args, binds) == OK
    got_counts = mem.view(refs["counts"])
    want_counts = counts.copy()
    want_counts[top[1]] -= 1
    want_counts[top[2]] += 1
    np.testing.assert_array_equal(got_counts, want_counts)
    p = SamplingParams(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.2)
    pen = apply_penalties(logits[0], want_counts, p)
    assert mem.step.token == int(np.argmax(pen))
    lp = pen - pen.max()
    assert mem.step.next_logprob == pytest.approx(float(lp[np.argmax(pen)] - np.log(np.exp(lp).sum())), abs=1e-5)


@pytest.mark.parametrize("params", [
    dict(temperature=0.8),
    dict(temperature=1.0, top_k=20),
    dict(temperature=1.3, top_p=0.9),
    dict(temperature=0.7, top_k=50, top_p=0.8, min_p=0.05),
    dict(temperature=1.0, min_p=0.1, repetition_penalty=1.2, frequency_penalty=0.3),
])
def test_sample_matches_spec(lib, params):
    rng = np.random.default_rng(3)
    V = 700
    logits = rand(rng, 1, V, scale=2.5)
    counts = (rng.random(V) < 0.05).astype(np.uint32) * 2
    seen = []
    for seed in range(12):
        step = StepArgs(n_tokens=1, ring_cap=4, seed_lo=seed, seed_hi=99, step=seed * 3,
                        top_p=params.get("top_p", 1.0), top_k=params.get("top_k", 0),
                        min_p=params.get("min_p", 0.0), temperature=params["temperature"],
                        repetition_penalty=params.get("repetition_penalty", 1.0),
                        frequency_penalty=params.get("frequency_penalty", 0.0))
        mem, binds, refs = _sample_mem(logits, step, counts=counts, ids=())
        assert run_one(lib, mem, K_SAMPLE, SampleArgs(vocab=V, logits_stride=V, hist_cap=8), binds) == OK
        tok, lp = _spec_sample(logits[0], counts, step)
        assert mem.step.token == tok
        assert mem.step.next_logprob == pytest.approx(lp, abs=1e-4)
        seen.append(tok)
    assert len(set(seen)) > 1  # it does sample


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("partials", [False, True])
def test_sample_rejects_nonfinite_logits(lib, bad, partials):
    logits = np.zeros((1, 600), np.float32)
    logits[0, 321] = bad
    step = StepArgs(n_tokens=1, ring_cap=4, temperature=0.0, top_p=1.0)
    mem, binds, refs = _sample_mem(logits, step, partials=False)
    if partials:  # as the LM head reports it
        p = np.zeros((3, 4), np.float32)
        p[:, 2] = 256
        p[1, 3:4].view(np.uint32)[0] = 1
        binds[1] = mem.put(SCRATCH, p)
    assert run_one(lib, mem, K_SAMPLE, SampleArgs(vocab=600, logits_stride=600), binds) == ERR_NONFINITE
    assert mem.step.step == 0 and mem.step.pos == 0   # nothing emitted


# ---------------------------------------------------------------------------------------------- programs

def _tiny_program(mem, table, norm_w, V, D):
    """EMBED -> LM_HEAD (tied table, norm prologue) -> SAMPLE, greedy."""
    tq = mem.put(WEIGHTS, table)
    rn = mem.put(WEIGHTS, norm_w)
    token_ref = Ref(STEP, StepArgs.token.offset, np.uint32, (1,))
    x = mem.zeros(SCRATCH, (1, D))
    logits = mem.zeros(SCRATCH, (1, V))
    parts = mem.zeros(SCRATCH, (-(-V // ARGMAX_BLOCK), 4))
    counts, hist = mem.zeros(STATE, V, np.uint32), mem.zeros(STATE, 4, np.uint32)
    ring, work = mem.zeros(OUTPUT, 16, np.uint32), mem.zeros(SCRATCH, 2 * V)
    args = [EmbedArgs(wformat=F32, dim=D, vocab=V, out_stride=D, scale=1.0),
            GemvArgs(wformat=F32, rows=V, cols=D, flags=1, x_stride=D, y_stride=V, eps=1e-6),
            SampleArgs(vocab=V, logits_stride=V, hist_cap=4)]
    consts, offsets = b"", []
    for a in args:
        offsets.append(len(consts))
        consts += bytes(a) + b"\0" * (-len(bytes(a)) % 16)
    prog = (Dispatch * 3)(
        dispatch(K_EMBED, [token_ref, x, tq], 0, offsets[0]),
        dispatch(K_LM_HEAD, [x, logits, tq, None, None, rn, None, None, parts], 1, offsets[1]),
        dispatch(K_SAMPLE, [logits, parts, token_ref, counts, hist, ring, None, work], 1, offsets[2]))
    return prog, consts, ring


@pytest.mark.parametrize("threads", [1, 2])
def test_program_replays_steps(lib, threads):
    rng = np.random.default_rng(4)
    V, D = 600, 64
    table, norm_w = rand(rng, V, D), rand(rng, D)
    mem = Mem(StepArgs(token=3, n_tokens=1, ring_cap=16, temperature=0.0, top_p=1.0, repetition_penalty=1.0))
    prog, consts, ring = _tiny_program(mem, table, norm_w, V, D)
    mem.build()
    err, where = ctypes.c_int(), u32()
    cpu = lib.lt_cpu_create(prog, 3, consts, len(consts), mem.ptrs, mem.sizes, threads, ctypes.byref(err),
                            ctypes.byref(where))
    assert cpu and err.value == OK
    try:
        assert lib.lt_cpu_run(cpu, 5) == OK
        assert lib.lt_cpu_run(cpu, 3) == OK
    finally:
        lib.lt_cpu_free(cpu)
    want, tok = [], 3
    for _ in range(8):
        tok = int(np.argmax(ref.lm_head(ref.rms_norm(table[tok:tok + 1], norm_w, 1e-6, False), table)[0]))
        want.append(tok)
    assert list(mem.view(ring)[:8]) == want
    assert (mem.step.pos, mem.step.step, mem.step.n_seen) == (8, 8, 8)


def test_program_stops_on_error(lib):
    rng = np.random.default_rng(6)
    V, D = 300, 32
    table = rand(rng, V, D)
    table[:, 0] = np.nan           # every logit NaN
    mem = Mem(StepArgs(token=1, n_tokens=1, ring_cap=16, temperature=0.0, top_p=1.0))
    prog, consts, _ = _tiny_program(mem, table, np.ones(D, np.float32), V, D)
    mem.build()
    err, where = ctypes.c_int(), u32()
    cpu = lib.lt_cpu_create(prog, 3, consts, len(consts), mem.ptrs, mem.sizes, 2, ctypes.byref(err),
                            ctypes.byref(where))
    try:
        assert lib.lt_cpu_run(cpu, 4) == ERR_NONFINITE
    finally:
        lib.lt_cpu_free(cpu)
    assert mem.step.step == 0 and mem.step.error == ERR_NONFINITE
    assert lib.lt_cpu_error_string(ERR_NONFINITE) == b"NaN or Inf in logits"


@pytest.mark.parametrize("case,want", [
    ("kernel", ERR_KERNEL), ("binding", ERR_BINDING), ("args_offset", ERR_BINDING),
    ("zero_cols", ERR_ARGS), ("odd_silu", ERR_ARGS), ("format", ERR_ARGS)])
def test_invalid_dispatch_is_rejected(lib, case, want):
    """The first dispatch is fine, the second is broken: creation fails and names dispatch 1."""
    mem = Mem()
    x, y = mem.zeros(SCRATCH, 64), mem.zeros(SCRATCH, 64)
    wq = mem.zeros(WEIGHTS, (3, 32))
    args = GemvArgs(wformat=9 if case == "format" else F32, rows=3 if case == "odd_silu" else 2,
                    cols=0 if case == "zero_cols" else 32, flags=8 if case == "odd_silu" else 0,
                    x_stride=32, y_stride=2)
    mem.build()
    consts = bytes(EwArgs(n=1)) + bytes(args)       # args at offset 32
    bad = dispatch(99 if case == "kernel" else K_GEMV, [x, y, wq], 0, 48 if case == "args_offset" else 32)
    if case == "binding":
        bad.bind[1] = Binding(SCRATCH, 1 << 20)
    prog = (Dispatch * 2)(dispatch(K_ELEMENTWISE, [x, x, y]), bad)
    err, where = ctypes.c_int(), u32()
    cpu = lib.lt_cpu_create(prog, 2, consts, len(consts), mem.ptrs, mem.sizes, 1, ctypes.byref(err),
                            ctypes.byref(where))
    assert not cpu and err.value == want and where.value == 1
