// LT_K_SAMPLE: the last kernel of a step (metal/lattice_shared.h spells out the algorithm), in
// the steps and order of the CPU backend's sampler (lattice/csrc/sampler.c). Every step whose
// result depends only on comparisons runs over the whole threadgroup (max, argmax, the top-k
// threshold, candidates in id order: each thread owns a contiguous range of ids). The float sums
// that decide top-p and the draw:
//  - up to SERIAL_CANDIDATES candidates (top-k on, or a small vocabulary): thread 0, in the
//    CPU's order, so they round the same way and the same seed gives the same token;
//  - more (no top-k on a real vocabulary): over the threadgroup (threshold searches instead of sorts, prefix sums),
//    in another order than the CPU's: a draw can differ only when u * total falls within
//    rounding of a cumulative boundary. A serial walk over a 248k vocabulary would cost
//    milliseconds on one GPU thread.
// Launch (lattice/program.py): one threadgroup of 1024 threads. PARTIALS must be bound (the
// program always binds them); RING_LOGITS is touched only when logits_cap > 0.
#include <metal_stdlib>
#include "lattice_shared.h"
using namespace metal;

static_assert(LT_SAMPLE_B_LOGITS == 0 && LT_SAMPLE_B_PARTIALS == 1 && LT_SAMPLE_B_IDS == 2 &&
              LT_SAMPLE_B_COUNTS == 3 && LT_SAMPLE_B_HIST == 4 && LT_SAMPLE_B_RING_TOKENS == 5 &&
              LT_SAMPLE_B_RING_LOGPROBS == 6 && LT_SAMPLE_B_WORK == 7 && LT_SAMPLE_B_RING_LOGITS == 8,
              "lt_sample: binding i is [[buffer(2 + i)]]");

#define SERIAL_CANDIDATES 1024

struct cand {
    float p;   // exp(l / temperature - max): unnormalized probability
    uint id;
};

struct penalties {
    device const uint* counts;
    float rep, presence, freq;
    bool active;
};

static float penalized(thread const penalties& pn, device const float* logits, uint v)
{
    float l = logits[v];
    const uint n = pn.active ? pn.counts[v] : 0;
    if (n) {
        l = l > 0.0f ? l / pn.rep : l * pn.rep;
        l -= pn.freq * float(n) + pn.presence;
    }
    return l;
}

// floats ordered as unsigned ints (-0 as +0, so equal floats have equal keys)
static uint order_key(float f)
{
    const uint u = as_type<uint>(f == 0.0f ? 0.0f : f);
    return (u & 0x80000000u) ? ~u : u | 0x80000000u;
}

static float from_order_key(uint k)
{
    return as_type<float>((k & 0x80000000u) ? k & 0x7FFFFFFFu : ~k);
}

static void raise_error(device lt_step_args& step, uint err)
{
    uint ok = LT_OK;  // the first error wins
    atomic_compare_exchange_weak_explicit((device atomic_uint*)&step.error, &ok, err, memory_order_relaxed,
                                          memory_order_relaxed);
}

// ---- threadgroup reductions: every thread gets the result; buf is free again on return
template <typename T>
static T tg_sum(T v, threadgroup T* buf, uint lane, uint sg, uint nsg)
{
    v = simd_sum(v);
    if (lane == 0) buf[sg] = v;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    T total = 0;
    for (uint i = 0; i < nsg; i++) total += buf[i];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    return total;
}

static uint tg_max(uint v, threadgroup uint* buf, uint lane, uint sg, uint nsg)
{
    v = simd_max(v);
    if (lane == 0) buf[sg] = v;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    uint m = 0;
    for (uint i = 0; i < nsg; i++) m = max(m, uint(buf[i]));
    threadgroup_barrier(mem_flags::mem_threadgroup);
    return m;
}

// (largest value, lowest id holding it)
static void tg_argmax(thread float& best, thread uint& id, threadgroup float* fbuf, threadgroup uint* ubuf,
                      uint lane, uint sg, uint nsg)
{
    const float m = simd_max(best);
    const uint i = simd_min(best == m ? id : 0xFFFFFFFFu);
    if (lane == 0) { fbuf[sg] = m; ubuf[sg] = i; }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    float bm = -INFINITY;
    uint bi = 0xFFFFFFFFu;
    for (uint g = 0; g < nsg; g++) {
        const float mg = fbuf[g];
        const uint ig = ubuf[g];
        if (mg > bm || (mg == bm && ig < bi)) { bm = mg; bi = ig; }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    best = bm;
    id = bi;
}

// exclusive prefix sum of v over threads in index order; total gets the sum of all
template <typename T>
static T tg_prefix(T v, thread T& total, threadgroup T* buf, uint lane, uint sg, uint nsg)
{
    const T before = simd_prefix_exclusive_sum(v);
    const T sum = simd_sum(v);
    if (lane == 0) buf[sg] = sum;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    T base = 0;
    total = 0;
    for (uint g = 0; g < nsg; g++) {
        const T s = buf[g];
        if (g < sg) base += s;
        total += s;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    return base + before;
}

// ---- thread 0's sequential part
static bool comes_before(cand x, cand y, bool by_prob)
{
    if (by_prob) return x.p != y.p ? x.p > y.p : x.id < y.id;
    return x.id < y.id;
}

// heap sort (no recursion on the GPU); the keys are distinct, so the order equals qsort's
static void sort_cands(device cand* c, uint n, bool by_prob)
{
    for (uint k = 1; k < n; k++) {  // max-heap of the last element in order
        uint i = k;
        while (i > 0) {
            const uint parent = (i - 1) / 2;
            if (!comes_before(c[parent], c[i], by_prob)) break;
            const cand t = c[i]; c[i] = c[parent]; c[parent] = t;
            i = parent;
        }
    }
    for (uint end = n; end > 1; end--) {
        const cand t = c[0]; c[0] = c[end - 1]; c[end - 1] = t;
        uint i = 0;
        while (true) {
            const uint l = 2 * i + 1, r = l + 1;
            uint top = i;
            if (l < end - 1 && comes_before(c[top], c[l], by_prob)) top = l;
            if (r < end - 1 && comes_before(c[top], c[r], by_prob)) top = r;
            if (top == i) break;
            const cand u = c[i]; c[i] = c[top]; c[top] = u;
            i = top;
        }
    }
}

// top-p, min-p and the draw over candidates c[0..n) in id order (sampler.c's steps and sums)
static uint draw(device cand* c, uint n, device const lt_step_args& st, thread float& logprob)
{
    if (st.top_p < 1.0f) {
        float total = 0.0f;
        for (uint i = 0; i < n; i++) total += c[i].p;
        const float target = st.top_p * total;
        // only candidates with p >= eps can be in the nucleus if they alone reach the target
        const float eps_steps[4] = {1e-3f, 1e-6f, 1e-10f, 0.0f};
        uint m = n;
        for (uint e = 0; e < 4; e++) {
            float sum = 0.0f;
            m = 0;
            for (uint i = 0; i < n; i++)
                if (c[i].p >= eps_steps[e]) {
                    const cand t = c[m]; c[m] = c[i]; c[i] = t;
                    sum += c[m++].p;
                }
            if (sum >= target) break;
        }
        sort_cands(c, m, true);
        float cum = 0.0f;
        uint keep = 0;
        while (keep < m) {
            cum += c[keep++].p;
            if (cum >= target) break;
        }
        n = keep;
        sort_cands(c, n, false);
    }
    if (st.min_p > 0.0f) {  // p relative to the top candidate, whose p is 1
        uint m = 0;
        for (uint i = 0; i < n; i++)
            if (c[i].p >= st.min_p) c[m++] = c[i];
        n = m;
    }
    float total = 0.0f;
    for (uint i = 0; i < n; i++) total += c[i].p;
    const float target = lt_uniform(st.seed_lo, st.seed_hi, st.step) * total;
    float cum = 0.0f;
    uint i = 0;
    for (; i + 1 < n; i++) {
        cum += c[i].p;
        if (cum > target) break;
    }
    logprob = log(c[i].p / total);
    return c[i].id;
}

// top-p, min-p and the draw over p[v] (v in this thread's [lo, hi); -1: not a candidate), over
// the whole threadgroup; same selections as draw()
static uint draw_parallel(device float* p, uint lo, uint hi, device const lt_step_args& st, thread float& logprob,
                          threadgroup float* fbuf, threadgroup uint* ubuf, uint lane, uint sg, uint nsg)
{
    if (st.top_p < 1.0f) {
        float mine = 0.0f;
        for (uint v = lo; v < hi; v++) mine += max(p[v], 0.0f);
        const float target = st.top_p * tg_sum<float>(mine, fbuf, lane, sg, nsg);
        // tau: the smallest p of the nucleus = the largest value whose sum of p >= it reaches the
        // target (p >= 0: the raw bits are ordered)
        uint key = 0;
        for (int bit = 30; bit >= 0; bit--) {
            const uint trial = key | (1u << bit);
            float s = 0.0f;
            uint c = 0;
            for (uint v = lo; v < hi; v++)
                if (p[v] >= 0.0f && as_type<uint>(p[v]) >= trial) { s += p[v]; c++; }
            const float total_s = tg_sum<float>(s, fbuf, lane, sg, nsg);
            if (tg_sum<uint>(c, ubuf, lane, sg, nsg) > 0 && total_s >= target) key = trial;
        }
        const float tau = as_type<float>(key);
        float above = 0.0f;
        uint ties = 0;
        for (uint v = lo; v < hi; v++) {
            if (p[v] > tau) above += p[v];
            ties += p[v] == tau;
        }
        float cum = tg_sum<float>(above, fbuf, lane, sg, nsg);
        uint all_ties;
        const uint ties_before = tg_prefix<uint>(ties, all_ties, ubuf, lane, sg, nsg);
        uint want = 0;
        do {  // values equal to tau join in ascending id until the sum reaches the target
            cum += tau;
            want++;
        } while (want < all_ties && cum < target);
        uint my_ties = ties_before >= want ? 0 : min(ties, want - ties_before);
        for (uint v = lo; v < hi; v++) {
            if (p[v] < 0.0f || p[v] > tau) continue;
            if (p[v] == tau && my_ties) my_ties--;
            else p[v] = -1.0f;
        }
    }
    if (st.min_p > 0.0f)  // p relative to the top candidate, whose p is 1
        for (uint v = lo; v < hi; v++)
            if (p[v] >= 0.0f && p[v] < st.min_p) p[v] = -1.0f;
    // the first kept id (ascending) whose cumulative p exceeds u * total
    float mine = 0.0f, total;
    for (uint v = lo; v < hi; v++) mine += max(p[v], 0.0f);
    float cum = tg_prefix<float>(mine, total, fbuf, lane, sg, nsg);
    const float target = lt_uniform(st.seed_lo, st.seed_hi, st.step) * total;
    uint hit = 0xFFFFFFFFu, last = 0;  // last: the last kept id + 1, the CPU's fallback under rounding
    for (uint v = lo; v < hi; v++)
        if (p[v] >= 0.0f) {
            last = v + 1;
            cum += p[v];
            if (cum > target && hit == 0xFFFFFFFFu) hit = v;
        }
    float found = hit == 0xFFFFFFFFu ? -INFINITY : 0.0f;
    tg_argmax(found, hit, fbuf, ubuf, lane, sg, nsg);  // the lowest id that hit
    last = tg_max(last, ubuf, lane, sg, nsg);
    const uint tok = found == 0.0f ? hit : last - 1;
    logprob = log(p[tok] / total);
    return tok;
}

[[max_total_threads_per_threadgroup(1024)]]
kernel void lt_sample(device const lt_sample_args&    a           [[buffer(0)]],
                      device lt_step_args&            step        [[buffer(1)]],
                      device const float*             logits      [[buffer(2)]],
                      device const lt_argmax_partial* part        [[buffer(3)]],
                      device const uint*              ids         [[buffer(4)]],
                      device uint*                    counts      [[buffer(5)]],
                      device uint*                    hist        [[buffer(6)]],
                      device uint*                    ring        [[buffer(7)]],
                      device float*                   ring_lp     [[buffer(8)]],
                      device uchar*                   work        [[buffer(9)]],
                      device float*                   ring_logits [[buffer(10)]],
                      uint tid [[thread_index_in_threadgroup]],
                      uint ntg [[threads_per_threadgroup]],
                      uint lane [[thread_index_in_simdgroup]],
                      uint sg [[simdgroup_index_in_threadgroup]],
                      uint nsg [[simdgroups_per_threadgroup]])
{
    threadgroup float fbuf[32];
    threadgroup uint ubuf[32];
    const uint V = a.vocab, T = step.n_tokens;
    if (T == 0 || V == 0) return;  // the bridge's warm-up dispatch (all zeros) does nothing
    if (step.penalty_last_n > a.hist_cap) {
        if (tid == 0) raise_error(step, LT_ERR_ARGS);
        return;
    }
    if (a.flags & LT_SAMPLE_LOGITS_ALL_TOKENS) logits += (T - 1) * a.logits_stride;
    // this thread's contiguous range of token ids (id order across threads)
    const uint chunk = (V + ntg - 1) / ntg, lo = min(tid * chunk, V), hi = min(lo + chunk, V);

    if (tid == 0) {
        // 1. the step's input ids into the penalty history
        for (uint t = 0; t < T; t++) {
            const uint id = ids[t];
            if (id >= V) continue;
            if (a.hist_cap) {
                if (step.penalty_last_n && step.n_seen >= step.penalty_last_n) {
                    const uint old = hist[(step.n_seen - step.penalty_last_n) % a.hist_cap];
                    if (counts[old]) counts[old]--;
                }
                hist[step.n_seen % a.hist_cap] = id;
            }
            counts[id]++;
            step.n_seen++;
        }
    }
    threadgroup_barrier(mem_flags::mem_device);  // counts are up to date
    // 2. max, argmax (lowest id on ties), sum of exp and non-finite count of the raw logits,
    // from the lm_head's per-block partials
    const uint nb = (V + LT_ARGMAX_BLOCK - 1) / LT_ARGMAX_BLOCK;
    float mx = -INFINITY;
    uint arg = 0xFFFFFFFFu, bad = 0;
    for (uint b = tid; b < nb; b += ntg) {
        bad += part[b].n_nonfinite;
        if (part[b].max > mx) { mx = part[b].max; arg = part[b].argmax; }
    }
    tg_argmax(mx, arg, fbuf, ubuf, lane, sg, nsg);
    bad = tg_sum<uint>(bad, ubuf, lane, sg, nsg);
    float z = 0.0f;
    for (uint b = tid; b < nb; b += ntg)
        if (part[b].max > -INFINITY) z += part[b].sumexp * exp(part[b].max - mx);
    z = tg_sum<float>(z, fbuf, lane, sg, nsg);
    const float temperature = step.temperature;
    if (bad) {
        if (tid == 0) raise_error(step, LT_ERR_NONFINITE);
        return;
    }
    if ((step.flags & LT_STEP_WANT_LOGITS) && a.logits_cap) {
        device float* row = ring_logits + (step.step % a.logits_cap) * V;
        for (uint v = tid; v < V; v += ntg) row[v] = logits[v];
    }

    penalties pn;
    pn.counts = counts;
    pn.rep = step.repetition_penalty;
    pn.presence = step.presence_penalty;
    pn.freq = step.frequency_penalty;
    pn.active = pn.rep != 1.0f || pn.presence != 0.0f || pn.freq != 0.0f;
    uint tok = arg;
    float logprob = logits[arg] - mx - log(z);
    if (temperature <= 0.0f) {
        if (pn.active) {  // greedy over the penalized logits; logprob under their softmax
            float best = -INFINITY;
            uint best_id = 0xFFFFFFFFu;
            for (uint v = lo; v < hi; v++) {
                const float l = penalized(pn, logits, v);
                if (l > best) { best = l; best_id = v; }
            }
            tg_argmax(best, best_id, fbuf, ubuf, lane, sg, nsg);
            float se = 0.0f;
            for (uint v = lo; v < hi; v++) se += exp(penalized(pn, logits, v) - best);
            se = tg_sum<float>(se, fbuf, lane, sg, nsg);
            tok = best_id;
            logprob = -log(se);
        }
    } else {
        const float inv_t = 1.0f / temperature;
        float smax = -INFINITY;
        uint unused_id = 0;
        for (uint v = lo; v < hi; v++) smax = max(smax, penalized(pn, logits, v) * inv_t);
        tg_argmax(smax, unused_id, fbuf, ubuf, lane, sg, nsg);
        // top-k: the threshold and this thread's share of the values equal to it
        const bool top_k = step.top_k > 0 && step.top_k < V;
        float thr = -INFINITY;
        uint above = 0, my_ties = 0;
        if (top_k) {
            // the top_k-th largest value: the largest key with at least top_k values at or above it
            uint key = 0;
            for (int bit = 31; bit >= 0; bit--) {
                const uint trial = key | (1u << bit);
                uint at_or_above = 0;
                for (uint v = lo; v < hi; v++) at_or_above += order_key(penalized(pn, logits, v) * inv_t) >= trial;
                if (tg_sum<uint>(at_or_above, ubuf, lane, sg, nsg) >= step.top_k) key = trial;
            }
            thr = from_order_key(key);
            uint ties = 0;
            for (uint v = lo; v < hi; v++) {
                const float s = penalized(pn, logits, v) * inv_t;
                above += s > thr;
                ties += s == thr;
            }
            // values equal to thr fill the remaining places, lowest ids first
            uint all_above, all_ties;
            tg_prefix<uint>(above, all_above, ubuf, lane, sg, nsg);
            const uint ties_before = tg_prefix<uint>(ties, all_ties, ubuf, lane, sg, nsg);
            const uint tie_places = step.top_k - all_above;
            my_ties = ties_before >= tie_places ? 0 : min(ties, tie_places - ties_before);
        }
        if ((top_k ? step.top_k : V) <= SERIAL_CANDIDATES) {
            device cand* c = (device cand*)work;  // the candidates in id order
            uint n;
            uint out = tg_prefix<uint>(top_k ? above + my_ties : hi - lo, n, ubuf, lane, sg, nsg);
            for (uint v = lo; v < hi; v++) {
                const float s = penalized(pn, logits, v) * inv_t;
                if (!top_k || s > thr || (s == thr && my_ties && my_ties--)) {
                    cand x;
                    x.p = exp(s - smax);
                    x.id = v;
                    c[out++] = x;
                }
            }
            threadgroup_barrier(mem_flags::mem_device);  // the candidates are in place
            if (tid == 0) tok = draw(c, n, step, logprob);
        } else {
            device float* p = (device float*)work;  // p[v], -1 for ids top-k dropped
            for (uint v = lo; v < hi; v++) {
                const float s = penalized(pn, logits, v) * inv_t;
                p[v] = !top_k || s > thr || (s == thr && my_ties && my_ties--) ? exp(s - smax) : -1.0f;
            }
            threadgroup_barrier(mem_flags::mem_device);
            tok = draw_parallel(p, lo, hi, step, logprob, fbuf, ubuf, lane, sg, nsg);
        }
    }
    threadgroup_barrier(mem_flags::mem_device);  // nobody reads step args after this
    if (tid != 0) return;
    if (step.ring_cap) {
        ring[step.step % step.ring_cap] = tok;
        ring_lp[step.step % step.ring_cap] = logprob;
    }
    step.token = tok;
    step.next_token = tok;
    step.next_logprob = logprob;
    step.pos += T;
    step.n_tokens = 1;
    step.step += 1;
}
