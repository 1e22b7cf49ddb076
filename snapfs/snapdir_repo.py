"""snapdir snapshots presented as snapfs trees: the read side of snapdir interop.

A snapdir store (docs/SNAPDIR.md) holds one flat manifest per snapshot and one
whole object per distinct file content, named by its BLAKE3. SnapdirRepo is a
read-only :class:`snapfs.repo.Repo` over such a store, so the code that walks
snapfs trees (``ls``, ``cat``, ``manifest``, ``diff``, the mount) works on it:

- the snapshot is addressed by its **snapdir ID**: ``get_tree(snapdir_id)``
  returns the root directory's entries;
- every other directory becomes a *synthesized* tree whose ID is BLAKE3 of a
  private encoding (``SYNTH_TREE_MAGIC``, domain-separated from real snapfs
  trees, which are never confused with it). Synthesized trees exist only in
  memory; their IDs are stable for a given manifest and store;
- a file becomes one whole-object "chunk" whose ID is the snapdir checksum.
  That is BLAKE3 of the content, exactly what snapfs checks for a chunk, so
  verification is the same check;
- a file's size comes from its object, not from the manifest: a followed
  symlink's SIZE is the length of the link's target path (SNAPDIR.md §3).
  A link target is at most 4095 bytes, so only entries with SIZE <= 4095 can
  be such links: their objects are stat'ed (one HEAD each, in parallel). A
  larger SIZE is the real ``lstat`` size of a regular file; if a hostile
  manifest lies about it, the fetch's length check fails (EIO / an error),
  never serving wrong bytes.

Whole objects can be far larger than snapfs's 4 MiB chunks, so ``fmt.decode_tree``
(which enforces that limit) is never used on them: entries are handed over
decoded. Large objects are streamed to a file with parallel ranged GETs and
verified by hashing the file (``fetch_object_to_fd``); ``get_chunk`` refuses
objects above ``max_object_bytes`` (pull and import stream instead).

Thread-safe: loaded snapshots sit in a small LRU behind a lock; each snapshot
is loaded once even when several threads ask for it at the same time.
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
import threading
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from . import format as fmt
from . import snapdir as sd
from .errors import IntegrityError, NotFoundError, SnapfsError, UsageError
from .format import Entry
from .hashing import hash_bytes, is_object_id
from .repo import Repo, get_bounded
from .store.base import Store

log = logging.getLogger(__name__)

SYNTH_TREE_MAGIC = b"SNAPDIR-SYNTH-TREE/1\n"
#: Linux's limit on a symlink target; a manifest SIZE above it cannot be a link's.
MAX_LINK_SIZE = 4095
#: Objects up to this size are fetched with one GET; larger ones in parallel ranges.
PART_SIZE = 8 << 20
#: get_chunk (cat, the mount's whole-object reads) refuses objects above this.
DEFAULT_MAX_OBJECT = 1 << 30
MAX_OBJECT_ENV = "SNAPFS_SNAPDIR_MAX_OBJECT"
_STAT_JOBS = 16
_LIST_MIN_STATS = 256
_LIST_MAX_KEYS = 5_000_000
_LOADED_SNAPSHOTS = 8

_SYNTH_ENTRY = struct.Struct(">BBHQ")


def max_object_bytes() -> int:
    """The whole-object limit: ``$SNAPFS_SNAPDIR_MAX_OBJECT`` (bytes) or 1 GiB."""
    raw = os.environ.get(MAX_OBJECT_ENV)
    if raw:
        try:
            return int(raw)
        except ValueError:
            log.warning("ignoring %s=%r: not a number of bytes", MAX_OBJECT_ENV, raw)
    return DEFAULT_MAX_OBJECT


def too_large_error(checksum: str, size: int, limit: int, where: str = "") -> SnapfsError:
    return SnapfsError(
        f"snapdir object {checksum}{where} is {size} bytes, more than the whole-object limit of {limit} "
        f"(${MAX_OBJECT_ENV}); snapdir stores files whole, so use `snapfs import` to copy the snapshot "
        "into a chunked snapfs store for lazy reads, or `snapfs pull` to restore it"
    )


def encode_synth_tree(entries: list[Entry]) -> bytes:
    """The private encoding whose BLAKE3 names a synthesized directory.

    Like a snapfs tree it covers every name, kind, exec bit, size and content
    (a file's snapdir checksum, a directory's synthesized tree ID), but sizes
    are u64 for files too, since one object may exceed the chunk limit.
    """
    parts = [SYNTH_TREE_MAGIC, struct.pack(">I", len(entries))]
    for entry in entries:
        flags = fmt.FLAG_EXEC if entry.executable else 0
        parts.append(_SYNTH_ENTRY.pack(ord(entry.kind), flags, len(entry.name), entry.size))
        parts.append(entry.name)
        if entry.is_dir:
            parts.append(bytes.fromhex(entry.tree_id) + struct.pack(">I", entry.subdirs))  # type: ignore[arg-type]
        else:
            parts.append(bytes.fromhex(entry.chunks[0][0]) if entry.chunks else b"")
    return b"".join(parts)


@dataclass
class SnapdirSnapshot:
    """One loaded snapdir snapshot: its manifest and its synthesized trees."""

    snapdir_id: str
    entries: list[sd.SnapdirEntry]
    sizes: dict[str, int]  # checksum -> object size, for every file
    trees: dict[str, list[Entry]] = field(default_factory=dict)  # tree ID -> entries; root under snapdir_id
    dir_trees: dict[str, str] = field(default_factory=dict)  # manifest dir path -> tree ID ("" = root)
    files: int = 0
    total_bytes: int = 0


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def hash_fd(fd: int, size: int) -> str:
    """BLAKE3 of the first ``size`` bytes of an open file (memory-mapped; threads for large ones)."""
    if size == 0:
        return hash_bytes(b"")
    with mmap.mmap(fd, size, prot=mmap.PROT_READ) as mapped:
        return hash_bytes(mapped)


def fetch_object_to_fd(
    store: Store, checksum: str, fd: int, *, size: int | None = None, jobs: int = 4
) -> int:
    """Write one whole snapdir object into ``fd`` (from offset 0) and verify it; return its size.

    Objects above PART_SIZE are fetched as parallel ranged GETs, then the file
    is hashed. Nothing the caller does with ``fd`` may count on its bytes until
    this returns: on IntegrityError the file holds unverified data.
    """
    key = sd.object_key(checksum)
    where = f"at {key} in {store.url}"
    try:
        if size is None:
            size = store.stat(key).size
        if size <= PART_SIZE:
            data = store.get(key)
            sd.verify_object(checksum, data)
            _pwrite_all(fd, data, 0)
            return len(data)
        parts = [(offset, min(PART_SIZE, size - offset)) for offset in range(0, size, PART_SIZE)]

        def fetch(part: tuple[int, int]) -> None:
            offset, length = part
            data = store.get(key, offset, length)
            if len(data) != length:
                raise IntegrityError(
                    f"snapdir object {checksum} {where}: {len(data)} bytes at offset {offset}, expected {length} "
                    "(truncated or not the size it should be)"
                )
            _pwrite_all(fd, data, offset)

        with ThreadPoolExecutor(
            max_workers=max(1, min(jobs, len(parts))), thread_name_prefix="snapdir-get"
        ) as pool:
            for _ in pool.map(fetch, parts):
                pass
    except NotFoundError as exc:
        raise NotFoundError(f"snapdir object {checksum}: missing {where}") from exc
    actual = hash_fd(fd, size)
    if actual != checksum:
        raise IntegrityError(f"snapdir object {checksum} {where} is corrupt: its bytes hash to {actual}")
    return size


class SnapdirRepo(Repo):
    """A read-only Repo over a snapdir store (see the module docstring)."""

    holds_packs = False

    def __init__(self, store: Store, *, max_object: int | None = None) -> None:
        super().__init__(store)
        self.max_object = max_object if max_object is not None else max_object_bytes()
        self._lock = threading.Lock()
        self._loaded: OrderedDict[str, SnapdirSnapshot] = OrderedDict()
        self._load_locks: dict[str, threading.Lock] = {}
        # Synthesized tree ID -> the snapshot that defines it, kept after the
        # snapshot leaves the LRU (one small pair per directory) so it can be reloaded.
        self._tree_owner: dict[str, str] = {}

    # --- snapshots ---------------------------------------------------------

    def load_snapshot(self, snapdir_id: str) -> SnapdirSnapshot:
        """Read, verify and parse a manifest, size its files and synthesize its trees (cached)."""
        with self._lock:
            loaded = self._loaded.get(snapdir_id)
            if loaded is not None:
                self._loaded.move_to_end(snapdir_id)
                return loaded
            load_lock = self._load_locks.setdefault(snapdir_id, threading.Lock())
        with load_lock:  # one loader per snapshot; the others wait and reuse its work
            try:
                with self._lock:
                    loaded = self._loaded.get(snapdir_id)
                if loaded is None:
                    loaded = self._load(snapdir_id)
                    with self._lock:
                        self._loaded[snapdir_id] = loaded
                        for tree_id in loaded.trees:
                            self._tree_owner[tree_id] = snapdir_id
                        while len(self._loaded) > _LOADED_SNAPSHOTS:
                            self._loaded.popitem(last=False)
            finally:
                # Also after a failure: a lookup of a made-up ID must leave nothing behind.
                with self._lock:
                    self._load_locks.pop(snapdir_id, None)
        return loaded

    def _object_sizes(self, entries: list[sd.SnapdirEntry]) -> dict[str, int]:
        # SIZEs above the longest link target, per content: the real lstat size of a regular file.
        claimed: dict[str, set[int]] = {}
        for entry in entries:
            if entry.kind == sd.KIND_FILE:
                sizes_seen = claimed.setdefault(entry.checksum, set())
                if entry.size > MAX_LINK_SIZE:
                    sizes_seen.add(entry.size)
        sizes: dict[str, int] = {}
        to_stat: set[str] = set()
        for checksum, sizes_seen in claimed.items():
            if checksum == sd.EMPTY_CHECKSUM:
                sizes[checksum] = 0
            elif len(sizes_seen) == 1:
                sizes[checksum] = next(iter(sizes_seen))
            else:
                # Only link-sized SIZEs (maybe followed symlinks), or lines that
                # disagree about one content (a hostile manifest): the object decides.
                to_stat.add(checksum)

        if "s3://" in self.url and len(to_stat) >= _LIST_MIN_STATS:
            sizes.update(self._sizes_by_listing(to_stat))
            to_stat -= sizes.keys()

        def stat_object(checksum: str) -> tuple[str, int | None]:
            try:
                return checksum, self.store.stat(sd.object_key(checksum)).size
            except NotFoundError:
                return checksum, None

        if to_stat:
            with ThreadPoolExecutor(
                max_workers=min(_STAT_JOBS, len(to_stat)), thread_name_prefix="snapdir-stat"
            ) as pool:
                for checksum, size in pool.map(stat_object, sorted(to_stat)):
                    if size is None:
                        # Reading it will fail with the object named; keep the listing usable.
                        log.warning("snapdir object %s is missing from %s", checksum, self.url)
                        size = next(e.size for e in entries if e.checksum == checksum)
                    sizes[checksum] = size
        return sizes

    def _sizes_by_listing(self, wanted: set[str]) -> dict[str, int]:
        """Sizes from LIST pages (1,000 keys a request) instead of a HEAD per object.

        Stops once every wanted object was seen, or after scanning about 250
        keys per wanted object (a store much larger than the snapshot), leaving
        the rest to HEADs. A snapshot of many tiny files on S3 would otherwise
        cost one HEAD each before its first ``ls``.
        """
        budget = min(len(wanted) * 250, _LIST_MAX_KEYS)
        found: dict[str, int] = {}
        for scanned, info in enumerate(self.store.list(sd.OBJECTS_PREFIX)):
            checksum = sd.checksum_from_key(info.key)
            if checksum in wanted:
                found[checksum] = info.size
                if len(found) == len(wanted):
                    break
            if scanned >= budget:
                break
        return found

    def _load(self, snapdir_id: str) -> SnapdirSnapshot:
        entries = sd.read_manifest(self.store, snapdir_id)  # verified against the ID, parsed strictly
        sizes = self._object_sizes(entries)
        snapshot = SnapdirSnapshot(snapdir_id, entries, sizes)
        children: dict[str, list[Entry]] = {e.path: [] for e in entries if e.kind == sd.KIND_DIR}
        # Manifest order lists a directory before everything below it, so the
        # reverse order finishes every directory's children before the directory.
        for entry in reversed(entries):
            name = entry.path.rpartition("/")[2].encode("utf-8")
            parent = entry.path.rpartition("/")[0]
            if entry.kind == sd.KIND_FILE:
                size = sizes[entry.checksum]
                chunks = ((entry.checksum, size),) if size else ()
                child = Entry(
                    name, fmt.KIND_FILE, size, bool(entry.permissions & 0o100), chunks, None, len(chunks)
                )
                snapshot.files += 1
                snapshot.total_bytes += size
                children[parent].append(child)
                continue
            kids = sorted(children.pop(entry.path), key=lambda e: e.name)
            for kid in kids:
                fmt.validate_name(kid.name)  # the parser already refused '/', NUL, '.', '..'
            tree_id = snapdir_id if not entry.path else hash_bytes(encode_synth_tree(kids))
            snapshot.trees[tree_id] = kids
            snapshot.dir_trees[entry.path] = tree_id
            if entry.path:
                total = sum(k.size for k in kids if not k.is_symlink)
                subdirs = sum(1 for k in kids if k.is_dir)
                children[parent].append(fmt.dir_entry(name, tree_id, total, subdirs))
        log.info(
            "loaded snapdir snapshot %s from %s: %d files, %d directories, %d bytes",
            snapdir_id,
            self.url,
            snapshot.files,
            len(snapshot.trees),
            snapshot.total_bytes,
        )
        return snapshot

    # --- Repo interface ------------------------------------------------------

    def get_tree(self, tree_id: str, what: str = "tree") -> list[Entry]:
        with self._lock:
            owner = self._tree_owner.get(tree_id)
        snapshot = self.load_snapshot(owner or tree_id)
        try:
            return snapshot.trees[tree_id]
        except KeyError:
            raise NotFoundError(
                f"{what}: no such directory in snapdir snapshot {snapshot.snapdir_id}"
            ) from None

    def get_object(self, object_id: str, what: str = "object", max_size: int | None = None) -> bytes:
        """One whole snapdir object, verified (refetched once on a mismatch, like Repo);
        with ``max_size``, no more than that is read (repo.get_bounded)."""
        key = sd.object_key(object_id)
        for attempt in (1, 2):
            try:
                data = get_bounded(self.store, key, max_size, f"snapdir object {object_id} in {self.url}")
            except NotFoundError as exc:
                raise NotFoundError(f"snapdir object {object_id}: missing at {key} in {self.url}") from exc
            actual = hash_bytes(data)
            if actual == object_id:
                return data
            log.warning(
                "snapdir object %s from %s hashes to %s (attempt %d)", object_id, self.url, actual, attempt
            )
        raise IntegrityError(
            f"snapdir object {object_id} in {self.url} is corrupt: its bytes hash to {actual}"
        )

    def get_object_or_ref(self, object_id: str, what: str = "object", max_size: int | None = None) -> bytes:
        """snapdir stores have no packs: always the object's bytes."""
        return self.get_object(object_id, what, max_size)

    def get_chunk(self, chunk_id: str, length: int | None = None) -> bytes:
        if length is not None and length > self.max_object:
            raise too_large_error(chunk_id, length, self.max_object)
        data = self.get_object(chunk_id, "chunk", length)
        if length is not None and len(data) != length:
            raise IntegrityError(
                f"snapdir object {chunk_id} is {len(data)} bytes, the manifest says {length}"
            )
        return data

    def has_object(self, object_id: str) -> bool:
        with self._lock:
            if object_id in self._tree_owner:
                return True
        if not is_object_id(object_id):
            return False
        return self.store.exists(sd.object_key(object_id))

    def is_snapshot(self, snapshot_id: str) -> bool:
        if not is_object_id(snapshot_id):
            return False
        return self.store.exists(sd.manifest_key(snapshot_id))

    def snapshot_ids(self, prefix: str = "") -> Iterator[str]:
        # Keys are sharded 3/3/3/rest: shard the prefix the same way to list only what can match.
        prefix = prefix.lower()
        sharded = "/".join(p for p in (prefix[:3], prefix[3:6], prefix[6:9], prefix[9:]) if p)
        if len(prefix) in (3, 6, 9):
            sharded += "/"
        for info in self.store.list(sd.MANIFESTS_PREFIX + sharded):
            snapshot_id = sd.snapshot_id_from_key(info.key)
            if snapshot_id is not None and snapshot_id.startswith(prefix):
                yield snapshot_id

    def ensure_config(self) -> None:
        raise UsageError(f"{self.url} is a snapdir store, which snapfs only reads")
