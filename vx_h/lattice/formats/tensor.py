"""Tensor: one named weight in Hugging Face orientation, backed by memory-mapped native data."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ModelFormatError

# format-native dtypes of GGUF quantized tensors -> ggml type name (gguf.GGMLQuantizationType)
GGUF_QUANT_DTYPES = {"q8_0": "Q8_0", "q4_0": "Q4_0", "q4_1": "Q4_1", "q4_k": "Q4_K",
                     "q5_0": "Q5_0", "q6_k": "Q6_K"}
MLX_DTYPES = {"mlx_q4": 4, "mlx_q8": 8}


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 stored as uint16 -> float32 (bf16 is the top half of an f32)."""
    return (np.asarray(bits).astype(np.uint32) << 16).view(np.float32)


def _as_f32(a: np.ndarray) -> np.ndarray:
    """f32/f16 arrays, or bf16 held as uint16 bits -> float32."""
    if a.dtype == np.uint16:        # bf16 bits
        return bf16_to_f32(a)
    return np.asarray(a, dtype=np.float32)


def mlx_dequantize(packed, scales, biases, bits, group_size):
    """MLX affine quantization: w = q * scale + bias per group of `group_size` along the last axis.

    `packed` is uint32 [out, in * bits / 32]; element j of a row sits in bits (j % per_word) * bits
    of word j // per_word (little-endian within the word)."""
    packed = np.asarray(packed)
    out = packed.shape[0]
    per_word = 32 // bits
    shifts = np.arange(per_word, dtype=np.uint32) * bits
    q = (packed[..., None] >> shifts) & np.uint32((1 << bits) - 1)
    q = q.reshape(out, -1, group_size).astype(np.float32)
    scales = _as_f32(scales)[..., None]
    biases = _as_f32(biases)[..., None]
    return (q * scales + biases).reshape(out, -1)


def native_to_f32(t, raw, start=0, stop=None) -> np.ndarray:
    """float32 values of `raw`: the native data of tensor `t` (anything with `.dtype`; MLX dtypes
    also `.scales`, `.biases`, `.group_size`), or its rows [start, stop). Every conversion works row
    by row, so a slice of rows converts to exactly those rows of the whole. The result has `raw`'s
    row count; the caller reshapes."""
    if t.dtype in ("f32", "f16", "bf16"):
        return _as_f32(raw)
    if t.dtype in GGUF_QUANT_DTYPES:
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize
        return dequantize(np.asarray(raw), GGMLQuantizationType[GGUF_QUANT_DTYPES[t.dtype]])
    if t.dtype in MLX_DTYPES:
        rows = slice(start, stop)
        return mlx_dequantize(raw, t.scales[rows], t.biases[rows], MLX_DTYPES[t.dtype],
                              t.group_size)
    raise ModelFormatError(f"tensor {t.name!r}: no f32 conversion for dtype {t.dtype}",
                           getattr(t, "path", None))


def f32_rows(t, start, stop) -> np.ndarray:
    """float32 rows [start, stop) of a 2-D tensor: the same values as `t.to_f32()[start:stop]`
    without converting the rest."""
    rows = native_to_f32(t, t.raw[start:stop], start, stop)
    return np.ascontiguousarray(rows, dtype=np.float32).reshape(stop - start, t.shape[1])


class Tensor:
    """A weight: `.shape` in HF orientation (Linear [out, in]), `.dtype` format-native.

    `.raw` is the native data, memory-mapped where the file layout already is HF's (rows in HF order):
    f32/f16 arrays, bf16 as uint16 bits, GGUF quantized rows as uint8 [rows, row_bytes], MLX packed
    uint32 [out, in*bits/32] (with `.scales`, `.biases`, `.group_size`); `.raw.shape` can differ
    from `.shape` (quantized rows, GGUF's squeezed conv1d). Where the file orders rows differently
    (GGUF q/k and value-head permutations) `.raw` is a permuted copy made on first use; where it
    stores different values (Qwen3.5 norm `+1`, `-exp(A_log)`) or permutes quantized columns, the
    tensor is presented as `dtype == "f32"` with the HF values.
    `.to_f32()` returns a C-contiguous float32 array of `.shape` (for f32 files, a read-only view
    of the file: no copy). `.release()` drops the loaded data and the file pages behind it (after
    conversion: see lattice.program.WeightStore.fill).
    """

    def __init__(self, name, shape, dtype, path, load, *, scales=None, biases=None, group_size=None,
                 spans=(), rows_in_order=False):
        self.name = name
        self.shape = tuple(int(d) for d in shape)
        self.dtype = dtype
        self.path = Path(path)
        self._load = load
        self._raw = None
        self.scales = scales
        self.biases = biases
        self.group_size = group_size
        self.spans = tuple(spans)       # (FileMap, offset, nbytes) of the file data behind it
        self.rows_in_order = rows_in_order      # each span holds the rows in order, equal bytes each

    @property
    def raw(self) -> np.ndarray:
        if self._raw is None:
            self._raw = self._load()
        return self._raw

    @property
    def nbytes(self) -> int:
        n = self.raw.nbytes
        if self.scales is not None:
            n += self.scales.nbytes + self.biases.nbytes
        return n

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def to_f32(self) -> np.ndarray:
        return np.ascontiguousarray(native_to_f32(self, self.raw).reshape(self.shape),
                                    dtype=np.float32)

    def release(self, start=None, stop=None):
        """Give back the file pages behind this tensor and forget its loaded data; the tensor stays
        usable (its data is read again on next use). With a row range [start, stop), only the
        pages of those rows go (where the file holds the rows in order; else nothing)."""
        if start is None:
            self._raw = None
            for fmap, offset, nbytes in self.spans:
                fmap.release(offset, nbytes)
        elif self.rows_in_order:
            for fmap, offset, nbytes in self.spans:
                per_row = nbytes // self.shape[0]
                fmap.release(offset + start * per_row, (stop - start) * per_row)

    def __repr__(self):
        return f"Tensor({self.name!r}, shape={self.shape}, dtype={self.dtype!r})"
