/* x86-64 AVX2 + FMA + F16C path. Q8/Q4: int8/uint4 weights x int16-quantized activations with
 * pmaddwd; f16/f32 weights: widened to f32, FMA against f32 activations. Compiled with
 * per-function target attributes, selected only when cpuid says so. */
#include "cpu_internal.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#define AVX2 __attribute__((target("avx2,fma,f16c")))

AVX2 static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

AVX2 static inline __m256 h8(const uint16_t *p) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
}

AVX2 static inline float h1(uint16_t h) {
    return _cvtsh_ss(h);
}

/* Q8/Q4 rows against int16-quantized activations (lt_x16 records). Per block of 32 and token,
 * two pmaddwd of the widened weights (Q8 sign-extended, Q4 the 0..15 nibbles) with x give exact
 * int32 lanes, converted and scaled by w_scale * x_scale (+ Q4's w_min * sum(x)). The scale
 * products of 8 blocks are formed at once with vector multiplies, then broadcast from a table.
 *
 * A call computes an RM x RN tile (rows x tokens) in RM * RN accumulators: each block of weights
 * is widened once per RN tokens, each block of x loaded once per row. Decode (one token) runs
 * GEMV_RM rows at a time, so that several independent accumulations hide the FMA latency. */
#ifndef GEMM_RM
#define GEMM_RM 4
#define GEMM_RN 3
#endif
#define GEMV_RM 4
#define TOK_TILE 15  /* tokens per call: whole 4x3 tiles */
#define TILE_RM 4   /* the largest RM */
#define TILE_RN 4   /* the largest RN */
#define PREFETCH_AHEAD 1024  /* bytes of weights fetched ahead of the block being multiplied */

__attribute__((always_inline)) AVX2 static inline void widen_block(const uint8_t *q, int q4, __m256i *w0,
                                                                   __m256i *w1) {
    if (q4) {
        const __m128i mask = _mm_set1_epi8(0x0f);
        __m128i v = _mm_loadu_si128((const __m128i *)q);
        *w0 = _mm256_cvtepu8_epi16(_mm_and_si128(v, mask));
        *w1 = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(v, 4), mask));
    } else {
        *w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)q));
        *w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(q + 16)));
    }
}

/* out[t * ostride + r] for r < RM rows from row0, t < RN tokens from x (records xs floats apart). */
__attribute__((always_inline)) AVX2 static inline void quant_tile(
        const lt_wmat *w, uint32_t row0, const float *x, size_t xs, float *out, uint32_t ostride,
        const int RM, const int RN, const int q4) {
    uint32_t kp = w->stride, nb = kp / LT_QK;
    const int16_t *xq[TILE_RN];
    const float *xd[TILE_RN], *xsum[TILE_RN];
    const uint8_t *wq[TILE_RM];
    const uint16_t *ws[TILE_RM], *wm[TILE_RM];
    __m256 acc[TILE_RM][TILE_RN];
    float mins[TILE_RM][TILE_RN];
    float sc[TILE_RM][TILE_RN][8] __attribute__((aligned(32)));
#pragma GCC unroll 4
    for (int t = 0; t < RN; t++) {
        xq[t] = (const int16_t *)(x + t * xs);
        xd[t] = x + t * xs + kp / 2;
        xsum[t] = xd[t] + nb;
    }
#pragma GCC unroll 4
    for (int r = 0; r < RM; r++) {
        size_t row = row0 + r;
        wq[r] = (const uint8_t *)w->q + row * (q4 ? kp / 2 : kp);
        ws[r] = w->s + row * nb;
        wm[r] = q4 ? w->m + row * nb : NULL;
#pragma GCC unroll 4
        for (int t = 0; t < RN; t++) {
            acc[r][t] = _mm256_setzero_ps();
            mins[r][t] = 0.0f;
        }
    }
    for (uint32_t b0 = 0; b0 < nb; b0 += 8) {
        uint32_t n = nb - b0 < 8 ? nb - b0 : 8;
        if (n == 8) {
#pragma GCC unroll 4
            for (int r = 0; r < RM; r++) {
                __m256 s = h8(ws[r] + b0);
#pragma GCC unroll 4
                for (int t = 0; t < RN; t++) {
                    _mm256_store_ps(sc[r][t], _mm256_mul_ps(s, _mm256_loadu_ps(xd[t] + b0)));
                    if (q4)
                        mins[r][t] += hsum(_mm256_mul_ps(h8(wm[r] + b0), _mm256_loadu_ps(xsum[t] + b0)));
                }
            }
        } else {
            for (int r = 0; r < RM; r++)
                for (int t = 0; t < RN; t++)
                    for (uint32_t j = 0; j < n; j++) {
                        sc[r][t][j] = h1(ws[r][b0 + j]) * xd[t][b0 + j];
                        if (q4)
                            mins[r][t] += h1(wm[r][b0 + j]) * xsum[t][b0 + j];
                    }
        }
        /* The next tile's scales (its rows follow this tile's, as do its quants below). */
        _mm_prefetch((const char *)(ws[RM - 1] + nb) + (size_t)b0 * 2 * RM + PREFETCH_AHEAD / 8, _MM_HINT_T0);
        for (uint32_t j = 0; j < n; j++) {
            uint32_t b = b0 + j;
            /* Rows are a few hundred bytes: too short for the hardware prefetcher to ramp up on
             * the RM interleaved row streams, so decode ran at a third of DRAM bandwidth. The
             * next tile is contiguous after this one; fetch it as this one is consumed. */
            const char *next = (const char *)wq[RM - 1] + (q4 ? kp / 2 : kp) + (size_t)b * (q4 ? 16 : LT_QK) * RM;
            _mm_prefetch(next + PREFETCH_AHEAD, _MM_HINT_T0);
            if (!q4 || RM > 2)
                _mm_prefetch(next + PREFETCH_AHEAD + 64, _MM_HINT_T0);
#pragma GCC unroll 4
            for (int r = 0; r < RM; r++) {
                __m256i w0, w1;
                widen_block(wq[r] + b * (q4 ? 16 : LT_QK), q4, &w0, &w1);
#pragma GCC unroll 4
                for (int t = 0; t < RN; t++) {
                    const int16_t *xb = xq[t] + b * LT_QK;
                    __m256i p = _mm256_add_epi32(_mm256_madd_epi16(w0, _mm256_loadu_si256((const __m256i *)xb)),
                                                 _mm256_madd_epi16(w1, _mm256_loadu_si256((const __m256i *)(xb + 16))));
                    acc[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_broadcast_ss(&sc[r][t][j]), acc[r][t]);
                }
            }
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < RM; r++)
#pragma GCC unroll 4
        for (int t = 0; t < RN; t++)
            out[t * ostride + r] = hsum(acc[r][t]) + mins[r][t];
}

/* Every tile shape up to TILE_RM x TILE_RN, each compiled with constant RM / RN. */
typedef void (*tile_fn)(const lt_wmat *, uint32_t, const float *, size_t, float *, uint32_t);
#define TILE_FN(NAME, RM, RN, Q4)                                                               \
    AVX2 static void NAME(const lt_wmat *w, uint32_t row0, const float *x, size_t xs, float *out, \
                          uint32_t ostride) {                                                   \
        quant_tile(w, row0, x, xs, out, ostride, RM, RN, Q4);                                   \
    }
#define TILE_ROW(P, RN, Q4)                                                                     \
    TILE_FN(P##_1x##RN, 1, RN, Q4) TILE_FN(P##_2x##RN, 2, RN, Q4)                               \
    TILE_FN(P##_3x##RN, 3, RN, Q4) TILE_FN(P##_4x##RN, 4, RN, Q4)
#define TILES_FOR(P, Q4)                                                                        \
    TILE_ROW(P, 1, Q4) TILE_ROW(P, 2, Q4) TILE_ROW(P, 3, Q4) TILE_ROW(P, 4, Q4)                 \
    static const tile_fn P[TILE_RN][TILE_RM] = {{P##_1x1, P##_2x1, P##_3x1, P##_4x1},           \
                                                {P##_1x2, P##_2x2, P##_3x2, P##_4x2},           \
                                                {P##_1x3, P##_2x3, P##_3x3, P##_4x3},           \
                                                {P##_1x4, P##_2x4, P##_3x4, P##_4x4}};

TILES_FOR(tiles_q8, 0)
TILES_FOR(tiles_q4, 1)

AVX2 static inline void quant_gemm(const tile_fn tiles[TILE_RN][TILE_RM], const lt_wmat *w, uint32_t row0,
                                   uint32_t nrows, const float *x, size_t xs, uint32_t nt, float *out) {
    uint32_t rm = nt == 1 ? GEMV_RM : GEMM_RM, ntiles = (nt + GEMM_RN - 1) / GEMM_RN;
    for (uint32_t i = 0; i < nrows; i += rm) {
        uint32_t nr = nrows - i < rm ? nrows - i : rm;
        for (uint32_t k = 0; k < ntiles; k++) {  /* balanced: 4 tokens = 2+2, not 3+1 */
            uint32_t t = nt * k / ntiles, n = nt * (k + 1) / ntiles - t;
            tiles[n - 1][nr - 1](w, row0 + i, x + t * xs, xs, out + t * nrows + i, nrows);
        }
    }
}

AVX2 static void gemm_q8(const lt_wmat *w, uint32_t row0, uint32_t nrows, const float *x,
                         size_t xs, uint32_t nt, float *out) {
    quant_gemm(tiles_q8, w, row0, nrows, x, xs, nt, out);
}

AVX2 static void gemm_q4(const lt_wmat *w, uint32_t row0, uint32_t nrows, const float *x,
                         size_t xs, uint32_t nt, float *out) {
    quant_gemm(tiles_q4, w, row0, nrows, x, xs, nt, out);
}

/* f16 / f32 rows: 8 lanes at a time, scalar tail (cols need not be a multiple of 8). */
#define FLOAT_ROW(LOAD8, LOAD1)                                                                 \
    for (uint32_t t = 0; t < nt; t++) {                                                         \
        const float *xt = x + t * xs;                                                           \
        __m256 a0 = _mm256_setzero_ps(), a1 = a0;                                               \
        uint32_t k = 0;                                                                         \
        for (; k + 16 <= n; k += 16) {                                                          \
            a0 = _mm256_fmadd_ps(LOAD8(wr + k), _mm256_loadu_ps(xt + k), a0);                   \
            a1 = _mm256_fmadd_ps(LOAD8(wr + k + 8), _mm256_loadu_ps(xt + k + 8), a1);           \
        }                                                                                       \
        for (; k + 8 <= n; k += 8)                                                              \
            a0 = _mm256_fmadd_ps(LOAD8(wr + k), _mm256_loadu_ps(xt + k), a0);                   \
        float acc = hsum(_mm256_add_ps(a0, a1));                                                \
        for (; k < n; k++)                                                                      \
            acc += LOAD1(wr[k]) * xt[k];                                                        \
        out[t * nrows + i] = acc;                                                               \
    }

#define F32_LOAD1(v) (v)
AVX2 static void gemm_f32(const lt_wmat *w, uint32_t row0, uint32_t nrows, const float *x,
                          size_t xs, uint32_t nt, float *out) {
    uint32_t n = w->cols;
    for (uint32_t i = 0; i < nrows; i++) {
        const float *wr = (const float *)w->q + (size_t)(row0 + i) * w->stride;
        FLOAT_ROW(_mm256_loadu_ps, F32_LOAD1)
    }
}

AVX2 static void gemm_f16(const lt_wmat *w, uint32_t row0, uint32_t nrows, const float *x,
                          size_t xs, uint32_t nt, float *out) {
    uint32_t n = w->cols;
    for (uint32_t i = 0; i < nrows; i++) {
        const uint16_t *wr = (const uint16_t *)w->q + (size_t)(row0 + i) * w->stride;
        FLOAT_ROW(h8, lt_f16_to_f32)
    }
}

AVX2 static float dot_f16(const float *x, const uint16_t *h, uint32_t n) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0;
    uint32_t k = 0;
    for (; k + 16 <= n; k += 16) {
        a0 = _mm256_fmadd_ps(h8(h + k), _mm256_loadu_ps(x + k), a0);
        a1 = _mm256_fmadd_ps(h8(h + k + 8), _mm256_loadu_ps(x + k + 8), a1);
    }
    for (; k + 8 <= n; k += 8)
        a0 = _mm256_fmadd_ps(h8(h + k), _mm256_loadu_ps(x + k), a0);
    float acc = hsum(_mm256_add_ps(a0, a1));
    for (; k < n; k++)
        acc += x[k] * lt_f16_to_f32(h[k]);
    return acc;
}

AVX2 static void axpy_f16(float *y, float a, const uint16_t *h, uint32_t n) {
    __m256 va = _mm256_set1_ps(a);
    uint32_t k = 0;
    for (; k + 8 <= n; k += 8)
        _mm256_storeu_ps(y + k, _mm256_fmadd_ps(va, h8(h + k), _mm256_loadu_ps(y + k)));
    for (; k < n; k++)
        y[k] += a * lt_f16_to_f32(h[k]);
}

/* exp(x) for x <= 0 (softmax after subtracting the max): 2^n * p(r), r = x - n ln2 in
 * [-ln2/2, ln2/2], p a degree-6 Taylor polynomial (relative error ~2e-7); x < -87 gives 0. */
AVX2 static inline __m256 exp_nonpos(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.0f);
    __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_max_ps(x, lo);
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145752f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.42860677e-6f), r);
    __m256 p = _mm256_set1_ps(1.0f / 720);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

AVX2 static float exp_shift(float *s, uint32_t n, float mx) {
    __m256 vm = _mm256_set1_ps(mx), sum = _mm256_setzero_ps();
    uint32_t j = 0;
    for (; j + 8 <= n; j += 8) {
        __m256 e = exp_nonpos(_mm256_sub_ps(_mm256_loadu_ps(s + j), vm));
        _mm256_storeu_ps(s + j, e);
        sum = _mm256_add_ps(sum, e);
    }
    float total = hsum(sum);
    for (; j < n; j++) {
        s[j] = expf(s[j] - mx);
        total += s[j];
    }
    return total;
}

/* sigmoid(x) from e = exp(-|x|) <= 1: 1 / (1 + e) for x >= 0, e / (1 + e) below (no overflow). */
AVX2 static void sigmoid(float *x, uint32_t n) {
    const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
    uint32_t j = 0;
    for (; j + 8 <= n; j += 8) {
        __m256 v = _mm256_loadu_ps(x + j);
        __m256 e = exp_nonpos(_mm256_or_ps(v, sign));
        __m256 r = _mm256_div_ps(_mm256_blendv_ps(one, e, v), _mm256_add_ps(one, e));
        _mm256_storeu_ps(x + j, _mm256_blendv_ps(r, v, _mm256_cmp_ps(v, v, _CMP_UNORD_Q)));  /* NaN stays */
    }
    for (; j < n; j++)
        x[j] = lt_sigmoid(x[j]);
}

/* In-register 8x8 transpose of f32 rows. */
AVX2 static inline void transpose8(__m256 r[8]) {
    __m256 t[8], u[8];
    for (int i = 0; i < 4; i++) {
        t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 2; i++) {
        u[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
        u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xee);
        u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
        u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xee);
    }
    for (int i = 0; i < 4; i++) {
        r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
        r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
    }
}

/* Prefill attention as two small matrix products per kv head, so that each K and V row is
 * converted from f16 once for all queries and no score needs a horizontal sum: keys are taken
 * 8 at a time, transposed to [D][8] f32, and 4 queries accumulate their 8 scores each with one
 * FMA per dimension; then P V runs 4 queries x 16 dimensions in registers over all keys. */
AVX2 static void attend_block(const lt_attend_block *b) {
    uint32_t D = b->D, nq = b->nq, maxlen = 0;
    for (uint32_t i = 0; i < nq; i++)
        maxlen = b->len[i] > maxlen ? b->len[i] : maxlen;
    uint32_t lp = (maxlen + 7) / 8 * 8, nq4 = (nq + 3) / 4 * 4;
    float *scores = b->scratch, *zeros = scores + (size_t)nq4 * lp, *kt = zeros + lp, *qzero = kt + 8 * D;
    memset(zeros, 0, lp * sizeof(float));
    memset(qzero, 0, D * sizeof(float));
    const float *q[LT_ATTN_BLOCK_Q + 3];
    for (uint32_t i = 0; i < nq4; i++)
        q[i] = i < nq ? b->q[i] : qzero;
    const __m256 vscale = _mm256_set1_ps(b->scale);
    for (uint32_t j0 = 0; j0 < maxlen; j0 += 8) {
        uint32_t nk = maxlen - j0 < 8 ? maxlen - j0 : 8;
        for (uint32_t d0 = 0; d0 < D; d0 += 8) {
            __m256 r[8];
            for (uint32_t i = 0; i < 8; i++)
                r[i] = i < nk ? h8(b->k + (size_t)(j0 + i) * D + d0) : _mm256_setzero_ps();
            transpose8(r);
            for (int i = 0; i < 8; i++)
                _mm256_store_ps(kt + (size_t)(d0 + i) * 8, r[i]);
        }
        for (uint32_t i = 0; i < nq4; i += 4) {
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (uint32_t d = 0; d < D; d++) {
                __m256 kd = _mm256_load_ps(kt + (size_t)d * 8);
                a0 = _mm256_fmadd_ps(_mm256_broadcast_ss(q[i] + d), kd, a0);
                a1 = _mm256_fmadd_ps(_mm256_broadcast_ss(q[i + 1] + d), kd, a1);
                a2 = _mm256_fmadd_ps(_mm256_broadcast_ss(q[i + 2] + d), kd, a2);
                a3 = _mm256_fmadd_ps(_mm256_broadcast_ss(q[i + 3] + d), kd, a3);
            }
            _mm256_storeu_ps(scores + (size_t)i * lp + j0, _mm256_mul_ps(a0, vscale));
            _mm256_storeu_ps(scores + (size_t)(i + 1) * lp + j0, _mm256_mul_ps(a1, vscale));
            _mm256_storeu_ps(scores + (size_t)(i + 2) * lp + j0, _mm256_mul_ps(a2, vscale));
            _mm256_storeu_ps(scores + (size_t)(i + 3) * lp + j0, _mm256_mul_ps(a3, vscale));
        }
    }
    const float *p[LT_ATTN_BLOCK_Q + 3];
    for (uint32_t i = 0; i < nq4; i++) {
        if (i >= nq) {
            p[i] = zeros;
            continue;
        }
        float *s = scores + (size_t)i * lp, mx = -INFINITY;
        uint32_t n = b->len[i];
        for (uint32_t j = 0; j < n; j++)
            mx = s[j] > mx ? s[j] : mx;
        b->m[i] = mx;
        b->l[i] = exp_shift(s, n, mx);
        memset(s + n, 0, (lp - n) * sizeof(float));  /* keys this query does not see weigh 0 */
        p[i] = s;
    }
    float sink[4 * 16] __attribute__((aligned(32)));
    for (uint32_t i = 0; i < nq4; i += 4)
        for (uint32_t d0 = 0; d0 < D; d0 += 16) {
            __m256 a[4][2];
            for (int r = 0; r < 4; r++)
                a[r][0] = a[r][1] = _mm256_setzero_ps();
            for (uint32_t j = 0; j < maxlen; j++) {
                const uint16_t *vr = b->v + (size_t)j * D + d0;
                __m256 v0 = h8(vr), v1 = h8(vr + 8);
                for (int r = 0; r < 4; r++) {
                    __m256 pj = _mm256_broadcast_ss(p[i + r] + j);
                    a[r][0] = _mm256_fmadd_ps(pj, v0, a[r][0]);
                    a[r][1] = _mm256_fmadd_ps(pj, v1, a[r][1]);
                }
            }
            for (uint32_t r = 0; r < 4; r++) {
                float *o = i + r < nq ? b->acc + (size_t)(i + r) * D + d0 : sink + r * 16;
                _mm256_storeu_ps(o, a[r][0]);
                _mm256_storeu_ps(o + 8, a[r][1]);
            }
        }
}

const lt_simd lt_simd_avx2 = {
    "avx2", LT_XQ_I16, TOK_TILE, lt_quantize_x16, {gemm_f32, gemm_f16, gemm_q8, gemm_q4}, dot_f16, axpy_f16, exp_shift,
    sigmoid, attend_block,
};

#endif
