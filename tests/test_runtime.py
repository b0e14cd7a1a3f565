"""The compiled runtime: whole-program parity with the reference decoder, sessions, sampling,
prefix reuse, context policy, errors, interruption, threads and memory."""
import os
import threading

import numpy as np
import pytest

from conftest import FIXTURES
from lattice._runtime import Runtime
from lattice.errors import ConfigError, ContextLengthError, NumericalError, SamplingError, TokenizerError
from lattice.formats import open_checkpoint
from lattice.program import build
from lattice.quant import from_tensor
from lattice.reference import ReferenceDecoder

TINY = ["tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-qwen35"]
QUANTS = [None, "q8", "q4"]


class _Dequantized:
    """A weight as the runtime sees it after quantization: the reference runs on these values."""

    def __init__(self, t, kind):
        self.name, self.shape, self.dtype, self._t, self._kind = t.name, t.shape, "f32", t, kind

    def to_f32(self):
        return from_tensor(self._t, self._kind).dequantize()


class _Ckpt:
    def __init__(self, config, tensors):
        self.config, self.tensors = config, tensors


def _reference_checkpoint(ck, quant):
    if quant is None:
        return ck
    return _Ckpt(ck.config, {n: _Dequantized(t, quant) if len(t.shape) == 2 else t for n, t in ck.tensors.items()})


_cache = {}


def _runtime(fixture, quant=None, threads=1, context=64):
    key = (fixture, quant, threads, context)
    if key not in _cache:
        ck = open_checkpoint(os.path.join(FIXTURES, fixture))
        _cache[key] = Runtime(build(ck, quant=quant, context=context), n_threads=threads)
    return _cache[key]


def _oracle(fixture):
    return np.load(os.path.join(FIXTURES, f"{fixture}_oracle.npz"))


def _close(a, b, rel=2e-3):
    return np.abs(a - b).max() <= rel * np.abs(b).max() + 1e-5


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("fixture", TINY)
def test_parity_with_reference_decoder(fixture, quant, threads):
    """16 greedy steps: same tokens as the reference decoder on the same (dequantized) weights,
    and logits close, both for the prefill and every decode step."""
    prompt = _oracle(fixture)["prompt"]
    ref = ReferenceDecoder(_reference_checkpoint(open_checkpoint(os.path.join(FIXTURES, fixture)), quant))
    ref_prefill = ref.prefill(prompt)
    ref.reset()
    ref_tokens, ref_logits = ref.greedy(prompt, 16)
    rt = _runtime(fixture, quant, threads)
    st = rt.new_state()
    assert _close(rt.logits(st, prompt), ref_prefill)
    res = rt.generate(st, prompt, 16, want_logits=True)
    assert res["tokens"] == ref_tokens
    assert res["finish_reason"] == "length"
    assert _close(res["logits"], ref_logits)
    # logprobs are log-softmax of the raw logits of each chosen token
    lse = np.log(np.exp(ref_logits - ref_logits.max(1, keepdims=True)).sum(1)) + ref_logits.max(1)
    expect = ref_logits[np.arange(16), ref_tokens] - lse
    assert np.allclose(res["logprobs"], expect, atol=1e-3)


@pytest.mark.parametrize("fixture", TINY)
def test_matches_transformers_oracle(fixture):
    """Native f32 weights: the transformers-made oracle (prefill logits and greedy tokens)."""
    o = _oracle(fixture)
    rt = _runtime(fixture)
    st = rt.new_state()
    assert _close(rt.logits(st, o["prompt"]), o["prefill"], rel=5e-3)
    assert rt.generate(st, o["prompt"], 16)["tokens"] == o["tokens"].tolist()


@pytest.mark.parametrize("fixture", ["tiny-llama", "tiny-qwen35"])
def test_prefill_in_chunks_equals_one_chunk(fixture):
    o = _oracle(fixture)
    ck = open_checkpoint(os.path.join(FIXTURES, fixture))
    small = Runtime(build(ck, context=64, prefill_chunk=5, logits_chunk=3), n_threads=1)
    big = _runtime(fixture)
    a, b = small.new_state(), big.new_state()
    assert _close(small.logits(a, o["prompt"]), big.logits(b, o["prompt"]), rel=1e-5)
    assert small.generate(a, o["prompt"], 8)["tokens"] == big.generate(b, o["prompt"], 8)["tokens"]


@pytest.mark.parametrize("fixture", ["tiny-llama", "tiny-qwen35"])
def test_prefix_reuse_multi_turn(fixture):
    """A second turn that extends the history prefills only the new tokens and gives the same
    tokens as a fresh session."""
    o = _oracle(fixture)
    rt = _runtime(fixture)
    st = rt.new_state()
    first = rt.generate(st, o["prompt"], 6)
    assert first["reused_tokens"] == 0
    assert st.position == len(o["prompt"]) + 5       # the last token was sampled, not fed
    turn2 = list(o["prompt"]) + first["tokens"] + [7, 8, 9]
    second = rt.generate(st, turn2, 6)
    assert second["reused_tokens"] == len(o["prompt"]) + 5
    fresh = rt.generate(rt.new_state(), turn2, 6)
    assert second["tokens"] == fresh["tokens"]


def test_prefix_reuse_partial_for_attention_models():
    """Attention-only models reuse the longest common prefix even when the prompt diverges."""
    o = _oracle("tiny-llama")
    rt = _runtime("tiny-llama")
    st = rt.new_state()
    rt.generate(st, o["prompt"], 4)
    edited = list(o["prompt"][:8]) + [3, 1, 4]
    res = rt.generate(st, edited, 6)
    assert res["reused_tokens"] == 8
    assert res["tokens"] == rt.generate(rt.new_state(), edited, 6)["tokens"]


def test_recurrent_model_restarts_on_divergence():
    o = _oracle("tiny-qwen35")
    rt = _runtime("tiny-qwen35")
    st = rt.new_state()
    rt.generate(st, o["prompt"], 4)
    edited = list(o["prompt"][:8]) + [3, 1, 4]
    res = rt.generate(st, edited, 6)
    assert res["reused_tokens"] == 0
    assert res["tokens"] == rt.generate(rt.new_state(), edited, 6)["tokens"]
    assert rt.generate(st, edited, 6)["reused_tokens"] == 0     # same prompt again: nothing to extend


def test_context_policy():
    rt = _runtime("tiny-llama", context=16)
    st = rt.new_state()
    with pytest.raises(ContextLengthError, match="context of 16"):
        rt.generate(st, list(range(17)), 4)
    assert st.position == 0
    res = rt.generate(st, list(range(12)), 100)
    assert res["finish_reason"] == "context"
    assert st.position == 16 and len(res["tokens"]) == 5


@pytest.mark.parametrize("bad", [{"temperature": -1}, {"top_p": 0}, {"top_k": -2}, {"min_p": 1.5},
                                 {"repetition_penalty": 0}, {"seed": -1}, {"temprature": 0.5}, "hot"])
def test_invalid_sampling_raises_before_work(bad):
    rt = _runtime("tiny-llama")
    st = rt.new_state()
    rt.generate(st, [1, 2, 3], 2)
    before = list(st.history)
    with pytest.raises(SamplingError) as e:
        rt.generate(st, [1, 2, 3, 4, 5], 4, sampling=bad)
    assert isinstance(e.value, ValueError)
    assert st.history == before
    with pytest.raises(SamplingError, match="max_tokens"):
        rt.generate(st, [1, 2], -1)
    with pytest.raises(TypeError, match="on_token"):
        rt.generate(st, [1, 2], 2, on_token="print")
    assert st.history == before


def test_bad_token_ids():
    rt = _runtime("tiny-llama")
    st = rt.new_state()
    with pytest.raises(TokenizerError, match="out of range"):
        rt.generate(st, [1, 256], 2)
    with pytest.raises(TokenizerError, match="at least one"):
        rt.generate(st, [], 2)


def test_bad_runtime_arguments():
    from lattice.program import ShapeOnlyCheckpoint
    ck = open_checkpoint(os.path.join(FIXTURES, "tiny-llama"))
    with pytest.raises(ConfigError, match="without weights"):
        Runtime(build(ShapeOnlyCheckpoint(ck.config), materialize=False))
    with pytest.raises(ConfigError, match="n_threads"):
        Runtime(build(ck, context=16), n_threads=0)


@pytest.mark.parametrize("threads", [1, 2])
def test_seeded_sampling_reproducible(threads):
    o = _oracle("tiny-qwen35")
    rt = _runtime("tiny-qwen35", threads=threads)
    params = {"temperature": 1.5, "top_k": 50, "top_p": 0.95, "min_p": 0.01, "repetition_penalty": 1.1,
              "presence_penalty": 0.2, "frequency_penalty": 0.1, "seed": 1234}
    a = rt.generate(rt.new_state(), o["prompt"], 16, sampling=params)
    b = rt.generate(rt.new_state(), o["prompt"], 16, sampling=params)
    assert a["tokens"] == b["tokens"] and a["logprobs"] == b["logprobs"]
    greedy = rt.generate(rt.new_state(), o["prompt"], 16)["tokens"]
    top1 = rt.generate(rt.new_state(), o["prompt"], 16, sampling={"temperature": 1.0, "top_k": 1, "seed": 5})
    assert top1["tokens"] == greedy


def test_stop_ids_and_on_token():
    o = _oracle("tiny-llama")
    rt = _runtime("tiny-llama")
    full = rt.generate(rt.new_state(), o["prompt"], 10)["tokens"]
    res = rt.generate(rt.new_state(), o["prompt"], 10, stop_ids=[full[4]])
    assert res["finish_reason"] == "stop" and res["tokens"] == full[:full.index(full[4])]
    seen = []
    res = rt.generate(rt.new_state(), o["prompt"], 10, on_token=lambda t, lp: seen.append((t, lp)) or len(seen) < 3)
    assert res["tokens"] == full[:3] and [t for t, _ in seen] == full[:3]
    assert res["finish_reason"] == "stop"


def test_two_sessions_two_threads_equal_alone():
    rt = _runtime("tiny-qwen35", threads=2)
    prompts = [list(_oracle("tiny-qwen35")["prompt"]), [5, 9, 2, 7, 1]]
    alone = [rt.generate(rt.new_state(), p, 24)["tokens"] for p in prompts]
    results = [None, None]

    def work(i):
        st = rt.new_state()
        for _ in range(5):
            results[i] = rt.generate(st, prompts[i], 24)["tokens"]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == alone


def test_nan_in_logits_raises_numerical_error():
    ck = open_checkpoint(os.path.join(FIXTURES, "tiny-llama"))
    norm = ck.tensors["model.norm.weight"]

    class Poisoned:
        name, shape, dtype = norm.name, norm.shape, "f32"

        def to_f32(self):
            w = norm.to_f32().copy()
            w[3] = np.nan
            return w

    rt = Runtime(build(_Ckpt(ck.config, {**ck.tensors, "model.norm.weight": Poisoned()}), context=32), n_threads=1)
    st = rt.new_state()
    with pytest.raises(NumericalError, match="NaN"):
        rt.generate(st, [1, 2, 3], 4)
    assert st.position == 0


def test_keyboard_interrupt_leaves_session_usable():
    o = _oracle("tiny-qwen35")
    rt = _runtime("tiny-qwen35")
    expected = rt.generate(rt.new_state(), o["prompt"], 12)["tokens"]
    st = rt.new_state()
    count = []

    def interrupt(tok, lp):
        count.append(tok)
        if len(count) == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        rt.generate(st, o["prompt"], 12, on_token=interrupt)
    assert st.position == len(o["prompt"]) + 3 and count == expected[:4]
    # continuing the interrupted turn reuses its cache (the 3 tokens fed before the interrupt)
    res = rt.generate(st, list(o["prompt"]) + expected[:5], 4)
    assert res["reused_tokens"] == len(o["prompt"]) + 3 and res["tokens"] == expected[5:9]
    assert rt.generate(st, o["prompt"], 12)["tokens"] == expected


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="RSS is read from /proc (Linux)")
def test_memory_flat_over_1000_generations():
    rt = _runtime("tiny-llama")
    st = rt.new_state()
    for i in range(100):
        rt.generate(st, [1 + i % 7, 2, 3], 3, sampling={"temperature": 0.7, "seed": i})
    before = _rss_bytes()
    for i in range(1000):
        rt.generate(st, [1 + i % 7, 2, 3], 3, sampling={"temperature": 0.7, "seed": i})
        if i % 100 == 0:
            rt.logits(rt.new_state(), [4, 5, 6])
    assert _rss_bytes() - before < 8 * 2**20


def test_ctrl_c_during_generation_stops_within_a_step():
    """SIGINT while the loop runs in C: the runtime checks signals after every step, raises
    KeyboardInterrupt from inside generate, and the session stays consistent."""
    import signal
    import traceback
    rt = _runtime("tiny-llama", context=4096)
    st = rt.new_state()
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt) as e:
            for _ in range(20):                 # far longer than 0.3 s
                rt.generate(st, [1, 2, 3], 4000)
    finally:
        timer.cancel()
    assert any(f.filename.endswith("_runtime.pyx") for f in traceback.extract_tb(e.value.__traceback__))
    assert 3 <= st.position < 4096
    assert rt.generate(st, [1, 2, 3], 8)["tokens"] == rt.generate(rt.new_state(), [1, 2, 3], 8)["tokens"]


@pytest.mark.parametrize("fixture", ["tiny-llama", "tiny-qwen35"])
def test_penalties_match_reference_sampler(fixture):
    """Greedy with repetition/presence/frequency penalties: the on-device counts (prompt tokens,
    then every fed token, rebuilt from the history on reuse) give the reference sampler's tokens."""
    from lattice.sampling import SamplingParams, sample
    params = SamplingParams(repetition_penalty=1.5, presence_penalty=0.7, frequency_penalty=0.4)
    ck = open_checkpoint(os.path.join(FIXTURES, fixture))
    ref = ReferenceDecoder(ck)
    vocab = ck.config.vocab_size

    def reference(prompt, n):
        ref.reset()
        counts = np.bincount(prompt, minlength=vocab)
        logits, out = ref.prefill(prompt)[-1], []
        for _ in range(n):
            tok, _ = sample(logits, params, np.random.default_rng(0), counts)
            out.append(tok)
            counts[tok] += 1
            logits = ref.step(tok)
        return out

    prompt = list(_oracle(fixture)["prompt"])
    rt = _runtime(fixture)
    st = rt.new_state()
    first = rt.generate(st, prompt, 10, sampling=params)["tokens"]
    assert first == reference(prompt, 10)
    turn2 = prompt + first + [11, 12]
    second = rt.generate(st, turn2, 10, sampling=params)
    assert second["reused_tokens"] == len(prompt) + 9
    assert second["tokens"] == reference(turn2, 10)


def test_unfused_ops_run_as_generic_kernels(monkeypatch):
    """A forward whose ops match no fusion pattern (norm read by a non-linear, silu_mul of two
    GEMVs with different inputs, adds of activations) compiles to RMSNORM / ELEMENTWISE kernels
    and matches the eager numpy execution of the same forward."""
    import lattice.program as program
    from lattice.models import llama
    from lattice.reference import NumpyOps, SequenceState

    def forward(ops, cfg, w, ids):
        x = ops.embed(w["model.embed_tokens.weight"], ids)
        h = ops.rms_norm(x, w["model.layers.0.input_layernorm.weight"], cfg.rms_norm_eps, False)
        gate = ops.linear(h, w["model.layers.0.mlp.gate_proj.weight"])
        up = ops.linear(x, w["model.layers.0.mlp.up_proj.weight"])
        y = ops.linear(ops.silu_mul(gate, up), w["model.layers.0.mlp.down_proj.weight"])
        x = ops.add(ops.add(x, h), ops.sigmoid_mul(y, x))
        x = ops.rms_norm(x, w["model.norm.weight"], cfg.rms_norm_eps, False)
        return ops.lm_head(x, w["lm_head.weight"])

    family = type("Family", (), {"forward": staticmethod(forward), "state_shapes": staticmethod(llama.state_shapes)})
    monkeypatch.setattr(program, "family_for", lambda model_type: family)
    ck = open_checkpoint(os.path.join(FIXTURES, "tiny-llama"))
    prog = build(ck, context=32)
    kinds = [k for k, _, _, _ in prog.notes["decode"]]
    assert kinds.count("rms_norm") == 1 and kinds.count("elementwise") == 4
    ids = [5, 17, 200, 3, 99]
    expect = forward(NumpyOps(SequenceState([])), ck.config, ck.tensors, np.array(ids))
    rt = Runtime(prog, n_threads=2)
    assert _close(rt.logits(rt.new_state(), ids), expect)
    assert _close(rt.generate(rt.new_state(), ids, 1, want_logits=True)["logits"][0], expect[-1])


def test_one_session_one_call_at_a_time():
    rt = _runtime("tiny-llama")
    st = rt.new_state()
    with st._use():                     # as if another thread were generating with it
        with pytest.raises(RuntimeError, match="in use"):
            rt.generate(st, [1, 2, 3], 2)
    assert rt.generate(st, [1, 2, 3], 2)["tokens"]
    with pytest.raises(ValueError, match="another Runtime"):
        _runtime("tiny-llama", threads=2).generate(st, [1, 2, 3], 2)


class _F16:
    """A weight stored as float16 (native format kept by quant=None)."""

    def __init__(self, t):
        self.name, self.shape, self.dtype = t.name, t.shape, "f16"
        self.raw = t.to_f32().astype(np.float16)

    def to_f32(self):
        return self.raw.astype(np.float32)


@pytest.mark.parametrize("threads", [1, 2])
def test_mixed_formats_without_barrier_between_independent_gemvs(threads):
    """f32 q_proj and f16 k|v_proj become two GEMVs that run without a barrier between them;
    the result still matches the reference on the same weights."""
    ck = open_checkpoint(os.path.join(FIXTURES, "tiny-llama"))
    tensors = dict(ck.tensors)
    for i in range(ck.config.num_hidden_layers):
        for p in ("k_proj", "v_proj"):
            name = f"model.layers.{i}.self_attn.{p}.weight"
            tensors[name] = _F16(tensors[name])
    mixed = _Ckpt(ck.config, tensors)
    prog = build(mixed, context=64)
    assert not prog.dispatches["decode"]["flags"][2] & 1
    prompt = _oracle("tiny-llama")["prompt"]
    ref_tokens, ref_logits = ReferenceDecoder(mixed).greedy(prompt, 12)
    rt = Runtime(prog, n_threads=threads)
    res = rt.generate(rt.new_state(), prompt, 12, want_logits=True)
    assert res["tokens"] == ref_tokens
    assert _close(res["logits"], ref_logits)


def test_smollm2_q4_1_gguf_matches_reference(smollm2_path):
    """The real default model, native Q4_1 kept exactly as Lattice Q4: same greedy tokens as the
    float32 reference decoder on the same weights, logits distribution within KL 1e-4."""
    ck = open_checkpoint(smollm2_path)
    prompt = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282,
              4649, 47, 2, 198, 1, 520, 9531, 198]
    ref_tokens, ref_logits = ReferenceDecoder(ck).greedy(prompt, 6)
    rt = Runtime(build(ck, quant=None, context=128), n_threads=2)
    res = rt.generate(rt.new_state(), prompt, 6, want_logits=True)
    assert res["tokens"] == ref_tokens
    p = np.exp(ref_logits - ref_logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)

    def log_softmax(x):
        x = x - x.max(1, keepdims=True)
        return x - np.log(np.exp(x).sum(1, keepdims=True))

    kl = (p * (log_softmax(ref_logits) - log_softmax(res["logits"]))).sum(1)
    assert kl.mean() < 1e-4


def test_smollm2_matches_transformers_f32(smollm2_path):
    """Native Q4 weights against transformers on the same dequantized weights: both chat greedy
    continuations (32 tokens; the smallest top-1/top-2 gap is 0.08) and teacher-forced logits."""
    o = np.load(os.path.join(FIXTURES, "smollm2_oracle.npz"))
    rt = Runtime(build(open_checkpoint(smollm2_path), quant=None, context=256), n_threads=1)
    for j in range(2):
        res = rt.generate(rt.new_state(), o[f"chat{j}_prompt"], 32)
        assert res["tokens"] == o[f"chat{j}_tokens"].tolist()
    for i in range(3):
        logits = rt.logits(rt.new_state(), o[f"seq{i}_ids"])
        top = np.take_along_axis(logits, o[f"seq{i}_top_ids"], axis=1)
        assert np.abs(top - o[f"seq{i}_top_logits"]).max() < 0.05
    for (i, t), want in zip(o["full_positions"], o["full_logits"]):
        assert _close(rt.logits(rt.new_state(), o[f"seq{i}_ids"][:t + 1])[-1], want, rel=2e-3)

