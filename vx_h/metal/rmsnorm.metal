// LT_K_RMSNORM: y = x * rsqrt(mean(x^2) + eps) * w' per row or per head, optionally * silu(z)
// (metal/lattice_shared.h). Launch: one threadgroup per token row (grid.x >= step.n_tokens),
// up to 1024 threads; heads are normalized one after another by the whole threadgroup.
#include <metal_stdlib>
#include "lattice_shared.h"
using namespace metal;

static_assert(LT_NORM_B_X == 0 && LT_NORM_B_OUT == 1 && LT_NORM_B_W == 2 && LT_NORM_B_Z == 3,
              "lt_rmsnorm: binding i is [[buffer(2 + i)]]");

static float silu(float v) { return v / (1.0f + exp(-v)); }

kernel void lt_rmsnorm(device const lt_rmsnorm_args& a    [[buffer(0)]],
                       device const lt_step_args&    step [[buffer(1)]],
                       device const float*           x    [[buffer(2)]],
                       device float*                 out  [[buffer(3)]],
                       device const float*           w    [[buffer(4)]],
                       device const float*           z    [[buffer(5)]],
                       uint t [[threadgroup_position_in_grid]],
                       uint tid [[thread_position_in_threadgroup]],
                       uint ntg [[threads_per_threadgroup]],
                       uint lane [[thread_index_in_simdgroup]],
                       uint sg [[simdgroup_index_in_threadgroup]],
                       uint nsg [[simdgroups_per_threadgroup]])
{
    threadgroup float partial[32];
    if (t >= step.n_tokens) return;
    const bool add_one = (a.flags & LT_NORM_ADD_ONE) != 0;
    const bool gated = (a.flags & LT_NORM_SILU_GATE) != 0;
    const uint n = a.head_dim;
    for (uint h = 0; h < a.n_heads; h++) {
        device const float* xr = x + t * a.in_stride + h * n;
        device float* o = out + t * a.out_stride + h * n;
        float ss = 0.0f;
        for (uint k = tid; k < n; k += ntg) ss += xr[k] * xr[k];
        ss = simd_sum(ss);
        if (lane == 0) partial[sg] = ss;
        threadgroup_barrier(mem_flags::mem_threadgroup);
        float total = 0.0f;
        for (uint i = 0; i < nsg; i++) total += partial[i];
        threadgroup_barrier(mem_flags::mem_threadgroup);  // partial is rewritten for the next head
        const float r = rsqrt(total / float(n) + a.eps);
        // out may alias x: each thread reads and writes only its own elements after the reduction
        for (uint k = tid; k < n; k += ntg) {
            float v = xr[k] * r * (add_one ? 1.0f + w[k] : w[k]);
            if (gated) v *= silu(z[t * a.z_stride + h * n + k]);
            o[k] = v;
        }
    }
}
