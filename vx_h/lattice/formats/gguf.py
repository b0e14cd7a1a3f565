"""GGUF files -> Checkpoint with canonical Hugging Face names, shapes, row order and values.

llama.cpp's converter changes more than names; we undo each change so that a GGUF checkpoint is
indistinguishable from the Hugging Face one it came from (checked against fixtures converted with
llama.cpp's own `convert_hf_to_gguf.py`):
- shapes: GGUF lists dimensions fastest-varying first; numpy/HF order is the reverse.
- llama: q_proj/k_proj rows are permuted per head from HF's NeoX halves to interleaved pairs
  (`LlamaModel.permute`). A row permutation keeps quantized blocks intact, so we permute rows of
  the native data.
- qwen35: `+1` is folded into every RMSNorm weight except the Gated DeltaNet output norm
  (`ssm_norm`); `A_log` is stored as `ssm_a = -exp(A_log)`; `dt_bias` is named `ssm_dt.bias`;
  conv1d [C, 1, K] is squeezed to [C, K]; with more value heads than key heads, value heads are
  reordered from grouped (HF: kv-head major) to tiled (value-in-group major) in the rows of
  in_proj_qkv (v part), in_proj_z, in_proj_a/b, A_log, dt_bias, conv1d (v channels) and in the
  COLUMNS of out_proj. A column permutation splits quantized blocks: such a tensor is dequantized
  and presented as f32 (only models with grouped value heads, e.g. not Qwen3.5-0.8B).

Metadata: ModelConfig.eos_token_id collects the eos, eot and eom ids (GGUF has one of each, HF a
list of stop ids); float values stored as f32 are rounded back to their shortest decimal.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..config import ModelConfig
from ..errors import ConfigError, ModelFormatError, UnsupportedModelError
from .checkpoint import Checkpoint, check_against_config
from .filemap import FileMap
from .gguf_header import GGUFTensorInfo, parse_gguf_header
from .hf_config import check_layer_count
from .tensor import Tensor

# ggml type number -> (Lattice dtype, numpy storage dtype, block elements, block bytes)
GGUF_TYPES = {
    0: ("f32", np.float32, 1, 4), 1: ("f16", np.float16, 1, 2), 30: ("bf16", np.uint16, 1, 2),
    8: ("q8_0", np.uint8, 32, 34), 2: ("q4_0", np.uint8, 32, 18), 3: ("q4_1", np.uint8, 32, 20),
    6: ("q5_0", np.uint8, 32, 22), 12: ("q4_k", np.uint8, 256, 144), 14: ("q6_k", np.uint8, 256, 210),
}
SUPPORTED_ARCHS = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "qwen35": "qwen3_5"}

GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
                "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
QWEN35_LAYER_NAMES = {
    "attn_qkv.weight": "linear_attn.in_proj_qkv.weight",
    "attn_gate.weight": "linear_attn.in_proj_z.weight",
    "ssm_beta.weight": "linear_attn.in_proj_b.weight",
    "ssm_alpha.weight": "linear_attn.in_proj_a.weight",
    "ssm_a": "linear_attn.A_log",
    "ssm_dt.bias": "linear_attn.dt_bias",
    "ssm_conv1d.weight": "linear_attn.conv1d.weight",
    "ssm_norm.weight": "linear_attn.norm.weight",
    "ssm_out.weight": "linear_attn.out_proj.weight",
}
# qwen35 norms that carry the folded +1 (every "*norm.weight" except ssm_norm, as the converter does)
QWEN35_PLUS_ONE = ("attn_norm.weight", "post_attention_norm.weight", "attn_q_norm.weight",
                   "attn_k_norm.weight", "output_norm.weight")
_LAYER_RE = re.compile(r"blk\.(\d+)\.(.+)")


def open_gguf(path) -> Checkpoint:
    path = Path(path)
    header = parse_gguf_header(path)
    meta = header.metadata
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise UnsupportedModelError(f"{path}: unsupported GGUF architecture {arch!r} "
                                    f"(supported: {', '.join(SUPPORTED_ARCHS)})")
    infos = {t.name: t for t in header.tensors}
    fmap = FileMap(path)
    rope_freqs = infos.pop("rope_freqs.weight", None)
    config = config_from_gguf(meta, infos, path)
    if rope_freqs is not None:
        factors = _make_tensor(rope_freqs, "rope_freqs", arch, config, header, fmap).to_f32()
        config.rope_scaling = llama3_scaling_from_factors(factors, config, path)
    tensors = {}
    for info in infos.values():
        hf_name = _hf_name(arch, info.name, path)
        tensors[hf_name] = _make_tensor(info, hf_name, arch, config, header, fmap)
    check_against_config(config, tensors, path)
    return Checkpoint(path, "gguf", config, tensors, folder=None, metadata=meta)


def _hf_name(arch, name, path):
    if name in GLOBAL_NAMES:
        return GLOBAL_NAMES[name]
    m = _LAYER_RE.fullmatch(name)
    if m:
        table = dict(LAYER_NAMES, **QWEN35_LAYER_NAMES) if arch == "qwen35" else LAYER_NAMES
        if m.group(2) in table:
            return f"model.layers.{m.group(1)}.{table[m.group(2)]}"
    raise UnsupportedModelError(f"{path}: unknown tensor {name!r} for GGUF architecture {arch!r}")


# --- metadata -> ModelConfig ---------------------------------------------------------------------

def _f32_value(x):
    """GGUF stores floats as f32: 9.99999974e-07 -> 1e-06 (the shortest decimal that round-trips)."""
    return float(str(np.float32(x)))


def config_from_gguf(meta: dict, infos: dict, path) -> ModelConfig:
    try:
        return ModelConfig(**_config_fields(meta, infos, path))
    except ConfigError as e:
        if str(path) in str(e):
            raise
        raise ConfigError(f"{path}: {e}") from e
    except (TypeError, ValueError, ZeroDivisionError, OverflowError) as e:
        raise ConfigError(f"{path}: invalid GGUF metadata value: {e}") from e


def _config_fields(meta, infos, path) -> dict:
    arch = meta["general.architecture"]

    def key(name, default=...):
        v = meta.get(f"{arch}.{name}", default)
        if v is ...:
            raise ConfigError(f"{path}: GGUF metadata is missing {arch}.{name}")
        return v

    hidden = key("embedding_length")
    heads = key("attention.head_count")
    n_layers = key("block_count")
    check_layer_count(n_layers, f"{arch}.block_count", path)
    if isinstance(heads, list) or isinstance(key("attention.head_count_kv", 0), list):
        raise UnsupportedModelError(f"{path}: per-layer head counts are not supported")
    head_dim = key("attention.key_length", None) or (
        hidden // heads if isinstance(hidden, int) and isinstance(heads, int) and heads else 0)
    emb = infos.get("token_embd.weight")
    vocab = key("vocab_size", None) or len(meta.get("tokenizer.ggml.tokens") or []) or (
        emb.dims[1] if emb is not None and len(emb.dims) == 2 else 0)
    rope_dim = key("rope.dimension_count", None) or head_dim
    scaling = None
    scaling_type = key("rope.scaling.type", "none")
    if scaling_type not in ("none", None):
        scaling = {"rope_type": scaling_type, "factor": _f32_value(key("rope.scaling.factor", 1.0))}
        if key("rope.scaling.original_context_length", None):
            scaling["original_max_position_embeddings"] = key("rope.scaling.original_context_length")
    fields = dict(
        model_type=SUPPORTED_ARCHS[arch], vocab_size=vocab, hidden_size=hidden,
        intermediate_size=key("feed_forward_length"), num_hidden_layers=n_layers,
        num_attention_heads=heads, num_key_value_heads=key("attention.head_count_kv", heads),
        head_dim=head_dim,
        rms_norm_eps=_f32_value(key("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=_f32_value(key("rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        partial_rotary_factor=rope_dim / head_dim if head_dim else 1.0,
        max_position_embeddings=key("context_length", 4096),
        tie_word_embeddings="output.weight" not in infos,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=list(dict.fromkeys(
            meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                              "tokenizer.ggml.eom_token_id") if k in meta)),
        attention_bias="blk.0.attn_q.bias" in infos,
        qk_norm="blk.0.attn_q_norm.weight" in infos or arch in ("qwen3", "qwen35"),
    )
    if arch == "qwen2":
        fields["attention_bias"] = True
    if arch == "qwen35":
        hv = key("ssm.time_step_rank")
        recurrent = key("attention.recurrent_layers", None)
        if recurrent is None:
            interval = key("full_attention_interval")
            if not isinstance(interval, int) or interval <= 0:
                raise ConfigError(f"{path}: {arch}.full_attention_interval must be a positive "
                                  f"integer, got {interval!r}")
            recurrent = [(i + 1) % interval != 0 for i in range(n_layers)]
        fields.update(
            norm_add_one=True, attn_output_gate=True, qk_norm=True,
            layer_types=["linear_attention" if r else "full_attention" for r in recurrent],
            linear_num_key_heads=key("ssm.group_count"), linear_num_value_heads=hv,
            linear_key_head_dim=key("ssm.state_size"),
            linear_value_head_dim=key("ssm.inner_size") // hv if isinstance(hv, int) and hv else 0,
            linear_conv_kernel_dim=key("ssm.conv_kernel"))
    return fields


def llama3_scaling_from_factors(factors, cfg: ModelConfig, path) -> dict | None:
    """The rope scaling of the per-frequency divisors llama.cpp stores in `rope_freqs.weight`
    (inverse frequency i = theta^(-2i/d) / divisor i). Where they are HF's Llama 3 scaling, its
    `rope_scaling` dict is recovered: with wavelength w = 2 pi / freq and context L, the divisor is
    1 for w < L/high, `factor` for w > L/low, and 1 / ((1 - s) / factor + s) in between with
    s = (L/w - low) / (high - low), which is linear in freq: s = a freq + b. Fitting a and b on the
    in-between frequencies determines L/(high-low) and low/(high-low); any `low` reproduces the
    same divisors, so we take HF's default low = 1. Other divisors (too few frequencies in the
    band to fit, another curve) are kept as they are: {"rope_type": "freq_factors", ...}."""
    f = np.asarray(factors, np.float64).reshape(-1)
    rot = cfg.rotary_dim
    if len(f) != rot // 2 or not np.isfinite(f).all() or (f <= 0).any():
        raise UnsupportedModelError(f"{path}: tensor 'rope_freqs.weight' holds no rope frequency divisors "
                                    f"({len(f)} finite positive values expected for rotary dim {rot})")
    factor = float(f.max())
    if np.abs(f - 1).max() <= 1e-6:
        return None
    exact = {"rope_type": "freq_factors", "factors": [float(x) for x in f]}
    if (f < 1 - 1e-6).any():
        return exact
    freq = cfg.rope_theta ** (-np.arange(0, rot, 2) / rot)
    mid = (f > 1 + 1e-4) & (f < factor * (1 - 1e-4))
    if mid.sum() < 2:
        return exact
    s = (1 / f[mid] - 1 / factor) / (1 - 1 / factor)
    a, b = np.polyfit(freq[mid], s, 1)
    if b >= 0 or np.abs(a * freq[mid] + b - s).max() > 1e-3:
        return exact
    high = 1 - 1 / b
    context = -2 * np.pi * a / b
    return {"rope_type": "llama3", "factor": round(factor, 4), "low_freq_factor": 1.0,
            "high_freq_factor": round(float(high), 3),
            "original_max_position_embeddings": int(round(context))}


# --- tensors ------------------------------------------------------------------------------------

def _llama_qk_rows(n_rows, n_heads):
    """Index that maps llama.cpp's interleaved rope rows back to HF's halves: hf = gguf[idx]."""
    hd = n_rows // n_heads
    return np.arange(n_rows).reshape(n_heads, hd // 2, 2).transpose(0, 2, 1).reshape(-1)


def _v_heads(n_k, n_v, dim):
    """Index that maps tiled value heads back to HF's grouped order: hf = gguf[idx]."""
    return np.arange(n_v * dim).reshape(n_v // n_k, n_k, dim).transpose(1, 0, 2).reshape(-1)


def _make_tensor(info: GGUFTensorInfo, hf_name, arch, cfg: ModelConfig, header, fmap) -> Tensor:
    path = header.path
    if info.type_id not in GGUF_TYPES:
        from gguf import GGMLQuantizationType
        try:
            type_name = GGMLQuantizationType(info.type_id).name
        except ValueError:
            type_name = f"unknown type {info.type_id}"
        raise UnsupportedModelError(
            f"{path}: tensor {info.name!r} has GGUF type {type_name}; supported: "
            f"{', '.join(t[0].upper() for t in GGUF_TYPES.values())}")
    dtype, np_dtype, block, block_bytes = GGUF_TYPES[info.type_id]
    np_shape = tuple(reversed(info.dims))
    n_elems = int(np.prod(np_shape, dtype=object))
    if n_elems == 0:
        raise ModelFormatError(f"tensor {info.name!r} has an empty shape {np_shape}", path)
    if info.dims[0] % block:
        raise ModelFormatError(f"tensor {info.name!r}: row length {info.dims[0]} is not a multiple "
                               f"of the {dtype} block size {block}", path)
    nbytes = n_elems // block * block_bytes
    if info.offset + nbytes > header.file_size:
        raise ModelFormatError(f"tensor {info.name!r}: data [{info.offset}, {info.offset + nbytes})"
                               f" runs past the end of the file ({header.file_size} bytes)", path)
    quantized = block > 1
    # native layout: floats as their numpy shape, quantized as rows of bytes
    raw_shape = (int(np.prod(np_shape[:-1], dtype=object)), info.dims[0] // block * block_bytes) \
        if quantized else np_shape

    def native():
        return fmap.bytes(info.offset, nbytes).view(np_dtype).reshape(raw_shape)

    short = info.name.split(".", 2)[-1] if info.name.startswith("blk.") else info.name
    try:
        hf_shape, rows, cols, fix = _hf_layout(arch, short, np_shape, cfg)
    except ValueError as e:
        raise ModelFormatError(f"tensor {info.name!r} has shape {np_shape}, inconsistent with "
                               f"the metadata: {e}", path) from e
    for perm, axis in ((rows, 0), (cols, -1)):
        if perm is not None and len(perm) != np_shape[axis]:
            raise ModelFormatError(f"tensor {info.name!r} has shape {np_shape}, inconsistent with "
                                   f"the head counts in the metadata", path)

    spans = [(fmap, info.offset, nbytes)]
    if fix is None and cols is None:
        load = native if rows is None else (lambda: native()[rows])
        return Tensor(hf_name, hf_shape, dtype, path, load, spans=spans,
                      rows_in_order=rows is None and len(hf_shape) == len(np_shape))

    # values change or quantized blocks would split: present the HF values as f32
    def converted():
        a = Tensor(hf_name, np_shape, dtype, path, native).to_f32()
        if rows is not None:
            a = a[rows]
        if cols is not None:
            a = a[:, cols]
        if fix is not None:
            a = fix(a)
        return np.ascontiguousarray(a, dtype=np.float32).reshape(hf_shape)

    if not quantized and fix is None:      # float column permutation keeps the native dtype
        return Tensor(hf_name, hf_shape, dtype, path, lambda: native()[:, cols], spans=spans)
    return Tensor(hf_name, hf_shape, "f32", path, converted, spans=spans)


def _qwen35_value_heads(short, np_shape, cfg):
    """(row index, column index) that undo the tiled value-head order of one qwen35 tensor."""
    hk, hv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
    qk, dv = 2 * hk * cfg.linear_key_head_dim, cfg.linear_value_head_dim
    # rows kept in place, then value heads of `dim` rows each
    layout = {"attn_qkv.weight": (qk, dv), "ssm_conv1d.weight": (qk, dv),
              "attn_gate.weight": (0, dv), "ssm_beta.weight": (0, 1), "ssm_alpha.weight": (0, 1),
              "ssm_a": (0, 1), "ssm_dt.bias": (0, 1)}
    if short == "ssm_out.weight":
        if len(np_shape) != 2 or np_shape[1] != hv * dv:
            raise ValueError(f"out_proj needs {hv * dv} columns")
        return None, _v_heads(hk, hv, dv)
    if short not in layout:
        return None, None
    keep, dim = layout[short]
    if np_shape[0] != keep + hv * dim:
        raise ValueError(f"expected {keep + hv * dim} rows")
    return np.concatenate([np.arange(keep), keep + _v_heads(hk, hv, dim)]), None


def _hf_layout(arch, short, np_shape, cfg):
    """(HF shape, row index, column index, value fix) for a GGUF tensor; see the module docstring."""
    hf_shape = np_shape
    rows = cols = fix = None
    if arch == "llama" and short in ("attn_q.weight", "attn_q.bias"):
        rows = _llama_qk_rows(np_shape[0], cfg.num_attention_heads)
    elif arch == "llama" and short in ("attn_k.weight", "attn_k.bias"):
        rows = _llama_qk_rows(np_shape[0], cfg.num_key_value_heads)
    elif arch == "qwen35":
        if short in QWEN35_PLUS_ONE:
            fix = lambda a: a - np.float32(1)          # noqa: E731
        elif short == "ssm_a":
            fix = lambda a: np.log(-a)                 # noqa: E731  (ssm_a = -exp(A_log))
        if short == "ssm_conv1d.weight":
            if len(np_shape) != 2:
                raise ValueError("conv1d must be 2-D [channels, kernel]")
            hf_shape = (np_shape[0], 1, np_shape[1])
        hk, hv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
        if hk and hv and hk != hv:
            rows, cols = _qwen35_value_heads(short, np_shape, cfg)
    return hf_shape, rows, cols, fix
