// LT_K_GEMV: y[t, n] = sum_k W[n, k] * x'[t, k] with the RMSNorm prologue and the bias / SiLU-mul /
// residual epilogues of metal/lattice_shared.h, for every token t < step.n_tokens.
// Launch (lattice/program.py): threadgroups = ceil(rows / simdgroups per threadgroup), 256 threads:
// each simdgroup computes one weight row (so 8 rows per threadgroup), an even number of rows per
// threadgroup keeps SiLU-mul's gate/up row pairs in one threadgroup.
// Each lane walks 32-value chunks of the row (one quant block) with its own x chunk.
#include <metal_stdlib>
#include "lattice_shared.h"
using namespace metal;

static_assert(LT_GEMV_B_X == 0 && LT_GEMV_B_Y == 1 && LT_GEMV_B_WQ == 2 && LT_GEMV_B_WS == 3 &&
              LT_GEMV_B_WM == 4 && LT_GEMV_B_NORM == 5 && LT_GEMV_B_BIAS == 6 && LT_GEMV_B_RESID == 7,
              "lt_gemv: binding i is [[buffer(2 + i)]]");

static float silu(float v) { return v / (1.0f + exp(-v)); }

// dot of weight row `row`, chunk c (values 32c .. 32c + 31), with xv (zero beyond cols)
static float chunk_dot(uint format, device const uchar* wq, device const half* ws, device const half* wm,
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
    case LT_WF_Q8: {  // a block is 32 bytes at a 32-byte multiple of a 16-byte aligned plane
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

kernel void lt_gemv(device const lt_gemv_args& a      [[buffer(0)]],
                    device const lt_step_args& step   [[buffer(1)]],
                    device const float*        x      [[buffer(2)]],
                    device float*              y      [[buffer(3)]],
                    device const uchar*        wq     [[buffer(4)]],
                    device const half*         ws     [[buffer(5)]],
                    device const half*         wm     [[buffer(6)]],
                    device const float*        norm_w [[buffer(7)]],
                    device const float*        bias   [[buffer(8)]],
                    device const float*        resid  [[buffer(9)]],
                    uint group [[threadgroup_position_in_grid]],
                    uint tid [[thread_index_in_threadgroup]],
                    uint ntg [[threads_per_threadgroup]],
                    uint lane [[thread_index_in_simdgroup]],
                    uint sg [[simdgroup_index_in_threadgroup]],
                    uint nsg [[simdgroups_per_threadgroup]])
{
    threadgroup float partial[32];
    threadgroup float dots[32];
    const uint row0 = group * nsg;
    const uint row = row0 + sg;
    const uint n_chunks = (a.cols + LT_QK - 1) / LT_QK;
    const bool norm = (a.flags & LT_GEMV_NORM) != 0;
    const bool add_one = (a.flags & LT_GEMV_NORM_ADD_ONE) != 0;
    for (uint t = 0; t < step.n_tokens; t++) {
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
        float dot = 0.0f;
        if (row < a.rows) {
            for (uint c = lane; c < n_chunks; c += 32) {
                float xv[LT_QK];
                for (uint j = 0; j < LT_QK; j++) {
                    const uint k = c * LT_QK + j;
                    xv[j] = k < a.cols ? xt[k] * (norm ? r * (add_one ? 1.0f + norm_w[k] : norm_w[k]) : 1.0f) : 0.0f;
                }
                dot += chunk_dot(a.wformat, wq, ws, wm, row, a.cols, c, xv);
            }
        }
        dot = simd_sum(dot);
        if (lane == 0) dots[sg] = dot;
        threadgroup_barrier(mem_flags::mem_threadgroup);
        device float* yt = y + t * a.y_stride;
        device const float* rt = resid + t * a.resid_stride;
        const bool has_bias = (a.flags & LT_GEMV_BIAS) != 0, has_resid = (a.flags & LT_GEMV_RESID) != 0;
        if (a.flags & LT_GEMV_SILU_MUL) {  // rows 2i (gate) and 2i + 1 (up) give output i
            const uint i = 2 * tid;
            if (i + 1 < nsg && row0 + i + 1 < a.rows) {
                const float g = dots[i] + (has_bias ? bias[row0 + i] : 0.0f);
                const float u = dots[i + 1] + (has_bias ? bias[row0 + i + 1] : 0.0f);
                const uint o = (row0 + i) / 2;
                const float v = silu(g) * u;
                yt[o] = has_resid ? rt[o] + v : v;  // resid may alias y: same element, same thread
            }
        } else if (tid < nsg && row0 + tid < a.rows) {
            const uint o = row0 + tid;
            const float v = dots[tid] + (has_bias ? bias[o] : 0.0f);
            yt[o] = has_resid ? rt[o] + v : v;
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);  // dots and partial are reused by the next token
    }
}
