/* Would a persistent decode kernel that streams the next phase's weights into shared memory reach
 * the memory-bandwidth roofline where the graph of PDL kernels does not? A chain of the GEMVs of a
 * decode step (Q8, every GEMV reading the whole output of the one before), timed two ways:
 *
 *   A. the backend's own k_gemv (kernels.cuh), one kernel per GEMV, captured in a CUDA graph with
 *      programmatic dependent launch: what Lattice runs today;
 *   B. one persistent cooperative kernel, one block of 512 threads per SM: each block copies its
 *      rows of the NEXT GEMVs' weights into shared memory with cp.async (DEPTH - 1 GEMVs ahead)
 *      before it waits at the grid barrier for this GEMV's x, so weight streaming runs under the
 *      barriers and the dot products instead of after them;
 *   C. the same with Hopper's bulk-copy engine (cp.async.bulk completing on an mbarrier per
 *      buffer, issued by one thread), so the prefetches stay off the load path of the dependent x
 *      reads. (H100, session 4: C 693.5 us, B 643.7, A 474.8 for Qwen3.5's chain: A wins.)
 *
 * Shapes: the four GEMVs of a Qwen3.5-0.8B layer (in_proj 8224 x 1024, out 1024 x 2048, gate_up
 * 7168 x 1024, down 1024 x 3584) x 24 layers, and SmolLM2-135M's (960 x 576, 576 x 576,
 * 3072 x 576, 576 x 1536) x 30. Prints microseconds per chain and the share of the DRAM floor
 * (weight bytes / 4.2 TB/s given on the command line), and checks that A and B agree.
 *   nvcc -O3 -arch=sm_90 -std=c++17 -I lattice/cuda stream_phases.cu -o sp && ./sp [copy GB/s] */
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "../../lattice/cuda/kernels.cuh"

namespace cg = cooperative_groups;
#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("%s: %s (line %d)\n", #x, cudaGetErrorString(e), __LINE__); exit(1); } } while (0)

struct gemv_desc {
    uint32_t rows, cols;
    const int8_t *wq;
    const __half *ws;
    const float *x;
    float *y;
};

/* ---------------------------------------------------------------------------- B: persistent */
#define B_THREADS 512
#define MAX_PHASES 160

__constant__ gemv_desc c_phase[MAX_PHASES];

__device__ __forceinline__ void cp_async16(void *dst, const void *src) {
    unsigned d = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(d), "l"(src));
}
__device__ __forceinline__ void cp_async4(void *dst, const void *src) {
    unsigned d = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(d), "l"(src));
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;"); }
template <int N> __device__ __forceinline__ void cp_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N)); }

/* mbarrier and bulk-copy (TMA, sm_90) primitives. */
__device__ __forceinline__ unsigned smem_addr(const void *p) { return (unsigned)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void mbar_init(uint64_t *bar, unsigned count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(count));
}
__device__ __forceinline__ void mbar_expect_tx(uint64_t *bar, unsigned bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t *bar, unsigned parity) {
    asm volatile("{\n .reg .pred done;\n WAIT%=:\n mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
                 " @!done bra WAIT%=;\n}" ::"r"(smem_addr(bar)), "r"(parity) : "memory");
}
__device__ __forceinline__ void bulk_copy(void *dst, const void *src, unsigned bytes, uint64_t *bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                 ::"r"(smem_addr(dst)), "l"(src), "r"(bytes), "r"(smem_addr(bar)) : "memory");
}

/* This block's rows [r0, r1) of GEMV d, and where they sit in a shared-memory buffer: the int8 rows
 * (qbytes, padded to q16), then the 16-byte aligned span [s0, s0 + sbytes16) of the scale plane
 * that holds their scales (from byte soff); scale planes are allocated with 32 bytes of slack. */
struct slice_geom {
    uint32_t r0, r1;
    size_t qbytes, q16, soff, s0, sbytes16;
};
__device__ __forceinline__ slice_geom slice_of(const gemv_desc &d) {
    slice_geom g;
    uint32_t per = (d.rows + gridDim.x - 1) / gridDim.x;
    g.r0 = min(blockIdx.x * per, d.rows);
    g.r1 = min(g.r0 + per, d.rows);
    g.qbytes = (size_t)(g.r1 - g.r0) * d.cols;
    g.q16 = (g.qbytes + 15) / 16 * 16;
    g.soff = (size_t)g.r0 * (d.cols / 32) * 2;
    g.s0 = g.soff / 16 * 16;
    size_t send = g.soff + (size_t)(g.r1 - g.r0) * (d.cols / 32) * 2;
    g.sbytes16 = g.r1 > g.r0 ? (send + 15) / 16 * 16 - g.s0 : 0;
    return g;
}

/* Copy this block's weight rows and their scales of GEMV d into buf. TMA: one thread issues two
 * bulk copies that complete on bar. Otherwise every thread but warp 0's (whose thread 0 runs the
 * grid barrier) issues 16-byte cp.async. */
template <bool TMA>
__device__ void fetch(const gemv_desc &d, uint8_t *buf, uint64_t *bar) {
    const slice_geom g = slice_of(d);
    const uint8_t *q = (const uint8_t *)d.wq + (size_t)g.r0 * d.cols, *sc = (const uint8_t *)d.ws + g.s0;
    if (TMA) {
        if (threadIdx.x == 32) {
            asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  /* after the buffer's last reads */
            mbar_expect_tx(bar, (unsigned)(g.qbytes + g.sbytes16));
            if (g.qbytes)
                bulk_copy(buf, q, (unsigned)g.qbytes, bar);
            if (g.sbytes16)
                bulk_copy(buf + g.q16, sc, (unsigned)g.sbytes16, bar);
        }
        return;
    }
    if (threadIdx.x < 32)
        return;
    const uint32_t tid = threadIdx.x - 32, nt = B_THREADS - 32;
    for (size_t i = tid * 16; i < g.qbytes; i += nt * 16)
        cp_async16(buf + i, q + i);
    for (size_t i = tid * 16; i < g.sbytes16; i += nt * 16)
        cp_async16(buf + g.q16 + i, sc + i);
}

template <int DEPTH, bool TMA>
__global__ void __launch_bounds__(B_THREADS, 1) k_stream(int n, size_t slice) {
    extern __shared__ __align__(128) uint8_t smem[];
    __shared__ __align__(8) uint64_t bars[DEPTH];
    float *xs = (float *)(smem + DEPTH * slice);
    const uint32_t warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (TMA && threadIdx.x == 0) {
        for (int i = 0; i < DEPTH; i++)
            mbar_init(&bars[i], 1);
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();
    for (int p = 0; p < DEPTH - 1; p++) {
        if (p < n)
            fetch<TMA>(c_phase[p], smem + p * slice, &bars[p]);
        if (!TMA)
            cp_commit();
    }
    for (int p = 0; p < n; p++) {
        const int ahead = p + DEPTH - 1;
        if (ahead < n)
            fetch<TMA>(c_phase[ahead], smem + (ahead % DEPTH) * slice, &bars[ahead % DEPTH]);
        if (!TMA)
            cp_commit();  /* (an empty group past the end keeps the count) */
        if (p)
            cg::this_grid().sync();
        const gemv_desc d = c_phase[p];
        for (uint32_t k = threadIdx.x; k < d.cols; k += B_THREADS)
            xs[k] = __ldcg(d.x + k);  /* written by other blocks in this kernel: past L1 */
        if (TMA)
            mbar_wait(&bars[p % DEPTH], (p / DEPTH) & 1);  /* this GEMV's rows have landed */
        else
            cp_wait<DEPTH - 1>();
        __syncthreads();
        const slice_geom g = slice_of(d);
        const uint8_t *buf = smem + (p % DEPTH) * slice;
        const __half *sc = (const __half *)(buf + g.q16 + (g.soff - g.s0));
        for (uint32_t r = g.r0 + warp; r < g.r1; r += B_THREADS / 32) {
            const uint8_t *row = buf + (size_t)(r - g.r0) * d.cols;
            float acc = 0.0f;
            for (uint32_t v = lane; v < d.cols / 16; v += 32) {
                uint4 w = *(const uint4 *)(row + v * 16);
                const uint32_t wd[4] = {w.x, w.y, w.z, w.w};
                float a = 0.0f;
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    float4 xv = *(const float4 *)(xs + v * 16 + 4 * i);
                    a += (float)(int8_t)wd[i] * xv.x + (float)(int8_t)(wd[i] >> 8) * xv.y
                         + (float)(int8_t)(wd[i] >> 16) * xv.z + (float)(int8_t)(wd[i] >> 24) * xv.w;
                }
                acc += a * __half2float(sc[(size_t)(r - g.r0) * (d.cols / 32) + v / 2]);
            }
            acc = warp_sum(acc);
            if (lane == 0)
                d.y[r] = acc;
        }
        __syncthreads();  /* xs and this buffer are rewritten later */
    }
}

/* ---------------------------------------------------------------------------- A: k_gemv chain */
static void launch_gemv_pdl(const gemv_desc &d, lt_step_args *st, int sms, cudaStream_t s) {
    lt_gemv_args a = {};
    a.wformat = LT_WF_Q8;
    a.rows = d.rows;
    a.cols = d.cols;
    a.x_stride = d.cols;
    a.y_stride = d.rows;
    lt_binds b = {};
    b.p[LT_GEMV_B_X] = (void *)d.x;
    b.p[LT_GEMV_B_Y] = d.y;
    b.p[LT_GEMV_B_WQ] = (void *)d.wq;
    b.p[LT_GEMV_B_WS] = (void *)d.ws;
    gemv_geom g = {};
    g.xcols = (d.cols + 31) / 32 * 32;
    g.row_bytes = d.cols;
    g.nvec = d.cols / 16;
    g.nblk = d.cols / 32;
    g.vec_ok = 1;
    g.x_vec = d.cols % 4 == 0 && g.xcols <= 4 * 4 * 256;
    /* the backend's launch shape (backend.cu gemv_shape) */
    uint32_t want = (uint32_t)sms * 32, ks = 1, rpw = 1;
    if (d.rows > want)
        rpw = 2;
    else
        while (ks < 8 && d.rows * ks < want && g.nvec / (32u * (ks * 2)) >= 1)
            ks *= 2;
    dim3 grid((d.rows + 8 / ks * rpw - 1) / (8 / ks * rpw));
    size_t smem = g.xcols * 4;
    uint32_t T = 1;
    int lm = 0;
    auto k = rpw == 2 ? k_gemv<LT_WF_Q8, 1, 2, 1> : ks == 1 ? k_gemv<LT_WF_Q8, 1, 1, 1>
           : ks == 2 ? k_gemv<LT_WF_Q8, 2, 1, 1> : ks == 4 ? k_gemv<LT_WF_Q8, 4, 1, 1> : k_gemv<LT_WF_Q8, 8, 1, 1>;
    lt_launch(k, grid, 256, smem, s, true, a, b, st, T, g, lm, gemv_fuse{});
    CK(cudaGetLastError());
}

static float median(std::vector<float> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
}

static void run_model(const char *name, const uint32_t (*shape)[2], int per_layer, int layers, int sms,
                      double copy_gbs, cudaStream_t s) {
    int n = per_layer * layers;
    std::vector<gemv_desc> ph(n);
    size_t wbytes = 0, slice = 0;
    uint32_t maxrows = 0, maxcols = 0;
    for (int i = 0; i < n; i++) {
        ph[i].rows = shape[i % per_layer][0];
        ph[i].cols = shape[i % per_layer][1];
        maxrows = std::max(maxrows, std::max(ph[i].rows, ph[i].cols));
        maxcols = std::max(maxcols, ph[i].cols);
        size_t q = (size_t)ph[i].rows * ph[i].cols, sc = (size_t)ph[i].rows * (ph[i].cols / 32) * 2;
        wbytes += q + sc;
        uint32_t per = (ph[i].rows + sms - 1) / sms;
        slice = std::max(slice, ((size_t)per * ph[i].cols + 15) / 16 * 16 + (size_t)per * (ph[i].cols / 32) * 2 + 32);
    }
    slice = (slice + 15) / 16 * 16;
    /* weights: random int8, scales so that outputs stay O(1) */
    std::vector<int8_t *> wq(n);
    std::vector<__half *> ws(n);
    for (int i = 0; i < n; i++) {
        size_t q = (size_t)ph[i].rows * ph[i].cols, nsc = (size_t)ph[i].rows * (ph[i].cols / 32);
        std::vector<int8_t> hq(q);
        std::vector<__half> hs(nsc);
        for (size_t k = 0; k < q; k++)
            hq[k] = (int8_t)((rand() % 255) - 127);
        for (size_t k = 0; k < nsc; k++)
            hs[k] = __float2half(1.0f / (64.0f * sqrtf((float)ph[i].cols)));
        CK(cudaMalloc(&wq[i], q));
        CK(cudaMalloc(&ws[i], nsc * 2 + 32));  /* slack: slices copy whole 16-byte spans */
        CK(cudaMemcpy(wq[i], hq.data(), q, cudaMemcpyHostToDevice));
        CK(cudaMemcpy(ws[i], hs.data(), nsc * 2, cudaMemcpyHostToDevice));
        ph[i].wq = wq[i];
        ph[i].ws = ws[i];
    }
    /* activations: y of GEMV i is x of GEMV i + 1; x0 random */
    std::vector<float *> act(n + 1);
    for (int i = 0; i <= n; i++)
        CK(cudaMalloc(&act[i], maxrows * 4));
    std::vector<float> hx(maxrows);
    for (auto &v : hx)
        v = (float)(rand() % 2001 - 1000) / 1000.0f;
    CK(cudaMemcpy(act[0], hx.data(), maxrows * 4, cudaMemcpyHostToDevice));
    for (int i = 0; i < n; i++) {
        ph[i].x = act[i];
        ph[i].y = act[i + 1];
    }
    lt_step_args *st;
    CK(cudaMalloc(&st, sizeof(lt_step_args)));
    CK(cudaMemset(st, 0, sizeof(lt_step_args)));
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    auto time_it = [&](auto launch) {
        std::vector<float> t;
        for (int r = 0; r < 23; r++) {
            CK(cudaEventRecord(e0, s));
            launch();
            CK(cudaEventRecord(e1, s));
            CK(cudaEventSynchronize(e1));
            float ms;
            CK(cudaEventElapsedTime(&ms, e0, e1));
            if (r >= 3)
                t.push_back(ms * 1000.0f);
        }
        return median(t);
    };
    /* A */
    cudaGraph_t g;
    cudaGraphExec_t ge;
    CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
    for (int i = 0; i < n; i++)
        launch_gemv_pdl(ph[i], st, sms, s);
    CK(cudaStreamEndCapture(s, &g));
    CK(cudaGraphInstantiate(&ge, g, 0));
    float ta = time_it([&] { CK(cudaGraphLaunch(ge, s)); });
    std::vector<float> ya(maxrows), yb(maxrows);
    CK(cudaMemcpy(ya.data(), act[n], ph[n - 1].rows * 4, cudaMemcpyDeviceToHost));
    double floor_us = wbytes / (copy_gbs * 1e3);
    printf("%s: %d GEMVs, %.1f MB of weights, DRAM floor %.1f us (at %.0f GB/s)\n", name, n, wbytes / 1e6, floor_us,
           copy_gbs);
    printf("  A  k_gemv graph + PDL           %8.1f us  %5.2f us/GEMV  %5.1f%% of floor\n", ta, ta / n,
           100 * floor_us / ta);
    /* B */
    CK(cudaMemcpyToSymbol(c_phase, ph.data(), n * sizeof(gemv_desc)));
    for (int tma = 0; tma < 2; tma++)
        for (int depth = 2; depth <= 3; depth++) {
            size_t smem = depth * slice + (size_t)maxcols * 4;
            auto k = tma ? (depth == 2 ? k_stream<2, true> : k_stream<3, true>)
                         : (depth == 2 ? k_stream<2, false> : k_stream<3, false>);
            const char *tag = tma ? "C  persistent, TMA" : "B  persistent, cp.async";
            if (smem > 227 * 1024) {
                printf("  %s, %d GEMVs in flight: %zu bytes of shared memory do not fit\n", tag, depth - 1, smem);
                continue;
            }
            CK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
            int nn = n;
            size_t sl = slice;
            void *args[] = {&nn, &sl};
            CK(cudaMemset(act[n], 0xff, ph[n - 1].rows * 4));  /* NaN: every output must be written */
            float tb = time_it([&] { CK(cudaLaunchCooperativeKernel((void *)k, sms, B_THREADS, args, smem, s)); });
            CK(cudaMemcpy(yb.data(), act[n], ph[n - 1].rows * 4, cudaMemcpyDeviceToHost));
            double err = 0, ref = 0;
            for (uint32_t i = 0; i < ph[n - 1].rows; i++) {
                err = std::max(err, std::isnan(yb[i]) ? INFINITY : (double)fabsf(ya[i] - yb[i]));
                ref = std::max(ref, (double)fabsf(ya[i]));
            }
            printf("  %s, %d ahead %8.1f us  %5.2f us/GEMV  %5.1f%% of floor  (max |A-%c| %.2g of %.2g)\n", tag,
                   depth - 1, tb, tb / n, 100 * floor_us / tb, tma ? 'C' : 'B', err, ref);
        }
    CK(cudaGraphExecDestroy(ge));
    CK(cudaGraphDestroy(g));
    for (int i = 0; i < n; i++) {
        CK(cudaFree(wq[i]));
        CK(cudaFree(ws[i]));
    }
    for (auto p : act)
        CK(cudaFree(p));
    CK(cudaFree(st));
}

int main(int argc, char **argv) {
    setvbuf(stdout, nullptr, _IONBF, 0);
    double copy_gbs = argc > 1 ? atof(argv[1]) : 4200.0;
    cudaDeviceProp p;
    CK(cudaGetDeviceProperties(&p, 0));
    printf("%s, %d SMs\n", p.name, p.multiProcessorCount);
    cudaStream_t s;
    CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    CK(cudaFuncSetAttribute(k_gemv<LT_WF_Q8, 1, 2, 1>, cudaFuncAttributeMaxDynamicSharedMemorySize, 48 * 1024));
    static const uint32_t qwen[4][2] = {{8224, 1024}, {1024, 2048}, {7168, 1024}, {1024, 3584}};
    static const uint32_t smol[4][2] = {{960, 576}, {576, 576}, {3072, 576}, {576, 1536}};
    run_model("Qwen3.5-0.8B GEMVs", qwen, 4, 24, p.multiProcessorCount, copy_gbs, s);
    run_model("SmolLM2-135M GEMVs", smol, 4, 30, p.multiProcessorCount, copy_gbs, s);
    return 0;
}
