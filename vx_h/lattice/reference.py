"""The numpy reference: the meaning of every kernel, and an eager decoder built on them (the oracle).

Kernels are small pure functions on float32 arrays, named after the ops of the ops contract
(`/work/notes/OPS_CONTRACT.md`, restated in `lattice.models`). Activations are [T, features];
stateful kernels take their state and return the updated state instead of mutating it:

    embed(table, ids)                                   -> [T, D]
    rms_norm(x, w, eps, add_one)                        -> x / rms(x) * (1 + w if add_one else w)
    head_rms_norm(x, w, n_heads, eps, add_one)          -> the same per head of x [T, n_heads*d], w [d]
    linear(x, w, bias=None)                             -> x @ w.T (+ bias)
    add(a, b), silu_mul(gate, up), sigmoid_mul(x, gate)
    split(x, sizes), split_heads(x, n_heads, sizes)     -> tuples of [T, ...]
    rope(x, positions, n_heads, head_dim, rotary_dim, inv_freq)
    attention(q, k_cache, v_cache, start_pos, n_heads, n_kv_heads, head_dim, scale)
    conv1d_silu(x, w, conv_state)                       -> (y, new_conv_state)
    gated_delta_rule(q, k, v, a, b, A_log, dt_bias, state, n_k_heads, n_v_heads, k_dim, v_dim)
                                                        -> (o, new_state)
    gated_rms_norm(x, z, w, n_heads, eps)
    lm_head(x, w)                                       -> [T, vocab]

Everything is computed in float32 (BLAS sgemm for products); norms, softmax and the recurrent state
stay float32; RoPE angles are computed in float64 before cos/sin, so the rotation is exact to f32.

`NumpyOps` is the `ops` object the model family files call: it binds the stateful kernels to a
`SequenceState` (per-layer KV cache, conv state and recurrent state, all float32, plus the position
of the next token) and converts weight tensors to float32 once. A symbolic builder mirrors its
method signatures. `ReferenceDecoder` runs a checkpoint with it: batched prefill and cached decode.
"""
from __future__ import annotations

import numpy as np

from .errors import ContextLengthError, TokenizerError
from .models import DeltaNetState, KVCache, check_weights, family_for

F32 = np.float32


def _sigmoid(x):
    with np.errstate(over="ignore"):
        return (1.0 / (1.0 + np.exp(-x))).astype(F32)


def _silu(x):
    return (x * _sigmoid(x)).astype(F32)


def _softplus(x):
    # torch's softplus (beta 1, threshold 20): linear above 20 so exp never overflows
    with np.errstate(over="ignore"):
        return np.where(x > 20.0, x, np.log1p(np.exp(np.minimum(x, 20.0)))).astype(F32)


def _rms_normalize(x, eps):
    """x / sqrt(mean(x^2, last axis) + eps), float32."""
    x = x.astype(F32, copy=False)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + F32(eps))


# ---------------------------------------------------------------------------------------------- kernels

def embed(table, ids):
    return np.asarray(table, dtype=F32)[np.asarray(ids, dtype=np.int64)]


def rms_norm(x, w, eps, add_one):
    w = np.asarray(w, dtype=F32)
    return (_rms_normalize(x, eps) * (1.0 + w if add_one else w)).astype(F32)


def head_rms_norm(x, w, n_heads, eps, add_one):
    t = x.shape[0]
    y = rms_norm(x.reshape(t, n_heads, -1), w, eps, add_one)
    return y.reshape(t, -1)


def linear(x, w, bias=None):
    y = x.astype(F32, copy=False) @ np.asarray(w, dtype=F32).T
    return y if bias is None else (y + np.asarray(bias, dtype=F32)).astype(F32)


def add(a, b):
    return (a + b).astype(F32)


def silu_mul(gate, up):
    return (_silu(gate) * up).astype(F32)


def sigmoid_mul(x, gate):
    return (x * _sigmoid(gate)).astype(F32)


def split(x, sizes):
    if sum(sizes) != x.shape[1]:
        raise ValueError(f"split sizes {list(sizes)} do not add up to {x.shape[1]} features")
    return tuple(np.split(x, np.cumsum(sizes)[:-1], axis=1))


def split_heads(x, n_heads, sizes):
    t = x.shape[0]
    per_head = x.reshape(t, n_heads, sum(sizes))
    bounds = np.cumsum(sizes)[:-1]
    return tuple(np.ascontiguousarray(p).reshape(t, -1) for p in np.split(per_head, bounds, axis=2))


def rope(x, positions, n_heads, head_dim, rotary_dim, inv_freq):
    """NeoX rotation of pairs (i, i + rotary_dim/2) over the first rotary_dim dims of each head."""
    t = x.shape[0]
    half = rotary_dim // 2
    angles = np.asarray(positions, dtype=np.float64)[:, None] * np.asarray(inv_freq, dtype=F32)[None, :]
    cos = np.cos(angles).astype(F32)[:, None, :]
    sin = np.sin(angles).astype(F32)[:, None, :]
    heads = x.reshape(t, n_heads, head_dim)
    x1, x2 = heads[..., :half], heads[..., half:rotary_dim]
    out = heads.copy()
    out[..., :half] = x1 * cos - x2 * sin
    out[..., half:rotary_dim] = x2 * cos + x1 * sin
    return out.reshape(t, n_heads * head_dim)


def attention(q, k_cache, v_cache, start_pos, n_heads, n_kv_heads, head_dim, scale):
    """Causal GQA attention of the T queries at positions start_pos.. over cache positions 0..S-1.

    k_cache, v_cache: [S, n_kv_heads*head_dim] with S = start_pos + T. Query head h reads kv head
    h // (n_heads // n_kv_heads)."""
    t, s = q.shape[0], k_cache.shape[0]
    group = n_heads // n_kv_heads
    qh = q.reshape(t, n_heads, head_dim).transpose(1, 0, 2)                                # [H, T, d]
    kh = np.repeat(k_cache.reshape(s, n_kv_heads, head_dim).transpose(1, 0, 2), group, axis=0)
    vh = np.repeat(v_cache.reshape(s, n_kv_heads, head_dim).transpose(1, 0, 2), group, axis=0)
    scores = (qh @ kh.transpose(0, 2, 1)) * F32(scale)                                     # [H, T, S]
    visible = np.arange(s)[None, :] <= (start_pos + np.arange(t))[:, None]                 # [T, S]
    scores = np.where(visible[None], scores, -np.inf)
    scores = scores - scores.max(axis=-1, keepdims=True)
    probs = np.exp(scores)
    probs /= probs.sum(axis=-1, keepdims=True)
    out = probs.astype(F32) @ vh                                                           # [H, T, d]
    return np.ascontiguousarray(out.transpose(1, 0, 2)).reshape(t, n_heads * head_dim).astype(F32)


def conv1d_silu(x, w, conv_state):
    """Depthwise causal conv over time then SiLU. x [T, C]; w [C, K] (or HF's [C, 1, K]);
    conv_state [K-1, C] holds the inputs before this step. Returns (y [T, C], new_state)."""
    c = x.shape[1]
    w = np.asarray(w, dtype=F32).reshape(c, -1)
    k = w.shape[1]
    padded = np.concatenate([conv_state, x], axis=0)                                       # [K-1+T, C]
    t = x.shape[0]
    y = np.zeros((t, c), dtype=F32)
    for j in range(k):
        y += padded[j:j + t] * w[:, j]
    return _silu(y), padded[t:].copy()


def gated_delta_rule(q, k, v, a, b, A_log, dt_bias, state, n_k_heads, n_v_heads, k_dim, v_dim):
    """Qwen3.5 Gated DeltaNet, token by token. q, k [T, Hk*Dk]; v [T, Hv*Dv]; a, b [T, Hv];
    state [Hv, Dk, Dv] (float32). Value head h uses key head h // (Hv/Hk). Returns (o [T, Hv*Dv], state)."""
    t = q.shape[0]
    group = n_v_heads // n_k_heads
    qh = np.repeat(q.reshape(t, n_k_heads, k_dim), group, axis=1)                          # [T, Hv, Dk]
    kh = np.repeat(k.reshape(t, n_k_heads, k_dim), group, axis=1)
    qh = qh / np.sqrt(np.sum(qh * qh, axis=-1, keepdims=True) + F32(1e-6))
    kh = kh / np.sqrt(np.sum(kh * kh, axis=-1, keepdims=True) + F32(1e-6))
    qh = (qh * F32(k_dim ** -0.5)).astype(F32)
    kh = kh.astype(F32)
    vh = v.reshape(t, n_v_heads, v_dim)
    beta = _sigmoid(b)                                                                     # [T, Hv]
    g = -np.exp(np.asarray(A_log, dtype=F32)) * _softplus(a + np.asarray(dt_bias, dtype=F32))
    decay = np.exp(g).astype(F32)
    s = np.array(state, dtype=F32)
    out = np.empty((t, n_v_heads, v_dim), dtype=F32)
    for i in range(t):
        s *= decay[i][:, None, None]
        remembered = np.einsum("hkv,hk->hv", s, kh[i])
        delta = (vh[i] - remembered) * beta[i][:, None]
        s += kh[i][:, :, None] * delta[:, None, :]
        out[i] = np.einsum("hkv,hk->hv", s, qh[i])
    return out.reshape(t, n_v_heads * v_dim), s


def gated_rms_norm(x, z, w, n_heads, eps):
    """Per-head RMSNorm(x) * w * silu(z) (plain w: the Gated DeltaNet output norm)."""
    t = x.shape[0]
    y = _rms_normalize(x.reshape(t, n_heads, -1), eps) * np.asarray(w, dtype=F32)
    return (y * _silu(z.reshape(t, n_heads, -1))).reshape(t, -1).astype(F32)


def lm_head(x, w):
    return linear(x, w)


# ---------------------------------------------------------------------------------------------- executor

class SequenceState:
    """One sequence's mutable state: per-layer float32 KV cache / conv state / recurrent state and
    the position of the next token."""

    def __init__(self, layer_states):
        self.layer_states = list(layer_states)
        self.reset()

    def reset(self):
        self.position = 0
        self.keys, self.values, self.conv, self.recurrent = {}, {}, {}, {}
        for layer, spec in enumerate(self.layer_states):
            if isinstance(spec, KVCache):
                self.keys[layer] = np.zeros((0, spec.width), dtype=F32)
                self.values[layer] = np.zeros((0, spec.width), dtype=F32)
            elif isinstance(spec, DeltaNetState):
                self.conv[layer] = np.zeros(spec.conv, dtype=F32)
                self.recurrent[layer] = np.zeros(spec.recurrent, dtype=F32)
            else:
                raise TypeError(f"layer {layer}: unknown state spec {spec!r}")


class NumpyOps:
    """The ops contract executed eagerly with the kernels above.

    The executor sets `start_pos` (position of the step's first token) before each forward; the
    stateful ops read and update `state` for the layer they are given. Weights may be Tensor
    objects (anything with `.to_f32()`) or arrays; Tensors are converted once and kept."""

    def __init__(self, state: SequenceState):
        self.state = state
        self.start_pos = 0
        self._f32 = {}   # id(tensor) -> (tensor, float32 array); the tensor is kept so its id stays unique

    def weight(self, w):
        if w is None or isinstance(w, np.ndarray):
            return w
        hit = self._f32.get(id(w))
        if hit is None:
            hit = self._f32[id(w)] = (w, np.ascontiguousarray(w.to_f32(), dtype=F32))
        return hit[1]

    def _positions(self, t):
        return np.arange(self.start_pos, self.start_pos + t)

    def embed(self, table, ids):
        return embed(self.weight(table), ids)

    def rms_norm(self, x, w, eps, add_one):
        return rms_norm(x, self.weight(w), eps, add_one)

    def head_rms_norm(self, x, w, n_heads, eps, add_one):
        return head_rms_norm(x, self.weight(w), n_heads, eps, add_one)

    def linear(self, x, w, bias=None):
        return linear(x, self.weight(w), self.weight(bias))

    def add(self, a, b):
        return add(a, b)

    def silu_mul(self, gate, up):
        return silu_mul(gate, up)

    def sigmoid_mul(self, x, gate):
        return sigmoid_mul(x, gate)

    def split(self, x, sizes):
        return split(x, sizes)

    def split_heads(self, x, n_heads, sizes):
        return split_heads(x, n_heads, sizes)

    def rope(self, x, n_heads, head_dim, rotary_dim, inv_freq):
        return rope(x, self._positions(x.shape[0]), n_heads, head_dim, rotary_dim, inv_freq)

    def attention(self, q, k, v, layer, n_heads, n_kv_heads, head_dim, scale):
        st = self.state
        cached = st.keys[layer].shape[0]
        if cached != self.start_pos:
            raise RuntimeError(f"layer {layer}: KV cache holds {cached} positions, step starts at {self.start_pos}")
        st.keys[layer] = np.concatenate([st.keys[layer], k.astype(F32)])
        st.values[layer] = np.concatenate([st.values[layer], v.astype(F32)])
        return attention(q, st.keys[layer], st.values[layer], self.start_pos, n_heads, n_kv_heads,
                         head_dim, scale)

    def conv1d_silu(self, x, w, layer):
        y, self.state.conv[layer] = conv1d_silu(x, self.weight(w), self.state.conv[layer])
        return y

    def gated_delta_rule(self, q, k, v, a, b, A_log, dt_bias, layer, n_k_heads, n_v_heads, k_dim, v_dim):
        o, self.state.recurrent[layer] = gated_delta_rule(
            q, k, v, a, b, self.weight(A_log), self.weight(dt_bias), self.state.recurrent[layer],
            n_k_heads, n_v_heads, k_dim, v_dim)
        return o

    def gated_rms_norm(self, x, z, w, n_heads, eps):
        return gated_rms_norm(x, z, self.weight(w), n_heads, eps)

    def lm_head(self, x, w):
        return lm_head(x, self.weight(w))


class ReferenceDecoder:
    """Eager float32 decoder for one sequence: `prefill(ids) -> logits [T, V]` (batched, continues
    from the current position), `step(id) -> logits [V]` (cached single-token decode), `reset()`.

    `context` caps the number of positions (default: the config's max_position_embeddings)."""

    def __init__(self, ckpt, context: int | None = None):
        self.config = ckpt.config
        self.family = family_for(self.config.model_type)
        check_weights(ckpt)
        self.weights = ckpt.tensors
        self.context = int(context or self.config.max_position_embeddings)
        self.state = SequenceState(self.family.state_shapes(self.config))
        self.ops = NumpyOps(self.state)

    @property
    def position(self) -> int:
        return self.state.position

    def reset(self):
        self.state.reset()

    def prefill(self, ids) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            raise TokenizerError("prefill needs at least one token id")
        vocab = self.config.vocab_size
        bad = ids[(ids < 0) | (ids >= vocab)]
        if bad.size:
            raise TokenizerError(f"token id {int(bad[0])} is out of range for vocab_size {vocab}")
        if self.position + ids.size > self.context:
            raise ContextLengthError(
                f"{ids.size} tokens at position {self.position} do not fit the context of {self.context}")
        self.ops.start_pos = self.position
        logits = self.family.forward(self.ops, self.config, self.weights, ids)
        self.state.position += ids.size
        return logits

    def step(self, token: int) -> np.ndarray:
        return self.prefill([token])[0]

    def greedy(self, prompt_ids, n_tokens: int):
        """Prefill the prompt, then n_tokens greedy steps. Returns (tokens, logits [n_tokens, V]),
        logits[i] being the distribution tokens[i] was taken from."""
        logits = self.prefill(prompt_ids)[-1]
        tokens, steps = [], []
        for i in range(n_tokens):
            steps.append(logits)
            tokens.append(int(np.argmax(logits)))
            if i + 1 < n_tokens:
                logits = self.step(tokens[-1])
        return tokens, np.stack(steps)
