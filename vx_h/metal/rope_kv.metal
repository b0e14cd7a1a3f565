// LT_K_ROPE_KV: per-head RMSNorm of q and k (optional), NeoX RoPE on the first rotary_dim dims at
// position step.pos + t, q -> Q_OUT, k and v appended to the f16 KV cache, Qwen3.5's per-head
// [q | gate] split (metal/lattice_shared.h).
// Launch (lattice/program.py): threadgroups (n_heads + 2 * n_kv_heads, rows), 64 threads: x picks
// a q head, then a k head, then a v head; y is the token (rows beyond step.n_tokens exit).
#include <metal_stdlib>
#include "lattice_shared.h"
using namespace metal;

static_assert(LT_ROPE_B_Q == 0 && LT_ROPE_B_K == 1 && LT_ROPE_B_V == 2 && LT_ROPE_B_Q_OUT == 3 &&
              LT_ROPE_B_K_CACHE == 4 && LT_ROPE_B_V_CACHE == 5 && LT_ROPE_B_INV_FREQ == 6 &&
              LT_ROPE_B_Q_NORM == 7 && LT_ROPE_B_K_NORM == 8 && LT_ROPE_B_GATE_OUT == 9,
              "lt_rope_kv: binding i is [[buffer(2 + i)]]");

// cos/sin of position * inv_freq. The product is kept as an unevaluated sum hi + lo and reduced
// modulo 2 pi before the trig call: f32 has no room for a large angle's fraction (the CPU and the
// reference compute the angle in double).
static float2 rope_cos_sin(uint position, float inv_freq)
{
    const float p = float(position);  // exact below 2^24
    const float hi = p * inv_freq;
    const float lo = fma(p, inv_freq, -hi);
    const float two_pi_hi = 6.28318548202514648438f;     // float(2 pi)
    const float two_pi_lo = -1.74845553146951715461e-7f;  // 2 pi - two_pi_hi
    const float n = rint(hi * 0.159154943091895335769f);
    const float r = fma(-n, two_pi_lo, fma(-n, two_pi_hi, hi)) + lo;
    return float2(cos(r), sin(r));
}

kernel void lt_rope_kv(device const lt_rope_kv_args& a        [[buffer(0)]],
                       device lt_step_args&          step     [[buffer(1)]],
                       device const float*           q        [[buffer(2)]],
                       device const float*           k        [[buffer(3)]],
                       device const float*           v        [[buffer(4)]],
                       device float*                 q_out    [[buffer(5)]],
                       device half*                  k_cache  [[buffer(6)]],
                       device half*                  v_cache  [[buffer(7)]],
                       device const float*           inv_freq [[buffer(8)]],
                       device const float*           q_norm   [[buffer(9)]],
                       device const float*           k_norm   [[buffer(10)]],
                       device float*                 gate_out [[buffer(11)]],
                       uint2 group [[threadgroup_position_in_grid]],
                       uint tid [[thread_position_in_threadgroup]],
                       uint ntg [[threads_per_threadgroup]],
                       uint lane [[thread_index_in_simdgroup]],
                       uint sg [[simdgroup_index_in_threadgroup]],
                       uint nsg [[simdgroups_per_threadgroup]])
{
    threadgroup float partial[32];
    const uint t = group.y, head = group.x, D = a.head_dim;
    if (t >= step.n_tokens || head >= a.n_heads + 2 * a.n_kv_heads) return;
    if (step.pos + step.n_tokens > a.ctx_cap) {
        if (tid == 0) {
            uint ok = LT_OK;  // the first error wins
            atomic_compare_exchange_weak_explicit((device atomic_uint*)&step.error, &ok, uint(LT_ERR_CONTEXT),
                                                  memory_order_relaxed, memory_order_relaxed);
        }
        return;
    }
    const uint p = step.pos + t;
    const bool split = (a.flags & LT_ROPE_SPLIT_GATE) != 0;
    if (head >= a.n_heads + a.n_kv_heads) {  // v head: append to the cache as is
        const uint kh = head - a.n_heads - a.n_kv_heads;
        device const float* src = v + t * a.v_stride + kh * D;
        device half* dst = v_cache + (ulong(kh) * a.ctx_cap + p) * D;
        for (uint i = tid; i < D; i += ntg) dst[i] = half(src[i]);
        return;
    }
    const bool is_q = head < a.n_heads;
    const uint kh = head - a.n_heads;
    device const float* src = is_q ? q + t * a.q_stride + head * (split ? 2 * D : D) : k + t * a.k_stride + kh * D;
    device const float* norm_w = is_q ? q_norm : k_norm;
    const bool norm = (a.flags & LT_ROPE_QK_NORM) != 0;
    const bool add_one = (a.flags & LT_ROPE_NORM_ADD_ONE) != 0;
    float r = 1.0f;
    if (norm) {
        float ss = 0.0f;
        for (uint i = tid; i < D; i += ntg) ss += src[i] * src[i];
        ss = simd_sum(ss);
        if (lane == 0) partial[sg] = ss;
        threadgroup_barrier(mem_flags::mem_threadgroup);
        float total = 0.0f;
        for (uint i = 0; i < nsg; i++) total += partial[i];
        r = rsqrt(total / float(D) + a.eps);
    }
    // Q_OUT may alias Q: every element is read before this barrier's threadgroup moves on to
    // writing, and each thread writes only the pairs it read.
    threadgroup_barrier(mem_flags::mem_device);
    const uint half_rot = a.rotary_dim / 2;
    device float* qo = q_out + t * a.q_out_stride + head * D;
    device half* kc = k_cache + (ulong(kh) * a.ctx_cap + p) * D;
    for (uint i = tid; i < D - half_rot; i += ntg) {
        // i < half_rot: the pair (i, i + half_rot); otherwise dim i + half_rot past the rotary part
        const uint j = i < half_rot ? i : i + half_rot;
        float x1 = src[j] * r;
        if (norm) x1 *= add_one ? 1.0f + norm_w[j] : norm_w[j];
        if (i < half_rot) {
            float x2 = src[j + half_rot] * r;
            if (norm) x2 *= add_one ? 1.0f + norm_w[j + half_rot] : norm_w[j + half_rot];
            const float2 cs = rope_cos_sin(p, inv_freq[i]);
            const float o1 = x1 * cs.x - x2 * cs.y, o2 = x2 * cs.x + x1 * cs.y;
            if (is_q) { qo[j] = o1; qo[j + half_rot] = o2; }
            else { kc[j] = half(o1); kc[j + half_rot] = half(o2); }
        } else if (is_q) {
            qo[j] = x1;
        } else {
            kc[j] = half(x1);
        }
    }
    if (is_q && split) {
        device float* go = gate_out + t * a.gate_stride + head * D;
        for (uint i = tid; i < D; i += ntg) go[i] = src[D + i];
    }
}
