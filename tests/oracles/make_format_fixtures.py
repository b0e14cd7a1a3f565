"""Make the format fixtures under tests/fixtures/formats/ (needs torch, transformers, the llama.cpp
converter from the llama-cpp-python sdist, mlx + mlx-lm; none of these are needed to run the tests).

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 && tar xzf llama_cpp_python-0.3.36.tar.gz
    pip install --target /tmp/mlxpkgs "mlx[cpu]" && pip install --no-deps --target /tmp/mlxlm mlx-lm
    LLAMA_CPP=.../vendor/llama.cpp MLX_PATH=/tmp/mlxpkgs:/tmp/mlxlm python tests/oracles/make_format_fixtures.py

Writes:
  tiny-{llama,qwen35,qwen2,qwen3}-hf/   random tiny transformers checkpoints (f16 matrices)
  tiny-{llama,qwen35}-{f16,q8_0}.gguf, tiny-{qwen2,qwen3}-f16.gguf   the same, through llama.cpp's
                                        converter (placeholder vocabulary)
  tiny-qwen35-mlx4/, tiny-llama-mlx8/  mlx-lm quantized folders (4-bit group 32, 8-bit group 64)
  tiny-*-mlx*-expected.npz             mx.dequantize of a few of their weights
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
    from transformers import (LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM,
                              Qwen3_5ForCausalLM, Qwen3_5TextConfig, Qwen3Config, Qwen3ForCausalLM)

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
    small = dict(vocab_size=128, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
                 initializer_range=0.25, rope_theta=1000000.0, tie_word_embeddings=False,
                 bos_token_id=None, eos_token_id=[5, 7])
    qwen2 = Qwen2ForCausalLM(Qwen2Config(**small))
    qwen3 = Qwen3ForCausalLM(Qwen3Config(**small))
    with torch.no_grad():
        for model in (llama, qwen, qwen2, qwen3):
            # random init leaves norms at 0/1, dt_bias at 1, A_log regular: perturb everything
            for name, p in model.named_parameters():
                if p.ndim == 1:
                    p.add_(0.1 * torch.randn_like(p))
    for model, name in ((llama, "tiny-llama-hf"), (qwen, "tiny-qwen35-hf"), (qwen2, "tiny-qwen2-hf"),
                        (qwen3, "tiny-qwen3-hf")):
        path = OUT / name
        shutil.rmtree(path, ignore_errors=True)
        # matrices in f16 keep the files small; 1-D tensors stay f32 so that llama.cpp's converter
        # folds `+1` / `-exp` in f32 (as it does for real bf16 checkpoints, which it upcasts)
        model.half()
        for p in model.parameters():
            if p.ndim == 1:
                p.data = p.data.float()
        model.save_pretrained(path, safe_serialization=True)
        for extra in path.glob("generation_config.json"):
            extra.unlink()
        print(name, sorted((f.name, f.stat().st_size) for f in path.iterdir()))


CONVERT = """
import sys
sys.path[:0] = [{llama_cpp!r} + "/gguf-py", {llama_cpp!r}]
import gguf
import convert_hf_to_gguf
from conversion.llama import LlamaModel
from conversion.qwen import Qwen2Model, Qwen3Model, Qwen3_5TextModel

def placeholder_vocab(self):
    # random tiny models have no tokenizer: distinct single-character tokens
    n = self.hparams["vocab_size"]
    toks = [chr(0x100 + i) for i in range(n)]
    self.gguf_writer.add_tokenizer_model("gpt2")
    self.gguf_writer.add_tokenizer_pre("default")
    self.gguf_writer.add_token_list(toks)
    self.gguf_writer.add_token_types([gguf.TokenType.NORMAL] * n)
    self.gguf_writer.add_token_merges([toks[0] + " " + toks[1]])
    if self.hparams.get("bos_token_id") is not None:
        self.gguf_writer.add_bos_token_id(self.hparams["bos_token_id"])
    eos = self.hparams["eos_token_id"]
    self.gguf_writer.add_eos_token_id(eos[0] if isinstance(eos, list) else eos)

LlamaModel.set_vocab = Qwen2Model.set_vocab = Qwen3Model.set_vocab = placeholder_vocab
Qwen3_5TextModel.set_vocab = placeholder_vocab
sys.argv = ["convert_hf_to_gguf.py", {src!r}, "--outfile", {dst!r}, "--outtype", {outtype!r}] + {extra!r}
convert_hf_to_gguf.main()
"""


def convert_to_gguf(llama_cpp):
    for name, outtypes in (("tiny-llama", ("f16", "q8_0")), ("tiny-qwen35", ("f16", "q8_0")),
                           ("tiny-qwen2", ("f16",)), ("tiny-qwen3", ("f16",))):
        for outtype in outtypes:
            dst = OUT / f"{name}-{outtype}.gguf"
            code = CONVERT.format(llama_cpp=llama_cpp, src=str(OUT / f"{name}-hf"), dst=str(dst),
                                  outtype=outtype, extra=["--no-mtp"] if name == "tiny-qwen35" else [])
            r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
            if r.returncode:
                sys.exit(r.stderr[-3000:])
            print(dst.name, dst.stat().st_size)


MLX_CONVERT = """
import json, shutil, sys
import numpy as np
import mlx.core as mx
from mlx_lm import convert
src, dst, bits, group, npz = sys.argv[1:6]
convert(src, mlx_path=dst, quantize=True, q_group_size=int(group), q_bits=int(bits))
weights = mx.load(dst + "/model.safetensors")
expected = {}
for name in sys.argv[6:]:
    base = name[:-len(".weight")]
    # dequantize with f32 scales/biases: the reference for the bit layout, free of f16 rounding
    w = mx.dequantize(weights[name], weights[base + ".scales"].astype(mx.float32),
                      weights[base + ".biases"].astype(mx.float32), int(group), int(bits))
    expected[name] = np.array(w.astype(mx.float32))
np.savez_compressed(npz, **expected)
"""


def make_mlx(mlx_path):
    env = dict(os.environ, PYTHONPATH=mlx_path)
    jobs = [("tiny-qwen35", 4, 32, ["language_model.model.layers.0.linear_attn.in_proj_a.weight",
                                    "language_model.model.layers.1.self_attn.k_proj.weight",
                                    "language_model.model.layers.0.mlp.down_proj.weight"]),
            ("tiny-llama", 8, 64, ["model.layers.0.self_attn.k_proj.weight",
                                   "model.layers.1.mlp.down_proj.weight"])]
    for name, bits, group, names in jobs:
        src = TMP / f"{name}-src"
        shutil.rmtree(src, ignore_errors=True)
        shutil.copytree(OUT / f"{name}-hf", src)
        # mlx-lm insists on loading a tokenizer: a trivial one (not part of the fixture)
        from tokenizers import Tokenizer, models
        Tokenizer(models.WordLevel({chr(0x100 + i): i for i in range(256)}, unk_token=chr(0x100))
                  ).save(str(src / "tokenizer.json"))
        if name == "tiny-qwen35":
            # mlx-lm knows the model_type qwen3_5 (flat) and builds layers from the interval only
            cfg = json.loads((src / "config.json").read_text())
            cfg.update(model_type="qwen3_5", full_attention_interval=2)
            (src / "config.json").write_text(json.dumps(cfg))
        dst = OUT / f"{name}-mlx{bits}"
        shutil.rmtree(dst, ignore_errors=True)
        npz = OUT / f"{name}-mlx{bits}-expected.npz"
        r = subprocess.run([sys.executable, "-c", MLX_CONVERT, str(src), str(dst), str(bits),
                            str(group), str(npz)] + names, env=env, capture_output=True, text=True)
        if r.returncode:
            sys.exit(r.stderr[-3000:])
        for extra in dst.iterdir():
            if extra.name not in ("config.json", "model.safetensors"):
                extra.unlink()
        print(dst.name, sorted((f.name, f.stat().st_size) for f in dst.iterdir()), npz.stat().st_size)


if __name__ == "__main__":
    TMP.mkdir(parents=True, exist_ok=True)
    make_hf_models()
    convert_to_gguf(os.environ["LLAMA_CPP"])
    make_mlx(os.environ["MLX_PATH"])
