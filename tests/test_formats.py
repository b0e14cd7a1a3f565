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
        assert isinstance(t, Tensor) and t.name == name
        assert t.dtype == ("f32" if ref[name].dtype == np.float32 else "f16")
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


# --- GGUF ------------------------------------------------------------------------------------------
# The fixtures were converted from the HF folders above by llama.cpp's own convert_hf_to_gguf.py
# (tests/oracles/make_format_fixtures.py): loading them must give back the HF checkpoint exactly.

@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen35"])
def test_gguf_f16_equals_hf_exactly(name):
    hf = open_checkpoint(FORMATS / f"{name}-hf")
    g = open_checkpoint(FORMATS / f"{name}-f16.gguf")
    assert g.format == "gguf" and g.folder is None and g.path == FORMATS / f"{name}-f16.gguf"
    assert g.metadata["general.architecture"] in ("llama", "qwen35")
    assert g.config == hf.config
    assert set(g.tensors) == set(hf.tensors)
    for k, t in hf.tensors.items():
        got = g.tensors[k]
        assert got.name == k and got.shape == t.shape, k
        a = got.to_f32()
        assert a.dtype == np.float32 and a.flags.c_contiguous
        # norms (+1 folded and removed) and A_log (-exp, then log) go through f32 arithmetic
        np.testing.assert_allclose(a, t.to_f32(), rtol=2e-7, atol=1e-7, err_msg=k)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen35"])
def test_gguf_q8_0_rows_in_hf_order(name):
    """Quantized q/k (llama) and value-head (qwen35) rows are permuted back: every row is within
    the Q8_0 bound of its HF row (a wrong permutation is off by O(1))."""
    hf = open_checkpoint(FORMATS / f"{name}-hf")
    g = open_checkpoint(FORMATS / f"{name}-q8_0.gguf")
    assert g.config == hf.config and set(g.tensors) == set(hf.tensors)
    n_q8 = 0
    for k, t in hf.tensors.items():
        ref, got = t.to_f32(), g.tensors[k]
        if got.dtype == "q8_0":
            n_q8 += 1
            assert got.raw.dtype == np.uint8 and got.raw.shape == (ref.shape[0], ref.shape[1] // 32 * 34)
            blocks = ref.reshape(ref.shape[0], -1, 32)
            # llama.cpp: d = max|w|/127 rounded to f16 (2**-11 relative), q = round(w/d) in -127..127
            bound = np.abs(blocks).max(-1, keepdims=True) / 127 * (0.5 + 127 * 2**-11) + 1e-7
            assert (np.abs(got.to_f32().reshape(blocks.shape) - blocks) <= bound).all(), k
        else:
            np.testing.assert_allclose(got.to_f32(), ref, rtol=1e-6, atol=4e-3, err_msg=k)
    assert n_q8 >= 14


def test_gguf_qwen35_conventions_undone():
    """Spot checks of the individual conventions, so a failure says which one broke."""
    g = open_checkpoint(FORMATS / "tiny-qwen35-f16.gguf")
    hf = open_checkpoint(FORMATS / "tiny-qwen35-hf")
    t = g.tensors
    assert t["model.layers.0.linear_attn.conv1d.weight"].shape == (128, 1, 4)
    assert t["model.layers.0.linear_attn.A_log"].dtype == "f32"
    # the GDN output norm is stored as is; the others have +1 in the file
    raw = t["model.layers.0.linear_attn.norm.weight"].raw
    np.testing.assert_array_equal(raw, hf.tensors["model.layers.0.linear_attn.norm.weight"].to_f32())
    assert g.metadata["qwen35.attention.recurrent_layers"] == [True, False]
    # value-head order: v rows of in_proj_qkv start after q and k (2 * 2 heads * 16)
    np.testing.assert_array_equal(t["model.layers.0.linear_attn.in_proj_qkv.weight"].to_f32()[64:],
                                  hf.tensors["model.layers.0.linear_attn.in_proj_qkv.weight"].to_f32()[64:])


def test_gguf_smollm2_real_file(smollm2_path):
    ckpt = open_checkpoint(smollm2_path)
    cfg = ckpt.config
    assert (cfg.model_type, cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size) == ("llama", 49152, 576, 1536)
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (30, 9, 3, 64)
    assert cfg.rope_theta == 100000.0 and cfg.rms_norm_eps == 1e-5 and cfg.tie_word_embeddings
    assert cfg.bos_token_id == 1 and cfg.eos_token_id == [2] and cfg.max_position_embeddings == 8192
    assert len(ckpt.tensors) == 272 and "lm_head.weight" not in ckpt.tensors
    dtypes = {t.dtype for t in ckpt.tensors.values()}
    assert dtypes == {"q4_1", "q8_0", "f32"}
    q = ckpt.tensors["model.layers.0.self_attn.q_proj.weight"]
    assert q.dtype == "q4_1" and q.shape == (576, 576) and q.raw.shape == (576, 576 // 32 * 20)
    k = ckpt.tensors["model.layers.0.self_attn.k_proj.weight"]
    assert k.shape == (192, 576)
    emb = ckpt.tensors["model.embed_tokens.weight"]
    assert emb.shape == (49152, 576) and emb.dtype == "q8_0"
    assert not emb.raw.flags.owndata
    w = q.to_f32()
    assert w.shape == (576, 576) and np.isfinite(w).all() and 0.01 < w.std() < 1.0
    norm = ckpt.tensors["model.norm.weight"].to_f32()
    assert norm.shape == (576,) and 0.1 < np.abs(norm).mean() < 10


def test_gguf_smollm2_qk_permutation_is_undone(smollm2_path):
    """The q/k permutation pairs rows (i, i + hd/2) of HF with (2i, 2i+1) of GGUF. Undoing it must
    give the same rows as applying our inverse to the native rows by hand."""
    ckpt = open_checkpoint(smollm2_path)
    from lattice.formats.gguf_header import parse_gguf_header
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize
    info = {t.name: t for t in parse_gguf_header(smollm2_path).tensors}["blk.3.attn_k.weight"]
    raw = np.memmap(smollm2_path, np.uint8, "r", offset=info.offset, shape=(192 * 18 * 20,))
    native = dequantize(np.asarray(raw).reshape(192, -1), GGMLQuantizationType.Q4_1)
    got = ckpt.tensors["model.layers.3.self_attn.k_proj.weight"].to_f32()
    for head in range(3):
        for i in range(32):
            np.testing.assert_array_equal(got[head * 64 + i], native[head * 64 + 2 * i])
            np.testing.assert_array_equal(got[head * 64 + 32 + i], native[head * 64 + 2 * i + 1])


# --- MLX-quantized folders -------------------------------------------------------------------------
# Made by mlx-lm's convert from the HF folders above; the expected values are mx.dequantize's.

MLX_FOLDERS = [("tiny-qwen35", 4, 32), ("tiny-llama", 8, 64)]


@pytest.mark.parametrize("name,bits,group", MLX_FOLDERS, ids=["qwen35-q4-g32", "llama-q8-g64"])
def test_mlx_dequantize_matches_mlx(name, bits, group):
    from lattice.formats.checkpoint import canonical_name
    ckpt = open_checkpoint(FORMATS / f"{name}-mlx{bits}")
    assert ckpt.format == "mlx" and ckpt.folder == FORMATS / f"{name}-mlx{bits}"
    expected = np.load(FORMATS / f"{name}-mlx{bits}-expected.npz")
    assert len(expected.files) >= 2
    for stored in expected.files:
        t = ckpt.tensors[canonical_name(stored)]
        assert t.dtype == f"mlx_q{bits}" and t.group_size == group
        assert t.raw.dtype == np.uint32 and t.raw.shape == (t.shape[0], t.shape[1] * bits // 32)
        assert t.nbytes == t.raw.nbytes + t.scales.nbytes + t.biases.nbytes
        np.testing.assert_array_equal(t.to_f32(), expected[stored])


@pytest.mark.parametrize("name,bits,group", MLX_FOLDERS, ids=["qwen35-q4-g32", "llama-q8-g64"])
def test_mlx_folder_matches_hf(name, bits, group):
    """Same names, config and float tensors as the HF folder (Qwen3.5: mlx-lm's `+1` norms and
    [C, K, 1] conv1d undone); quantized weights within the affine quantization error."""
    hf = open_checkpoint(FORMATS / f"{name}-hf")
    ckpt = open_checkpoint(FORMATS / f"{name}-mlx{bits}")
    assert ckpt.config == hf.config and set(ckpt.tensors) == set(hf.tensors)
    for k, t in ckpt.tensors.items():
        ref = hf.tensors[k].to_f32()
        got = t.to_f32()
        assert got.shape == ref.shape, k
        if t.dtype.startswith("mlx_"):
            groups = ref.reshape(ref.shape[0], -1, group)
            step = (groups.max(-1) - groups.min(-1)) / (2 ** bits - 1)
            err = np.abs(got.reshape(groups.shape) - groups).max(-1)
            # mlx shifts the grid so that 0 is exactly representable: up to one step of error
            assert (err <= step + 1e-3).all(), k
        else:
            np.testing.assert_allclose(got, ref, rtol=0, atol=1e-7, err_msg=k)


def _mlx_copy(tmp_path, edit=None, name="tiny-qwen35-mlx4"):
    src = FORMATS / name
    cfg = json.loads((src / "config.json").read_text())
    if edit:
        edit(cfg)
    tmp_path.joinpath("config.json").write_text(json.dumps(cfg))
    shutil.copy(src / "model.safetensors", tmp_path / "model.safetensors")
    return tmp_path


def test_mlx_per_module_override(tmp_path):
    # the override is keyed by mlx-lm's module path; claiming 8 bits contradicts the stored shapes
    module = "language_model.model.layers.0.mlp.up_proj"
    _mlx_copy(tmp_path, lambda c: c["quantization"].update({module: {"bits": 8, "group_size": 32}}))
    with pytest.raises(TensorShapeError, match="up_proj.scales.*8 bits"):
        open_checkpoint(tmp_path)
    _mlx_copy(tmp_path, lambda c: c["quantization"].update({module: False}))
    with pytest.raises(ModelFormatError, match="up_proj.*not quantized"):
        open_checkpoint(tmp_path)


def test_mlx_unsupported_bits_and_mode(tmp_path):
    _mlx_copy(tmp_path, lambda c: c["quantization"].update(bits=3))
    with pytest.raises(UnsupportedModelError, match="3 bits"):
        open_checkpoint(tmp_path)
    _mlx_copy(tmp_path, lambda c: c["quantization"].update(mode="mxfp4"))
    with pytest.raises(UnsupportedModelError, match="mxfp4"):
        open_checkpoint(tmp_path)


def test_hf_quantization_method_unsupported(tmp_path):
    _copy_folder(LLAMA_HF, tmp_path, lambda c: c.update(quantization_config={"quant_method": "gptq"}))
    with pytest.raises(UnsupportedModelError, match="gptq"):
        open_checkpoint(tmp_path)
