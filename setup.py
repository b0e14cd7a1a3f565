"""Builds the compiled runtime `lattice._runtime`: the Cython token loop plus the C kernels of the
CPU backend, in one extension. Metadata lives in pyproject.toml; this file only adds the extension.

OpenMP is used where the compiler accepts -fopenmp (probed: Apple clang without libomp builds a
serial backend). SIMD paths are chosen at run time inside the C code, so no -march flag here: the
wheel runs on any x86-64 or arm64 CPU.
"""
import os
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
