"""Runs one dispatch of an AddressSanitizer build, in a subprocess started by Library.dispatch with
the ASan runtime preloaded. Buffers are copied into exact-size malloc blocks so that any access past
their end hits an ASan redzone. Usage: python _asan_worker.py REQUEST (a pickle, see library.py)."""
import ctypes
import os
import pickle
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _abi import make_launch, launch_error  # noqa: E402  (standalone script: no package import)


def main(request_path):
    with open(request_path, "rb") as f:
        req = pickle.load(f)
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    blocks = []
    with open(req["map_path"], "w") as m:
        for data in req["blocks"]:
            p = libc.malloc(max(1, len(data)))
            ctypes.memmove(p, data, len(data))
            blocks.append((p, len(data)))
        pointers, lengths = [], []
        for i, binding in enumerate(req["bindings"]):
            if binding is None:
                pointers.append(None); lengths.append(0)
                continue
            (p, n), offset = blocks[binding[0]], binding[1]
            pointers.append(p + offset)
            lengths.append(n - offset)
            m.write(f"{i} {p} {n}\n")
    lib = ctypes.CDLL(req["so"])
    launch, keep = make_launch(pointers, lengths, req["grid"], req["tg"], req["tg_lengths"], req["seed"],
                               req["stack_size"])
    getattr(lib, "msl_launch_" + req["kernel"])(ctypes.byref(launch))
    response = dict(error=launch_error(keep),
                    blocks=[ctypes.string_at(p, n) for p, n in blocks])
    with open(req["out"], "wb") as f:
        pickle.dump(response, f)


if __name__ == "__main__":
    main(sys.argv[1])
