"""One config object for every family and format.

Hugging Face config.json and GGUF metadata both map onto ModelConfig; the model family files read
only this. Field names follow Hugging Face's where one exists.
"""
from __future__ import annotations

from dataclasses import dataclass, field, asdict

from .errors import ConfigError


@dataclass
class ModelConfig:
    model_type: str                       # "llama" | "qwen2" | "qwen3" | "qwen3_5"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None      # HF rope_scaling ({"rope_type": "llama3", ...}) or freq_factors
    partial_rotary_factor: float = 1.0    # rotary_dim = head_dim * partial_rotary_factor (NeoX pairs)
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False          # qwen2: q/k/v have biases
    qk_norm: bool = False                 # qwen3 and qwen3_5 full attention: per-head RMSNorm on q and k
    norm_add_one: bool = False            # qwen3_5: RMSNorm weight is used as (1 + w)
    attn_output_gate: bool = False        # qwen3_5: q_proj emits per-head [q | gate], out *= sigmoid(gate)
    # hybrid layers (qwen3_5): one entry per layer, "full_attention" or "linear_attention"
    layer_types: list = field(default_factory=list)
    # Gated DeltaNet ("linear_attention") layers
    linear_num_key_heads: int = 0
    linear_num_value_heads: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_conv_kernel_dim: int = 0
    # tokens
    bos_token_id: int | None = None
    eos_token_id: list = field(default_factory=list)   # always a list

    def __post_init__(self):
        if not self.layer_types:
            self.layer_types = ["full_attention"] * self.num_hidden_layers
        if isinstance(self.eos_token_id, int):
            self.eos_token_id = [self.eos_token_id]
        self.eos_token_id = list(self.eos_token_id or [])
        self.validate()

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def validate(self):
        def need(cond, what):
            if not cond:
                raise ConfigError(f"invalid config for model_type {self.model_type!r}: {what}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim"):
            v = getattr(self, name)
            need(isinstance(v, int) and v > 0, f"{name} must be a positive integer, got {v!r}")
        need(self.num_attention_heads % self.num_key_value_heads == 0,
             f"num_attention_heads ({self.num_attention_heads}) is not a multiple of "
             f"num_key_value_heads ({self.num_key_value_heads})")
        need(len(self.layer_types) == self.num_hidden_layers,
             f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
        bad = set(self.layer_types) - {"full_attention", "linear_attention"}
        need(not bad, f"unknown layer_types {sorted(bad)}")
        need(self.rotary_dim % 2 == 0 and 0 < self.rotary_dim <= self.head_dim,
             f"rotary dim {self.rotary_dim} (head_dim {self.head_dim} x partial_rotary_factor "
             f"{self.partial_rotary_factor}) must be even and within head_dim")
        need(self.rms_norm_eps > 0, f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if "linear_attention" in self.layer_types:
            for name in ("linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
                         "linear_value_head_dim", "linear_conv_kernel_dim"):
                v = getattr(self, name)
                need(isinstance(v, int) and v > 0, f"{name} must be a positive integer, got {v!r}")
            need(self.linear_num_value_heads % self.linear_num_key_heads == 0,
                 "linear_num_value_heads must be a multiple of linear_num_key_heads")

    def to_dict(self) -> dict:
        return asdict(self)
