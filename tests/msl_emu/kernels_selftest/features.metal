// Kernels that pin down the emulator's semantics: bindings with offsets, builtins, vector types,
// simdgroup functions, threadgroup memory through pointers and 2-D arrays, simdgroup_barrier.
#include <metal_stdlib>
using namespace metal;

struct CopyArgs {
    uint n;
    float scale;
};

// dst[i] = src[i] * args.scale; every binding may carry a byte offset (as in an ICB command)
kernel void scaled_copy(device const float* src  [[buffer(0)]],
                        device float*       dst  [[buffer(1)]],
                        constant CopyArgs&  args [[buffer(2)]],
                        uint gid [[thread_position_in_grid]])
{
    if (gid < args.n) dst[gid] = src[gid] * args.scale;
}

// every builtin of every thread: 20 uints per thread, at its linear index in the grid
kernel void builtins(device uint* out [[buffer(0)]],
                     uint3  tpig   [[thread_position_in_grid]],
                     uint3  tpitg  [[thread_position_in_threadgroup]],
                     uint3  tgpig  [[threadgroup_position_in_grid]],
                     uint3  tptg   [[threads_per_threadgroup]],
                     uint3  tgpg   [[threadgroups_per_grid]],
                     uint3  tpg    [[threads_per_grid]],
                     uint   tiitg  [[thread_index_in_threadgroup]],
                     ushort lane   [[thread_index_in_simdgroup]],
                     ushort sg     [[simdgroup_index_in_threadgroup]],
                     uint   width  [[threads_per_simdgroup]],
                     uint   nsg    [[simdgroups_per_threadgroup]])
{
    const uint linear = (tpig.z * tpg.y + tpig.y) * tpg.x + tpig.x;
    device uint* o = out + linear * 20;
    o[0] = tpig.x; o[1] = tpig.y; o[2] = tpig.z;
    o[3] = tpitg.x; o[4] = tpitg.y; o[5] = tpitg.z;
    o[6] = tgpig.x; o[7] = tgpig.y; o[8] = tgpig.z;
    o[9] = tptg.x * tptg.y * tptg.z;
    o[10] = tgpg.x * tgpg.y * tgpg.z;
    o[11] = tpg.x; o[12] = tpg.y; o[13] = tpg.z;
    o[14] = tiitg; o[15] = lane; o[16] = sg; o[17] = width; o[18] = nsg;
    o[19] = 7;
}

// vectors: constructors, swizzles, conversions, packed types, as_type, select, clamp, mix
kernel void vector_ops(device const float4*        a   [[buffer(0)]],
                       device const packed_float3* p   [[buffer(1)]],
                       device float4*              out [[buffer(2)]],
                       device half4*               hout [[buffer(3)]],
                       device uint*                bits [[buffer(4)]],
                       uint i [[thread_position_in_grid]])
{
    const float4 v = a[i];
    const float3 q = p[i];
    float4 r = float4(v.wzy, q.x);
    r.xy += float2(q.yz);
    r = select(r, -r, r < 0.0f);
    out[i * 3 + 0] = r;
    out[i * 3 + 1] = clamp(v, -0.5f, 0.5f) + mix(v, float4(1.0f), 0.25f);
    out[i * 3 + 2] = float4(max(v.x, v.y), min(v.z, v.w), dot(v, v), fma(v.x, v.y, v.z));
    hout[i] = half4(v) * 2.0h;
    bits[i] = as_type<uint>(v.x);
}

// simdgroup functions with a partial last simdgroup (40 threads: 32 + 8 lanes)
kernel void simd_ops(device const float* x   [[buffer(0)]],
                     device float*       out [[buffer(1)]],
                     uint tid  [[thread_position_in_threadgroup]],
                     uint lane [[thread_index_in_simdgroup]])
{
    const float v = x[tid];
    device float* o = out + tid * 8;
    o[0] = simd_sum(v);
    o[1] = simd_max(v);
    o[2] = simd_min(v);
    o[3] = simd_prefix_exclusive_sum(v);
    o[4] = simd_prefix_inclusive_sum(v);
    o[5] = simd_broadcast(v, 3);
    o[6] = simd_shuffle_xor(v, 1);
    o[7] = simd_shuffle_down(v, 4);
    (void)lane;
}

// threadgroup memory through a 2-D array and a pointer handed to a helper; simdgroup_barrier for
// exchange inside a simdgroup. out[r][c] = in[c][r] for a 32x32 tile, then per-row sums.
static float row_sum(threadgroup const float* row, uint n)
{
    float s = 0.0f;
    for (uint i = 0; i < n; i++) s += row[i];
    return s;
}

kernel void transpose_tile(device const float* in   [[buffer(0)]],
                           device float*       out  [[buffer(1)]],
                           device float*       sums [[buffer(2)]],
                           uint2 tid [[thread_position_in_threadgroup]])
{
    threadgroup float tile[32][33];
    threadgroup float rows[32 * 32];
    tile[tid.y][tid.x] = in[tid.y * 32 + tid.x];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    const float t = tile[tid.x][tid.y];
    out[tid.y * 32 + tid.x] = t;
    rows[tid.y * 32 + tid.x] = t;
    simdgroup_barrier(mem_flags::mem_threadgroup);   // a row is one simdgroup (32 threads)
    if (tid.x == 0) sums[tid.y] = row_sum(rows + tid.y * 32, 32);
}

// scalar threadgroup variables, threadgroup references, device atomics, half limits, fast math
static void store_max(threadgroup float& slot, float v) { slot = max(float(slot), v); }

kernel void misc(device const float* x       [[buffer(0)]],
                 device float*       out     [[buffer(1)]],
                 device atomic_uint* counter [[buffer(2)]],
                 uint tid [[thread_position_in_threadgroup]])
{
    threadgroup float best;
    threadgroup uint count;
    if (tid == 0) { best = -INFINITY; count = 0; }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (tid == 0) {
        for (uint i = 0; i < 64; i++) store_max(best, x[i]);
        count += 64;
    }
    atomic_fetch_add_explicit(counter, 2u, memory_order_relaxed);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (tid == 0) {
        out[0] = best;
        out[1] = float(count);
        out[2] = float(numeric_limits<half>::max());
        out[3] = fast::exp(1.0f);
        out[4] = float(popcount(0xF0F0u));
    }
}
