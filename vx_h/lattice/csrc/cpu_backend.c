/* The CPU backend driver: program validation, workspaces, and the replay loop (one OpenMP
 * parallel region per run, barriers only where dispatches ask for them and between steps). */
#include <stdlib.h>

#include "cpu_internal.h"

#if defined(_WIN32)
#include <windows.h>
#define lt_yield() SwitchToThread()
#else
#include <sched.h>
#define lt_yield() sched_yield()
#endif

#if defined(__x86_64__) || defined(__i386__)
#define lt_relax() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define lt_relax() __asm__ __volatile__("yield")
#else
#define lt_relax() ((void)0)
#endif

#define SPINS_BEFORE_YIELD 2000

void lt_barrier_wait(lt_barrier *b, int nth) {
    uint32_t gen = __atomic_load_n(&b->generation, __ATOMIC_ACQUIRE);
    if (__atomic_add_fetch(&b->arrived, 1, __ATOMIC_ACQ_REL) == (uint32_t)nth) {
        __atomic_store_n(&b->arrived, 0, __ATOMIC_RELAXED);
        __atomic_add_fetch(&b->generation, 1, __ATOMIC_RELEASE);
        return;
    }
    for (int spins = 0; __atomic_load_n(&b->generation, __ATOMIC_ACQUIRE) == gen; spins++) {
        if (spins < SPINS_BEFORE_YIELD)
            lt_relax();
        else
            lt_yield();
    }
}

struct lt_cpu {
    lt_dispatch *prog;
    uint32_t n;
    uint8_t *consts;
    uint8_t *arena[LT_N_ARENAS];
    int n_threads;
    float **tbuf;           /* per-thread scratch, n_threads buffers of tbuf_n floats */
    size_t tbuf_n;
    float *shared;          /* shared scratch, grown on demand for the step's T */
    size_t shared_n;
    uint32_t *work;         /* per dispatch, WORK_STRIDE apart: units of work taken (lt_next_unit) */
    lt_barrier barrier;
};

#define WORK_STRIDE 16  /* one counter per 64-byte line: dispatches between barriers run together */

static const lt_kernel_fn KERNELS[LT_K_COUNT] = {
    [LT_K_EMBED] = lt_k_embed,
    [LT_K_RMSNORM] = lt_k_rmsnorm,
    [LT_K_GEMV] = lt_k_gemv,
    [LT_K_ROPE_KV] = lt_k_rope_kv,
    [LT_K_ATTENTION] = lt_k_attention,
    [LT_K_GDN] = lt_k_gdn,
    [LT_K_ELEMENTWISE] = lt_k_elementwise,
    [LT_K_LM_HEAD] = lt_k_lm_head,
    [LT_K_SAMPLE] = lt_k_sample,
};

static const size_t ARGS_SIZE[LT_K_COUNT] = {
    [LT_K_EMBED] = sizeof(lt_embed_args),
    [LT_K_RMSNORM] = sizeof(lt_rmsnorm_args),
    [LT_K_GEMV] = sizeof(lt_gemv_args),
    [LT_K_ROPE_KV] = sizeof(lt_rope_kv_args),
    [LT_K_ATTENTION] = sizeof(lt_attention_args),
    [LT_K_GDN] = sizeof(lt_gdn_args),
    [LT_K_ELEMENTWISE] = sizeof(lt_elementwise_args),
    [LT_K_LM_HEAD] = sizeof(lt_gemv_args),
    [LT_K_SAMPLE] = sizeof(lt_sample_args),
};

const char *lt_cpu_error_string(int err) {
    switch (err) {
    case LT_OK: return "ok";
    case LT_ERR_NONFINITE: return "NaN or Inf in logits";
    case LT_ERR_TOKEN: return "token id out of range of the embedding table";
    case LT_ERR_CONTEXT: return "position exceeds the KV cache capacity";
    case LT_ERR_KERNEL: return "unknown kernel id";
    case LT_ERR_BINDING: return "binding or args outside its arena";
    case LT_ERR_ARGS: return "invalid kernel arguments";
    case LT_ERR_NOMEM: return "out of memory";
    default: return "unknown error";
    }
}

static int check_args(uint32_t kernel, const void *args) {
    if (kernel == LT_K_GEMV || kernel == LT_K_LM_HEAD) {
        const lt_gemv_args *a = args;
        if (a->wformat > LT_WF_Q4 || a->rows == 0 || a->cols == 0)
            return LT_ERR_ARGS;
        if ((a->flags & LT_GEMV_SILU_MUL) && (a->rows & 1))
            return LT_ERR_ARGS;
    } else if (kernel == LT_K_EMBED) {
        const lt_embed_args *a = args;
        if (a->wformat > LT_WF_Q4 || a->dim == 0 || a->vocab == 0)
            return LT_ERR_ARGS;
    } else if (kernel == LT_K_RMSNORM) {
        const lt_rmsnorm_args *a = args;
        if (a->n_heads == 0 || a->head_dim == 0)
            return LT_ERR_ARGS;
    } else if (kernel == LT_K_ROPE_KV) {
        const lt_rope_kv_args *a = args;
        if (a->n_heads == 0 || a->n_kv_heads == 0 || a->head_dim == 0 || a->head_dim > 512
            || a->rotary_dim > a->head_dim || (a->rotary_dim & 1) || a->ctx_cap == 0)
            return LT_ERR_ARGS;
    } else if (kernel == LT_K_ATTENTION) {
        const lt_attention_args *a = args;
        if (a->n_heads == 0 || a->n_kv_heads == 0 || a->head_dim == 0 || a->head_dim > 512
            || a->n_heads % a->n_kv_heads
            || a->ctx_cap == 0 || a->n_heads / a->n_kv_heads > 512)
            return LT_ERR_ARGS;
    } else if (kernel == LT_K_GDN) {
        const lt_gdn_args *a = args;
        if (a->n_k_heads == 0 || a->n_v_heads == 0 || a->n_v_heads % a->n_k_heads || a->k_dim == 0
            || a->v_dim == 0 || a->k_dim > 512 || a->v_dim > 512 || a->conv_kernel < 1)
            return LT_ERR_ARGS;
    } else if (kernel == LT_K_ELEMENTWISE) {
        const lt_elementwise_args *a = args;
        if (a->op > LT_EW_COPY)
            return LT_ERR_ARGS;
    } else if (kernel == LT_K_SAMPLE) {
        const lt_sample_args *a = args;
        if (a->vocab == 0)
            return LT_ERR_ARGS;
    }
    return LT_OK;
}

static int check_dispatch(const lt_dispatch *d, size_t n_consts, const size_t sizes[LT_N_ARENAS]) {
    if (d->kernel == LT_K_NONE || d->kernel >= LT_K_COUNT)
        return LT_ERR_KERNEL;
    if (d->n_bind > LT_MAX_BIND || d->args_offset % LT_ARGS_ALIGN
        || (size_t)d->args_offset + ARGS_SIZE[d->kernel] > n_consts)
        return LT_ERR_BINDING;
    for (uint32_t i = 0; i < d->n_bind; i++) {
        const lt_binding *b = &d->bind[i];
        if (b->arena == LT_ARENA_NONE)
            continue;
        if (b->arena >= LT_N_ARENAS || b->arena == LT_ARENA_CONST || b->offset >= sizes[b->arena])
            return LT_ERR_BINDING;
    }
    return LT_OK;
}

static size_t thread_floats(const lt_dispatch *d, const uint8_t *consts) {
    const void *a = consts + d->args_offset;
    switch (d->kernel) {
    case LT_K_GEMV:
    case LT_K_LM_HEAD: return lt_gemv_thread_floats(a);
    case LT_K_ATTENTION: return lt_attention_thread_floats(a);
    case LT_K_GDN: return lt_gdn_thread_floats(a);
    default: return 0;
    }
}

static size_t shared_floats(const lt_dispatch *d, const uint8_t *consts, uint32_t T) {
    const void *a = consts + d->args_offset;
    if (d->kernel == LT_K_ATTENTION)
        return lt_attention_shared_floats(a);
    if (d->kernel != LT_K_GEMV && d->kernel != LT_K_LM_HEAD)
        return 0;
    return lt_gemv_shared_floats(a, T);
}

static void free_threads(lt_cpu *c) {
    if (c->tbuf)
        for (int i = 0; i < c->n_threads; i++)
            free(c->tbuf[i]);
    free(c->tbuf);
    c->tbuf = NULL;
}

void lt_cpu_free(lt_cpu *c) {
    if (!c)
        return;
    free_threads(c);
    free(c->shared);
    free(c->work);
    free(c->prog);
    free(c->consts);
    free(c);
}

static int resolve_threads(int n_threads) {
#ifdef _OPENMP
    return n_threads > 0 ? n_threads : omp_get_max_threads();
#else
    (void)n_threads;
    return 1;
#endif
}

lt_cpu *lt_cpu_create(const lt_dispatch *prog, uint32_t n, const uint8_t *consts, size_t n_consts,
                      void *const arenas[LT_N_ARENAS], const size_t sizes[LT_N_ARENAS],
                      int n_threads, int *err, uint32_t *err_index) {
    *err = LT_OK;
    *err_index = 0;
    lt_simd_get();  /* choose the SIMD path once, outside any parallel region */
    if (!arenas[LT_ARENA_STEP] || sizes[LT_ARENA_STEP] < sizeof(lt_step_args)) {
        *err = LT_ERR_BINDING;
        return NULL;
    }
    size_t tn = 0;
    for (uint32_t i = 0; i < n; i++) {
        int e = check_dispatch(&prog[i], n_consts, sizes);
        if (e == LT_OK)
            e = check_args(prog[i].kernel, consts + prog[i].args_offset);
        if (e != LT_OK) {
            *err = e;
            *err_index = i;
            return NULL;
        }
        size_t f = thread_floats(&prog[i], consts);
        tn = f > tn ? f : tn;
    }
    lt_cpu *c = calloc(1, sizeof *c);
    if (!c)
        goto nomem;
    c->n = n;
    c->n_threads = resolve_threads(n_threads);
    c->prog = malloc(sizeof(lt_dispatch) * (n ? n : 1));
    c->consts = malloc(n_consts ? n_consts : 1);
    c->tbuf = calloc((size_t)c->n_threads, sizeof(float *));
    c->tbuf_n = tn;
    size_t work_bytes = (size_t)(n ? n : 1) * WORK_STRIDE * sizeof(uint32_t);  /* a multiple of 64 */
    c->work = aligned_alloc(64, work_bytes);
    if (!c->prog || !c->consts || !c->tbuf || !c->work)
        goto nomem;
    memset(c->work, 0, work_bytes);
    memcpy(c->prog, prog, sizeof(lt_dispatch) * n);
    memcpy(c->consts, consts, n_consts);
    for (int i = 0; i < LT_N_ARENAS; i++)
        c->arena[i] = arenas[i];
    for (int i = 0; i < c->n_threads; i++)
        if (tn && !(c->tbuf[i] = aligned_alloc(64, (tn * sizeof(float) + 63) / 64 * 64)))
            goto nomem;
    return c;
nomem:
    lt_cpu_free(c);
    *err = LT_ERR_NOMEM;
    return NULL;
}

/* Grows the shared scratch for steps of up to T tokens (before the parallel region). */
static int reserve_shared(lt_cpu *c, uint32_t T) {
    size_t need = 0;
    for (uint32_t i = 0; i < c->n; i++) {
        size_t f = shared_floats(&c->prog[i], c->consts, T);
        need = f > need ? f : need;
    }
    if (need <= c->shared_n)
        return LT_OK;
    free(c->shared);
    c->shared = aligned_alloc(64, (need * sizeof(float) + 63) / 64 * 64);
    c->shared_n = c->shared ? need : 0;
    return c->shared ? LT_OK : LT_ERR_NOMEM;
}

static void replay(lt_cpu *c, uint32_t n_steps) {
    lt_step_args *step = (lt_step_args *)c->arena[LT_ARENA_STEP];
#ifdef _OPENMP
#pragma omp parallel num_threads(c->n_threads)
#endif
    {
        lt_ctx ctx;
        for (int i = 0; i < LT_N_ARENAS; i++)
            ctx.arena[i] = c->arena[i];
        ctx.consts = c->consts;
        ctx.step = step;
#ifdef _OPENMP
        ctx.tid = omp_get_thread_num();
        ctx.nth = omp_get_num_threads();
#else
        ctx.tid = 0;
        ctx.nth = 1;
#endif
        ctx.barrier = &c->barrier;
        ctx.tbuf = c->tbuf_n ? c->tbuf[ctx.tid] : NULL;
        ctx.shared = c->shared;
        for (uint32_t s = 0; s < n_steps; s++) {
            ctx.T = step->n_tokens;
            ctx.pos = step->pos;
            for (uint32_t i = 0; i < c->n; i++) {
                const lt_dispatch *d = &c->prog[i];
                if (i > 0 && (d->flags & LT_DISPATCH_BARRIER))
                    lt_sync(&ctx);
                ctx.work = c->work + (size_t)i * WORK_STRIDE;
                KERNELS[d->kernel](&ctx, d);
            }
            /* Everyone reads the error flag before anyone can start the next step; the work
             * counters are reset in between, when no thread is in a kernel. */
            lt_sync(&ctx);
            uint32_t err = step->error;
            if (ctx.tid == 0)
                for (uint32_t i = 0; i < c->n; i++)
                    c->work[(size_t)i * WORK_STRIDE] = 0;
            lt_sync(&ctx);
            if (err)
                break;
        }
    }
}

int lt_cpu_run(lt_cpu *c, uint32_t n_steps) {
    lt_step_args *step = (lt_step_args *)c->arena[LT_ARENA_STEP];
    if (step->n_tokens == 0)
        return LT_ERR_ARGS;
    int e = reserve_shared(c, step->n_tokens);
    if (e != LT_OK)
        return e;
    replay(c, n_steps);
    return (int)step->error;
}

int lt_cpu_run_one(const lt_dispatch *d, const uint8_t *consts, size_t n_consts,
                   void *const arenas[LT_N_ARENAS], const size_t sizes[LT_N_ARENAS], int n_threads) {
    int err;
    uint32_t where;
    lt_cpu *c = lt_cpu_create(d, 1, consts, n_consts, arenas, sizes, n_threads, &err, &where);
    if (!c)
        return err;
    err = lt_cpu_run(c, 1);
    lt_cpu_free(c);
    return err;
}
