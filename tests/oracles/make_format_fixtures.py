"""Make the format fixtures under tests/fixtures/formats/ (needs torch, transformers, the llama.cpp
converter from the llama-cpp-python sdist, mlx + mlx-lm; none of these are needed to run the tests).

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 && tar xzf llama_cpp_python-0.3.36.tar.gz
    pip install --target /tmp/mlxpkgs "mlx[cpu]" && pip install --no-deps --target /tmp/mlxlm mlx-lm
    LLAMA_CPP=.../vendor/llama.cpp MLX_PATH=/tmp/mlxpkgs:/tmp/mlxlm python tests/oracles/make_format_fixtures.py

Writes:
  tiny-llama-hf/, tiny-qwen35-hf/      random tiny transformers checkpoints (f16 safetensors)
  tiny-llama-{f16,q8_0}.gguf, tiny-qwen35-{f16,q8_0}.gguf   the same, through llama.cpp's converter
  tiny-qwen35-mlx4/, tiny-llama-mlx8/  mlx-lm quantized folders (affine, group 32)
  mlx_expected.npz                     mx.dequantize of every quantized MLX weight
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "fixtures" / "formats"
TMP = Path(os.environ.get("TMPDIR", "/tmp")) / "lattice-format-fixtures"


def make_hf_models():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3_5ForCausalLM, Qwen3_5TextConfig

    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
        rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True, initializer_range=0.25,
        bos_token_id=1, eos_token_id=2))
    qwen = Qwen3_5ForCausalLM(Qwen3_5TextConfig(
        vocab_size=256, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=16,
        linear_num_key_heads=2, linear_num_value_heads=4,
        layer_types=["linear_attention", "full_attention"], max_position_embeddings=256,
        initializer_range=0.25, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000000.0,
                         "partial_rotary_factor": 0.25},
        eos_token_id=255, bos_token_id=None, pad_token_id=None))
    with torch.no_grad():
        for model in (llama, qwen):
            # random init leaves norms at 0/1, dt_bias at 1, A_log regular: perturb everything
            for name, p in model.named_parameters():
                if p.ndim == 1:
                    p.add_(0.1 * torch.randn_like(p))
    for model, name in ((llama, "tiny-llama-hf"), (qwen, "tiny-qwen35-hf")):
        path = OUT / name
        shutil.rmtree(path, ignore_errors=True)
        model.half().save_pretrained(path, safe_serialization=True)
        for extra in path.glob("generation_config.json"):
            extra.unlink()
        print(name, sorted((f.name, f.stat().st_size) for f in path.iterdir()))
