"""Llama family: `llama` (SmolLM2, Llama 3 with rope scaling), `qwen2` (q/k/v bias), `qwen3` (q/k norm).

Pre-norm decoder: x += attn(rms_norm(x)); x += mlp(rms_norm(x)); full NeoX RoPE; GQA; SwiGLU MLP.
`cfg.attention_bias` gives q/k/v a bias (and o_proj too, except in qwen2, whose o_proj never has
one); `cfg.qk_norm` adds a per-head RMSNorm on q and k before RoPE.
"""
from __future__ import annotations

from . import KVCache, rope_inv_freq


def _has_o_bias(cfg) -> bool:
    return cfg.attention_bias and cfg.model_type != "qwen2"


def expected_weights(cfg) -> dict:
    d, hd, f = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    q_dim, kv_dim = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, d), "model.norm.weight": (d,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, d)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (d,),
            p + "post_attention_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (q_dim, d),
            p + "self_attn.k_proj.weight": (kv_dim, d),
            p + "self_attn.v_proj.weight": (kv_dim, d),
            p + "self_attn.o_proj.weight": (d, q_dim),
            p + "mlp.gate_proj.weight": (f, d),
            p + "mlp.up_proj.weight": (f, d),
            p + "mlp.down_proj.weight": (d, f),
        })
        if cfg.attention_bias:
            shapes.update({p + "self_attn.q_proj.bias": (q_dim,),
                           p + "self_attn.k_proj.bias": (kv_dim,),
                           p + "self_attn.v_proj.bias": (kv_dim,)})
        if _has_o_bias(cfg):
            shapes[p + "self_attn.o_proj.bias"] = (d,)
        if cfg.qk_norm:
            shapes.update({p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,)})
    return shapes


def state_shapes(cfg) -> list:
    return [KVCache(cfg.num_key_value_heads * cfg.head_dim)] * cfg.num_hidden_layers


def attention_block(ops, cfg, weights, layer, x, inv_freq):
    p = f"model.layers.{layer}.self_attn."
    n_heads, n_kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    bias = (lambda name: weights[p + name + ".bias"]) if cfg.attention_bias else (lambda name: None)
    q = ops.linear(x, weights[p + "q_proj.weight"], bias("q_proj"))
    k = ops.linear(x, weights[p + "k_proj.weight"], bias("k_proj"))
    v = ops.linear(x, weights[p + "v_proj.weight"], bias("v_proj"))
    if cfg.qk_norm:
        q = ops.head_rms_norm(q, weights[p + "q_norm.weight"], n_heads, cfg.rms_norm_eps, False)
        k = ops.head_rms_norm(k, weights[p + "k_norm.weight"], n_kv, cfg.rms_norm_eps, False)
    q = ops.rope(q, n_heads, hd, cfg.rotary_dim, inv_freq)
    k = ops.rope(k, n_kv, hd, cfg.rotary_dim, inv_freq)
    o = ops.attention(q, k, v, layer, n_heads, n_kv, hd, hd ** -0.5)
    return ops.linear(o, weights[p + "o_proj.weight"],
                      weights[p + "o_proj.bias"] if _has_o_bias(cfg) else None)


def mlp_block(ops, weights, layer, x):
    p = f"model.layers.{layer}.mlp."
    h = ops.silu_mul(ops.linear(x, weights[p + "gate_proj.weight"]), ops.linear(x, weights[p + "up_proj.weight"]))
    return ops.linear(h, weights[p + "down_proj.weight"])


def forward(ops, cfg, weights, ids):
    inv_freq = rope_inv_freq(cfg)
    eps = cfg.rms_norm_eps
    x = ops.embed(weights["model.embed_tokens.weight"], ids)
    for layer in range(cfg.num_hidden_layers):
        p = f"model.layers.{layer}."
        h = ops.rms_norm(x, weights[p + "input_layernorm.weight"], eps, False)
        x = ops.add(x, attention_block(ops, cfg, weights, layer, h, inv_freq))
        h = ops.rms_norm(x, weights[p + "post_attention_layernorm.weight"], eps, False)
        x = ops.add(x, mlp_block(ops, weights, layer, h))
    x = ops.rms_norm(x, weights["model.norm.weight"], eps, False)
    head = weights["model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"]
    return ops.lm_head(x, head)
