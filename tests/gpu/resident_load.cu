/* Does a decode step that keeps its blocks on the SMs from its first phase to its last lose less to
 * other processes' load than the same step as a chain of kernels? A synthetic decode step: PHASES
 * dependent GEMV-like phases (each warp reads 4 rows of 1 KB, its weights requested before it
 * waits for the previous phase's output), the same grid and work per phase in every form:
 *
 *   kernels:    one kernel per phase, chained with programmatic dependent launch (as Lattice's
 *               decode graph): the weights are requested at launch, the previous phase's output
 *               read after griddepcontrol.wait. Between phases the blocks retire, and another
 *               process's blocks can take their registers.
 *   kernels-narrow: the same, plus a narrow phase (k_narrow: 64 blocks, as Lattice's GDN recurrence)
 *               after every fourth phase, which leaves half the SMs idle while it runs.
 *   kernels-l1, kernels-shared: the chain, its kernel preferring an L1 / shared-memory carveout
 *               of all L1 (0% shared) or all shared memory (100%).
 *   persistent: one cooperative kernel per step; the blocks request the next phase's weights, then
 *               meet at a grid barrier. They hold their registers through the step.
 *   persistent8: the same, one kernel for 8 steps: a launch boundary every 8 steps.
 *   persistent8-counter, -red, -flag, -flagsleep: persistent8 with a barrier of one counter
 *               (counter_barrier's kinds) in place of cooperative_groups' grid.sync().
 *   persistent8-none: persistent8 without barriers: not a correct step, the floor of its phases.
 *   persistent8-ll: persistent8 without barriers, its activations carrying their phase (k_step_ll):
 *               each block polls a word of every block's output.
 *   persistent8-tree: persistent8 with a two-level counter barrier (groups of 16 blocks, then a root).
 *   persistent8-cluster[N]: persistent8 launched in clusters of N blocks (default 8), which meet at
 *               the hardware cluster barrier; one block a cluster then meets the others at a counter.
 *   persistent8-clusteronly[N]: the cluster barriers alone (not a correct step: their floor).
 *   persistent8-split[-relaxed | -warp | -spread | -late0]: persistent8 with a split barrier: arrive
 *               once the phase's output is stored, request the next weights, then wait (split_arrive,
 *               split_wait). The fastest form with barriers (session 19).
 *   persistent8-llx: persistent8-ll, each block reading one row of every warp's output.
 *   persistent8-onecluster[N]: persistent8 on one cluster of N blocks (default 8; 16 is the most),
 *               one an SM, meeting at the hardware cluster barrier: the rest of the GPU is left to
 *               other work (e.g. --threads 512 --shapes 8:32: 16 blocks, phases of 1 MB).
 *   persistent8-onecluster-pipe[N]: the same with the weights requested PIPE_STAGES phases ahead into
 *               shared memory (k_step_pipe); -tma: each stage one bulk copy (k_step_tma).
 *
 * Every form runs as CUDA graphs of 8 steps. Each thread also holds PAD_PHASE (the chain) or
 * PAD_STEP (persistent) values live: by default ~120 registers, so that two blocks fill an SM
 * (Lattice's decode kernels hold 86 for its 4-row Q8 GEMVs, 114-118 for the LM head and 200-210 for
 * the attention at 256 threads). Other PAD values give other register counts (resident_load.py
 * --pads).
 *
 *   nvcc -O3 -std=c++17 -arch=sm_90 tests/gpu/resident_load.cu -o /tmp/resident_load
 *   /tmp/resident_load MODE SECONDS      (MODE: kernels[-narrow | -l1 | -shared] | persistent |
 *                                        persistent8[-counter | -red | -flag | -flagsleep | -none | -ll |
 *                                        -llx | -tree | -cluster[N] | -clusteronly[N] | -split[...]])
 *   -DTHREADS=512: one block an SM (resident_load.py --threads 512)
 *   -DROWS_PER_WARP=1 -DROW_VECS=32: short phases, as SmolLM2's, whose time is latency (resident_load.py
 *               --shapes 1:32): fewer registers, so more blocks fit, and a phase is 1.6 MB at 256
 *               threads (396 blocks), 2.2 MB at 512 (264); 8.7 MB with the defaults at 512 (132)
 *
 * Prints one line: mode, registers, grid, us per step (mean over the window, and the median of
 * the graph replays). tests/gpu/resident_load.py runs the forms alone and under lattice-bench's
 * load processes; bench/results/cuda-load-session1{8,9}-2026-11-27.md have what they measured. */
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace cg = cooperative_groups;

#define CK(call)                                                                        \
    do {                                                                                \
        cudaError_t e_ = (call);                                                        \
        if (e_ != cudaSuccess) {                                                        \
            fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(e_)); \
            exit(1);                                                                    \
        }                                                                               \
    } while (0)

#ifndef THREADS  /* threads a block (resident_load.py --threads) */
#define THREADS 256
#endif
#ifndef ROWS_PER_WARP  /* a phase's shape (resident_load.py --shapes): rows a warp, 16-byte vectors a row */
#define ROWS_PER_WARP 4
#endif
#ifndef ROW_VECS      /* a multiple of 32; 64: rows of 1 KB */
#define ROW_VECS 64
#endif
constexpr int RPW = ROWS_PER_WARP, VPR = ROW_VECS;
static_assert(VPR % 32 == 0, "ROW_VECS: whole vectors a lane");
constexpr int U = VPR / 32;                      /* vectors per row and lane */
constexpr int PHASES = 64, STEPS = 8;
#ifndef PAD_PHASE  /* values held live per thread, chosen for ~120 registers in each form */
#define PAD_PHASE 68
#endif
#ifndef PAD_STEP
#define PAD_STEP 52
#endif

template <int PAD> struct pad_regs {  /* PAD values kept live from fill() to keep(): loads (16 bytes,
                     independent, one address per warp), which ptxas can neither recompute nor move
                     past the dependency wait or the stores (an empty asm or a clock read does not
                     hold it; volatile loads would hold it but run one after another) */
    static_assert(PAD % 4 == 0, "PAD: whole 16-byte loads");
    uint32_t v[PAD > 0 ? PAD : 1];
    __device__ void fill(const uint32_t *src) {
#pragma unroll
        for (int i = 0; i < PAD; i += 4)
            asm("ld.global.v4.u32 {%0, %1, %2, %3}, [%4];"
                : "=r"(v[i]), "=r"(v[i + 1]), "=r"(v[i + 2]), "=r"(v[i + 3]) : "l"(src + i) : "memory");
    }
    /* the values stay in registers until `last` (the thread's final result) is known */
    __device__ void keep(uint32_t *sink, float last) {
        if (last == 1234.5f)  /* never */
#pragma unroll
            for (int i = 0; i < PAD; i++)
                sink[i * blockDim.x + threadIdx.x] = v[i];
    }
};

/* the first of the calling warp's RPW rows in every phase */
__device__ __forceinline__ uint32_t warp_row0() { return (blockIdx.x * (THREADS / 32) + (threadIdx.x >> 5)) * RPW; }

struct rows_in_flight {  /* one warp's RPW rows of one phase, in registers */
    uint4 w[RPW][U];
    __device__ void load(const uint4 *wp, uint32_t row0, uint32_t lane) {
#pragma unroll
        for (int r = 0; r < RPW; r++)
#pragma unroll
            for (int u = 0; u < U; u++)
                w[r][u] = __ldg(wp + (size_t)(row0 + r) * VPR + lane + 32 * u);
    }
    /* y[row] from the weights and a value of the previous phase's output; returns the lane's sum */
    __device__ float reduce(const float *x, float *y, uint32_t row0, uint32_t lane, uint32_t rows) {
        return reduce_xv(x[(row0 * 7 + lane) % rows], row0, lane, [&](uint32_t row, float v) { y[row] = v; });
    }
    /* the same with the value xv given; lane r stores row r by store(row, value) */
    template <typename Store>
    __device__ float reduce_xv(float xv, uint32_t row0, uint32_t lane, Store store) {
        float last = 0.0f;
#pragma unroll
        for (int r = 0; r < RPW; r++) {
            float s = 0.0f;
#pragma unroll
            for (int u = 0; u < U; u++)
                s += (float)(w[r][u].x ^ w[r][u].y) + (float)(w[r][u].z ^ w[r][u].w);
#pragma unroll
            for (int o = 16; o; o >>= 1)
                s += __shfl_xor_sync(0xffffffffu, s, o);
            if (lane == (uint32_t)r)
                store(row0 + r, s * 1e-12f + 0.5f * xv);
            last += s;
        }
        return last;
    }
};

__global__ void __launch_bounds__(THREADS) k_phase(const uint4 *w, const float *x, float *y, uint32_t rows) {
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
    const uint32_t lane = threadIdx.x & 31, row0 = warp_row0();
    rows_in_flight f;
    f.load(w, row0, lane);
    pad_regs<PAD_PHASE> pad;
    pad.fill((const uint32_t *)x);  /* while the weights are in flight */
    asm volatile("griddepcontrol.wait;" ::: "memory");
    pad.keep((uint32_t *)y, f.reduce(x, y, row0, lane, rows));
}

/* A narrow phase, shaped like Lattice's GDN recurrence (64 blocks of 128 threads on 132 SMs, ~3 us):
 * each thread reads 128 bytes of a state and writes them back changed, after the previous phase's
 * output. It leaves half the SMs idle while it runs. */
constexpr int NARROW_BLOCKS = 64, NARROW_THREADS = 128, NARROW_VECS = 8;
__global__ void __launch_bounds__(NARROW_THREADS) k_narrow(uint4 *state, const float *x, float *y, uint32_t rows) {
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
    const uint32_t t = blockIdx.x * NARROW_THREADS + threadIdx.x, n = NARROW_BLOCKS * NARROW_THREADS;
    uint4 v[NARROW_VECS];
#pragma unroll
    for (int i = 0; i < NARROW_VECS; i++)
        v[i] = state[(size_t)i * n + t];
    asm volatile("griddepcontrol.wait;" ::: "memory");
    const uint32_t xv = __float_as_uint(x[(t * 7) % rows]);
#pragma unroll
    for (int i = 0; i < NARROW_VECS; i++) {
        v[i].x += xv, v[i].y ^= xv, v[i].z += v[i].x, v[i].w ^= v[i].y;
        state[(size_t)i * n + t] = v[i];
    }
    y[t % rows] = (float)(v[0].x & 0xff) * 1e-3f;
}

/* Grid barriers of one arrival counter (count[0], zeroed before the launch; barrier p completes
 * at (p + 1) x grid arrivals), one thread a block arriving and polling:
 *   BARRIER_COUNTER: an acq_rel add, then acquire polls of the counter;
 *   BARRIER_RED:     the add without its return value (red), then the same polls;
 *   BARRIER_FLAG:    the last block to arrive (the add's return value) writes p + 1 to a flag
 *                    (count[1]) that the others poll, so that the polls do not contend with the
 *                    adds at one address;
 *   BARRIER_FLAG_SLEEP: the same, with a 32 ns sleep between polls. */
enum barrier_kind { BARRIER_CG, BARRIER_COUNTER, BARRIER_RED, BARRIER_FLAG, BARRIER_FLAG_SLEEP, BARRIER_NONE,
                    BARRIER_TREE, BARRIER_CLUSTER, BARRIER_CLUSTER_ONLY, BARRIER_SPLIT, BARRIER_SPLIT_RELAXED,
                    BARRIER_SPLIT_WARP, BARRIER_SPLIT_SPREAD, BARRIER_SPLIT_LATE0 };

__device__ __forceinline__ unsigned ld_acquire(const unsigned *p) {
    unsigned v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

__device__ void counter_barrier(unsigned *count, int kind, unsigned phase) {
    __syncthreads();
    if (threadIdx.x == 0) {
        const unsigned target = (phase + 1) * gridDim.x;
        unsigned v;
        if (kind == BARRIER_RED) {
            asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(count) : "memory");
            while (ld_acquire(count) < target) {
            }
        } else {
            asm volatile("atom.add.acq_rel.gpu.global.u32 %0, [%1], 1;" : "=r"(v) : "l"(count) : "memory");
            if (kind == BARRIER_COUNTER) {
                for (v++; v < target;)
                    v = ld_acquire(count);
            } else if (v + 1 == target) {  /* the last to arrive */
                asm volatile("st.release.gpu.global.u32 [%0], %1;" ::"l"(count + 1), "r"(phase + 1) : "memory");
            } else {
                while (ld_acquire(count + 1) < phase + 1)
                    if (kind == BARRIER_FLAG_SLEEP)
                        __nanosleep(32);
            }
        }
    }
    __syncthreads();
}

/* Barriers with fewer arrivals at one address (session 19), counters 32 words (128 bytes) apart:
 *   BARRIER_TREE:    blocks arrive (acq_rel add) at their group's counter, TREE_GROUP blocks a group;
 *                    a group's last arrival adds to the root counter, which every block polls;
 *   BARRIER_CLUSTER: the launch's thread-block clusters meet at the hardware cluster barrier; then
 *                    one thread a cluster adds to the root (red.release) and polls it, and the
 *                    cluster meets again: gridDim / cluster-size arrivals at the root instead of
 *                    one a block;
 *   BARRIER_CLUSTER_ONLY: the cluster barrier alone (not a grid barrier: the floor of the two
 *                    cluster barriers' cost). */
constexpr int TREE_GROUP = 16, COUNTER_STRIDE = 32, COUNTERS_PER_LAUNCH = 32 * COUNTER_STRIDE;

__device__ void tree_barrier(unsigned *count, unsigned phase) {
    __syncthreads();
    if (threadIdx.x == 0) {
        const unsigned groups = (gridDim.x + TREE_GROUP - 1) / TREE_GROUP, group = blockIdx.x / TREE_GROUP;
        const unsigned in_group = min((unsigned)TREE_GROUP, gridDim.x - group * TREE_GROUP);
        unsigned *root = count, *mine = count + (1 + group) * COUNTER_STRIDE;
        unsigned v;
        asm volatile("atom.add.acq_rel.gpu.global.u32 %0, [%1], 1;" : "=r"(v) : "l"(mine) : "memory");
        if (v + 1 == (phase + 1) * in_group)  /* the group's last arrival */
            asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(root) : "memory");
        while (ld_acquire(root) < (phase + 1) * groups) {
        }
    }
    __syncthreads();
}

__device__ void cluster_barrier(unsigned *count, bool whole_grid, unsigned phase) {
    cg::cluster_group cluster = cg::this_cluster();
    cluster.sync();  /* barrier.cluster arrive (release) and wait (acquire) */
    if (!whole_grid)
        return;
    if (cluster.block_rank() == 0 && threadIdx.x == 0) {
        const unsigned clusters = gridDim.x / cluster.num_blocks();
        /* the release is cumulative: it covers the cluster's writes ordered before it by the
           cluster barrier */
        asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(count) : "memory");
        while (ld_acquire(count) < (phase + 1) * clusters) {
        }
    }
    cluster.sync();
}

/* Split barriers (session 19): a block arrives as soon as its phase's output is stored, then requests
 * the next phase's weights, then waits. An arrival's release (MEMBAR.ALL.GPU in SASS) waits for every
 * memory operation its thread has in flight, so arriving after the weight requests, as the barriers
 * above do, makes the arrival wait for the next phase's weights.
 *   BARRIER_SPLIT:         thread 0 adds to one counter (red.release) and polls it (acquire);
 *   BARRIER_SPLIT_RELAXED: the same with relaxed polls and one acquire-release fence after them;
 *   BARRIER_SPLIT_WARP:    each warp arrives once its own rows are stored, at its own counter
 *                          (one a warp index), and thread i polls counter i;
 *   BARRIER_SPLIT_SPREAD:  block b arrives at counter b % SPLIT_SPREAD, and thread i polls counter i;
 *   BARRIER_SPLIT_LATE0:   BARRIER_SPLIT, with warp 0 (whose thread 0 polls) requesting its weights
 *                          only after the poll (k_step). */
constexpr unsigned SPLIT_SPREAD = 8;

__device__ void split_arrive(unsigned *count, int kind, uint32_t lane) {
    if (kind == BARRIER_SPLIT_WARP) {
        __syncwarp();
        if (lane == 0)
            asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(count + (threadIdx.x >> 5) * COUNTER_STRIDE)
                         : "memory");
        return;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        unsigned *c = count + (kind == BARRIER_SPLIT_SPREAD ? blockIdx.x % SPLIT_SPREAD * COUNTER_STRIDE : 0);
        asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(c) : "memory");
    }
}

/* the calling block's wait for phase `phase`'s arrivals; the caller's __syncthreads() ends it */
__device__ void split_wait(unsigned *count, int kind, unsigned phase) {
    const unsigned target = (phase + 1) * gridDim.x;
    if (kind == BARRIER_SPLIT || kind == BARRIER_SPLIT_LATE0) {
        if (threadIdx.x == 0)
            while (ld_acquire(count) < target) {
            }
    } else if (kind == BARRIER_SPLIT_RELAXED) {
        if (threadIdx.x == 0) {
            unsigned v;
            do
                asm volatile("ld.relaxed.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(count) : "memory");
            while (v < target);
            asm volatile("fence.acq_rel.gpu;" ::: "memory");
        }
    } else if (kind == BARRIER_SPLIT_SPREAD) {
        if (threadIdx.x < SPLIT_SPREAD) {
            const unsigned arrivals = (gridDim.x - threadIdx.x + SPLIT_SPREAD - 1) / SPLIT_SPREAD;
            while (ld_acquire(count + threadIdx.x * COUNTER_STRIDE) < (phase + 1) * arrivals) {
            }
        }
    } else if (threadIdx.x < THREADS / 32) {  /* BARRIER_SPLIT_WARP */
        while (ld_acquire(count + threadIdx.x * COUNTER_STRIDE) < target) {
        }
    }
}

/* BARRIER_CG: cooperative_groups' grid.sync(); BARRIER_NONE: none (a wrong result: the floor of
 * the phases' own time, for comparison); the split ones: split_arrive / split_wait; the others:
 * tree_barrier, cluster_barrier or counter_barrier on count */
/* a persistent thread's state at its first phase: its rows' weights requested, its PAD values
   loaded from pad_src */
struct persistent_thread {
    uint32_t lane, row0;
    rows_in_flight f;
    pad_regs<PAD_STEP> pad;
    __device__ persistent_thread(const uint4 *w, const void *pad_src) : lane(threadIdx.x & 31), row0(warp_row0()) {
        f.load(w, row0, lane);
        pad.fill((const uint32_t *)pad_src);
    }
};

__global__ void __launch_bounds__(THREADS) k_step(const uint4 *w, float *xy, uint32_t rows, int phases,
                                                  int barrier, unsigned *count) {
    cg::grid_group grid = cg::this_grid();
    persistent_thread t(w, xy);
    const uint32_t lane = t.lane, row0 = t.row0;
    rows_in_flight &f = t.f;
    float last = 0.0f;
    for (int p = 0; p < phases; p++) {
        last = f.reduce(xy + (p & 1) * rows, xy + ((p + 1) & 1) * rows, row0, lane, rows);
        if (barrier >= BARRIER_SPLIT) {  /* arrive, request the next weights, then wait */
            split_arrive(count, barrier, lane);
            const bool late = barrier == BARRIER_SPLIT_LATE0 && threadIdx.x < 32;
            if (p + 1 < phases && !late)
                f.load(w + (size_t)((p + 1) % PHASES) * rows * VPR, row0, lane);
            split_wait(count, barrier, p);
            if (p + 1 < phases && late)
                f.load(w + (size_t)((p + 1) % PHASES) * rows * VPR, row0, lane);
            __syncthreads();
            continue;
        }
        if (p + 1 < phases)
            f.load(w + (size_t)((p + 1) % PHASES) * rows * VPR, row0, lane);
        if (barrier == BARRIER_CG)
            grid.sync();
        else if (barrier == BARRIER_TREE)
            tree_barrier(count, p);
        else if (barrier == BARRIER_CLUSTER || barrier == BARRIER_CLUSTER_ONLY)
            cluster_barrier(count, barrier == BARRIER_CLUSTER, p);
        else if (barrier != BARRIER_NONE)
            counter_barrier(count, barrier, p);
    }
    t.pad.keep((uint32_t *)xy, last);
}

/* persistent8-ll: activations as 64-bit {epoch, value} words, each written by one store. A consumer
 * polls the words it reads until their epoch is the phase's, so no fence, counter or barrier stands
 * between phases (NCCL's LL protocol does the same between GPUs). As a GEMV needs all of x, each
 * block first waits for a word of every block's output (one or two a thread), then reads its
 * values. Phase g, counted over launches from *epoch_base, reads ring slot (g - 1) % LL_SLOTS and
 * writes slot g % LL_SLOTS with epoch g + 1; the slots' reuse is safe because no block passes a
 * phase before every block has written it (a timing experiment: the result is not checked). */
constexpr int LL_SLOTS = 8;

__device__ __forceinline__ unsigned long long ld_relaxed_u64(const unsigned long long *p) {
    unsigned long long v;
    asm volatile("ld.relaxed.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
    return v;
}

__device__ __forceinline__ float ll_wait(const unsigned long long *p, uint32_t epoch) {
    unsigned long long v;
    do
        v = ld_relaxed_u64(p);
    while ((uint32_t)(v >> 32) != epoch);
    return __uint_as_float((uint32_t)v);
}

__device__ __forceinline__ void ll_store(unsigned long long *p, float v, uint32_t epoch) {
    const unsigned long long word = (unsigned long long)epoch << 32 | __float_as_uint(v);
    asm volatile("st.relaxed.gpu.global.u64 [%0], %1;" ::"l"(p), "l"(word) : "memory");
}

/* persistent8-llx: the LL form closer to a GEMV, which reads all of x: each block reads one row of
 * every warp's output (rows / RPW words). A thread requests LLX_WORDS of its words at once, then,
 * after a short sleep, again all those that did not yet carry the phase's epoch, then the next
 * LLX_WORDS; no block-wide wait. */
constexpr int LLX_WORDS = 8;

__device__ __forceinline__ float llx_wait_all(const unsigned long long *x, uint32_t words, uint32_t epoch) {
    float xv = 0.0f;
    for (uint32_t base = threadIdx.x; base < words; base += LLX_WORDS * THREADS) {
        unsigned long long v[LLX_WORDS];
        uint32_t missing = 0;  /* bit i: word base + i x THREADS not yet of this phase */
#pragma unroll
        for (int i = 0; i < LLX_WORDS; i++)
            if (base + i * THREADS < words)
                missing |= 1u << i;
        for (;;) {
#pragma unroll
            for (int i = 0; i < LLX_WORDS; i++)
                if (missing >> i & 1)
                    v[i] = ld_relaxed_u64(x + (base + i * THREADS) * RPW);
#pragma unroll
            for (int i = 0; i < LLX_WORDS; i++)
                if ((missing >> i & 1) && (uint32_t)(v[i] >> 32) == epoch)
                    missing &= ~(1u << i);
            if (!missing)
                break;
            __nanosleep(32);
        }
#pragma unroll
        for (int i = 0; i < LLX_WORDS; i++)
            if (base + i * THREADS < words)
                xv += __uint_as_float((uint32_t)v[i]);
    }
    return xv;
}

template <bool WHOLE_X>  /* persistent8-llx : persistent8-ll */
__global__ void __launch_bounds__(THREADS) k_step_ll(const uint4 *w, unsigned long long *act, uint32_t rows,
                                                     int phases, unsigned *epoch_base) {
    const uint32_t g0 = *(volatile unsigned *)epoch_base;
    persistent_thread t(w, act);
    const uint32_t lane = t.lane, row0 = t.row0;
    rows_in_flight &f = t.f;
    float last = 0.0f;
    for (int p = 0; p < phases; p++) {
        const uint32_t g = g0 + p;
        const unsigned long long *x = act + (size_t)((g + LL_SLOTS - 1) % LL_SLOTS) * rows;
        unsigned long long *y = act + (size_t)(g % LL_SLOTS) * rows;
        float xv = 0.0f;
        if constexpr (WHOLE_X) {
            xv = llx_wait_all(x, rows / RPW, g);
        } else {
            for (uint32_t j = threadIdx.x; j < gridDim.x; j += THREADS)  /* a word of block j's rows */
                ll_wait(x + j * (rows / gridDim.x) + j % (rows / gridDim.x), g);
            __syncthreads();
            xv = ll_wait(x + (row0 * 7 + lane) % rows, g);
        }
        last = f.reduce_xv(xv, row0, lane, [&](uint32_t row, float v) { ll_store(y + row, v, g + 1); });
        if (p + 1 < phases)
            f.load(w + (size_t)((p + 1) % PHASES) * rows * VPR, row0, lane);
    }
    t.pad.keep((uint32_t *)act, last);
    /* the next launch's first phase; every block read g0 before block 0 got here (each phase waits
       for every block) */
    if constexpr (WHOLE_X)
        __syncthreads();  /* every thread of this block has read g0 */
    if (blockIdx.x == 0 && threadIdx.x == 0)
        atomicAdd(epoch_base, (unsigned)phases);
}

/* persistent8-onecluster-pipe[N]: persistent8-onecluster with the weights requested PIPE_STAGES
 * phases ahead into shared memory (cp.async, each thread its own 16-byte pieces, so no block barrier
 * stands between a copy and its reader), and the cluster barrier split as split_arrive / split_wait:
 * arrive once the phase's output is stored, request phase p + PIPE_STAGES into the stage just
 * read, then wait. Can a few SMs stream the weights fast enough when their requests run that far
 * ahead of the dependency? */
#ifndef PIPE_STAGES
#define PIPE_STAGES 3
#endif
constexpr size_t PIPE_STAGE_VECS = (size_t)THREADS * RPW * U;  /* a block's weights of one phase */

__device__ __forceinline__ void pipe_request(uint4 *stage, const uint4 *w, uint32_t rows, int p, int phases,
                                             uint32_t row0, uint32_t lane) {
    if (p < phases) {
        const uint4 *wp = w + (size_t)(p % PHASES) * rows * VPR;
        uint4 *dst = stage + (size_t)(p % PIPE_STAGES) * PIPE_STAGE_VECS + threadIdx.x;
#pragma unroll
        for (int r = 0; r < RPW; r++)
#pragma unroll
            for (int u = 0; u < U; u++)
                asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"((unsigned)__cvta_generic_to_shared(
                                 dst + (size_t)(r * U + u) * THREADS)),
                             "l"(wp + (size_t)(row0 + r) * VPR + lane + 32 * u)
                             : "memory");
    }
    asm volatile("cp.async.commit_group;" ::: "memory");  /* empty past the end: one group a phase */
}

__global__ void __launch_bounds__(THREADS) k_step_pipe(const uint4 *w, float *xy, uint32_t rows, int phases) {
    extern __shared__ uint4 stage[];
    const uint32_t lane = threadIdx.x & 31, row0 = warp_row0();
    pad_regs<PAD_STEP> pad;
    pad.fill((const uint32_t *)xy);
    for (int p = 0; p < PIPE_STAGES; p++)
        pipe_request(stage, w, rows, p, phases, row0, lane);
    float last = 0.0f;
    for (int p = 0; p < phases; p++) {
        asm volatile("cp.async.wait_group %0;" ::"n"(PIPE_STAGES - 1) : "memory");  /* phase p's group */
        rows_in_flight f;
        const uint4 *src = stage + (size_t)(p % PIPE_STAGES) * PIPE_STAGE_VECS + threadIdx.x;
#pragma unroll
        for (int r = 0; r < RPW; r++)
#pragma unroll
            for (int u = 0; u < U; u++)
                f.w[r][u] = src[(size_t)(r * U + u) * THREADS];
        last = f.reduce(xy + (p & 1) * rows, xy + ((p + 1) & 1) * rows, row0, lane, rows);
        asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory");
        pipe_request(stage, w, rows, p + PIPE_STAGES, phases, row0, lane);
        asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory");
    }
    pad.keep((uint32_t *)xy, last);
}

/* persistent8-onecluster-tma[N]: persistent8-onecluster-pipe with each stage one bulk copy (the
 * tensor memory accelerator: cp.async.bulk, completion counted by the stage's mbarrier) of the
 * block's rows, which are contiguous, instead of 16-byte copies by every thread. Thread 0 requests a
 * stage once the cluster barrier says every thread has read it. */
__device__ __forceinline__ void tma_request(uint4 *stage, unsigned long long *bar, const uint4 *w, uint32_t rows,
                                            int p, int phases) {
    if (p >= phases)
        return;
    const uint32_t bytes = (uint32_t)(PIPE_STAGE_VECS * sizeof(uint4));
    const uint4 *src = w + (size_t)(p % PHASES) * rows * VPR + (size_t)blockIdx.x * (THREADS / 32) * RPW * VPR;
    const unsigned b = (unsigned)__cvta_generic_to_shared(bar + p % PIPE_STAGES);
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(b), "r"(bytes) : "memory");
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                 ::"r"((unsigned)__cvta_generic_to_shared(stage + (size_t)(p % PIPE_STAGES) * PIPE_STAGE_VECS)),
                 "l"(src), "r"(bytes), "r"(b) : "memory");
}

__global__ void __launch_bounds__(THREADS) k_step_tma(const uint4 *w, float *xy, uint32_t rows, int phases) {
    extern __shared__ uint4 stage[];
    __shared__ __align__(8) unsigned long long bar[PIPE_STAGES];
    const uint32_t lane = threadIdx.x & 31, row0 = warp_row0(), warp = threadIdx.x >> 5;
    pad_regs<PAD_STEP> pad;
    pad.fill((const uint32_t *)xy);
    if (threadIdx.x == 0) {
        for (int i = 0; i < PIPE_STAGES; i++)
            asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"((unsigned)__cvta_generic_to_shared(bar + i)));
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
        for (int p = 0; p < PIPE_STAGES; p++)
            tma_request(stage, bar, w, rows, p, phases);
    }
    __syncthreads();
    float last = 0.0f;
    for (int p = 0; p < phases; p++) {
        const unsigned b = (unsigned)__cvta_generic_to_shared(bar + p % PIPE_STAGES);
        const unsigned parity = (unsigned)(p / PIPE_STAGES) & 1;
        asm volatile("{\n.reg .pred done;\nwait_%=:\n"
                     "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
                     "@!done bra wait_%=;\n}" ::"r"(b), "r"(parity) : "memory");
        rows_in_flight f;
        const uint4 *src = stage + (size_t)(p % PIPE_STAGES) * PIPE_STAGE_VECS;
#pragma unroll
        for (int r = 0; r < RPW; r++)
#pragma unroll
            for (int u = 0; u < U; u++)
                f.w[r][u] = src[(size_t)(warp * RPW + r) * VPR + lane + 32 * u];
        last = f.reduce(xy + (p & 1) * rows, xy + ((p + 1) & 1) * rows, row0, lane, rows);
        asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory");
        asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory");
        if (threadIdx.x == 0)  /* every thread of the cluster has read stage p */
            tma_request(stage, bar, w, rows, p + PIPE_STAGES, phases);
    }
    pad.keep((uint32_t *)xy, last);
}

int main(int argc, char **argv) {
    /* steps per persistent kernel (0: the kernel chain), and its barrier */
    const struct { const char *name; int per_launch, barrier; } modes[] = {
        {"kernels", 0, 0}, {"kernels-narrow", 0, 0}, {"kernels-l1", 0, 0}, {"kernels-shared", 0, 0},
        {"persistent", 1, BARRIER_CG}, {"persistent8", STEPS, BARRIER_CG},
        {"persistent8-counter", STEPS, BARRIER_COUNTER}, {"persistent8-red", STEPS, BARRIER_RED},
        {"persistent8-flag", STEPS, BARRIER_FLAG}, {"persistent8-flagsleep", STEPS, BARRIER_FLAG_SLEEP},
        {"persistent8-none", STEPS, BARRIER_NONE}, {"persistent8-ll", STEPS, BARRIER_NONE},
        {"persistent8-tree", STEPS, BARRIER_TREE}, {"persistent8-cluster", STEPS, BARRIER_CLUSTER},
        {"persistent8-clusteronly", STEPS, BARRIER_CLUSTER_ONLY}, {"persistent8-split", STEPS, BARRIER_SPLIT},
        {"persistent8-split-relaxed", STEPS, BARRIER_SPLIT_RELAXED}, {"persistent8-split-warp", STEPS, BARRIER_SPLIT_WARP},
        {"persistent8-llx", STEPS, BARRIER_NONE}, {"persistent8-split-spread", STEPS, BARRIER_SPLIT_SPREAD},
        {"persistent8-split-late0", STEPS, BARRIER_SPLIT_LATE0}, {"persistent8-onecluster", STEPS, BARRIER_CLUSTER_ONLY},
        {"persistent8-onecluster-pipe", STEPS, BARRIER_CLUSTER_ONLY},
        {"persistent8-onecluster-tma", STEPS, BARRIER_CLUSTER_ONLY}};
    /* a cluster form's name may end in its cluster size: persistent8-cluster4 (default 8) */
    char mode[64] = "";
    int cluster = 8;
    if (argc == 3) {
        snprintf(mode, sizeof mode, "%s", argv[1]);
        char *digits = mode + strlen(mode);
        while (digits > mode && digits[-1] >= '0' && digits[-1] <= '9')
            digits--;
        if (*digits && (!strncmp(mode, "persistent8-cluster", 19) || !strncmp(mode, "persistent8-onecluster", 22)))
            cluster = atoi(digits), *digits = 0;
    }
    int m = -1;
    for (int i = 0; i < (int)(sizeof modes / sizeof modes[0]); i++)
        if (!strcmp(mode, modes[i].name))
            m = i;
    if (m < 0) {
        fprintf(stderr, "usage: %s MODE SECONDS; MODE: kernels[-narrow|-l1|-shared], persistent, persistent8[-counter|-red|-flag|"
                "-flagsleep|-none|-ll|-llx|-tree|-cluster[N]|-clusteronly[N]|"
                "-split[-relaxed|-warp|-spread|-late0]|-onecluster[-pipe|-tma][N]]\n", argv[0]);
        return 2;
    }
    const int per_launch = modes[m].per_launch;
    const bool persistent = per_launch > 0, narrow = !strcmp(argv[1], "kernels-narrow");
    const bool ll = !strcmp(argv[1], "persistent8-ll"), llx = !strcmp(argv[1], "persistent8-llx");
    const bool clustered = modes[m].barrier == BARRIER_CLUSTER || modes[m].barrier == BARRIER_CLUSTER_ONLY;
    const bool tma = !strcmp(mode, "persistent8-onecluster-tma");
    const bool pipe = tma || !strcmp(mode, "persistent8-onecluster-pipe");  /* weights in shared memory */
    const void *pipe_kernel = tma ? (const void *)k_step_tma : (const void *)k_step_pipe;
    const bool one_cluster = pipe || !strcmp(mode, "persistent8-onecluster");  /* the grid is one cluster */
    const size_t pipe_smem = pipe ? PIPE_STAGES * PIPE_STAGE_VECS * sizeof(uint4) : 0;
    if (pipe)
        CK(cudaFuncSetAttribute(pipe_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)pipe_smem));
    if (pipe && cluster > 8)
        CK(cudaFuncSetAttribute(pipe_kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
    if (!clustered)
        cluster = 1;
    if (cluster < 1 || cluster > 16) {
        fprintf(stderr, "cluster size %d: 1 to 16 blocks\n", cluster);
        return 2;
    }
    if (cluster > 8)  /* above 8 blocks a cluster is non-portable */
        CK(cudaFuncSetAttribute(k_step, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
    /* kernels-l1 / -shared: the phase kernel's preferred L1 / shared-memory carveout, in percent of
       the largest shared memory: 0 (all L1, no room for a block that needs shared memory, such as
       the load's) or 100 */
    if (!strcmp(argv[1], "kernels-l1") || !strcmp(argv[1], "kernels-shared"))
        CK(cudaFuncSetAttribute(k_phase, cudaFuncAttributePreferredSharedMemoryCarveout,
                                !strcmp(argv[1], "kernels-l1") ? 0 : 100));
    const double seconds = atof(argv[2]);
    /* the kernel this form launches */
    const void *launched = ll ? (const void *)k_step_ll<false> : llx ? (const void *)k_step_ll<true>
                           : pipe ? pipe_kernel : persistent ? (const void *)k_step : (const void *)k_phase;
    cudaFuncAttributes fa;
    CK(cudaFuncGetAttributes(&fa, launched));
    int sms = 0, per_sm = 1 << 30;
    CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    /* one grid for the chain and the grid-wide persistent forms of a build, so that they compare at
       the same bytes a phase: as many blocks as fit at once of both the chain's kernel and k_step.
       A larger grid would run the chain in two waves, or be refused to a cooperative launch. */
    for (const void *k : {(const void *)k_phase, (const void *)k_step}) {
        int n = 0;
        CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, k, THREADS, 0));
        per_sm = std::min(per_sm, n);
    }
    if (ll || llx) {  /* the tagged-activation kernels must fit that grid at once */
        int n = 0;
        CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, launched, THREADS, 0));
        if (n < per_sm) {
            fprintf(stderr, "%s: %d registers a thread, so %d blocks an SM fit, not the grid's %d\n", argv[1],
                    fa.numRegs, n, per_sm);
            return 2;
        }
    }
    uint32_t grid = (uint32_t)(per_sm * sms);
    if (clustered) {  /* whole clusters, as many as fit at once (GPCs may leave SMs over) */
        cudaLaunchConfig_t cfg = {};
        cudaLaunchAttribute at[1];
        at[0].id = cudaLaunchAttributeClusterDimension;
        at[0].val.clusterDim.x = cluster, at[0].val.clusterDim.y = 1, at[0].val.clusterDim.z = 1;
        cfg.gridDim = grid / cluster * cluster, cfg.blockDim = THREADS, cfg.attrs = at, cfg.numAttrs = 1;  /* whole clusters */
        int clusters = 0;
        cfg.dynamicSmemBytes = pipe_smem;
        CK(cudaOccupancyMaxActiveClusters(&clusters, launched, &cfg));
        grid = std::min(grid / cluster, (uint32_t)clusters) * cluster;
        if (one_cluster)
            grid = clusters > 0 ? cluster : 0;
        if (grid == 0) {
            fprintf(stderr, "no cluster of %d blocks fits\n", cluster);
            return 1;
        }
    }
    const uint32_t rows = grid * (THREADS / 32) * RPW;
    uint4 *w;
    float *xy;
    const size_t wbytes = (size_t)PHASES * rows * VPR * sizeof(uint4);
    CK(cudaMalloc(&w, wbytes));
    CK(cudaMemset(w, 0x5a, wbytes));
    CK(cudaMalloc(&xy, 2 * rows * sizeof(float)));
    CK(cudaMemset(xy, 0, 2 * rows * sizeof(float)));
    unsigned *count;
    CK(cudaMalloc(&count, STEPS * COUNTERS_PER_LAUNCH * sizeof(unsigned)));
    unsigned long long *act;  /* persistent8-ll's ring of activations, and its epoch */
    CK(cudaMalloc(&act, (size_t)LL_SLOTS * rows * sizeof(unsigned long long)));
    CK(cudaMemset(act, 0, (size_t)LL_SLOTS * rows * sizeof(unsigned long long)));
    unsigned *epoch_base;
    CK(cudaMalloc(&epoch_base, sizeof(unsigned)));
    CK(cudaMemset(epoch_base, 0, sizeof(unsigned)));
    uint4 *state;  /* the narrow phases' */
    CK(cudaMalloc(&state, (size_t)NARROW_VECS * NARROW_BLOCKS * NARROW_THREADS * sizeof(uint4)));
    CK(cudaMemset(state, 0, (size_t)NARROW_VECS * NARROW_BLOCKS * NARROW_THREADS * sizeof(uint4)));
    cudaStream_t s;
    int lo, hi;
    CK(cudaDeviceGetStreamPriorityRange(&lo, &hi));
    CK(cudaStreamCreateWithPriority(&s, cudaStreamNonBlocking, hi));

    /* a cooperative launch of clusters, if this driver takes one; else clusters alone (the grid fits
       at once anyway: it was sized by the occupancy) */
    bool cooperative = !one_cluster;  /* one cluster's blocks are co-scheduled anyway */
    if (clustered && cooperative) {
        cudaLaunchConfig_t cfg = {};
        cudaLaunchAttribute at[2];
        at[0].id = cudaLaunchAttributeCooperative, at[0].val.cooperative = 1;
        at[1].id = cudaLaunchAttributeClusterDimension;
        at[1].val.clusterDim.x = cluster, at[1].val.clusterDim.y = 1, at[1].val.clusterDim.z = 1;
        cfg.gridDim = grid, cfg.blockDim = THREADS, cfg.stream = s, cfg.attrs = at, cfg.numAttrs = 2;
        CK(cudaMemsetAsync(count, 0, COUNTERS_PER_LAUNCH * sizeof(unsigned), s));
        if (cudaLaunchKernelEx(&cfg, k_step, (const uint4 *)w, xy, rows, 1, modes[m].barrier, count) != cudaSuccess) {
            fprintf(stderr, "cooperative cluster launch refused (%s): clusters alone\n",
                    cudaGetErrorString(cudaGetLastError()));
            cooperative = false;
        }
        CK(cudaStreamSynchronize(s));
    }

    CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
    for (int st = 0; st < STEPS; st += persistent ? per_launch : 1) {
        if (persistent) {
            unsigned *c = count + st * COUNTERS_PER_LAUNCH;
            if (modes[m].barrier != BARRIER_CG && modes[m].barrier != BARRIER_NONE)
                CK(cudaMemsetAsync(c, 0, COUNTERS_PER_LAUNCH * sizeof(unsigned), s));
            cudaLaunchConfig_t cfg = {};
            cudaLaunchAttribute at[2], *a = at;
            if (cooperative)
                a->id = cudaLaunchAttributeCooperative, a->val.cooperative = 1, a++;
            if (clustered) {
                a->id = cudaLaunchAttributeClusterDimension;
                a->val.clusterDim.x = cluster, a->val.clusterDim.y = 1, a->val.clusterDim.z = 1, a++;
            }
            cfg.gridDim = grid, cfg.blockDim = THREADS, cfg.stream = s, cfg.attrs = at, cfg.numAttrs = (unsigned)(a - at);
            if (ll || llx)
                CK(cudaLaunchKernelEx(&cfg, ll ? k_step_ll<false> : k_step_ll<true>, (const uint4 *)w, act, rows,
                                      PHASES * per_launch, epoch_base));
            else if (pipe) {
                cfg.dynamicSmemBytes = pipe_smem;
                CK(cudaLaunchKernelEx(&cfg, tma ? k_step_tma : k_step_pipe, (const uint4 *)w, xy, rows, PHASES * per_launch));
            } else
                CK(cudaLaunchKernelEx(&cfg, k_step, (const uint4 *)w, xy, rows, PHASES * per_launch, modes[m].barrier, c));
        } else {
            for (int p = 0; p < PHASES; p++) {
                cudaLaunchConfig_t cfg = {};
                cudaLaunchAttribute at[1];
                at[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
                at[0].val.programmaticStreamSerializationAllowed = 1;
                cfg.gridDim = grid, cfg.blockDim = THREADS, cfg.stream = s, cfg.attrs = at, cfg.numAttrs = 1;
                CK(cudaLaunchKernelEx(&cfg, k_phase, (const uint4 *)(w + (size_t)p * rows * VPR),
                                      (const float *)(xy + (p & 1) * rows), xy + ((p + 1) & 1) * rows, rows));
                if (narrow && p % 4 == 3) {  /* 16 narrow phases more, each after a fourth GEMV phase */
                    float *out = xy + ((p + 1) & 1) * rows;
                    cfg.gridDim = NARROW_BLOCKS, cfg.blockDim = NARROW_THREADS;
                    CK(cudaLaunchKernelEx(&cfg, k_narrow, state, (const float *)out, out, rows));
                }
            }
        }
    }
    cudaGraph_t g;
    cudaGraphExec_t ge;
    CK(cudaStreamEndCapture(s, &g));
    CK(cudaGraphInstantiate(&ge, g, 0));

    /* replays in batches of 16 (the queue stays full, as a token loop that launches ahead), each
       batch timed by events; warm-up first */
    const int BATCH = 16;
    std::vector<cudaEvent_t> ev(BATCH + 1);
    for (auto &e : ev)
        CK(cudaEventCreate(&e));
    for (int i = 0; i < 8; i++)
        CK(cudaGraphLaunch(ge, s));
    CK(cudaStreamSynchronize(s));
    std::vector<float> per_replay;
    double total_ms = 0.0;
    const auto t0 = std::chrono::steady_clock::now();
    while (std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() < seconds) {
        CK(cudaEventRecord(ev[0], s));
        for (int i = 0; i < BATCH; i++) {
            CK(cudaGraphLaunch(ge, s));
            CK(cudaEventRecord(ev[i + 1], s));
        }
        CK(cudaEventSynchronize(ev[BATCH]));
        for (int i = 0; i < BATCH; i++) {
            float ms;
            CK(cudaEventElapsedTime(&ms, ev[i], ev[i + 1]));
            per_replay.push_back(ms);
        }
        float ms;
        CK(cudaEventElapsedTime(&ms, ev[0], ev[BATCH]));
        total_ms += ms;
    }
    std::vector<float> sorted = per_replay;
    std::sort(sorted.begin(), sorted.end());
    const double steps = (double)per_replay.size() * STEPS;
    printf("RESULT %s regs %d grid %u cluster %d phase_mb %.2f us_per_step_mean %.2f us_per_step_median %.2f steps %.0f\n",
           argv[1], fa.numRegs, grid, cluster, rows * VPR * 16.0 / 1e6, total_ms * 1e3 / steps,
           sorted[sorted.size() / 2] * 1e3 / STEPS, steps);
    return 0;
}
