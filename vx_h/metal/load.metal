// Busy loop for lattice-bench's Apple GPU load (objc/lattice_load.mm): every thread runs
// `iterations` dependent multiply-adds, so a dispatch's GPU time grows linearly with `iterations`
// and the load process can size one dispatch to a target duration.
#include <metal_stdlib>
using namespace metal;

kernel void lt_load_spin(constant uint& iterations [[buffer(0)]],
                         device float*  out        [[buffer(1)]],
                         uint gid [[thread_position_in_grid]])
{
    float x = float(gid);
    for (uint i = 0; i < iterations; i++) {
        x = fma(x, 0.999999f, 1.0f);  // a dependency chain: no two iterations overlap or fold
    }
    out[gid] = x;  // stored, so the loop is not dead code
}
