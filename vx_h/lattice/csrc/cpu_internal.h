/* Internal interface between the CPU backend's driver, its kernels and its SIMD paths. */
#ifndef LATTICE_CPU_INTERNAL_H
#define LATTICE_CPU_INTERNAL_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "lattice_cpu.h"

#ifdef _OPENMP
#include <omp.h>
#endif

/* The threads of one run wait for each other with this barrier rather than `omp barrier`:
 * it spins briefly (dispatch imbalance is usually microseconds), then yields the CPU, so that
 * when other processes share the cores a thread that was preempted gets to run instead of
 * waiting behind spinning peers (libgomp spins ~300k iterations, then sleeps in the kernel). */
typedef struct lt_barrier {
    uint32_t arrived;      /* threads at the barrier in this generation */
    uint32_t generation;   /* bumped by the last thread to arrive */
} lt_barrier;

void lt_barrier_wait(lt_barrier *b, int nth);

/* Per-thread scratch: rows of x prepared for a GEMV (normalized / zero-padded), GEMV tiles,
 * attention scores. Sized at create time from the program. */
typedef struct lt_thread_ws {
    float *buf;
    size_t n;  /* floats */
} lt_thread_ws;

/* What a kernel sees. One per thread; T and pos are read once per step so that the sampler can
 * advance the step args while other threads finish. */
typedef struct lt_ctx {
    uint8_t *arena[LT_N_ARENAS];
    const uint8_t *consts;
    lt_step_args *step;
    uint32_t T;          /* step.n_tokens at the start of the step */
    uint32_t pos;        /* step.pos at the start of the step */
    int tid, nth;
    lt_barrier *barrier; /* shared by the run's threads */
    float *tbuf;         /* this thread's scratch */
    float *shared;       /* scratch shared by all threads (prefill GEMV inputs) */
    uint32_t *work;      /* the dispatch's work counter: 0 at its start (lt_next_unit) */
} lt_ctx;

typedef void (*lt_kernel_fn)(const lt_ctx *c, const lt_dispatch *d);

static inline void lt_sync(const lt_ctx *c) {
    if (c->nth > 1)
        lt_barrier_wait(c->barrier, c->nth);
}

static inline void *lt_bound(const lt_ctx *c, const lt_dispatch *d, int slot) {
    if ((uint32_t)slot >= d->n_bind || d->bind[slot].arena == LT_ARENA_NONE)
        return NULL;
    return c->arena[d->bind[slot].arena] + d->bind[slot].offset;
}

static inline const void *lt_args(const lt_ctx *c, const lt_dispatch *d) {
    return c->consts + d->args_offset;
}

/* First error wins. */
static inline void lt_raise(const lt_ctx *c, uint32_t err) {
    __sync_bool_compare_and_swap(&c->step->error, 0u, err);
}

/* Dynamic partition: the next unit of work of the current dispatch, or `units` when none is
 * left. Threads take units as they finish their last one, so a thread that the OS preempted or
 * that runs on a busier core does less of the work instead of holding up the barrier. */
static inline uint32_t lt_next_unit(const lt_ctx *c, uint32_t units) {
    uint32_t u = c->nth > 1 ? __atomic_fetch_add(c->work, 1u, __ATOMIC_RELAXED) : (*c->work)++;
    return u < units ? u : units;
}

/* Static partition of n items over the threads, in units of `grain` items. */
static inline void lt_split(uint32_t n, uint32_t grain, int tid, int nth, uint32_t *lo, uint32_t *hi) {
    uint32_t units = (n + grain - 1) / grain;
    uint32_t a = (uint32_t)((uint64_t)units * (uint32_t)tid / (uint32_t)nth);
    uint32_t b = (uint32_t)((uint64_t)units * (uint32_t)(tid + 1) / (uint32_t)nth);
    *lo = a * grain < n ? a * grain : n;
    *hi = b * grain < n ? b * grain : n;
}

static inline float lt_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112u) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else {  /* subnormal: renormalize */
        int e = -1;
        do { man <<= 1; e++; } while (!(man & 0x400u));
        bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ffu) << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* Round to nearest even; overflow -> Inf, NaN kept. */
static inline uint16_t lt_f32_to_f16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u)
        return (uint16_t)(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0));
    if (ax >= 0x477ff000u)  /* rounds to >= 65520: Inf */
        return (uint16_t)(sign | 0x7c00u);
    if (ax < 0x38800000u) {  /* subnormal or zero in f16 */
        if (ax < 0x33000000u)
            return (uint16_t)sign;
        uint32_t e = ax >> 23, m = (ax & 0x7fffffu) | 0x800000u, shift = 126 - e;
        uint32_t r = m >> shift, rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (r & 1)))
            r++;
        return (uint16_t)(sign | r);
    }
    uint32_t r = ax + 0xfffu + ((ax >> 13) & 1u);
    return (uint16_t)(sign | ((r - 0x38000000u) >> 13));
}

static inline float lt_sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }
static inline float lt_silu(float x) { return x / (1.0f + expf(-x)); }

/* A weight matrix as the SIMD paths see it. */
typedef struct lt_wmat {
    uint32_t format;      /* LT_WF_* */
    uint32_t rows, cols;
    uint32_t stride;      /* elements per stored row: cols_padded for Q8/Q4, cols otherwise */
    const void *q;        /* WQ plane */
    const uint16_t *s;    /* WS plane (f16) */
    const uint16_t *m;    /* WM plane (f16) */
} lt_wmat;

/* out[t * nrows + i] = dot(W row (row0 + i), x + t * xs) for t < nt (<= the path's tok_tile),
 * i < nrows. For Q8/Q4, x holds each token as the path's activation record (lt_x_record_floats
 * floats apart when quantized; else w->stride floats, zero beyond cols). */
typedef void (*lt_gemm_fn)(const lt_wmat *w, uint32_t row0, uint32_t nrows, const float *x,
                           size_t xs, uint32_t nt, float *out);

/* How a path takes the activations of Q8/Q4 GEMVs. */
enum lt_xq {
    LT_XQ_F32 = 0,  /* f32 rows */
    /* int16 per block of 32 (pmaddwd paths; relative error <= 2^-16 of the block's largest |x|).
     * Record: int16 q[kp]; float d[kp/32] (x ~= q * d); float sum[kp/32] (exact f32 sum of x
     * over the block, for Q4's min term). */
    LT_XQ_I16 = 1
};

/* Floats per activation record of a kp-column token. */
static inline size_t lt_x_record_floats(uint32_t xq, uint32_t kp) {
    size_t scales = 2 * (size_t)(kp / LT_QK);
    return xq == LT_XQ_I16 ? kp / 2 + scales : kp;
}
void lt_quantize_x16(const float *x, uint32_t kp, float *record);

#define LT_TOK_TILE_MAX 16   /* largest tok_tile of any path */

/* Causal attention of nq queries (tokens of one prefill block x the query heads of one kv head)
 * over one kv head's cache rows: query i sees keys [0, len[i]). Outputs per query the softmax
 * state: max m, sum l and the unnormalized acc[i * D ...] = sum_j exp(s_ij - m) v_j.
 * D % 16 == 0; nq <= LT_ATTN_BLOCK_Q. Scratch: lt_attend_block_floats(D, max len). */
#define LT_ATTN_BLOCK_Q 64
typedef struct lt_attend_block {
    const float *q[LT_ATTN_BLOCK_Q];
    uint32_t len[LT_ATTN_BLOCK_Q];
    uint32_t nq, D;
    const uint16_t *k, *v;   /* f16 [positions][D] */
    float scale;
    float *acc, *m, *l;      /* [nq][D], [nq], [nq] */
    float *scratch;
} lt_attend_block;
static inline size_t lt_attend_block_floats(uint32_t D, uint32_t max_len) {
    return ((size_t)LT_ATTN_BLOCK_Q + 4) * ((max_len + 7) / 8 * 8) + 9 * (size_t)D;
}

typedef struct lt_simd {
    const char *name;
    uint32_t xq;                                               /* LT_XQ_* for Q8/Q4 */
    uint32_t tok_tile;                                         /* tokens per gemm call, at most */
    void (*quantize)(const float *x, uint32_t kp, float *record);  /* f32 row -> xq record */
    lt_gemm_fn gemm[4];                                        /* by LT_WF_* */
    float (*dot_f16)(const float *x, const uint16_t *h, uint32_t n);   /* sum x[i] * h[i] */
    void (*axpy_f16)(float *y, float a, const uint16_t *h, uint32_t n); /* y += a * h */
    float (*exp_shift)(float *s, uint32_t n, float mx);  /* s[j] = exp(s[j] - mx), returns sum */
    void (*sigmoid)(float *x, uint32_t n);               /* x[j] = 1 / (1 + exp(-x[j])) */
    void (*attend_block)(const lt_attend_block *b);      /* NULL: attention per query */
} lt_simd;
float lt_exp_shift(float *s, uint32_t n, float mx);     /* the portable exp_shift */
void lt_sigmoid_n(float *x, uint32_t n);                /* the portable sigmoid */

extern const lt_simd lt_simd_scalar;
#if defined(__x86_64__) || defined(_M_X64)
extern const lt_simd lt_simd_avx2;
extern const lt_simd lt_simd_avx512;
#endif
#if defined(__aarch64__)
extern const lt_simd lt_simd_neon;
#endif

const lt_simd *lt_simd_get(void);

/* Kernels (kernels_*.c). */
void lt_k_embed(const lt_ctx *c, const lt_dispatch *d);
void lt_k_rmsnorm(const lt_ctx *c, const lt_dispatch *d);
void lt_k_elementwise(const lt_ctx *c, const lt_dispatch *d);
void lt_k_gemv(const lt_ctx *c, const lt_dispatch *d);
void lt_k_lm_head(const lt_ctx *c, const lt_dispatch *d);
void lt_k_rope_kv(const lt_ctx *c, const lt_dispatch *d);
void lt_k_attention(const lt_ctx *c, const lt_dispatch *d);
void lt_k_gdn(const lt_ctx *c, const lt_dispatch *d);
void lt_k_sample(const lt_ctx *c, const lt_dispatch *d);

/* Workspace needs of one dispatch (floats), for lt_cpu_create / run. */
size_t lt_gemv_thread_floats(const lt_gemv_args *a);
size_t lt_gemv_shared_floats(const lt_gemv_args *a, uint32_t T);
size_t lt_attention_thread_floats(const lt_attention_args *a);
size_t lt_attention_shared_floats(const lt_attention_args *a);
size_t lt_gdn_thread_floats(const lt_gdn_args *a);

/* Shared helpers. */
void lt_prepare_x(const float *x, uint32_t cols, uint32_t padded, const float *norm_w, int add_one,
                  float eps, float *out);

#endif /* LATTICE_CPU_INTERNAL_H */
