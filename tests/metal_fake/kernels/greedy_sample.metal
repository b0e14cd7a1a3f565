// Test-only stand-in for LT_K_SAMPLE (function lt_sample) until metal/ has the real sampler:
// greedy only (temperature 0, no penalties, no partials), otherwise the header's contract: push
// the step's input ids into COUNTS/HIST, argmax (lowest id on ties), logprob under the softmax,
// ring token + logprob at step % ring_cap, advance the step. One thread does the work; with
// step.n_tokens == 0 (the bridge's warm-up dispatch) it does nothing.
#include <metal_stdlib>
#include "lattice_shared.h"
using namespace metal;

kernel void lt_sample(constant lt_sample_args& a      [[buffer(0)]],
                      device lt_step_args&     st     [[buffer(1)]],
                      device const float*      logits [[buffer(2)]],
                      device const uint*       ids    [[buffer(4)]],
                      device uint*             counts [[buffer(5)]],
                      device uint*             hist   [[buffer(6)]],
                      device uint*             ring   [[buffer(7)]],
                      device float*            ringlp [[buffer(8)]],
                      uint tid [[thread_index_in_threadgroup]])
{
    const uint T = st.n_tokens;
    if (tid != 0 || T == 0) return;
    for (uint t = 0; t < T; t++) {
        const uint id = ids[t];
        if (id >= a.vocab) continue;
        if (a.hist_cap) hist[st.n_seen % a.hist_cap] = id;
        counts[id] += 1;
        st.n_seen += 1;
    }
    device const float* l = logits + ((a.flags & LT_SAMPLE_LOGITS_ALL_TOKENS) ? (T - 1) * a.logits_stride : 0);
    float mx = -INFINITY;
    uint arg = 0;
    for (uint v = 0; v < a.vocab; v++) {
        if (!isfinite(l[v])) {
            if (st.error == 0) st.error = LT_ERR_NONFINITE;
            return;
        }
        if (l[v] > mx) { mx = l[v]; arg = v; }
    }
    float z = 0.0f;
    for (uint v = 0; v < a.vocab; v++) z += exp(l[v] - mx);
    const float logprob = -log(z);
    ring[st.step % st.ring_cap] = arg;
    ringlp[st.step % st.ring_cap] = logprob;
    st.token = arg;
    st.next_token = arg;
    st.next_logprob = logprob;
    st.pos += T;
    st.n_tokens = 1;
    st.step += 1;
}
