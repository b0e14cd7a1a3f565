/* Prefill GEMM on tensor cores: what k_gemv computes (lt_gemv_args, metal/lattice_shared.h) for
 * many tokens at once, y[t, n] = sum_k W[n, k] x'[t, k] then the epilogues, with
 * mma.sync m16n8k16 bf16 -> f32 (sm_80+).
 *
 * Precision stays within the f32 bound of the kernel tests (3e-5 sum |w x|): Q8 (int8) and Q4
 * (0..15) weights are exact in bf16, F16 weights are split exactly into two bf16 (hi + lo); x is
 * split into hi = bf16(x) and lo = bf16(x - hi) (|x - hi - lo| <= 2^-18 |x|) and W hi x hi +
 * W hi x lo (+ W lo x hi for F16) are accumulated in f32; the Q8/Q4 scales (and Q4 mins, through
 * per-block sums of x) are applied in f32 to each 32-column block's sum. F32 weights are not
 * handled (they would need a three-way split): launch_gemm declines them and k_gemv runs.
 *
 * A block computes BM weight rows x BN tokens, 32 columns (one quant block) per chunk, NQ chunks
 * per pipeline stage: weights and raw x arrive by cp.async STAGES - 1 stages ahead (the weights
 * of the first stages before the programmatic-launch wait: they do not depend on earlier
 * kernels); each chunk's x is normalized (x * norm weight, staged per chunk in shared memory; the
 * RMS factor multiplies the sums at the end, as in k_gemv) and split once into shared memory,
 * then the warps (32 x 32 each) run the mma's. The x work of a block is shared by its BM rows,
 * which is why the wide GEMVs take 128-row blocks. Inside a chunk the 32 columns are taken in a
 * per-format order in which every thread's 8 columns per row are adjacent in memory (one 8- or
 * 16-byte load for its weights); any fixed order gives the same sum. The output tile goes through
 * shared memory so that the epilogues write whole rows of y. */
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "kernels.cuh"

#define GEMM_BK LT_QK                /* columns per pipeline stage: one quant block */
#define GEMM_XR (GEMM_BK + 4)        /* floats per raw x row: conflict-free float4 reads */
#define GEMM_XH 24                   /* words (bf16 pairs) per hi / lo x row: 16, padded for conflict-free reads */
#define GEMM_MIN_TOKENS 16           /* fewer tokens: k_gemv (the tile would be mostly padding) */

/* Bytes of one weight row per chunk of GEMM_BK columns. */
template <int FMT> struct gemm_fmt;
template <> struct gemm_fmt<LT_WF_F16> { static constexpr int WB = 2 * GEMM_BK; };
template <> struct gemm_fmt<LT_WF_Q8> { static constexpr int WB = GEMM_BK; };
template <> struct gemm_fmt<LT_WF_Q4> { static constexpr int WB = GEMM_BK / 2; };

/* Block shape: KS groups of warps, each on its own CPS chunks of every stage (split-K inside the
 * block, for grids too small to fill the GPU); a group has WM warps along rows x WN along tokens
 * (32 x 32 each). BM = 32 WM rows x BN = 32 WN tokens; STAGES stages of NQ = KS CPS chunks each
 * (several chunks per stage: fewer barriers per mma). The x preparation of a block is shared by
 * its BM rows: the larger BM, the less of it per mma. */
template <int WM, int WN, int KS, int CPS> struct gemm_shape {
    static constexpr int BM = 32 * WM, BN = 32 * WN, THREADS = 32 * WM * WN * KS, NQ = KS * CPS;
    static constexpr int STAGES = NQ > 1 ? 2 : 3;
    static constexpr int OS = BM + 4;  /* floats per token row of a group's output tile */
};

template <int FMT, int WM, int WN, int KS, int CPS>
constexpr size_t gemm_smem_bytes() {
    using G = gemm_shape<WM, WN, KS, CPS>;
    constexpr int NQ = G::NQ, BN = G::BN;
    return (size_t)G::STAGES * NQ * G::BM * gemm_fmt<FMT>::WB                   /* weights */
           + (size_t)G::STAGES * NQ * BN * GEMM_XR * 4 + 2 * NQ * BN * GEMM_XH * 4  /* raw x, x hi / lo */
           + (size_t)G::STAGES * NQ * GEMM_BK * 4                                  /* norm weights */
           + (NQ + 1) * BN * 4;                   /* x block sums (then sums of squares), RMS factors */
}

/* d += A (16x16, row) * B (16x8, col), bf16 inputs (pairs in 32-bit registers, the lower column
 * in the low half), f32 accumulators. */
__device__ __forceinline__ void mma_bf16(float d[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
/* d = A * B (zero accumulators in: no zeroing of d beforehand) */
__device__ __forceinline__ void mma_bf16_zero(float d[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%10,%10,%10,%10};"
                 : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "f"(0.0f));
}

__device__ __forceinline__ uint32_t bf16_pair(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *(const uint32_t *)&v;
}

/* (e0, e1) = hi + lo: hi the bf16 pair nearest, lo the bf16 pair nearest the remainder. */
__device__ __forceinline__ void bf16_split(float e0, float e1, uint32_t &hi, uint32_t &lo) {
    __nv_bfloat162 h = __floats2bfloat162_rn(e0, e1);
    float2 hf = __bfloat1622float2(h);
    hi = *(const uint32_t *)&h;
    lo = bf16_pair(e0 - hf.x, e1 - hf.y);
}

/* Four int8 as exact floats: the byte + 128 placed in the mantissa of 2^23, minus the bias
 * (cheaper than I2F); as two bf16 pairs (exact: 8 significant bits). */
__device__ __forceinline__ void s8x4_to_bf16(uint32_t w, uint32_t *out) {
    uint32_t u = w ^ 0x80808080u;
    float f[4];
#pragma unroll
    for (int i = 0; i < 4; i++)
        f[i] = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7540 + i)) - 8388736.0f;
    out[0] = bf16_pair(f[0], f[1]);
    out[1] = bf16_pair(f[2], f[3]);
}
/* Four bytes 0..15 as two bf16 pairs: 128 + n is bf16 0x4300 | n, minus 128. */
__device__ __forceinline__ void u4x4_to_bf16(uint32_t w, uint32_t *out) {
    const __nv_bfloat162 k128 = __floats2bfloat162_rn(128.0f, 128.0f);
    uint32_t p0 = __byte_perm(w, 0x43u, 0x4140), p1 = __byte_perm(w, 0x43u, 0x4342);
    __nv_bfloat162 v0 = __hsub2(*(const __nv_bfloat162 *)&p0, k128), v1 = __hsub2(*(const __nv_bfloat162 *)&p1, k128);
    out[0] = *(const uint32_t *)&v0;
    out[1] = *(const uint32_t *)&v1;
}

/* The 8 weights of a thread's row in a chunk (columns in the format's order, see gemm_xcol) as 4
 * bf16 pairs; F16 weights (11 significant bits) as hi + lo pairs, both exact. */
template <int FMT>
__device__ __forceinline__ void gemm_load_w(const uint8_t *row, int c, uint32_t *hi, uint32_t *lo) {
    if (FMT == LT_WF_Q8) {
        uint2 p = *(const uint2 *)(row + 8 * c);
        s8x4_to_bf16(p.x, hi);
        s8x4_to_bf16(p.y, hi + 2);
    } else if (FMT == LT_WF_Q4) {  /* byte j: value j low, value j + 16 high */
        uint32_t p = *(const uint32_t *)(row + 4 * c);
        u4x4_to_bf16(p & 0x0f0f0f0fu, hi);
        u4x4_to_bf16((p >> 4) & 0x0f0f0f0fu, hi + 2);
    } else {
        uint4 p = *(const uint4 *)(row + 16 * c);
        const __half2 *h = (const __half2 *)&p;
#pragma unroll
        for (int i = 0; i < 4; i++) {
            float2 v = __half22float2(h[i]);
            bf16_split(v.x, v.y, hi[i], lo[i]);
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

/* grid (token tiles, row tiles), gemm_shape<WM, WN, KS, CPS>::THREADS threads,
 * gemm_smem_bytes<FMT, WM, WN, KS, CPS>() dynamic shared memory. n_tok: tokens (x row t -> y row t). */
template <int FMT, int WM, int WN, int KS, int CPS>
__global__ void __launch_bounds__(gemm_shape<WM, WN, KS, CPS>::THREADS, WM * WN * KS >= 8 ? 2 : 3)
k_gemm(lt_gemv_args a, lt_binds b, lt_step_args *st, uint32_t n_tok) {
    using G = gemm_shape<WM, WN, KS, CPS>;
    constexpr int BM = G::BM, BN = G::BN, BK = GEMM_BK, S = G::STAGES, XR = GEMM_XR, XH = GEMM_XH;
    constexpr int THREADS = G::THREADS, OS = G::OS, NQ = G::NQ;
    constexpr int SLOTS = NQ * BN * 4 / THREADS;  /* x staging: 8 values per slot */
    constexpr int WB = gemm_fmt<FMT>::WB;
    constexpr int WVEC = NQ * BM * WB / 16, WLOADS = (WVEC + THREADS - 1) / THREADS;  /* 16-byte cp.async's per stage, per thread */
    constexpr int XLOADS = NQ * BN * BK / 4 / THREADS;
    static_assert(SLOTS * THREADS == NQ * BN * 4 && XLOADS * THREADS * 4 == NQ * BN * BK && NQ * BK <= THREADS,
                  "block shape");
    constexpr bool QUANT = FMT != LT_WF_F16;
    extern __shared__ __align__(16) uint8_t smem[];
    uint8_t *sw = smem;                                    /* [S][NQ][BM][WB] */
    float *sxr = (float *)(smem + S * NQ * BM * WB);       /* [S][NQ][BN][XR] raw x */
    uint32_t *sxh = (uint32_t *)(sxr + S * NQ * BN * XR), *sxl = sxh + NQ * BN * XH;  /* [NQ][BN][XH] */
    float *snw = (float *)(sxl + NQ * BN * XH);            /* [S][NQ][BK] norm weights (+ 1), zeros past cols */
    float *sxsum = snw + S * NQ * BK;                      /* [NQ][BN] Q4: sum of each chunk's x' per token */
    float *srn = sxsum + NQ * BN;                          /* [BN] RMS factors */
    float *sout = (float *)smem;                           /* [KS][BN][OS], after the main loop */
    static_assert((size_t)KS * BN * OS * 4 <= (size_t)S * NQ * BM * WB + S * NQ * BN * XR * 4 + 2 * NQ * BN * XH * 4,
                  "output tiles");

    pdl_begin();
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, c = lane & 3;
    const int grp = warp / (WM * WN), wm = warp % WM, wn = (warp / WM) % WN;  /* rows wm*32.., tokens wn*32.. */
    const uint32_t t0 = blockIdx.x * BN, n0 = blockIdx.y * BM;
    const uint32_t nch = (a.cols + BK - 1) / BK, nsup = (nch + NQ - 1) / NQ;  /* chunks, stages' worth */
    const uint32_t row_bytes = FMT == LT_WF_F16 ? a.cols * 2 : nch * WB;
    const uint8_t *wq = (const uint8_t *)b.p[LT_GEMV_B_WQ];
    const __half *ws = (const __half *)b.p[LT_GEMV_B_WS], *wmin = (const __half *)b.p[LT_GEMV_B_WM];
    const float *x = (const float *)b.p[LT_GEMV_B_X];
    const float *nw = (a.flags & LT_GEMV_NORM) ? (const float *)b.p[LT_GEMV_B_NORM] : nullptr;
    const float nw_one = (a.flags & LT_GEMV_NORM_ADD_ONE) ? 1.0f : 0.0f;

    /* stage i holds chunks i NQ .. i NQ + NQ - 1 (group grp: grp CPS ..); chunks past the end are zeros */
    auto load_w = [&](uint32_t sup) {
        uint8_t *dst = sw + (sup % S) * NQ * BM * WB;
#pragma unroll
        for (int j = 0; j < WLOADS; j++) {
            const int i = tid + j * THREADS, q = i / (BM * WB / 16), r = i / (WB / 16) % BM, p = i % (WB / 16);
            if (WVEC % THREADS && i >= WVEC)
                break;
            uint32_t off = (sup * NQ + q) * WB + p * 16, row = min(n0 + r, a.rows - 1);  /* rows past the end: a copy, unused */
            bool in = off < row_bytes;  /* also the F16 tail chunk: zeros past cols (cols % 8 == 0) */
            cp_async16(dst + i * 16, in ? wq + (size_t)row * row_bytes + off : wq, in ? 16 : 0);
        }
    };
    auto load_x = [&](uint32_t sup) {
        float *dst = sxr + (sup % S) * NQ * BN * XR;
#pragma unroll
        for (int j = 0; j < XLOADS; j++) {
            const int i = tid + j * THREADS, q = i / (BN * BK / 4), tt = i / (BK / 4) % BN, p = i % (BK / 4);
            uint32_t t = t0 + tt, k = (sup * NQ + q) * BK + p * 4;
            uint32_t n = t < n_tok && k < a.cols ? min(4u, a.cols - k) * 4 : 0;  /* zeros past cols / tokens */
            cp_async16(dst + (q * BN + tt) * XR + p * 4, n ? x + (size_t)t * a.x_stride + k : x, n);
        }
    };
    /* the norm weight (+ 1) of the stage's column tid (tid < NQ BK), 0 past cols: read at the top
     * of a stage, stored in shared memory at its end (the latency hidden behind the mma's) */
    auto nw_col = [&](uint32_t sup) {
        uint32_t k = sup * NQ * BK + tid;
        return k < a.cols ? nw_one + __ldg(nw + k) : 0.0f;
    };
    /* this thread's weight rows (fragment rows g and g + 8 of its two 16-row tiles) and their
     * scales / mins, requested at the top of a stage, used after its mma's */
    uint32_t srow[2][2];
#pragma unroll
    for (int mt = 0; mt < 2; mt++)
#pragma unroll
        for (int h = 0; h < 2; h++)
            srow[mt][h] = min(n0 + wm * 32 + mt * 16 + h * 8 + g, a.rows - 1);
    float sc[CPS][2][2] = {}, mn[CPS][2][2] = {};
    auto load_scales = [&](uint32_t sup) {
        if constexpr (QUANT) {
#pragma unroll
            for (int u = 0; u < CPS; u++) {
                uint32_t kc = sup * NQ + grp * CPS + u;
                if (kc >= nch)
                    continue;  /* a zero chunk: its sums are zero */
#pragma unroll
                for (int mt = 0; mt < 2; mt++)
#pragma unroll
                    for (int h = 0; h < 2; h++) {
                        sc[u][mt][h] = __half2float(__ldg(ws + (size_t)srow[mt][h] * nch + kc));
                        if (FMT == LT_WF_Q4)
                            mn[u][mt][h] = __half2float(__ldg(wmin + (size_t)srow[mt][h] * nch + kc));
                    }
            }
        }
    };

    /* weights first: they do not depend on the previous kernel */
    for (int s = 0; s < S - 1; s++)
        if ((uint32_t)s < nsup)
            load_w(s);
    if (nw && tid < NQ * BK)
        for (int s = 0; s < S - 1; s++)
            if ((uint32_t)s < nsup)
                snw[s * NQ * BK + tid] = nw_col(s);
    pdl_wait();
    if (st->error) {
        cp_async_wait_all();
        return;
    }
    for (int s = 0; s < S - 1; s++) {  /* group s: x of stage s (group 0 also the weights above) */
        if ((uint32_t)s < nsup)
            load_x(s);
        cp_async_commit();
    }

    float ss[SLOTS] = {};  /* sum of x^2 of each staging slot's token over the slot's columns */
    float acc[2][4][4] = {}, part[2][4][4];

    for (uint32_t sup = 0; sup < nsup; sup++) {
        cp_async_wait<S - 2>();
        __syncthreads();  /* stage sup landed for every thread; the previous stage's mma's are done */
        const bool next = sup + S - 1 < nsup, nw_next = nw && next && tid < NQ * BK;
        if (next) {
            load_w(sup + S - 1);
            load_x(sup + S - 1);
        }
        cp_async_commit();
        const float nw_v = nw_next ? nw_col(sup + S - 1) : 0.0f;
        load_scales(sup);

        /* stage x' = x * norm weight as bf16 hi / lo pairs (and its Q4 block sum): slot (chunk q,
         * token ct, quarter cq) holds the values of fragment column pair cq; word 8s + 2cq + p:
         * k-step s, p = 0 columns 2cq, 2cq + 1, p = 1 columns 2cq + 8, 2cq + 9 (staged positions
         * 4s + 2p ..) */
#pragma unroll
        for (int sl = 0; sl < SLOTS; sl++) {
            const int slot = tid + sl * THREADS, q = slot / (BN * 4), ct = slot / 4 % BN, cq = slot & 3;
            const float *xr = sxr + ((sup % S) * NQ * BN + q * BN + ct) * XR;
            const float *nr = snw + ((sup % S) * NQ + q) * BK;
            float e[8];
#pragma unroll
            for (int h = 0; h < 2; h++) {
                float4 v = *(const float4 *)(xr + gemm_xcol<FMT>(cq, 4 * h));
                e[4 * h] = v.x;
                e[4 * h + 1] = v.y;
                e[4 * h + 2] = v.z;
                e[4 * h + 3] = v.w;
            }
#pragma unroll
            for (int j = 0; j < 8; j++)
                ss[sl] += e[j] * e[j];
            if (nw) {
#pragma unroll
                for (int h = 0; h < 2; h++) {
                    float4 v = *(const float4 *)(nr + gemm_xcol<FMT>(cq, 4 * h));
                    e[4 * h] *= v.x;
                    e[4 * h + 1] *= v.y;
                    e[4 * h + 2] *= v.z;
                    e[4 * h + 3] *= v.w;
                }
            }
            if (FMT == LT_WF_Q4) {
                float xsum = 0.0f;
#pragma unroll
                for (int j = 0; j < 8; j++)
                    xsum += e[j];
                xsum += __shfl_xor_sync(0xffffffffu, xsum, 1);
                xsum += __shfl_xor_sync(0xffffffffu, xsum, 2);
                if (cq == 0)
                    sxsum[q * BN + ct] = xsum;
            }
#pragma unroll
            for (int s = 0; s < 2; s++) {
                uint2 h, l;
                bf16_split(e[4 * s], e[4 * s + 1], h.x, l.x);
                bf16_split(e[4 * s + 2], e[4 * s + 3], h.y, l.y);
                *(uint2 *)(sxh + (q * BN + ct) * XH + 8 * s + 2 * cq) = h;
                *(uint2 *)(sxl + (q * BN + ct) * XH + 8 * s + 2 * cq) = l;
            }
        }
        __syncthreads();

        /* this group's chunks. mma's: k-step s takes staged positions 4s .. 4s + 3 (fragment
         * columns 2c, 2c + 1, 2c + 8, 2c + 9); W hi x hi, W hi x lo (and for F16 W lo x hi; W lo
         * x lo is below 2^-17). Q8 / Q4: each chunk's sums start from zero in part, then go to acc
         * times the scale. */
#pragma unroll
        for (int u = 0; u < CPS; u++) {
            const int q = grp * CPS + u;
            const uint8_t *w = sw + ((sup % S) * NQ + q) * BM * WB;
            const uint32_t *xh = sxh + q * BN * XH, *xl = sxl + q * BN * XH;
            uint32_t wh[2][2][4], wl[2][2][4];
#pragma unroll
            for (int mt = 0; mt < 2; mt++)
#pragma unroll
                for (int h = 0; h < 2; h++)
                    gemm_load_w<FMT>(w + (wm * 32 + mt * 16 + h * 8 + g) * WB, c, wh[mt][h], wl[mt][h]);
#pragma unroll
            for (int s = 0; s < 2; s++) {
                uint2 bh[4], bl[4];
#pragma unroll
                for (int nt = 0; nt < 4; nt++) {
                    int tok = wn * 32 + nt * 8 + g;
                    bh[nt] = *(const uint2 *)(xh + tok * XH + 8 * s + 2 * c);
                    bl[nt] = *(const uint2 *)(xl + tok * XH + 8 * s + 2 * c);
                }
                constexpr int NPROD = QUANT ? 2 : 3;
#pragma unroll
                for (int pr = 0; pr < NPROD; pr++)  /* one product for all 8 tiles, then the next */
#pragma unroll
                    for (int mt = 0; mt < 2; mt++) {
                        const uint32_t(*wa)[4] = pr == 2 ? wl[mt] : wh[mt];
                        uint32_t af[4] = {wa[0][2 * s], wa[1][2 * s], wa[0][2 * s + 1], wa[1][2 * s + 1]};
#pragma unroll
                        for (int nt = 0; nt < 4; nt++) {
                            uint2 bv = pr == 1 ? bl[nt] : bh[nt];
                            if (!QUANT)
                                mma_bf16(acc[mt][nt], af, bv.x, bv.y);
                            else if (s == 0 && pr == 0)
                                mma_bf16_zero(part[mt][nt], af, bv.x, bv.y);
                            else
                                mma_bf16(part[mt][nt], af, bv.x, bv.y);
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
                            xs2 = *(const float2 *)(sxsum + q * BN + wn * 32 + nt * 8 + 2 * c);
#pragma unroll
                        for (int i = 0; i < 4; i++) {
                            int h = i >> 1;
                            acc[mt][nt][i] += sc[u][mt][h] * part[mt][nt][i];
                            if (FMT == LT_WF_Q4)
                                acc[mt][nt][i] += mn[u][mt][h] * ((i & 1) ? xs2.y : xs2.x);
                        }
                    }
            }
        }
        if (nw_next)  /* its buffer was last read before this stage's first barrier */
            snw[((sup + S - 1) % S) * NQ * BK + tid] = nw_v;
    }
    cp_async_wait_all();

    /* sums of squares per (chunk group, token), then the RMS factors; each group's tile into
     * shared memory */
    __syncthreads();  /* every warp is done with the stage buffers the tiles overwrite, and sxsum */
#pragma unroll
    for (int sl = 0; sl < SLOTS; sl++) {
        const int slot = tid + sl * THREADS;
        float v = ss[sl];
        v += __shfl_xor_sync(0xffffffffu, v, 1);
        v += __shfl_xor_sync(0xffffffffu, v, 2);
        if ((slot & 3) == 0)
            sxsum[slot / 4] = v;  /* [chunk q][token] */
    }
#pragma unroll
    for (int mt = 0; mt < 2; mt++)
#pragma unroll
        for (int nt = 0; nt < 4; nt++)
#pragma unroll
            for (int i = 0; i < 4; i++) {
                int n = wm * 32 + mt * 16 + g + (i >> 1) * 8, t = wn * 32 + nt * 8 + 2 * c + (i & 1);
                sout[(grp * BN + t) * OS + n] = acc[mt][nt][i];
            }
    __syncthreads();
    if (tid < BN) {
        float v = 0.0f;
        for (int q = 0; q < NQ; q++)
            v += sxsum[q * BN + tid];
        srn[tid] = nw ? rsqrtf(v / (float)a.cols + a.eps) : 1.0f;
    }
    __syncthreads();
    auto dot = [&](int tt, int p) {  /* the groups' sums times the RMS factor */
        float v = 0.0f;
#pragma unroll
        for (int q = 0; q < KS; q++)
            v += sout[(q * BN + tt) * OS + p];
        return v * srn[tt];
    };

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
            float gate = dot(tt, 2 * p), up = dot(tt, 2 * p + 1);
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
            float out = dot(tt, p);
            if (bias)
                out += bias[n];
            if (resid)
                out += resid[(size_t)t * a.resid_stride + n];
            y[(size_t)t * a.y_stride + n] = out;
        }
    }
}

/* The block shapes launch_gemm picks from (warps along rows, along tokens, chunk groups, chunks per
 * group and stage). */
#define GEMM_SHAPES(X) X(4, 2, 1, 2) X(2, 2, 2, 1) X(2, 1, 4, 1) X(1, 1, 4, 1)

template <int FMT>
static void gemm_set_smem_fmt() {
#define LT_GEMM_SMEM(WM, WN, KS, CPS)                                                                 \
    cudaFuncSetAttribute(k_gemm<FMT, WM, WN, KS, CPS>, cudaFuncAttributeMaxDynamicSharedMemorySize,  \
                         (int)gemm_smem_bytes<FMT, WM, WN, KS, CPS>());
    GEMM_SHAPES(LT_GEMM_SMEM)
#undef LT_GEMM_SMEM
}

/* Once per process (beside the k_gemv attributes): the kernels' dynamic shared memory exceeds
 * the 48 KiB default. */
static void gemm_set_smem() {
    gemm_set_smem_fmt<LT_WF_F16>();
    gemm_set_smem_fmt<LT_WF_Q8>();
    gemm_set_smem_fmt<LT_WF_Q4>();
}

template <int FMT, int WM, int WN, int KS, int CPS>
static void gemm_launch_fmt(const lt_gemv_args &a, const lt_binds &b, lt_step_args *st, uint32_t n_tok,
                            bool pdl, cudaStream_t s) {
    using G = gemm_shape<WM, WN, KS, CPS>;
    lt_launch(k_gemm<FMT, WM, WN, KS, CPS>, dim3((n_tok + G::BN - 1) / G::BN, (a.rows + G::BM - 1) / G::BM),
              dim3(G::THREADS), gemm_smem_bytes<FMT, WM, WN, KS, CPS>(), s, pdl, a, b, st, n_tok);
}

/* 128 x 64 tiles where they give every SM a block; else 64 x 64 in two chunk groups, likewise; else
 * 64 x 32 in four chunk groups unless that leaves most SMs idle (then 32 x 32). H200, Q8, tokens
 * x rows x cols: 256 x 8224 x 1024 0.058 ms on 128 x 64 (0.073 on 64 x 64 / 2 groups, 0.080 on 64 x
 * 32 / 4 groups); 256 x 3072 x 576 0.026 on 64 x 64 / 2 groups (0.028, 0.030); 256 x 1024 x 3584
 * 0.048 on 64 x 32 / 4 groups (0.118, 0.079); 64 x 1024 x 3584 0.046 on 32 x 32 (0.047). */
template <int FMT>
static void gemm_launch_shape(const lt_gemv_args &a, const lt_binds &b, lt_step_args *st, uint32_t n_tok,
                              int sms, bool pdl, cudaStream_t s) {
    auto blocks = [&](uint32_t bm, uint32_t bn) { return (uint64_t)((n_tok + bn - 1) / bn) * ((a.rows + bm - 1) / bm); };
    if (blocks(128, 64) >= (uint64_t)sms)
        gemm_launch_fmt<FMT, 4, 2, 1, 2>(a, b, st, n_tok, pdl, s);
    else if (blocks(64, 64) >= (uint64_t)sms)
        gemm_launch_fmt<FMT, 2, 2, 2, 1>(a, b, st, n_tok, pdl, s);
    else if (blocks(64, 32) >= (uint64_t)sms / 4)
        gemm_launch_fmt<FMT, 2, 1, 4, 1>(a, b, st, n_tok, pdl, s);
    else
        gemm_launch_fmt<FMT, 1, 1, 4, 1>(a, b, st, n_tok, pdl, s);
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
    case LT_WF_F16: gemm_launch_shape<LT_WF_F16>(a, b, st, T, sms, pdl, s); break;
    case LT_WF_Q8: gemm_launch_shape<LT_WF_Q8>(a, b, st, T, sms, pdl, s); break;
    case LT_WF_Q4: gemm_launch_shape<LT_WF_Q4>(a, b, st, T, sms, pdl, s); break;
    default: return false;
    }
    return true;
}
