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

/* Q8/Q4 rows against int16-quantized activations (lt_x16 records): per block, pmaddwd of the
 * widened weights with x gives exact int32 sums; acc += float(sum) * w_scale * x_scale, and for
 * Q4 + w_min * sum(x). Block scales are combined 8 blocks at a time and broadcast from memory. */

/* The block's 32 weights as int16: Q8 sign-extended, Q4 the 0..15 nibbles. */
AVX2 static inline void widen_q8(const int8_t *q, __m256i *w0, __m256i *w1) {
    *w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)q));
    *w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(q + 16)));
}

AVX2 static inline void widen_q4(const uint8_t *q, __m256i *w0, __m256i *w1) {
    const __m128i mask = _mm_set1_epi8(0x0f);
    __m128i v = _mm_loadu_si128((const __m128i *)q);
    *w0 = _mm256_cvtepu8_epi16(_mm_and_si128(v, mask));
    *w1 = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(v, 4), mask));
}

/* float lanes of sum over one block of w * x (int16 products summed exactly in int32) */
AVX2 static inline __m256 block_dot16(__m256i w0, __m256i w1, const int16_t *x) {
    __m256i p = _mm256_add_epi32(_mm256_madd_epi16(w0, _mm256_loadu_si256((const __m256i *)x)),
                                 _mm256_madd_epi16(w1, _mm256_loadu_si256((const __m256i *)(x + 16))));
    return _mm256_cvtepi32_ps(p);
}

/* sc[j] = w_scale[b0 + j] * x_scale[b0 + j] for the n <= 8 blocks from b0 */
AVX2 static inline void combine_scales(const uint16_t *ws, const float *xd, uint32_t n, float *sc) {
    if (n == 8) {
        _mm256_storeu_ps(sc, _mm256_mul_ps(h8(ws), _mm256_loadu_ps(xd)));
    } else {
        for (uint32_t j = 0; j < n; j++)
            sc[j] = h1(ws[j]) * xd[j];
    }
}

/* sum over the n <= 8 blocks from b0 of w_min * sum(x) */
AVX2 static inline float min_terms(const uint16_t *wm, const float *xs, uint32_t n) {
    if (n == 8)
        return hsum(_mm256_mul_ps(h8(wm), _mm256_loadu_ps(xs)));
    float acc = 0.0f;
    for (uint32_t j = 0; j < n; j++)
        acc += h1(wm[j]) * xs[j];
    return acc;
}

__attribute__((always_inline)) AVX2 static inline void quant_rows(
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
    for (uint32_t i = 0; i < nrows; i++) {
        size_t r = row0 + i;
        const int8_t *q8 = (const int8_t *)w->q + r * kp;
        const uint8_t *q4p = (const uint8_t *)w->q + r * (kp / 2);
        const uint16_t *s = w->s + r * nb, *m = q4 ? w->m + r * nb : NULL;
        __m256i w0, w1;
        if (nt == 1) {
            __m256 a0 = _mm256_setzero_ps(), a1 = a0;
            float mins = 0.0f, sc[8];
            for (uint32_t b0 = 0; b0 < nb; b0 += 8) {
                uint32_t n = nb - b0 < 8 ? nb - b0 : 8;
                combine_scales(s + b0, xd[0] + b0, n, sc);
                if (q4)
                    mins += min_terms(m + b0, xsum[0] + b0, n);
                for (uint32_t j = 0; j < n; j++) {
                    uint32_t b = b0 + j;
                    if (q4)
                        widen_q4(q4p + b * 16, &w0, &w1);
                    else
                        widen_q8(q8 + b * LT_QK, &w0, &w1);
                    __m256 p = block_dot16(w0, w1, xq[0] + b * LT_QK);
                    if (j & 1)
                        a1 = _mm256_fmadd_ps(p, _mm256_broadcast_ss(&sc[j]), a1);
                    else
                        a0 = _mm256_fmadd_ps(p, _mm256_broadcast_ss(&sc[j]), a0);
                }
            }
            out[i] = hsum(_mm256_add_ps(a0, a1)) + mins;
        } else {
            __m256 c0 = _mm256_setzero_ps(), c1 = c0, c2 = c0, c3 = c0;
            float mins[4] = {0}, sc[4][8];
            for (uint32_t b0 = 0; b0 < nb; b0 += 8) {
                uint32_t n = nb - b0 < 8 ? nb - b0 : 8;
                for (int t = 0; t < 4; t++) {
                    combine_scales(s + b0, xd[t] + b0, n, sc[t]);
                    if (q4)
                        mins[t] += min_terms(m + b0, xsum[t] + b0, n);
                }
                for (uint32_t j = 0; j < n; j++) {
                    uint32_t b = b0 + j;
                    if (q4)
                        widen_q4(q4p + b * 16, &w0, &w1);
                    else
                        widen_q8(q8 + b * LT_QK, &w0, &w1);
                    size_t o = (size_t)b * LT_QK;
                    c0 = _mm256_fmadd_ps(block_dot16(w0, w1, xq[0] + o), _mm256_broadcast_ss(&sc[0][j]), c0);
                    c1 = _mm256_fmadd_ps(block_dot16(w0, w1, xq[1] + o), _mm256_broadcast_ss(&sc[1][j]), c1);
                    c2 = _mm256_fmadd_ps(block_dot16(w0, w1, xq[2] + o), _mm256_broadcast_ss(&sc[2][j]), c2);
                    c3 = _mm256_fmadd_ps(block_dot16(w0, w1, xq[3] + o), _mm256_broadcast_ss(&sc[3][j]), c3);
                }
            }
            out[i] = hsum(c0) + mins[0];
            out[t1 * nrows + i] = hsum(c1) + mins[1];
            out[t2 * nrows + i] = hsum(c2) + mins[2];
            out[t3 * nrows + i] = hsum(c3) + mins[3];
        }
    }
}

AVX2 static void gemm_q8(const lt_wmat *w, uint32_t row0, uint32_t nrows, const float *x,
                         size_t xs, uint32_t nt, float *out) {
    quant_rows(w, row0, nrows, x, xs, nt, out, 0);
}

AVX2 static void gemm_q4(const lt_wmat *w, uint32_t row0, uint32_t nrows, const float *x,
                         size_t xs, uint32_t nt, float *out) {
    quant_rows(w, row0, nrows, x, xs, nt, out, 1);
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
    "avx2", 1, {gemm_f32, gemm_f16, gemm_q8, gemm_q4}, dot_f16, axpy_f16,
};

#endif
