"""Lattice's Q8/Q4 block formats: layouts, error bounds, exact conversions from GGUF and MLX."""
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from conftest import FIXTURES
from lattice.errors import NumericalError
from lattice.formats import open_checkpoint
from lattice.formats.tensor import mlx_dequantize
from lattice.quant import (QuantizedMatrix, from_gguf_q4, from_gguf_q8_0, from_mlx_q4, from_tensor,
                           quantize)

FORMATS = Path(FIXTURES) / "formats"
AWKWARD_K = [1, 31, 32, 33, 100, 256]


def _random(n, k, seed):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(np.float32) * rng.uniform(1e-3, 10, (n, 1)).astype(np.float32)
    w[0, : min(k, 40)] = 0.0                 # an all-zero (or partly zero) block
    if n > 2:
        w[1] = 0.25                          # a constant row
        w[2, ::7] = 50.0                     # outliers
    return w


def _planes_ok(m: QuantizedMatrix):
    for plane in (m.qs, m.scales) + (() if m.mins is None else (m.mins,)):
        assert plane.flags.c_contiguous and plane.ctypes.data % 16 == 0
    assert m.scales.dtype == np.float16 and m.scales.shape == (m.shape[0], m.padded_k // 32)
    assert m.padded_k % 32 == 0 and m.shape[1] <= m.padded_k < m.shape[1] + 32


@pytest.mark.parametrize("k", AWKWARD_K)
def test_q8_error_bound(k):
    w = _random(9, k, seed=k)
    m = quantize(w, "q8")
    _planes_ok(m)
    assert m.kind == "q8" and m.qs.dtype == np.int8 and m.qs.shape == (9, m.padded_k) and m.mins is None
    assert np.abs(m.qs.astype(int)).max() <= 127
    deq = m.dequantize()
    assert deq.shape == w.shape and deq.dtype == np.float32
    scale = np.repeat(m.scales.astype(np.float64), 32, axis=1)[:, :k]
    assert (np.abs(w.astype(np.float64) - deq) <= scale / 2 + 1e-5 * scale).all()
    # the stored scale is max|w|/127 rounded up to f16
    blocks = np.pad(w, ((0, 0), (0, m.padded_k - k))).reshape(9, -1, 32)
    ideal = np.abs(blocks).max(-1) / 127
    s = m.scales.astype(np.float32)
    assert (s >= ideal).all() and (s <= ideal * (1 + 2 ** -10) + 2 ** -24).all()
    # padding is zeros
    assert (m.qs[:, k:] == 0).all()


@pytest.mark.parametrize("k", AWKWARD_K)
def test_q4_error_bound(k):
    w = _random(9, k, seed=100 + k)
    m = quantize(w, "q4")
    _planes_ok(m)
    assert m.kind == "q4" and m.qs.dtype == np.uint8 and m.qs.shape == (9, m.padded_k // 2)
    assert m.mins.dtype == np.float16
    deq = m.dequantize()
    scale = np.repeat(m.scales.astype(np.float64), 32, axis=1)[:, :k]
    err = np.abs(w.astype(np.float64) - deq)
    assert (err <= scale / 2 + 1e-5 * scale + np.spacing(np.abs(w)) ).all()
    assert err.max() > 0      # the bound is not vacuous: 4 bits do lose precision


def test_q4_nibble_order():
    """Byte j of a block: element j in the low nibble, element j + 16 in the high nibble."""
    q = np.array([list(range(16)) + list(range(15, -1, -1))], dtype=np.float32)   # min 0, max 15
    m = quantize(q, "q4")
    assert m.scales[0, 0] == 1 and m.mins[0, 0] == 0
    expected = [lo | (hi << 4) for lo, hi in zip(range(16), range(15, -1, -1))]
    assert m.qs[0].tolist() == expected
    np.testing.assert_array_equal(m.dequantize(), q)


def test_q8_exact_on_representable_values():
    """Values already on a float16 scale grid (max |q| = 127) survive exactly."""
    rng = np.random.default_rng(0)
    q = rng.integers(-127, 128, (3, 64))
    q[:, ::32] = 127
    w = (q * 0.5).astype(np.float32)
    m = quantize(w, "q8")
    assert (m.scales == np.float16(0.5)).all()
    np.testing.assert_array_equal(m.qs, q.astype(np.int8))
    np.testing.assert_array_equal(m.dequantize(), w)


def test_quantize_rejects_non_finite_and_huge():
    w = np.ones((2, 32), np.float32)
    w[1, 3] = np.nan
    with pytest.raises(NumericalError, match="NaN"):
        quantize(w, "q8", name="blk.0.w")
    with pytest.raises(NumericalError, match="float16"):
        quantize(np.full((1, 32), 1e9, np.float32), "q8")
    with pytest.raises(NumericalError, match="float16"):
        quantize(np.full((1, 32), -1e9, np.float32), "q4")
    with pytest.raises(ValueError, match="q2"):
        quantize(w, "q2")


# --- exact conversions ----------------------------------------------------------------------------

def test_exact_from_gguf_q8_0():
    w = _random(4, 96, seed=1)
    raw = gguf_quantize(w, GGMLQuantizationType.Q8_0)
    m = from_gguf_q8_0(raw, w.shape)
    _planes_ok(m)
    np.testing.assert_array_equal(m.dequantize(), gguf_dequantize(raw, GGMLQuantizationType.Q8_0))


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
def test_exact_from_gguf_q4(qtype):
    w = _random(4, 96, seed=2)
    t = GGMLQuantizationType[qtype]
    raw = gguf_quantize(w, t)
    m = from_gguf_q4(raw, w.shape, q4_1=qtype == "Q4_1")
    _planes_ok(m)
    np.testing.assert_array_equal(m.dequantize(), gguf_dequantize(raw, t))
    if qtype == "Q4_1":                                       # same quant bytes, unchanged
        assert m.qs.tobytes() == raw.reshape(4, 3, 20)[..., 4:].tobytes()


def test_exact_from_gguf_tensors_with_permuted_rows():
    ckpt = open_checkpoint(FORMATS / "tiny-llama-q8_0.gguf")
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight",
                 "model.embed_tokens.weight"):
        t = ckpt.tensors[name]
        m = from_tensor(t, "q8")
        np.testing.assert_array_equal(m.dequantize(), t.to_f32())


def test_exact_from_smollm2_q4_1(smollm2_path):
    t = open_checkpoint(smollm2_path).tensors["model.layers.0.self_attn.k_proj.weight"]
    assert t.dtype == "q4_1"
    m = from_tensor(t, "q4")
    np.testing.assert_array_equal(m.dequantize(), t.to_f32())


def test_exact_from_mlx_q4_group_32():
    ckpt = open_checkpoint(FORMATS / "tiny-qwen35-mlx4")
    for t in ckpt.tensors.values():
        if t.dtype == "mlx_q4":
            np.testing.assert_array_equal(from_tensor(t, "q4").dequantize(), t.to_f32(), err_msg=t.name)


@pytest.mark.parametrize("group", [32, 64, 128])
def test_exact_from_mlx_q4_groups(group):
    rng = np.random.default_rng(group)
    n, k = 3, 256
    q = rng.integers(0, 16, (n, k), dtype=np.uint32)
    # MLX packing: element j at bits 4 * (j % 8) of word j // 8
    packed = (q.reshape(n, k // 8, 8) << (np.arange(8, dtype=np.uint32) * 4)).sum(-1, dtype=np.uint32)
    scales = rng.uniform(0.01, 0.1, (n, k // group)).astype(np.float16)
    biases = rng.uniform(-1, 0, (n, k // group)).astype(np.float16)
    m = from_mlx_q4(packed, scales, biases, group, (n, k))
    np.testing.assert_array_equal(m.dequantize(), mlx_dequantize(packed, scales, biases, 4, group))


def test_requantized_fallback_within_bound():
    """MLX 8-bit is affine and Q8 symmetric: requantized from f32, within Q8's bound."""
    t = open_checkpoint(FORMATS / "tiny-llama-mlx8").tensors["model.layers.0.mlp.up_proj.weight"]
    w = t.to_f32()
    m = from_tensor(t, "q8")
    scale = np.repeat(m.scales.astype(np.float32), 32, axis=1)
    assert (np.abs(m.dequantize() - w) <= scale / 2 * (1 + 1e-5)).all()
