/* Attention: q/k norm + RoPE + KV append (ROPE_KV), and causal GQA attention over the f16 KV
 * cache with f32 softmax (ATTENTION). KV cache layout: f16 [n_kv_heads][ctx_cap][head_dim]. */
#include "cpu_internal.h"

#define MAX_HEAD_DIM 512

size_t lt_attention_thread_floats(const lt_attention_args *a) {
    size_t per_query = ((size_t)a->ctx_cap + a->head_dim) * (a->n_heads / a->n_kv_heads);
    size_t block = lt_attend_block_floats(a->head_dim, a->ctx_cap) + (size_t)LT_ATTN_BLOCK_Q * a->head_dim;
    return per_query > block ? per_query : block;
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

/* Decode with few heads would leave threads idle: with one token, each kv head's positions are
 * split into chunks (>= MIN_CHUNK positions each, about two work items per thread), the chunks'
 * partial softmax states go to the shared scratch, and a second phase merges them per head. */
#define MAX_CHUNKS 64
#define MAX_GROUP 512   /* query heads per kv head (checked at create) */
#define MIN_CHUNK 64

size_t lt_attention_shared_floats(const lt_attention_args *a) {
    return (size_t)a->n_heads * MAX_CHUNKS * (a->head_dim + 2);
}

/* One (token, kv head, position range) item for every query head of the group: scores, then
 * softmax state (max m, sum l, unnormalized acc) per head. K and V rows are read once per group. */
static void attend_range(const lt_attention_args *a, const lt_simd *simd, const float *const *qh,
                         const uint16_t *kh, const uint16_t *vh, uint32_t j0, uint32_t j1,
                         uint32_t group, float *scores, float *m, float *l, float *acc) {
    uint32_t D = a->head_dim, n = j1 - j0;
    for (uint32_t j = j0; j < j1; j++)
        for (uint32_t g = 0; g < group; g++)
            scores[g * n + (j - j0)] = simd->dot_f16(qh[g], kh + (size_t)j * D, D) * a->scale;
    for (uint32_t g = 0; g < group; g++) {
        float *sg = scores + g * n, mx = -INFINITY;
        for (uint32_t j = 0; j < n; j++)
            mx = sg[j] > mx ? sg[j] : mx;
        m[g] = mx;
        l[g] = simd->exp_shift(sg, n, mx);
        memset(acc + g * D, 0, D * sizeof(float));
    }
    for (uint32_t j = j0; j < j1; j++)
        for (uint32_t g = 0; g < group; g++)
            simd->axpy_f16(acc + g * D, scores[g * n + (j - j0)], vh + (size_t)j * D, D);
}

static void finish(const lt_simd *simd, float *o, const float *acc, float inv, const float *gate, uint32_t D) {
    float sg[MAX_HEAD_DIM];
    if (gate) {
        memcpy(sg, gate, D * sizeof(float));
        simd->sigmoid(sg, D);
    }
    for (uint32_t i = 0; i < D; i++)
        o[i] = gate ? acc[i] * inv * sg[i] : acc[i] * inv;
}

/* Prefill through the path's attend_block: items are (block of tokens, kv head), taken dynamically. */
static void attention_blocks(const lt_ctx *c, const lt_dispatch *d, const lt_simd *simd) {
    const lt_attention_args *a = lt_args(c, d);
    const float *q = lt_bound(c, d, LT_ATTN_B_Q);
    float *out = lt_bound(c, d, LT_ATTN_B_OUT);
    const uint16_t *kc = lt_bound(c, d, LT_ATTN_B_K_CACHE), *vc = lt_bound(c, d, LT_ATTN_B_V_CACHE);
    const float *gate = (a->flags & LT_ATTN_OUT_GATE) ? lt_bound(c, d, LT_ATTN_B_GATE) : NULL;
    uint32_t D = a->head_dim, Hkv = a->n_kv_heads, group = a->n_heads / Hkv;
    uint32_t tb = LT_ATTN_BLOCK_Q / group < 8 ? LT_ATTN_BLOCK_Q / group : 8, blocks = (c->T + tb - 1) / tb;
    float m[LT_ATTN_BLOCK_Q], l[LT_ATTN_BLOCK_Q];
    lt_attend_block b;
    b.D = D;
    b.scale = a->scale;
    b.m = m;
    b.l = l;
    b.acc = c->tbuf;
    b.scratch = c->tbuf + (size_t)LT_ATTN_BLOCK_Q * D;
    for (uint32_t u; (u = lt_next_unit(c, blocks * Hkv)) < blocks * Hkv;) {
        uint32_t t0 = u / Hkv * tb, kvh = u % Hkv, t1 = t0 + tb < c->T ? t0 + tb : c->T;
        b.nq = 0;
        for (uint32_t t = t0; t < t1; t++)
            for (uint32_t g = 0; g < group; g++, b.nq++) {
                b.q[b.nq] = q + (size_t)t * a->q_stride + (size_t)(kvh * group + g) * D;
                b.len[b.nq] = c->pos + t + 1;
            }
        b.k = kc + (size_t)kvh * a->ctx_cap * D;
        b.v = vc + (size_t)kvh * a->ctx_cap * D;
        simd->attend_block(&b);
        uint32_t i = 0;
        for (uint32_t t = t0; t < t1; t++)
            for (uint32_t g = 0; g < group; g++, i++) {
                size_t col = (size_t)(kvh * group + g) * D;
                finish(simd, out + (size_t)t * a->out_stride + col, b.acc + (size_t)i * D, 1.0f / l[i],
                       gate ? gate + (size_t)t * a->gate_stride + col : NULL, D);
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
    if (c->T > 1 && simd->attend_block && a->head_dim % 16 == 0 && a->n_heads / a->n_kv_heads <= LT_ATTN_BLOCK_Q) {
        attention_blocks(c, d, simd);
        return;
    }
    const float *q = lt_bound(c, d, LT_ATTN_B_Q);
    float *out = lt_bound(c, d, LT_ATTN_B_OUT);
    const uint16_t *kc = lt_bound(c, d, LT_ATTN_B_K_CACHE), *vc = lt_bound(c, d, LT_ATTN_B_V_CACHE);
    const float *gate = (a->flags & LT_ATTN_OUT_GATE) ? lt_bound(c, d, LT_ATTN_B_GATE) : NULL;
    uint32_t D = a->head_dim, Hkv = a->n_kv_heads, group = a->n_heads / Hkv, chunks = 1;
    if (c->T == 1 && c->nth > 1) {
        uint32_t want = (2 * (uint32_t)c->nth + Hkv - 1) / Hkv, by_len = (c->pos + 1) / MIN_CHUNK;
        chunks = want < by_len ? want : by_len;
        chunks = chunks > MAX_CHUNKS ? MAX_CHUNKS : chunks < 1 ? 1 : chunks;
    }
    float *scores = c->tbuf, *acc = c->tbuf + (size_t)group * a->ctx_cap;
    float m[MAX_GROUP], l[MAX_GROUP];
    const float *qh[MAX_GROUP];
    uint32_t lo, hi, items = c->T * Hkv * chunks;
    /* Items taken dynamically: a causal prefill's later tokens attend to more positions. */
    for (uint32_t u; (u = lt_next_unit(c, items)) < items;) {
        uint32_t t = u / (Hkv * chunks), kvh = (u / chunks) % Hkv, ch = u % chunks;
        uint32_t len = c->pos + t + 1, j0 = len * ch / chunks, j1 = len * (ch + 1) / chunks;
        for (uint32_t g = 0; g < group; g++)
            qh[g] = q + (size_t)t * a->q_stride + (size_t)(kvh * group + g) * D;
        size_t base = (size_t)kvh * a->ctx_cap * D;
        if (chunks == 1) {
            attend_range(a, simd, qh, kc + base, vc + base, j0, j1, group, scores, m, l, acc);
            for (uint32_t g = 0; g < group; g++) {
                size_t col = (size_t)(kvh * group + g) * D;
                finish(simd, out + (size_t)t * a->out_stride + col, acc + g * D, 1.0f / l[g],
                       gate ? gate + (size_t)t * a->gate_stride + col : NULL, D);
            }
        } else {  /* partial state of head h, chunk ch at shared + (h * chunks + ch) * (D + 2) */
            attend_range(a, simd, qh, kc + base, vc + base, j0, j1, group, scores, m, l, acc);
            for (uint32_t g = 0; g < group; g++) {
                float *p = c->shared + ((size_t)(kvh * group + g) * chunks + ch) * (D + 2);
                p[0] = m[g];
                p[1] = l[g];
                memcpy(p + 2, acc + g * D, D * sizeof(float));
            }
        }
    }
    if (chunks == 1)
        return;
    lt_sync(c);
    lt_split(a->n_heads, 1, c->tid, c->nth, &lo, &hi);
    for (uint32_t h = lo; h < hi; h++) {
        const float *p = c->shared + (size_t)h * chunks * (D + 2);
        float mx = -INFINITY, sum = 0.0f;
        for (uint32_t ch = 0; ch < chunks; ch++)
            mx = p[ch * (D + 2)] > mx ? p[ch * (D + 2)] : mx;
        memset(acc, 0, D * sizeof(float));
        for (uint32_t ch = 0; ch < chunks; ch++) {
            const float *pc = p + ch * (D + 2);
            float w = expf(pc[0] - mx);
            sum += pc[1] * w;
            for (uint32_t i = 0; i < D; i++)
                acc[i] += pc[2 + i] * w;
        }
        finish(simd, out + (size_t)h * D, acc, 1.0f / sum, gate ? gate + (size_t)h * D : NULL, D);
    }
    lt_sync(c);  /* the shared scratch is reused by the next dispatch that needs it */
}
