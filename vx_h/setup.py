"""Builds the compiled runtime `lattice._runtime`: the Cython token loop plus the C kernels of the
CPU backend, in one extension. Metadata lives in pyproject.toml; this file only adds the extension.

OpenMP is used where the compiler accepts -fopenmp (probed: Apple clang without libomp builds a
serial backend). SIMD paths are chosen at run time inside the C code, so no -march flag here: the
wheel runs on any x86-64 or arm64 CPU.

On macOS the Metal backend is built too (as the macOS workflow does): metal/*.metal into
lattice/_metal/lattice.metallib, objc/lattice_metal.mm into lattice/_metal/liblattice_metal.dylib,
which lattice.engine loads with ctypes. Without the Metal toolchain it is skipped (backend="auto"
then uses the CPU; backend="metal" says what is missing).
"""
import glob
import os
import subprocess
import sys
import tempfile

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("lattice", "csrc")


def _compiler_accepts(compiler, compile_flags, link_flags):
    """Compile and link a tiny OpenMP program with these flags; True when both work."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.c")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint main(void) { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
        try:
            objs = compiler.compile([src], output_dir=tmp, extra_postargs=compile_flags)
            compiler.link_executable(objs, os.path.join(tmp, "probe"), extra_postargs=link_flags)
        except Exception:   # any compiler/linker failure means "not supported here"
            return False
    return True


class BuildExt(build_ext):
    def build_extensions(self):
        msvc = self.compiler.compiler_type == "msvc"
        compile_args = ["/O2"] if msvc else ["-O3", "-std=c11", "-fno-math-errno"]
        link_args = []
        if msvc:
            compile_args.append("/openmp")
        elif _compiler_accepts(self.compiler, ["-fopenmp"], ["-fopenmp"]):
            compile_args.append("-fopenmp")
            link_args.append("-fopenmp")
        elif sys.platform == "darwin" and _compiler_accepts(
                self.compiler, ["-Xpreprocessor", "-fopenmp"], ["-lomp"]):
            compile_args += ["-Xpreprocessor", "-fopenmp"]
            link_args.append("-lomp")
        else:
            self.announce("lattice: no OpenMP in this compiler; building the serial CPU backend", 2)
        for ext in self.extensions:
            ext.extra_compile_args = compile_args + ext.extra_compile_args
            ext.extra_link_args = link_args + ext.extra_link_args
        super().build_extensions()
        if sys.platform == "darwin":
            self._build_metal()

    def _build_metal(self):
        out = os.path.join(ROOT if self.inplace else self.build_lib, "lattice", "_metal")
        air = os.path.join(self.build_temp, "air")
        os.makedirs(out, exist_ok=True)
        os.makedirs(air, exist_ok=True)
        metal = ["xcrun", "-sdk", "macosx", "metal", "-std=metal3.0", "-I", os.path.join(ROOT, "metal")]
        try:
            airs = []
            for src in sorted(glob.glob(os.path.join(ROOT, "metal", "*.metal"))):
                airs.append(os.path.join(air, os.path.basename(src)[:-len(".metal")] + ".air"))
                subprocess.run([*metal, "-c", src, "-o", airs[-1]], check=True)
            subprocess.run(["xcrun", "-sdk", "macosx", "metallib", *airs, "-o",
                            os.path.join(out, "lattice.metallib")], check=True)
            subprocess.run(["xcrun", "clang++", "-std=c++17", "-x", "objective-c++", "-fno-objc-arc", "-O2",
                            "-shared", "-fPIC", os.path.join(ROOT, "objc", "lattice_metal.mm"),
                            os.path.join(ROOT, "objc", "lattice_load.mm"),
                            "-framework", "Metal", "-framework", "Foundation",
                            "-o", os.path.join(out, "liblattice_metal.dylib")], check=True)
        except (OSError, subprocess.CalledProcessError) as e:
            self.announce(f"lattice: Metal backend not built ({e}); the CPU backend is used", 2)


def _c_sources():
    d = os.path.join(ROOT, CSRC)
    return sorted(os.path.join(CSRC, f) for f in os.listdir(d) if f.endswith(".c")) if os.path.isdir(d) else []


runtime = Extension(
    "lattice._runtime",
    sources=[os.path.join("lattice", "_runtime.pyx")] + _c_sources(),
    include_dirs=["metal", CSRC, np.get_include()],
    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
)

setup(
    ext_modules=cythonize([runtime], language_level=3,
                          compiler_directives={"boundscheck": False, "wraparound": False}),
    cmdclass={"build_ext": BuildExt},
)
