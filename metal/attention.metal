// LT_K_ATTENTION: query t of head h (position step.pos + t) attends to cache positions
// 0 .. pos + t of kv head h / (n_heads / n_kv_heads); f32 softmax over the f16 cache, optional
// sigmoid output gate (metal/lattice_shared.h). T > 1 is causal prefill: one threadgroup per
// (head, token).
// Launch (lattice/program.py): threadgroups (n_heads, rows), 256 threads.
// Split-K inside the threadgroup: each simdgroup takes every nsg-th 32-key chunk of the cache
// (one key per lane for the scores, lanes across head dims for the values) and keeps its own
// online softmax (max, sum, accumulator); the simdgroups' partitions are merged at the end.
#include <metal_stdlib>
#include "lattice_shared.h"
using namespace metal;

static_assert(LT_ATTN_B_Q == 0 && LT_ATTN_B_OUT == 1 && LT_ATTN_B_K_CACHE == 2 && LT_ATTN_B_V_CACHE == 3 &&
              LT_ATTN_B_GATE == 4, "lt_attention: binding i is [[buffer(2 + i)]]");

#define MAX_HEAD_DIM 512
#define MAX_SIMDGROUPS 8  // 256 threads
#define DIMS_PER_LANE (MAX_HEAD_DIM / 32)

static float sigmoid(float v) { return 1.0f / (1.0f + exp(-v)); }

[[max_total_threads_per_threadgroup(256)]]
kernel void lt_attention(device const lt_attention_args& a    [[buffer(0)]],
                         device lt_step_args&            step [[buffer(1)]],
                         device const float*             q    [[buffer(2)]],
                         device float*                   out  [[buffer(3)]],
                         device const half*              kc   [[buffer(4)]],
                         device const half*              vc   [[buffer(5)]],
                         device const float*             gate [[buffer(6)]],
                         uint2 group [[threadgroup_position_in_grid]],
                         uint tid [[thread_index_in_threadgroup]],
                         uint ntg [[threads_per_threadgroup]],
                         uint lane [[thread_index_in_simdgroup]],
                         uint sg [[simdgroup_index_in_threadgroup]],
                         uint nsg [[simdgroups_per_threadgroup]])
{
    threadgroup float qs[MAX_HEAD_DIM];                    // q * scale
    threadgroup float probs[MAX_SIMDGROUPS * 32];          // one chunk's probabilities per simdgroup
    threadgroup float accs[MAX_SIMDGROUPS * MAX_HEAD_DIM]; // per-simdgroup accumulators
    threadgroup float maxes[MAX_SIMDGROUPS];
    threadgroup float sums[MAX_SIMDGROUPS];
    const uint h = group.x, t = group.y, D = a.head_dim;
    if (t >= step.n_tokens || h >= a.n_heads || D > MAX_HEAD_DIM) return;
    if (step.pos + step.n_tokens > a.ctx_cap) {
        if (h == 0 && t == 0 && tid == 0) {
            uint ok = LT_OK;  // the first error wins
            atomic_compare_exchange_weak_explicit((device atomic_uint*)&step.error, &ok, uint(LT_ERR_CONTEXT),
                                                  memory_order_relaxed, memory_order_relaxed);
        }
        return;
    }
    const uint len = step.pos + t + 1;
    const uint kvh = h / (a.n_heads / a.n_kv_heads);
    device const half* kh = kc + ulong(kvh) * a.ctx_cap * D;
    device const half* vh = vc + ulong(kvh) * a.ctx_cap * D;
    device const float* qh = q + t * a.q_stride + h * D;
    for (uint i = tid; i < D; i += ntg) qs[i] = qh[i] * a.scale;
    threadgroup_barrier(mem_flags::mem_threadgroup);

    float m = -INFINITY, l = 0.0f;
    float acc[DIMS_PER_LANE];
    for (uint i = 0; i < DIMS_PER_LANE; i++) acc[i] = 0.0f;
    const bool vec4 = D % 4 == 0;
    for (uint c0 = sg * 32; c0 < len; c0 += nsg * 32) {
        const uint j = c0 + lane;
        float s = -INFINITY;
        if (j < len) {
            device const half* kr = kh + ulong(j) * D;
            s = 0.0f;
            if (vec4) {
                for (uint i = 0; i < D; i += 4) {
                    const float4 kv = float4(*(device const half4*)(kr + i));
                    s += kv.x * qs[i] + kv.y * qs[i + 1] + kv.z * qs[i + 2] + kv.w * qs[i + 3];
                }
            } else {
                for (uint i = 0; i < D; i++) s += float(kr[i]) * qs[i];
            }
        }
        const float m_new = max(m, simd_max(s));  // finite: key c0 < len is in this chunk
        const float alpha = exp(m - m_new);
        const float p = j < len ? exp(s - m_new) : 0.0f;
        l = l * alpha + simd_sum(p);
        m = m_new;
        probs[sg * 32 + lane] = p;
        simdgroup_barrier(mem_flags::mem_threadgroup);
        const uint n = min(32u, len - c0);
        for (uint i = 0; i < DIMS_PER_LANE; i++) {
            const uint d = lane + 32 * i;
            if (d >= D) break;
            float v = acc[i] * alpha;
            for (uint jj = 0; jj < n; jj++) v += probs[sg * 32 + jj] * float(vh[ulong(c0 + jj) * D + d]);
            acc[i] = v;
        }
        simdgroup_barrier(mem_flags::mem_threadgroup);  // probs is rewritten by the next chunk
    }
    if (lane == 0) { maxes[sg] = m; sums[sg] = l; }
    for (uint i = 0; i < DIMS_PER_LANE; i++) {
        const uint d = lane + 32 * i;
        if (d >= D) break;
        accs[sg * MAX_HEAD_DIM + d] = acc[i];
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);

    // merge the simdgroups' partitions (a partition without keys has m = -inf, l = 0, acc = 0)
    float M = -INFINITY;
    for (uint g = 0; g < nsg; g++) M = max(M, float(maxes[g]));
    float L = 0.0f;
    for (uint g = 0; g < nsg; g++) L += sums[g] * exp(maxes[g] - M);
    device float* o = out + t * a.out_stride + h * D;
    device const float* gt = gate + t * a.gate_stride + h * D;
    const bool gated = (a.flags & LT_ATTN_OUT_GATE) != 0;
    for (uint d = tid; d < D; d += ntg) {
        float v = 0.0f;
        for (uint g = 0; g < nsg; g++) v += accs[g * MAX_HEAD_DIM + d] * exp(maxes[g] - M);
        v /= L;
        o[d] = gated ? v * sigmoid(gt[d]) : v;
    }
}
