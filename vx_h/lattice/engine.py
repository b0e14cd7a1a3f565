"""The compiled runtime behind the public API: picks a backend, builds the decode program once per
Model and runs sessions through lattice._runtime (the Cython token loop over the backend's C table).

Backends (`select_backend`):
  "cpu"   the C kernels compiled into lattice._runtime;
  "cuda"  lattice/cuda's bridge, built with nvcc on first use (needs an NVIDIA GPU and nvcc);
  "metal" the Objective-C++ bridge (macOS on Apple silicon): liblattice_metal.dylib and
          lattice.metallib in lattice/_metal/, built by setup.py on macOS. LATTICE_METAL_BRIDGE and
          LATTICE_METAL_LIBRARY name other files; off macOS they exist for the tests only, which
          build the bridge against tests/metal_fake;
  "auto"  Metal where it is usable, else CUDA, else the CPU.
"""
from __future__ import annotations

import os
import platform
import sys

from . import _runtime  # ImportError when the extension is not built: api.py falls back
from .errors import BackendError
from .program import build

METAL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_metal")


def apple_silicon() -> bool:
    return sys.platform == "darwin" and platform.machine() == "arm64"


def metal_backend():
    """The Metal bridge; BackendError naming why it is unusable here."""
    bridge = os.environ.get("LATTICE_METAL_BRIDGE")
    if not bridge and not apple_silicon():
        raise BackendError(f"the Metal backend needs macOS on Apple silicon; this is {sys.platform} "
                           f"{platform.machine()} (use backend='cuda' or 'cpu')")
    bridge = bridge or os.path.join(METAL_DIR, "liblattice_metal.dylib")
    library = os.environ.get("LATTICE_METAL_LIBRARY") or os.path.join(METAL_DIR, "lattice.metallib")
    return _runtime.metal_backend(bridge, library)


def select_backend(name: str):
    """A lattice._runtime Backend for "cpu", "cuda", "metal" or "auto"."""
    if name == "cpu":
        return _runtime.cpu_backend()
    if name == "cuda":
        return _runtime.cuda_backend()
    if name == "metal":
        return metal_backend()
    if name != "auto":
        raise BackendError(f"unknown runtime backend {name!r}")
    if apple_silicon():
        try:
            return metal_backend()
        except BackendError:
            pass
    try:
        return _runtime.cuda_backend()
    except BackendError:
        return _runtime.cpu_backend()


class RuntimeEngine:
    def __init__(self, ckpt, backend="cpu", quant=None, context=4096, threads=None):
        be = backend if isinstance(backend, _runtime.Backend) else select_backend(backend)
        self.name = be.name
        # GPUs prefill with matrix-multiply kernels that want many tokens per step; the CPU's
        # kernels gain little past 64 and its scratch arena grows with the chunk
        chunk = 256 if be.name == "cuda" else 64
        self.program = build(ckpt, quant=quant, context=context, prefill_chunk=chunk)
        self.runtime = _runtime.Runtime(self.program, n_threads=threads, backend=be)

    def new_state(self):
        return _RuntimeState(self.runtime.new_state())

    def generate(self, state, prompt_ids, max_tokens, stop_ids, params, on_token):
        res = self.runtime.generate(state.st, prompt_ids, max_tokens, stop_ids=stop_ids,
                                    sampling=params, on_token=on_token)
        return (res["finish_reason"], res["reused_tokens"], res["prefill_seconds"],
                res["decode_seconds"])

    def logits(self, state, ids):
        return self.runtime.logits(state.st, ids)


class _RuntimeState:
    def __init__(self, st):
        self.st = st

    @property
    def tokens(self):
        return self.st.history

    def reset(self):
        self.st.reset()

    def counters(self):
        return self.st.counters()
