"""What snapshots look like as a filesystem: inodes, lookup, readdir, read.

No pyfuse3 here: snapfs.fuseops adapts this to FUSE, and tests drive it directly.
Call only from the trio thread. Every ``await`` may let another request run;
the state that can change across one is listed in docs/CACHE.md.

Inode numbers are derived, not tabled (restic's idea, adapted):
- 1 is the mountpoint root, which holds ``<snapshot-id>`` directories and
  ``<name>`` symlinks;
- every directory that has been visited gets a *slot* s >= 1, and its inode is
  ``s << 32``;
- a file or symlink is ``(s << 32) | (i + 1)``, where s is its directory's slot
  and i its index in the directory's sorted entries;
- name symlinks at the root are small numbers 2, 3, ...
So visiting files costs no memory at all; memory grows only with the number of
directories visited (one small slot each), and decoded trees sit in an LRU
bounded by entry count. Slots are never reused during a mount, so an inode
never changes meaning; ``forget`` therefore has nothing to free.
"""

from __future__ import annotations

import bisect
import errno
import itertools
import logging
import os
import stat
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from . import format as fmt
from .cache import ObjectSource
from .errors import CacheIndexError, NotFoundError, SnapfsError
from .format import ChunkRef, Entry
from .hashing import is_object_id
from .links import LinkResolution

log = logging.getLogger(__name__)

ROOT_INODE = 1
SLOT_SHIFT = 32
INDEX_MASK = (1 << SLOT_SHIFT) - 1
# Every file shows this mtime (2000-01-01T00:00:00Z): content never changes, and
# a fixed, documented time keeps `tar`, `rsync` and `make` deterministic.
FIXED_MTIME_NS = 946684800 * 1_000_000_000
ROOT_ATTR_TIMEOUT = 1.0
CONTENT_TIMEOUT = 86400.0 * 365
READAHEAD_CHUNKS = 8
READ_STREAMS = 8  # sequential readers of one file tracked for readahead
# A cold read of a small file starts fetching this many of the files after it
# in its directory (wrapping around), up to SIBLING_BYTES: a dataloader reads
# a directory's samples in shuffled order, one request per file, so without
# this each reader waits out a store round trip per file. Only files of one
# chunk up to SIBLING_FILE_MAX count; reads served from memory, the disk
# cache or the page cache never trigger it, and neither does a cold read while
# another read waits, unless small fetches take over SIBLING_LATENCY. Against
# a store that answers fast, concurrent readers hide each other's round trips
# already and the prefetch only cost CPU: siblings fetched ahead of a shuffled
# reader mostly leave the memory LRU before they are read, and are read back
# from the disk cache. Measured on 20,000 x 50 KB files, 8 readers, loopback
# SeaweedFS, 2 interleaved rounds: 612-763 files/s prefetching on every cold
# read, 687-864 with none, 728-748 prefetching only while no other read
# waited; with 1 reader, 494-510 files/s prefetching, 421-521 without. Against
# a store tens of ms away, 8 readers can hide only 8 round trips at a time,
# and the prefetch is what fills the other fetch slots.
SIBLING_FILES = 16
SIBLING_BYTES = 8 << 20
SIBLING_FILE_MAX = 1 << 20
SIBLING_LATENCY = 0.02  # seconds; see above
# When a directory's tree is decoded for the first time, the trees of its
# first TREE_PREFETCH subdirectories and of the TREE_PREFETCH directories after
# it in its parent start fetching: a walk (find, ls -R, a dataloader's os.walk
# over its index) then meets each next directory in memory instead of waiting
# out one store round trip per directory. Tied to --prefetch-siblings (0: off).
TREE_PREFETCH = 16
# Files read without an OPEN (the kernel's no_open mode, see fuseops) keep their
# decoded chunk list and readahead state per inode, in an LRU bounded by files
# and by chunk references (a 1 TiB file alone lists a million chunks).
INODE_FILES = 4096
INODE_FILE_CHUNKS = 1 << 18


def _moves(name: str) -> bool:
    """Names never move, but SERIES@latest follows the newest version."""
    return name.lower().endswith("@latest")


class VfsError(Exception):
    """An errno for the reader; the adapter turns it into FUSEError."""

    def __init__(self, errno_: int, message: str = "") -> None:
        super().__init__(message or os.strerror(errno_))
        self.errno = errno_


@dataclass(slots=True)
class Attr:
    ino: int
    mode: int
    size: int
    nlink: int
    uid: int
    gid: int
    mtime_ns: int
    blocks: int
    timeout: float


@dataclass(slots=True)
class DirSlot:
    tree_id: str
    snapshot_id: str
    path: bytes  # inside the snapshot, for log lines
    parent_ino: int
    subdirs: int  # for nlink, known from the parent's entry without fetching this tree


class _Tree:
    __slots__ = ("entries", "index", "subdirs")

    def __init__(self, entries: list[Entry]) -> None:
        self.entries = entries
        self.index = {e.name: i for i, e in enumerate(entries)}
        self.subdirs = sum(1 for e in entries if e.is_dir)


@dataclass
class OpenFile:
    entry: Entry
    chunks: tuple[ChunkRef, ...]
    offsets: list[int]  # start offset of each chunk
    snapshot_id: str
    path: bytes
    ino: int  # its directory's slot and its index there: for sibling prefetch
    # The file's readers, newest last, as [where it will read next, chunk index
    # up to which its readahead was started]. Several: in no_open mode one
    # OpenFile serves every process that reads the file.
    streams: list[list[int]] = field(default_factory=list)


NameResolver = Callable[[str], Awaitable[str | None]]
NameLister = Callable[[], Awaitable[list[str]]]
#: (tree_id, description for errors) -> decoded entries, for sources whose
#: trees are not snapfs-encoded objects (snapfs/snapdir_source.py).
TreeLoader = Callable[[str, str], Awaitable[list[Entry]]]


class SnapshotFS:
    def __init__(
        self,
        source: ObjectSource,
        *,
        uid: int | None = None,
        gid: int | None = None,
        resolve_name: NameResolver | None = None,
        list_names: NameLister | None = None,
        tree_cache_entries: int = 200_000,
        tree_loader: TreeLoader | None = None,
        sibling_files: int = SIBLING_FILES,
        tree_prefetch: int = TREE_PREFETCH,
        inode_files: int = INODE_FILES,
        inode_file_chunks: int = INODE_FILE_CHUNKS,
    ) -> None:
        self.source = source
        self.sibling_files = sibling_files
        self.tree_prefetch = tree_prefetch
        self.tree_loader = tree_loader
        self.uid = os.getuid() if uid is None else uid
        self.gid = os.getgid() if gid is None else gid
        self.resolve_name = resolve_name
        self.list_names = list_names
        self.slots: list[DirSlot | None] = [None]
        self.slot_of: dict[tuple, int] = {}
        self.snapshots: dict[str, int] = {}  # snapshot_id -> slot, in the order opened
        self.names: dict[str, tuple[int, str]] = {}  # name -> (ino, snapshot_id)
        self.name_by_ino: dict[int, str] = {}
        self.trees: OrderedDict[str, _Tree] = OrderedDict()
        self.tree_cache_entries = tree_cache_entries
        self._tree_entries = 0
        self.handles: dict[int, OpenFile] = {}
        self._next_fh = 1
        self.inode_files: OrderedDict[int, OpenFile] = OrderedDict()
        self.inode_files_max = inode_files
        self.inode_file_chunks_max = inode_file_chunks
        self._inode_file_chunks = 0
        self.started = time.time()
        self.read_requests = 0
        self.read_bytes = 0

    # --- trees -----------------------------------------------------------

    async def _tree(self, tree_id: str, snapshot_id: str, path: bytes, slot: DirSlot | None = None) -> _Tree:
        """The decoded tree; ``slot``, if known, is the directory it is for (its
        parent's next directories are prefetched on first decode)."""
        tree = self.trees.get(tree_id)
        if tree is not None:
            self.trees.move_to_end(tree_id)
            return tree
        where = f"tree {tree_id} (snapshot {snapshot_id}, /{os.fsdecode(path)})"
        if self.tree_loader is not None:
            # An adapter that hands over decoded entries (snapdir stores).
            entries = await self.tree_loader(tree_id, where)
        else:
            data = await self.source.get(tree_id, "tree")
            # Decoding is pure CPU; a large tree is decoded in a thread so `ls`
            # elsewhere on the mount is not held up.
            if len(data) > 256 << 10:
                entries = await trio.to_thread.run_sync(fmt.decode_tree, data, where)
            else:
                entries = fmt.decode_tree(data, where)
        # Another request may have decoded it while we awaited.
        tree = self.trees.get(tree_id)
        if tree is None:
            tree = _Tree(entries)
            self.trees[tree_id] = tree
            self._tree_entries += len(entries)
            while self._tree_entries > self.tree_cache_entries and len(self.trees) > 1:
                _, old = self.trees.popitem(last=False)
                self._tree_entries -= len(old.entries)
            if self.tree_prefetch > 0 and self.tree_loader is None:
                self._prefetch_trees(tree, slot)
        return tree

    def _prefetch_trees(self, tree: _Tree, slot: DirSlot | None) -> None:
        """Start fetching the trees a walk visits next (see TREE_PREFETCH): this
        directory's first subdirectories, then the directories after it in its
        parent. Bounded scans: a directory of a million files costs no more."""
        limit = self.tree_prefetch
        scan = 16 * limit

        def subdir_trees(entries: list[Entry], start: int = 0) -> list[str]:
            # The first `limit` directories among the `scan` entries from `start`.
            found = (e.tree_id for e in entries[start : start + scan] if e.is_dir)
            return list(itertools.islice(found, limit))  # type: ignore[arg-type]

        wanted = subdir_trees(tree.entries)
        # A snapshot's root (empty path) has no parent tree; every other directory's
        # parent_ino is its parent directory's slot.
        parent = self.slots[slot.parent_ino >> SLOT_SHIFT] if slot is not None and slot.path else None
        parent_tree = self.trees.get(parent.tree_id) if parent is not None else None
        if parent_tree is not None:
            index = parent_tree.index.get(slot.path.rpartition(b"/")[2], len(parent_tree.entries))  # type: ignore[union-attr]
            wanted += subdir_trees(parent_tree.entries, index + 1)
        for tree_id in wanted:
            if tree_id not in self.trees and not self.source.prefetch(tree_id, "tree"):
                break  # prefetch slots are full: the store is busy enough

    def _slot(self, ino: int) -> DirSlot:
        s = ino >> SLOT_SHIFT
        slot = self.slots[s] if 0 < s < len(self.slots) else None
        if slot is None:
            raise VfsError(errno.ENOENT)
        return slot

    def _alloc_slot(
        self, key: tuple, tree_id: str, snapshot_id: str, path: bytes, parent_ino: int, subdirs: int
    ) -> int:
        s = self.slot_of.get(key)
        if s is None:
            s = len(self.slots)
            self.slots.append(DirSlot(tree_id, snapshot_id, path, parent_ino, subdirs))
            self.slot_of[key] = s
        return s << SLOT_SHIFT

    async def _slot_tree(self, slot: DirSlot) -> _Tree:
        return await self._tree(slot.tree_id, slot.snapshot_id, slot.path, slot)

    # --- attributes ------------------------------------------------------

    def _root_attr(self) -> Attr:
        return Attr(
            ROOT_INODE,
            stat.S_IFDIR | 0o755,
            0,
            2 + len(self.snapshots),
            self.uid,
            self.gid,
            FIXED_MTIME_NS,
            0,
            ROOT_ATTR_TIMEOUT,
        )

    def _entry_attr(self, ino: int, entry: Entry) -> Attr:
        if entry.is_symlink:
            mode, nlink, size, blocks = stat.S_IFLNK | 0o777, 1, entry.size, 0
        else:
            mode = stat.S_IFREG | (0o755 if entry.executable else 0o644)
            nlink, size, blocks = 1, entry.size, (entry.size + 511) // 512
        return Attr(ino, mode, size, nlink, self.uid, self.gid, FIXED_MTIME_NS, blocks, CONTENT_TIMEOUT)

    def _name_attr(self, ino: int, snapshot_id: str) -> Attr:
        return Attr(
            ino,
            stat.S_IFLNK | 0o777,
            len(snapshot_id),
            1,
            self.uid,
            self.gid,
            FIXED_MTIME_NS,
            0,
            ROOT_ATTR_TIMEOUT,
        )

    def _dir_attr(self, ino: int) -> Attr:
        slot = self._slot(ino)
        return Attr(
            ino,
            stat.S_IFDIR | 0o755,
            0,
            2 + slot.subdirs,
            self.uid,
            self.gid,
            FIXED_MTIME_NS,
            0,
            CONTENT_TIMEOUT,
        )

    async def _child(self, parent_ino: int, index: int) -> tuple[int, Entry, DirSlot]:
        slot = self._slot(parent_ino)
        tree = await self._slot_tree(slot)
        if not 0 <= index < len(tree.entries):
            raise VfsError(errno.ENOENT)
        entry = tree.entries[index]
        if entry.is_dir:
            path = slot.path + b"/" + entry.name if slot.path else entry.name
            ino = self._alloc_slot(
                (parent_ino >> SLOT_SHIFT, index),
                entry.tree_id,
                slot.snapshot_id,
                path,
                parent_ino,
                entry.subdirs,
            )
        else:
            ino = parent_ino | (index + 1)
        return ino, entry, slot

    async def _child_attr(self, parent_ino: int, index: int) -> Attr:
        ino, entry, _slot = await self._child(parent_ino, index)
        if entry.is_dir:
            return self._dir_attr(ino)
        return self._entry_attr(ino, entry)

    # --- operations ------------------------------------------------------

    async def getattr(self, ino: int) -> Attr:
        if ino == ROOT_INODE:
            return self._root_attr()
        if ino in self.name_by_ino:
            return self._name_attr(ino, self.names[self.name_by_ino[ino]][1])
        if ino & INDEX_MASK == 0:
            return self._dir_attr(ino)
        return await self._child_attr(ino & ~INDEX_MASK, (ino & INDEX_MASK) - 1)

    async def lookup(self, parent_ino: int, name: bytes) -> Attr:
        if parent_ino == ROOT_INODE:
            return await self._lookup_root(name)
        if parent_ino & INDEX_MASK:
            raise VfsError(errno.ENOTDIR)
        slot = self._slot(parent_ino)
        tree = await self._slot_tree(slot)
        if name == b".":
            return self._dir_attr(parent_ino)
        if name == b"..":
            return await self.getattr(slot.parent_ino)
        index = tree.index.get(name)
        if index is None:
            raise VfsError(errno.ENOENT)
        return await self._child_attr(parent_ino, index)

    async def open_snapshot(self, snapshot_id: str) -> int:
        """The root inode of a snapshot, fetching its root tree on first use."""
        s = self.snapshots.get(snapshot_id)
        if s is not None:
            return s << SLOT_SHIFT
        try:
            tree = await self._tree(snapshot_id, snapshot_id, b"")
        except NotFoundError as exc:
            raise VfsError(errno.ENOENT) from exc
        ino = self._alloc_slot(
            ("snapshot", snapshot_id), snapshot_id, snapshot_id, b"", ROOT_INODE, tree.subdirs
        )
        self.snapshots.setdefault(snapshot_id, ino >> SLOT_SHIFT)
        log.info("opened snapshot %s", snapshot_id)
        # For `snapfs cache stats`: which snapshots this node's cache serves.
        # Bookkeeping only: a full cache disk must not keep a snapshot from opening.
        try:
            await self.source.write_threads.run(self.source.cache.index.remember_snapshot, snapshot_id)
        except CacheIndexError as exc:
            log.warning("%s; snapshot %s opened but not recorded", exc, snapshot_id)
        return ino

    async def _lookup_root(self, name: bytes) -> Attr:
        if name in (b".", b".."):
            return self._root_attr()
        text = name.decode("utf-8", "replace")
        if is_object_id(text):
            return self._dir_attr(await self.open_snapshot(text))
        known = self.names.get(text)
        if known is not None and not _moves(text):
            return self._name_attr(known[0], known[1])
        if self.resolve_name is None:
            raise VfsError(errno.ENOENT)
        snapshot_id = await self.resolve_name(text)
        if snapshot_id is None:
            raise VfsError(errno.ENOENT)
        return self._name_attr(self._name_ino(text, snapshot_id), snapshot_id)

    def _name_ino(self, name: str, snapshot_id: str) -> int:
        known = self.names.get(name)
        if known is not None:
            if known[1] != snapshot_id:  # SERIES@latest moved to a new version
                self.names[name] = (known[0], snapshot_id)
            return known[0]
        ino = 2 + len(self.names)
        self.names[name] = (ino, snapshot_id)
        self.name_by_ino[ino] = name
        return ino

    async def readdir(self, ino: int, start: int) -> list[tuple[bytes, Attr, int]]:
        """Entries from position ``start``: (name, attr, next position)."""
        if ino == ROOT_INODE:
            return await self._readdir_root(start)
        if ino & INDEX_MASK:
            raise VfsError(errno.ENOTDIR)
        slot = self._slot(ino)
        tree = await self._slot_tree(slot)
        out = []
        for index in range(start, len(tree.entries)):
            out.append((tree.entries[index].name, await self._child_attr(ino, index), index + 1))
            if len(out) >= 512:  # the kernel's buffer holds far fewer; it will ask again
                break
        return out

    async def _readdir_root(self, start: int) -> list[tuple[bytes, Attr, int]]:
        rows: list[tuple[bytes, Attr]] = []
        for snapshot_id, s in list(self.snapshots.items()):
            rows.append((snapshot_id.encode(), self._dir_attr(s << SLOT_SHIFT)))
        if self.list_names is not None:
            try:
                for name in await self.list_names():
                    if name not in self.names and self.resolve_name is not None:
                        snapshot_id = await self.resolve_name(name)
                        if snapshot_id is None:
                            continue
                        self._name_ino(name, snapshot_id)
            except SnapfsError as exc:
                log.warning("cannot list names: %s", exc)
        for name, (name_ino, snapshot_id) in sorted(self.names.items()):
            rows.append((name.encode(), self._name_attr(name_ino, snapshot_id)))
        return [(name, attr, i + 1) for i, (name, attr) in enumerate(rows) if i >= start]

    async def readlink(self, ino: int) -> bytes:
        name = self.name_by_ino.get(ino)
        if name is not None:
            return self.names[name][1].encode()
        if ino == ROOT_INODE or ino & INDEX_MASK == 0:
            raise VfsError(errno.EINVAL)
        _ino, entry, slot = await self._child(ino & ~INDEX_MASK, (ino & INDEX_MASK) - 1)
        if not entry.is_symlink:
            raise VfsError(errno.EINVAL)
        target: bytes = entry.target  # type: ignore[assignment]
        link_path = slot.path + b"/" + entry.name if slot.path else entry.name
        # The mount applies pull's rule: a link that resolves outside its own
        # snapshot (absolute, or climbing out through `..` and other links) is
        # refused, so a snapshot cannot lead a reader to the host's files.
        # SnapfsError: fuseops logs it with the snapshot and path, and answers EIO.
        if await self._link_escapes(slot.snapshot_id, link_path, target):
            raise SnapfsError(
                f"symlink -> {fmt.display_name(target)} resolves outside snapshot {slot.snapshot_id}; refused"
            )
        return target

    async def _link_escapes(self, snapshot_id: str, link_path: bytes, target: bytes) -> bool:
        """Drive snapfs.links.LinkResolution over this mount's trees."""
        resolution = LinkResolution(link_path, target)
        while (needed := resolution.needs()) is not None:
            resolution.feed(await self._snapshot_entry(snapshot_id, needed))
        return bool(resolution.escapes)

    async def _snapshot_entry(self, snapshot_id: str, path: bytes) -> Entry | None:
        """The entry at ``path`` inside a snapshot, or None if there is none."""
        tree_id, entry = snapshot_id, None
        parts = path.split(b"/")
        for depth, part in enumerate(parts):
            if entry is not None:
                if not entry.is_dir:
                    return None
                tree_id = entry.tree_id  # type: ignore[assignment]
            tree = await self._tree(tree_id, snapshot_id, b"/".join(parts[:depth]))
            index = tree.index.get(part)
            if index is None:
                return None
            entry = tree.entries[index]
        return entry

    async def open(self, ino: int, flags: int) -> int:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise VfsError(errno.EROFS)
        handle = await self._open_file(ino)
        fh = self._next_fh
        self._next_fh += 1
        self.handles[fh] = handle
        return fh

    def release(self, fh: int) -> None:
        self.handles.pop(fh, None)

    def handle(self, fh: int) -> OpenFile:
        try:
            return self.handles[fh]
        except KeyError:
            raise VfsError(errno.EBADF) from None

    async def inode_file(self, ino: int) -> OpenFile:
        """The read state of a file the kernel reads without opening it (no_open)."""
        handle = self.inode_files.get(ino)
        if handle is not None:
            self.inode_files.move_to_end(ino)
            return handle
        handle = await self._open_file(ino)
        if ino in self.inode_files:  # another reader opened it meanwhile
            return self.inode_files[ino]
        self.inode_files[ino] = handle
        self._inode_file_chunks += len(handle.chunks)
        while len(self.inode_files) > 1 and (
            len(self.inode_files) > self.inode_files_max
            or self._inode_file_chunks > self.inode_file_chunks_max
        ):
            self._inode_file_chunks -= len(self.inode_files.popitem(last=False)[1].chunks)
        return handle

    def forget(self, ino: int) -> None:
        """The kernel dropped an inode: drop its read state too."""
        handle = self.inode_files.pop(ino, None)
        if handle is not None:
            self._inode_file_chunks -= len(handle.chunks)

    async def _open_file(self, ino: int) -> OpenFile:
        if ino == ROOT_INODE or ino & INDEX_MASK == 0:
            raise VfsError(errno.EISDIR)
        _ino, entry, slot = await self._child(ino & ~INDEX_MASK, (ino & INDEX_MASK) - 1)
        if not entry.is_file:
            raise VfsError(errno.EINVAL)
        path = slot.path + b"/" + entry.name if slot.path else entry.name
        if entry.chunklist_id is not None:
            data = await self.source.get(entry.chunklist_id, "chunk list")
            chunks = fmt.decode_chunklist(
                data, entry.chunk_count, entry.size, f"chunk list {entry.chunklist_id}"
            )
        else:
            chunks = entry.chunks
        offsets = []
        offset = 0
        for _, length in chunks:
            offsets.append(offset)
            offset += length
        return OpenFile(entry, chunks, offsets, slot.snapshot_id, path, ino)

    async def read(self, fh: int, offset: int, size: int) -> bytes | memoryview:
        return await self.read_file(self.handle(fh), offset, size)

    async def read_file(self, handle: OpenFile, offset: int, size: int) -> bytes | memoryview:
        self.read_requests += 1
        file_size = handle.entry.size
        if offset >= file_size or size <= 0:
            return b""
        end = min(offset + size, file_size)
        self.read_bytes += end - offset
        first = bisect.bisect_right(handle.offsets, offset) - 1
        last = bisect.bisect_right(handle.offsets, end - 1) - 1
        for stream in handle.streams:
            if stream[0] == offset:  # a sequential reader
                stream[0] = end
                self._readahead(handle, stream, last)
                break
        else:
            stream = [end, 0]
            handle.streams.append(stream)
            if len(handle.streams) > READ_STREAMS:
                del handle.streams[0]
            if offset == 0:
                self._readahead(handle, stream, last)
        if first == last:
            data, fetched = await self._chunk(handle, first)
            if fetched and len(handle.chunks) == 1 and self.sibling_files and self._siblings_pay():
                self._prefetch_siblings(handle)
            start = offset - handle.offsets[first]
            # A view, not a copy: pyfuse3 replies from any buffer.
            return memoryview(data)[start : start + (end - offset)]
        pieces: list[memoryview] = [memoryview(b"")] * (last - first + 1)

        async def one(i: int) -> None:
            data, _fetched = await self._chunk(handle, i)
            # Keep only the part this read covers: joining whole chunks first
            # would copy megabytes to return a few hundred kilobytes.
            lo = max(offset - handle.offsets[i], 0)
            hi = min(end - handle.offsets[i], len(data))
            pieces[i - first] = memoryview(data)[lo:hi]

        try:
            async with trio.open_nursery() as nursery:
                for i in range(first, last + 1):
                    nursery.start_soon(one, i)
        except BaseExceptionGroup as group:
            # trio wraps a failed chunk in an ExceptionGroup; the reader gets one
            # error (EIO and one log line in fuseops), not a "bug" traceback.
            failed, rest = group.split(SnapfsError)
            if failed is None or rest is not None:
                raise
            while isinstance(failed, BaseExceptionGroup):
                failed = failed.exceptions[0]
            raise failed from None
        return b"".join(pieces)

    async def _chunk(self, handle: OpenFile, index: int) -> tuple[bytes, bool]:
        """A chunk's verified bytes, and whether the read waited on the store."""
        chunk_id, length = handle.chunks[index]
        return await self.source.get_noting_fetch(chunk_id, "chunk", length)

    def _readahead(self, handle: OpenFile, stream: list[int], current: int) -> None:
        """Keep up to READAHEAD_CHUNKS chunks ahead of a sequential reader in flight."""
        start = max(current + 1, stream[1])
        stop = min(current + 1 + READAHEAD_CHUNKS, len(handle.chunks))
        for i in range(start, stop):
            chunk_id, length = handle.chunks[i]
            if not self.source.prefetch(chunk_id, "chunk", length):
                break
            stream[1] = i + 1

    def _siblings_pay(self) -> bool:
        """Whether a cold read's sibling prefetch is worth its CPU (SIBLING_FILES)."""
        return not self.source.waiting_reads or self.source.small_fetch_seconds > SIBLING_LATENCY

    def _prefetch_siblings(self, handle: OpenFile) -> None:
        """Start fetching the small files after this one in its directory (see SIBLING_FILES)."""
        try:
            slot = self._slot(handle.ino & ~INDEX_MASK)
        except VfsError:
            return
        tree = self.trees.get(slot.tree_id)
        if tree is None:
            return
        index = (handle.ino & INDEX_MASK) - 1
        n = len(tree.entries)
        files = budget = 0
        # Bounded scan: a directory of many subdirectories must not make each cold read O(n).
        for step in range(1, min(n, 16 * self.sibling_files)):
            entry = tree.entries[(index + step) % n]
            if not entry.is_file or entry.chunklist_id is not None or len(entry.chunks) != 1:
                continue
            if entry.size > SIBLING_FILE_MAX:
                continue
            chunk_id, length = entry.chunks[0]
            if not self.source.prefetch(chunk_id, "chunk", length, from_store=True):
                break  # prefetch slots are full: the store is busy enough
            files += 1
            budget += length
            if files >= self.sibling_files or budget >= SIBLING_BYTES:
                break

    def describe(self, ino: int) -> str:
        """Snapshot and path of an inode, for log lines."""
        try:
            if ino == ROOT_INODE:
                return "/"
            if ino & INDEX_MASK == 0:
                slot = self._slot(ino)
                return f"{slot.snapshot_id}/{os.fsdecode(slot.path)}"
            slot = self._slot(ino & ~INDEX_MASK)
            tree = self.trees.get(slot.tree_id)
            index = (ino & INDEX_MASK) - 1
            name = (
                os.fsdecode(tree.entries[index].name) if tree and index < len(tree.entries) else f"#{index}"
            )
            return f"{slot.snapshot_id}/{os.fsdecode(slot.path)}/{name}".replace("//", "/")
        except VfsError:
            return f"inode {ino}"

    def stats(self) -> dict:
        return {
            "snapshots_open": len(self.snapshots),
            "dirs_visited": len(self.slots) - 1,
            "trees_cached": len(self.trees),
            "tree_entries_cached": self._tree_entries,
            "open_files": len(self.handles),
            "inode_files": len(self.inode_files),
            "read_requests": self.read_requests,
            "read_bytes": self.read_bytes,
        }
