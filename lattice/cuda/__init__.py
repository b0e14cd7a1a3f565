"""The CUDA backend: the decode program replayed on an NVIDIA GPU, one CUDA graph launch per K steps.

The bridge (`backend.cu`, kernels in `kernels.cuh`, C interface in `lattice_cuda.h`) is compiled
with nvcc on first use into a cache directory keyed by the sources' hash and loaded with ctypes, so
the package installs and imports without CUDA; `load_library()` raises BackendError when nvcc, the
CUDA runtime or a GPU is missing. The token loop is lattice._runtime's, as for every backend:

    from lattice._runtime import Runtime, cuda_backend
    rt = Runtime(program, backend=cuda_backend(steps=16))   # uploads the weights once
    st = rt.new_state()
    out = rt.generate(st, prompt_ids, 64)

`CudaBackend` is a thin ctypes object over the same C interface (kernel tests, rejected programs).

Environment: LATTICE_NVCC (the compiler), LATTICE_CUDA_ARCH (e.g. sm_90; default: the GPU's own,
else sm_90), LATTICE_CUDA_CACHE (where libraries are kept; default ~/.cache/lattice/cuda),
LATTICE_CUDA_EAGER=1 (kernel launches instead of graph replay: the ablation), LATTICE_CUDA_PDL=0
(no programmatic dependent launch). Diagnostics: LATTICE_CUDA_NOP=gdn,gemv_split,... (those decode
kernels become empty ones), LATTICE_CUDA_X_LANE=0 (split-K decode GEMVs stage x in shared memory),
LATTICE_CUDA_GDN_FUSE=0 (a GDN layer's conv and gated RMSNorm run as kernels of their own instead
of in the GEMVs before and after it; =conv: only the norm does), LATTICE_CUDA_ROPE_FUSE=0 (decode
runs k_rope_kv before the attention instead of in it), LATTICE_CUDA_ATT_DEFER=N (decode attentions
with 2 to N splits in use leave their combine to the o-projection's x staging; default 8, 0: never),
LATTICE_CUDA_EARLY_STATE=0 / 1 (whether decode kernels may read their recurrent state before the
dependency wait; default: when the program's kernels cannot all be resident at once),
LATTICE_CUDA_TRACE=1 (a library that records the decode timeline; tests/gpu/trace_step.py),
LATTICE_CUDA_PRIORITY=least (the stream gets the lowest priority instead of the highest).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np

from ..errors import BackendError

HERE = Path(__file__).resolve().parent
HEADER = HERE.parent.parent / "metal" / "lattice_shared.h"
SOURCES = [HERE / "backend.cu", HERE / "kernels.cuh", HERE / "gemm.cuh", HERE / "lattice_cuda.h", HEADER]

WEIGHTS, STATE, SCRATCH, STEP, OUTPUT, CONST = range(6)
N_ARENAS = 6
ERR_CUDA = 100
ERRORS = {1: "NaN or Inf in logits", 2: "token id out of range of the embedding table",
          3: "position exceeds the KV cache capacity", 4: "unknown kernel id",
          5: "binding or args outside its arena", 6: "invalid kernel arguments", 7: "out of memory",
          ERR_CUDA: "CUDA runtime error"}

_lib = None


class Counters(ctypes.Structure):
    """lt_cuda_counters (lattice_cuda.h)."""
    _fields_ = [("dispatches_per_step", ctypes.c_uint32), ("steps", ctypes.c_uint64),
                ("graph_launches", ctypes.c_uint64), ("kernel_launches", ctypes.c_uint64),
                ("api_calls", ctypes.c_uint64)]


NVCC_DEFAULT = "/usr/local/cuda/bin/nvcc"


def _nvcc():
    named = os.environ.get("LATTICE_NVCC")
    if named:
        if os.path.exists(named):
            return named
        raise BackendError(f"LATTICE_NVCC={named} does not exist (the CUDA backend needs nvcc)")
    for cand in (shutil.which("nvcc"), NVCC_DEFAULT):
        if cand and os.path.exists(cand):
            return cand
    raise BackendError("the CUDA backend needs nvcc (set LATTICE_NVCC or put nvcc on PATH)")


def _arch_flags():
    arch = os.environ.get("LATTICE_CUDA_ARCH")
    if arch:
        return [f"-arch={arch}"]
    try:  # the installed GPU's compute capability, if a driver answers
        out = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        cap = out.stdout.split()[0].replace(".", "") if out.returncode == 0 and out.stdout.strip() else ""
        if cap.isdigit():
            return [f"-arch=sm_{cap}"]
    except (OSError, subprocess.SubprocessError, IndexError):
        pass
    return ["-arch=sm_90"]


def build_library(force=False) -> Path:
    """Compiles the bridge (once per source version, compiler and target) and returns its path."""
    nvcc = _nvcc()
    flags = ["-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "-lineinfo", *_arch_flags()]
    if os.environ.get("LATTICE_CUDA_TRACE") == "1":  # decode timeline (tests/gpu/trace_step.py)
        flags.append("-DLT_TRACE")
    h = hashlib.sha256(" ".join([nvcc] + flags).encode())
    for p in SOURCES:
        h.update(p.read_bytes())
    cache = Path(os.environ.get("LATTICE_CUDA_CACHE", Path.home() / ".cache" / "lattice" / "cuda"))
    out = cache / h.hexdigest()[:16] / "liblattice_cuda.so"
    if force or not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        res = subprocess.run([nvcc, *flags, str(HERE / "backend.cu"), "-o", str(tmp)], capture_output=True,
                             text=True)
        if res.returncode != 0:
            raise BackendError(f"nvcc failed to build the CUDA backend:\n{res.stderr[-4000:]}")
        os.replace(tmp, out)
    return out


def load_library():
    """The bridge as a ctypes library (built on first use). Raises BackendError without CUDA."""
    global _lib
    if _lib is not None:
        return _lib
    path = build_library()
    try:
        so = ctypes.CDLL(str(path))
    except OSError as e:
        raise BackendError(f"cannot load the CUDA backend {path}: {e}") from None
    c_size_p = ctypes.POINTER(ctypes.c_size_t)
    so.lt_cuda_create.restype = ctypes.c_void_p
    so.lt_cuda_create.argtypes = [c_size_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t]
    so.lt_cuda_add_program.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint32, ctypes.c_void_p,
                                       ctypes.c_size_t, ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint32)]
    so.lt_cuda_write.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t]
    so.lt_cuda_read.argtypes = so.lt_cuda_write.argtypes
    so.lt_cuda_copy.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_size_t]
    so.lt_cuda_zero.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_size_t, ctypes.c_size_t]
    so.lt_cuda_run.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_uint32]
    so.lt_cuda_message.restype = ctypes.c_char_p
    so.lt_cuda_message.argtypes = [ctypes.c_void_p]
    so.lt_cuda_device.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t]
    so.lt_cuda_free.argtypes = [ctypes.c_void_p]
    so.lt_cuda_free.restype = None
    so.lt_cuda_set_eager.argtypes = [ctypes.c_void_p, ctypes.c_int]
    so.lt_cuda_set_eager.restype = None
    so.lt_cuda_counters_get.argtypes = [ctypes.c_void_p, ctypes.POINTER(Counters)]
    so.lt_cuda_counters_get.restype = None
    buf = ctypes.create_string_buffer(256)
    if so.lt_cuda_device(0, buf, 256) != 0:
        raise BackendError(f"the CUDA backend found no usable GPU: {buf.value.decode()}")
    _lib = so
    return so


def device_name(device=0) -> str:
    so = load_library()
    buf = ctypes.create_string_buffer(256)
    so.lt_cuda_device(device, buf, 256)
    return buf.value.decode()


def gpu_present() -> bool:
    """Whether an NVIDIA driver lists a GPU (checked before paying for a build)."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return False
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


def available():
    """(True, device description) or (False, why not)."""
    if not gpu_present():
        return False, "no NVIDIA GPU (nvidia-smi lists none)"
    try:
        return True, device_name()
    except BackendError as e:
        return False, str(e)


def _ptr(a):
    return ctypes.c_void_p(a.ctypes.data)


class CudaBackend:
    """Device arenas + programs: a thin object over lattice_cuda.h (the kernel tests' shim calls the
    library directly for uploads and runs)."""

    def __init__(self, sizes, device=0):
        self.lib = load_library()
        self.sizes = [int(s) for s in sizes]
        arr = (ctypes.c_size_t * N_ARENAS)(*self.sizes)
        msg = ctypes.create_string_buffer(256)
        self.h = self.lib.lt_cuda_create(arr, device, msg, 256)
        if not self.h:
            raise BackendError(f"CUDA backend: {msg.value.decode()}")

    def close(self):
        if getattr(self, "h", None):
            self.lib.lt_cuda_free(self.h)
            self.h = None

    __del__ = close

    def add_program(self, dispatches, consts, max_tokens):
        """Returns the program's index; raises BackendError naming the rejected dispatch."""
        recs = np.ascontiguousarray(dispatches)
        consts = np.ascontiguousarray(consts, dtype=np.uint8)
        where = ctypes.c_uint32()
        idx = self.lib.lt_cuda_add_program(self.h, _ptr(recs), len(recs), _ptr(consts), consts.nbytes,
                                           max_tokens, ctypes.byref(where))
        if idx < 0:
            err = -idx
            detail = self.lib.lt_cuda_message(self.h).decode() if err in (ERR_CUDA, 7) else ERRORS.get(err, "?")
            raise BackendError(f"the CUDA backend rejected dispatch {where.value}: {detail}")
        return idx
