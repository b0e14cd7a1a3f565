"""Backends behind the one token loop of lattice._runtime, and how lattice.load selects them.

Every backend is a C table the same Cython loop drives. Here, without a GPU or a Mac:
  - "cpu-mirrored": the CPU kernels driven like a device backend (step-args mirrored on the host,
    token ring read back, K decode steps per call): the CUDA path's stand-in, so the K-step loop,
    stop inside a K-step call, overshoot, prefix reuse and Ctrl-C are tested in CI;
  - "cpu" with K steps per call (host arenas read in place);
  - "metal": the Objective-C++ bridge built against tests/metal_fake (MSL emulator);
  - "cuda": the real bridge, skipped without an NVIDIA GPU and nvcc (tests/gpu runs it).
Each must give exactly the CPU backend's tokens (greedy), with K = 1 and K = 8.
"""
import copy
import ctypes
import glob
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

import lattice
import metal_fake
from conftest import FIXTURES
from lattice import _runtime as R
from lattice import api, engine
from lattice.cuda import available as cuda_available
from lattice.errors import BackendError, ConfigError
from lattice.formats import open_checkpoint
from lattice.program import build
from msl_emu.library import MSLCompileWarning

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METAL_SOURCES = os.path.join(ROOT, "metal")
GPU_OK, GPU_WHY = cuda_available()
PROMPT = [1, 5, 9, 2]
N = 20

_programs = {}


def program(name, context=64):
    if (name, context) not in _programs:
        _programs[name, context] = build(open_checkpoint(os.path.join(FIXTURES, name)), context=context)
    return _programs[name, context]


def cpu_runtime(name, context=64):
    return R.Runtime(program(name, context), n_threads=1)


@pytest.fixture(scope="module")
def metal_files(tmp_path_factory):
    """(bridge library, metallib): the bridge built against the fake Metal, the kernels emulated."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MSLCompileWarning)
        lib = metal_fake.metallib(sorted(glob.glob(os.path.join(METAL_SOURCES, "*.metal"))),
                                  str(tmp_path_factory.mktemp("metallib")), include_dirs=[METAL_SOURCES])
    return metal_fake.build(), lib


@pytest.fixture(params=["cpu", "cpu-mirrored", "metal", "cuda"])
def make_backend(request):
    """steps -> a Backend of this kind."""
    if request.param == "cpu":  # host arenas read in place, K steps per call
        return lambda steps: R.cpu_backend(steps=steps)
    if request.param == "cpu-mirrored":
        return lambda steps: R.cpu_backend(steps=steps, mirrored=True)
    if request.param == "metal":
        bridge, lib = request.getfixturevalue("metal_files")
        return lambda steps: R.metal_backend(bridge, lib, steps=steps)
    if not GPU_OK:
        pytest.skip(f"CUDA backend unavailable: {GPU_WHY}")
    return lambda steps: R.cuda_backend(steps=steps)


def first_new(tokens, start, k):
    """Index >= start of a token not seen before it, in the middle of a k-step call (the calls
    after the prefill's token produce tokens [1, k], [k + 1, 2k], ...)."""
    return next(j for j in range(start, len(tokens)) if tokens[j] not in tokens[:j] and (k == 1 or j % k))


# ------------------------------------------------------------------------------------ same tokens
@pytest.mark.parametrize("name", ["tiny-qwen35", "tiny-llama"])
@pytest.mark.parametrize("k", [1, 8])
def test_tokens_match_cpu_backend(make_backend, name, k):
    cpu = cpu_runtime(name)
    want = cpu.generate(cpu.new_state(), PROMPT, N)
    rt = R.Runtime(program(name), backend=make_backend(k))
    st = rt.new_state()
    got = rt.generate(st, PROMPT, N)
    assert got["tokens"] == want["tokens"] and got["finish_reason"] == "length"
    np.testing.assert_allclose(got["logprobs"], want["logprobs"], rtol=1e-4, atol=1e-5)
    assert st.position == len(PROMPT) + N - 1


@pytest.mark.parametrize("name", ["tiny-qwen35", "tiny-llama"])
@pytest.mark.parametrize("k", [1, 8])
def test_stop_inside_a_k_step_call_then_second_turn(make_backend, name, k):
    """A stop in the middle of a call: the overshoot is discarded; on Qwen3.5 the GDN state has
    seen it, so it goes back to its copy from before decoding and the next turn feeds this turn's
    answer again (on Llama the KV past the history is just overwritten); the second turn's tokens
    are still exactly the CPU backend's."""
    cpu = cpu_runtime(name)
    want = cpu.generate(cpu.new_state(), PROMPT, N)["tokens"]
    j = first_new(want, 2, 8)
    turn2 = lambda first: PROMPT + first["tokens"] + [want[j], 3, 7]  # noqa: E731
    cst = cpu.new_state()
    c1 = cpu.generate(cst, PROMPT, N, stop_ids=[want[j]])
    c2 = cpu.generate(cst, turn2(c1), 12)

    rt = R.Runtime(program(name), backend=make_backend(k))
    st = rt.new_state()
    r1 = rt.generate(st, PROMPT, N, stop_ids=[want[j]])
    assert r1["tokens"] == c1["tokens"] == want[:j] and r1["finish_reason"] == "stop"
    assert st.position == len(PROMPT) + j  # the stop token is not fed; neither is the overshoot
    r2 = rt.generate(st, turn2(r1), 12)
    assert r2["tokens"] == c2["tokens"]
    # device backends launch call i + 1 before reading call i: a stop always leaves one in flight
    overshoot = rt.backend.name != "cpu" or (k > 1 and j % k != 0)
    assert c2["reused_tokens"] == len(PROMPT) + j
    expect_reused = len(PROMPT) if overshoot and program(name).recurrent else len(PROMPT) + j
    assert r2["reused_tokens"] == expect_reused


@pytest.mark.parametrize("name", ["tiny-qwen35", "tiny-llama"])
@pytest.mark.parametrize("k", [1, 8])
@pytest.mark.parametrize("call", [1, 2])
def test_stop_inside_the_first_or_second_call_in_flight(make_backend, name, k, call):
    """Device backends have two decode calls in flight: a stop found in call 1 (call 2 queued
    behind it) or in call 2 (call 3 queued) discards the queued call's steps; the second turn
    gives the CPU backend's tokens (on Qwen3.5 the GDN state rewinds to before decoding)."""
    j = (call - 1) * k + max(1, k // 2)  # decode call c makes tokens [(c - 1) k + 1, c k]
    stop_after = lambda: (lambda tok, lp, seen=[]: seen.append(tok) or len(seen) <= j)  # noqa: E731
    cpu = cpu_runtime(name)
    cst = cpu.new_state()
    c1 = cpu.generate(cst, PROMPT, N, on_token=stop_after())
    turn2 = PROMPT + c1["tokens"] + [3, 7]
    c2 = cpu.generate(cst, turn2, 6)

    rt = R.Runtime(program(name), backend=make_backend(k))
    st = rt.new_state()
    r1 = rt.generate(st, PROMPT, N, on_token=stop_after())
    assert r1["tokens"] == c1["tokens"] and len(r1["tokens"]) == j + 1 and r1["finish_reason"] == "stop"
    assert st.position == len(PROMPT) + j  # the last accepted token is not fed; neither is the overshoot
    r2 = rt.generate(st, turn2, 6)
    assert r2["tokens"] == c2["tokens"]
    overshoot = rt.backend.name != "cpu" or j % k != 0
    assert c2["reused_tokens"] == len(PROMPT) + j
    assert r2["reused_tokens"] == (len(PROMPT) if overshoot and program(name).recurrent else len(PROMPT) + j)


# ------------------------------------------------------------------------------------ the K-step loop (CI stand-in)
def mirrored(name, k, context=64):
    return R.Runtime(program(name, context), backend=R.cpu_backend(steps=k, mirrored=True))


@pytest.mark.parametrize("k", [3, 8])
def test_stop_at_the_end_of_a_call(k):
    """Host K-step calls: nothing ran past a stop at a call's end, the recurrent state continues.
    Device backends had the next call in flight: the state rewinds to the prompt and the next turn
    feeds the answer again, same tokens."""
    cpu = cpu_runtime("tiny-qwen35")
    want = cpu.generate(cpu.new_state(), PROMPT, N)["tokens"]
    j = next(j for j in range(k, len(want), k) if want[j] not in want[:j])
    for backend, reused in ((R.cpu_backend(steps=k), len(PROMPT) + j), (R.cpu_backend(steps=k, mirrored=True), len(PROMPT))):
        rt = R.Runtime(program("tiny-qwen35"), backend=backend)
        st = rt.new_state()
        assert rt.generate(st, PROMPT, N, stop_ids=[want[j]])["tokens"] == want[:j]
        res = rt.generate(st, PROMPT + want[:j + 1], 4)
        assert res["reused_tokens"] == reused and res["tokens"] == want[j + 1:j + 5]


@pytest.mark.parametrize("max_tokens", [1, 2, 5, 9, 11])
def test_max_tokens_inside_a_call(max_tokens):
    cpu = cpu_runtime("tiny-qwen35")
    want = cpu.generate(cpu.new_state(), PROMPT, N)["tokens"]
    rt = mirrored("tiny-qwen35", 8)
    st = rt.new_state()
    res = rt.generate(st, PROMPT, max_tokens)
    assert res["tokens"] == want[:max_tokens] and res["finish_reason"] == "length"
    # no step ran past the accepted tokens (the last one is not fed): the recurrent state continues
    res = rt.generate(st, PROMPT + want[:max_tokens + 1], 3)
    assert res["reused_tokens"] == len(PROMPT) + max_tokens - 1 and res["tokens"] == want[max_tokens + 1:max_tokens + 4]


def test_context_fills_inside_a_call():
    prompt = list(range(1, 57))
    cpu = cpu_runtime("tiny-llama")
    want = cpu.generate(cpu.new_state(), prompt, 30)
    rt = mirrored("tiny-llama", 8)
    st = rt.new_state()
    got = rt.generate(st, prompt, 30)
    assert want["finish_reason"] == got["finish_reason"] == "context"
    assert got["tokens"] == want["tokens"] and st.position == 64


def test_on_token_false_inside_a_call():
    cpu = cpu_runtime("tiny-llama")
    want = cpu.generate(cpu.new_state(), PROMPT, N)["tokens"]
    rt = mirrored("tiny-llama", 8)
    st = rt.new_state()
    seen = []
    res = rt.generate(st, PROMPT, N, on_token=lambda t, lp: seen.append(t) or len(seen) < 4)
    assert res["tokens"] == seen == want[:4] and res["finish_reason"] == "stop"
    res = rt.generate(st, PROMPT + want[:6], 4)
    assert res["reused_tokens"] == len(PROMPT) + 3 and res["tokens"] == want[6:10]


def test_keyboard_interrupt_inside_a_call_leaves_session_usable():
    cpu = cpu_runtime("tiny-qwen35")
    want = cpu.generate(cpu.new_state(), PROMPT, N)["tokens"]
    rt = mirrored("tiny-qwen35", 8)
    st = rt.new_state()

    def interrupt(tok, lp):
        if tok == want[3]:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        rt.generate(st, PROMPT, N, on_token=interrupt)
    assert st.position == len(PROMPT) + 3
    res = rt.generate(st, PROMPT + want[:5], 4)
    assert res["reused_tokens"] == len(PROMPT) and res["tokens"] == want[5:9]  # state rewound to the prompt
    assert rt.generate(st, PROMPT, N)["tokens"] == want


def test_seeded_sampling_matches_cpu():
    sampling = {"temperature": 0.9, "top_k": 40, "seed": 11, "repetition_penalty": 1.1}
    cpu = cpu_runtime("tiny-llama")
    want = cpu.generate(cpu.new_state(), PROMPT, N, sampling=sampling)["tokens"]
    rt = mirrored("tiny-llama", 8)
    assert rt.generate(rt.new_state(), PROMPT, N, sampling=sampling)["tokens"] == want


def test_logits_append_after_overshoot_rebuilds_the_state():
    cpu = cpu_runtime("tiny-qwen35")
    want = cpu.generate(cpu.new_state(), PROMPT, N)["tokens"]
    j = first_new(want, 2, 8)
    expected = []
    for rt in (cpu, mirrored("tiny-qwen35", 8)):
        st = rt.new_state()
        rt.generate(st, PROMPT, N, stop_ids=[want[j]])
        expected.append(rt.logits(st, [want[j], 4, 6], append=True))
    np.testing.assert_allclose(expected[1], expected[0], rtol=1e-3, atol=1e-3)


def test_want_logits_runs_one_step_per_call():
    cpu = cpu_runtime("tiny-llama")
    want = cpu.generate(cpu.new_state(), PROMPT, 6, want_logits=True)
    rt = mirrored("tiny-llama", 8)
    got = rt.generate(rt.new_state(), PROMPT, 6, want_logits=True)
    assert got["tokens"] == want["tokens"]
    np.testing.assert_array_equal(got["logits"], want["logits"])


def test_bad_steps_per_call():
    with pytest.raises(ConfigError, match="steps per backend call must be >= 1, got 0"):
        R.cpu_backend(steps=0)
    with pytest.raises(ConfigError, match="257 steps per backend call overrun the output ring of 256 tokens"):
        R.Runtime(program("tiny-llama"), backend=R.cpu_backend(steps=257))
    with pytest.raises(ConfigError, match=r"129 steps per backend call \(2 calls in flight\) overrun the output ring"):
        R.Runtime(program("tiny-llama"), backend=R.cpu_backend(steps=129, mirrored=True))


# ------------------------------------------------------------------------------------ sessions share the weights
def test_metal_sessions_share_the_weights(metal_files):
    """The Runtime uploads the weights once (into a handle it owns); every session's handle uses
    that buffer: one weights allocation and one upload for two sessions, tokens as alone."""
    bridge, lib = metal_files
    fake = ctypes.CDLL(bridge)  # the library the runtime loaded: the same fake, the same counters
    for name in ("fake_metal_buffers_labeled", "fake_metal_copies_into"):
        getattr(fake, name).restype, getattr(fake, name).argtypes = ctypes.c_long, [ctypes.c_char_p]
    fake.fake_metal_reset.argtypes = [ctypes.c_uint64, ctypes.c_int64]
    fake.fake_metal_violation.restype = ctypes.c_char_p
    fake.fake_metal_pipelines_created.restype = ctypes.c_long
    fake.fake_metal_reset(1, 1007)
    cpu = cpu_runtime("tiny-qwen35")
    want = {n: cpu.generate(cpu.new_state(), PROMPT[:n], N)["tokens"] for n in (3, 4)}

    rt = R.Runtime(program("tiny-qwen35"), backend=R.metal_backend(bridge, lib, steps=8))
    a = rt.new_state()
    uploads = fake.fake_metal_copies_into(b"lattice weights")
    pipelines = fake.fake_metal_pipelines_created()
    assert pipelines > 0
    assert fake.fake_metal_buffers_labeled(b"lattice weights") == 1 and uploads >= 1
    b = rt.new_state()
    assert fake.fake_metal_buffers_labeled(b"lattice weights") == 1
    assert fake.fake_metal_copies_into(b"lattice weights") == uploads
    assert fake.fake_metal_pipelines_created() == pipelines  # the first session's, reused
    assert fake.fake_metal_buffers_labeled(b"lattice state") == 3  # the Runtime's (token-sized) and one per session
    assert rt.generate(a, PROMPT, N)["tokens"] == want[4]
    assert rt.generate(b, PROMPT[:3], N)["tokens"] == want[3]
    del a  # the weights belong to the Runtime, not to the first session
    assert rt.generate(b, PROMPT, N)["tokens"] == want[4]
    R.Runtime(program("tiny-qwen35"), backend=R.metal_backend(bridge, lib)).new_state()
    assert fake.fake_metal_buffers_labeled(b"lattice weights") == 2  # another model object: its own
    assert fake.fake_metal_violation() == b""


def test_cpu_mirrored_sessions_generate_independently():
    """Interleaved sessions of one Runtime on the device path of the loop: each its own tokens."""
    cpu = cpu_runtime("tiny-llama")
    want = {n: cpu.generate(cpu.new_state(), PROMPT[:n], N)["tokens"] for n in (3, 4)}
    rt = mirrored("tiny-llama", 8)
    a, b = rt.new_state(), rt.new_state()
    assert rt.generate(a, PROMPT, N)["tokens"] == want[4]
    assert rt.generate(b, PROMPT[:3], N)["tokens"] == want[3]
    assert rt.generate(a, PROMPT, N)["tokens"] == want[4]


# ------------------------------------------------------------------------------------ counters
def test_cpu_counters_one_kernel_run_per_step_no_submissions():
    rt = cpu_runtime("tiny-llama")
    st = rt.new_state()
    rt.generate(st, PROMPT, N)
    c = st.counters()
    # one prefill step (the prompt fits one chunk) and N - 1 decode steps, one kernel run each
    assert c["tokens"] == N and c["steps"] == N and c["backend_calls"] == c["api_calls"] == N
    assert c["submissions"] == 0 and c["submissions_per_token"] == 0.0
    assert c["dispatches_per_step"] == len(program("tiny-llama").dispatches["decode"])


def test_counters_show_the_call_in_flight_behind_a_stop():
    """cpu-mirrored, K = 8, a stop in decode call 1: call 2 was already launched (8 steps of
    overshoot), and nothing after it; each call is one launch and one wait."""
    cpu = cpu_runtime("tiny-llama")
    want = cpu.generate(cpu.new_state(), PROMPT, N)["tokens"]
    rt = mirrored("tiny-llama", 8)
    st = rt.new_state()
    res = rt.generate(st, PROMPT, N, on_token=lambda tok, lp, seen=[]: seen.append(tok) or len(seen) <= 4)
    assert res["tokens"] == want[:5]
    c = st.counters()
    assert c["steps"] == 1 + 8 + 8 and c["backend_calls"] == 1 + 2 * 2 and c["tokens"] == 5


def test_metal_counters_fewer_than_one_command_buffer_per_8_tokens(metal_files):
    """Issue 5's goal through the fake: 16 steps per command buffer (the default), two in flight."""
    bridge, lib = metal_files
    n = 64
    cpu = cpu_runtime("tiny-qwen35", context=128)
    want = cpu.generate(cpu.new_state(), PROMPT, n)["tokens"]
    rt = R.Runtime(program("tiny-qwen35", 128), backend=R.metal_backend(bridge, lib))
    st = rt.new_state()
    assert rt.generate(st, PROMPT, n)["tokens"] == want
    c = st.counters()
    # one prefill command buffer, then decode calls of 16, 16, 16, 15 steps
    assert c["submissions"] == 5 and c["steps"] == n and c["tokens"] == n
    assert c["submissions_per_token"] < 1 / 8
    assert c["backend_calls"] == 1 + 2 * 4
    assert c["dispatches_per_step"] >= len(program("tiny-qwen35", 128).dispatches["decode"])
    assert 0 < c["api_calls_per_token"] < 10


# ------------------------------------------------------------------------------------ selection
@pytest.fixture
def no_gpu_no_mac(monkeypatch):
    monkeypatch.setattr(engine, "apple_silicon", lambda: False)
    monkeypatch.delenv("LATTICE_METAL_BRIDGE", raising=False)
    monkeypatch.delenv("LATTICE_METAL_LIBRARY", raising=False)
    import lattice.cuda
    monkeypatch.setattr(lattice.cuda, "available", lambda: (False, "no NVIDIA GPU (nvidia-smi lists none)"))


def test_unknown_backend_lists_the_choices():
    with pytest.raises(BackendError, match="unknown backend 'tpu'; choose one of auto, cpu, cuda, metal, reference"):
        lattice.load("smollm2-135m", backend="tpu")


def test_cpu_and_auto_without_gpu_or_mac(no_gpu_no_mac):
    assert engine.select_backend("cpu").name == "cpu"
    assert engine.select_backend("auto").name == "cpu"
    eng = api._make_engine(open_checkpoint(os.path.join(FIXTURES, "tiny-llama")), "auto", None, 64, 1)
    assert eng.name == "cpu"
    st = eng.new_state()
    assert eng.generate(st, PROMPT, 3, (), None, lambda t, lp: True)[0] == "length"


def test_cuda_unavailable_names_why(no_gpu_no_mac):
    with pytest.raises(BackendError, match=r"the CUDA backend is unavailable: no NVIDIA GPU \(nvidia-smi lists none\)"):
        engine.select_backend("cuda")


@pytest.mark.skipif(GPU_OK, reason="a usable GPU is present")
def test_cuda_unavailable_here_names_why():
    with pytest.raises(BackendError, match="the CUDA backend is unavailable: "):
        R.cuda_backend()


def test_metal_off_apple_is_a_clear_error(no_gpu_no_mac, smollm2_path):
    with pytest.raises(BackendError, match=f"the Metal backend needs macOS on Apple silicon; this is {sys.platform}"):
        lattice.load(str(smollm2_path), backend="metal")


def test_metal_bridge_not_built_is_named(no_gpu_no_mac, monkeypatch, tmp_path):
    monkeypatch.setattr(engine, "apple_silicon", lambda: True)
    monkeypatch.setattr(engine, "METAL_DIR", str(tmp_path))
    with pytest.raises(BackendError, match=f"Metal bridge library {tmp_path}/liblattice_metal.dylib does not exist"):
        engine.select_backend("metal")
    assert engine.select_backend("auto").name == "cpu"  # a Mac without the bridge built uses the CPU


def test_metal_kernel_library_missing_is_named(metal_files, monkeypatch, tmp_path):
    monkeypatch.setenv("LATTICE_METAL_BRIDGE", metal_files[0])
    monkeypatch.setenv("LATTICE_METAL_LIBRARY", str(tmp_path / "none.metallib"))
    with pytest.raises(BackendError, match="the Metal kernel library .*none.metallib does not exist"):
        engine.select_backend("metal")


@pytest.mark.parametrize("kind, message", [
    ("cpu", "the cpu backend rejected the decode program at dispatch 2: "),
    ("metal", "the metal backend rejected the decode program: dispatch 2: unknown kernel id 999")])
def test_rejected_program_is_named(metal_files, kind, message):
    prog = copy.copy(program("tiny-llama"))
    prog.dispatches = dict(prog.dispatches)
    prog.dispatches["decode"] = prog.dispatches["decode"].copy()
    prog.dispatches["decode"][2]["kernel"] = 999
    rt = R.Runtime(prog, backend=R.cpu_backend() if kind == "cpu" else R.metal_backend(*metal_files))
    with pytest.raises(BackendError, match=message):
        rt.new_state()


def test_a_second_metal_bridge_library_is_refused(metal_files, tmp_path):
    other = tmp_path / "other.so"
    other.write_bytes(open(metal_files[0], "rb").read())
    R.metal_backend(*metal_files)
    with pytest.raises(BackendError, match="one bridge library per process"):
        R.metal_backend(str(other), metal_files[1])


def test_metal_library_that_does_not_load_is_named(metal_files, tmp_path):
    bad = tmp_path / "bad.metallib"
    bad.write_text("/no/such/kernels.so\n")
    rt = R.Runtime(program("tiny-llama"), backend=R.metal_backend(metal_files[0], str(bad)))
    with pytest.raises(BackendError, match="the metal backend could not be created: "):
        rt.new_state()


def test_metal_through_the_fake_selected_by_name_and_auto(no_gpu_no_mac, metal_files, monkeypatch):
    """The test-only route: LATTICE_METAL_BRIDGE / LATTICE_METAL_LIBRARY name the fake's builds."""
    monkeypatch.setenv("LATTICE_METAL_BRIDGE", metal_files[0])
    monkeypatch.setenv("LATTICE_METAL_LIBRARY", metal_files[1])
    ck = open_checkpoint(os.path.join(FIXTURES, "tiny-llama"))
    eng = api._make_engine(ck, "metal", None, 64, None)
    assert eng.name == "metal" and eng.runtime.backend.steps == 16
    tokens = []
    st = eng.new_state()
    assert eng.generate(st, PROMPT, 10, (), None, lambda t, lp: tokens.append(t))[0] == "length"
    cpu = cpu_runtime("tiny-llama")
    assert tokens == cpu.generate(cpu.new_state(), PROMPT, 10)["tokens"]
    monkeypatch.setattr(engine, "apple_silicon", lambda: True)
    assert engine.select_backend("auto").name == "metal"


def test_auto_prefers_cuda_over_cpu(no_gpu_no_mac, monkeypatch):
    monkeypatch.setattr(R, "cuda_backend", lambda: R.cpu_backend(steps=16, mirrored=True))
    assert engine.select_backend("auto").steps == 16


def test_reference_and_missing_extension(monkeypatch):
    ck = open_checkpoint(os.path.join(FIXTURES, "tiny-llama"))
    assert api._make_engine(ck, "reference", None, 64, None).name == "reference"
    monkeypatch.setitem(sys.modules, "lattice.engine", None)  # the compiled runtime is not built
    assert api._make_engine(ck, "auto", None, 64, None).name == "reference"
    with pytest.raises(BackendError, match=r"the compiled runtime \(lattice._runtime\) is not available"):
        api._make_engine(ck, "cpu", None, 64, None)


# ------------------------------------------------------------------------------------ C interfaces
BRIDGE_SIGNATURES = r"""
#include "lattice_cuda.h"
#include "lattice_metal.h"
/* the types lattice/_runtime.pyx calls these functions through (cuda_api, metal_api), with the
   handle as the bridge's own pointer type (void * in the runtime: the same ABI) */
lt_cuda *(*cuda_create)(const size_t *, int, char *, size_t) = lt_cuda_create;
lt_cuda *(*cuda_create_shared)(const lt_cuda *, const size_t *, char *, size_t) = lt_cuda_create_shared;
int (*cuda_add_program)(lt_cuda *, const lt_dispatch *, uint32_t, const uint8_t *, size_t, uint32_t,
                        uint32_t *) = lt_cuda_add_program;
int (*cuda_write)(lt_cuda *, uint32_t, size_t, const void *, size_t) = lt_cuda_write;
int (*cuda_read)(lt_cuda *, uint32_t, size_t, void *, size_t) = lt_cuda_read;
int (*cuda_run)(lt_cuda *, int, uint32_t, uint32_t) = lt_cuda_run;
int (*cuda_launch)(lt_cuda *, int, uint32_t, uint32_t, size_t, size_t) = lt_cuda_launch;
int (*cuda_wait)(lt_cuda *, const void **) = lt_cuda_wait;
void (*cuda_counters)(const lt_cuda *, lt_cuda_counters *) = lt_cuda_counters_get;
const char *(*cuda_message)(lt_cuda *) = lt_cuda_message;
void (*cuda_free)(lt_cuda *) = lt_cuda_free;
lt_metal *(*metal_create)(const size_t *, const uint8_t *, size_t, const char *, int *, char *, size_t) = lt_metal_create;
lt_metal *(*metal_create_shared)(lt_metal *, const size_t *, int *, char *, size_t) = lt_metal_create_shared;
int (*metal_add_program)(lt_metal *, const lt_dispatch *, uint32_t) = lt_metal_add_program;
int (*metal_write)(lt_metal *, uint32_t, size_t, const void *, size_t) = lt_metal_write;
int (*metal_read)(lt_metal *, uint32_t, size_t, void *, size_t) = lt_metal_read;
int (*metal_run)(lt_metal *, int, uint32_t) = lt_metal_run;
int (*metal_launch)(lt_metal *, int, uint32_t, size_t, size_t) = lt_metal_launch;
int (*metal_wait)(lt_metal *, void *) = lt_metal_wait;
void (*metal_counters)(const lt_metal *, lt_metal_counters *) = lt_metal_counters_get;
const char *(*metal_message)(const lt_metal *) = lt_metal_error;
void (*metal_free)(lt_metal *) = lt_metal_free;
"""


def test_bridge_c_apis_match_the_runtime_table(tmp_path):
    """The CUDA path cannot run here: at least the functions it calls by address must have the
    types the runtime calls them with (a changed header fails this compile)."""
    src = tmp_path / "signatures.c"
    src.write_text(BRIDGE_SIGNATURES)
    r = subprocess.run(["gcc", "-std=c11", "-fsyntax-only", "-Werror", "-Wall", "-I", os.path.join(ROOT, "lattice", "cuda"),
                        "-I", os.path.join(ROOT, "objc"), str(src)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
