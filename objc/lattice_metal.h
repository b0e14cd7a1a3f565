/* The Metal backend: records a Lattice program (metal/lattice_shared.h) into an
 * MTLIndirectCommandBuffer once and replays it, K steps per command buffer, two command buffers
 * in flight. Same shape as the CPU backend (lattice/csrc/lattice_cpu.h), except that Metal owns
 * the arena memory (private storage for weights, state and scratch), so the host reaches arenas
 * through lt_metal_write / lt_metal_read.
 *
 * Buffer slots of every recorded command: 0 = the kernel's args struct (CONST arena at
 * dispatch.args_offset), 1 = step args (STEP arena, offset 0), 2 + i = binding i. Slots of
 * bindings the kernel declares but the dispatch leaves unbound get a small zeroed buffer (Metal
 * wants every declared buffer bound). Kernel ids map to functions named in lt_metal_kernel_name.
 */
#ifndef LATTICE_METAL_H
#define LATTICE_METAL_H

#include <stddef.h>
#include <stdint.h>

#include "../metal/lattice_shared.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct lt_metal lt_metal;

/* Errors besides the kernels' LT_ERR_* codes. */
enum {
    LT_METAL_ERR_DEVICE = 100,    /* no Metal device, or an object could not be created */
    LT_METAL_ERR_LIBRARY = 101,   /* library missing / does not load / lacks a kernel function */
    LT_METAL_ERR_PROGRAM = 102,   /* invalid program: kernel id, binding outside its arena, ... */
    LT_METAL_ERR_ARGS = 103,      /* invalid call arguments (arena id, range, steps per buffer) */
    LT_METAL_ERR_GPU = 104        /* a command buffer failed: message in lt_metal_error */
};

/* Counters since creation (lattice-bench). */
typedef struct lt_metal_counters {
    uint32_t dispatches_per_step;  /* commands in the first program recorded (the runtime's
                                      decode), split attention reduces included */
    uint64_t steps;                /* steps executed on the GPU, overshoot included */
    uint64_t tokens;               /* tokens handed back by lt_metal_generate */
    uint64_t command_buffers;      /* command buffers committed by runs and launches */
    uint64_t api_calls;            /* Metal messages the host sent during runs */
} lt_metal_counters;

/* Creates the device objects and the arenas (sizes[a] bytes each; WEIGHTS, STATE, SCRATCH
 * private, zero-filled; STEP, OUTPUT, CONST shared). consts (n_consts bytes) is copied into the
 * CONST arena, shared by every program; sizes[CONST] is ignored. `library` is a compiled
 * .metallib, or a directory of .metal sources compiled at run time (fallback). Returns NULL on
 * failure with *err set and a message in err_msg (err_cap bytes). */
lt_metal *lt_metal_create(const size_t sizes[LT_N_ARENAS], const uint8_t *consts, size_t n_consts,
                          const char *library, int *err, char *err_msg, size_t err_cap);

/* A second session of `source`'s model: its WEIGHTS and CONST arenas, libraries and device are
 * `source`'s (retained: the weights are not uploaded or allocated again, sizes[WEIGHTS] and
 * sizes[CONST] are ignored), pipelines are taken from `source` and the ones this handle creates
 * are left there for the next session; state, scratch, step and output arenas, the queue, the
 * recorded programs and the split-attention reduce pipeline are its own. `source` must outlive
 * it while programs are added (its pipeline table is shared: add programs to handles of one
 * source from one thread at a time); its weights must not be written while it exists. Split
 * attention follows source's setting. */
lt_metal *lt_metal_create_shared(lt_metal *source, const size_t sizes[LT_N_ARENAS], int *err, char *err_msg,
                                 size_t err_cap);

/* Validates a program against the arenas, creates the pipelines of the kernels it uses and
 * records it into its own indirect command buffer. Programs (decode, prefill, ...) share the
 * arenas. Returns the program's id (>= 0) or -LT_METAL_ERR_*. */
int lt_metal_add_program(lt_metal *m, const lt_dispatch *prog, uint32_t n);

/* Split-K attention for programs added after this call: an attention dispatch runs over
 * `splits` key ranges (grid.z) into a backend workspace, then lt_attention_reduce merges them.
 * 0 (the default) splits decode-sized launches on long contexts only (see attention_splits in
 * lattice_metal.mm); 1 never splits; n > 1 splits every attention dispatch n ways. */
void lt_metal_set_attention_splits(lt_metal *m, uint32_t splits);

/* Copies bytes into / out of an arena (private arenas go through a staging buffer and a blit;
 * weights are uploaded this way once). Waits for the GPU. Returns 0 or LT_METAL_ERR_*. */
int lt_metal_write(lt_metal *m, uint32_t arena, size_t offset, const void *src, size_t n);
int lt_metal_read(lt_metal *m, uint32_t arena, size_t offset, void *dst, size_t n);

/* Within an arena, without the host's memory (private arenas: one blit, after the command buffers
 * committed before it; waits for it): copies n bytes from src to dst (ranges not overlapping) /
 * zeroes n bytes. Offsets and n are multiples of 4 (a blit's rule on macOS). Returns 0 or
 * LT_METAL_ERR_ARGS / LT_METAL_ERR_GPU. */
int lt_metal_copy(lt_metal *m, uint32_t arena, size_t dst, size_t src, size_t n);
int lt_metal_zero(lt_metal *m, uint32_t arena, size_t offset, size_t n);

/* Replays program `program` up to max_steps times, steps_per_cb steps per command buffer, two command
 * buffers in flight. The host reads each finished command buffer's tokens (and logprobs) from the
 * output ring in its completion handler and stops at the first token in stop_ids (kept as the
 * last output token) or after max_steps. Tokens of steps already in flight past the stop (the
 * overshoot, < 2 * steps_per_cb steps) are discarded; step args are rewound to the stop (pos,
 * token, step, n_seen), while recurrent state (GDN, penalty counts) has seen the overshoot.
 * The ring (step.ring_cap) must hold 2 * steps_per_cb tokens.
 * Writes up to max_steps tokens / logprobs (logprobs may be NULL), *n_out = tokens written,
 * *n_steps_run = steps the GPU executed. Returns LT_OK, an LT_ERR_* a kernel raised (the output
 * stops before the failing step) or LT_METAL_ERR_*. */
int lt_metal_generate(lt_metal *m, int program, uint32_t max_steps, uint32_t steps_per_cb,
                      const uint32_t *stop_ids, uint32_t n_stop,
                      uint32_t *tokens, float *logprobs, uint32_t *n_out, uint32_t *n_steps_run);

/* Commits one command buffer of n_steps replays of program `program` and returns at once (the
 * runtime's token loop: it launches call i + 1 before reading call i's tokens). At most two
 * launches are pending; lt_metal_wait waits for the oldest and copies OUTPUT bytes
 * [out_offset, out_offset + out_n) into `out` as the GPU left them, so a later launch in flight
 * must write other bytes (a token ring of >= 2 * n_steps slots). Returns 0 or LT_METAL_ERR_*. */
int lt_metal_launch(lt_metal *m, int program, uint32_t n_steps, size_t out_offset, size_t out_n);

/* Waits for the oldest pending launch. Returns LT_OK (the bytes copied), the LT_ERR_* a kernel
 * raised (sticky in the step args: a launch after it reports it too) or LT_METAL_ERR_*. */
int lt_metal_wait(lt_metal *m, void *out);

/* Replays program `program` n_steps times in one command buffer and waits (prefill). Like
 * lt_metal_generate, refused while a launch is pending. */
int lt_metal_run(lt_metal *m, int program, uint32_t n_steps);

void lt_metal_counters_get(const lt_metal *m, lt_metal_counters *out);

/* The last error message (empty if none). */
const char *lt_metal_error(const lt_metal *m);

/* The Metal function of an LT_K_* kernel id (NULL for an unknown id). */
const char *lt_metal_kernel_name(uint32_t kernel);

void lt_metal_free(lt_metal *m);

#ifdef __cplusplus
}
#endif

#endif /* LATTICE_METAL_H */
