"""Tests of the MSL emulator itself (tests/msl_emu): kernels against numpy, and every class of kernel
bug it promises to report."""
import ctypes
import os

import numpy as np
import pytest

from msl_emu import (Library, MSLCompileError, MSLCompileWarning, MSLDispatchError, MSLKernelError,
                     MSLToolchainError, find_compiler)
from msl_emu import rewriter

KERNELS = os.path.join(os.path.dirname(__file__), "msl_emu", "kernels_selftest")


@pytest.fixture(scope="module")
def decode():
    return Library(os.path.join(KERNELS, "decode.metal"))


@pytest.fixture(scope="module")
def buggy():
    return Library(os.path.join(KERNELS, "buggy.metal"))


@pytest.fixture(scope="module")
def features():
    return Library(os.path.join(KERNELS, "features.metal"))


class RmsNormArgs(ctypes.Structure):
    _fields_ = [("n", ctypes.c_uint32), ("eps", ctypes.c_float)]


class CopyArgs(ctypes.Structure):
    _fields_ = [("n", ctypes.c_uint32), ("scale", ctypes.c_float)]


def rms_norm_ref(x, w, eps):
    xf = x.astype(np.float32)
    scale = 1.0 / np.sqrt((xf * xf).mean(axis=1, keepdims=True) + eps)
    return (xf * scale).astype(np.float16) * w


# ---------------------------------------------------------------- kernels against numpy
@pytest.mark.parametrize("rows,n,threads", [(3, 4096, 256), (2, 100, 64), (1, 33, 1024), (2, 7, 40)])
def test_rms_norm_matches_numpy(decode, rows, n, threads):
    rng = np.random.default_rng(rows * n)
    x = rng.standard_normal((rows, n)).astype(np.float16)
    w = rng.standard_normal(n).astype(np.float16)
    y = np.zeros_like(x)
    decode.dispatch("rms_norm", [x, w, y, RmsNormArgs(n, 1e-6)], (rows,), (threads,))
    np.testing.assert_allclose(y.astype(np.float32), rms_norm_ref(x, w, 1e-6).astype(np.float32),
                               rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("rows,k", [(64, 512), (6, 36)])
def test_gemv_f16_matches_numpy(decode, rows, k):
    rng = np.random.default_rng(k)
    W = rng.standard_normal((rows, k)).astype(np.float16)
    x = rng.standard_normal(k).astype(np.float32)
    y = np.full(rows, np.nan, np.float32)
    decode.dispatch("gemv_f16", [W, x, y, np.array([k // 4], np.uint32)], (rows // 2,), (64,))
    np.testing.assert_allclose(y, W.astype(np.float32) @ x, rtol=1e-4, atol=1e-3)


def test_softmax_matches_numpy(decode):
    rng = np.random.default_rng(1)
    rows, n, threads = 4, 1000, 128
    x = (rng.standard_normal((rows, n)) * 4).astype(np.float32)
    y = np.zeros((rows, n), np.float16)
    decode.dispatch("softmax_row", [x, y, np.array([n], np.uint32)], (rows,), (threads,),
                    threadgroup_memory=[threads * 4])
    e = np.exp(x - x.max(axis=1, keepdims=True))
    np.testing.assert_allclose(y.astype(np.float32), e / e.sum(axis=1, keepdims=True), rtol=1e-2, atol=1e-4)


def test_template_host_names():
    lib = Library(os.path.join(KERNELS, "templated.metal"))
    assert set(lib.kernels) == {"scale_add_f32", "scale_add_f16"}
    a = np.arange(64, dtype=np.float32)
    out = np.zeros_like(a)
    lib.dispatch("scale_add_f32", [a, out, ctypes.c_float(0.5)], (2,), (32,))
    np.testing.assert_array_equal(out, a * 0.5 + 1)
    ah, oh = a.astype(np.float16), np.zeros(64, np.float16)
    lib.dispatch("scale_add_f16", [ah, oh, ctypes.c_float(0.5)], (2,), (32,))
    np.testing.assert_array_equal(oh, (a * 0.5 + 2).astype(np.float16))
    with pytest.raises(MSLDispatchError, match="scale_add_f32: 128 threads per threadgroup > 64"):
        lib.dispatch("scale_add_f32", [a, out, ctypes.c_float(0.5)], (1,), (128,))


def test_half_arithmetic_rounds_every_operation(features):
    # half4(v) * 2.0h in half precision: exact doubling of the rounded value
    a = np.array([[1.0001, -3.3, 65504 / 2, 1e-4]], np.float32)
    p = np.zeros((1, 3), np.float32)
    out, hout, bits = np.zeros((3, 4), np.float32), np.zeros(4, np.float16), np.zeros(1, np.uint32)
    features.dispatch("vector_ops", [a, p, out, hout, bits], (1,), (1,))
    np.testing.assert_array_equal(hout, a[0].astype(np.float16) * np.float16(2))


# ---------------------------------------------------------------- semantics of the emulator
def test_bindings_carry_byte_offsets(features):
    # one arena holding the argument struct at byte 256, like an ICB command's constant buffer
    arena = np.zeros(512, np.uint8)
    arena[256:264] = np.frombuffer(bytes(CopyArgs(5, 3.0)), np.uint8)
    src = np.arange(16, dtype=np.float32)
    dst = np.full(16, -1.0, np.float32)
    features.dispatch("scaled_copy", [(src, 4 * 4), (dst, 8 * 4), (arena, 256)], (1,), (8,))
    np.testing.assert_array_equal(dst[8:13], src[4:9] * 3)
    assert (dst[:8] == -1).all() and (dst[13:] == -1).all()


def test_misaligned_offset_is_reported(features):
    src, dst = np.zeros(16, np.float32), np.zeros(16, np.float32)
    with pytest.raises(MSLKernelError, match=r"scaled_copy.*buffer\(0\) is not aligned to 4 bytes"):
        features.dispatch("scaled_copy", [(src, 2), dst, CopyArgs(4, 1.0)], (1,), (4,))


def test_constant_struct_larger_than_binding_is_reported(features):
    src, dst = np.zeros(16, np.float32), np.zeros(16, np.float32)
    with pytest.raises(MSLKernelError, match=r"buffer\(2\) holds 4 bytes after its offset; the parameter needs 8"):
        features.dispatch("scaled_copy", [src, dst, np.zeros(1, np.uint32)], (1,), (4,))


def test_dispatch_argument_errors(features, decode):
    src, dst = np.zeros(16, np.float32), np.zeros(16, np.float32)
    with pytest.raises(MSLDispatchError, match=r"scaled_copy: \[\[buffer\(2\)\]\] `args` is not bound"):
        features.dispatch("scaled_copy", [src, dst], (1,), (4,))
    with pytest.raises(MSLDispatchError, match="no kernel 'nope'"):
        features.dispatch("nope", [], (1,), (1,))
    with pytest.raises(MSLDispatchError, match="1025 threads per threadgroup > 1024"):
        features.dispatch("scaled_copy", [src, dst, CopyArgs(4, 1.0)], (1,), (1025,))
    with pytest.raises(MSLDispatchError, match="C-contiguous"):
        features.dispatch("scaled_copy", [src[::2], dst, CopyArgs(4, 1.0)], (1,), (4,))
    with pytest.raises(MSLDispatchError, match="offset 80 outside its 64 bytes"):
        features.dispatch("scaled_copy", [(src, 80), dst, CopyArgs(4, 1.0)], (1,), (4,))
    x, y = np.zeros((1, 16), np.float32), np.zeros((1, 16), np.float16)
    with pytest.raises(MSLDispatchError, match=r"\[\[threadgroup\(0\)\]\] `shmem` has no threadgroup memory"):
        decode.dispatch("softmax_row", [x, y, np.array([16], np.uint32)], (1,), (16,))
    with pytest.raises(MSLDispatchError, match="not a multiple of 16"):
        decode.dispatch("softmax_row", [x, y, np.array([16], np.uint32)], (1,), (16,), threadgroup_memory=[60])


def test_builtins_of_a_3d_dispatch(features):
    grid, tg = (3, 2, 2), (8, 5, 2)  # 80 threads per threadgroup: simdgroups of 32, 32, 16
    total = np.prod(grid) * np.prod(tg)
    out = np.zeros((total, 20), np.uint32)
    features.dispatch("builtins", [out], grid, tg)
    tpg = [g * t for g, t in zip(grid, tg)]
    z, y, x = np.meshgrid(*(np.arange(n) for n in tpg[::-1]), indexing="ij")
    x, y, z = x.ravel(), y.ravel(), z.ravel()
    lx, ly, lz = x % tg[0], y % tg[1], z % tg[2]
    tiitg = (lz * tg[1] + ly) * tg[0] + lx
    expected = np.stack([x, y, z, lx, ly, lz, x // tg[0], y // tg[1], z // tg[2],
                         np.full_like(x, np.prod(tg)), np.full_like(x, np.prod(grid)),
                         *(np.full_like(x, n) for n in tpg), tiitg, tiitg % 32, tiitg // 32,
                         np.full_like(x, 32), np.full_like(x, 3), np.full_like(x, 7)], axis=1)
    np.testing.assert_array_equal(out, expected)


def test_vector_types_and_swizzles(features):
    rng = np.random.default_rng(2)
    n = 5
    a = rng.standard_normal((n, 4)).astype(np.float32)
    p = rng.standard_normal((n, 3)).astype(np.float32)  # packed_float3: 12 bytes each
    out, hout = np.zeros((n, 3, 4), np.float32), np.zeros((n, 4), np.float16)
    bits = np.zeros(n, np.uint32)
    features.dispatch("vector_ops", [a, p, out, hout, bits], (1,), (n,))
    r = np.concatenate([a[:, [3, 2, 1]], p[:, :1]], axis=1)
    r[:, :2] += p[:, 1:]
    np.testing.assert_allclose(out[:, 0], np.abs(r), rtol=1e-6)
    np.testing.assert_allclose(out[:, 1], np.clip(a, -0.5, 0.5) + a + (1 - a) * 0.25, rtol=1e-6)
    third = np.stack([np.maximum(a[:, 0], a[:, 1]), np.minimum(a[:, 2], a[:, 3]), (a * a).sum(1),
                      a[:, 0] * a[:, 1] + a[:, 2]], axis=1)
    np.testing.assert_allclose(out[:, 2], third, rtol=1e-6)
    np.testing.assert_array_equal(bits, a[:, 0].view(np.uint32))


def test_simd_functions_with_partial_simdgroup(features):
    x = np.arange(40, dtype=np.float32) * 1.5 - 7
    out = np.zeros((40, 8), np.float32)
    features.dispatch("simd_ops", [x, out], (1,), (40,))
    for lo, hi in [(0, 32), (32, 40)]:
        v, o = x[lo:hi], out[lo:hi]
        lanes = np.arange(hi - lo)
        np.testing.assert_allclose(o[:, 0], v.sum())
        np.testing.assert_array_equal(o[:, 1], v.max())
        np.testing.assert_array_equal(o[:, 2], v.min())
        np.testing.assert_allclose(o[:, 3], np.cumsum(v) - v)
        np.testing.assert_allclose(o[:, 4], np.cumsum(v))
        np.testing.assert_array_equal(o[:, 5], v[3])
        np.testing.assert_array_equal(o[:, 6], v[lanes ^ 1])
        down = lanes + 4
        inside = down < 32
        np.testing.assert_array_equal(o[inside & (down < hi - lo), 7], v[down[inside & (down < hi - lo)]])
        np.testing.assert_array_equal(o[~inside, 7], v[~inside])
    # lanes 36..39 shuffle down from lanes 40..43, which do not exist: poison, not a stale value
    assert np.isnan(out[36:40, 7]).all()


def test_threadgroup_pointers_2d_arrays_and_simdgroup_barrier(features):
    x = np.random.default_rng(3).standard_normal((32, 32)).astype(np.float32)
    out, sums = np.zeros_like(x), np.zeros(32, np.float32)
    features.dispatch("transpose_tile", [x, out, sums], (1,), (32, 32))
    np.testing.assert_array_equal(out, x.T)
    np.testing.assert_allclose(sums, x.T.sum(axis=1), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- bugs the emulator reports
def test_reports_missing_barrier(buggy):
    with pytest.raises(MSLKernelError, match=r"kernel missing_barrier .*missing barrier: reads threadgroup "
                                             r"memory `t` byte 0, written by thread 0 after the last threadgroup_barrier "
                                             r"\(at buggy.metal:11\)"):
        buggy.dispatch("missing_barrier", [np.zeros(64, np.float32)], (1,), (64,))


def test_reports_write_racing_a_read(buggy):
    with pytest.raises(MSLKernelError, match=r"kernel overwrite_while_read .*missing barrier.*\(at buggy.metal:31\)"):
        buggy.dispatch("overwrite_while_read", [np.zeros(64, np.float32)], (1,), (64,))


def test_reports_uninitialised_threadgroup_memory(buggy):
    with pytest.raises(MSLKernelError, match=r"kernel uninitialised_read .*thread 0: reads threadgroup memory "
                                             r"`t` byte 252, which no thread .* has written .*\(at buggy.metal:21\)"):
        buggy.dispatch("uninitialised_read", [np.zeros(64, np.float32)], (1,), (64,))


def test_reports_early_return_before_barrier(buggy):
    y = np.zeros(128, np.float32)
    with pytest.raises(MSLKernelError, match=r"kernel early_return .*threadgroup \(1,0,0\): threads 36-63 exited "
                                             r"while threads 0-35 wait at threadgroup_barrier \(.*buggy.metal:46\)"):
        buggy.dispatch("early_return", [y, np.array([100], np.uint32)], (2,), (64,))


def test_reports_divergent_simdgroup_call(buggy):
    with pytest.raises(MSLKernelError, match=r"kernel divergent_simd .*divergent simdgroup call in simdgroup 0: "
                                             r"threads 0-15 wait at simd_sum \(.*buggy.metal:56\) while threads "
                                             r"16-31 exited"):
        buggy.dispatch("divergent_simd", [np.zeros(64, np.float32)], (1,), (64,))


def test_reports_mismatched_simd_calls_and_barriers(buggy):
    with pytest.raises(MSLKernelError, match=r"divergent simdgroup call .*simd_min .*simd_max"):
        buggy.dispatch("mismatched_simd", [np.zeros(32, np.float32)], (1,), (32,))
    with pytest.raises(MSLKernelError, match=r"threads wait at different barriers: thread 0 at threadgroup_barrier "
                                             r"\(.*buggy.metal:75\), thread 32 at threadgroup_barrier \(.*:77\)"):
        buggy.dispatch("mismatched_barriers", [np.zeros(64, np.float32)], (1,), (64,))


def test_reports_threadgroup_index_out_of_bounds(buggy):
    with pytest.raises(MSLKernelError, match=r"thread 32: index 32 out of bounds of threadgroup array `t` \(extent 32\) "
                                             r"\(at buggy.metal:87\)"):
        buggy.dispatch("threadgroup_overflow", [np.zeros(64, np.float32)], (1,), (64,))


def test_reports_stack_overflow_and_wild_access_instead_of_crashing(buggy):
    # (under MSL_EMU_SANITIZE=address, AddressSanitizer's own report of the same faults)
    with pytest.raises(MSLKernelError, match=r"kernel stack_overflow .*(stack overflow: more than \d+ KiB|stack-overflow)"):
        buggy.dispatch("stack_overflow", [np.zeros(4, np.float32)], (1,), (4,))
    with pytest.raises(MSLKernelError, match=r"kernel wild_read .*(segmentation fault at address|SEGV)"):
        buggy.dispatch("wild_read", [np.zeros(4, np.float32), np.zeros(4, np.float32)], (1,), (4,))
    buggy.dispatch("missing_barrier", [np.zeros(64, np.float32)], (1,), (1,))  # the process goes on


def test_reports_out_of_bounds_device_read_with_asan():
    lib = Library(os.path.join(KERNELS, "oob.metal"), sanitize="address")
    x, y = np.ones(64, np.float32), np.zeros(64, np.float32)
    with pytest.raises(MSLKernelError, match=r"kernel read_past_end \(oob.metal\): AddressSanitizer: "
                                             r"heap-buffer-overflow, READ of 4 bytes at oob.metal:9, "
                                             r"0 bytes past the end of buffer\(0\) `x` \(256 bytes\)"):
        lib.dispatch("read_past_end", [x, y], (2,), (32,))
    # in bounds, the same build runs and writes its results back into the caller's arrays
    lib.dispatch("read_past_end", [x, y], (2,), (31,))
    np.testing.assert_array_equal(y[:62], 1)


def test_randomized_order_exposes_order_dependent_kernel(buggy):
    n = 256
    x = np.arange(n, dtype=np.float32)
    expected = np.append(x[1:], 0)
    in_order = x.copy()
    buggy.dispatch("shift_in_place", [in_order, np.array([n], np.uint32)], (4,), (64,))
    np.testing.assert_array_equal(in_order, expected)  # index order hides the race
    shuffled = []
    for seed in range(3):
        y = x.copy()
        buggy.dispatch("shift_in_place", [y, np.array([n], np.uint32)], (4,), (64,), order_seed=seed)
        shuffled.append(y)
    assert any((y != expected).any() for y in shuffled)
    # same seed, same order: a failure can be replayed
    y = x.copy()
    buggy.dispatch("shift_in_place", [y, np.array([n], np.uint32)], (4,), (64,), order_seed=2)
    np.testing.assert_array_equal(y, shuffled[2])


def test_randomized_order_keeps_correct_kernels_correct(decode):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((5, 300)).astype(np.float16)
    w = rng.standard_normal(300).astype(np.float16)
    for seed in (11, 12):
        y = np.zeros_like(x)
        decode.dispatch("rms_norm", [x, w, y, RmsNormArgs(300, 1e-6)], (5,), (96,), order_seed=seed)
        np.testing.assert_allclose(y.astype(np.float32), rms_norm_ref(x, w, 1e-6).astype(np.float32),
                                   rtol=2e-3, atol=2e-3)


# ---------------------------------------------------------------- the rewriter and the build
def test_compile_errors_point_into_the_metal_file(tmp_path):
    src = tmp_path / "broken.metal"
    src.write_text("#include <metal_stdlib>\nusing namespace metal;\n\n"
                   "kernel void f(device float* y [[buffer(0)]], uint i [[thread_position_in_grid]])\n"
                   "{\n    y[i] = undefined_name;\n}\n")
    with pytest.raises(MSLCompileError, match=r"broken.metal:6:12: error: use of undeclared identifier"):
        Library(str(src))


@pytest.mark.parametrize("body,message", [
    ("kernel void f(device float* y) {}", r"parameter `device float\* y` has no \[\[buffer\(i\)\]\]"),
    ("kernel void f(device float* y [[stage_in]]) {}", r"unsupported parameter attribute \[\[stage_in\]\]"),
    ("kernel void f(device float* y [[buffer(31)]]) {}", "buffer index 31 >= 31"),
    ("template <typename T> kernel void f(device T* y [[buffer(0)]]) {}", "template kernel f has no"),
    ("kernel void f(device float* y [[buffer(0)]]) { threadgroup float a[2], b[2]; }", "unsupported use of `threadgroup`"),
])
def test_rewriter_rejects_unsupported_msl(body, message):
    with pytest.raises(rewriter.RewriteError, match=message):
        rewriter.convert(body, "x.metal")


def test_rewriter_keeps_line_numbers_and_blanks_comments():
    src = "// threadgroup in a comment\n/* kernel void g(\n */ kernel void f(device half* y [[buffer(0)]])\n{ y[0] = 1.5h; }\n"
    cpp, kernels = rewriter.convert(src, "x.metal")
    body = cpp.split('#line 1 "x.metal"\n')[1]
    assert body.split("\n")[3] == "{ y[0] = half(1.5); }"
    assert [k.name for k in kernels] == ["f"]


def test_build_is_cached_by_content(tmp_path):
    src = tmp_path / "k.metal"
    src.write_text(open(os.path.join(KERNELS, "templated.metal")).read())
    first = Library(str(src))
    built_at = os.stat(first.so_path).st_mtime_ns
    again = Library(str(src))
    assert again.so_path == first.so_path and os.stat(again.so_path).st_mtime_ns == built_at
    src.write_text(src.read_text().replace("float(BIAS)", "float(BIAS) + 1.0f"))
    changed = Library(str(src))
    assert changed.so_path != first.so_path
    a, out = np.arange(32, dtype=np.float32), np.zeros(32, np.float32)
    changed.dispatch("scale_add_f32", [a, out, ctypes.c_float(1.0)], (1,), (32,))
    np.testing.assert_array_equal(out, a + 2)


def test_scalar_threadgroup_variables_references_and_atomics(features):
    x = np.random.default_rng(6).standard_normal(64).astype(np.float32)
    out, counter = np.zeros(5, np.float32), np.array([5], np.uint32)
    features.dispatch("misc", [x, out, counter], (3,), (32,))
    np.testing.assert_allclose(out, [x.max(), 64, 65504, np.e, 8], rtol=1e-6)
    assert counter[0] == 5 + 3 * 32 * 2


def test_msl_emu_cxx_picks_the_compiler(tmp_path, monkeypatch):
    def fake_clang(name, major):
        path = tmp_path / name
        path.write_text(f"#!/bin/sh\necho 'Debian clang version {major}.0.6'\n")
        path.chmod(0o755)
        return str(path)
    monkeypatch.setenv("MSL_EMU_CXX", fake_clang("clang++-old", 14))
    with pytest.raises(MSLToolchainError, match=r"needs clang\+\+ >= 16 \(found: .*clang\+\+-old \(clang version 14\)"):
        find_compiler.__wrapped__()
    monkeypatch.setenv("MSL_EMU_CXX", fake_clang("clang++-new", 17))
    assert find_compiler.__wrapped__()[0] == str(tmp_path / "clang++-new")


def test_compiler_warnings_are_reported_also_from_the_cache(tmp_path):
    # `kernel` is an MSL keyword: a shared header using it as a field name breaks the real compiler
    src = tmp_path / "w.metal"
    src.write_text("#include <metal_stdlib>\nstruct Record { uint kernel; uint flags; };\n"
                   "kernel void f(device Record* r [[buffer(0)]]) { r->flags = 1; }\n")
    for _ in range(2):
        with pytest.warns(MSLCompileWarning, match=r"w.metal:2:.*declaration does not declare anything"):
            Library(str(src))
