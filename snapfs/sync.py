"""Copy snapshots, with their objects, records, names and tags, from one snapfs store to another.

``sync`` moves only what the destination lacks, and verifies every object in
transit (``Repo.get_object`` hashes it before a byte is written). It writes in
the same order as a push, so the destination never shows a half-copied
snapshot:

1. under the destination's push lock (snapfs.locks), so a gc there cannot
   delete an object this sync counted on: chunks, chunk lists, trees from the
   leaves up, then the ``snapshots/<id>`` markers;
2. still under the lock: records, tags, and names last. Names are created
   once (put-if-absent); a name that already exists at the destination for
   another record is an error (AlreadyExistsError), reported after everything
   else was copied.

What is missing is found the way a re-push finds it: a tree present at the
destination implies its whole subtree is (writes are bottom-up everywhere), so
present subtrees are skipped without being read, and a present chunk list
implies its chunks. A sync that dies midway leaves only unreferenced objects;
run it again and it copies only the rest.

Only live records are copied (a forgotten record's name would otherwise come
back to life), with the names that point at them and the tags of the synced
snapshots. Lineage is not followed: a record's parents and inputs are copied
only if they are synced too.

Synchronous; one bounded thread pool does the per-object work (HEAD at the
destination, verified GET at the source, PUT at the destination).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from . import format as fmt
from . import records
from .errors import AlreadyExistsError, IntegrityError, NotFoundError, SnapfsError, UsageError
from .hashing import hash_bytes
from .locks import PushLock
from .packs import PackFetcher, plan_packs, put_objects
from .repo import Repo

log = logging.getLogger(__name__)

Progress = Callable[[int], None] | None


@dataclass
class SyncResult:
    source: str
    destination: str
    snapshots: list[str] = field(default_factory=list)
    copied_objects: int = 0
    copied_bytes: int = 0
    present_objects: int = 0  # checked and found at the destination (trees count their whole subtree as one)
    present_bytes: int = 0
    records: int = 0
    tags: int = 0
    names: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _jobs_for(source: Repo, dest: Repo, jobs: int | None) -> int:
    if jobs:
        return jobs
    return 32 if "s3://" in source.url or "s3://" in dest.url else 8


def _check_stores(source: Repo, dest: Repo) -> None:
    if getattr(source.store, "snapdir", False):
        raise UsageError(
            f"{source.url} is a snapdir store: use `snapfs import SNAPDIR_ID --from {source.url}` to copy its "
            "snapshots into a snapfs store"
        )
    if getattr(dest.store, "snapdir", False):
        raise UsageError(f"{dest.url} is a snapdir store, which snapfs only reads; sync into a snapfs store")
    if source.url == dest.url:
        raise UsageError(f"source and destination are the same store ({source.url})")


@dataclass
class _Selection:
    snapshots: list[str]
    records: list[records.Record]
    names: list[records.NameEntry]
    tags: list[tuple[str, str]]


def select(source: Repo, refs: Iterable[str], *, everything: bool = False) -> _Selection:
    """What to copy: the snapshots REFs resolve to (or all), their live records, names and tags."""
    snapshots: dict[str, None] = {}
    for ref in refs:
        snapshots.setdefault(records.lookup(source, ref).snapshot, None)
    live = records.live_records(source)
    if everything:
        for snapshot_id in sorted(source.snapshot_ids()):
            snapshots.setdefault(snapshot_id, None)
        for record in live:
            snapshots.setdefault(record.snapshot, None)
    if not snapshots:
        raise UsageError("nothing to sync: give one or more REFs, or --all")
    chosen = [r for r in live if r.snapshot in snapshots]
    record_ids = {r.id for r in chosen}
    names = [e for e in records.name_entries(source) if e.record in record_ids]
    tags = [(tag, s) for tag, s in records.tag_keys(source) if s in snapshots]
    return _Selection(list(snapshots), chosen, names, tags)


#: Members of packs fetched from the source that the copy has not written yet.
SYNC_KEEP_BYTES = 128 << 20


class _Copier:
    """One sync's object copy; methods run in worker threads."""

    def __init__(self, source: Repo, dest: Repo, result: SyncResult, progress: Progress) -> None:
        self.source = source
        self.dest = dest
        self.result = result
        self.progress = progress
        self.lock = threading.Lock()
        #: Object IDs a LIST of the destination found, replacing one HEAD per chunk.
        self.listed: set[str] | None = None
        # Packed small objects come a pack at a time (snapfs.packs), and go
        # into packs again where the destination packs them.
        self.fetcher = PackFetcher(source, keep_bytes=SYNC_KEEP_BYTES) if source.holds_packs else None
        self.packs = dest.packs_small_objects

    def count(self, copied: bool, size: int) -> None:
        with self.lock:
            if copied:
                self.result.copied_objects += 1
                self.result.copied_bytes += size
            else:
                self.result.present_objects += 1
                self.result.present_bytes += size

    def put(self, object_id: str, data: bytes) -> None:
        self.dest.put_new_object(data, object_id)
        self.count(True, len(data))

    def present(self, object_id: str) -> bool:
        return object_id in self.listed if self.listed is not None else self.dest.has_object(object_id)

    def get_chunk(self, chunk_id: str, length: int) -> bytes:
        """Verified, length checked."""
        if self.fetcher is not None:
            return self.fetcher.get_chunk(chunk_id, length)
        return self.source.get_chunk(chunk_id, length)

    def copy_chunk(self, item: tuple[str, int]) -> None:
        chunk_id, length = item
        if self.present(chunk_id):
            self.count(False, length)
        else:
            self.put(chunk_id, self.get_chunk(chunk_id, length))
        if self.progress:
            self.progress(length)

    def copy_pack(self, batch: list[tuple[str, int]]) -> None:
        """Copy small chunks the destination lacks, as one pack."""
        objects = [(chunk_id, self.get_chunk(chunk_id, length)) for chunk_id, length in batch]
        put_objects(self.dest, objects)
        for _chunk_id, data in objects:
            self.count(True, len(data))
        if self.progress:
            self.progress(sum(length for _, length in batch))

    def skip(self, _chunk_id: str, length: int) -> None:
        """A chunk the destination has: counted, not copied."""
        self.count(False, length)
        if self.progress:
            self.progress(length)


def _tree_heights(missing: dict[str, list[fmt.Entry]]) -> dict[str, int]:
    """Height of every missing tree above the missing trees below it (leaves: 1)."""
    heights: dict[str, int] = {}
    for start in missing:
        stack = [start]
        while stack:
            tree_id = stack[-1]
            if tree_id in heights:
                stack.pop()
                continue
            pending = [
                e.tree_id
                for e in missing[tree_id]
                if e.is_dir and e.tree_id in missing and e.tree_id not in heights
            ]
            if pending:
                stack.extend(pending)  # type: ignore[arg-type]
                continue
            below = [heights[e.tree_id] for e in missing[tree_id] if e.is_dir and e.tree_id in missing]  # type: ignore[index]
            heights[tree_id] = 1 + max(below, default=0)
            stack.pop()
    return heights


def _copy_objects(copier: _Copier, roots: list[str], pool: ThreadPoolExecutor) -> None:
    source, dest = copier.source, copier.dest
    # 1. Trees the destination lacks, level by level; a present tree's subtree is skipped unread.
    missing: dict[str, list[fmt.Entry]] = {}
    blobs: dict[str, bytes] = {}
    seen = set(roots)
    level = list(roots)
    while level:
        present = list(pool.map(dest.has_object, level))
        need = [t for t, p in zip(level, present, strict=True) if not p]
        for _ in range(len(level) - len(need)):
            copier.count(False, 0)
        next_level: list[str] = []
        for tree_id, blob in zip(need, pool.map(lambda t: source.get_object(t, "tree"), need), strict=True):
            entries = fmt.decode_tree(blob, f"tree {tree_id} in {source.url}")
            missing[tree_id] = entries
            blobs[tree_id] = blob
            for entry in entries:
                if entry.is_dir and entry.tree_id not in seen:
                    seen.add(entry.tree_id)  # type: ignore[arg-type]
                    next_level.append(entry.tree_id)  # type: ignore[arg-type]
        level = next_level

    # 2. The chunks of every file in a missing tree; a present chunk list implies its chunks.
    chunks: dict[str, int] = {}
    listed = {}
    for entries in missing.values():
        for entry in entries:
            if not entry.is_file:
                continue
            if entry.chunklist_id is not None:
                listed.setdefault(entry.chunklist_id, entry)
            else:
                chunks.update(entry.chunks)
    list_ids = list(listed)
    chunklists: dict[str, bytes] = {}
    for list_id, is_present in zip(list_ids, pool.map(dest.has_object, list_ids), strict=True):
        if is_present:
            copier.count(False, 0)
            continue
        entry = listed[list_id]
        blob = source.get_object(list_id, "chunk list")
        chunks.update(fmt.decode_chunklist(blob, entry.chunk_count, entry.size, f"chunk list {list_id}"))
        chunklists[list_id] = blob
    log.info(
        "sync %s -> %s: %d trees, %d chunk lists and up to %d chunks (%d bytes) to check",
        source.url,
        dest.url,
        len(missing),
        len(chunklists),
        len(chunks),
        sum(chunks.values()),
    )
    copier.listed = dest.list_object_ids(len(chunks))
    batches, rest = (
        plan_packs(chunks, copier.present, pool, copier.skip) if copier.packs else ([], list(chunks))
    )
    for _ in pool.map(copier.copy_pack, [[(c, chunks[c]) for c in batch] for batch in batches]):
        pass
    for _ in pool.map(copier.copy_chunk, [(c, chunks[c]) for c in rest]):
        pass
    for _ in pool.map(lambda item: copier.put(*item), chunklists.items()):
        pass
    # 3. Trees, leaves first: a tree is written only after every tree below it.
    heights = _tree_heights(missing)
    for height in sorted(set(heights.values())):
        batch = [(t, blobs[t]) for t, h in heights.items() if h == height]
        for _ in pool.map(lambda item: copier.put(*item), batch):
            pass


def _copy_record(source: Repo, dest: Repo, record: records.Record) -> bool:
    key = fmt.record_key(record.id)
    if dest.store.exists(key):
        return False
    raw = source.store.get(key)
    actual = hash_bytes(raw)
    if actual != record.id:
        raise IntegrityError(f"record {record.id} in {source.url} is corrupt: its bytes hash to {actual}")
    return dest.store.put(key, raw, if_absent=True)


def _name_blob(entry: records.NameEntry) -> bytes:
    # Exactly what records.create writes, so a synced name reads the same everywhere.
    pointer = {
        "format": records.NAME_FORMAT,
        "name": entry.name,
        "record": entry.record,
        "snapshot": entry.snapshot,
        "time": entry.time,
    }
    return json.dumps(pointer, sort_keys=True, separators=(",", ":")).encode()


def _copy_metadata(
    source: Repo, dest: Repo, selection: _Selection, result: SyncResult, pool: ThreadPoolExecutor
) -> None:
    copied = list(pool.map(lambda r: _copy_record(source, dest, r), selection.records))
    result.records = sum(copied)
    for tag, snapshot_id in selection.tags:
        key = f"{records.TAG_PREFIX}{tag}/{snapshot_id}"
        if not dest.store.exists(key):
            try:
                dest.store.put(key, source.store.get(key))
                result.tags += 1
            except NotFoundError:
                pass  # removed at the source meanwhile
    conflicts = []
    for entry in selection.names:
        key = records.NAME_PREFIX + entry.name
        if dest.store.put(key, _name_blob(entry), if_absent=True):
            result.names.append(entry.name)
            continue
        existing = records.read_name(dest, entry.name)
        if existing is None or existing.record != entry.record or existing.snapshot != entry.snapshot:
            where = f"snapshot {existing.snapshot[:16]}" if existing else "unreadable content"
            conflicts.append(f"{entry.name!r} ({where} there, snapshot {entry.snapshot[:16]} here)")
    if conflicts:
        raise AlreadyExistsError(
            f"name(s) already exist in {dest.url} with other content: {', '.join(conflicts)}; names never "
            "move, so those snapshots were synced but not named there"
        )


def sync(
    source: Repo,
    dest: Repo,
    refs: Iterable[str] = (),
    *,
    everything: bool = False,
    jobs: int | None = None,
    progress: Progress = None,
) -> SyncResult:
    """Copy the snapshots REFs resolve to (or all, with ``everything``) from ``source`` to ``dest``."""
    started = time.monotonic()
    _check_stores(source, dest)
    selection = select(source, refs, everything=everything)
    result = SyncResult(source.url, dest.url, selection.snapshots)
    with ThreadPoolExecutor(
        max_workers=_jobs_for(source, dest, jobs), thread_name_prefix="snapfs-sync"
    ) as pool:
        for _attempt in (1, 2):
            with PushLock(dest.store) as lock:
                dest.ensure_config()
                _copy_objects(_Copier(source, dest, result, progress), selection.snapshots, pool)
                if not lock.held():
                    log.warning("push lock on %s lapsed during the sync; checking the copy again", dest.url)
                    continue
                for snapshot_id in selection.snapshots:
                    dest.mark_snapshot(snapshot_id)  # only now can anyone there see it
                _copy_metadata(source, dest, selection, result, pool)
                break
        else:
            raise SnapfsError(f"push lock on {dest.url} lapsed twice; nothing was marked, sync again")
    result.seconds = round(time.monotonic() - started, 3)
    log.info(
        "synced %d snapshot(s) %s -> %s: copied %d objects (%d bytes), %d present, in %.1fs",
        len(selection.snapshots),
        source.url,
        dest.url,
        result.copied_objects,
        result.copied_bytes,
        result.present_objects,
        result.seconds,
    )
    return result
