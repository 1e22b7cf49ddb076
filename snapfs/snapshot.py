"""Snapshot operations on a store: push, pull, verify, diff, ls, cat, manifest, fsck.

All functions are synchronous and use bounded thread pools for I/O; they are
called from the CLI and the Python API. Progress is reported through optional
callbacks so the CLI decides how to draw it.

Ordering guarantees:
- push writes bottom-up (chunks, chunk lists, trees from the leaves up, then
  the snapshot marker), so a visible snapshot never references a missing object;
- pull verifies every object before writing a byte, writes each file to a temp
  name and renames it into place, and never writes outside DEST.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from . import format as fmt
from .errors import DestinationError, IntegrityError, NotFoundError, SnapfsError, UsageError
from .format import ChunkRef, Entry
from .hashing import hash_bytes, is_object_id
from .links import LinkResolution
from .locks import PushLock
from .packs import PackFetcher, plan_packs, put_objects
from .paths import pull_state_dir
from .repo import Repo, content_id, get_bounded
from .scan import ScanResult, scan

log = logging.getLogger(__name__)

Progress = Callable[[int], None] | None
TMP_PREFIX = ".snapfs-tmp-"


def _jobs_for(repo: Repo, jobs: int | None) -> int:
    if jobs:
        return jobs
    return 32 if repo.url.startswith("s3://") else 8


# --- push ------------------------------------------------------------------


@dataclass
class PushResult:
    snapshot_id: str
    files: int = 0
    dirs: int = 0
    total_bytes: int = 0
    uploaded_bytes: int = 0
    uploaded_objects: int = 0
    present_bytes: int = 0
    present_objects: int = 0
    packs: int = 0  # packs uploaded (format.PackRef): the small objects above travel in these
    skipped_special: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class _Counter:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.uploaded_bytes = self.uploaded_objects = self.present_bytes = self.present_objects = 0
        self.packs = 0

    def add_pack(self) -> None:
        with self.lock:
            self.packs += 1

    def add(self, sent: bool, size: int) -> None:
        with self.lock:
            if sent:
                self.uploaded_bytes += size
                self.uploaded_objects += 1
            else:
                self.present_bytes += size
                self.present_objects += 1


def _read_chunk(path: bytes, offset: int, length: int, chunk_id: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        data = os.pread(fd, length, offset)
    finally:
        os.close(fd)
    if len(data) != length or hash_bytes(data) != chunk_id:
        raise SnapfsError(f"{os.fsdecode(path)} changed while it was pushed; push again")
    return data


def _upload_objects(
    repo: Repo,
    scanned: ScanResult,
    *,
    jobs: int | None = None,
    progress: Progress = None,
    pack: bool | None = None,
) -> PushResult:
    """Upload what the store lacks of a scanned tree, bottom-up (everything but the marker)."""
    result = PushResult(scanned.root_id, scanned.files, scanned.dirs, scanned.total_bytes)
    result.skipped_special = scanned.skipped
    counter = _Counter()
    repo.ensure_config()
    with ThreadPoolExecutor(max_workers=_jobs_for(repo, jobs), thread_name_prefix="snapfs-push") as pool:
        # 1. Which trees are missing? A tree present in the store implies its whole
        #    subtree is (writes are bottom-up), so present subtrees are skipped unvisited.
        missing: set[str] = set()
        level = [scanned.root_id]
        seen: set[str] = set(level)
        while level:
            present = list(pool.map(repo.has_object, level))
            next_level: list[str] = []
            for tree_id, is_present in zip(level, present, strict=True):
                if is_present:
                    counter.add(False, len(scanned.trees[tree_id]))
                    continue
                missing.add(tree_id)
                for entry in fmt.decode_tree(scanned.trees[tree_id]):
                    if entry.is_dir and entry.tree_id not in seen:
                        seen.add(entry.tree_id)  # type: ignore[arg-type]
                        next_level.append(entry.tree_id)  # type: ignore[arg-type]
            level = next_level

        # 2. Chunks of every file in a missing tree, each unique chunk once.
        chunk_tasks: dict[str, tuple[bytes, int, int]] = {}
        chunklists: set[str] = set()
        # In scan order (post-order), not set order: a directory's files then
        # sit side by side in the upload, and so in the same packs.
        for tree_id in (t for t in scanned.trees if t in missing):
            base = scanned.tree_paths[tree_id]
            for entry in fmt.decode_tree(scanned.trees[tree_id]):
                if not entry.is_file:
                    continue
                path = os.path.join(base, entry.name)
                chunks = entry.chunks
                if entry.chunklist_id is not None:
                    chunklists.add(entry.chunklist_id)
                    chunks = fmt.decode_chunklist(
                        scanned.chunklists[entry.chunklist_id], entry.chunk_count, entry.size
                    )
                offset = 0
                for chunk_id, length in chunks:
                    chunk_tasks.setdefault(chunk_id, (path, offset, length))
                    offset += length

        # One LIST instead of a HEAD per object when that is cheaper (a first push
        # to S3 asked 2 HEADs and a conditional PUT per chunk: 24 s for 237 MB).
        listed = repo.list_object_ids(len(chunk_tasks) + len(chunklists))

        def present(object_id: str) -> bool:
            return object_id in listed if listed is not None else repo.has_object(object_id)

        def put_if_missing(object_id: str, size: int, read: Callable[[], bytes]) -> None:
            if present(object_id):
                counter.add(False, size)
            else:
                repo.put_new_object(read(), object_id)
                counter.add(True, size)

        def put_chunk(item: tuple[str, tuple[bytes, int, int]]) -> None:
            chunk_id, (path, offset, length) = item
            put_if_missing(chunk_id, length, lambda: _read_chunk(path, offset, length, chunk_id))
            if progress:
                progress(length)

        packed: list[list[tuple[str, tuple[bytes, int, int]]]] = []
        if pack if pack is not None else repo.packs_small_objects:

            def skip(_chunk_id: str, length: int) -> None:
                counter.add(False, length)
                if progress:
                    progress(length)

            lengths = {chunk_id: task[2] for chunk_id, task in chunk_tasks.items()}
            batches, rest = plan_packs(lengths, present, pool, skip)
            packed = [[(chunk_id, chunk_tasks[chunk_id]) for chunk_id in batch] for batch in batches]
            chunk_tasks = {chunk_id: chunk_tasks[chunk_id] for chunk_id in rest}

        def put_batch(batch: list[tuple[str, tuple[bytes, int, int]]]) -> None:
            """Upload small chunks known to be missing: a pack (or one object)."""
            objects = [(chunk_id, _read_chunk(*task, chunk_id)) for chunk_id, task in batch]
            if put_objects(repo, objects):
                counter.add_pack()
            for _chunk_id, data in objects:
                counter.add(True, len(data))
            if progress:
                progress(sum(len(data) for _, data in objects))

        # Packs first: each is one task of many objects, and the big chunks after
        # them keep every connection busy to the end.
        for _ in pool.map(put_batch, packed):
            pass
        for _ in pool.map(put_chunk, chunk_tasks.items()):
            pass

        def put_chunklist(chunklist_id: str) -> None:
            blob = scanned.chunklists[chunklist_id]
            put_if_missing(chunklist_id, len(blob), lambda: blob)

        for _ in pool.map(put_chunklist, chunklists):
            pass

        # 3. Trees from the leaves up: scanned.trees is in post-order, so a tree's
        #    height is known once its children's are.
        height: dict[str, int] = {}
        for tree_id, blob in scanned.trees.items():
            if tree_id in missing:
                children = [e.tree_id for e in fmt.decode_tree(blob) if e.is_dir]
                height[tree_id] = 1 + max((height.get(c, 0) for c in children), default=0)
        for h in sorted(set(height.values())):
            # Known missing (step 1 asked), so no second HEAD before the PUT.
            batch = [t for t, th in height.items() if th == h]
            for _ in pool.map(lambda t: repo.put_new_object(scanned.trees[t], t), batch):
                pass
            for t in batch:
                counter.add(True, len(scanned.trees[t]))

    result.uploaded_bytes = counter.uploaded_bytes
    result.uploaded_objects = counter.uploaded_objects
    result.present_bytes = counter.present_bytes
    result.present_objects = counter.present_objects
    result.packs = counter.packs
    return result


def upload(
    repo: Repo,
    scanned: ScanResult,
    *,
    jobs: int | None = None,
    progress: Progress = None,
    pack: bool | None = None,
) -> PushResult:
    """Upload what the store lacks of a scanned tree, bottom-up, then mark the snapshot.

    Runs under a push lock (snapfs.locks): a present object that this push skips
    cannot be deleted by a concurrent gc before the marker makes it reachable.
    If the lock lapsed (this process stalled past the stale timeout), the upload
    is checked again under a new lock before anything is marked. ``pack``:
    whether to pack small objects (None: the store's default, Repo.packs_small_objects).
    """
    for _attempt in (1, 2):
        with PushLock(repo.store) as lock:
            result = _upload_objects(repo, scanned, jobs=jobs, progress=progress, pack=pack)
            if lock.held():
                # 4. Only now can anyone see it.
                repo.mark_snapshot(scanned.root_id)
                return result
        log.warning("push lock on %s lapsed during the upload; checking the upload again", repo.url)
    raise SnapfsError(f"push lock on {repo.url} lapsed twice; nothing was marked, push again")


def push(
    path: str,
    repo: Repo,
    *,
    jobs: int | None = None,
    scan_progress: Progress = None,
    upload_progress: Progress = None,
    pack: bool | None = None,
) -> PushResult:
    scanned = scan(path, progress=scan_progress)
    return upload(repo, scanned, jobs=jobs, progress=upload_progress, pack=pack)


# --- walking ---------------------------------------------------------------


def walk(repo: Repo, tree_id: str, prefix: bytes = b"") -> Iterator[tuple[bytes, Entry]]:
    """Every entry below a tree, depth-first in name order, with its path."""
    stack: list[tuple[bytes, str]] = [(prefix, tree_id)]
    while stack:
        base, tid = stack.pop()
        entries = repo.get_tree(tid, f"tree {tid} (at /{os.fsdecode(base)})")
        children = []
        for entry in entries:
            path = base + b"/" + entry.name if base else entry.name
            yield path, entry
            if entry.is_dir:
                children.append((path, entry.tree_id))
        stack.extend(reversed(children))


def display_path(path: bytes) -> str:
    return "/".join(fmt.display_name(p) for p in path.split(b"/"))


# --- pull ------------------------------------------------------------------


@dataclass
class PullResult:
    snapshot_id: str
    files: int = 0
    fetched_files: int = 0
    skipped_files: int = 0
    fetched_bytes: int = 0
    total_bytes: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _state_path(dest: str) -> str:
    key = hashlib.sha256(os.path.realpath(dest).encode("utf-8", "surrogateescape")).hexdigest()[:32]
    return os.path.join(pull_state_dir(), key + ".json")


def _load_state(dest: str) -> dict:
    try:
        with open(_state_path(dest)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _save_state(dest: str, snapshot_id: str, complete: bool) -> None:
    path = _state_path(dest)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"dest": os.path.realpath(dest), "snapshot": snapshot_id, "complete": complete}, f)
    os.replace(tmp, path)


def check_symlink_target(path: bytes, target: bytes, lookup: Callable[[bytes], Entry | None]) -> None:
    """Refuse a symlink that is absolute or resolves outside the snapshot,
    following the snapshot's own symlinks on the way (see snapfs.links)."""
    if target.startswith(b"/"):
        raise DestinationError(f"{display_path(path)}: symlink target {fmt.display_name(target)} is absolute")
    resolution = LinkResolution(path, target)
    while (needed := resolution.needs()) is not None:
        resolution.feed(lookup(needed))
    if resolution.escapes:
        raise DestinationError(
            f"{display_path(path)}: symlink target {fmt.display_name(target)} escapes the snapshot"
        )


def _file_matches(path: bytes, size: int, chunks: tuple[ChunkRef, ...]) -> bool:
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_size != size:
            return False
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        offset = 0
        for chunk_id, length in chunks:
            if hash_bytes(os.pread(fd, length, offset)) != chunk_id:
                return False
            offset += length
        return True
    finally:
        os.close(fd)


def _prepare_dir(path: bytes, force: bool) -> None:
    """Make ``path`` a real directory (never a symlink to one)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        os.mkdir(path, 0o755)
        return
    if stat.S_ISDIR(st.st_mode):
        return
    if not force:
        raise DestinationError(f"{os.fsdecode(path)} exists and is not a directory (use --force)")
    os.unlink(path)
    os.mkdir(path, 0o755)


def _remove_existing(path: bytes) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        raise DestinationError(
            f"{os.fsdecode(path)} is a directory in the destination but not in the snapshot"
        )
    os.unlink(path)


def _sweep_temp(dest: bytes) -> None:
    for dirpath, _dirnames, filenames in os.walk(dest):
        for name in filenames:
            if name.startswith(TMP_PREFIX.encode()):
                os.unlink(os.path.join(dirpath, name))


def prepare_destination(dest: str, snapshot_id: str, force: bool) -> bytes:
    """Check and create a pull's DEST, sweep a failed pull's temp files and mark
    the pull started; returns DEST as an absolute bytes path.

    DEST must be missing, empty, an earlier (possibly interrupted) pull of the
    same snapshot, or ``force`` must be given; a symlink is never followed.
    """
    dest_b = os.fsencode(os.path.abspath(dest))
    state = _load_state(dest)
    if os.path.lexists(dest_b):
        if not os.path.isdir(dest_b) or os.path.islink(dest_b):
            raise DestinationError(f"{dest}: exists and is not a directory")
        if os.listdir(dest_b) and not force and state.get("snapshot") != snapshot_id:
            raise DestinationError(
                f"{dest}: not empty and not an earlier pull of {snapshot_id[:12]} (use --force to overwrite)"
            )
    else:
        os.makedirs(dest_b, 0o755)
    _sweep_temp(dest_b)
    _save_state(dest, snapshot_id, complete=False)
    return dest_b


#: Members of packs fetched by a pull that it has not written yet (PackFetcher).
PULL_KEEP_BYTES = 128 << 20


def pull(
    repo: Repo,
    snapshot_id: str,
    dest: str,
    *,
    force: bool = False,
    unsafe_symlinks: bool = False,
    jobs: int | None = None,
    progress: Progress = None,
) -> PullResult:
    dest_b = prepare_destination(dest, snapshot_id, force)

    result = PullResult(snapshot_id)
    n = _jobs_for(repo, jobs)
    lock = threading.Lock()
    # Packed small files come a pack at a time: the pack's other members are
    # the files this walk reaches next.
    get_chunk = (
        PackFetcher(repo, keep_bytes=PULL_KEEP_BYTES).get_chunk if repo.holds_packs else repo.get_chunk
    )
    with (
        ThreadPoolExecutor(max_workers=n, thread_name_prefix="snapfs-pull") as file_pool,
        ThreadPoolExecutor(max_workers=n, thread_name_prefix="snapfs-fetch") as chunk_pool,
    ):

        def pull_file(item: tuple[bytes, Entry]) -> None:
            rel, entry = item
            target = os.path.join(dest_b, rel)
            chunks = repo.file_chunks(entry)
            if _file_matches(target, entry.size, chunks):
                os.chmod(target, 0o755 if entry.executable else 0o644)
                with lock:
                    result.skipped_files += 1
                if progress:
                    progress(entry.size)
                return
            directory, name = os.path.split(target)
            tmp = os.path.join(directory, TMP_PREFIX.encode() + os.urandom(6).hex().encode())
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                # Each distinct chunk is fetched once, however often the file repeats it
                # (zero-filled regions do). Every fetch is awaited before the fd is
                # closed, even after a failure, so no late write lands in a reused fd.
                places: dict[str, list[int]] = {}
                offset = 0
                for chunk_id, length in chunks:
                    places.setdefault(chunk_id, []).append(offset)
                    offset += length
                sizes = dict(chunks)

                def fetch(chunk_id: str) -> None:
                    data = get_chunk(chunk_id, sizes[chunk_id])  # verified before any byte is written
                    for at in places[chunk_id]:
                        os.pwrite(fd, data, at)
                    if progress:
                        progress(len(data) * len(places[chunk_id]))

                if len(places) == 1:
                    fetch(next(iter(places)))  # a small file: no hand-off to the chunk pool
                else:
                    futures = [chunk_pool.submit(fetch, chunk_id) for chunk_id in places]
                    wait(futures)
                    for future in futures:
                        future.result()
                os.fsync(fd)
                os.fchmod(fd, 0o755 if entry.executable else 0o644)
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

        files: list[tuple[bytes, Entry]] = []
        links: list[tuple[bytes, Entry]] = []
        # Directories and symlinks by path, to follow symlink chains inside the snapshot.
        structure: dict[bytes, Entry] = {}
        for rel, entry in walk(repo, snapshot_id):
            if entry.is_dir:
                _prepare_dir(os.path.join(dest_b, rel), force)
                structure[rel] = entry
            elif entry.is_symlink:
                links.append((rel, entry))
                structure[rel] = entry
            else:
                files.append((rel, entry))
                result.total_bytes += entry.size
        if not unsafe_symlinks:
            for rel, entry in links:
                check_symlink_target(rel, entry.target, structure.get)  # type: ignore[arg-type]
        result.files = len(files)
        for _ in file_pool.map(pull_file, files):
            pass
        # Symlinks last: nothing is ever written through one.
        for rel, entry in links:
            target = os.path.join(dest_b, rel)
            try:
                if os.readlink(target) == entry.target:
                    continue
            except OSError:
                pass
            _remove_existing(target)
            os.symlink(entry.target, target)  # type: ignore[arg-type]
    _save_state(dest, snapshot_id, complete=True)
    return result


# --- diff and verify --------------------------------------------------------


@dataclass(frozen=True)
class Change:
    status: str  # "A" added, "D" deleted, "M" modified
    path: bytes
    old: Entry | None
    new: Entry | None

    def as_dict(self) -> dict:
        def side(e: Entry | None) -> dict | None:
            if e is None:
                return None
            out = {"kind": e.kind, "size": e.size, "executable": e.executable}
            if e.is_symlink:
                out["target"] = fmt.display_name(e.target)  # type: ignore[arg-type]
            else:
                out["content"] = content_id(e)
            return out

        return {
            "status": self.status,
            "path": display_path(self.path),
            "old": side(self.old),
            "new": side(self.new),
        }


TreeGetter = Callable[[str], list[Entry]]


def _same(a: Entry, b: Entry) -> bool:
    if a.kind != b.kind:
        return False
    if a.is_dir:
        return a.tree_id == b.tree_id
    if a.is_symlink:
        return a.target == b.target
    return a.size == b.size and a.executable == b.executable and content_id(a) == content_id(b)


def diff_trees(get_a: TreeGetter, root_a: str, get_b: TreeGetter, root_b: str) -> Iterator[Change]:
    """Changes from tree A to tree B. Identical subtrees are skipped without being fetched."""
    stack = [(b"", root_a, root_b)]
    while stack:
        base, ta, tb = stack.pop()
        if ta == tb:
            continue
        a = {e.name: e for e in get_a(ta)}
        b = {e.name: e for e in get_b(tb)}
        deeper = []
        for name in sorted(a.keys() | b.keys()):
            path = base + b"/" + name if base else name
            ea, eb = a.get(name), b.get(name)
            if ea is None:
                yield Change("A", path, None, eb)
            elif eb is None:
                yield Change("D", path, ea, None)
            elif ea.is_dir and eb.is_dir:
                if ea.tree_id != eb.tree_id:
                    deeper.append((path, ea.tree_id, eb.tree_id))
            elif not _same(ea, eb):
                yield Change("M", path, ea, eb)
        stack.extend(reversed(deeper))


def diff(repo: Repo, id_a: str, id_b: str) -> Iterator[Change]:
    return diff_trees(repo.get_tree, id_a, repo.get_tree, id_b)


def verify(repo: Repo, path: str, snapshot_id: str, progress: Progress = None) -> list[Change]:
    """Differences from the snapshot to the local tree at ``path`` (empty: identical)."""
    local = scan(path, progress=progress)
    if local.root_id == snapshot_id:
        return []

    def local_tree(tree_id: str) -> list[Entry]:
        return fmt.decode_tree(local.trees[tree_id])

    return list(diff_trees(repo.get_tree, snapshot_id, local_tree, local.root_id))


# --- listing ---------------------------------------------------------------


def mode_string(entry: Entry) -> str:
    if entry.is_dir:
        return "drwxr-xr-x"
    if entry.is_symlink:
        return "lrwxrwxrwx"
    return "-rwxr-xr-x" if entry.executable else "-rw-r--r--"


def manifest_line(path: bytes, entry: Entry) -> str:
    """One line of ``snapfs manifest``: kind, mode, size, content, path."""
    mode = "755" if (entry.is_dir or entry.executable) else ("777" if entry.is_symlink else "644")
    if entry.is_symlink:
        content = "-> " + fmt.display_name(entry.target)  # type: ignore[arg-type]
        return f"{entry.kind} {mode} {entry.size:>12} {display_path(path)} {content}"
    return f"{entry.kind} {mode} {entry.size:>12} {content_id(entry)} {display_path(path)}"


def list_dir(repo: Repo, snapshot_id: str, path: str = "") -> tuple[Entry | None, list[Entry]]:
    """The entry at ``path`` and, if it is a directory, its children."""
    entry = repo.lookup_path(snapshot_id, path)
    if entry is None:
        return None, repo.get_tree(snapshot_id)
    if entry.is_dir:
        return entry, repo.get_tree(entry.tree_id)  # type: ignore[arg-type]
    return entry, []


def cat(repo: Repo, snapshot_id: str, path: str, out: Callable[[bytes], object]) -> int:
    entry = repo.lookup_path(snapshot_id, path)
    if entry is None or entry.is_dir:
        raise UsageError(f"{path or '/'}: is a directory")
    if entry.is_symlink:
        raise UsageError(f"{path}: is a symlink to {fmt.display_name(entry.target)}")  # type: ignore[arg-type]
    for chunk_id, length in repo.file_chunks(entry):
        out(repo.get_chunk(chunk_id, length))
    return entry.size


# --- fsck ------------------------------------------------------------------


@dataclass
class FsckReport:
    objects: int = 0
    bytes: int = 0
    snapshots: int = 0
    corrupt: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    malformed: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.corrupt or self.missing or self.malformed)

    def as_dict(self) -> dict:
        return {**self.__dict__, "ok": self.ok}


def fsck(
    repo: Repo, *, read_data: bool = True, jobs: int | None = None, progress: Progress = None
) -> FsckReport:
    """Check every object's hash and every snapshot's references."""
    report = FsckReport()
    present: set[str] = set()
    keys = []
    for info in repo.store.list("objects/"):
        parts = info.key.split("/")
        object_id = parts[1] + parts[2] if len(parts) == 3 else ""
        if len(parts) != 3 or not is_object_id(object_id):
            report.malformed.append(f"{info.key}: unexpected key in objects/")
            continue
        present.add(object_id)
        keys.append((object_id, info.size))
    report.objects = len(keys)
    report.bytes = sum(size for _, size in keys)
    lock = threading.Lock()

    if read_data:
        # Packed objects (format.PackRef): each pack is read once, whole, and
        # each reference's range of it must hash to the reference's object ID.
        packed: dict[str, list[tuple[str, fmt.PackRef]]] = {}

        def damaged(object_id: str, how: str = "") -> None:
            with lock:
                report.corrupt.append(object_id + how)
            present.discard(object_id)

        def check(item: tuple[str, int]) -> None:
            object_id, size = item
            try:
                data = repo.store.get(fmt.object_key(object_id))
            except NotFoundError:
                return  # deleted since listing (gc); not damage
            if hash_bytes(data) != object_id:
                try:
                    ref = fmt.decode_pack_ref(data)
                except fmt.FormatError as exc:
                    damaged(object_id, f" ({exc})")
                else:
                    if ref is None:
                        damaged(object_id)
                    else:
                        with lock:
                            packed.setdefault(ref.pack_id, []).append((object_id, ref))
            if progress:
                progress(size)

        def check_pack(item: tuple[str, list[tuple[str, fmt.PackRef]]]) -> None:
            pack_id, refs = item
            try:
                blob = get_bounded(repo.store, fmt.pack_key(pack_id), fmt.MAX_PACK_SIZE, f"pack {pack_id}")
            except NotFoundError:
                for object_id, _ref in refs:
                    present.discard(object_id)  # the walk below reports each as missing
                return
            except IntegrityError as exc:
                blob = b""
                log.warning("%s", exc)
            view = memoryview(blob)
            for object_id, ref in refs:
                data = view[ref.offset : ref.offset + ref.length]
                if len(data) != ref.length or hash_bytes(data) != object_id:
                    damaged(object_id, f" (in pack {pack_id})")
            with lock:
                report.bytes += len(blob)

        with ThreadPoolExecutor(max_workers=_jobs_for(repo, jobs), thread_name_prefix="snapfs-fsck") as pool:
            for _ in pool.map(check, keys):
                pass
            for _ in pool.map(check_pack, packed.items()):
                pass

    checked_trees: set[str] = set()
    for snapshot_id in repo.snapshot_ids():
        report.snapshots += 1
        stack: list[tuple[str, bytes]] = [(snapshot_id, b"")]
        while stack:
            tree_id, base = stack.pop()
            if tree_id in checked_trees:
                continue
            checked_trees.add(tree_id)
            where = f"snapshot {snapshot_id[:12]}, /{display_path(base)}"
            if tree_id not in present:
                report.missing.append(f"tree {tree_id} ({where})")
                continue
            try:
                entries = repo.get_tree(tree_id)
            except IntegrityError as exc:
                report.malformed.append(f"{exc} ({where})")
                continue
            for entry in entries:
                path = base + b"/" + entry.name if base else entry.name
                if entry.is_dir:
                    stack.append((entry.tree_id, path))  # type: ignore[arg-type]
                elif entry.is_file:
                    if entry.chunklist_id and entry.chunklist_id not in present:
                        report.missing.append(
                            f"chunk list {entry.chunklist_id} (snapshot {snapshot_id[:12]}, /{display_path(path)})"
                        )
                        continue
                    try:
                        chunks = repo.file_chunks(entry)
                    except IntegrityError as exc:
                        report.malformed.append(f"{exc} (/{display_path(path)})")
                        continue
                    for chunk_id, _ in chunks:
                        if chunk_id not in present:
                            report.missing.append(
                                f"chunk {chunk_id} (snapshot {snapshot_id[:12]}, /{display_path(path)})"
                            )
    report.corrupt.sort()
    return report
