/* x86-64 AVX-512 (F + BW) path: Q8/Q4 weights x int16-quantized activations with 512-bit
 * pmaddwd; f16/f32 weights widened to f32 with FMA. Selected by cpuid only. (VNNI's vpdpwssd
 * would only fuse the add that follows pmaddwd; the per-block scale needs a convert anyway.) */
#include "cpu_internal.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#define AVX512 __attribute__((target("avx512f,avx512bw,avx2,fma,f16c")))

AVX512 static inline __m512 h16(const uint16_t *p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
}

/* Q8/Q4 rows against int16-quantized activations (lt_x16 records), as in the AVX2 path: one
 * 512-bit pmaddwd per block gives exact int32 sums, scaled by w_scale * x_scale (+ Q4's min term). */
AVX512 static inline __m512i widen_q8(const int8_t *q) {
    return _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)q));
}

AVX512 static inline __m512i widen_q4(const uint8_t *q) {
    const __m128i mask = _mm_set1_epi8(0x0f);
    __m128i v = _mm_loadu_si128((const __m128i *)q);
    __m256i both = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), mask), _mm_and_si128(v, mask));
    return _mm512_cvtepu8_epi16(both);
}

AVX512 static inline __m512 block_dot16(__m512i w, const int16_t *x) {
    return _mm512_cvtepi32_ps(_mm512_madd_epi16(w, _mm512_loadu_si512((const void *)x)));
}

AVX512 static inline void combine_scales(const uint16_t *ws, const float *xd, uint32_t n, float *sc) {
    if (n == 16) {
        _mm512_storeu_ps(sc, _mm512_mul_ps(h16(ws), _mm512_loadu_ps(xd)));
    } else {
        for (uint32_t j = 0; j < n; j++)
            sc[j] = lt_f16_to_f32(ws[j]) * xd[j];
    }
}

AVX512 static inline float min_terms(const uint16_t *wm, const float *xs, uint32_t n) {
    if (n == 16)
        return _mm512_reduce_add_ps(_mm512_mul_ps(h16(wm), _mm512_loadu_ps(xs)));
    float acc = 0.0f;
    for (uint32_t j = 0; j < n; j++)
        acc += lt_f16_to_f32(wm[j]) * xs[j];
    return acc;
}

__attribute__((always_inline)) AVX512 static inline void quant_rows(
        const lt_wmat *w, uint32_t row0, uint32_t nrows, const float *x, size_t xs, uint32_t nt,
        float *out, int q4) {
    uint32_t kp = w->stride, nb = kp / LT_QK;
    uint32_t t1 = nt > 1 ? 1 : 0, t2 = nt > 2 ? 2 : t1, t3 = nt > 3 ? 3 : t2;
    const float *rec[4] = {x, x + t1 * xs, x + t2 * xs, x + t3 * xs};
    const int16_t *xq[4];
    const float *xd[4], *xsum[4];
    for (int t = 0; t < 4; t++) {
        xq[t] = (const int16_t *)rec[t];
        xd[t] = rec[t] + kp / 2;
        xsum[t] = xd[t] + nb;
    }
    int ntile = nt > 1 ? 4 : 1;
    for (uint32_t i = 0; i < nrows; i++) {
        size_t r = row0 + i;
        const int8_t *q8 = (const int8_t *)w->q + r * kp;
        const uint8_t *q4p = (const uint8_t *)w->q + r * (kp / 2);
        const uint16_t *s = w->s + r * nb, *m = q4 ? w->m + r * nb : NULL;
        __m512 c0 = _mm512_setzero_ps(), c1 = c0, c2 = c0, c3 = c0;
        float mins[4] = {0}, sc[4][16];
        for (uint32_t b0 = 0; b0 < nb; b0 += 16) {
            uint32_t n = nb - b0 < 16 ? nb - b0 : 16;
            for (int t = 0; t < ntile; t++) {
                combine_scales(s + b0, xd[t] + b0, n, sc[t]);
                if (q4)
                    mins[t] += min_terms(m + b0, xsum[t] + b0, n);
            }
            for (uint32_t j = 0; j < n; j++) {
                uint32_t b = b0 + j;
                __m512i wv = q4 ? widen_q4(q4p + b * 16) : widen_q8(q8 + b * LT_QK);
                size_t o = (size_t)b * LT_QK;
                c0 = _mm512_fmadd_ps(block_dot16(wv, xq[0] + o), _mm512_set1_ps(sc[0][j]), c0);
                if (nt > 1) {
                    c1 = _mm512_fmadd_ps(block_dot16(wv, xq[1] + o), _mm512_set1_ps(sc[1][j]), c1);
                    c2 = _mm512_fmadd_ps(block_dot16(wv, xq[2] + o), _mm512_set1_ps(sc[2][j]), c2);
                    c3 = _mm512_fmadd_ps(block_dot16(wv, xq[3] + o), _mm512_set1_ps(sc[3][j]), c3);
                }
            }
        }
        out[i] = _mm512_reduce_add_ps(c0) + mins[0];
        if (nt > 1) {
            out[t1 * nrows + i] = _mm512_reduce_add_ps(c1) + mins[1];
            out[t2 * nrows + i] = _mm512_reduce_add_ps(c2) + mins[2];
            out[t3 * nrows + i] = _mm512_reduce_add_ps(c3) + mins[3];
        }
    }
}

AVX512 static void gemm_q8(const lt_wmat *w, uint32_t row0, uint32_t nrows, const float *x,
                           size_t xs, uint32_t nt, float *out) {
    quant_rows(w, row0, nrows, x, xs, nt, out, 0);
}

AVX512 static void gemm_q4(const lt_wmat *w, uint32_t row0, uint32_t nrows, const float *x,
                           size_t xs, uint32_t nt, float *out) {
    quant_rows(w, row0, nrows, x, xs, nt, out, 1);
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
    "avx512", LT_XQ_I16, 4, lt_quantize_x16, {gemm_f32, gemm_f16, gemm_q8, gemm_q4}, dot_f16, axpy_f16, lt_exp_shift,
    lt_sigmoid_n, NULL,
};

#endif
