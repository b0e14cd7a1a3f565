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

/* Dequantized block of 32 weights in w[0..3] (8 lanes each). */
AVX2 static inline void q8_block(const int8_t *q, float s, __m256 w[4]) {
    __m256 vs = _mm256_set1_ps(s);
    for (int j = 0; j < 4; j++)
        w[j] = _mm256_mul_ps(i8x8(q + 8 * j), vs);
}

AVX2 static inline void q4_block(const uint8_t *q, float s, float m, __m256 w[4]) {
    const __m128i mask = _mm_set1_epi8(0x0f);
    __m128i v = _mm_loadu_si128((const __m128i *)q);
    __m128i lo = _mm_and_si128(v, mask), hi = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
    __m256 vs = _mm256_set1_ps(s), vm = _mm256_set1_ps(m);
    w[0] = _mm256_fmadd_ps(u8x8(lo), vs, vm);
    w[1] = _mm256_fmadd_ps(u8x8(_mm_srli_si128(lo, 8)), vs, vm);
    w[2] = _mm256_fmadd_ps(u8x8(hi), vs, vm);
    w[3] = _mm256_fmadd_ps(u8x8(_mm_srli_si128(hi, 8)), vs, vm);
}

/* One weight row against nt tokens; blocks of 32 produced by `block`. Two accumulators per
 * token (four for a single token) keep the FMA chains short. */
#define QUANT_ROW(BLOCK_CALL)                                                                   \
    if (nt == 1) {                                                                              \
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, w[4];                       \
        for (uint32_t b = 0; b < nb; b++) {                                                     \
            BLOCK_CALL;                                                                         \
            const float *xb = x + b * LT_QK;                                                    \
            a0 = _mm256_fmadd_ps(w[0], _mm256_loadu_ps(xb), a0);                                \
            a1 = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(xb + 8), a1);                            \
            a2 = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(xb + 16), a2);                           \
            a3 = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xb + 24), a3);                           \
        }                                                                                       \
        out[i] = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));             \
    } else {                                                                                    \
        __m256 acc[LT_TOK_TILE][2], w[4];                                                       \
        for (uint32_t t = 0; t < LT_TOK_TILE; t++)                                              \
            acc[t][0] = acc[t][1] = _mm256_setzero_ps();                                        \
        for (uint32_t b = 0; b < nb; b++) {                                                     \
            BLOCK_CALL;                                                                         \
            for (uint32_t t = 0; t < nt; t++) {                                                 \
                const float *xb = x + t * xs + b * LT_QK;                                       \
                acc[t][0] = _mm256_fmadd_ps(w[0], _mm256_loadu_ps(xb), acc[t][0]);              \
                acc[t][1] = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(xb + 8), acc[t][1]);          \
                acc[t][0] = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(xb + 16), acc[t][0]);         \
                acc[t][1] = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xb + 24), acc[t][1]);         \
            }                                                                                   \
        }                                                                                       \
        for (uint32_t t = 0; t < nt; t++)                                                       \
            out[t * nrows + i] = hsum(_mm256_add_ps(acc[t][0], acc[t][1]));                     \
    }

AVX2 static void gemm_q8(const lt_wmat *w_, uint32_t row0, uint32_t nrows, const float *x,
                         size_t xs, uint32_t nt, float *out) {
    uint32_t nb = w_->stride / LT_QK;
    for (uint32_t i = 0; i < nrows; i++) {
        size_t r = row0 + i;
        const int8_t *q = (const int8_t *)w_->q + r * w_->stride;
        const uint16_t *s = w_->s + r * nb;
        QUANT_ROW(q8_block(q + b * LT_QK, lt_f16_to_f32(s[b]), w))
    }
}

AVX2 static void gemm_q4(const lt_wmat *w_, uint32_t row0, uint32_t nrows, const float *x,
                         size_t xs, uint32_t nt, float *out) {
    uint32_t nb = w_->stride / LT_QK;
    for (uint32_t i = 0; i < nrows; i++) {
        size_t r = row0 + i;
        const uint8_t *q = (const uint8_t *)w_->q + r * (w_->stride / 2);
        const uint16_t *s = w_->s + r * nb, *m = w_->m + r * nb;
        QUANT_ROW(q4_block(q + b * (LT_QK / 2), lt_f16_to_f32(s[b]), lt_f16_to_f32(m[b]), w))
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
