// Kernels of the shapes the decode program uses, exercising the emulator's MSL subset:
// simd reductions, static and dynamic threadgroup memory, half and vector types, swizzles.
#include <metal_stdlib>
using namespace metal;

struct RmsNormArgs {
    uint n;
    float eps;
};

// One threadgroup per row: y = half(x * rsqrt(mean(x^2) + eps)) * w
kernel void rms_norm(device const half*        x    [[buffer(0)]],
                     device const half*        w    [[buffer(1)]],
                     device half*              y    [[buffer(2)]],
                     constant RmsNormArgs&     args [[buffer(3)]],
                     uint  row   [[threadgroup_position_in_grid]],
                     uint  tid   [[thread_position_in_threadgroup]],
                     uint  ntg   [[threads_per_threadgroup]],
                     uint  lane  [[thread_index_in_simdgroup]],
                     uint  sg    [[simdgroup_index_in_threadgroup]])
{
    threadgroup float partial[32];
    device const half* xr = x + row * args.n;
    float acc = 0.0f;
    for (uint i = tid; i < args.n; i += ntg) {
        float v = float(xr[i]);
        acc += v * v;
    }
    acc = simd_sum(acc);
    if (lane == 0) partial[sg] = acc;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (sg == 0) {
        float t = lane < (ntg + 31) / 32 ? partial[lane] : 0.0f;
        t = simd_sum(t);
        if (lane == 0) partial[0] = rsqrt(t / float(args.n) + args.eps);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    const float scale = partial[0];
    for (uint i = tid; i < args.n; i += ntg) {
        y[row * args.n + i] = half(float(xr[i]) * scale) * w[i];
    }
}

// y[r] = dot(W[r, :], x); one simdgroup per row, two rows per threadgroup, half4 loads
kernel void gemv_f16(device const half4*  W   [[buffer(0)]],
                     device const float4* x   [[buffer(1)]],
                     device float*        y   [[buffer(2)]],
                     constant uint&       k4  [[buffer(3)]],
                     uint2  group [[threadgroup_position_in_grid]],
                     ushort lane  [[thread_index_in_simdgroup]],
                     ushort sg    [[simdgroup_index_in_threadgroup]])
{
    const uint row = group.x * 2 + sg;
    float4 acc = 0.0f;
    for (uint k = lane; k < k4; k += 32) {
        acc += float4(W[row * k4 + k]) * x[k];
    }
    float s = dot(acc.xy, float2(1.0f)) + acc.z + acc.w;
    for (ushort offset = 16; offset > 0; offset >>= 1) {
        s += simd_shuffle_down(s, offset);
    }
    if (lane == 0) y[row] = s;
}

// softmax of one row per threadgroup; tree reductions in dynamic threadgroup memory
kernel void softmax_row(device const float* x     [[buffer(0)]],
                        device half*        y     [[buffer(1)]],
                        constant uint&      n     [[buffer(2)]],
                        threadgroup float*  shmem [[threadgroup(0)]],
                        uint row  [[threadgroup_position_in_grid]],
                        uint tid  [[thread_position_in_threadgroup]],
                        uint ntg  [[threads_per_threadgroup]])
{
    float m = -INFINITY;
    for (uint i = tid; i < n; i += ntg) m = max(m, x[row * n + i]);
    shmem[tid] = m;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint s = ntg / 2; s > 0; s >>= 1) {
        if (tid < s) shmem[tid] = max(shmem[tid], shmem[tid + s]);
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    m = shmem[0];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    float z = 0.0f;
    for (uint i = tid; i < n; i += ntg) z += exp(x[row * n + i] - m);
    shmem[tid] = z;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint s = ntg / 2; s > 0; s >>= 1) {
        if (tid < s) shmem[tid] += shmem[tid + s];
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    z = shmem[0];
    for (uint i = tid; i < n; i += ntg) y[row * n + i] = half(exp(x[row * n + i] - m) / z) * 1.0h;
}
