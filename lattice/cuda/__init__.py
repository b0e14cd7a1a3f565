"""The CUDA backend: the decode program replayed on an NVIDIA GPU, one CUDA graph launch per step.

The bridge (`backend.cu`, kernels in `kernels.cuh`, C interface in `lattice_cuda.h`) is compiled
with nvcc on first use into a cache directory keyed by the sources' hash and loaded with ctypes, so
the package installs and imports without CUDA; `load_library()` raises BackendError when nvcc, the
CUDA runtime or a GPU is missing.

    from lattice.cuda import CudaRuntime
    rt = CudaRuntime(program)                 # uploads the weights once
    out = rt.generate(prompt_ids, max_tokens=64)

`CudaRuntime` is a small token loop over the backend (prefill chunks, then K decode steps queued
per submission, the sampler on the device, stop conditions on the host, overshoot discarded); the
Cython runtime is the product's loop and will drive the same C interface (see lattice_cuda.h).

Environment: LATTICE_NVCC (the compiler), LATTICE_CUDA_ARCH (e.g. sm_90; default: the GPU's own,
else sm_90), LATTICE_CUDA_CACHE (where libraries are kept; default ~/.cache/lattice/cuda).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np

from ..errors import BackendError, ContextLengthError, NumericalError, TokenizerError

HERE = Path(__file__).resolve().parent
HEADER = HERE.parent.parent / "metal" / "lattice_shared.h"
SOURCES = [HERE / "backend.cu", HERE / "kernels.cuh", HERE / "lattice_cuda.h", HEADER]

WEIGHTS, STATE, SCRATCH, STEP, OUTPUT, CONST = range(6)
N_ARENAS = 6
ERR_CUDA = 100
ERRORS = {1: "NaN or Inf in logits", 2: "token id out of range of the embedding table",
          3: "position exceeds the KV cache capacity", 4: "unknown kernel id",
          5: "binding or args outside its arena", 6: "invalid kernel arguments", 7: "out of memory",
          ERR_CUDA: "CUDA runtime error"}

_lib = None


NVCC_DEFAULT = "/usr/local/cuda/bin/nvcc"


def _nvcc():
    named = os.environ.get("LATTICE_NVCC")
    if named:
        if os.path.exists(named):
            return named
        raise BackendError(f"LATTICE_NVCC={named} does not exist (the CUDA backend needs nvcc)")
    for cand in (shutil.which("nvcc"), NVCC_DEFAULT):
        if cand and os.path.exists(cand):
            return cand
    raise BackendError("the CUDA backend needs nvcc (set LATTICE_NVCC or put nvcc on PATH)")


def _arch_flags():
    arch = os.environ.get("LATTICE_CUDA_ARCH")
    if arch:
        return [f"-arch={arch}"]
    try:  # the installed GPU's compute capability, if a driver answers
        out = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        cap = out.stdout.split()[0].replace(".", "") if out.returncode == 0 and out.stdout.strip() else ""
        if cap.isdigit():
            return [f"-arch=sm_{cap}"]
    except (OSError, subprocess.SubprocessError, IndexError):
        pass
    return ["-arch=sm_90"]


def build_library(force=False) -> Path:
    """Compiles the bridge (once per source version, compiler and target) and returns its path."""
    nvcc = _nvcc()
    flags = ["-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "-lineinfo", *_arch_flags()]
    h = hashlib.sha256(" ".join([nvcc] + flags).encode())
    for p in SOURCES:
        h.update(p.read_bytes())
    cache = Path(os.environ.get("LATTICE_CUDA_CACHE", Path.home() / ".cache" / "lattice" / "cuda"))
    out = cache / h.hexdigest()[:16] / "liblattice_cuda.so"
    if force or not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        res = subprocess.run([nvcc, *flags, str(HERE / "backend.cu"), "-o", str(tmp)], capture_output=True,
                             text=True)
        if res.returncode != 0:
            raise BackendError(f"nvcc failed to build the CUDA backend:\n{res.stderr[-4000:]}")
        os.replace(tmp, out)
    return out


def load_library():
    """The bridge as a ctypes library (built on first use). Raises BackendError without CUDA."""
    global _lib
    if _lib is not None:
        return _lib
    path = build_library()
    try:
        so = ctypes.CDLL(str(path))
    except OSError as e:
        raise BackendError(f"cannot load the CUDA backend {path}: {e}") from None
    c_size_p = ctypes.POINTER(ctypes.c_size_t)
    so.lt_cuda_create.restype = ctypes.c_void_p
    so.lt_cuda_create.argtypes = [c_size_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t]
    so.lt_cuda_add_program.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint32, ctypes.c_void_p,
                                       ctypes.c_size_t, ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint32)]
    so.lt_cuda_write.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t]
    so.lt_cuda_read.argtypes = so.lt_cuda_write.argtypes
    so.lt_cuda_set_eager.argtypes = [ctypes.c_void_p, ctypes.c_int]
    so.lt_cuda_set_eager.restype = None
    so.lt_cuda_launch.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_uint32,
                                  ctypes.c_size_t, ctypes.c_size_t]
    so.lt_cuda_wait.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)]
    so.lt_cuda_run.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_uint32]
    so.lt_cuda_message.restype = ctypes.c_char_p
    so.lt_cuda_message.argtypes = [ctypes.c_void_p]
    so.lt_cuda_device.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t]
    so.lt_cuda_free.argtypes = [ctypes.c_void_p]
    so.lt_cuda_free.restype = None
    buf = ctypes.create_string_buffer(256)
    if so.lt_cuda_device(0, buf, 256) != 0:
        raise BackendError(f"the CUDA backend found no usable GPU: {buf.value.decode()}")
    _lib = so
    return so


def device_name(device=0) -> str:
    so = load_library()
    buf = ctypes.create_string_buffer(256)
    so.lt_cuda_device(device, buf, 256)
    return buf.value.decode()


def gpu_present() -> bool:
    """Whether an NVIDIA driver lists a GPU (checked before paying for a build)."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return False
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


def available():
    """(True, device description) or (False, why not)."""
    if not gpu_present():
        return False, "no NVIDIA GPU (nvidia-smi lists none)"
    try:
        return True, device_name()
    except BackendError as e:
        return False, str(e)


def _ptr(a):
    return ctypes.c_void_p(a.ctypes.data)


class CudaBackend:
    """Device arenas + programs: a thin object over lattice_cuda.h."""

    def __init__(self, sizes, device=0):
        self.lib = load_library()
        self.sizes = [int(s) for s in sizes]
        arr = (ctypes.c_size_t * N_ARENAS)(*self.sizes)
        msg = ctypes.create_string_buffer(256)
        self.h = self.lib.lt_cuda_create(arr, device, msg, 256)
        if not self.h:
            raise BackendError(f"CUDA backend: {msg.value.decode()}")

    def close(self):
        if getattr(self, "h", None):
            self.lib.lt_cuda_free(self.h)
            self.h = None

    __del__ = close

    def _check(self, err, what):
        if err == ERR_CUDA:
            raise BackendError(f"CUDA backend, {what}: {self.lib.lt_cuda_message(self.h).decode()}")
        if err:
            raise BackendError(f"CUDA backend, {what}: error {err} ({ERRORS.get(err, 'unknown')})")

    def add_program(self, dispatches, consts, max_tokens):
        """Returns the program's index; raises BackendError naming the rejected dispatch."""
        recs = np.ascontiguousarray(dispatches)
        consts = np.ascontiguousarray(consts, dtype=np.uint8)
        where = ctypes.c_uint32()
        idx = self.lib.lt_cuda_add_program(self.h, _ptr(recs), len(recs), _ptr(consts), consts.nbytes,
                                           max_tokens, ctypes.byref(where))
        if idx < 0:
            err = -idx
            detail = self.lib.lt_cuda_message(self.h).decode() if err in (ERR_CUDA, 7) else ERRORS.get(err, "?")
            raise BackendError(f"the CUDA backend rejected dispatch {where.value}: {detail}")
        return idx

    def write(self, arena, offset, data):
        a = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        self._check(self.lib.lt_cuda_write(self.h, arena, offset, _ptr(a), a.nbytes), "write")

    def read(self, arena, offset, nbytes):
        out = np.empty(nbytes, np.uint8)
        self._check(self.lib.lt_cuda_read(self.h, arena, offset, _ptr(out), nbytes), "read")
        return out

    def set_eager(self, eager):
        self.lib.lt_cuda_set_eager(self.h, 1 if eager else 0)

    def launch(self, prog, n_steps, T=1, out_offset=0, out_n=0):
        self._check(self.lib.lt_cuda_launch(self.h, prog, n_steps, T, out_offset, out_n), "launch")

    def wait(self, step_dtype, out_n=0):
        """(step args record, OUTPUT bytes copied by the last launch, error code)."""
        p = ctypes.c_void_p()
        err = self.lib.lt_cuda_wait(self.h, ctypes.byref(p))
        if err == ERR_CUDA:
            self._check(err, "wait")
        raw = ctypes.string_at(p.value, step_dtype.itemsize + out_n)
        step = np.frombuffer(raw[:step_dtype.itemsize], step_dtype)[0].copy()
        return step, np.frombuffer(raw[step_dtype.itemsize:], np.uint8), err

    def run(self, prog, n_steps, T=1):
        err = self.lib.lt_cuda_run(self.h, prog, n_steps, T)
        if err == ERR_CUDA:
            self._check(err, "run")
        return err


class CudaRuntime:
    """One compiled Program on the GPU with one sequence (session state). Mirrors the semantics of
    lattice._runtime's State: prefix reuse, sampling parameters in the step args, prefill chunks,
    greedy or seeded sampling by the device sampler, stop ids, max tokens, context limit."""

    def __init__(self, program, eager=False, steps_ahead=8, device=0, backend=CudaBackend):
        """backend: the device object's class (CudaBackend; the tests pass a host stand-in with the
        same methods to run this token loop over the CPU kernels)."""
        from ..program import STEP_DTYPE, VARIANTS
        if program.weights is None:
            raise BackendError("this program was built without weights (materialize=False): it cannot run")
        self.program, self.steps_ahead = program, int(steps_ahead)
        p = program
        sizes = [0] * N_ARENAS
        for name, idx in (("weights", WEIGHTS), ("state", STATE), ("scratch", SCRATCH), ("step", STEP),
                          ("output", OUTPUT)):
            sizes[idx] = max(int(p.sizes[name]), 64)
        self.be = backend(sizes, device)
        self.be.set_eager(eager)
        self.be.write(WEIGHTS, 0, p.weights)
        tokens = {"decode": 1, "prefill": p.prefill_chunk, "logits": p.logits_chunk}
        self.progs = {v: self.be.add_program(p.dispatches[v], p.consts, tokens[v]) for v in VARIANTS}
        self.step_dtype = STEP_DTYPE
        self.step = np.zeros((), STEP_DTYPE)
        self.step["ring_cap"] = p.layout["ring_cap"]
        self.step["n_tokens"] = 1
        self.history = []
        self._stale = False   # device state ran ahead of history (overshoot on a recurrent model)

    def close(self):
        self.be.close()

    # ------------------------------------------------------------------------------ state
    def _region(self, key):
        return self.program.layout["state"][key]

    def _restart(self):
        for key, (off, n) in self.program.layout["state"].items():
            if isinstance(key, tuple) and key[1] in ("conv", "ssm"):
                self.be.write(STATE, off, np.zeros(n, np.uint8))
        self.history = []
        self._stale = False

    def _prepare(self, ids):
        h = self.history
        reuse = 0 if self._stale else self.program.reusable_prefix(h, ids)
        if reuse == 0:
            self._restart()
        self.history = h[:reuse]
        return reuse

    def _set_sampling(self, sampling):
        from ..sampling import SamplingParams
        params = sampling or SamplingParams()
        s = self.step
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little")
        s["seed_lo"], s["seed_hi"] = seed & 0xFFFFFFFF, seed >> 32
        s["temperature"], s["top_k"], s["top_p"], s["min_p"] = (params.temperature, params.top_k,
                                                                 params.top_p, params.min_p)
        s["repetition_penalty"] = params.repetition_penalty
        s["presence_penalty"] = params.presence_penalty
        s["frequency_penalty"] = params.frequency_penalty
        s["penalty_last_n"], s["flags"], s["step"], s["error"] = 0, 0, 0, 0
        v = self.program.vocab
        counts = np.zeros(v, np.uint32)
        coff, cn = self._region("counts")
        hoff, hn = self._region("hist")
        hist = np.zeros(hn // 4, np.uint32)
        if self.history:
            h = np.asarray(self.history, np.int64)
            np.add.at(counts, h, 1)
            hist[np.arange(len(h)) % len(hist)] = h
        self.be.write(STATE, coff, counts)
        self.be.write(STATE, hoff, hist)
        s["n_seen"] = len(self.history)

    def _check_ids(self, ids):
        ids = [int(t) for t in ids]
        if not ids:
            raise TokenizerError("at least one token id is needed")
        bad = [t for t in ids if not 0 <= t < self.program.vocab]
        if bad:
            raise TokenizerError(f"token id {bad[0]} is out of range for vocab_size {self.program.vocab}")
        if len(ids) > self.program.context:
            raise ContextLengthError(f"{len(ids)} tokens do not fit the context of {self.program.context}")
        return ids

    def _fail(self, err):
        self.step["error"] = 0
        self._restart()
        if err == 1:
            raise NumericalError("NaN or Inf in the logits: the session was reset")
        raise BackendError(f"CUDA backend error {err}: {ERRORS.get(err, 'unknown')}")

    def _run_chunk(self, variant, ids):
        """One replay over len(ids) prompt tokens (step args and ids written first)."""
        n = len(ids)
        self.step["pos"], self.step["n_tokens"] = len(self.history), n
        self.be.write(STEP, 0, self.step)
        self.be.write(STEP, self.program.layout["ids"], np.asarray(ids, np.uint32))
        self.be.launch(self.progs[variant], 1, n)
        step, _, err = self.be.wait(self.step_dtype)
        if err:
            self._fail(err)
        self.step = np.array(step)
        self.history.extend(ids)

    def _prefill(self, ids, variant, chunk, rows=None):
        for start in range(0, len(ids), chunk):
            part = ids[start:start + chunk]
            self._run_chunk(variant, part)
            if rows is not None:
                v = self.program.vocab
                raw = self.be.read(OUTPUT, self.program.layout["logits"], 4 * v * len(part))
                rows.append(raw.view(np.float32).reshape(len(part), v).copy())

    # ------------------------------------------------------------------------------ public
    def generate(self, prompt_ids, max_tokens, stop_ids=(), sampling=None):
        """Prefill (reusing the cached prefix), then up to max_tokens tokens; steps_ahead decode
        steps are queued per submission and the overshoot after a stop is discarded. Returns a
        dict like lattice._runtime: tokens, logprobs, finish_reason, prompt_tokens, reused_tokens,
        prefill_seconds, decode_seconds."""
        ids = self._check_ids(prompt_ids)
        stops = frozenset(int(t) for t in stop_ids)
        reused = self._prepare(ids)
        self._set_sampling(sampling)
        t0 = time.perf_counter()
        self._prefill(ids[reused:], "prefill", self.program.prefill_chunk)
        t1 = time.perf_counter()
        ring_cap = int(self.step["ring_cap"])
        ctx = self.program.context
        tokens, logprobs, finish = [], [], "length"
        pending = [(int(self.step["next_token"]), float(self.step["next_logprob"]))] if max_tokens > 0 else []
        while pending:
            stop = False
            for tok, lp in pending:
                if tok in stops:
                    finish, stop = "stop", True
                    break
                tokens.append(tok)
                logprobs.append(lp)
                if len(tokens) >= max_tokens:
                    stop = True
                    break
                if len(self.history) >= ctx:
                    finish, stop = "context", True
                    break
                self.history.append(tok)  # fed by the next step (already, if it was queued)
            if stop:
                break
            # queue up to steps_ahead steps; the first feeds the last accepted token, each later one
            # the token its predecessor sampled on the device
            n = min(self.steps_ahead, max_tokens - len(tokens), ctx - len(self.history) + 1)
            first = int(self.step["step"])
            self.be.launch(self.progs["decode"], n, 1, 0, 8 * ring_cap)
            step, out, err = self.be.wait(self.step_dtype, 8 * ring_cap)
            if err:
                self._fail(err)
            self.step = np.array(step)
            ring, lps = out[:4 * ring_cap].view(np.uint32), out[4 * ring_cap:].view(np.float32)
            pending = [(int(ring[(first + i) % ring_cap]), float(lps[(first + i) % ring_cap])) for i in range(n)]
        # steps queued past a stop fed tokens the history does not hold: a recurrent state cannot
        # be rewound, so the next call starts over (a KV cache is simply overwritten)
        if int(self.step["pos"]) > len(self.history) and self.program.recurrent:
            self._stale = True
        t2 = time.perf_counter()
        return {"tokens": tokens, "logprobs": logprobs, "finish_reason": finish, "prompt_tokens": len(ids),
                "reused_tokens": reused, "prefill_seconds": t1 - t0, "decode_seconds": t2 - t1}

    def logits(self, ids, append=False):
        """Teacher-forced logits [T, vocab] of ids (the `logits` program)."""
        from ..sampling import SamplingParams
        ids = self._check_ids(ids)
        if not append:
            self._restart()
        if len(self.history) + len(ids) > self.program.context:
            raise ContextLengthError(f"{len(self.history)} cached + {len(ids)} new tokens do not fit "
                                     f"the context of {self.program.context}")
        self._set_sampling(SamplingParams(seed=0))
        rows = []
        self._prefill(ids, "logits", self.program.logits_chunk, rows)
        return np.concatenate(rows)
