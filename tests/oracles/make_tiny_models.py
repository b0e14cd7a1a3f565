"""Tiny random Hugging Face checkpoints + transformers outputs: the parity fixtures of the reference.

Needs torch and transformers (made with torch 2.13, transformers 5.24); the tests do not.

    python tests/oracles/make_tiny_models.py            # writes tests/fixtures/tiny-*/ and *_oracle.npz

For each model: a folder `tests/fixtures/tiny-<name>/` (config.json, generation_config.json,
model.safetensors in float32, no tokenizer: tests pass token ids) and `tests/fixtures/tiny-<name>_oracle.npz`:
  prompt        [T] int32     the prompt ids
  prefill       [T, V] f32    logits of a full uncached forward over the prompt (every position)
  tokens        [N] int32     N greedy tokens from transformers with its cache (prefill, then N-1 steps)
  step_logits   [N, V] f32    the logits each of those tokens was taken from
Random init is perturbed so the checks mean something: norm weights away from 0 / 1 (so (1+w) vs w
matters), larger conv weights, dt_bias varied.
"""
import json
import os

import numpy as np
import torch
from transformers import (AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3_5TextConfig,
                          Qwen3Config)

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures")
PROMPT_LEN = 12
N_TOKENS = 16
VOCAB = 256

COMMON = dict(vocab_size=VOCAB, hidden_size=64, rms_norm_eps=1e-6, max_position_embeddings=256,
              bos_token_id=None, eos_token_id=VOCAB - 1, pad_token_id=None)


def configs():
    yield "qwen35", Qwen3_5TextConfig(
        **COMMON, intermediate_size=24, num_hidden_layers=4, layer_types=[
            "linear_attention", "full_attention", "linear_attention", "full_attention"],
        num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        linear_num_key_heads=2, linear_num_value_heads=4,   # grouped value heads: h -> key head h // 2
        linear_key_head_dim=8, linear_value_head_dim=8, linear_conv_kernel_dim=4,
        initializer_range=0.1, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.5,
                         "mrope_interleaved": True, "mrope_section": [1, 1, 0]})
    # Llama 3 rope scaling with a tiny original context so that all three wavelength bands occur
    yield "llama", LlamaConfig(
        **COMMON, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        initializer_range=0.1, tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
    yield "qwen3", Qwen3Config(
        **COMMON, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=24, initializer_range=0.1, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    yield "qwen2", Qwen2Config(
        **COMMON, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        initializer_range=0.1, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})


def perturb(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.2 * torch.randn_like(p))
            elif name.endswith("dt_bias") or name.endswith(".bias"):
                p.add_(0.2 * torch.randn_like(p))
            elif "conv1d" in name:
                p.mul_(3.0)


def classic_rope_config(folder):
    """Rewrite transformers 5's `rope_parameters` as the `rope_theta` + `rope_scaling` pair that
    most published Llama checkpoints carry, so the loader sees that form too."""
    path = os.path.join(folder, "config.json")
    cfg = json.load(open(path))
    rope = dict(cfg.pop("rope_parameters"))
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = rope
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)


@torch.no_grad()
def oracle(model, prompt):
    ids = torch.tensor([prompt])
    prefill = model(ids, use_cache=False).logits[0]
    out = model(ids, use_cache=True)
    cache = out.cache
    logits = out.logits[0, -1]
    tokens, step_logits = [], []
    for i in range(N_TOKENS):
        step_logits.append(logits)
        tokens.append(int(torch.argmax(logits)))
        if i + 1 < N_TOKENS:
            out = model(torch.tensor([[tokens[-1]]]), cache=cache, use_cache=True)
            cache, logits = out.cache, out.logits[0, -1]
    step_logits = torch.stack(step_logits)
    # sanity: transformers' own prefill vs cached path
    drift = (step_logits[0] - prefill[-1]).abs().max().item()
    top2 = torch.topk(step_logits, 2).values
    print(f"  prefill vs cached last-position drift {drift:.2e}; "
          f"min top-2 gap over greedy steps {(top2[:, 0] - top2[:, 1]).min().item():.3f}")
    return dict(prompt=np.array(prompt, dtype=np.int32), prefill=prefill.numpy().astype(np.float32),
                tokens=np.array(tokens, dtype=np.int32), step_logits=step_logits.numpy().astype(np.float32))


def main():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    for name, cfg in configs():
        folder = os.path.join(FIXTURES, f"tiny-{name}")
        model = AutoModelForCausalLM.from_config(cfg).float().eval()
        perturb(model)
        model.save_pretrained(folder, safe_serialization=True)
        if name == "llama":
            classic_rope_config(folder)
        # the oracle runs the saved folder, so the fixture is exactly what transformers reads back
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        model.config._attn_implementation = "eager"
        prompt = rng.integers(0, VOCAB - 1, PROMPT_LEN).tolist()
        print(f"tiny-{name}: {type(model).__name__}, {sum(p.numel() for p in model.parameters())} params")
        np.savez_compressed(os.path.join(FIXTURES, f"tiny-{name}_oracle.npz"), **oracle(model, prompt))
        size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
        print(f"  {folder}: {size / 1024:.0f} KB")


if __name__ == "__main__":
    main()
