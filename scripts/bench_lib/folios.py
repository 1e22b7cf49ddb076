"""How much of a file's page cache sits in large folios: the warm-read profile.

A warm re-read never reaches a FUSE daemon; the kernel copies from the page
cache, and how fast it does so depends on the size of the folios it walks.
On this machine's kernel (6.18) ext4 caches a 128 MiB shard read cold in
folios of about 256 KiB, while a FUSE file's page cache is order-0 pages only,
so ``filemap_read`` handles 64 times as many folios per byte. That is a limit
of the kernel's FUSE page cache, the same for every FUSE filesystem, and no
daemon can change it; the bench records the share beside each warm figure.

Reads ``/proc/self/pagemap`` and ``/proc/kpageflags`` (root only) for the
pages of each file mapped read-only. Touching a page that is not cached would
read it in, so call this only right after a warm pass.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
from collections.abc import Sequence

PAGE = os.sysconf("SC_PAGE_SIZE")
_PRESENT = 1 << 63
_PFN_MASK = (1 << 55) - 1
_KPF_COMPOUND_HEAD = 1 << 15
_KPF_COMPOUND_TAIL = 1 << 16


def _file_pages(path: str, pagemap: int, kpageflags: int) -> tuple[int, int]:
    """(pages in large folios, resident pages) of one file's page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return 0, 0
        # Private and writable only so ctypes can take its address; it is only read,
        # so its pages stay the page cache's own.
        with mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE) as mapping:
            view = memoryview(mapping)
            try:
                for offset in range(0, size, PAGE):
                    view[offset]  # fault the page in: pagemap lists mapped pages only
                pages = (size + PAGE - 1) // PAGE
                raw = os.pread(pagemap, pages * 8, _mapping_start(mapping) // PAGE * 8)
            finally:
                view.release()
    finally:
        os.close(fd)
    large = resident = 0
    for (entry,) in struct.iter_unpack("Q", raw):
        if not entry & _PRESENT:
            continue
        resident += 1
        (flags,) = struct.unpack("Q", os.pread(kpageflags, 8, (entry & _PFN_MASK) * 8))
        if flags & (_KPF_COMPOUND_HEAD | _KPF_COMPOUND_TAIL):
            large += 1
    return large, resident


def _mapping_start(mapping: mmap.mmap) -> int:
    first = ctypes.c_char.from_buffer(mapping)
    try:
        return ctypes.addressof(first)
    finally:
        del first  # an exported buffer keeps the mapping from closing


def large_folio_share(paths: Sequence[str]) -> float | None:
    """The fraction of the files' resident page-cache pages that belong to large
    folios, or None where the kernel will not say (not root, no kpageflags)."""
    fds: list[int] = []
    try:
        for proc_file in ("/proc/self/pagemap", "/proc/kpageflags"):
            fds.append(os.open(proc_file, os.O_RDONLY))
        large = resident = 0
        for path in paths:
            file_large, file_resident = _file_pages(path, *fds)
            large += file_large
            resident += file_resident
    except OSError:
        return None
    finally:
        for fd in fds:
            os.close(fd)
    return large / resident if resident else None
