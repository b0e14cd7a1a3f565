"""The Metal bridge (objc/lattice_metal.mm) on Linux: built with GCC's Objective-C++ and GNUstep
against the test-only Metal header, run through the fake Metal (tests/metal_fake), which executes
kernels with the MSL emulator and enforces the documented ICB rules.

A small hand-made program (embed, rmsnorm, lm_head, an independent elementwise copy, sample) and
the tiny Qwen3.5 and Llama fixtures' programs are replayed by the bridge and by the CPU backend:
tokens (and step args) must agree, with 1 and 8 steps per command buffer and a stop inside a
command buffer."""
import ctypes
import glob
import os
import warnings

import numpy as np
import pytest

import lattice._runtime as runtime_ext
from lattice import program as P
from lattice.formats import open_checkpoint
import metal_fake
from conftest import FIXTURES
from msl_emu.library import MSLCompileWarning

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METAL = os.path.join(ROOT, "metal")
KERNEL_FILES = sorted(glob.glob(os.path.join(METAL, "*.metal")))
APPLE7, APPLE9 = 1007, 1009
ERR_PROGRAM, ERR_ARGS, ERR_LIBRARY, ERR_GPU = 102, 103, 101, 104

SIZES = ctypes.c_size_t * P.N_ARENAS
PTRS = ctypes.c_void_p * P.N_ARENAS


class Counters(ctypes.Structure):
    _fields_ = [("dispatches_per_step", ctypes.c_uint32), ("steps", ctypes.c_uint64), ("tokens", ctypes.c_uint64),
                ("command_buffers", ctypes.c_uint64), ("api_calls", ctypes.c_uint64)]


def load_bridge():
    """The bridge + fake library over ctypes."""
    so = ctypes.CDLL(metal_fake.build())
    so.lt_metal_create.restype = ctypes.c_void_p
    so.lt_metal_create.argtypes = [SIZES, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p,
                                   ctypes.POINTER(ctypes.c_int), ctypes.c_char_p, ctypes.c_size_t]
    so.lt_metal_add_program.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint32]
    for name in ("lt_metal_write", "lt_metal_read"):
        getattr(so, name).argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t]
    so.lt_metal_copy.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_size_t]
    so.lt_metal_zero.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_size_t, ctypes.c_size_t]
    so.lt_metal_generate.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_void_p,
                                     ctypes.c_uint32, ctypes.c_void_p, ctypes.c_void_p,
                                     ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_uint32)]
    so.lt_metal_run.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
    so.lt_metal_launch.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_size_t, ctypes.c_size_t]
    so.lt_metal_wait.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    so.lt_metal_counters_get.argtypes = [ctypes.c_void_p, ctypes.POINTER(Counters)]
    so.lt_metal_error.restype = ctypes.c_char_p
    so.lt_metal_error.argtypes = [ctypes.c_void_p]
    so.lt_metal_free.argtypes = [ctypes.c_void_p]
    so.lt_metal_set_attention_splits.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
    so.fake_metal_reset.argtypes = [ctypes.c_uint64, ctypes.c_int64]
    so.fake_metal_violation.restype = ctypes.c_char_p
    so.fake_probe.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t]
    return so


@pytest.fixture(scope="module")
def lib():
    return load_bridge()


@pytest.fixture(scope="module")
def metallib(tmp_path_factory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MSLCompileWarning)
        return metal_fake.metallib(KERNEL_FILES, str(tmp_path_factory.mktemp("metallib")), include_dirs=[METAL])


# ------------------------------------------------------------------------------------ a tiny program
V, D, RING = 48, 64, 16
X, H, H2, LOGITS, WORK = 0, 4 * D, 8 * D, 12 * D, 16 * D  # SCRATCH offsets (bytes)
PART = WORK + 8 * V
EMB, W, NORM = 0, 4 * V * D, 8 * V * D                # WEIGHTS offsets
COUNTS, HIST = 0, 4 * V                               # STATE offsets
RING_T, RING_LP = 0, 4 * RING                         # OUTPUT offsets
TOKEN = P.STEP_DTYPE.fields["token"][1]               # EMBED reads the token from the step args


def tiny_weights():
    """Embedding E and lm weights that map token t to perm[t] by a wide margin: W row v = 4 E[inv[v]]
    (the dot with the normalized E[t] peaks at v = perm[t]); perm is one cycle over the vocab."""
    rng = np.random.default_rng(7)
    emb = rng.standard_normal((V, D)).astype(np.float32)
    order = rng.permutation(V)
    perm = np.empty(V, np.int64)
    perm[order] = np.roll(order, -1)                   # one cycle: order[i] -> order[i + 1]
    w = np.empty((V, D), np.float32)
    w[perm] = 4 * emb
    norm = (0.1 * rng.standard_normal(D)).astype(np.float32)
    weights = np.zeros(8 * V * D + 4 * D, np.uint8)
    weights[EMB:EMB + 4 * V * D] = emb.view(np.uint8).ravel()
    weights[W:W + 4 * V * D] = w.view(np.uint8).ravel()
    weights[NORM:NORM + 4 * D] = norm.view(np.uint8)
    return weights, perm


def tiny_program(barriers=True):
    """(dispatch records, consts): embed -> rmsnorm -> (lm_head | copy, independent) -> sample."""
    A = P.ARENA
    spec = [
        ("embed", {"ids": (A["step"], TOKEN), "out": (A["scratch"], X), "wq": (A["weights"], EMB)},
         dict(wformat=P.WF["f32"], dim=D, vocab=V, out_stride=D, scale=1.0), (1, 1, 1), (64, 1, 1), True),
        ("rms_norm", {"x": (A["scratch"], X), "out": (A["scratch"], H), "w": (A["weights"], NORM)},
         dict(n_heads=1, head_dim=D, in_stride=D, out_stride=D, flags=1, eps=1e-5), (1, 1, 1), (64, 1, 1), barriers),
        ("lm_head", {"x": (A["scratch"], H), "out": (A["scratch"], LOGITS), "wq": (A["weights"], W),
                     "partials": (A["scratch"], PART)},
         dict(wformat=P.WF["f32"], rows=V, cols=D, x_stride=D, y_stride=V), (1, 1, 1), (256, 1, 1), True),
        ("elementwise", {"a": (A["scratch"], H), "b": (A["scratch"], H), "out": (A["scratch"], H2)},
         dict(op=P.EW_OP["copy"], n=D, a_stride=D, b_stride=D, out_stride=D), (1, 1, 1), (32, 1, 1), False),
        ("sample", {"logits": (A["scratch"], LOGITS), "ids": (A["step"], TOKEN), "counts": (A["state"], COUNTS),
                    "hist": (A["state"], HIST), "ring_tokens": (A["output"], RING_T),
                    "ring_logprobs": (A["output"], RING_LP), "work": (A["scratch"], WORK),
                    "partials": (A["scratch"], PART)},
         dict(vocab=V, logits_stride=V, hist_cap=64), (1, 1, 1), (64, 1, 1), True),
    ]
    recs = np.zeros(len(spec), P.DISPATCH_DTYPE)
    consts = bytearray()
    for rec, (kind, binds, fields, grid, group, barrier) in zip(recs, spec):
        args = np.zeros(1, P.ARGS_DTYPES[kind][1])
        for k, v in fields.items():
            args[k] = v
        slots = P.SLOTS[kind]
        rec["kernel"], rec["flags"], rec["args_offset"] = P.KERNEL_ID[kind], P.BARRIER if barrier else 0, len(consts)
        rec["bind"]["arena"] = P.ARENA_NONE
        for role, b in binds.items():
            rec["bind"][slots.index(role)] = b
        rec["n_bind"] = max(slots.index(r) for r in binds) + 1
        rec["grid"], rec["group"] = grid, group
        consts += args.tobytes()
    return recs, np.frombuffer(bytes(consts), np.uint8).copy()


def arena_sizes():
    sizes = [0] * P.N_ARENAS
    sizes[P.ARENA["weights"]] = 8 * V * D + 4 * D
    sizes[P.ARENA["state"]] = 4 * V + 4 * 64
    sizes[P.ARENA["scratch"]] = PART + 16
    sizes[P.ARENA["step"]] = P.STEP_DTYPE.itemsize + 64
    sizes[P.ARENA["output"]] = 8 * RING
    return sizes


def start_step(token):
    s = np.zeros(1, P.STEP_DTYPE)
    s["token"], s["n_tokens"], s["ring_cap"] = token, 1, RING
    s["top_p"], s["repetition_penalty"] = 1.0, 1.0
    return s


def cpu_generate(recs, consts, n_steps, token):
    """The CPU backend's tokens, logprobs and final step args for n_steps greedy steps."""
    so = ctypes.CDLL(runtime_ext.__file__)
    so.lt_cpu_create.restype = ctypes.c_void_p
    so.lt_cpu_create.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_void_p, ctypes.c_size_t, PTRS, SIZES,
                                 ctypes.c_int, ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_uint32)]
    so.lt_cpu_run.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
    so.lt_cpu_free.argtypes = [ctypes.c_void_p]
    weights, _ = tiny_weights()
    sizes = arena_sizes()
    arenas = [np.zeros(max(n, 16), np.uint8) for n in sizes]
    arenas[P.ARENA["weights"]] = weights
    arenas[P.ARENA["step"]][:P.STEP_DTYPE.itemsize] = start_step(token).view(np.uint8)
    err, where = ctypes.c_int(), ctypes.c_uint32()
    cpu = so.lt_cpu_create(recs.ctypes.data, len(recs), consts.ctypes.data, consts.nbytes,
                           PTRS(*[a.ctypes.data for a in arenas]), SIZES(*[a.nbytes for a in arenas]), 1,
                           ctypes.byref(err), ctypes.byref(where))
    assert cpu, f"CPU backend rejected the program: error {err.value} at dispatch {where.value}"
    tokens, logprobs = [], []
    out = arenas[P.ARENA["output"]]
    try:
        for i in range(n_steps):
            assert so.lt_cpu_run(cpu, 1) == 0
            tokens.append(int(out[RING_T:RING_T + 4 * RING].view(np.uint32)[i % RING]))
            logprobs.append(float(out[RING_LP:RING_LP + 4 * RING].view(np.float32)[i % RING]))
    finally:
        so.lt_cpu_free(cpu)
    step = arenas[P.ARENA["step"]][:P.STEP_DTYPE.itemsize].view(P.STEP_DTYPE)[0]
    return tokens, logprobs, step


class Bridge:
    """lt_metal over ctypes, for one program."""

    def __init__(self, lib, metallib, recs, consts, token=0, sizes=None):
        self.lib = lib
        err, msg = ctypes.c_int(), ctypes.create_string_buffer(1024)
        self.m = lib.lt_metal_create(SIZES(*(sizes or arena_sizes())), consts.ctypes.data, consts.nbytes,
                                     metallib.encode(), ctypes.byref(err), msg, 1024)
        assert self.m, f"lt_metal_create failed ({err.value}): {msg.value.decode()}"
        self.prog = lib.lt_metal_add_program(self.m, recs.ctypes.data, len(recs))
        if self.prog < 0:
            self.error = (-self.prog, self.message())
            return
        self.error = None
        weights, _ = tiny_weights()
        assert self.write("weights", 0, weights) == 0
        assert self.write("step", 0, start_step(token)) == 0

    def message(self):
        return self.lib.lt_metal_error(self.m).decode()

    def write(self, arena, offset, array):
        return self.lib.lt_metal_write(self.m, P.ARENA[arena], offset, array.ctypes.data, array.nbytes)

    def read(self, arena, offset, nbytes):
        out = np.zeros(nbytes, np.uint8)
        assert self.lib.lt_metal_read(self.m, P.ARENA[arena], offset, out.ctypes.data, nbytes) == 0, self.message()
        return out

    def step(self):
        return self.read("step", 0, P.STEP_DTYPE.itemsize).view(P.STEP_DTYPE)[0]

    def generate(self, max_steps, k, stop_ids=()):
        tokens, logprobs = np.zeros(max_steps, np.uint32), np.zeros(max_steps, np.float32)
        stops = np.asarray(stop_ids, np.uint32)
        n_out, n_run = ctypes.c_uint32(), ctypes.c_uint32()
        rc = self.lib.lt_metal_generate(self.m, self.prog, max_steps, k, stops.ctypes.data, len(stops),
                                        tokens.ctypes.data, logprobs.ctypes.data, ctypes.byref(n_out), ctypes.byref(n_run))
        return rc, tokens[:n_out.value].tolist(), logprobs[:n_out.value].tolist(), n_run.value

    def counters(self):
        c = Counters()
        self.lib.lt_metal_counters_get(self.m, ctypes.byref(c))
        return c

    def free(self):
        self.lib.lt_metal_free(self.m)


@pytest.fixture
def bridge(lib, metallib):
    made = []

    def make(recs=None, consts=None, **kw):
        if recs is None:
            recs, consts = tiny_program()
        b = Bridge(lib, metallib, recs, consts, **kw)
        made.append(b)
        return b

    lib.fake_metal_reset(1, APPLE7)
    yield make
    for b in made:
        b.free()


# ------------------------------------------------------------------------------------ end to end
@pytest.mark.parametrize("k", [1, 8])
def test_tokens_match_cpu_backend(bridge, lib, k):
    recs, consts = tiny_program()
    n = 20  # wraps the 16-entry ring
    want, want_lp, want_step = cpu_generate(recs, consts, n, token=3)
    _, perm = tiny_weights()
    expect = [3]
    for _ in range(n):
        expect.append(int(perm[expect[-1]]))
    assert want == expect[1:]  # the CPU backend follows the permutation: the oracle is sound
    b = bridge(token=3)
    rc, tokens, logprobs, n_run = b.generate(n, k)
    assert rc == 0, b.message()
    assert tokens == want and n_run == n
    np.testing.assert_allclose(logprobs, want_lp, rtol=1e-5, atol=1e-6)
    step = b.step()
    for f in ("pos", "token", "step", "n_seen", "next_token", "n_tokens", "error"):
        assert step[f] == want_step[f], f
    c = b.counters()
    assert c.dispatches_per_step == len(recs) and c.steps == n and c.tokens == n
    assert c.command_buffers == -(-n // k)
    assert lib.fake_metal_violation() == b""


@pytest.mark.parametrize("k", [1, 8])
def test_stop_inside_a_command_buffer(bridge, k):
    recs, consts = tiny_program()
    want, want_lp, want_step = cpu_generate(recs, consts, 5, token=3)
    b = bridge(token=3)
    rc, tokens, logprobs, n_run = b.generate(20, k, stop_ids=[want[4]])
    assert rc == 0, b.message()
    assert tokens == want  # the stop token is the last one; the overshoot is dropped
    assert n_run == (6 if k == 1 else 16)  # the stop is in the first buffer; a second one was in flight
    step = b.step()  # rewound to just after the stop token
    for f in ("pos", "token", "step", "n_seen", "next_token"):
        assert step[f] == want_step[f], f
    # the session goes on from the stop as if no overshoot had run
    more, _, _ = cpu_generate(recs, consts, 8, token=3)[:3]
    rc, tokens, _, _ = b.generate(3, k)
    assert rc == 0 and tokens == more[5:8]


@pytest.mark.parametrize("k", [1, 8])
def test_launch_and_wait_two_command_buffers_in_flight(bridge, k):
    """The runtime's path: launch call i + 1 before waiting for call i; each wait hands back the
    ring as its own command buffer left it (the next one, in flight, writes other slots)."""
    recs, consts = tiny_program()
    want, _, want_step = cpu_generate(recs, consts, 2 * k, token=3)
    b = bridge(token=3)
    rings = [np.zeros(8 * RING, np.uint8) for _ in range(2)]
    assert b.lib.lt_metal_launch(b.m, b.prog, k, RING_T, 8 * RING) == 0
    assert b.lib.lt_metal_launch(b.m, b.prog, k, RING_T, 8 * RING) == 0
    assert b.lib.lt_metal_launch(b.m, b.prog, k, RING_T, 8 * RING) == ERR_ARGS  # a third is refused
    assert "at most two launches pending" in b.message()
    assert b.lib.lt_metal_run(b.m, b.prog, 1) == ERR_ARGS and "not waited for" in b.message()
    for ring in rings:
        assert b.lib.lt_metal_wait(b.m, ring.ctypes.data) == 0, b.message()
    got = [int(rings[i // k][:4 * RING].view(np.uint32)[i % RING]) for i in range(2 * k)]
    assert got == want
    assert b.step()["pos"] == want_step["pos"] and b.counters().command_buffers == 2
    assert b.lib.lt_metal_wait(b.m, rings[0].ctypes.data) == ERR_ARGS and "without a pending launch" in b.message()
    assert b.lib.lt_metal_launch(b.m, b.prog, 1, 4 * RING, 8 * RING) == ERR_ARGS  # past the OUTPUT arena


def test_command_buffers_per_token_and_api_calls(bridge):
    b = bridge()
    assert b.generate(16, 8)[0] == 0
    c = b.counters()
    assert c.command_buffers == 2 and c.tokens == 16
    # per command buffer: buffer, encoder, useResources, 8 executes, endEncoding, handler, commit,
    # plus the M1/M2 warm-up: pipeline, buffers, dispatch for each of the 5 pipelines
    assert c.api_calls == 2 * (8 + 6 + 5 * 3)


def test_no_warmup_dispatches_on_apple9(bridge, lib):
    lib.fake_metal_reset(1, APPLE9)
    b = bridge()
    assert b.generate(8, 8)[0] == 0
    assert b.counters().api_calls == 8 + 6


def test_missing_barrier_gives_wrong_tokens(bridge, lib):
    """rmsnorm reads what embed wrote: without its barrier the fake may run it first, on the
    previous step's activations."""
    want, _, _ = cpu_generate(*tiny_program(), 12, token=3)
    recs, consts = tiny_program(barriers=False)
    b = bridge(recs, consts, token=3)
    rc, tokens, _, _ = b.generate(12, 4)
    assert rc == 0 and tokens != want


def test_run_and_private_arenas(bridge):
    b = bridge(token=5)
    assert b.lib.lt_metal_run(b.m, b.prog, 1) == 0
    x = b.read("scratch", X, 4 * D).view(np.float32)
    weights, perm = tiny_weights()
    np.testing.assert_array_equal(x, weights[EMB:EMB + 4 * V * D].view(np.float32).reshape(V, D)[5])
    assert b.step()["token"] == perm[5]
    assert b.write("state", 4, np.arange(3, dtype=np.uint32)) == 0
    assert b.read("state", 4, 12).view(np.uint32).tolist() == [0, 1, 2]
    # the weights (24 KiB) went up in 4 KiB staging pieces: read them back the same way
    np.testing.assert_array_equal(b.read("weights", 0, weights.nbytes), weights)


def test_copy_and_zero_within_an_arena(bridge, lib):
    """lt_metal_copy / lt_metal_zero (the runtime's recurrent-state snapshot and resets): one blit in
    a private arena (within the fake's blit rules), memcpy / memset in a shared one."""
    b = bridge()
    data = np.arange(16, dtype=np.uint32)
    for arena in ("state", "output"):  # private, shared
        assert b.write(arena, 0, data) == 0
        assert b.lib.lt_metal_copy(b.m, P.ARENA[arena], 64, 0, 32) == 0, b.message()
        assert b.lib.lt_metal_zero(b.m, P.ARENA[arena], 0, 16) == 0, b.message()
        want = np.concatenate([np.zeros(4, np.uint32), data[4:], data[:8]])
        np.testing.assert_array_equal(b.read(arena, 0, 96).view(np.uint32), want)
    assert lib.fake_metal_violation() == b""


# ------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("call,words", [
    (lambda b, a, n: b.lib.lt_metal_copy(b.m, a, n - 4, 0, 8), "outside"),
    (lambda b, a, n: b.lib.lt_metal_copy(b.m, a, 0, n - 4, 8), "outside"),
    (lambda b, a, n: b.lib.lt_metal_copy(b.m, a, 16, 0, 32), "overlaps"),
    (lambda b, a, n: b.lib.lt_metal_copy(b.m, a, 66, 0, 8), "multiples of 4"),
    (lambda b, a, n: b.lib.lt_metal_copy(b.m, a, 64, 0, 6), "multiples of 4"),
    (lambda b, a, n: b.lib.lt_metal_zero(b.m, a, 2, 8), "multiples of 4"),
    (lambda b, a, n: b.lib.lt_metal_zero(b.m, a, 0, n + 4), "outside"),
    (lambda b, a, n: b.lib.lt_metal_zero(b.m, 9, 0, 4), "arena 9")])
def test_bad_copy_or_zero_range(bridge, call, words):
    b = bridge()
    state = P.ARENA["state"]
    assert call(b, state, arena_sizes()[state]) == ERR_ARGS and words in b.message()


def test_bad_binding_is_rejected(bridge):
    recs, consts = tiny_program()
    recs[2]["bind"][1]["offset"] = arena_sizes()[P.ARENA["scratch"]] + 64
    b = bridge(recs, consts)
    assert b.error[0] == ERR_PROGRAM and "dispatch 2 (lt_lm_head): binding 1" in b.error[1]


def test_unknown_kernel_id_is_rejected(bridge):
    recs, consts = tiny_program()
    recs[1]["kernel"] = 42
    assert bridge(recs, consts).error == (ERR_PROGRAM, "dispatch 1: unknown kernel id 42")


def test_missing_kernel_function_is_named(lib, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MSLCompileWarning)
        only_copy = metal_fake.metallib([os.path.join(METAL, "elementwise.metal")], str(tmp_path), include_dirs=[METAL])
    b = Bridge(lib, only_copy, *tiny_program())
    try:
        assert b.error[0] == ERR_LIBRARY and "no kernel function lt_embed (kernel id 1)" in b.error[1]
    finally:
        b.free()


def test_bad_library_path(lib, tmp_path):
    recs, consts = tiny_program()
    err, msg = ctypes.c_int(), ctypes.create_string_buffer(512)
    m = lib.lt_metal_create(SIZES(*arena_sizes()), consts.ctypes.data, consts.nbytes,
                            str(tmp_path / "missing.metallib").encode(), ctypes.byref(err), msg, 512)
    assert not m and err.value == ERR_LIBRARY and "missing.metallib" in msg.value.decode()
    m = lib.lt_metal_create(SIZES(*arena_sizes()), consts.ctypes.data, consts.nbytes, METAL.encode(),
                            ctypes.byref(err), msg, 512)
    assert not m and err.value == ERR_LIBRARY and "pass a .metallib" in msg.value.decode()


def test_ring_too_small_for_two_buffers_in_flight(bridge):
    b = bridge()
    rc, tokens, _, _ = b.generate(20, 9)  # ring of 16 < 2 * 9
    assert rc == ERR_ARGS and tokens == [] and "ring_cap >= 2 * steps_per_cb" in b.message()


def test_arena_range_is_checked(bridge):
    b = bridge()
    assert b.write("state", arena_sizes()[P.ARENA["state"]] - 4, np.zeros(2, np.uint32)) == ERR_ARGS
    assert "arena 1" in b.message()
    assert b.lib.lt_metal_write(b.m, 9, 0, None, 0) == ERR_ARGS


def test_kernel_error_is_returned(bridge):
    b = bridge()
    weights, _ = tiny_weights()
    weights = weights.copy()
    weights[W:W + 4 * D] = np.full(D, np.nan, np.float32).view(np.uint8)  # logits row 0 is NaN
    assert b.write("weights", 0, weights) == 0
    rc, tokens, _, _ = b.generate(16, 8)
    assert rc == 1 and tokens == []  # LT_ERR_NONFINITE


# ------------------------------------------------------------------------------------ fake rules
@pytest.mark.parametrize("scenario, message", [
    ("no_icb_support", "created without supportIndirectCommandBuffers = YES"),
    ("bind_index", "buffer index 4 >= maxKernelBufferBindCount 4"),
    ("not_resident", 'buffer "out" (256 bytes) bound at index 4 was not made resident'),
    ("offset_64bit", "offset 4294967296 at index 4 does not fit 32 bits"),
    ("no_warmup", "used only from the ICB on an M1/M2-class GPU"),
    ("unbound_buffer", "kernel lt_elementwise declares [[buffer(3)]] but no buffer is bound at that index"),
])
def test_fake_reports_rule_violations(lib, metallib, scenario, message):
    lib.fake_metal_reset(1, APPLE7)
    msg = ctypes.create_string_buffer(2048)
    assert lib.fake_probe(b"ok", metallib.encode(), msg, 2048) == 0, msg.value
    assert lib.fake_metal_violation() == b""
    assert lib.fake_probe(scenario.encode(), metallib.encode(), msg, 2048) == 1
    assert message in msg.value.decode()
    assert message in lib.fake_metal_violation().decode()


@pytest.mark.parametrize("src,dst,size,message", [
    (0, 128, 64, None), (2, 128, 64, "multiples of 4"), (0, 130, 64, "multiples of 4"),
    (0, 128, 62, "multiples of 4"), (0, 32, 64, "overlapping ranges")])
def test_fake_blit_copy_rules(lib, src, dst, size, message):
    """macOS's copyFromBuffer rules (offsets and size multiples of 4; within one buffer, ranges
    must not overlap: undefined results), which lt_metal_copy checks before it encodes."""
    lib.fake_metal_reset(1, APPLE7)
    lib.fake_probe_blit_copy.restype = ctypes.c_long
    lib.fake_probe_blit_copy.argtypes = [ctypes.c_ulong] * 3
    status = lib.fake_probe_blit_copy(src, dst, size)
    if message is None:
        assert status == 4 and lib.fake_metal_violation() == b""  # MTLCommandBufferStatusCompleted
    else:
        assert status == 5 and message in lib.fake_metal_violation().decode()  # ...StatusError


def test_warmup_rule_only_on_m1_m2(lib, metallib):
    lib.fake_metal_reset(1, APPLE9)
    msg = ctypes.create_string_buffer(2048)
    assert lib.fake_probe(b"no_warmup", metallib.encode(), msg, 2048) == 0, msg.value


def test_icb_commands_have_no_set_bytes(lib, tmp_path):
    assert lib.fake_icb_command_has_set_bytes() == 0
    src = tmp_path / "set_bytes.mm"
    src.write_text('#import <Metal/Metal.h>\n'
                   'void f(id<MTLIndirectComputeCommand> c) { int v = 0; [c setBytes:&v length:4 atIndex:0]; }\n')
    with pytest.raises(metal_fake.FakeMetalBuildError, match="setBytes:length:atIndex:"):
        metal_fake.compile_bridge([str(src)], str(tmp_path / "x.so"), extra=["-Werror"])


def test_bridge_uses_only_declared_metal_api(tmp_path):
    """Every Metal message the bridge sends is declared in the test-only header (GCC warns about
    undeclared ones; -Werror makes that fatal)."""
    metal_fake.compile_bridge([os.path.join(ROOT, "objc", "lattice_metal.mm")], str(tmp_path / "b.so"),
                              extra=["-Werror", "-Wno-error=deprecated-declarations", "-fsyntax-only"])


# ------------------------------------------------------------------------------------ tiny models
def model_bridge(lib, metallib, prog, prompt, splits=0):
    """A bridge holding prog's prefill and decode programs, after a greedy prefill of prompt."""
    sizes = [0] * P.N_ARENAS
    for name, idx in P.ARENA.items():
        if name != "const":
            sizes[idx] = prog.weights.nbytes if name == "weights" else prog.sizes[name]
    consts = np.ascontiguousarray(prog.consts)
    err, msg = ctypes.c_int(), ctypes.create_string_buffer(1024)
    m = lib.lt_metal_create(SIZES(*sizes), consts.ctypes.data, consts.nbytes, metallib.encode(),
                            ctypes.byref(err), msg, 1024)
    assert m, msg.value.decode()
    b = Bridge.__new__(Bridge)
    b.lib, b.m, b.error = lib, m, None
    lib.lt_metal_set_attention_splits(m, splits)
    progs = [np.ascontiguousarray(prog.dispatches[v]) for v in ("prefill", "decode")]
    prefill, b.prog = (lib.lt_metal_add_program(m, r.ctypes.data, len(r)) for r in progs)
    assert prefill >= 0 and b.prog >= 0, b.message()
    assert b.write("weights", 0, np.ascontiguousarray(prog.weights).view(np.uint8)) == 0
    step = start_step(0)
    step["n_tokens"], step["ring_cap"] = len(prompt), prog.layout["ring_cap"]
    assert b.write("step", 0, step) == 0
    assert b.write("step", prog.layout["ids"], np.asarray(prompt, np.uint32)) == 0
    assert lib.lt_metal_run(m, prefill, 1) == 0, b.message()
    return b


@pytest.mark.parametrize("name", ["tiny-qwen35", "tiny-llama"])
@pytest.mark.parametrize("k", [1, 8])
def test_tiny_model_tokens_match_cpu_backend(lib, metallib, name, k):
    prog = P.build(open_checkpoint(os.path.join(FIXTURES, name)), context=64)
    prompt = [1, 5, 9, 2]
    rt = runtime_ext.Runtime(prog)
    res = rt.generate(rt.new_state(), prompt, 20, sampling={"temperature": 0.0})
    want = res["tokens"]
    lib.fake_metal_reset(1, APPLE7)
    b = model_bridge(lib, metallib, prog, prompt)
    try:
        first, first_lp = int(b.step()["next_token"]), float(b.step()["next_logprob"])
        rc, tokens, logprobs, _ = b.generate(19, k)
        assert rc == 0, b.message()
        assert [first] + tokens == want
        np.testing.assert_allclose([first_lp] + logprobs, res["logprobs"], rtol=1e-4, atol=1e-5)
    finally:
        b.free()
    # a stop inside a command buffer: the first token after the prefill's that did not occur before
    stop = next(j for j in range(4, len(want)) if want[j] not in want[:j])
    b = model_bridge(lib, metallib, prog, prompt)
    try:
        rc, tokens, _, n_run = b.generate(19, k, stop_ids=[want[stop]])
        assert rc == 0 and [first] + tokens == want[:stop + 1]
        assert n_run == (stop + 1 if k == 1 else 16)
    finally:
        b.free()


def test_bridge_block_code_compiles_with_clang_blocks():
    """The completion handler is a block on Apple (GCC builds the object-taking variant)."""
    metal_fake.check_blocks_branch()


@pytest.mark.parametrize("name", ["tiny-qwen35", "tiny-llama"])
def test_split_attention_matches_cpu_backend(lib, metallib, name):
    """Attention split 3 ways (keys in 32-key ranges: 44 positions fill two, one stays empty),
    merged by lt_attention_reduce behind a barrier."""
    prog = P.build(open_checkpoint(os.path.join(FIXTURES, name)), context=64)
    prompt = [1, 5, 9, 2]
    rt = runtime_ext.Runtime(prog)
    res = rt.generate(rt.new_state(), prompt, 40, sampling={"temperature": 0.0})
    lib.fake_metal_reset(3, APPLE7)
    b = model_bridge(lib, metallib, prog, prompt, splits=3)
    try:
        first, first_lp = int(b.step()["next_token"]), float(b.step()["next_logprob"])
        rc, tokens, logprobs, _ = b.generate(39, 8)
        assert rc == 0, b.message()
        assert [first] + tokens == res["tokens"]
        np.testing.assert_allclose([first_lp] + logprobs, res["logprobs"], rtol=1e-4, atol=1e-5)
        n_attention = int((prog.dispatches["decode"]["kernel"] == P.KERNEL_ID["attention"]).sum())
        assert b.counters().dispatches_per_step == len(prog.dispatches["decode"]) + n_attention
    finally:
        b.free()

