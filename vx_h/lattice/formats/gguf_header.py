"""Strict, bounded parser for the GGUF (v2/v3, little-endian) header.

We parse the header ourselves instead of with `gguf.GGUFReader` because the reader builds one numpy
view per vocabulary entry (seconds for a 49k vocab) and trusts counts and lengths from the file:
here every count and length is checked against the bytes that remain BEFORE anything is allocated,
so a corrupt or hostile file raises ModelFormatError quickly instead of allocating or hanging.

Layout: magic "GGUF", u32 version, u64 tensor_count, u64 kv_count, kv_count key/value pairs,
tensor_count tensor infos (name, u32 n_dims, u64 dims[n_dims] (fastest-varying first), u32 type,
u64 offset), padding to `general.alignment` (default 32), then the tensor data.
"""
from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ModelFormatError

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 8  # ggml supports 4; anything beyond a few is corruption

# GGUF value types -> (struct code, numpy dtype) for scalars
_SCALARS = {
    0: ("<B", np.uint8), 1: ("<b", np.int8), 2: ("<H", np.uint16), 3: ("<h", np.int16),
    4: ("<I", np.uint32), 5: ("<i", np.int32), 6: ("<f", np.float32), 7: ("<?", np.bool_),
    10: ("<Q", np.uint64), 11: ("<q", np.int64), 12: ("<d", np.float64),
}
_STRING, _ARRAY = 8, 9


@dataclass
class GGUFTensorInfo:
    name: str
    dims: tuple          # as stored: fastest-varying first (numpy shape is reversed)
    type_id: int         # ggml type number
    offset: int          # absolute byte offset in the file


@dataclass
class GGUFHeader:
    path: Path
    version: int
    metadata: dict
    tensors: list        # GGUFTensorInfo, file order
    data_offset: int
    file_size: int


class _Cursor:
    """Reads little-endian values from a buffer, checking every length against the end."""

    def __init__(self, buf, path):
        self.buf, self.pos, self.end, self.path = buf, 0, len(buf), path

    def fail(self, what):
        raise ModelFormatError(f"corrupt GGUF header at byte {self.pos}: {what}", self.path)

    def need(self, n, what):
        if n < 0 or self.pos + n > self.end:
            self.fail(f"{what} needs {n} bytes but only {self.end - self.pos} remain "
                      f"(truncated file or bad length)")

    def scalar(self, code, what):
        size = struct.calcsize(code)
        self.need(size, what)
        (v,) = struct.unpack_from(code, self.buf, self.pos)
        self.pos += size
        return v

    def u32(self, what):
        return self.scalar("<I", what)

    def u64(self, what):
        return self.scalar("<Q", what)

    def string(self, what):
        n = self.u64(f"length of {what}")
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        # surrogateescape keeps vocabularies with invalid UTF-8 byte tokens lossless
        return raw.decode("utf-8", errors="surrogateescape")

    def value(self, vtype, key):
        if vtype in _SCALARS:
            v = self.scalar(_SCALARS[vtype][0], f"value of {key!r}")
            return bool(v) if vtype == 7 else v
        if vtype == _STRING:
            return self.string(f"value of {key!r}")
        if vtype == _ARRAY:
            etype = self.u32(f"element type of {key!r}")
            count = self.u64(f"element count of {key!r}")
            if etype in _SCALARS:
                code, dtype = _SCALARS[etype]
                size = struct.calcsize(code)
                self.need(count * size, f"{count} elements of {key!r}")
                arr = np.frombuffer(self.buf, dtype=np.dtype(dtype).newbyteorder("<"),
                                    count=count, offset=self.pos)
                self.pos += count * size
                return arr.tolist()
            if etype == _STRING:
                # each string takes at least its 8-byte length: bound the count before looping
                self.need(count * 8, f"{count} strings of {key!r}")
                return [self.string(f"element {i} of {key!r}") for i in range(count)]
            if etype == _ARRAY:
                self.need(count * 12, f"{count} nested arrays of {key!r}")
                return [self.value(_ARRAY, f"{key}[{i}]") for i in range(count)]
            self.fail(f"unknown array element type {etype} for key {key!r}")
        self.fail(f"unknown value type {vtype} for key {key!r}")


def _open_buffer(path: Path):
    try:
        f = open(path, "rb")
    except OSError as e:
        raise ModelFormatError(f"cannot open GGUF file: {e}", path) from e
    with f:
        size = f.seek(0, 2)
        if size == 0:
            raise ModelFormatError("empty file, not a GGUF model", path)
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def parse_gguf_header(path, with_tensors: bool = True) -> GGUFHeader:
    """Parse and validate a GGUF header. Tensor data is not touched."""
    path = Path(path)
    buf = _open_buffer(path)
    try:
        return _parse(buf, path, with_tensors)
    finally:
        buf.close()


def _parse(buf, path, with_tensors):
    c = _Cursor(buf, path)
    c.need(4, "magic")
    magic = bytes(buf[:4])
    if magic != GGUF_MAGIC:
        raise ModelFormatError(f"not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})", path)
    c.pos = 4
    version = c.u32("version")
    if version not in (2, 3):
        if version & 0xFFFF == 0 and version >> 16:
            raise ModelFormatError("big-endian GGUF files are not supported", path)
        raise ModelFormatError(f"unsupported GGUF version {version} (supported: 2, 3)", path)
    n_tensors = c.u64("tensor count")
    n_kv = c.u64("metadata count")
    # a key/value pair takes >= 13 bytes (8 key length + 4 type + 1 value), a tensor info >= 24
    if n_kv * 13 > c.end - c.pos:
        c.fail(f"absurd metadata count {n_kv} for a {c.end}-byte file")
    if n_tensors * 24 > c.end - c.pos:
        c.fail(f"absurd tensor count {n_tensors} for a {c.end}-byte file")

    metadata = {}
    for i in range(n_kv):
        key = c.string(f"key of metadata entry {i}")
        vtype = c.u32(f"type of {key!r}")
        metadata[key] = c.value(vtype, key)

    tensors = []
    if with_tensors:
        tensors = _parse_tensor_infos(c, n_tensors, metadata)
        alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        data_offset = -(-c.pos // alignment) * alignment
        for t in tensors:
            t.offset += data_offset
    else:
        data_offset = 0
    return GGUFHeader(path, version, metadata, tensors, data_offset, c.end)


def _parse_tensor_infos(c, n_tensors, metadata):
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        c.fail(f"general.alignment must be a positive power of two, got {alignment!r}")
    tensors, seen = [], set()
    for i in range(n_tensors):
        name = c.string(f"name of tensor {i}")
        n_dims = c.u32(f"dimension count of tensor {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            c.fail(f"tensor {name!r} has absurd dimension count {n_dims}")
        dims = tuple(c.u64(f"dimension {d} of tensor {name!r}") for d in range(n_dims))
        type_id = c.u32(f"type of tensor {name!r}")
        offset = c.u64(f"data offset of tensor {name!r}")
        if offset % alignment:
            c.fail(f"tensor {name!r} data offset {offset} is not a multiple of {alignment}")
        if name in seen:
            c.fail(f"duplicate tensor name {name!r}")
        seen.add(name)
        tensors.append(GGUFTensorInfo(name, dims, type_id, offset))
    return tensors


def read_gguf_metadata(path) -> dict:
    """GGUF metadata as plain Python values: key -> str/int/float/bool/list.

    Strings are UTF-8 decoded with surrogateescape (lossless for invalid byte sequences)."""
    return parse_gguf_header(path, with_tensors=False).metadata
