/* The CUDA backend's C interface: the shape of lattice/csrc/lattice_cpu.h, except that the
 * arenas live in device memory, owned by the backend, and the host reaches them through
 * lt_cuda_write / lt_cuda_read.
 *
 * One lt_cuda holds the arenas and the stream (created with the highest stream priority); one or
 * more programs (decode, prefill, logits) are added to it and share its arenas. Decode steps
 * (T = 1) replay CUDA graphs captured on first use: one of 8 steps while 8 or more remain, then
 * one of a single step; steps with T > 1 (prefill) and the eager mode launch kernels one by one.
 * A program added with max_tokens = 1 (decode) may run fewer kernels than it has dispatches: a
 * ROPE_KV feeding the ATTENTION after it is fused into that kernel where that is race-free
 * (backend.cu, fuse_rope_into_attention); the dispatches' results are the same.
 * Kernels are launched with programmatic dependent launch (LATTICE_CUDA_PDL=0: off);
 * LATTICE_CUDA_EAGER=1 makes every handle start in the eager mode (the graph-replay ablation). */
#ifndef LATTICE_CUDA_H
#define LATTICE_CUDA_H

#include <stddef.h>
#include <stdint.h>

#include "../../metal/lattice_shared.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct lt_cuda lt_cuda;

/* A CUDA runtime call failed (the message is in lt_cuda_message). Beyond the LT_ERR_* codes. */
#define LT_ERR_CUDA 100

/* Allocates the arenas (sizes[LT_ARENA_CONST] is ignored: each program brings its constants),
 * zeroed, on device `device`. Returns NULL on failure with the reason in msg. */
lt_cuda *lt_cuda_create(const size_t sizes[LT_N_ARENAS], int device, char *msg, size_t msg_n);

/* A handle whose WEIGHTS arena is `source`'s (not uploaded again; sizes[WEIGHTS] is ignored), on
 * its device, with its own other arenas and stream: a second session of one model. `source` must
 * outlive it and its weights must not be written while it exists. */
lt_cuda *lt_cuda_create_shared(const lt_cuda *source, const size_t sizes[LT_N_ARENAS], char *msg, size_t msg_n);

/* Validates a program against the arenas and adds it; max_tokens bounds T of its runs (sizes its
 * workspaces). Returns the program's index (>= 0), or -LT_ERR_* with *err_index = the dispatch. */
int lt_cuda_add_program(lt_cuda *c, const lt_dispatch *prog, uint32_t n, const uint8_t *consts,
                        size_t n_consts, uint32_t max_tokens, uint32_t *err_index);

/* Copies host bytes into an arena (ordered after the work already queued) / an arena into host
 * memory (waits for the queued work). Return LT_OK, LT_ERR_BINDING (outside the arena) or
 * LT_ERR_CUDA. */
int lt_cuda_write(lt_cuda *c, uint32_t arena, size_t offset, const void *src, size_t n);
int lt_cuda_read(lt_cuda *c, uint32_t arena, size_t offset, void *dst, size_t n);

/* Within an arena, on the device, ordered after the work already queued (returns at once): copies
 * n bytes from src to dst (the ranges must not overlap) / zeroes n bytes. LT_OK, LT_ERR_BINDING
 * (outside the arena, or overlapping) or LT_ERR_CUDA. */
int lt_cuda_copy(lt_cuda *c, uint32_t arena, size_t dst, size_t src, size_t n);
int lt_cuda_zero(lt_cuda *c, uint32_t arena, size_t offset, size_t n);

/* 1: plain kernel launches for every step (the ablation); 0 (default): CUDA graph per step. */
void lt_cuda_set_eager(lt_cuda *c, int eager);

/* Queues n_steps replays of program `prog` with T tokens in the first step (later steps have
 * T = 1: the sampler sets step.n_tokens), then an asynchronous copy of the step args and of
 * OUTPUT bytes [out_offset, out_offset + out_n) into pinned host memory (one buffer per pending
 * launch). Returns at once. At most two launches are pending (LT_ERR_ARGS past that). */
int lt_cuda_launch(lt_cuda *c, int prog, uint32_t n_steps, uint32_t T, size_t out_offset, size_t out_n);

/* Waits for the oldest pending launch. *host (if not NULL) points at its pinned copy (valid until
 * the second launch after it): lt_step_args, then the OUTPUT bytes asked for. Returns the step's
 * error code (LT_OK, LT_ERR_*), LT_ERR_ARGS (nothing pending) or LT_ERR_CUDA. */
int lt_cuda_wait(lt_cuda *c, const void **host);

/* lt_cuda_launch + lt_cuda_wait without the output copy; LT_ERR_ARGS while a launch is pending. */
int lt_cuda_run(lt_cuda *c, int prog, uint32_t n_steps, uint32_t T);

/* Counters since creation (lattice-bench): runs and launches, prefill included. */
typedef struct lt_cuda_counters {
    uint32_t dispatches_per_step;  /* kernels of one step of the first program added (decode) */
    uint64_t steps;                /* steps queued, overshoot included */
    uint64_t graph_launches;       /* cudaGraphLaunch calls (a graph holds 1 or 8 steps) */
    uint64_t kernel_launches;      /* kernels launched one by one (prefill steps, eager mode) */
    uint64_t api_calls;            /* CUDA runtime calls made by launches and waits */
} lt_cuda_counters;

void lt_cuda_counters_get(const lt_cuda *c, lt_cuda_counters *out);

/* The last CUDA error message, or "". */
const char *lt_cuda_message(lt_cuda *c);

/* Device name and compute capability, e.g. "NVIDIA H100 80GB HBM3 (sm_90, 132 SMs)", or the
 * reason there is none. Returns 0 if a device is usable. */
int lt_cuda_device(int device, char *buf, size_t n);

void lt_cuda_free(lt_cuda *c);

#ifdef __cplusplus
}
#endif

#endif /* LATTICE_CUDA_H */
