"""Shape-exact checkpoints with random weights, so every engine runs the same architecture and sizes.

`write_hf` writes a Hugging Face folder (config.json, model.safetensors, tokenizer.json) laid out like
the real checkpoint; `write_gguf` writes the same weights as GGUF the way llama.cpp's converter does
(tensor names, `<arch>.*` keys, Qwen3.5 norms stored as 1 + w, ssm_a = -exp(A_log), conv1d squeezed,
grouped value heads reordered to tiled order, q/k rows permuted for the llama architecture).

Tensors are generated one at a time from (seed, tensor name), so a 0.8B-parameter model never has to
fit in memory twice, and the HF folder and the GGUF of one seed hold the same values.
"""
from __future__ import annotations

import copy
import json
import math
import os
import struct
import zlib
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from ..errors import ConfigError

# ------------------------------------------------------------------------------------------------
# Model shapes

LLAMA_TENSOR_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
QWEN35_TENSOR_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "linear_attn.in_proj_qkv": "attn_qkv", "linear_attn.in_proj_z": "attn_gate",
    "linear_attn.in_proj_b": "ssm_beta", "linear_attn.in_proj_a": "ssm_alpha",
    "linear_attn.out_proj": "ssm_out", "linear_attn.norm": "ssm_norm", "linear_attn.conv1d": "ssm_conv1d",
    "linear_attn.A_log": "ssm_a", "linear_attn.dt_bias": "ssm_dt.bias",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}

_QWEN35_PATTERN = ["linear_attention"] * 3 + ["full_attention"]

# Hugging Face config fields of each model (text part), as in the published config.json files.
MODELS = {
    "smollm2-135m": dict(
        model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
        num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
        rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=8192, tie_word_embeddings=True,
        tokenizer_pre="smollm"),
    "llama-3.2-1b": dict(
        model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
        num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
        rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=131072, tie_word_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        tokenizer_pre="llama-bpe"),
    "qwen3.5-0.8b": dict(
        model_type="qwen3_5", vocab_size=248320, hidden_size=1024, intermediate_size=3584,
        num_hidden_layers=24, num_attention_heads=8, num_key_value_heads=2, head_dim=256,
        rms_norm_eps=1e-6, rope_theta=1e7, partial_rotary_factor=0.25, max_position_embeddings=262144,
        tie_word_embeddings=True, layer_types=_QWEN35_PATTERN * 6,
        linear_num_key_heads=16, linear_num_value_heads=16, linear_key_head_dim=128,
        linear_value_head_dim=128, linear_conv_kernel_dim=4, tokenizer_pre="qwen35"),
}

# Small versions with the same structure (layer pattern, head ratios, tied embeddings) for tests.
# The tiny Qwen3.5 has more value heads than key heads so the grouped-head reorder is exercised.
# The tiny Llama 3.2 keeps the real head_dim, rope_theta and rope_scaling, so its inverse frequencies
# are the 1B's (and three of them fall in the smooth band, which the GGUF reader needs to recover
# rope_scaling from rope_freqs.weight).
TINY = {
    "smollm2-135m": dict(vocab_size=384, hidden_size=96, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=2, head_dim=16,
                         max_position_embeddings=512),
    "llama-3.2-1b": dict(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024),
    "qwen3.5-0.8b": dict(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                         max_position_embeddings=512, layer_types=_QWEN35_PATTERN,
                         linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                         linear_value_head_dim=16),
}


def model_spec(name: str, tiny: bool = False, **overrides) -> dict:
    """The HF text config of a known model shape, optionally tiny and/or with fields overridden."""
    if name not in MODELS:
        raise ConfigError(f"unknown model shape {name!r}; known: {', '.join(sorted(MODELS))}")
    spec = copy.deepcopy(MODELS[name])
    if tiny:
        spec.update(copy.deepcopy(TINY[name]))
    unknown = set(overrides) - set(spec) - {"seed"}
    if unknown:
        raise ConfigError(f"unknown config field(s) {sorted(unknown)} for {name}")
    spec.update(overrides)
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim"):
        if not isinstance(spec[key], int) or spec[key] < 1:
            raise ConfigError(f"{name}: {key} must be a positive integer, got {spec[key]!r}")
    if spec["model_type"] == "qwen3_5" and len(spec["layer_types"]) != spec["num_hidden_layers"]:
        reps = -(-spec["num_hidden_layers"] // 4)
        spec["layer_types"] = (_QWEN35_PATTERN * reps)[:spec["num_hidden_layers"]]
    if spec["vocab_size"] < 258:
        raise ConfigError(f"vocab_size must be at least 258 (256 byte tokens, one merge, end of text), "
                          f"got {spec['vocab_size']}")
    return spec


# ------------------------------------------------------------------------------------------------
# Tensors

@dataclass
class TensorSpec:
    name: str                           # Hugging Face name
    shape: tuple
    make: Callable[[np.random.Generator, tuple], np.ndarray]   # float32 values


def _normal(scale):
    return lambda rng, shape: (rng.standard_normal(shape, dtype=np.float32) * np.float32(scale))


def _around(center, scale):
    return lambda rng, shape: (np.float32(center) + rng.standard_normal(shape, dtype=np.float32)
                               * np.float32(scale))


def _log_uniform(lo, hi):
    return lambda rng, shape: np.log(rng.uniform(lo, hi, shape)).astype(np.float32)


def hf_tensors(spec: dict) -> list[TensorSpec]:
    """Every tensor of the checkpoint with its HF name, shape and initializer.

    Linear weights are N(0, 0.02) (activations stay finite through the residual stream, norms renormalize);
    norms are near their neutral value so (1 + w) versus w matters; A_log like HF's init."""
    D, I, V = spec["hidden_size"], spec["intermediate_size"], spec["vocab_size"]
    H, KV, hd = spec["num_attention_heads"], spec["num_key_value_heads"], spec["head_dim"]
    qwen = spec["model_type"] == "qwen3_5"
    prefix = "model.language_model." if qwen else "model."
    norm = _around(0.0, 0.1) if qwen else _around(1.0, 0.1)   # qwen3_5 norms are used as (1 + w)
    w = _normal(0.02)
    out = [TensorSpec(prefix + "embed_tokens.weight", (V, D), w)]
    for i in range(spec["num_hidden_layers"]):
        p = f"{prefix}layers.{i}."
        out.append(TensorSpec(p + "input_layernorm.weight", (D,), norm))
        kind = spec["layer_types"][i] if qwen else "full_attention"
        if kind == "full_attention":
            q_rows = H * hd * (2 if qwen else 1)                  # qwen3_5: per head [q | gate]
            out += [TensorSpec(p + "self_attn.q_proj.weight", (q_rows, D), w),
                    TensorSpec(p + "self_attn.k_proj.weight", (KV * hd, D), w),
                    TensorSpec(p + "self_attn.v_proj.weight", (KV * hd, D), w),
                    TensorSpec(p + "self_attn.o_proj.weight", (D, H * hd), w)]
            if qwen:
                out += [TensorSpec(p + "self_attn.q_norm.weight", (hd,), norm),
                        TensorSpec(p + "self_attn.k_norm.weight", (hd,), norm)]
        else:
            hk, hv = spec["linear_num_key_heads"], spec["linear_num_value_heads"]
            dk, dv = spec["linear_key_head_dim"], spec["linear_value_head_dim"]
            conv_dim = 2 * hk * dk + hv * dv
            out += [TensorSpec(p + "linear_attn.in_proj_qkv.weight", (conv_dim, D), w),
                    TensorSpec(p + "linear_attn.in_proj_z.weight", (hv * dv, D), w),
                    TensorSpec(p + "linear_attn.in_proj_b.weight", (hv, D), w),
                    TensorSpec(p + "linear_attn.in_proj_a.weight", (hv, D), w),
                    TensorSpec(p + "linear_attn.conv1d.weight", (conv_dim, 1, spec["linear_conv_kernel_dim"]),
                               _normal(0.3)),
                    TensorSpec(p + "linear_attn.dt_bias", (hv,), _around(1.0, 0.1)),
                    TensorSpec(p + "linear_attn.A_log", (hv,), _log_uniform(1.0, 16.0)),
                    TensorSpec(p + "linear_attn.norm.weight", (dv,), _around(1.0, 0.1)),
                    TensorSpec(p + "linear_attn.out_proj.weight", (D, hv * dv), w)]
        out += [TensorSpec(p + "post_attention_layernorm.weight", (D,), norm),
                TensorSpec(p + "mlp.gate_proj.weight", (I, D), w),
                TensorSpec(p + "mlp.up_proj.weight", (I, D), w),
                TensorSpec(p + "mlp.down_proj.weight", (D, I), w)]
    out.append(TensorSpec(prefix + "norm.weight", (D,), norm))
    if not spec["tie_word_embeddings"]:
        out.append(TensorSpec("lm_head.weight", (V, D), w))
    return out


HF_DTYPES = {"f32": (np.float32, "F32"), "f16": (np.float16, "F16"), "bf16": (None, "BF16")}


def _store_dtype(dtype: str):
    if dtype not in HF_DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r} for the HF checkpoint; use one of {sorted(HF_DTYPES)}")
    if dtype == "bf16":
        import ml_dtypes
        return ml_dtypes.bfloat16
    return HF_DTYPES[dtype][0]


def generate(spec: dict, seed: int = 0, dtype: str = "bf16") -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, values) for each tensor, rounded to the checkpoint dtype (so HF and GGUF agree)."""
    np_dtype = _store_dtype(dtype)
    for t in hf_tensors(spec):
        rng = np.random.default_rng([seed, zlib.crc32(t.name.encode())])
        yield t.name, t.make(rng, t.shape).astype(np_dtype)


# ------------------------------------------------------------------------------------------------
# Vocabulary (random weights have no tokenizer: byte tokens, one merge, an end-of-text token)

def _byte_alphabet() -> list[str]:
    """GPT-2 byte-level alphabet: printable bytes map to themselves, the rest to U+0100 upward."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(0x100 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def vocabulary(vocab_size: int) -> tuple[list[str], list[str], int]:
    """(tokens, merges, eos id): 256 byte tokens, "ĠĠ" from one merge, fillers, then <|endoftext|>."""
    alphabet = _byte_alphabet()
    space = alphabet[ord(" ")]
    tokens = alphabet + [space + space]
    tokens += [f"<|filler_{i}|>" for i in range(len(tokens), vocab_size - 1)]
    tokens.append("<|endoftext|>")
    return tokens, [f"{space} {space}"], vocab_size - 1


def write_tokenizer(path: str, vocab_size: int):
    """tokenizer.json + tokenizer_config.json for the placeholder vocabulary (needs `tokenizers`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, AddedToken
    tokens, merges, eos = vocabulary(vocab_size)
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                               merges=[tuple(m.split(" ")) for m in merges]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(tokens[eos], special=True)])
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": tokens[eos],
                   "bos_token": None, "model_max_length": 1 << 20}, f, indent=1)


# ------------------------------------------------------------------------------------------------
# Hugging Face folder

def hf_config(spec: dict) -> dict:
    """config.json as the published checkpoint has it (Qwen3.5: a text_config inside a VLM config)."""
    _, _, eos = vocabulary(spec["vocab_size"])
    common = {k: spec[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                   "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
                                   "max_position_embeddings", "tie_word_embeddings")}
    common.update(hidden_act="silu", bos_token_id=None, eos_token_id=eos, attention_bias=False)
    if spec["model_type"] == "llama":
        cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **common,
               "rope_theta": spec["rope_theta"], "mlp_bias": False, "torch_dtype": "bfloat16"}
        if spec.get("rope_scaling"):
            cfg["rope_scaling"] = spec["rope_scaling"]
        return cfg
    text = {"model_type": "qwen3_5_text", **common,
            "layer_types": spec["layer_types"], "full_attention_interval": 4,
            "rope_parameters": {"rope_type": "default", "rope_theta": spec["rope_theta"],
                                "partial_rotary_factor": spec["partial_rotary_factor"],
                                "mrope_interleaved": True, "mrope_section": [11, 11, 10]},
            **{k: spec[k] for k in ("linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
                                    "linear_value_head_dim", "linear_conv_kernel_dim")}}
    return {"architectures": ["Qwen3_5ForConditionalGeneration"], "model_type": "qwen3_5",
            "tie_word_embeddings": spec["tie_word_embeddings"], "text_config": text}


def write_safetensors(path: str, tensors: list[tuple[str, tuple, str]], produce: Iterator[np.ndarray]):
    """Stream tensors into one safetensors file: header first (names, dtypes, shapes, offsets), then data."""
    header, offset = {}, 0
    for name, shape, st_dtype in tensors:
        nbytes = int(np.prod(shape)) * (4 if st_dtype == "F32" else 2)
        header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for (name, shape, _), arr in zip(tensors, produce):
            if arr.shape != tuple(shape):
                raise ConfigError(f"{name}: produced shape {arr.shape}, declared {shape}")
            f.write(np.ascontiguousarray(arr).tobytes())


def write_hf(spec: dict, out_dir: str, seed: int = 0, dtype: str = "bf16") -> str:
    _store_dtype(dtype)                     # rejects an unknown dtype before anything is written
    os.makedirs(out_dir, exist_ok=True)
    st_dtype = HF_DTYPES[dtype][1]
    decl = [(t.name, t.shape, st_dtype) for t in hf_tensors(spec)]
    write_safetensors(os.path.join(out_dir, "model.safetensors"), decl,
                      (arr for _, arr in generate(spec, seed, dtype)))
    cfg = hf_config(spec)
    cfg["torch_dtype"] = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}[dtype]
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    write_tokenizer(out_dir, spec["vocab_size"])
    return out_dir


# ------------------------------------------------------------------------------------------------
# GGUF (llama.cpp conventions)

GGUF_TYPES = ("f32", "f16", "q8_0")


def permute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF's rotate-half row order per head -> llama.cpp's interleaved pairs (llama architecture)."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tile_value_heads(w: np.ndarray, axis: int, n_k: int, n_v_per_k: int, head_dim: int) -> np.ndarray:
    """Value heads grouped by key head [k0v0, k0v1, k1v0, ...] -> tiled [k0v0, k1v0, k0v1, ...]
    along `axis`: ggml broadcasts key heads over value heads by tiling."""
    shape = list(w.shape)
    split = shape[:axis] + [n_k, n_v_per_k, head_dim] + shape[axis + 1:]
    return np.swapaxes(w.reshape(split), axis, axis + 1).reshape(shape)


def llama3_rope_factors(spec: dict) -> np.ndarray:
    """Per-frequency divisors of Llama 3 rope scaling (llama.cpp reads them as `rope_freqs.weight`)."""
    rs, hd = spec["rope_scaling"], spec["head_dim"]
    factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old_ctx = rs["original_max_position_embeddings"]
    out = []
    for i in range(0, hd, 2):
        wavelen = 2 * math.pi * spec["rope_theta"] ** (i / hd)
        if wavelen < old_ctx / hi:
            out.append(1.0)
        elif wavelen > old_ctx / lo:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - lo) / (hi - lo)
            out.append(1.0 / ((1.0 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def gguf_name_and_transform(spec: dict, hf_name: str) -> tuple[str, Callable[[np.ndarray], np.ndarray]]:
    """GGUF tensor name for an HF tensor, and the function that turns HF values into GGUF values."""
    qwen = spec["model_type"] == "qwen3_5"
    name = hf_name.removeprefix("model.language_model.").removeprefix("model.")
    ident = lambda a: a  # noqa: E731
    if name == "embed_tokens.weight":
        return "token_embd.weight", ident
    if name == "lm_head.weight":
        return "output.weight", ident
    if name == "norm.weight":
        return "output_norm.weight", (lambda a: a + 1) if qwen else ident
    _, layer, rest = name.split(".", 2)
    module, _, suffix = rest.rpartition(".")
    if module == "linear_attn":            # A_log and dt_bias are parameters, not modules
        module, suffix = rest, ""
    table = QWEN35_TENSOR_NAMES if qwen else LLAMA_TENSOR_NAMES
    if module not in table:
        raise ConfigError(f"no GGUF name for tensor {hf_name!r}")
    gname = f"blk.{layer}.{table[module]}" + (f".{suffix}" if suffix and "." not in table[module] else "")
    if not qwen:
        if module == "self_attn.q_proj":
            return gname, lambda a: permute_rope_rows(a, spec["num_attention_heads"])
        if module == "self_attn.k_proj":
            return gname, lambda a: permute_rope_rows(a, spec["num_key_value_heads"])
        return gname, ident
    # Qwen3.5
    steps = []
    if module.endswith("norm") and module != "linear_attn.norm":
        steps.append(lambda a: a + 1)
    if module == "linear_attn.A_log":
        steps.append(lambda a: -np.exp(a))
    if module == "linear_attn.conv1d":
        steps.append(lambda a: a[:, 0, :])
    hk, hv = spec.get("linear_num_key_heads", 0), spec.get("linear_num_value_heads", 0)
    if module.startswith("linear_attn.") and hv != hk:
        dk, dv, r = spec["linear_key_head_dim"], spec["linear_value_head_dim"], hv // hk
        qk = 2 * hk * dk
        if module in ("linear_attn.in_proj_qkv", "linear_attn.conv1d"):
            steps.append(lambda a: np.concatenate([a[:qk], tile_value_heads(a[qk:], 0, hk, r, dv)]))
        elif module == "linear_attn.in_proj_z":
            steps.append(lambda a: tile_value_heads(a, 0, hk, r, dv))
        elif module in ("linear_attn.in_proj_a", "linear_attn.in_proj_b", "linear_attn.A_log",
                        "linear_attn.dt_bias"):
            steps.append(lambda a: tile_value_heads(a, 0, hk, r, 1))
        elif module == "linear_attn.out_proj":
            steps.append(lambda a: tile_value_heads(a, 1, hk, r, dv))

    def transform(a):
        for step in steps:
            a = step(a)
        return a
    return gname, transform


def gguf_tensor_type(gname: str, shape: tuple, outtype: str):
    """llama.cpp's choice: 1-D tensors, norms, conv1d and biases stay F32; the rest take the file type,
    with F16 where a row is not a whole number of Q8_0 blocks."""
    from gguf import GGMLQuantizationType as Q
    if (len(shape) <= 1 or gname.endswith("_norm.weight") or ".ssm_conv1d." in gname
            or not gname.endswith(".weight") or outtype == "f32"):
        return Q.F32
    if outtype == "f16" or shape[-1] % 32:
        return Q.F16
    return Q.Q8_0


def write_gguf(spec: dict, path: str, seed: int = 0, outtype: str = "q8_0", dtype: str = "bf16") -> str:
    """The same weights as `write_hf(spec, seed=seed, dtype=dtype)`, as one GGUF file."""
    import gguf
    from gguf import GGMLQuantizationType as Q
    if outtype not in GGUF_TYPES:
        raise ConfigError(f"unknown GGUF type {outtype!r}; use one of {', '.join(GGUF_TYPES)}")
    qwen = spec["model_type"] == "qwen3_5"
    arch = "qwen35" if qwen else "llama"
    w = gguf.GGUFWriter(path, arch)
    w.add_name(f"random-{arch}")
    w.add_context_length(spec["max_position_embeddings"])
    w.add_embedding_length(spec["hidden_size"])
    w.add_block_count(spec["num_hidden_layers"])
    w.add_feed_forward_length(spec["intermediate_size"])
    w.add_head_count(spec["num_attention_heads"])
    w.add_head_count_kv(spec["num_key_value_heads"])
    w.add_key_length(spec["head_dim"])
    w.add_value_length(spec["head_dim"])
    w.add_rope_freq_base(spec["rope_theta"])
    w.add_layer_norm_rms_eps(spec["rms_norm_eps"])
    w.add_vocab_size(spec["vocab_size"])
    w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype])
    if qwen:
        w.add_rope_dimension_count(int(spec["head_dim"] * spec["partial_rotary_factor"]))
        w.add_rope_dimension_sections([11, 11, 10, 0])
        w.add_full_attention_interval(4)
        w.add_ssm_conv_kernel(spec["linear_conv_kernel_dim"])
        w.add_ssm_state_size(spec["linear_key_head_dim"])
        w.add_ssm_group_count(spec["linear_num_key_heads"])
        w.add_ssm_time_step_rank(spec["linear_num_value_heads"])
        w.add_ssm_inner_size(spec["linear_value_head_dim"] * spec["linear_num_value_heads"])
    else:
        w.add_rope_dimension_count(spec["head_dim"])
    tokens, merges, eos = vocabulary(spec["vocab_size"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(spec["tokenizer_pre"])
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.NORMAL] * (len(tokens) - 1) + [gguf.TokenType.CONTROL])
    w.add_token_merges(merges)
    w.add_eos_token_id(eos)
    w.add_bos_token_id(eos)
    w.add_add_bos_token(False)

    # Declare every tensor first (GGUF puts all tensor infos before the data), then stream the data.
    plan = []
    for t in hf_tensors(spec):
        gname, transform = gguf_name_and_transform(spec, t.name)
        shape = t.shape[:1] + t.shape[2:] if t.name.endswith("conv1d.weight") else t.shape
        plan.append((gname, shape, gguf_tensor_type(gname, shape, outtype), transform))
    if not qwen and spec.get("rope_scaling"):
        plan.append(("rope_freqs.weight", (spec["head_dim"] // 2,), Q.F32, None))
    for gname, shape, qtype, _ in plan:
        nbytes = int(np.prod(gguf.quant_shape_to_byte_shape(shape, qtype)))
        w.add_tensor_info(gname, shape, np.dtype(np.float32), nbytes, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    values = generate(spec, seed, dtype)
    for gname, shape, qtype, transform in plan:
        if transform is None:
            data = llama3_rope_factors(spec)
        else:
            data = transform(next(values)[1].astype(np.float32))
        if qtype == Q.Q8_0:
            data = gguf.quants.quantize(data, Q.Q8_0)
        else:
            data = data.astype(np.float32 if qtype == Q.F32 else np.float16)
        w.write_tensor_data(data)
    w.close()
    return path
