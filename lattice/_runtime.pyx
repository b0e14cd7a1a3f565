# cython: language_level=3, boundscheck=False, wraparound=False
"""The runtime: owns the token loop and every piece of mutable per-sequence state.

    prog = lattice.program.build(ckpt, quant="q8", context=4096)
    rt = Runtime(prog, n_threads=None)        # weights and program, shared by all sessions
    st = rt.new_state()                       # one sequence: KV / GDN state, position, token history
    res = rt.generate(st, prompt_ids, max_tokens=64, stop_ids={eos}, sampling={"temperature": 0.7,
                      "seed": 1}, on_token=lambda tok, logprob: True)
    logits = rt.logits(st, ids)               # teacher-forced logits [T, vocab] (f32)

A step is one replay of the program by a backend through its C interface (lattice_cpu.h): the
runtime writes the step-args (position, token ids, sampling parameters, seed), the backend runs
every dispatch, and the program's last kernel samples the next token into the step-args, so
consecutive decode steps need no host writes at all. Replays run with the GIL released; Python
is called once per generated token (on_token), and pending signals are checked after every step,
so Ctrl-C stops within one step and leaves the session consistent and usable.

Prefix reuse: generate() keeps the cached prefix of the session's token history. Attention-only
models reuse the longest common prefix with the new prompt (KV entries past it are simply
overwritten). Models with Gated DeltaNet layers keep a recurrent state that cannot rewind: they
reuse the cache only when the new prompt extends the whole history exactly, and start over
otherwise. At least one prompt token is always prefilled (its logits give the first token).

Context policy: a prompt longer than the context raises ContextLengthError before any work;
generation that fills the context stops with finish_reason "context".

Threads: different sessions may generate concurrently from different threads; one session is
used by one thread at a time (a second concurrent call raises RuntimeError).
"""
import os
import threading
import time

import numpy as np

from cpython.exc cimport PyErr_CheckSignals
from libc.stdint cimport uint8_t, uint32_t
from libc.string cimport memcpy

from .errors import BackendError, ContextLengthError, ConfigError, NumericalError, SamplingError, TokenizerError
from .program import ARENA, DISPATCH_DTYPE, STEP_DTYPE, VARIANTS, aligned_zeros
from .sampling import SamplingParams


cdef extern from "lattice_cpu.h" nogil:
    ctypedef struct lt_dispatch:
        pass
    ctypedef struct lt_cpu:
        pass
    ctypedef struct lt_step_args:
        unsigned int pos, token, n_tokens, step, ring_cap, flags, seed_lo, seed_hi
        float temperature
        unsigned int top_k
        float top_p, min_p, repetition_penalty, presence_penalty, frequency_penalty
        unsigned int penalty_last_n, n_seen, error, next_token
        float next_logprob
    lt_cpu *lt_cpu_create(const lt_dispatch *prog, uint32_t n, const uint8_t *consts, size_t n_consts,
                          void **arenas, const size_t *sizes, int n_threads, int *err, uint32_t *err_index)
    int lt_cpu_run(lt_cpu *cpu, uint32_t n_steps)
    void lt_cpu_free(lt_cpu *cpu)
    const char *lt_cpu_simd()
    const char *lt_cpu_error_string(int err)


def c_sizes():
    """sizeof of the shared structs as this extension was compiled (tests compare with numpy)."""
    return {"lt_dispatch": sizeof(lt_dispatch), "lt_step_args": sizeof(lt_step_args)}


def simd():
    """The SIMD path the CPU backend picked on this machine."""
    return lt_cpu_simd().decode()


cdef uint8_t *_ptr(arr) except NULL:
    cdef uint8_t[::1] view = arr.reshape(-1).view(np.uint8)
    return &view[0]


_ERR_NONFINITE = 1     # LT_ERR_NONFINITE


def _sampling_params(sampling):
    """dict / SamplingParams / None -> SamplingParams (SamplingError, a ValueError, when invalid)."""
    if sampling is None:
        return SamplingParams()
    if isinstance(sampling, SamplingParams):
        return sampling
    if not isinstance(sampling, dict):
        raise SamplingError(f"sampling must be a dict or SamplingParams, got {type(sampling).__name__}")
    known = set(SamplingParams.__dataclass_fields__)
    unknown = sorted(set(sampling) - known)
    if unknown:
        raise SamplingError(f"unknown sampling parameter(s) {unknown}; known: {sorted(known)}")
    return SamplingParams(**sampling)


cdef class Runtime:
    """A compiled Program bound to the CPU backend. Immutable after construction; sessions
    (`new_state()`) share its weights, program and constants."""
    cdef readonly object program
    cdef readonly int n_threads
    cdef object _weights, _consts, _progs

    def __init__(self, program, n_threads=None):
        if program.weights is None:
            raise ConfigError("this program was built without weights (materialize=False): it cannot run")
        if n_threads is not None and (not isinstance(n_threads, int) or n_threads < 1):
            raise ConfigError(f"n_threads must be a positive integer or None, got {n_threads!r}")
        if sizeof(lt_dispatch) != DISPATCH_DTYPE.itemsize or sizeof(lt_step_args) != STEP_DTYPE.itemsize:
            raise BackendError("lattice._runtime was compiled against a different metal/lattice_shared.h")
        self.program = program
        self.n_threads = n_threads or 0
        self._weights = program.weights
        self._consts = np.ascontiguousarray(program.consts)
        self._progs = {v: np.ascontiguousarray(program.dispatches[v]) for v in VARIANTS}

    @property
    def context(self):
        return self.program.context

    def new_state(self):
        return State(self)

    # ------------------------------------------------------------------------------ generation
    def generate(self, State st, prompt_ids, int max_tokens, stop_ids=(), sampling=None, on_token=None,
                 bint want_logits=False):
        """Prefill prompt_ids (reusing the session's cached prefix), then generate up to max_tokens
        tokens. A token in stop_ids ends generation (it is not returned); on_token(token, logprob)
        is called for every other token and may return False to stop after it.

        Returns a dict: tokens, logprobs, finish_reason ("stop", "length", "context"),
        prompt_tokens, reused_tokens, prefill_seconds, decode_seconds, and logits [n, vocab]
        (the distribution each token was drawn from) with want_logits."""
        params = _sampling_params(sampling)
        if max_tokens < 0:
            raise SamplingError(f"max_tokens must be >= 0, got {max_tokens}")
        if on_token is not None and not callable(on_token):
            raise TypeError(f"on_token must be callable, got {type(on_token).__name__}")
        self._own(st)
        ids = st._check_ids(prompt_ids)
        stops = frozenset(int(t) for t in stop_ids)
        with st._use():
            return st._generate(ids, max_tokens, stops, params, on_token, want_logits)

    def logits(self, State st, ids, bint append=False):
        """Teacher-forced logits [T, vocab] (f32) of ids. The session starts over unless append,
        in which case ids continue its cached history."""
        self._own(st)
        ids = st._check_ids(ids)
        with st._use():
            return st._logits(ids, append)

    def _own(self, State st):
        if st.runtime is not self:
            raise ValueError("this session state belongs to another Runtime")


cdef class State:
    """One sequence: its arenas (state, scratch, step-args, output), backend handles, position
    and token history."""
    cdef readonly Runtime runtime
    cdef lt_cpu *_cpu[3]
    cdef object _arenas, _lock
    cdef lt_step_args *_step
    cdef uint32_t *_ids
    cdef float *_logits_rows
    cdef readonly list history
    cdef object _prog

    def __cinit__(self):
        for i in range(3):
            self._cpu[i] = NULL

    def __init__(self, Runtime rt):
        cdef void *arenas[6]
        cdef size_t sizes[6]
        cdef int err = 0
        cdef uint32_t where = 0
        self.runtime = rt
        self._prog = prog = rt.program
        self._lock = threading.Lock()
        self.history = []
        self._arenas = {}
        for name in ("state", "scratch", "step", "output"):
            self._arenas[name] = aligned_zeros(prog.sizes[name])
        self._arenas["weights"] = rt._weights
        for name, idx in ARENA.items():
            if name == "const":
                arenas[idx], sizes[idx] = NULL, 0
            else:
                arenas[idx] = <void *>_ptr(self._arenas[name])
                sizes[idx] = self._arenas[name].nbytes
        self._step = <lt_step_args *>_ptr(self._arenas["step"])
        cdef Py_ssize_t ids_off = prog.layout["ids"], logits_off = prog.layout["logits"]
        self._ids = <uint32_t *>(_ptr(self._arenas["step"]) + ids_off)
        self._logits_rows = <float *>(_ptr(self._arenas["output"]) + logits_off)
        self._step.ring_cap = prog.layout["ring_cap"]
        self._step.n_tokens = 1
        consts = rt._consts
        for i, variant in enumerate(VARIANTS):
            recs = rt._progs[variant]
            self._cpu[i] = lt_cpu_create(<const lt_dispatch *>_ptr(recs), <uint32_t>len(recs),
                                         _ptr(consts), consts.nbytes, arenas, sizes, rt.n_threads, &err, &where)
            if self._cpu[i] == NULL:
                raise BackendError(f"the CPU backend rejected the {variant} program at dispatch {where}: "
                                   f"{lt_cpu_error_string(err).decode()}")

    def __dealloc__(self):
        for i in range(3):
            if self._cpu[i] != NULL:
                lt_cpu_free(self._cpu[i])
                self._cpu[i] = NULL

    @property
    def position(self):
        """Tokens whose state is cached (the position of the next token fed)."""
        return len(self.history)

    def reset(self):
        """Forget the sequence: the next generate() prefills from position 0."""
        with self._use():
            self._restart()

    # ------------------------------------------------------------------------------ helpers
    def _use(self):
        return _Exclusive(self._lock)

    def _check_ids(self, ids):
        try:
            ids = [int(t) for t in ids]
        except (TypeError, ValueError):
            raise TokenizerError(f"token ids must be a sequence of integers, got {ids!r:.80}") from None
        if not ids:
            raise TokenizerError("at least one token id is needed")
        vocab = self._prog.vocab
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise TokenizerError(f"token id {bad[0]} is out of range for vocab_size {vocab}")
        if len(ids) > self._prog.context:
            raise ContextLengthError(f"{len(ids)} tokens do not fit the context of {self._prog.context} "
                                     f"(load the model with a larger context)")
        return ids

    def _region(self, key):
        off, nbytes = self._prog.layout["state"][key]
        return self._arenas["state"][off:off + nbytes]

    def _restart(self):
        """Position 0: recurrent state zeroed (the KV cache needs nothing: it is overwritten)."""
        for key in self._prog.layout["state"]:
            if isinstance(key, tuple) and key[1] in ("conv", "ssm"):
                self._region(key)[:] = 0
        self.history = []

    def _prepare(self, ids):
        """Reuse the cached prefix for ids; returns the number of reused tokens."""
        h = self.history
        if self._prog.recurrent:
            reuse = len(h) if len(h) < len(ids) and ids[:len(h)] == h else 0
        else:
            n = min(len(h), len(ids) - 1)
            reuse = 0
            while reuse < n and h[reuse] == ids[reuse]:
                reuse += 1
        if reuse == 0:
            self._restart()
        self.history = h[:reuse]
        return reuse

    def _set_sampling(self, params):
        """Sampling parameters and seed into the step-args; penalty history from the reused prefix."""
        cdef lt_step_args *s = self._step
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little")
        s.seed_lo, s.seed_hi = seed & 0xFFFFFFFF, seed >> 32
        s.temperature, s.top_k, s.top_p, s.min_p = params.temperature, params.top_k, params.top_p, params.min_p
        s.repetition_penalty = params.repetition_penalty
        s.presence_penalty = params.presence_penalty
        s.frequency_penalty = params.frequency_penalty
        s.penalty_last_n = 0
        s.flags = 0             # logits are read from the OUTPUT arena after each step
        s.step, s.error = 0, 0
        counts = self._region("counts").view(np.uint32)
        hist = self._region("hist").view(np.uint32)
        counts[:] = 0
        hist[:] = 0
        if self.history:
            h = np.asarray(self.history, np.int64)
            np.add.at(counts, h, 1)
            hist[np.arange(len(h)) % len(hist)] = h
        s.n_seen = len(self.history)

    cdef int _run(self, int which, const uint32_t *ids, uint32_t n) except -1:
        """One replay of program `which` over n tokens (ids NULL: the decode token already in
        the step-args). Raises on backend errors; the history advances only on success."""
        cdef lt_cpu *cpu = self._cpu[which]
        cdef int err
        cdef uint32_t i
        self._step.pos = len(self.history)
        self._step.n_tokens = n
        if ids != NULL:
            for i in range(n):
                self._ids[i] = ids[i]
        with nogil:
            err = lt_cpu_run(cpu, 1)
        if err:
            self._step.error = 0
            self._restart()
            if err == _ERR_NONFINITE:
                raise NumericalError("NaN or Inf in the logits: the session was reset")
            raise BackendError(f"CPU backend error {err}: {lt_cpu_error_string(err).decode()}")
        return 0

    def _prefill(self, list ids, int which, int chunk, rows=None):
        cdef uint32_t[::1] buf = np.asarray(ids, dtype=np.uint32)
        cdef Py_ssize_t start = 0, n
        while start < len(ids):
            n = min(chunk, len(ids) - start)
            self._run(which, &buf[start], <uint32_t>n)
            if rows is not None:
                rows.append(self._logits_copy(n))
            self.history.extend(ids[start:start + n])
            start += n
            if PyErr_CheckSignals() < 0:
                raise KeyboardInterrupt

    def _logits_copy(self, Py_ssize_t n):
        out = np.empty((n, self._prog.vocab), np.float32)
        cdef float[:, ::1] view = out
        memcpy(&view[0, 0], self._logits_rows, n * self._prog.vocab * sizeof(float))
        return out

    def _generate(self, list ids, int max_tokens, stops, params, on_token, bint want_logits):
        cdef Py_ssize_t context = self._prog.context
        reused = self._prepare(ids)
        self._set_sampling(params)
        tokens, logprobs, logits = [], [], []
        t0 = time.perf_counter()
        self._prefill(ids[reused:], 1, self._prog.prefill_chunk)
        t1 = time.perf_counter()
        finish = "length"
        for i in range(max_tokens):
            tok, lp = self._step.next_token, self._step.next_logprob
            if want_logits:
                logits.append(self._logits_copy(1)[0])
            if tok in stops:
                finish = "stop"
                break
            tokens.append(tok)
            logprobs.append(lp)
            if on_token is not None and on_token(tok, lp) is False:
                finish = "stop"
                break
            if i == max_tokens - 1:
                break
            if len(self.history) >= context:
                finish = "context"
                break
            self._run(0, NULL, 1)           # feeds tok (the sampler left it in the step-args)
            self.history.append(tok)
            if PyErr_CheckSignals() < 0:
                raise KeyboardInterrupt
        t2 = time.perf_counter()
        res = {"tokens": tokens, "logprobs": logprobs, "finish_reason": finish, "prompt_tokens": len(ids),
               "reused_tokens": reused, "prefill_seconds": t1 - t0, "decode_seconds": t2 - t1}
        if want_logits:
            res["logits"] = np.stack(logits) if logits else np.zeros((0, self._prog.vocab), np.float32)
        return res

    def _logits(self, list ids, bint append):
        if not append:
            self._restart()
        if len(self.history) + len(ids) > self._prog.context:
            raise ContextLengthError(f"{len(self.history)} cached + {len(ids)} new tokens do not fit "
                                     f"the context of {self._prog.context}")
        self._set_sampling(SamplingParams(seed=0))
        rows = []
        self._prefill(ids, 2, self._prog.logits_chunk, rows)
        return np.concatenate(rows)


class _Exclusive:
    """Holds a session's lock for one call; a concurrent call from another thread is an error."""

    def __init__(self, lock):
        self.lock = lock

    def __enter__(self):
        if not self.lock.acquire(blocking=False):
            raise RuntimeError("this session is in use by another call; use one session per thread")

    def __exit__(self, *exc):
        self.lock.release()
