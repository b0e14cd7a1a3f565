/* What one dependent phase of a decode step costs, without the work: a chain of N phases in which
 * every block reads all blocks' outputs of the phase before (an all-to-all dependency, like a GEMV
 * reading the whole x), as (a) N kernels in a CUDA graph, (b) the same with programmatic
 * dependent launch, (c) one persistent cooperative kernel with a grid barrier between phases
 * (an atomic counter), (d) the same with cooperative_groups' grid.sync(), (e) kernels launched
 * early with PDL that wait on the previous kernel's release counter instead of griddepcontrol.wait.
 *   nvcc -O3 -arch=sm_90 -std=c++17 sync_cost.cu -o sync_cost && ./sync_cost */
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <vector>

#include "../../lattice/cuda/kernels.cuh"  /* lt_launch */

namespace cg = cooperative_groups;
#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("%s: %s\n", #x, cudaGetErrorString(e)); return 1; } } while (0)

__device__ __forceinline__ void phase(const float *in, float *out, unsigned nb) {
    __shared__ float red[32];
    float s = 0.0f;
    for (unsigned i = threadIdx.x; i < nb; i += blockDim.x)
        s += __ldcg(in + i);
    for (int o = 16; o; o >>= 1)
        s += __shfl_xor_sync(~0u, s, o);
    if ((threadIdx.x & 31) == 0)
        red[threadIdx.x >> 5] = s;
    __syncthreads();
    if (threadIdx.x == 0) {
        float t = 0.0f;
        for (unsigned w = 0; w < blockDim.x / 32; w++)
            t += red[w];
        out[blockIdx.x] = t * 0.5f / nb + 1.0f;
    }
}

__global__ void k_phase(const float *in, float *out, unsigned nb, int pdl) {
    if (pdl) {
        asm volatile("griddepcontrol.launch_dependents;");
        asm volatile("griddepcontrol.wait;" ::: "memory");
    }
    phase(in, out, nb);
}

/* (e) the dependency through memory instead of griddepcontrol.wait: kernel i launches early (PDL)
 * and its blocks spin until every block of kernel i - 1 has added 1 to that kernel's counter with
 * release semantics (after its stores). A block's run number comes from its own flag (written by
 * itself in the previous run), so no epoch has to be passed in. */
__device__ __forceinline__ unsigned ld_acquire(const unsigned *p) {
    unsigned v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}
__global__ void k_phase_flag(const float *in, float *out, unsigned nb, unsigned *flag, unsigned *count,
                             const unsigned *pred_count, unsigned pred_nb, int sleep_ns) {
    asm volatile("griddepcontrol.launch_dependents;");
    const unsigned run = flag[blockIdx.x] + 1;
    if (!pred_count) {
        asm volatile("griddepcontrol.wait;" ::: "memory");
    } else {
        if (threadIdx.x == 0)
            while (ld_acquire(pred_count) < run * pred_nb)
                if (sleep_ns)
                    __nanosleep(sleep_ns);
        __syncthreads();
    }
    phase(in, out, nb);
    __syncthreads();
    if (threadIdx.x == 0) {
        flag[blockIdx.x] = run;
        asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(count) : "memory");
    }
}

__device__ __forceinline__ void grid_barrier(unsigned long long *count, unsigned nb) {
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        unsigned long long old = atomicAdd(count, 1ull), target = (old / nb + 1) * nb;
        while (*(volatile unsigned long long *)count < target)
            ;
        __threadfence();
    }
    __syncthreads();
}

__global__ void k_persistent(float *buf, unsigned nb, int n, unsigned long long *count, int use_cg) {
    for (int i = 0; i < n; i++) {
        if (i) {
            if (use_cg)
                cg::this_grid().sync();
            else
                grid_barrier(count, nb);
        }
        phase(buf + (i & 1) * nb, buf + ((i + 1) & 1) * nb, nb);
    }
}

static float median(std::vector<float> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
}

/* Median over `reps` runs of launch() (after 3 warm-ups), in microseconds per phase. */
template <typename F>
static float us_per_phase(cudaStream_t s, cudaEvent_t e0, cudaEvent_t e1, int reps, int phases, F launch) {
    std::vector<float> t;
    for (int r = 0; r < reps + 3; r++) {
        cudaEventRecord(e0, s);
        launch();
        cudaEventRecord(e1, s);
        cudaEventSynchronize(e1);
        float ms;
        cudaEventElapsedTime(&ms, e0, e1);
        if (r >= 3)
            t.push_back(ms * 1000.0f / phases);
    }
    return median(t);
}

int main() {
    setvbuf(stdout, nullptr, _IONBF, 0);
    cudaDeviceProp p;
    CK(cudaGetDeviceProperties(&p, 0));
    const int N = 150, REPS = 30;
    cudaStream_t s;
    CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    float *buf;
    unsigned long long *count;
    CK(cudaMalloc(&buf, 2 * 4096 * sizeof(float)));
    CK(cudaMalloc(&count, 8));
    CK(cudaMemset(buf, 0, 2 * 4096 * sizeof(float)));
    CK(cudaMemset(count, 0, 8));
    printf("%s, %d SMs; %d dependent phases; us per phase (median of %d)\n", p.name, p.multiProcessorCount, N, REPS);
    int shapes[][2] = {{1, 512}, {2, 256}, {1, 256}, {4, 128}};
    for (auto &sh : shapes) {
        unsigned nb = p.multiProcessorCount * sh[0], nt = sh[1];
        for (int pdl = 0; pdl < 2; pdl++) {
            cudaGraph_t g;
            cudaGraphExec_t ge;
            CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
            for (int i = 0; i < N; i++)
                lt_launch(k_phase, nb, nt, 0, s, pdl, (const float *)(buf + (i & 1) * nb), buf + ((i + 1) & 1) * nb,
                          nb, pdl);
            CK(cudaGetLastError());
            CK(cudaStreamEndCapture(s, &g));
            CK(cudaGraphInstantiate(&ge, g, 0));
            float us = us_per_phase(s, e0, e1, REPS, N, [&] { cudaGraphLaunch(ge, s); });
            CK(cudaGetLastError());
            printf("  %3u x %3u  graph%-9s %6.2f\n", nb, nt, pdl ? "+PDL" : "", us);
        }
        for (int sleep_ns : {0, 32, 128}) {
            unsigned *flags;  /* per kernel: nb flags, then its counter */
            CK(cudaMalloc(&flags, (size_t)N * (nb + 1) * 4));
            CK(cudaMemset(flags, 0, (size_t)N * (nb + 1) * 4));
            cudaGraph_t g;
            cudaGraphExec_t ge;
            CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
            for (int i = 0; i < N; i++)
                lt_launch(k_phase_flag, nb, nt, 0, s, true, (const float *)(buf + (i & 1) * nb),
                          buf + ((i + 1) & 1) * nb, nb, flags + (size_t)i * (nb + 1), flags + (size_t)i * (nb + 1) + nb,
                          (const unsigned *)(i ? flags + (size_t)(i - 1) * (nb + 1) + nb : nullptr), nb, sleep_ns);
            CK(cudaGetLastError());
            CK(cudaStreamEndCapture(s, &g));
            CK(cudaGraphInstantiate(&ge, g, 0));
            float us = us_per_phase(s, e0, e1, REPS, N, [&] { cudaGraphLaunch(ge, s); });
            CK(cudaGetLastError());
            printf("  %3u x %3u  graph+PDL, counter wait (sleep %3d ns) %6.2f\n", nb, nt, sleep_ns, us);
            CK(cudaFree(flags));
        }
        for (int use_cg = 0; use_cg < 2; use_cg++) {
            int n = N;
            int cgv = use_cg;
            CK(cudaMemset(count, 0, 8));  /* the barrier's phases count from 0 for this grid size */
            void *args[] = {&buf, &nb, &n, &count, &cgv};
            float us = us_per_phase(s, e0, e1, REPS, N,
                                    [&] { cudaLaunchCooperativeKernel((void *)k_persistent, nb, nt, args, 0, s); });
            CK(cudaGetLastError());
            printf("  %3u x %3u  persistent %-8s %6.2f\n", nb, nt, use_cg ? "cg sync" : "counter", us);
        }
    }
    /* a persistent kernel inside a graph (cooperative launch attribute, captured) */
    {
        unsigned nb = p.multiProcessorCount, nt = 512;
        int n = N, cgv = 0;
        CK(cudaMemset(count, 0, 8));
        cudaGraph_t g;
        cudaGraphExec_t ge;
        CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
        cudaLaunchConfig_t cfg = {};
        cfg.gridDim = nb;
        cfg.blockDim = nt;
        cfg.stream = s;
        cudaLaunchAttribute at[1];
        at[0].id = cudaLaunchAttributeCooperative;
        at[0].val.cooperative = 1;
        cfg.attrs = at;
        cfg.numAttrs = 1;
        for (int k = 0; k < 8; k++)
            CK(cudaLaunchKernelEx(&cfg, k_persistent, buf, nb, n, count, cgv));
        CK(cudaStreamEndCapture(s, &g));
        CK(cudaGraphInstantiate(&ge, g, 0));
        float us = us_per_phase(s, e0, e1, REPS, 8 * N, [&] { cudaGraphLaunch(ge, s); });
        CK(cudaGetLastError());
        printf("  %3u x %3u  8 cooperative kernels in a graph: %6.2f\n", nb, nt, us);
    }
    CK(cudaDeviceSynchronize());
    return 0;
}
