"""Fuzzing the GGUF and safetensors header parsers (hypothesis, bounded).

Mutated files must either load (and then every tensor converts to float32) or raise a LatticeError;
never another exception, never a huge allocation or a hang."""
import json
import shutil
import struct
import tempfile
import warnings
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import FIXTURES
from lattice.errors import LatticeError
from lattice.formats import open_checkpoint
from lattice.formats.gguf_header import parse_gguf_header
from test_formats import gguf_bytes

FORMATS = Path(FIXTURES) / "formats"
FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])


def _load_everything(path):
    """open_checkpoint + every tensor's to_f32; True when it worked, False on LatticeError."""
    try:
        ckpt = open_checkpoint(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)   # random bytes make NaN/Inf weights
            for t in ckpt.tensors.values():
                assert t.to_f32().shape == t.shape
        return True
    except LatticeError as e:
        assert str(path) in str(e), f"error does not name the file: {e}"
        return False


def _mutate(data: bytes, edits, limit):
    """Overwrite bytes at (position, value) pairs, positions taken modulo `limit`."""
    b = bytearray(data)
    for pos, value in edits:
        b[pos % limit] = value
    return bytes(b)


# GGUF: the qwen35 fixture exercises every convention; its header (metadata + tensor infos) is the
# part worth mutating, data bytes only change values
GGUF_FILE = FORMATS / "tiny-qwen35-q8_0.gguf"
GGUF_BYTES = GGUF_FILE.read_bytes()
GGUF_HEADER_END = parse_gguf_header(GGUF_FILE).data_offset

edits = st.lists(st.tuples(st.integers(0, 2 ** 31), st.integers(0, 255)), min_size=1, max_size=6)


@FUZZ
@given(edits=edits)
def test_fuzz_gguf_byte_edits(edits):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "fuzz.gguf"
        p.write_bytes(_mutate(GGUF_BYTES, edits, GGUF_HEADER_END))
        _load_everything(p)


# the counts and lengths that matter most: u64 fields of the fixed header and of tensor infos
FIELD_OFFSETS = [8, 16] + [m.start() for m in [__import__("re").search(rb"blk\.0\.ssm_a", GGUF_BYTES)]]


@FUZZ
@given(which=st.integers(0, 2), value=st.one_of(st.integers(0, 64), st.integers(0, 2 ** 64 - 1)),
       cut=st.integers(0, len(GGUF_BYTES)))
def test_fuzz_gguf_counts_and_truncation(which, value, cut):
    b = bytearray(GGUF_BYTES)
    pos = FIELD_OFFSETS[which] - (8 if which == 2 else 0)   # the ssm_a name's length field
    b[pos:pos + 8] = struct.pack("<Q", value)
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "fuzz.gguf"
        p.write_bytes(bytes(b[:max(cut, GGUF_HEADER_END // 2)]))
        _load_everything(p)


# metadata values of the right keys but wrong types or absurd sizes, rebuilt into a valid file
GGUF_HEADER = parse_gguf_header(GGUF_FILE)
ARCH_KEYS = sorted(k for k in GGUF_HEADER.metadata if k.startswith(("qwen35.", "tokenizer.ggml.eos")))
metadata_values = st.one_of(st.integers(-2 ** 63, 2 ** 64 - 1), st.integers(-3, 70), st.booleans(),
                            st.floats(width=32), st.text(max_size=6),
                            st.lists(st.one_of(st.booleans(), st.integers(0, 9)), max_size=5))


def _rebuild_gguf(metadata):
    from lattice.formats.gguf import GGUF_TYPES
    tensors = []
    for t in GGUF_HEADER.tensors:
        _, _, block, block_bytes = GGUF_TYPES[t.type_id]
        nbytes = int(np.prod(t.dims)) // block * block_bytes
        tensors.append((t.name, tuple(reversed(t.dims)), t.type_id, GGUF_BYTES[t.offset:t.offset + nbytes]))
    return gguf_bytes(metadata, tensors)


@FUZZ
@given(key=st.sampled_from(ARCH_KEYS), value=metadata_values, drop=st.booleans())
def test_fuzz_gguf_metadata_values(key, value, drop):
    meta = dict(GGUF_HEADER.metadata)
    if drop:
        del meta[key]
    else:
        meta[key] = value
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "fuzz.gguf"
        p.write_bytes(_rebuild_gguf(meta))
        _load_everything(p)


def test_rebuilt_gguf_is_identical():
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "same.gguf"
        p.write_bytes(_rebuild_gguf(dict(GGUF_HEADER.metadata)))
        a, b = open_checkpoint(p), open_checkpoint(GGUF_FILE)
        assert a.config == b.config and a.metadata == b.metadata
        for k, t in b.tensors.items():
            np.testing.assert_array_equal(a.tensors[k].to_f32(), t.to_f32())


# safetensors: byte edits in the JSON header, and structured edits of its entries
ST_FOLDER = FORMATS / "tiny-llama-hf"
ST_BYTES = (ST_FOLDER / "model.safetensors").read_bytes()
ST_HEADER_LEN = struct.unpack("<Q", ST_BYTES[:8])[0]
ST_HEADER = json.loads(ST_BYTES[8:8 + ST_HEADER_LEN])


def _st_folder(d, data):
    folder = Path(d)
    shutil.copy(ST_FOLDER / "config.json", folder / "config.json")
    (folder / "model.safetensors").write_bytes(data)
    return folder


@FUZZ
@given(edits=edits)
def test_fuzz_safetensors_byte_edits(edits):
    with tempfile.TemporaryDirectory() as d:
        _load_everything(_st_folder(d, _mutate(ST_BYTES, edits, 8 + ST_HEADER_LEN)))


json_values = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.floats(),
                        st.text(max_size=8),
                        st.lists(st.integers(-5, 2 ** 40), max_size=4))


@FUZZ
@given(index=st.integers(0, len(ST_HEADER) - 1), field=st.sampled_from(["dtype", "shape", "data_offsets"]),
       value=st.one_of(json_values, st.sampled_from(["F32", "F16", "BF16", "U8", "I64", "BOOL"])))
def test_fuzz_safetensors_entries(index, field, value):
    header = json.loads(json.dumps(ST_HEADER))
    name = sorted(k for k in header if k != "__metadata__")[index % (len(header) - 1)]
    header[name][field] = value
    text = json.dumps(header).encode()
    data = struct.pack("<Q", len(text)) + text + ST_BYTES[8 + ST_HEADER_LEN:]
    with tempfile.TemporaryDirectory() as d:
        _load_everything(_st_folder(d, data))


def test_unmodified_fixtures_load():
    """The fuzz seeds themselves are valid (so the fuzzers explore near-valid inputs)."""
    with tempfile.TemporaryDirectory() as d:
        assert _load_everything(_st_folder(d, ST_BYTES))
    assert _load_everything(GGUF_FILE)
