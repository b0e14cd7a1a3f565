/* Lattice program format: the structs and constants shared by the host (Cython runtime, program
 * builder mirrors them in Python), the CPU backend (C), CUDA and Metal Shading Language.
 *
 * A decode program is a flat array of lt_dispatch records. Each record names a kernel, its
 * buffer bindings as (arena, byte offset) pairs and the byte offset of its argument struct in the
 * CONST arena. Everything that changes per step (position, token, RNG, sampling parameters) lives
 * in lt_step_args at offset 0 of the STEP arena; a program never changes after it is built.
 *
 * Conventions every backend follows:
 *   - Every kernel sees two implicit inputs besides its bindings: its args struct (CONST arena at
 *     dispatch.args_offset) and the step args (STEP arena, offset 0). On Metal/CUDA these are
 *     buffer slots 0 and 1; binding i is slot 2 + i.
 *   - Activations are f32, row-major [T, features] with a per-tensor row stride given in floats
 *     in the args (stride = floats between consecutive tokens). T = step.n_tokens.
 *   - Unused binding slots have arena LT_ARENA_NONE.
 *   - Only 32-bit fields (ICB offsets are 32-bit); args structs are multiples of 16 bytes and
 *     args_offset is a multiple of LT_ARGS_ALIGN.
 *   - Changes to this file are additive: new fields take the place of padding or go at the end.
 */
#ifndef LATTICE_SHARED_H
#define LATTICE_SHARED_H

typedef unsigned int lt_u32;
typedef int lt_i32;
typedef float lt_f32;

#if defined(__CUDACC__)
#define LT_FN static inline __host__ __device__
#else
#define LT_FN static inline
#endif

/* ---------------------------------------------------------------------------------------------
 * Weight formats. Matrices are [rows, cols] row-major (Linear weight [out, in]), stored in split
 * planes, each plane 16-byte aligned and bound separately (slots *_WQ, *_WS, *_WM):
 *   LT_WF_F32: WQ = f32 [rows][cols]                    (WS, WM unused)
 *   LT_WF_F16: WQ = f16 [rows][cols]                    (WS, WM unused)
 *   LT_WF_Q8:  WQ = int8 [rows][cols], WS = f16 [rows][cols/32];  w = q * s
 *   LT_WF_Q4:  WQ = uint8 [rows][cols/2], WS = f16 [rows][cols/32], WM = f16 [rows][cols/32];
 *              w = q * s + m, q in 0..15. In each 32-value block (16 bytes) byte j holds value j
 *              in its low nibble and value j + 16 in its high nibble (GGUF Q4_1's order).
 * Q8/Q4 rows are padded with zeros to cols_padded = ceil(cols / 32) * 32 (lattice/quant.py): the
 * plane row strides use cols_padded, and kernels treat x as zero beyond cols. Small vectors
 * (norm weights, biases, A_log, dt_bias, conv weights, RoPE inverse frequencies) are plain f32.
 * ------------------------------------------------------------------------------------------- */
#define LT_QK 32                 /* values per quant block */
#define LT_PLANE_ALIGN 16        /* byte alignment of every weight plane */
#define LT_ARGS_ALIGN 16         /* byte alignment of args structs in the CONST arena */

enum lt_weight_format {
    LT_WF_F32 = 0,
    LT_WF_F16 = 1,
    LT_WF_Q8 = 2,
    LT_WF_Q4 = 3
};

/* ---------------------------------------------------------------------------------------------
 * Arenas: one buffer each, allocated and owned by the runtime. */
enum lt_arena {
    LT_ARENA_WEIGHTS = 0,  /* read-only after load */
    LT_ARENA_STATE = 1,    /* KV cache (f16), GDN conv + recurrent state (f32), penalty counts */
    LT_ARENA_SCRATCH = 2,  /* activations, reused across layers */
    LT_ARENA_STEP = 3,     /* lt_step_args at offset 0, then the step's input token ids */
    LT_ARENA_OUTPUT = 4,   /* output ring: tokens, logprobs, logits on request */
    LT_ARENA_CONST = 5,    /* per-dispatch args structs */
    LT_N_ARENAS = 6
};
#define LT_ARENA_NONE 0xFFFFFFFFu

#define LT_MAX_BIND 12

typedef struct lt_binding {
    lt_u32 arena;   /* LT_ARENA_* or LT_ARENA_NONE */
    lt_u32 offset;  /* byte offset in that arena */
} lt_binding;

/* dispatch.flags */
#define LT_DISPATCH_BARRIER 1u   /* wait for every earlier dispatch of this step to finish first:
                                    set when this dispatch reads or overwrites memory that an
                                    earlier dispatch (since the last barrier) writes or reads.
                                    Backends always separate consecutive steps. */

#ifndef __METAL_VERSION__  /* host-only: `kernel` is a keyword in Metal Shading Language */
typedef struct lt_dispatch {
    lt_u32 kernel;       /* LT_K_* */
    lt_u32 flags;        /* LT_DISPATCH_* */
    lt_u32 args_offset;  /* byte offset of the kernel's args struct in the CONST arena */
    lt_u32 n_bind;       /* bindings in use; slots >= n_bind are unbound */
    lt_u32 grid[3];      /* GPU launch: threadgroups per grid (the CPU ignores it) */
    lt_u32 group[3];     /* GPU launch: threads per threadgroup (the CPU ignores it) */
    lt_binding bind[LT_MAX_BIND];  /* slot meanings: the kernel's LT_*_B_* enum below */
} lt_dispatch;
#endif

/* Kernel error codes, written to lt_step_args.error (first error wins) and returned by runs. */
enum lt_error {
    LT_OK = 0,
    LT_ERR_NONFINITE = 1,     /* NaN or Inf in logits */
    LT_ERR_TOKEN = 2,         /* a token id >= vocab reached EMBED */
    LT_ERR_CONTEXT = 3,       /* pos + n_tokens exceeds the KV cache capacity */
    LT_ERR_KERNEL = 4,        /* unknown kernel id */
    LT_ERR_BINDING = 5,       /* a binding or args struct lies outside its arena */
    LT_ERR_ARGS = 6,          /* invalid args (zero sizes, cols % 32 for quant formats, ...) */
    LT_ERR_NOMEM = 7          /* backend workspace allocation failed */
};

/* ---------------------------------------------------------------------------------------------
 * Kernels. T = step.n_tokens for every kernel. */
enum lt_kernel {
    LT_K_NONE = 0,
    LT_K_EMBED = 1,           /* lt_embed_args */
    LT_K_RMSNORM = 2,         /* lt_rmsnorm_args */
    LT_K_GEMV = 3,            /* lt_gemv_args (T > 1: GEMM, weights read once per token block) */
    LT_K_ROPE_KV = 4,         /* lt_rope_kv_args: q/k norm + RoPE + KV append (+ q|gate split) */
    LT_K_ATTENTION = 5,       /* lt_attention_args: causal GQA over the f16 KV cache */
    LT_K_GDN = 6,             /* lt_gdn_args: Gated DeltaNet step/scan, fused */
    LT_K_ELEMENTWISE = 7,     /* lt_elementwise_args: unfused add / silu_mul / sigmoid_mul / copy */
    LT_K_LM_HEAD = 8,         /* lt_gemv_args: logits of the last token + argmax partials */
    LT_K_SAMPLE = 9,          /* lt_sample_args: the last kernel of a step */
    LT_K_COUNT = 10
};

/* EMBED: out[t] = table[ids[t]] * scale. */
enum { LT_EMBED_B_IDS = 0,    /* uint32 [T] token ids (decode: STEP arena at the offset of
                                 lt_step_args.token) */
       LT_EMBED_B_OUT = 1,    /* f32 [T, out_stride] */
       LT_EMBED_B_WQ = 2, LT_EMBED_B_WS = 3, LT_EMBED_B_WM = 4 };  /* table planes [vocab, dim] */
typedef struct lt_embed_args {
    lt_u32 wformat;     /* LT_WF_* of the table */
    lt_u32 dim;         /* row length D */
    lt_u32 vocab;       /* rows in the table; larger ids set LT_ERR_TOKEN */
    lt_u32 out_stride;  /* floats between output rows */
    lt_f32 scale;       /* multiplier of every row (1 for Llama) */
    lt_u32 pad[3];
} lt_embed_args;

/* RMSNORM: y = x * rsqrt(mean(x^2) + eps) * w', per row (n_heads == 1) or per head of head_dim;
 * w' = w, or 1 + w with LT_NORM_ADD_ONE; with LT_NORM_SILU_GATE, y *= silu(z) (Qwen3.5's GDN
 * output norm). out may alias x. */
#define LT_NORM_ADD_ONE 1u
#define LT_NORM_SILU_GATE 2u
enum { LT_NORM_B_X = 0,       /* f32 [T, in_stride] */
       LT_NORM_B_OUT = 1,     /* f32 [T, out_stride] */
       LT_NORM_B_W = 2,       /* f32 [head_dim] (whole-row norm: [dim]) */
       LT_NORM_B_Z = 3 };     /* f32 [T, z_stride] (LT_NORM_SILU_GATE) */
typedef struct lt_rmsnorm_args {
    lt_u32 n_heads;     /* 1: normalize whole rows; > 1: each head separately */
    lt_u32 head_dim;    /* elements per head (whole row: the row length) */
    lt_u32 in_stride;   /* floats between token rows of x */
    lt_u32 out_stride;  /* floats between token rows of out */
    lt_u32 z_stride;    /* floats between token rows of z */
    lt_u32 flags;       /* LT_NORM_* */
    lt_f32 eps;
    lt_u32 pad;
} lt_rmsnorm_args;

/* GEMV: y[t, n] = sum_k W[n, k] * x'[t, k] then epilogues, for t < T, n < rows.
 * Prologue LT_GEMV_NORM: x' = RMSNorm(x) with NORM weight (and LT_GEMV_NORM_ADD_ONE), eps.
 * Epilogues in order: + BIAS[n]; LT_GEMV_SILU_MUL: rows hold gate/up interleaved (row 2i = gate
 * row i, row 2i+1 = up row i; bias likewise), output i = silu(gate_i) * up_i, rows/2 outputs;
 * LT_GEMV_RESID: y = RESID + y (RESID may alias Y).
 * LM_HEAD uses the same args for the LAST token only (x row T-1, logits to Y row 0; with
 * LT_GEMV_ALL_TOKENS every token, logits of token t in Y row t) and also writes one
 * lt_argmax_partial per LT_ARGMAX_BLOCK rows of the last token's logits. */
#define LT_GEMV_NORM 1u
#define LT_GEMV_NORM_ADD_ONE 2u
#define LT_GEMV_BIAS 4u
#define LT_GEMV_SILU_MUL 8u
#define LT_GEMV_RESID 16u
#define LT_GEMV_ALL_TOKENS 32u   /* LM_HEAD only */
enum { LT_GEMV_B_X = 0,       /* f32 [T, x_stride] */
       LT_GEMV_B_Y = 1,       /* f32 [T, y_stride] */
       LT_GEMV_B_WQ = 2, LT_GEMV_B_WS = 3, LT_GEMV_B_WM = 4,  /* weight planes [rows, cols] */
       LT_GEMV_B_NORM = 5,    /* f32 [cols] */
       LT_GEMV_B_BIAS = 6,    /* f32 [rows] */
       LT_GEMV_B_RESID = 7,   /* f32 [T, resid_stride] */
       LT_GEMV_B_PARTIALS = 8 /* LM_HEAD: lt_argmax_partial [ceil(rows / LT_ARGMAX_BLOCK)] */ };
typedef struct lt_gemv_args {
    lt_u32 wformat;       /* LT_WF_* */
    lt_u32 rows;          /* N: weight rows (with LT_GEMV_SILU_MUL: 2 x outputs) */
    lt_u32 cols;          /* K: input features */
    lt_u32 flags;         /* LT_GEMV_* */
    lt_u32 x_stride;      /* floats between token rows of x */
    lt_u32 y_stride;      /* floats between token rows of y */
    lt_u32 resid_stride;  /* floats between token rows of resid */
    lt_f32 eps;           /* RMSNorm prologue epsilon */
} lt_gemv_args;

#define LT_ARGMAX_BLOCK 256
typedef struct lt_argmax_partial {
    lt_f32 max;          /* largest logit of the block */
    lt_u32 argmax;       /* its token id (lowest id on ties) */
    lt_f32 sumexp;       /* sum of exp(logit - max) over the block */
    lt_u32 n_nonfinite;  /* NaN/Inf logits in the block */
} lt_argmax_partial;

/* ROPE_KV, for each token t (position pos + t): optional per-head RMSNorm of q and k
 * (LT_ROPE_QK_NORM with Q_NORM / K_NORM weights [head_dim], LT_ROPE_NORM_ADD_ONE), NeoX RoPE on
 * the first rotary_dim dims of each head (pairs (i, i + rotary_dim/2), angle = position *
 * inv_freq[i]), q -> Q_OUT (may alias Q unless LT_ROPE_SPLIT_GATE), k and v -> the f16 caches.
 * LT_ROPE_SPLIT_GATE: each q head in Q is [q (head_dim) | gate (head_dim)] (Qwen3.5); the gate
 * half goes to GATE_OUT unchanged.
 * KV cache layout: f16 [n_kv_heads][ctx_cap][head_dim] for K and for V. */
#define LT_ROPE_QK_NORM 1u
#define LT_ROPE_NORM_ADD_ONE 2u
#define LT_ROPE_SPLIT_GATE 4u
enum { LT_ROPE_B_Q = 0,        /* f32 [T, q_stride] */
       LT_ROPE_B_K = 1,        /* f32 [T, k_stride] */
       LT_ROPE_B_V = 2,        /* f32 [T, v_stride] */
       LT_ROPE_B_Q_OUT = 3,    /* f32 [T, q_out_stride] */
       LT_ROPE_B_K_CACHE = 4,  /* f16 [n_kv_heads][ctx_cap][head_dim] */
       LT_ROPE_B_V_CACHE = 5,  /* f16 [n_kv_heads][ctx_cap][head_dim] */
       LT_ROPE_B_INV_FREQ = 6, /* f32 [rotary_dim / 2] (builder applies rope scaling) */
       LT_ROPE_B_Q_NORM = 7,   /* f32 [head_dim] */
       LT_ROPE_B_K_NORM = 8,   /* f32 [head_dim] */
       LT_ROPE_B_GATE_OUT = 9  /* f32 [T, gate_stride] */ };
typedef struct lt_rope_kv_args {
    lt_u32 n_heads;       /* query heads */
    lt_u32 n_kv_heads;
    lt_u32 head_dim;
    lt_u32 rotary_dim;    /* even, <= head_dim */
    lt_u32 q_stride;      /* floats between token rows of Q */
    lt_u32 k_stride;      /* floats between token rows of K */
    lt_u32 v_stride;      /* floats between token rows of V */
    lt_u32 q_out_stride;  /* floats between token rows of Q_OUT */
    lt_u32 gate_stride;   /* floats between token rows of GATE_OUT */
    lt_u32 ctx_cap;       /* positions in the KV cache; pos + T > ctx_cap sets LT_ERR_CONTEXT */
    lt_u32 flags;         /* LT_ROPE_* */
    lt_f32 eps;           /* q/k norm epsilon */
} lt_rope_kv_args;

/* ATTENTION: query t of head h (position pos + t) attends to cache positions 0 .. pos + t of kv
 * head h / (n_heads / n_kv_heads); softmax in f32 with scores * scale. With LT_ATTN_OUT_GATE the
 * output is multiplied by sigmoid(GATE) (Qwen3.5's attention output gate). */
#define LT_ATTN_OUT_GATE 1u
enum { LT_ATTN_B_Q = 0,        /* f32 [T, q_stride] */
       LT_ATTN_B_OUT = 1,      /* f32 [T, out_stride] */
       LT_ATTN_B_K_CACHE = 2,  /* f16 [n_kv_heads][ctx_cap][head_dim] */
       LT_ATTN_B_V_CACHE = 3,
       LT_ATTN_B_GATE = 4      /* f32 [T, gate_stride] */ };
typedef struct lt_attention_args {
    lt_u32 n_heads;
    lt_u32 n_kv_heads;
    lt_u32 head_dim;
    lt_u32 ctx_cap;       /* positions in the KV cache */
    lt_u32 q_stride;      /* floats between token rows of Q */
    lt_u32 out_stride;    /* floats between token rows of OUT */
    lt_u32 gate_stride;   /* floats between token rows of GATE */
    lt_u32 flags;         /* LT_ATTN_* */
    lt_f32 scale;         /* score multiplier (head_dim ** -0.5 usually) */
    lt_u32 pad[3];
} lt_attention_args;

/* GDN: one Qwen3.5 Gated DeltaNet layer step (T = 1) or sequential scan (T > 1), fused:
 * causal depthwise conv (kernel conv_kernel, state = the previous conv_kernel - 1 inputs,
 * oldest first) + SiLU over the X channels; q, k, v are channel ranges of the conv output;
 * q, k l2-normalized per head (eps 1e-6), q *= k_dim ** -0.5; beta = sigmoid(b),
 * g = -exp(A_log) * softplus(a + dt_bias); value head h uses key head h / (n_v_heads / n_k_heads);
 * S *= exp(g); S += k (x) ((v - S^T k) * beta); o = S^T q; out = RMSNorm(o) * norm_w * silu(z)
 * per value head (plain weight, eps norm_eps). */
enum { LT_GDN_B_X = 0,         /* f32 [T, x_stride]: conv input (mixed q|k|v channels) */
       LT_GDN_B_Z = 1,         /* f32 [T, z_stride]: [n_v_heads * v_dim] */
       LT_GDN_B_A = 2,         /* f32 [T, a_stride]: [n_v_heads] */
       LT_GDN_B_B = 3,         /* f32 [T, b_stride]: [n_v_heads] */
       LT_GDN_B_OUT = 4,       /* f32 [T, out_stride]: [n_v_heads * v_dim] */
       LT_GDN_B_CONV_W = 5,    /* f32 [channels][conv_kernel] */
       LT_GDN_B_CONV_STATE = 6,/* f32 [conv_kernel - 1][channels] (STATE arena) */
       LT_GDN_B_A_LOG = 7,     /* f32 [n_v_heads] */
       LT_GDN_B_DT_BIAS = 8,   /* f32 [n_v_heads] */
       LT_GDN_B_S = 9,         /* f32 [n_v_heads][k_dim][v_dim] (STATE arena) */
       LT_GDN_B_NORM_W = 10    /* f32 [v_dim] */ };
typedef struct lt_gdn_args {
    lt_u32 n_k_heads;
    lt_u32 n_v_heads;
    lt_u32 k_dim;
    lt_u32 v_dim;
    lt_u32 conv_kernel;   /* taps K of the depthwise conv */
    lt_u32 channels;      /* conv channels C (= 2 * n_k_heads * k_dim + n_v_heads * v_dim) */
    lt_u32 q_offset;      /* first channel of q in X */
    lt_u32 k_offset;      /* first channel of k in X */
    lt_u32 v_offset;      /* first channel of v in X */
    lt_u32 x_stride;      /* floats between token rows of X */
    lt_u32 z_stride;
    lt_u32 a_stride;
    lt_u32 b_stride;
    lt_u32 out_stride;
    lt_f32 norm_eps;      /* eps of the gated output RMSNorm */
    lt_u32 pad;
} lt_gdn_args;

/* ELEMENTWISE over [T, n]: ADD out = a + b; SILU_MUL out = silu(a) * b; SIGMOID_MUL
 * out = a * sigmoid(b); COPY out = a. out may alias a or b. */
enum { LT_EW_ADD = 0, LT_EW_SILU_MUL = 1, LT_EW_SIGMOID_MUL = 2, LT_EW_COPY = 3 };
enum { LT_EW_B_A = 0, LT_EW_B_B = 1, LT_EW_B_OUT = 2 };
typedef struct lt_elementwise_args {
    lt_u32 op;          /* LT_EW_* */
    lt_u32 n;           /* elements per token row */
    lt_u32 a_stride;    /* floats between token rows of a */
    lt_u32 b_stride;
    lt_u32 out_stride;
    lt_u32 pad[3];
} lt_elementwise_args;

/* SAMPLE (single work item, last kernel of a step):
 *  1. push the step's T input ids into the penalty history (COUNTS += 1 each; with
 *     penalty_last_n > 0 the token falling out of the window is decremented; HIST is a ring of
 *     hist_cap >= penalty_last_n entries indexed by n_seen % hist_cap);
 *  2. read the logits row (row T-1 with LT_SAMPLE_LOGITS_ALL_TOKENS, else row 0); NaN/Inf ->
 *     LT_ERR_NONFINITE and the step emits nothing (penalty_last_n > hist_cap: LT_ERR_ARGS);
 *     with LT_STEP_WANT_LOGITS, copy them to RING_LOGITS row step % logits_cap;
 *  3. penalties for tokens with count c > 0: l = l > 0 ? l / repetition : l * repetition, then
 *     l -= frequency * c + presence;
 *  4. temperature == 0: greedy argmax (lowest id on ties). Otherwise l *= (1 / temperature), then
 *     top-k, top-p, min-p (Hugging Face's order; candidates ordered by value desc, id asc), then
 *     draw u = lt_uniform(seed, step) and walk the kept candidates in ascending token id,
 *     picking the first whose cumulative probability exceeds u * total;
 *  5. logprob of the token under the distribution it was drawn from: greedy, the softmax of the
 *     penalized logits; sampled, its probability among the kept candidates (as
 *     lattice/sampling.py's reference sampler);
 *  6. write the token to RING_TOKENS[step % ring_cap], its logprob to RING_LOGPROBS,
 *     step.token = step.next_token = token, step.next_logprob, step.pos += T, step.n_tokens = 1,
 *     step.step += 1. */
#define LT_SAMPLE_LOGITS_ALL_TOKENS 1u
enum { LT_SAMPLE_B_LOGITS = 0,       /* f32 [T or 1, logits_stride] */
       LT_SAMPLE_B_PARTIALS = 1,     /* lt_argmax_partial [ceil(vocab / LT_ARGMAX_BLOCK)] or none */
       LT_SAMPLE_B_IDS = 2,          /* uint32 [T]: the step's input ids (as EMBED's) */
       LT_SAMPLE_B_COUNTS = 3,       /* uint32 [vocab] (STATE arena; zeroed by the host) */
       LT_SAMPLE_B_HIST = 4,         /* uint32 [hist_cap] (STATE arena) */
       LT_SAMPLE_B_RING_TOKENS = 5,  /* uint32 [ring_cap] (OUTPUT arena) */
       LT_SAMPLE_B_RING_LOGPROBS = 6,/* f32 [ring_cap] (OUTPUT arena) or none */
       LT_SAMPLE_B_WORK = 7,         /* scratch, 8 * vocab bytes */
       LT_SAMPLE_B_RING_LOGITS = 8   /* f32 [logits_cap][vocab] (OUTPUT arena) or none */ };
typedef struct lt_sample_args {
    lt_u32 vocab;
    lt_u32 logits_stride;  /* floats between token rows of LOGITS */
    lt_u32 flags;          /* LT_SAMPLE_* */
    lt_u32 hist_cap;       /* entries of HIST */
    lt_u32 logits_cap;     /* rows of RING_LOGITS */
    lt_u32 pad[3];
} lt_sample_args;

/* ---------------------------------------------------------------------------------------------
 * Step args: at offset 0 of the STEP arena. The host writes the inputs before a run; kernels
 * read them; the sampler writes its outputs and advances the step. */
#define LT_STEP_WANT_LOGITS 1u    /* SAMPLE copies the raw logits into RING_LOGITS */

typedef struct lt_step_args {
    lt_u32 pos;                /* position of this step's first token (= tokens in the cache) */
    lt_u32 token;              /* decode input token; SAMPLE writes the next one here */
    lt_u32 n_tokens;           /* T: tokens in this step (1 in decode); SAMPLE sets it to 1 */
    lt_u32 step;               /* SAMPLE calls so far: ring slot = step % ring_cap, RNG counter */
    lt_u32 ring_cap;           /* entries in the output token ring */
    lt_u32 flags;              /* LT_STEP_* */
    lt_u32 seed_lo;            /* RNG seed, low 32 bits */
    lt_u32 seed_hi;            /* RNG seed, high 32 bits */
    lt_f32 temperature;        /* 0: greedy */
    lt_u32 top_k;              /* 0: off */
    lt_f32 top_p;              /* 1: off */
    lt_f32 min_p;              /* 0: off */
    lt_f32 repetition_penalty; /* 1: off */
    lt_f32 presence_penalty;   /* 0: off */
    lt_f32 frequency_penalty;  /* 0: off */
    lt_u32 penalty_last_n;     /* penalty window in tokens; 0: every token pushed so far */
    lt_u32 n_seen;             /* tokens pushed into the penalty history so far */
    lt_u32 error;              /* LT_ERR_* raised by a kernel; the host clears it */
    lt_u32 next_token;         /* SAMPLE: the token it chose */
    lt_f32 next_logprob;       /* SAMPLE: its log-probability */
    lt_u32 pad[4];
} lt_step_args;

/* ---------------------------------------------------------------------------------------------
 * The sampler's random number: a counter-based hash, identical on every backend.
 * lt_mix32 is a 32-bit avalanche hash; u = top 24 bits of
 * mix(seed_lo ^ mix(counter ^ mix(seed_hi + 0x9E3779B9))) / 2^24, in [0, 1). */
LT_FN lt_u32 lt_mix32(lt_u32 x) {
    x ^= x >> 16;
    x *= 0x7feb352du;
    x ^= x >> 15;
    x *= 0x846ca68bu;
    x ^= x >> 16;
    return x;
}

LT_FN lt_f32 lt_uniform(lt_u32 seed_lo, lt_u32 seed_hi, lt_u32 counter) {
    lt_u32 r = lt_mix32(seed_lo ^ lt_mix32(counter ^ lt_mix32(seed_hi + 0x9E3779B9u)));
    return (lt_f32)(r >> 8) * (1.0f / 16777216.0f);
}

#endif /* LATTICE_SHARED_H */
