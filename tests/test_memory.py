"""Memory of a load: the weights arena is filled chunk by chunk while the checkpoint's file pages are
given back, so peak resident memory is about the arena, not arena + checkpoint. The arena's bytes
are those of the plain whole-tensor conversion."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import FIXTURES
from lattice import program
from lattice.errors import ModelFormatError
from lattice.formats import open_checkpoint
from lattice.formats.filemap import FileMap
from lattice.program import build, trace
from lattice.quant import from_tensor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="reads resident memory from /proc (Linux)")


def whole_tensor_arena(ckpt, prog):
    """The WEIGHTS arena as a plain conversion writes it: every weight converted whole, joint
    weights concatenated or interleaved afterwards (the fill before chunking, kept as the oracle)."""
    derived = trace(ckpt.config, ckpt.tensors)[0].derived

    def planes(name, fmt):
        if name in derived:
            return [derived[name].reshape(-1)]
        t = ckpt.tensors[name]
        if fmt == "f32":
            return [t.to_f32().reshape(t.shape[0], -1) if len(t.shape) == 2 else t.to_f32().reshape(-1)]
        if fmt == "f16":
            return [np.asarray(t.raw if t.dtype == "f16" else t.to_f32().astype(np.float16))]
        qm = from_tensor(t, fmt)
        return [qm.qs, qm.scales] + ([qm.mins] if fmt == "q4" else [])

    blob = np.zeros(prog.sizes["weights"], np.uint8)
    for key, e in prog.weight_entries.items():
        if not isinstance(key, tuple):
            values = planes(key, e["format"])
        elif e["cols"] == 1:                        # joint bias: the parts present, in order
            values = [np.concatenate([planes(p, "f32")[0] for p in key[1:] if p])]
        else:
            per_part = [planes(p, e["format"]) for p in key[1:]]
            values = []
            for i in range(len(per_part[0])):
                ps = [np.ascontiguousarray(pp[i]).reshape(pp[i].shape[0], -1) for pp in per_part]
                values.append(np.stack(ps, axis=1).reshape(-1, ps[0].shape[1])
                              if key[0] == "interleave" else np.concatenate(ps))
        for (off, nbytes), v in zip(e["planes"].values(), values):
            data = np.ascontiguousarray(v).view(np.uint8).reshape(-1)
            assert data.size == nbytes, key
            blob[off:off + nbytes] = data
    return blob


@pytest.mark.parametrize("fixture", ["tiny-llama", "formats/tiny-llama-q8_0.gguf",
                                     "formats/tiny-qwen35-q8_0.gguf", "formats/tiny-qwen35-f16.gguf",
                                     "formats/tiny-qwen2-hf", "formats/tiny-llama-mlx8",
                                     "formats/tiny-qwen35-mlx4"])
@pytest.mark.parametrize("quant", [None, "q8", "q4"])
def test_chunked_fill_writes_the_whole_tensor_bytes(fixture, quant, monkeypatch):
    """Chunks of a few rows (the last one partial) give the arena the plain conversion gives,
    byte for byte, although tensors give their pages back during the fill."""
    monkeypatch.setattr(program, "CONVERT_CHUNK_BYTES", 4 * 64 * 3)     # 3 rows of 64, 1 of more
    ckpt = open_checkpoint(os.path.join(FIXTURES, fixture))
    prog = build(ckpt, quant=quant, context=16)
    kinds = {e["format"] for e in prog.weight_entries.values()}
    assert kinds >= ({"f32", quant} if quant else {"f32"})
    expected = whole_tensor_arena(ckpt, prog)      # tensors released by the fill read again
    assert np.array_equal(prog.weights, expected)


# GGUF name, Hugging Face name, rows, columns of each Llama layer matrix
LLAMA_SHAPES = (("attn_q", "self_attn.q_proj", "hidden", "hidden"),
                ("attn_k", "self_attn.k_proj", "kv", "hidden"),
                ("attn_v", "self_attn.v_proj", "kv", "hidden"),
                ("attn_output", "self_attn.o_proj", "hidden", "hidden"),
                ("ffn_gate", "mlp.gate_proj", "inter", "hidden"),
                ("ffn_up", "mlp.up_proj", "inter", "hidden"),
                ("ffn_down", "mlp.down_proj", "hidden", "inter"))


def write_llama_q8_0_gguf(path, vocab=32000, hidden=768, inter=2048, layers=10, heads=12, kv_heads=4):
    """A Llama-shaped GGUF of random Q8_0 weights (~120 MB with these sizes), with an untied
    lm_head: the largest matrix, converted last."""
    import gguf
    rng = np.random.default_rng(0)
    dims = dict(hidden=hidden, inter=inter, kv=hidden // heads * kv_heads)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_context_length(2048)

    def q8_0(name, rows, cols):
        blocks = np.frombuffer(rng.bytes(rows * cols // 32 * 34), np.uint8).reshape(rows, -1, 34).copy()
        blocks[..., :2] = np.array([0.01], np.float16).view(np.uint8)     # finite scales
        w.add_tensor(name, blocks.reshape(rows, -1), raw_dtype=gguf.GGMLQuantizationType.Q8_0)

    q8_0("token_embd.weight", vocab, hidden)
    for i in range(layers):
        for norm in ("attn_norm", "ffn_norm"):
            w.add_tensor(f"blk.{i}.{norm}.weight", np.ones(hidden, np.float32))
        for name, _, rows, cols in LLAMA_SHAPES:
            q8_0(f"blk.{i}.{name}.weight", dims[rows], dims[cols])
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    q8_0("output.weight", vocab, hidden)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_llama_bf16_folder(folder, vocab=16000, hidden=512, inter=1536, layers=6, heads=8, kv_heads=4):
    """A Llama-shaped Hugging Face folder of random bf16 weights (~70 MB with these sizes),
    untied lm_head last."""
    rng = np.random.default_rng(0)
    dims = dict(hidden=hidden, inter=inter, kv=hidden // heads * kv_heads)
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        shapes[f"model.layers.{i}.input_layernorm.weight"] = (hidden,)
        shapes[f"model.layers.{i}.post_attention_layernorm.weight"] = (hidden,)
        for _, name, rows, cols in LLAMA_SHAPES:
            shapes[f"model.layers.{i}.{name}.weight"] = (dims[rows], dims[cols])
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    folder.mkdir()
    with open(folder / "model.safetensors", "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for shape in shapes.values():
            f32 = rng.standard_normal(int(np.prod(shape)), dtype=np.float32) * np.float32(0.02)
            f.write((f32.view(np.uint32) >> 16).astype(np.uint16).tobytes())
    (folder / "config.json").write_text(json.dumps(dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=vocab, hidden_size=hidden,
        intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, rms_norm_eps=1e-5, max_position_embeddings=2048,
        tie_word_embeddings=False)))


PEAK_SCRIPT = """
import json, sys
from lattice.errors import ModelFormatError
from lattice.formats import open_checkpoint
from lattice.formats.filemap import FileMap
from lattice.program import build

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

open("/proc/self/clear_refs", "w").write("5")       # peak RSS := current RSS
before = status("VmRSS")
prog = build(open_checkpoint(sys.argv[1]), quant=sys.argv[2] if len(sys.argv) > 2 else None,
             context=64)
print(json.dumps({"before": before, "peak": status("VmHWM"), "weights": prog.weights.nbytes}))
"""


def build_peak(path, *quant):
    """(bytes peak RSS grew by while a fresh process built `path`, bytes of its weights arena)."""
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(path), *quant], capture_output=True,
                         text=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), timeout=300)
    assert out.returncode == 0, out.stderr
    m = json.loads(out.stdout)
    return m["peak"] - m["before"], m["weights"]


MB = 2**20


@linux_only
def test_peak_memory_of_a_gguf_build_is_about_the_weights(tmp_path):
    """Building a ~120 MB Q8_0 checkpoint (exact conversion) raises peak RSS by about the arena's
    size: the file pages of converted weights do not stay resident next to it (they did: 2.5x)."""
    path = tmp_path / "llama-q8_0.gguf"
    write_llama_q8_0_gguf(path)
    growth, weights = build_peak(path)
    assert weights > 0.9 * os.path.getsize(path)
    assert growth < 1.2 * weights + 24 * MB, (growth / MB, weights / MB)


@linux_only
def test_peak_memory_of_a_requantizing_build_is_about_the_weights(tmp_path):
    """bf16 -> Q8 goes through float32 in chunks of rows: no full-size float32 copy or quantizer
    temporaries of a whole matrix (those made the peak 5x the arena)."""
    folder = tmp_path / "llama-bf16"
    write_llama_bf16_folder(folder)
    growth, weights = build_peak(folder, "q8")
    assert weights > 0.45 * os.path.getsize(folder / "model.safetensors")
    assert growth < 1.5 * weights + 24 * MB, (growth / MB, weights / MB)


def mapped_rss(path):
    """Resident bytes of this process's mappings of `path` (None when it is not mapped)."""
    target, rss, inside = os.path.realpath(path), None, False
    for line in open("/proc/self/smaps"):
        if line[0] in "0123456789abcdef" and " " in line and "-" in line.split()[0]:
            inside = line.rstrip("\n").endswith(" " + target)
            if inside:
                rss = rss or 0
        elif inside and line.startswith("Rss:"):
            rss += int(line.split()[1]) * 1024
    return rss


@linux_only
def test_released_tensors_leave_memory_and_stay_usable(tmp_path):
    path = tmp_path / "tiny.gguf"             # a file of its own: no other test maps it
    path.write_bytes(open(os.path.join(FIXTURES, "formats", "tiny-llama-q8_0.gguf"), "rb").read())
    ckpt = open_checkpoint(path)
    values = {n: t.to_f32().copy() for n, t in ckpt.tensors.items()}
    assert mapped_rss(path) > 0
    for t in ckpt.tensors.values():
        t.release()
    header = min(off for t in ckpt.tensors.values() for _, off, _ in t.spans)
    assert mapped_rss(path) <= -(-header // 4096) * 4096      # at most the header's pages
    for name, t in ckpt.tensors.items():                       # read back from the file
        assert np.array_equal(t.to_f32(), values[name]), name
    ckpt.release()
    assert mapped_rss(path) is None                            # no view left: unmapped
    emb = ckpt.tensors["model.embed_tokens.weight"]            # mapped again on use
    assert np.array_equal(emb.to_f32(), values[emb.name])


LOAD_SCRIPT = """
import json, os, sys
import lattice
model = lattice.load(sys.argv[1], backend="cpu", context=64)
mapped = os.path.realpath(sys.argv[1]) in open("/proc/self/maps").read()
print(json.dumps({"mapped": mapped, "tokens": model.generate("Hi", max_tokens=4).tokens}))
"""


@linux_only
def test_load_does_not_keep_the_checkpoint_mapped(smollm2_path):
    out = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, str(smollm2_path)], capture_output=True,
                         text=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), timeout=300)
    assert out.returncode == 0, out.stderr
    m = json.loads(out.stdout)
    assert not m["mapped"] and len(m["tokens"]) == 4


@linux_only
def test_releasing_rows_gives_back_only_their_pages(tmp_path):
    path = tmp_path / "small.gguf"
    write_llama_q8_0_gguf(path, vocab=4096, hidden=256, inter=512, layers=1, heads=4, kv_heads=2)
    emb = open_checkpoint(path).tensors["model.embed_tokens.weight"]      # 1.1 MB of Q8_0 rows
    assert emb.rows_in_order
    emb.raw.sum()                                   # every page of it resident
    full = mapped_rss(path)
    assert full >= emb.raw.nbytes
    emb.release(0, 2048)
    assert full - mapped_rss(path) >= emb.raw.nbytes // 2 - 2 * 4096
    assert mapped_rss(path) >= emb.raw.nbytes // 2 - 2 * 4096      # the other half stays


def test_a_file_that_cannot_be_mapped_names_itself(tmp_path):
    """The map is made on first use: a file gone (or emptied) by then is a ModelFormatError."""
    path = tmp_path / "gone.gguf"
    path.write_bytes(open(os.path.join(FIXTURES, "formats", "tiny-llama-q8_0.gguf"), "rb").read())
    ckpt = open_checkpoint(path)
    path.unlink()
    with pytest.raises(ModelFormatError, match="gone.gguf.*cannot memory-map"):
        ckpt.tensors["model.embed_tokens.weight"].to_f32()
    path.write_bytes(b"")
    with pytest.raises(ModelFormatError, match="gone.gguf.*cannot memory-map"):
        FileMap(path).bytes(0, 1)
