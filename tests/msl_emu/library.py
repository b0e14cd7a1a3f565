"""Build a .metal file for the CPU and dispatch its kernels the way a Metal compute encoder would."""
import ctypes
import hashlib
import os
import pickle
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from functools import lru_cache

import numpy as np

from . import rewriter
from ._abi import make_launch, launch_error

HERE = os.path.dirname(os.path.abspath(__file__))
INCLUDE = os.path.join(HERE, "include")
RUNTIME_SOURCE = os.path.join(HERE, "runtime", "msl_runtime.cpp")
WORKER = os.path.join(HERE, "_asan_worker.py")
MIN_CLANG = 16  # first clang with x86-64 _Float16 and -ffloat16-excess-precision=none
MAX_THREADS_PER_THREADGROUP = 1024
THREADGROUP_MEMORY_LIMIT = 32768
STACK_SIZE = 64 * 1024        # per GPU thread; kernels keep small frames
ASAN_STACK_SIZE = 512 * 1024  # AddressSanitizer frames carry redzones

# -gdwarf-4: binutils' addr2line follows inlining chains (tg proxies inlined into kernels) in DWARF 4;
# -fstack-clash-protection: a large frame touches the guard page below a fiber stack instead of
# jumping over it into the neighbouring fiber's stack
FLAGS = ["-std=c++17", "-O1", "-fPIC", "-shared", "-fno-exceptions", "-fsigned-char", "-fstack-clash-protection", "-gline-tables-only", "-gdwarf-4", "-ffp-contract=off",
         "-Wno-unknown-attributes", "-ferror-limit=8", "-Xclang", "-ffloat16-excess-precision=none", "-I" + INCLUDE]
PCH_FLAGS = ["-fpch-validate-input-files-content"]  # a touched but unchanged header stays valid
ASAN_FLAGS = ["-fsanitize=address", "-shared-libasan", "-fno-omit-frame-pointer"]


class MSLError(Exception):
    """Base of the emulator's errors."""


class MSLToolchainError(MSLError):
    """No usable clang."""


class MSLCompileError(MSLError):
    """The .metal source is outside the supported subset or does not compile."""


class MSLCompileWarning(UserWarning):
    """The compiler warned about a .metal file (the real Metal compiler may reject it)."""


class MSLDispatchError(MSLError, ValueError):
    """dispatch() arguments that Metal would reject (unbound buffer, bad sizes, ...)."""


class MSLKernelError(MSLError):
    """The kernel did something undefined on a GPU: a race on threadgroup memory, a barrier not
    reached by every thread, a divergent simdgroup call, an out-of-bounds access."""

    def __init__(self, message, report=""):
        super().__init__(message)
        self.report = report  # the full sanitizer report, when there is one


@lru_cache(maxsize=None)
def find_compiler():
    """(path, version text) of clang++ >= 16: MSL_EMU_CXX if set, else the first clang++-N on PATH."""
    wanted = os.environ.get("MSL_EMU_CXX")
    names = [wanted] if wanted else [f"clang++-{v}" for v in range(MIN_CLANG, 21)] + ["clang++"]
    seen = []
    for name in names:
        path = shutil.which(name)
        if not path:
            continue
        version = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
        m = re.search(r"clang version (\d+)", version)
        seen.append(f"{path} ({m.group(0) if m else 'not clang'})")
        if m and int(m.group(1)) >= MIN_CLANG:
            return path, version
    raise MSLToolchainError(
        f"the MSL emulator needs clang++ >= {MIN_CLANG} (found: {', '.join(seen) or 'none'}"
        f"{'; MSL_EMU_CXX=' + wanted if wanted else ''}). On Debian 12: apt-get install clang-16 "
        f"libclang-rt-16-dev, or point MSL_EMU_CXX at a clang++ >= {MIN_CLANG}.")


def cache_dir():
    path = os.environ.get("MSL_EMU_CACHE") or os.path.join(tempfile.gettempdir(), f"lattice-msl-emu-{os.getuid()}")
    os.makedirs(path, exist_ok=True)
    return path


def quoted_includes(path, include_dirs, seen):
    """Contents of the headers `path` includes with "..." (recursively), for the cache key."""
    chunks = []
    with open(path, errors="replace") as f:
        text = f.read()
    for name in re.findall(r'^\s*#\s*include\s*"([^"]+)"', text, re.M):
        for d in [os.path.dirname(path), *include_dirs]:
            candidate = os.path.normpath(os.path.join(d, name))
            if os.path.isfile(candidate):
                if candidate not in seen:
                    seen.add(candidate)
                    with open(candidate, "rb") as f:
                        chunks.append(f.read())
                    chunks += quoted_includes(candidate, include_dirs, seen)
                break
    return chunks


def shim_bytes():
    out = []
    for path in [RUNTIME_SOURCE] + [os.path.join(INCLUDE, n) for n in sorted(os.listdir(INCLUDE))]:
        with open(path, "rb") as f:
            out.append(path.encode() + f.read())
    return out


def compile_shared(cxx, flags, source_text, inputs, out_path, what):
    """Compile C++ text (plus extra linker inputs) into out_path, atomically: concurrent test
    processes never load half a file."""
    fd, tmp_cpp = tempfile.mkstemp(suffix=".cpp", dir=os.path.dirname(out_path))
    with os.fdopen(fd, "w") as f:
        f.write(source_text)
    tmp_so = tmp_cpp[:-4] + ".so"
    try:
        r = subprocess.run([cxx, *flags, tmp_cpp, *inputs, "-o", tmp_so], capture_output=True, text=True)
        if r.returncode != 0:
            raise MSLCompileError(f"{what} does not compile with {cxx}:\n{r.stderr.strip()}")
        # kept next to the library, so a cached build reports its warnings again
        with open(out_path + ".warnings", "w") as f:
            f.write(r.stderr.strip())
        os.replace(tmp_so, out_path)
    finally:
        for p in (tmp_cpp, tmp_so):
            if os.path.exists(p):
                os.remove(p)


@lru_cache(maxsize=None)
def runtime_build(sanitize, cache):
    """(runtime library, precompiled shim header), built once per compiler, flags and sources and
    cached on disk. The runtime holds the scheduler and checkers; the PCH halves each kernel's
    compile time (most of it is parsing <cmath> and the shim)."""
    cxx, version = find_compiler()
    flags = FLAGS + (ASAN_FLAGS if sanitize else [])
    key = hashlib.sha256("\0".join([cxx, version, " ".join(flags)]).encode())
    for chunk in shim_bytes():
        key.update(chunk)
    base = os.path.join(cache, f"msl_runtime-{key.hexdigest()[:20]}{'-asan' if sanitize else ''}")
    if not os.path.exists(base + ".so"):
        with open(RUNTIME_SOURCE) as f:
            compile_shared(cxx, flags, f.read(), [], base + ".so", RUNTIME_SOURCE)
    if not os.path.exists(base + ".pch"):
        fd, tmp = tempfile.mkstemp(suffix=".pch", dir=cache)
        os.close(fd)
        r = subprocess.run([cxx, *flags, *PCH_FLAGS, "-x", "c++-header", os.path.join(INCLUDE, "msl_shim.h"),
                            "-o", tmp], capture_output=True, text=True)
        if r.returncode != 0:
            os.remove(tmp)
            raise MSLCompileError(f"msl_shim.h does not compile with {cxx}:\n{r.stderr.strip()}")
        os.replace(tmp, base + ".pch")
    return base + ".so", base + ".pch"


def metal_line(module, offset):
    """`file.metal:LINE` of an address in a kernel library (innermost .metal frame of the inlining
    chain), or None."""
    if not shutil.which("addr2line"):
        return None
    out = subprocess.run(["addr2line", "-i", "-e", module, offset], capture_output=True, text=True).stdout
    m = re.search(r"([^/\s]+\.metal):(\d+)", out)
    return f"{m.group(1)}:{m.group(2)}" if m else None


def with_source_line(error):
    """Replace the runtime's "@@library+offset" frame markers by the first .metal source line."""
    message, *frames = error.split("\n@@")
    for frame in frames:
        module, _, offset = frame.rpartition("+")
        line = metal_line(module, offset)
        if line:
            return f"{message} (at {line})"
    return message


def asan_runtime(cxx):
    arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower(), platform.machine())
    path = subprocess.run([cxx, f"-print-file-name=libclang_rt.asan-{arch}.so"], capture_output=True,
                          text=True).stdout.strip()
    if not os.path.isabs(path) or not os.path.exists(path):
        raise MSLToolchainError(f"AddressSanitizer runtime libclang_rt.asan-{arch}.so not found for {cxx} "
                                f"(Debian: apt-get install libclang-rt-16-dev)")
    return path


class Library:
    """A compiled .metal file, like an MTLLibrary; dispatch() runs one of its kernels.

    sanitize="address" builds with AddressSanitizer and runs every dispatch in a subprocess with the
    ASan runtime preloaded, so an out-of-bounds device access is reported instead of crashing the
    caller. The environment variable MSL_EMU_SANITIZE=address turns it on for every Library.
    """

    def __init__(self, path, include_dirs=(), sanitize=None):
        self.path = os.path.abspath(path)
        self.include_dirs = [os.path.abspath(d) for d in include_dirs]
        self.sanitize = sanitize if sanitize is not None else (os.environ.get("MSL_EMU_SANITIZE") or None)
        if self.sanitize not in (None, "address"):
            raise MSLError(f"sanitize={self.sanitize!r}: only 'address' is supported")
        with open(self.path) as f:
            source = f.read()
        try:
            cpp, kernels = rewriter.convert(source, self.path)
        except rewriter.RewriteError as e:
            raise MSLCompileError(f"{self.path}: {e}") from None
        self.kernels = {k.name: k for k in kernels}
        self.cxx, version = find_compiler()
        self.runtime_path, pch = runtime_build(self.sanitize, cache_dir())
        flags = FLAGS + (ASAN_FLAGS if self.sanitize else []) + PCH_FLAGS + ["-include-pch", pch,
            "-I" + os.path.dirname(self.path), *("-I" + d for d in self.include_dirs)]
        key = hashlib.sha256()
        for chunk in [cpp.encode(), version.encode(), self.cxx.encode(), " ".join(flags).encode(), self.runtime_path.encode(),
                      *shim_bytes(), *quoted_includes(self.path, self.include_dirs, set())]:
            key.update(hashlib.sha256(chunk).digest())
        stem = os.path.splitext(os.path.basename(self.path))[0]
        self.so_path = os.path.join(cache_dir(), f"{stem}-{key.hexdigest()[:20]}{'-asan' if self.sanitize else ''}.so")
        if not os.path.exists(self.so_path):
            # linked by absolute path (no SONAME), so the loader finds the runtime without rpath
            compile_shared(self.cxx, flags, cpp, [self.runtime_path], self.so_path, self.path)
        if os.path.exists(self.so_path + ".warnings"):
            with open(self.so_path + ".warnings") as f:
                text = f.read()
            if text:  # e.g. an MSL keyword used as a field name in a shared header (`kernel`)
                warnings.warn(MSLCompileWarning(f"{self.path}:\n{text}"), stacklevel=2)
        self.stack_size = ASAN_STACK_SIZE if self.sanitize else STACK_SIZE
        self._lib = None if self.sanitize else ctypes.CDLL(self.so_path)

    # ------------------------------------------------------------------ dispatch
    def dispatch(self, kernel, buffers, threadgroups, threads_per_threadgroup, threadgroup_memory=(),
                 order_seed=None):
        """Run `kernel` like dispatchThreadgroups:threadsPerThreadgroup:.

        buffers[i] binds [[buffer(i)]]: a C-contiguous numpy array, (array, byte_offset), a ctypes
        object, or None for an unused index. threadgroup_memory[i] is the byte length of
        [[threadgroup(i)]] (a multiple of 16). order_seed shuffles the threadgroup order and the
        order fibers run between barriers (seeded), to shake out order-dependent results.
        """
        k = self.kernels.get(kernel)
        if k is None:
            raise MSLDispatchError(f"{os.path.basename(self.path)} has no kernel {kernel!r} "
                                   f"(kernels: {', '.join(sorted(self.kernels))})")
        grid = self._dims(kernel, "threadgroups", threadgroups)
        tg = self._dims(kernel, "threads_per_threadgroup", threads_per_threadgroup)
        n_threads = tg[0] * tg[1] * tg[2]
        limit = min(MAX_THREADS_PER_THREADGROUP, k.max_threads or MAX_THREADS_PER_THREADGROUP)
        if n_threads > limit:
            raise MSLDispatchError(f"{kernel}: {n_threads} threads per threadgroup > {limit}")
        memories, pointers, lengths = self._buffers(k, buffers)
        tg_lengths = self._threadgroup_memory(k, threadgroup_memory)
        if self.sanitize:
            return self._dispatch_asan(k, memories, grid, tg, tg_lengths, order_seed)
        launch, keep = make_launch(pointers, lengths, grid, tg, tg_lengths, order_seed, self.stack_size)
        getattr(self._lib, "msl_launch_" + kernel)(ctypes.byref(launch))
        error = launch_error(keep)
        if error:
            raise MSLKernelError(f"kernel {kernel} ({os.path.basename(self.path)}): {with_source_line(error)}")

    @staticmethod
    def _dims(kernel, what, dims):
        dims = tuple(int(d) for d in (dims if isinstance(dims, (tuple, list)) else (dims,)))
        if not 1 <= len(dims) <= 3 or any(d < 1 for d in dims):
            raise MSLDispatchError(f"{kernel}: {what} must be 1 to 3 positive sizes, got {dims}")
        return dims + (1,) * (3 - len(dims))

    def _buffers(self, k, buffers):
        """Per binding index: (memory as a uint8 view, offset) or None; raw pointers; lengths after the offset."""
        buffers = list(buffers)
        if len(buffers) > rewriter.MAX_BUFFER_BINDINGS:
            raise MSLDispatchError(f"{k.name}: {len(buffers)} buffers > {rewriter.MAX_BUFFER_BINDINGS} bindings")
        memories, pointers, lengths = [], [], []
        for i, b in enumerate(buffers):
            if b is None:
                memories.append(None); pointers.append(None); lengths.append(0)
                continue
            obj, offset = b if isinstance(b, tuple) else (b, 0)
            if isinstance(obj, np.ndarray):
                if not obj.flags.c_contiguous:
                    raise MSLDispatchError(f"{k.name}: buffer({i}) must be C-contiguous (a Metal buffer is linear memory)")
                mem = obj.reshape(-1).view(np.uint8)
            elif isinstance(obj, (ctypes.Structure, ctypes.Array, ctypes._SimpleCData)):
                mem = np.frombuffer(obj, dtype=np.uint8)
            else:
                raise MSLDispatchError(f"{k.name}: buffer({i}) is a {type(obj).__name__}; expected a numpy array, "
                                       f"(array, byte_offset) or a ctypes object")
            if not 0 <= offset <= mem.nbytes:
                raise MSLDispatchError(f"{k.name}: buffer({i}) offset {offset} outside its {mem.nbytes} bytes")
            memories.append((mem, offset))
            pointers.append(mem.ctypes.data + offset)
            lengths.append(mem.nbytes - offset)
        for p in k.buffer_params():
            if p.index >= len(memories) or memories[p.index] is None:
                raise MSLDispatchError(f"{k.name}: [[buffer({p.index})]] `{p.name}` is not bound")
        return memories, pointers, lengths

    @staticmethod
    def _threadgroup_memory(k, lengths):
        lengths = [int(n) for n in lengths]
        for p in k.threadgroup_params():
            if p.index >= len(lengths) or lengths[p.index] <= 0:
                raise MSLDispatchError(f"{k.name}: [[threadgroup({p.index})]] `{p.name}` has no threadgroup memory length")
        for i, n in enumerate(lengths):
            if n < 0 or n % 16:
                raise MSLDispatchError(f"{k.name}: threadgroup memory length {n} at index {i} is not a multiple of 16")
        if sum(lengths) > THREADGROUP_MEMORY_LIMIT:
            raise MSLDispatchError(f"{k.name}: {sum(lengths)} bytes of threadgroup memory > {THREADGROUP_MEMORY_LIMIT}")
        return lengths

    # ------------------------------------------------------------------ AddressSanitizer path
    def _dispatch_asan(self, k, memories, grid, tg, tg_lengths, order_seed):
        blocks = self._asan_blocks(k, memories)
        views = blocks.pop("block_views")
        with tempfile.TemporaryDirectory(prefix="msl-asan-") as tmp:
            request = dict(
                so=self.so_path, kernel=k.name, grid=grid, tg=tg, tg_lengths=tg_lengths, seed=order_seed,
                stack_size=self.stack_size, map_path=os.path.join(tmp, "map"), out=os.path.join(tmp, "out"),
                **blocks)
            req_path = os.path.join(tmp, "request")
            with open(req_path, "wb") as f:
                pickle.dump(request, f)
            env = dict(os.environ, LD_PRELOAD=asan_runtime(self.cxx),
                       ASAN_OPTIONS="detect_leaks=0:symbolize=0:halt_on_error=1:exitcode=86")
            r = subprocess.run([sys.executable, WORKER, req_path], env=env, capture_output=True, text=True)
            if r.returncode != 0 or not os.path.exists(request["out"]):
                raise self._asan_error(k, r, request["map_path"])
            with open(request["out"], "rb") as f:
                response = pickle.load(f)
        for mem, data in zip(views, response["blocks"]):
            mem[:] = np.frombuffer(data, dtype=np.uint8)
        if response["error"]:
            raise MSLKernelError(f"kernel {k.name} ({os.path.basename(self.path)}): {with_source_line(response['error'])}")

    @staticmethod
    def _asan_blocks(k, memories):
        """One malloc block per distinct array, so bindings that alias (the same array at several
        offsets, as arenas are bound) still alias in the worker."""
        views, blocks, bindings = [], [], []
        for i, m in enumerate(memories):
            if m is None:
                bindings.append(None)
                continue
            mem, offset = m
            start, end = mem.ctypes.data, mem.ctypes.data + mem.nbytes
            for j, v in enumerate(views):
                vs, ve = v.ctypes.data, v.ctypes.data + v.nbytes
                if (vs, ve) == (start, end):
                    break
                if vs < end and start < ve:
                    raise MSLDispatchError(f"{k.name}: buffer({i}) partly overlaps another binding; under "
                                           f"AddressSanitizer bind the same array with byte offsets instead")
            else:
                j = len(views)
                views.append(mem)
                blocks.append(mem.tobytes())
            bindings.append((j, offset))
        return dict(blocks=blocks, bindings=bindings, block_views=views)

    def _asan_error(self, k, r, map_path):
        report = r.stderr
        head = f"kernel {k.name} ({os.path.basename(self.path)})"
        m = re.search(r"ERROR: AddressSanitizer: ([\w-]+) on (?:unknown )?address (0x[0-9a-f]+)", report)
        if not m:
            return MSLKernelError(f"{head}: the AddressSanitizer worker failed (exit {r.returncode}):\n"
                                  f"{report[-3000:]}", report)
        kind, address = m.group(1), int(m.group(2), 16)
        access = re.search(r"(READ|WRITE) of size (\d+)", report)
        parts = [f"{head}: AddressSanitizer: {kind}"]
        parts.append(" ".join(x for x in [access and f"{access.group(1)} of {access.group(2)} bytes",
                                          self._source_line(report)] if x))
        parts.append(self._locate(k, address, map_path))
        return MSLKernelError(", ".join(p for p in parts if p), report)

    def _source_line(self, report):
        """`at file.metal:LINE` for the first frame of the faulting stack inside this kernel library
        (symbolized here with addr2line: ASan's own symbolizer may be missing)."""
        stack = report.split("is located")[0]
        for module, offset in re.findall(r"#\d+ 0x[0-9a-f]+\s+\((\S+)\+(0x[0-9a-f]+)\)", stack):
            line = metal_line(module, offset) if module == self.so_path else None
            if line:
                return f"at {line}"
        return ""

    @staticmethod
    def _locate(k, address, map_path):
        """Name the bound buffer nearest to a faulting address."""
        if not os.path.exists(map_path):
            return ""
        names = {p.index: p.name for p in k.buffer_params()}
        best = None
        with open(map_path) as f:
            for line in f:
                i, start, length = (int(x) for x in line.split())
                if address >= start + length:
                    dist, where = address - (start + length), "past the end of"
                elif address < start:
                    dist, where = start - address, "before the start of"
                else:
                    continue
                if best is None or dist < best[0]:
                    best = (dist, f"{dist} bytes {where} buffer({i}) `{names.get(i, '?')}` ({length} bytes)")
        return best[1] if best else ""
