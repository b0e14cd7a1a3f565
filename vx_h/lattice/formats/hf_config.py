"""Hugging Face config.json -> ModelConfig."""
from __future__ import annotations

from ..config import ModelConfig
from ..errors import ConfigError, UnsupportedModelError

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "qwen3_5", "qwen3_5_text")
MAX_LAYERS = 4096   # far beyond any real model; bounds per-layer lists built from a corrupt config


def check_layer_count(n, what, path):
    if type(n) is not int or not 0 < n <= MAX_LAYERS:
        raise ConfigError(f"{path}: {what} must be an integer in 1..{MAX_LAYERS}, got {n!r}")


def _field(cfg, name, path, default=...):
    v = cfg.get(name, default)
    if v is ...:
        raise ConfigError(f"{path}: config is missing required field {name!r}")
    return v


def _rope(cfg):
    """(rope_theta, partial_rotary_factor, rope_scaling) from the legacy `rope_theta`/`rope_scaling`
    fields or transformers 5's `rope_parameters`."""
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = cfg.get("rope_theta", params.pop("rope_theta", 10000.0))
    params.pop("rope_theta", None)
    partial = cfg.get("partial_rotary_factor", params.pop("partial_rotary_factor", 1.0))
    params.pop("partial_rotary_factor", None)
    rope_type = params.get("rope_type", params.get("type"))
    # multimodal rope sections (Qwen3.5 mrope) collapse to plain rope for text-only positions
    scaling = params if rope_type not in (None, "default") else None
    return float(theta), float(partial), scaling


def _layer_types(cfg, n_layers, path):
    types = cfg.get("layer_types")
    if types is not None:
        return list(types)
    interval = cfg.get("full_attention_interval")
    if interval is None:
        raise ConfigError(f"{path}: qwen3_5 config needs 'layer_types' or 'full_attention_interval'")
    if not isinstance(interval, int) or interval <= 0:
        raise ConfigError(f"{path}: full_attention_interval must be a positive integer, "
                          f"got {interval!r}")
    return ["full_attention" if (i + 1) % interval == 0 else "linear_attention"
            for i in range(n_layers)]


def config_from_hf(cfg: dict, path="config.json") -> ModelConfig:
    """Map a config.json dict to ModelConfig; `path` names the file in errors."""
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: config.json is not a JSON object")
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"{path}: unsupported model_type {model_type!r} "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    if model_type == "qwen3_5":
        # the vision-language wrapper nests the text model; mlx-lm writes it flat
        text = cfg.get("text_config", cfg)
        if not isinstance(text, dict):
            raise ConfigError(f"{path}: qwen3_5 'text_config' is not an object")
        text = dict(text)
        # special token ids fill in from the wrapper; its tie_word_embeddings governs the lm_head
        for key in ("eos_token_id", "bos_token_id"):
            if key in cfg and key not in text:
                text[key] = cfg[key]
        if "tie_word_embeddings" in cfg:
            text["tie_word_embeddings"] = cfg["tie_word_embeddings"]
        cfg, model_type = text, "qwen3_5_text"

    # features no family file models: refuse them rather than run a silently different model
    unsupported = [("mlp_bias", "MLP biases"), ("use_sliding_window", "sliding-window attention")]
    if model_type == "llama":
        unsupported.append(("attention_bias", "attention biases"))
    for key, what in unsupported:
        if cfg.get(key):
            raise UnsupportedModelError(f"{path}: {what} ({key}: true) are not supported for "
                                        f"model_type {model_type!r}")

    try:
        hidden = _field(cfg, "hidden_size", path)
        heads = _field(cfg, "num_attention_heads", path)
        n_layers = _field(cfg, "num_hidden_layers", path)
        check_layer_count(n_layers, "num_hidden_layers", path)
        theta, partial, scaling = _rope(cfg)
        head_dim = cfg.get("head_dim") or (hidden // heads if isinstance(hidden, int)
                                           and isinstance(heads, int) and heads else 0)
        common = dict(
            vocab_size=_field(cfg, "vocab_size", path),
            hidden_size=hidden,
            intermediate_size=_field(cfg, "intermediate_size", path),
            num_hidden_layers=n_layers,
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            partial_rotary_factor=partial,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"),
        )
        if model_type == "llama":
            return ModelConfig(model_type="llama",
                               attention_bias=bool(cfg.get("attention_bias", False)), **common)
        if model_type == "qwen2":
            return ModelConfig(model_type="qwen2", attention_bias=True, **common)
        if model_type == "qwen3":
            return ModelConfig(model_type="qwen3", qk_norm=True,
                               attention_bias=bool(cfg.get("attention_bias", False)), **common)
        return ModelConfig(
            model_type="qwen3_5", qk_norm=True, norm_add_one=True,
            attn_output_gate=bool(cfg.get("attn_output_gate", True)),
            attention_bias=bool(cfg.get("attention_bias", False)),
            layer_types=_layer_types(cfg, n_layers, path),
            linear_num_key_heads=_field(cfg, "linear_num_key_heads", path),
            linear_num_value_heads=_field(cfg, "linear_num_value_heads", path),
            linear_key_head_dim=_field(cfg, "linear_key_head_dim", path),
            linear_value_head_dim=_field(cfg, "linear_value_head_dim", path),
            linear_conv_kernel_dim=_field(cfg, "linear_conv_kernel_dim", path),
            **common)
    except ConfigError as e:
        if str(path) in str(e):
            raise
        raise ConfigError(f"{path}: {e}") from e
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{path}: invalid value in config: {e}") from e
