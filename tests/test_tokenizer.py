"""Tokenizers of every source (tokenizer.json, tokenizer.model, GGUF gpt2 BPE and llama SPM) against
their references, and streaming detokenization. Fixtures: tests/oracles/tokenizer_fixtures.py."""
import gzip
import json
import os
import shutil

import pytest
import sentencepiece
from hypothesis import given, settings
from hypothesis import strategies as st

from lattice.errors import TokenizerError
from lattice.formats import open_checkpoint, read_gguf_metadata
from lattice.tokenizer import StreamingDetokenizer, Tokenizer

from conftest import FIXTURES

TOK_FIXTURES = os.path.join(FIXTURES, "tokenizer")
SPLIT_CHARACTERS = "Emoji 🤖👨‍👩‍👧 and CJK 日本語のテキスト, accents ünïcödé — done"

with gzip.open(os.path.join(TOK_FIXTURES, "llamacpp_vocab_slices.json.gz"), "rt", encoding="utf-8") as f:
    VOCAB_SLICES = json.load(f)


def load_json(name):
    with open(os.path.join(TOK_FIXTURES, name), encoding="utf-8") as f:
        return json.load(f)


def slice_metadata(vocab_slice):
    """Full-size GGUF tokenizer metadata from a slice: ids outside it get placeholder tokens that no
    test string contains."""
    n = vocab_slice["n_vocab"]
    tokens = [f"[absent {i}]" for i in range(n)]
    types = [1] * n
    for i, text in vocab_slice["tokens"].items():
        tokens[int(i)] = text
    for i, token_type in vocab_slice["types"].items():
        types[int(i)] = token_type
    metadata = dict(vocab_slice["metadata"], **{"tokenizer.ggml.tokens": tokens,
                                                 "tokenizer.ggml.token_type": types})
    if "scores" in vocab_slice:
        scores = [0.0] * n
        for i, score in vocab_slice["scores"].items():
            scores[int(i)] = score
        metadata["tokenizer.ggml.scores"] = scores
    if "merges" in vocab_slice:
        metadata["tokenizer.ggml.merges"] = vocab_slice["merges"]
    return metadata


@pytest.fixture(scope="module")
def smollm2_metadata(smollm2_path):
    return read_gguf_metadata(smollm2_path)


@pytest.fixture(scope="module")
def smollm2(smollm2_metadata):
    return Tokenizer.from_gguf_metadata(smollm2_metadata, "SmolLM2.gguf")


@pytest.fixture(scope="module")
def tiny_bpe():
    return Tokenizer.from_folder(os.path.join(TOK_FIXTURES, "tiny-bpe"))


@pytest.fixture(scope="module")
def tiny_spm():
    return Tokenizer.from_folder(os.path.join(TOK_FIXTURES, "tiny-spm"))


def tiny_spm_gguf_metadata():
    """GGUF-style llama vocabulary (tokens, scores, types) of the tiny sentencepiece model."""
    sp = sentencepiece.SentencePieceProcessor(model_file=os.path.join(TOK_FIXTURES, "tiny-spm", "tokenizer.model"))
    n = sp.get_piece_size()
    types = [3 if sp.is_control(i) else 2 if sp.is_unknown(i) else 6 if sp.is_byte(i) else 1 for i in range(n)]
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)],
            "tokenizer.ggml.scores": [sp.get_score(i) for i in range(n)], "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.bos_token_id": sp.bos_id(), "tokenizer.ggml.eos_token_id": sp.eos_id(),
            "tokenizer.ggml.add_space_prefix": True}


# ---- GGUF vocabularies against llama.cpp's own tokenizer test vectors ---------------------------

@pytest.mark.parametrize("name", sorted(VOCAB_SLICES))
def test_gguf_vocabulary_matches_llamacpp_test_vectors(name):
    vocab_slice = VOCAB_SLICES[name]
    tok = Tokenizer.from_gguf_metadata(slice_metadata(vocab_slice), f"ggml-vocab-{name}")
    mismatches = [(text, tok.encode(text, add_bos=False), ids) for text, ids in vocab_slice["cases"]
                  if tok.encode(text, add_bos=False) != ids]
    assert not mismatches, mismatches[:3]
    for text, ids in vocab_slice["cases"]:
        assert tok.decode(ids) == text


def test_smollm2_gguf_tokenizer(smollm2):
    assert smollm2.vocab_size == 49152
    assert (smollm2.bos_id, smollm2.add_bos) == (1, False)
    assert smollm2.eos_ids[0] == 2 and 0 in smollm2.eos_ids   # <|im_end|>, then <|endoftext|> as llama.cpp
    assert smollm2.special_ids == set(range(17))
    assert smollm2.id_to_piece(2) == "<|im_end|>"
    ids = smollm2.encode("<|im_start|>user\nHi<|im_end|>\n")
    assert ids[0] == 1 and 2 in ids
    assert smollm2.decode(ids) == "<|im_start|>user\nHi<|im_end|>\n"
    assert smollm2.decode(ids, skip_special=True) == "user\nHi\n"
    assert smollm2.encode("12345") == [33, 34, 35, 36, 37]   # the smollm pre-tokenizer splits digits
    assert smollm2.encode("hi", add_bos=True)[0] == 1


def test_smollm2_tokenization_matches_llamacpp(smollm2):
    """llama.cpp's ids (add_special=False, parse_special=True), from tests/oracles/smollm2_llamacpp.py."""
    with open(os.path.join(FIXTURES, "smollm2_llamacpp.json"), encoding="utf-8") as f:
        expected = json.load(f)["tokenize"]["cases"]
    assert len(expected) >= 10
    for text, ids in expected.items():
        assert smollm2.encode(text, add_bos=False) == ids, text


def test_from_checkpoint_uses_gguf_metadata_or_folder(smollm2_path, tmp_path):
    tok = Tokenizer.from_checkpoint(open_checkpoint(smollm2_path))
    assert tok.vocab_size == 49152 and tok.source == str(smollm2_path)
    # a Hugging Face folder: tiny-llama's weights with tiny-bpe's tokenizer files
    for src in ("tiny-llama/config.json", "tiny-llama/model.safetensors", "tokenizer/tiny-bpe/tokenizer.json",
                "tokenizer/tiny-bpe/tokenizer_config.json"):
        shutil.copy(os.path.join(FIXTURES, src), tmp_path)
    tok = Tokenizer.from_checkpoint(open_checkpoint(tmp_path))
    assert tok.vocab_size == 320 and tok.has_chat_template


# ---- tokenizer.json: identical to transformers ---------------------------------------------------

def test_tokenizer_json_matches_transformers(tiny_bpe):
    expected = load_json("tiny-bpe_expected.json")
    assert tiny_bpe.bos_id == expected["bos_id"]
    assert tiny_bpe.eos_ids == expected["eos_ids"]
    assert tiny_bpe.vocab_size == expected["vocab_size"]
    assert tiny_bpe.add_bos   # from the post-processor, as transformers does
    for text, ids in expected["encode"].items():
        decoded = expected["decode"][text]
        if text.startswith("<s>"):
            # transformers puts a second BOS before one written in the text; Lattice does not double it
            assert ids[:2] == [tiny_bpe.bos_id] * 2
            ids, decoded = ids[1:], decoded[len("<s>"):]
        assert tiny_bpe.encode(text) == ids, text
        assert tiny_bpe.decode(ids) == decoded
        assert tiny_bpe.decode(ids, skip_special=True) == expected["decode_skip_special"][text]
    assert tiny_bpe.encode("x", add_bos=False)[0] != tiny_bpe.bos_id


# ---- tokenizer.model, and the same vocabulary as a GGUF llama vocabulary -------------------------

def test_tokenizer_model_matches_sentencepiece(tiny_spm):
    expected = load_json("tiny-spm_expected.json")
    assert (tiny_spm.bos_id, tiny_spm.eos_ids, tiny_spm.add_bos) == (expected["bos_id"], [expected["eos_id"]], True)
    for text, ids in expected["encode"].items():
        assert tiny_spm.encode(text, add_bos=False) == ids, text
        assert tiny_spm.encode(text)[0] == expected["bos_id"]
        assert tiny_spm.decode(ids) == text
    for text, decoded in expected["plain_decode"].items():
        assert tiny_spm.decode(tiny_spm.encode(text, add_bos=False)) == decoded


def test_gguf_llama_vocabulary_matches_sentencepiece():
    expected = load_json("tiny-spm_expected.json")
    tok = Tokenizer.from_gguf_metadata(tiny_spm_gguf_metadata(), "tiny-spm.gguf")
    assert tok.add_bos and tok.bos_id == expected["bos_id"]
    for text, ids in expected["encode"].items():
        assert tok.encode(text, add_bos=False) == ids, text   # byte fallback for the emoji and CJK
        assert tok.decode(ids) == text


# ---- streaming detokenization --------------------------------------------------------------------

def stream(tok, ids):
    det = StreamingDetokenizer(tok)
    return [det.add(i) for i in ids] + [det.flush()]


@pytest.mark.parametrize("which", ["smollm2", "tiny_bpe", "tiny_spm"])
def test_streaming_never_splits_a_character(which, request):
    tok = request.getfixturevalue(which)
    ids = tok.encode("<|im_start|>" + SPLIT_CHARACTERS, add_bos=False)
    pieces = stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids) == "<|im_start|>" + SPLIT_CHARACTERS
    assert not any("\ufffd" in p for p in pieces)
    # the text really has characters split over tokens: some tokens produce no text on their own
    assert sum(p == "" for p in pieces[:-1]) >= 3


def test_streaming_incomplete_character_comes_out_at_flush(smollm2):
    ids = smollm2.encode("🤖")
    assert len(ids) > 1
    det = StreamingDetokenizer(smollm2)
    assert det.add(ids[0]) == ""
    assert det.flush() == smollm2.decode(ids[:1]) == "\ufffd"


def test_streaming_skip_special(smollm2):
    ids = smollm2.encode("<|im_start|>assistant\nHi<|im_end|>")
    det = StreamingDetokenizer(smollm2, skip_special=True)
    assert "".join(det.add(i) for i in ids) + det.flush() == "assistant\nHi"


@settings(max_examples=40, deadline=None)
@given(st.text(st.characters(blacklist_categories=("Cs",)), max_size=30))
def test_streaming_equals_decode_on_any_text(smollm2, text):
    # (not always == text: byte-level BPE drops bytes its vocabulary lacks, as transformers does)
    ids = smollm2.encode(text)
    pieces = stream(smollm2, ids)
    decoded = smollm2.decode(ids)
    assert "".join(pieces) == decoded
    assert "\ufffd" in decoded or not any("\ufffd" in p for p in pieces)


# ---- bad input -----------------------------------------------------------------------------------

def test_decode_out_of_range_id_names_it(smollm2):
    with pytest.raises(TokenizerError, match="49152"):
        smollm2.decode([1, 49152])
    with pytest.raises(TokenizerError, match="-1"):
        smollm2.decode([-1])
    with pytest.raises(TokenizerError, match="'x'"):
        smollm2.decode(["x"])
    det = StreamingDetokenizer(smollm2)
    with pytest.raises(TokenizerError, match="99999"):
        det.add(99999)
    assert det.add(19556) == "Hello"   # the bad id left no trace


def test_folder_without_tokenizer_names_it(tmp_path):
    with pytest.raises(TokenizerError, match=str(tmp_path)):
        Tokenizer.from_folder(tmp_path)


def test_corrupt_tokenizer_files_name_the_file(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Tokenizer.from_folder(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "tokenizer.model").write_bytes(b"\x00garbage")
    with pytest.raises(TokenizerError, match="tokenizer.model"):
        Tokenizer.from_folder(tmp_path)
    shutil.copy(os.path.join(TOK_FIXTURES, "tiny-spm", "tokenizer.model"), tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(TokenizerError, match="tokenizer_config.json"):
        Tokenizer.from_folder(tmp_path)


def test_bad_gguf_tokenizer_metadata(smollm2_metadata):
    def broken(**changes):
        return dict(smollm2_metadata, **{"tokenizer.ggml." + k: v for k, v in changes.items()})

    with pytest.raises(TokenizerError, match="unsupported GGUF tokenizer model 'rwkv'"):
        Tokenizer.from_gguf_metadata(broken(model="rwkv"), "m.gguf")
    with pytest.raises(TokenizerError, match="pre-tokenizer 'mystery'"):
        Tokenizer.from_gguf_metadata(broken(pre="mystery"), "m.gguf")
    with pytest.raises(TokenizerError, match="tokenizer.ggml.token_type"):
        Tokenizer.from_gguf_metadata(broken(token_type=[1, 2]), "m.gguf")
    with pytest.raises(TokenizerError, match="tokenizer.ggml.merges"):
        Tokenizer.from_gguf_metadata(broken(merges=None), "m.gguf")
    merges = list(smollm2_metadata["tokenizer.ggml.merges"])
    with pytest.raises(TokenizerError, match=r"merges\[3\] = 'zq xj' needs 'zq'"):  # not a Rust panic
        Tokenizer.from_gguf_metadata(broken(merges=merges[:3] + ["zq xj"] + merges[3:]), "m.gguf")
    with pytest.raises(TokenizerError, match="tokenizer.ggml.eos_token_id"):
        Tokenizer.from_gguf_metadata(broken(eos_token_id=10 ** 6), "m.gguf")
    with pytest.raises(TokenizerError, match="m.gguf: no embedded tokenizer"):
        Tokenizer.from_gguf_metadata({"general.architecture": "llama"}, "m.gguf")
    with pytest.raises(TokenizerError, match="tokenizer.ggml.scores"):
        Tokenizer.from_gguf_metadata(dict(tiny_spm_gguf_metadata(), **{"tokenizer.ggml.scores": [0.0]}), "s.gguf")


def test_add_bos_without_bos_token_is_an_error(smollm2_metadata):
    metadata = dict(smollm2_metadata)
    del metadata["tokenizer.ggml.bos_token_id"]
    tok = Tokenizer.from_gguf_metadata(metadata, "nobos.gguf")
    assert tok.encode("hi") == tok.encode("hi", add_bos=False)
    with pytest.raises(TokenizerError, match="no BOS"):
        tok.encode("hi", add_bos=True)
    with pytest.raises(TokenizerError, match="str"):
        tok.encode(b"hi")


def test_tokenizer_model_with_added_tokens(tmp_path):
    shutil.copy(os.path.join(TOK_FIXTURES, "tiny-spm", "tokenizer.model"), tmp_path / "tokenizer.model")
    added = {"330": {"content": "<|tool|>", "special": True}, "331": {"content": "<think>", "special": False}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": added}))
    tok = Tokenizer.from_folder(tmp_path)
    assert tok.vocab_size == 332
    assert 330 in tok.special_ids and 331 not in tok.special_ids
    ids = tok.encode("a<|tool|>b<think>", add_bos=False)
    assert 330 in ids and ids[-1] == 331
    assert tok.decode(ids) == "a<|tool|>b<think>"
    assert tok.decode(ids, skip_special=True) == "ab<think>"
    assert tok.id_to_piece(331) == "<think>"


def test_streaming_invalid_bytes_are_not_held_forever(smollm2):
    continuation_byte = smollm2.encode("\U00040000")[0]   # 0x80: never completes a character
    det = StreamingDetokenizer(smollm2)
    pieces = [det.add(continuation_byte) for _ in range(50)]
    assert pieces[0] == "" and any(pieces)
    assert len(det._window) <= 2 * (StreamingDetokenizer.MAX_HELD_TOKENS + 1)   # bounded re-decoding
    assert "".join(pieces) + det.flush() == "\ufffd" * 50
