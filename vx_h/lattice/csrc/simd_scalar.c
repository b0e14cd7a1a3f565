/* Portable C dot products (the fallback path, and the meaning of the SIMD ones), plus the
 * run-time choice of SIMD path. */
#include <stdlib.h>

#include "cpu_internal.h"

static void gemm_f32(const lt_wmat *w, uint32_t row0, uint32_t nrows, const float *x, size_t xs,
                     uint32_t nt, float *out) {
    for (uint32_t i = 0; i < nrows; i++) {
        const float *wr = (const float *)w->q + (size_t)(row0 + i) * w->stride;
        for (uint32_t t = 0; t < nt; t++) {
            const float *xt = x + t * xs;
            float acc = 0.0f;
            for (uint32_t k = 0; k < w->cols; k++)
                acc += wr[k] * xt[k];
            out[t * nrows + i] = acc;
        }
    }
}

static void gemm_f16(const lt_wmat *w, uint32_t row0, uint32_t nrows, const float *x, size_t xs,
                     uint32_t nt, float *out) {
    for (uint32_t i = 0; i < nrows; i++) {
        const uint16_t *wr = (const uint16_t *)w->q + (size_t)(row0 + i) * w->stride;
        for (uint32_t t = 0; t < nt; t++) {
            const float *xt = x + t * xs;
            float acc = 0.0f;
            for (uint32_t k = 0; k < w->cols; k++)
                acc += lt_f16_to_f32(wr[k]) * xt[k];
            out[t * nrows + i] = acc;
        }
    }
}

/* Q8: per block, sum q * x in f32, then scale. */
static void gemm_q8(const lt_wmat *w, uint32_t row0, uint32_t nrows, const float *x, size_t xs,
                    uint32_t nt, float *out) {
    uint32_t nb = w->stride / LT_QK;
    for (uint32_t i = 0; i < nrows; i++) {
        size_t r = row0 + i;
        const int8_t *q = (const int8_t *)w->q + r * w->stride;
        const uint16_t *s = w->s + r * nb;
        for (uint32_t t = 0; t < nt; t++) {
            const float *xt = x + t * xs;
            float acc = 0.0f;
            for (uint32_t b = 0; b < nb; b++) {
                float blk = 0.0f;
                for (int j = 0; j < LT_QK; j++)
                    blk += (float)q[b * LT_QK + j] * xt[b * LT_QK + j];
                acc += lt_f16_to_f32(s[b]) * blk;
            }
            out[t * nrows + i] = acc;
        }
    }
}

/* Q4: sum (q * s + m) * x = s * sum q x + m * sum x per block. */
static void gemm_q4(const lt_wmat *w, uint32_t row0, uint32_t nrows, const float *x, size_t xs,
                    uint32_t nt, float *out) {
    uint32_t nb = w->stride / LT_QK;
    for (uint32_t i = 0; i < nrows; i++) {
        size_t r = row0 + i;
        const uint8_t *q = (const uint8_t *)w->q + r * (w->stride / 2);
        const uint16_t *s = w->s + r * nb, *m = w->m + r * nb;
        for (uint32_t t = 0; t < nt; t++) {
            const float *xt = x + t * xs;
            float acc = 0.0f;
            for (uint32_t b = 0; b < nb; b++) {
                const uint8_t *qb = q + b * (LT_QK / 2);
                const float *xb = xt + b * LT_QK;
                float qx = 0.0f, sx = 0.0f;
                for (int j = 0; j < LT_QK / 2; j++) {
                    qx += (float)(qb[j] & 0x0f) * xb[j] + (float)(qb[j] >> 4) * xb[j + 16];
                    sx += xb[j] + xb[j + 16];
                }
                acc += lt_f16_to_f32(s[b]) * qx + lt_f16_to_f32(m[b]) * sx;
            }
            out[t * nrows + i] = acc;
        }
    }
}

static float dot_f16(const float *x, const uint16_t *h, uint32_t n) {
    float acc = 0.0f;
    for (uint32_t i = 0; i < n; i++)
        acc += x[i] * lt_f16_to_f32(h[i]);
    return acc;
}

static void axpy_f16(float *y, float a, const uint16_t *h, uint32_t n) {
    for (uint32_t i = 0; i < n; i++)
        y[i] += a * lt_f16_to_f32(h[i]);
}

float lt_exp_shift(float *s, uint32_t n, float mx) {
    float sum = 0.0f;
    for (uint32_t j = 0; j < n; j++) {
        s[j] = expf(s[j] - mx);
        sum += s[j];
    }
    return sum;
}

void lt_sigmoid_n(float *x, uint32_t n) {
    for (uint32_t j = 0; j < n; j++)
        x[j] = lt_sigmoid(x[j]);
}

const lt_simd lt_simd_scalar = {
    "scalar", LT_XQ_F32, 4, NULL, {gemm_f32, gemm_f16, gemm_q8, gemm_q4}, dot_f16, axpy_f16, lt_exp_shift,
    lt_sigmoid_n, NULL,
};

/* ------------------------------------------------------------------------------- selection */

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>

/* cpuid feature bits, plus the OS saving the wider registers (XGETBV). */
static int x86_has(int avx512) {
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d))
        return 0;
    int fma = (c >> 12) & 1, osxsave = (c >> 27) & 1, f16c = (c >> 29) & 1;
    if (!(fma && osxsave && f16c) || !__get_cpuid_count(7, 0, &a, &b, &c, &d))
        return 0;
    int avx2 = (b >> 5) & 1, avx512f = (b >> 16) & 1, avx512bw = (b >> 30) & 1;
    unsigned lo, hi;
    __asm__("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    int ymm = (lo & 0x6) == 0x6, zmm = (lo & 0xe6) == 0xe6;
    return avx512 ? avx2 && avx512f && avx512bw && zmm : avx2 && ymm;
}
#endif

static int cpu_supports(const lt_simd *p) {
#if defined(__x86_64__) || defined(_M_X64)
    if (p == &lt_simd_avx2)
        return x86_has(0);
    if (p == &lt_simd_avx512)
        return x86_has(1);
#endif
#if defined(__aarch64__)
    if (p == &lt_simd_neon)
        return 1;
#endif
    return p == &lt_simd_scalar;
}

static const lt_simd *const PATHS[] = {
#if defined(__x86_64__) || defined(_M_X64)
    &lt_simd_avx512,
    &lt_simd_avx2,
#endif
#if defined(__aarch64__)
    &lt_simd_neon,
#endif
    &lt_simd_scalar,
};

static const lt_simd *chosen;

int lt_cpu_set_simd(const char *name) {
    for (size_t i = 0; i < sizeof PATHS / sizeof PATHS[0]; i++)
        if (!strcmp(PATHS[i]->name, name) && cpu_supports(PATHS[i])) {
            chosen = PATHS[i];
            return 0;
        }
    return -1;
}

/* Chosen once: LATTICE_SIMD if set and usable, else the widest path the CPU supports. */
const lt_simd *lt_simd_get(void) {
    if (chosen)
        return chosen;
    const char *env = getenv("LATTICE_SIMD");
    if (!(env && lt_cpu_set_simd(env) == 0)) {
        for (size_t i = 0; i < sizeof PATHS / sizeof PATHS[0]; i++)
            if (cpu_supports(PATHS[i])) {
                chosen = PATHS[i];
                break;
            }
    }
    return chosen;
}

const char *lt_cpu_simd(void) {
    return lt_simd_get()->name;
}
