/* Qwen3.5 Gated DeltaNet, fused: conv1d step + SiLU, l2norm of q/k, decay/beta, the f32 state
 * update and the gated output RMSNorm. T > 1 scans the tokens in order.
 *
 * One work item is a key head with its group of value heads: the group shares the key head's
 * conv channels, so the item that computes them also owns their conv state (no races). */
#include "cpu_internal.h"

#define MAX_DIM 512

size_t lt_gdn_thread_floats(const lt_gdn_args *a) {
    (void)a;
    return 0;
}

/* out[i] = SiLU(conv over time of channel ch0 + i at token t), i < n. */
static void conv_silu(const lt_simd *simd, const float *x, size_t xs, const float *state, uint32_t C,
                      const float *w, uint32_t K, uint32_t t, uint32_t ch0, uint32_t n, float *out) {
    float sg[MAX_DIM];
    for (uint32_t i = 0; i < n; i++) {
        uint32_t ch = ch0 + i;
        float acc = 0.0f;
        for (uint32_t j = 0; j < K; j++) {
            int64_t r = (int64_t)t - (int64_t)(K - 1) + j;  /* input time; < 0: from the state */
            float in = r < 0 ? state[(size_t)(r + K - 1) * C + ch] : x[(size_t)r * xs + ch];
            acc += w[(size_t)ch * K + j] * in;
        }
        out[i] = sg[i] = acc;
    }
    simd->sigmoid(sg, n);
    for (uint32_t i = 0; i < n; i++)
        out[i] *= sg[i];
}

/* The last K-1 inputs become the state, oldest first (ascending order reads ahead of writes). */
static void conv_state_update(const float *x, size_t xs, float *state, uint32_t C, uint32_t K,
                              uint32_t T, uint32_t ch0, uint32_t n) {
    for (uint32_t i = 0; i + 1 < K; i++) {
        int64_t r = (int64_t)T - (int64_t)(K - 1) + i;
        for (uint32_t ch = ch0; ch < ch0 + n; ch++)
            state[(size_t)i * C + ch] = r < 0 ? state[(size_t)(r + K - 1) * C + ch] : x[(size_t)r * xs + ch];
    }
}

static void l2norm(float *v, uint32_t n, float scale) {
    float ss = 0.0f;
    for (uint32_t i = 0; i < n; i++)
        ss += v[i] * v[i];
    float r = scale / sqrtf(ss + 1e-6f);
    for (uint32_t i = 0; i < n; i++)
        v[i] *= r;
}

static inline float softplus(float x) {
    return x > 20.0f ? x : log1pf(expf(x));
}

void lt_k_gdn(const lt_ctx *c, const lt_dispatch *d) {
    const lt_gdn_args *a = lt_args(c, d);
    const float *x = lt_bound(c, d, LT_GDN_B_X), *z = lt_bound(c, d, LT_GDN_B_Z);
    const float *pa = lt_bound(c, d, LT_GDN_B_A), *pb = lt_bound(c, d, LT_GDN_B_B);
    const float *conv_w = lt_bound(c, d, LT_GDN_B_CONV_W), *a_log = lt_bound(c, d, LT_GDN_B_A_LOG);
    const float *dt_bias = lt_bound(c, d, LT_GDN_B_DT_BIAS), *norm_w = lt_bound(c, d, LT_GDN_B_NORM_W);
    float *out = lt_bound(c, d, LT_GDN_B_OUT), *cstate = lt_bound(c, d, LT_GDN_B_CONV_STATE);
    float *S = lt_bound(c, d, LT_GDN_B_S);
    uint32_t Dk = a->k_dim, Dv = a->v_dim, K = a->conv_kernel, C = a->channels;
    uint32_t group = a->n_v_heads / a->n_k_heads;
    float q[MAX_DIM], k[MAX_DIM], v[MAX_DIM], o[MAX_DIM];
    float q_scale = 1.0f / sqrtf((float)Dk);
    const lt_simd *simd = lt_simd_get();
    for (uint32_t kh; (kh = lt_next_unit(c, a->n_k_heads)) < a->n_k_heads;) {
        uint32_t qc = a->q_offset + kh * Dk, kc = a->k_offset + kh * Dk;
        for (uint32_t t = 0; t < c->T; t++) {
            conv_silu(simd, x, a->x_stride, cstate, C, conv_w, K, t, qc, Dk, q);
            conv_silu(simd, x, a->x_stride, cstate, C, conv_w, K, t, kc, Dk, k);
            l2norm(q, Dk, q_scale);
            l2norm(k, Dk, 1.0f);
            for (uint32_t h = kh * group; h < (kh + 1) * group; h++) {
                uint32_t vc = a->v_offset + h * Dv;
                conv_silu(simd, x, a->x_stride, cstate, C, conv_w, K, t, vc, Dv, v);
                float beta = lt_sigmoid(pb[(size_t)t * a->b_stride + h]);
                float g = -expf(a_log[h]) * softplus(pa[(size_t)t * a->a_stride + h] + dt_bias[h]);
                float decay = expf(g);
                float *Sh = S + (size_t)h * Dk * Dv;
                /* S *= decay; v - S^T k (in o as scratch) */
                for (uint32_t j = 0; j < Dv; j++)
                    o[j] = 0.0f;
                for (uint32_t i = 0; i < Dk; i++) {
                    float *row = Sh + (size_t)i * Dv;
                    for (uint32_t j = 0; j < Dv; j++) {
                        row[j] *= decay;
                        o[j] += row[j] * k[i];
                    }
                }
                for (uint32_t j = 0; j < Dv; j++)
                    v[j] = (v[j] - o[j]) * beta;
                /* S += k (x) delta; o = S^T q */
                for (uint32_t j = 0; j < Dv; j++)
                    o[j] = 0.0f;
                for (uint32_t i = 0; i < Dk; i++) {
                    float *row = Sh + (size_t)i * Dv;
                    for (uint32_t j = 0; j < Dv; j++) {
                        row[j] += k[i] * v[j];
                        o[j] += row[j] * q[i];
                    }
                }
                /* gated RMSNorm: RMSNorm(o) * w * silu(z) */
                float ss = 0.0f;
                for (uint32_t j = 0; j < Dv; j++)
                    ss += o[j] * o[j];
                float r = 1.0f / sqrtf(ss / (float)Dv + a->norm_eps);
                const float *zh = z + (size_t)t * a->z_stride + (size_t)h * Dv;
                float *oh = out + (size_t)t * a->out_stride + (size_t)h * Dv;
                float sz[MAX_DIM];
                memcpy(sz, zh, Dv * sizeof(float));
                simd->sigmoid(sz, Dv);
                for (uint32_t j = 0; j < Dv; j++)
                    oh[j] = o[j] * r * norm_w[j] * zh[j] * sz[j];
            }
        }
        conv_state_update(x, a->x_stride, cstate, C, K, c->T, qc, Dk);
        conv_state_update(x, a->x_stride, cstate, C, K, c->T, kc, Dk);
        conv_state_update(x, a->x_stride, cstate, C, K, c->T, a->v_offset + kh * group * Dv, group * Dv);
    }
}
