// LT_K_ELEMENTWISE over [T, n]: add, silu(a) * b, a * sigmoid(b), copy (metal/lattice_shared.h).
// Launch: one threadgroup per token row (grid.x >= step.n_tokens), any threadgroup width.
#include <metal_stdlib>
#include "lattice_shared.h"
using namespace metal;

static_assert(LT_EW_B_A == 0 && LT_EW_B_B == 1 && LT_EW_B_OUT == 2, "lt_elementwise: binding i is [[buffer(2 + i)]]");

static float sigmoid(float v) { return 1.0f / (1.0f + exp(-v)); }

kernel void lt_elementwise(device const lt_elementwise_args& a    [[buffer(0)]],
                           device const lt_step_args&        step [[buffer(1)]],
                           device const float*               x    [[buffer(2)]],
                           device const float*               y    [[buffer(3)]],
                           device float*                     out  [[buffer(4)]],
                           uint t [[threadgroup_position_in_grid]],
                           uint tid [[thread_position_in_threadgroup]],
                           uint ntg [[threads_per_threadgroup]])
{
    if (t >= step.n_tokens) return;
    device const float* xr = x + t * a.a_stride;
    device const float* yr = y + t * a.b_stride;
    device float* o = out + t * a.out_stride;
    // out may alias a or b: each element is read and written by the same thread
    for (uint k = tid; k < a.n; k += ntg) {
        switch (a.op) {
        case LT_EW_ADD: o[k] = xr[k] + yr[k]; break;
        case LT_EW_SILU_MUL: o[k] = xr[k] * sigmoid(xr[k]) * yr[k]; break;
        case LT_EW_SIGMOID_MUL: o[k] = xr[k] * sigmoid(yr[k]); break;
        default: o[k] = xr[k];
        }
    }
}
