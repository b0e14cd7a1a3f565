"""The numpy reference: kernels, the two family files and ReferenceDecoder, against transformers.

Oracles come from tests/oracles/make_tiny_models.py and tests/oracles/smollm2_f32_reference.py
(torch + transformers, not needed here). Logit agreement is measured as
    rel = max|ours - theirs| / max|theirs|      (over every position and vocab entry compared)
"""
import os
import types

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import FIXTURES
from lattice import reference as ref
from lattice.config import ModelConfig
from lattice.errors import (ConfigError, ContextLengthError, MissingTensorError, TensorShapeError,
                            TokenizerError, UnsupportedModelError)
from lattice.formats import open_checkpoint
from lattice.models import check_weights, family_for, rope_inv_freq
from lattice.reference import ReferenceDecoder

TINY = ["qwen35", "llama", "qwen3", "qwen2"]
REL_TOL = 1e-4


def rel_err(ours, theirs):
    return float(np.abs(np.asarray(ours) - theirs).max() / np.abs(theirs).max())


def tiny(name):
    return open_checkpoint(os.path.join(FIXTURES, f"tiny-{name}"))


def oracle(name):
    with np.load(os.path.join(FIXTURES, f"tiny-{name}_oracle.npz")) as data:
        return {k: data[k] for k in data.files}


# ------------------------------------------------------------------------------ parity with transformers

@pytest.mark.parametrize("name", TINY)
def test_tiny_prefill_matches_transformers(name):
    o = oracle(name)
    logits = ReferenceDecoder(tiny(name)).prefill(o["prompt"])
    assert logits.dtype == np.float32 and logits.shape == o["prefill"].shape
    assert rel_err(logits, o["prefill"]) < REL_TOL


@pytest.mark.parametrize("name", TINY)
def test_tiny_cached_greedy_matches_transformers(name):
    o = oracle(name)
    tokens, step_logits = ReferenceDecoder(tiny(name)).greedy(o["prompt"], len(o["tokens"]))
    assert tokens == o["tokens"].tolist()
    assert rel_err(step_logits, o["step_logits"]) < REL_TOL


def test_tiny_qwen35_fixture_exercises_what_it_should():
    cfg = tiny("qwen35").config
    assert set(cfg.layer_types) == {"linear_attention", "full_attention"}
    assert cfg.linear_num_value_heads > cfg.linear_num_key_heads > 1   # h // g differs from h % Hk
    assert cfg.rotary_dim < cfg.head_dim and cfg.norm_add_one and cfg.attn_output_gate
    assert tiny("llama").config.rope_scaling["rope_type"] == "llama3"


@pytest.mark.parametrize("flag", ["norm_add_one", "attn_output_gate"])
def test_tiny_qwen35_parity_depends_on_flag(flag):
    """The fixture is sensitive to each Qwen3.5 convention: getting one wrong breaks parity."""
    ckpt = tiny("qwen35")
    ckpt.config.__dict__[flag] = False
    o = oracle("qwen35")
    if flag == "attn_output_gate":   # q_proj then has the gated shape: check the weights, not the math
        with pytest.raises(TensorShapeError, match="q_proj"):
            ReferenceDecoder(ckpt)
        return
    assert rel_err(ReferenceDecoder(ckpt).prefill(o["prompt"]), o["prefill"]) > 1e-2


# ------------------------------------------------------------------------------ prefill / decode consistency

@pytest.mark.parametrize("name", TINY)
def test_prefill_equals_single_steps(name):
    prompt = oracle(name)["prompt"]
    dec = ReferenceDecoder(tiny(name))
    batched = dec.prefill(prompt)
    assert dec.position == len(prompt)
    dec.reset()
    stepped = np.stack([dec.step(int(t)) for t in prompt])
    assert rel_err(stepped, batched) < 1e-5
    dec.reset()
    chunked = np.concatenate([dec.prefill(prompt[:5]), dec.prefill(prompt[5:])])
    assert rel_err(chunked, batched) < 1e-5


# ------------------------------------------------------------------------------ kernels

def test_gated_delta_rule_grouped_value_heads():
    """Value head h reads key head h // (Hv/Hk): compare with a plain per-head loop of the rule."""
    rng = np.random.default_rng(1)
    t, hk, hv, dk, dv = 5, 2, 6, 4, 3
    q, k = rng.standard_normal((2, t, hk * dk), dtype=np.float32)
    v = rng.standard_normal((t, hv * dv), dtype=np.float32)
    a, b = rng.standard_normal((2, t, hv), dtype=np.float32)
    A_log, dt_bias = rng.standard_normal((2, hv), dtype=np.float32)
    state = rng.standard_normal((hv, dk, dv), dtype=np.float32)

    def naive(key_head_of):
        s, out = state.astype(np.float64), np.zeros((t, hv, dv))
        for h in range(hv):
            kh = key_head_of(h)
            for i in range(t):
                qi, ki = q[i, kh * dk:(kh + 1) * dk], k[i, kh * dk:(kh + 1) * dk]
                qi = qi / np.sqrt(qi @ qi + 1e-6) / np.sqrt(dk)
                ki = ki / np.sqrt(ki @ ki + 1e-6)
                g = -np.exp(A_log[h]) * np.log1p(np.exp(a[i, h] + dt_bias[h]))
                beta = 1 / (1 + np.exp(-b[i, h]))
                s[h] *= np.exp(g)
                s[h] += np.outer(ki, (v[i, h * dv:(h + 1) * dv] - s[h].T @ ki) * beta)
                out[i, h] = s[h].T @ qi
        return out.reshape(t, hv * dv), s

    o, new_state = ref.gated_delta_rule(q, k, v, a, b, A_log, dt_bias, state, hk, hv, dk, dv)
    want_o, want_state = naive(lambda h: h // (hv // hk))
    assert np.allclose(o, want_o, atol=1e-5) and np.allclose(new_state, want_state, atol=1e-5)
    assert new_state.dtype == np.float32
    tiled_o, _ = naive(lambda h: h % hk)      # the other layout really is different
    assert not np.allclose(o, tiled_o, atol=1e-3)
    # two calls carrying the state == one call over all tokens
    o1, s1 = ref.gated_delta_rule(q[:2], k[:2], v[:2], a[:2], b[:2], A_log, dt_bias, state, hk, hv, dk, dv)
    o2, s2 = ref.gated_delta_rule(q[2:], k[2:], v[2:], a[2:], b[2:], A_log, dt_bias, s1, hk, hv, dk, dv)
    assert np.allclose(np.concatenate([o1, o2]), o, atol=1e-6) and np.allclose(s2, new_state, atol=1e-6)


def test_conv1d_silu_is_causal_and_stateful():
    rng = np.random.default_rng(2)
    t, c, kernel = 7, 5, 4
    x = rng.standard_normal((t, c), dtype=np.float32)
    w = rng.standard_normal((c, 1, kernel), dtype=np.float32)
    zero = np.zeros((kernel - 1, c), np.float32)
    y, state = ref.conv1d_silu(x, w, zero)
    padded = np.concatenate([zero, x])
    pre = np.stack([(padded[i:i + kernel] * w[:, 0].T).sum(0) for i in range(t)])
    assert np.allclose(y, pre / (1 + np.exp(-pre)), atol=1e-6)
    assert np.array_equal(state, x[-(kernel - 1):])
    y1, s1 = ref.conv1d_silu(x[:3], w, zero)
    y2, _ = ref.conv1d_silu(x[3:], w, s1)
    assert np.allclose(np.concatenate([y1, y2]), y, atol=1e-6)


def test_attention_is_causal_gqa():
    rng = np.random.default_rng(3)
    t, h, hkv, d = 4, 4, 2, 8
    q = rng.standard_normal((t, h * d), dtype=np.float32)
    k, v = rng.standard_normal((2, t, hkv * d), dtype=np.float32)
    out = ref.attention(q, k, v, 0, h, hkv, d, d ** -0.5)
    for i in range(t):   # query i sees keys 0..i only; head j uses kv head j // 2
        for j in range(h):
            kj, vj = k[:i + 1, (j // 2) * d:(j // 2 + 1) * d], v[:i + 1, (j // 2) * d:(j // 2 + 1) * d]
            s = kj @ q[i, j * d:(j + 1) * d] * d ** -0.5
            p = np.exp(s - s.max())
            assert np.allclose(out[i, j * d:(j + 1) * d], p @ vj / p.sum(), atol=1e-6)
    last = ref.attention(q[-1:], k, v, t - 1, h, hkv, d, d ** -0.5)
    assert np.allclose(last, out[-1:], atol=1e-6)


def test_rope_partial_neox():
    rng = np.random.default_rng(4)
    n_heads, hd, rot = 2, 8, 4
    x = rng.standard_normal((3, n_heads * hd), dtype=np.float32)
    inv_freq = np.array([1.0, 0.1], np.float32)
    y = ref.rope(x, np.array([0, 1, 5]), n_heads, hd, rot, inv_freq).reshape(3, n_heads, hd)
    xh = x.reshape(3, n_heads, hd)
    assert np.allclose(y[0], xh[0])                         # position 0: identity
    assert np.array_equal(y[..., rot:], xh[..., rot:])      # dims past rotary_dim untouched
    angle = 5 * 0.1                                         # pair (1, 3) at position 5
    c, s = np.cos(angle), np.sin(angle)
    assert np.allclose(y[2, :, 1], xh[2, :, 1] * c - xh[2, :, 3] * s, atol=1e-6)
    assert np.allclose(y[2, :, 3], xh[2, :, 3] * c + xh[2, :, 1] * s, atol=1e-6)


def test_split_heads_and_norms():
    x = np.arange(2 * 3 * 5, dtype=np.float32).reshape(2, 15)      # 3 heads of [2 | 3]
    a, b = ref.split_heads(x, 3, [2, 3])
    assert np.array_equal(a[0], [0, 1, 5, 6, 10, 11]) and np.array_equal(b[1], [17, 18, 19, 22, 23, 24, 27, 28, 29])
    w = np.array([0.5, -0.25], np.float32)
    r = np.random.default_rng(5).standard_normal((2, 4), dtype=np.float32)
    unit = r.reshape(2, 2, 2) / np.sqrt((r.reshape(2, 2, 2) ** 2).mean(-1, keepdims=True) + 1e-6)
    assert np.allclose(ref.head_rms_norm(r, w, 2, 1e-6, True), (unit * (1 + w)).reshape(2, 4), atol=1e-6)
    assert np.allclose(ref.head_rms_norm(r, w, 2, 1e-6, False), (unit * w).reshape(2, 4), atol=1e-6)
    z = np.ones((2, 4), np.float32)
    silu1 = 1 / (1 + np.exp(-1.0))
    assert np.allclose(ref.gated_rms_norm(r, z, w, 2, 1e-6), (unit * w).reshape(2, 4) * silu1, atol=1e-6)


def test_rope_inv_freq_llama3_bands():
    base = dict(model_type="llama", vocab_size=8, hidden_size=32, intermediate_size=8, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1, head_dim=16, rope_theta=10000.0)
    plain = rope_inv_freq(ModelConfig(**base))
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
    scaled = rope_inv_freq(ModelConfig(**base, rope_scaling=scaling))
    wavelen = 2 * np.pi / plain
    assert np.allclose(scaled[wavelen < 8], plain[wavelen < 8])              # high frequencies kept
    assert np.allclose(scaled[wavelen > 32], plain[wavelen > 32] / 8)        # low frequencies / factor
    mid = (wavelen >= 8) & (wavelen <= 32)
    assert mid.any() and np.all((scaled[mid] < plain[mid]) & (scaled[mid] > plain[mid] / 8))
    with pytest.raises(UnsupportedModelError, match="yarn"):
        rope_inv_freq(ModelConfig(**base, rope_scaling={"rope_type": "yarn", "factor": 4.0}))
    with pytest.raises(ConfigError, match="low_freq_factor"):
        rope_inv_freq(ModelConfig(**base, rope_scaling={"rope_type": "llama3", "factor": 8.0}))


# ------------------------------------------------------------------------------ bad input

def without(ckpt, name):
    return types.SimpleNamespace(config=ckpt.config, path=ckpt.path,
                                 tensors={k: v for k, v in ckpt.tensors.items() if k != name})


def test_missing_tensor_is_named():
    ckpt = tiny("qwen35")
    name = "model.layers.0.linear_attn.A_log"
    with pytest.raises(MissingTensorError, match=r"A_log.*\[4\]") as e:
        ReferenceDecoder(without(ckpt, name))
    assert "tiny-qwen35" in str(e.value)


def test_missing_untied_head_is_named():
    with pytest.raises(MissingTensorError, match="lm_head.weight"):
        check_weights(without(tiny("llama"), "lm_head.weight"))


def test_wrong_shape_in_safetensors_file(tmp_path):
    src = os.path.join(FIXTURES, "tiny-qwen3")
    arrays = load_file(os.path.join(src, "model.safetensors"))
    arrays["model.layers.1.self_attn.k_norm.weight"] = np.ones(16, np.float32)   # head_dim is 24
    save_file(arrays, str(tmp_path / "model.safetensors"))
    for f in ("config.json", "generation_config.json"):
        (tmp_path / f).write_bytes(open(os.path.join(src, f), "rb").read())
    with pytest.raises(TensorShapeError, match=r"k_norm.*\[16\].*\[24\]") as e:
        ReferenceDecoder(open_checkpoint(tmp_path))
    assert "model.safetensors" in str(e.value)


def test_unknown_model_type():
    with pytest.raises(UnsupportedModelError, match=r"'mamba'.*llama.*qwen3_5"):
        family_for("mamba")


def test_token_out_of_range_and_context_full():
    dec = ReferenceDecoder(tiny("qwen2"), context=8)
    with pytest.raises(TokenizerError, match="256"):
        dec.prefill([1, 256])
    with pytest.raises(TokenizerError):
        dec.prefill([])
    dec.prefill([1, 2, 3, 4, 5, 6])
    with pytest.raises(ContextLengthError, match="context of 8"):
        dec.prefill([1, 2, 3])
    assert dec.position == 6          # a refused step changes nothing
    dec.step(7)


# ------------------------------------------------------------------------------ SmolLM2 (real model)

@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    with np.load(os.path.join(FIXTURES, "smollm2_oracle.npz")) as data:
        o = {k: data[k] for k in data.files}
    return ReferenceDecoder(open_checkpoint(smollm2_path)), o


def test_smollm2_logits_match_f32_reference(smollm2):
    """transformers on the same GGUF dequantized to f32; REL_TOL over top-32 logits at every
    position and full-vocab rows at a few positions."""
    dec, o = smollm2
    i = 0
    while f"seq{i}_ids" in o:
        dec.reset()
        logits = dec.prefill(o[f"seq{i}_ids"])
        top = np.take_along_axis(logits, o[f"seq{i}_top_ids"].astype(np.int64), axis=1)
        assert rel_err(top, o[f"seq{i}_top_logits"]) < REL_TOL
        for (seq, pos), full in zip(o["full_positions"], o["full_logits"]):
            if seq == i:
                assert rel_err(logits[pos], full) < REL_TOL
        i += 1
    assert i == 3


@pytest.mark.parametrize("chat", [0, 1])
def test_smollm2_greedy_matches_f32_reference(smollm2, chat):
    dec, o = smollm2
    dec.reset()
    tokens, _ = dec.greedy(o[f"chat{chat}_prompt"], len(o[f"chat{chat}_tokens"]))
    assert tokens == o[f"chat{chat}_tokens"].tolist()


# ------------------------------------------------------------------------------ the ops contract, traced

class Opaque:
    """A symbolic activation: a shape and nothing else. Numpy, arithmetic, indexing and truth tests
    on it fail, as they would in the program builder's tracer."""
    __slots__ = ("shape",)

    def __init__(self, *shape):
        self.shape = tuple(shape)

    def __array__(self, *args, **kwargs):
        raise TypeError("model code used numpy on an activation")

    def __bool__(self):
        raise TypeError("model code branched on an activation")

    def __len__(self):
        raise TypeError("model code took len() of an activation")

    def __getitem__(self, key):
        raise TypeError("model code indexed an activation")


class ShapeOnlyWeight:
    def __init__(self, shape):
        self.shape = tuple(shape)

    def to_f32(self):
        raise AssertionError("model code read weight data")


class ShapeOps:
    """Records the op sequence and checks every shape against the contract."""

    def __init__(self, cfg, layer_states):
        self.cfg, self.layer_states, self.calls = cfg, layer_states, []

    def _rec(self, name, *outs):
        self.calls.append(name)
        assert all(isinstance(o, Opaque) for o in outs)
        return outs[0] if len(outs) == 1 else outs

    def embed(self, table, ids):
        return self._rec("embed", Opaque(ids.shape[0], table.shape[1]))

    def rms_norm(self, x, w, eps, add_one):
        assert w.shape == (x.shape[1],) and isinstance(add_one, bool)
        return self._rec("rms_norm", Opaque(*x.shape))

    def head_rms_norm(self, x, w, n_heads, eps, add_one):
        assert x.shape[1] == n_heads * w.shape[0]
        return self._rec("head_rms_norm", Opaque(*x.shape))

    def linear(self, x, w, bias=None):
        assert x.shape[1] == w.shape[1] and (bias is None or bias.shape == (w.shape[0],))
        return self._rec("linear", Opaque(x.shape[0], w.shape[0]))

    def add(self, a, b):
        assert a.shape == b.shape
        return self._rec("add", Opaque(*a.shape))

    def silu_mul(self, gate, up):
        assert gate.shape == up.shape
        return self._rec("silu_mul", Opaque(*gate.shape))

    def sigmoid_mul(self, x, gate):
        assert x.shape == gate.shape
        return self._rec("sigmoid_mul", Opaque(*x.shape))

    def split(self, x, sizes):
        assert sum(sizes) == x.shape[1]
        return self._rec("split", *(Opaque(x.shape[0], s) for s in sizes))

    def split_heads(self, x, n_heads, sizes):
        assert n_heads * sum(sizes) == x.shape[1]
        return self._rec("split_heads", *(Opaque(x.shape[0], n_heads * s) for s in sizes))

    def rope(self, x, n_heads, head_dim, rotary_dim, inv_freq):
        assert x.shape[1] == n_heads * head_dim and inv_freq.shape == (rotary_dim // 2,)
        return self._rec("rope", Opaque(*x.shape))

    def attention(self, q, k, v, layer, n_heads, n_kv_heads, head_dim, scale):
        width = self.layer_states[layer].width
        assert k.shape[1] == v.shape[1] == width == n_kv_heads * head_dim and q.shape[1] == n_heads * head_dim
        return self._rec("attention", Opaque(q.shape[0], n_heads * head_dim))

    def conv1d_silu(self, x, w, layer):
        assert self.layer_states[layer].conv == (w.shape[-1] - 1, x.shape[1]) == (w.shape[-1] - 1, w.shape[0])
        return self._rec("conv1d_silu", Opaque(*x.shape))

    def gated_delta_rule(self, q, k, v, a, b, A_log, dt_bias, layer, n_k_heads, n_v_heads, k_dim, v_dim):
        assert self.layer_states[layer].recurrent == (n_v_heads, k_dim, v_dim)
        assert q.shape[1] == k.shape[1] == n_k_heads * k_dim and v.shape[1] == n_v_heads * v_dim
        assert a.shape[1] == b.shape[1] == A_log.shape[0] == dt_bias.shape[0] == n_v_heads
        return self._rec("gated_delta_rule", Opaque(q.shape[0], n_v_heads * v_dim))

    def gated_rms_norm(self, x, z, w, n_heads, eps):
        assert x.shape == z.shape and x.shape[1] == n_heads * w.shape[0]
        return self._rec("gated_rms_norm", Opaque(*x.shape))

    def lm_head(self, x, w):
        assert x.shape[1] == w.shape[1]
        return self._rec("lm_head", Opaque(x.shape[0], w.shape[0]))


QWEN35_08B = dict(   # the real Qwen3.5-0.8B text shape
    model_type="qwen3_5", vocab_size=248320, hidden_size=1024, intermediate_size=3584, num_hidden_layers=24,
    num_attention_heads=8, num_key_value_heads=2, head_dim=256, rope_theta=1e7, partial_rotary_factor=0.25,
    tie_word_embeddings=True, qk_norm=True, norm_add_one=True, attn_output_gate=True,
    layer_types=["linear_attention"] * 3 + ["full_attention"], linear_num_key_heads=16,
    linear_num_value_heads=16, linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel_dim=4)
QWEN35_08B["layer_types"] = QWEN35_08B["layer_types"] * 6


@pytest.mark.parametrize("cfg", [tiny(n).config for n in TINY] + [ModelConfig(**QWEN35_08B)],
                         ids=TINY + ["qwen35-0.8b-shape"])
def test_forward_traces_symbolically(cfg):
    """Model code computes only through ops (no numpy, branching or indexing on activations, no
    weight data read), and expected_weights / state_shapes agree with what forward uses."""
    family = family_for(cfg.model_type)
    weights = {k: ShapeOnlyWeight(s) for k, s in family.expected_weights(cfg).items()}
    ops = ShapeOps(cfg, family.state_shapes(cfg))
    logits = family.forward(ops, cfg, weights, Opaque(3))
    assert logits.shape == (3, cfg.vocab_size)
    n_attn = cfg.layer_types.count("full_attention")
    assert ops.calls.count("attention") == n_attn
    assert ops.calls.count("gated_delta_rule") == cfg.num_hidden_layers - n_attn
    assert ops.calls[0] == "embed" and ops.calls[-1] == "lm_head"
