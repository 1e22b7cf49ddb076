"""Prewarm: fill a node's cache with a snapshot (or some paths of it) before a job.

A batch job, so it uses plain worker threads (no trio loop to protect): each
worker fetches an object, verifies it against its ID, and writes it into the
same DiskCache the mount daemon uses (temp -> fsync -> rename -> LMDB). The
daemon and any number of prewarms can run on one cache at once.

Resumable by construction: objects already in the cache are skipped, so an
interrupted prewarm picks up where it stopped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from . import format as fmt
from .cache import DiskCache, UnavailableStreak
from .errors import CacheFullError, NotFoundError, SnapfsError
from .format import Entry
from .packs import PackFetcher
from .repo import Repo

log = logging.getLogger(__name__)


@dataclass
class PrewarmPlan:
    snapshot_id: str
    trees: int = 0
    objects: dict[str, int] = field(default_factory=dict)  # object_id -> size: trees, chunk lists, chunks
    missing: dict[str, int] = field(default_factory=dict)  # not yet cached
    # Trees and chunk lists planning itself had to fetch from the store: a
    # prewarm reports them as fetched, not as already cached.
    fetched: dict[str, int] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(self.objects.values())

    @property
    def missing_bytes(self) -> int:
        return sum(self.missing.values())


@dataclass
class PrewarmResult:
    snapshot_id: str
    objects: int = 0
    bytes_total: int = 0
    already_cached_objects: int = 0
    already_cached_bytes: int = 0
    fetched_objects: int = 0
    fetched_bytes: int = 0
    failed: list[str] = field(default_factory=list)
    seconds: float = 0.0
    pinned: bool = False
    #: Why the rest was not tried: the store was called down (cache.UnavailableStreak).
    store_unavailable: str | None = None

    @property
    def ok(self) -> bool:
        return not self.failed

    def as_dict(self) -> dict:
        out = dict(self.__dict__)
        out["ok"] = self.ok
        out["failed"] = self.failed[:100]
        out["failed_count"] = len(self.failed)
        out["rate_bytes_per_second"] = round(self.fetched_bytes / self.seconds) if self.seconds else 0
        return out


def _tree_data(
    repo: Repo,
    cache: DiskCache,
    tree_id: str,
    pin: str | None,
    what: str,
    fetched: dict[str, int],
    store: bool = True,
) -> bytes:
    """A tree's (or chunk list's) verified bytes, from the cache or the store (and
    then cached, unless ``store`` is False); store fetches are noted in ``fetched``."""
    data = cache.read(tree_id) if cache.is_cached(tree_id) else None
    if data is None:
        data = repo.get_object(tree_id, what)
        fetched[tree_id] = len(data)
        if store:
            cache.insert(tree_id, data, pin=pin, verified=True)
    elif pin is not None:
        cache.index.add(tree_id, len(data), pin=pin)
    return data


def plan(
    repo: Repo,
    cache: DiskCache,
    snapshot_id: str,
    paths: list[str] | None = None,
    *,
    pin: str | None = None,
    jobs: int = 16,
    store_trees: bool = True,
) -> PrewarmPlan:
    """Walk the snapshot's trees (caching them), listing every object under ``paths``.

    With ``store_trees=False`` (``snapfs cache stats``) trees missing from the
    cache are read from the store but not added, so the cache is not changed.
    """
    result = PrewarmPlan(snapshot_id)
    fetched = result.fetched
    starts: list[tuple[str | None, Entry | None, bytes]] = []
    if paths:
        for path in paths:
            entry = repo.lookup_path(snapshot_id, path) if path.strip("/") else None
            starts.append((snapshot_id if entry is None else None, entry, path.encode()))
    else:
        starts.append((snapshot_id, None, b""))

    files: list[Entry] = []
    level: list[tuple[str, bytes]] = []
    seen_trees: set[str] = set()
    for tree_id, entry, path in starts:
        if entry is not None and entry.is_dir:
            tree_id = entry.tree_id
        if tree_id is not None:
            if tree_id not in seen_trees:
                seen_trees.add(tree_id)
                level.append((tree_id, path))
        elif entry is not None and entry.is_file:
            files.append(entry)
    # The trees on the way down to the given paths are cached too: the mount needs
    # them. They are part of the plan, so they are counted and pinned with the rest.
    if paths:
        for path in paths:
            parts = [p for p in path.encode().split(b"/") if p]
            tree_id = snapshot_id
            for depth in range(len(parts)):
                data = _tree_data(repo, cache, tree_id, pin, "tree", fetched, store_trees)
                result.objects[tree_id] = len(data)
                entries = fmt.decode_tree(data)
                nxt = next((e for e in entries if e.name == parts[depth]), None)
                if nxt is None or not nxt.is_dir:
                    break
                tree_id = nxt.tree_id  # type: ignore[assignment]

    def load(item: tuple[str, bytes]) -> list[Entry]:
        tree_id, path = item
        data = _tree_data(
            repo, cache, tree_id, pin, f"tree (/{path.decode(errors='replace')})", fetched, store_trees
        )
        result.objects[tree_id] = len(data)
        return fmt.decode_tree(data, f"tree {tree_id}")

    with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="snapfs-plan") as pool:
        while level:
            next_level: list[tuple[str, bytes]] = []
            for (_tree_id, path), entries in zip(level, pool.map(load, level), strict=True):
                result.trees += 1
                for entry in entries:
                    if entry.is_dir and entry.tree_id not in seen_trees:
                        seen_trees.add(entry.tree_id)  # type: ignore[arg-type]
                        next_level.append((entry.tree_id, path + b"/" + entry.name))  # type: ignore[arg-type]
                    elif entry.is_file:
                        files.append(entry)
            level = next_level

        def chunks_of(entry: Entry) -> list[tuple[str, int]]:
            if entry.chunklist_id is None:
                return list(entry.chunks)
            data = _tree_data(repo, cache, entry.chunklist_id, pin, "chunk list", fetched, store_trees)
            result.objects[entry.chunklist_id] = len(data)
            return list(fmt.decode_chunklist(data, entry.chunk_count, entry.size))

        for chunks in pool.map(chunks_of, files):
            for chunk_id, length in chunks:
                result.objects[chunk_id] = length

    # An object counts as cached with both its index entry and its file. A file
    # deleted behind the index's back (an operator's rm, a disk error) must be
    # fetched again, or the mount would miss it after a "complete" prewarm; a
    # file without an entry is not trusted (it may be a write a power loss cut
    # short) and is fetched and written again. One stat per object is cheap
    # next to a fetch.
    indexed = cache.index.contains_many(result.objects)
    result.missing = {
        oid: size for oid, size in result.objects.items() if oid not in indexed or not cache.has(oid)
    }
    return result


def prewarm(
    repo: Repo,
    cache: DiskCache,
    snapshot_id: str,
    paths: list[str] | None = None,
    *,
    jobs: int = 32,
    pin: bool = False,
    progress: Callable[[int, int], None] | None = None,
    on_plan: Callable[[PrewarmPlan], None] | None = None,
) -> PrewarmResult:
    """Fetch every object of the snapshot (under ``paths``) into the cache.

    ``progress(bytes, objects)`` is called as objects land. Raises CacheFullError
    before fetching anything if the objects cannot fit beside the existing pins.
    """
    started = time.monotonic()
    pin_name = snapshot_id if pin else None
    # A prewarm killed mid-write leaves temp files; their writer's pid is dead.
    swept = cache.sweep_temp()
    if swept:
        log.info("swept %d temp files left in %s by a crash", swept, cache.directory)
    # Plan without pinning: a prewarm refused for lack of room must leave no pins behind.
    the_plan = plan(repo, cache, snapshot_id, paths, jobs=min(jobs, 32))
    if on_plan:
        on_plan(the_plan)
    result = PrewarmResult(snapshot_id, pinned=pin)
    result.objects = len(the_plan.objects)
    result.bytes_total = the_plan.total_bytes
    planned_fetch_bytes = sum(the_plan.fetched.values())
    result.fetched_objects = len(the_plan.fetched)
    result.fetched_bytes = planned_fetch_bytes
    result.already_cached_objects = len(the_plan.objects) - len(the_plan.missing) - len(the_plan.fetched)
    result.already_cached_bytes = the_plan.total_bytes - the_plan.missing_bytes - planned_fetch_bytes

    if cache.max_bytes is not None:
        _total, pinned, _n = cache.index.totals()
        if pin:
            # Objects already pinned (by an earlier run of this prewarm, or by another
            # snapshot sharing them) take no new room: rerunning a pinned prewarm
            # must not fail for lack of space.
            already = cache.index.pinned_subset(the_plan.objects)
            needed = sum(size for oid, size in the_plan.objects.items() if oid not in already)
        else:
            needed = the_plan.missing_bytes
        if pinned + needed > cache.max_bytes:
            raise CacheFullError(
                f"snapshot {snapshot_id[:12]} needs {needed} bytes but the cache holds {cache.max_bytes} "
                f"with {pinned} already pinned; raise --cache-size or unpin something (snapfs cache unpin REF)"
            )
    # Protect what is already there while we fetch the rest: pinned, or at least
    # made the youngest in the LRU. Otherwise the room made for the missing
    # objects could be taken from this very snapshot's cached ones (the reads
    # above are only batched as touches, flushed at the end).
    present = [(oid, size) for oid, size in the_plan.objects.items() if oid not in the_plan.missing]
    for i in range(0, len(present), 10_000):
        if pin:
            cache.index.add_many(present[i : i + 10_000], pin=pin_name)
        else:
            cache.index.touch_many(oid for oid, _size in present[i : i + 10_000])

    lock = threading.Lock()
    disk_full = threading.Event()
    # The mount's rule for a down store (under `lock`). Once it says so, the rest
    # is not tried: each would pay the client's whole retry budget (minutes for a
    # hung store) only to fail too.
    streak = UnavailableStreak()
    # A packed object comes with its pack: the members this prewarm wants are
    # written with it, and their own turn finds them done.
    packs = PackFetcher(repo, keep_bytes=8 << 20)
    done: set[str] = set()
    # By object: one that failed on its own turn may still arrive with a pack
    # another thread fetched, and is then no failure.
    failures: dict[str, str] = {}

    def fetch(item: tuple[str, int]) -> None:
        object_id, size = item
        with lock:
            if object_id in done:
                return
        if disk_full.is_set():
            # Fetching the rest would only throw it away (and one log line each would
            # bury the reason): listed as failed, unlogged.
            with lock:
                failures[object_id] = f"{object_id}: not fetched, the cache disk {cache.directory} is full"
            return
        if result.store_unavailable is not None:
            with lock:
                failures[object_id] = f"{object_id}: not fetched, the store is unavailable"
            return
        try:
            data, siblings = packs.get(object_id, "chunk", size)
            if len(data) != size:
                raise SnapfsError(f"chunk {object_id} is {len(data)} bytes, the tree says {size}")
            # Each object is written by one thread: the first to claim it in `done`.
            with lock:
                if object_id in done:
                    return  # it came with a pack another thread fetched, and is written there
                done.add(object_id)
                batch = [(object_id, data)]
                for sibling_id, sibling in siblings.items():
                    if the_plan.missing.get(sibling_id) == len(sibling) and sibling_id not in done:
                        batch.append((sibling_id, sibling))
                        done.add(sibling_id)
            written = cache.insert_many(batch, pin=pin_name, verified=True)
            if not all(written):
                with lock:
                    done.difference_update(oid for (oid, _), ok in zip(batch, written, strict=True) if not ok)
                    for (oid, _), ok in zip(batch[1:], written[1:], strict=True):
                        if not ok:
                            failures[oid] = f"{oid}: could not be written to the cache"
                if cache.disk_full:
                    disk_full.set()
                if not written[0]:
                    if cache.disk_full:
                        raise CacheFullError(
                            f"cannot write object {object_id}: the cache disk {cache.directory} is full "
                            "(no space left on device); free space or lower --cache-size, then rerun"
                        )
                    raise SnapfsError(f"could not write object {object_id} to the cache {cache.directory}")
        except (NotFoundError, SnapfsError) as exc:
            log.error("prewarm of %s: %s", snapshot_id, exc)
            with lock:
                failures[object_id] = f"{object_id}: {exc}"
                if streak.record(exc) and result.store_unavailable is None:
                    result.store_unavailable = str(exc)
                    log.error(
                        "prewarm of %s: the store failed %d fetches in a row; not trying the rest",
                        snapshot_id,
                        streak.count,
                    )
            return
        landed = [(oid, len(d)) for (oid, d), ok in zip(batch, written, strict=True) if ok]
        landed_bytes = sum(n for _, n in landed)
        with lock:
            streak.record(None)
            result.fetched_objects += len(landed)
            result.fetched_bytes += landed_bytes
        if progress:
            progress(landed_bytes, len(landed))

    # Largest first keeps every connection busy to the end instead of ending on one big object.
    items = sorted(the_plan.missing.items(), key=lambda kv: -kv[1])
    with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="snapfs-prewarm") as pool:
        for _ in pool.map(fetch, items):
            pass
    result.failed = [message for object_id, message in failures.items() if object_id not in done]
    cache.flush_touches()
    cache.index.remember_snapshot(snapshot_id)
    result.seconds = time.monotonic() - started
    return result
