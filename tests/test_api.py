"""The public API end to end on the real default model (SmolLM2-135M-Instruct, Q4_1 GGUF)."""
import json
import os
import threading

import pytest

import lattice
from lattice.errors import (BackendError, ContextLengthError, ModelNotFoundError, SamplingError,
                            TokenizerError)

from conftest import FIXTURES

BACKENDS = ["cpu", "reference"]


@pytest.fixture(scope="module", params=BACKENDS)
def model(request, smollm2_path):
    return lattice.load(str(smollm2_path), backend=request.param, context=512)


def test_unknown_backend_and_model_are_clear_errors(smollm2_path, tmp_path):
    with pytest.raises(BackendError, match="metal2"):
        lattice.load(str(smollm2_path), backend="metal2")
    with pytest.raises(ModelNotFoundError, match="no-such-model"):
        lattice.load("no-such-model")


def test_greedy_answer_matches_both_references(model):
    """llama.cpp and transformers-f32 agree on this answer; so must every Lattice backend."""
    greedy = json.load(open(os.path.join(FIXTURES, "smollm2_llamacpp.json")))["greedy"]
    case = next(c for c in greedy["cases"] if c["question"] == "What is 12 times 12?")
    want = [t for t in case["llamacpp"]["ids"] if t != greedy["im_end_id"]]
    s = model.session()
    assert s.encode_prompt(case["messages"]) == case["prompt_ids"]
    gen = s.generate(case["messages"], max_tokens=len(want) + 4)
    assert gen.tokens == want
    assert gen.text == case["llamacpp"]["text"]
    assert gen.finish_reason == "stop"


def test_stream_equals_generate_and_stop_strings(model):
    s = model.session()
    prompt = [{"role": "user", "content": "Count from one to ten in words."}]
    pieces = list(s.stream(prompt, max_tokens=24))
    full = s.last
    assert "".join(pieces) == full.text and len(pieces) > 1
    first_word = full.text.split()[1] if len(full.text.split()) > 1 else full.text[:3]
    gen = model.session().generate(prompt, max_tokens=24, stop=first_word)
    assert gen.finish_reason == "stop" and first_word not in gen.text
    assert full.text.startswith(gen.text)


def test_multi_turn_reuses_cached_prefix(model):
    s = model.session()
    msgs = [{"role": "user", "content": "Say hi."}]
    g1 = s.generate(msgs, max_tokens=8, ignore_eos=True)
    assert g1.reused_tokens == 0
    before = s.position
    g2 = s.generate(s.encode_prompt(msgs) + g1.tokens + s.encode_prompt("ok")[:2], max_tokens=2)
    assert g2.reused_tokens == before > 0


def test_session_counters(model):
    s = model.session()
    s.generate("Hi", max_tokens=5, ignore_eos=True)
    c = s.counters()
    if model.backend == "reference":
        assert c == {}
        return
    assert c["tokens"] == 5 and c["steps"] >= 5 and c["backend"] == model.backend
    assert c["dispatches_per_step"] > 0 and c["backend_calls"] >= 5
    assert c["backend_calls_per_token"] == c["backend_calls"] / 5


def test_interrupted_stream_leaves_session_usable(model):
    s = model.session()
    it = s.stream("The quick brown fox", max_tokens=50, ignore_eos=True)
    next(it)
    it.close()                                 # what Ctrl-C in a consumer loop does
    assert s.last.finish_reason == "interrupted"
    a = s.generate("Hello", max_tokens=4, ignore_eos=True).tokens
    b = model.session().generate("Hello", max_tokens=4, ignore_eos=True).tokens
    assert a == b


def test_bad_inputs(model):
    s = model.session()
    with pytest.raises(SamplingError, match="top_p"):
        s.generate("hi", top_p=0)
    with pytest.raises(TokenizerError, match="999999"):
        s.generate([1, 999999])
    with pytest.raises(ContextLengthError, match="512"):
        s.generate("word " * 600)
    with pytest.raises(ValueError, match="max_tokens"):
        s.generate("hi", max_tokens=0)


def test_two_sessions_in_two_threads_match_alone(model):
    prompts = ["The capital of Italy is", "def add(a, b):"]
    alone = [model.session().generate(p, max_tokens=6, ignore_eos=True).tokens for p in prompts]
    out = [None, None]

    def work(i):
        out[i] = model.session().generate(prompts[i], max_tokens=6, ignore_eos=True).tokens
    ts = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    assert out == alone
