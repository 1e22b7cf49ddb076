"""Content-defined chunking (FastCDC 2020 via pyfastcdc) and chunk hashing.

The parameters below are part of the format (docs/FORMAT.md): changing any of
them changes chunk boundaries, so every snapshot ID and all dedup against
earlier pushes. tests/test_format.py pins cut points with golden vectors.

Safe from any thread: each thread gets its own FastCDC instance (pyfastcdc's
objects are not concurrency-safe). Both the chunker and blake3 release the GIL.
"""

from __future__ import annotations

import mmap
import os
import threading

from pyfastcdc import FastCDC

from .format import ChunkRef
from .hashing import hash_bytes

MIN_SIZE = 256 << 10
AVG_SIZE = 1 << 20
MAX_SIZE = 4 << 20
NORMALIZED_CHUNKING = 1
SEED = 0

_local = threading.local()


def _chunker() -> FastCDC:
    chunker = getattr(_local, "chunker", None)
    if chunker is None:
        chunker = FastCDC(
            AVG_SIZE, min_size=MIN_SIZE, max_size=MAX_SIZE, normalized_chunking=NORMALIZED_CHUNKING, seed=SEED
        )
        _local.chunker = chunker
    return chunker


def cut_points(data: bytes | bytearray | memoryview) -> list[tuple[int, int]]:
    """(offset, length) of every chunk of ``data``; none for empty data."""
    if len(data) == 0:
        return []
    if len(data) <= MIN_SIZE:
        return [(0, len(data))]
    return [(c.offset, c.length) for c in _chunker().cut_buf(data)]


def chunk_bytes(data: bytes | bytearray | memoryview) -> list[tuple[ChunkRef, memoryview]]:
    """Cut and hash ``data``: [((chunk_id, length), view of the bytes), ...]."""
    view = memoryview(data)
    return [((hash_bytes(view[o : o + n]), n), view[o : o + n]) for o, n in cut_points(view)]


class MappedFile:
    """A read-only mmap of a regular file, usable as a context manager.

    Empty files cannot be mapped; they expose an empty buffer instead.
    """

    def __init__(self, path: str | bytes, fd: int | None = None) -> None:
        self._fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW) if fd is None else fd
        self._own_fd = fd is None
        size = os.fstat(self._fd).st_size
        self._map = mmap.mmap(self._fd, size, prot=mmap.PROT_READ) if size else None
        if self._map is not None:
            self._map.madvise(mmap.MADV_SEQUENTIAL)
        self.buffer = memoryview(self._map) if self._map is not None else memoryview(b"")

    def close(self) -> None:
        self.buffer.release()
        if self._map is not None:
            self._map.close()
        if self._own_fd:
            os.close(self._fd)

    def __enter__(self) -> MappedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
