"""Loader interface: GGUF metadata, safetensors folders, MLX folders, GGUF tensors, bad input."""
import dataclasses
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize
from safetensors.numpy import load_file, save_file

from conftest import FIXTURES
from lattice.errors import (ConfigError, MissingTensorError, ModelFormatError, TensorShapeError,
                            UnsupportedModelError)
from lattice.formats import Checkpoint, Tensor, open_checkpoint, read_gguf_metadata
from lattice.formats.checkpoint import canonical_name
from lattice.formats.gguf_header import parse_gguf_header

FORMATS = Path(FIXTURES) / "formats"
LLAMA_HF = FORMATS / "tiny-llama-hf"
QWEN35_HF = FORMATS / "tiny-qwen35-hf"



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


LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}


@pytest.mark.parametrize("style", ["rope_scaling", "rope_parameters"])
def test_hf_llama3_rope_scaling(tmp_path, style):
    def edit(c):
        c.pop("rope_theta", None)
        c.pop("rope_parameters", None)
        if style == "rope_scaling":          # transformers 4 style
            c.update(rope_theta=500000.0, rope_scaling=dict(LLAMA3_SCALING))
        else:                                # transformers 5 style
            c.update(rope_parameters=dict(LLAMA3_SCALING, rope_theta=500000.0))
    cfg = open_checkpoint(_copy_folder(LLAMA_HF, tmp_path, edit)).config
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling == LLAMA3_SCALING


def test_hf_qwen2_qwen3_configs():
    q2 = open_checkpoint(FORMATS / "tiny-qwen2-hf")
    q3 = open_checkpoint(FORMATS / "tiny-qwen3-hf")
    assert q2.config.model_type == "qwen2" and q2.config.attention_bias and not q2.config.qk_norm
    assert "model.layers.0.self_attn.q_proj.bias" in q2.tensors
    assert q3.config.model_type == "qwen3" and q3.config.qk_norm and not q3.config.attention_bias
    assert "model.layers.0.self_attn.q_norm.weight" in q3.tensors
    for c in (q2.config, q3.config):
        assert c.eos_token_id == [5, 7] and c.bos_token_id is None and c.rope_theta == 1e6


@pytest.mark.parametrize("eos,expected", [(0, [0]), ([3, 0], [3, 0]), (None, [])])
def test_hf_eos_forms(tmp_path, eos, expected):
    cfg = open_checkpoint(_copy_folder(LLAMA_HF, tmp_path, lambda c: c.update(eos_token_id=eos))).config
    assert cfg.eos_token_id == expected


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


def test_absurd_layer_count(tmp_path):
    _copy_folder(LLAMA_HF, tmp_path, lambda c: c.update(num_hidden_layers=10 ** 12))
    with pytest.raises(ConfigError, match="config.json.*num_hidden_layers.*1000000000000"):
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


def test_open_checkpoint_path_forms(tmp_path):
    assert open_checkpoint(LLAMA_HF / "config.json").folder == LLAMA_HF
    assert open_checkpoint(LLAMA_HF / "model.safetensors").format == "safetensors"
    shutil.copy(FORMATS / "tiny-qwen3-f16.gguf", tmp_path / "a.gguf")
    assert open_checkpoint(tmp_path).path == tmp_path / "a.gguf"
    shutil.copy(FORMATS / "tiny-qwen2-f16.gguf", tmp_path / "b.gguf")
    with pytest.raises(ModelFormatError, match="several GGUF files.*a.gguf, b.gguf"):
        open_checkpoint(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="config.json not found"):
        open_checkpoint(empty)


def test_bad_config_json(tmp_path):
    shutil.copy(LLAMA_HF / "model.safetensors", tmp_path / "model.safetensors")
    tmp_path.joinpath("config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json"):
        open_checkpoint(tmp_path)


# --- GGUF ------------------------------------------------------------------------------------------
# The fixtures were converted from the HF folders above by llama.cpp's own convert_hf_to_gguf.py
# (tests/oracles/make_format_fixtures.py): loading them must give back the HF checkpoint exactly.

@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen35", "tiny-qwen2", "tiny-qwen3"])
def test_gguf_f16_equals_hf_exactly(name):
    hf = open_checkpoint(FORMATS / f"{name}-hf")
    g = open_checkpoint(FORMATS / f"{name}-f16.gguf")
    assert g.format == "gguf" and g.folder is None and g.path == FORMATS / f"{name}-f16.gguf"
    assert g.metadata["general.architecture"] == name[len("tiny-"):]
    # GGUF keeps one eos id (the converter writes the first of HF's list)
    assert g.config.eos_token_id == hf.config.eos_token_id[:1]
    assert dataclasses.replace(g.config, eos_token_id=hf.config.eos_token_id) == hf.config
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
    """Quantized q/k (llama) and value-head (qwen35) rows are permuted back without touching the
    blocks: each quantized tensor's raw bytes equal the gguf package's Q8_0 of the HF weights."""
    hf = open_checkpoint(FORMATS / f"{name}-hf")
    g = open_checkpoint(FORMATS / f"{name}-q8_0.gguf")
    assert g.config == hf.config and set(g.tensors) == set(hf.tensors)
    n_q8 = 0
    for k, t in hf.tensors.items():
        ref, got = t.to_f32(), g.tensors[k]
        if got.dtype == "q8_0":
            n_q8 += 1
            assert got.raw.dtype == np.uint8 and got.raw.shape == (ref.shape[0], ref.shape[1] // 32 * 34)
            np.testing.assert_array_equal(got.raw, gguf_quantize(ref, QT.Q8_0), err_msg=k)
        else:
            # f32 in the file, or a quantized out_proj whose columns had to be permuted (f32 here):
            # llama.cpp's Q8_0 error is at most 1/254 of the block max plus f16 rounding of d
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
    info = {t.name: t for t in parse_gguf_header(smollm2_path).tensors}["blk.3.attn_k.weight"]
    raw = np.memmap(smollm2_path, np.uint8, "r", offset=info.offset, shape=(192 * 18 * 20,))
    native = gguf_dequantize(np.asarray(raw).reshape(192, -1), QT.Q4_1)
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


# --- GGUF quantized types: byte layouts -----------------------------------------------------------
# A minimal GGUF writer (independent of the gguf package) so that tests control every byte.


def _gguf_string(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def _gguf_value(v):
    """(type id, bytes) for the metadata values tests use."""
    if isinstance(v, bool):
        return 7, struct.pack("<?", v)
    if isinstance(v, int):
        if 0 <= v < 2 ** 32:
            return 4, struct.pack("<I", v)
        return (10, struct.pack("<Q", v)) if v > 0 else (11, struct.pack("<q", v))
    if isinstance(v, float):
        return 6, struct.pack("<f", v)
    if isinstance(v, str):
        return 8, _gguf_string(v)
    if isinstance(v, list):
        etype, _ = _gguf_value(v[0]) if v else (4, b"")
        return 9, struct.pack("<IQ", etype, len(v)) + b"".join(_gguf_value(x)[1] for x in v)
    raise TypeError(v)


def gguf_bytes(metadata, tensors, version=3, n_tensors=None, n_kv=None, alignment=32):
    """metadata: {key: value}; tensors: [(name, numpy shape, ggml type, raw bytes)]."""
    kv = b"".join(_gguf_string(k) + struct.pack("<I", _gguf_value(v)[0]) + _gguf_value(v)[1]
                  for k, v in metadata.items())
    infos, data = b"", b""
    for name, shape, qtype, raw in tensors:
        data += b"\0" * (-len(data) % alignment)
        infos += _gguf_string(name) + struct.pack("<I", len(shape))
        infos += b"".join(struct.pack("<Q", d) for d in reversed(shape))
        infos += struct.pack("<IQ", int(qtype), len(data))
        data += raw
    head = b"GGUF" + struct.pack("<IQQ", version,
                                 len(tensors) if n_tensors is None else n_tensors,
                                 len(metadata) if n_kv is None else n_kv) + kv + infos
    return head + b"\0" * (-len(head) % alignment) + data


def llama_meta(hidden=256, vocab=4, **extra):
    meta = {"general.architecture": "llama", "llama.block_count": 1,
            "llama.embedding_length": hidden, "llama.feed_forward_length": hidden,
            "llama.attention.head_count": 2, "llama.attention.head_count_kv": 2,
            "llama.context_length": 64, "llama.vocab_size": vocab,
            "llama.attention.layer_norm_rms_epsilon": 1e-5, "tokenizer.ggml.eos_token_id": 2}
    meta.update(extra)
    return meta


def llama_gguf(tmp_path, extra_tensors=(), meta=None, name="m.gguf", **kw):
    emb = np.arange(4 * 256, dtype=np.float32).reshape(4, 256) / 1024
    tensors = [("token_embd.weight", (4, 256), QT.F32, emb.tobytes())] + list(extra_tensors)
    path = tmp_path / name
    path.write_bytes(gguf_bytes(meta or llama_meta(), tensors, **kw))
    return path


def _f16(x):
    return np.array(x, np.float16).tobytes()


def decode_q4_k(block: bytes) -> np.ndarray:
    """Q4_K, 256 weights in 144 bytes: f16 d, f16 dmin, 12 bytes of eight 6-bit (scale, min)
    pairs, 128 bytes of nibbles. Sub-block j (32 weights): w = d * sc[j] * q - dmin * m[j].
    Pairs 0-3: sc = s[j] & 63, m = s[j+4] & 63; pairs 4-7 take their low 4 bits from s[j+4]
    (sc low nibble, m high nibble) and their top 2 bits from the top bits of s[j-4] / s[j].
    Nibbles: 64-weight chunk c uses bytes 32c..32c+31, low nibbles -> sub-block 2c, high -> 2c+1."""
    d, dmin = np.frombuffer(block[:4], np.float16).astype(np.float64)
    s, qs = block[4:16], block[16:]
    out = np.zeros(256)
    for j in range(8):
        if j < 4:
            sc, m = s[j] & 63, s[j + 4] & 63
        else:
            sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4)
            m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4)
        c, high = divmod(j, 2)
        for l in range(32):
            q = (qs[32 * c + l] >> 4) if high else (qs[32 * c + l] & 0xF)
            out[32 * j + l] = d * sc * q - dmin * m
    return out


def decode_q6_k(block: bytes) -> np.ndarray:
    """Q6_K, 256 weights in 210 bytes: 128 bytes low nibbles (ql), 64 bytes of 2-bit highs (qh),
    16 int8 scales, f16 d. Each 128-weight half h uses ql[64h:], qh[32h:], scales[8h:]; for
    l < 32, weights l, l+32, l+64, l+96 take ql[l] low, ql[l+32] low, ql[l] high, ql[l+32] high
    with qh[l] bits 0-1, 2-3, 4-5, 6-7 on top; q - 32 times d * scale[l // 16 + 0/2/4/6]."""
    ql, qh = block[:128], block[128:192]
    sc = np.frombuffer(block[192:208], np.int8).astype(np.float64)
    d = float(np.frombuffer(block[208:210], np.float16)[0])
    out = np.zeros(256)
    for h in range(2):
        L, H, S = ql[64 * h:], qh[32 * h:], sc[8 * h:]
        for l in range(32):
            qs = [(L[l] & 0xF) | (((H[l] >> 0) & 3) << 4), (L[l + 32] & 0xF) | (((H[l] >> 2) & 3) << 4),
                  (L[l] >> 4) | (((H[l] >> 4) & 3) << 4), (L[l + 32] >> 4) | (((H[l] >> 6) & 3) << 4)]
            for i, q in enumerate(qs):
                out[128 * h + l + 32 * i] = d * S[l // 16 + 2 * i] * (q - 32)
    return out


def decode_q5_0(block: bytes) -> np.ndarray:
    """Q5_0, 32 weights in 22 bytes: f16 d, u32 qh (5th bits), 16 bytes of nibbles; weight j < 16 is
    low nibble of byte j with bit j of qh, weight j + 16 the high nibble with bit j + 16; (q-16)*d."""
    d = float(np.frombuffer(block[:2], np.float16)[0])
    qh = int.from_bytes(block[2:6], "little")
    out = np.zeros(32)
    for j in range(16):
        out[j] = d * (((block[6 + j] & 0xF) | (((qh >> j) & 1) << 4)) - 16)
        out[j + 16] = d * (((block[6 + j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) - 16)
    return out


def _hand_blocks(rng, qtype):
    """Two rows of 256 weights of random quant bytes with chosen, finite f16 scales."""
    if qtype == QT.Q4_K:
        b = bytearray(rng.integers(0, 256, 144, dtype=np.uint8).tobytes())
        b[:4] = _f16([0.0123, 0.0045])
        return [bytes(b)], decode_q4_k
    if qtype == QT.Q6_K:
        b = bytearray(rng.integers(0, 256, 210, dtype=np.uint8).tobytes())
        b[208:] = _f16(0.0031)
        return [bytes(b)], decode_q6_k
    blocks = []
    for i in range(8):
        b = bytearray(rng.integers(0, 256, 22, dtype=np.uint8).tobytes())
        b[:2] = _f16(0.01 * (i + 1))
        blocks.append(bytes(b))
    return blocks, decode_q5_0


@pytest.mark.parametrize("qtype", [QT.Q4_K, QT.Q6_K, QT.Q5_0], ids=["Q4_K", "Q6_K", "Q5_0"])
def test_gguf_hand_built_blocks(tmp_path, qtype):
    rng = np.random.default_rng(int(qtype))
    rows = []
    for _ in range(2):
        blocks, decode = _hand_blocks(rng, qtype)
        rows.append(b"".join(blocks))
    raw = b"".join(rows)
    if qtype == QT.Q5_0:   # 8 blocks of 32 per row of 256
        expected = np.stack([np.concatenate([decode_q5_0(r[i:i + 22]) for i in range(0, len(r), 22)])
                             for r in rows])
    else:
        expected = np.stack([decode(r) for r in rows])
    path = llama_gguf(tmp_path, [("blk.0.ffn_up.weight", (2, 256), qtype, raw)])
    t = open_checkpoint(path).tensors["model.layers.0.mlp.up_proj.weight"]
    assert t.dtype == qtype.name.lower() and t.shape == (2, 256) and t.raw.shape == (2, len(rows[0]))
    np.testing.assert_allclose(t.to_f32(), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.F16, QT.BF16, QT.F32],
                         ids=lambda q: q.name)
def test_gguf_round_trip_types(tmp_path, qtype):
    """Weights quantized by the gguf package, read back through open_checkpoint."""
    rng = np.random.default_rng(7)
    w = rng.standard_normal((3, 256)).astype(np.float32)
    raw = gguf_quantize(w, qtype)
    path = llama_gguf(tmp_path, [("blk.0.ffn_down.weight", (3, 256), qtype, raw.tobytes())])
    t = open_checkpoint(path).tensors["model.layers.0.mlp.down_proj.weight"]
    assert t.dtype == {"F32": "f32", "F16": "f16", "BF16": "bf16"}.get(qtype.name, qtype.name.lower())
    got = t.to_f32()
    np.testing.assert_array_equal(got, gguf_dequantize(raw, qtype).reshape(3, 256).astype(np.float32))
    tol = {QT.Q4_0: 0.25, QT.Q4_1: 0.2, QT.Q5_0: 0.12, QT.Q8_0: 0.02, QT.BF16: 0.02}.get(qtype, 1e-3)
    assert np.abs(got - w).max() < tol


# --- Bad input: every case raises a LatticeError naming the file (and tensor) ------------------------

def _write(tmp_path, data, name="bad.gguf"):
    p = tmp_path / name
    p.write_bytes(data)
    return p


def test_gguf_truncated_anywhere(tmp_path):
    good = (FORMATS / "tiny-llama-f16.gguf").read_bytes()
    header = parse_gguf_header(FORMATS / "tiny-llama-f16.gguf")
    cuts = [0, 3, 7, 20, 100, 1000, header.data_offset - 9, header.data_offset + 10, len(good) - 1]
    for cut in cuts:
        p = _write(tmp_path, good[:cut], f"cut{cut}.gguf")
        with pytest.raises(ModelFormatError, match=f"cut{cut}.gguf"):
            open_checkpoint(p)


def test_gguf_not_gguf_and_versions(tmp_path):
    with pytest.raises(ModelFormatError, match="not a GGUF file"):
        open_checkpoint(_write(tmp_path, b"PK\x03\x04" + b"\0" * 100))
    for version, msg in ((1, "unsupported GGUF version 1"), (3 << 24, "big-endian")):
        data = gguf_bytes(llama_meta(), [], version=version)
        with pytest.raises(ModelFormatError, match=msg):
            open_checkpoint(_write(tmp_path, data))


@pytest.mark.parametrize("field", ["n_tensors", "n_kv"])
def test_gguf_absurd_counts(tmp_path, field):
    data = gguf_bytes(llama_meta(), [], **{field: 2 ** 62})
    with pytest.raises(ModelFormatError, match="absurd"):
        open_checkpoint(_write(tmp_path, data))


def test_gguf_absurd_lengths(tmp_path):
    base = b"GGUF" + struct.pack("<IQQ", 3, 0, 1)
    # a key whose length runs past the end of the file
    with pytest.raises(ModelFormatError, match="key of metadata entry 0 needs 1152921504606846976 bytes"):
        open_checkpoint(_write(tmp_path, base + struct.pack("<Q", 2 ** 60) + b"abc" * 20))
    # an array with 2**61 u32 elements
    arr = _gguf_string("k") + struct.pack("<IIQ", 9, 4, 2 ** 61) + b"\0" * 64
    with pytest.raises(ModelFormatError, match="elements of 'k'"):
        open_checkpoint(_write(tmp_path, base + arr))
    # an array of 2**61 strings
    arr = _gguf_string("k") + struct.pack("<IIQ", 9, 8, 2 ** 61) + b"\0" * 64
    with pytest.raises(ModelFormatError, match="strings of 'k'"):
        open_checkpoint(_write(tmp_path, base + arr))
    # an unknown value type
    with pytest.raises(ModelFormatError, match="unknown value type 77"):
        open_checkpoint(_write(tmp_path, base + _gguf_string("k") + struct.pack("<I", 77) + b"\0" * 16))


def test_gguf_absurd_dimensions(tmp_path):
    meta = llama_meta()
    data = gguf_bytes(meta, [("token_embd.weight", (1,) * 40, QT.F32, b"\0" * 4)])
    with pytest.raises(ModelFormatError, match="'token_embd.weight' has absurd dimension count 40"):
        open_checkpoint(_write(tmp_path, data))
    # huge dimensions: the byte count is checked against the file, nothing is allocated
    data = gguf_bytes(meta, [("token_embd.weight", (2 ** 40, 2 ** 20), QT.F32, b"\0" * 64)])
    with pytest.raises(ModelFormatError, match="'token_embd.weight'.*runs past the end"):
        open_checkpoint(_write(tmp_path, data))


def test_gguf_offset_out_of_range_and_misaligned(tmp_path):
    good = gguf_bytes(llama_meta(), [("token_embd.weight", (4, 256), QT.F32, b"\0" * 4096)])
    with pytest.raises(ModelFormatError, match="'token_embd.weight'.*runs past the end"):
        open_checkpoint(_write(tmp_path, good[:-1]))
    # patch the tensor's data offset (the last 8 bytes of its info) to a huge / misaligned value
    info_end = good.index(b"token_embd.weight") + len("token_embd.weight") + 4 + 16 + 4 + 8
    for offset, msg in ((2 ** 40, "runs past the end"), (3, "not a multiple of 32")):
        bad = good[:info_end - 8] + struct.pack("<Q", offset) + good[info_end:]
        with pytest.raises(ModelFormatError, match=msg):
            open_checkpoint(_write(tmp_path, bad))


def test_gguf_unknown_and_unsupported_types(tmp_path):
    raw = b"\0" * 66
    p = llama_gguf(tmp_path, [("blk.0.ffn_up.weight", (1, 256), QT.IQ2_XXS, raw)])
    with pytest.raises(UnsupportedModelError, match="'blk.0.ffn_up.weight'.*IQ2_XXS.*Q6_K"):
        open_checkpoint(p)
    p = llama_gguf(tmp_path, [("blk.0.ffn_up.weight", (1, 256), 200, raw)])
    with pytest.raises(UnsupportedModelError, match="'blk.0.ffn_up.weight'.*unknown type 200"):
        open_checkpoint(p)


def test_gguf_block_size_mismatch(tmp_path):
    p = llama_gguf(tmp_path, [("blk.0.ffn_up.weight", (2, 48), QT.Q8_0, b"\0" * 68)])
    with pytest.raises(ModelFormatError, match="'blk.0.ffn_up.weight'.*row length 48"):
        open_checkpoint(p)


def test_gguf_metadata_problems(tmp_path):
    meta = llama_meta()
    del meta["llama.embedding_length"]
    with pytest.raises(ConfigError, match="m.gguf.*llama.embedding_length"):
        open_checkpoint(llama_gguf(tmp_path, meta=meta))
    with pytest.raises(UnsupportedModelError, match="'gemma3'.*llama.*qwen35"):
        open_checkpoint(llama_gguf(tmp_path, meta=llama_meta(**{"general.architecture": "gemma3"})))
    with pytest.raises(ConfigError, match="m.gguf.*llama.block_count.*4294967295"):
        open_checkpoint(llama_gguf(tmp_path, meta=llama_meta(**{"llama.block_count": 2 ** 32 - 1})))
    with pytest.raises(ConfigError, match="m.gguf.*num_attention_heads"):
        open_checkpoint(llama_gguf(tmp_path, meta=llama_meta(**{"llama.attention.head_count": 3})))
    # config/weights mismatch: the embedding table is [4, 256]
    with pytest.raises(TensorShapeError, match="m.gguf.*embed_tokens.*\\(4, 128\\)"):
        open_checkpoint(llama_gguf(tmp_path, meta=llama_meta(hidden=128)))


def test_gguf_bad_tensor_names(tmp_path):
    emb = ("blk.0.ffn_up.weight", (1, 256), QT.F32, b"\0" * 1024)
    with pytest.raises(ModelFormatError, match="duplicate tensor name 'blk.0.ffn_up.weight'"):
        open_checkpoint(llama_gguf(tmp_path, [emb, emb]))
    with pytest.raises(UnsupportedModelError, match="unknown tensor 'blk.0.mystery.weight'"):
        open_checkpoint(llama_gguf(tmp_path, [("blk.0.mystery.weight", (1, 256), QT.F32, b"\0" * 1024)]))
    for bad in (np.zeros(64), np.full(64, np.nan), np.ones(32)):
        with pytest.raises(UnsupportedModelError, match="rope_freqs.*no rope frequency divisors"):
            open_checkpoint(llama_gguf(tmp_path, [("rope_freqs.weight", bad.shape, QT.F32,
                                                   bad.astype(np.float32).tobytes())]))


def _llama3_divisors(head_dim, theta, factor, low, high, context):
    """HF's Llama 3 rope scaling as per-frequency divisors (what llama.cpp stores in rope_freqs)."""
    freq = theta ** (-np.arange(0, head_dim, 2) / head_dim)
    wavelen = 2 * np.pi / freq
    smooth = (context / wavelen - low) / (high - low)
    mid = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < context / high, 1.0, np.where(wavelen > context / low, factor, mid))


@pytest.mark.parametrize("scaling", [(8.0, 1.0, 4.0, 8192), (32.0, 1.0, 4.0, 8192), (4.0, 1.0, 8.0, 4096)])
def test_gguf_llama3_rope_freqs_to_rope_scaling(tmp_path, scaling):
    """Llama 3.x GGUF files carry rope scaling only as rope_freqs.weight: the HF dict is recovered."""
    factor, low, high, context = scaling
    divisors = _llama3_divisors(128, 500000.0, *scaling).astype(np.float32)
    meta = llama_meta(**{"llama.rope.freq_base": 500000.0})
    ckpt = open_checkpoint(llama_gguf(tmp_path, [("rope_freqs.weight", (64,), QT.F32, divisors.tobytes())],
                                      meta=meta))
    assert ckpt.config.rope_scaling == {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                                        "high_freq_factor": high, "original_max_position_embeddings": context}
    assert "rope_freqs.weight" not in ckpt.tensors


@pytest.mark.parametrize("divisors", [
    np.geomspace(1.0, 3.0, 64),                                  # another curve than Llama 3's
    np.where(np.arange(64) < 62, 1.0, np.where(np.arange(64) < 63, 2.5, 8.0)),  # one frequency in the band
    np.linspace(0.5, 1.0, 64)])                                  # divisors below 1: frequencies sped up
def test_gguf_other_rope_freqs_kept_as_factors(tmp_path, divisors):
    """rope_freqs.weight that is not HF's Llama 3 scaling is used as it is, as llama.cpp does:
    inverse frequency i = theta^(-2i/d) / divisor i."""
    from lattice.models import rope_inv_freq
    d = divisors.astype(np.float32)
    meta = llama_meta(**{"llama.rope.freq_base": 10000.0})
    ckpt = open_checkpoint(llama_gguf(tmp_path, [("rope_freqs.weight", (64,), QT.F32, d.tobytes())], meta=meta))
    assert ckpt.config.rope_scaling["rope_type"] == "freq_factors"
    base = 10000.0 ** (-np.arange(0, 128, 2) / 128)
    np.testing.assert_allclose(rope_inv_freq(ckpt.config), base / d.astype(np.float64), rtol=1e-6)


def test_rope_scaling_errors_name_the_problem():
    from lattice.config import ModelConfig
    from lattice.models import rope_inv_freq
    cfg = ModelConfig(model_type="llama", hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, intermediate_size=64, vocab_size=8, head_dim=32)
    for scaling, msg in [({"rope_type": "freq_factors", "factors": [1.0] * 3}, "needs 16 positive factors; got 3"),
                         ({"rope_type": "freq_factors", "factors": [0.0] * 16}, "needs 16 positive"),
                         ({"rope_type": "llama3", "factor": 8.0}, "'llama3' needs 'low_freq_factor'"),
                         ({"rope_type": "yarn", "factor": 4.0}, "unsupported rope_scaling type 'yarn'")]:
        cfg.rope_scaling = scaling
        with pytest.raises((ConfigError, UnsupportedModelError), match=msg):
            rope_inv_freq(cfg)


def _bad_safetensors(tmp_path, data):
    """An HF folder around a hand-made model.safetensors."""
    shutil.copy(LLAMA_HF / "config.json", tmp_path / "config.json")
    (tmp_path / "model.safetensors").write_bytes(data)
    return tmp_path


def _st(header, data=b"", n=None):
    text = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", len(text) if n is None else n) + text + data


@pytest.mark.parametrize("data,msg", [
    (b"\x01\x02", "truncated safetensors"),
    (_st({}, n=10 ** 9), "header length 1000000000 runs past the end"),
    (_st(b"{not json"), "not valid JSON"),
    (_st(b"\xff\xfe{}"), "not valid JSON"),
    (_st([1, 2]), "not a JSON object"),
    (_st({"w": 3}), "'w': header entry is not an object"),
    (_st({"w": {"dtype": "F12", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4), "'w': unknown dtype 'F12'"),
    (_st({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4), "'w': shape"),
    (_st({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}, b"\0" * 4), "'w': data_offsets"),
    (_st({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 2), "'w': data_offsets.*out of range"),
    (_st({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 8), "'w': F32 \\[2\\] needs 8 bytes"),
    (_st({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
          "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12), "'a' and 'b' overlap"),
], ids=["tiny", "header-past-eof", "bad-json", "bad-utf8", "not-object", "entry-not-object",
        "unknown-dtype", "negative-shape", "bad-offsets", "offsets-out-of-range", "byte-count", "overlap"])
def test_safetensors_bad_headers(tmp_path, data, msg):
    folder = _bad_safetensors(tmp_path, data)
    with pytest.raises(ModelFormatError, match=f"model.safetensors.*{msg}"):
        open_checkpoint(folder)


def test_safetensors_truncated_fixture(tmp_path):
    good = (LLAMA_HF / "model.safetensors").read_bytes()
    for cut in (5, 100, len(good) - 1):
        with pytest.raises(ModelFormatError, match="model.safetensors"):
            open_checkpoint(_bad_safetensors(tmp_path, good[:cut]))


@pytest.mark.parametrize("model_type, key", [("llama", "mlp_bias"), ("llama", "attention_bias"),
                                             ("qwen2", "use_sliding_window")])
def test_unmodelled_features_are_refused(model_type, key):
    from lattice.formats.hf_config import config_from_hf
    cfg = {"model_type": model_type, "vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
           "num_hidden_layers": 1, "num_attention_heads": 2, key: True}
    config_from_hf(dict(cfg, **{key: False}), "x/config.json")   # the same config without it loads
    with pytest.raises(UnsupportedModelError, match=f"x/config.json.*{key}"):
        config_from_hf(cfg, "x/config.json")
