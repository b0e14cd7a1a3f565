/* SAMPLE: the last kernel of a step (one thread). The algorithm is spelled out in
 * metal/lattice_shared.h so that every backend picks the same token for the same seed. */
#include <stdlib.h>

#include "cpu_internal.h"

typedef struct cand {
    float p;       /* exp(l / temperature - max): unnormalized probability */
    uint32_t id;
} cand;

static int by_prob_desc(const void *x, const void *y) {
    const cand *a = x, *b = y;
    if (a->p != b->p)
        return a->p > b->p ? -1 : 1;
    return a->id < b->id ? -1 : a->id > b->id;
}

static int by_id(const void *x, const void *y) {
    const cand *a = x, *b = y;
    return a->id < b->id ? -1 : a->id > b->id;
}

/* The k-th largest value (1 <= k <= n) of v[0..n), reordering v (three-way quickselect). */
static float kth_largest(float *v, uint32_t n, uint32_t k) {
    uint32_t lo = 0, hi = n, want = k - 1;
    while (hi - lo > 1) {
        float pivot = v[lo + (hi - lo) / 2], t;
        uint32_t gt_end = lo, i = lo, lt_start = hi;  /* [lo, gt_end) > pivot, [lt_start, hi) < */
        while (i < lt_start) {
            if (v[i] > pivot) {
                t = v[gt_end]; v[gt_end++] = v[i]; v[i++] = t;
            } else if (v[i] < pivot) {
                t = v[--lt_start]; v[lt_start] = v[i]; v[i] = t;
            } else {
                i++;
            }
        }
        if (want < gt_end)
            hi = gt_end;
        else if (want >= lt_start)
            lo = lt_start;
        else
            return pivot;
    }
    return v[lo];
}

typedef struct penalties {
    const uint32_t *counts;
    float rep, presence, freq;
    int active;
} penalties;

static inline float penalized(const penalties *pn, const float *logits, uint32_t v) {
    float l = logits[v];
    uint32_t n = pn->active ? pn->counts[v] : 0;
    if (n) {
        l = l > 0.0f ? l / pn->rep : l * pn->rep;
        l -= pn->freq * (float)n + pn->presence;
    }
    return l;
}

static void push_token(const lt_sample_args *a, lt_step_args *st, uint32_t *counts, uint32_t *hist,
                       uint32_t id) {
    if (id >= a->vocab)
        return;
    if (hist && a->hist_cap) {
        if (st->penalty_last_n && st->n_seen >= st->penalty_last_n) {
            uint32_t old = hist[(st->n_seen - st->penalty_last_n) % a->hist_cap];
            if (counts[old])
                counts[old]--;
        }
        hist[st->n_seen % a->hist_cap] = id;
    }
    counts[id]++;
    st->n_seen++;
}

/* Temperature, top-k, top-p, min-p, then one draw. Returns the chosen id and its log-probability
 * under the kept (renormalized) distribution. */
static uint32_t sample(const lt_sample_args *a, const lt_step_args *st, const penalties *pn,
                       const float *logits, void *work, float *logprob) {
    uint32_t V = a->vocab, n = 0;
    float inv_t = 1.0f / st->temperature, mx = -INFINITY;
    cand *c = work;
    for (uint32_t v = 0; v < V; v++) {
        float s = penalized(pn, logits, v) * inv_t;
        mx = s > mx ? s : mx;
    }
    if (st->top_k > 0 && st->top_k < V) {
        float *vals = work;
        for (uint32_t v = 0; v < V; v++)
            vals[v] = penalized(pn, logits, v) * inv_t;
        float thr = kth_largest(vals, V, st->top_k);
        uint32_t above = 0;
        for (uint32_t v = 0; v < V; v++)
            above += penalized(pn, logits, v) * inv_t > thr;
        uint32_t ties = st->top_k - above;  /* values equal to thr, lowest ids first */
        for (uint32_t v = 0; v < V; v++) {  /* vals is dead: c overwrites it behind v */
            float s = penalized(pn, logits, v) * inv_t;
            if (s > thr || (s == thr && ties && ties--))
                c[n++] = (cand){expf(s - mx), v};
        }
    } else {
        for (uint32_t v = 0; v < V; v++)
            c[n++] = (cand){expf(penalized(pn, logits, v) * inv_t - mx), v};
    }
    if (st->top_p < 1.0f) {
        float total = 0.0f;
        for (uint32_t i = 0; i < n; i++)
            total += c[i].p;
        float target = st->top_p * total;
        /* Only candidates with p >= eps can be in the nucleus if they alone reach the target. */
        static const float eps_steps[] = {1e-3f, 1e-6f, 1e-10f, 0.0f};
        uint32_t m = n;
        for (size_t e = 0; e < sizeof eps_steps / sizeof eps_steps[0]; e++) {
            float sum = 0.0f;
            m = 0;
            for (uint32_t i = 0; i < n; i++)
                if (c[i].p >= eps_steps[e]) {
                    cand t = c[m]; c[m] = c[i]; c[i] = t;
                    sum += c[m++].p;
                }
            if (sum >= target)
                break;
        }
        qsort(c, m, sizeof(cand), by_prob_desc);
        float cum = 0.0f;
        uint32_t keep = 0;
        while (keep < m) {
            cum += c[keep++].p;
            if (cum >= target)
                break;
        }
        n = keep;
        qsort(c, n, sizeof(cand), by_id);
    }
    if (st->min_p > 0.0f) {  /* p relative to the top candidate, whose p is 1 */
        uint32_t m = 0;
        for (uint32_t i = 0; i < n; i++)
            if (c[i].p >= st->min_p)
                c[m++] = c[i];
        n = m;
    }
    float total = 0.0f;
    for (uint32_t i = 0; i < n; i++)
        total += c[i].p;
    float target = lt_uniform(st->seed_lo, st->seed_hi, st->step) * total, cum = 0.0f;
    uint32_t i = 0;
    for (; i + 1 < n; i++) {
        cum += c[i].p;
        if (cum > target)
            break;
    }
    *logprob = logf(c[i].p / total);
    return c[i].id;
}

void lt_k_sample(const lt_ctx *c, const lt_dispatch *d) {
    if (c->tid != 0)
        return;
    const lt_sample_args *a = lt_args(c, d);
    lt_step_args *st = c->step;
    uint32_t V = a->vocab, T = c->T;
    const float *logits = lt_bound(c, d, LT_SAMPLE_B_LOGITS);
    if (a->flags & LT_SAMPLE_LOGITS_ALL_TOKENS)
        logits += (size_t)(T - 1) * a->logits_stride;
    const lt_argmax_partial *part = lt_bound(c, d, LT_SAMPLE_B_PARTIALS);
    const uint32_t *ids = lt_bound(c, d, LT_SAMPLE_B_IDS);
    uint32_t *counts = lt_bound(c, d, LT_SAMPLE_B_COUNTS), *hist = lt_bound(c, d, LT_SAMPLE_B_HIST);
    if (counts && st->penalty_last_n && st->penalty_last_n > a->hist_cap) {
        lt_raise(c, LT_ERR_ARGS);
        return;
    }
    if (counts && ids)
        for (uint32_t t = 0; t < T; t++)
            push_token(a, st, counts, hist, ids[t]);

    /* max, argmax, sum of exp and NaN/Inf count of the raw logits */
    float mx = -INFINITY, z = 0.0f;
    uint32_t arg = 0, bad = 0;
    if (part) {
        uint32_t nb = (V + LT_ARGMAX_BLOCK - 1) / LT_ARGMAX_BLOCK;
        for (uint32_t b = 0; b < nb; b++) {
            bad += part[b].n_nonfinite;
            if (part[b].max > mx) {
                mx = part[b].max;
                arg = part[b].argmax;
            }
        }
        for (uint32_t b = 0; b < nb; b++)
            if (part[b].max > -INFINITY)
                z += part[b].sumexp * expf(part[b].max - mx);
    } else {
        for (uint32_t v = 0; v < V; v++) {
            if (!isfinite(logits[v]))
                bad++;
            else if (logits[v] > mx) {
                mx = logits[v];
                arg = v;
            }
        }
        if (!bad)
            for (uint32_t v = 0; v < V; v++)
                z += expf(logits[v] - mx);
    }
    if (bad) {
        lt_raise(c, LT_ERR_NONFINITE);
        return;
    }
    float *ring_logits = lt_bound(c, d, LT_SAMPLE_B_RING_LOGITS);
    if ((st->flags & LT_STEP_WANT_LOGITS) && ring_logits && a->logits_cap)
        memcpy(ring_logits + (size_t)(st->step % a->logits_cap) * V, logits, V * sizeof(float));

    penalties pn = {counts, st->repetition_penalty, st->presence_penalty, st->frequency_penalty, 0};
    pn.active = counts && (pn.rep != 1.0f || pn.presence != 0.0f || pn.freq != 0.0f);
    uint32_t tok = arg;
    float logprob = logits[arg] - mx - logf(z);
    if (st->temperature <= 0.0f) {
        if (pn.active) {  /* greedy over the penalized logits; logprob under their softmax */
            float best = -INFINITY, se = 0.0f;
            for (uint32_t v = 0; v < V; v++) {
                float l = penalized(&pn, logits, v);
                if (l > best) {
                    best = l;
                    tok = v;
                }
            }
            for (uint32_t v = 0; v < V; v++)
                se += expf(penalized(&pn, logits, v) - best);
            logprob = -logf(se);
        }
    } else {
        tok = sample(a, st, &pn, logits, lt_bound(c, d, LT_SAMPLE_B_WORK), &logprob);
    }

    uint32_t *ring = lt_bound(c, d, LT_SAMPLE_B_RING_TOKENS);
    float *ring_lp = lt_bound(c, d, LT_SAMPLE_B_RING_LOGPROBS);
    if (st->ring_cap) {
        if (ring)
            ring[st->step % st->ring_cap] = tok;
        if (ring_lp)
            ring_lp[st->step % st->ring_cap] = logprob;
    }
    st->token = st->next_token = tok;
    st->next_logprob = logprob;
    st->pos += T;
    st->n_tokens = 1;
    st->step += 1;
}
