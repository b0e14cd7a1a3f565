/* x86-64 AVX-512 (F + BW) path: 16 f32 lanes, weights widened in registers, f32 FMA.
 * Activations stay f32, so VNNI's int8 dot products have no use here. Selected by cpuid only. */
#include "cpu_internal.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#define AVX512 __attribute__((target("avx512f,avx512bw,avx2,fma,f16c")))

AVX512 static inline __m512 i8x16(const int8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}

AVX512 static inline __m512 h16(const uint16_t *p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
}

AVX512 static inline void q8_block(const int8_t *q, float s, __m512 w[2]) {
    __m512 vs = _mm512_set1_ps(s);
    w[0] = _mm512_mul_ps(i8x16(q), vs);
    w[1] = _mm512_mul_ps(i8x16(q + 16), vs);
}

AVX512 static inline void q4_block(const uint8_t *q, float s, float m, __m512 w[2]) {
    const __m128i mask = _mm_set1_epi8(0x0f);
    __m128i v = _mm_loadu_si128((const __m128i *)q);
    __m128i lo = _mm_and_si128(v, mask), hi = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
    __m512 vs = _mm512_set1_ps(s), vm = _mm512_set1_ps(m);
    w[0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo)), vs, vm);
    w[1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi)), vs, vm);
}

/* One weight row against nt tokens; token tiles are always four tokens (missing ones repeat the
 * last) with explicit registers, so that -O2 keeps everything in registers. */
#define QUANT_ROW(BLOCK_CALL)                                                                   \
    uint32_t t1 = nt > 1 ? 1 : 0, t2 = nt > 2 ? 2 : t1, t3 = nt > 3 ? 3 : t2;                   \
    const float *x0 = x, *x1 = x + t1 * xs, *x2 = x + t2 * xs, *x3 = x + t3 * xs;               \
    __m512 c0 = _mm512_setzero_ps(), c1 = c0, c2 = c0, c3 = c0, w[2];                           \
    for (uint32_t b = 0; b < nb; b++) {                                                         \
        BLOCK_CALL;                                                                             \
        size_t o = (size_t)b * LT_QK;                                                           \
        c0 = _mm512_fmadd_ps(w[1], _mm512_loadu_ps(x0 + o + 16), _mm512_fmadd_ps(w[0], _mm512_loadu_ps(x0 + o), c0)); \
        if (nt > 1) {                                                                           \
            c1 = _mm512_fmadd_ps(w[1], _mm512_loadu_ps(x1 + o + 16), _mm512_fmadd_ps(w[0], _mm512_loadu_ps(x1 + o), c1)); \
            c2 = _mm512_fmadd_ps(w[1], _mm512_loadu_ps(x2 + o + 16), _mm512_fmadd_ps(w[0], _mm512_loadu_ps(x2 + o), c2)); \
            c3 = _mm512_fmadd_ps(w[1], _mm512_loadu_ps(x3 + o + 16), _mm512_fmadd_ps(w[0], _mm512_loadu_ps(x3 + o), c3)); \
        }                                                                                       \
    }                                                                                           \
    out[i] = _mm512_reduce_add_ps(c0);                                                          \
    if (nt > 1) {                                                                               \
        out[t1 * nrows + i] = _mm512_reduce_add_ps(c1);                                         \
        out[t2 * nrows + i] = _mm512_reduce_add_ps(c2);                                         \
        out[t3 * nrows + i] = _mm512_reduce_add_ps(c3);                                         \
    }

AVX512 static void gemm_q8(const lt_wmat *w_, uint32_t row0, uint32_t nrows, const float *x,
                           size_t xs, uint32_t nt, float *out) {
    uint32_t nb = w_->stride / LT_QK;
    for (uint32_t i = 0; i < nrows; i++) {
        size_t r = row0 + i;
        const int8_t *q = (const int8_t *)w_->q + r * w_->stride;
        const uint16_t *s = w_->s + r * nb;
        QUANT_ROW(q8_block(q + b * LT_QK, lt_f16_to_f32(s[b]), w))
    }
}

AVX512 static void gemm_q4(const lt_wmat *w_, uint32_t row0, uint32_t nrows, const float *x,
                           size_t xs, uint32_t nt, float *out) {
    uint32_t nb = w_->stride / LT_QK;
    for (uint32_t i = 0; i < nrows; i++) {
        size_t r = row0 + i;
        const uint8_t *q = (const uint8_t *)w_->q + r * (w_->stride / 2);
        const uint16_t *s = w_->s + r * nb, *m = w_->m + r * nb;
        QUANT_ROW(q4_block(q + b * (LT_QK / 2), lt_f16_to_f32(s[b]), lt_f16_to_f32(m[b]), w))
    }
}

#define FLOAT_ROW(LOAD16, LOAD1)                                                                \
    for (uint32_t t = 0; t < nt; t++) {                                                         \
        const float *xt = x + t * xs;                                                           \
        __m512 a0 = _mm512_setzero_ps();                                                        \
        uint32_t k = 0;                                                                         \
        for (; k + 16 <= n; k += 16)                                                            \
            a0 = _mm512_fmadd_ps(LOAD16(wr + k), _mm512_loadu_ps(xt + k), a0);                  \
        float acc = _mm512_reduce_add_ps(a0);                                                   \
        for (; k < n; k++)                                                                      \
            acc += LOAD1(wr[k]) * xt[k];                                                        \
        out[t * nrows + i] = acc;                                                               \
    }

#define F32_LOAD1(v) (v)
AVX512 static void gemm_f32(const lt_wmat *w, uint32_t row0, uint32_t nrows, const float *x,
                            size_t xs, uint32_t nt, float *out) {
    uint32_t n = w->cols;
    for (uint32_t i = 0; i < nrows; i++) {
        const float *wr = (const float *)w->q + (size_t)(row0 + i) * w->stride;
        FLOAT_ROW(_mm512_loadu_ps, F32_LOAD1)
    }
}

AVX512 static void gemm_f16(const lt_wmat *w, uint32_t row0, uint32_t nrows, const float *x,
                            size_t xs, uint32_t nt, float *out) {
    uint32_t n = w->cols;
    for (uint32_t i = 0; i < nrows; i++) {
        const uint16_t *wr = (const uint16_t *)w->q + (size_t)(row0 + i) * w->stride;
        FLOAT_ROW(h16, lt_f16_to_f32)
    }
}

AVX512 static float dot_f16(const float *x, const uint16_t *h, uint32_t n) {
    __m512 a0 = _mm512_setzero_ps();
    uint32_t k = 0;
    for (; k + 16 <= n; k += 16)
        a0 = _mm512_fmadd_ps(h16(h + k), _mm512_loadu_ps(x + k), a0);
    float acc = _mm512_reduce_add_ps(a0);
    for (; k < n; k++)
        acc += x[k] * lt_f16_to_f32(h[k]);
    return acc;
}

AVX512 static void axpy_f16(float *y, float a, const uint16_t *h, uint32_t n) {
    __m512 va = _mm512_set1_ps(a);
    uint32_t k = 0;
    for (; k + 16 <= n; k += 16)
        _mm512_storeu_ps(y + k, _mm512_fmadd_ps(va, h16(h + k), _mm512_loadu_ps(y + k)));
    for (; k < n; k++)
        y[k] += a * lt_f16_to_f32(h[k]);
}

const lt_simd lt_simd_avx512 = {
    "avx512", {gemm_f32, gemm_f16, gemm_q8, gemm_q4}, dot_f16, axpy_f16,
};

#endif
