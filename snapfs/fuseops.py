"""The pyfuse3 adapter: the only module that imports pyfuse3.

A thin layer over snapfs.vfs. This is the single boundary where errors become
errnos: VfsError carries its own, and any SnapfsError (a missing or corrupt
object, an unreachable store) becomes EIO with one log line naming the
snapshot, the path and the object. Called only from the trio thread.
"""

from __future__ import annotations

import errno
import json
import logging
import os
from collections.abc import Callable

import pyfuse3
import trio

from .errors import MountError, SnapfsError
from .vfs import ROOT_INODE, Attr, OpenFile, SnapshotFS, VfsError

log = logging.getLogger(__name__)

STATUS_XATTR = b"user.snapfs.status"
FUSEError = pyfuse3.FUSEError
#: pyfuse3 built with scripts/pyfuse3.patch (scripts/setup does) hands a
#: read without a file handle to ``read_noopen`` with its inode. Then open() can
#: answer ENOSYS: the kernel stops sending OPEN and RELEASE for good (no_open)
#: and keeps each file's page cache across opens, so a warm open/read/close
#: never reaches the daemon. A stock pyfuse3 passes only the (zero) handle, so
#: every open must go through the daemon.
KERNEL_CAN_SKIP_OPEN = hasattr(pyfuse3.Operations, "read_noopen")


def _entry(attr: Attr) -> pyfuse3.EntryAttributes:
    out = pyfuse3.EntryAttributes()
    out.st_ino = attr.ino
    out.generation = 0
    out.entry_timeout = attr.timeout
    out.attr_timeout = attr.timeout
    out.st_mode = attr.mode
    out.st_nlink = attr.nlink
    out.st_uid = attr.uid
    out.st_gid = attr.gid
    out.st_rdev = 0
    out.st_size = attr.size
    out.st_blksize = 1 << 20
    out.st_blocks = attr.blocks
    out.st_atime_ns = attr.mtime_ns
    out.st_mtime_ns = attr.mtime_ns
    out.st_ctime_ns = attr.mtime_ns
    return out


class Operations(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(
        self,
        fs: SnapshotFS,
        status: Callable[[], dict],
        *,
        skip_open: bool | None = None,
        xattr_status: bool = True,
    ) -> None:
        super().__init__()
        self.fs = fs
        self.status = status
        # False when the daemon serves status on its control socket: then no
        # xattr exists and ENOSYS stops the kernel asking (see getxattr).
        self.xattr_status = xattr_status
        self.xattr_requests = 0
        if skip_open and not KERNEL_CAN_SKIP_OPEN:
            raise MountError("this pyfuse3 cannot skip OPEN requests; install it with scripts/setup")
        self.skip_open = KERNEL_CAN_SKIP_OPEN if skip_open is None else skip_open
        self.open_requests = 0

    async def _call(self, what: str, ino: int, coro):
        try:
            return await coro
        except VfsError as exc:
            raise FUSEError(exc.errno) from None
        except SnapfsError as exc:
            log.error("EIO on %s of %s: %s", what, self.fs.describe(ino), exc)
            raise FUSEError(errno.EIO) from None
        except trio.Cancelled:
            raise
        except Exception:
            log.exception("bug: unexpected error in %s of %s", what, self.fs.describe(ino))
            raise FUSEError(errno.EIO) from None

    async def lookup(self, parent_inode, name, ctx=None):
        return _entry(await self._call("lookup", parent_inode, self.fs.lookup(parent_inode, bytes(name))))

    async def getattr(self, inode, ctx=None):
        return _entry(await self._call("getattr", inode, self.fs.getattr(inode)))

    def forget(self, inode_list):
        # Inode numbers are derived (see vfs): only a no_open file's read state
        # is kept per inode. forget must never raise.
        for inode, _count in inode_list:
            self.fs.forget(inode)

    async def opendir(self, inode, ctx):
        if inode != ROOT_INODE and inode & 0xFFFFFFFF:
            raise FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh, start_id, token):
        rows = await self._call("readdir", fh, self.fs.readdir(fh, start_id))
        for name, attr, next_id in rows:
            if not pyfuse3.readdir_reply(token, name, _entry(attr), next_id):
                break

    async def releasedir(self, fh):
        return None

    async def readlink(self, inode, ctx):
        return await self._call("readlink", inode, self.fs.readlink(inode))

    async def open(self, inode, flags, ctx):
        self.open_requests += 1
        if self.skip_open:
            # Once is enough: the kernel then opens every file itself, with
            # keep_cache, and reads arrive at read_noopen. Writes never get
            # here: the mount is ro and the kernel answers EROFS.
            raise FUSEError(errno.ENOSYS)
        fh = await self._call("open", inode, self.fs.open(inode, flags))
        info = pyfuse3.FileInfo(fh=fh)
        info.keep_cache = True  # content never changes: let the page cache keep it
        return info

    async def read(self, fh, off, size):
        try:
            handle = self.fs.handle(fh)
        except VfsError as exc:
            raise FUSEError(exc.errno) from None
        return await self._read(handle, off, size)

    async def read_noopen(self, inode, off, size):
        return await self._read(await self._call("open", inode, self.fs.inode_file(inode)), off, size)

    async def _read(self, handle: OpenFile, off: int, size: int):
        try:
            return await self.fs.read_file(handle, off, size)
        except SnapfsError as exc:
            log.error(
                "EIO reading %s/%s at offset %d: %s", handle.snapshot_id, os.fsdecode(handle.path), off, exc
            )
            raise FUSEError(errno.EIO) from None
        except VfsError as exc:
            raise FUSEError(exc.errno) from None
        except trio.Cancelled:
            raise
        except Exception:
            log.exception("bug: unexpected error reading %s/%s", handle.snapshot_id, os.fsdecode(handle.path))
            raise FUSEError(errno.EIO) from None

    async def release(self, fh):
        self.fs.release(fh)

    async def flush(self, fh):
        # ENOSYS once makes the kernel stop sending FLUSH on every close(): a
        # read-only filesystem has nothing to flush, and it saves a round trip
        # through the daemon per file a dataloader opens.
        raise FUSEError(errno.ENOSYS)

    async def access(self, inode, mode, ctx):
        if mode & os.W_OK:
            raise FUSEError(errno.EROFS)
        return True

    async def statfs(self, ctx):
        out = pyfuse3.StatvfsData()
        out.f_bsize = 1 << 20
        out.f_frsize = 1 << 20
        out.f_namemax = 255
        return out

    async def getxattr(self, inode, name, ctx):
        self.xattr_requests += 1
        if not self.xattr_status:
            # Snapshots carry no xattrs. ENOSYS once makes the kernel answer every
            # later getxattr itself (EOPNOTSUPP), as for flush: `ls -l` asks two
            # per file, and `cp -a`/`rsync -X` one or more.
            raise FUSEError(errno.ENOSYS)
        if inode == ROOT_INODE and name == STATUS_XATTR:
            return json.dumps(self.status(), sort_keys=True).encode()
        raise FUSEError(pyfuse3.ENOATTR)

    async def listxattr(self, inode, ctx):
        self.xattr_requests += 1
        if not self.xattr_status:
            raise FUSEError(errno.ENOSYS)
        return [STATUS_XATTR] if inode == ROOT_INODE else []

    # Everything that would change the filesystem: EROFS.
    async def setattr(self, inode, attr, fields, fh, ctx):
        raise FUSEError(errno.EROFS)

    async def setxattr(self, inode, name, value, ctx):
        raise FUSEError(errno.EROFS)

    async def removexattr(self, inode, name, ctx):
        raise FUSEError(errno.EROFS)

    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        raise FUSEError(errno.EROFS)

    async def mkdir(self, parent_inode, name, mode, ctx):
        raise FUSEError(errno.EROFS)

    async def unlink(self, parent_inode, name, ctx):
        raise FUSEError(errno.EROFS)

    async def rmdir(self, parent_inode, name, ctx):
        raise FUSEError(errno.EROFS)

    async def symlink(self, parent_inode, name, target, ctx):
        raise FUSEError(errno.EROFS)

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        raise FUSEError(errno.EROFS)

    async def link(self, inode, new_parent_inode, new_name, ctx):
        raise FUSEError(errno.EROFS)

    async def create(self, parent_inode, name, mode, flags, ctx):
        raise FUSEError(errno.EROFS)

    async def write(self, fh, off, buf):
        raise FUSEError(errno.EROFS)


def mount_options(*, allow_other: bool) -> set[str]:
    options = set(pyfuse3.default_options)  # includes default_permissions
    # auto_unmount: fusermount3 unmounts if the daemon dies, even by kill -9,
    # so a crash never leaves a dead mountpoint that looks like an empty dir.
    options |= {"fsname=snapfs", "subtype=snapfs", "ro", "auto_unmount"}
    if allow_other:
        options.add("allow_other")
    # No max_read: libfuse 3 refuses a max_read mount option unless init() sets
    # the same value in fuse_conn_info, which pyfuse3 does not expose; the mount
    # then dies at FUSE_INIT. The kernel already sends reads of up to 1 MiB
    # (max_pages) once readahead is raised, see daemon.set_readahead.
    return options


async def serve(ops: Operations, mountpoint: str, options: set[str], on_ready: Callable[[], None]) -> None:
    """Mount and serve until unmounted. ``on_ready`` runs in a worker thread once
    the mount answers requests (FUSE_INIT done), so it may stat the mount, tune
    the kernel and report readiness; then the loop serves on."""
    pyfuse3.init(ops, mountpoint, options)
    try:
        async with trio.open_nursery() as nursery:

            async def announce() -> None:
                # Blocks until pyfuse3.main has answered FUSE_INIT; safe in a thread only.
                try:
                    await trio.to_thread.run_sync(os.stat, mountpoint)
                except OSError as exc:
                    raise MountError(
                        f"cannot mount {mountpoint}: the kernel refused the FUSE connection ({exc.strerror})"
                    ) from exc
                await trio.to_thread.run_sync(on_ready)

            nursery.start_soon(announce)
            await pyfuse3.main(min_tasks=4, max_tasks=128)
            nursery.cancel_scope.cancel()
    finally:
        pyfuse3.close(unmount=True)


def terminate() -> None:
    pyfuse3.terminate()
