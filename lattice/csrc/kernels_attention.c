/* Attention: q/k norm + RoPE + KV append (ROPE_KV), and causal GQA attention over the f16 KV
 * cache with f32 softmax (ATTENTION). KV cache layout: f16 [n_kv_heads][ctx_cap][head_dim]. */
#include "cpu_internal.h"

#define MAX_HEAD_DIM 512

size_t lt_attention_thread_floats(const lt_attention_args *a) {
    return (size_t)a->ctx_cap + a->head_dim;
}

static void head_norm(float *v, uint32_t n, const float *w, int add_one, float eps) {
    float ss = 0.0f;
    for (uint32_t k = 0; k < n; k++)
        ss += v[k] * v[k];
    float r = 1.0f / sqrtf(ss / (float)n + eps);
    for (uint32_t k = 0; k < n; k++)
        v[k] = v[k] * r * (add_one ? 1.0f + w[k] : w[k]);
}

/* NeoX rotation of pairs (i, i + half) with the angles' cos/sin. */
static void rotate(float *v, uint32_t half, const float *cs, const float *sn) {
    for (uint32_t i = 0; i < half; i++) {
        float x1 = v[i], x2 = v[i + half];
        v[i] = x1 * cs[i] - x2 * sn[i];
        v[i + half] = x2 * cs[i] + x1 * sn[i];
    }
}

void lt_k_rope_kv(const lt_ctx *c, const lt_dispatch *d) {
    const lt_rope_kv_args *a = lt_args(c, d);
    if (c->pos + c->T > a->ctx_cap) {
        lt_raise(c, LT_ERR_CONTEXT);
        return;
    }
    const float *q = lt_bound(c, d, LT_ROPE_B_Q), *k = lt_bound(c, d, LT_ROPE_B_K);
    const float *v = lt_bound(c, d, LT_ROPE_B_V), *inv_freq = lt_bound(c, d, LT_ROPE_B_INV_FREQ);
    float *q_out = lt_bound(c, d, LT_ROPE_B_Q_OUT), *gate_out = lt_bound(c, d, LT_ROPE_B_GATE_OUT);
    uint16_t *kc = lt_bound(c, d, LT_ROPE_B_K_CACHE), *vc = lt_bound(c, d, LT_ROPE_B_V_CACHE);
    const float *qn = NULL, *kn = NULL;
    if (a->flags & LT_ROPE_QK_NORM) {
        qn = lt_bound(c, d, LT_ROPE_B_Q_NORM);
        kn = lt_bound(c, d, LT_ROPE_B_K_NORM);
    }
    int add_one = (a->flags & LT_ROPE_NORM_ADD_ONE) != 0, split = (a->flags & LT_ROPE_SPLIT_GATE) != 0;
    uint32_t D = a->head_dim, half = a->rotary_dim / 2, heads = a->n_heads + a->n_kv_heads;
    float cs[MAX_HEAD_DIM / 2], sn[MAX_HEAD_DIM / 2], tmp[MAX_HEAD_DIM];
    uint32_t lo, hi, angles_for = UINT32_MAX;
    lt_split(c->T * heads, 1, c->tid, c->nth, &lo, &hi);
    for (uint32_t u = lo; u < hi; u++) {
        uint32_t t = u / heads, h = u % heads, p = c->pos + t;
        if (angles_for != t) {  /* angles in double, like the reference, then f32 cos/sin */
            for (uint32_t i = 0; i < half; i++) {
                double ang = (double)p * (double)inv_freq[i];
                cs[i] = (float)cos(ang);
                sn[i] = (float)sin(ang);
            }
            angles_for = t;
        }
        if (h < a->n_heads) {
            const float *src = q + (size_t)t * a->q_stride + (size_t)h * (split ? 2 * D : D);
            memcpy(tmp, src, D * sizeof(float));
            if (qn)
                head_norm(tmp, D, qn, add_one, a->eps);
            rotate(tmp, half, cs, sn);
            memcpy(q_out + (size_t)t * a->q_out_stride + (size_t)h * D, tmp, D * sizeof(float));
            if (split)
                memcpy(gate_out + (size_t)t * a->gate_stride + (size_t)h * D, src + D, D * sizeof(float));
        } else {
            uint32_t kh = h - a->n_heads;
            memcpy(tmp, k + (size_t)t * a->k_stride + (size_t)kh * D, D * sizeof(float));
            if (kn)
                head_norm(tmp, D, kn, add_one, a->eps);
            rotate(tmp, half, cs, sn);
            size_t slot = ((size_t)kh * a->ctx_cap + p) * D;
            const float *vs = v + (size_t)t * a->v_stride + (size_t)kh * D;
            for (uint32_t i = 0; i < D; i++) {
                kc[slot + i] = lt_f32_to_f16(tmp[i]);
                vc[slot + i] = lt_f32_to_f16(vs[i]);
            }
        }
    }
}

void lt_k_attention(const lt_ctx *c, const lt_dispatch *d) {
    const lt_attention_args *a = lt_args(c, d);
    if (c->pos + c->T > a->ctx_cap) {
        lt_raise(c, LT_ERR_CONTEXT);
        return;
    }
    const lt_simd *simd = lt_simd_get();
    const float *q = lt_bound(c, d, LT_ATTN_B_Q);
    float *out = lt_bound(c, d, LT_ATTN_B_OUT);
    const uint16_t *kc = lt_bound(c, d, LT_ATTN_B_K_CACHE), *vc = lt_bound(c, d, LT_ATTN_B_V_CACHE);
    const float *gate = (a->flags & LT_ATTN_OUT_GATE) ? lt_bound(c, d, LT_ATTN_B_GATE) : NULL;
    uint32_t D = a->head_dim, group = a->n_heads / a->n_kv_heads, lo, hi;
    float *scores = c->tbuf, *acc = c->tbuf + a->ctx_cap;
    lt_split(c->T * a->n_heads, 1, c->tid, c->nth, &lo, &hi);
    for (uint32_t u = lo; u < hi; u++) {
        uint32_t t = u / a->n_heads, h = u % a->n_heads, len = c->pos + t + 1;
        const float *qh = q + (size_t)t * a->q_stride + (size_t)h * D;
        const uint16_t *kh = kc + (size_t)(h / group) * a->ctx_cap * D;
        const uint16_t *vh = vc + (size_t)(h / group) * a->ctx_cap * D;
        float mx = -INFINITY;
        for (uint32_t j = 0; j < len; j++) {
            scores[j] = simd->dot_f16(qh, kh + (size_t)j * D, D) * a->scale;
            mx = scores[j] > mx ? scores[j] : mx;
        }
        float sum = 0.0f;
        for (uint32_t j = 0; j < len; j++) {
            scores[j] = expf(scores[j] - mx);
            sum += scores[j];
        }
        memset(acc, 0, D * sizeof(float));
        for (uint32_t j = 0; j < len; j++)
            simd->axpy_f16(acc, scores[j], vh + (size_t)j * D, D);
        float *o = out + (size_t)t * a->out_stride + (size_t)h * D;
        const float *g = gate ? gate + (size_t)t * a->gate_stride + (size_t)h * D : NULL;
        float inv = 1.0f / sum;
        for (uint32_t i = 0; i < D; i++)
            o[i] = g ? acc[i] * inv * lt_sigmoid(g[i]) : acc[i] * inv;
    }
}
