"""Loader interface: GGUF metadata, safetensors folders, MLX folders, GGUF tensors."""
from lattice.formats import read_gguf_metadata


def test_gguf_metadata_smollm2(smollm2_path):
    m = read_gguf_metadata(smollm2_path)
    assert m["general.architecture"] == "llama"
    assert m["llama.block_count"] == 30
    assert m["llama.attention.head_count_kv"] == 3
    assert abs(m["llama.attention.layer_norm_rms_epsilon"] - 1e-5) < 1e-9
    assert m["tokenizer.ggml.model"] == "gpt2"
    assert len(m["tokenizer.ggml.tokens"]) == 49152
    assert m["tokenizer.ggml.tokens"][:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert len(m["tokenizer.ggml.merges"]) == 48900
    assert m["tokenizer.ggml.token_type"][0] == 3
    assert m["tokenizer.ggml.add_bos_token"] is False
    assert "<|im_start|>" in m["tokenizer.chat_template"]


# --- Hugging Face safetensors folders -------------------------------------------------------------

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import FIXTURES
from lattice.errors import (ConfigError, LatticeError, MissingTensorError, ModelFormatError,
                            TensorShapeError, UnsupportedModelError)
from lattice.formats import Checkpoint, Tensor, open_checkpoint

FORMATS = Path(FIXTURES) / "formats"
LLAMA_HF = FORMATS / "tiny-llama-hf"
QWEN35_HF = FORMATS / "tiny-qwen35-hf"


def _copy_folder(src, dst, config_edit=None, tensors=None):
    """A writable copy of an HF fixture folder, optionally with an edited config / new tensors."""
    dst.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((src / "config.json").read_text())
    if config_edit:
        config_edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    if tensors is None:
        shutil.copy(src / "model.safetensors", dst / "model.safetensors")
    else:
        save_file(tensors, str(dst / "model.safetensors"))
    return dst


@pytest.mark.parametrize("folder", [LLAMA_HF, QWEN35_HF], ids=["llama", "qwen35"])
def test_hf_folder_tensors_are_exact_memory_maps(folder):
    ckpt = open_checkpoint(folder)
    assert isinstance(ckpt, Checkpoint)
    assert ckpt.format == "safetensors" and ckpt.folder == folder and ckpt.metadata == {}
    ref = load_file(str(folder / "model.safetensors"))
    assert set(ckpt.tensors) == set(ref)
    for name, t in ckpt.tensors.items():
        assert isinstance(t, Tensor) and t.name == name and t.dtype == "f16"
        assert t.shape == ref[name].shape and t.nbytes == ref[name].nbytes
        assert not t.raw.flags.owndata          # a view of the file, not a copy
        a = t.to_f32()
        assert a.dtype == np.float32 and a.flags.c_contiguous
        np.testing.assert_array_equal(a, ref[name].astype(np.float32))


def test_hf_llama_config():
    cfg = open_checkpoint(LLAMA_HF).config
    assert (cfg.model_type, cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers) == ("llama", 256, 64, 2)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (4, 2, 16)
    assert cfg.rope_theta == 100000.0 and cfg.rope_scaling is None and cfg.tie_word_embeddings
    assert cfg.bos_token_id == 1 and cfg.eos_token_id == [2] and cfg.rms_norm_eps == 1e-5
    assert not (cfg.qk_norm or cfg.norm_add_one or cfg.attention_bias)


def test_hf_qwen35_config():
    cfg = open_checkpoint(QWEN35_HF).config
    assert cfg.model_type == "qwen3_5" and cfg.norm_add_one and cfg.qk_norm and cfg.attn_output_gate
    assert cfg.layer_types == ["linear_attention", "full_attention"]
    assert cfg.partial_rotary_factor == 0.25 and cfg.rotary_dim == 4 and cfg.rope_theta == 1e7
    assert (cfg.linear_num_key_heads, cfg.linear_num_value_heads) == (2, 4)
    assert (cfg.linear_key_head_dim, cfg.linear_value_head_dim, cfg.linear_conv_kernel_dim) == (16, 16, 4)
    assert cfg.bos_token_id is None and cfg.eos_token_id == [255] and not cfg.tie_word_embeddings


def test_hf_qwen35_full_attention_interval(tmp_path):
    def edit(c):
        del c["layer_types"]
        c["full_attention_interval"] = 2
    cfg = open_checkpoint(_copy_folder(QWEN35_HF, tmp_path, edit)).config
    assert cfg.layer_types == ["linear_attention", "full_attention"]


def test_hf_qwen35_vision_language_wrapper(tmp_path):
    """model_type qwen3_5: text_config is the model, model.language_model. is stripped, the vision
    tower and the multi-token-prediction head are dropped."""
    text_cfg = json.loads((QWEN35_HF / "config.json").read_text())
    ref = load_file(str(QWEN35_HF / "model.safetensors"))
    renamed = {k.replace("model.", "model.language_model.", 1): v for k, v in ref.items()}
    renamed["model.visual.blocks.0.attn.qkv.weight"] = np.zeros((3, 2), np.float16)
    renamed["mtp.fc.weight"] = np.zeros((2, 2), np.float16)
    tmp_path.joinpath("config.json").write_text(json.dumps(
        {"model_type": "qwen3_5", "text_config": text_cfg, "tie_word_embeddings": False,
         "vision_config": {"depth": 1}}))
    save_file(renamed, str(tmp_path / "model.safetensors"))
    ckpt = open_checkpoint(tmp_path)
    assert set(ckpt.tensors) == set(ref)
    assert ckpt.config == open_checkpoint(QWEN35_HF).config


def test_hf_sharded_index_and_bf16(tmp_path):
    ref = load_file(str(LLAMA_HF / "model.safetensors"))
    names = sorted(ref)
    bf16 = {k: (v.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16) for k, v in ref.items()}
    shards = {"model-00001-of-00002.safetensors": names[:5], "model-00002-of-00002.safetensors": names[5:]}
    for fname, keys in shards.items():
        # write BF16 headers by hand: safetensors.numpy has no bfloat16
        _write_safetensors(tmp_path / fname, {k: ("BF16", bf16[k]) for k in keys})
    tmp_path.joinpath("model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}))
    shutil.copy(LLAMA_HF / "config.json", tmp_path / "config.json")
    ckpt = open_checkpoint(tmp_path)
    assert set(ckpt.tensors) == set(ref)
    for k, t in ckpt.tensors.items():
        assert t.dtype == "bf16"
        # f16 values of this fixture have <= 11 significant bits: bf16 holds 8, so compare to the
        # truncation we wrote
        np.testing.assert_array_equal(t.to_f32(), (bf16[k].astype(np.uint32) << 16).view(np.float32))


def _write_safetensors(path, tensors, pad_to=8):
    """Minimal writer: {name: (dtype, array)} -> file (arrays written as raw bytes)."""
    header, blobs, offset = {}, [], 0
    for name, (dtype, arr) in tensors.items():
        data = np.ascontiguousarray(arr).tobytes()
        header[name] = {"dtype": dtype, "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % pad_to)
    path.write_bytes(len(text).to_bytes(8, "little") + text + b"".join(blobs))


def test_unsupported_model_type(tmp_path):
    _copy_folder(LLAMA_HF, tmp_path, lambda c: c.update(model_type="gemma3"))
    with pytest.raises(UnsupportedModelError, match="gemma3.*llama.*qwen2.*qwen3"):
        open_checkpoint(tmp_path)


def test_missing_config_field(tmp_path):
    _copy_folder(LLAMA_HF, tmp_path, lambda c: c.pop("intermediate_size"))
    with pytest.raises(ConfigError, match="config.json.*intermediate_size"):
        open_checkpoint(tmp_path)


def test_config_weights_mismatch(tmp_path):
    _copy_folder(LLAMA_HF, tmp_path, lambda c: c.update(hidden_size=128, head_dim=32))
    with pytest.raises(TensorShapeError, match="embed_tokens.*hidden_size"):
        open_checkpoint(tmp_path)


def test_missing_embedding(tmp_path):
    ref = load_file(str(LLAMA_HF / "model.safetensors"))
    del ref["model.embed_tokens.weight"]
    _copy_folder(LLAMA_HF, tmp_path, tensors=ref)
    with pytest.raises(MissingTensorError, match="embed_tokens"):
        open_checkpoint(tmp_path)


def test_integer_weight_dtype_rejected(tmp_path):
    ref = load_file(str(LLAMA_HF / "model.safetensors"))
    ref["model.norm.weight"] = ref["model.norm.weight"].astype(np.int32)
    _copy_folder(LLAMA_HF, tmp_path, tensors=ref)
    with pytest.raises(TensorShapeError, match="model.norm.weight.*I32"):
        open_checkpoint(tmp_path)


def test_missing_weights_and_shards(tmp_path):
    shutil.copy(LLAMA_HF / "config.json", tmp_path / "config.json")
    with pytest.raises(ModelFormatError, match="model.safetensors"):
        open_checkpoint(tmp_path)
    tmp_path.joinpath("model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(ModelFormatError, match="model-00001-of-00002.safetensors.*missing"):
        open_checkpoint(tmp_path)
    with pytest.raises(ModelFormatError, match="no such"):
        open_checkpoint(tmp_path / "nothing-here")


def test_bad_config_json(tmp_path):
    shutil.copy(LLAMA_HF / "model.safetensors", tmp_path / "model.safetensors")
    tmp_path.joinpath("config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json"):
        open_checkpoint(tmp_path)
