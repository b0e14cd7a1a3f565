// LT_K_ATTENTION: query t of head h (position step.pos + t) attends to cache positions
// 0 .. pos + t of kv head h / (n_heads / n_kv_heads); f32 softmax over the f16 cache, optional
// sigmoid output gate (metal/lattice_shared.h). T > 1 is causal prefill: one threadgroup per
// (head, token).
// Launch (lattice/program.py): threadgroups (n_heads, rows), 256 threads.
// Split-K inside the threadgroup: each simdgroup takes every nsg-th 32-key chunk of its range
// (one key per lane for the scores, lanes across head dims for the values) and keeps its own
// online softmax (max, sum, accumulator); the simdgroups' partitions are merged at the end.
// Split-K across threadgroups, for long contexts with few heads (a backend option, outside the
// program format, like the CUDA backend's): launched with grid.z = n_splits > 1, threadgroup z
// covers the z-th of n_splits equal ranges (whole 32-key chunks; trailing ranges may be empty)
// of the query's keys and writes its partition
// (max, sum, unnormalized accumulator) to WORKSPACE; lt_attention_reduce, dispatched after it
// behind a barrier with grid (n_heads, rows) and the same bindings, merges them into OUT.
// WORKSPACE (slot 2 + LT_MAX_BIND, owned by the backend): 4 floats (n_splits as uint, written by
// every threadgroup), then f32 [rows][n_heads][n_splits][head_dim + 2].
#include <metal_stdlib>
#include "lattice_shared.h"
using namespace metal;

static_assert(LT_ATTN_B_Q == 0 && LT_ATTN_B_OUT == 1 && LT_ATTN_B_K_CACHE == 2 && LT_ATTN_B_V_CACHE == 3 &&
              LT_ATTN_B_GATE == 4, "lt_attention: binding i is [[buffer(2 + i)]]");

#define MAX_HEAD_DIM 512
#define MAX_SIMDGROUPS 8  // 256 threads
#define DIMS_PER_LANE (MAX_HEAD_DIM / 32)
#define WORKSPACE_HEADER 4
static_assert(2 + LT_MAX_BIND == 14, "lt_attention: the split workspace is [[buffer(2 + LT_MAX_BIND)]]");

static float sigmoid(float v) { return 1.0f / (1.0f + exp(-v)); }

static bool context_exceeded(device lt_step_args& step, uint ctx_cap, bool report)
{
    if (step.pos + step.n_tokens <= ctx_cap) return false;
    if (report) {
        uint ok = LT_OK;  // the first error wins
        atomic_compare_exchange_weak_explicit((device atomic_uint*)&step.error, &ok, uint(LT_ERR_CONTEXT),
                                              memory_order_relaxed, memory_order_relaxed);
    }
    return true;
}

// partition (t, h, split) of the workspace: max, sum, then head_dim accumulators
static device float* partition(device float* ws, uint t, uint h, uint split, uint n_heads, uint n_splits, uint D)
{
    return ws + WORKSPACE_HEADER + ((ulong(t) * n_heads + h) * n_splits + split) * (D + 2);
}

[[max_total_threads_per_threadgroup(256)]]
kernel void lt_attention(device const lt_attention_args& a    [[buffer(0)]],
                         device lt_step_args&            step [[buffer(1)]],
                         device const float*             q    [[buffer(2)]],
                         device float*                   out  [[buffer(3)]],
                         device const half*              kc   [[buffer(4)]],
                         device const half*              vc   [[buffer(5)]],
                         device const float*             gate [[buffer(6)]],
                         device float*                   ws   [[buffer(14)]],
                         uint3 group [[threadgroup_position_in_grid]],
                         uint3 n_groups [[threadgroups_per_grid]],
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
    const uint h = group.x, t = group.y, split = group.z, n_splits = n_groups.z, D = a.head_dim;
    if (t >= step.n_tokens || h >= a.n_heads || D > MAX_HEAD_DIM) return;
    if (context_exceeded(step, a.ctx_cap, h == 0 && t == 0 && split == 0 && tid == 0)) return;
    // this threadgroup's keys [k0, k1) of the query's 0 .. pos + t, in whole 32-key chunks
    const uint len = step.pos + t + 1;
    const uint per_split = ((len + n_splits - 1) / n_splits + 31) / 32 * 32;
    const uint k0 = min(split * per_split, len), k1 = min(k0 + per_split, len);
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
    for (uint c0 = k0 + sg * 32; c0 < k1; c0 += nsg * 32) {
        const uint j = c0 + lane;
        float s = -INFINITY;
        if (j < k1) {
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
        const float m_new = max(m, simd_max(s));  // finite: key c0 < k1 is in this chunk
        const float alpha = exp(m - m_new);
        const float p = j < k1 ? exp(s - m_new) : 0.0f;
        l = l * alpha + simd_sum(p);
        m = m_new;
        probs[sg * 32 + lane] = p;
        simdgroup_barrier(mem_flags::mem_threadgroup);
        const uint n = min(32u, k1 - c0);
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

    // merge the simdgroups' partitions; one without keys has l = 0 (one with keys: l >= 1) and
    // is skipped without arithmetic on infinities
    float M = -FLT_MAX;
    for (uint g = 0; g < nsg; g++)
        if (sums[g] > 0.0f) M = max(M, float(maxes[g]));
    float L = 0.0f;
    for (uint g = 0; g < nsg; g++)
        if (sums[g] > 0.0f) L += sums[g] * exp(maxes[g] - M);
    if (n_splits > 1) {  // this split's partition for lt_attention_reduce
        device float* part = partition(ws, t, h, split, a.n_heads, n_splits, D);
        if (tid == 0) {
            *(device uint*)ws = n_splits;
            part[0] = M;
            part[1] = L;
        }
        for (uint d = tid; d < D; d += ntg) {
            float v = 0.0f;
            for (uint g = 0; g < nsg; g++)
                if (sums[g] > 0.0f) v += accs[g * MAX_HEAD_DIM + d] * exp(maxes[g] - M);
            part[2 + d] = v;
        }
        return;
    }
    device float* o = out + t * a.out_stride + h * D;
    device const float* gt = gate + t * a.gate_stride + h * D;
    const bool gated = (a.flags & LT_ATTN_OUT_GATE) != 0;
    for (uint d = tid; d < D; d += ntg) {
        float v = 0.0f;
        for (uint g = 0; g < nsg; g++)
            if (sums[g] > 0.0f) v += accs[g * MAX_HEAD_DIM + d] * exp(maxes[g] - M);
        v /= L;
        o[d] = gated ? v * sigmoid(gt[d]) : v;
    }
}

// Merges lt_attention's split partitions (grid.z > 1) of query t, head h into OUT (+ output gate).
// Launch: threadgroups (n_heads, rows), any width; after lt_attention behind a barrier.
kernel void lt_attention_reduce(device const lt_attention_args& a    [[buffer(0)]],
                                device lt_step_args&            step [[buffer(1)]],
                                device float*                   out  [[buffer(3)]],
                                device const float*             gate [[buffer(6)]],
                                device float*                   ws   [[buffer(14)]],
                                uint2 group [[threadgroup_position_in_grid]],
                                uint tid [[thread_index_in_threadgroup]],
                                uint ntg [[threads_per_threadgroup]])
{
    const uint h = group.x, t = group.y, D = a.head_dim;
    if (t >= step.n_tokens || h >= a.n_heads || D > MAX_HEAD_DIM) return;
    if (context_exceeded(step, a.ctx_cap, false)) return;
    const uint n_splits = *(device const uint*)ws;
    float M = -FLT_MAX;  // partitions without keys have sum 0 and are skipped
    for (uint s = 0; s < n_splits; s++) {
        device const float* part = partition(ws, t, h, s, a.n_heads, n_splits, D);
        if (part[1] > 0.0f) M = max(M, part[0]);
    }
    float L = 0.0f;
    for (uint s = 0; s < n_splits; s++) {
        device const float* part = partition(ws, t, h, s, a.n_heads, n_splits, D);
        if (part[1] > 0.0f) L += part[1] * exp(part[0] - M);
    }
    device float* o = out + t * a.out_stride + h * D;
    device const float* gt = gate + t * a.gate_stride + h * D;
    const bool gated = (a.flags & LT_ATTN_OUT_GATE) != 0;
    for (uint d = tid; d < D; d += ntg) {
        float v = 0.0f;
        for (uint s = 0; s < n_splits; s++) {
            device const float* part = partition(ws, t, h, s, a.n_heads, n_splits, D);
            if (part[1] > 0.0f) v += part[2 + d] * exp(part[0] - M);
        }
        v /= L;
        o[d] = gated ? v * sigmoid(gt[d]) : v;
    }
}
