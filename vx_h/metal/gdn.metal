// LT_K_GDN: one Qwen3.5 Gated DeltaNet layer, fused (metal/lattice_shared.h): causal depthwise
// conv1d with its state + SiLU, l2norm of q/k, decay/beta, the f32 recurrent state update and the
// gated output RMSNorm; T > 1 scans the tokens in order.
// Launch (lattice/program.py): one threadgroup per value head, 128 threads. A thread owns state
// columns j (value dims): it walks its column of S [k_dim][v_dim] twice per token (S^T k, then
// the update and S^T q); neighbouring threads read neighbouring columns, so loads coalesce.
// Value heads that share a key head also share its q/k conv channels, whose conv state must be
// read by all of them before one writes it; threadgroups of one dispatch cannot wait for each
// other, so when n_v_heads > n_k_heads the first threadgroup of each key head runs the key
// head's value heads one after another and the others exit.
#include <metal_stdlib>
#include "lattice_shared.h"
using namespace metal;

static_assert(LT_GDN_B_X == 0 && LT_GDN_B_Z == 1 && LT_GDN_B_A == 2 && LT_GDN_B_B == 3 && LT_GDN_B_OUT == 4 &&
              LT_GDN_B_CONV_W == 5 && LT_GDN_B_CONV_STATE == 6 && LT_GDN_B_A_LOG == 7 && LT_GDN_B_DT_BIAS == 8 &&
              LT_GDN_B_S == 9 && LT_GDN_B_NORM_W == 10, "lt_gdn: binding i is [[buffer(2 + i)]]");

#define MAX_DIM 512
#define MIN_THREADS 32
#define COLS_PER_THREAD (MAX_DIM / MIN_THREADS)

static float sigmoid(float v) { return 1.0f / (1.0f + exp(-v)); }
static float silu(float v) { return v / (1.0f + exp(-v)); }

// torch's softplus (linear above 20); log1p(y) = log(u) * y / (u - 1) with u = 1 + y keeps small y exact
static float softplus(float v)
{
    if (v > 20.0f) return v;
    const float y = exp(v), u = 1.0f + y;
    return u == 1.0f ? y : log(u) * (y / (u - 1.0f));
}

// conv over time for channel ch at token t (inputs before token 0 come from the state), then SiLU
static float conv_silu(device const float* x, uint xs, device const float* state, uint C,
                       device const float* w, uint K, uint t, uint ch)
{
    float acc = 0.0f;
    for (uint j = 0; j < K; j++) {
        const int r = int(t) - int(K - 1) + int(j);
        const float in = r < 0 ? state[uint(r + int(K) - 1) * C + ch] : x[uint(r) * xs + ch];
        acc += w[ch * K + j] * in;
    }
    return silu(acc);
}

// sum of v over the threadgroup (every thread gets it); partial is free again on return
static float threadgroup_sum(float v, threadgroup float* partial, uint lane, uint sg, uint nsg)
{
    v = simd_sum(v);
    if (lane == 0) partial[sg] = v;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    float total = 0.0f;
    for (uint i = 0; i < nsg; i++) total += partial[i];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    return total;
}

kernel void lt_gdn(device const lt_gdn_args& a         [[buffer(0)]],
                   device const lt_step_args& step     [[buffer(1)]],
                   device const float*       x         [[buffer(2)]],
                   device const float*       z         [[buffer(3)]],
                   device const float*       pa        [[buffer(4)]],
                   device const float*       pb        [[buffer(5)]],
                   device float*             out       [[buffer(6)]],
                   device const float*       conv_w    [[buffer(7)]],
                   device float*             conv_state [[buffer(8)]],
                   device const float*       a_log     [[buffer(9)]],
                   device const float*       dt_bias   [[buffer(10)]],
                   device float*             S         [[buffer(11)]],
                   device const float*       norm_w    [[buffer(12)]],
                   uint head [[threadgroup_position_in_grid]],
                   uint tid [[thread_index_in_threadgroup]],
                   uint ntg [[threads_per_threadgroup]],
                   uint lane [[thread_index_in_simdgroup]],
                   uint sg [[simdgroup_index_in_threadgroup]],
                   uint nsg [[simdgroups_per_threadgroup]])
{
    threadgroup float qs[MAX_DIM];
    threadgroup float ks[MAX_DIM];
    threadgroup float partial[32];
    const uint Dk = a.k_dim, Dv = a.v_dim, K = a.conv_kernel, C = a.channels, T = step.n_tokens;
    if (T == 0 || head >= a.n_v_heads || a.n_k_heads == 0 || Dk > MAX_DIM || Dv > MAX_DIM || ntg < MIN_THREADS) return;
    const uint group = a.n_v_heads / a.n_k_heads;
    if (head % group != 0) return;
    const uint kh = head / group;
    const uint qc = a.q_offset + kh * Dk, kc = a.k_offset + kh * Dk;
    const float q_scale = rsqrt(float(Dk));
    for (uint t = 0; t < T; t++) {
        float ssq = 0.0f, ssk = 0.0f;
        for (uint i = tid; i < Dk; i += ntg) {
            const float qv = conv_silu(x, a.x_stride, conv_state, C, conv_w, K, t, qc + i);
            const float kv = conv_silu(x, a.x_stride, conv_state, C, conv_w, K, t, kc + i);
            ssq += qv * qv;
            ssk += kv * kv;
            qs[i] = qv;
            ks[i] = kv;
        }
        const float rq = q_scale / sqrt(threadgroup_sum(ssq, partial, lane, sg, nsg) + 1e-6f);
        const float rk = 1.0f / sqrt(threadgroup_sum(ssk, partial, lane, sg, nsg) + 1e-6f);
        for (uint i = tid; i < Dk; i += ntg) {
            const float qv = qs[i], kv = ks[i];
            qs[i] = qv * rq;
            ks[i] = kv * rk;
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
        for (uint h = kh * group; h < (kh + 1) * group; h++) {
            const uint vc = a.v_offset + h * Dv;
            const float beta = sigmoid(pb[t * a.b_stride + h]);
            const float decay = exp(-exp(a_log[h]) * softplus(pa[t * a.a_stride + h] + dt_bias[h]));
            device float* Sh = S + ulong(h) * Dk * Dv;
            float o[COLS_PER_THREAD];
            float ss = 0.0f;
            for (uint c = 0, j = tid; j < Dv; c++, j += ntg) {
                const float v = conv_silu(x, a.x_stride, conv_state, C, conv_w, K, t, vc + j);
                float remembered = 0.0f;  // (S * decay)^T k
                for (uint i = 0; i < Dk; i++) remembered += Sh[i * Dv + j] * decay * ks[i];
                const float delta = (v - remembered) * beta;
                float oj = 0.0f;
                for (uint i = 0; i < Dk; i++) {
                    const float s = Sh[i * Dv + j] * decay + ks[i] * delta;
                    Sh[i * Dv + j] = s;
                    oj += s * qs[i];
                }
                o[c] = oj;
                ss += oj * oj;
            }
            const float r = rsqrt(threadgroup_sum(ss, partial, lane, sg, nsg) / float(Dv) + a.norm_eps);
            device const float* zh = z + t * a.z_stride + h * Dv;
            device float* oh = out + t * a.out_stride + h * Dv;
            for (uint c = 0, j = tid; j < Dv; c++, j += ntg) oh[j] = o[c] * r * norm_w[j] * silu(zh[j]);
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);  // qs and ks are rewritten by the next token
    }
    // Every conv state read of this threadgroup is done; the last K-1 inputs become the state,
    // oldest first (ascending i reads rows at or after i: a channel's reads come before its writes).
    threadgroup_barrier(mem_flags::mem_device);
    const uint n_own = 2 * Dk + group * Dv;
    for (uint u = tid; u < n_own; u += ntg) {
        const uint ch = u < Dk ? qc + u : u < 2 * Dk ? kc + (u - Dk) : a.v_offset + kh * group * Dv + (u - 2 * Dk);
        for (uint i = 0; i + 1 < K; i++) {
            const int r = int(T) - int(K - 1) + int(i);
            conv_state[i * C + ch] = r < 0 ? conv_state[uint(r + int(K) - 1) * C + ch] : x[uint(r) * a.x_stride + ch];
        }
    }
}
