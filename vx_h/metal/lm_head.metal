// LT_K_LM_HEAD: logits = W x' of the last token (every token with LT_GEMV_ALL_TOKENS), with the
// RMSNorm prologue and bias of lt_gemv_args, plus one lt_argmax_partial (max, argmax, sum of
// exp, non-finite count) per LT_ARGMAX_BLOCK rows of the last token's logits for the sampler.
// A threadgroup computes one whole partial block: LT_ARGMAX_BLOCK = 256 rows, 32 per simdgroup
// (248,320 rows: 970 threadgroups). Threadgroups past the last block exit (the launch may give
// more), and a smaller grid strides over the blocks.
// Each lane takes 32-value chunks of the input (one quant block), prepares that chunk of x' once
// and applies it to the simdgroup's 32 rows: neighbouring lanes read neighbouring blocks of a row.
#include <metal_stdlib>
#include "lattice_shared.h"
using namespace metal;

static_assert(LT_GEMV_B_X == 0 && LT_GEMV_B_Y == 1 && LT_GEMV_B_WQ == 2 && LT_GEMV_B_WS == 3 &&
              LT_GEMV_B_WM == 4 && LT_GEMV_B_NORM == 5 && LT_GEMV_B_BIAS == 6 && LT_GEMV_B_PARTIALS == 8,
              "lt_lm_head: binding i is [[buffer(2 + i)]]");

#define ROWS_PER_SIMDGROUP 32

// exponent bits all ones: Inf or NaN (an integer test: Metal's default fast math may fold isfinite)
static bool nonfinite(float v) { return (as_type<uint>(v) & 0x7F800000u) == 0x7F800000u; }
#define SIMDGROUPS (LT_ARGMAX_BLOCK / ROWS_PER_SIMDGROUP)

// dot of weight row `row`, values 32c .. 32c + 31, with xv (zero beyond cols)
static float block_dot(uint format, device const uchar* wq, device const half* ws, device const half* wm,
                       uint row, uint cols, uint c, thread const float* xv)
{
    const uint nb = (cols + LT_QK - 1) / LT_QK;
    const uint k0 = c * LT_QK;
    float acc = 0.0f;
    switch (format) {
    case LT_WF_F32: {
        device const float* wr = (device const float*)wq + ulong(row) * cols;
        for (uint j = 0; j < LT_QK && k0 + j < cols; j++) acc += wr[k0 + j] * xv[j];
        return acc;
    }
    case LT_WF_F16: {
        device const half* wr = (device const half*)wq + ulong(row) * cols;
        for (uint j = 0; j < LT_QK && k0 + j < cols; j++) acc += float(wr[k0 + j]) * xv[j];
        return acc;
    }
    case LT_WF_Q8: {
        device const char4* q = (device const char4*)(wq + (ulong(row) * nb + c) * LT_QK);
        for (uint j = 0; j < LT_QK / 4; j++)
            acc += dot(float4(q[j]), float4(xv[4 * j], xv[4 * j + 1], xv[4 * j + 2], xv[4 * j + 3]));
        return acc * float(ws[ulong(row) * nb + c]);
    }
    default: {  // LT_WF_Q4: byte j holds value j (low nibble) and value j + 16 (high nibble)
        device const uchar4* q = (device const uchar4*)(wq + (ulong(row) * nb + c) * (LT_QK / 2));
        float xsum = 0.0f;
        for (uint j = 0; j < LT_QK / 8; j++) {
            const uchar4 b = q[j];
            const float4 lo = float4(xv[4 * j], xv[4 * j + 1], xv[4 * j + 2], xv[4 * j + 3]);
            const float4 hi = float4(xv[4 * j + 16], xv[4 * j + 17], xv[4 * j + 18], xv[4 * j + 19]);
            acc += dot(float4(b & uchar(0x0F)), lo) + dot(float4(b >> uchar(4)), hi);
            xsum += lo.x + lo.y + lo.z + lo.w + hi.x + hi.y + hi.z + hi.w;
        }
        return acc * float(ws[ulong(row) * nb + c]) + xsum * float(wm[ulong(row) * nb + c]);
    }
    }
}

[[max_total_threads_per_threadgroup(256)]]
kernel void lt_lm_head(device const lt_gemv_args& a        [[buffer(0)]],
                       device const lt_step_args& step     [[buffer(1)]],
                       device const float*        x        [[buffer(2)]],
                       device float*              y        [[buffer(3)]],
                       device const uchar*        wq       [[buffer(4)]],
                       device const half*         ws       [[buffer(5)]],
                       device const half*         wm       [[buffer(6)]],
                       device const float*        norm_w   [[buffer(7)]],
                       device const float*        bias     [[buffer(8)]],
                       device lt_argmax_partial*  partials [[buffer(10)]],
                       uint group [[threadgroup_position_in_grid]],
                       uint n_groups [[threadgroups_per_grid]],
                       uint tid [[thread_index_in_threadgroup]],
                       uint ntg [[threads_per_threadgroup]],
                       uint lane [[thread_index_in_simdgroup]],
                       uint sg [[simdgroup_index_in_threadgroup]],
                       uint nsg [[simdgroups_per_threadgroup]])
{
    threadgroup float partial[32];
    threadgroup float logits[LT_ARGMAX_BLOCK];
    if (ntg != LT_ARGMAX_BLOCK || step.n_tokens == 0) return;  // 8 simdgroups x 32 rows: one partial block
    const uint n_blocks = (a.rows + LT_ARGMAX_BLOCK - 1) / LT_ARGMAX_BLOCK;
    const uint n_chunks = (a.cols + LT_QK - 1) / LT_QK;
    const bool norm = (a.flags & LT_GEMV_NORM) != 0;
    const bool add_one = (a.flags & LT_GEMV_NORM_ADD_ONE) != 0;
    const bool all_tokens = (a.flags & LT_GEMV_ALL_TOKENS) != 0;
    const uint T = step.n_tokens;
    for (uint b = group; b < n_blocks; b += n_groups) {
        const uint row0 = b * LT_ARGMAX_BLOCK + sg * ROWS_PER_SIMDGROUP;
        for (uint t = all_tokens ? 0 : T - 1; t < T; t++) {
            device const float* xt = x + t * a.x_stride;
            float r = 1.0f;
            if (norm) {  // every threadgroup recomputes the norm of x: it is one row
                float ss = 0.0f;
                for (uint k = tid; k < a.cols; k += ntg) ss += xt[k] * xt[k];
                ss = simd_sum(ss);
                if (lane == 0) partial[sg] = ss;
                threadgroup_barrier(mem_flags::mem_threadgroup);
                float total = 0.0f;
                for (uint i = 0; i < nsg; i++) total += partial[i];
                r = rsqrt(total / float(a.cols) + a.eps);
            }
            float dots[ROWS_PER_SIMDGROUP];
            for (uint i = 0; i < ROWS_PER_SIMDGROUP; i++) dots[i] = 0.0f;
            for (uint c = lane; c < n_chunks; c += 32) {
                float xv[LT_QK];
                for (uint j = 0; j < LT_QK; j++) {
                    const uint k = c * LT_QK + j;
                    xv[j] = k < a.cols ? xt[k] * (norm ? r * (add_one ? 1.0f + norm_w[k] : norm_w[k]) : 1.0f) : 0.0f;
                }
                for (uint i = 0; i < ROWS_PER_SIMDGROUP && row0 + i < a.rows; i++)
                    dots[i] += block_dot(a.wformat, wq, ws, wm, row0 + i, a.cols, c, xv);
            }
            for (uint i = 0; i < ROWS_PER_SIMDGROUP; i++) {
                const float d = simd_sum(dots[i]);
                const uint n = row0 + i;
                if (lane == i && n < a.rows) {
                    const float v = d + ((a.flags & LT_GEMV_BIAS) ? bias[n] : 0.0f);
                    y[(all_tokens ? t : 0) * a.y_stride + n] = v;
                    logits[sg * ROWS_PER_SIMDGROUP + i] = v;
                }
            }
            threadgroup_barrier(mem_flags::mem_threadgroup);
            if (t == T - 1 && sg == 0) {  // the block's partial, lowest id on ties like the CPU's
                const uint base = b * LT_ARGMAX_BLOCK, n_rows = min(uint(LT_ARGMAX_BLOCK), a.rows - base);
                const uint per_lane = LT_ARGMAX_BLOCK / 32;
                float mx = -INFINITY;
                uint arg = 0xFFFFFFFFu, bad = 0;
                for (uint i = lane * per_lane; i < (lane + 1) * per_lane && i < n_rows; i++) {
                    const float v = logits[i];
                    if (nonfinite(v)) bad++;
                    else if (v > mx) { mx = v; arg = base + i; }
                }
                const float block_max = simd_max(mx);
                uint block_arg = simd_min(mx == block_max ? arg : 0xFFFFFFFFu);
                float se = 0.0f;
                if (block_max > -INFINITY)
                    for (uint i = lane * per_lane; i < (lane + 1) * per_lane && i < n_rows; i++) {
                        const float v = logits[i];
                        if (!nonfinite(v)) se += exp(v - block_max);
                    }
                se = simd_sum(se);
                bad = simd_sum(bad);
                if (lane == 0) {
                    lt_argmax_partial p;
                    p.max = block_max;
                    p.argmax = block_arg == 0xFFFFFFFFu ? base : block_arg;
                    p.sumexp = se;
                    p.n_nonfinite = bad;
                    partials[b] = p;
                }
            }
            threadgroup_barrier(mem_flags::mem_threadgroup);  // logits and partial are reused
        }
    }
}
