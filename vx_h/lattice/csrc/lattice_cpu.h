/* The CPU backend: replays a Lattice program (metal/lattice_shared.h) with C kernels.
 *
 * Threads: lt_cpu_run opens one OpenMP parallel region for all its steps; every thread walks
 * the dispatch list, each dispatch is split across threads (by rows / heads), and threads wait
 * for each other only at dispatches flagged LT_DISPATCH_BARRIER and between steps.
 * SIMD: chosen once at run time (cpuid), overridable with LATTICE_SIMD=scalar|avx2|avx512|neon
 * or lt_cpu_set_simd. Activations are f32; Q8/Q4 GEMVs on AVX2/AVX-512 quantize them to int16 per
 * block of 32 (error <= 2^-16 of the block's max |x|) for integer multiply-adds, other paths and
 * formats widen the weights to f32.
 */
#ifndef LATTICE_CPU_H
#define LATTICE_CPU_H

#include <stddef.h>
#include <stdint.h>

#include "../../metal/lattice_shared.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct lt_cpu lt_cpu;

/* Validates the program against the arenas (kernel ids, bindings and args inside their arenas,
 * argument sanity) and prepares per-thread workspaces. `consts` (n_consts bytes, copied) is the
 * CONST arena: arenas[LT_ARENA_CONST] is ignored. Arenas stay owned by the caller and must
 * outlive the returned object; only their contents change. n_threads <= 0 picks the OpenMP
 * default. Returns NULL on failure with *err = LT_ERR_* and *err_index = the offending dispatch. */
lt_cpu *lt_cpu_create(const lt_dispatch *prog, uint32_t n, const uint8_t *consts, size_t n_consts,
                      void *const arenas[LT_N_ARENAS], const size_t sizes[LT_N_ARENAS],
                      int n_threads, int *err, uint32_t *err_index);

/* Replays the program n_steps times. Returns LT_OK, or the LT_ERR_* a kernel raised (it is also
 * left in lt_step_args.error); the run stops after the step that raised it. */
int lt_cpu_run(lt_cpu *cpu, uint32_t n_steps);

void lt_cpu_free(lt_cpu *cpu);

/* Runs one dispatch by itself (kernel tests): validates it like lt_cpu_create, then runs it with
 * n_threads threads. Returns LT_OK or an LT_ERR_* code. */
int lt_cpu_run_one(const lt_dispatch *d, const uint8_t *consts, size_t n_consts,
                   void *const arenas[LT_N_ARENAS], const size_t sizes[LT_N_ARENAS], int n_threads);

/* The SIMD path in use: "scalar", "avx2", "avx512" or "neon". */
const char *lt_cpu_simd(void);

/* Forces a SIMD path by name; returns 0, or -1 if this CPU (or build) cannot run it. */
int lt_cpu_set_simd(const char *name);

/* A short English description of an LT_ERR_* code. */
const char *lt_cpu_error_string(int err);

#ifdef __cplusplus
}
#endif

#endif /* LATTICE_CPU_H */
