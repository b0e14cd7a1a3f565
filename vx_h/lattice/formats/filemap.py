"""FileMap: one read-only memory map of a whole weights file, whose pages can be given back.

Tensors read their data as numpy views of the map (no copies). Once a weight has been converted
into the program's WEIGHTS arena its file pages are dead weight in the resident set: `release`
drops them (MADV_DONTNEED). The map is shared and read-only, so nothing is lost: a page read again
is simply faulted back in from the file (page cache). `close` drops the map itself; numpy views
still held keep it alive until they go, and a later access maps the file again.
"""
from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np

from ..errors import ModelFormatError


class FileMap:
    def __init__(self, path):
        self.path = Path(path)
        self._mmap = None
        self._bytes = None      # uint8 view of the whole map

    def bytes(self, offset, nbytes) -> np.ndarray:
        """A read-only uint8 view of [offset, offset + nbytes), mapping the file on first use."""
        if self._bytes is None:
            try:
                with open(self.path, "rb") as f:
                    self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError) as e:
                raise ModelFormatError(f"cannot memory-map the file: {e}", self.path) from e
            self._bytes = np.frombuffer(self._mmap, dtype=np.uint8)
        return self._bytes[offset:offset + nbytes]

    def release(self, offset, nbytes):
        """Take the pages holding [offset, offset + nbytes) out of this process's resident set.
        Pages are rounded outward: a page shared with a neighbouring tensor is read back if that
        tensor is used again."""
        advice = getattr(mmap, "MADV_DONTNEED", None)
        if self._mmap is None or advice is None or nbytes <= 0:
            return
        start = offset // mmap.PAGESIZE * mmap.PAGESIZE
        if start >= len(self._mmap):
            return
        try:
            self._mmap.madvise(advice, start, offset + nbytes - start)
        except OSError:         # advice only: memory stays resident, nothing else changes
            pass

    def close(self):
        """Drop this object's reference to the map (views still held keep it mapped)."""
        self._mmap = self._bytes = None
