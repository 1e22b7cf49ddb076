#!/usr/bin/env python3
"""A minimal read-only pyfuse3 passthrough: "the Python FUSE limit" in scripts/bench.

    bench_passthrough.py SOURCE MOUNTPOINT

Mirrors SOURCE at MOUNTPOINT with the least work a pyfuse3 filesystem can do
per request: ``read`` is one ``os.pread`` on a file descriptor opened at
``open``, attributes come straight from ``lstat``. What snapfs does on top
(chunk maps, verification, its cache) is measured against this. Like snapfs,
entry and attribute timeouts are long (the tree does not change during a run),
but ``keep_cache`` is left off so that a warm re-read still goes through this
daemon: the number it gives is the Python request path, not the page cache.
FUSE mount options are pyfuse3's defaults plus ``ro``. ``pread`` runs on the
trio thread, as in pyfuse3's example: handing each read to a worker thread
measured slower here, cold and warm, with 1 and 4 readers.

Runs in the foreground until unmounted (``fusermount3 -u MOUNTPOINT``) or sent
SIGTERM/SIGINT. Lookup counts follow pyfuse3's contract (one per lookup and
per accepted readdir entry, dropped in ``forget``), as in pyfuse3's own
``examples/passthroughfs.py``.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys

import pyfuse3
import trio

log = logging.getLogger("bench_passthrough")

TIMEOUT = 3600.0


class Passthrough(pyfuse3.Operations):
    def __init__(self, source: str) -> None:
        super().__init__()
        self._path = {pyfuse3.ROOT_INODE: source}
        self._lookups: dict[int, int] = {}
        self._dirs: dict[int, tuple[str, list[bytes]]] = {}  # handle -> (dir path, sorted names)
        self._next_dir_handle = 1

    def _attrs(self, path: str, inode: int) -> pyfuse3.EntryAttributes:
        try:
            st = os.lstat(path)
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = inode
        attrs.generation = 0
        attrs.entry_timeout = TIMEOUT
        attrs.attr_timeout = TIMEOUT
        attrs.st_mode = st.st_mode
        attrs.st_nlink = st.st_nlink
        attrs.st_uid = st.st_uid
        attrs.st_gid = st.st_gid
        attrs.st_rdev = st.st_rdev
        attrs.st_size = st.st_size
        attrs.st_blksize = st.st_blksize
        attrs.st_blocks = st.st_blocks
        attrs.st_atime_ns = st.st_atime_ns
        attrs.st_mtime_ns = st.st_mtime_ns
        attrs.st_ctime_ns = st.st_ctime_ns
        return attrs

    def _inode_for(self, path: str) -> int:
        # The source's own inode numbers are unique and stable; only the root
        # must be pyfuse3.ROOT_INODE.
        st_ino = os.lstat(path).st_ino
        if st_ino == pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.EIO)
        return st_ino

    def _remember(self, inode: int, path: str) -> None:
        self._path[inode] = path
        self._lookups[inode] = self._lookups.get(inode, 0) + 1

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        path = os.path.join(self._path[parent_inode], os.fsdecode(name))
        try:
            inode = self._inode_for(path)
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.ENOENT) from None
        attrs = self._attrs(path, inode)
        self._remember(inode, path)
        return attrs

    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        for inode, count in inode_list:
            left = self._lookups.get(inode, 0) - count
            if left > 0:
                self._lookups[inode] = left
            else:
                self._lookups.pop(inode, None)
                if inode != pyfuse3.ROOT_INODE:
                    self._path.pop(inode, None)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        return self._attrs(self._path[inode], inode)

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return os.fsencode(os.readlink(self._path[inode]))

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        path = self._path[inode]
        try:
            names = sorted(os.fsencode(name) for name in os.listdir(path))
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        handle = self._next_dir_handle
        self._next_dir_handle += 1
        self._dirs[handle] = (path, names)
        return handle

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        directory, names = self._dirs[fh]
        for index in range(start_id, len(names)):
            name = names[index]
            path = os.path.join(directory, os.fsdecode(name))
            try:
                inode = self._inode_for(path)
                attrs = self._attrs(path, inode)
            except (OSError, pyfuse3.FUSEError):
                continue
            if not pyfuse3.readdir_reply(token, name, attrs, index + 1):
                break
            self._remember(inode, path)

    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if flags & (os.O_WRONLY | os.O_RDWR):
            raise pyfuse3.FUSEError(errno.EROFS)
        try:
            fd = os.open(self._path[inode], os.O_RDONLY)
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        return pyfuse3.FileInfo(fh=fd)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return os.pread(fh, size, off)

    async def release(self, fh: int) -> None:
        os.close(fh)

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st = os.statvfs(self._path[pyfuse3.ROOT_INODE])
        out = pyfuse3.StatvfsData()
        for name in (
            "f_bsize",
            "f_frsize",
            "f_blocks",
            "f_bfree",
            "f_bavail",
            "f_files",
            "f_ffree",
            "f_favail",
        ):
            setattr(out, name, getattr(st, name))
        out.f_namemax = st.f_namemax
        return out


def main() -> int:
    logging.basicConfig(level=logging.WARNING, format="bench_passthrough: %(message)s")
    if len(sys.argv) != 3:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    source, mountpoint = os.path.abspath(sys.argv[1]), sys.argv[2]
    options = set(pyfuse3.default_options) | {"fsname=bench-passthrough", "ro"}
    pyfuse3.init(Passthrough(source), mountpoint, options)

    def _stop(_signum: int, _frame: object) -> None:
        pyfuse3.terminate()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
