"""Metal kernels (metal/*.metal) run through the MSL emulator and compared with the numpy reference
kernels (lattice/reference.py), on random inputs with awkward sizes. Argument structs come from the
program builder's mirrors of metal/lattice_shared.h, so host and kernel layouts are the same bytes.
Bindings follow the header: [[buffer(0)]] args, [[buffer(1)]] step args, binding i at 2 + i."""
import os

import numpy as np
import pytest

from lattice import program, reference
from lattice.quant import quantize
from msl_emu import Library

METAL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "metal")
ERR_TOKEN = 2


def lib(name, sanitize=None):
    return Library(os.path.join(METAL, name), sanitize=sanitize)


@pytest.fixture(scope="module")
def embed_lib():
    return lib("embed.metal")


@pytest.fixture(scope="module")
def rmsnorm_lib():
    return lib("rmsnorm.metal")


@pytest.fixture(scope="module")
def gemv_lib():
    return lib("gemv.metal")


def args(kind, **fields):
    a = np.zeros(1, program.ARGS_DTYPES[kind][1])
    for k, v in fields.items():
        a[k] = v
    return a


def step_args(n_tokens):
    s = np.zeros(1, program.STEP_DTYPE)
    s["n_tokens"] = n_tokens
    return s


def weight_planes(w, fmt):
    """(planes WQ, WS, WM as the WEIGHTS arena holds them, the matrix the kernel should see)."""
    unused = np.zeros(16, np.uint8)  # Metal validation wants every declared buffer bound
    if fmt == "f32":
        return (w.astype(np.float32), unused, unused), w.astype(np.float32)
    if fmt == "f16":
        return (w.astype(np.float16), unused, unused), w.astype(np.float16).astype(np.float32)
    q = quantize(w, fmt)
    return (q.qs, q.scales, unused if q.mins is None else q.mins), q.dequantize()


def padded(rows, cols, stride, rng):
    """[rows, stride] float32 with random values in the first cols columns and NaN after (so a
    kernel that reads past cols is caught)."""
    a = np.full((rows, stride), np.nan, np.float32)
    a[:, :cols] = rng.standard_normal((rows, cols))
    return a


# ---------------------------------------------------------------- EMBED
@pytest.mark.parametrize("fmt", ["f32", "f16", "q8", "q4"])
@pytest.mark.parametrize("dim", [64, 70])
def test_embed_matches_reference(embed_lib, fmt, dim):
    rng = np.random.default_rng(dim)
    vocab, T, stride = 11, 3, dim + 5
    table = rng.standard_normal((vocab, dim)).astype(np.float32)
    (wq, ws, wm), seen = weight_planes(table, fmt)
    ids = np.array([4, 0, 10], np.uint32)
    out = np.full((T, stride), -7.0, np.float32)
    a = args("embed", wformat=program.WF[fmt], dim=dim, vocab=vocab, out_stride=stride, scale=0.5)
    embed_lib.dispatch("lt_embed", [a, step_args(T), ids, out, wq, ws, wm], (T + 1,), (32,))
    np.testing.assert_allclose(out[:, :dim], reference.embed(seen, ids) * 0.5, rtol=1e-6, atol=1e-6)
    assert (out[:, dim:] == -7).all()


def test_embed_token_out_of_range_sets_step_error(embed_lib):
    table = np.ones((4, 32), np.float32)
    (wq, ws, wm), _ = weight_planes(table, "f32")
    out = np.zeros((2, 32), np.float32)
    step = step_args(2)
    a = args("embed", wformat=0, dim=32, vocab=4, out_stride=32, scale=1.0)
    embed_lib.dispatch("lt_embed", [a, step, np.array([1, 4], np.uint32), out, wq, ws, wm], (2,), (32,))
    assert step["error"][0] == ERR_TOKEN
    assert (out[0] == 1).all() and (out[1] == 0).all()


# ---------------------------------------------------------------- RMSNORM
@pytest.mark.parametrize("n_heads,head_dim,threads", [(1, 1000, 256), (4, 48, 64), (3, 7, 32)])
@pytest.mark.parametrize("add_one", [False, True])
def test_rmsnorm_matches_reference(rmsnorm_lib, n_heads, head_dim, threads, add_one):
    rng = np.random.default_rng(head_dim)
    T, width = 3, n_heads * head_dim
    x = padded(T, width, width + 3, rng)
    w = rng.standard_normal(head_dim).astype(np.float32)
    out = padded(T, 0, width + 1, rng)
    a = args("rms_norm", n_heads=n_heads, head_dim=head_dim, in_stride=width + 3, out_stride=width + 1,
             z_stride=0, flags=int(add_one), eps=1e-6)
    rmsnorm_lib.dispatch("lt_rmsnorm", [a, step_args(T), x, out, w, np.zeros(4, np.float32)], (T,), (threads,))
    expected = reference.head_rms_norm(x[:, :width], w, n_heads, 1e-6, add_one)
    np.testing.assert_allclose(out[:, :width], expected, rtol=2e-5, atol=2e-5)
    assert np.isnan(out[:, width:]).all()


def test_rmsnorm_in_place_with_silu_gate(rmsnorm_lib):
    rng = np.random.default_rng(5)
    T, n_heads, d = 2, 2, 40
    x = rng.standard_normal((T, n_heads * d)).astype(np.float32)
    z = rng.standard_normal((T, n_heads * d)).astype(np.float32)
    w = rng.standard_normal(d).astype(np.float32)
    expected = reference.gated_rms_norm(x, z, w, n_heads, 1e-6)
    a = args("rms_norm", n_heads=n_heads, head_dim=d, in_stride=n_heads * d, out_stride=n_heads * d,
             z_stride=n_heads * d, flags=2, eps=1e-6)
    rmsnorm_lib.dispatch("lt_rmsnorm", [a, step_args(T), x, x, w, z], (T,), (64,))  # out aliases x
    np.testing.assert_allclose(x, expected, rtol=2e-5, atol=2e-5)


def test_rmsnorm_skips_rows_beyond_step_tokens(rmsnorm_lib):
    x = np.ones((4, 32), np.float32)
    out = np.full((4, 32), 9.0, np.float32)
    a = args("rms_norm", n_heads=1, head_dim=32, in_stride=32, out_stride=32, flags=0, eps=1e-6)
    rmsnorm_lib.dispatch("lt_rmsnorm", [a, step_args(2), x, out, np.ones(32, np.float32), x], (4,), (32,))
    np.testing.assert_allclose(out[:2], 1.0, rtol=1e-5)
    assert (out[2:] == 9).all()


# ---------------------------------------------------------------- ELEMENTWISE
@pytest.mark.parametrize("op", ["add", "silu_mul", "sigmoid_mul", "copy"])
def test_elementwise_matches_reference(op):
    rng = np.random.default_rng(len(op))
    T, n = 3, 300
    x, y = padded(T, n, n + 2, rng), padded(T, n, n + 5, rng)
    out = padded(T, 0, n + 1, rng)
    a = args("elementwise", op=program.EW_OP[op], n=n, a_stride=n + 2, b_stride=n + 5, out_stride=n + 1)
    lib("elementwise.metal").dispatch("lt_elementwise", [a, step_args(T), x, y, out], (T + 1,), (128,))
    ref = {"add": reference.add, "silu_mul": reference.silu_mul, "sigmoid_mul": reference.sigmoid_mul,
           "copy": lambda p, q: p}[op](x[:, :n], y[:, :n])
    np.testing.assert_allclose(out[:, :n], ref, rtol=1e-6, atol=1e-6)
    assert np.isnan(out[:, n:]).all()


def test_elementwise_output_may_alias_an_input():
    rng = np.random.default_rng(9)
    x, y = rng.standard_normal((1, 64)).astype(np.float32), rng.standard_normal((1, 64)).astype(np.float32)
    expected = reference.silu_mul(x, y)
    a = args("elementwise", op=program.EW_OP["silu_mul"], n=64, a_stride=64, b_stride=64, out_stride=64)
    lib("elementwise.metal").dispatch("lt_elementwise", [a, step_args(1), x, y, y], (1,), (32,))
    np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- GEMV
FLAG = program.GEMV_FLAG


def gemv_reference(x, w, norm_w, bias, resid, flags, eps):
    if flags & FLAG["norm"]:
        x = reference.rms_norm(x, norm_w, eps, bool(flags & FLAG["add_one"]))
    y = reference.linear(x, w, bias if flags & FLAG["bias"] else None)
    if flags & FLAG["silu_mul"]:
        y = reference.silu_mul(y[:, 0::2], y[:, 1::2])
    if flags & FLAG["resid"]:
        y = reference.add(resid, y)
    return y


def run_gemv(gemv_lib, fmt, rows, cols, T, flags, seed, sanitize_lib=None):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    (wq, ws, wm), seen = weight_planes(w, fmt)
    x = padded(T, cols, cols + 2, rng)
    n_out = rows // 2 if flags & FLAG["silu_mul"] else rows
    norm_w = rng.standard_normal(cols).astype(np.float32)
    bias = rng.standard_normal(rows).astype(np.float32)
    resid = padded(T, n_out, n_out + 1, rng)
    y = resid.copy() if flags & FLAG["resid"] else padded(T, 0, n_out + 1, rng)  # RESID aliases Y
    a = args("gemv", wformat=program.WF[fmt], rows=rows, cols=cols, flags=flags, x_stride=cols + 2,
             y_stride=n_out + 1, resid_stride=n_out + 1, eps=1e-5)
    grid, group = program._launch("gemv", dict(rows=rows), T)
    (sanitize_lib or gemv_lib).dispatch("lt_gemv", [a, step_args(T), x, y, wq, ws, wm, norm_w, bias, y],
                                        grid, group)
    expected = gemv_reference(x[:, :cols], seen, norm_w, bias, resid[:, :n_out], flags, 1e-5)
    return y, expected, n_out


@pytest.mark.parametrize("fmt", ["q8", "f32", "f16", "q4"])
@pytest.mark.parametrize("rows,cols,T", [(16, 64, 1), (13, 100, 2), (40, 1040, 1)])
def test_gemv_matches_reference(gemv_lib, fmt, rows, cols, T):
    y, expected, n_out = run_gemv(gemv_lib, fmt, rows, cols, T, 0, seed=rows * cols)
    np.testing.assert_allclose(y[:, :n_out], expected, rtol=1e-4, atol=1e-4 * np.sqrt(cols))
    assert np.isnan(y[:, n_out:]).all()


@pytest.mark.parametrize("flags", [
    FLAG["norm"] | FLAG["add_one"],
    FLAG["bias"] | FLAG["resid"],
    FLAG["silu_mul"],
    FLAG["norm"] | FLAG["bias"] | FLAG["silu_mul"] | FLAG["resid"],
])
def test_gemv_q8_prologue_and_epilogues(gemv_lib, flags):
    y, expected, n_out = run_gemv(gemv_lib, "q8", 22, 70, 2, flags, seed=flags)
    np.testing.assert_allclose(y[:, :n_out], expected, rtol=1e-4, atol=1e-3)


def test_gemv_q8_reads_stay_in_bounds_under_asan():
    asan = lib("gemv.metal", sanitize="address")
    flags = FLAG["norm"] | FLAG["silu_mul"] | FLAG["resid"] | FLAG["bias"]
    y, expected, n_out = run_gemv(None, "q8", 10, 45, 2, flags, seed=7, sanitize_lib=asan)
    np.testing.assert_allclose(y[:, :n_out], expected, rtol=1e-4, atol=1e-3)
