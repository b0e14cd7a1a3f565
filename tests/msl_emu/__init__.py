"""MSL emulator: compile Metal Shading Language kernels with clang and run them on the CPU (one fiber
per GPU thread), checking for the bugs a GPU would hide. See README.md for the supported subset."""
from .library import (Library, MSLCompileError, MSLCompileWarning, MSLDispatchError, MSLError, MSLKernelError,  # noqa: F401
                      MSLToolchainError, find_compiler)
