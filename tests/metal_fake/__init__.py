"""Build the Metal bridge (objc/lattice_metal.mm, and the GPU load of objc/lattice_load.mm) against
the test-only fake Metal on Linux.

build() compiles objc/lattice_metal.mm + lattice_load.mm + fake_metal.mm + probes.mm with GCC's
Objective-C++ and GNUstep (manual retain/release, as on Apple with -fno-objc-arc) into one shared
library, cached by content hash next to the MSL emulator's builds; metallib() writes the fake's
"metallib": a list of emulator-built kernel libraries.
"""
import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile

from msl_emu import Library
from msl_emu.library import cache_dir

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
SOURCES = [os.path.join(ROOT, "objc", "lattice_metal.mm"), os.path.join(ROOT, "objc", "lattice_load.mm"),
           os.path.join(HERE, "fake_metal.mm"), os.path.join(HERE, "probes.mm")]
HEADERS = [os.path.join(ROOT, "objc", "lattice_metal.h"), os.path.join(ROOT, "objc", "lattice_load.h"),
           os.path.join(ROOT, "metal", "lattice_shared.h"),
           os.path.join(HERE, "Metal", "Metal.h"), os.path.join(ROOT, "tests", "msl_emu", "include", "msl_runtime.h")]
INCLUDES = [HERE, os.path.join(ROOT, "tests", "msl_emu", "include"), os.path.join(ROOT, "objc")]
DEFINES = ["-DLT_METAL_STAGING_BYTES=4096"]  # uploads of more than 4 KiB take several staging pieces


class FakeMetalBuildError(RuntimeError):
    """The bridge or the fake does not compile (or GNUstep is missing)."""


def objc_flags():
    """GNUstep's compile and link flags (Debian: apt-get install gobjc++ libgnustep-base-dev)."""
    if not shutil.which("gnustep-config") or not shutil.which("g++"):
        raise FakeMetalBuildError("building the Metal bridge on Linux needs g++ (gobjc++) and gnustep-config "
                                  "(libgnustep-base-dev)")
    cflags = subprocess.run(["gnustep-config", "--objc-flags"], capture_output=True, text=True, check=True).stdout.split()
    libs = subprocess.run(["gnustep-config", "--base-libs"], capture_output=True, text=True, check=True).stdout.split()
    cflags = [f for f in cflags if f not in ("-MMD", "-MP")]
    return cflags, libs


def compile_bridge(sources, out, extra=()):
    cflags, libs = objc_flags()
    cmd = ["g++", "-std=c++17", "-shared", "-fPIC", "-Wno-subobject-linkage",
           *cflags, *("-I" + d for d in INCLUDES), *extra, "-x", "objective-c++", *sources, "-x", "none",
           "-o", out, *libs, "-ldl"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise FakeMetalBuildError(f"g++ failed:\n{r.stderr[-6000:]}")
    return r.stderr


def build():
    """Path of the shared library holding the bridge, the fake and the probes (cached)."""
    key = hashlib.sha256(" ".join(DEFINES).encode())
    for path in SOURCES + HEADERS:
        with open(path, "rb") as f:
            key.update(path.encode() + f.read())
    out = os.path.join(cache_dir(), f"lattice_metal_fake-{key.hexdigest()[:20]}.so")
    if not os.path.exists(out):
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache_dir())
        os.close(fd)
        try:
            compile_bridge(SOURCES, tmp, extra=DEFINES)
            os.replace(tmp, out)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return out


def metallib(paths, directory, include_dirs=()):
    """Write the fake's metallib into directory: the emulator builds of `paths` (.metal files),
    one path a line, each followed by `#kernel NAME INDEX...` lines (its functions' buffer indices,
    so the fake can check that every declared buffer is bound)."""
    libs = [Library(p, include_dirs=include_dirs) for p in paths]
    out = os.path.join(directory, "kernels.metallib")
    with open(out, "w") as f:
        for lib in libs:
            f.write(lib.so_path + "\n")
            for k in lib.kernels.values():  # the [[buffer(i)]] indices each function declares
                f.write(f"#kernel {k.name} {' '.join(str(p.index) for p in k.buffer_params())}\n")
    return out


def check_blocks_branch():
    """Syntax-check objc/lattice_metal.mm as Apple's compilers see it where blocks exist (clang
    -fblocks): the completion-handler block that GCC cannot compile. Returns clang's stderr."""
    from msl_emu.library import find_compiler
    cxx, _ = find_compiler()
    cflags, _ = objc_flags()
    gcc_include = subprocess.run(["gcc", "-print-file-name=include"], capture_output=True, text=True).stdout.strip()
    cflags = [f for f in cflags if not f.startswith("-fconstant-string-class")]
    cmd = [cxx, "-std=c++17", "-fsyntax-only", "-fblocks", "-fobjc-runtime=gcc", "-Werror",
           "-I" + os.path.join(HERE, "blocks_stub"), "-isystem", gcc_include, *cflags,
           *("-I" + d for d in INCLUDES), "-x", "objective-c++", SOURCES[0]]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise FakeMetalBuildError(f"clang -fblocks failed:\n{r.stderr[-6000:]}")
    return r.stderr

