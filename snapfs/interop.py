"""snapdir interop operations: restore a snapdir snapshot, and import one into a snapfs store.

``pull`` restores a snapdir snapshot from a snapdir store. It is snapfs's pull
(same destination rules, resume state and temp-then-rename writes), except
that each file is one whole object: it is streamed straight into the file's
temp name with parallel ranged GETs and verified by hashing that file before
the rename, so memory stays bounded however large the object.

``import_snapshot`` copies a snapdir snapshot into a snapfs store, re-chunked
with snapfs's chunker so that mounts read it lazily. Each object is streamed
into an anonymous spool file, verified, cut into chunks, and only the chunks
the destination lacks are uploaded; then chunk lists, trees (leaves first) and
the snapshot marker, all under the destination's push lock (snapfs.locks), as
a push does. A file no larger than the chunker's minimum is a single chunk
whose ID is its snapdir checksum, so those are not even fetched when the
destination has them: a rerun after an interruption is cheap for small files.

Both are synchronous and use bounded thread pools.
"""

from __future__ import annotations

import logging
import mmap
import os
import stat
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from . import format as fmt
from . import snapdir as sd
from .chunking import MIN_SIZE, cut_points
from .errors import IntegrityError, SnapfsError
from .format import ChunkRef, Entry
from .hashing import hash_bytes
from .locks import PushLock
from .packs import PACK_MIN, plan_packs, put_objects
from .paths import user_cache_dir
from .repo import Repo
from .snapdir_repo import SnapdirRepo, SnapdirSnapshot, fetch_object_to_fd, hash_fd
from .snapshot import (
    TMP_PREFIX,
    PullResult,
    _prepare_dir,
    _remove_existing,
    _save_state,
    prepare_destination,
    walk,
)

log = logging.getLogger(__name__)

Progress = Callable[[int], None] | None

#: Parallel ranged GETs per large object (on top of the per-file workers).
_PARTS_PER_OBJECT = 4


def _jobs(repo: Repo, jobs: int | None) -> int:
    if jobs:
        return jobs
    return 32 if "s3://" in repo.url else 8


# --- pull ------------------------------------------------------------------------


def _file_is(path: bytes, size: int, checksum: str) -> bool:
    """True if ``path`` is a regular file (not a link) with exactly this content."""
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_size != size:
            return False
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return hash_fd(fd, size) == checksum
    finally:
        os.close(fd)


def pull(
    repo: SnapdirRepo,
    snapdir_id: str,
    dest: str,
    *,
    force: bool = False,
    jobs: int | None = None,
    progress: Progress = None,
) -> PullResult:
    """Restore a snapdir snapshot into ``dest``; every byte verified before the file is renamed into place.

    Paths come from the strict manifest parser (no ``..``, no absolute paths,
    no NUL), snapdir snapshots hold no symlinks, and existing symlinks in DEST
    are never followed, so nothing is written outside DEST.
    """
    repo.load_snapshot(snapdir_id)  # verify and parse the manifest before touching DEST
    dest_b = prepare_destination(dest, snapdir_id, force)

    result = PullResult(snapdir_id)
    lock = threading.Lock()
    files: list[tuple[bytes, Entry]] = []
    for rel, entry in walk(repo, snapdir_id):
        target = os.path.join(dest_b, rel)
        if entry.is_dir:
            _prepare_dir(target, force)
        else:
            files.append((rel, entry))
            result.total_bytes += entry.size
    result.files = len(files)

    def pull_file(item: tuple[bytes, Entry]) -> None:
        rel, entry = item
        target = os.path.join(dest_b, rel)
        mode = 0o755 if entry.executable else 0o644
        checksum = entry.chunks[0][0] if entry.chunks else sd.EMPTY_CHECKSUM
        if _file_is(target, entry.size, checksum):
            os.chmod(target, mode)
            with lock:
                result.skipped_files += 1
            if progress:
                progress(entry.size)
            return
        directory = os.path.dirname(target)
        tmp = os.path.join(directory, TMP_PREFIX.encode() + os.urandom(6).hex().encode())
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            if entry.size:
                size = fetch_object_to_fd(repo.store, checksum, fd, size=entry.size, jobs=_PARTS_PER_OBJECT)
                if size != entry.size:  # cannot happen unless the object changed under us
                    raise IntegrityError(f"snapdir object {checksum} is {size} bytes, expected {entry.size}")
            os.fsync(fd)
            os.fchmod(fd, mode)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        os.close(fd)
        _remove_existing(target)
        os.rename(tmp, target)
        with lock:
            result.fetched_files += 1
            result.fetched_bytes += entry.size
        if progress:
            progress(entry.size)

    with ThreadPoolExecutor(max_workers=_jobs(repo, jobs), thread_name_prefix="snapdir-pull") as pool:
        for _ in pool.map(pull_file, files):
            pass
    _save_state(dest, snapdir_id, complete=True)
    return result


# --- import ------------------------------------------------------------------------


@dataclass
class ImportResult:
    snapdir_id: str
    snapshot_id: str = ""
    files: int = 0
    dirs: int = 0
    total_bytes: int = 0
    fetched_objects: int = 0
    fetched_bytes: int = 0
    uploaded_objects: int = 0
    uploaded_bytes: int = 0
    present_objects: int = 0
    present_bytes: int = 0
    record: str | None = None
    name: str | None = None

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def spool_dir() -> str:
    """Where import streams objects before chunking: ``$SNAPFS_SPOOL_DIR`` or the user cache.

    Not /tmp by default: it is often a small tmpfs, and objects can be many GiB.
    """
    path = os.environ.get("SNAPFS_SPOOL_DIR") or os.path.join(user_cache_dir(), "spool")
    os.makedirs(path, exist_ok=True)
    return path


class _Importer:
    """One import's state; its methods run in worker threads."""

    def __init__(self, source: SnapdirRepo, dest: Repo, result: ImportResult, progress: Progress) -> None:
        self.source = source
        self.dest = dest
        self.result = result
        self.progress = progress
        self.lock = threading.Lock()
        self.spool = spool_dir()

    def _count(self, sent: bool, size: int) -> None:
        with self.lock:
            if sent:
                self.result.uploaded_objects += 1
                self.result.uploaded_bytes += size
            else:
                self.result.present_objects += 1
                self.result.present_bytes += size

    def _put(self, chunk_id: str, data: bytes | memoryview) -> None:
        if self.dest.has_object(chunk_id):
            self._count(False, len(data))
        else:
            self._count(self.dest.put_object(bytes(data), chunk_id), len(data))

    def skip(self, _checksum: str, size: int) -> None:
        """A small object the destination has: counted, not uploaded."""
        self._count(False, size)
        if self.progress:
            self.progress(size)

    def pack_objects(self, batch: list[tuple[str, int]]) -> None:
        """Small objects the destination lacks, as one pack."""
        objects = [(checksum, self.source.get_chunk(checksum, size)) for checksum, size in batch]
        with self.lock:
            self.result.fetched_objects += len(objects)
            self.result.fetched_bytes += sum(size for _, size in batch)
        put_objects(self.dest, objects)
        for _checksum, data in objects:
            self._count(True, len(data))
        if self.progress:
            self.progress(sum(size for _, size in batch))

    def chunk_object(self, item: tuple[str, int]) -> tuple[str, list[ChunkRef]]:
        """Fetch one object, verify it, chunk it and upload the missing chunks."""
        checksum, size = item
        if size == 0:
            return checksum, []
        if size <= MIN_SIZE:
            # One chunk, the whole file: its chunk ID is the snapdir checksum.
            if self.dest.has_object(checksum):
                self._count(False, size)
            else:
                data = self.source.get_chunk(checksum, size)
                with self.lock:
                    self.result.fetched_objects += 1
                    self.result.fetched_bytes += size
                self._count(self.dest.put_object(data, checksum), size)
            if self.progress:
                self.progress(size)
            return checksum, [(checksum, size)]
        with tempfile.TemporaryFile(dir=self.spool) as spool:
            fd = spool.fileno()
            fetched = fetch_object_to_fd(self.source.store, checksum, fd, size=size, jobs=_PARTS_PER_OBJECT)
            if fetched != size:
                raise IntegrityError(f"snapdir object {checksum} is {fetched} bytes, expected {size}")
            with self.lock:
                self.result.fetched_objects += 1
                self.result.fetched_bytes += size
            refs: list[ChunkRef] = []
            with mmap.mmap(fd, size, prot=mmap.PROT_READ) as mapped:
                view = memoryview(mapped)
                try:
                    for offset, length in cut_points(view):
                        piece = view[offset : offset + length]
                        chunk_id = hash_bytes(piece)
                        self._put(chunk_id, piece)
                        refs.append((chunk_id, length))
                        del piece
                finally:
                    view.release()
        if self.progress:
            self.progress(size)
        return checksum, refs


def import_snapshot(
    source: SnapdirRepo,
    dest: Repo,
    snapdir_id: str,
    *,
    jobs: int | None = None,
    progress: Progress = None,
) -> ImportResult:
    """Copy a snapdir snapshot into a snapfs store (objects and marker; no record).

    Returns the new snapfs snapshot ID in ``snapshot_id``. Call
    ``records.create`` afterwards to name it and note the snapdir ID.
    """
    snapshot = source.load_snapshot(snapdir_id)
    result = ImportResult(snapdir_id, files=snapshot.files, total_bytes=snapshot.total_bytes)
    result.dirs = len(snapshot.dir_trees)
    objects = sorted(snapshot.sizes.items())
    for _attempt in (1, 2):
        with PushLock(dest.store) as lock:
            dest.ensure_config()
            importer = _Importer(source, dest, result, progress)
            with ThreadPoolExecutor(
                max_workers=_jobs(dest, jobs), thread_name_prefix="snapfs-import"
            ) as pool:
                refs: dict[str, list[ChunkRef]] = {}
                rest = objects
                if dest.packs_small_objects:
                    # In manifest order, so that a directory's small files share packs.
                    order = dict.fromkeys(e.checksum for e in snapshot.entries if e.kind == sd.KIND_FILE)
                    small = {c: snapshot.sizes[c] for c in order if PACK_MIN <= snapshot.sizes[c] <= MIN_SIZE}
                    # One chunk each, the whole file, present or not; only the missing are packed.
                    refs.update((c, [(c, size)]) for c, size in small.items())
                    batches, _ = plan_packs(small, dest.has_object, pool, importer.skip)
                    for _ in pool.map(importer.pack_objects, [[(c, small[c]) for c in b] for b in batches]):
                        pass
                    rest = [(c, size) for c, size in objects if c not in small]
                refs.update(pool.map(importer.chunk_object, rest))
                root_id = _upload_trees(dest, snapshot, refs, importer, pool)
            result.snapshot_id = root_id
            if lock.held():
                dest.mark_snapshot(root_id)
                log.info("imported snapdir snapshot %s as snapfs snapshot %s", snapdir_id, root_id)
                return result
        log.warning("push lock on %s lapsed during the import; checking the upload again", dest.url)
        result = ImportResult(
            snapdir_id, files=snapshot.files, total_bytes=snapshot.total_bytes, dirs=result.dirs
        )
    raise SnapfsError(f"push lock on {dest.url} lapsed twice; nothing was marked, import again")


def _upload_trees(
    dest: Repo,
    snapshot: SnapdirSnapshot,
    refs: dict[str, list[ChunkRef]],
    importer: _Importer,
    pool: ThreadPoolExecutor,
) -> str:
    """Encode the snapfs trees of the manifest and upload them bottom-up (chunk lists first)."""
    children: dict[str, list[Entry]] = {path: [] for path in snapshot.dir_trees}
    trees: list[tuple[int, str, bytes]] = []  # (height, tree_id, encoding)
    heights: dict[str, int] = {}
    chunklists: dict[str, bytes] = {}
    root_id = ""
    for entry in reversed(snapshot.entries):
        name = entry.path.rpartition("/")[2].encode("utf-8")
        parent = entry.path.rpartition("/")[0]
        if entry.kind == sd.KIND_FILE:
            chunks = refs[entry.checksum]
            size = sum(length for _, length in chunks)
            file_entry, blob = fmt.file_entry(name, size, chunks, executable=bool(entry.permissions & 0o100))
            if blob is not None:
                chunklists[file_entry.chunklist_id] = blob  # type: ignore[index]
            children[parent].append(file_entry)
            continue
        kids = children.pop(entry.path)
        blob = fmt.encode_tree(kids)
        tree_id = hash_bytes(blob)
        height = 1 + max((heights[k.tree_id] for k in kids if k.is_dir), default=0)  # type: ignore[index]
        heights[tree_id] = height
        trees.append((height, tree_id, blob))
        if entry.path:
            total = sum(k.size for k in kids if not k.is_symlink)
            children[parent].append(fmt.dir_entry(name, tree_id, total, sum(1 for k in kids if k.is_dir)))
        else:
            root_id = tree_id

    def put_blob(item: tuple[str, bytes]) -> None:
        object_id, blob = item
        importer._count(dest.put_object(blob, object_id), len(blob))

    for _ in pool.map(put_blob, chunklists.items()):
        pass
    # Leaves first: a tree is written only after every tree below it.
    unique: dict[str, tuple[int, bytes]] = {tid: (h, b) for h, tid, b in trees}
    for level in sorted({h for h, _ in unique.values()}):
        batch = [(tid, b) for tid, (h, b) in unique.items() if h == level]
        for _ in pool.map(put_blob, batch):
            pass
    return root_id
