// BUG: off by one: the last thread reads past the end of x (found by the AddressSanitizer build)
#include <metal_stdlib>
using namespace metal;

kernel void read_past_end(device const float* x [[buffer(0)]],
                          device float*       y [[buffer(1)]],
                          uint gid [[thread_position_in_grid]])
{
    y[gid] = x[gid + 1];
}
