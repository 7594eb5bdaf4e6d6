"""The Linux and glibc calls Python does not wrap: a parent-death signal, dropping a file's mappings, trimming the heap."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import signal

PR_SET_PDEATHSIG = 1
MADV_DONTNEED = 4


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def die_with_parent() -> None:
    """Be sent SIGKILL the moment the parent dies (the thread that spawned this process, in fact)."""
    with contextlib.suppress(OSError, AttributeError):
        _libc().prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def file_mappings(*paths: os.PathLike[str] | str) -> list[tuple[int, int]]:
    """The address ranges of this process's mappings of these files: the kernel takes about 0.3 ms to list them."""
    targets = tuple(" " + os.path.realpath(path) for path in paths)
    ranges = []
    with contextlib.suppress(OSError), open("/proc/self/maps") as maps:
        for line in maps:
            if line.rstrip("\n").endswith(targets):
                start, end = (int(bound, 16) for bound in line.split(None, 1)[0].split("-"))
                ranges.append((start, end))
    return ranges


def drop_mappings(ranges: list[tuple[int, int]]) -> None:
    """Unmap this process's pages in these ranges of read-only shared file mappings; later reads fault them back in.

    The caller must know the ranges still map those files (nothing unmapped or moved them since
    `file_mappings`), or the advice could fall on memory reused since: anonymous memory is zeroed.
    """
    with contextlib.suppress(OSError, AttributeError):
        for start, end in ranges:
            _libc().madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_DONTNEED)


def release_free_heap() -> None:
    """Give the C heap's free pages back to the kernel (glibc; elsewhere this does nothing).

    Once a big block is freed, glibc raises its mmap threshold to that size (up to 32 MiB) and its
    trim threshold to twice that, so from then on such blocks come from the heap, and freed ones
    stay resident until a trim.
    """
    with contextlib.suppress(OSError, AttributeError):
        _libc().malloc_trim(0)
