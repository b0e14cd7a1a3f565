# cython: language_level=3, boundscheck=False, wraparound=False
"""The runtime: owns the token loop and every piece of mutable per-sequence state.

    prog = lattice.program.build(ckpt, quant="q8", context=4096)
    rt = Runtime(prog, n_threads=None)        # weights and program, shared by all sessions
    st = rt.new_state()                       # one sequence: KV / GDN state, position, token history
    res = rt.generate(st, prompt_ids, max_tokens=64, stop_ids={eos}, sampling={"temperature": 0.7,
                      "seed": 1}, on_token=lambda tok, logprob: True)
    logits = rt.logits(st, ids)               # teacher-forced logits [T, vocab] (f32)

Backends: every backend is one `lt_backend` table of C functions (create / add_program / write /
read / copy / zero / run / message / free, plus host_arena), so the token loop below is the same for
all of them:
  - cpu_backend(): the C kernels of lattice_cpu.h over host arenas. The loop reads and writes the
    step-args, token ring and logits in place (no copies); the weights arena is the Program's own
    array, borrowed by every session of the model.
  - cuda_backend(): lattice/cuda's bridge (lattice_cuda.h), loaded with ctypes; its functions are
    called through their addresses, with the GIL released like the CPU's.
  - metal_backend(bridge, library): the Objective-C++ bridge (objc/lattice_metal.h) from a shared
    library (on Linux: built against tests/metal_fake, for tests only).
Device backends own their arenas: the loop keeps a host mirror of the step-args and reads the token
ring back after each run. The weights are uploaded once per Runtime, into a handle it owns; each
session's handle is created from it (create_shared) and uses its weights arena (Metal: also its
constants and pipelines), with its own state, scratch, step-args and output arenas.

A step is one replay of the program: the runtime writes the step-args (position, token ids,
sampling parameters, seed), the backend runs every dispatch, and the program's last kernel samples
the next token into the step-args and the output ring, so consecutive decode steps need no host
writes. A backend call runs `steps` decode steps (CPU: 1; GPUs: 8..32, each step fed by the token
its predecessor sampled on the device); the host then checks stop tokens, max tokens and the context
over the ring and discards the overshoot. Device backends keep two calls in flight (launch / wait):
call i + 1 is queued before call i's tokens are read, so the GPU does not idle while the host reads
them; the ring holds both calls' tokens (2 * steps <= ring_cap) and a stop in call i makes all of
call i + 1 overshoot. Replays run with the GIL released; Python is called once
per generated token (on_token), and pending signals are checked after every backend call, so Ctrl-C
stops within one call and leaves the session consistent and usable.

Prefix reuse: generate() keeps the cached prefix of the session's token history. Attention-only
models reuse the longest common prefix with the new prompt (KV entries past it are simply
overwritten, overshoot included). Models with Gated DeltaNet layers keep a recurrent state that
cannot rewind: they reuse the cache only when the new prompt extends the whole history exactly,
and start over otherwise. When steps may run past a stop (K steps per call, a call in flight), the
conv + recurrent state is copied before decoding (into the STATE arena, on the device where the
backend has `copy`); after an overshoot it is put back, and the next call feeds the tokens since
that copy (this turn's answer) instead of the whole history. At least
one prompt token is always prefilled (its logits give the first token).

Context policy: a prompt longer than the context raises ContextLengthError before any work;
generation that fills the context stops with finish_reason "context".

Threads: different sessions may generate concurrently from different threads; one session is
used by one thread at a time (a second concurrent call raises RuntimeError).
"""
import ctypes
import os
import threading
import time

import numpy as np

from cpython.exc cimport PyErr_CheckSignals
from libc.stdint cimport uint8_t, uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcpy, memset

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
    enum:
        LT_N_ARENAS
        LT_ARENA_WEIGHTS
        LT_ARENA_STATE
        LT_ARENA_STEP
        LT_ARENA_OUTPUT
        LT_ARENA_CONST
        LT_ERR_NONFINITE
        LT_ERR_BINDING
        LT_ERR_NOMEM
    lt_cpu *lt_cpu_create(const lt_dispatch *prog, uint32_t n, const uint8_t *consts, size_t n_consts,
                          void **arenas, const size_t *sizes, int n_threads, int *err, uint32_t *err_index)
    int lt_cpu_run(lt_cpu *cpu, uint32_t n_steps)
    void lt_cpu_free(lt_cpu *cpu)
    const char *lt_cpu_simd()
    const char *lt_cpu_error_string(int err)


# ------------------------------------------------------------------------------------ backend table
cdef struct lt_backend_cfg:
    size_t sizes[6]             # per arena (LT_N_ARENAS); CONST is the consts blob below
    const uint8_t *weights      # the WEIGHTS arena's bytes: borrowed (host) or uploaded (device)
    const uint8_t *consts
    size_t n_consts
    int n_threads               # CPU: <= 0 picks the OpenMP default
    int device                  # CUDA device ordinal
    const char *library         # Metal: the .metallib (or the fake's)


cdef struct lt_backend_counters:
    uint32_t dispatches_per_step    # of the decode program, as the backend runs it
    uint64_t submissions            # command buffers (Metal) / CUDA graph launches
    uint64_t api_calls              # device API calls the host made (Metal messages, CUDA runtime calls)


cdef struct lt_backend:
    # A handle owns (or borrows) the six arenas; the programs added to it share them. Every call
    # returns 0 or an error code (LT_ERR_* of the kernels, or the backend's own) for message().
    void *(*create)(const lt_backend_cfg *cfg, int *err, char *msg, size_t msg_n) noexcept nogil
    # Device backends (NULL on the CPU, whose handles borrow the host weights): a handle using
    # `source`'s weights arena (not uploaded again), which must outlive it.
    void *(*create_shared)(const lt_backend_cfg *cfg, void *source, int *err, char *msg, size_t msg_n) noexcept nogil
    # Returns the program's index (>= 0) or -error; max_tokens bounds T of its runs.
    int (*add_program)(void *h, const lt_dispatch *prog, uint32_t n, const lt_backend_cfg *cfg,
                       uint32_t max_tokens, uint32_t *err_index) noexcept nogil
    int (*write)(void *h, uint32_t arena, size_t offset, const void *src, size_t n) noexcept nogil
    int (*read)(void *h, uint32_t arena, size_t offset, void *dst, size_t n) noexcept nogil
    # Within one arena, after the work queued before it, without the host (NULL: the loop goes
    # through read / write): copy n bytes from src to dst (not overlapping), or zero n bytes.
    int (*copy)(void *h, uint32_t arena, size_t dst, size_t src, size_t n) noexcept nogil
    int (*zero)(void *h, uint32_t arena, size_t offset, size_t n) noexcept nogil
    # Replays program `prog` n_steps times (T = n_tokens in the first step, then 1) and waits.
    int (*run)(void *h, int prog, uint32_t n_steps, uint32_t n_tokens) noexcept nogil
    # Device backends (NULL on the CPU): run without waiting, at most two launches pending, and
    # wait for the oldest, copying the OUTPUT bytes [out_offset, out_offset + out_n) it asked for,
    # as its last step left them, into `out` (out_n: the launch's, repeated). The loop launches call i + 1 before reading call i's
    # tokens, so the device never idles on the host between calls.
    int (*launch)(void *h, int prog, uint32_t n_steps, uint32_t n_tokens, size_t out_offset,
                  size_t out_n) noexcept nogil
    int (*wait)(void *h, void *out, size_t out_n) noexcept nogil
    # Since creation, for lattice-bench (NULL on the CPU: no submissions, one call per step).
    void (*counters)(void *h, lt_backend_counters *out) noexcept nogil
    # The arena's host memory when the loop may use it in place, else NULL (device memory).
    uint8_t *(*host_arena)(void *h, uint32_t arena) noexcept nogil
    const char *(*message)(void *h, int err) noexcept nogil
    void (*free)(void *h) noexcept nogil


# --- CPU: host arenas (aligned calloc: a large KV cache is mapped lazily), the weights borrowed
cdef extern from *:
    """
    #if defined(__linux__)
    #include <sys/mman.h>
    #endif
    /* Large arenas on transparent huge pages where the kernel gives them only on request (as numpy
       does for its arrays): fewer TLB misses. Not the STATE arena: its KV cache would become
       resident 2 MB at a time from the first token; on 4 KB pages it grows with the tokens used. */
    static void lt_hugepage_hint(void *p, size_t n) {
    #if defined(__linux__) && defined(MADV_HUGEPAGE)
        const uintptr_t page = 4096;
        uintptr_t start = ((uintptr_t)p + page - 1) & ~(page - 1), end = ((uintptr_t)p + n) & ~(page - 1);
        if (n >= ((size_t)1 << 22) && end > start) madvise((void *)start, end - start, MADV_HUGEPAGE);
    #else
        (void)p; (void)n;
    #endif
    }
    """
    void lt_hugepage_hint(void *p, size_t n) nogil

cdef enum:
    N_VARIANTS = 3
    ALIGN = 64

cdef struct cpu_pending:
    int err
    size_t out_offset, out_n

cdef struct cpu_handle:
    uint8_t *raw[6]
    uint8_t *arenas[6]
    size_t sizes[6]
    lt_cpu *progs[N_VARIANTS]
    int n_progs
    int n_threads
    cpu_pending pending[2]        # cpu-mirrored: launches run at once, waited for in order
    uint32_t n_launched, n_waited


cdef void *cpu_create(const lt_backend_cfg *cfg, int *err, char *msg, size_t msg_n) noexcept nogil:
    cdef cpu_handle *c = <cpu_handle *>calloc(1, sizeof(cpu_handle))
    cdef int a
    if c == NULL:
        err[0] = LT_ERR_NOMEM
        return NULL
    c.n_threads = cfg.n_threads
    for a in range(LT_N_ARENAS):
        c.sizes[a] = cfg.sizes[a]
        if a == LT_ARENA_WEIGHTS:
            c.arenas[a] = <uint8_t *>cfg.weights
        elif a != LT_ARENA_CONST:
            c.raw[a] = <uint8_t *>calloc(cfg.sizes[a] + ALIGN, 1)
            if c.raw[a] == NULL:
                cpu_free(c)
                err[0] = LT_ERR_NOMEM
                return NULL
            c.arenas[a] = c.raw[a] + (-<uintptr_t>c.raw[a]) % ALIGN
            if a != LT_ARENA_STATE:
                lt_hugepage_hint(c.arenas[a], cfg.sizes[a])
    return c


cdef int cpu_add_program(void *h, const lt_dispatch *prog, uint32_t n, const lt_backend_cfg *cfg,
                         uint32_t max_tokens, uint32_t *err_index) noexcept nogil:
    cdef cpu_handle *c = <cpu_handle *>h
    cdef int err = 0
    if c.n_progs == N_VARIANTS:
        return -LT_ERR_NOMEM
    c.progs[c.n_progs] = lt_cpu_create(prog, n, cfg.consts, cfg.n_consts, <void **>c.arenas, c.sizes,
                                       c.n_threads, &err, err_index)
    if c.progs[c.n_progs] == NULL:
        return -err
    c.n_progs += 1
    return c.n_progs - 1


cdef bint cpu_in_arena(cpu_handle *c, uint32_t arena, size_t offset, size_t n) noexcept nogil:
    return arena < LT_N_ARENAS and c.arenas[arena] != NULL and offset <= c.sizes[arena] and n <= c.sizes[arena] - offset


cdef int cpu_write(void *h, uint32_t arena, size_t offset, const void *src, size_t n) noexcept nogil:
    cdef cpu_handle *c = <cpu_handle *>h
    if not cpu_in_arena(c, arena, offset, n):
        return LT_ERR_BINDING
    memcpy(c.arenas[arena] + offset, src, n)
    return 0


cdef int cpu_read(void *h, uint32_t arena, size_t offset, void *dst, size_t n) noexcept nogil:
    cdef cpu_handle *c = <cpu_handle *>h
    if not cpu_in_arena(c, arena, offset, n):
        return LT_ERR_BINDING
    memcpy(dst, c.arenas[arena] + offset, n)
    return 0


cdef int cpu_copy(void *h, uint32_t arena, size_t dst, size_t src, size_t n) noexcept nogil:
    cdef cpu_handle *c = <cpu_handle *>h
    if not cpu_in_arena(c, arena, dst, n) or not cpu_in_arena(c, arena, src, n) or (dst < src + n and src < dst + n):
        return LT_ERR_BINDING
    memcpy(c.arenas[arena] + dst, c.arenas[arena] + src, n)
    return 0


cdef int cpu_zero(void *h, uint32_t arena, size_t offset, size_t n) noexcept nogil:
    cdef cpu_handle *c = <cpu_handle *>h
    if not cpu_in_arena(c, arena, offset, n):
        return LT_ERR_BINDING
    memset(c.arenas[arena] + offset, 0, n)
    return 0


cdef int cpu_run(void *h, int prog, uint32_t n_steps, uint32_t n_tokens) noexcept nogil:
    return lt_cpu_run((<cpu_handle *>h).progs[prog], n_steps)


cdef int cpu_launch(void *h, int prog, uint32_t n_steps, uint32_t n_tokens, size_t out_offset,
                    size_t out_n) noexcept nogil:
    # runs before returning: the loop's next launch overwrites the step-args and the logits, as a
    # device's would, while the ring slots a wait reads stay those of its own launch
    cdef cpu_handle *c = <cpu_handle *>h
    cdef cpu_pending *p = &c.pending[c.n_launched % 2]
    if c.n_launched - c.n_waited >= 2 or out_offset > c.sizes[LT_ARENA_OUTPUT] or out_n > c.sizes[LT_ARENA_OUTPUT] - out_offset:
        return LT_ERR_BINDING
    p.err = lt_cpu_run(c.progs[prog], n_steps)
    p.out_offset, p.out_n = out_offset, out_n
    c.n_launched += 1
    return 0


cdef int cpu_wait(void *h, void *out, size_t out_n) noexcept nogil:
    cdef cpu_handle *c = <cpu_handle *>h
    cdef cpu_pending *p = &c.pending[c.n_waited % 2]
    if c.n_waited == c.n_launched:
        return LT_ERR_BINDING
    c.n_waited += 1
    if p.err == 0:
        memcpy(out, c.arenas[LT_ARENA_OUTPUT] + p.out_offset, p.out_n)
    return p.err


cdef uint8_t *cpu_host_arena(void *h, uint32_t arena) noexcept nogil:
    return (<cpu_handle *>h).arenas[arena]


cdef uint8_t *no_host_arena(void *h, uint32_t arena) noexcept nogil:
    return NULL


cdef const char *cpu_message(void *h, int err) noexcept nogil:
    return lt_cpu_error_string(err)


cdef void cpu_free(void *h) noexcept nogil:
    cdef cpu_handle *c = <cpu_handle *>h
    cdef int i
    for i in range(c.n_progs):
        lt_cpu_free(c.progs[i])
    for i in range(LT_N_ARENAS):
        free(c.raw[i])
    free(c)


cdef lt_backend CPU_OPS = lt_backend(cpu_create, NULL, cpu_add_program, cpu_write, cpu_read, cpu_copy, cpu_zero,
                                     cpu_run, NULL, NULL, NULL, cpu_host_arena, cpu_message, cpu_free)
# The CPU kernels behind the device-backend path of the loop (mirrored step-args, ring read-back,
# K steps per call): runs that path, and its overshoot logic, on machines without a GPU. Without
# copy / zero: the loop's fallback for a backend that lacks them (through read / write) runs here.
cdef lt_backend CPU_AS_DEVICE_OPS = lt_backend(cpu_create, NULL, cpu_add_program, cpu_write, cpu_read, NULL, NULL,
                                               cpu_run, cpu_launch, cpu_wait, NULL, no_host_arena, cpu_message,
                                               cpu_free)


# --- CUDA: lattice_cuda.h, its functions' addresses taken from the ctypes-loaded library
cdef enum:
    CUDA_ERR = 100      # LT_ERR_CUDA

cdef struct cuda_counters:           # lt_cuda_counters
    uint32_t dispatches_per_step
    uint64_t steps, graph_launches, kernel_launches, api_calls

cdef struct cuda_api:
    void *(*create)(const size_t *sizes, int device, char *msg, size_t msg_n) noexcept nogil
    void *(*create_shared)(const void *source, const size_t *sizes, char *msg, size_t msg_n) noexcept nogil
    int (*add_program)(void *c, const lt_dispatch *prog, uint32_t n, const uint8_t *consts, size_t n_consts,
                       uint32_t max_tokens, uint32_t *err_index) noexcept nogil
    int (*write)(void *c, uint32_t arena, size_t offset, const void *src, size_t n) noexcept nogil
    int (*read)(void *c, uint32_t arena, size_t offset, void *dst, size_t n) noexcept nogil
    int (*copy)(void *c, uint32_t arena, size_t dst, size_t src, size_t n) noexcept nogil
    int (*zero)(void *c, uint32_t arena, size_t offset, size_t n) noexcept nogil
    int (*run)(void *c, int prog, uint32_t n_steps, uint32_t T) noexcept nogil
    int (*launch)(void *c, int prog, uint32_t n_steps, uint32_t T, size_t out_offset, size_t out_n) noexcept nogil
    int (*wait)(void *c, const void **host) noexcept nogil
    void (*counters)(const void *c, cuda_counters *out) noexcept nogil
    const char *(*message)(void *c) noexcept nogil
    void (*free)(void *c) noexcept nogil

cdef cuda_api CUDA


cdef void *cuda_create(const lt_backend_cfg *cfg, int *err, char *msg, size_t msg_n) noexcept nogil:
    cdef void *c = CUDA.create(cfg.sizes, cfg.device, msg, msg_n)
    if c == NULL:
        err[0] = CUDA_ERR
        return NULL
    err[0] = CUDA.write(c, LT_ARENA_WEIGHTS, 0, cfg.weights, cfg.sizes[LT_ARENA_WEIGHTS])
    if err[0]:
        _copy_message(msg, msg_n, CUDA.message(c))
        CUDA.free(c)
        return NULL
    return c


cdef void *cuda_create_shared(const lt_backend_cfg *cfg, void *source, int *err, char *msg, size_t msg_n) noexcept nogil:
    cdef void *c = CUDA.create_shared(source, cfg.sizes, msg, msg_n)
    if c == NULL:
        err[0] = CUDA_ERR
    return c


cdef int cuda_add_program(void *h, const lt_dispatch *prog, uint32_t n, const lt_backend_cfg *cfg,
                          uint32_t max_tokens, uint32_t *err_index) noexcept nogil:
    return CUDA.add_program(h, prog, n, cfg.consts, cfg.n_consts, max_tokens, err_index)


cdef const char *cuda_message(void *h, int err) noexcept nogil:
    return CUDA.message(h) if err == CUDA_ERR or err == LT_ERR_NOMEM else lt_cpu_error_string(err)


cdef int cuda_write(void *h, uint32_t arena, size_t offset, const void *src, size_t n) noexcept nogil:
    return CUDA.write(h, arena, offset, src, n)


cdef int cuda_read(void *h, uint32_t arena, size_t offset, void *dst, size_t n) noexcept nogil:
    return CUDA.read(h, arena, offset, dst, n)


cdef int cuda_copy(void *h, uint32_t arena, size_t dst, size_t src, size_t n) noexcept nogil:
    return CUDA.copy(h, arena, dst, src, n)


cdef int cuda_zero(void *h, uint32_t arena, size_t offset, size_t n) noexcept nogil:
    return CUDA.zero(h, arena, offset, n)


cdef int cuda_run(void *h, int prog, uint32_t n_steps, uint32_t n_tokens) noexcept nogil:
    return CUDA.run(h, prog, n_steps, n_tokens)


cdef int cuda_launch(void *h, int prog, uint32_t n_steps, uint32_t n_tokens, size_t out_offset,
                     size_t out_n) noexcept nogil:
    return CUDA.launch(h, prog, n_steps, n_tokens, out_offset, out_n)


cdef int cuda_wait(void *h, void *out, size_t out_n) noexcept nogil:
    # the pinned copy holds the step-args, then the OUTPUT bytes the launch asked for
    cdef const void *host = NULL
    cdef int err = CUDA.wait(h, &host)
    if err == 0 and host != NULL:
        memcpy(out, <const uint8_t *>host + sizeof(lt_step_args), out_n)
    return err


cdef void cuda_counters_get(void *h, lt_backend_counters *out) noexcept nogil:
    cdef cuda_counters c
    CUDA.counters(h, &c)
    out.dispatches_per_step, out.submissions, out.api_calls = c.dispatches_per_step, c.graph_launches, c.api_calls


cdef void cuda_free(void *h) noexcept nogil:
    CUDA.free(h)


cdef lt_backend CUDA_OPS = lt_backend(cuda_create, cuda_create_shared, cuda_add_program, cuda_write, cuda_read,
                                      cuda_copy, cuda_zero, cuda_run, cuda_launch, cuda_wait, cuda_counters_get,
                                      no_host_arena, cuda_message, cuda_free)


# --- Metal: objc/lattice_metal.h from the bridge's shared library
cdef enum:
    METAL_ERR_FIRST = 100   # LT_METAL_ERR_*: the message is in lt_metal_error

cdef uint32_t NO_INDEX = 0xFFFFFFFF

cdef struct metal_counters:          # lt_metal_counters
    uint32_t dispatches_per_step
    uint64_t steps, tokens, command_buffers, api_calls

cdef struct metal_api:
    void *(*create)(const size_t *sizes, const uint8_t *consts, size_t n_consts, const char *library,
                    int *err, char *msg, size_t msg_n) noexcept nogil
    void *(*create_shared)(void *source, const size_t *sizes, int *err, char *msg, size_t msg_n) noexcept nogil
    int (*add_program)(void *m, const lt_dispatch *prog, uint32_t n) noexcept nogil
    int (*write)(void *m, uint32_t arena, size_t offset, const void *src, size_t n) noexcept nogil
    int (*read)(void *m, uint32_t arena, size_t offset, void *dst, size_t n) noexcept nogil
    int (*copy)(void *m, uint32_t arena, size_t dst, size_t src, size_t n) noexcept nogil
    int (*zero)(void *m, uint32_t arena, size_t offset, size_t n) noexcept nogil
    int (*run)(void *m, int prog, uint32_t n_steps) noexcept nogil
    int (*launch)(void *m, int prog, uint32_t n_steps, size_t out_offset, size_t out_n) noexcept nogil
    int (*wait)(void *m, void *out) noexcept nogil
    void (*counters)(const void *m, metal_counters *out) noexcept nogil
    const char *(*message)(const void *m) noexcept nogil
    void (*free)(void *m) noexcept nogil

cdef metal_api METAL
_metal_bridge = None        # the library METAL's functions come from


cdef void *metal_create(const lt_backend_cfg *cfg, int *err, char *msg, size_t msg_n) noexcept nogil:
    cdef void *m = METAL.create(cfg.sizes, cfg.consts, cfg.n_consts, cfg.library, err, msg, msg_n)
    if m == NULL:
        return NULL
    err[0] = METAL.write(m, LT_ARENA_WEIGHTS, 0, cfg.weights, cfg.sizes[LT_ARENA_WEIGHTS])
    if err[0]:
        _copy_message(msg, msg_n, METAL.message(m))
        METAL.free(m)
        return NULL
    return m


cdef void *metal_create_shared(const lt_backend_cfg *cfg, void *source, int *err, char *msg,
                              size_t msg_n) noexcept nogil:
    return METAL.create_shared(source, cfg.sizes, err, msg, msg_n)


cdef int metal_add_program(void *h, const lt_dispatch *prog, uint32_t n, const lt_backend_cfg *cfg,
                           uint32_t max_tokens, uint32_t *err_index) noexcept nogil:
    err_index[0] = NO_INDEX     # the bridge names the dispatch in its message
    return METAL.add_program(h, prog, n)    # the constants went in at create (shared by programs)


cdef int metal_write(void *h, uint32_t arena, size_t offset, const void *src, size_t n) noexcept nogil:
    return METAL.write(h, arena, offset, src, n)


cdef int metal_read(void *h, uint32_t arena, size_t offset, void *dst, size_t n) noexcept nogil:
    return METAL.read(h, arena, offset, dst, n)


cdef int metal_copy(void *h, uint32_t arena, size_t dst, size_t src, size_t n) noexcept nogil:
    return METAL.copy(h, arena, dst, src, n)


cdef int metal_zero(void *h, uint32_t arena, size_t offset, size_t n) noexcept nogil:
    return METAL.zero(h, arena, offset, n)


cdef int metal_run(void *h, int prog, uint32_t n_steps, uint32_t n_tokens) noexcept nogil:
    return METAL.run(h, prog, n_steps)      # one command buffer of n_steps steps; T is in the step-args


cdef int metal_launch(void *h, int prog, uint32_t n_steps, uint32_t n_tokens, size_t out_offset,
                      size_t out_n) noexcept nogil:
    return METAL.launch(h, prog, n_steps, out_offset, out_n)     # one command buffer


cdef int metal_wait(void *h, void *out, size_t out_n) noexcept nogil:
    return METAL.wait(h, out)


cdef void metal_counters_get(void *h, lt_backend_counters *out) noexcept nogil:
    cdef metal_counters c
    METAL.counters(h, &c)
    out.dispatches_per_step, out.submissions, out.api_calls = c.dispatches_per_step, c.command_buffers, c.api_calls


cdef const char *metal_message(void *h, int err) noexcept nogil:
    return METAL.message(h) if err >= METAL_ERR_FIRST else lt_cpu_error_string(err)


cdef void metal_free(void *h) noexcept nogil:
    METAL.free(h)


cdef lt_backend METAL_OPS = lt_backend(metal_create, metal_create_shared, metal_add_program, metal_write, metal_read,
                                       metal_copy, metal_zero, metal_run, metal_launch, metal_wait, metal_counters_get,
                                       no_host_arena, metal_message, metal_free)


cdef void _copy_message(char *dst, size_t n, const char *src) noexcept nogil:
    cdef size_t i = 0
    if n == 0:
        return
    while i + 1 < n and src[i] != 0:
        dst[i] = src[i]
        i += 1
    dst[i] = 0


cdef uintptr_t _address(lib, name) except 0:
    addr = ctypes.cast(getattr(lib, name), ctypes.c_void_p).value
    if not addr:
        raise BackendError(f"{name} is missing from {lib._name}")
    return addr


cdef class Backend:
    """One backend's C table plus what its handles are created with. Make it with cpu_backend(),
    cuda_backend() or metal_backend(); `steps` is the number of decode steps per backend call."""
    cdef const lt_backend *ops
    cdef readonly str name
    cdef readonly int steps
    cdef readonly int device
    cdef readonly object library       # Metal: the .metallib path (bytes)
    cdef object _lib                   # keeps the ctypes library loaded

    def __repr__(self):
        return f"<lattice._runtime.Backend {self.name} steps={self.steps}>"


cdef Backend _backend(const lt_backend *ops, str name, int steps):
    if steps < 1:
        raise ConfigError(f"steps per backend call must be >= 1, got {steps}")
    cdef Backend b = Backend.__new__(Backend)
    b.ops, b.name, b.steps = ops, name, steps
    return b


def cpu_backend(int steps=1, bint mirrored=False):
    """The CPU kernels over host arenas. One step per call: a K-step call would only delay
    on_token (the CPU has no launch latency to hide). mirrored=True (tests): drive them like a
    device backend (host mirror of the step-args, ring read-back), the stand-in for CUDA in CI."""
    if mirrored:
        return _backend(&CPU_AS_DEVICE_OPS, "cpu-mirrored", steps)
    return _backend(&CPU_OPS, "cpu", steps)


def cuda_backend(int device=0, int steps=16):
    """lattice/cuda's bridge (built with nvcc on first use). Raises BackendError naming why the
    CUDA backend is unavailable (no GPU, no nvcc, build or load failure)."""
    from .cuda import available, load_library
    ok, why = available()
    if not ok:
        raise BackendError(f"the CUDA backend is unavailable: {why}")
    lib = load_library()
    CUDA.create = <void *(*)(const size_t *, int, char *, size_t) noexcept nogil>_address(lib, "lt_cuda_create")
    CUDA.create_shared = <void *(*)(const void *, const size_t *, char *, size_t) noexcept nogil>_address(
        lib, "lt_cuda_create_shared")
    CUDA.add_program = <int (*)(void *, const lt_dispatch *, uint32_t, const uint8_t *, size_t, uint32_t,
                                uint32_t *) noexcept nogil>_address(lib, "lt_cuda_add_program")
    CUDA.write = <int (*)(void *, uint32_t, size_t, const void *, size_t) noexcept nogil>_address(lib, "lt_cuda_write")
    CUDA.read = <int (*)(void *, uint32_t, size_t, void *, size_t) noexcept nogil>_address(lib, "lt_cuda_read")
    CUDA.copy = <int (*)(void *, uint32_t, size_t, size_t, size_t) noexcept nogil>_address(lib, "lt_cuda_copy")
    CUDA.zero = <int (*)(void *, uint32_t, size_t, size_t) noexcept nogil>_address(lib, "lt_cuda_zero")
    CUDA.run = <int (*)(void *, int, uint32_t, uint32_t) noexcept nogil>_address(lib, "lt_cuda_run")
    CUDA.launch = <int (*)(void *, int, uint32_t, uint32_t, size_t, size_t) noexcept nogil>_address(lib, "lt_cuda_launch")
    CUDA.wait = <int (*)(void *, const void **) noexcept nogil>_address(lib, "lt_cuda_wait")
    CUDA.counters = <void (*)(const void *, cuda_counters *) noexcept nogil>_address(lib, "lt_cuda_counters_get")
    CUDA.message = <const char *(*)(void *) noexcept nogil>_address(lib, "lt_cuda_message")
    CUDA.free = <void (*)(void *) noexcept nogil>_address(lib, "lt_cuda_free")
    b = _backend(&CUDA_OPS, "cuda", steps)
    b.device, b._lib = device, lib
    return b


def metal_backend(bridge, library, int steps=16):
    """The Metal bridge from the shared library `bridge` (objc/lattice_metal.mm built for this
    machine), with kernels from `library` (a .metallib). Raises BackendError if it cannot load."""
    global _metal_bridge
    for what, path in (("bridge library", bridge), ("kernel library", library)):
        if not os.path.exists(path):
            raise BackendError(f"the Metal {what} {path} does not exist")
    bridge = os.path.realpath(bridge)
    if _metal_bridge is not None and _metal_bridge != bridge:
        # the table calls one library's functions: sessions of the other would be handed to it
        raise BackendError(f"the Metal bridge {_metal_bridge} is in use; one bridge library per process")
    try:
        lib = ctypes.CDLL(os.fspath(bridge))
    except OSError as e:
        raise BackendError(f"cannot load the Metal bridge {bridge}: {e}") from None
    METAL.create = <void *(*)(const size_t *, const uint8_t *, size_t, const char *, int *, char *,
                              size_t) noexcept nogil>_address(lib, "lt_metal_create")
    METAL.add_program = <int (*)(void *, const lt_dispatch *, uint32_t) noexcept nogil>_address(lib, "lt_metal_add_program")
    METAL.create_shared = <void *(*)(void *, const size_t *, int *, char *, size_t) noexcept nogil>_address(
        lib, "lt_metal_create_shared")
    METAL.write = <int (*)(void *, uint32_t, size_t, const void *, size_t) noexcept nogil>_address(lib, "lt_metal_write")
    METAL.read = <int (*)(void *, uint32_t, size_t, void *, size_t) noexcept nogil>_address(lib, "lt_metal_read")
    METAL.copy = <int (*)(void *, uint32_t, size_t, size_t, size_t) noexcept nogil>_address(lib, "lt_metal_copy")
    METAL.zero = <int (*)(void *, uint32_t, size_t, size_t) noexcept nogil>_address(lib, "lt_metal_zero")
    METAL.run = <int (*)(void *, int, uint32_t) noexcept nogil>_address(lib, "lt_metal_run")
    METAL.launch = <int (*)(void *, int, uint32_t, size_t, size_t) noexcept nogil>_address(lib, "lt_metal_launch")
    METAL.wait = <int (*)(void *, void *) noexcept nogil>_address(lib, "lt_metal_wait")
    METAL.counters = <void (*)(const void *, metal_counters *) noexcept nogil>_address(lib, "lt_metal_counters_get")
    METAL.message = <const char *(*)(const void *) noexcept nogil>_address(lib, "lt_metal_error")
    METAL.free = <void (*)(void *) noexcept nogil>_address(lib, "lt_metal_free")
    _metal_bridge = bridge
    b = _backend(&METAL_OPS, "metal", steps)
    b.library, b._lib = os.fsencode(library), lib
    return b


def c_sizes():
    """sizeof of the shared structs as this extension was compiled (tests compare with numpy)."""
    return {"lt_dispatch": sizeof(lt_dispatch), "lt_step_args": sizeof(lt_step_args)}


def simd():
    """The SIMD path the CPU backend picked on this machine."""
    return lt_cpu_simd().decode()


cdef uint8_t *_ptr(arr) except NULL:
    cdef uint8_t[::1] view = arr.reshape(-1).view(np.uint8)
    return &view[0]


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
    """A compiled Program bound to a backend (default: the CPU). Immutable after construction;
    sessions (`new_state()`) share its weights, program and constants."""
    cdef readonly object program
    cdef readonly int n_threads
    cdef readonly Backend backend
    cdef object _weights, _consts, _progs
    cdef void *_weights_handle     # device backends: holds the weights every session's handle uses
    cdef object _weights_lock

    def __init__(self, program, n_threads=None, Backend backend=None):
        if program.weights is None:
            raise ConfigError("this program was built without weights (materialize=False): it cannot run")
        if n_threads is not None and (not isinstance(n_threads, int) or n_threads < 1):
            raise ConfigError(f"n_threads must be a positive integer or None, got {n_threads!r}")
        if sizeof(lt_dispatch) != DISPATCH_DTYPE.itemsize or sizeof(lt_step_args) != STEP_DTYPE.itemsize:
            raise BackendError("lattice._runtime was compiled against a different metal/lattice_shared.h")
        self.program = program
        self.n_threads = n_threads or 0
        self.backend = backend if backend is not None else cpu_backend()
        in_flight = 1 if self.backend.ops.launch == NULL else 2
        if in_flight * self.backend.steps > program.layout["ring_cap"]:
            calls = "" if in_flight == 1 else f" ({in_flight} calls in flight)"
            raise ConfigError(f"{self.backend.steps} steps per backend call{calls} overrun the output ring of "
                              f"{program.layout['ring_cap']} tokens")
        self._weights = np.ascontiguousarray(program.weights).reshape(-1).view(np.uint8)
        self._consts = np.ascontiguousarray(program.consts)
        self._progs = {v: np.ascontiguousarray(program.dispatches[v]) for v in VARIANTS}
        self._weights_lock = threading.Lock()

    def __dealloc__(self):
        if self._weights_handle != NULL:     # every session (each holds this Runtime) is gone
            self.backend.ops.free(self._weights_handle)
            self._weights_handle = NULL

    cdef void _config(self, lt_backend_cfg *cfg, bint weights_only):
        """A handle's configuration: the program's arena sizes, or (weights_only) the weights
        with token-sized other arenas (the handle sessions take their weights from)."""
        memset(cfg, 0, sizeof(lt_backend_cfg))
        for name, a in ARENA.items():
            if name == "weights":
                cfg.sizes[a] = self._weights.nbytes
            elif name != "const":
                cfg.sizes[a] = ALIGN if weights_only else max(int(self.program.sizes[name]), ALIGN)
        if weights_only:
            cfg.sizes[LT_ARENA_STEP] = max(sizeof(lt_step_args), <size_t>ALIGN)
        cfg.weights = _ptr(self._weights)
        cfg.consts, cfg.n_consts = _ptr(self._consts), self._consts.nbytes
        cfg.n_threads, cfg.device = self.n_threads, self.backend.device
        cfg.library = NULL

    cdef void *_weights_source(self) except NULL:
        """Device backends: the handle holding the uploaded weights (made by the first session)."""
        cdef lt_backend_cfg cfg
        cdef int err = 0
        cdef char msg[512]
        with self._weights_lock:
            if self._weights_handle == NULL:
                self._config(&cfg, True)
                library = self.backend.library or b""
                cfg.library = library
                msg[0] = 0
                with nogil:
                    self._weights_handle = self.backend.ops.create(&cfg, &err, msg, sizeof(msg))
                if self._weights_handle == NULL:
                    raise BackendError(f"the {self.backend.name} backend could not be created: "
                                       f"{(<char *>msg).decode(errors='replace') or lt_cpu_error_string(err).decode()}")
        return self._weights_handle

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
        (the distribution each token was drawn from) with want_logits (one step per call then)."""
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


cdef enum:             # VARIANTS order
    DECODE = 0
    PREFILL = 1
    LOGITS = 2


cdef class State:
    """One sequence: a backend handle holding its arenas (state, scratch, step-args, output; the
    weights borrowed or uploaded), position and token history."""
    cdef readonly Runtime runtime
    cdef const lt_backend *_ops
    cdef void *_h
    cdef int _prog_id[N_VARIANTS]
    cdef bint _host               # the loop reads and writes the backend's step/output arenas in place
    cdef int _steps
    cdef object _lock, _mirrors
    cdef lt_step_args *_step      # the STEP arena, or its host mirror
    cdef uint32_t *_ids
    cdef uint8_t *_out            # the OUTPUT arena, or its host mirror
    cdef float *_logits_rows
    cdef uint32_t *_ring_tokens
    cdef float *_ring_logprobs
    cdef uint32_t _ring_cap
    cdef Py_ssize_t _rewound_to   # >= 0: the recurrent state holds only history[:_rewound_to]
    cdef uint32_t _n_pending      # decode launches not waited for yet (device backends)
    cdef uint64_t _n_tokens, _n_steps, _n_calls   # counters(): tokens handed back, steps run, table calls
    cdef readonly list history
    cdef object _prog

    def __init__(self, Runtime rt):
        cdef lt_backend_cfg cfg
        cdef void *source
        cdef int err = 0, idx
        cdef uint32_t where = 0
        cdef char msg[512]
        self.runtime = rt
        self._prog = prog = rt.program
        self._lock = threading.Lock()
        self.history = []
        self._rewound_to = -1
        be = rt.backend
        self._ops = be.ops
        self._steps = be.steps
        rt._config(&cfg, False)
        library = be.library or b""
        cfg.library = library
        msg[0] = 0
        if self._ops.create_shared != NULL:     # the weights are uploaded once per Runtime
            source = rt._weights_source()
            with nogil:
                self._h = self._ops.create_shared(&cfg, source, &err, msg, sizeof(msg))
        else:
            with nogil:
                self._h = self._ops.create(&cfg, &err, msg, sizeof(msg))
        if self._h == NULL:
            raise BackendError(f"the {be.name} backend could not be created: "
                               f"{(<char *>msg).decode(errors='replace') or lt_cpu_error_string(err).decode()}")
        tokens = {"decode": 1, "prefill": prog.prefill_chunk, "logits": prog.logits_chunk}
        for i, variant in enumerate(VARIANTS):
            recs = rt._progs[variant]
            idx = self._ops.add_program(self._h, <const lt_dispatch *>_ptr(recs), <uint32_t>len(recs), &cfg,
                                        tokens[variant], &where)
            if idx < 0:
                at = f" at dispatch {where}" if where != NO_INDEX else ""
                raise BackendError(f"the {be.name} backend rejected the {variant} program{at}: "
                                   f"{self._ops.message(self._h, -idx).decode(errors='replace')}")
            self._prog_id[i] = idx
        step = self._ops.host_arena(self._h, LT_ARENA_STEP)
        out = self._ops.host_arena(self._h, LT_ARENA_OUTPUT)
        self._host = step != NULL and out != NULL
        if not self._host:
            self._mirrors = (aligned_zeros(cfg.sizes[LT_ARENA_STEP]), aligned_zeros(cfg.sizes[LT_ARENA_OUTPUT]))
            step, out = _ptr(self._mirrors[0]), _ptr(self._mirrors[1])
        self._step = <lt_step_args *>step
        self._ids = <uint32_t *>(step + <size_t>prog.layout["ids"])
        self._out = out
        self._logits_rows = <float *>(out + <size_t>prog.layout["logits"])
        self._ring_cap = prog.layout["ring_cap"]
        self._ring_tokens = <uint32_t *>(out + <size_t>prog.layout["ring_tokens"])
        self._ring_logprobs = <float *>(out + <size_t>prog.layout["ring_logprobs"])
        self._step.ring_cap = self._ring_cap
        self._step.n_tokens = 1
        self._push_step(0)

    def __dealloc__(self):
        if self._h != NULL:
            self._ops.free(self._h)
            self._h = NULL

    @property
    def position(self):
        """Tokens whose state is cached (the position of the next token fed)."""
        return len(self.history)

    def counters(self):
        """Since the session was created, prefill included (lattice-bench): tokens handed back,
        steps run (overshoot included), dispatches per decode step, submissions (Metal command
        buffers, CUDA graph launches; 0 on the CPU), calls of the runtime's backend table and the
        device API calls the host made (Metal messages, CUDA runtime calls; the CPU: its kernel
        runs), with per-token ratios."""
        cdef lt_backend_counters c
        memset(&c, 0, sizeof(c))
        if self._ops.counters != NULL:
            self._ops.counters(self._h, &c)
        else:
            c.dispatches_per_step = len(self.runtime._progs["decode"])
            c.api_calls = self._n_calls
        per_token = lambda n: n / self._n_tokens if self._n_tokens else 0.0  # noqa: E731
        return {"backend": self.runtime.backend.name, "tokens": self._n_tokens, "steps": self._n_steps,
                "dispatches_per_step": c.dispatches_per_step, "submissions": c.submissions,
                "backend_calls": self._n_calls, "api_calls": c.api_calls,
                "submissions_per_token": per_token(c.submissions),
                "backend_calls_per_token": per_token(self._n_calls),
                "api_calls_per_token": per_token(c.api_calls)}

    def reset(self):
        """Forget the sequence: the next generate() prefills from position 0."""
        with self._use():
            self._restart()

    # ------------------------------------------------------------------------------ arenas
    cdef int _check(self, int err, what) except -1:
        if err:
            raise BackendError(f"{self.runtime.backend.name} backend, {what}: "
                               f"{self._ops.message(self._h, err).decode(errors='replace')}")
        return 0

    cdef int _write(self, uint32_t arena, size_t offset, const void *src, size_t n) except -1:
        return self._check(self._ops.write(self._h, arena, offset, src, n), f"write to arena {arena}")

    cdef int _read(self, uint32_t arena, size_t offset, void *dst, size_t n) except -1:
        return self._check(self._ops.read(self._h, arena, offset, dst, n), f"read from arena {arena}")

    cdef int _copy(self, uint32_t arena, size_t dst, size_t src, size_t n) except -1:
        """n bytes from src to dst within the arena: by the backend (a device copy after the work
        queued), else through the host."""
        if self._ops.copy != NULL:
            return self._check(self._ops.copy(self._h, arena, dst, src, n), f"copy within arena {arena}")
        buf = np.empty(n, np.uint8)
        self._read(arena, src, _ptr(buf), n)
        return self._write(arena, dst, _ptr(buf), n)

    cdef int _zero(self, uint32_t arena, size_t offset, size_t n) except -1:
        if self._ops.zero != NULL:
            return self._check(self._ops.zero(self._h, arena, offset, n), f"zero in arena {arena}")
        return self._write(arena, offset, _ptr(np.zeros(n, np.uint8)), n)

    cdef int _push_step(self, uint32_t n_ids) except -1:
        """Device backends: the step-args (and n_ids prompt ids after them) to the device."""
        if not self._host:
            self._write(LT_ARENA_STEP, 0, self._step,
                        (<uint8_t *>(self._ids + n_ids) - <uint8_t *>self._step) if n_ids else sizeof(lt_step_args))
        return 0

    cdef int _pull(self, size_t out_offset, size_t out_n) except -1:
        """Device backends: the step-args and OUTPUT bytes [out_offset, out_offset + out_n) back."""
        if not self._host:
            self._read(LT_ARENA_STEP, 0, self._step, sizeof(lt_step_args))
            if out_n:
                self._read(LT_ARENA_OUTPUT, out_offset, self._out + out_offset, out_n)
        return 0

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

    def _write_state(self, key, arr):
        off, nbytes = self._prog.layout["state"][key]
        arr = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
        self._write(LT_ARENA_STATE, off, _ptr(arr), nbytes)

    def _restart(self):
        """Position 0: recurrent state zeroed (the KV cache needs nothing: it is overwritten)."""
        lay = self._prog.layout["state"]
        if "recurrent" in lay:
            self._zero(LT_ARENA_STATE, lay["recurrent"][0], lay["recurrent"][1])
        self.history = []
        self._rewound_to = -1

    def _keep_recurrent(self, bint back):
        """Copies every conv + recurrent state (one span of the STATE arena) into its copy (the
        snapshot that a stop past the history rewinds to), or (back) the copy into the state. On a
        GPU it stays on the device: through the host, this copy of Qwen3.5-0.8B's 19 MB and the
        reset before it added ~8 ms to each generate() (H100)."""
        lay = self._prog.layout["state"]
        (state, nbytes), copy = lay["recurrent"], lay["recurrent_copy"][0]
        dst, src = (state, copy) if back else (copy, state)
        self._copy(LT_ARENA_STATE, dst, src, nbytes)

    def _prepare(self, ids):
        """Reuse the cached prefix for ids; returns the number of reused tokens."""
        h = self.history
        if self._rewound_to >= 0:
            h = h[:self._rewound_to]
        reuse = self._prog.reusable_prefix(h, ids)
        if reuse == 0:
            self._restart()
        self.history = h[:reuse]
        self._rewound_to = -1
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
        lay = self._prog.layout["state"]
        if not self.history:    # zeroed in place (a vocabulary's counts: 1 MB for Qwen3.5)
            for key in ("counts", "hist"):
                self._zero(LT_ARENA_STATE, lay[key][0], lay[key][1])
        else:
            counts = np.zeros(lay["counts"][1] // 4, np.uint32)
            hist = np.zeros(lay["hist"][1] // 4, np.uint32)
            h = np.asarray(self.history, np.int64)
            np.add.at(counts, h, 1)
            hist[np.arange(len(h)) % len(hist)] = h
            self._write_state("counts", counts)
            self._write_state("hist", hist)
        s.n_seen = len(self.history)

    cdef int _run(self, int which, const uint32_t *ids, uint32_t n, uint32_t n_steps) except -1:
        """n_steps replays of program `which`: over n prompt tokens from ids, or (ids NULL) decode
        steps fed by the token the sampler left in the step-args. Raises on backend errors; the
        caller advances the history."""
        cdef int err
        cdef uint32_t i
        if ids != NULL:
            self._step.pos = len(self.history)
            self._step.n_tokens = n
            for i in range(n):
                self._ids[i] = ids[i]
            self._push_step(n)
        with nogil:
            err = self._ops.run(self._h, self._prog_id[which], n_steps, n)
        self._n_calls += 1
        self._n_steps += n_steps
        return self._fail(err) if err else 0

    cdef int _fail(self, int err) except -1:
        """A backend call failed: the session starts over; raises."""
        self._drain()
        self._step.error = 0
        self._restart()
        if err == LT_ERR_NONFINITE:
            raise NumericalError("NaN or Inf in the logits: the session was reset")
        self._check(err, "run")
        return 0

    cdef int _launch(self, uint32_t n_steps) except -1:
        """Device backends: queue n_steps decode steps (each fed by its predecessor's token) and
        the read-back of the token and logprob rings; returns at once."""
        cdef int err
        with nogil:
            err = self._ops.launch(self._h, self._prog_id[DECODE], n_steps, 1, 0, 8 * self._ring_cap)
        self._n_calls += 1
        if err:
            return self._fail(err)
        self._n_pending += 1
        self._n_steps += n_steps
        return 0

    cdef int _wait(self) except -1:
        """Waits for the oldest launch; its ring slots land in the host mirror."""
        cdef int err
        with nogil:
            err = self._ops.wait(self._h, self._out, 8 * self._ring_cap)
        self._n_pending -= 1
        self._n_calls += 1
        return self._fail(err) if err else 0

    cdef int _drain(self) except -1:
        """Waits for every pending launch, dropping what it made (overshoot, or after a failure)."""
        while self._n_pending:
            with nogil:
                self._ops.wait(self._h, self._out, 8 * self._ring_cap)
            self._n_pending -= 1
            self._n_calls += 1
        return 0

    def _prefill(self, list ids, int which, int chunk, rows=None):
        cdef uint32_t[::1] buf = np.asarray(ids, dtype=np.uint32)
        cdef Py_ssize_t start = 0, n
        while start < len(ids):
            n = min(chunk, len(ids) - start)
            self._run(which, &buf[start], <uint32_t>n, 1)
            self._pull(self._prog.layout["logits"], n * self._prog.vocab * 4 if rows is not None else 0)
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
        cdef Py_ssize_t steps = 1 if want_logits else self._steps
        cdef Py_ssize_t n_new, i, first = -1       # first < 0: the token is in the step-args
        cdef Py_ssize_t snapshot = -1               # >= 0: the history's length when the state was kept
        cdef uint32_t slot
        # device backends keep two calls in flight: call i + 1 is launched before call i's tokens
        # are read (its steps are fed by the device's sampler); a stop found in call i makes call
        # i + 1 overshoot. want_logits reads each step's logits: one call at a time.
        cdef bint pipelined = self._ops.launch != NULL and not want_logits
        cdef Py_ssize_t queued = 0, next_first = 0, head = 0
        cdef Py_ssize_t pend_first[2]
        cdef Py_ssize_t pend_n[2]
        cdef size_t logits_off = self._prog.layout["logits"], vocab = self._prog.vocab
        reused = self._prepare(ids)
        self._set_sampling(params)
        tokens, logprobs, logits = [], [], []
        t0 = time.perf_counter()
        self._prefill(ids[reused:], PREFILL, self._prog.prefill_chunk)
        # steps that run past a stop (K per call, a call in flight) feed the recurrent state tokens
        # the history will not hold, and it cannot rewind: keep a copy from before decoding
        if self._prog.recurrent and (pipelined or steps > 1) and max_tokens > 1:
            self._keep_recurrent(False)
            snapshot = len(self.history)
        if want_logits and not self._host:      # the last prompt token's row
            self._read(LT_ARENA_OUTPUT, logits_off, self._logits_rows, vocab * 4)
        t1 = time.perf_counter()
        finish = "length"
        n_new = 1 if max_tokens > 0 else 0
        try:
            while n_new:
                done = False
                for i in range(n_new):
                    if first < 0:
                        tok, lp = self._step.next_token, self._step.next_logprob
                    else:
                        slot = (first + i) % self._ring_cap
                        tok, lp = self._ring_tokens[slot], self._ring_logprobs[slot]
                    if want_logits:
                        logits.append(self._logits_copy(1)[0])
                    if tok in stops:
                        finish, done = "stop", True
                        break
                    tokens.append(tok)
                    logprobs.append(lp)
                    if on_token is not None and on_token(tok, lp) is False:
                        finish, done = "stop", True
                        break
                    if len(tokens) >= max_tokens:
                        done = True
                        break
                    if len(self.history) >= context:
                        finish, done = "context", True
                        break
                    self.history.append(tok)        # fed by the next step
                if done:
                    break
                if pipelined:
                    if first < 0:
                        next_first = self._step.step
                    # the budget counts the tokens of calls in flight as accepted
                    while self._n_pending < 2:
                        n_new = min(steps, max_tokens - len(tokens) - queued,
                                    context - len(self.history) - queued + 1)
                        if n_new <= 0:
                            break
                        self._launch(<uint32_t>n_new)
                        slot = (head + self._n_pending - 1) % 2
                        pend_first[slot], pend_n[slot] = next_first, n_new
                        next_first += n_new
                        queued += n_new
                    if self._n_pending == 0:
                        break
                    first, n_new = pend_first[head], pend_n[head]
                    head ^= 1
                    queued -= n_new
                    self._wait()
                else:
                    # the first step feeds the last accepted token, each later one its predecessor's
                    n_new = min(steps, max_tokens - len(tokens), context - len(self.history) + 1)
                    first = self._step.step
                    self._run(DECODE, NULL, 1, <uint32_t>n_new)
                    if not self._host:
                        self._pull(0, 8 * self._ring_cap)       # token and logprob rings
                        if want_logits:
                            self._read(LT_ARENA_OUTPUT, logits_off, self._logits_rows, vocab * 4)
                if PyErr_CheckSignals() < 0:
                    raise KeyboardInterrupt
        finally:
            if pipelined:
                self._drain()
                self._pull(0, 0)        # the step-args as the last step left them
                self._step.error = 0    # a failure was raised and the session reset
            # steps ran past a stop: the recurrent state goes back to its copy from before
            # decoding, and the next call feeds it the tokens since (a KV cache is overwritten)
            if self._step.pos > len(self.history) and self._prog.recurrent:
                self._rewound_to = 0
                if snapshot >= 0:
                    self._keep_recurrent(True)
                    self._rewound_to = snapshot
        t2 = time.perf_counter()
        self._n_tokens += len(tokens)
        res = {"tokens": tokens, "logprobs": logprobs, "finish_reason": finish, "prompt_tokens": len(ids),
               "reused_tokens": reused, "prefill_seconds": t1 - t0, "decode_seconds": t2 - t1}
        if want_logits:
            res["logits"] = np.stack(logits) if logits else np.zeros((0, vocab), np.float32)
        return res

    def _logits(self, list ids, bint append):
        if not append:
            self._restart()
        elif self._rewound_to >= 0:  # the recurrent state holds history[:_rewound_to]: feed the rest
            rest = self.history[self._rewound_to:]
            if self._rewound_to == 0:
                self._restart()
            else:
                self.history = self.history[:self._rewound_to]
                self._rewound_to = -1
            self._set_sampling(SamplingParams(seed=0))
            self._prefill(rest, PREFILL, self._prog.prefill_chunk)
        if len(self.history) + len(ids) > self._prog.context:
            raise ContextLengthError(f"{len(self.history)} cached + {len(ids)} new tokens do not fit "
                                     f"the context of {self._prog.context}")
        self._set_sampling(SamplingParams(seed=0))
        rows = []
        self._prefill(ids, LOGITS, self._prog.logits_chunk, rows)
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
