/* x86-64 AVX2 + FMA + F16C path: weights widened to f32 in registers, f32 FMA against f32
 * activations. Compiled with per-function target attributes, selected only when cpuid says so. */
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

AVX2 static inline __m256 i8x8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

AVX2 static inline __m256 u8x8(__m128i v) {
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
}

AVX2 static inline __m256 h8(const uint16_t *p) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
}

AVX2 static inline float h1(uint16_t h) {
    return _cvtsh_ss(h);
}

/* The 32 weights of a block, without the block's scale (Q8: q; Q4: the 0..15 nibbles).
 * Written out (no loops over register arrays) so that -O2 keeps everything in registers. */
AVX2 static inline void q8_block(const int8_t *q, __m256 w[4]) {
    w[0] = i8x8(q);
    w[1] = i8x8(q + 8);
    w[2] = i8x8(q + 16);
    w[3] = i8x8(q + 24);
}

AVX2 static inline void q4_block(const uint8_t *q, __m256 w[4]) {
    const __m128i mask = _mm_set1_epi8(0x0f);
    __m128i v = _mm_loadu_si128((const __m128i *)q);
    __m128i lo = _mm_and_si128(v, mask), hi = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
    w[0] = u8x8(lo);
    w[1] = u8x8(_mm_srli_si128(lo, 8));
    w[2] = u8x8(hi);
    w[3] = u8x8(_mm_srli_si128(hi, 8));
}

/* sum_j w[j] * x[j] over one block, as 8 lanes (a short tree keeps the chain short). */
AVX2 static inline __m256 block_dot(const __m256 w[4], const float *x) {
    __m256 a = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(x + 8), _mm256_mul_ps(w[0], _mm256_loadu_ps(x)));
    __m256 b = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(x + 24), _mm256_mul_ps(w[2], _mm256_loadu_ps(x + 16)));
    return _mm256_add_ps(a, b);
}

/* Per token, the sum of x over each block: Q4's min term is min * sum(x). */
AVX2 static void block_sums(const float *x, size_t xs, uint32_t nt, uint32_t nb, float *sums) {
    for (uint32_t t = 0; t < nt; t++)
        for (uint32_t b = 0; b < nb; b++) {
            const float *xb = x + t * xs + b * LT_QK;
            __m256 a = _mm256_add_ps(_mm256_add_ps(_mm256_loadu_ps(xb), _mm256_loadu_ps(xb + 8)),
                                     _mm256_add_ps(_mm256_loadu_ps(xb + 16), _mm256_loadu_ps(xb + 24)));
            sums[t * nb + b] = hsum(a);
        }
}

/* One weight row: acc += scale_b * dot(block_b, x) (+ min_b * sum_b(x) for Q4).
 * One token: two accumulators over alternate blocks so the scale FMAs do not chain.
 * Token tiles: always four tokens (missing ones repeat the last), each block widened once. */
#define QUANT_ROW(LOAD_BLOCK, MIN)                                                              \
    if (nt == 1) {                                                                              \
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, w[4];                                         \
        float m0 = 0.0f;                                                                        \
        uint32_t b = 0;                                                                         \
        for (; b + 2 <= nb; b += 2) {                                                           \
            LOAD_BLOCK(b);                                                                      \
            a0 = _mm256_fmadd_ps(block_dot(w, x + b * LT_QK), _mm256_set1_ps(h1(s[b])), a0);    \
            MIN(m0, 0, b);                                                                      \
            LOAD_BLOCK(b + 1);                                                                  \
            a1 = _mm256_fmadd_ps(block_dot(w, x + (b + 1) * LT_QK), _mm256_set1_ps(h1(s[b + 1])), a1); \
            MIN(m0, 0, b + 1);                                                                  \
        }                                                                                       \
        if (b < nb) {                                                                           \
            LOAD_BLOCK(b);                                                                      \
            a0 = _mm256_fmadd_ps(block_dot(w, x + b * LT_QK), _mm256_set1_ps(h1(s[b])), a0);    \
            MIN(m0, 0, b);                                                                      \
        }                                                                                       \
        out[i] = hsum(_mm256_add_ps(a0, a1)) + m0;                                              \
    } else {                                                                                    \
        uint32_t t1 = nt > 1 ? 1 : 0, t2 = nt > 2 ? 2 : t1, t3 = nt > 3 ? 3 : t2;               \
        const float *x0 = x, *x1 = x + t1 * xs, *x2 = x + t2 * xs, *x3 = x + t3 * xs;           \
        __m256 c0 = _mm256_setzero_ps(), c1 = c0, c2 = c0, c3 = c0, w[4];                       \
        float m0 = 0.0f, m1 = 0.0f, m2 = 0.0f, m3 = 0.0f;                                       \
        for (uint32_t b = 0; b < nb; b++) {                                                     \
            LOAD_BLOCK(b);                                                                      \
            __m256 vs = _mm256_set1_ps(h1(s[b]));                                               \
            size_t o = (size_t)b * LT_QK;                                                       \
            c0 = _mm256_fmadd_ps(block_dot(w, x0 + o), vs, c0);                                 \
            c1 = _mm256_fmadd_ps(block_dot(w, x1 + o), vs, c1);                                 \
            c2 = _mm256_fmadd_ps(block_dot(w, x2 + o), vs, c2);                                 \
            c3 = _mm256_fmadd_ps(block_dot(w, x3 + o), vs, c3);                                 \
            MIN(m0, 0, b);                                                                      \
            MIN(m1, t1, b);                                                                     \
            MIN(m2, t2, b);                                                                     \
            MIN(m3, t3, b);                                                                     \
        }                                                                                       \
        out[i] = hsum(c0) + m0;                                                                 \
        out[t1 * nrows + i] = hsum(c1) + m1;                                                    \
        out[t2 * nrows + i] = hsum(c2) + m2;                                                    \
        out[t3 * nrows + i] = hsum(c3) + m3;                                                    \
    }

AVX2 static void gemm_q8(const lt_wmat *w_, uint32_t row0, uint32_t nrows, const float *x,
                         size_t xs, uint32_t nt, float *out) {
    uint32_t nb = w_->stride / LT_QK;
    for (uint32_t i = 0; i < nrows; i++) {
        size_t r = row0 + i;
        const int8_t *q = (const int8_t *)w_->q + r * w_->stride;
        const uint16_t *s = w_->s + r * nb;
#define LOAD_Q8(b) q8_block(q + (b) * LT_QK, w)
#define NO_MIN(acc, t, b) (void)(acc)
        QUANT_ROW(LOAD_Q8, NO_MIN)
    }
}

AVX2 static void gemm_q4(const lt_wmat *w_, uint32_t row0, uint32_t nrows, const float *x,
                         size_t xs, uint32_t nt, float *out) {
    uint32_t nb = w_->stride / LT_QK;
    float sums[nt * nb];
    block_sums(x, xs, nt, nb, sums);
    for (uint32_t i = 0; i < nrows; i++) {
        size_t r = row0 + i;
        const uint8_t *q = (const uint8_t *)w_->q + r * (w_->stride / 2);
        const uint16_t *s = w_->s + r * nb, *m = w_->m + r * nb;
#define LOAD_Q4(b) q4_block(q + (b) * (LT_QK / 2), w)
#define Q4_MIN(acc, t, b) ((acc) += h1(m[b]) * sums[(t) * nb + (b)])
        QUANT_ROW(LOAD_Q4, Q4_MIN)
    }
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

const lt_simd lt_simd_avx2 = {
    "avx2", {gemm_f32, gemm_f16, gemm_q8, gemm_q4}, dot_f16, axpy_f16,
};

#endif
