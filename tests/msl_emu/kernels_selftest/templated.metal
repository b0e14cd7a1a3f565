// One template, several host-visible instantiations (the llama.cpp / MLX pattern).
#include <metal_stdlib>
using namespace metal;

template <typename T, int BIAS>
[[max_total_threads_per_threadgroup(64)]]
kernel void scale_add(device const T*  a   [[buffer(0)]],
                      device T*        out [[buffer(1)]],
                      constant float&  s   [[buffer(2)]],
                      uint i [[thread_position_in_grid]])
{
    out[i] = T(float(a[i]) * s + float(BIAS));
}

typedef decltype(scale_add<float, 1>) scale_add_t;
template [[host_name("scale_add_f32")]] kernel scale_add_t scale_add<float, 1>;
template [[host_name("scale_add_f16")]] kernel decltype(scale_add<half, 2>) scale_add<half, 2>;
