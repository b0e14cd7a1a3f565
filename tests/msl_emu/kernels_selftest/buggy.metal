// Kernels with deliberate bugs: each must be reported by the emulator (tests/test_msl_emulator.py).
#include <metal_stdlib>
using namespace metal;

// BUG: reads a neighbour's threadgroup slot without a barrier after the writes
kernel void missing_barrier(device float* y [[buffer(0)]],
                            uint tid [[thread_position_in_threadgroup]])
{
    threadgroup float t[64];
    t[tid] = float(tid);
    y[tid] = tid > 0 ? t[tid - 1] : 0.0f;
}

// BUG: half the slots are never written (NaN poison would flow into y)
kernel void uninitialised_read(device float* y [[buffer(0)]],
                               uint tid [[thread_position_in_threadgroup]])
{
    threadgroup float t[64];
    if (tid < 32) t[tid] = 1.0f;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    y[tid] = t[63 - tid];
}

// BUG: thread 0 overwrites t[0] while the others may still be reading it (missing second barrier)
kernel void overwrite_while_read(device float* y [[buffer(0)]],
                                 uint tid [[thread_position_in_threadgroup]])
{
    threadgroup float t[64];
    t[tid] = float(tid);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    const float first = t[0];
    t[tid] = first + float(tid);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    y[tid] = t[tid];
}

// BUG: early return before a barrier (undefined behaviour on a GPU)
kernel void early_return(device float* y [[buffer(0)]],
                         constant uint& n [[buffer(1)]],
                         uint gid [[thread_position_in_grid]],
                         uint tid [[thread_position_in_threadgroup]])
{
    threadgroup float t[64];
    if (gid >= n) return;
    t[tid] = float(gid);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    y[gid] = t[63 - tid];
}

// BUG: only half of the simdgroup reaches simd_sum
kernel void divergent_simd(device float* y [[buffer(0)]],
                           uint lane [[thread_index_in_simdgroup]],
                           uint gid [[thread_position_in_grid]])
{
    float v = float(gid);
    if (lane < 16) v = simd_sum(v);
    y[gid] = v;
}

// BUG: lanes reach different simd calls
kernel void mismatched_simd(device float* y [[buffer(0)]],
                            uint lane [[thread_index_in_simdgroup]],
                            uint gid [[thread_position_in_grid]])
{
    float v = float(gid);
    v = lane % 2 ? simd_max(v) : simd_min(v);
    y[gid] = v;
}

// BUG: two groups of threads wait at different barriers
kernel void mismatched_barriers(device float* y [[buffer(0)]],
                                uint tid [[thread_position_in_threadgroup]])
{
    if (tid < 32) {
        threadgroup_barrier(mem_flags::mem_threadgroup);
    } else {
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    y[tid] = 1.0f;
}

// BUG: index past the end of a threadgroup array
kernel void threadgroup_overflow(device float* y [[buffer(0)]],
                                 uint tid [[thread_position_in_threadgroup]])
{
    threadgroup float t[32];
    t[tid] = 1.0f;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    y[tid] = t[tid];
}

// BUG: each thread reads its right neighbour's element of y while that thread may already have
// overwritten it. Correct only if threads run in index order: randomized fiber order exposes it.
kernel void shift_in_place(device float* y [[buffer(0)]],
                           constant uint& n [[buffer(1)]],
                           uint gid [[thread_position_in_grid]])
{
    const float right = gid + 1 < n ? y[gid + 1] : 0.0f;
    y[gid] = right;
}

// BUG: 1 MiB of thread-local array, far more than a GPU thread (or the emulator's fiber) has
kernel void stack_overflow(device float* y [[buffer(0)]],
                           uint gid [[thread_position_in_grid]])
{
    float big[262144];
    for (uint i = 0; i < 262144; i++) big[i] = float(i ^ gid);
    y[gid] = big[gid * 7919 % 262144];
}

// BUG: an index 4 GiB past the buffer: not a neighbouring allocation, an unmapped page
kernel void wild_read(device const float* x [[buffer(0)]],
                      device float*       y [[buffer(1)]],
                      uint gid [[thread_position_in_grid]])
{
    y[gid] = x[ulong(gid) + (1ul << 40)];
}
