"""Qwen3.5 text model: hybrid Gated DeltaNet ("linear_attention") and gated full-attention layers.

Layer i is `cfg.layer_types[i]`. Every layer: x += mixer(norm(x)); x += mlp(norm(x)), SwiGLU MLP.
- Full attention: q_proj emits per head [q | gate] (`cfg.attn_output_gate`), per-head q/k RMSNorm,
  partial NeoX RoPE (first `cfg.rotary_dim` dims of each head), GQA, output * sigmoid(gate).
- Gated DeltaNet: in_proj_qkv -> depthwise causal conv + SiLU -> split q | k | v; z, b, a
  projections; the gated delta rule over an f32 state (value head h uses key head h // (Hv/Hk));
  per-head RMSNorm(o) * w * silu(z) with a plain `w`; out_proj.
- RMSNorm weights are used as (1 + w) (`cfg.norm_add_one`) everywhere except the GDN output norm.
"""
from __future__ import annotations

from . import DeltaNetState, KVCache, rope_inv_freq
from .llama import mlp_block


def _deltanet_dims(cfg):
    key_dim = cfg.linear_num_key_heads * cfg.linear_key_head_dim
    value_dim = cfg.linear_num_value_heads * cfg.linear_value_head_dim
    return key_dim, value_dim, 2 * key_dim + value_dim


def expected_weights(cfg) -> dict:
    d, hd, f = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    q_dim, kv_dim = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    key_dim, value_dim, conv_dim = _deltanet_dims(cfg)
    n_v = cfg.linear_num_value_heads
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, d), "model.norm.weight": (d,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, d)
    for i, kind in enumerate(cfg.layer_types):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (d,),
            p + "post_attention_layernorm.weight": (d,),
            p + "mlp.gate_proj.weight": (f, d),
            p + "mlp.up_proj.weight": (f, d),
            p + "mlp.down_proj.weight": (d, f),
        })
        if kind == "linear_attention":
            a = p + "linear_attn."
            shapes.update({
                a + "in_proj_qkv.weight": (conv_dim, d),
                a + "in_proj_z.weight": (value_dim, d),
                a + "in_proj_b.weight": (n_v, d),
                a + "in_proj_a.weight": (n_v, d),
                a + "conv1d.weight": (conv_dim, 1, cfg.linear_conv_kernel_dim),
                a + "dt_bias": (n_v,),
                a + "A_log": (n_v,),
                a + "norm.weight": (cfg.linear_value_head_dim,),
                a + "out_proj.weight": (d, value_dim),
            })
        else:
            a = p + "self_attn."
            shapes.update({
                a + "q_proj.weight": (q_dim * (2 if cfg.attn_output_gate else 1), d),
                a + "k_proj.weight": (kv_dim, d),
                a + "v_proj.weight": (kv_dim, d),
                a + "o_proj.weight": (d, q_dim),
            })
            if cfg.qk_norm:
                shapes.update({a + "q_norm.weight": (hd,), a + "k_norm.weight": (hd,)})
            if cfg.attention_bias:
                shapes.update({a + "q_proj.bias": (shapes[a + "q_proj.weight"][0],), a + "k_proj.bias": (kv_dim,),
                               a + "v_proj.bias": (kv_dim,), a + "o_proj.bias": (d,)})
    return shapes


def state_shapes(cfg) -> list:
    _, _, conv_dim = _deltanet_dims(cfg)
    deltanet = DeltaNetState(conv=(cfg.linear_conv_kernel_dim - 1, conv_dim),
                             recurrent=(cfg.linear_num_value_heads, cfg.linear_key_head_dim,
                                        cfg.linear_value_head_dim))
    attention = KVCache(cfg.num_key_value_heads * cfg.head_dim)
    return [deltanet if kind == "linear_attention" else attention for kind in cfg.layer_types]


def gated_attention(ops, cfg, weights, layer, x, inv_freq):
    p = f"model.layers.{layer}.self_attn."
    n_heads, n_kv, hd, eps = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.rms_norm_eps
    bias = (lambda name: weights[p + name + ".bias"]) if cfg.attention_bias else (lambda name: None)
    q = ops.linear(x, weights[p + "q_proj.weight"], bias("q_proj"))
    if cfg.attn_output_gate:
        q, gate = ops.split_heads(q, n_heads, [hd, hd])
    k = ops.linear(x, weights[p + "k_proj.weight"], bias("k_proj"))
    v = ops.linear(x, weights[p + "v_proj.weight"], bias("v_proj"))
    if cfg.qk_norm:
        q = ops.head_rms_norm(q, weights[p + "q_norm.weight"], n_heads, eps, cfg.norm_add_one)
        k = ops.head_rms_norm(k, weights[p + "k_norm.weight"], n_kv, eps, cfg.norm_add_one)
    q = ops.rope(q, n_heads, hd, cfg.rotary_dim, inv_freq)
    k = ops.rope(k, n_kv, hd, cfg.rotary_dim, inv_freq)
    o = ops.attention(q, k, v, layer, n_heads, n_kv, hd, hd ** -0.5)
    if cfg.attn_output_gate:
        o = ops.sigmoid_mul(o, gate)
    return ops.linear(o, weights[p + "o_proj.weight"], bias("o_proj"))


def gated_deltanet(ops, cfg, weights, layer, x):
    p = f"model.layers.{layer}.linear_attn."
    n_k, n_v = cfg.linear_num_key_heads, cfg.linear_num_value_heads
    k_dim, v_dim = cfg.linear_key_head_dim, cfg.linear_value_head_dim
    key_dim, value_dim, _ = _deltanet_dims(cfg)
    qkv = ops.conv1d_silu(ops.linear(x, weights[p + "in_proj_qkv.weight"]), weights[p + "conv1d.weight"], layer)
    q, k, v = ops.split(qkv, [key_dim, key_dim, value_dim])
    z = ops.linear(x, weights[p + "in_proj_z.weight"])
    b = ops.linear(x, weights[p + "in_proj_b.weight"])
    a = ops.linear(x, weights[p + "in_proj_a.weight"])
    o = ops.gated_delta_rule(q, k, v, a, b, weights[p + "A_log"], weights[p + "dt_bias"], layer,
                             n_k, n_v, k_dim, v_dim)
    o = ops.gated_rms_norm(o, z, weights[p + "norm.weight"], n_v, cfg.rms_norm_eps)
    return ops.linear(o, weights[p + "out_proj.weight"])


def forward(ops, cfg, weights, ids):
    inv_freq = rope_inv_freq(cfg)
    eps, add_one = cfg.rms_norm_eps, cfg.norm_add_one
    x = ops.embed(weights["model.embed_tokens.weight"], ids)
    for layer, kind in enumerate(cfg.layer_types):
        p = f"model.layers.{layer}."
        h = ops.rms_norm(x, weights[p + "input_layernorm.weight"], eps, add_one)
        if kind == "linear_attention":
            h = gated_deltanet(ops, cfg, weights, layer, h)
        else:
            h = gated_attention(ops, cfg, weights, layer, h, inv_freq)
        x = ops.add(x, h)
        h = ops.rms_norm(x, weights[p + "post_attention_layernorm.weight"], eps, add_one)
        x = ops.add(x, mlp_block(ops, weights, layer, h))
    x = ops.rms_norm(x, weights["model.norm.weight"], eps, add_one)
    head = weights["model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"]
    return ops.lm_head(x, head)
