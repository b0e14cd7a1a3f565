/* The CUDA backend's host bridge: validates a program, resolves its bindings to device pointers,
 * picks each kernel's launch shape, captures decode steps as CUDA graphs and replays them.
 * Build: nvcc -O3 -arch=sm_90 -std=c++17 -shared -Xcompiler -fPIC backend.cu -o liblattice_cuda.so
 * (lattice/cuda/__init__.py does this on first use). */
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "kernels.cuh"
#include "gemm.cuh"
#include "lattice_cuda.h"

namespace {

/* One dispatch, ready to launch. */
struct launch {
    uint32_t kernel;
    lt_binds b;
    const uint8_t *args;   /* host copy of the args struct */
    /* GEMV */
    gemv_geom gg;
    int ks, rpw;
    uint32_t stream_grid = 0;  /* > 0: one token streams through k_gemv_stream on this many blocks */
    gemv_fuse fuse = {};       /* a GDN's conv in the epilogue (fuse_gdn_conv), its norm in x (fuse_gdn_norm) or
                                  an attention's split combine in x (defer_attention_combine) */
    /* LM_HEAD: where its k_gemv_stream blocks write their partials (null: k_partials writes PARTIALS);
       SAMPLE: the n_part partials it merges (link_lm_partials) */
    lt_argmax_partial *part = nullptr;
    uint32_t n_part = 0;
    /* ATTENTION */
    att_geom ag;
    const uint8_t *rope_args = nullptr;  /* the fused ROPE_KV before it (decode programs) */
    lt_binds rb = {};
    uint32_t gate_from_q = 0;
    bool conv_in_gemv = false;  /* GDN decode: its conv runs in the GEMV before it (fuse_gdn_conv) */
    bool norm_in_gemv = false;  /* GDN decode: its RMS factors apply in the GEMV after it (fuse_gdn_norm) */
};

struct program {
    std::vector<launch> l;
    std::vector<uint8_t> consts;
    uint32_t max_tokens = 1;
    float *gdn_ws = nullptr;    /* GDN: decode conv outputs [channels]; prefill (kernels.cuh) */
    float *gdn_ss = nullptr;    /* GDN decode: sums of squares per head and column block (fuse_gdn_norm) */
    int early_state = 0;        /* decode may read state before the wait (resident_bound) */
    float *attn_ws = nullptr;   /* attention split partials */
    unsigned *attn_cnt = nullptr; /* per (token, head): splits finished (zero between steps) */
    lt_argmax_partial *lm_part = nullptr;  /* the LM head's partials, one per k_gemv_stream block */
    cudaGraphExec_t graph[2] = {nullptr, nullptr};  /* 1 step, GRAPH_STEPS steps */
};

/* Steps per multi-step graph: longer runs replay it, the remainder replays the one-step graph. */
const uint32_t GRAPH_STEPS = 8;

const size_t ARGS_SIZE[LT_K_COUNT] = {0, sizeof(lt_embed_args), sizeof(lt_rmsnorm_args), sizeof(lt_gemv_args),
                                      sizeof(lt_rope_kv_args), sizeof(lt_attention_args), sizeof(lt_gdn_args),
                                      sizeof(lt_elementwise_args), sizeof(lt_gemv_args), sizeof(lt_sample_args)};

uint32_t stored_cols(uint32_t format, uint32_t cols) {
    return format >= LT_WF_Q8 ? (cols + LT_QK - 1) / LT_QK * LT_QK : cols;
}

}  // namespace

struct lt_cuda {
    int device = 0;
    uint8_t *arena[LT_N_ARENAS] = {};
    size_t size[LT_N_ARENAS] = {};
    cudaStream_t stream = nullptr;
    int eager = 0;
    bool x_lane = true;      /* LATTICE_CUDA_X_LANE=0: split-K decode GEMVs stage x (gemv_shape) */
    bool rope_fuse = true;   /* LATTICE_CUDA_ROPE_FUSE=0: k_rope_kv before the attention (fuse_rope_into_attention) */
    /* LATTICE_CUDA_GDN_FUSE=0: the GDN conv and norm as kernels of their own; =conv: the norm only */
    bool gdn_fuse_conv = true, gdn_fuse_norm = true;
    int early_state = -1;    /* LATTICE_CUDA_EARLY_STATE=0 / 1 overrides resident_bound (A/B, tests) */
    uint32_t att_defer = ATT_DEFER_MAX;  /* LATTICE_CUDA_ATT_DEFER=N: splits left to the GEMV (0: none) */
    uint32_t nop_kinds = 0;  /* LATTICE_CUDA_NOP (parse_nop) */
    int sms = 132;
    std::vector<program *> progs;
    /* Two launches may be pending (the token loop queues call i + 1 before reading call i's
       tokens): each has its pinned copy and an event after it; waited for in launch order. */
    uint8_t *pinned[2] = {};
    size_t pinned_n[2] = {};
    cudaEvent_t copied[2] = {};
    uint32_t n_launched = 0, n_waited = 0;
    lt_cuda_counters counters = {};
    bool weights_borrowed = false;  /* arena[WEIGHTS] belongs to the handle it was created from */
    char msg[256] = "";
};

#define CK(call)                                                                                    \
    do {                                                                                            \
        cudaError_t e_ = (call);                                                                    \
        if (e_ != cudaSuccess) {                                                                    \
            snprintf(c->msg, sizeof c->msg, "%s: %s", #call, cudaGetErrorString(e_));               \
            return LT_ERR_CUDA;                                                                     \
        }                                                                                           \
    } while (0)

/* Blocks of k_gemv_stream resident on the whole GPU at once: its grid. */
static uint32_t stream_grid(const lt_cuda *c, uint32_t fmt, size_t smem) {
    int n = 0;
    switch (fmt) {
    case LT_WF_F32: cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, k_gemv_stream<LT_WF_F32>, 256, smem); break;
    case LT_WF_F16: cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, k_gemv_stream<LT_WF_F16>, 256, smem); break;
    case LT_WF_Q8: cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, k_gemv_stream<LT_WF_Q8>, 256, smem); break;
    case LT_WF_Q4: cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, k_gemv_stream<LT_WF_Q4>, 256, smem); break;
    }
    return (uint32_t)(n > 0 ? n : 1) * (uint32_t)c->sms;
}

/* ------------------------------------------------------------------------------ validation */

static int check_args(uint32_t kernel, const uint8_t *args) {
    switch (kernel) {
    case LT_K_GEMV:
    case LT_K_LM_HEAD: {
        const lt_gemv_args *a = (const lt_gemv_args *)args;
        if (a->wformat > LT_WF_Q4 || a->rows == 0 || a->cols == 0 || ((a->flags & LT_GEMV_SILU_MUL) && (a->rows & 1)))
            return LT_ERR_ARGS;
        if (stored_cols(a->wformat, a->cols) > 12288)  /* x staged in shared memory */
            return LT_ERR_ARGS;
        return LT_OK;
    }
    case LT_K_EMBED: {
        const lt_embed_args *a = (const lt_embed_args *)args;
        return a->wformat > LT_WF_Q4 || a->dim == 0 || a->vocab == 0 ? LT_ERR_ARGS : LT_OK;
    }
    case LT_K_RMSNORM: {
        const lt_rmsnorm_args *a = (const lt_rmsnorm_args *)args;
        return a->n_heads == 0 || a->head_dim == 0 ? LT_ERR_ARGS : LT_OK;
    }
    case LT_K_ROPE_KV: {
        const lt_rope_kv_args *a = (const lt_rope_kv_args *)args;
        return a->n_heads == 0 || a->n_kv_heads == 0 || a->head_dim == 0 || a->head_dim > 512
                       || a->rotary_dim > a->head_dim || (a->rotary_dim & 1) || a->ctx_cap == 0
                   ? LT_ERR_ARGS : LT_OK;
    }
    case LT_K_ATTENTION: {
        /* f16 rows read as 16-byte vectors: head_dim a multiple of 8, at most 512 */
        const lt_attention_args *a = (const lt_attention_args *)args;
        return a->n_heads == 0 || a->n_kv_heads == 0 || a->head_dim == 0 || a->n_heads % a->n_kv_heads
                       || a->ctx_cap == 0 || a->head_dim % 8 || a->head_dim > 512
                   ? LT_ERR_ARGS : LT_OK;
    }
    case LT_K_GDN: {
        const lt_gdn_args *a = (const lt_gdn_args *)args;
        if (a->n_k_heads == 0 || a->n_v_heads == 0 || a->n_v_heads % a->n_k_heads || a->k_dim == 0
            || a->v_dim == 0 || a->k_dim > 512 || a->v_dim > 512 || a->conv_kernel < 1)
            return LT_ERR_ARGS;
        return LT_OK;
    }
    case LT_K_ELEMENTWISE:
        return ((const lt_elementwise_args *)args)->op > LT_EW_COPY ? LT_ERR_ARGS : LT_OK;
    case LT_K_SAMPLE:
        return ((const lt_sample_args *)args)->vocab == 0 ? LT_ERR_ARGS : LT_OK;
    }
    return LT_ERR_KERNEL;
}

/* GEMV launch shape: enough warps to fill the GPU. Few rows: KS warps split each row's columns;
 * many rows: RPW rows per warp share the staged x. Interleaved gate/up pairs stay in one block. */
static void gemv_shape(lt_cuda *c, launch &L, const lt_gemv_args *a, const lt_binding *bind) {
    uint32_t kp = stored_cols(a->wformat, a->cols);
    gemv_geom &g = L.gg;
    static const uint32_t esize[] = {4, 2, 1, 0};
    g.xcols = (kp + 31) / 32 * 32;
    g.x_lane = 0;
    g.nblk = kp / LT_QK;
    if (a->wformat == LT_WF_Q8) {
        g.row_bytes = kp;
        g.nvec = kp / 16;
        g.vec_ok = 1;
    } else if (a->wformat == LT_WF_Q4) {
        g.row_bytes = kp / 2;
        g.nvec = kp / 32;
        g.vec_ok = 1;
    } else {
        g.row_bytes = a->cols * esize[a->wformat];
        g.nvec = g.row_bytes / 16;
        g.vec_ok = g.row_bytes % 16 == 0 && bind[LT_GEMV_B_WQ].offset % 16 == 0;
    }
    g.x_vec = a->cols % 4 == 0 && a->x_stride % 4 == 0 && g.xcols <= 4 * 4 * 256 && bind[LT_GEMV_B_X].offset % 16 == 0
              && (!(a->flags & LT_GEMV_NORM) || bind[LT_GEMV_B_NORM].offset % 16 == 0);
    uint32_t want_warps = (uint32_t)c->sms * 32;
    L.rpw = 1;
    L.ks = 1;
    if (a->rows >= 4 * want_warps && g.vec_ok) {  /* LM heads: every warp streams rows (one token) */
        L.stream_grid = stream_grid(c, a->wformat, (size_t)g.xcols * sizeof(float));
        return;
    }
    /* more rows than resident warps: 4 per warp, in about two blocks per SM. Fewer, fatter blocks
       make a cheaper dependent phase (cuda-phase-floor-2026-11-26.md): H100, Qwen3.5-0.8B decode
       +5% over 2 rows per warp (in_proj 8224, gate_up 7168, qkv 5120 rows) */
    if (a->rows > want_warps) {
        L.rpw = 4;
        return;
    }
    uint32_t max_ks = (a->flags & LT_GEMV_SILU_MUL) ? 4 : 8;
    while (L.ks < max_ks && a->rows * L.ks < want_warps && g.nvec / (32u * (L.ks * 2)) >= 1)
        L.ks *= 2;
    /* long rows split over warps, more than two blocks per SM: two rows per warp halve the blocks,
       each of which stages the whole x (Qwen3.5's down projection, 3584 columns: 2 rows of weights
       per block against 14 KB of x; H200 decode +3.9%), four past four blocks per SM. With one
       warp per row it is slower (SmolLM2's 3072 x 576: -7%). */
    const uint32_t blocks = a->rows / (8 / L.ks);  /* at one row per warp */
    if (L.ks > 1 && blocks > 2u * (uint32_t)c->sms)
        L.rpw = blocks > 4u * (uint32_t)c->sms ? 4 : 2;
    /* split-K decode: each lane reads its own x (one round trip, no staging barrier) where it
       holds at most two weight vectors per row (Q4: one; registers) and a block has at most two
       row groups, each of which reads all of x (SmolLM2's down, 4 groups: -3%) */
    g.x_lane = L.ks >= 4 && g.x_vec && (a->wformat == LT_WF_Q8 || a->wformat == LT_WF_Q4) && !(a->flags & LT_GEMV_NORM)
               && g.nvec <= 32u * L.ks * (a->wformat == LT_WF_Q4 ? 1u : 2u) && c->x_lane;
}

/* ------------------------------------------------------------------------------ launching */

/* Programmatic dependent launch for every kernel (LATTICE_CUDA_PDL=0 turns it off): a kernel may
 * start while its predecessor finishes, prefetch weights, then wait for it (kernels.cuh). */
static int pdl_enabled = 1;
static int gpu_sms = 132;  /* k_gemm sizes its blocks to fill the GPU */

/* Diagnostic (LATTICE_CUDA_NOP=gemv,gdn,...: kernel kinds, or gemv_split / gemv_rows for split-K /
 * one-warp-per-row GEMVs): a backend's decode launches of those kinds become empty kernels of the
 * same shape, so that a decode A/B measures what their work costs inside the step. The outputs are
 * then wrong. nop_now: whether launch_k, called by launch_one, empties the launch. */
static thread_local bool nop_now = false;
__global__ void k_nop() {
    pdl_begin();
    pdl_wait();
}

/* LATTICE_CUDA_NOP's comma-separated kinds as bits (per LT_K_*; bit 30: split-K GEMVs, bit 31: the
 * other GEMVs) into *kinds; an unknown kind is an error naming it. */
static int parse_nop(const char *list, uint32_t *kinds, char *msg, size_t msg_n) {
    static const char *names[] = {"embed", "rmsnorm", "gemv", "rope_kv", "attention", "gdn", "elementwise",
                                  "lm_head", "sample", "gemv_split", "gemv_rows"};
    static const int bits[] = {LT_K_EMBED, LT_K_RMSNORM, LT_K_GEMV, LT_K_ROPE_KV, LT_K_ATTENTION, LT_K_GDN,
                               LT_K_ELEMENTWISE, LT_K_LM_HEAD, LT_K_SAMPLE, 30, 31};
    const int n_names = sizeof names / sizeof *names;
    uint32_t nop_kinds = 0;
    for (const char *t = list; t && *t; t += *t == ',') {
        const size_t n = strcspn(t, ",");
        int i = 0;
        while (i < n_names && !(strlen(names[i]) == n && !strncmp(t, names[i], n)))
            i++;
        if (i == n_names) {
            snprintf(msg, msg_n, "LATTICE_CUDA_NOP: unknown kernel kind '%.*s' (embed, rmsnorm, gemv, gemv_split, "
                     "gemv_rows, rope_kv, attention, gdn, elementwise, lm_head, sample)", (int)(n < 40 ? n : 40), t);
            return LT_ERR_ARGS;
        }
        nop_kinds |= 1u << bits[i];
        t += n;
    }
    if (nop_kinds & (1u << LT_K_GEMV))  /* gemv: both halves */
        nop_kinds |= 3u << 30;
    else if (nop_kinds >> 30)  /* one half: gemv launches are then checked against it */
        nop_kinds |= 1u << LT_K_GEMV;
    *kinds = nop_kinds;
    return LT_OK;
}

template <typename... P, typename... A>
static void launch_k(void (*k)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t s, A... args) {
    if (nop_now)
        lt_launch(k_nop, grid, block, 0, s, pdl_enabled);
    else
        lt_launch(k, grid, block, smem, s, pdl_enabled, args...);
}

/* k_gemv for one token, rpw rows per warp (1, 2 or 4) and fusion FUSE (GEMV_FUSE_*), or nullptr
 * where that fusion has no instantiation: the GDN conv only with one warp per row (fuse_gdn_conv),
 * the head norm only split-K over 4 or more warps and the attention splits only with int16 x (Q8 /
 * Q4: fuse_gdn_norm, defer_attention_combine) */
template <int FMT, int KS, int FUSE>
static auto gemv_fused(int rpw) -> decltype(&k_gemv<FMT, KS, 1, 1>) {
    constexpr int C = GEMV_FUSE_CONV, H = GEMV_FUSE_HEAD_NORM, A = GEMV_FUSE_ATT_SPLITS;
    if constexpr ((FUSE == C && KS != 1) || (FUSE == H && (KS < 4 || !wfmt<FMT>::X16)) || (FUSE == A && !wfmt<FMT>::X16))
        return nullptr;
    else
        return rpw == 4 ? k_gemv<FMT, KS, 4, 1, FUSE> : rpw == 2 ? k_gemv<FMT, KS, 2, 1, FUSE> : k_gemv<FMT, KS, 1, 1, FUSE>;
}

template <int FMT, int KS>
static auto gemv_one_token(int rpw, int fuse) {
    switch (fuse) {
    case GEMV_FUSE_CONV: return gemv_fused<FMT, KS, GEMV_FUSE_CONV>(rpw);
    case GEMV_FUSE_HEAD_NORM: return gemv_fused<FMT, KS, GEMV_FUSE_HEAD_NORM>(rpw);
    case GEMV_FUSE_ATT_SPLITS: return gemv_fused<FMT, KS, GEMV_FUSE_ATT_SPLITS>(rpw);
    default: return gemv_fused<FMT, KS, GEMV_FUSE_NONE>(rpw);
    }
}

/* which fusion the fuse passes gave a GEMV (at most one; each pass checks the others' fields) */
static int gemv_fuse_mode(const gemv_fuse &f) {
    return f.conv_w ? GEMV_FUSE_CONV : f.head_ss ? GEMV_FUSE_HEAD_NORM : f.att_part ? GEMV_FUSE_ATT_SPLITS
                                                                                    : GEMV_FUSE_NONE;
}

/* k_gemv with L.ks warps per row and L.rpw rows per warp (rpw 2 and 4: one token only) */
template <int FMT, int KS, int NT>
static void launch_gemv_ks(const launch &L, const lt_gemv_args &a, lt_step_args *st, uint32_t T, int lm, dim3 grid,
                           size_t smem, cudaStream_t s) {
    auto k = NT == 1 ? gemv_one_token<FMT, KS>(L.rpw, gemv_fuse_mode(L.fuse)) : k_gemv<FMT, KS, 1, NT>;
    launch_k(k, grid, 256, smem, s, a, L.b, st, T, L.gg, lm, L.fuse);
}

template <int FMT, int NT>
static void launch_gemv_fmt(const launch &L, const lt_gemv_args &a, lt_step_args *st, uint32_t T, int lm,
                            dim3 grid, size_t smem, cudaStream_t s) {
    if (NT == 1 && L.stream_grid)
        launch_k(L.part ? k_gemv_stream<FMT, true> : k_gemv_stream<FMT>, L.stream_grid, 256, smem, s, a, L.b, st, T,
                 L.gg, lm, L.part);
    else if (L.ks == 1)
        launch_gemv_ks<FMT, 1, NT>(L, a, st, T, lm, grid, smem, s);
    else if (L.ks == 2)
        launch_gemv_ks<FMT, 2, NT>(L, a, st, T, lm, grid, smem, s);
    else if (L.ks == 4)
        launch_gemv_ks<FMT, 4, NT>(L, a, st, T, lm, grid, smem, s);
    else
        launch_gemv_ks<FMT, 8, NT>(L, a, st, T, lm, grid, smem, s);
}

/* x is staged in dynamic shared memory: up to 4 tokens x 12288 floats (check_args bounds cols) */
template <int FMT, int KS>
static void set_gemv_smem_ks(int bytes) {
    cudaFuncSetAttribute(k_gemv<FMT, KS, 1, 4>, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
    for (int fuse : {GEMV_FUSE_NONE, GEMV_FUSE_CONV, GEMV_FUSE_HEAD_NORM, GEMV_FUSE_ATT_SPLITS})
        for (int rpw : {1, 2, 4})
            if (auto k = gemv_one_token<FMT, KS>(rpw, fuse))
                cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
}

template <int FMT>
static void set_gemv_smem() {
    const int bytes = 4 * 12288 * 4;
    set_gemv_smem_ks<FMT, 1>(bytes);
    set_gemv_smem_ks<FMT, 2>(bytes);
    set_gemv_smem_ks<FMT, 4>(bytes);
    set_gemv_smem_ks<FMT, 8>(bytes);
    for (auto k : {k_gemv_stream<FMT>, k_gemv_stream<FMT, true>})
        cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
}

static void launch_gemv_simt(const launch &L0, lt_step_args *st, uint32_t T, cudaStream_t s) {
    const lt_gemv_args &a = *(const lt_gemv_args *)L0.args;
    int lm = L0.kernel == LT_K_LM_HEAD;
    uint32_t n_tok = lm && !(a.flags & LT_GEMV_ALL_TOKENS) ? 1 : T;
    int nt = n_tok > 1 ? 4 : 1;
    launch L = L0;
    if (nt == 4 && L.rpw > 1)  /* several rows x 4 tokens per warp spill: one row per warp */
        L.rpw = 1;
    uint32_t rpb = 8 / L.ks * L.rpw;
    dim3 grid((a.rows + rpb - 1) / rpb, (n_tok + nt - 1) / nt);
    size_t smem = (size_t)nt * L.gg.xcols * sizeof(float);
#define LT_FMT(F)                                                                                 \
    case F:                                                                                       \
        if (nt == 1)                                                                              \
            launch_gemv_fmt<F, 1>(L, a, st, T, lm, grid, smem, s);                                \
        else                                                                                      \
            launch_gemv_fmt<F, 4>(L, a, st, T, lm, grid, smem, s);                                \
        break;
    switch (a.wformat) {
        LT_FMT(LT_WF_F32)
        LT_FMT(LT_WF_F16)
        LT_FMT(LT_WF_Q8)
        LT_FMT(LT_WF_Q4)
    }
#undef LT_FMT
}

/* One token (or a few) on k_gemv / k_gemv_stream; >= GEMM_MIN_TOKENS on k_gemm's tensor cores
 * (gemm.cuh), which declines what it does not handle (F32 weights, the last-token LM head). */
static void launch_gemv(const launch &L, lt_step_args *st, uint32_t T, cudaStream_t s) {
    const lt_gemv_args &a = *(const lt_gemv_args *)L.args;
    int lm = L.kernel == LT_K_LM_HEAD;
    if (!launch_gemm(a, L.b, st, T, lm, gpu_sms, pdl_enabled, s))
        launch_gemv_simt(L, st, T, s);
    if (lm && !L.part && L.b.p[LT_GEMV_B_PARTIALS]) {  /* L.part: its k_gemv_stream wrote them */
        const float *logits = (const float *)L.b.p[LT_GEMV_B_Y]
                              + (size_t)((a.flags & LT_GEMV_ALL_TOKENS) ? T - 1 : 0) * a.y_stride;
        launch_k(k_partials, (a.rows + LT_ARGMAX_BLOCK - 1) / LT_ARGMAX_BLOCK, LT_ARGMAX_BLOCK, 0, s, 
            logits, a.rows, (lt_argmax_partial *)L.b.p[LT_GEMV_B_PARTIALS], st);
    }
}

/* k_gdn_decode for R state rows per lane (rounded up to 2, 4, 8 or 16) */
template <bool V4>
static auto gdn_decode_kernel(uint32_t R) {
    return R <= 2 ? k_gdn_decode<2, V4> : R <= 4 ? k_gdn_decode<4, V4>
           : R <= 8 ? k_gdn_decode<8, V4> : k_gdn_decode<16, V4>;
}

static void launch_one(const launch &L, const program &p, lt_step_args *st, uint32_t T, cudaStream_t s,
                       uint32_t nop_kinds) {
    nop_now = T == 1 && (nop_kinds & (1u << L.kernel))
              && (L.kernel != LT_K_GEMV || (nop_kinds & (1u << (L.ks > 1 ? 30 : 31))));
    switch (L.kernel) {
    case LT_K_EMBED: {
        const lt_embed_args &a = *(const lt_embed_args *)L.args;
        launch_k(k_embed, dim3((a.dim + 255) / 256, T), 256, 0, s, a, L.b, st, T);
        break;
    }
    case LT_K_RMSNORM: {
        const lt_rmsnorm_args &a = *(const lt_rmsnorm_args *)L.args;
        launch_k(k_rmsnorm, dim3(a.n_heads, T), a.head_dim >= 256 ? 256 : 128, 0, s, a, L.b, st, T);
        break;
    }
    case LT_K_ELEMENTWISE: {
        const lt_elementwise_args &a = *(const lt_elementwise_args *)L.args;
        launch_k(k_elementwise, dim3((a.n + 255) / 256, T), 256, 0, s, a, L.b, st, T);
        break;
    }
    case LT_K_GEMV:
    case LT_K_LM_HEAD:
        launch_gemv(L, st, T, s);
        break;
    case LT_K_ROPE_KV: {
        const lt_rope_kv_args &a = *(const lt_rope_kv_args *)L.args;
        launch_k(k_rope_kv, dim3(a.n_heads + a.n_kv_heads, T), 128, 0, s, a, L.b, st, T);
        break;
    }
    case LT_K_ATTENTION: {
        const lt_attention_args &a = *(const lt_attention_args *)L.args;
        dim3 grid(a.n_heads, L.ag.n_split, T);
        const lt_rope_kv_args ra = L.rope_args ? *(const lt_rope_kv_args *)L.rope_args : lt_rope_kv_args{};
        const lt_binds &rb = L.rope_args ? L.rb : L.b;
        /* decode reads a cold cache: the next batch of rows is requested before this one is used
           (PIPE, 256 threads); prefill's rows were just written (L2) and its many blocks want fewer
           registers (128 threads). The block size is the instantiation's (att_threads(PIPE)) */
        const bool wide = att_vecs_per_lane(a.head_dim) == 2, pipe = L.rope_args || T == 1;
        auto k = L.rope_args ? (wide ? k_attention<true, 2, true> : k_attention<true, 1, true>)
                 : pipe      ? (wide ? k_attention<false, 2, true> : k_attention<false, 1, true>)
                             : (wide ? k_attention<false, 2, false> : k_attention<false, 1, false>);
        launch_k(k, grid, att_threads(pipe), 0, s, a, L.b, st, T, L.ag, p.attn_ws, p.attn_cnt, ra, rb,
                 L.gate_from_q);
        break;
    }
    case LT_K_GDN: {
        const lt_gdn_args &a = *(const lt_gdn_args *)L.args;
        if (T > 1) {  /* prefill: per-token work in parallel around a scan of one lane group per column */
            launch_k(k_gdn_prep, dim3(2 * a.n_k_heads + a.n_v_heads, T), GDN_PREP_THREADS, 0, s, a, L.b, st, T,
                     p.gdn_ws);
            dim3 grid((a.v_dim + GDN_SCAN_COLS - 1) / GDN_SCAN_COLS, a.n_v_heads);
            /* state rows padded to a power of two; a warp per column (16 lanes per column: 5% faster
               at T = 64, 7% slower at T = 512 with k_dim 128, 20% slower with 256, on an H200) */
            uint32_t rows = 32;
            while (rows < a.k_dim)
                rows *= 2;
            switch (rows) {
#define LT_GDN_SCAN(P, R, G)                                                                      \
    case P:                                                                                       \
        launch_k(k_gdn_scan<R, G>, grid, GDN_SCAN_COLS * G, 0, s, a, L.b, st, T, p.gdn_ws);       \
        break;
                LT_GDN_SCAN(32, 1, 32)
                LT_GDN_SCAN(64, 2, 32)
                LT_GDN_SCAN(128, 4, 32)
                LT_GDN_SCAN(256, 8, 32)
                LT_GDN_SCAN(512, 16, 32)
#undef LT_GDN_SCAN
            }
            launch_k(k_gdn_out, dim3(a.n_v_heads, T), GDN_OUT_THREADS, 0, s, a, L.b, st, T, (const float *)p.gdn_ws);
            break;
        }
        const float *conv_out = L.conv_in_gemv ? (const float *)L.b.p[LT_GDN_B_X] : p.gdn_ws;
        if (!L.conv_in_gemv)
            launch_k(k_gdn_conv, (a.channels + 255) / 256, 256, 0, s, a, L.b, st, T, p.gdn_ws);
        /* 16-byte state, v, and out rows where v_dim and the rows allow */
        auto a16 = [&](const void *q) { return (uintptr_t)q % 16 == 0; };
        const bool v4 = a.v_dim % 4 == 0 && a16(L.b.p[LT_GDN_B_S]) && a16(L.b.p[LT_GDN_B_OUT])
                        && a16(conv_out + a.v_offset)
                        && (!L.norm_in_gemv || (a16(L.b.p[LT_GDN_B_Z]) && a16(L.b.p[LT_GDN_B_NORM_W])));
        const uint32_t R = (a.k_dim + gdn_row_lanes(a.k_dim) - 1) / gdn_row_lanes(a.k_dim);
        const dim3 grid(a.n_v_heads, gdn_col_blocks(a));
        auto k = v4 ? gdn_decode_kernel<true>(R) : gdn_decode_kernel<false>(R);
        launch_k(k, grid, GDN_WARPS * 32, 0, s, a, L.b, st, conv_out, p.early_state,
                 L.norm_in_gemv ? p.gdn_ss : nullptr);
        if (!L.norm_in_gemv)
            launch_k(k_gdn_norm, a.n_v_heads, 128, 0, s, a, L.b, st);
        break;
    }
    case LT_K_SAMPLE: {
        const lt_sample_args &a = *(const lt_sample_args *)L.args;
        launch_k(k_sample, 1, SAMPLE_THREADS, 0, s, a, L.b, st, T, L.part, L.n_part);
        break;
    }
    }
}

static void launch_step(lt_cuda *c, const program &p, uint32_t T) {
    lt_step_args *st = (lt_step_args *)c->arena[LT_ARENA_STEP];
    for (const launch &L : p.l)
        launch_one(L, p, st, T, c->stream, c->nop_kinds);
}

/* ------------------------------------------------------------------------------ C interface */

extern "C" {

int lt_cuda_device(int device, char *buf, size_t n) {
    int count = 0;
    cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess || device >= count) {
        snprintf(buf, n, "no CUDA device: %s", e != cudaSuccess ? cudaGetErrorString(e) : "index out of range");
        return -1;
    }
    cudaDeviceProp p;
    if ((e = cudaGetDeviceProperties(&p, device)) != cudaSuccess) {
        snprintf(buf, n, "cudaGetDeviceProperties: %s", cudaGetErrorString(e));
        return -1;
    }
    snprintf(buf, n, "%s (sm_%d%d, %d SMs, %.1f GiB)", p.name, p.major, p.minor, p.multiProcessorCount,
             p.totalGlobalMem / 1073741824.0);
    return p.major >= 7 ? 0 : -1;
}

void lt_cuda_free(lt_cuda *c) {
    if (!c)
        return;
#ifdef LT_TRACE
    if (const char *path = getenv("LATTICE_CUDA_TRACE_OUT")) {  /* LT_TRACE's ring, then the record count */
        static uint4 buf[4 * LT_TRACE_N];
        uint32_t n = 0;
        cudaDeviceSynchronize();
        cudaMemcpyFromSymbol(&n, lt_trace_n, 4);
        cudaMemcpyFromSymbol(buf, lt_trace_buf, sizeof buf);
        if (FILE *f = fopen(path, "wb")) {
            fwrite(buf, sizeof buf, 1, f);
            fwrite(&n, 4, 1, f);
            fclose(f);
        }
    }
#endif
    cudaSetDevice(c->device);
    if (c->stream)
        cudaStreamSynchronize(c->stream);
    for (program *p : c->progs) {
        for (cudaGraphExec_t g : p->graph)
            if (g)
                cudaGraphExecDestroy(g);
        cudaFree(p->gdn_ws);
        cudaFree(p->gdn_ss);
        cudaFree(p->attn_ws);
        cudaFree(p->attn_cnt);
        cudaFree(p->lm_part);
        delete p;
    }
    for (int i = 0; i < LT_N_ARENAS; i++)
        if (!(i == LT_ARENA_WEIGHTS && c->weights_borrowed))
            cudaFree(c->arena[i]);
    for (int i = 0; i < 2; i++) {
        if (c->pinned[i])
            cudaFreeHost(c->pinned[i]);
        if (c->copied[i])
            cudaEventDestroy(c->copied[i]);
    }
    if (c->stream)
        cudaStreamDestroy(c->stream);
    delete c;
}

static int create(lt_cuda *c, const size_t sizes[LT_N_ARENAS]) {
    CK(cudaSetDevice(c->device));
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, c->device));
    const char *pdl = getenv("LATTICE_CUDA_PDL"), *eager = getenv("LATTICE_CUDA_EAGER");
    const char *x_lane = getenv("LATTICE_CUDA_X_LANE"), *gdn_fuse = getenv("LATTICE_CUDA_GDN_FUSE");
    const char *early = getenv("LATTICE_CUDA_EARLY_STATE"), *rope_fuse = getenv("LATTICE_CUDA_ROPE_FUSE");
    const char *att_defer = getenv("LATTICE_CUDA_ATT_DEFER");
    pdl_enabled = prop.major >= 9 && !(pdl && pdl[0] == '0');  /* PDL needs sm_90 */
    c->eager = eager && eager[0] == '1';  /* the ablation, for runs through the unified runtime */
    c->x_lane = !(x_lane && x_lane[0] == '0');  /* A/B runs and the bit-identity test */
    c->rope_fuse = !(rope_fuse && rope_fuse[0] == '0');
    c->gdn_fuse_conv = !(gdn_fuse && gdn_fuse[0] == '0');
    c->gdn_fuse_norm = c->gdn_fuse_conv && !(gdn_fuse && !strcmp(gdn_fuse, "conv"));
    c->early_state = early && *early ? early[0] == '1' : -1;
    if (att_defer && *att_defer)
        c->att_defer = (uint32_t)std::min(strtoul(att_defer, nullptr, 10), (unsigned long)ATT_DEFER_MAX);
    if (parse_nop(getenv("LATTICE_CUDA_NOP"), &c->nop_kinds, c->msg, sizeof c->msg) != LT_OK)
        return LT_ERR_ARGS;
    c->sms = prop.multiProcessorCount;
    int least, greatest;
    CK(cudaDeviceGetStreamPriorityRange(&least, &greatest));
    /* LATTICE_CUDA_PRIORITY=least: the A/B of the highest priority, e.g. under other processes' load */
    const char *prio = getenv("LATTICE_CUDA_PRIORITY");
    CK(cudaStreamCreateWithPriority(&c->stream, cudaStreamNonBlocking,
                                    prio && !strcmp(prio, "least") ? least : greatest));
    for (int i = 0; i < 2; i++)
        CK(cudaEventCreateWithFlags(&c->copied[i], cudaEventDisableTiming));
    for (int i = 0; i < LT_N_ARENAS; i++) {
        if (i == LT_ARENA_CONST || (i == LT_ARENA_WEIGHTS && c->weights_borrowed))
            continue;
        size_t n = sizes[i] > 64 ? sizes[i] : 64;
        if (i == LT_ARENA_STEP && n < sizeof(lt_step_args))
            n = sizeof(lt_step_args);
        CK(cudaMalloc(&c->arena[i], n));
        /* on the backend's stream: a non-blocking stream does not wait for the legacy default
         * stream, so a plain cudaMemset could land after the first upload */
        CK(cudaMemsetAsync(c->arena[i], 0, n, c->stream));
        c->size[i] = n;
    }
    set_gemv_smem<LT_WF_F32>();
    set_gemv_smem<LT_WF_F16>();
    set_gemv_smem<LT_WF_Q8>();
    set_gemv_smem<LT_WF_Q4>();
    gemm_set_smem();
    gpu_sms = prop.multiProcessorCount;
    CK(cudaGetLastError());
    CK(cudaStreamSynchronize(c->stream));
    return LT_OK;
}

lt_cuda *lt_cuda_create_shared(const lt_cuda *source, const size_t sizes[LT_N_ARENAS], char *msg, size_t msg_n) {
    lt_cuda *c = new lt_cuda;
    c->device = source->device;
    c->weights_borrowed = true;
    c->arena[LT_ARENA_WEIGHTS] = source->arena[LT_ARENA_WEIGHTS];
    c->size[LT_ARENA_WEIGHTS] = source->size[LT_ARENA_WEIGHTS];
    /* the weights' upload ran on the source's stream: done before this handle's first launch */
    cudaError_t e = cudaStreamSynchronize(source->stream);
    if (e != cudaSuccess)
        snprintf(c->msg, sizeof c->msg, "cudaStreamSynchronize: %s", cudaGetErrorString(e));
    if (e != cudaSuccess || create(c, sizes) != LT_OK) {
        snprintf(msg, msg_n, "%s", c->msg);
        lt_cuda_free(c);
        return nullptr;
    }
    return c;
}

lt_cuda *lt_cuda_create(const size_t sizes[LT_N_ARENAS], int device, char *msg, size_t msg_n) {
    lt_cuda *c = new lt_cuda;
    c->device = device;
    if (create(c, sizes) != LT_OK) {
        snprintf(msg, msg_n, "%s", c->msg);
        lt_cuda_free(c);
        return nullptr;
    }
    return c;
}

/* Slots read as 16-byte vectors: quant weight planes and the f16 KV caches (LT_PLANE_ALIGN). */
static bool needs_16(const lt_dispatch *d, const uint8_t *args, uint32_t slot) {
    if (d->kernel == LT_K_GEMV || d->kernel == LT_K_LM_HEAD)
        return slot == LT_GEMV_B_WQ && ((const lt_gemv_args *)args)->wformat >= LT_WF_Q8;
    if (d->kernel == LT_K_ATTENTION)
        return slot == LT_ATTN_B_K_CACHE || slot == LT_ATTN_B_V_CACHE;
    return false;
}

static int check_dispatch(const lt_cuda *c, const lt_dispatch *d, const uint8_t *consts, size_t n_consts) {
    if (d->kernel == LT_K_NONE || d->kernel >= LT_K_COUNT)
        return LT_ERR_KERNEL;
    if (d->n_bind > LT_MAX_BIND || d->args_offset % LT_ARGS_ALIGN || (size_t)d->args_offset + ARGS_SIZE[d->kernel] > n_consts)
        return LT_ERR_BINDING;
    for (uint32_t i = 0; i < d->n_bind; i++) {
        const lt_binding *b = &d->bind[i];
        if (b->arena == LT_ARENA_NONE)
            continue;
        if (b->arena >= LT_N_ARENAS || b->arena == LT_ARENA_CONST || b->offset >= c->size[b->arena]
            || (b->offset % 16 && needs_16(d, consts + d->args_offset, i)))
            return LT_ERR_BINDING;
    }
    return LT_OK;
}

static bool overlap(const void *a, size_t na, const void *b, size_t nb) {
    uintptr_t x = (uintptr_t)a, y = (uintptr_t)b;
    return x < y + nb && y < x + na;
}

/* Whether attention blocks may write OUT while other blocks still read the rope's inputs: OUT
 * must miss K and V, and miss Q unless it is Q itself with the same per-head rows (then a head's
 * output lands only where that head's q was, after every block of that head read it). */
static bool rope_fusable_out(const lt_rope_kv_args &r, const lt_binds &rb, const void *out) {
    size_t D = (size_t)r.head_dim * 4, nq = r.n_heads * D * ((r.flags & LT_ROPE_SPLIT_GATE) ? 2 : 1);
    size_t no = r.n_heads * D, nkv = r.n_kv_heads * D;
    if (overlap(out, no, rb.p[LT_ROPE_B_K], nkv) || overlap(out, no, rb.p[LT_ROPE_B_V], nkv))
        return false;
    return !overlap(out, no, rb.p[LT_ROPE_B_Q], nq) || (out == rb.p[LT_ROPE_B_Q] && !(r.flags & LT_ROPE_SPLIT_GATE));
}

/* Decode programs (one token per step): a ROPE_KV whose q and new k/v feed the ATTENTION right
 * after it becomes part of that attention kernel (k_attention<true>): one dependent kernel less
 * per attention layer. Its Q_OUT / GATE_OUT rows are then not written: in the program they exist
 * for that attention only. */
static void fuse_rope_into_attention(program &p) {
    std::vector<launch> out;
    for (size_t i = 0; i < p.l.size(); i++) {
        const launch &r = p.l[i];
        if (r.kernel == LT_K_ROPE_KV && i + 1 < p.l.size() && p.l[i + 1].kernel == LT_K_ATTENTION) {
            const lt_rope_kv_args &ra = *(const lt_rope_kv_args *)r.args;
            launch at = p.l[i + 1];
            const lt_attention_args &aa = *(const lt_attention_args *)at.args;
            bool split = ra.flags & LT_ROPE_SPLIT_GATE;
            if (ra.n_heads == aa.n_heads && ra.n_kv_heads == aa.n_kv_heads && ra.head_dim == aa.head_dim
                && ra.ctx_cap == aa.ctx_cap && at.b.p[LT_ATTN_B_Q] == r.b.p[LT_ROPE_B_Q_OUT]
                && at.b.p[LT_ATTN_B_K_CACHE] == r.b.p[LT_ROPE_B_K_CACHE]
                && at.b.p[LT_ATTN_B_V_CACHE] == r.b.p[LT_ROPE_B_V_CACHE]
                && (!(aa.flags & LT_ATTN_OUT_GATE) || !split || at.b.p[LT_ATTN_B_GATE] == r.b.p[LT_ROPE_B_GATE_OUT])
                && rope_fusable_out(ra, r.b, at.b.p[LT_ATTN_B_OUT])) {
                at.rope_args = r.args;
                at.rb = r.b;
                at.gate_from_q = split && (aa.flags & LT_ATTN_OUT_GATE);
                out.push_back(at);
                i++;
                continue;
            }
        }
        out.push_back(r);
    }
    p.l.swap(out);
}

/* Decode programs: a GDN layer's conv moves into the epilogue of the one-warp-per-row k_gemv right
 * before it when that GEMV's output rows hold X's channels (one thread owns each row), so that the
 * recurrent kernel (k_gdn_decode) reads q, k and v ready. Like the fused rope, X then holds values
 * that exist in the program for the GDN only (conv outputs instead of conv inputs). */
static void fuse_gdn_conv(program &p) {
    for (size_t i = 1; i < p.l.size(); i++) {
        launch &G = p.l[i], &in = p.l[i - 1];
        if (G.kernel != LT_K_GDN || in.kernel != LT_K_GEMV || in.stream_grid || in.ks != 1)
            continue;
        const lt_gdn_args &a = *(const lt_gdn_args *)G.args;
        const lt_gemv_args &g = *(const lt_gemv_args *)in.args;
        const float *y = (const float *)in.b.p[LT_GEMV_B_Y], *x = (const float *)G.b.p[LT_GDN_B_X];
        if (x < y || (uintptr_t)x % 4 || (uint64_t)(x - y) + a.channels > g.rows || a.conv_kernel > GEMV_CONV_MAX
            || (g.flags & (LT_GEMV_SILU_MUL | LT_GEMV_RESID)))
            continue;
        in.fuse = {(const float *)G.b.p[LT_GDN_B_CONV_W], (float *)G.b.p[LT_GDN_B_CONV_STATE], (uint32_t)(x - y),
                   a.channels, a.conv_kernel};
        G.conv_in_gemv = true;
    }
}

/* Decode programs: a GDN layer's gated RMSNorm leaves k_gdn_norm when the GEMV right after it reads
 * its output as split-K x_lane (Qwen3.5's out_proj). k_gdn_decode then writes the column-local part
 * (o * norm_w * SiLU(z)) and each column block's sum of o^2, and the GEMV multiplies each weight
 * vector's dot by its head's RMS factor: one kernel less per GDN layer. A weight vector's values
 * must lie in one head (v_dim a multiple of them). Like the fused conv, OUT then holds values that
 * exist in the program for that GEMV only. */
static void fuse_gdn_norm(program &p) {
    for (size_t i = 0; i + 1 < p.l.size(); i++) {
        launch &G = p.l[i], &out = p.l[i + 1];
        if (G.kernel != LT_K_GDN || out.kernel != LT_K_GEMV || !out.gg.x_lane || out.fuse.conv_w)
            continue;
        const lt_gdn_args &a = *(const lt_gdn_args *)G.args;
        const lt_gemv_args &g = *(const lt_gemv_args *)out.args;
        const uint32_t vals = g.wformat == LT_WF_Q4 ? wfmt<LT_WF_Q4>::VALS : wfmt<LT_WF_Q8>::VALS;
        if (out.b.p[LT_GEMV_B_X] != G.b.p[LT_GDN_B_OUT] || g.cols != a.n_v_heads * a.v_dim || a.v_dim % vals
            || gdn_col_blocks(a) > GEMV_HEAD_PARTS_MAX)
            continue;
        out.fuse.head_ss = p.gdn_ss;
        out.fuse.head_cols = a.v_dim;
        out.fuse.head_parts = gdn_col_blocks(a);
        out.fuse.head_eps = a.norm_eps;
        G.norm_in_gemv = true;
    }
}

/* Decode programs: an ATTENTION's split combine moves into the x staging of the GEMV right after it
 * that reads its output (the o-projection) while 2 to `defer` splits are in use: the attention
 * then ends once its splits have written their partials, and the GEMV, which reads all of x anyway,
 * reads the partials instead (att_combined4). With more splits in use (long contexts: the GEMV's
 * reads grow with them) the attention combines as before. Like the other fusions, OUT then holds
 * values that exist in the program for that GEMV only. */
static void defer_attention_combine(program &p, uint32_t defer, int sms) {
    for (size_t i = 0; defer && i + 1 < p.l.size(); i++) {
        launch &A = p.l[i], &G = p.l[i + 1];
        if (A.kernel != LT_K_ATTENTION || G.kernel != LT_K_GEMV || G.stream_grid || A.ag.n_split < 2
            || G.fuse.conv_w || G.fuse.head_ss || !G.gg.x_vec)
            continue;
        const lt_attention_args &a = *(const lt_attention_args *)A.args;
        const lt_gemv_args &g = *(const lt_gemv_args *)G.args;
        if (G.b.p[LT_GEMV_B_X] != A.b.p[LT_ATTN_B_OUT] || g.cols != a.n_heads * a.head_dim
            || (g.wformat != LT_WF_Q8 && g.wformat != LT_WF_Q4))
            continue;
        /* about one block per SM: each block reads every used split of x (L2 traffic), and its
           registers (the partials' loads) leave room beside it for the next kernel's blocks to
           start early (Qwen3.5: 128 blocks of 4 rows per warp, 2 blocks per SM left none) */
        while (G.ks > 1 && G.rpw < 4 && g.rows / (8 / G.ks * G.rpw) > (uint32_t)sms)
            G.rpw *= 2;
        A.ag.defer = std::min(defer, A.ag.n_split);  /* defer <= ATT_DEFER_MAX (create) */
        G.fuse.att_part = p.attn_ws;
        G.fuse.att_dim = a.head_dim;
        G.fuse.att_n_split = A.ag.n_split;
        G.fuse.att_chunk = A.ag.chunk;
        G.fuse.att_defer = A.ag.defer;
    }
}

/* A SAMPLE merges its logits' statistics (max, argmax, sum of exp, NaN / Inf count) from the LM
 * head's partials. Where the nearest LM head before it writes the SAMPLE's LOGITS and PARTIALS for
 * the last token only and has a stream_grid (then it always runs on k_gemv_stream, at any T),
 * each block of that kernel writes the partial of the rows it stored into the program's lm_part
 * and the SAMPLE merges those stream_grid partials: no k_partials kernel between them, one
 * dependent phase (~3.5 us) less per decode step. PARTIALS then goes unwritten: in a program only
 * the SAMPLE reads it. Other heads (few rows on k_gemv, the logits program's every-token head) keep
 * k_partials: PARTIALS, one per LT_ARGMAX_BLOCK logits. lm_part is zeroed: LATTICE_CUDA_NOP=lm_head
 * leaves it unwritten. */
static cudaError_t link_lm_partials(program &p, cudaStream_t s) {
    std::vector<std::pair<launch *, launch *>> links;
    uint32_t blocks = 0;
    for (size_t i = 0, h = 0; i < p.l.size(); i++) {  /* h: 1 + the index of the last LM head so far */
        launch &S = p.l[i];
        if (S.kernel == LT_K_LM_HEAD)
            h = i + 1;
        if (S.kernel != LT_K_SAMPLE)
            continue;
        const lt_sample_args &sa = *(const lt_sample_args *)S.args;
        S.part = (lt_argmax_partial *)S.b.p[LT_SAMPLE_B_PARTIALS];
        S.n_part = (sa.vocab + LT_ARGMAX_BLOCK - 1) / LT_ARGMAX_BLOCK;
        if (!h)
            continue;
        launch &H = p.l[h - 1];
        const lt_gemv_args &ha = *(const lt_gemv_args *)H.args;
        if (H.stream_grid && S.part && !(ha.flags & LT_GEMV_ALL_TOKENS) && !(sa.flags & LT_SAMPLE_LOGITS_ALL_TOKENS)
            && H.b.p[LT_GEMV_B_PARTIALS] == S.part && H.b.p[LT_GEMV_B_Y] == S.b.p[LT_SAMPLE_B_LOGITS]
            && ha.rows == sa.vocab) {
            links.push_back({&H, &S});
            blocks = std::max(blocks, H.stream_grid);
        }
    }
    if (!blocks)
        return cudaSuccess;
    cudaError_t e = cudaMalloc(&p.lm_part, blocks * sizeof(lt_argmax_partial));
    if (e == cudaSuccess)
        e = cudaMemsetAsync(p.lm_part, 0, blocks * sizeof(lt_argmax_partial), s);
    if (e == cudaSuccess)
        e = cudaStreamSynchronize(s);
    for (auto &[H, S] : links) {
        H->part = S->part = p.lm_part;
        S->n_part = H->stream_grid;
    }
    return e;
}

/* Whether the kernels of a step, less the writer and the reader of a state, can never all be
 * resident at once (a lower bound on their threads against twice the GPU's): then a decode kernel
 * that reads state before its dependency wait finds that state's writer of one step earlier
 * finished. Every kernel triggers its dependents at its start and waits for the kernel ahead of it
 * before any block exits, so while the writer runs, every block of every kernel launched after it
 * is resident. */
static bool resident_bound(const lt_cuda *c, const program &p) {
    uint64_t threads = 0, biggest = 0;
    for (const launch &L : p.l) {
        uint64_t t = 0;
        if (L.kernel == LT_K_GEMV || L.kernel == LT_K_LM_HEAD) {
            const lt_gemv_args &a = *(const lt_gemv_args *)L.args;
            t = L.stream_grid ? (uint64_t)L.stream_grid * 256 : (uint64_t)a.rows / (8 / L.ks * L.rpw) * 256;
        } else if (L.kernel == LT_K_GDN) {
            const lt_gdn_args &a = *(const lt_gdn_args *)L.args;
            t = (uint64_t)a.n_v_heads * gdn_col_blocks(a) * GDN_WARPS * 32;
        }
        threads += t;
        biggest = std::max(biggest, t);
    }
    return threads > 2 * biggest + 2 * (uint64_t)c->sms * 2048;
}

int lt_cuda_add_program(lt_cuda *c, const lt_dispatch *prog, uint32_t n, const uint8_t *consts, size_t n_consts,
                        uint32_t max_tokens, uint32_t *err_index) {
    *err_index = 0;
    if (max_tokens == 0)
        return -LT_ERR_ARGS;
    program *p = new program;
    p->max_tokens = max_tokens;
    p->consts.assign(consts, consts + n_consts);
    p->l.resize(n);
    size_t gdn_floats = 0, gdn_ss_floats = 0, attn_floats = 0, attn_heads = 0;
    for (uint32_t i = 0; i < n; i++) {
        const lt_dispatch *d = &prog[i];
        int e = check_dispatch(c, d, consts, n_consts);
        if (e == LT_OK)
            e = check_args(d->kernel, consts + d->args_offset);
        if (e != LT_OK) {
            *err_index = i;
            delete p;
            return -e;
        }
        launch &L = p->l[i];
        L.kernel = d->kernel;
        L.args = p->consts.data() + d->args_offset;
        for (int s = 0; s < LT_MAX_BIND; s++) {
            const lt_binding *b = &d->bind[s];
            L.b.p[s] = (uint32_t)s < d->n_bind && b->arena != LT_ARENA_NONE ? c->arena[b->arena] + b->offset : nullptr;
        }
        if (d->kernel == LT_K_GEMV || d->kernel == LT_K_LM_HEAD) {
            gemv_shape(c, L, (const lt_gemv_args *)L.args, d->bind);
        } else if (d->kernel == LT_K_ATTENTION) {
            const lt_attention_args *a = (const lt_attention_args *)L.args;
            /* at most 64 splits of >= 64 positions each: short dependent load chains per block.
               Prefill has a block per query and head already: splits of >= 256 positions (H200,
               context 4096, pp512: SmolLM2 26,662 -> 41,402 tok/s, Qwen3.5-0.8B 22,232 -> 23,315;
               512 positions: 44,221 and 21,726) */
            uint32_t nvec = a->head_dim / 8, G = 1;
            while (G < nvec && G < 32)
                G *= 2;
            uint32_t chunk = (a->ctx_cap + 63) / 64;
            chunk = (chunk + 63) / 64 * 64;
            if (max_tokens > 1 && chunk < 256)
                chunk = 256;
            /* decode: splits of up to one batch of rows (lane groups of the decode block x
               ATT_ROWS; 256 at most): combining splits (a fence, an atomic, a second L2 round
               trip) costs more than a batch whose rows were prefetched into L2 before the wait.
               256 positions per split for head_dim 64 (SmolLM2), 64 for 256 (Qwen3.5): the same
               as two batches of the 128-thread block before, now read in one */
            uint32_t per_batch = att_threads(true) / G * ATT_ROWS(att_vecs_per_lane(a->head_dim), true);
            if (max_tokens == 1)
                chunk = std::max(chunk, std::min(256u, (per_batch + 63) / 64 * 64));
            L.ag = {(a->ctx_cap + chunk - 1) / chunk, chunk, G};
            if (L.ag.n_split > 1) {
                size_t f = (size_t)max_tokens * a->n_heads * L.ag.n_split * att_part_floats(a->head_dim);
                attn_floats = f > attn_floats ? f : attn_floats;
                attn_heads = (size_t)max_tokens * a->n_heads > attn_heads ? (size_t)max_tokens * a->n_heads : attn_heads;
            }
        } else if (d->kernel == LT_K_GDN) {
            const lt_gdn_args *a = (const lt_gdn_args *)L.args;
            size_t f = max_tokens > 1 ? gdn_prefill_floats(*a, max_tokens) : 0;
            f = f > a->channels ? f : a->channels;
            gdn_floats = f > gdn_floats ? f : gdn_floats;
            gdn_ss_floats = std::max(gdn_ss_floats, (size_t)a->n_v_heads * gdn_col_blocks(*a));
        }
    }
    /* the consts vector must not move after L.args point into it */
    cudaError_t e1 = gdn_floats ? cudaMalloc(&p->gdn_ws, gdn_floats * 4) : cudaSuccess;
    if (e1 == cudaSuccess && gdn_ss_floats)
        e1 = cudaMalloc(&p->gdn_ss, gdn_ss_floats * 4);
    cudaError_t e2 = attn_floats ? cudaMalloc(&p->attn_ws, attn_floats * 4) : cudaSuccess;
    if (e2 == cudaSuccess && attn_heads) {
        e2 = cudaMalloc(&p->attn_cnt, attn_heads * sizeof(unsigned));
        if (e2 == cudaSuccess)
            e2 = cudaMemsetAsync(p->attn_cnt, 0, attn_heads * sizeof(unsigned), c->stream);
        if (e2 == cudaSuccess)
            e2 = cudaStreamSynchronize(c->stream);
    }
    cudaError_t e3 = e1 == cudaSuccess && e2 == cudaSuccess ? link_lm_partials(*p, c->stream) : cudaSuccess;
    if (e1 != cudaSuccess || e2 != cudaSuccess || e3 != cudaSuccess) {
        snprintf(c->msg, sizeof c->msg, "workspace: %s",
                 cudaGetErrorString(e1 != cudaSuccess ? e1 : e2 != cudaSuccess ? e2 : e3));
        cudaFree(p->gdn_ws);
        cudaFree(p->gdn_ss);
        cudaFree(p->attn_ws);
        cudaFree(p->attn_cnt);
        cudaFree(p->lm_part);
        delete p;
        return -LT_ERR_NOMEM;
    }
    if (max_tokens == 1) {
        if (c->rope_fuse)
            fuse_rope_into_attention(*p);
        if (c->gdn_fuse_conv)
            fuse_gdn_conv(*p);
        if (c->gdn_fuse_norm)
            fuse_gdn_norm(*p);
        defer_attention_combine(*p, c->att_defer, c->sms);
        p->early_state = c->early_state >= 0 ? c->early_state : resident_bound(c, *p);
    }
    c->progs.push_back(p);
    if (c->progs.size() == 1)  /* the runtime adds decode first */
        c->counters.dispatches_per_step = (uint32_t)p->l.size();
    return (int)c->progs.size() - 1;
}

static bool in_arena(const lt_cuda *c, uint32_t arena, size_t offset, size_t n) {
    return arena < LT_N_ARENAS && c->arena[arena] && offset + n <= c->size[arena] && offset + n >= offset;
}

int lt_cuda_write(lt_cuda *c, uint32_t arena, size_t offset, const void *src, size_t n) {
    if (!in_arena(c, arena, offset, n))
        return LT_ERR_BINDING;
    CK(cudaMemcpyAsync(c->arena[arena] + offset, src, n, cudaMemcpyHostToDevice, c->stream));
    CK(cudaStreamSynchronize(c->stream));
    return LT_OK;
}

int lt_cuda_read(lt_cuda *c, uint32_t arena, size_t offset, void *dst, size_t n) {
    if (!in_arena(c, arena, offset, n))
        return LT_ERR_BINDING;
    CK(cudaMemcpyAsync(dst, c->arena[arena] + offset, n, cudaMemcpyDeviceToHost, c->stream));
    CK(cudaStreamSynchronize(c->stream));
    return LT_OK;
}

int lt_cuda_copy(lt_cuda *c, uint32_t arena, size_t dst, size_t src, size_t n) {
    if (!in_arena(c, arena, dst, n) || !in_arena(c, arena, src, n) || (dst < src + n && src < dst + n))
        return LT_ERR_BINDING;
    CK(cudaMemcpyAsync(c->arena[arena] + dst, c->arena[arena] + src, n, cudaMemcpyDeviceToDevice, c->stream));
    c->counters.api_calls++;
    return LT_OK;
}

int lt_cuda_zero(lt_cuda *c, uint32_t arena, size_t offset, size_t n) {
    if (!in_arena(c, arena, offset, n))
        return LT_ERR_BINDING;
    CK(cudaMemsetAsync(c->arena[arena] + offset, 0, n, c->stream));
    c->counters.api_calls++;
    return LT_OK;
}

void lt_cuda_set_eager(lt_cuda *c, int eager) {
    c->eager = eager;
}

static int capture(lt_cuda *c, program &p, int which) {
    cudaGraph_t g;
    CK(cudaStreamBeginCapture(c->stream, cudaStreamCaptureModeThreadLocal));
    for (uint32_t i = 0; i < (which ? GRAPH_STEPS : 1); i++)
        launch_step(c, p, 1);
    cudaError_t e = cudaStreamEndCapture(c->stream, &g);
    if (e != cudaSuccess) {
        snprintf(c->msg, sizeof c->msg, "graph capture: %s", cudaGetErrorString(e));
        return LT_ERR_CUDA;
    }
    e = cudaGraphInstantiate(&p.graph[which], g, 0);
    cudaGraphDestroy(g);
    if (e != cudaSuccess) {
        snprintf(c->msg, sizeof c->msg, "cudaGraphInstantiate: %s", cudaGetErrorString(e));
        return LT_ERR_CUDA;
    }
    CK(cudaGraphUpload(p.graph[which], c->stream));
    return LT_OK;
}

int lt_cuda_launch(lt_cuda *c, int prog, uint32_t n_steps, uint32_t T, size_t out_offset, size_t out_n) {
    if (prog < 0 || (size_t)prog >= c->progs.size() || T == 0)
        return LT_ERR_ARGS;
    program &p = *c->progs[prog];
    if (T > p.max_tokens || out_offset + out_n > c->size[LT_ARENA_OUTPUT])
        return LT_ERR_ARGS;
    if (c->n_launched - c->n_waited >= 2)
        return LT_ERR_ARGS;
    const int slot = c->n_launched % 2;  /* not pending: its last wait has returned */
    size_t need = sizeof(lt_step_args) + out_n;
    if (need > c->pinned_n[slot]) {
        if (c->pinned[slot])
            cudaFreeHost(c->pinned[slot]);
        c->pinned[slot] = nullptr;
        c->pinned_n[slot] = 0;
        CK(cudaHostAlloc((void **)&c->pinned[slot], need, cudaHostAllocDefault));
        c->pinned_n[slot] = need;
    }
    uint32_t s = 0;
    if (T > 1 || c->eager) {  /* prefill step (T > 1), or every step in eager mode */
        for (; s < (c->eager ? n_steps : 1); s++) {
            const uint64_t before = lt_kernels_launched;
            launch_step(c, p, s == 0 ? T : 1);
            CK(cudaGetLastError());
            c->counters.kernel_launches += lt_kernels_launched - before;
            c->counters.api_calls += lt_kernels_launched - before + 1;
        }
    }
    while (s < n_steps) {
        int which = n_steps - s >= GRAPH_STEPS;
        if (!p.graph[which]) {
            int e = capture(c, p, which);
            if (e != LT_OK)
                return e;
        }
        CK(cudaGraphLaunch(p.graph[which], c->stream));
        s += which ? GRAPH_STEPS : 1;
        c->counters.graph_launches++;
        c->counters.api_calls++;
    }
    CK(cudaMemcpyAsync(c->pinned[slot], c->arena[LT_ARENA_STEP], sizeof(lt_step_args), cudaMemcpyDeviceToHost,
                       c->stream));
    if (out_n)
        CK(cudaMemcpyAsync(c->pinned[slot] + sizeof(lt_step_args), c->arena[LT_ARENA_OUTPUT] + out_offset, out_n,
                           cudaMemcpyDeviceToHost, c->stream));
    CK(cudaEventRecord(c->copied[slot], c->stream));
    c->n_launched++;
    c->counters.steps += n_steps;
    c->counters.api_calls += out_n ? 3 : 2;
    return LT_OK;
}

int lt_cuda_wait(lt_cuda *c, const void **host) {
    if (c->n_launched == c->n_waited)
        return LT_ERR_ARGS;
    const int slot = c->n_waited++ % 2;
    CK(cudaEventSynchronize(c->copied[slot]));
    CK(cudaGetLastError());
    c->counters.api_calls += 2;
    if (host)
        *host = c->pinned[slot];
    return (int)((const lt_step_args *)c->pinned[slot])->error;
}

int lt_cuda_run(lt_cuda *c, int prog, uint32_t n_steps, uint32_t T) {
    if (c->n_launched != c->n_waited)  /* its wait would return an earlier launch's result */
        return LT_ERR_ARGS;
    int e = lt_cuda_launch(c, prog, n_steps, T, 0, 0);
    return e != LT_OK ? e : lt_cuda_wait(c, nullptr);
}

void lt_cuda_counters_get(const lt_cuda *c, lt_cuda_counters *out) {
    *out = c->counters;
}

const char *lt_cuda_message(lt_cuda *c) {
    return c->msg;
}

}  // extern "C"
