/* Row-wise kernels: embedding lookup, RMSNorm (whole row, per head, gated), elementwise ops.
 * Work is split across threads by token rows (by heads when there is one token). */
#include "cpu_internal.h"

void lt_k_embed(const lt_ctx *c, const lt_dispatch *d) {
    const lt_embed_args *a = lt_args(c, d);
    const uint32_t *ids = lt_bound(c, d, LT_EMBED_B_IDS);
    float *out = lt_bound(c, d, LT_EMBED_B_OUT);
    const void *wq = lt_bound(c, d, LT_EMBED_B_WQ);
    const uint16_t *ws = lt_bound(c, d, LT_EMBED_B_WS), *wm = lt_bound(c, d, LT_EMBED_B_WM);
    uint32_t nb = (a->dim + LT_QK - 1) / LT_QK, stride = nb * LT_QK;
    /* (token, 32-column block) pairs, so that one token still spreads over the threads */
    uint32_t lo, hi;
    lt_split(c->T * nb, 1, c->tid, c->nth, &lo, &hi);
    for (uint32_t u = lo; u < hi; u++) {
        uint32_t t = u / nb, b = u % nb, id = ids[t];
        if (id >= a->vocab) {
            lt_raise(c, LT_ERR_TOKEN);
            continue;
        }
        float *o = out + (size_t)t * a->out_stride;
        uint32_t k1 = (b + 1) * LT_QK < a->dim ? (b + 1) * LT_QK : a->dim;
        for (uint32_t k = b * LT_QK; k < k1; k++) {
            float v;
            switch (a->wformat) {
            case LT_WF_F32: v = ((const float *)wq)[(size_t)id * a->dim + k]; break;
            case LT_WF_F16: v = lt_f16_to_f32(((const uint16_t *)wq)[(size_t)id * a->dim + k]); break;
            case LT_WF_Q8:
                v = (float)((const int8_t *)wq)[(size_t)id * stride + k]
                    * lt_f16_to_f32(ws[(size_t)id * nb + b]);
                break;
            default: {
                uint8_t byte = ((const uint8_t *)wq)[(size_t)id * (stride / 2) + b * 16 + (k % 32) % 16];
                uint32_t q = (k % 32) < 16 ? (byte & 0x0fu) : (uint32_t)(byte >> 4);
                v = (float)q * lt_f16_to_f32(ws[(size_t)id * nb + b]) + lt_f16_to_f32(wm[(size_t)id * nb + b]);
            }
            }
            o[k] = v * a->scale;
        }
    }
}

void lt_k_rmsnorm(const lt_ctx *c, const lt_dispatch *d) {
    const lt_rmsnorm_args *a = lt_args(c, d);
    const float *x = lt_bound(c, d, LT_NORM_B_X);
    float *out = lt_bound(c, d, LT_NORM_B_OUT);
    const float *w = lt_bound(c, d, LT_NORM_B_W);
    const float *z = (a->flags & LT_NORM_SILU_GATE) ? lt_bound(c, d, LT_NORM_B_Z) : NULL;
    int add_one = (a->flags & LT_NORM_ADD_ONE) != 0;
    uint32_t n = a->head_dim, lo, hi;
    lt_split(c->T * a->n_heads, 1, c->tid, c->nth, &lo, &hi);
    for (uint32_t u = lo; u < hi; u++) {
        uint32_t t = u / a->n_heads, h = u % a->n_heads;
        const float *xr = x + (size_t)t * a->in_stride + (size_t)h * n;
        float *o = out + (size_t)t * a->out_stride + (size_t)h * n;
        const float *zr = z ? z + (size_t)t * a->z_stride + (size_t)h * n : NULL;
        float ss = 0.0f;
        for (uint32_t k = 0; k < n; k++)
            ss += xr[k] * xr[k];
        float r = 1.0f / sqrtf(ss / (float)n + a->eps);
        for (uint32_t k = 0; k < n; k++) {
            float v = xr[k] * r * (add_one ? 1.0f + w[k] : w[k]);
            o[k] = zr ? v * lt_silu(zr[k]) : v;
        }
    }
}

void lt_k_elementwise(const lt_ctx *c, const lt_dispatch *d) {
    const lt_elementwise_args *a = lt_args(c, d);
    const float *pa = lt_bound(c, d, LT_EW_B_A), *pb = lt_bound(c, d, LT_EW_B_B);
    float *out = lt_bound(c, d, LT_EW_B_OUT);
    uint32_t per = 256, chunks = (a->n + per - 1) / per, lo, hi;
    lt_split(c->T * chunks, 1, c->tid, c->nth, &lo, &hi);
    for (uint32_t u = lo; u < hi; u++) {
        uint32_t t = u / chunks, k0 = (u % chunks) * per, k1 = k0 + per < a->n ? k0 + per : a->n;
        const float *ar = pa + (size_t)t * a->a_stride;
        const float *br = pb ? pb + (size_t)t * a->b_stride : NULL;
        float *o = out + (size_t)t * a->out_stride;
        for (uint32_t k = k0; k < k1; k++) {
            switch (a->op) {
            case LT_EW_ADD: o[k] = ar[k] + br[k]; break;
            case LT_EW_SILU_MUL: o[k] = lt_silu(ar[k]) * br[k]; break;
            case LT_EW_SIGMOID_MUL: o[k] = ar[k] * lt_sigmoid(br[k]); break;
            default: o[k] = ar[k];
            }
        }
    }
}
