"""The CUDA backend (lattice/cuda): every kernel against lattice/reference.py, whole programs through
the unified runtime (lattice._runtime.Runtime with cuda_backend) against the CPU backend, graph
replay against eager launches, the device sampler against the CPU sampler.

Kernel tests are the CPU backend's own (tests/test_cpu_kernels.py, same inputs and tolerances), run
through `CudaKernelLib`, which serves the `lt_cpu_*` calls those tests make with the CUDA backend.
Everything that needs a GPU skips without one (no nvidia-smi GPU, no nvcc); tests/gpu/run_gpu_tests.sh
runs this file on a GPU machine.
"""
import ctypes
import os

import numpy as np
import pytest

from conftest import FIXTURES
from lattice import cuda as lcuda
from lattice.errors import BackendError, ContextLengthError, TokenizerError
from lattice.formats import open_checkpoint
from lattice.program import build
from lattice.sampling import SamplingParams

from test_cpu_kernels import (  # noqa: F401  (collected here, with this module's `lib`)
    test_attention, test_attention_context_full, test_elementwise, test_embed, test_embed_token_out_of_range,
    test_gdn, test_gemv, test_gemv_fused, test_invalid_dispatch_is_rejected, test_lm_head_all_tokens,
    test_lm_head_last_token_and_partials, test_program_replays_steps, test_program_stops_on_error,
    test_rmsnorm, test_rope_kv, test_sample_greedy, test_sample_greedy_with_penalties_and_window,
    test_sample_matches_spec, test_sample_rejects_nonfinite_logits)

GPU_OK, GPU_WHY = lcuda.available()
needs_gpu = pytest.mark.skipif(not GPU_OK, reason=f"CUDA backend unavailable: {GPU_WHY}")

TINY = ["tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-qwen35"]
QUANTS = [None, "q8", "q4"]
STEP_N_TOKENS = 8  # byte offset of lt_step_args.n_tokens


# ---------------------------------------------------------------------------------------------- shim

class _Handle:
    def __init__(self, be, idx, ptrs, sizes):
        self.be, self.idx, self.ptrs, self.sizes = be, idx, ptrs, sizes


class CudaKernelLib:
    """lt_cpu_run_one / lt_cpu_create / lt_cpu_run / lt_cpu_free over the CUDA backend: the host
    arenas are uploaded before every run and the writable ones downloaded after it."""

    def __init__(self):
        self.so = lcuda.load_library()

    @staticmethod
    def lt_cpu_simd():
        return b"cuda"  # one-token Q8 / Q4 GEMVs quantize x to int16 per block of 32 (X_HALF_STEP)

    @staticmethod
    def lt_cpu_error_string(err):
        return lcuda.ERRORS.get(err, "unknown error").encode()

    def lt_cpu_create(self, prog, n, consts, n_consts, ptrs, sizes, threads, err, where):
        sizes_l = [int(sizes[i]) for i in range(lcuda.N_ARENAS)]
        be = lcuda.CudaBackend(sizes_l)
        T = ctypes.c_uint32.from_address(ptrs[lcuda.STEP] + STEP_N_TOKENS).value
        addr = ctypes.addressof(prog._obj) if isinstance(prog, type(ctypes.byref(ctypes.c_int()))) \
            else ctypes.addressof(prog)
        w = ctypes.c_uint32()
        idx = self.so.lt_cuda_add_program(be.h, addr, n, ctypes.c_char_p(consts), n_consts, max(1, T),
                                          ctypes.byref(w))
        if idx < 0:
            err._obj.value, where._obj.value = -idx, w.value
            be.close()
            return None
        return _Handle(be, idx, ptrs, sizes_l)

    def lt_cpu_run(self, h, n_steps):
        for a in range(lcuda.N_ARENAS):
            if a != lcuda.CONST:
                assert self.so.lt_cuda_write(h.be.h, a, 0, ctypes.c_void_p(h.ptrs[a]), h.sizes[a]) == 0
        T = ctypes.c_uint32.from_address(h.ptrs[lcuda.STEP] + STEP_N_TOKENS).value
        err = self.so.lt_cuda_run(h.be.h, h.idx, n_steps, T)
        assert err != lcuda.ERR_CUDA, self.so.lt_cuda_message(h.be.h)
        for a in (lcuda.STATE, lcuda.SCRATCH, lcuda.STEP, lcuda.OUTPUT):
            assert self.so.lt_cuda_read(h.be.h, a, 0, ctypes.c_void_p(h.ptrs[a]), h.sizes[a]) == 0
        return err

    @staticmethod
    def lt_cpu_free(h):
        if h is not None:
            h.be.close()

    def lt_cpu_run_one(self, d, consts, n_consts, ptrs, sizes, threads):
        err, where = ctypes.c_int(), ctypes.c_uint32()
        h = self.lt_cpu_create(d, 1, consts, n_consts, ptrs, sizes, threads, ctypes.byref(err), ctypes.byref(where))
        if h is None:
            return err.value
        try:
            return self.lt_cpu_run(h, 1)
        finally:
            self.lt_cpu_free(h)


@pytest.fixture(scope="session")
def lib():
    if not GPU_OK:
        pytest.skip(f"CUDA backend unavailable: {GPU_WHY}")
    return CudaKernelLib()


@pytest.fixture
def simd():
    return "cuda"


@pytest.mark.parametrize("T,early", [(1, "0"), (1, "1"), (6, "0")])
@pytest.mark.parametrize("Hk,Hv,Dk,Dv", [(3, 3, 64, 40), (2, 2, 128, 128), (2, 4, 96, 64), (1, 1, 256, 128),
                                         (2, 2, 64, 30), (1, 1, 64, 510), (1, 2, 512, 24)])
def test_gdn_cuda_paths(lib, monkeypatch, T, early, Hk, Hv, Dk, Dv):
    """GDN at Qwen3.5 head sizes, alone (no GEMV to fuse its conv and norm into: k_gdn_conv,
    k_gdn_decode, k_gdn_norm at T = 1). Decode spreads a head's columns over blocks, 4 per lane,
    with k_dim up to 512 (32 row lanes) and v_dim not a multiple of 4 or 8 (30, 510: no float4
    rows); the state is read before the dependency wait or after it (LATTICE_CUDA_EARLY_STATE;
    one step from uploaded state, so both are exact). T = 6 takes the prefill kernels."""
    monkeypatch.setenv("LATTICE_CUDA_EARLY_STATE", early)
    _check_gdn(lib, T, Hk, Hv, Dk, Dv)


def _check_gdn(lib, T, Hk, Hv, Dk, Dv):
    from lattice import reference as ref
    from test_cpu_kernels import GdnArgs, K_GDN, Mem, OK, SCRATCH, STATE, StepArgs, WEIGHTS, rand, run_one
    rng = np.random.default_rng(T + Dv)
    K = 4
    C = 2 * Hk * Dk + Hv * Dv
    x = rand(rng, T, C + 1)
    z, a, b = rand(rng, T, Hv * Dv), rand(rng, T, Hv), rand(rng, T, Hv)
    conv_w, conv_state = rand(rng, C, K, scale=0.5), rand(rng, K - 1, C)
    a_log, dt_bias, norm_w = rand(rng, Hv, scale=0.5), rand(rng, Hv), rand(rng, Dv)
    S = rand(rng, Hv, Dk, Dv, scale=0.1)
    mem = Mem(StepArgs(n_tokens=T))
    refs = [mem.put(SCRATCH, x), mem.put(SCRATCH, z), mem.put(SCRATCH, a), mem.put(SCRATCH, b),
            mem.zeros(SCRATCH, (T, Hv * Dv)), mem.put(WEIGHTS, conv_w), mem.put(STATE, conv_state),
            mem.put(WEIGHTS, a_log), mem.put(WEIGHTS, dt_bias), mem.put(STATE, S), mem.put(WEIGHTS, norm_w)]
    args = GdnArgs(n_k_heads=Hk, n_v_heads=Hv, k_dim=Dk, v_dim=Dv, conv_kernel=K, channels=C, q_offset=0,
                   k_offset=Hk * Dk, v_offset=2 * Hk * Dk, x_stride=C + 1, z_stride=Hv * Dv, a_stride=Hv,
                   b_stride=Hv, out_stride=Hv * Dv, norm_eps=1e-6)
    assert run_one(lib, mem, K_GDN, args, refs) == OK
    y, want_conv = ref.conv1d_silu(x[:, :C], conv_w, conv_state)
    q, k, v = ref.split(y, [Hk * Dk, Hk * Dk, Hv * Dv])
    o, want_S = ref.gated_delta_rule(q, k, v, a, b, a_log, dt_bias, S, Hk, Hv, Dk, Dv)
    want = ref.gated_rms_norm(o, z, norm_w, Hv, 1e-6)
    np.testing.assert_allclose(mem.view(refs[4]), want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    np.testing.assert_allclose(mem.view(refs[6]), want_conv, rtol=0, atol=0)
    np.testing.assert_allclose(mem.view(refs[9]), want_S, rtol=1e-4, atol=1e-5 * np.abs(want_S).max())


@pytest.mark.parametrize("fuse,early,steps,fmt,shape", [
    ("1", "0", 1, "q8", "qwen35"), ("1", "1", 1, "q8", "qwen35"), ("conv", "0", 1, "q8", "qwen35"),
    ("0", "0", 1, "q8", "qwen35"), ("1", "0", 3, "q8", "qwen35"), ("1", "0", 1, "q4", "qwen35"),
    ("1", "0", 1, "q8", "wide"), ("1", "1", 1, "q4", "wide"), ("1", "1", 2, "q4", "wide"),
    ("1", "0", 1, "q8", "v40"), ("1", "1", 2, "q8", "d64"), ("1", "0", 1, "q8", "h256")])
def test_gdn_layer_fused_into_its_gemvs(lib, monkeypatch, fuse, early, steps, fmt, shape):
    """A decode GDN layer: in_proj (input RMSNorm) -> GDN -> out_proj (+ residual), at Qwen3.5-0.8B's
    shapes (16 heads of 128, hidden 1024), wider heads (k_dim 256, v_dim 256: 8 column blocks per
    head), v_dim 40, heads of 64 (32 value heads for 16 key heads) and hidden 256.
    LATTICE_CUDA_GDN_FUSE (default on) moves the conv into in_proj's epilogue and the gated RMSNorm
    into out_proj (the GDN writes the gated output and per-block sums of squares; out_proj scales
    each head): three kernels per step instead of five ("conv": four; eager launches, counted).
    The norm stays a kernel where out_proj does not read x per lane (Q4 rows of 64 vectors: two
    warps per row) or a weight vector would span two heads (v_dim 40). One step may read the state
    before the dependency wait (LATTICE_CUDA_EARLY_STATE=1; a program this small could otherwise
    have all its kernels resident at once); several steps replay a graph. Outputs, conv state and
    recurrent state against lattice/reference.py."""
    from lattice import reference as ref
    from test_cpu_kernels import (Dispatch, GdnArgs, GemvArgs, K_GDN, K_GEMV, Mem, OK, Q4, Q8, Ref, SCRATCH,
                                  STATE, StepArgs, WEIGHTS, dispatch, put_matrix, rand)
    monkeypatch.setenv("LATTICE_CUDA_GDN_FUSE", fuse)
    monkeypatch.setenv("LATTICE_CUDA_EARLY_STATE", early)
    rng = np.random.default_rng(11)
    Hk, Hv, Dk, Dv = {"qwen35": (16, 16, 128, 128), "wide": (4, 16, 256, 256), "v40": (16, 64, 128, 40),
                      "d64": (16, 32, 64, 64), "h256": (16, 16, 128, 128)}[shape]
    wf = {"q8": Q8, "q4": Q4}[fmt]
    H, K = 256 if shape == "h256" else 1024, 4
    C, V = 2 * Hk * Dk + Hv * Dv, Hv * Dv
    rows = C + V + 2 * Hv  # in_proj: conv channels | z | a | b
    mem = Mem(StepArgs(n_tokens=1))
    x, nw_in, resid = rand(rng, 1, H), rand(rng, H), rand(rng, 1, H)
    wq_in, ws_in, wm_in, deq_in = put_matrix(mem, rand(rng, rows, H, scale=0.05), wf)
    wq_out, ws_out, wm_out, deq_out = put_matrix(mem, rand(rng, H, V, scale=0.05), wf)
    conv_w, conv_state = rand(rng, C, K, scale=0.5), rand(rng, K - 1, C)
    a_log, dt_bias, norm_w = rand(rng, Hv, scale=0.5), rand(rng, Hv), rand(rng, Dv)
    S = rand(rng, Hv, Dk, Dv, scale=0.1)
    rx, rnw, rres = mem.put(SCRATCH, x), mem.put(WEIGHTS, nw_in), mem.put(SCRATCH, resid)
    p = mem.zeros(SCRATCH, (1, rows))
    part = lambda first, n: Ref(SCRATCH, p.offset + 4 * first, np.float32, (1, n))  # noqa: E731
    o, y = mem.zeros(SCRATCH, (1, V)), mem.zeros(SCRATCH, (1, H))
    rcs, rS = mem.put(STATE, conv_state), mem.put(STATE, S)
    gdn_binds = [part(0, C), part(C, V), part(C + V, Hv), part(C + V + Hv, Hv), o, mem.put(WEIGHTS, conv_w), rcs,
                 mem.put(WEIGHTS, a_log), mem.put(WEIGHTS, dt_bias), rS, mem.put(WEIGHTS, norm_w)]
    args = [GemvArgs(wformat=wf, rows=rows, cols=H, flags=1, x_stride=H, y_stride=rows, eps=1e-6),
            GdnArgs(n_k_heads=Hk, n_v_heads=Hv, k_dim=Dk, v_dim=Dv, conv_kernel=K, channels=C, q_offset=0,
                    k_offset=Hk * Dk, v_offset=2 * Hk * Dk, x_stride=rows, z_stride=rows, a_stride=rows,
                    b_stride=rows, out_stride=V, norm_eps=1e-6),
            GemvArgs(wformat=wf, rows=H, cols=V, flags=16, x_stride=V, y_stride=H, resid_stride=H, eps=1e-6)]
    consts, offsets = b"", []
    for a in args:
        offsets.append(len(consts))
        consts += bytes(a) + b"\0" * (-len(bytes(a)) % 16)
    prog = (Dispatch * 3)(
        dispatch(K_GEMV, [rx, p, wq_in, ws_in, wm_in, rnw], 0, offsets[0]),
        dispatch(K_GDN, gdn_binds, 0, offsets[1]),
        dispatch(K_GEMV, [o, y, wq_out, ws_out, wm_out, None, None, rres], 0, offsets[2]))
    mem.build()
    err, where = ctypes.c_int(), ctypes.c_uint32()
    h = lib.lt_cpu_create(prog, 3, consts, len(consts), mem.ptrs, mem.sizes, 1, ctypes.byref(err),
                          ctypes.byref(where))
    assert h is not None, (err.value, where.value)
    try:
        lib.so.lt_cuda_set_eager(h.be.h, int(steps == 1))
        assert lib.lt_cpu_run(h, steps) == OK
        counters = lcuda.Counters()
        lib.so.lt_cuda_counters_get(h.be.h, ctypes.byref(counters))
    finally:
        lib.lt_cpu_free(h)
    if steps == 1:
        vals = 16 if wf == Q8 else 32  # per 16-byte weight vector
        norm_fused = fuse == "1" and Dv % vals == 0 and V // vals >= 128  # 128 vectors: four warps per row
        assert counters.kernel_launches == 5 - (fuse != "0") - norm_fused
    proj = ref.rms_norm(x, nw_in, 1e-6, False).astype(np.float64) @ deq_in.T.astype(np.float64)
    proj = proj.astype(np.float32)
    cs, st = conv_state, S
    for _ in range(steps):
        conv, cs = ref.conv1d_silu(proj[:, :C], conv_w, cs)
        q, k, v = ref.split(conv, [Hk * Dk, Hk * Dk, V])
        out, st = ref.gated_delta_rule(q, k, v, proj[:, C + V:C + V + Hv], proj[:, C + V + Hv:], a_log, dt_bias,
                                       st, Hk, Hv, Dk, Dv)
    g = ref.gated_rms_norm(out, proj[:, C:C + V], norm_w, Hv, 1e-6)
    want = resid + (g.astype(np.float64) @ deq_out.T.astype(np.float64)).astype(np.float32)
    np.testing.assert_allclose(mem.view(y), want, rtol=0, atol=2e-3 * np.abs(want).max())
    np.testing.assert_allclose(mem.view(rcs), cs, rtol=0, atol=1e-3 * np.abs(cs).max())
    np.testing.assert_allclose(mem.view(rS), st, rtol=0, atol=1e-3 * np.abs(st).max())


@pytest.mark.parametrize("head_dim", [64, 72, 256, 512])
@pytest.mark.parametrize("T,pos", [(1, 300), (1, 8190), (3, 5000)])
def test_attention_split_k(lib, head_dim, T, pos):
    """Long caches take the split-K path (the last split to finish combines): the CPU tests' short
    caches do not. Two runs of one created program also check that the split counters reset.
    head_dim 72 leaves lanes of each row group idle; 512 takes two vectors per lane."""
    from lattice import reference as ref
    from test_cpu_kernels import AttnArgs, Dispatch, K_ATTENTION, Mem, OK, SCRATCH, STATE, StepArgs, dispatch, rand
    rng = np.random.default_rng(head_dim + T + pos)
    H, Hkv, cap = 4, 2, 9000
    S = pos + T
    q, gate = rand(rng, T, H * head_dim), rand(rng, T, H * head_dim)
    kc = (rng.standard_normal((Hkv, cap, head_dim)) * 0.5).astype(np.float16)
    vc = rng.standard_normal((Hkv, cap, head_dim)).astype(np.float16)
    mem = Mem(StepArgs(n_tokens=T, pos=pos))
    rq, rk, rv, rg = mem.put(SCRATCH, q), mem.put(STATE, kc), mem.put(STATE, vc), mem.put(SCRATCH, gate)
    out = mem.zeros(SCRATCH, (T, H * head_dim))
    args = AttnArgs(n_heads=H, n_kv_heads=Hkv, head_dim=head_dim, ctx_cap=cap, q_stride=H * head_dim,
                    out_stride=H * head_dim, gate_stride=H * head_dim, flags=1, scale=head_dim ** -0.5)
    mem.build()
    consts = bytes(args)
    prog = (Dispatch * 1)(dispatch(K_ATTENTION, [rq, out, rk, rv, rg]))
    err, where = ctypes.c_int(), ctypes.c_uint32()
    h = lib.lt_cpu_create(prog, 1, consts, len(consts), mem.ptrs, mem.sizes, 1, ctypes.byref(err), ctypes.byref(where))
    k2 = kc[:, :S].astype(np.float32).transpose(1, 0, 2).reshape(S, Hkv * head_dim)
    v2 = vc[:, :S].astype(np.float32).transpose(1, 0, 2).reshape(S, Hkv * head_dim)
    want = ref.sigmoid_mul(ref.attention(q, k2, v2, pos, H, Hkv, head_dim, head_dim ** -0.5), gate)
    try:
        for _ in range(2):
            mem.view(out)[:] = np.nan
            assert lib.lt_cpu_run(h, 1) == OK
            np.testing.assert_allclose(mem.view(out), want, rtol=1e-4, atol=1e-5)
    finally:
        lib.lt_cpu_free(h)


@pytest.mark.parametrize("head_dim,fmt", [(256, 2), (64, 3), (128, 2)])  # Q8, Q4
@pytest.mark.parametrize("pos", [0, 5, 300, 1023, 2100])
@pytest.mark.parametrize("defer", ["", "0", "2"])
@pytest.mark.parametrize("rows", [96, 1100])
def test_attention_combine_in_gemv(lib, monkeypatch, head_dim, fmt, pos, defer, rows):
    """A decode attention followed by the GEMV that reads its output (the o-projection) leaves its
    split combine to that GEMV's x staging while 2 to LATTICE_CUDA_ATT_DEFER splits (default 8)
    are in use; past that, and with 0, the attention combines (one split: it writes its output).
    The positions give 1 split, several (over one batch of the GEMV's requests), exactly 8 or past
    8 with head_dim 256 (64 positions per split) and 1-9 splits with 64 (256 per split); 1100 rows
    of 1024 columns take 4 rows per warp (the combining GEMV's blocks are made fewer). The
    attention's own output stays unwritten exactly when the GEMV combines. Two runs of one program:
    the combine counters reset."""
    from lattice import reference as ref
    from test_cpu_kernels import (AttnArgs, Dispatch, GemvArgs, K_ATTENTION, K_GEMV, Mem, OK, SCRATCH, STATE,
                                  StepArgs, WEIGHTS, assert_dot_close, dispatch, dot_error_limit, put_matrix, rand)
    monkeypatch.setenv("LATTICE_CUDA_ATT_DEFER", defer)  # read when the backend's handle is created
    rng = np.random.default_rng(head_dim + pos)
    H, Hkv, cap = 4, 2, 2304
    S = pos + 1
    q, gate = rand(rng, 1, H * head_dim), rand(rng, 1, H * head_dim)
    kc = (rng.standard_normal((Hkv, cap, head_dim)) * 0.5).astype(np.float16)
    vc = rng.standard_normal((Hkv, cap, head_dim)).astype(np.float16)
    w = rand(rng, rows, H * head_dim, scale=0.1)
    resid = rand(rng, 1, rows)
    mem = Mem(StepArgs(n_tokens=1, pos=pos))
    rq, rk, rv, rg = mem.put(SCRATCH, q), mem.put(STATE, kc), mem.put(STATE, vc), mem.put(SCRATCH, gate)
    out = mem.zeros(SCRATCH, (1, H * head_dim))
    wq, ws, wm, deq = put_matrix(mem, w, fmt)
    y = mem.zeros(SCRATCH, (1, rows))
    rr = mem.put(SCRATCH, resid)
    aa = AttnArgs(n_heads=H, n_kv_heads=Hkv, head_dim=head_dim, ctx_cap=cap, q_stride=H * head_dim,
                  out_stride=H * head_dim, gate_stride=H * head_dim, flags=1, scale=head_dim ** -0.5)
    ga = GemvArgs(wformat=fmt, rows=rows, cols=H * head_dim, flags=16, x_stride=H * head_dim, y_stride=rows,
                  resid_stride=rows)
    mem.build()
    pad = -len(bytes(aa)) % 16
    consts = bytes(aa) + bytes(pad) + bytes(ga)
    prog = (Dispatch * 2)(dispatch(K_ATTENTION, [rq, out, rk, rv, rg]),
                          dispatch(K_GEMV, [out, y, wq, ws, wm, None, None, rr, None],
                                   args_offset=len(bytes(aa)) + pad))
    err, where = ctypes.c_int(), ctypes.c_uint32()
    h = lib.lt_cpu_create(prog, 2, consts, len(consts), mem.ptrs, mem.sizes, 1, ctypes.byref(err),
                          ctypes.byref(where))
    assert h is not None, err.value
    k2 = kc[:, :S].astype(np.float32).transpose(1, 0, 2).reshape(S, Hkv * head_dim)
    v2 = vc[:, :S].astype(np.float32).transpose(1, 0, 2).reshape(S, Hkv * head_dim)
    x = ref.sigmoid_mul(ref.attention(q, k2, v2, pos, H, Hkv, head_dim, head_dim ** -0.5), gate)
    want = x.astype(np.float64) @ deq.T.astype(np.float64) + resid
    bound = dot_error_limit(x, deq, fmt, "cuda") + 1e-4 * (np.abs(x) @ np.abs(deq).T)  # x to 1e-4
    chunk = {256: 64, 128: 128, 64: 256}[head_dim]  # backend.cu: one batch of rows of the decode block
    used = -(-S // chunk)
    deferred = 1 < used <= min(int(defer or 8), 8)
    try:
        for _ in range(2):
            mem.view(y)[:] = np.nan
            mem.view(out)[:] = np.nan
            assert lib.lt_cpu_run(h, 1) == OK
            assert_dot_close(mem.view(y), want, bound)
            assert np.isnan(mem.view(out)).all() == deferred
    finally:
        lib.lt_cpu_free(h)


# ---------------------------------------------------------------------------------------------- no GPU

@pytest.mark.parametrize("fmt", [2, 3, 1])  # Q8, Q4, F16
@pytest.mark.parametrize("cols", [576, 2048, 3584])
@pytest.mark.parametrize("flags", [0, 1 | 2, 1 | 8 | 16])
def test_gemv_one_token_float4_x(lib, fmt, cols, flags):
    """One token with 16-byte aligned x rows (x_stride = cols), as decode programs lay them out:
    the kernel stages x with float4 loads, in two passes past 2048 columns (the CPU kernel tests
    pad their x rows, which takes the scalar staging)."""
    from lattice import reference as ref
    from test_cpu_kernels import (GemvArgs, K_GEMV, Mem, OK, SCRATCH, StepArgs, WEIGHTS, assert_dot_close,
                                  dot_error_limit, put_matrix, rand, run_one)
    rng = np.random.default_rng(cols + 10 * flags + fmt)
    rows = 40
    x, w = rand(rng, 1, cols), rand(rng, rows, cols, scale=0.1)
    mem = Mem(StepArgs(n_tokens=1))
    wq, ws, wm, deq = put_matrix(mem, w, fmt)
    norm_w = rand(rng, cols)
    n_out = rows // 2 if flags & 8 else rows
    resid = rand(rng, 1, n_out)
    rx, rn = mem.put(SCRATCH, x), mem.put(WEIGHTS, norm_w)
    y = mem.put(SCRATCH, resid.copy()) if flags & 16 else mem.zeros(SCRATCH, (1, n_out))
    args = GemvArgs(wformat=fmt, rows=rows, cols=cols, flags=flags, x_stride=cols, y_stride=n_out,
                    resid_stride=n_out, eps=1e-6)
    assert run_one(lib, mem, K_GEMV, args, [rx, y, wq, ws, wm, rn, None, y, None]) == OK
    xin = ref.rms_norm(x, norm_w, 1e-6, bool(flags & 2)) if flags & 1 else x
    want = xin.astype(np.float64) @ deq.T.astype(np.float64)
    bound = dot_error_limit(xin, deq, fmt, "cuda")
    if flags & 8:
        g, u = want[:, 0::2].astype(np.float32), want[:, 1::2].astype(np.float32)
        want = ref.silu_mul(g, u)
        bound = 1.1 * np.abs(u) * bound[:, 0::2] + np.abs(ref.silu_mul(g, np.ones_like(g))) * bound[:, 1::2]
    if flags & 16:
        want = want + resid
    assert_dot_close(mem.view(y), want, bound)


@pytest.mark.parametrize("fmt", [0, 1, 2, 3])  # F32, F16, Q8, Q4
@pytest.mark.parametrize("rows", [6002, 17002])
@pytest.mark.parametrize("cols", [96, 1000])
@pytest.mark.parametrize("flags", [0, 1 | 2 | 4, 1 | 8 | 16])
@pytest.mark.parametrize("x_pad", [3, 0])  # x rows read by scalars, or as float4 (decode's layout)
def test_gemv_many_rows(lib, fmt, rows, cols, flags, x_pad):
    """One token, more rows than the GPU has resident warps (four rows per warp) and over four times
    as many (LM-head sized: every warp streams row after row through k_gemv_stream), with rows of
    one and of several 16-byte vectors per lane."""
    _check_one_token_gemv(lib, fmt, rows, cols, flags, x_pad)


@pytest.mark.parametrize("fmt", [0, 1, 2, 3])  # F32, F16, Q8, Q4
@pytest.mark.parametrize("rows,cols", [(1100, 3584), (1000, 3584), (300, 4096)])
@pytest.mark.parametrize("flags", [0, 1 | 2 | 4, 1 | 8 | 16])
@pytest.mark.parametrize("x_pad", [3, 0])
def test_gemv_long_rows_two_per_warp(lib, fmt, rows, cols, flags, x_pad):
    """One token, long rows split over 2, 4 or 8 warps (on a GPU of ~132 SMs), in more than two
    blocks per SM: each warp then takes two rows (a block stages x once for twice the rows), or
    four past four blocks per SM (1000 F32 / F16 rows: 8 warps per row)."""
    _check_one_token_gemv(lib, fmt, rows, cols, flags, x_pad)


@pytest.mark.parametrize("fmt", [2, 3])  # Q8, Q4
@pytest.mark.parametrize("rows,cols", [(1024, 3584), (1024, 2040), (300, 4096), (200, 3000)])
@pytest.mark.parametrize("flags", [0, 4 | 16, 8 | 16])
def test_gemv_split_k_x_per_lane(lib, monkeypatch, fmt, rows, cols, flags):
    """Split-K decode GEMVs of 4-8 warps per row without a norm read x per lane (gemv_geom.x_lane:
    Qwen3.5's out / down / o projections), with bias, SiLU-gate and residual epilogues and rows
    that end inside a weight vector (2040, 3000 columns). The lanes quantize x exactly as the
    staged path does (LATTICE_CUDA_X_LANE=0): Q8 outputs are bit-identical to it."""
    outs = []
    for x_lane in ("1", "0"):
        monkeypatch.setenv("LATTICE_CUDA_X_LANE", x_lane)
        outs.append(_check_one_token_gemv(lib, fmt, rows, cols, flags, 0))
    if fmt == 2:
        np.testing.assert_array_equal(outs[0], outs[1])


@pytest.mark.parametrize("head_dim,partial", [(256, False), (512, True)])
@pytest.mark.parametrize("mode", ["qk_norm", "split_gate"])
@pytest.mark.parametrize("T", [1, 3])
def test_rope_kv_wide_heads(lib, head_dim, partial, mode, T):
    """Heads of 2-4 elements per thread (Qwen3.5: 256): k_rope_kv loads the copied gate / v row
    into registers before the rope and stages the norm weight and frequencies before its wait."""
    test_rope_kv(lib, head_dim, partial, mode, T)


@pytest.mark.parametrize("case", ["context_full", "error_set"])
def test_rope_kv_writes_nothing_on_error(lib, case):
    """k_rope_kv checks the step's error flag and the context bound after its loads: a step past
    the cache, or one whose error flag an earlier kernel set, writes no cache row, q or gate."""
    from test_cpu_kernels import (ERR_CONTEXT, ERR_TOKEN, K_ROPE_KV, Mem, RopeArgs, SCRATCH, STATE, StepArgs,
                                  WEIGHTS, _inv_freq, rand, run_one)
    rng = np.random.default_rng(5)
    H, Hkv, D, cap, T = 4, 2, 256, 16, 2
    step = StepArgs(n_tokens=T, pos=15) if case == "context_full" else StepArgs(n_tokens=T, pos=3, error=ERR_TOKEN)
    mem = Mem(step)
    rq, rk, rv = (mem.put(SCRATCH, rand(rng, T, n)) for n in (H * 2 * D, Hkv * D, Hkv * D))
    q_out, gate_out = (mem.put(SCRATCH, np.full((T, H * D), 3, np.float32)) for _ in range(2))
    sentinel = np.full((Hkv, cap, D), 7, np.float16)
    kc, vc = mem.put(STATE, sentinel), mem.put(STATE, sentinel)
    ri, rqn, rkn = mem.put(WEIGHTS, _inv_freq(D)), mem.put(WEIGHTS, rand(rng, D)), mem.put(WEIGHTS, rand(rng, D))
    args = RopeArgs(n_heads=H, n_kv_heads=Hkv, head_dim=D, rotary_dim=D, q_stride=H * 2 * D, k_stride=Hkv * D,
                    v_stride=Hkv * D, q_out_stride=H * D, gate_stride=H * D, ctx_cap=cap, flags=1 | 2 | 4, eps=1e-6)
    err = run_one(lib, mem, K_ROPE_KV, args, [rq, rk, rv, q_out, kc, vc, ri, rqn, rkn, gate_out])
    assert err == (ERR_CONTEXT if case == "context_full" else ERR_TOKEN)
    assert (mem.view(kc) == 7).all() and (mem.view(vc) == 7).all()
    assert (mem.view(q_out) == 3).all() and (mem.view(gate_out) == 3).all()


def _check_one_token_gemv(lib, fmt, rows, cols, flags, x_pad):
    from test_cpu_kernels import _gemv_case, assert_dot_close
    rng = np.random.default_rng(rows + cols + flags + fmt)
    mem, y, _, want, bound = _gemv_case(lib, rng, fmt, rows, cols, 1, 1, flags, x_pad=x_pad)
    assert_dot_close(mem.view(y), want, bound)
    return mem.view(y).copy()


@pytest.mark.parametrize("fmt", [0, 1, 2, 3])  # F32 (k_gemv), F16, Q8, Q4 (k_gemm's tensor cores)
@pytest.mark.parametrize("rows,cols", [(36, 96), (300, 576), (70, 1000)])
@pytest.mark.parametrize("T", [16, 37, 100])
@pytest.mark.parametrize("flags", [0, 1 | 2 | 4, 1 | 8 | 16])
def test_gemm_prefill(lib, fmt, rows, cols, T, flags):
    """Prefill-sized GEMVs as programs lay them out (x rows 16-byte aligned): k_gemm (bf16 tensor
    cores, x split hi/lo) must stay within the f32 rounding bound of every fused prologue/epilogue."""
    from test_cpu_kernels import _gemv_case, assert_dot_close
    rng = np.random.default_rng(rows + cols + T + flags + fmt)
    mem, y, _, want, bound = _gemv_case(lib, rng, fmt, rows, cols, T, 1, flags, x_pad=4)
    assert_dot_close(mem.view(y), want, bound)


def test_lm_head_all_tokens_gemm(lib):
    """The logits program's LM head (every token's logits) on k_gemm."""
    from test_cpu_kernels import _gemv_case, assert_dot_close
    mem, y, _, want, bound = _gemv_case(lib, np.random.default_rng(9), 2, 1000, 64, 20, 1, 1 | 32, lm_head=True,
                                        x_pad=0)
    assert_dot_close(mem.view(y), want, bound)


def _lm_head_sample(fmt, V, T, plant):
    """A last-token LM head (norm prologue, D = 256) -> greedy SAMPLE program over V logits, as
    decode (T = 1) and prefill (T > 1) programs have it. plant(w, xin) sets weight rows of w [V, D]
    (xin: the last token's normed x). Returns mem, the program, its consts and the x, logits and
    ring refs."""
    from test_cpu_kernels import (ARGMAX_BLOCK, Dispatch, GemvArgs, K_LM_HEAD, K_SAMPLE, Mem, OUTPUT, SCRATCH,
                                  SampleArgs, StepArgs, WEIGHTS, dispatch, put_matrix, rand)
    from lattice import reference as ref
    rng = np.random.default_rng(V + T + fmt)
    D = 256
    x, norm_w, w = rand(rng, T, D), rand(rng, D), rand(rng, V, D, scale=0.1)
    plant(w, ref.rms_norm(x[-1:], norm_w, 1e-5, False)[0])
    mem = Mem(StepArgs(n_tokens=T, ring_cap=4, temperature=0.0, top_p=1.0, repetition_penalty=1.0))
    wq, ws, wm, _ = put_matrix(mem, w, fmt)
    rx, rn = mem.put(SCRATCH, x), mem.put(WEIGHTS, norm_w)
    logits, parts = mem.zeros(SCRATCH, (1, V)), mem.zeros(SCRATCH, (-(-V // ARGMAX_BLOCK), 4))
    ring, ring_lp, work = mem.zeros(OUTPUT, 4, np.uint32), mem.zeros(OUTPUT, 4), mem.zeros(SCRATCH, 2 * V)
    head = bytes(GemvArgs(wformat=fmt, rows=V, cols=D, flags=1, x_stride=D, y_stride=V, eps=1e-5))
    head += b"\0" * (-len(head) % 16)
    consts = head + bytes(SampleArgs(vocab=V, logits_stride=V))
    prog = (Dispatch * 2)(
        dispatch(K_LM_HEAD, [rx, logits, wq, ws, wm, rn, None, None, parts]),
        dispatch(K_SAMPLE, [logits, parts, None, None, None, ring, ring_lp, work], 0, len(head)))
    mem.build()
    return mem, prog, consts, rx, logits, ring


@pytest.mark.parametrize("fmt", [2, 1])  # Q8, F16 (4 and 6 rows per warp in k_gemv_stream)
@pytest.mark.parametrize("V", [1000, 32000])
@pytest.mark.parametrize("T", [1, 3])
def test_lm_head_partials_ties_into_sampler(lib, fmt, V, T):
    """LM head -> greedy SAMPLE. 32,000 rows stream through k_gemv_stream (GPUs of up to 250 SMs),
    whose blocks write the sampler's partials themselves: two kernels a step (eager, counted), and
    more block partials than PARTIALS holds (125); 1,000 rows take k_gemv and k_partials (three).
    The max logit is planted at 40 ids (equal weight rows: equal logits) from mid-vocabulary on,
    the lowest three in lanes 0, 1 and 3 of one warp (a row group starts at a multiple of 12), so
    the lowest id must win whichever block, warp, lane or pass stored it; just above the other
    logits, which then weigh in the logprob through every block's rescaled sum. A second run of the
    same program (graph replay at T = 1) negates x: the max moves to 40 other ids. Token and
    logprob against the logits the GPU wrote."""
    from test_cpu_kernels import OK
    rng = np.random.default_rng(V + T)
    lo = V // 24 * 12 + 12 * int(rng.integers(0, 8))
    up = np.array([lo, lo + 1, lo + 3, *rng.choice(np.arange(lo + 4, V), 37, replace=False)])
    down = rng.choice(np.setdiff1d(np.arange(V), up), 40, replace=False)

    def plant(w, xin):
        rest = np.abs(xin.astype(np.float64) @ w.T.astype(np.float64)).max()
        row = (rest + 2) / np.abs(xin).sum() * np.sign(xin)  # logit ~ the others' largest |logit| + 2
        w[up], w[down] = row, -row

    mem, prog, consts, rx, logits, ring = _lm_head_sample(fmt, V, T, plant)
    err, where = ctypes.c_int(), ctypes.c_uint32()
    h = lib.lt_cpu_create(prog, 2, consts, len(consts), mem.ptrs, mem.sizes, 1, ctypes.byref(err),
                          ctypes.byref(where))
    assert h is not None, (err.value, where.value)
    try:
        for run, ids in enumerate([up, down]):
            if run:
                mem.view(rx)[:] *= -1
                mem.step.n_tokens = T  # the first run left 1
            lib.so.lt_cuda_set_eager(h.be.h, int(run == 0))
            assert lib.lt_cpu_run(h, 1) == OK
            if run == 0:
                counters = lcuda.Counters()
                lib.so.lt_cuda_counters_get(h.be.h, ctypes.byref(counters))
                assert counters.kernel_launches == (2 if V > 1000 else 3)
            got = mem.view(logits)[0].astype(np.float64)
            assert list(np.flatnonzero(got == got.max())) == sorted(ids)  # the planted ties
            st = mem.step
            assert st.token == min(ids) and mem.view(ring)[run] == min(ids) and st.step == run + 1
            assert st.next_logprob == pytest.approx(-np.log(np.exp(got - got.max()).sum()), abs=1e-5)
    finally:
        lib.lt_cpu_free(h)


@pytest.mark.parametrize("V", [1000, 32000])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_lm_head_partials_nonfinite_logit(lib, V, bad):
    """One NaN / +Inf / -Inf logit late in the vocabulary (F16 weights): the sampler raises the
    non-finite error whether k_partials or k_gemv_stream's blocks counted it, and emits nothing."""
    from test_cpu_kernels import ERR_NONFINITE

    def plant(w, xin):
        w[3 * V // 4 + 5] = bad * np.sign(xin)

    mem, prog, consts, _, logits, ring = _lm_head_sample(1, V, 1, plant)
    err, where = ctypes.c_int(), ctypes.c_uint32()
    h = lib.lt_cpu_create(prog, 2, consts, len(consts), mem.ptrs, mem.sizes, 1, ctypes.byref(err),
                          ctypes.byref(where))
    assert h is not None, (err.value, where.value)
    try:
        assert lib.lt_cpu_run(h, 1) == ERR_NONFINITE
    finally:
        lib.lt_cpu_free(h)
    assert not np.isfinite(mem.view(logits)[0, 3 * V // 4 + 5])
    assert mem.step.step == 0 and mem.step.pos == 0 and (mem.view(ring) == 0).all()


def test_missing_nvcc_is_a_backend_error(monkeypatch, tmp_path):
    monkeypatch.setattr(lcuda, "_lib", None)
    monkeypatch.setenv("LATTICE_NVCC", str(tmp_path / "no-nvcc"))
    with pytest.raises(BackendError, match="LATTICE_NVCC"):
        lcuda.load_library()
    monkeypatch.delenv("LATTICE_NVCC")
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(lcuda, "NVCC_DEFAULT", str(tmp_path / "nvcc"))
    with pytest.raises(BackendError, match="needs nvcc"):
        lcuda.load_library()


def test_available_reports_a_reason():
    ok, why = lcuda.available()
    assert isinstance(ok, bool) and why


# ---------------------------------------------------------------------------------------------- programs

_built = {}


def _program(fixture, quant, context=48):
    key = (fixture, quant, context)
    if key not in _built:
        ck = open_checkpoint(os.path.join(FIXTURES, fixture))
        _built[key] = build(ck, quant=quant, context=context, prefill_chunk=5, logits_chunk=3)
    return _built[key]


def _cpu(prog):
    from lattice._runtime import Runtime
    rt = Runtime(prog, n_threads=1)
    return rt, rt.new_state()


def _gpu(prog, steps=8):
    from lattice._runtime import Runtime, cuda_backend
    rt = Runtime(prog, backend=cuda_backend(steps=steps))
    return rt, rt.new_state()


def _prompt(prog, n, seed=0):
    return [int(t) for t in np.random.default_rng(seed).integers(0, prog.vocab, n)]


def _same_greedy(cpu, st, prompt, want, got):
    """Greedy tokens agree, or first differ where the CPU's top two logits are within rounding."""
    for i, (a, b) in enumerate(zip(want, got)):
        if a != b:
            logits = cpu.logits(st, prompt + want[:i])[-1]
            gap = abs(float(logits[a]) - float(logits[b]))
            assert gap <= 1e-3 * float(np.abs(logits).max()), (i, a, b, gap)
            return
    assert len(want) == len(got)


@needs_gpu
@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("fixture", TINY)
def test_program_matches_cpu_backend(fixture, quant):
    prog = _program(fixture, quant)
    cpu, st = _cpu(prog)
    gpu, gs = _gpu(prog, steps=4)
    prompt = _prompt(prog, 11)
    want, got = cpu.logits(st, prompt), gpu.logits(gs, prompt)
    assert np.abs(got - want).max() <= 2e-3 * np.abs(want).max()
    rc, rg = cpu.generate(st, prompt, 20), gpu.generate(gs, prompt, 20)
    _same_greedy(cpu, st, prompt, rc["tokens"], rg["tokens"])
    assert np.allclose(rc["logprobs"][:3], rg["logprobs"][:3], atol=2e-3)
    sp = SamplingParams(temperature=0.9, top_k=20, top_p=0.9, min_p=0.02, repetition_penalty=1.2, seed=7)
    assert cpu.generate(st, prompt, 16, sampling=sp)["tokens"] == gpu.generate(gs, prompt, 16, sampling=sp)["tokens"]


@needs_gpu
@pytest.mark.parametrize("params", [
    dict(temperature=1.0, seed=1), dict(temperature=0.7, top_k=5, seed=2), dict(temperature=1.3, top_p=0.5, seed=3),
    dict(temperature=0.8, min_p=0.1, seed=4), dict(temperature=0.0, repetition_penalty=1.5, frequency_penalty=0.3,
                                                   presence_penalty=0.2)])
def test_device_sampler_matches_cpu_sampler(params):
    prog = _program("tiny-qwen3", "q8")
    cpu, st = _cpu(prog)
    gpu, gs = _gpu(prog)
    prompt = _prompt(prog, 6, seed=5)
    sp = SamplingParams(**params)
    rc, rg = cpu.generate(st, prompt, 24, sampling=sp), gpu.generate(gs, prompt, 24, sampling=sp)
    assert rc["tokens"] == rg["tokens"]
    assert np.allclose(rc["logprobs"], rg["logprobs"], atol=2e-3)


@needs_gpu
@pytest.mark.parametrize("fixture", ["tiny-llama", "tiny-qwen35"])
def test_eager_launches_match_graph_replay(fixture, monkeypatch):
    prog = _program(fixture, "q4")
    prompt = _prompt(prog, 7, seed=3)
    sp = SamplingParams(temperature=0.8, top_k=30, seed=11)
    graph, gs = _gpu(prog)
    want = graph.generate(gs, prompt, 25, sampling=sp)
    monkeypatch.setenv("LATTICE_CUDA_EAGER", "1")  # read when the backend's handle is created
    eager, es = _gpu(prog)
    got = eager.generate(es, prompt, 25, sampling=sp)
    assert got["tokens"] == want["tokens"]
    c = es.counters()
    assert c["submissions"] == 0 and c["api_calls"] > c["dispatches_per_step"] * c["steps"] > 0


@needs_gpu
def test_nop_diagnostic_empties_named_decode_kernels(monkeypatch):
    """LATTICE_CUDA_NOP (a measuring aid: the named decode kernels become empty ones) changes the
    decode steps and only them; an unknown kernel kind is rejected by name."""
    prog = _program("tiny-qwen35", "q8")
    prompt = _prompt(prog, 5, seed=2)  # one prefill chunk (T = 5): its first token is not emptied
    gpu, gs = _gpu(prog)
    want = gpu.generate(gs, prompt, 10)
    monkeypatch.setenv("LATTICE_CUDA_NOP", "gdn,gemv_split")  # read when the backend's handle is created
    nop, ns = _gpu(prog)
    got = nop.generate(ns, prompt, 10)
    assert got["tokens"][0] == want["tokens"][0] and abs(got["logprobs"][0] - want["logprobs"][0]) < 1e-6
    assert np.abs(np.array(got["logprobs"][1:]) - np.array(want["logprobs"][1:])).max() > 1e-3
    monkeypatch.setenv("LATTICE_CUDA_NOP", "gdn,bogus")
    with pytest.raises(BackendError, match="unknown kernel kind 'bogus'"):
        _gpu(prog)


@needs_gpu
@pytest.mark.parametrize("fixture", ["tiny-qwen2", "tiny-qwen35"])
def test_stop_discards_overshoot_and_session_continues(fixture):
    """A stop inside a queued submission: tokens after it are dropped, and the next call (prefix
    reuse on KV models, a restart on recurrent ones) still matches the CPU backend."""
    prog = _program(fixture, "q8")
    cpu, st = _cpu(prog)
    gpu, gs = _gpu(prog)
    prompt = _prompt(prog, 5, seed=9)
    free = cpu.generate(st, prompt, 12)["tokens"]
    stop = free[4]
    first = free.index(stop)
    rc, rg = cpu.generate(st, prompt, 12, stop_ids=[stop]), gpu.generate(gs, prompt, 12, stop_ids=[stop])
    assert rg["tokens"] == rc["tokens"] == free[:first] and rg["finish_reason"] == "stop"
    follow = prompt + rg["tokens"] + _prompt(prog, 3, seed=10)
    rc, rg = cpu.generate(st, follow, 8), gpu.generate(gs, follow, 8)
    _same_greedy(cpu, st, follow, rc["tokens"], rg["tokens"])


@needs_gpu
@pytest.mark.parametrize("fixture,fuse,defer", [("tiny-llama", "1", ""), ("tiny-qwen3", "1", ""),
                                                ("tiny-qwen35", "1", ""), ("tiny-qwen35", "0", ""),
                                                ("tiny-qwen35", "1", "1"), ("tiny-llama", "1", "0")])
def test_rope_fused_into_attention_past_one_split(monkeypatch, fixture, fuse, defer):
    """Decode fuses each ROPE_KV into the ATTENTION after it (the program keeps the rope's inputs
    live through the attention, so its output cannot overwrite rows other blocks still read;
    Qwen3.5: q|gate heads, qk-norm, partial rotary), unless LATTICE_CUDA_ROPE_FUSE=0; positions
    past 256 (the decode split of these head sizes) use two splits of the cache. The o-projection
    combines the splits (LATTICE_CUDA_ATT_DEFER: up to 8 by default; with 1 the generation crosses
    from the GEMV's combine to the attention's at position 256; 0: the attention's always)."""
    monkeypatch.setenv("LATTICE_CUDA_ROPE_FUSE", fuse)  # read when the backend's handle is created
    monkeypatch.setenv("LATTICE_CUDA_ATT_DEFER", defer)
    prog = _program(fixture, "q8", context=600)
    cpu, st = _cpu(prog)
    gpu, gs = _gpu(prog)
    prompt = _prompt(prog, 270, seed=4)
    rc, rg = cpu.generate(st, prompt, 30), gpu.generate(gs, prompt, 30)
    _same_greedy(cpu, st, prompt, rc["tokens"], rg["tokens"])
    ropes = sum(1 for kind, *_ in prog.notes["decode"] if kind == "qk_rope_kv")
    n = len(prog.dispatches["decode"])
    assert ropes and gs.counters()["dispatches_per_step"] == (n - ropes if fuse == "1" else n)


@needs_gpu
def test_context_limit_and_errors():
    prog = _program("tiny-llama", "q8", context=16)
    cpu, st = _cpu(prog)
    gpu, gs = _gpu(prog)
    prompt = _prompt(prog, 10, seed=1)
    rc, rg = cpu.generate(st, prompt, 50), gpu.generate(gs, prompt, 50)
    assert rg["finish_reason"] == rc["finish_reason"] == "context"
    _same_greedy(cpu, st, prompt, rc["tokens"], rg["tokens"])
    with pytest.raises(TokenizerError):
        gpu.generate(gs, [prog.vocab], 4)
    with pytest.raises(ContextLengthError):
        gpu.generate(gs, _prompt(prog, 17), 4)


@needs_gpu
def test_program_rejected_with_dispatch_index():
    prog = _program("tiny-llama", None)
    be = lcuda.CudaBackend([max(int(prog.sizes[k]), 64) for k in ("weights", "state", "scratch", "step", "output")]
                           + [0])
    bad = prog.dispatches["decode"].copy()
    bad[2]["bind"][0]["offset"] = 1 << 31
    with pytest.raises(BackendError, match="dispatch 2"):
        be.add_program(bad, prog.consts, 1)
    be.close()


@needs_gpu
def test_copy_and_zero_within_an_arena():
    """lt_cuda_copy / lt_cuda_zero (the runtime's recurrent-state snapshot and resets, on the
    device): queued after earlier work; ranges outside the arena, or a copy onto itself, are
    LT_ERR_BINDING (5)."""
    be, so = lcuda.CudaBackend([64, 4096, 64, 64, 64, 0]), lcuda.load_library()
    data = np.arange(1024, dtype=np.uint32)
    assert so.lt_cuda_write(be.h, lcuda.STATE, 0, data.ctypes.data, 2048) == 0
    assert so.lt_cuda_copy(be.h, lcuda.STATE, 2048, 0, 2048) == 0
    assert so.lt_cuda_zero(be.h, lcuda.STATE, 0, 1024) == 0
    out = np.empty(1024, dtype=np.uint32)
    assert so.lt_cuda_read(be.h, lcuda.STATE, 0, out.ctypes.data, 4096) == 0
    want = np.concatenate([np.zeros(256, np.uint32), data[256:512], data[:512]])
    np.testing.assert_array_equal(out, want)
    for bad in (lambda: so.lt_cuda_copy(be.h, lcuda.STATE, 4000, 0, 100),  # dst past the end
                lambda: so.lt_cuda_copy(be.h, lcuda.STATE, 0, 4000, 100),  # src past the end
                lambda: so.lt_cuda_copy(be.h, lcuda.STATE, 100, 0, 200),   # overlapping
                lambda: so.lt_cuda_copy(be.h, lcuda.N_ARENAS, 0, 64, 8),   # no such arena
                lambda: so.lt_cuda_zero(be.h, lcuda.STATE, 4000, 200),
                lambda: so.lt_cuda_zero(be.h, lcuda.CONST, 0, 8)):         # empty arena
        assert bad() == 5
    be.close()


SMOLLM2 = os.path.expanduser("~/.cache/lattice/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf")


@needs_gpu
@pytest.mark.skipif(not os.path.exists(SMOLLM2), reason="SmolLM2 GGUF not in the local cache (the GPU machine "
                                                         "has no network); tests/gpu/run_gpu_tests.sh uses a "
                                                         "shape-exact random SmolLM2 there")
def test_smollm2_matches_cpu_backend():
    prog = build(open_checkpoint(SMOLLM2), context=256)
    cpu, st = _cpu(prog)
    gpu, gs = _gpu(prog, steps=16)
    prompt = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 30]
    rc, rg = cpu.generate(st, prompt, 32), gpu.generate(gs, prompt, 32)
    _same_greedy(cpu, st, prompt, rc["tokens"], rg["tokens"])


# ---------------------------------------------------------------------------------------------- GDN prefill

@pytest.mark.parametrize("T", [2, 37, 100])
@pytest.mark.parametrize("Hk,Hv,Dk,Dv", [(2, 4, 128, 128), (3, 3, 64, 40), (1, 2, 96, 64), (1, 1, 512, 24),
                                         (2, 2, 32, 256), (1, 3, 256, 128)])
def test_gdn_prefill_scan(lib, T, Hk, Hv, Dk, Dv):
    """T > 1 takes the prefill path (per-token kernels around a scan of one lane group per state
    column) at every padded row count (32 to 512), over several token chunks of the scan; T = 2 is
    shorter than the conv state, so the state update keeps some of its old rows."""
    _check_gdn(lib, T, Hk, Hv, Dk, Dv)
