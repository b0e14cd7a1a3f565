/* GEMV / GEMM with fused RMSNorm prologue and bias / SiLU-mul / residual epilogues, and the LM
 * head (GEMV of the last token + argmax/logsumexp partials for the sampler).
 *
 * Threads take units of rows dynamically (multiples of ROW_GRAIN rows; LT_ARGMAX_BLOCK for the LM
 * head so that each partial block belongs to one thread). Within a unit, ROW_TILE rows are
 * multiplied with LT_TOK_TILE tokens at a time, so in prefill each weight row is widened once per
 * token tile and the tile of x stays in cache across rows. */
#include "cpu_internal.h"

#define ROW_GRAIN 16
#define ROW_TILE 16

static uint32_t stored_cols(uint32_t format, uint32_t cols) {
    return format >= LT_WF_Q8 ? (cols + LT_QK - 1) / LT_QK * LT_QK : cols;
}

/* x needs a prepared copy when it is normalized, zero-padded for a quant format, or quantized
 * for the path's quant GEMVs. */
static int needs_prep(const lt_gemv_args *a, uint32_t xq) {
    return (a->flags & LT_GEMV_NORM) || stored_cols(a->wformat, a->cols) != a->cols
           || (xq != LT_XQ_F32 && a->wformat >= LT_WF_Q8);
}

/* Sizes hold for every SIMD path (a path may be forced after lt_cpu_create). Per thread: an f32
 * staging row, a prepared token (f32 row or record, <= kp floats) and the output tile. */
size_t lt_gemv_thread_floats(const lt_gemv_args *a) {
    return 2 * (size_t)stored_cols(a->wformat, a->cols) + LT_TOK_TILE_MAX * ROW_TILE;
}

size_t lt_gemv_shared_floats(const lt_gemv_args *a, uint32_t T) {
    return needs_prep(a, LT_XQ_I16) && T > 1 ? (size_t)T * stored_cols(a->wformat, a->cols) : 0;
}

void lt_quantize_x16(const float *x, uint32_t kp, float *record) {
    uint32_t nb = kp / LT_QK;
    int16_t *q = (int16_t *)record;
    float *d = record + kp / 2, *sum = d + nb;
    for (uint32_t b = 0; b < nb; b++) {
        const float *xb = x + b * LT_QK;
        float amax = 0.0f, s = 0.0f;
        for (int j = 0; j < LT_QK; j++) {
            float v = fabsf(xb[j]);
            amax = v > amax ? v : amax;
            s += xb[j];
        }
        float scale = amax / 32767.0f, inv = amax > 0.0f ? 32767.0f / amax : 0.0f;
        for (int j = 0; j < LT_QK; j++) {  /* round half away from zero; vectorizes */
            float v = xb[j] * inv;
            q[b * LT_QK + j] = (int16_t)(int32_t)(v + (v >= 0.0f ? 0.5f : -0.5f));
        }
        d[b] = scale;
        sum[b] = s;
    }
}

void lt_prepare_x(const float *x, uint32_t cols, uint32_t padded, const float *norm_w, int add_one,
                  float eps, float *out) {
    if (norm_w) {
        float ss = 0.0f;
        for (uint32_t k = 0; k < cols; k++)
            ss += x[k] * x[k];
        float r = 1.0f / sqrtf(ss / (float)cols + eps);
        for (uint32_t k = 0; k < cols; k++)
            out[k] = x[k] * r * (add_one ? 1.0f + norm_w[k] : norm_w[k]);
    } else {
        memcpy(out, x, cols * sizeof(float));
    }
    for (uint32_t k = cols; k < padded; k++)
        out[k] = 0.0f;
}

/* Writes tile rows [row0, row0 + nr) of tokens [t0, t0 + nt) through the epilogues into y. */
static void epilogue(const lt_simd *simd, const lt_gemv_args *a, const float *tile, uint32_t row0,
                     uint32_t nr, uint32_t t0, uint32_t nt, const float *bias, const float *resid, float *y) {
    for (uint32_t t = 0; t < nt; t++) {
        const float *v = tile + t * nr;
        float *yt = y + (size_t)(t0 + t) * a->y_stride;
        const float *rt = resid ? resid + (size_t)(t0 + t) * a->resid_stride : NULL;
        if (a->flags & LT_GEMV_SILU_MUL) {  /* rows alternate gate, up */
            float g[ROW_TILE / 2], sg[ROW_TILE / 2];
            uint32_t n = nr / 2;
            for (uint32_t i = 0; i < n; i++)
                sg[i] = g[i] = v[2 * i] + (bias ? bias[row0 + 2 * i] : 0.0f);
            simd->sigmoid(sg, n);
            for (uint32_t i = 0; i < n; i++) {
                float u = v[2 * i + 1] + (bias ? bias[row0 + 2 * i + 1] : 0.0f);
                uint32_t o = row0 / 2 + i;
                float out = g[i] * sg[i] * u;
                yt[o] = rt ? rt[o] + out : out;
            }
        } else {
            for (uint32_t i = 0; i < nr; i++) {
                uint32_t o = row0 + i;
                float out = v[i] + (bias ? bias[o] : 0.0f);
                yt[o] = rt ? rt[o] + out : out;
            }
        }
    }
}

static void partials(const lt_simd *simd, const float *logits, uint32_t lo, uint32_t hi, lt_argmax_partial *p) {
    for (uint32_t b0 = lo; b0 < hi; b0 += LT_ARGMAX_BLOCK) {
        uint32_t b1 = b0 + LT_ARGMAX_BLOCK < hi ? b0 + LT_ARGMAX_BLOCK : hi;
        float mx = -INFINITY;
        uint32_t arg = b0, bad = 0;
        for (uint32_t i = b0; i < b1; i++) {
            float v = logits[i];
            if (!isfinite(v))
                bad++;
            else if (v > mx) {
                mx = v;
                arg = i;
            }
        }
        /* exp over a copy (the logits stay as they are); a block with NaN/Inf makes the sampler
         * raise, so its sum is not needed */
        float se = 0.0f;
        if (mx > -INFINITY && !bad) {
            float e[LT_ARGMAX_BLOCK];
            memcpy(e, logits + b0, (b1 - b0) * sizeof(float));
            se = simd->exp_shift(e, b1 - b0, mx);
        }
        lt_argmax_partial *q = &p[b0 / LT_ARGMAX_BLOCK];
        q->max = mx;
        q->argmax = arg;
        q->sumexp = se;
        q->n_nonfinite = bad;
    }
}

static void gemv(const lt_ctx *c, const lt_dispatch *d, int lm_head) {
    const lt_gemv_args *a = lt_args(c, d);
    const lt_simd *simd = lt_simd_get();
    lt_wmat w = {a->wformat, a->rows, a->cols, stored_cols(a->wformat, a->cols),
                 lt_bound(c, d, LT_GEMV_B_WQ), lt_bound(c, d, LT_GEMV_B_WS),
                 lt_bound(c, d, LT_GEMV_B_WM)};
    const float *x = lt_bound(c, d, LT_GEMV_B_X);
    float *y = lt_bound(c, d, LT_GEMV_B_Y);
    const float *bias = (a->flags & LT_GEMV_BIAS) ? lt_bound(c, d, LT_GEMV_B_BIAS) : NULL;
    const float *resid = (a->flags & LT_GEMV_RESID) ? lt_bound(c, d, LT_GEMV_B_RESID) : NULL;
    const float *norm_w = (a->flags & LT_GEMV_NORM) ? lt_bound(c, d, LT_GEMV_B_NORM) : NULL;
    size_t xs = a->x_stride;
    uint32_t T = c->T;
    if (lm_head && !(a->flags & LT_GEMV_ALL_TOKENS)) {
        x += (size_t)(T - 1) * xs;
        T = 1;
    }
    float *tile = c->tbuf + 2 * (size_t)w.stride;
    uint32_t xq = a->wformat >= LT_WF_Q8 ? simd->xq : LT_XQ_F32;
    int prep = needs_prep(a, simd->xq), quantized = xq != LT_XQ_F32;
    if (prep) {
        int add_one = (a->flags & LT_GEMV_NORM_ADD_ONE) != 0;
        size_t ps = lt_x_record_floats(xq, w.stride);  /* prepared token, floats */
        float *staging = c->tbuf, *buf = T == 1 ? c->tbuf + w.stride : c->shared;
        uint32_t lo = 0, hi = 1;
        if (T > 1)  /* tokens shared out; a barrier before anyone reads them */
            lt_split(T, 1, c->tid, c->nth, &lo, &hi);
        for (uint32_t t = lo; t < hi; t++) {
            float *dst = buf + t * ps;
            lt_prepare_x(x + t * xs, a->cols, w.stride, norm_w, add_one, a->eps, quantized ? staging : dst);
            if (quantized)
                simd->quantize(staging, w.stride, dst);
        }
        if (T > 1) {
            lt_sync(c);
        }
        x = buf;
        xs = ps;
    }
    /* Units of rows taken dynamically: about 8 per thread for a decode GEMV (few rows, each
     * claim costs an atomic), one row tile x all tokens in prefill, one argmax block in the LM
     * head (its partials belong to the unit's thread). */
    uint32_t grain = ROW_GRAIN;
    if (lm_head)
        grain = LT_ARGMAX_BLOCK;
    else if (T == 1)
        grain = (a->rows / (8 * (uint32_t)c->nth) + ROW_GRAIN - 1) / ROW_GRAIN * ROW_GRAIN;
    grain = grain < ROW_GRAIN ? ROW_GRAIN : grain;
    lt_argmax_partial *p = lm_head ? lt_bound(c, d, LT_GEMV_B_PARTIALS) : NULL;
    uint32_t units = (a->rows + grain - 1) / grain;
    for (uint32_t u; (u = lt_next_unit(c, units)) < units;) {
        uint32_t lo = u * grain, hi = lo + grain < a->rows ? lo + grain : a->rows;
        for (uint32_t r = lo; r < hi; r += ROW_TILE) {
            uint32_t nr = hi - r < ROW_TILE ? hi - r : ROW_TILE;
            for (uint32_t t0 = 0; t0 < T; t0 += simd->tok_tile) {
                uint32_t nt = T - t0 < simd->tok_tile ? T - t0 : simd->tok_tile;
                simd->gemm[a->wformat](&w, r, nr, x + t0 * xs, xs, nt, tile);
                epilogue(simd, a, tile, r, nr, t0, nt, bias, resid, y);
            }
        }
        if (p)
            partials(simd, y + (size_t)(T - 1) * a->y_stride, lo, hi, p);
    }
    if (prep && T > 1) {  /* the shared input buffer is reused by the next GEMV */
        lt_sync(c);
    }
}

void lt_k_gemv(const lt_ctx *c, const lt_dispatch *d) {
    gemv(c, d, 0);
}

void lt_k_lm_head(const lt_ctx *c, const lt_dispatch *d) {
    gemv(c, d, 1);
}
