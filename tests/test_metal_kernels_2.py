"""The attention, Gated DeltaNet, lm_head and sampler Metal kernels (metal/*.metal) run through the
MSL emulator and compared with the numpy reference (lattice/reference.py) and, for the sampler,
with the CPU backend's sampler (lattice/csrc/sampler.c) token for token. Bindings follow
metal/lattice_shared.h: [[buffer(0)]] args, [[buffer(1)]] step args, binding i at 2 + i; launch
shapes come from lattice/program.py."""
import os

import numpy as np
import pytest

from lattice import program, reference
from lattice.quant import quantize
from msl_emu import Library

import test_cpu_kernels as cpu

METAL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "metal")
ERR_NONFINITE, ERR_CONTEXT, ERR_ARGS = 1, 3, 6
ROPE_QK_NORM, ROPE_NORM_ADD_ONE, ROPE_SPLIT_GATE = 1, 2, 4
UNUSED = np.zeros(16, np.uint8)  # Metal validation wants every declared buffer bound


def lib(name, sanitize=None):
    return Library(os.path.join(METAL, name), sanitize=sanitize)


@pytest.fixture(scope="module")
def rope_lib():
    return lib("rope_kv.metal")


@pytest.fixture(scope="module")
def attn_lib():
    return lib("attention.metal")


@pytest.fixture(scope="module")
def gdn_lib():
    return lib("gdn.metal")


@pytest.fixture(scope="module")
def lm_head_lib():
    return lib("lm_head.metal")


@pytest.fixture(scope="module")
def sample_lib():
    return lib("sample.metal")


def args(kind, **fields):
    a = np.zeros(1, program.ARGS_DTYPES[kind][1])
    for k, v in fields.items():
        a[k] = v
    return a


def step_args(n_tokens, pos=0, **fields):
    s = np.zeros(1, program.STEP_DTYPE)
    s["n_tokens"], s["pos"] = n_tokens, pos
    s["top_p"], s["repetition_penalty"] = 1.0, 1.0
    for k, v in fields.items():
        s[k] = v
    return s


def launch(kind, n_rows, **a):
    """(threadgroups, threads per threadgroup) the program builder gives a kernel."""
    return program._launch(kind, a, n_rows)


def padded(rows, cols, stride, rng):
    """[rows, stride] float32, random in the first cols columns and NaN after (a kernel reading
    past cols is caught)."""
    a = np.full((rows, stride), np.nan, np.float32)
    a[:, :cols] = rng.standard_normal((rows, cols))
    return a


# ---------------------------------------------------------------- ROPE_KV
def run_rope(rope_lib, T, pos, n_heads, n_kv, D, rotary, norm, split, seed, ctx=40, alias=False):
    rng = np.random.default_rng(seed)
    qw = n_heads * D * (2 if split else 1)
    q, k, v = padded(T, qw, qw + 3, rng), padded(T, n_kv * D, n_kv * D + 1, rng), padded(T, n_kv * D, n_kv * D + 2, rng)
    inv_freq = (1.0 / 10000.0 ** (np.arange(0, rotary, 2) / max(rotary, 1))).astype(np.float32)
    qn, kn = rng.standard_normal(D).astype(np.float32), rng.standard_normal(D).astype(np.float32)
    flags = (ROPE_QK_NORM | ROPE_NORM_ADD_ONE if norm else 0) | (ROPE_SPLIT_GATE if split else 0)
    q_in = q.copy()
    k_cache = np.full((n_kv, ctx, D), -3.0, np.float16)
    v_cache = np.full((n_kv, ctx, D), -3.0, np.float16)
    q_out = q if alias else padded(T, 0, n_heads * D + 1, rng)
    gate = padded(T, 0, n_heads * D, rng)
    a = args("qk_rope_kv", n_heads=n_heads, n_kv_heads=n_kv, head_dim=D, rotary_dim=rotary, q_stride=q.shape[1],
             k_stride=k.shape[1], v_stride=v.shape[1], q_out_stride=q_out.shape[1], gate_stride=gate.shape[1],
             ctx_cap=ctx, flags=flags, eps=1e-6)
    step = step_args(T, pos)
    grid, group = launch("qk_rope_kv", T + 1, n_heads=n_heads, n_kv_heads=n_kv)
    rope_lib.dispatch("lt_rope_kv", [a, step, q, k, v, q_out, k_cache, v_cache, inv_freq, qn, kn, gate], grid, group)
    return q_in, k, v, inv_freq, qn, kn, q_out, gate, k_cache, v_cache, step


@pytest.mark.parametrize("T,pos,n_heads,n_kv,D,rotary,norm,split", [
    (1, 0, 4, 2, 16, 16, False, False),        # Llama
    (3, 5, 4, 2, 16, 16, True, False),         # Qwen3: q/k norm
    (2, 1000, 2, 1, 24, 12, True, True),       # Qwen3.5: partial rotary, add_one norm, q|gate
    (1, 37, 3, 3, 70, 0, False, False),        # no rotation, D beyond the threadgroup width
])
def test_rope_kv_matches_reference(rope_lib, T, pos, n_heads, n_kv, D, rotary, norm, split):
    ctx = pos + T + 2
    q, k, v, inv_freq, qn, kn, q_out, gate, k_cache, v_cache, step = run_rope(
        rope_lib, T, pos, n_heads, n_kv, D, rotary, norm, split, seed=T * 100 + D, ctx=ctx)
    qw = n_heads * D
    q_src = q[:, :qw * (2 if split else 1)]
    if split:
        q_src, g_src = reference.split_heads(q_src, n_heads, [D, D])
        np.testing.assert_array_equal(gate[:, :qw], g_src)
    k_src = k[:, :k_cache.shape[0] * D]
    if norm:
        q_src = reference.head_rms_norm(q_src, qn, n_heads, 1e-6, True)
        k_src = reference.head_rms_norm(k_src, kn, n_kv, 1e-6, True)
    positions = np.arange(pos, pos + T)
    q_ref = reference.rope(q_src, positions, n_heads, D, rotary, inv_freq)
    k_ref = reference.rope(k_src, positions, n_kv, D, rotary, inv_freq)
    np.testing.assert_allclose(q_out[:, :qw], q_ref, rtol=1e-5, atol=2e-5)
    assert np.isnan(q_out[:, qw:]).all()
    kc = k_cache[:, pos:pos + T].transpose(1, 0, 2).reshape(T, -1).astype(np.float32)
    vc = v_cache[:, pos:pos + T].transpose(1, 0, 2).reshape(T, -1).astype(np.float32)
    np.testing.assert_allclose(kc, k_ref.astype(np.float16).astype(np.float32), rtol=1e-3, atol=1e-3)
    np.testing.assert_array_equal(vc, v[:, :vc.shape[1]].astype(np.float16).astype(np.float32))
    untouched = np.ones(ctx, bool)
    untouched[pos:pos + T] = False
    assert (k_cache[:, untouched] == -3).all() and (v_cache[:, untouched] == -3).all()


def test_rope_kv_q_out_may_alias_q(rope_lib):
    T, pos, n_heads, n_kv, D = 2, 3, 2, 1, 32
    rng = np.random.default_rng(1)
    q = padded(T, n_heads * D, n_heads * D + 3, rng)
    expected = reference.rope(reference.head_rms_norm(q[:, :n_heads * D], np.ones(D, np.float32), n_heads, 1e-6, False),
                              np.arange(pos, pos + T), n_heads, D, D,
                              (1.0 / 10000.0 ** (np.arange(0, D, 2) / D)).astype(np.float32))
    k, v = padded(T, D, D, rng), padded(T, D, D, rng)
    caches = [np.zeros((1, 8, D), np.float16) for _ in range(2)]
    inv_freq = (1.0 / 10000.0 ** (np.arange(0, D, 2) / D)).astype(np.float32)
    a = args("qk_rope_kv", n_heads=n_heads, n_kv_heads=n_kv, head_dim=D, rotary_dim=D, q_stride=q.shape[1],
             k_stride=D, v_stride=D, q_out_stride=q.shape[1], ctx_cap=8, flags=ROPE_QK_NORM, eps=1e-6)
    grid, group = launch("qk_rope_kv", T, n_heads=n_heads, n_kv_heads=n_kv)
    ones = np.ones(D, np.float32)
    rope_lib.dispatch("lt_rope_kv", [a, step_args(T, pos), q, k, v, q, *caches, inv_freq, ones, ones, UNUSED],
                      grid, group, order_seed=3)
    np.testing.assert_allclose(q[:, :n_heads * D], expected, rtol=1e-5, atol=2e-5)


def test_rope_angles_stay_accurate_at_large_positions(rope_lib):
    """f32 cannot hold position * inv_freq's fraction at 10^5; the kernel reduces modulo 2 pi."""
    T, pos, D = 1, 123457, 8
    q, k, v, inv_freq, qn, kn, q_out, gate, k_cache, v_cache, step = run_rope(
        rope_lib, T, pos, 1, 1, D, D, False, False, seed=4, ctx=pos + 1)
    q_ref = reference.rope(q[:, :D], [pos], 1, D, D, inv_freq)
    np.testing.assert_allclose(q_out[:, :D], q_ref, rtol=0, atol=5e-5)


def test_rope_kv_beyond_context_sets_error(rope_lib):
    q, k, v, inv_freq, qn, kn, q_out, gate, k_cache, v_cache, step = run_rope(
        rope_lib, 2, 7, 2, 1, 8, 8, False, False, seed=2, ctx=8)
    assert step["error"][0] == ERR_CONTEXT
    assert (k_cache == -3).all() and np.isnan(q_out).all()


# ---------------------------------------------------------------- ATTENTION
def run_attention(attn_lib, T, pos, n_heads, n_kv, D, gated, seed, ctx=None, order_seed=None, n_splits=1):
    rng = np.random.default_rng(seed)
    ctx = ctx or pos + T + 3
    k_cache = rng.standard_normal((n_kv, ctx, D)).astype(np.float16)
    v_cache = rng.standard_normal((n_kv, ctx, D)).astype(np.float16)
    k_cache[:, pos + T:] = np.nan  # positions beyond the query's must not be read
    v_cache[:, pos + T:] = np.nan
    q = padded(T, n_heads * D, n_heads * D + 2, rng) * 2
    g = padded(T, n_heads * D, n_heads * D + 1, rng)
    out = padded(T, 0, n_heads * D + 3, rng)
    scale = D ** -0.5
    a = args("attention", n_heads=n_heads, n_kv_heads=n_kv, head_dim=D, ctx_cap=ctx, q_stride=q.shape[1],
             out_stride=out.shape[1], gate_stride=g.shape[1], flags=int(gated), scale=scale)
    step = step_args(T, pos)
    grid, group = launch("attention", T + 1, n_heads=n_heads)
    # the backend's split workspace: a header of 4 floats, then [rows][n_heads][n_splits][D + 2]
    ws = np.full(4 + (T + 1) * n_heads * n_splits * (D + 2), np.nan, np.float32)
    buffers = [a, step, q, out, k_cache, v_cache, g if gated else UNUSED] + [UNUSED] * 7 + [ws]  # ws: slot 14
    attn_lib.dispatch("lt_attention", buffers, grid[:2] + (n_splits,), group, order_seed=order_seed)
    if n_splits > 1:
        attn_lib.dispatch("lt_attention_reduce", buffers, grid, (64, 1, 1), order_seed=order_seed)
    S = pos + T
    kf = k_cache[:, :S].astype(np.float32).transpose(1, 0, 2).reshape(S, -1)
    vf = v_cache[:, :S].astype(np.float32).transpose(1, 0, 2).reshape(S, -1)
    expected = reference.attention(q[:, :n_heads * D], kf, vf, pos, n_heads, n_kv, D, scale)
    if gated:
        expected = reference.sigmoid_mul(expected, g[:, :n_heads * D])
    return out, expected, step


@pytest.mark.parametrize("T,pos,n_heads,n_kv,D,gated", [
    (1, 0, 2, 1, 16, False),      # first token
    (1, 300, 4, 2, 16, True),     # decode: every simdgroup partition holds keys, output gate
    (1, 40, 2, 2, 70, False),     # head_dim not a multiple of 4 or 32, some partitions empty
    (3, 33, 4, 1, 8, True),       # causal prefill: three queries of one kv head
])
def test_attention_matches_reference(attn_lib, T, pos, n_heads, n_kv, D, gated):
    out, expected, step = run_attention(attn_lib, T, pos, n_heads, n_kv, D, gated, seed=pos + D)
    np.testing.assert_allclose(out[:, :n_heads * D], expected, rtol=1e-4, atol=1e-5)
    assert np.isnan(out[:, n_heads * D:]).all()


@pytest.mark.parametrize("T,pos,n_splits", [(1, 300, 4), (1, 10, 8), (3, 100, 3)])
def test_attention_split_across_threadgroups_matches_reference(attn_lib, T, pos, n_splits):
    """grid.z splits of the keys + lt_attention_reduce; (1, 10, 8): all keys in split 0, the
    other splits empty."""
    out, expected, step = run_attention(attn_lib, T, pos, 4, 2, 24, True, seed=pos, n_splits=n_splits,
                                        order_seed=n_splits)
    np.testing.assert_allclose(out[:, :4 * 24], expected, rtol=1e-4, atol=1e-5)
    assert np.isnan(out[:, 4 * 24:]).all()


def test_attention_result_does_not_depend_on_execution_order(attn_lib):
    a, _, _ = run_attention(attn_lib, 2, 70, 2, 1, 32, False, seed=3, order_seed=1)
    b, _, _ = run_attention(attn_lib, 2, 70, 2, 1, 32, False, seed=3, order_seed=2)
    np.testing.assert_array_equal(a, b)


def test_attention_beyond_context_sets_error(attn_lib):
    rng = np.random.default_rng(0)
    out = np.full((1, 16), 5.0, np.float32)
    a = args("attention", n_heads=1, n_kv_heads=1, head_dim=16, ctx_cap=4, q_stride=16, out_stride=16, scale=0.25)
    step = step_args(1, 4)
    cache = np.zeros((1, 4, 16), np.float16)
    attn_lib.dispatch("lt_attention", [a, step, rng.standard_normal((1, 16)).astype(np.float32), out, cache, cache]
                      + [UNUSED] * 9, (1, 1, 1), (256, 1, 1))
    assert step["error"][0] == ERR_CONTEXT and (out == 5).all()


# ---------------------------------------------------------------- GDN
def run_gdn(gdn_lib, T, n_k, n_v, Dk, Dv, Kc, seed, order_seed=None):
    rng = np.random.default_rng(seed)
    C = 2 * n_k * Dk + n_v * Dv
    x = padded(T, C, C + 3, rng)
    z, out = padded(T, n_v * Dv, n_v * Dv + 1, rng), padded(T, 0, n_v * Dv + 2, rng)
    pa, pb = padded(T, n_v, n_v + 1, rng), padded(T, n_v, n_v + 2, rng)
    conv_w = (rng.standard_normal((C, Kc)) * 0.5).astype(np.float32)
    conv_state = rng.standard_normal((Kc - 1, C)).astype(np.float32)
    a_log, dt_bias = rng.standard_normal(n_v).astype(np.float32), rng.standard_normal(n_v).astype(np.float32)
    S = (rng.standard_normal((n_v, Dk, Dv)) * 0.3).astype(np.float32)
    norm_w = rng.standard_normal(Dv).astype(np.float32)
    kd = n_k * Dk
    # expected, from the reference kernels chained as the Qwen3.5 family does
    y, conv_ref = reference.conv1d_silu(x[:, :C], conv_w, conv_state)
    q, k, v = reference.split(y, [kd, kd, n_v * Dv])
    o, s_ref = reference.gated_delta_rule(q, k, v, pa[:, :n_v], pb[:, :n_v], a_log, dt_bias, S, n_k, n_v, Dk, Dv)
    expected = reference.gated_rms_norm(o, z[:, :n_v * Dv], norm_w, n_v, 1e-6)
    a = args("gdn", n_k_heads=n_k, n_v_heads=n_v, k_dim=Dk, v_dim=Dv, conv_kernel=Kc, channels=C, q_offset=0,
             k_offset=kd, v_offset=2 * kd, x_stride=x.shape[1], z_stride=z.shape[1], a_stride=pa.shape[1],
             b_stride=pb.shape[1], out_stride=out.shape[1], norm_eps=1e-6)
    grid, group = launch("gdn", T, n_v_heads=n_v)
    gdn_lib.dispatch("lt_gdn", [a, step_args(T), x, z, pa, pb, out, conv_w, conv_state, a_log, dt_bias, S, norm_w],
                     grid, group, order_seed=order_seed)
    return (out, expected), (conv_state, conv_ref), (S, s_ref)


@pytest.mark.parametrize("T,n_k,n_v,Dk,Dv,Kc", [
    (1, 2, 2, 16, 16, 4),      # decode, one value head per key head
    (1, 2, 4, 8, 8, 4),        # decode, grouped value heads (tiny-qwen35's shape)
    (5, 1, 2, 12, 130, 3),     # scan longer than the conv state; v_dim beyond the threadgroup width
    (2, 1, 1, 40, 24, 4),      # scan shorter than the conv state
])
def test_gdn_matches_reference(gdn_lib, T, n_k, n_v, Dk, Dv, Kc):
    (out, expected), (conv, conv_ref), (S, s_ref) = run_gdn(gdn_lib, T, n_k, n_v, Dk, Dv, Kc, seed=T + Dv,
                                                            order_seed=T)
    np.testing.assert_allclose(out[:, :n_v * Dv], expected, rtol=2e-4, atol=2e-4)
    assert np.isnan(out[:, n_v * Dv:]).all()
    np.testing.assert_array_equal(conv, conv_ref)
    np.testing.assert_allclose(S, s_ref, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- LM_HEAD
FLAG = program.GEMV_FLAG


def weight_planes(w, fmt):
    """(planes WQ, WS, WM as the WEIGHTS arena holds them, the matrix the kernel should see)."""
    if fmt in ("f32", "f16"):
        wt = w.astype(np.float32 if fmt == "f32" else np.float16)
        return (wt, UNUSED, UNUSED), wt.astype(np.float32)
    q = quantize(w, fmt)
    return (q.qs, q.scales, UNUSED if q.mins is None else q.mins), q.dequantize()


def expected_partials(logits):
    out = []
    for b0 in range(0, logits.size, program.ARGMAX_BLOCK):
        blk = logits[b0:b0 + program.ARGMAX_BLOCK]
        fin = np.isfinite(blk)
        mx = blk[fin].max() if fin.any() else -np.inf
        arg = b0 + int(np.flatnonzero(blk == mx)[0]) if fin.any() else b0
        se = np.exp(blk[fin] - mx).sum() if fin.any() else 0.0
        out.append((mx, arg, se, int((~fin).sum())))
    return out


def run_lm_head(lm_head_lib, fmt, rows, cols, T, flags, seed, grid=None, x=None):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    (wq, ws, wm), seen = weight_planes(w, fmt)
    x = padded(T, cols, cols + 2, rng) if x is None else x
    norm_w, bias = rng.standard_normal(cols).astype(np.float32), rng.standard_normal(rows).astype(np.float32)
    n_out = T if flags & FLAG["all_tokens"] else 1
    y = padded(n_out, 0, rows + 1, rng)
    parts = np.zeros(-(-rows // program.ARGMAX_BLOCK), program.ARGMAX_PARTIAL_DTYPE)
    a = args("lm_head", wformat=program.WF[fmt], rows=rows, cols=cols, flags=flags, x_stride=x.shape[1],
             y_stride=rows + 1, eps=1e-5)
    g, group = launch("lm_head", T, rows=rows)
    lm_head_lib.dispatch("lt_lm_head", [a, step_args(T), x, y, wq, ws, wm, norm_w, bias, None, parts],
                         grid or g, group)
    xs = x[:, :cols] if flags & FLAG["all_tokens"] else x[T - 1:T, :cols]
    if flags & FLAG["norm"]:
        xs = reference.rms_norm(xs, norm_w, 1e-5, bool(flags & FLAG["add_one"]))
    expected = reference.linear(xs, seen, bias if flags & FLAG["bias"] else None)
    return y, expected, parts


@pytest.mark.parametrize("fmt,rows,cols,T,flags", [
    ("q8", 300, 64, 1, 0),
    ("q4", 520, 100, 2, FLAG["norm"] | FLAG["add_one"]),
    ("f16", 256, 40, 1, FLAG["bias"]),
    ("f32", 77, 1100, 3, FLAG["norm"] | FLAG["all_tokens"]),
])
def test_lm_head_matches_reference_with_partials(lm_head_lib, fmt, rows, cols, T, flags):
    y, expected, parts = run_lm_head(lm_head_lib, fmt, rows, cols, T, flags, seed=rows)
    np.testing.assert_allclose(y[:, :rows], expected, rtol=1e-4, atol=1e-4 * np.sqrt(cols))
    assert np.isnan(y[:, rows:]).all()
    for p, (mx, arg, se, bad) in zip(parts, expected_partials(y[-1, :rows])):
        assert p["max"] == mx and p["argmax"] == arg and p["n_nonfinite"] == bad
        np.testing.assert_allclose(p["sumexp"], se, rtol=1e-5)


def test_lm_head_launch_covers_the_vocab_in_few_threadgroups():
    """The kernel needs 256 threads (8 simdgroups x 32 rows = one partial block) and a grid of at
    least one threadgroup per block: 248,320 rows are 970 threadgroups, at most 8,192 launched."""
    grid, group = launch("lm_head", 1, rows=248320)
    assert group[0] == program.ARGMAX_BLOCK and -(-248320 // program.ARGMAX_BLOCK) <= grid[0] <= 8192


def test_lm_head_small_grid_strides_over_blocks(lm_head_lib):
    y, expected, parts = run_lm_head(lm_head_lib, "q8", 600, 32, 1, 0, seed=6, grid=(1, 1, 1))
    np.testing.assert_allclose(y[:, :600], expected, rtol=1e-4, atol=1e-3)
    assert [p["argmax"] for p in parts] == [a for _, a, _, _ in expected_partials(y[0, :600])]


def test_lm_head_partials_count_nonfinite_and_break_ties_low(lm_head_lib):
    rows, cols = 300, 32
    x = np.zeros((1, cols), np.float32)
    x[0, 0] = np.nan
    y, _, parts = run_lm_head(lm_head_lib, "f32", rows, cols, 1, 0, seed=1, x=x)
    assert [int(p["n_nonfinite"]) for p in parts] == [256, 44]
    assert [int(p["argmax"]) for p in parts] == [0, 256] and np.isneginf(parts["max"]).all()
    x[0, 0] = 0.0  # every logit 0: ties go to the lowest id of each block
    y, _, parts = run_lm_head(lm_head_lib, "f32", rows, cols, 1, 0, seed=1, x=x)
    assert [int(p["argmax"]) for p in parts] == [0, 256] and (parts["max"] == 0).all()
    np.testing.assert_array_equal(parts["sumexp"], [256, 44])


# ---------------------------------------------------------------- SAMPLE
@pytest.fixture(scope="module")
def cpu_lib():
    """The CPU backend's kernels, built as tests/test_cpu_kernels.py builds them (cached)."""
    return cpu.lib.__wrapped__()


SAMPLING = {
    "greedy": dict(temperature=0.0),
    "greedy_penalized": dict(temperature=0.0, repetition_penalty=1.3, presence_penalty=0.5,
                             frequency_penalty=0.25, penalty_last_n=3),
    "temperature": dict(temperature=0.8),
    "top_k": dict(temperature=1.2, top_k=5),
    "top_k_ties": dict(temperature=1.0, top_k=7),
    "top_p": dict(temperature=0.9, top_p=0.6),
    "min_p": dict(temperature=1.0, min_p=0.05),
    "everything": dict(temperature=0.7, top_k=40, top_p=0.9, min_p=0.02, repetition_penalty=1.1,
                       frequency_penalty=0.1, penalty_last_n=4),
}


def sample_case(V, seed, ties=False):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal(V) * 3).astype(np.float32)
    if ties:
        logits = np.round(logits).astype(np.float32)  # many equal values around the top-k threshold
    parts = np.zeros(-(-V // program.ARGMAX_BLOCK), program.ARGMAX_PARTIAL_DTYPE)
    for b, row in enumerate(expected_partials(logits)):
        parts[b] = row
    hist_cap = 8
    counts = np.zeros(V, np.uint32)
    hist = np.zeros(hist_cap, np.uint32)
    for i, tok in enumerate(rng.integers(0, V, 5)):  # an earlier history of 5 tokens
        counts[tok] += 1
        hist[i] = tok
    return logits, parts, counts, hist, hist_cap


def sample_on_cpu(cpu_lib, V, step_fields, T, ids, logits, parts, counts, hist, hist_cap):
    mem = cpu.Mem(cpu.StepArgs(**step_fields))
    refs = [mem.put(cpu.OUTPUT, logits), mem.put(cpu.SCRATCH, parts.view(np.uint8)), mem.put(cpu.STEP, ids),
            mem.put(cpu.STATE, counts), mem.put(cpu.STATE, hist), mem.zeros(cpu.OUTPUT, 4, np.uint32),
            mem.zeros(cpu.OUTPUT, 4, np.float32), mem.zeros(cpu.SCRATCH, 8 * V, np.uint8)]
    err = cpu.run_one(cpu_lib, mem, cpu.K_SAMPLE, cpu.SampleArgs(vocab=V, logits_stride=V, hist_cap=hist_cap), refs)
    return err, mem.step, [mem.view(r).copy() for r in refs[3:7]]


def sample_on_metal(sample_lib, V, step_fields, T, ids, logits, parts, counts, hist, hist_cap, order_seed=None):
    step = step_args(T)
    for k, v in step_fields.items():
        step[k] = v
    counts, hist = counts.copy(), hist.copy()
    ring, ring_lp = np.zeros(4, np.uint32), np.zeros(4, np.float32)
    a = args("sample", vocab=V, logits_stride=V, hist_cap=hist_cap)
    grid, group = launch("sample", 1)
    sample_lib.dispatch("lt_sample", [a, step, logits, parts, ids, counts, hist, ring, ring_lp,
                                      np.zeros(8 * V, np.uint8), UNUSED], grid, group, order_seed=order_seed)
    return step, [counts, hist, ring, ring_lp]


@pytest.mark.parametrize("mode", sorted(SAMPLING))
def test_sample_matches_cpu_sampler(sample_lib, cpu_lib, mode):
    """Same token, logprob, penalty history and ring as lattice/csrc/sampler.c, over several seeds."""
    V, T = 300, 2
    for seed in range(3):
        logits, parts, counts, hist, hist_cap = sample_case(V, seed, ties=mode == "top_k_ties")
        ids = np.array([7, 123], np.uint32)
        fields = dict(dict(n_tokens=T, pos=9, step=5 + seed, ring_cap=4, seed_lo=1234 + seed, seed_hi=99, n_seen=5,
                           top_p=1.0, repetition_penalty=1.0), **SAMPLING[mode])
        err, cpu_step, cpu_out = sample_on_cpu(cpu_lib, V, fields, T, ids, logits, parts, counts, hist, hist_cap)
        assert err == 0
        step, out = sample_on_metal(sample_lib, V, fields, T, ids, logits, parts, counts, hist, hist_cap,
                                    order_seed=seed)
        assert step["error"][0] == 0
        assert step["next_token"][0] == cpu_step.next_token == step["token"][0]
        for f in ("pos", "n_tokens", "step", "n_seen"):
            assert step[f][0] == getattr(cpu_step, f), f
        np.testing.assert_allclose(step["next_logprob"][0], cpu_step.next_logprob, rtol=1e-5, atol=1e-6)
        for got, want in zip(out[:3], cpu_out[:3]):  # counts, history, token ring
            np.testing.assert_array_equal(got, want)
        np.testing.assert_allclose(out[3], cpu_out[3], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["temperature", "top_p", "min_p", "everything_large_k"])
def test_sample_over_many_candidates_matches_cpu_sampler(sample_lib, cpu_lib, mode):
    """More than 1024 candidates take the threadgroup-wide path (sums in another order than the
    CPU's): the same tokens for these seeds, logprobs to rounding."""
    V = 3000
    params = dict(SAMPLING.get(mode, {}))
    if mode == "everything_large_k":
        params = dict(SAMPLING["everything"], top_k=2000, top_p=0.7)
    for seed in range(3):
        logits, parts, counts, hist, hist_cap = sample_case(V, 20 + seed)
        ids = np.array([11], np.uint32)
        fields = dict(dict(n_tokens=1, step=seed, ring_cap=4, seed_lo=99 + seed, seed_hi=1, n_seen=5, top_p=1.0,
                           repetition_penalty=1.0), **params)
        err, cpu_step, _ = sample_on_cpu(cpu_lib, V, fields, 1, ids, logits, parts, counts, hist, hist_cap)
        step, _ = sample_on_metal(sample_lib, V, fields, 1, ids, logits, parts, counts, hist, hist_cap)
        assert err == 0 and step["error"][0] == 0
        assert step["next_token"][0] == cpu_step.next_token
        np.testing.assert_allclose(step["next_logprob"][0], cpu_step.next_logprob, rtol=1e-4, atol=1e-5)


def test_sample_seeded_draws_cover_the_distribution(sample_lib, cpu_lib):
    """Over many steps (RNG counters) the Metal and CPU samplers agree token for token."""
    V = 40
    logits, parts, counts, hist, hist_cap = sample_case(V, 11)
    ids = np.array([3], np.uint32)
    picked = []
    for s in range(24):
        fields = dict(n_tokens=1, step=s, ring_cap=4, seed_lo=77, seed_hi=5, n_seen=5, temperature=1.5,
                      top_p=1.0, repetition_penalty=1.0)
        _, cpu_step, _ = sample_on_cpu(cpu_lib, V, fields, 1, ids, logits, parts, counts, hist, hist_cap)
        step, _ = sample_on_metal(sample_lib, V, fields, 1, ids, logits, parts, counts, hist, hist_cap)
        assert step["next_token"][0] == cpu_step.next_token
        picked.append(cpu_step.next_token)
    assert len(set(picked)) > 3  # the draws really vary with the step counter


def test_sample_nonfinite_logits_set_error(sample_lib):
    V = 300
    logits, parts, counts, hist, hist_cap = sample_case(V, 1)
    logits[299] = np.inf
    for b, row in enumerate(expected_partials(logits)):
        parts[b] = row
    step, (counts2, _, ring, _) = sample_on_metal(sample_lib, V, dict(temperature=0.0, ring_cap=4), 1,
                                                  np.array([1], np.uint32), logits, parts, counts, hist, hist_cap)
    assert step["error"][0] == ERR_NONFINITE and step["step"][0] == 0 and (ring == 0).all()


def test_sample_penalty_window_beyond_history_is_an_args_error(sample_lib):
    V = 64
    logits, parts, counts, hist, hist_cap = sample_case(V, 2)
    step, _ = sample_on_metal(sample_lib, V, dict(penalty_last_n=hist_cap + 1, repetition_penalty=1.2, ring_cap=4), 1,
                              np.array([1], np.uint32), logits, parts, counts, hist, hist_cap)
    assert step["error"][0] == ERR_ARGS and step["step"][0] == 0


# ---------------------------------------------------------------- AddressSanitizer
def test_kernels_stay_in_bounds_under_asan(cpu_lib):
    """Buffers are copied into exact-size blocks: a read or write past any binding's end fails."""
    run_rope(lib("rope_kv.metal", sanitize="address"), 2, 3, 2, 1, 24, 12, True, True, seed=1, ctx=5)
    attn_asan = lib("attention.metal", sanitize="address")
    for n_splits in (1, 3):
        out, expected, _ = run_attention(attn_asan, 2, 37, 2, 1, 12, True, seed=2, ctx=39, n_splits=n_splits)
        np.testing.assert_allclose(out[:, :24], expected, rtol=1e-4, atol=1e-5)
    (out, expected), _, _ = run_gdn(lib("gdn.metal", sanitize="address"), 2, 1, 2, 8, 8, 4, seed=3)
    np.testing.assert_allclose(out[:, :16], expected, rtol=2e-4, atol=2e-4)
    y, expected, _ = run_lm_head(lib("lm_head.metal", sanitize="address"), "q4", 260, 40, 1, FLAG["norm"], seed=4)
    np.testing.assert_allclose(y[:, :260], expected, rtol=1e-4, atol=1e-3)
    V = 70
    logits, parts, counts, hist, hist_cap = sample_case(V, 5)
    fields = dict(temperature=1.0, top_k=9, top_p=0.8, ring_cap=4, repetition_penalty=1.1, penalty_last_n=2)
    step, _ = sample_on_metal(lib("sample.metal", sanitize="address"), V, fields, 1, np.array([3], np.uint32),
                              logits, parts, counts, hist, hist_cap)
    _, cpu_step, _ = sample_on_cpu(cpu_lib, V, dict(fields, n_tokens=1), 1, np.array([3], np.uint32), logits, parts,
                                   counts, hist, hist_cap)
    assert step["error"][0] == 0 and step["next_token"][0] == cpu_step.next_token


# ---------------------------------------------------------------- the bridge's warm-up dispatch
@pytest.mark.parametrize("source,kernel,slots", [("rope_kv.metal", "lt_rope_kv", 10),
                                                 ("attention.metal", "lt_attention", 13),
                                                 ("attention.metal", "lt_attention_reduce", 13),
                                                 ("gdn.metal", "lt_gdn", 11), ("lm_head.metal", "lt_lm_head", 9),
                                                 ("sample.metal", "lt_sample", 9)])
def test_all_zero_warm_up_dispatch_does_nothing(source, kernel, slots):
    """objc/lattice_metal.mm makes pipelines resident with one 1-thread threadgroup and every slot
    on one zero buffer (step.n_tokens == 0): the kernel must neither fault nor write."""
    zeros = np.zeros(4096, np.uint8)
    lib(source).dispatch(kernel, [zeros] * (2 + slots), (1, 1, 1), (1, 1, 1))
    assert not zeros.any()
