/* Apple GPU load for lattice-bench's contention mode (`lattice-bench run --load N`, see
 * lattice/bench/load.py): each load process submits one short compute dispatch of a busy-loop
 * kernel (metal/load.metal, lt_load_spin) every period, like another application sharing the GPU,
 * and reads how long the GPU ran it from the command buffer's GPUStartTime / GPUEndTime.
 * Compiled into the bridge library next to lattice_metal.mm; the kernel is in lattice.metallib. */
#ifndef LATTICE_LOAD_H
#define LATTICE_LOAD_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct lt_load lt_load;

/* The device, a queue and the lt_load_spin pipeline from `metallib`, for dispatches of
 * `threadgroups` x `threads_per_threadgroup` threads. Returns NULL with a message in err_msg
 * (err_cap bytes) on failure. */
lt_load *lt_load_create(const char *metallib, uint32_t threadgroups, uint32_t threads_per_threadgroup,
                        char *err_msg, size_t err_cap);

/* One burst: a command buffer holding one dispatch in which every thread runs `iterations`
 * dependent multiply-adds, committed and waited for. *gpu_seconds = GPUEndTime - GPUStartTime
 * (the GPU's execution time of the command buffer). Returns 0, or -1 with the reason in
 * lt_load_error (the command buffer failed, or reported no GPU time). */
int lt_load_burst(lt_load *load, uint32_t iterations, double *gpu_seconds);

/* The last error's message ("" if none). */
const char *lt_load_error(const lt_load *load);

void lt_load_free(lt_load *load);

#ifdef __cplusplus
}
#endif

#endif /* LATTICE_LOAD_H */
