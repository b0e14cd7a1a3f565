"""ctypes mirror of msl_rt::Launch (include/msl_runtime.h); imported by the ASan worker too, so no numpy."""
import ctypes

ERROR_CAP = 4096


class Launch(ctypes.Structure):
    _fields_ = [
        ("buffers", ctypes.POINTER(ctypes.c_void_p)),
        ("buffer_len", ctypes.POINTER(ctypes.c_uint64)),
        ("n_buffers", ctypes.c_uint32),
        ("threadgroups", ctypes.c_uint32 * 3),
        ("threads_per_threadgroup", ctypes.c_uint32 * 3),
        ("threadgroup_len", ctypes.POINTER(ctypes.c_uint64)),
        ("n_threadgroup", ctypes.c_uint32),
        ("random_order", ctypes.c_uint32),
        ("seed", ctypes.c_uint64),
        ("stack_size", ctypes.c_uint64),
        ("error", ctypes.c_char_p),
        ("error_cap", ctypes.c_uint64),
    ]


def make_launch(pointers, lengths, threadgroups, threads, tg_lengths, seed, stack_size):
    """Fill a Launch; returns (launch, keepalive) where keepalive owns the arrays it points to."""
    n = max(1, len(pointers))
    ptrs = (ctypes.c_void_p * n)(*pointers)
    lens = (ctypes.c_uint64 * n)(*lengths)
    tgl = (ctypes.c_uint64 * max(1, len(tg_lengths)))(*tg_lengths)
    err = ctypes.create_string_buffer(ERROR_CAP)
    launch = Launch(ptrs, lens, len(pointers), (ctypes.c_uint32 * 3)(*threadgroups),
                    (ctypes.c_uint32 * 3)(*threads), tgl, len(tg_lengths), int(seed is not None),
                    seed or 0, stack_size, ctypes.cast(err, ctypes.c_char_p), ERROR_CAP)
    return launch, (ptrs, lens, tgl, err)


def launch_error(keepalive):
    return keepalive[3].value.decode(errors="replace")
