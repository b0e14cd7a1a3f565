// LT_K_EMBED: out[t] = table[ids[t]] * scale (metal/lattice_shared.h). Launch: one threadgroup per
// token row (grid.x >= step.n_tokens), any threadgroup width.
#include <metal_stdlib>
#include "lattice_shared.h"
using namespace metal;

static_assert(LT_EMBED_B_IDS == 0 && LT_EMBED_B_OUT == 1 && LT_EMBED_B_WQ == 2 && LT_EMBED_B_WS == 3 &&
              LT_EMBED_B_WM == 4, "lt_embed: binding i is [[buffer(2 + i)]]");

kernel void lt_embed(device const lt_embed_args& a    [[buffer(0)]],
                     device lt_step_args&        step [[buffer(1)]],
                     device const uint*          ids  [[buffer(2)]],
                     device float*               out  [[buffer(3)]],
                     device const uchar*         wq   [[buffer(4)]],
                     device const half*          ws   [[buffer(5)]],
                     device const half*          wm   [[buffer(6)]],
                     uint t [[threadgroup_position_in_grid]],
                     uint tid [[thread_position_in_threadgroup]],
                     uint ntg [[threads_per_threadgroup]])
{
    if (t >= step.n_tokens) return;
    const uint id = ids[t];
    if (id >= a.vocab) {
        if (tid == 0) {
            uint ok = LT_OK;  // the first error wins
            atomic_compare_exchange_weak_explicit((device atomic_uint*)&step.error, &ok, uint(LT_ERR_TOKEN),
                                                  memory_order_relaxed, memory_order_relaxed);
        }
        return;
    }
    const uint nb = (a.dim + LT_QK - 1) / LT_QK;  // blocks per quantized row (rows padded to nb * 32)
    device float* o = out + t * a.out_stride;
    for (uint k = tid; k < a.dim; k += ntg) {
        const uint b = k / LT_QK, j = k % LT_QK;
        float v;
        switch (a.wformat) {
        case LT_WF_F32:
            v = ((device const float*)wq)[ulong(id) * a.dim + k];
            break;
        case LT_WF_F16:
            v = float(((device const half*)wq)[ulong(id) * a.dim + k]);
            break;
        case LT_WF_Q8:
            v = float(((device const char*)wq)[ulong(id) * nb * LT_QK + k]) * float(ws[ulong(id) * nb + b]);
            break;
        default: {  // LT_WF_Q4: byte j % 16 of the block holds value j (low nibble) and j + 16 (high)
            const uchar byte = wq[ulong(id) * nb * (LT_QK / 2) + b * (LT_QK / 2) + j % 16];
            const uint q = j < 16 ? (byte & 0x0F) : (byte >> 4);
            v = float(q) * float(ws[ulong(id) * nb + b]) + float(wm[ulong(id) * nb + b]);
        }
        }
        o[k] = v * a.scale;
    }
}
