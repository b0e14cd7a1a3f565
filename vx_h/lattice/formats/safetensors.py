"""safetensors files, parsed strictly and memory-mapped (no copies).

Layout: u64 little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets:
[begin, end]}, "__metadata__": {...}}, then the data; offsets are relative to the data start.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import ModelFormatError
from .filemap import FileMap

# safetensors dtype -> (numpy storage dtype, bytes per element); bf16 is kept as its uint16 bits
ST_DTYPES = {
    "F64": (np.float64, 8), "F32": (np.float32, 4), "F16": (np.float16, 2), "BF16": (np.uint16, 2),
    "I64": (np.int64, 8), "I32": (np.int32, 4), "I16": (np.int16, 2), "I8": (np.int8, 1),
    "U64": (np.uint64, 8), "U32": (np.uint32, 4), "U16": (np.uint16, 2), "U8": (np.uint8, 1),
    "BOOL": (np.bool_, 1), "F8_E4M3": (np.uint8, 1), "F8_E5M2": (np.uint8, 1),
}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the format's own limit


def read_safetensors_header(path) -> tuple[dict, int, int]:
    """Validate the header of a safetensors file.

    Returns ({name: (dtype, shape, begin, end)} with absolute byte offsets, data_start, file_size).
    Raises ModelFormatError naming the file (and tensor) for anything inconsistent."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            f.seek(0)
            if size < 8:
                raise ModelFormatError(f"truncated safetensors file ({size} bytes)", path)
            n = int.from_bytes(f.read(8), "little")
            if n > size - 8:
                raise ModelFormatError(
                    f"header length {n} runs past the end of the file ({size} bytes)", path)
            if n > MAX_HEADER_BYTES:
                raise ModelFormatError(f"header length {n} exceeds the 100 MB limit", path)
            text = f.read(n)
    except OSError as e:
        raise ModelFormatError(f"cannot read safetensors file: {e}", path) from e
    try:
        header = json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ModelFormatError(f"header is not valid JSON: {e}", path) from e
    if not isinstance(header, dict):
        raise ModelFormatError("header is not a JSON object", path)

    data_start, data_size = 8 + n, size - 8 - n
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        entries[name] = _check_entry(path, name, info, data_start, data_size)

    spans = sorted((b, e, name) for name, (_, _, b, e) in entries.items() if e > b)
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise ModelFormatError(f"tensors {n0!r} and {n1!r} overlap in the data section", path)
    return entries, data_start, size


def _check_entry(path, name, info, data_start, data_size):
    def bad(what):
        raise ModelFormatError(f"tensor {name!r}: {what}", path)

    if not isinstance(info, dict):
        bad("header entry is not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in ST_DTYPES:
        bad(f"unknown dtype {dtype!r} (known: {', '.join(ST_DTYPES)})")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        bad(f"shape must be a list of non-negative integers, got {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(type(o) is int for o in offsets)):
        bad(f"data_offsets must be [begin, end], got {offsets!r}")
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        bad(f"data_offsets {offsets} out of range (data section is {data_size} bytes)")
    expected = int(np.prod(shape, dtype=object)) * ST_DTYPES[dtype][1]
    if end - begin != expected:
        bad(f"{dtype} {shape} needs {expected} bytes but data_offsets span {end - begin}")
    return dtype, tuple(shape), data_start + begin, data_start + end


class SafetensorsFile:
    """One memory-mapped safetensors file: `entries` from the validated header, `array(name)` a view,
    `span(name)` where its bytes lie (for Tensor.release)."""

    def __init__(self, path):
        self.path = Path(path)
        self.entries, self.data_start, self.size = read_safetensors_header(self.path)
        self.map = FileMap(self.path)

    def array(self, name) -> np.ndarray:
        dtype, shape, begin, end = self.entries[name]
        np_dtype = ST_DTYPES[dtype][0]
        if end == begin:
            return np.zeros(shape, dtype=np_dtype)
        return self.map.bytes(begin, end - begin).view(np_dtype).reshape(shape)

    def span(self, name) -> tuple:
        _, _, begin, end = self.entries[name]
        return self.map, begin, end - begin
