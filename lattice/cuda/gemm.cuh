/* Prefill GEMM on tensor cores: what k_gemv computes (lt_gemv_args, metal/lattice_shared.h) for
 * many tokens at once, y[t, n] = sum_k W[n, k] x'[t, k] then the epilogues, with
 * mma.sync m16n8k8 TF32 (sm_80+).
 *
 * Precision stays that of f32 dot products: Q8 (int8), Q4 (0..15) and F16 weights are exact in
 * TF32; x is split into hi = tf32(x) and lo = tf32(x - hi) and both halves are multiplied
 * (about 2^-22 relative); the Q8/Q4 scales (and Q4 mins, through per-block sums of x) are applied
 * in f32 to each 32-column block's sum. F32 weights are not handled (they would need W split too):
 * launch_gemm declines them and k_gemv runs.
 *
 * A block computes BM weight rows x BN tokens, 32 columns (one quant block) per pipeline stage:
 * weights and raw x arrive by cp.async STAGES - 1 chunks ahead (the weights of the first chunks
 * before the programmatic-launch wait: they do not depend on earlier kernels); each chunk's x is
 * normalized (x * norm weight; the RMS factor multiplies the sums at the end, as in k_gemv) and
 * split once into shared memory, then 8 warps (4 along rows x 2 along tokens, 32 x 32 each) run
 * the mma's. Inside a chunk the 32 columns are taken in a per-format order in which every thread's
 * 8 columns per row are adjacent in memory (one 8- or 16-byte load for its weights, two float4 for
 * x); any fixed order gives the same sum. The output tile goes through shared memory so that the
 * epilogues write whole rows of y. */
#pragma once

#include <cuda_runtime.h>

#include "kernels.cuh"

#define GEMM_BN 64                   /* tokens per block (2 warps of 32 along tokens) */
#define GEMM_BK LT_QK                /* columns per pipeline stage: one quant block */
#define GEMM_STAGES 3
#define GEMM_XR (GEMM_BK + 4)        /* floats per raw x row: conflict-free float4 reads */
#define GEMM_XH (GEMM_BK + 8)        /* floats per hi / lo x row: conflict-free float2 fragment reads */
#define GEMM_MIN_TOKENS 16           /* fewer tokens: k_gemv (the tile would be mostly padding) */

/* Bytes of one weight row per chunk of GEMM_BK columns. */
template <int FMT> struct gemm_fmt;
template <> struct gemm_fmt<LT_WF_F16> { static constexpr int WB = 2 * GEMM_BK; };
template <> struct gemm_fmt<LT_WF_Q8> { static constexpr int WB = GEMM_BK; };
template <> struct gemm_fmt<LT_WF_Q4> { static constexpr int WB = GEMM_BK / 2; };

/* WM warps along rows (32 rows each) x 2 along tokens: BM = 32 WM rows, 64 WM threads. */
template <int FMT, int WM>
constexpr size_t gemm_smem_bytes() {
    return (size_t)GEMM_STAGES * 32 * WM * gemm_fmt<FMT>::WB                      /* weights */
           + (size_t)GEMM_STAGES * GEMM_BN * GEMM_XR * 4 + 2 * GEMM_BN * GEMM_XH * 4  /* raw x, x hi / lo */
           + 2 * GEMM_BN * 4;                                                     /* x block sums, RMS factors */
}

__device__ __forceinline__ void cp_async16(void *dst, const void *src, uint32_t src_bytes) {
    uint32_t d = (uint32_t)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(d), "l"(src), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory"); }

__device__ __forceinline__ float to_tf32(float x) {
    uint32_t r;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
    return __uint_as_float(r);
}

/* d += A (16x8, row) * B (8x8, col), TF32 inputs, f32 accumulators. */
__device__ __forceinline__ void mma_tf32(float d[4], const float a[4], float b0, float b1) {
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(__float_as_uint(a[0])), "r"(__float_as_uint(a[1])), "r"(__float_as_uint(a[2])),
                   "r"(__float_as_uint(a[3])), "r"(__float_as_uint(b0)), "r"(__float_as_uint(b1)));
}

/* Four int8 (or 0..15 bytes) as exact floats: the byte placed in the mantissa of 2^23, minus the
 * bias (cheaper than I2F). */
__device__ __forceinline__ void s8x4_to_f32(uint32_t w, float *f) {
    uint32_t u = w ^ 0x80808080u;  /* b + 128 */
#pragma unroll
    for (int i = 0; i < 4; i++)
        f[i] = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7540 + i)) - 8388736.0f;
}
__device__ __forceinline__ void u8x4_to_f32(uint32_t w, float *f) {
#pragma unroll
    for (int i = 0; i < 4; i++)
        f[i] = __uint_as_float(__byte_perm(w, 0x4B000000u, 0x7540 + i)) - 8388608.0f;
}

/* The 8 weights of a thread's row in a chunk (columns in the format's order, see gemm_xcol). */
template <int FMT>
__device__ __forceinline__ void gemm_load_w(const uint8_t *row, int c, float *f) {
    if (FMT == LT_WF_Q8) {
        uint2 p = *(const uint2 *)(row + 8 * c);
        s8x4_to_f32(p.x, f);
        s8x4_to_f32(p.y, f + 4);
    } else if (FMT == LT_WF_Q4) {  /* byte j: value j low, value j + 16 high */
        uint32_t p = *(const uint32_t *)(row + 4 * c);
        u8x4_to_f32(p & 0x0f0f0f0fu, f);
        u8x4_to_f32((p >> 4) & 0x0f0f0f0fu, f + 4);
    } else {
        uint4 p = *(const uint4 *)(row + 16 * c);
        const __half2 *h = (const __half2 *)&p;
#pragma unroll
        for (int i = 0; i < 4; i++) {
            float2 v = __half22float2(h[i]);
            f[2 * i] = v.x;
            f[2 * i + 1] = v.y;
        }
    }
}

/* Column (within the chunk) of staged position 8q + j, j < 8: adjacent for Q8/F16; for Q4 the
 * low nibbles of bytes 4q..4q+3 then their high nibbles (columns 16 + 4q ..). */
template <int FMT>
__device__ __forceinline__ int gemm_xcol(int q, int j) {
    if (FMT == LT_WF_Q4)
        return j < 4 ? 4 * q + j : 16 + 4 * q + (j - 4);
    return 8 * q + j;
}

/* grid (token tiles, row tiles), 64 WM threads, gemm_smem_bytes<FMT, WM>() dynamic shared
 * memory. n_tok: tokens (x row t -> y row t). */
template <int FMT, int WM>
__global__ void __launch_bounds__(64 * WM, 8 / WM) k_gemm(lt_gemv_args a, lt_binds b, lt_step_args *st,
                                                          uint32_t n_tok) {
    constexpr int BM = 32 * WM, BN = GEMM_BN, BK = GEMM_BK, S = GEMM_STAGES, XR = GEMM_XR, XH = GEMM_XH;
    constexpr int THREADS = 64 * WM, SLOTS = BN * 4 / THREADS;  /* x staging: 8 values per slot */
    constexpr int OS = BM + 4;                                  /* floats per token row of the output tile */
    constexpr int WB = gemm_fmt<FMT>::WB;
    constexpr bool QUANT = FMT != LT_WF_F16;
    extern __shared__ __align__(16) uint8_t smem[];
    uint8_t *sw = smem;                               /* [S][BM][WB] */
    float *sxr = (float *)(smem + S * BM * WB);       /* [S][BN][XR] raw x */
    float *sxh = sxr + S * BN * XR, *sxl = sxh + BN * XH;  /* [BN][XH] x hi / lo, fragment order */
    float *sxsum = sxl + BN * XH;                     /* [BN] Q4: sum of the chunk's x' per token */
    float *srn = sxsum + BN;                          /* [BN] RMS factors */
    float *sout = (float *)smem;                      /* [BN][OS], after the main loop */
    static_assert((size_t)BN * OS * 4 <= (size_t)S * BM * WB + S * BN * XR * 4 + 2 * BN * XH * 4, "output tile");

    pdl_begin();
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, c = lane & 3;
    const int wm = warp % WM, wn = warp / WM;         /* warp tile: rows wm*32.., tokens wn*32.. */
    const uint32_t t0 = blockIdx.x * BN, n0 = blockIdx.y * BM;
    const uint32_t nch = (a.cols + BK - 1) / BK;
    const uint32_t row_bytes = FMT == LT_WF_F16 ? a.cols * 2 : nch * WB;
    const uint8_t *wq = (const uint8_t *)b.p[LT_GEMV_B_WQ];
    const __half *ws = (const __half *)b.p[LT_GEMV_B_WS], *wmin = (const __half *)b.p[LT_GEMV_B_WM];
    const float *x = (const float *)b.p[LT_GEMV_B_X];

    auto load_w = [&](uint32_t kc) {
        uint8_t *dst = sw + (kc % S) * BM * WB;
        for (int i = tid; i < BM * WB / 16; i += THREADS) {
            int r = i / (WB / 16), p = i % (WB / 16);
            uint32_t off = kc * WB + p * 16, row = min(n0 + r, a.rows - 1);  /* rows past the end: a copy, unused */
            bool in = off < row_bytes;  /* F16 tail chunk: zeros past cols (cols % 8 == 0) */
            cp_async16(dst + r * WB + p * 16, in ? wq + (size_t)row * row_bytes + off : wq, in ? 16 : 0);
        }
    };
    auto load_x = [&](uint32_t kc) {
        float *dst = sxr + (kc % S) * BN * XR;
        for (int i = tid; i < BN * BK / 4; i += THREADS) {
            int tt = i / (BK / 4), p = i % (BK / 4);
            uint32_t t = t0 + tt, k = kc * BK + p * 4;
            uint32_t n = t < n_tok && k < a.cols ? min(4u, a.cols - k) * 4 : 0;  /* zeros past cols / tokens */
            cp_async16(dst + tt * XR + p * 4, n ? x + (size_t)t * a.x_stride + k : x, n);
        }
    };
    /* this thread's weight rows (fragment rows g and g + 8 of its two 16-row tiles) and their
     * scales / mins, loaded one chunk ahead */
    uint32_t srow[2][2];
#pragma unroll
    for (int mt = 0; mt < 2; mt++)
#pragma unroll
        for (int h = 0; h < 2; h++)
            srow[mt][h] = min(n0 + wm * 32 + mt * 16 + h * 8 + g, a.rows - 1);
    float sc[2][2] = {}, mn[2][2] = {}, sc_next[2][2] = {}, mn_next[2][2] = {};
    auto load_scales = [&](uint32_t kc, float s_[2][2], float m_[2][2]) {
        if constexpr (QUANT) {
            if (kc >= nch)
                return;
#pragma unroll
            for (int mt = 0; mt < 2; mt++)
#pragma unroll
                for (int h = 0; h < 2; h++) {
                    s_[mt][h] = __half2float(__ldg(ws + (size_t)srow[mt][h] * nch + kc));
                    if (FMT == LT_WF_Q4)
                        m_[mt][h] = __half2float(__ldg(wmin + (size_t)srow[mt][h] * nch + kc));
                }
        }
    };

    /* weights first: they do not depend on the previous kernel */
    for (int s = 0; s < S - 1; s++)
        if ((uint32_t)s < nch)
            load_w(s);
    load_scales(0, sc, mn);
    pdl_wait();
    if (st->error) {
        asm volatile("cp.async.wait_all;" ::: "memory");
        return;
    }
    for (int s = 0; s < S - 1; s++) {  /* group s: x chunk s (group 0 also the weights above) */
        if ((uint32_t)s < nch)
            load_x(s);
        cp_async_commit();
    }

    const float *nw = (a.flags & LT_GEMV_NORM) ? (const float *)b.p[LT_GEMV_B_NORM] : nullptr;
    const float nw_one = (a.flags & LT_GEMV_NORM_ADD_ONE) ? 1.0f : 0.0f;
    float ss[SLOTS] = {};  /* sum of x^2 of each staging slot's token over the slot's columns */
    float acc[2][4][4] = {}, part[2][4][4] = {};

    for (uint32_t kc = 0; kc < nch; kc++) {
        cp_async_wait<S - 2>();
        __syncthreads();  /* chunk kc landed for every thread; chunk kc - 1's mma's are done */
        if (kc + S - 1 < nch) {
            load_w(kc + S - 1);
            load_x(kc + S - 1);
        }
        cp_async_commit();
        load_scales(kc + 1, sc_next, mn_next);

        /* stage x' = x * norm weight as TF32 hi / lo (and its Q4 block sum): slot (token ct,
         * quarter cq) holds the values of fragment column cq, position 8s + 2cq + half for
         * k-step s and half 0 (column cq) / 1 (column cq + 4) */
#pragma unroll
        for (int sl = 0; sl < SLOTS; sl++) {
            const int slot = tid + sl * THREADS, ct = slot >> 2, cq = slot & 3;
            const float *xr = sxr + (kc % S) * BN * XR + ct * XR;
            float e[8];
#pragma unroll
            for (int h = 0; h < 2; h++) {
                float4 v = *(const float4 *)(xr + gemm_xcol<FMT>(cq, 4 * h));
                e[4 * h] = v.x;
                e[4 * h + 1] = v.y;
                e[4 * h + 2] = v.z;
                e[4 * h + 3] = v.w;
            }
            float xsum = 0.0f;
#pragma unroll
            for (int j = 0; j < 8; j++) {
                ss[sl] += e[j] * e[j];
                uint32_t k = kc * BK + gemm_xcol<FMT>(cq, j);
                if (nw && k < a.cols)
                    e[j] *= nw_one + __ldg(nw + k);
                xsum += e[j];
            }
            if (FMT == LT_WF_Q4) {
                xsum += __shfl_xor_sync(0xffffffffu, xsum, 1);
                xsum += __shfl_xor_sync(0xffffffffu, xsum, 2);
                if (cq == 0)
                    sxsum[ct] = xsum;
            }
#pragma unroll
            for (int s = 0; s < 4; s++) {
                float h0 = to_tf32(e[s]), h1 = to_tf32(e[4 + s]);
                *(float2 *)(sxh + ct * XH + 8 * s + 2 * cq) = make_float2(h0, h1);
                *(float2 *)(sxl + ct * XH + 8 * s + 2 * cq) = make_float2(to_tf32(e[s] - h0), to_tf32(e[4 + s] - h1));
            }
        }
        __syncthreads();

        /* mma's: k-step s takes staged positions s (fragment column c) and 4 + s (column c + 4) */
        {
            const uint8_t *w = sw + (kc % S) * BM * WB;
            float wf[2][2][8];
#pragma unroll
            for (int mt = 0; mt < 2; mt++)
#pragma unroll
                for (int h = 0; h < 2; h++)
                    gemm_load_w<FMT>(w + (wm * 32 + mt * 16 + h * 8 + g) * WB, c, wf[mt][h]);
#pragma unroll
            for (int s = 0; s < 4; s++) {
                float2 bh[4], bl[4];
#pragma unroll
                for (int nt = 0; nt < 4; nt++) {
                    int tok = wn * 32 + nt * 8 + g;
                    bh[nt] = *(const float2 *)(sxh + tok * XH + 8 * s + 2 * c);
                    bl[nt] = *(const float2 *)(sxl + tok * XH + 8 * s + 2 * c);
                }
#pragma unroll
                for (int lo = 0; lo < 2; lo++)  /* all hi products, then all lo: 8 independent chains */
#pragma unroll
                    for (int mt = 0; mt < 2; mt++) {
                        float af[4] = {wf[mt][0][s], wf[mt][1][s], wf[mt][0][4 + s], wf[mt][1][4 + s]};
#pragma unroll
                        for (int nt = 0; nt < 4; nt++) {
                            float2 bv = lo ? bl[nt] : bh[nt];
                            mma_tf32(QUANT ? part[mt][nt] : acc[mt][nt], af, bv.x, bv.y);
                        }
                    }
            }
            if (QUANT) {  /* acc += scale * block sum (+ min * block sum of x) */
#pragma unroll
                for (int mt = 0; mt < 2; mt++)
#pragma unroll
                    for (int nt = 0; nt < 4; nt++) {
                        float2 xs2 = make_float2(0.0f, 0.0f);
                        if (FMT == LT_WF_Q4)
                            xs2 = *(const float2 *)(sxsum + wn * 32 + nt * 8 + 2 * c);
#pragma unroll
                        for (int i = 0; i < 4; i++) {
                            int h = i >> 1;
                            acc[mt][nt][i] += sc[mt][h] * part[mt][nt][i];
                            if (FMT == LT_WF_Q4)
                                acc[mt][nt][i] += mn[mt][h] * ((i & 1) ? xs2.y : xs2.x);
                            part[mt][nt][i] = 0.0f;
                        }
                    }
#pragma unroll
                for (int mt = 0; mt < 2; mt++)
#pragma unroll
                    for (int h = 0; h < 2; h++) {
                        sc[mt][h] = sc_next[mt][h];
                        mn[mt][h] = mn_next[mt][h];
                    }
            }
        }
    }
    asm volatile("cp.async.wait_all;" ::: "memory");

    /* RMS factors, then the tile (times them) into shared memory */
#pragma unroll
    for (int sl = 0; sl < SLOTS; sl++) {
        const int slot = tid + sl * THREADS;
        float v = ss[sl];
        v += __shfl_xor_sync(0xffffffffu, v, 1);
        v += __shfl_xor_sync(0xffffffffu, v, 2);
        if ((slot & 3) == 0)
            srn[slot >> 2] = nw ? rsqrtf(v / (float)a.cols + a.eps) : 1.0f;
    }
    __syncthreads();  /* also: every warp is done with the stage buffers the tile overwrites */
#pragma unroll
    for (int mt = 0; mt < 2; mt++)
#pragma unroll
        for (int nt = 0; nt < 4; nt++)
#pragma unroll
            for (int i = 0; i < 4; i++) {
                int n = wm * 32 + mt * 16 + g + (i >> 1) * 8, t = wn * 32 + nt * 8 + 2 * c + (i & 1);
                sout[t * OS + n] = acc[mt][nt][i] * srn[t];
            }
    __syncthreads();

    /* epilogues, whole rows of y at a time: + bias, SiLU(gate) * up, + residual */
    const float *bias = (a.flags & LT_GEMV_BIAS) ? (const float *)b.p[LT_GEMV_B_BIAS] : nullptr;
    const float *resid = (a.flags & LT_GEMV_RESID) ? (const float *)b.p[LT_GEMV_B_RESID] : nullptr;
    float *y = (float *)b.p[LT_GEMV_B_Y];
    if (a.flags & LT_GEMV_SILU_MUL) {
        for (int i = tid; i < BN * BM / 2; i += THREADS) {
            int tt = i / (BM / 2), p = i % (BM / 2);
            uint32_t t = t0 + tt, n = n0 + 2 * p;
            if (t >= n_tok || n >= a.rows)
                continue;
            float gate = sout[tt * OS + 2 * p], up = sout[tt * OS + 2 * p + 1];
            if (bias) {
                gate += bias[n];
                up += bias[n + 1];
            }
            float out = lt_silu_d(gate) * up;
            if (resid)
                out += resid[(size_t)t * a.resid_stride + n / 2];
            y[(size_t)t * a.y_stride + n / 2] = out;
        }
    } else {
        for (int i = tid; i < BN * BM; i += THREADS) {
            int tt = i / BM, p = i % BM;
            uint32_t t = t0 + tt, n = n0 + p;
            if (t >= n_tok || n >= a.rows)
                continue;
            float out = sout[tt * OS + p];
            if (bias)
                out += bias[n];
            if (resid)
                out += resid[(size_t)t * a.resid_stride + n];
            y[(size_t)t * a.y_stride + n] = out;
        }
    }
}

template <int FMT>
static void gemm_set_smem_fmt() {
    cudaFuncSetAttribute(k_gemm<FMT, 4>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)gemm_smem_bytes<FMT, 4>());
    cudaFuncSetAttribute(k_gemm<FMT, 2>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)gemm_smem_bytes<FMT, 2>());
    cudaFuncSetAttribute(k_gemm<FMT, 1>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)gemm_smem_bytes<FMT, 1>());
}

/* Once per process (beside the k_gemv attributes): the kernels' dynamic shared memory exceeds
 * the 48 KiB default. */
static void gemm_set_smem() {
    gemm_set_smem_fmt<LT_WF_F16>();
    gemm_set_smem_fmt<LT_WF_Q8>();
    gemm_set_smem_fmt<LT_WF_Q4>();
}

template <int FMT, int WM>
static void gemm_launch_fmt(const lt_gemv_args &a, const lt_binds &b, lt_step_args *st, uint32_t n_tok,
                            bool pdl, cudaStream_t s) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3((n_tok + GEMM_BN - 1) / GEMM_BN, (a.rows + 32 * WM - 1) / (32 * WM));
    cfg.blockDim = dim3(64 * WM);
    cfg.dynamicSmemBytes = gemm_smem_bytes<FMT, WM>();
    cfg.stream = s;
    cudaLaunchAttribute at[1];
    at[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    at[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = at;
    cfg.numAttrs = pdl ? 1 : 0;
    cudaLaunchKernelEx(&cfg, k_gemm<FMT, WM>, a, b, st, n_tok);
}

/* Rows per block: 128 where that still gives every SM two blocks, else fewer (more blocks). */
template <int FMT>
static void gemm_launch_rows(const lt_gemv_args &a, const lt_binds &b, lt_step_args *st, uint32_t n_tok,
                             int sms, bool pdl, cudaStream_t s) {
    uint32_t tok_tiles = (n_tok + GEMM_BN - 1) / GEMM_BN;
    if (tok_tiles * ((a.rows + 127) / 128) >= 2u * sms)
        gemm_launch_fmt<FMT, 4>(a, b, st, n_tok, pdl, s);
    else if (tok_tiles * ((a.rows + 63) / 64) >= 2u * sms)
        gemm_launch_fmt<FMT, 2>(a, b, st, n_tok, pdl, s);
    else
        gemm_launch_fmt<FMT, 1>(a, b, st, n_tok, pdl, s);
}

/* Launches k_gemm for a GEMV / LM_HEAD dispatch of T tokens and returns true, or returns false
 * (nothing launched) where k_gemv must run: F32 weights, the last-token LM head, fewer than
 * GEMM_MIN_TOKENS tokens, x rows not 16-byte aligned, F16 rows not whole 16-byte vectors, more
 * row tiles than a grid holds. sms: the GPU's multiprocessors; pdl: launch with programmatic
 * stream serialization. */
static bool launch_gemm(const lt_gemv_args &a, const lt_binds &b, lt_step_args *st, uint32_t T, bool lm_head,
                        int sms, bool pdl, cudaStream_t s) {
    if (lm_head && !(a.flags & LT_GEMV_ALL_TOKENS))
        return false;
    if (T < GEMM_MIN_TOKENS || a.wformat == LT_WF_F32 || a.x_stride % 4
        || (uintptr_t)b.p[LT_GEMV_B_X] % 16 || (uintptr_t)b.p[LT_GEMV_B_WQ] % 16 || (a.rows + 31) / 32 > 65535)
        return false;
    if (a.wformat == LT_WF_F16 && a.cols % 8)
        return false;
    switch (a.wformat) {
    case LT_WF_F16: gemm_launch_rows<LT_WF_F16>(a, b, st, T, sms, pdl, s); break;
    case LT_WF_Q8: gemm_launch_rows<LT_WF_Q8>(a, b, st, T, sms, pdl, s); break;
    case LT_WF_Q4: gemm_launch_rows<LT_WF_Q4>(a, b, st, T, sms, pdl, s); break;
    default: return false;
    }
    return true;
}
