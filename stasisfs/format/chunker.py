"""Content-defined chunking over a reusable window (FastCDC, seeded from the key).

pyfastcdc's own `cut_stream` allocates and zero-fills a fresh 2 x max-size buffer
per call, which dominates the cost of many medium files; this keeps one window per
thread (mapped, so only the pages used are ever allocated) and feeds `cut_buf`. A chunk that ends exactly at the window's end was cut
by the window, not by content, so it is carried over and cut again with more data.
"""

from __future__ import annotations

import mmap
from collections.abc import Callable, Iterator

from pyfastcdc import FastCDC

# 256 KiB / 1 MiB / 4 MiB; pyfastcdc's effective mean is min + avg, about 1.25 MiB.
CHUNK_MIN = 256 * 1024
CHUNK_AVG = 1024 * 1024
CHUNK_MAX = 4 * 1024 * 1024
WINDOW = 2 * CHUNK_MAX

ReadInto = Callable[[memoryview], int]


class Chunker:
    """Not thread-safe: one per thread. Yielded views are valid until the next one is requested."""

    def __init__(self, seed: int) -> None:
        self._fastcdc = FastCDC(CHUNK_AVG, min_size=CHUNK_MIN, max_size=CHUNK_MAX, seed=seed)
        # Anonymous memory pages in on first touch: a worker that only meets small files holds a few KiB of it, not 8 MiB.
        self._buf = mmap.mmap(-1, WINDOW)
        self._view = memoryview(self._buf)

    def cut(self, readinto: ReadInto) -> Iterator[memoryview]:
        filled, eof = 0, False
        while True:
            while not eof and filled < WINDOW:
                wanted = WINDOW - filled
                n = readinto(self._view[filled:])
                filled += n
                eof = n < wanted  # a short read of a regular file means end of file
            if filled == 0:
                return
            consumed = 0
            for chunk in self._fastcdc.cut_buf(self._view[:filled]):
                end = chunk.offset + chunk.length
                if end == filled and not eof:
                    break
                yield chunk.data
                consumed = end
            if eof:
                return
            remainder = filled - consumed
            self._buf[:remainder] = self._buf[consumed:filled]
            filled = remainder


def zero_run_lengths(seed: int) -> list[int]:
    """The lengths of the chunks a long run of zero bytes is cut into under this seed (the steady state, not the tail).

    A hole in a sparse file is such a run: the mount reports those chunks as unallocated blocks.
    """
    zeros = memoryview(bytes(4 * CHUNK_MAX))
    lengths = [chunk.length for chunk in FastCDC(CHUNK_AVG, min_size=CHUNK_MIN, max_size=CHUNK_MAX, seed=seed).cut_buf(zeros)]
    return sorted(set(lengths[:-1])) or lengths
