"""lattice-bench in this process with llama_cpp imported first: on the GPU machine, llama.cpp's CUDA
build crashes (SIGSEGV) while loading a model when the process imported lattice before llama_cpp
(the harness's worker does) or torch. Use with --in-process --load-device cuda (naming the load
device keeps the harness from importing torch to pick it; the load processes are separate).

    python3 tests/gpu/bench_llama_first.py run --in-process --load-device cuda -e llama.cpp:gpu ...
"""
import sys

import llama_cpp  # noqa: F401  (first: see above)

from lattice.bench.cli import main

if __name__ == "__main__":
    main(sys.argv[1:])
