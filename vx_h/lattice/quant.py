"""Lattice's own block-quantized weight formats, stored split for the runtime kernels.

A matrix W [N, K] (Linear orientation: N output rows, K inputs) is cut into blocks of 32 consecutive
elements along K. Rows are padded with zeros to Kp = ceil(K / 32) * 32; a kernel must treat the
activation as zero-padded to Kp as well (the padding then contributes exactly 0). Three planes, each
C-contiguous and 16-byte aligned:

Q8  qs int8 [N, Kp], scales float16 [N, Kp/32].   w = q * scale, symmetric.
    Quantizing: scale = max|w| / 127 rounded UP to float16 (so no q is clipped), q = round(w / scale).
    Error bound (tested): |w - deq| <= scale / 2 (+ 1e-5 * scale for float32 division rounding),
    with `scale` the stored float16 value, which is at most max|w| / 127 * (1 + 2**-10).

Q4  qs uint8 [N, Kp/2], scales float16 [N, Kp/32], mins float16 [N, Kp/32].   w = q * scale + min,
    q in 0..15. Nibble order inside a block of 32 (16 bytes), as in GGML so that one AND and one
    shift unpack two contiguous halves: byte j holds element j in its low nibble and element j+16 in
    its high nibble.
    Quantizing: min = block minimum rounded DOWN to float16, scale = (max - min) / 15 rounded UP to
    float16 (so every q lands in 0..15), q = round((w - min) / scale).
    Error bound (tested): |w - deq| <= scale / 2 (+ 1e-5 * scale + 1 float32 ulp of |w|).

Exact conversions (no requantization, bit-identical dequantized values): GGUF Q8_0 -> Q8 (same
block: f16 d + 32 int8), GGUF Q4_0 -> Q4 (min = -8 d, exact in float16), GGUF Q4_1 -> Q4 (same
d, m), MLX affine 4-bit with group size a multiple of 32 -> Q4 (a group is split into blocks sharing
its scale/bias; exact when the stored scales/biases are float16, or bfloat16 values that float16
represents). Everything else is requantized from float32.
"""
from __future__ import annotations

import numpy as np

from .errors import NumericalError
from .formats.tensor import f32_rows

BLOCK = 32
ALIGN = 16
KINDS = ("q8", "q4")


def aligned_empty(shape, dtype, align=ALIGN) -> np.ndarray:
    """An uninitialized C-contiguous array whose data pointer is a multiple of `align`."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    buf = np.empty(nbytes + align, dtype=np.uint8)
    start = -buf.ctypes.data % align
    return buf[start:start + nbytes].view(dtype).reshape(shape)


def _aligned(a, dtype) -> np.ndarray:
    a = np.asarray(a, dtype=dtype)
    out = aligned_empty(a.shape, dtype)
    out[...] = a
    return out


class QuantizedMatrix:
    """A [N, K] matrix in Lattice's Q8 or Q4 format (see the module docstring for the layouts)."""

    def __init__(self, kind, shape, qs, scales, mins=None):
        if kind not in KINDS:
            raise ValueError(f"unknown quantization kind {kind!r} (known: {KINDS})")
        n, k = (int(d) for d in shape)
        kp = -(-k // BLOCK) * BLOCK
        qs_shape = (n, kp) if kind == "q8" else (n, kp // 2)
        qs_dtype = np.int8 if kind == "q8" else np.uint8
        self.kind, self.shape = kind, (n, k)
        self.qs = _aligned(qs, qs_dtype).reshape(qs_shape)
        self.scales = _aligned(scales, np.float16).reshape(n, kp // BLOCK)
        self.mins = None if kind == "q8" else _aligned(mins, np.float16).reshape(n, kp // BLOCK)

    @property
    def padded_k(self) -> int:
        return self.scales.shape[1] * BLOCK

    @property
    def nbytes(self) -> int:
        return self.qs.nbytes + self.scales.nbytes + (0 if self.mins is None else self.mins.nbytes)

    def block_values(self) -> np.ndarray:
        """The integer quants as [N, Kp/32, 32] (Q4 unpacked to 0..15, element order)."""
        n, nb = self.scales.shape
        if self.kind == "q8":
            return self.qs.reshape(n, nb, BLOCK)
        packed = self.qs.reshape(n, nb, BLOCK // 2)
        return np.concatenate([packed & 0x0F, packed >> 4], axis=-1)

    def dequantize(self) -> np.ndarray:
        """float32 [N, K]."""
        q = self.block_values().astype(np.float32)
        w = q * self.scales.astype(np.float32)[..., None]
        if self.mins is not None:
            w += self.mins.astype(np.float32)[..., None]
        n = self.shape[0]
        return np.ascontiguousarray(w.reshape(n, -1)[:, :self.shape[1]])

    def __repr__(self):
        return f"QuantizedMatrix({self.kind!r}, shape={self.shape})"


def _blocks(w, name):
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D matrix, got shape {w.shape}")
    if not np.isfinite(w).all():
        raise NumericalError(f"{name}: matrix {w.shape} contains NaN or Inf")
    n, k = w.shape
    kp = -(-k // BLOCK) * BLOCK
    if kp != k:
        w = np.concatenate([w, np.zeros((n, kp - k), np.float32)], axis=1)
    return w.reshape(n, kp // BLOCK, BLOCK)


F16_MAX = float(np.finfo(np.float16).max)


def _f16_up(x, name):
    """Smallest float16 >= x (x >= 0 float32)."""
    if (x > F16_MAX).any():
        raise NumericalError(f"{name}: block scale {x.max():g} exceeds the float16 range")
    h = x.astype(np.float16)
    low = h.astype(np.float32) < x
    h[low] = np.nextafter(h[low], np.float16(np.inf))
    if not np.isfinite(h).all():
        raise NumericalError(f"{name}: block scale exceeds the float16 range")
    return h


def _f16_down(x, name):
    """Largest float16 <= x."""
    if (np.abs(x) > F16_MAX).any():
        raise NumericalError(f"{name}: block minimum {x.min():g} exceeds the float16 range")
    h = x.astype(np.float16)
    high = h.astype(np.float32) > x
    h[high] = np.nextafter(h[high], np.float16(-np.inf))
    return h


def pack_q4(q: np.ndarray) -> np.ndarray:
    """[N, nb, 32] values 0..15 -> [N, nb*16] bytes (element j low nibble, j+16 high nibble)."""
    q = q.astype(np.uint8)
    n = q.shape[0]
    return (q[..., :16] | (q[..., 16:] << 4)).reshape(n, -1)


def quantize(w, kind, name="matrix") -> QuantizedMatrix:
    """Quantize a float matrix [N, K] to Lattice's Q8 or Q4 (vectorised)."""
    if kind not in KINDS:
        raise ValueError(f"unknown quantization kind {kind!r} (known: {KINDS})")
    b = _blocks(w, name)
    n, k = np.shape(w)
    if kind == "q8":
        scale = _f16_up(np.abs(b).max(axis=-1) / 127.0, name)
        s = scale.astype(np.float32)[..., None]
        q = np.where(s > 0, np.rint(b / np.where(s > 0, s, 1)), 0)
        q = np.clip(q, -127, 127).astype(np.int8)
        return QuantizedMatrix("q8", (n, k), q.reshape(n, -1), scale)
    lo = b.min(axis=-1)
    mn = _f16_down(lo, name)
    m = mn.astype(np.float32)[..., None]
    scale = _f16_up((b.max(axis=-1) - mn.astype(np.float32)) / 15.0, name)
    s = scale.astype(np.float32)[..., None]
    q = np.where(s > 0, np.rint((b - m) / np.where(s > 0, s, 1)), 0)
    q = np.clip(q, 0, 15)
    return QuantizedMatrix("q4", (n, k), pack_q4(q), scale, mn)


# --- exact conversions from other formats ---------------------------------------------------------

def from_gguf_q8_0(raw, shape) -> QuantizedMatrix:
    """GGUF Q8_0 rows (uint8 [N, K/32*34]: per block f16 d, 32 int8) -> Q8, bit-exact."""
    n, k = shape
    blocks = np.asarray(raw, dtype=np.uint8).reshape(n, k // BLOCK, 34)
    d = blocks[..., :2].copy().view(np.float16)[..., 0]
    qs = blocks[..., 2:].copy().view(np.int8)
    return QuantizedMatrix("q8", (n, k), qs.reshape(n, k), d)


def from_gguf_q4(raw, shape, q4_1: bool) -> QuantizedMatrix:
    """GGUF Q4_0 (f16 d, 16 bytes; w = (q-8)d) or Q4_1 (f16 d, f16 m, 16 bytes; w = qd+m) -> Q4.
    GGML's nibble order is ours, so the quant bytes are copied unchanged."""
    n, k = shape
    size = 20 if q4_1 else 18
    blocks = np.asarray(raw, dtype=np.uint8).reshape(n, k // BLOCK, size)
    d = blocks[..., :2].copy().view(np.float16)[..., 0]
    if q4_1:
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0]
    else:
        m = (d * np.float16(-8)).astype(np.float16)    # a power-of-two multiple: exact
    qs = blocks[..., size - 16:]
    return QuantizedMatrix("q4", (n, k), qs.reshape(n, -1), d, m)


def from_mlx_q4(packed, scales, biases, group_size, shape) -> QuantizedMatrix:
    """MLX affine 4-bit (uint32 words, element j at bits 4*(j%8) of word j//8; per group
    w = q*scale + bias) -> Q4: nibbles reordered into GGML order, group scale/bias repeated per
    block of 32."""
    n, k = shape
    if group_size % BLOCK:
        raise ValueError(f"MLX group size {group_size} is not a multiple of {BLOCK}")
    by = np.ascontiguousarray(packed).view(np.uint8).reshape(n, k // 2)
    q = np.stack([by & 0x0F, by >> 4], axis=-1).reshape(n, k // BLOCK, BLOCK)
    rep = group_size // BLOCK

    def per_block(a):
        a = np.asarray(a)
        if a.dtype == np.uint16:        # bf16 bits
            a = (a.astype(np.uint32) << 16).view(np.float32)
        return np.repeat(a.astype(np.float32), rep, axis=1).astype(np.float16)

    return QuantizedMatrix("q4", (n, k), pack_q4(q), per_block(scales), per_block(biases))


def from_tensor(t, kind, start=0, stop=None) -> QuantizedMatrix:
    """A lattice.formats Tensor (rows [start, stop) of a 2-D one) -> QuantizedMatrix: exact where
    the native format allows it (see the module docstring), else quantized from its float32
    values. Every conversion is row by row, so a slice of rows converts to exactly those rows of
    the whole matrix: large matrices can be converted in chunks."""
    if len(t.shape) != 2:
        return quantize(t.to_f32(), kind, name=t.name)
    stop = t.shape[0] if stop is None else stop
    rows, shape = slice(start, stop), (stop - start, t.shape[1])
    if kind == "q8" and t.dtype == "q8_0":
        return from_gguf_q8_0(t.raw[rows], shape)
    if kind == "q4" and t.dtype in ("q4_0", "q4_1"):
        return from_gguf_q4(t.raw[rows], shape, t.dtype == "q4_1")
    if kind == "q4" and t.dtype == "mlx_q4" and t.group_size % BLOCK == 0:
        return from_mlx_q4(t.raw[rows], t.scales[rows], t.biases[rows], t.group_size, shape)
    return quantize(f32_rows(t, start, stop), kind, name=t.name)
