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
