"""Internal consistency of the SmolLM2 oracle fixtures (tests/oracles/smollm2_llamacpp.py made them;
no llama.cpp or torch needed here)."""
import hashlib
import json
import math
import os

import numpy as np
import pytest

from conftest import FIXTURES

N_VOCAB = 49152
MAX_WINDOW = 2048


@pytest.fixture(scope="module")
def fixture():
    with open(os.path.join(FIXTURES, "smollm2_llamacpp.json"), encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def teacher():
    with np.load(os.path.join(FIXTURES, "smollm2_f32_teacher.npz")) as data:
        return {name: data[name] for name in data.files}


@pytest.fixture(scope="module")
def token_bytes(smollm2_path):
    """Each vocabulary entry's bytes, undoing GPT-2's byte-to-printable-character mapping."""
    from gguf import GGUFReader
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    char_to_byte = {chr(b): b for b in printable}
    char_to_byte.update({chr(256 + i): b for i, b in enumerate(
        b for b in range(256) if b not in printable)})
    field = GGUFReader(str(smollm2_path)).fields["tokenizer.ggml.tokens"]
    tokens = [bytes(field.parts[i]).decode("utf-8") for i in field.data]
    assert len(tokens) == N_VOCAB
    # Control tokens such as <|im_start|> are spelled out as they are, not byte-mapped.
    return [t.encode() if t.startswith("<|") and t.endswith("|>")
            else bytes(char_to_byte[c] for c in t) for t in tokens]


def decode(token_bytes, ids):
    return b"".join(token_bytes[i] for i in ids).decode("utf-8")


def assert_ids(ids):
    assert all(isinstance(i, int) and 0 <= i < N_VOCAB for i in ids)


def test_fixture_files_are_small():
    names = ["smollm2_llamacpp.json", "smollm2_f32_teacher.npz", "real_text.txt"]
    assert sum(os.path.getsize(os.path.join(FIXTURES, n)) for n in names) < 1.5e6


def test_tokenize_cases_round_trip(fixture, token_bytes):
    cases = fixture["tokenize"]["cases"]
    assert len(cases) >= 20
    assert cases[""] == []
    for text, ids in cases.items():
        assert_ids(ids)
        assert decode(token_bytes, ids) == text
    chat = cases["<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"]
    im_start, im_end = fixture["greedy"]["im_start_id"], fixture["greedy"]["im_end_id"]
    assert chat.count(im_start) == 2 and chat.count(im_end) == 1


def test_greedy_runs_are_consistent(fixture, token_bytes):
    im_end = fixture["greedy"]["im_end_id"]
    cases = {case["question"]: case for case in fixture["greedy"]["cases"]}
    assert set(cases) == {"What is 12 times 12?", "What is the capital of France?"}
    for question, run in cases.items():
        assert run["prompt"].endswith(f"{question}<|im_end|>\n<|im_start|>assistant\n")
        assert_ids(run["prompt_ids"])
        assert decode(token_bytes, run["prompt_ids"]) == run["prompt"]
        for engine in ("llamacpp", "f32"):
            out = run[engine]
            assert_ids(out["ids"])
            assert 0 < len(out["ids"]) <= 48
            assert len(out["top2_gap"]) == len(out["ids"])
            assert all(math.isfinite(g) and g >= 0 for g in out["top2_gap"])
            assert (out["ids"][-1] == im_end) == (out["stop"] == "eos")
            assert im_end not in out["ids"][:-1]
            assert out["text"] == decode(token_bytes, [i for i in out["ids"] if i != im_end])
    # Where the two references agree, Lattice must match both: the fixture must contain such a case.
    twelve = cases["What is 12 times 12?"]
    assert twelve["llamacpp"]["ids"] == twelve["f32"]["ids"]


def test_teacher_forced_windows_cover_the_text(fixture, token_bytes):
    forced = fixture["teacher_forced"]
    with open(os.path.join(FIXTURES, "real_text.txt"), "rb") as f:
        text = f.read()
    assert hashlib.sha256(text).hexdigest() == forced["text_sha256"]
    ids = forced["text_ids"]
    assert_ids(ids)
    assert len(ids) == forced["n_tokens"] >= 2000
    assert decode(token_bytes, ids) == text.decode("utf-8")
    position = 0
    for start, end in forced["windows"]:
        assert start == position and 0 < end - start <= MAX_WINDOW
        position = end
    assert position == len(ids)


def test_teacher_forced_numbers(fixture, teacher):
    forced = fixture["teacher_forced"]
    n, k = forced["n_tokens"], forced["teacher_top_k"]
    for key in ("kl_f32_llamacpp_mean", "kl_f32_llamacpp_max", "coarse_kl_f32_llamacpp_mean"):
        assert math.isfinite(forced[key]) and forced[key] >= 0
    assert forced["coarse_kl_f32_llamacpp_mean"] <= forced["kl_f32_llamacpp_mean"]
    assert len(forced["kl_f32_llamacpp_mean_per_window"]) == len(forced["windows"])
    assert 0.5 < forced["top1_agreement_llamacpp"] <= 1
    top1 = forced["f32_top1_ids"]
    assert len(top1) == n
    assert_ids(top1)
    assert teacher["ids"].shape == teacher["logp"].shape == (n, k)
    assert teacher["ids"].dtype == np.uint16 and teacher["logp"].dtype == np.float32
    assert (teacher["ids"][:, 0] == np.array(top1)).all()
    assert (teacher["ids"] < N_VOCAB).all()
    logp = teacher["logp"]
    assert np.isfinite(logp).all() and (logp <= 0).all()
    assert (np.diff(logp, axis=1) <= 0).all()
    assert (np.exp(logp.astype(np.float64)).sum(1) <= 1 + 1e-5).all()
