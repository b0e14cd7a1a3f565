"""Model families, and the ops contract they are written against.

A family module (`llama`, `qwen3_5`) describes one forward step as calls on an `ops` object; the
numpy reference (`lattice.reference.NumpyOps`) executes them, the program builder records them.
Family modules expose:

- `expected_weights(cfg) -> {name: shape}`: canonical Hugging Face names, Linear weights [out, in],
  `lm_head.weight` absent when tied;
- `forward(ops, cfg, weights, ids) -> logits [T, vocab]`: the whole model for one step of T tokens;
- `state_shapes(cfg) -> [KVCache | DeltaNetState, ...]`: one entry per layer.

The ops contract. Activations are opaque [T, features] values; model code never reshapes, indexes
or does numpy math on them, and has no control flow that depends on them. Weights are Tensors
(`.shape`, `.to_f32()`) passed through unchanged. Per-sequence state and token positions belong to
the executor and are addressed by `layer`:

    x = ops.embed(table, ids)                           # ids: the step's tokens -> [T, D]
    y = ops.rms_norm(x, w, eps, add_one)                # normalize whole row; add_one: weight is (1+w)
    y = ops.head_rms_norm(x, w, n_heads, eps, add_one)  # x [T, n_heads*d]; w [d]; per-head RMSNorm
    y = ops.linear(x, w, bias=None)                     # x [T, K] @ w[N, K]^T (+ bias[N]) -> [T, N]
    y = ops.add(a, b)
    y = ops.silu_mul(gate, up)                          # silu(gate) * up
    y = ops.sigmoid_mul(x, gate)                        # x * sigmoid(gate)
    a, b, ... = ops.split(x, sizes)                     # split features into consecutive parts
    q, g = ops.split_heads(x, n_heads, sizes)           # x laid out per head as [part0 | part1 | ...]
                                                        # -> [T, n_heads*sizes[i]] per part
    y = ops.rope(x, n_heads, head_dim, rotary_dim, inv_freq)
            # NeoX pairs (i, i + rotary_dim/2) over the first rotary_dim dims of each head;
            # angle = position * inv_freq[i]; positions are the step's (start_pos .. start_pos+T-1)
    y = ops.attention(q, k, v, layer, n_heads, n_kv_heads, head_dim, scale)
            # appends k, v [T, n_kv_heads*head_dim] to the layer's KV cache at the step's positions,
            # then causal GQA attention over the whole cache -> [T, n_heads*head_dim]
            # (query head h uses kv head h // (n_heads // n_kv_heads))
    y = ops.conv1d_silu(x, w, layer)                    # depthwise causal conv over time, kernel K;
            # w is HF's [C, 1, K] (kernels read it as [C, K]); uses/updates the layer's conv state
            # (last K-1 inputs), then SiLU -> [T, C]
    y = ops.gated_delta_rule(q, k, v, a, b, A_log, dt_bias, layer, n_k_heads, n_v_heads, k_dim, v_dim)
            # Qwen3.5 Gated DeltaNet with the layer's f32 state [n_v_heads, k_dim, v_dim]:
            # q, k l2-normalized per head (eps 1e-6), q *= k_dim**-0.5; beta = sigmoid(b);
            # g = -exp(A_log) * softplus(a + dt_bias); value head h uses key head h // (Hv/Hk);
            # per token: S *= exp(g); S += k (x) ((v - S^T k) * beta); o = S^T q -> [T, Hv*v_dim]
    y = ops.gated_rms_norm(x, z, w, n_heads, eps)       # per-head RMSNorm(x) * w * silu(z) (plain w)
    logits = ops.lm_head(x, w)                          # final projection -> [T, vocab]

(Refinement of the written contract: the conv weight travels in HF's [C, 1, K] shape like every
other weight — model code cannot squeeze it — and kernels read it as [C, K].)
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError, MissingTensorError, TensorShapeError, UnsupportedModelError


@dataclass(frozen=True)
class KVCache:
    """An attention layer's state: `width` = n_kv_heads * head_dim floats of K and of V per position."""
    width: int


@dataclass(frozen=True)
class DeltaNetState:
    """A Gated DeltaNet layer's state: conv state [K-1, C] and float32 recurrent state [Hv, Dk, Dv]."""
    conv: tuple
    recurrent: tuple


# model_type -> family module (imported on first use)
FAMILIES = {
    "llama": "llama",
    "qwen2": "llama",
    "qwen3": "llama",
    "qwen3_5": "qwen3_5",
    "qwen3_5_text": "qwen3_5",
}


def family_for(model_type: str):
    """The family module implementing `model_type`."""
    name = FAMILIES.get(model_type)
    if name is None:
        raise UnsupportedModelError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(sorted(FAMILIES))}")
    return importlib.import_module(f"{__name__}.{name}")


def check_weights(ckpt):
    """Raise MissingTensorError / TensorShapeError unless `ckpt.tensors` holds every tensor the
    architecture needs with the shape the config implies. Extra tensors are ignored."""
    expected = family_for(ckpt.config.model_type).expected_weights(ckpt.config)
    path = getattr(ckpt, "path", None)
    for name, shape in expected.items():
        if name not in ckpt.tensors:
            raise MissingTensorError(
                f"missing tensor {name!r} (expected shape {list(shape)}) for model_type "
                f"{ckpt.config.model_type!r}", path)
        tensor = ckpt.tensors[name]
        actual = tuple(int(d) for d in tensor.shape)
        if actual != tuple(shape):
            raise TensorShapeError(
                f"tensor {name!r} has shape {list(actual)}, expected {list(shape)} from the config",
                getattr(tensor, "path", None) or path)


def rope_inv_freq(cfg) -> np.ndarray:
    """RoPE inverse frequencies [rotary_dim/2] (float32) from the config, with its rope scaling:
    none/"default", "linear" (all frequencies / factor), "llama3" (Llama 3.1 wavelength bands) or
    "freq_factors" (frequency i / factors[i]: a GGUF's rope_freqs.weight taken as it is)."""
    dim = cfg.rotary_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))

    def param(key):
        if key not in scaling:
            raise ConfigError(f"rope_scaling of type {kind!r} needs {key!r}; got {scaling}")
        return float(scaling[key])

    if kind == "default":
        pass
    elif kind == "linear":
        inv_freq = inv_freq / param("factor")
    elif kind == "freq_factors":
        factors = np.asarray(scaling.get("factors", ()), np.float64)
        if factors.shape != inv_freq.shape or not (factors > 0).all():
            raise ConfigError(f"rope_scaling 'freq_factors' needs {len(inv_freq)} positive factors; "
                              f"got {factors.shape[0] if factors.ndim else 0}")
        inv_freq = inv_freq / factors
    elif kind == "llama3":
        factor, low, high = param("factor"), param("low_freq_factor"), param("high_freq_factor")
        original = param("original_max_position_embeddings")
        wavelen = 2 * np.pi / inv_freq
        # long wavelengths are slowed by `factor`, short ones kept, the band between interpolated
        smooth = (original / wavelen - low) / (high - low)
        interpolated = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = np.where(wavelen > original / low, inv_freq / factor,
                            np.where(wavelen < original / high, inv_freq, interpolated))
    else:
        raise UnsupportedModelError(
            f"unsupported rope_scaling type {kind!r}; supported: default, linear, llama3, "
            "freq_factors")
    return inv_freq.astype(np.float32)
