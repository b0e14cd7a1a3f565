/* arm64 NEON path: weights widened to f32 in registers, f32 FMA against f32 activations
 * (so the int8 dot-product extension has no use here). NEON is part of every arm64 CPU. */
#include "cpu_internal.h"

#if defined(__aarch64__)
#include <arm_neon.h>

static inline float32x4_t lo4_s16(int16x8_t v) { return vcvtq_f32_s32(vmovl_s16(vget_low_s16(v))); }
static inline float32x4_t hi4_s16(int16x8_t v) { return vcvtq_f32_s32(vmovl_s16(vget_high_s16(v))); }
static inline float32x4_t lo4_u16(uint16x8_t v) { return vcvtq_f32_u32(vmovl_u16(vget_low_u16(v))); }
static inline float32x4_t hi4_u16(uint16x8_t v) { return vcvtq_f32_u32(vmovl_u16(vget_high_u16(v))); }
static inline float32x4_t h4(const uint16_t *p) { return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p))); }

/* 32 dequantized weights in w[0..7] (4 lanes each), written out so -O2 keeps them in registers. */
static inline void q8_block(const int8_t *q, float s, float32x4_t w[8]) {
    int8x16_t a = vld1q_s8(q), b = vld1q_s8(q + 16);
    int16x8_t p0 = vmovl_s8(vget_low_s8(a)), p1 = vmovl_s8(vget_high_s8(a));
    int16x8_t p2 = vmovl_s8(vget_low_s8(b)), p3 = vmovl_s8(vget_high_s8(b));
    w[0] = vmulq_n_f32(lo4_s16(p0), s);
    w[1] = vmulq_n_f32(hi4_s16(p0), s);
    w[2] = vmulq_n_f32(lo4_s16(p1), s);
    w[3] = vmulq_n_f32(hi4_s16(p1), s);
    w[4] = vmulq_n_f32(lo4_s16(p2), s);
    w[5] = vmulq_n_f32(hi4_s16(p2), s);
    w[6] = vmulq_n_f32(lo4_s16(p3), s);
    w[7] = vmulq_n_f32(hi4_s16(p3), s);
}

static inline void q4_block(const uint8_t *q, float s, float m, float32x4_t w[8]) {
    uint8x16_t v = vld1q_u8(q);
    uint8x16_t lo = vandq_u8(v, vdupq_n_u8(0x0f)), hi = vshrq_n_u8(v, 4);
    uint16x8_t p0 = vmovl_u8(vget_low_u8(lo)), p1 = vmovl_u8(vget_high_u8(lo));
    uint16x8_t p2 = vmovl_u8(vget_low_u8(hi)), p3 = vmovl_u8(vget_high_u8(hi));
    float32x4_t vm = vdupq_n_f32(m);
    w[0] = vfmaq_n_f32(vm, lo4_u16(p0), s);
    w[1] = vfmaq_n_f32(vm, hi4_u16(p0), s);
    w[2] = vfmaq_n_f32(vm, lo4_u16(p1), s);
    w[3] = vfmaq_n_f32(vm, hi4_u16(p1), s);
    w[4] = vfmaq_n_f32(vm, lo4_u16(p2), s);
    w[5] = vfmaq_n_f32(vm, hi4_u16(p2), s);
    w[6] = vfmaq_n_f32(vm, lo4_u16(p3), s);
    w[7] = vfmaq_n_f32(vm, hi4_u16(p3), s);
}

/* dot of one block with x, as 4 lanes */
static inline float32x4_t block_dot(const float32x4_t w[8], const float *x) {
    float32x4_t a = vmulq_f32(w[0], vld1q_f32(x)), b = vmulq_f32(w[1], vld1q_f32(x + 4));
    a = vfmaq_f32(a, w[2], vld1q_f32(x + 8));
    b = vfmaq_f32(b, w[3], vld1q_f32(x + 12));
    a = vfmaq_f32(a, w[4], vld1q_f32(x + 16));
    b = vfmaq_f32(b, w[5], vld1q_f32(x + 20));
    a = vfmaq_f32(a, w[6], vld1q_f32(x + 24));
    b = vfmaq_f32(b, w[7], vld1q_f32(x + 28));
    return vaddq_f32(a, b);
}

/* One weight row against nt tokens; token tiles are always four tokens (missing ones repeat the
 * last). */
#define QUANT_ROW(BLOCK_CALL)                                                                   \
    uint32_t t1 = nt > 1 ? 1 : 0, t2 = nt > 2 ? 2 : t1, t3 = nt > 3 ? 3 : t2;                   \
    const float *x0 = x, *x1 = x + t1 * xs, *x2 = x + t2 * xs, *x3 = x + t3 * xs;               \
    float32x4_t c0 = vdupq_n_f32(0.0f), c1 = c0, c2 = c0, c3 = c0, w[8];                        \
    for (uint32_t b = 0; b < nb; b++) {                                                         \
        BLOCK_CALL;                                                                             \
        size_t o = (size_t)b * LT_QK;                                                           \
        c0 = vaddq_f32(c0, block_dot(w, x0 + o));                                               \
        if (nt > 1) {                                                                           \
            c1 = vaddq_f32(c1, block_dot(w, x1 + o));                                           \
            c2 = vaddq_f32(c2, block_dot(w, x2 + o));                                           \
            c3 = vaddq_f32(c3, block_dot(w, x3 + o));                                           \
        }                                                                                       \
    }                                                                                           \
    out[i] = vaddvq_f32(c0);                                                                    \
    if (nt > 1) {                                                                               \
        out[t1 * nrows + i] = vaddvq_f32(c1);                                                   \
        out[t2 * nrows + i] = vaddvq_f32(c2);                                                   \
        out[t3 * nrows + i] = vaddvq_f32(c3);                                                   \
    }

static void gemm_q8(const lt_wmat *w_, uint32_t row0, uint32_t nrows, const float *x, size_t xs,
                    uint32_t nt, float *out) {
    uint32_t nb = w_->stride / LT_QK;
    for (uint32_t i = 0; i < nrows; i++) {
        size_t r = row0 + i;
        const int8_t *q = (const int8_t *)w_->q + r * w_->stride;
        const uint16_t *s = w_->s + r * nb;
        QUANT_ROW(q8_block(q + b * LT_QK, lt_f16_to_f32(s[b]), w))
    }
}

static void gemm_q4(const lt_wmat *w_, uint32_t row0, uint32_t nrows, const float *x, size_t xs,
                    uint32_t nt, float *out) {
    uint32_t nb = w_->stride / LT_QK;
    for (uint32_t i = 0; i < nrows; i++) {
        size_t r = row0 + i;
        const uint8_t *q = (const uint8_t *)w_->q + r * (w_->stride / 2);
        const uint16_t *s = w_->s + r * nb, *m = w_->m + r * nb;
        QUANT_ROW(q4_block(q + b * (LT_QK / 2), lt_f16_to_f32(s[b]), lt_f16_to_f32(m[b]), w))
    }
}

#define FLOAT_ROW(LOAD4, LOAD1)                                                                 \
    for (uint32_t t = 0; t < nt; t++) {                                                         \
        const float *xt = x + t * xs;                                                           \
        float32x4_t a0 = vdupq_n_f32(0.0f), a1 = a0;                                            \
        uint32_t k = 0;                                                                         \
        for (; k + 8 <= n; k += 8) {                                                            \
            a0 = vfmaq_f32(a0, LOAD4(wr + k), vld1q_f32(xt + k));                               \
            a1 = vfmaq_f32(a1, LOAD4(wr + k + 4), vld1q_f32(xt + k + 4));                       \
        }                                                                                       \
        float acc = vaddvq_f32(vaddq_f32(a0, a1));                                              \
        for (; k < n; k++)                                                                      \
            acc += LOAD1(wr[k]) * xt[k];                                                        \
        out[t * nrows + i] = acc;                                                               \
    }

#define F32_LOAD1(v) (v)
static void gemm_f32(const lt_wmat *w, uint32_t row0, uint32_t nrows, const float *x, size_t xs,
                     uint32_t nt, float *out) {
    uint32_t n = w->cols;
    for (uint32_t i = 0; i < nrows; i++) {
        const float *wr = (const float *)w->q + (size_t)(row0 + i) * w->stride;
        FLOAT_ROW(vld1q_f32, F32_LOAD1)
    }
}

static void gemm_f16(const lt_wmat *w, uint32_t row0, uint32_t nrows, const float *x, size_t xs,
                     uint32_t nt, float *out) {
    uint32_t n = w->cols;
    for (uint32_t i = 0; i < nrows; i++) {
        const uint16_t *wr = (const uint16_t *)w->q + (size_t)(row0 + i) * w->stride;
        FLOAT_ROW(h4, lt_f16_to_f32)
    }
}

static float dot_f16(const float *x, const uint16_t *h, uint32_t n) {
    float32x4_t a0 = vdupq_n_f32(0.0f);
    uint32_t k = 0;
    for (; k + 4 <= n; k += 4)
        a0 = vfmaq_f32(a0, h4(h + k), vld1q_f32(x + k));
    float acc = vaddvq_f32(a0);
    for (; k < n; k++)
        acc += x[k] * lt_f16_to_f32(h[k]);
    return acc;
}

static void axpy_f16(float *y, float a, const uint16_t *h, uint32_t n) {
    uint32_t k = 0;
    for (; k + 4 <= n; k += 4)
        vst1q_f32(y + k, vfmaq_n_f32(vld1q_f32(y + k), h4(h + k), a));
    for (; k < n; k++)
        y[k] += a * lt_f16_to_f32(h[k]);
}

const lt_simd lt_simd_neon = {
    "neon", LT_XQ_F32, 4, NULL, {gemm_f32, gemm_f16, gemm_q8, gemm_q4}, dot_f16, axpy_f16, lt_exp_shift,
    lt_sigmoid_n, NULL,
};

#endif
