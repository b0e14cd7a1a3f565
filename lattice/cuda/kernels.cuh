/* CUDA kernels of the Lattice program (metal/lattice_shared.h gives the meaning of every kernel;
 * lattice/csrc is the CPU model of the same semantics).
 *
 * Every kernel takes its args struct by value, the resolved binding pointers (lt_binds), the step
 * args in device memory and T (tokens of this step, known to the host when it launches). Kernels
 * read the position from the step args, so one captured graph serves every decode step. After any
 * kernel raised an error (step.error != 0) every later kernel returns at once: the host stops at
 * the first step that failed, and the steps it had queued behind it do nothing. */
#pragma once

#include <cuda_fp16.h>
#include <stdint.h>

#include "../../metal/lattice_shared.h"

struct lt_binds {
    void *p[LT_MAX_BIND];
};

#define LT_WARP 32

__device__ __forceinline__ void lt_raise(lt_step_args *st, uint32_t err) {
    atomicCAS(&st->error, 0u, err);
}

#ifdef LT_TRACE
/* Decode timeline (diagnostic, built with LATTICE_CUDA_TRACE=1: tests/gpu/trace_step.py). Thread 0
 * of every block records its grid, block, SM, start (pdl_begin) and dependency release (pdl_wait)
 * in globaltimer ns into a ring of records; k_gemv, k_gdn_decode, k_attention and k_sample also
 * note marks 1-5 on the way (lt_trace_mark) and their end (lt_trace_end) in the record's end slot.
 * The record's slot comes from an atomic right after the release, so mark 1 includes one memory
 * round trip of the trace's own (decode runs ~6% slower). */
#define LT_TRACE_N (1u << 18)
__device__ uint32_t lt_trace_n;
__device__ uint4 lt_trace_buf[4 * LT_TRACE_N];  /* begin records, then each one's end record */
__device__ __forceinline__ uint32_t lt_gtime() {
    uint64_t t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return (uint32_t)t;
}
__device__ __forceinline__ uint32_t *lt_trace_t0() {
    __shared__ uint32_t t0[8];  /* start, marks 1-5, the record's slot (thread 0's times) */
    return t0;
}
#endif
/* trace: thread 0 notes the time of mark k (1-5); lt_trace_end writes the marks and the end */
__device__ __forceinline__ void lt_trace_mark(int k) {
#ifdef LT_TRACE
    if (threadIdx.x == 0)
        lt_trace_t0()[k] = lt_gtime();
#endif
}
__device__ __forceinline__ void lt_trace_end() {
#ifdef LT_TRACE
    if (threadIdx.x == 0) {
        const uint32_t *m = lt_trace_t0(), i = m[6];
        lt_trace_buf[2 * LT_TRACE_N + 2 * i] = make_uint4(m[1], m[2], m[3], m[4]);
        lt_trace_buf[2 * LT_TRACE_N + 2 * i + 1] = make_uint4(m[5], lt_gtime(), 1, 0);
    }
#endif
}

/* Programmatic dependent launch (sm_90): every kernel lets the next one start at once
 * (launch_dependents) and waits for the previous one to finish (wait) before it touches anything
 * a kernel wrote; what comes before the wait may read only weights. Both are no-ops when the
 * launch did not ask for programmatic serialization. */
__device__ __forceinline__ void pdl_begin() {
#ifdef LT_TRACE
    if (threadIdx.x == 0)
        for (int k = 0; k < 8; k++)
            lt_trace_t0()[k] = k ? 0u : lt_gtime();
#endif
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;");
#endif
}
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
#ifdef LT_TRACE
    if (threadIdx.x == 0) {
        const uint32_t t1 = lt_gtime();
        uint64_t grid;
        uint32_t sm;
        asm volatile("mov.u64 %0, %%gridid;" : "=l"(grid));
        asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
        const uint32_t i = atomicAdd(&lt_trace_n, 1u) % LT_TRACE_N;
        lt_trace_t0()[6] = i;
        lt_trace_buf[2 * LT_TRACE_N + 2 * i + 1].z = 0;  /* no end record yet */
        lt_trace_buf[2 * i] = make_uint4((uint32_t)grid, blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z),
                                         sm, gridDim.x * gridDim.y * gridDim.z);
        lt_trace_buf[2 * i + 1] = make_uint4(*lt_trace_t0(), t1, blockDim.x, 0);
    }
#endif
}

/* The value is computed here: the compiler may not sink its loads to a later first use (behind a
 * barrier or a dependent load, each another memory round trip after the wait) or past an early
 * return. Used where values are requested together with what comes first. */
__device__ __forceinline__ void lt_keep(float v) {
    asm volatile("" ::"f"(v));
}
__device__ __forceinline__ void lt_keep(uint32_t v) {
    asm volatile("" ::"r"(v));
}

/* Asks L2 for the 128-byte line holding p (one thread; prefetch_l2 spreads a range over a block) */
__device__ __forceinline__ void prefetch_line(const void *p) {
    asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
}

/* Asks L2 for the lines of [p, p + bytes), spread over the block's threads, and returns at once.
 * Decode kernels call it before pdl_wait for what they read after it from cold memory: small
 * weights (norms, conv taps, rope frequencies) and state (GDN state, KV rows). Every step streams
 * all the weights through L2, so those reads miss it; asked for early, their DRAM latency overlaps
 * the previous kernel instead of adding to this one's dependent chain. A prefetch returns no data,
 * and L2 is where every SM's stores land, so prefetching what a kernel still in flight writes
 * can never make a later read stale. Blocks of one grid can share the lines out: part of parts. */
__device__ __forceinline__ void prefetch_l2(const void *p, size_t bytes, uint32_t part = 0, uint32_t parts = 1) {
    if (!p || !bytes)
        return;
    uintptr_t first = (uintptr_t)p & ~(uintptr_t)127, end = (uintptr_t)p + bytes;
    uintptr_t step = (uintptr_t)blockDim.x * parts * 128;
    for (uintptr_t a = first + ((uintptr_t)threadIdx.x * parts + part) * 128; a < end; a += step)
        prefetch_line((const void *)a);
}

/* Asynchronous copies global -> shared (sm_80): no registers held while they fly. cp_async16 reads
 * src_bytes of the 16 (the rest zeros), bypassing L1; cp_async4 one float. */
__device__ __forceinline__ void cp_async16(void *dst, const void *src, uint32_t src_bytes) {
    uint32_t d = (uint32_t)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(d), "l"(src), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_async4(float *dst, const float *src) {
    uint32_t d = (uint32_t)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(d), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;" ::: "memory"); }

/* Host side: launches kernel k, with programmatic stream serialization when pdl (sm_90), so that it
 * may start before the kernel ahead of it on the stream finishes (pdl_begin / pdl_wait above).
 * lt_kernels_launched counts the calls (this thread's; graph captures included). */
static thread_local uint64_t lt_kernels_launched = 0;
template <typename... P, typename... A>
static void lt_launch(void (*k)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t s, bool pdl, A... args) {
    lt_kernels_launched++;
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = smem;
    cfg.stream = s;
    cudaLaunchAttribute at[1];
    at[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    at[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = at;
    cfg.numAttrs = pdl ? 1 : 0;
    cudaLaunchKernelEx(&cfg, k, args...);
}

/* SiLU and sigmoid with the hardware exp and a fast division (a few ulp): they sit at the ends of
 * decode kernels' serial chains (GEMV epilogues, gates), where IEEE division and the library exp
 * are latency. __fdividef(x, inf) is 0: the limits for very negative x hold. */
__device__ __forceinline__ float lt_silu_d(float x) { return __fdividef(x, 1.0f + __expf(-x)); }
__device__ __forceinline__ float lt_sigmoid_d(float x) { return __fdividef(1.0f, 1.0f + __expf(-x)); }

/* 8 f16 values of a 16-byte vector as floats. */
__device__ __forceinline__ void f16x8(uint4 w, float f[8]) {
    const __half2 *h2 = (const __half2 *)&w;
#pragma unroll
    for (int e = 0; e < 4; e++) {
        float2 p = __half22float2(h2[e]);
        f[2 * e] = p.x;
        f[2 * e + 1] = p.y;
    }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

/* Block-wide reductions; every thread gets the result. `red` holds >= 32 entries; the calls
 * synchronize before returning, so `red` can be reused by the next call. */
__device__ float block_sum(float v, float *red) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0)
        red[w] = v;
    __syncthreads();
    v = lane < nw ? red[lane] : 0.0f;
    return warp_sum(v);
}

__device__ float2 block_sum2(float2 v, float2 *red) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v.x = warp_sum(v.x);
    v.y = warp_sum(v.y);
    __syncthreads();
    if (lane == 0)
        red[w] = v;
    __syncthreads();
    v = lane < nw ? red[lane] : make_float2(0.0f, 0.0f);
    return make_float2(warp_sum(v.x), warp_sum(v.y));
}

__device__ float block_max(float v, float *red) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0)
        red[w] = v;
    __syncthreads();
    v = lane < nw ? red[lane] : -INFINITY;
    return warp_max(v);
}

__device__ uint32_t block_count(uint32_t v, uint32_t *red) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    if (lane == 0)
        red[w] = v;
    __syncthreads();
    v = lane < nw ? red[lane] : 0u;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

/* (value, id) argmax: larger value wins, the lower id on ties; NaN never wins. */
__device__ __forceinline__ void arg_better(float &v, uint32_t &i, float v2, uint32_t i2) {
    if (v2 > v || (v2 == v && i2 < i)) {
        v = v2;
        i = i2;
    }
}

__device__ void block_argmax(float &v, uint32_t &i, float *redv, uint32_t *redi) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
        arg_better(v, i, __shfl_xor_sync(0xffffffffu, v, o), __shfl_xor_sync(0xffffffffu, i, o));
    __syncthreads();
    if (lane == 0) {
        redv[w] = v;
        redi[w] = i;
    }
    __syncthreads();
    v = lane < nw ? redv[lane] : -INFINITY;
    i = lane < nw ? redi[lane] : 0xffffffffu;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
        arg_better(v, i, __shfl_xor_sync(0xffffffffu, v, o), __shfl_xor_sync(0xffffffffu, i, o));
}

/* Softmax statistics of a set of logits: max, its id (lowest on ties), sum of exp(l - max), NaN /
 * Inf count. Sets merge in any order (the sums rescale to the larger max). */
struct logit_stats {
    float max = -INFINITY, sumexp = 0.0f;
    uint32_t arg = 0xffffffffu, bad = 0;
    __device__ void merge(float m2, uint32_t a2, float s2, uint32_t bad2) {
        const float m = fmaxf(max, m2);
        sumexp = (max > -INFINITY ? sumexp * expf(max - m) : 0.0f) + (m2 > -INFINITY ? s2 * expf(m2 - m) : 0.0f);
        arg_better(max, arg, m2, a2);
        bad += bad2;
    }
    __device__ lt_argmax_partial partial() const { return {max, arg, sumexp, bad}; }
    static __device__ logit_stats of(const lt_argmax_partial &p) { return {p.max, p.sumexp, p.argmax, p.n_nonfinite}; }
};

/* logit_stats merged over the block; every thread gets the result. The max, its id and the count
 * first, then each thread's sum rescaled to the block's max (one expf per thread: merging sums at
 * every shuffle level cost 2 us of special-function throughput in one block of 1024 threads). */
__device__ logit_stats block_stats(const logit_stats &v, float4 *red, float *redf) {
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    float m = v.max;
    uint32_t arg = v.arg, bad = v.bad;
    auto warp_reduce = [&]() {
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            arg_better(m, arg, __shfl_xor_sync(0xffffffffu, m, o), __shfl_xor_sync(0xffffffffu, arg, o));
            bad += __shfl_xor_sync(0xffffffffu, bad, o);
        }
    };
    warp_reduce();
    __syncthreads();
    if (lane == 0)
        red[w] = make_float4(m, __uint_as_float(arg), __uint_as_float(bad), 0.0f);
    __syncthreads();
    m = lane < nw ? red[lane].x : -INFINITY;
    arg = lane < nw ? __float_as_uint(red[lane].y) : 0xffffffffu;
    bad = lane < nw ? __float_as_uint(red[lane].z) : 0u;
    warp_reduce();
    logit_stats r;
    r.max = m, r.arg = arg, r.bad = bad;
    r.sumexp = block_sum(v.max > -INFINITY ? v.sumexp * expf(v.max - m) : 0.0f, redf);
    return r;
}

/* Exclusive prefix sum over the block's threads (in thread order) and the total. */
template <typename V>
__device__ V block_exclusive_scan(V v, V *scan, V *total) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    V inc = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        V n = __shfl_up_sync(0xffffffffu, inc, o);
        if (lane >= o)
            inc += n;
    }
    __syncthreads();
    if (lane == 31)
        scan[w] = inc;
    __syncthreads();
    if (w == 0) {
        V s = lane < nw ? scan[lane] : V(0), si = s;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            V n = __shfl_up_sync(0xffffffffu, si, o);
            if (lane >= o)
                si += n;
        }
        if (lane < nw)
            scan[lane] = si - s;  /* exclusive per warp */
        if (lane == 31)
            scan[32] = si;
    }
    __syncthreads();
    V out = scan[w] + inc - v;
    *total = scan[32];
    __syncthreads();
    return out;
}

/* ============================================================================ EMBED */
__global__ void k_embed(lt_embed_args a, lt_binds b, lt_step_args *st, uint32_t T) {
    pdl_begin();
    pdl_wait();
    if (st->error)
        return;
    uint32_t t = blockIdx.y, k = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= T || k >= a.dim)
        return;
    uint32_t id = ((const uint32_t *)b.p[LT_EMBED_B_IDS])[t];
    if (id >= a.vocab) {
        lt_raise(st, LT_ERR_TOKEN);
        return;
    }
    const void *wq = b.p[LT_EMBED_B_WQ];
    const __half *ws = (const __half *)b.p[LT_EMBED_B_WS], *wm = (const __half *)b.p[LT_EMBED_B_WM];
    uint32_t nb = (a.dim + LT_QK - 1) / LT_QK, stride = nb * LT_QK, blk = k / LT_QK;
    float v;
    switch (a.wformat) {
    case LT_WF_F32: v = ((const float *)wq)[(size_t)id * a.dim + k]; break;
    case LT_WF_F16: v = __half2float(((const __half *)wq)[(size_t)id * a.dim + k]); break;
    case LT_WF_Q8:
        v = (float)((const int8_t *)wq)[(size_t)id * stride + k] * __half2float(ws[(size_t)id * nb + blk]);
        break;
    default: {
        uint8_t byte = ((const uint8_t *)wq)[(size_t)id * (stride / 2) + blk * 16 + (k % 32) % 16];
        uint32_t q = (k % 32) < 16 ? (byte & 0x0fu) : (uint32_t)(byte >> 4);
        v = (float)q * __half2float(ws[(size_t)id * nb + blk]) + __half2float(wm[(size_t)id * nb + blk]);
    }
    }
    ((float *)b.p[LT_EMBED_B_OUT])[(size_t)t * a.out_stride + k] = v * a.scale;
}

/* ============================================================================ RMSNORM */
/* grid (n_heads, T). out may alias x: every thread writes only elements it read itself. */
__global__ void k_rmsnorm(lt_rmsnorm_args a, lt_binds b, lt_step_args *st, uint32_t T) {
    __shared__ float red[32];
    pdl_begin();
    pdl_wait();
    if (st->error)
        return;
    uint32_t h = blockIdx.x, t = blockIdx.y, n = a.head_dim;
    const float *x = (const float *)b.p[LT_NORM_B_X] + (size_t)t * a.in_stride + (size_t)h * n;
    float *o = (float *)b.p[LT_NORM_B_OUT] + (size_t)t * a.out_stride + (size_t)h * n;
    const float *w = (const float *)b.p[LT_NORM_B_W];
    const float *z = (a.flags & LT_NORM_SILU_GATE)
        ? (const float *)b.p[LT_NORM_B_Z] + (size_t)t * a.z_stride + (size_t)h * n : nullptr;
    float ss = 0.0f;
    for (uint32_t k = threadIdx.x; k < n; k += blockDim.x)
        ss += x[k] * x[k];
    ss = block_sum(ss, red);
    float r = rsqrtf(ss / (float)n + a.eps);
    bool add_one = a.flags & LT_NORM_ADD_ONE;
    for (uint32_t k = threadIdx.x; k < n; k += blockDim.x) {
        float v = x[k] * r * (add_one ? 1.0f + w[k] : w[k]);
        o[k] = z ? v * lt_silu_d(z[k]) : v;
    }
}

/* ============================================================================ ELEMENTWISE */
__global__ void k_elementwise(lt_elementwise_args a, lt_binds b, lt_step_args *st, uint32_t T) {
    pdl_begin();
    pdl_wait();
    if (st->error)
        return;
    uint32_t t = blockIdx.y, k = blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= a.n)
        return;
    float x = ((const float *)b.p[LT_EW_B_A])[(size_t)t * a.a_stride + k];
    const float *pb = (const float *)b.p[LT_EW_B_B];
    float y = pb ? pb[(size_t)t * a.b_stride + k] : 0.0f, r;
    switch (a.op) {
    case LT_EW_ADD: r = x + y; break;
    case LT_EW_SILU_MUL: r = lt_silu_d(x) * y; break;
    case LT_EW_SIGMOID_MUL: r = x * lt_sigmoid_d(y); break;
    default: r = x;
    }
    ((float *)b.p[LT_EW_B_OUT])[(size_t)t * a.out_stride + k] = r;
}

/* ============================================================================ GEMV / GEMM */
/* One 16-byte weight vector: 16 int8 (Q8), 32 nibbles (Q4), 8 f16 or 4 f32 values. The block
 * stages x (normalized, zero-padded) in shared memory; each warp streams 16-byte weight vectors
 * with their scales, two or four per row and lane in flight before the first use (the first ones
 * before the dependency wait); KS warps share one row (split-K) when rows are few, RPW rows per
 * warp reuse the staged x when rows are many. One token's x is staged with float4 stores in the
 * swz layout (below): a lane reads the 4-8 float4 of x that its weight vector needs without bank
 * conflicts. */
template <int FMT> struct wfmt;
template <> struct wfmt<LT_WF_F32> { static constexpr int VALS = 4; static constexpr bool X16 = false; };
template <> struct wfmt<LT_WF_F16> { static constexpr int VALS = 8; static constexpr bool X16 = false; };
template <> struct wfmt<LT_WF_Q8> { static constexpr int VALS = 16; static constexpr bool X16 = true; };  /* int16 x */
template <> struct wfmt<LT_WF_Q4> { static constexpr int VALS = 32; static constexpr bool X16 = true; };

struct wrow {
    const uint8_t *q;       /* the row's first byte in WQ */
    const __half *s, *m;    /* the row's scales / mins (Q8, Q4) */
};

/* Scale (and min) of weight vector v of a row: loaded with the vector, before it is used. */
template <int FMT>
__device__ __forceinline__ float2 vec_scale(const wrow &r, uint32_t v) {
    if (FMT == LT_WF_Q8)
        return make_float2(__half2float(__ldg(r.s + v / 2)), 0.0f);
    if (FMT == LT_WF_Q4)
        return make_float2(__half2float(__ldg(r.s + v)), __half2float(__ldg(r.m + v)));
    return make_float2(1.0f, 0.0f);
}

/* Byte K of u minus bias, as an exact float, without the conversion unit: int-to-float runs at 16
 * per clock per SM on sm_80 / sm_90 (an eighth of the FMA rate), and a decode step dequantizes
 * every weight byte once, about as many conversions as the step reads bytes. The byte becomes the
 * low mantissa byte of 2^23 (one byte permute) and one subtraction leaves its value. Q8 bytes are
 * biased to unsigned first (xor 0x80), hence bias 128. */
template <int K>
__device__ __forceinline__ float byte_f(uint32_t u, int bias) {
    return __int_as_float(__byte_perm(u, 0x4B000000u, 0x7440 | K)) - (8388608.0f + (float)bias);
}

/* dot of a 16-byte weight vector w (scale / min sm) with x (VALS floats in shared memory). */
template <int FMT>
__device__ __forceinline__ float vec_dot(uint4 w, const float *x, float2 sm) {
    if (FMT == LT_WF_F32) {
        float4 xv = *(const float4 *)x;
        return __uint_as_float(w.x) * xv.x + __uint_as_float(w.y) * xv.y + __uint_as_float(w.z) * xv.z
               + __uint_as_float(w.w) * xv.w;
    } else if (FMT == LT_WF_F16) {
        const __half2 *h = (const __half2 *)&w;
        float acc = 0.0f;
#pragma unroll
        for (int i = 0; i < 4; i++) {
            float2 f = __half22float2(h[i]);
            float2 xv = *(const float2 *)(x + 2 * i);
            acc += f.x * xv.x + f.y * xv.y;
        }
        return acc;
    } else if (FMT == LT_WF_Q8) {
        const uint32_t wd[4] = {w.x ^ 0x80808080u, w.y ^ 0x80808080u, w.z ^ 0x80808080u, w.w ^ 0x80808080u};
        float acc = 0.0f;
#pragma unroll
        for (int i = 0; i < 4; i++) {
            float4 xv = *(const float4 *)(x + 4 * i);
            acc += byte_f<0>(wd[i], 128) * xv.x + byte_f<1>(wd[i], 128) * xv.y + byte_f<2>(wd[i], 128) * xv.z
                   + byte_f<3>(wd[i], 128) * xv.w;
        }
        return acc * sm.x;
    } else {
        const uint32_t wd[4] = {w.x, w.y, w.z, w.w};
        float acc = 0.0f, xs = 0.0f;
#pragma unroll
        for (int i = 0; i < 4; i++) {
            float4 lo = *(const float4 *)(x + 4 * i), hi = *(const float4 *)(x + 16 + 4 * i);
            uint32_t l = wd[i] & 0x0F0F0F0Fu, h = (wd[i] >> 4) & 0x0F0F0F0Fu;  /* byte k: nibble of byte k */
            acc += byte_f<0>(l, 0) * lo.x + byte_f<1>(l, 0) * lo.y + byte_f<2>(l, 0) * lo.z + byte_f<3>(l, 0) * lo.w;
            acc += byte_f<0>(h, 0) * hi.x + byte_f<1>(h, 0) * hi.y + byte_f<2>(h, 0) * hi.z + byte_f<3>(h, 0) * hi.w;
            xs += lo.x + lo.y + lo.z + lo.w + hi.x + hi.y + hi.z + hi.w;
        }
        return acc * sm.x + xs * sm.y;
    }
}

template <int FMT>
__device__ __forceinline__ float scalar_weight(const wrow &r, uint32_t k) {
    if (FMT == LT_WF_F32)
        return ((const float *)r.q)[k];
    return __half2float(((const __half *)r.q)[k]);
}

/* Stages one token's x row in shared memory as x * w' (w' = the norm weight nw, or 1 + it, or 1
 * without nw), zero-padded to xcols, and returns the row's RMS factor (1 without nw) to every
 * thread. Every thread of the block calls it; it synchronizes only through block_sum. */
__device__ float stage_x_row(const float *src, float *xr, uint32_t cols, uint32_t xcols, const float *nw,
                             bool add_one, float eps, float *red) {
    float ss = 0.0f;
    for (uint32_t k = threadIdx.x; k < xcols; k += blockDim.x) {
        float v = 0.0f;
        if (k < cols) {
            v = src[k];
            ss += v * v;
            if (nw)
                v *= add_one ? 1.0f + nw[k] : nw[k];
        }
        xr[k] = v;
    }
    return nw ? rsqrtf(block_sum(ss, red) / (float)cols + eps) : 1.0f;
}

/* Where float4 k4 of a staged x row lives when each 16-byte weight vector reads CPV float4s of it
 * (CPV = VALS / 4): swizzled so that the 8 lanes of a quarter warp, reading float4 c of 8
 * consecutive vectors, hit 8 different 16-byte bank groups instead of 2-8 lanes sharing one.
 * swz<1> is the plain layout (f32 vectors need no other). */
template <int CPV>
__device__ __forceinline__ uint32_t swz(uint32_t k4) {
    if (CPV <= 1)
        return k4;
    constexpr int SHIFT = CPV == 2 ? 2 : CPV == 4 ? 1 : 0;
    const uint32_t v = k4 / CPV;
    return k4 ^ ((v >> SHIFT) & (CPV - 1));
}

/* Decode x staging for float4 rows (gemv_geom.x_vec): writes x * w' (w' = the norm weight nw, or
 * 1 + it, or 1 without nw), zero-padded to xcols, at swz<CPV> positions and returns this thread's
 * part of the sum of squares of x. Every thread's x and norm-weight vectors are requested at once
 * (two at a time: registers), not one dependent load per loop trip. No barrier. */
template <int CPV>
__device__ __forceinline__ float stage_x_vec(const float *x, float *xs, uint32_t cols, uint32_t xcols,
                                             const float *nw, bool add_one) {
    const float4 *src = (const float4 *)x;
    const float f = nw && add_one ? 1.0f : 0.0f;
    float ss = 0.0f;
    for (uint32_t k0 = threadIdx.x; k0 * 4 < xcols; k0 += 2 * blockDim.x) {
        float4 xv[2], nwv[2];
#pragma unroll
        for (int i = 0; i < 2; i++) {
            uint32_t k4 = k0 + i * blockDim.x;
            bool in = k4 * 4 < cols;
            xv[i] = in ? src[k4] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            nwv[i] = nw && in ? __ldg((const float4 *)nw + k4) : make_float4(1.0f, 1.0f, 1.0f, 1.0f);
        }
#pragma unroll
        for (int i = 0; i < 2; i++) {
            uint32_t k4 = k0 + i * blockDim.x;
            ss += xv[i].x * xv[i].x + xv[i].y * xv[i].y + xv[i].z * xv[i].z + xv[i].w * xv[i].w;
            if (k4 * 4 < xcols)
                ((float4 *)xs)[swz<CPV>(k4)] = make_float4(xv[i].x * (f + nwv[i].x), xv[i].y * (f + nwv[i].y),
                                                          xv[i].z * (f + nwv[i].z), xv[i].w * (f + nwv[i].w));
        }
    }
    return ss;
}

/* max |v| of a float4, and two floats as an int16 pair (low, high) at x16 scale inv: the one
 * quantization of x for the Q8 / Q4 dot products (stage_x_q16, dot_rows_x_lane) */
__device__ __forceinline__ float amax4(float4 v) {
    return fmaxf(fmaxf(fabsf(v.x), fabsf(v.y)), fmaxf(fabsf(v.z), fabsf(v.w)));
}
__device__ __forceinline__ uint32_t q16_pair(float lo, float hi, float inv) {
    return (uint32_t)(__float2int_rn(lo * inv) & 0xffff) | ((uint32_t)__float2int_rn(hi * inv) << 16);
}

/* A k_attention split's partial in its workspace: max, sum, two unused floats (so that acc is
 * 16-byte aligned for the GEMV's float4 loads), then acc[head_dim]; [T][n_heads][n_split] of them */
#define ATT_PART_HEAD 4
__host__ __device__ constexpr uint32_t att_part_floats(uint32_t head_dim) {
    return head_dim + ATT_PART_HEAD;
}

/* An attention output left as its splits' partials (k_attention with g.defer): x staging combines
 * them (GEMV_FUSE_ATT_SPLITS). Value i of head i / dim is sum_s w_s acc_s[i] / sum_s w_s sum_s over
 * the used splits, w_s = exp(max_s - their max); acc already holds the output gate. */
struct att_splits {
    const float *part;  /* [heads][n_split][att_part_floats(dim)] */
    uint32_t dim, n_split, used;  /* used <= ATT_DEFER_MAX */
};
#define ATT_DEFER_MAX 8
#define ATT_DEFER_BATCH 4  /* splits whose loads are requested at once (registers) */
__device__ __forceinline__ float4 att_combined4(const att_splits &a, uint32_t k4) {
    const uint32_t PF = att_part_floats(a.dim), i = k4 * 4 % a.dim;
    const float *p = a.part + (size_t)(k4 * 4 / a.dim) * a.n_split * PF;
    float M = -INFINITY, L = 0.0f;
    float4 o = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    for (uint32_t s0 = 0; s0 < a.used; s0 += ATT_DEFER_BATCH) {  /* online: rescaled per batch */
        float2 ml[ATT_DEFER_BATCH];
        float4 acc[ATT_DEFER_BATCH];
#pragma unroll
        for (uint32_t s = 0; s < ATT_DEFER_BATCH; s++)
            if (s0 + s < a.used) {
                ml[s] = *(const float2 *)(p + (s0 + s) * PF);
                acc[s] = *(const float4 *)(p + (s0 + s) * PF + ATT_PART_HEAD + i);
            }
        float m = M;
#pragma unroll
        for (uint32_t s = 0; s < ATT_DEFER_BATCH; s++)
            if (s0 + s < a.used)
                m = fmaxf(m, ml[s].x);
        const float c = __expf(M - m);  /* 0 on the first batch */
        L *= c;
        o = make_float4(o.x * c, o.y * c, o.z * c, o.w * c);
#pragma unroll
        for (uint32_t s = 0; s < ATT_DEFER_BATCH; s++)
            if (s0 + s < a.used) {
                const float w = __expf(ml[s].x - m);
                L += ml[s].y * w;
                o = make_float4(o.x + acc[s].x * w, o.y + acc[s].y * w, o.z + acc[s].z * w, o.w + acc[s].w * w);
            }
        M = m;
    }
    const float r = __fdividef(1.0f, L);
    return make_float4(o.x * r, o.y * r, o.z * r, o.w * r);
}

/* One token's x for Q8 / Q4 weights (float4 loads where vec), as the CPU backend's SIMD paths hold
 * it: x * w' per block of 32 as int16 (round(x * 32767 / max|x|)), the block's scale
 * max|x| / 32767 and its sum of x * w' (Q4 mins). The dot products are then exact integer sums
 * (dp2a: two int16 x int8 products and an add per instruction) converted once per 16-byte weight
 * vector: about a third of the float path's instructions (a byte permute, a subtraction and an FMA
 * per weight), which run after the dependency wait. Shared memory: int16 [xcols] in 16-byte
 * chunks in the swz<VQ> layout (VQ chunks per weight vector: 2 for Q8, 4 for Q4), then float
 * scale [nb], float sum [nb]. Every thread calls it; no barrier. Returns this thread's part of the
 * sum of squares of x. */
template <int VQ, bool ATT = false>
__device__ __forceinline__ float stage_x_q16(const float *x, float *xs, uint32_t cols, uint32_t xcols,
                                             const float *nw, bool add_one, bool vec, const att_splits &as = {}) {
    const float4 *src = (const float4 *)x;
    const float f = nw && add_one ? 1.0f : 0.0f;
    const uint32_t nb = xcols / 32;
    float *xd = xs + xcols / 2, *xsum = xd + nb;
    float ss = 0.0f;
    /* float4 k4 belongs to block k4 / 8: the 8 lanes of a block are aligned in their warp, and
       whole warps run each trip (xcols is a multiple of 32 floats), so the shuffles see them all */
    for (uint32_t w0 = threadIdx.x & ~31u; w0 * 4 < xcols; w0 += blockDim.x) {
        const uint32_t k4 = w0 + (threadIdx.x & 31);
        const bool on = k4 * 4 < xcols, in = k4 * 4 < cols;
        float4 xv = make_float4(0.0f, 0.0f, 0.0f, 0.0f), nv = make_float4(1.0f, 1.0f, 1.0f, 1.0f);
        if (in && (ATT || vec)) {  /* float4 rows (gemv_geom.x_vec), or an attention's splits */
            xv = ATT ? att_combined4(as, k4) : src[k4];
            if (nw)
                nv = __ldg((const float4 *)nw + k4);
        } else if (in) {
            float *xe = &xv.x, *ne = &nv.x;
#pragma unroll
            for (int j = 0; j < 4; j++)
                if (k4 * 4 + j < cols) {
                    xe[j] = x[k4 * 4 + j];
                    if (nw)
                        ne[j] = nw[k4 * 4 + j];
                }
        }
        ss += xv.x * xv.x + xv.y * xv.y + xv.z * xv.z + xv.w * xv.w;
        const float4 y = make_float4(xv.x * (f + nv.x), xv.y * (f + nv.y), xv.z * (f + nv.z), xv.w * (f + nv.w));
        float amax = amax4(y);
        float sum = y.x + y.y + y.z + y.w;
#pragma unroll
        for (int o = 1; o < 8; o <<= 1) {
            amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
            sum += __shfl_xor_sync(0xffffffffu, sum, o);
        }
        const float inv = amax > 0.0f ? 32767.0f / amax : 0.0f;
        const uint2 q = make_uint2(q16_pair(y.x, y.y, inv), q16_pair(y.z, y.w, inv));
        if (on) {
            /* 8 bytes: half of 16-byte chunk k4 / 2 */
            ((uint2 *)xs)[2 * swz<VQ>(k4 / 2) + (k4 & 1)] = q;
            if ((k4 & 7) == 0) {
                xd[k4 / 8] = amax / 32767.0f;
                xsum[k4 / 8] = sum;
            }
        }
    }
    return ss;
}

/* dot of a Q8 / Q4 16-byte weight vector v (scale / min sm) with x staged by stage_x_q16. */
template <int FMT>
__device__ __forceinline__ float vec_dot_q16(uint4 w, const uint4 *xq, float2 sm, float xd, float xsum) {
    const int wd[4] = {(int)w.x, (int)w.y, (int)w.z, (int)w.w};
    const int *xw = (const int *)xq;  /* int16 pairs */
    int acc = 0;
    if constexpr (FMT == LT_WF_Q8) {  /* byte k of word i: x 4i + k */
#pragma unroll
        for (int i = 0; i < 4; i++) {
            acc = __dp2a_lo(xw[2 * i], wd[i], acc);
            acc = __dp2a_hi(xw[2 * i + 1], wd[i], acc);
        }
        return (float)acc * (sm.x * xd);
    } else {
#pragma unroll
        for (int i = 0; i < 4; i++) {  /* low nibbles: x 4i + k, high nibbles: x 16 + 4i + k */
            const int l = wd[i] & 0x0F0F0F0F, h = (wd[i] >> 4) & 0x0F0F0F0F;
            acc = __dp2a_lo(xw[2 * i], l, acc);
            acc = __dp2a_hi(xw[2 * i + 1], l, acc);
            acc = __dp2a_lo(xw[8 + 2 * i], h, acc);
            acc = __dp2a_hi(xw[8 + 2 * i + 1], h, acc);
        }
        return (float)acc * (sm.x * xd) + sm.y * xsum;
    }
}

/* One token's x row staged for weight format FMT: int16 for Q8 / Q4 (float4 loads where vec),
 * else floats in the swz layout (needs vec: stage_x_one_ok). Returns this thread's part of the sum
 * of squares. */
template <int FMT>
__device__ __forceinline__ float stage_x_one(const float *x, float *xs, uint32_t cols, uint32_t xcols,
                                             const float *nw, bool add_one, bool vec) {
    if constexpr (wfmt<FMT>::X16)
        return stage_x_q16<FMT == LT_WF_Q4 ? 4 : 2>(x, xs, cols, xcols, nw, add_one, vec);
    else
        return stage_x_vec<wfmt<FMT>::VALS / 4>(x, xs, cols, xcols, nw, add_one);
}

/* Whether stage_x_one can stage x for FMT: always for Q8 / Q4, for float formats with float4 rows. */
template <int FMT>
__device__ __forceinline__ bool stage_x_one_ok(bool x_vec) {
    return wfmt<FMT>::X16 || x_vec;
}

/* acc[r * stride] += the dot of weight vector v of row r (w[r][u], scales wsc[r][u]) with one
 * staged x row, for the RPW rows: Q8 / Q4 against stage_x_q16's int16 x, other formats against
 * floats (swz layout when sw); x is read once for all rows. */
template <int FMT, int RPW, int U>
__device__ __forceinline__ void dot_rows(const float *xs, uint32_t xcols, uint32_t v, bool sw, const uint4 (&w)[RPW][U],
                                         const float2 (&wsc)[RPW][U], int u, float *acc, int stride) {
    if constexpr (wfmt<FMT>::X16) {
        constexpr int VQ = FMT == LT_WF_Q4 ? 4 : 2;
        uint4 xq[VQ];
#pragma unroll
        for (int c = 0; c < VQ; c++)
            xq[c] = ((const uint4 *)xs)[swz<VQ>(v * VQ + c)];
        const uint32_t blk = FMT == LT_WF_Q8 ? v / 2 : v;
        const float xd = xs[xcols / 2 + blk], xsum = xs[xcols / 2 + xcols / 32 + blk];
#pragma unroll
        for (int r = 0; r < RPW; r++)
            acc[r * stride] += vec_dot_q16<FMT>(w[r][u], xq, wsc[r][u], xd, xsum);
    } else {
        constexpr int CPV = wfmt<FMT>::VALS / 4;
        float xr[wfmt<FMT>::VALS];
#pragma unroll
        for (int c = 0; c < CPV; c++)
            *(float4 *)(xr + 4 * c) = ((const float4 *)xs)[sw ? swz<CPV>(v * CPV + c) : v * CPV + c];
#pragma unroll
        for (int r = 0; r < RPW; r++)
            acc[r * stride] += vec_dot<FMT>(w[r][u], xr, wsc[r][u]);
    }
}

/* A GDN layer's conv in the epilogue of the decode GEMV that makes its input X (backend.cu
 * fuse_gdn_conv; k_gemv's FUSE = GEMV_FUSE_CONV): the rows [conv_row0, conv_row0 + conv_c) are the
 * conv channels, and the thread that stores such a row applies the causal conv (conv_k <=
 * GEMV_CONV_MAX taps) and SiLU to it and shifts that channel's conv state, as k_gdn_conv would. */
#define GEMV_CONV_MAX 8
/* GEMV_FUSE_HEAD_NORM: x is a GDN layer's gated output before its RMSNorm (backend.cu
 * fuse_gdn_norm; k_gdn_decode with head_ss): the RMSNorm's factor is one scalar per head of
 * head_cols values, from the head's head_parts sums of squares, and it multiplies the dot of each
 * 16-byte weight vector with x (a vector's values lie in one head). Split-K x_lane GEMVs only, at
 * most GEMV_HEAD_PARTS_MAX parts per head. */
/* GEMV_FUSE_ATT_SPLITS: x is the output of a decode attention that leaves its split combine to this
 * GEMV while 2 to att_defer splits are in use (k_attention's g.defer, backend.cu
 * defer_attention_combine): the staging combines the partials (att_combined4); with more splits
 * the attention combined and x holds its output. Staged x only (one token, Q8 / Q4). */
enum { GEMV_FUSE_NONE = 0, GEMV_FUSE_CONV = 1, GEMV_FUSE_HEAD_NORM = 2, GEMV_FUSE_ATT_SPLITS = 3 };
struct gemv_fuse {
    const float *conv_w;     /* [conv_c][conv_k] */
    float *conv_state;       /* [conv_k - 1][conv_c], oldest first */
    uint32_t conv_row0, conv_c, conv_k;
    const float *head_ss;    /* [heads][head_parts] */
    uint32_t head_cols, head_parts;
    float head_eps;
    const float *att_part;   /* k_attention's workspace, token 0 */
    uint32_t att_dim, att_n_split, att_chunk, att_defer;
};

#define GEMV_HEAD_PARTS_MAX 8  /* the sums load together (unrolled) */

/* The RMSNorm factor of x's head holding value i (GEMV_FUSE_HEAD_NORM) */
__device__ __forceinline__ float head_norm_factor(const gemv_fuse &f, uint32_t i) {
    const float *p = f.head_ss + (size_t)(i / f.head_cols) * f.head_parts;
    float ss = 0.0f;
#pragma unroll
    for (uint32_t k = 0; k < GEMV_HEAD_PARTS_MAX; k++)
        if (k < f.head_parts)
            ss += p[k];
    return rsqrtf(ss / (float)f.head_cols + f.head_eps);
}

/* Split-K decode without staging (gemv_geom.x_lane): each lane reads the x values of its own weight
 * vectors straight from global memory, all in one round trip, and quantizes them in registers
 * exactly as stage_x_q16 does (no norm; Q8 outputs are bit-identical): a Q8 block's two vectors
 * sit in lanes 2i and 2i + 1 (one shuffle), a Q4 block is one vector. At most UX vectors per row
 * and lane (registers). No shared-memory x and no barrier before the dot products. Every lane
 * calls it (shuffles); lanes past nvec get zeros. */
template <int FMT, int RPW, int U, bool HN = false>
__device__ __forceinline__ void dot_rows_x_lane(const float *x, uint32_t cols, uint32_t nvec, uint32_t base,
                                                uint32_t ustride, const uint4 (&w)[RPW][U],
                                                const float2 (&wsc)[RPW][U], float *acc,
                                                const gemv_fuse &f = {}) {
    constexpr int VALS = wfmt<FMT>::VALS, C4 = VALS / 4, UX = FMT == LT_WF_Q4 ? 1 : 2;  /* registers */
    float4 xr[UX][C4];
    float hn[UX];  /* HN: the head's RMSNorm factor, requested with x */
#pragma unroll
    for (int u = 0; u < UX; u++) {
        const uint32_t v = base + u * ustride;
#pragma unroll
        for (int c = 0; c < C4; c++)
            xr[u][c] = v < nvec && v * VALS + 4 * c < cols ? ((const float4 *)x)[v * C4 + c]
                                                           : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
    if constexpr (HN) {  /* after every x load is issued, and kept: one round trip */
#pragma unroll
        for (int u = 0; u < UX; u++) {
            hn[u] = base + u * ustride < nvec ? head_norm_factor(f, (base + u * ustride) * VALS) : 0.0f;
            lt_keep(hn[u]);
        }
    }
#pragma unroll
    for (int u = 0; u < UX; u++) {
        float amax = 0.0f, sum = 0.0f;
#pragma unroll
        for (int c = 0; c < C4; c++) {
            amax = fmaxf(amax, amax4(xr[u][c]));
            sum += xr[u][c].x + xr[u][c].y + xr[u][c].z + xr[u][c].w;
        }
        if constexpr (FMT == LT_WF_Q8) {  /* the block's other half is in lane ^ 1 */
            amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
            sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        }
        const float inv = amax > 0.0f ? 32767.0f / amax : 0.0f;
        uint4 xq[VALS / 8];
        uint32_t *xw = (uint32_t *)xq;
#pragma unroll
        for (int c = 0; c < C4; c++) {
            xw[2 * c] = q16_pair(xr[u][c].x, xr[u][c].y, inv);
            xw[2 * c + 1] = q16_pair(xr[u][c].z, xr[u][c].w, inv);
        }
        if (base + u * ustride < nvec)
#pragma unroll
            for (int r = 0; r < RPW; r++) {
                const float d = vec_dot_q16<FMT>(w[r][u], xq, wsc[r][u], amax / 32767.0f, sum);
                acc[r] += HN ? d * hn[u] : d;
            }
    }
}

struct gemv_geom {
    uint32_t xcols;     /* floats per staged x row in shared memory (multiple of 32) */
    uint32_t row_bytes; /* bytes per WQ row */
    uint32_t nvec;      /* 16-byte vectors per row (vector path) */
    uint32_t nblk;      /* quant blocks per row */
    uint32_t vec_ok;    /* rows are 16-byte aligned whole vectors */
    uint32_t x_vec;     /* x rows and the norm weight load as float4, cols <= 4 * 4 * 256 */
    uint32_t x_lane;    /* split-K decode reads x per lane (dot_rows_x_lane): Q8 / Q4, x_vec, no norm,
                           at most two weight vectors per row and lane */
};

/* KS warps per row group, RPW rows per warp, NT tokens per block (grid.y = token tiles).
 * lm_head: x row T-1 only unless LT_GEMV_ALL_TOKENS. FUSE: f's conv epilogue (GEMV_FUSE_CONV) or
 * head RMSNorm factors (GEMV_FUSE_HEAD_NORM), each a separate instantiation, so that the GEMVs
 * without them keep their code. */
template <int FMT, int KS, int RPW, int NT, int FUSE = GEMV_FUSE_NONE>
__global__ void __launch_bounds__(256) k_gemv(lt_gemv_args a, lt_binds b, lt_step_args *st, uint32_t T,
                                              gemv_geom g, int lm_head, gemv_fuse f) {
    extern __shared__ float xs[];               /* [NT][g.xcols] */
    __shared__ float red[8][RPW][NT];
    __shared__ float rnorm[NT];
    __shared__ float redb[32];
    constexpr bool CONV = FUSE == GEMV_FUSE_CONV;
    __shared__ float conv_s[CONV ? 32 : 1][2 * GEMV_CONV_MAX];  /* taps | conv state per epilogue thread */
    constexpr int RPB = 8 / KS * RPW;            /* rows per block */
    constexpr int VALS = wfmt<FMT>::VALS;
    constexpr int U = RPW >= 2 ? 2 : 4;          /* 16-byte vectors in flight per row and lane */
    pdl_begin();
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int group = warp / KS, kpart = warp % KS;
    uint32_t row0 = blockIdx.x * RPB + group * RPW;
    const uint8_t *wq = (const uint8_t *)b.p[LT_GEMV_B_WQ];
    const __half *ws = (const __half *)b.p[LT_GEMV_B_WS], *wm = (const __half *)b.p[LT_GEMV_B_WM];
    auto rr_at = [&](int r) {
        const uint32_t row = min(row0 + r, a.rows - 1);  /* rows past the end compute a copy, unused */
        return wrow{wq + (size_t)row * g.row_bytes, ws ? ws + (size_t)row * g.nblk : nullptr,
                    wm ? wm + (size_t)row * g.nblk : nullptr};
    };
    /* weights do not depend on earlier kernels: the first vectors are requested before waiting
     * for them, so their latency overlaps the previous kernel and the x prologue */
    uint4 w[RPW][U];
    float2 wsc[RPW][U];  /* their scales: also requested before the wait */
    const uint32_t stride = 32 * KS * U;
    uint32_t base = kpart * 32 + lane;
    auto load = [&](uint32_t bs) {
#pragma unroll
        for (int u = 0; u < U; u++) {
            uint32_t v = bs + u * 32 * KS;
#pragma unroll
            for (int r = 0; r < RPW; r++)
                if (v < g.nvec) {
                    const wrow rr = rr_at(r);
                    w[r][u] = __ldg((const uint4 *)rr.q + v);
                    wsc[r][u] = vec_scale<FMT>(rr, v);
                }
        }
    };
    /* epilogue operands of this thread: bias (a weight) before the wait, the residual right after
     * it, so that neither load sits on the critical path after the dot products */
    const bool silu = a.flags & LT_GEMV_SILU_MUL;
    const int e_lr = threadIdx.x / NT, e_nt = threadIdx.x % NT;
    const uint32_t e_row = blockIdx.x * RPB + e_lr, e_t = blockIdx.y * NT + e_nt;
    bool e_on = threadIdx.x < RPB * NT && e_row < a.rows && !(silu && (e_lr & 1));
    const float *bias = (a.flags & LT_GEMV_BIAS) ? (const float *)b.p[LT_GEMV_B_BIAS] : nullptr;
    float e_b0 = 0.0f, e_b1 = 0.0f, e_res = 0.0f;
    if (e_on && bias) {
        e_b0 = bias[e_row];
        if (silu)
            e_b1 = bias[e_row + 1];
    }
    /* a GDN conv channel's taps (weights) before the wait, its conv state once x is staged:
       copied into shared memory, so that no registers wait through the dot products */
    const uint32_t ch = e_row - f.conv_row0;
    const bool conv = CONV && e_on && ch < f.conv_c;
    float *ctap = conv_s[threadIdx.x & 31], *cst = ctap + GEMV_CONV_MAX;  /* conv: warp 0 */
    if (conv) {
        for (uint32_t t = 0; t < f.conv_k; t++)
            cp_async4(ctap + t, f.conv_w + (size_t)ch * f.conv_k + t);
        cp_async_commit();
        /* the conv state (last written a step ago, so out of L2 by now) asked of L2 too; a
           prefetch returns no data, so it is safe before the wait (prefetch_l2) */
        for (uint32_t t = 0; t + 1 < f.conv_k; t++)
            prefetch_line(f.conv_state + (size_t)t * f.conv_c + ch);
    }
    if (g.vec_ok)
        load(base);
    const float *nw = (a.flags & LT_GEMV_NORM) ? (const float *)b.p[LT_GEMV_B_NORM] : nullptr;
    if (nw && blockIdx.y == 0)
        prefetch_l2(nw, (size_t)a.cols * 4, blockIdx.x, gridDim.x);
    constexpr bool ATT = FUSE == GEMV_FUSE_ATT_SPLITS;
    /* ATT: the step's position picks the splits to read; a hint now (as k_attention's), checked
       after the wait with the error flag */
    const uint32_t pos_hint = ATT ? *(volatile const uint32_t *)&st->pos : 0;
    pdl_wait();
    const float *x = (const float *)b.p[LT_GEMV_B_X];
    uint32_t t_first = 0, n_tok = T;
    if (lm_head && !(a.flags & LT_GEMV_ALL_TOKENS)) {
        t_first = T - 1;
        n_tok = 1;
    }
    uint32_t t0 = blockIdx.y * NT;
    if (t0 >= n_tok)
        return;
    const uint32_t err = st->error;  /* checked after the dot products */
    const uint32_t pos = ATT ? st->pos : 0;
    if constexpr (ATT)
        lt_keep(pos);
    const uint32_t e_o = silu ? e_row / 2 : e_row;
    e_on = e_on && e_t < n_tok;
    if (e_on && (a.flags & LT_GEMV_RESID))
        e_res = ((const float *)b.p[LT_GEMV_B_RESID])[(size_t)e_t * a.resid_stride + e_o];
    /* prologue: stage x * w' (w' = norm weight, or 1 + it); the RMS factor of each token
     * multiplies the dot products at the end */
    /* decode (NT = 1): one pass over x with no barrier (stage_x_one), unless a float format's rows
     * are not float4-aligned */
    const bool add_one = a.flags & LT_GEMV_NORM_ADD_ONE;
    const bool xlane = !ATT && NT == 1 && KS >= 4 && wfmt<FMT>::X16 && g.x_lane;  /* gemv_shape: KS >= 4 */
    const bool xvec = NT == 1 && stage_x_one_ok<FMT>(g.x_vec) && !xlane;
    if (xvec) {
        const float *xt = x + (size_t)t_first * a.x_stride;
        float ss;
        if constexpr (ATT && wfmt<FMT>::X16) {
            auto stage = [&](uint32_t p) {
                const att_splits as{f.att_part, f.att_dim, f.att_n_split, (p + f.att_chunk) / f.att_chunk};
                if (as.used == 1 || as.used > f.att_defer)  /* the attention wrote its output */
                    return stage_x_one<FMT>(xt, xs, a.cols, g.xcols, nw, add_one, g.x_vec);
                return stage_x_q16<FMT == LT_WF_Q4 ? 4 : 2, true>(xt, xs, a.cols, g.xcols, nw, add_one, true, as);
            };
            ss = stage(pos_hint);
            if (pos != pos_hint)  /* a stale hint: staged again, by the same threads at the same places */
                ss = stage(pos);
        } else {
            ss = stage_x_one<FMT>(xt, xs, a.cols, g.xcols, nw, add_one, g.x_vec);
        }
        ss = warp_sum(ss);  /* summed over the warps by warp 0 at the end: no barrier here */
        if (lane == 0)
            redb[warp] = ss;
    }
    for (int nt = 0; nt < NT && !xvec && !xlane; nt++) {
        float *xr = xs + nt * g.xcols;
        uint32_t t = t0 + nt;
        if (t >= n_tok) {
            for (uint32_t k = threadIdx.x; k < g.xcols; k += blockDim.x)
                xr[k] = 0.0f;
            continue;
        }
        float r = stage_x_row(x + (size_t)(t_first + t) * a.x_stride, xr, a.cols, g.xcols, nw, add_one, a.eps, redb);
        if (threadIdx.x == 0)
            rnorm[nt] = r;
    }
    if (conv) {  /* after x's loads: the epilogue waits for them */
        for (uint32_t t = 0; t + 1 < f.conv_k; t++)
            cp_async4(cst + t, f.conv_state + (size_t)t * f.conv_c + ch);
        cp_async_commit();
    }
    if (!xlane)
        __syncthreads();
    lt_trace_mark(1);

    float acc[RPW][NT];
#pragma unroll
    for (int r = 0; r < RPW; r++)
#pragma unroll
        for (int nt = 0; nt < NT; nt++)
            acc[r][nt] = 0.0f;
    if (xlane) {
        if constexpr (NT == 1 && KS >= 4 && wfmt<FMT>::X16)
            dot_rows_x_lane<FMT, RPW, U, FUSE == GEMV_FUSE_HEAD_NORM>(x + (size_t)t_first * a.x_stride, a.cols,
                                                                      g.nvec, base, 32 * KS, w, wsc, &acc[0][0], f);
    } else if (g.vec_ok) {
        while (base < g.nvec) {
#pragma unroll
            for (int u = 0; u < U; u++) {
                uint32_t v = base + u * 32 * KS;
                if (v < g.nvec) {
                    if constexpr (NT == 1) {
                        dot_rows<FMT, RPW, U>(xs, g.xcols, v, xvec, w, wsc, u, &acc[0][0], NT);
                    } else {
#pragma unroll
                        for (int r = 0; r < RPW; r++)
#pragma unroll
                            for (int nt = 0; nt < NT; nt++)
                                acc[r][nt] += vec_dot<FMT>(w[r][u], xs + nt * g.xcols + v * VALS, wsc[r][u]);
                    }
                }
            }
            base += stride;
            if (base < g.nvec)
                load(base);
        }
    } else if (FMT == LT_WF_F32 || FMT == LT_WF_F16) {
        for (uint32_t k = kpart * 32 + lane; k < a.cols; k += 32 * KS)
#pragma unroll
            for (int r = 0; r < RPW; r++) {
                float wv = scalar_weight<FMT>(rr_at(r), k);
#pragma unroll
                for (int nt = 0; nt < NT; nt++)
                    acc[r][nt] += wv * xs[nt * g.xcols + k];
            }
    }
    lt_trace_mark(2);
    if (err)  /* read with x, checked once its loads and the dots are done: no round trip of its own */
        return;
#pragma unroll
    for (int r = 0; r < RPW; r++)
#pragma unroll
        for (int nt = 0; nt < NT; nt++)
            acc[r][nt] = warp_sum(acc[r][nt]);
    if (lane == 0)
#pragma unroll
        for (int r = 0; r < RPW; r++)
#pragma unroll
            for (int nt = 0; nt < NT; nt++)
                red[warp][r][nt] = acc[r][nt];
    __syncthreads();
    lt_trace_mark(3);
    /* warp 0 (every epilogue thread is in it) sums the row partials of the KS warps of a row, scales
     * them by the RMS factor (decode: summed here from the warps' partial sums of squares, in
     * block_sum's order) and runs the epilogues: + bias, SiLU(gate) * up over interleaved rows,
     * + residual */
    static_assert(RPB * NT <= 32, "epilogue threads fit in warp 0");
    if (warp == 0) {
        float rn = 1.0f;
        if (nw && xvec)
            rn = rsqrtf(warp_sum(lane < 8 ? redb[lane] : 0.0f) / (float)a.cols + a.eps);
        else if (nw)
            rn = rnorm[e_nt];
        auto rowsum = [&](int lr) {
            int gr = lr / RPW, r = lr % RPW;
            float s = 0.0f;
            for (int k = 0; k < KS; k++)
                s += red[gr * KS + k][r][e_nt];
            return nw ? s * rn : s;
        };
        if (e_on) {
            float *y = (float *)b.p[LT_GEMV_B_Y]
                       + (size_t)(lm_head && !(a.flags & LT_GEMV_ALL_TOKENS) ? 0 : e_t) * a.y_stride;
            float out = silu ? lt_silu_d(rowsum(e_lr) + e_b0) * (rowsum(e_lr + 1) + e_b1) : rowsum(e_lr) + e_b0;
            if (conv) {  /* taps oldest first, as gdn_conv; this thread alone owns channel ch */
                cp_async_wait<0>();
                const uint32_t K = f.conv_k;
                float c = 0.0f;
                for (uint32_t t = 0; t + 1 < K; t++)
                    c += ctap[t] * cst[t];
                c += ctap[K - 1] * out;
                for (uint32_t t = 0; t + 1 < K; t++)
                    f.conv_state[(size_t)t * f.conv_c + ch] = t + 2 < K ? cst[t + 1] : out;
                out = lt_silu_d(c);
            }
            y[e_o] = (a.flags & LT_GEMV_RESID) ? e_res + out : out;
        }
    }
    lt_trace_end();
}

/* One token, many rows (LM heads, the largest decode GEMVs): a grid of resident blocks, each warp
 * streams whole rows, RPW at a time, and requests the next group's first weight vectors before it
 * reduces and stores this group's rows: the loads of consecutive rows overlap instead of waiting
 * for a new wave of blocks. x is staged once per block. RPW consecutive rows per warp: a
 * LT_GEMV_SILU_MUL gate/up pair (rows 2i, 2i + 1) stays in one warp. Needs g.vec_ok. (H200:
 * decode 1% faster than waves of blocks of 32 rows; for GEMVs of ~2 row groups per warp, 3% slower
 * than one wave of k_gemv blocks.) STATS (a last-token LM head whose SAMPLE reads them): each block
 * also writes part[blockIdx.x], the lt_argmax_partial of the logits it stored, instead of a
 * k_partials kernel after this one (one dependent phase less). A separate instantiation: the
 * others stay at their registers. */
template <int FMT, bool STATS = false>
__global__ void __launch_bounds__(256, 2) k_gemv_stream(lt_gemv_args a, lt_binds b, lt_step_args *st, uint32_t T,
                                                     gemv_geom g, int lm_head, lt_argmax_partial *part) {
    extern __shared__ float xs[];
    __shared__ float redb[32];
    /* rows per warp (even: SILU_MUL pairs), 16-byte vectors in flight per row and lane; Q8 / Q4 (int16
       x) spill at 6 */
    constexpr int RPW = FMT == LT_WF_Q4 || FMT == LT_WF_Q8 ? 4 : 6, U = 2;
    pdl_begin();
    const uint32_t lane = threadIdx.x & 31;
    const uint32_t stride = gridDim.x * 8 * RPW;  /* rows per pass of the whole grid */
    const uint8_t *wq = (const uint8_t *)b.p[LT_GEMV_B_WQ];
    const __half *ws = (const __half *)b.p[LT_GEMV_B_WS], *wm = (const __half *)b.p[LT_GEMV_B_WM];
    uint32_t r0 = (blockIdx.x * 8 + (threadIdx.x >> 5)) * RPW;
    wrow rr[RPW];
    auto rows_at = [&](uint32_t first) {
#pragma unroll
        for (int r = 0; r < RPW; r++) {
            uint32_t row = min(first + r, a.rows - 1);  /* rows past the end compute a copy, unused */
            rr[r].q = wq + (size_t)row * g.row_bytes;
            rr[r].s = ws ? ws + (size_t)row * g.nblk : nullptr;
            rr[r].m = wm ? wm + (size_t)row * g.nblk : nullptr;
        }
    };
    uint4 w[RPW][U];
    float2 wsc[RPW][U];
    auto load = [&](uint32_t bs) {
#pragma unroll
        for (int u = 0; u < U; u++)
#pragma unroll
            for (int r = 0; r < RPW; r++)
                if (bs + u * 32 < g.nvec) {
                    w[r][u] = __ldg((const uint4 *)rr[r].q + bs + u * 32);
                    wsc[r][u] = vec_scale<FMT>(rr[r], bs + u * 32);
                }
    };
    const bool silu = a.flags & LT_GEMV_SILU_MUL;
    const float *bias = (a.flags & LT_GEMV_BIAS) ? (const float *)b.p[LT_GEMV_B_BIAS] : nullptr;
    const float *nw = (a.flags & LT_GEMV_NORM) ? (const float *)b.p[LT_GEMV_B_NORM] : nullptr;
    if (nw)
        prefetch_l2(nw, (size_t)a.cols * 4, blockIdx.x, gridDim.x);
    if (r0 < a.rows) {
        rows_at(r0);
        load(lane);
    }
    pdl_wait();
    const bool last_only = lm_head && !(a.flags & LT_GEMV_ALL_TOKENS);
    const uint32_t t = last_only ? T - 1 : 0, yrow = last_only ? 0 : t;  /* one token: T = 1 or last_only */
    const float *x = (const float *)b.p[LT_GEMV_B_X] + (size_t)t * a.x_stride;
    const bool add_one = a.flags & LT_GEMV_NORM_ADD_ONE;
    const uint32_t err = st->error;
    float scale;
    if (stage_x_one_ok<FMT>(g.x_vec)) {
        const float ss = block_sum(stage_x_one<FMT>(x, xs, a.cols, g.xcols, nw, add_one, g.x_vec), redb);
        scale = nw ? rsqrtf(ss / (float)a.cols + a.eps) : 1.0f;
    } else {
        scale = stage_x_row(x, xs, a.cols, g.xcols, nw, add_one, a.eps, redb);
    }
    __syncthreads();
    if (err)  /* STATS: no partial; the SAMPLE sees the same error and returns before it merges them */
        return;
    float *y = (float *)b.p[LT_GEMV_B_Y];
    const float *resid = (a.flags & LT_GEMV_RESID) ? (const float *)b.p[LT_GEMV_B_RESID] : nullptr;
    /* STATS: each storing lane's logit_stats as a partial in shared memory (in registers, live
       across the row loop, they made Q4 spill 160 bytes instead of 28) */
    __shared__ lt_argmax_partial lsp[STATS ? 8 * RPW : 1];
    const uint32_t me = (threadIdx.x >> 5) * RPW + lane;  /* lanes < RPW: this lane's slot */
    if (STATS && lane < RPW)
        lsp[me] = logit_stats{}.partial();
    for (; r0 < a.rows; r0 += stride) {
        float acc[RPW];
#pragma unroll
        for (int r = 0; r < RPW; r++)
            acc[r] = 0.0f;
        for (uint32_t base = lane; base < g.nvec; base += 32 * U) {
#pragma unroll
            for (int u = 0; u < U; u++)
                if (base + u * 32 < g.nvec)
                    dot_rows<FMT, RPW, U>(xs, g.xcols, base + u * 32, g.x_vec, w, wsc, u, acc, 1);
            if (base + 32 * U < g.nvec) {
                load(base + 32 * U);
            } else if (r0 + stride < a.rows) {  /* the next group's first vectors, before the sums */
                rows_at(r0 + stride);
                load(lane);
            }
        }
#pragma unroll
        for (int r = 0; r < RPW; r++)
            acc[r] = warp_sum(acc[r]) * scale;
        /* lane r stores row r0 + r (SILU_MUL: lane 2i stores output (r0 + 2i) / 2) */
        float v = 0.0f;
        uint32_t id = 0xffffffffu;  /* STATS: the logit this lane stored, and its id */
#pragma unroll
        for (int r = 0; r < RPW; r++) {
            uint32_t row = r0 + r;
            if (lane != (uint32_t)r || row >= a.rows || (silu && (r & 1)))
                continue;
            float out = acc[r] + (bias ? bias[row] : 0.0f);
            uint32_t o = row;
            if (silu) {
                out = lt_silu_d(out) * (acc[r + 1 < RPW ? r + 1 : r] + (bias ? bias[row + 1] : 0.0f));
                o = row / 2;
            }
            out = resid ? resid[(size_t)t * a.resid_stride + o] + out : out;
            y[(size_t)yrow * a.y_stride + o] = out;
            v = out, id = o;
        }
        if (STATS && id != 0xffffffffu) {  /* as k_partials: NaN / Inf counted, left out of the max and sum */
            logit_stats ls = logit_stats::of(lsp[me]);
            if (isfinite(v))
                ls.merge(v, id, 1.0f, 0);
            else
                ls.bad++;
            lsp[me] = ls.partial();
        }
    }
    if constexpr (STATS) {  /* every block writes its partial: the SAMPLE merges all gridDim.x */
        __shared__ float4 red4[32];
        const logit_stats ls = block_stats(lane < RPW ? logit_stats::of(lsp[me]) : logit_stats{}, red4, redb);
        if (threadIdx.x == 0)
            part[blockIdx.x] = ls.partial();
    }
}

/* LM head partials: per LT_ARGMAX_BLOCK logits, max / argmax (lowest id on ties) / sum of
 * exp(l - max) over finite logits / count of NaN and Inf. One block of LT_ARGMAX_BLOCK threads
 * per partial. For heads whose k_gemv_stream writes its own partials (STATS) it does not run. */
__global__ void __launch_bounds__(LT_ARGMAX_BLOCK) k_partials(const float *logits, uint32_t rows,
                                                              lt_argmax_partial *p, lt_step_args *st) {
    __shared__ float redv[32];
    __shared__ uint32_t redi[32];
    pdl_begin();
    pdl_wait();
    if (st->error)
        return;
    uint32_t i = blockIdx.x * LT_ARGMAX_BLOCK + threadIdx.x;
    float v = i < rows ? logits[i] : -INFINITY;
    bool fin = i < rows && isfinite(v);
    uint32_t bad = block_count(i < rows && !fin, redi);
    float m = fin ? v : -INFINITY;
    uint32_t arg = fin ? i : 0xffffffffu;
    block_argmax(m, arg, redv, redi);
    float se = (fin && m > -INFINITY) ? expf(v - m) : 0.0f;
    se = block_sum(se, redv);
    if (threadIdx.x == 0) {
        lt_argmax_partial *q = &p[blockIdx.x];
        q->max = m;
        q->argmax = m > -INFINITY ? arg : blockIdx.x * LT_ARGMAX_BLOCK;
        q->sumexp = se;
        q->n_nonfinite = bad;
    }
}

/* ============================================================================ ROPE_KV */
/* cos and sin of position p times inv_freq[i]: the angle in double (like the reference), reduced
 * to [-pi, pi] in double, then float sincosf of the remainder (its fast path: within ~1 ulp of the
 * double cos and sin rounded to float), a fraction of double sin and cos's instructions. The
 * decode attention runs it before its dependency wait, which blocks that start late do not have
 * time for (H100, Qwen3.5: the attention 6.84 against 7.0 us traced). */
__device__ __forceinline__ float2 rope_cos_sin(uint32_t p, float inv_freq) {
    const double ang = (double)p * (double)inv_freq;
    const double r = fma(-6.283185307179586, rint(ang * 0.15915494309189535), ang);
    float s, c;
    sincosf((float)r, &s, &c);
    return make_float2(c, s);
}

/* Head h (q heads first, then kv heads) of token t at position p: optional RMSNorm (norm weight
 * nw_s), then NeoX RoPE (frequencies inv_freq_s), into rot[D] (shared memory; tmp[D] is scratch).
 * Each thread reads only the nw_s / inv_freq_s elements it staged itself (k_rope_kv). Every thread
 * of the block calls it; synchronizes before returning. */
__device__ void rope_head(const lt_rope_kv_args &a, const lt_binds &b, uint32_t h, uint32_t t, uint32_t p,
                          float *tmp, float *rot, float *red, const float *nw_s, const float *inv_freq_s) {
    uint32_t D = a.head_dim, half = a.rotary_dim / 2;
    bool split = a.flags & LT_ROPE_SPLIT_GATE, add_one = a.flags & LT_ROPE_NORM_ADD_ONE;
    const float *src = h < a.n_heads
        ? (const float *)b.p[LT_ROPE_B_Q] + (size_t)t * a.q_stride + (size_t)h * (split ? 2 * D : D)
        : (const float *)b.p[LT_ROPE_B_K] + (size_t)t * a.k_stride + (size_t)(h - a.n_heads) * D;
    float ss = 0.0f;
    for (uint32_t i = threadIdx.x; i < D; i += blockDim.x) {
        tmp[i] = src[i];
        ss += tmp[i] * tmp[i];
    }
    if (a.flags & LT_ROPE_QK_NORM) {
        ss = block_sum(ss, red);
        float r = rsqrtf(ss / (float)D + a.eps);
        for (uint32_t i = threadIdx.x; i < D; i += blockDim.x)
            tmp[i] = tmp[i] * r * (add_one ? 1.0f + nw_s[i] : nw_s[i]);
    }
    __syncthreads();
    for (uint32_t i = threadIdx.x; i < D; i += blockDim.x) {
        if (i < half) {
            float2 c = rope_cos_sin(p, inv_freq_s[i]);
            float x1 = tmp[i], x2 = tmp[i + half];
            rot[i] = x1 * c.x - x2 * c.y;
            rot[i + half] = x2 * c.x + x1 * c.y;
        } else if (i >= 2 * half) {
            rot[i] = tmp[i];
        }
    }
    __syncthreads();
}

/* grid (n_heads + n_kv_heads, T), 128 threads: one head of one token per block. One memory round
 * trip after the wait: the norm weight and the rope frequencies are staged before it (weights),
 * and the head's input row, its gate / v row and the step's error flag and position are requested
 * together after it; the flag and the context bound are checked before the first store. (Checked
 * first, each dependent load was a round trip of its own: a 4.2 us phase for Qwen3.5's rope,
 * tests/gpu/trace_step.py.) */
__global__ void __launch_bounds__(128) k_rope_kv(lt_rope_kv_args a, lt_binds b, lt_step_args *st, uint32_t T) {
    __shared__ float tmp[512], rot[512], nw_s[512], inv_freq_s[256];
    __shared__ float red[32];
    pdl_begin();
    uint32_t h = blockIdx.x, t = blockIdx.y, D = a.head_dim;
    const bool split = a.flags & LT_ROPE_SPLIT_GATE, is_q = h < a.n_heads;
    if (a.flags & LT_ROPE_QK_NORM) {  /* each thread stages the elements it uses (rope_head's loops) */
        const float *nw = (const float *)b.p[is_q ? LT_ROPE_B_Q_NORM : LT_ROPE_B_K_NORM];
        for (uint32_t i = threadIdx.x; i < D; i += blockDim.x)
            nw_s[i] = __ldg(nw + i);
    }
    const float *inv_freq = (const float *)b.p[LT_ROPE_B_INV_FREQ];
    for (uint32_t i = threadIdx.x; i < a.rotary_dim / 2; i += blockDim.x)
        inv_freq_s[i] = __ldg(inv_freq + i);
    pdl_wait();
    const uint32_t err = st->error, pos = st->pos;
    /* the row copied as it is (q's gate half, or v), up to 4 elements per thread (D <= 512) */
    const float *copy_src = is_q ? (split ? (const float *)b.p[LT_ROPE_B_Q] + (size_t)t * a.q_stride
                                                + (size_t)h * 2 * D + D : nullptr)
                                 : (const float *)b.p[LT_ROPE_B_V] + (size_t)t * a.v_stride + (size_t)(h - a.n_heads) * D;
    float copy[4];
#pragma unroll
    for (int j = 0; j < 4; j++) {
        const uint32_t i = threadIdx.x + j * blockDim.x;
        copy[j] = copy_src && i < D ? copy_src[i] : 0.0f;
    }
    /* q_out may alias q: rope_head reads everything before anything is written */
    rope_head(a, b, h, t, pos + t, tmp, rot, red, nw_s, inv_freq_s);
    if (err)
        return;
    if (pos + T > a.ctx_cap) {
        lt_raise(st, LT_ERR_CONTEXT);
        return;
    }
    const uint32_t p = pos + t;
    if (is_q) {
        float *qo = (float *)b.p[LT_ROPE_B_Q_OUT] + (size_t)t * a.q_out_stride + (size_t)h * D;
        for (uint32_t i = threadIdx.x; i < D; i += blockDim.x)
            qo[i] = rot[i];
        if (split) {
            float *go = (float *)b.p[LT_ROPE_B_GATE_OUT] + (size_t)t * a.gate_stride + (size_t)h * D;
#pragma unroll
            for (int j = 0; j < 4; j++)
                if (threadIdx.x + j * blockDim.x < D)
                    go[threadIdx.x + j * blockDim.x] = copy[j];
        }
    } else {
        uint32_t kh = h - a.n_heads;
        size_t slot = ((size_t)kh * a.ctx_cap + p) * D;
        __half *kc = (__half *)b.p[LT_ROPE_B_K_CACHE] + slot, *vc = (__half *)b.p[LT_ROPE_B_V_CACHE] + slot;
        for (uint32_t i = threadIdx.x; i < D; i += blockDim.x)
            kc[i] = __float2half_rn(rot[i]);
#pragma unroll
        for (int j = 0; j < 4; j++)
            if (threadIdx.x + j * blockDim.x < D)
                vc[threadIdx.x + j * blockDim.x] = __float2half_rn(copy[j]);
    }
}

/* ============================================================================ ATTENTION */
/* Split-K attention. grid (n_heads, n_split, T), NT = att_threads(PIPE) threads: 256 at decode,
 * 128 at prefill. Block (h, s, t) covers cache positions [s * chunk, min((s + 1) * chunk, len))
 * of query t (len = pos + t + 1). G lanes share one cache row (16-byte f16 loads, G = nvec
 * rounded up to a power of two, at most 32; U vectors per lane, U = 2 for head_dim > 256), so a
 * block has NG = NT / G lane groups. Each group runs its own online softmax over rows
 * s * chunk + gi, + NG, ..., ATT_ROWS of them per batch: a batch's K and V rows are requested
 * together, and the next batch's before this one is used, so a block's dependent chain is about
 * one memory round trip, with no barrier inside the loop. (The cache is cold at decode: the
 * weights streamed through L2 since the previous step. Before, every 4 rows of a 256-wide head
 * cost a round trip, and Qwen3.5's attention took 23 us per layer inside the decode graph.) The
 * first batch is requested before the rope prologue (with a q/k norm, after its reduction). The
 * groups' (max, sum, acc) combine in shared memory; with one split the block writes the output,
 * otherwise it writes (max, sum, acc[D]) and the last split of its (t, h) to finish (an atomic
 * counter, reset by that block) combines them: no second kernel. A decode step with 2 to g.defer
 * splits in use leaves the combine to the GEMV that reads the output (backend.cu defer_attention_combine,
 * GEMV_FUSE_ATT_SPLITS): every split writes its (max, sum, acc * gate) and the kernel ends there,
 * without the fence, the atomic and the last split's second round trip (4.2 of Qwen3.5's 9.9 us). */
/* Threads per block, per instantiation: 256 at decode (PIPE: twice the lane groups, so a split
 * of one batch's rows, e.g. Qwen3.5's 64, is read in one round trip instead of two; H100 decode
 * +1.3-3.0%), 128 at prefill (its many blocks want fewer threads each: 256 cost SmolLM2's prefill
 * 8-9%). The loops over i = threadIdx.x + j * NT, j < 4, cover head_dim <= 4 * NT: 512 at
 * prefill. Used by __launch_bounds__, the shared arrays, the launch (backend.cu) and the decode
 * split size. */
__host__ __device__ constexpr int att_threads(bool pipe) {
    return pipe ? 256 : 128;
}
/* rows per group and batch: 8 uint4 of K and 8 of V per lane at decode. Prefill (no PIPE) runs
 * many blocks at once and reads rows just written (L2): 2 rows, 48 instead of 133 registers (H100,
 * pp512: SmolLM2 42,308 tok/s with 8 rows, 46,428 with 4, 46,980 with 2) */
#define ATT_ROWS(U, PIPE) ((PIPE ? 8 : 2) / (U))
/* U, the 16-byte vectors of a cache row per lane: two past head_dim 256 (32 lanes x 8 halves) */
static inline int att_vecs_per_lane(uint32_t head_dim) {
    return head_dim > 256 ? 2 : 1;
}

/* defer: the most splits in use whose combine is left to the GEMV after it (0: none) */
struct att_geom {
    uint32_t n_split, chunk, G, defer;
};

/* ROPE (decode, T = 1): the ROPE_KV dispatch before this one is fused in (backend.cu checks that
 * it feeds this one): every block ropes its own q head; the blocks whose split holds the new
 * position rope its k (and take its v) into shared memory, in f16 as the cache stores them, and
 * read that row from there; the first q head of each kv head writes it to the caches. Blocks of
 * other splits read only older positions. The q, k and v rows are requested with the error flag
 * and the position, the q / k norm weights and cos / sin are staged before the wait, and q and k
 * share one block reduction: the prologue is one memory round trip. (Roping q, then k, each with
 * its own loads and reductions, made Qwen3.5's fused attention slower than k_rope_kv plus the
 * attention: 11.4 against 2.6 + 6.9 us.) gate_from_q: the output gate is the second half of the
 * q head (LT_ROPE_SPLIT_GATE), read where ROPE_KV would have copied it from. The output gate's
 * values are requested after the wait too, and wait in registers. */
template <bool ROPE, int U, bool PIPE>
__global__ void __launch_bounds__(att_threads(PIPE)) k_attention(lt_attention_args a, lt_binds b, lt_step_args *st,
                                                           uint32_t T, att_geom g, float *part,
                                                           unsigned *counters, lt_rope_kv_args ra, lt_binds rb,
                                                           uint32_t gate_from_q) {
    constexpr int B = ATT_ROWS(U, PIPE), NT = att_threads(PIPE);
    __shared__ __align__(16) float qs[512];
    /* [NG][D]: NG * D = NT / G * 8 * nvec <= NT * 8 * U (nvec <= G * U) <= 16 * NT: 2048 at
       prefill (as before), 4096 at decode; ROPE stages its q and k rows in the first 1024 */
    __shared__ float sbuf[16 * NT];
    __shared__ float gm[NT], gl[NT];
    __shared__ __align__(16) __half knew[ROPE ? 512 : 8], vnew[ROPE ? 512 : 8];
    __shared__ float2 rope_cs[ROPE ? 256 : 1];  /* rope_cos_sin of the step's position */
    __shared__ float2 red2[32];
    pdl_begin();
    uint32_t h = blockIdx.x, s = blockIdx.y, t = blockIdx.z, D = a.head_dim;
    const uint32_t pos_hint = *(volatile const uint32_t *)&st->pos;  /* the step's, unless stale */
    const float *inv_freq = ROPE ? (const float *)rb.p[LT_ROPE_B_INV_FREQ] : nullptr;
    auto fill_rope_cs = [&](uint32_t p) {
        for (uint32_t i = threadIdx.x; i < ra.rotary_dim / 2; i += NT)
            rope_cs[i] = rope_cos_sin(p, __ldg(inv_freq + i));
    };
    if (ROPE)  /* the double-precision cos and sin off the dependent chain; checked after the wait */
        fill_rope_cs(pos_hint);
    uint32_t group = a.n_heads / a.n_kv_heads, kvh = h / group, nvec = D / 8, G = g.G, NG = NT / G;
    const __half *kc = (const __half *)b.p[LT_ATTN_B_K_CACHE] + (size_t)kvh * a.ctx_cap * D;
    const __half *vc = (const __half *)b.p[LT_ATTN_B_V_CACHE] + (size_t)kvh * a.ctx_cap * D;
    const bool qk_norm = ROPE && (ra.flags & LT_ROPE_QK_NORM);
    if (PIPE) {  /* decode: this split's cache rows up to the step's position (read early as a hint:
                    a prefetch of rows that turn out unused costs bandwidth only), the norm weights */
        uint32_t hint = pos_hint + T, j0 = s * g.chunk;
        if (j0 < hint && h % group == 0) {
            size_t n = (size_t)(min(j0 + g.chunk, min(hint, a.ctx_cap)) - j0) * D * 2;
            prefetch_l2(kc + (size_t)j0 * D, n);
            prefetch_l2(vc + (size_t)j0 * D, n);
        }
        if (qk_norm) {
            prefetch_l2(rb.p[LT_ROPE_B_Q_NORM], D * 4);
            prefetch_l2(rb.p[LT_ROPE_B_K_NORM], D * 4);
        }
    }
    auto gate_row = [&]() -> const float * {
        return !(a.flags & LT_ATTN_OUT_GATE) ? nullptr
               : ROPE && gate_from_q ? (const float *)rb.p[LT_ROPE_B_Q] + (size_t)h * 2 * D + D
               : (const float *)b.p[LT_ATTN_B_GATE] + (size_t)t * a.gate_stride + (size_t)h * D;
    };
    pdl_wait();
    /* this thread's values i = threadIdx.x + j * NT of the output gate (decode; prefill's
       many blocks want the registers) and (ROPE) of the q, k and v rows and norm weights, requested
       with the error flag and the position (staging the weights before the wait put a round trip
       ahead of it) */
    float gv[4] = {}, qv[4] = {}, kv[4] = {}, vv[4] = {}, qnw[4] = {}, knw[4] = {};
    const float *qsrc = nullptr, *ksrc = nullptr, *vsrc = nullptr;
    if (ROPE) {
        qsrc = (const float *)rb.p[LT_ROPE_B_Q] + (size_t)h * ((ra.flags & LT_ROPE_SPLIT_GATE) ? 2 * D : D);
        ksrc = (const float *)rb.p[LT_ROPE_B_K] + (size_t)kvh * D;
        vsrc = (const float *)rb.p[LT_ROPE_B_V] + (size_t)kvh * D;
    }
#pragma unroll
    for (int j = 0; j < 4; j++) {
        const uint32_t i = threadIdx.x + j * NT;
        if (i < D) {
            if (PIPE && gate_row())
                gv[j] = gate_row()[i];
            if (ROPE) {
                qv[j] = qsrc[i];
                kv[j] = ksrc[i];
                vv[j] = vsrc[i];
            }
            if (qk_norm) {
                qnw[j] = ((const float *)rb.p[LT_ROPE_B_Q_NORM])[i];
                knw[j] = ((const float *)rb.p[LT_ROPE_B_K_NORM])[i];
            }
        }
        if (PIPE)
            lt_keep(gv[j]);
        if (ROPE)
            lt_keep(qv[j]), lt_keep(kv[j]), lt_keep(vv[j]), lt_keep(qnw[j]), lt_keep(knw[j]);
    }
    const uint32_t err = st->error, pos = st->pos;
    lt_keep(pos);  /* requested with the error flag, not after its branch */
    if (err)
        return;
    lt_trace_mark(1);
    if (pos + T > a.ctx_cap) {
        lt_raise(st, LT_ERR_CONTEXT);
        return;
    }
    uint32_t len = pos + t + 1, j_begin = s * g.chunk, j_end = min(j_begin + g.chunk, len);
    if (j_begin >= len)
        return;
    uint32_t gi = threadIdx.x / G, li = threadIdx.x % G;
    const uint32_t jnew = ROPE && j_end == len ? pos : 0xffffffffu;  /* the row read from knew / vnew */
    /* K and V vectors of this lane for the group's B rows from j0 (row j0 + k * NG + gi); rows past
     * j_end and the new row (shared memory, after the prologue) are not loaded */
    uint4 kw[B][U], vw[B][U];
    auto load = [&](uint4 (&kd)[B][U], uint4 (&vd)[B][U], uint32_t j0) {
#pragma unroll
        for (int k = 0; k < B; k++) {
            uint32_t j = j0 + k * NG + gi;
#pragma unroll
            for (int u = 0; u < U; u++) {
                uint32_t v = li + u * G;
                if (j < j_end && j != jnew && v < nvec) {
                    kd[k][u] = *((const uint4 *)(kc + (size_t)j * D) + v);
                    vd[k][u] = *((const uint4 *)(vc + (size_t)j * D) + v);
                }
            }
        }
    };
    auto copy_batch = [&](const uint4 (&ks)[B][U], const uint4 (&vs)[B][U], uint4 (&kd)[B][U], uint4 (&vd)[B][U]) {
#pragma unroll
        for (int k = 0; k < B; k++)
#pragma unroll
            for (int u = 0; u < U; u++)
                kd[k][u] = ks[k][u], vd[k][u] = vs[k][u];
    };
    /* the first batch's cache rows (L2: prefetched before the wait). With a q/k norm they are
       requested after its block reduction (H100, Qwen3.5 decode: the attention's phase 7.0 us
       traced, against 7.5 with the rows requested first) */
    if (!qk_norm)
        load(kw, vw, j_begin);
    if (ROPE) {  /* optional RMSNorm of q and k (one reduction), then NeoX RoPE over rotary_dim */
        float *tq = sbuf, *tk = sbuf + 512;
        if (pos != pos_hint)  /* the hint was stale: the barriers below publish these before use */
            fill_rope_cs(pos);
        float rq = 1.0f, rk = 1.0f;
        const float one = (ra.flags & LT_ROPE_NORM_ADD_ONE) ? 1.0f : 0.0f;
        if (qk_norm) {
            float2 ss = make_float2(0.0f, 0.0f);
#pragma unroll
            for (int j = 0; j < 4; j++) {
                ss.x += qv[j] * qv[j];
                ss.y += kv[j] * kv[j];
            }
            ss = block_sum2(ss, red2);
            load(kw, vw, j_begin);
            lt_trace_mark(4);
            rq = rsqrtf(ss.x / (float)D + ra.eps);
            rk = rsqrtf(ss.y / (float)D + ra.eps);
        }
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const uint32_t i = threadIdx.x + j * NT;
            if (i < D) {
                tq[i] = qv[j] * rq * (qk_norm ? one + qnw[j] : 1.0f);
                tk[i] = kv[j] * rk * (qk_norm ? one + knw[j] : 1.0f);
            }
        }
        __syncthreads();
        lt_trace_mark(5);
        const uint32_t half = ra.rotary_dim / 2;
        auto roped = [&](const float *x, uint32_t i) {
            return i < half ? x[i] * rope_cs[i].x - x[i + half] * rope_cs[i].y
                 : i < 2 * half ? x[i] * rope_cs[i - half].x + x[i - half] * rope_cs[i - half].y
                                : x[i];
        };
        const size_t slot = ((size_t)kvh * a.ctx_cap + pos) * D;
        const bool writer = h % group == 0;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const uint32_t i = threadIdx.x + j * NT;
            if (i < D) {
                qs[i] = roped(tq, i);
                if (jnew != 0xffffffffu) {
                    knew[i] = __float2half_rn(roped(tk, i));
                    vnew[i] = __float2half_rn(vv[j]);
                    if (writer) {
                        ((__half *)b.p[LT_ATTN_B_K_CACHE])[slot + i] = knew[i];
                        ((__half *)b.p[LT_ATTN_B_V_CACHE])[slot + i] = vnew[i];
                    }
                }
            }
        }
    } else {
        const float *q = (const float *)b.p[LT_ATTN_B_Q] + (size_t)t * a.q_stride + (size_t)h * D;
        for (uint32_t i = threadIdx.x; i < D; i += NT)
            qs[i] = q[i];
    }
    __syncthreads();
    lt_trace_mark(2);
    float qr[U][8];  /* this lane's q values, pre-scaled */
#pragma unroll
    for (int u = 0; u < U; u++)
#pragma unroll
        for (int e = 0; e < 8; e++)
            qr[u][e] = li + u * G < nvec ? qs[(li + u * G) * 8 + e] * a.scale : 0.0f;
    float acc[U][8];
#pragma unroll
    for (int u = 0; u < U; u++)
#pragma unroll
        for (int e = 0; e < 8; e++)
            acc[u][e] = 0.0f;
    float m = -INFINITY, l = 0.0f;
    /* every thread runs every batch (the group shuffles need whole warps); rows past j_end score -inf */
    for (uint32_t j0 = j_begin; j0 < j_end; j0 += NG * B) {
        uint4 kn[B][U], vn[B][U];  /* PIPE: the next batch, requested before this one is used */
        if (PIPE && j0 + NG * B < j_end)
            load(kn, vn, j0 + NG * B);
        else if (!PIPE && j0 != j_begin)
            load(kw, vw, j0);
        float sco[B], mx = m;
#pragma unroll
        for (int k = 0; k < B; k++) {
            uint32_t j = j0 + k * NG + gi;
            float d = 0.0f;
#pragma unroll
            for (int u = 0; u < U; u++) {
                uint32_t v = li + u * G;
                if (j < j_end && v < nvec) {
                    float f[8];
                    f16x8(j == jnew ? *((const uint4 *)knew + v) : kw[k][u], f);
#pragma unroll
                    for (int e = 0; e < 8; e++)
                        d += f[e] * qr[u][e];
                }
            }
            for (uint32_t o = G / 2; o > 0; o >>= 1)
                d += __shfl_xor_sync(0xffffffffu, d, o);
            sco[k] = j < j_end ? d : -INFINITY;
            mx = fmaxf(mx, sco[k]);
        }
        if (mx == -INFINITY) {  /* no row of this group in the batch (uniform over the group) */
            if (PIPE)
                copy_batch(kn, vn, kw, vw);
            continue;
        }
        float corr = __expf(m - mx);
        l *= corr;
#pragma unroll
        for (int u = 0; u < U; u++)
#pragma unroll
            for (int e = 0; e < 8; e++)
                acc[u][e] *= corr;
#pragma unroll
        for (int k = 0; k < B; k++) {
            uint32_t j = j0 + k * NG + gi;
            float p = __expf(sco[k] - mx);  /* 0 past j_end */
            l += p;
#pragma unroll
            for (int u = 0; u < U; u++) {
                uint32_t v = li + u * G;
                if (j < j_end && v < nvec) {
                    float f[8];
                    f16x8(j == jnew ? *((const uint4 *)vnew + v) : vw[k][u], f);
#pragma unroll
                    for (int e = 0; e < 8; e++)
                        acc[u][e] += p * f[e];
                }
            }
        }
        m = mx;
        if (PIPE)
            copy_batch(kn, vn, kw, vw);
    }
    lt_trace_mark(3);
    /* combine the NG groups (in group order: deterministic) into the block's (M, L, o) */
    float *buf = sbuf;  /* [NG][D] */
#pragma unroll
    for (int u = 0; u < U; u++) {
        uint32_t v = li + u * G;
        if (v < nvec)
#pragma unroll
            for (int e = 0; e < 8; e++)
                buf[gi * D + v * 8 + e] = acc[u][e];
    }
    if (li == 0) {
        gm[gi] = m;
        gl[gi] = l;
    }
    __syncthreads();
    float M = -INFINITY, L = 0.0f;
    for (uint32_t k = 0; k < NG; k++)
        M = fmaxf(M, gm[k]);  /* finite: group 0 has row j_begin */
    for (uint32_t k = 0; k < NG; k++)
        L += gl[k] * __expf(gm[k] - M);
    const float *gate = gate_row();
    auto block_out = [&](uint32_t i) {
        float o = 0.0f;
        for (uint32_t k = 0; k < NG; k++)
            o += buf[k * D + i] * __expf(gm[k] - M);  /* 0 for a group without rows */
        return o;
    };
    uint32_t used = (len + g.chunk - 1) / g.chunk;
    float *out = (float *)b.p[LT_ATTN_B_OUT] + (size_t)t * a.out_stride + (size_t)h * D;
    /* decode with 2 to g.defer splits in use: the GEMV reading out combines them */
    const bool deferred = PIPE && used > 1 && used <= g.defer;
    if (used == 1) {  /* this block is the only split in use: no combine */
        if constexpr (PIPE) {  /* the gate's values wait in registers (decode) */
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const uint32_t i = threadIdx.x + j * NT;
                if (i < D) {
                    const float o = block_out(i) / L;
                    out[i] = gate ? o * lt_sigmoid_d(gv[j]) : o;
                }
            }
        } else {
            for (uint32_t i = threadIdx.x; i < D; i += NT) {
                const float o = block_out(i) / L;
                out[i] = gate ? o * lt_sigmoid_d(gate[i]) : o;
            }
        }
        lt_trace_end();
        return;
    }
    /* split-K: write (max, sum, acc) of this split; the last split of (t, h) to finish combines
       them, or the GEMV after this kernel (deferred: acc * gate, linear in acc) */
    float *mine = part + (((size_t)t * a.n_heads + h) * g.n_split + s) * att_part_floats(D);
    for (uint32_t i = threadIdx.x, j = 0; i < D; i += NT, j++) {  /* a rolled loop: small code */
        float o = block_out(i);
        if (deferred && gate)  /* the gate's values wait in registers (decode) */
            o *= lt_sigmoid_d(j == 0 ? gv[0] : j == 1 ? gv[1] : j == 2 ? gv[2] : gv[3]);
        mine[ATT_PART_HEAD + i] = o;
    }
    if (threadIdx.x == 0) {
        mine[0] = M;
        mine[1] = L;
    }
    if (deferred) {
        lt_trace_end();
        return;
    }
    __threadfence();
    __syncthreads();
    __shared__ bool last;
    if (threadIdx.x == 0) {
        unsigned *c = counters + (size_t)t * a.n_heads + h;
        last = atomicAdd(c, 1u) == used - 1;
        if (last)
            *c = 0;  /* ready for the next step */
    }
    __syncthreads();
    if (!last)
        return;
    __threadfence();
    const uint32_t PF = att_part_floats(D);
    const float *ps = part + ((size_t)t * a.n_heads + h) * g.n_split * PF;
    M = -INFINITY, L = 0.0f;
    for (uint32_t k = 0; k < used; k++)
        M = fmaxf(M, __ldcg(ps + k * PF));
    for (uint32_t k = 0; k < used; k++)
        L += __ldcg(ps + k * PF + 1) * __expf(__ldcg(ps + k * PF) - M);
    auto combined = [&](uint32_t i) {
        float o = 0.0f;
        for (uint32_t k = 0; k < used; k++)
            o += __ldcg(ps + k * PF + ATT_PART_HEAD + i) * __expf(__ldcg(ps + k * PF) - M);
        return o / L;
    };
    if constexpr (PIPE) {  /* the gate's values wait in registers (decode) */
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const uint32_t i = threadIdx.x + j * NT;
            if (i < D)
                out[i] = gate ? combined(i) * lt_sigmoid_d(gv[j]) : combined(i);
        }
    } else {
        for (uint32_t i = threadIdx.x; i < D; i += NT)
            out[i] = gate ? combined(i) * lt_sigmoid_d(gate[i]) : combined(i);
    }
    lt_trace_end();
}

/* ============================================================================ GDN */
/* Causal depthwise conv + SiLU of channel ch at token t (inputs before token 0 come from the
 * state, oldest first), and the state update after T tokens (ascending order reads ahead of
 * writes). */
__device__ __forceinline__ float gdn_conv(const lt_gdn_args &a, const float *x, const float *state,
                                          const float *w, uint32_t t, uint32_t ch) {
    uint32_t K = a.conv_kernel, C = a.channels;
    float acc = 0.0f;
    for (uint32_t j = 0; j < K; j++) {
        int64_t r = (int64_t)t - (int64_t)(K - 1) + j;
        float in = r < 0 ? state[(size_t)(r + K - 1) * C + ch] : x[(size_t)r * a.x_stride + ch];
        acc += w[(size_t)ch * K + j] * in;
    }
    return lt_silu_d(acc);
}

__device__ __forceinline__ void gdn_conv_state(const lt_gdn_args &a, const float *x, float *state, uint32_t T,
                                               uint32_t ch) {
    uint32_t K = a.conv_kernel, C = a.channels;
    for (uint32_t i = 0; i + 1 < K; i++) {
        int64_t r = (int64_t)T - (int64_t)(K - 1) + i;
        state[(size_t)i * C + ch] = r < 0 ? state[(size_t)(r + K - 1) * C + ch] : x[(size_t)r * a.x_stride + ch];
    }
}

/* Decode (T = 1) when no GEMV epilogue does the conv (backend.cu fuse_gdn_conv): conv + SiLU of each
 * channel and token into conv_out [T][C], then the conv state update; one thread owns a channel. */
__global__ void k_gdn_conv(lt_gdn_args a, lt_binds b, lt_step_args *st, uint32_t T, float *conv_out) {
    pdl_begin();
    pdl_wait();
    if (st->error)
        return;
    uint32_t ch = blockIdx.x * blockDim.x + threadIdx.x, C = a.channels;
    if (ch >= C)
        return;
    const float *x = (const float *)b.p[LT_GDN_B_X], *w = (const float *)b.p[LT_GDN_B_CONV_W];
    float *state = (float *)b.p[LT_GDN_B_CONV_STATE];
    for (uint32_t t = 0; t < T; t++)
        conv_out[(size_t)t * C + ch] = gdn_conv(a, x, state, w, t, ch);
    gdn_conv_state(a, x, state, T, ch);
}

/* Decode (T = 1): k_gdn_decode, then k_gdn_norm; the conv before them runs in the epilogue of the
 * GEMV that makes X (backend.cu fuse_gdn_conv), else as k_gdn_conv. */
#define GDN_WARPS 4  /* warps per k_gdn_decode block */

/* k_gdn_decode's lanes: LR row lanes x (32 / LR) column quads per warp, R = ceil(k_dim / LR) rows
 * of state per lane (a power of two, 2..16); a block holds GDN_WARPS * 4 * (32 / LR) columns. */
__host__ __device__ __forceinline__ uint32_t gdn_row_lanes(uint32_t k_dim) {
    return k_dim > 256 ? 32 : 16;
}
__host__ __device__ __forceinline__ uint32_t gdn_block_cols(uint32_t k_dim) {
    return GDN_WARPS * 4 * (32 / gdn_row_lanes(k_dim));
}
/* k_gdn_decode's blocks per head */
__host__ __device__ __forceinline__ uint32_t gdn_col_blocks(const lt_gdn_args &a) {
    return (a.v_dim + gdn_block_cols(a.k_dim) - 1) / gdn_block_cols(a.k_dim);
}

/* 4 floats at p (V4: one 16-byte access), the ones past n as zeros / not stored. */
template <bool V4, bool CG = false>
__device__ __forceinline__ void ld4(const float *p, uint32_t n, float (&v)[4]) {
    if constexpr (V4) {
        const float4 f = CG ? __ldcg((const float4 *)p) : *(const float4 *)p;
        v[0] = f.x, v[1] = f.y, v[2] = f.z, v[3] = f.w;
    } else {
#pragma unroll
        for (int i = 0; i < 4; i++)
            v[i] = i < (int)n ? (CG ? __ldcg(p + i) : p[i]) : 0.0f;
    }
}
template <bool V4>
__device__ __forceinline__ void st4(float *p, uint32_t n, const float (&v)[4]) {
    if constexpr (V4)
        *(float4 *)p = make_float4(v[0], v[1], v[2], v[3]);
    else
#pragma unroll
        for (int i = 0; i < 4; i++)
            if (i < (int)n)
                p[i] = v[i];
}

/* Rows rl, rl + LR, ... of a lane's nc columns of the state from S (its first column); CG: L2 only */
template <int R, bool V4, bool CG>
__device__ __forceinline__ void gdn_load_state(const float *S, uint32_t Dk, uint32_t Dv, uint32_t rl, uint32_t LR,
                                               uint32_t nc, float (&s)[R][4]) {
#pragma unroll
    for (int m = 0; m < R; m++) {
        const uint32_t i = rl + m * LR;
        if (nc && i < Dk)
            ld4<V4, CG>(S + (size_t)i * Dv, nc, s[m]);
        else
            s[m][0] = s[m][1] = s[m][2] = s[m][3] = 0.0f;
    }
}

/* grid (n_v_heads, column blocks), GDN_WARPS warps. The recurrence is independent per column of a
 * head's state (S_c *= decay; delta = (v_c - S_c . k) beta; S_c += k delta; o_c = S_c . q), so a
 * warp owns whole columns: lane (r, c) holds rows r, r + LR, ... of 4 columns, and the sums over
 * rows are shuffles among the LR lanes of a quad: no shared memory, no barrier, and a head spread
 * over several SMs. Every warp normalizes q and k itself. conv_out holds q | k | v after the conv
 * and SiLU. OUT gets o before the gated RMSNorm, which k_gdn_norm applies next. With head_ss
 * (backend.cu fuse_gdn_norm) OUT gets o * norm_w * SiLU(z), the part of the norm local to a column,
 * and head_ss[head][column block] the block's sum of o^2: the GEMV reading OUT scales each head by
 * its RMS factor (GEMV_FUSE_HEAD_NORM), with no kernel in between. early (backend.cu
 * resident_bound: this layer's previous step has finished): the state is read before the
 * dependency wait, L2 only (__ldcg: no stale L1 line); otherwise with the step's inputs. V4:
 * v_dim % 4 == 0 and 16-byte aligned rows (and z and norm_w with head_ss). */
template <int R, bool V4>
__global__ void __launch_bounds__(GDN_WARPS * 32) k_gdn_decode(lt_gdn_args a, lt_binds b, lt_step_args *st,
                                                             const float *conv_out, int early, float *head_ss) {
    __shared__ float red[GDN_WARPS];
    pdl_begin();
    const uint32_t h = blockIdx.x, Dk = a.k_dim, Dv = a.v_dim, kh = h / (a.n_v_heads / a.n_k_heads);
    const uint32_t lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const uint32_t LR = gdn_row_lanes(Dk), LC = 32 / LR, rl = lane / LC;
    const uint32_t c0 = blockIdx.y * gdn_block_cols(Dk) + (warp * LC + lane % LC) * 4;  /* this lane's columns */
    const uint32_t nc = c0 < Dv ? min(4u, Dv - c0) : 0;
    float *S = (float *)b.p[LT_GDN_B_S] + (size_t)h * Dk * Dv + c0;
    float s[R][4];
    const float neg_a = -expf(__ldg((const float *)b.p[LT_GDN_B_A_LOG] + h));
    const float dt_bias = __ldg((const float *)b.p[LT_GDN_B_DT_BIAS] + h);
    float gate[4] = {};  /* head_ss: norm_w now, times SiLU(z) once z is in */
    if (head_ss && nc)
        ld4<V4>((const float *)b.p[LT_GDN_B_NORM_W] + c0, nc, gate);
    if (early)
        gdn_load_state<R, V4, true>(S, Dk, Dv, rl, LR, nc, s);
    pdl_wait();
    const uint32_t err = st->error;  /* checked once the loads are in flight */
    if (!early)
        gdn_load_state<R, V4, false>(S, Dk, Dv, rl, LR, nc, s);
    const float *q = conv_out + a.q_offset + kh * Dk, *k = conv_out + a.k_offset + kh * Dk;
    float qv[R], kv[R], vv[4] = {};
#pragma unroll
    for (int m = 0; m < R; m++) {
        const uint32_t i = rl + m * LR;
        qv[m] = i < Dk ? q[i] : 0.0f;
        kv[m] = i < Dk ? k[i] : 0.0f;
    }
    float zv[4] = {};
    if (nc) {
        ld4<V4>(conv_out + a.v_offset + h * Dv + c0, nc, vv);
        if (head_ss) {  /* kept: used only in the epilogue */
            ld4<V4>((const float *)b.p[LT_GDN_B_Z] + h * Dv + c0, nc, zv);
            for (int j = 0; j < 4; j++)
                lt_keep(zv[j]);
        }
    }
    const float xb = ((const float *)b.p[LT_GDN_B_B])[h];
    const float xa = ((const float *)b.p[LT_GDN_B_A])[h] + dt_bias;
    lt_trace_mark(1);
    if (err)
        return;
    /* The sums over rows (each row sits in the LC lanes of its row lane: shuffles among row lanes)
     * are taken together, in one loop of independent shuffles, right when q, k and v are in: the l2
     * norms of q and k and S_c . k of the state before its decay, which the decay and k's norm then
     * scale (S_c *= decay is linear). The kernel runs one warp per scheduler (a block of four warps
     * per SM), so nothing hides a long instruction sequence: hardware approximations (a few ulp)
     * instead of IEEE square root and the library exp / log1p (lt_silu_d, lt_sigmoid_d likewise).
     * H100, Qwen3.5: 3.45 us a layer traced, 4.61 before. */
    float sq = 0.0f, sk = 0.0f, d[4] = {};
#pragma unroll
    for (int m = 0; m < R; m++) {
        sq += qv[m] * qv[m];
        sk += kv[m] * kv[m];
#pragma unroll
        for (int j = 0; j < 4; j++)
            d[j] += s[m][j] * kv[m];
    }
    for (uint32_t o = LC; o < 32; o <<= 1) {
        sq += __shfl_xor_sync(0xffffffffu, sq, o);
        sk += __shfl_xor_sync(0xffffffffu, sk, o);
#pragma unroll
        for (int j = 0; j < 4; j++)
            d[j] += __shfl_xor_sync(0xffffffffu, d[j], o);
    }
    const float rq = rsqrtf((float)Dk) * rsqrtf(sq + 1e-6f);
    const float rk = rsqrtf(sk + 1e-6f);
    const float beta = lt_sigmoid_d(xb);
    const float decay = __expf(neg_a * (xa > 20.0f ? xa : __logf(1.0f + __expf(xa))));
    /* delta_c = (v_c - (decay S_c) . (rk k)) beta */
#pragma unroll
    for (int j = 0; j < 4; j++)
        d[j] = (vv[j] - decay * rk * d[j]) * beta;
    lt_trace_mark(2);
    /* S = decay S + (rk k) (x) delta; o_c = S_c . q, times q's norm once summed */
    float o4[4] = {};
#pragma unroll
    for (int m = 0; m < R; m++) {
        const uint32_t i = rl + m * LR;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            s[m][j] = s[m][j] * decay + (kv[m] * rk) * d[j];
            o4[j] += s[m][j] * qv[m];
        }
        if (nc && i < Dk)
            st4<V4>(S + (size_t)i * Dv, nc, s[m]);
    }
    for (uint32_t o = LC; o < 32; o <<= 1)
#pragma unroll
        for (int j = 0; j < 4; j++)
            o4[j] += __shfl_xor_sync(0xffffffffu, o4[j], o);
#pragma unroll
    for (int j = 0; j < 4; j++)
        o4[j] *= rq;
    if (head_ss) {  /* every lane of a column quad holds its o: sum o^2 over the warp's columns */
        float sq = 0.0f;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            sq += o4[j] * o4[j];
            o4[j] *= gate[j] * lt_silu_d(zv[j]);  /* 0 past nc */
        }
        for (uint32_t o = 1; o < LC; o <<= 1)
            sq += __shfl_xor_sync(0xffffffffu, sq, o);
        if (lane == 0)
            red[warp] = sq;
    }
    if (rl == 0 && nc)
        st4<V4>((float *)b.p[LT_GDN_B_OUT] + h * Dv + c0, nc, o4);
    if (head_ss) {
        __syncthreads();
        if (threadIdx.x == 0) {
            float t = 0.0f;
#pragma unroll
            for (int w = 0; w < GDN_WARPS; w++)
                t += red[w];
            head_ss[h * gridDim.y + blockIdx.y] = t;
        }
    }
    lt_trace_end();
}

/* The gated RMSNorm of k_gdn_decode's OUT in place, one block per value head, where the GEMV after
 * it cannot take the RMS factors (fuse_gdn_norm). (Normalizing the whole of x in every block of
 * that GEMV's x_lane prologue cost more than this kernel.) */
__global__ void __launch_bounds__(128) k_gdn_norm(lt_gdn_args a, lt_binds b, lt_step_args *st) {
    __shared__ float red[32];
    pdl_begin();
    const uint32_t h = blockIdx.x, Dv = a.v_dim;
    const float *nw = (const float *)b.p[LT_GDN_B_NORM_W];
    pdl_wait();
    if (st->error)
        return;
    float *out = (float *)b.p[LT_GDN_B_OUT] + h * Dv;
    const float *z = (const float *)b.p[LT_GDN_B_Z] + h * Dv;
    float ss = 0.0f;
    for (uint32_t i = threadIdx.x; i < Dv; i += blockDim.x)
        ss += out[i] * out[i];
    const float rn = 1.0f / sqrtf(block_sum(ss, red) / (float)Dv + a.norm_eps);
    for (uint32_t i = threadIdx.x; i < Dv; i += blockDim.x)
        out[i] = out[i] * rn * nw[i] * lt_silu_d(z[i]);
}

/* Prefill (T > 1) in three kernels. The recurrence is independent per column j of a head's state
 * (S_j *= decay; delta = (v_j - S_j . k) * beta; S_j += k delta; o_j = S_j . q): only the output
 * RMSNorm couples a head's columns. So the sequential scan runs one small lane group per column
 * with the column in registers, and everything per token and channel runs in parallel before
 * (conv, norms, gates) and after it (gated RMSNorm, conv state).
 *
 * Workspace (floats): T rows of gdn_row(a) = q [n_k_heads][k_dim] (normalized and scaled) |
 * k [n_k_heads][k_dim] (normalized) | v [n_v_heads][v_dim] | beta [n_v_heads] | decay [n_v_heads],
 * then the un-normalized outputs o [T][n_v_heads * v_dim]. */
__host__ __device__ __forceinline__ uint32_t gdn_row(const lt_gdn_args &a) {
    return 2 * a.n_k_heads * a.k_dim + a.n_v_heads * a.v_dim + 2 * a.n_v_heads;
}

__host__ __device__ __forceinline__ size_t gdn_prefill_floats(const lt_gdn_args &a, uint32_t T) {
    return (size_t)T * (gdn_row(a) + a.n_v_heads * a.v_dim);
}

/* X channel of workspace channel u (q | k | v, as in a workspace row). */
__device__ __forceinline__ uint32_t gdn_channel(const lt_gdn_args &a, uint32_t u) {
    uint32_t nk = a.n_k_heads * a.k_dim;
    return u < nk ? a.q_offset + u : u < 2 * nk ? a.k_offset + (u - nk) : a.v_offset + (u - 2 * nk);
}

/* Prefill part 1, grid (2 * n_k_heads + n_v_heads, T): block u < n_k_heads does q head u, then the k
 * heads (conv + SiLU, l2norm), then one block per value head (conv + SiLU of v, beta, decay). */
#define GDN_PREP_THREADS 128
__global__ void __launch_bounds__(GDN_PREP_THREADS) k_gdn_prep(lt_gdn_args a, lt_binds b, lt_step_args *st,
                                                               uint32_t T, float *ws) {
    __shared__ float red[32];
    pdl_begin();
    pdl_wait();
    if (st->error)
        return;
    uint32_t u = blockIdx.x, t = blockIdx.y, Hk = a.n_k_heads, Dk = a.k_dim, Dv = a.v_dim;
    const float *x = (const float *)b.p[LT_GDN_B_X], *w = (const float *)b.p[LT_GDN_B_CONV_W];
    const float *cstate = (const float *)b.p[LT_GDN_B_CONV_STATE];
    float *row = ws + (size_t)t * gdn_row(a);
    if (u < 2 * Hk) {
        constexpr int N = 512 / GDN_PREP_THREADS;  /* k_dim <= 512 */
        float c[N], ss = 0.0f;
#pragma unroll
        for (int r = 0; r < N; r++) {
            uint32_t i = threadIdx.x + r * GDN_PREP_THREADS;
            c[r] = i < Dk ? gdn_conv(a, x, cstate, w, t, gdn_channel(a, u * Dk + i)) : 0.0f;
            ss += c[r] * c[r];
        }
        ss = block_sum(ss, red);
        float scale = u < Hk ? (1.0f / sqrtf((float)Dk)) / sqrtf(ss + 1e-6f) : 1.0f / sqrtf(ss + 1e-6f);
#pragma unroll
        for (int r = 0; r < N; r++) {
            uint32_t i = threadIdx.x + r * GDN_PREP_THREADS;
            if (i < Dk)
                row[u * Dk + i] = c[r] * scale;
        }
        return;
    }
    uint32_t h = u - 2 * Hk, v0 = 2 * Hk * Dk + h * Dv;
    for (uint32_t i = threadIdx.x; i < Dv; i += GDN_PREP_THREADS)
        row[v0 + i] = gdn_conv(a, x, cstate, w, t, a.v_offset + h * Dv + i);
    if (threadIdx.x == 0) {
        const float *pa = (const float *)b.p[LT_GDN_B_A], *pb = (const float *)b.p[LT_GDN_B_B];
        const float *a_log = (const float *)b.p[LT_GDN_B_A_LOG], *dt_bias = (const float *)b.p[LT_GDN_B_DT_BIAS];
        float xa = pa[(size_t)t * a.a_stride + h] + dt_bias[h];
        float sp = xa > 20.0f ? xa : log1pf(expf(xa));
        uint32_t g0 = 2 * Hk * Dk + a.n_v_heads * Dv;
        row[g0 + h] = lt_sigmoid_d(pb[(size_t)t * a.b_stride + h]);
        row[g0 + a.n_v_heads + h] = expf(-expf(a_log[h]) * sp);
    }
}

/* Sum over the G lanes of an aligned lane group (every lane gets it). */
template <int G>
__device__ __forceinline__ float group_sum(float v) {
#pragma unroll
    for (int o = G / 2; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

/* R consecutive floats of shared memory (16-byte aligned when R % 4 == 0). */
template <int R>
__device__ __forceinline__ void load_rows(const float *p, float (&v)[R]) {
    if constexpr (R % 4 == 0) {
#pragma unroll
        for (int r = 0; r < R; r += 4) {
            float4 f = *(const float4 *)(p + r);
            v[r] = f.x, v[r + 1] = f.y, v[r + 2] = f.z, v[r + 3] = f.w;
        }
    } else {
#pragma unroll
        for (int r = 0; r < R; r++)
            v[r] = p[r];
    }
}

/* sum_r a[r] * b[r] with up to 4 independent chains. */
template <int R>
__device__ __forceinline__ float dot_rows(const float (&a)[R], const float (&b)[R]) {
    constexpr int NA = R < 4 ? R : 4;
    float acc[NA];
#pragma unroll
    for (int r = 0; r < NA; r++)
        acc[r] = a[r] * b[r];
#pragma unroll
    for (int r = NA; r < R; r++)
        acc[r % NA] += a[r] * b[r];
    float s = acc[0];
#pragma unroll
    for (int r = 1; r < NA; r++)
        s += acc[r];
    return s;
}

/* Sums of N values over the G lanes of each aligned lane group at once, N <= G: each step halves
 * the values a lane keeps and exchanges the other half with its partner (N - 1 + log2(G / N)
 * shuffles instead of N log2 G). A lane ends with the sum of value `idx` in p[0]; `lead` marks
 * one lane per value. */
template <int OFF, int NV, int N>  /* the step exchanging across lane distance OFF, NV values held */
__device__ __forceinline__ void group_sum_steps(float (&p)[N], uint32_t sub, uint32_t &idx, bool &lead) {
    if constexpr (OFF > 0) {
        bool upper = sub & OFF;
        if constexpr (NV > 1) {
            constexpr int half = NV / 2;
#pragma unroll
            for (int i = 0; i < half; i++) {
                float send = upper ? p[i] : p[i + half], keep = upper ? p[i + half] : p[i];
                p[i] = keep + __shfl_xor_sync(0xffffffffu, send, OFF);
            }
            idx += upper ? half : 0;
        } else {
            p[0] += __shfl_xor_sync(0xffffffffu, p[0], OFF);
            lead = lead && !upper;
        }
        group_sum_steps<OFF / 2, (NV > 1 ? NV / 2 : 1), N>(p, sub, idx, lead);
    }
}

template <int G, int N>
__device__ __forceinline__ void group_sum_n(float (&p)[N], uint32_t sub, uint32_t &idx, bool &lead) {
    static_assert(N <= G, "one value per lane at most");
    idx = 0;
    lead = true;
    group_sum_steps<G / 2, N, N>(p, sub, idx, lead);
}

/* Prefill part 2, grid (ceil(v_dim / GDN_SCAN_COLS), n_v_heads): the sequential scan. A group of
 * G lanes owns one column j of the head's state, R consecutive rows per lane (rows padded to
 * P = R * G with zeros); the column's S . k is a shuffle sum within the group, and the S . q of a
 * chunk's tokens are summed together after the chunk. No barrier inside the token loop: the
 * block's columns share q_t, k_t, v_t, beta_t, decay_t of a chunk of TC tokens, staged in shared
 * memory by cp.async while the previous chunk is scanned (one barrier per chunk). Shuffles and
 * shared loads are most of its instructions. Writes o and the final S. */
#define GDN_SCAN_COLS 16
#define GDN_CHUNK_FLOATS 2048  /* TC * P: q and k of a chunk, 8 KiB each */
template <int R, int G>
__global__ void __launch_bounds__(GDN_SCAN_COLS * G) k_gdn_scan(lt_gdn_args a, lt_binds b, lt_step_args *st,
                                                               uint32_t T, float *ws) {
    constexpr uint32_t P = R * G, TC = GDN_CHUNK_FLOATS / P < G ? GDN_CHUNK_FLOATS / P : G;
    constexpr uint32_t NT = GDN_SCAN_COLS * G;
    static_assert(TC % 4 == 0, "per-token values are read 4 tokens at a time");
    __shared__ __align__(16) float sq[2][TC * P], sk[2][TC * P];
    __shared__ __align__(16) float sv[2][GDN_SCAN_COLS][TC], sbeta[2][TC], sdecay[2][TC];
    pdl_begin();
    pdl_wait();
    if (st->error)
        return;
    uint32_t Hk = a.n_k_heads, Hv = a.n_v_heads, Dk = a.k_dim, Dv = a.v_dim;
    uint32_t h = blockIdx.y, kh = h / (Hv / Hk), j0 = blockIdx.x * GDN_SCAN_COLS;
    uint32_t c = threadIdx.x / G, sub = threadIdx.x % G, j = j0 + c;
    bool col = j < Dv;
    uint32_t rn = gdn_row(a), q0 = kh * Dk, k0 = Hk * Dk + kh * Dk, v0 = 2 * Hk * Dk + h * Dv;
    uint32_t beta0 = 2 * Hk * Dk + Hv * Dv + h, decay0 = beta0 + Hv;
    float *o_ws = ws + (size_t)T * rn;
    float *S = (float *)b.p[LT_GDN_B_S] + (size_t)h * Dk * Dv;
    float s[R];
#pragma unroll
    for (int r = 0; r < R; r++) {
        uint32_t i = sub * R + r;
        s[r] = col && i < Dk ? S[(size_t)i * Dv + j] : 0.0f;
    }
    /* Tokens past T stage as k = 0, beta = 0, decay = 1: S * 1 + k * 0 keeps the state exactly. */
    auto stage = [&](uint32_t t0, int buf) {
        for (uint32_t e = threadIdx.x; e < TC * P; e += NT) {
            uint32_t t = t0 + e / P, i = e % P;
            if (t < T && i < Dk) {
                cp_async4(&sq[buf][e], ws + (size_t)t * rn + q0 + i);
                cp_async4(&sk[buf][e], ws + (size_t)t * rn + k0 + i);
            } else {
                sq[buf][e] = 0.0f;
                sk[buf][e] = 0.0f;
            }
        }
        for (uint32_t e = threadIdx.x; e < TC * GDN_SCAN_COLS; e += NT) {
            uint32_t tt = e / GDN_SCAN_COLS, cc = e % GDN_SCAN_COLS;
            if (t0 + tt < T && j0 + cc < Dv)
                cp_async4(&sv[buf][cc][tt], ws + (size_t)(t0 + tt) * rn + v0 + j0 + cc);
            else
                sv[buf][cc][tt] = 0.0f;
        }
        for (uint32_t e = threadIdx.x; e < TC; e += NT) {
            if (t0 + e < T) {
                cp_async4(&sbeta[buf][e], ws + (size_t)(t0 + e) * rn + beta0);
                cp_async4(&sdecay[buf][e], ws + (size_t)(t0 + e) * rn + decay0);
            } else {
                sbeta[buf][e] = 0.0f;
                sdecay[buf][e] = 1.0f;
            }
        }
        cp_async_commit();
    };
    stage(0, 0);
    int buf = 0;
    for (uint32_t t0 = 0; t0 < T; t0 += TC, buf ^= 1) {
        cp_async_wait_all();
        __syncthreads();  /* chunk t0 visible; every thread is done with the other buffer */
        if (t0 + TC < T)
            stage(t0 + TC, buf ^ 1);
        float po[TC];  /* this lane's part of S_t . q_t */
#pragma unroll
        for (uint32_t t4 = 0; t4 < TC; t4 += 4) {
            float4 d4 = *(const float4 *)&sdecay[buf][t4], b4 = *(const float4 *)&sbeta[buf][t4];
            float4 v4 = *(const float4 *)&sv[buf][c][t4];
            const float dec[4] = {d4.x, d4.y, d4.z, d4.w}, bet[4] = {b4.x, b4.y, b4.z, b4.w};
            const float vj[4] = {v4.x, v4.y, v4.z, v4.w};
#pragma unroll
            for (uint32_t u = 0; u < 4; u++) {
                uint32_t tt = t4 + u;
                float kk[R], qq[R];
                load_rows<R>(&sk[buf][tt * P + sub * R], kk);
                load_rows<R>(&sq[buf][tt * P + sub * R], qq);
#pragma unroll
                for (int r = 0; r < R; r++)
                    s[r] *= dec[u];
                float delta = (vj[u] - group_sum<G>(dot_rows<R>(s, kk))) * bet[u];
#pragma unroll
                for (int r = 0; r < R; r++)
                    s[r] += kk[r] * delta;
                po[tt] = dot_rows<R>(s, qq);
            }
        }
        uint32_t tt;
        bool lead;
        group_sum_n<G, TC>(po, sub, tt, lead);
        if (lead && col && t0 + tt < T)
            o_ws[(size_t)(t0 + tt) * Hv * Dv + h * Dv + j] = po[0];
    }
#pragma unroll
    for (int r = 0; r < R; r++) {
        uint32_t i = sub * R + r;
        if (col && i < Dk)
            S[(size_t)i * Dv + j] = s[r];
    }
}

/* Prefill part 3, grid (n_v_heads, T): out = RMSNorm(o) * norm_w * silu(z) per value head; then the conv
 * state update, spread over all threads (part 1, which read the old state, has finished). */
#define GDN_OUT_THREADS 128
__global__ void __launch_bounds__(GDN_OUT_THREADS) k_gdn_out(lt_gdn_args a, lt_binds b, lt_step_args *st,
                                                             uint32_t T, const float *ws) {
    __shared__ float red[32];
    pdl_begin();
    pdl_wait();
    if (st->error)
        return;
    uint32_t h = blockIdx.x, t = blockIdx.y, Dv = a.v_dim, HvDv = a.n_v_heads * Dv;
    const float *o = ws + (size_t)T * gdn_row(a) + (size_t)t * HvDv + h * Dv;
    const float *z = (const float *)b.p[LT_GDN_B_Z] + (size_t)t * a.z_stride + h * Dv;
    const float *norm_w = (const float *)b.p[LT_GDN_B_NORM_W];
    float *out = (float *)b.p[LT_GDN_B_OUT] + (size_t)t * a.out_stride + h * Dv;
    constexpr int N = 512 / GDN_OUT_THREADS;  /* v_dim <= 512 */
    float ov[N], ss = 0.0f;
#pragma unroll
    for (int r = 0; r < N; r++) {
        uint32_t i = threadIdx.x + r * GDN_OUT_THREADS;
        ov[r] = i < Dv ? o[i] : 0.0f;
        ss += ov[r] * ov[r];
    }
    ss = block_sum(ss, red);
    float rs = 1.0f / sqrtf(ss / (float)Dv + a.norm_eps);
#pragma unroll
    for (int r = 0; r < N; r++) {
        uint32_t i = threadIdx.x + r * GDN_OUT_THREADS;
        if (i < Dv)
            out[i] = ov[r] * rs * norm_w[i] * lt_silu_d(z[i]);
    }
    const float *x = (const float *)b.p[LT_GDN_B_X];
    float *cstate = (float *)b.p[LT_GDN_B_CONV_STATE];
    uint32_t n_ch = 2 * a.n_k_heads * a.k_dim + HvDv, stride = gridDim.x * gridDim.y * GDN_OUT_THREADS;
    for (uint32_t u = (blockIdx.y * gridDim.x + blockIdx.x) * GDN_OUT_THREADS + threadIdx.x; u < n_ch; u += stride)
        gdn_conv_state(a, x, cstate, T, gdn_channel(a, u));
}

/* ============================================================================ SAMPLE */
/* One block of SAMPLE_THREADS. The steps and their order are those of lattice/csrc/sampler.c;
 * the sorts become threshold searches (radix-style, bit by bit over the float's ordered bits),
 * and every "in ascending token id" walk splits the vocabulary into one contiguous chunk per
 * thread with a block prefix sum over the chunks. Sums are taken in a different order than the
 * CPU's, so a draw can differ only when u * total falls within rounding of a boundary. */
#define SAMPLE_THREADS 1024

struct pen_view {
    const float *logits;
    const uint32_t *counts;
    float rep, presence, freq;
    bool active;
    __device__ __forceinline__ float operator()(uint32_t v) const {
        float l = logits[v];
        uint32_t n = active ? counts[v] : 0u;
        if (n) {
            l = l > 0.0f ? l / rep : l * rep;
            l -= freq * (float)n + presence;
        }
        return l;
    }
};

/* Orderable key of a float: larger float, larger key. */
__device__ __forceinline__ uint32_t f2key(float f) {
    uint32_t u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ float key2f(uint32_t k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

/* Of the entries with p[v] == tie, keeps the first `want` in ascending id and sets the others to
 * -1. Every thread passes its contiguous chunk [lo, hi). */
__device__ void keep_first_ties(float *p, uint32_t lo, uint32_t hi, float tie, uint32_t want, uint32_t *scan) {
    uint32_t mine = 0, total;
    for (uint32_t v = lo; v < hi; v++)
        mine += p[v] == tie;
    uint32_t rank = block_exclusive_scan<uint32_t>(mine, scan, &total);
    for (uint32_t v = lo; v < hi; v++)
        if (p[v] == tie) {
            if (rank >= want)
                p[v] = -1.0f;
            rank++;
        }
    __syncthreads();
}

/* part: the LM head's n_part partials (PARTIALS' one per LT_ARGMAX_BLOCK logits, or one per
 * k_gemv_stream block: backend.cu, link_lm_partials), or none: the logits themselves. */
__global__ void __launch_bounds__(SAMPLE_THREADS) k_sample(lt_sample_args a, lt_binds b, lt_step_args *st,
                                                           uint32_t T, const lt_argmax_partial *part,
                                                           uint32_t n_part) {
    __shared__ float redv[33];
    __shared__ uint32_t redi[33];
    __shared__ float4 red4[32];
    __shared__ uint32_t flag;
    pdl_begin();
    pdl_wait();
    const uint32_t V = a.vocab, tid = threadIdx.x;
    const float *logits = (const float *)b.p[LT_SAMPLE_B_LOGITS];
    if (a.flags & LT_SAMPLE_LOGITS_ALL_TOKENS)
        logits += (size_t)(T - 1) * a.logits_stride;
    /* 2. (its loads first, in flight with the error flag and the history's) this thread's share of
       the raw logits' max, argmax, sum of exp and NaN / Inf count, from the LM head's partials or
       the logits; merged over the block after 1 */
    logit_stats ls;
    if (part) {
        for (uint32_t i = tid; i < n_part; i += SAMPLE_THREADS)
            ls.merge(part[i].max, part[i].argmax, part[i].sumexp, part[i].n_nonfinite);
    } else {
        for (uint32_t v = tid; v < V; v += SAMPLE_THREADS) {
            const float l = logits[v];
            if (isfinite(l))
                ls.merge(l, v, 1.0f, 0);
            else
                ls.bad++;
        }
    }
    lt_keep(ls.max), lt_keep(ls.sumexp), lt_keep(ls.arg), lt_keep(ls.bad);
    if (st->error)
        return;
    lt_trace_mark(1);
    const uint32_t *ids = (const uint32_t *)b.p[LT_SAMPLE_B_IDS];
    uint32_t *counts = (uint32_t *)b.p[LT_SAMPLE_B_COUNTS], *hist = (uint32_t *)b.p[LT_SAMPLE_B_HIST];

    /* 1. penalty history (one thread: it is a short sequential update) */
    if (tid == 0) {
        flag = 0;
        if (counts && st->penalty_last_n && st->penalty_last_n > a.hist_cap) {
            lt_raise(st, LT_ERR_ARGS);
            flag = 1;
        } else if (counts && ids) {
            for (uint32_t t = 0; t < T; t++) {
                uint32_t id = ids[t];
                if (id >= V)
                    continue;
                if (hist && a.hist_cap) {
                    if (st->penalty_last_n && st->n_seen >= st->penalty_last_n) {
                        uint32_t old = hist[(st->n_seen - st->penalty_last_n) % a.hist_cap];
                        if (counts[old])
                            counts[old]--;
                    }
                    hist[st->n_seen % a.hist_cap] = id;
                }
                counts[id]++;
                st->n_seen++;
            }
        }
    }
    __syncthreads();
    if (flag)
        return;

    lt_trace_mark(2);
    ls = block_stats(ls, red4, redv);
    lt_trace_mark(3);
    const float z = ls.sumexp;  /* over exp(l - ls.max) */
    uint32_t arg = ls.arg;
    if (ls.bad) {
        if (tid == 0)
            lt_raise(st, LT_ERR_NONFINITE);
        return;
    }
    if (arg == 0xffffffffu)
        arg = 0;
    float *ring_logits = (float *)b.p[LT_SAMPLE_B_RING_LOGITS];
    if ((st->flags & LT_STEP_WANT_LOGITS) && ring_logits && a.logits_cap) {
        float *dst = ring_logits + (size_t)(st->step % a.logits_cap) * V;
        for (uint32_t v = tid; v < V; v += SAMPLE_THREADS)
            dst[v] = logits[v];
    }

    pen_view pen{logits, counts, st->repetition_penalty, st->presence_penalty, st->frequency_penalty, false};
    pen.active = counts && (pen.rep != 1.0f || pen.presence != 0.0f || pen.freq != 0.0f);
    uint32_t tok = arg;
    float logprob = -logf(z);  /* logits[arg] is ls.max */
    const float temperature = st->temperature;
    if (temperature <= 0.0f) {
        if (pen.active) {  /* greedy over the penalized logits; logprob under their softmax */
            float best = -INFINITY;
            uint32_t bi = 0xffffffffu;
            for (uint32_t v = tid; v < V; v += SAMPLE_THREADS)
                arg_better(best, bi, pen(v), v);
            block_argmax(best, bi, redv, redi);
            float se = 0.0f;
            for (uint32_t v = tid; v < V; v += SAMPLE_THREADS)
                se += expf(pen(v) - best);
            se = block_sum(se, redv);
            tok = bi == 0xffffffffu ? 0 : bi;
            logprob = -logf(se);
        }
    } else {
        float *p = (float *)b.p[LT_SAMPLE_B_WORK];  /* p[v] >= 0 kept (unnormalized), -1 dropped */
        const float inv_t = 1.0f / temperature;
        const uint32_t chunk = (V + SAMPLE_THREADS - 1) / SAMPLE_THREADS;
        const uint32_t lo = min(tid * chunk, V), hi = min(lo + chunk, V);
        float smax = -INFINITY;
        for (uint32_t v = tid; v < V; v += SAMPLE_THREADS)
            smax = fmaxf(smax, pen(v) * inv_t);
        smax = block_max(smax, redv);
        uint32_t top_k = st->top_k;
        if (top_k > 0 && top_k < V) {
            /* the top_k-th largest scaled logit: the largest key K with count(key >= K) >= top_k */
            uint32_t K = 0;
            for (int bit = 31; bit >= 0; bit--) {
                uint32_t cand = K | (1u << bit), c = 0;
                for (uint32_t v = tid; v < V; v += SAMPLE_THREADS)
                    c += f2key(pen(v) * inv_t) >= cand;
                if (block_count(c, redi) >= top_k)
                    K = cand;
            }
            float thr = key2f(K);
            uint32_t c = 0;
            for (uint32_t v = tid; v < V; v += SAMPLE_THREADS)
                c += pen(v) * inv_t > thr;
            uint32_t above = block_count(c, redi);
            for (uint32_t v = lo; v < hi; v++) {
                float s = pen(v) * inv_t;
                p[v] = s > thr ? expf(s - smax) : (s == thr ? -2.0f : -1.0f);  /* -2: a tie, decided next */
            }
            __syncthreads();
            keep_first_ties(p, lo, hi, -2.0f, top_k - above, redi);
            for (uint32_t v = lo; v < hi; v++)
                if (p[v] == -2.0f)
                    p[v] = expf(thr - smax);
                else if (p[v] < 0.0f)
                    p[v] = -1.0f;
        } else {
            for (uint32_t v = lo; v < hi; v++)
                p[v] = expf(pen(v) * inv_t - smax);
        }
        __syncthreads();
        if (st->top_p < 1.0f) {
            float total = 0.0f;
            for (uint32_t v = tid; v < V; v += SAMPLE_THREADS)
                total += fmaxf(p[v], 0.0f);
            total = block_sum(total, redv);
            float target = st->top_p * total;
            /* tau: the smallest kept probability of the nucleus = the largest existing value
             * whose sum over p >= tau reaches the target (p >= 0: raw bits are ordered) */
            uint32_t K = 0;
            for (int bit = 30; bit >= 0; bit--) {
                uint32_t cand = K | (1u << bit), c = 0;
                float s = 0.0f;
                for (uint32_t v = tid; v < V; v += SAMPLE_THREADS)
                    if (p[v] >= 0.0f && __float_as_uint(p[v]) >= cand) {
                        s += p[v];
                        c++;
                    }
                s = block_sum(s, redv);
                if (block_count(c, redi) > 0 && s >= target)
                    K = cand;
            }
            float tau = __uint_as_float(K), s_gt = 0.0f;
            uint32_t nties = 0;
            for (uint32_t v = tid; v < V; v += SAMPLE_THREADS) {
                if (p[v] > tau)
                    s_gt += p[v];
                nties += p[v] == tau;
            }
            s_gt = block_sum(s_gt, redv);
            nties = block_count(nties, redi);
            uint32_t want = 0;
            float cum = s_gt;
            do {  /* ties join in ascending id until the cumulative sum reaches the target */
                cum += tau;
                want++;
            } while (want < nties && cum < target);
            for (uint32_t v = lo; v < hi; v++)
                if (p[v] >= 0.0f && p[v] < tau)
                    p[v] = -1.0f;
            __syncthreads();
            keep_first_ties(p, lo, hi, tau, want, redi);
        }
        float min_p = st->min_p;
        if (min_p > 0.0f) {  /* p is relative to the top candidate, whose p is 1 */
            for (uint32_t v = lo; v < hi; v++)
                if (p[v] >= 0.0f && p[v] < min_p)
                    p[v] = -1.0f;
            __syncthreads();
        }
        /* draw: the first kept id (ascending) whose cumulative p exceeds u * total */
        float mine = 0.0f, total;
        for (uint32_t v = lo; v < hi; v++)
            mine += fmaxf(p[v], 0.0f);
        float base = block_exclusive_scan<float>(mine, redv, &total);
        float target = lt_uniform(st->seed_lo, st->seed_hi, st->step) * total;
        uint32_t hit = 0xffffffffu, last = 0;
        float cum = base;
        for (uint32_t v = lo; v < hi; v++)
            if (p[v] >= 0.0f) {
                last = v + 1;
                cum += p[v];
                if (cum > target && hit == 0xffffffffu)
                    hit = v;
            }
        /* lowest hit id; if none (rounding), the last kept id, like the CPU's fallback */
        float hv = hit == 0xffffffffu ? -INFINITY : 0.0f;
        uint32_t hit_id = hit;
        block_argmax(hv, hit_id, redv, redi);
        float lv = (float)last;  /* ids < 2^24: exact in f32 */
        lv = block_max(lv, redv);
        uint32_t hi_id = hv == -INFINITY ? (uint32_t)lv - 1 : hit_id;
        tok = hi_id;
        logprob = logf(p[tok] / total);
    }
    __syncthreads();
    if (tid == 0) {
        uint32_t *ring = (uint32_t *)b.p[LT_SAMPLE_B_RING_TOKENS];
        float *ring_lp = (float *)b.p[LT_SAMPLE_B_RING_LOGPROBS];
        if (st->ring_cap) {
            if (ring)
                ring[st->step % st->ring_cap] = tok;
            if (ring_lp)
                ring_lp[st->step % st->ring_cap] = logprob;
        }
        st->token = st->next_token = tok;
        st->next_logprob = logprob;
        st->pos += T;
        st->n_tokens = 1;
        st->step += 1;
    }
    lt_trace_end();
}
