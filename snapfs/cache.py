"""The node-local object cache: verified files on disk, an LMDB index, LRU eviction.

Two halves:

``DiskCache`` (synchronous, thread-safe, safe across processes). Objects live at
``<cache>/objects/ab/cdef…``. An object is written as temp file → rename, only
after its bytes were verified against its ID, and indexed only after the
rename. An object counts as cached only with both its file and its index
entry; a file without an entry is written again, never trusted. Files are made
durable in batches, not one fsync each (see ``sync_pending``): until a
``syncfs`` covers it, an entry is listed as unsynced under this boot's ID, and
the first DiskCache opened after a reboot drops the unsynced entries of the
boot before, whose files a power loss may have cut short. The daemon,
``snapfs prewarm`` and ``snapfs cache`` each open their own DiskCache on the same
directory.

``ObjectSource`` (async, trio; one per process). Memory LRU → disk cache → store,
with single-flight: however many readers want a missing object, it is fetched
once. Fetches run in a nursery owned by the ObjectSource, not by the reader, so a
reader that gives up never cancels a fetch another reader waits on. Blocking
work runs on fixed pools of worker threads (snapfs.workers), one pool per
kind: store fetches (HTTP + hashing, also bounded by ``fetch_limiter``), disk
reads, disk writes + LMDB. See docs/CACHE.md for the
list of awaits where state can change.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

import trio

from .errors import (
    CacheFullError,
    CacheIndexError,
    IntegrityError,
    NotFoundError,
    SnapfsError,
    StoreUnavailableError,
)
from .hashing import hash_bytes
from .index import CacheIndex
from .linux import boot_id, can_syncfs, syncfs
from .packs import PackFetcher
from .repo import Repo
from .workers import WorkerThreads

T = TypeVar("T")

log = logging.getLogger(__name__)

_TMP_PREFIX = ".tmp-"
# Evict down to this fraction of the limit, so eviction runs in batches.
_LOW_WATERMARK = 0.9
#: Failure memory. Once OUTAGE_AFTER fetches in a row (no answer between them)
#: found the store unavailable, each with its retries spent, misses fail at once
#: for OUTAGE_HOLDOFF seconds; then one fetch at a time probes the store, and
#: each failed probe doubles the wait, up to OUTAGE_HOLDOFF_MAX. A row of
#: failures, not one: a flaky store that answers most requests must not make
#: everything fail for seconds because one object was unlucky.
OUTAGE_AFTER = 3
OUTAGE_HOLDOFF = 2.0
OUTAGE_HOLDOFF_MAX = 30.0

#: Fetched, verified bytes waiting for their cache write are held in memory.
#: Past this much, prefetches stop starting and a reader's miss waits for room
#: before it fetches: the cache disk, not the store, then sets the pace.
#: Without the bound a store faster than the cache disk (a local store, a
#: fast LAN, a disk busy with fsyncs) let the backlog grow with every file
#: read: 20,000 x 50 KiB through 8 readers from a file store left the daemon
#: at 650-714 MiB RSS, 400 MiB of it bytes queued for writing.
WRITE_BACKLOG_BYTES = 64 << 20
# Cache writes of fetched objects: WRITERS tasks, each handing up to
# WRITE_BATCH queued objects, at most WRITE_BATCH_BYTES together (but always
# one), at a time to a write thread. One hand-off per object (trio to a thread
# and back, each a wakeup and a GIL switch) cost more than the write itself on
# a cold read of many small files. The byte bound sends large chunks one per
# batch: a batch's bytes leave the write backlog only when all of it is on
# disk, and 32 MiB held back that way would stall misses on the backlog.
WRITERS = 2
WRITE_BATCH = 32
WRITE_BATCH_BYTES = 1 << 20
# Fetches of objects up to this size (below the chunker's minimum: whole small
# files, trees) make ObjectSource.small_fetch_seconds. Large files' chunks are
# left out: under readahead they queue for fetch slots (38-58 ms each, 4
# readers), which says nothing about the store's latency.
SMALL_OBJECT = 256 << 10

#: Seconds between the syncfs calls that make new cache files durable
#: (DiskCache.sync_pending). After a power loss, at most this much of the
#: cache's newest objects is dropped and fetched again.
SYNC_INTERVAL = 10.0
#: Unsynced index keys handled per syncfs (32 bytes each).
SYNC_PAGE = 50_000


def _writer_alive(temp_name: str) -> bool:
    """Whether the process named in ``.tmp-<pid>-<thread>-<id>`` may still be writing it."""
    pid_text = temp_name[len(_TMP_PREFIX) :].split("-", 1)[0]
    if not pid_text.isdigit():
        return True  # not our naming: leave it to the age rule
    pid = int(pid_text)
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    try:
        # A killed process stays a zombie until its parent reaps it: dead all the same.
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


class DiskCache:
    def __init__(self, directory: str, max_bytes: int | None = None, *, fsync: bool = True) -> None:
        """``fsync=False`` never makes cache files durable: on this OS that costs
        the objects cached since the last boot (dropped at the next one); where
        the boot cannot be told (no Linux /proc), a power loss may tear a file."""
        self.directory = os.path.abspath(directory)
        self.objects_dir = os.path.join(self.directory, "objects")
        self.max_bytes = max_bytes
        self.fsync = fsync
        # Deferred durability needs both halves: telling a reboot (boot ID) and
        # making many files durable in one call (syncfs). Else one fsync per file.
        self.boot = boot_id() if can_syncfs() else None
        try:
            # Private when we create it: the cache holds the plain bytes of every
            # snapshot read here, and a mount without --allow-other is private too.
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            os.makedirs(self.objects_dir, exist_ok=True)
        except OSError as exc:
            raise SnapfsError(f"cannot create cache directory {self.directory}: {exc.strerror}") from exc
        self.index = CacheIndex(os.path.join(self.directory, "index"))
        self._evict_lock = threading.Lock()
        self._touched: dict[str, None] = {}
        self._touch_lock = threading.Lock()
        self.write_failures = 0
        self.disk_full = False
        self._sync_lock = threading.Lock()
        if self.boot is not None:
            self._drop_unsynced_from_before_reboot()

    def close(self) -> None:
        try:
            self.flush_touches()
        except CacheIndexError as exc:
            log.warning("%s; last-access times since the last flush are lost", exc)
        try:
            self.sync_pending()
        except (OSError, CacheIndexError) as exc:
            log.warning(
                "cannot sync cache %s at close: %s; a reboot will drop what it wrote", self.directory, exc
            )
        self.index.close()

    # --- durability ------------------------------------------------------

    @property
    def defers_sync(self) -> bool:
        """Whether files are made durable in batches (sync_pending), not one fsync each."""
        return self.boot is not None

    @property
    def syncs_in_batches(self) -> bool:
        """Whether sync_pending has work to do: deferred durability, and syncing on."""
        return self.defers_sync and self.fsync

    @property
    def durability(self) -> str:
        """How cache files reach the disk, for `snapfs status`."""
        if not self.defers_sync:
            return "fsync per file" if self.fsync else "never synced (--no-fsync)"
        if not self.fsync:
            return "never synced (--no-fsync): a reboot drops what was cached since the last boot"
        return "synced in batches (syncfs)"

    def _drop_unsynced_from_before_reboot(self) -> None:
        try:
            lost = self.index.take_unsynced_from_another_boot(self.boot)
        except CacheIndexError as exc:
            # Stop trusting the cache rather than serve what may be torn.
            raise SnapfsError(f"cannot check cache {self.directory} after a reboot: {exc}") from exc
        self._unlink_files(lost)
        if lost:
            log.warning(
                "dropped %d objects cached in %s before the last reboot but never synced to disk; "
                "they will be fetched again",
                len(lost),
                self.directory,
            )

    def sync_pending(self) -> int:
        """Make every cache file written so far durable with one ``syncfs``, then
        clear their unsynced marks; returns how many. Blocking: worker threads.

        Batching is the point: one fsync per file made the write pool the pace of
        a cold read (64 MiB of verified bytes queued behind fsyncs, and readers
        waiting for room), and most of what one syncfs flushes the kernel has
        written back already. syncfs also flushes other dirty files on the same
        filesystem; that is writeback the kernel would do within 30 s anyway."""
        if not self.syncs_in_batches:
            return 0
        synced = 0
        with self._sync_lock:  # one syncfs at a time is enough
            # In pages, so that a mount filling the cache with a million tiny
            # files never holds a million keys at once. Keys are read before the
            # syncfs that covers them; a later page costs one more, cheap, call.
            while True:
                pending = self.index.unsynced_keys(limit=SYNC_PAGE)
                if not pending:
                    return synced
                syncfs(self.objects_dir)
                self.index.mark_synced_keys(pending)
                synced += len(pending)
                if len(pending) < SYNC_PAGE:
                    return synced

    def path(self, object_id: str) -> str:
        return os.path.join(self.objects_dir, object_id[:2], object_id[2:])

    def sweep_temp(self) -> int:
        """Remove temp files left by a crash: at once if the process that wrote one
        is gone (its pid is in the name), else once it is older than a minute.

        The pid check makes a restart after kill -9 clean right away. It can err
        only towards deleting: a writer in another pid namespace sharing this
        directory may look dead. That costs it one cache write (its rename fails,
        it logs and serves the bytes anyway), never a wrong byte."""
        removed = 0
        cutoff = time.time() - 60
        for dirpath, _dirs, files in os.walk(self.objects_dir):
            for name in files:
                if name.startswith(_TMP_PREFIX):
                    path = os.path.join(dirpath, name)
                    try:
                        if not _writer_alive(name) or os.stat(path).st_mtime < cutoff:
                            os.unlink(path)
                            removed += 1
                    except FileNotFoundError:
                        pass
        return removed

    # --- reads -----------------------------------------------------------

    def read(self, object_id: str) -> bytes | None:
        """The object's bytes, or None if it is not cached."""
        try:
            with open(self.path(object_id), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        self.touch(object_id)
        return data

    def has(self, object_id: str) -> bool:
        """Whether the object's file is there (indexed or not; see is_cached)."""
        return os.path.exists(self.path(object_id))

    def is_cached(self, object_id: str) -> bool:
        """Indexed and present: the only state in which the file is trusted."""
        return self.index.contains(object_id) and self.has(object_id)

    def indexed(self, object_id: str) -> bool:
        """Whether the index vouches for the object's file. An index that cannot
        be read vouches for nothing: the caller asks the store."""
        try:
            return self.index.contains(object_id)
        except CacheIndexError:
            return False

    def touch(self, object_id: str) -> None:
        with self._touch_lock:
            self._touched[object_id] = None

    def flush_touches(self) -> None:
        with self._touch_lock:
            touched, self._touched = list(self._touched), {}
        if touched:
            self.index.touch_many(touched)

    # --- writes ----------------------------------------------------------

    def insert(self, object_id: str, data: bytes, *, pin: str | None = None, verified: bool = False) -> bool:
        """Store verified bytes. Returns False (and counts a failure) if the disk
        refused; the caller still serves the bytes it holds."""
        return self.insert_many([(object_id, data)], pin=pin, verified=verified)[0]

    def insert_many(
        self, items: list[tuple[str, bytes]], *, pin: str | None = None, verified: bool = False
    ) -> list[bool]:
        """insert() for several objects, with one index transaction for all the
        new files. Per object: True if it is cached now.

        Each system call releases and retakes the GIL, and in a busy daemon
        each retake is a wait and a thread switch: measured with one
        CPU-bound Python thread beside two writers, a 50 KB insert cost 1.9 ms
        of CPU instead of 0.16. So the steady state makes only the calls it
        needs: open, write, close, rename per file (the fan-out directory is
        made on the first write into it), then one commit for the batch."""
        if not verified:
            for object_id, data in items:
                if hash_bytes(data) != object_id:
                    raise IntegrityError(f"refusing to cache object {object_id}: bytes do not match")
        results = [False] * len(items)
        fresh: list[int] = []
        indexed = self.index.contains_many(object_id for object_id, _ in items)
        for i, (object_id, data) in enumerate(items):
            # A file without an index entry is not trusted (it may be a never-synced
            # write cut short by a power loss whose entry was lost too): write it again.
            if object_id in indexed and self.has(object_id):
                try:
                    self.index.add(object_id, len(data), pin=pin)
                except CacheIndexError as exc:
                    # The bytes are cached (by someone else); only the bookkeeping failed.
                    self.note_index_failure(exc, object_id)
                results[i] = True
            else:
                fresh.append(i)
        if not fresh:
            return results
        if self.max_bytes is not None:
            self.make_room(sum(len(items[i][1]) for i in fresh))
        written = [i for i in fresh if self._write_file(*items[i])]
        if written and self.index_new_files([(items[i][0], len(items[i][1])) for i in written], pin=pin):
            for i in written:
                results[i] = True
        return results

    def _write_file(self, object_id: str, data: bytes) -> bool:
        """Temp file, (fsync,) rename into place. False, with a log line, if the disk refused."""
        path = self.path(object_id)
        directory = os.path.dirname(path)
        tmp = os.path.join(directory, f"{_TMP_PREFIX}{os.getpid()}-{threading.get_ident()}-{object_id[:16]}")
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
        try:
            try:
                fd = os.open(tmp, flags, 0o644)
            except FileNotFoundError:
                os.makedirs(directory, exist_ok=True)
                fd = os.open(tmp, flags, 0o644)
            try:
                view = memoryview(data)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                self.sync_file(fd)
            finally:
                os.close(fd)
            os.rename(tmp, path)
        except OSError as exc:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            self.write_failures += 1
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                self.disk_full = True  # for batch writers (prewarm), which stop on it
                log.warning(
                    "cache disk %s is full; serving object %s without caching it", self.directory, object_id
                )
                # Free something for the next write, if there is anything to free.
                try:
                    self.evict(max(len(data), 64 << 20))
                except CacheIndexError as index_exc:
                    self.note_index_failure(index_exc, object_id)
            else:
                log.warning("cannot cache object %s in %s: %s", object_id, self.directory, exc.strerror)
            return False
        return True

    def sync_file(self, fd: int) -> None:
        """Before the rename of a new cache file: fsync it, unless durability is
        deferred to sync_pending (or turned off)."""
        if self.fsync and not self.defers_sync:
            os.fsync(fd)

    def index_new_file(self, object_id: str, size: int, *, pin: str | None = None) -> bool:
        """Index an object file just renamed into place; False if the index refused."""
        return self.index_new_files([(object_id, size)], pin=pin)

    def index_new_files(self, items: list[tuple[str, int]], *, pin: str | None = None) -> bool:
        """Index object files just renamed into place, in one transaction; False
        if the index refused them.

        A file the index does not count would escape the size limit and
        eviction, so on refusal they are taken back out: the callers serve the
        bytes they hold (or have mapped) uncached.
        """
        try:
            self.index.add_many(items, pin=pin, unsynced_boot=self.boot)
        except CacheIndexError as exc:
            for object_id, _ in items:
                try:
                    os.unlink(self.path(object_id))
                except OSError:
                    pass
            self.write_failures += len(items)
            self.note_index_failure(exc, items[0][0])
            return False
        return True

    def note_index_failure(self, exc: CacheIndexError, object_id: str) -> None:
        if exc.disk_full:
            self.disk_full = True
        log.warning("%s; serving object %s without caching it", exc, object_id)

    def make_room(self, incoming: int) -> None:
        assert self.max_bytes is not None
        # The totals are read under the eviction lock: many writer threads that
        # find the cache full at once must not each evict the whole excess (that
        # emptied the cache down to a fraction of its limit, new objects included).
        with self._evict_lock:
            total, pinned, _ = self.index.totals()
            if total + incoming <= self.max_bytes:
                return
            if pinned + incoming > self.max_bytes:
                raise CacheFullError(
                    f"cache {self.directory} is full of pinned objects ({pinned} of {self.max_bytes} bytes)"
                )
            self._evict_locked(total + incoming - int(self.max_bytes * _LOW_WATERMARK))

    def evict(self, bytes_needed: int) -> int:
        """Delete least-recently-used unpinned objects; returns bytes freed."""
        with self._evict_lock:
            return self._evict_locked(bytes_needed)

    def _evict_locked(self, bytes_needed: int) -> int:
        if bytes_needed <= 0:
            return 0
        self.flush_touches()
        victims = self.index.eviction_candidates(bytes_needed)
        self._unlink_files(oid for oid, _size in victims)
        freed = self.index.remove_many(oid for oid, _ in victims)
        if freed:
            log.info("evicted %d objects (%d bytes) from %s", len(victims), freed, self.directory)
        return freed

    def remove(self, object_ids: Iterable[str]) -> int:
        ids = list(object_ids)
        self._unlink_files(ids)
        return self.index.remove_many(ids)

    def _unlink_files(self, object_ids: Iterable[str]) -> None:
        for object_id in object_ids:
            try:
                os.unlink(self.path(object_id))
            except FileNotFoundError:
                pass


@dataclass
class Counters:
    """What `snapfs status` and the Prometheus endpoint report."""

    memory_hits: int = 0
    disk_hits: int = 0
    misses: int = 0
    fetched_bytes: int = 0
    fetched_objects: int = 0
    verify_failures: int = 0
    fetch_errors: int = 0
    cache_write_failures: int = 0
    readahead_objects: int = 0
    #: Whole packs fetched for a packed miss (format.PackRef), and their other
    #: members queued for the cache with it: files a reader has not asked for yet.
    pack_fetches: int = 0
    pack_siblings: int = 0
    #: Misses failed at once because the store was known to be unavailable.
    fast_failures: int = 0
    #: Times a miss waited for cache writes to drain (WRITE_BACKLOG_BYTES).
    backlog_waits: int = 0
    #: Periodic syncfs calls that failed (the objects stay unsynced: a reboot drops them).
    cache_sync_failures: int = 0


class UnavailableStreak:
    """The rule that calls a store down: ``after`` fetches in a row failed as
    unavailable (StoreUnavailableError, retries spent), with no answer between
    them. "No such object" and wrong bytes are answers: the store is up. Used by
    the mount (ObjectSource) and by prewarm; not thread-safe by itself."""

    def __init__(self, after: int = OUTAGE_AFTER) -> None:
        self.after = after
        self.count = 0

    def record(self, error: BaseException | None) -> bool:
        """Note one fetch's outcome (None: it succeeded). True once the row is long
        enough to call the store down."""
        if error is None or isinstance(error, (NotFoundError, IntegrityError)):
            self.count = 0
        elif isinstance(error, StoreUnavailableError):
            self.count += 1
        return self.count >= self.after


@dataclass
class _Outage:
    """OUTAGE_AFTER fetches in a row found the store unavailable; it has not answered since."""

    since: float  # time.monotonic()
    error: str
    holdoff: float
    retry_at: float  # time.monotonic(): before this, misses fail at once
    probing: bool = False  # one fetch is testing the store; the others fail at once
    failed_fast: int = 0


class _Flight:
    __slots__ = ("done", "data", "error", "fetched")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.data: bytes | None = None
        self.error: BaseException | None = None
        self.fetched = False  # came from the store, not the disk cache


class ObjectSource:
    """Async, single-flight access to verified objects (trio; one per process).

    Call only from the trio thread. Use as ``async with ObjectSource(...) as source``.
    """

    def __init__(
        self,
        repo: Repo,
        cache: DiskCache,
        *,
        fetch_concurrency: int = 32,
        memory_bytes: int = 64 << 20,
        on_fetch=None,
        outage_after: int = OUTAGE_AFTER,
        outage_holdoff: float = OUTAGE_HOLDOFF,
    ) -> None:
        self.repo = repo
        self.cache = cache
        # Slots for misses; the threads run their fetches. Extra threads serve
        # fetches that take other slots (the snapdir source's big objects).
        self.fetch_limiter = trio.CapacityLimiter(fetch_concurrency)
        self.fetch_threads = WorkerThreads(fetch_concurrency + 4, "snapfs-fetch")
        self.disk_threads = WorkerThreads(8, "snapfs-disk")  # cache-file reads
        self.write_threads = WorkerThreads(4, "snapfs-write")  # cache writes and index updates
        self._pools = (self.fetch_threads, self.disk_threads, self.write_threads)
        self.memory_bytes = memory_bytes
        self._memory: OrderedDict[str, bytes] = OrderedDict()
        self._memory_used = 0
        self._flights: dict[str, _Flight] = {}
        self.waiting_reads = 0  # get() calls waiting on a flight (the disk or the store) right now
        #: Moving average (weight 0.1) of the wait for a fetch of an object of
        #: up to SMALL_OBJECT bytes: the store's latency as readers see it.
        self.small_fetch_seconds = 0.0
        self.counters = Counters()
        self.packs = PackFetcher(repo)
        self.on_fetch = on_fetch  # callback(seconds, nbytes) for metrics
        self._nursery: trio.Nursery | None = None
        self._prefetch_slots = trio.Semaphore(16)
        # Fetched and verified, waiting for their write-back: served from here,
        # so an object evicted from memory before it reaches the disk is not
        # fetched again (prefetch runs ahead of the cache writes). Its size is
        # the number of write-backs pending; _writes_idle is set when it empties.
        self._unwritten: dict[str, bytes] = {}
        self._write_queue: deque[tuple[str, bytes]] = deque()
        self._writers = 0  # _drain_writes tasks running
        self._unwritten_bytes = 0
        self._fetching_bytes = 0  # announced sizes of fetches in flight, counted against the same bound
        self.write_backlog_bytes = WRITE_BACKLOG_BYTES
        self._backlog_room = trio.lowlevel.ParkingLot()  # misses waiting for the backlog to drain
        self._writes_idle = trio.Event()
        self._writes_idle.set()
        self._last_index_error: str | None = None
        self._streak = UnavailableStreak(outage_after)
        self.outage_holdoff = outage_holdoff
        self._outage: _Outage | None = None

    async def __aenter__(self) -> ObjectSource:
        self._nursery_cm = trio.open_nursery()
        self._nursery = await self._nursery_cm.__aenter__()
        for pool in self._pools:
            pool.start()
        self._nursery.start_soon(self._flush_touches_forever)
        if self.cache.syncs_in_batches:
            self._nursery.start_soon(self._sync_forever)
        return self

    async def __aexit__(self, *exc) -> bool | None:
        assert self._nursery is not None
        try:
            try:
                # Verified bytes waiting to be written are worth keeping: let queued
                # write-backs finish (bounded) before cancelling everything else.
                # Shielded, so that even a cancelled exit gets here and then on to
                # closing the nursery: leaving it open corrupts trio's task tree.
                with trio.move_on_after(30) as waiting:
                    waiting.shield = True
                    await self._writes_idle.wait()
                if self._unwritten:
                    log.warning("leaving %d objects unwritten to the cache at shutdown", len(self._unwritten))
            finally:
                self._nursery.cancel_scope.cancel()
                result = await self._nursery_cm.__aexit__(*exc)
            await self._flush_touches()
            return result
        finally:
            for pool in self._pools:
                pool.close()

    async def _flush_touches_forever(self) -> None:
        while True:
            await trio.sleep(5)
            await self._flush_touches()

    async def _sync_forever(self) -> None:
        """Make the cache files written in the last SYNC_INTERVAL durable (one syncfs)."""
        failing = False
        while True:
            await trio.sleep(SYNC_INTERVAL)
            try:
                await self.write_threads.run(self.cache.sync_pending)
            except (OSError, CacheIndexError) as exc:
                self.counters.cache_sync_failures += 1
                if not failing:
                    log.warning(
                        "cannot sync cache %s: %s; a reboot will drop what it wrote",
                        self.cache.directory,
                        exc,
                    )
                failing = True
            else:
                failing = False

    async def _flush_touches(self) -> None:
        # LRU order is bookkeeping: a full disk must not take the mount down with it.
        try:
            await self.write_threads.run(self.cache.flush_touches)
        except CacheIndexError as exc:
            if str(exc) != self._last_index_error:
                log.warning("%s; last-access times are not being recorded", exc)
            self._last_index_error = str(exc)
        else:
            self._last_index_error = None

    # --- memory LRU (trio thread only) -----------------------------------

    def _remember(self, object_id: str, data: bytes) -> None:
        if len(data) > self.memory_bytes // 4 or object_id in self._memory:
            return
        self._memory[object_id] = data
        self._memory_used += len(data)
        while self._memory_used > self.memory_bytes:
            _, old = self._memory.popitem(last=False)
            self._memory_used -= len(old)

    # --- the read path ---------------------------------------------------

    async def get(self, object_id: str, what: str = "object", expected_size: int | None = None) -> bytes:
        """The verified bytes of an object. Raises NotFoundError, IntegrityError or
        StoreUnavailableError; never returns unverified bytes."""
        data, _fetched = await self.get_noting_fetch(object_id, what, expected_size)
        return data

    async def get_noting_fetch(
        self, object_id: str, what: str = "object", expected_size: int | None = None
    ) -> tuple[bytes, bool]:
        """Like get(), and also whether this call waited on a fetch from the store
        (a cold miss), rather than memory or the disk cache."""
        fetched = False
        data = self._memory.get(object_id)
        if data is not None:
            self._memory.move_to_end(object_id)
            self.counters.memory_hits += 1
        elif (data := self._unwritten.get(object_id)) is not None:
            self.counters.memory_hits += 1
        else:
            flight = self._flights.get(object_id)
            if flight is None:
                flight = self._start(object_id, what, expected_size)
            self.waiting_reads += 1
            try:
                await flight.done.wait()
            finally:
                self.waiting_reads -= 1
            if flight.error is not None:
                raise flight.error
            assert flight.data is not None
            data = flight.data
            fetched = flight.fetched
        # Checked for every caller: the bytes may have come from memory or from a
        # flight started for another ref to the same chunk, which may claim another
        # length. Served at the wrong length, they would shift a file's bytes.
        if expected_size is not None and len(data) != expected_size:
            self.counters.verify_failures += 1
            raise IntegrityError(f"{what} {object_id} is {len(data)} bytes, the tree says {expected_size}")
        return data, fetched

    def prefetch(
        self,
        object_id: str,
        what: str = "object",
        expected_size: int | None = None,
        *,
        from_store: bool = False,
    ) -> bool:
        """Start fetching in the background if not cached or in flight. Bounded: returns
        False when too many prefetches are already running, or the store is
        known to be unavailable. With ``from_store``, an object already in the
        disk cache is left there: reading it into memory early pays off only
        where the read follows soon (a sequential reader's next chunks), not
        for a guess at what a reader may want later (a small file's siblings)."""
        if object_id in self._memory or object_id in self._flights or object_id in self._unwritten:
            return True
        if from_store and self._maybe_cached(object_id):
            return True
        if self._outage is not None or self._backlog_full():
            return False
        try:
            self._prefetch_slots.acquire_nowait()
        except trio.WouldBlock:
            return False
        flight = self._start(object_id, what, expected_size)
        self.counters.readahead_objects += 1

        async def release_when_done() -> None:
            try:
                await flight.done.wait()
            finally:
                self._prefetch_slots.release()

        assert self._nursery is not None
        self._nursery.start_soon(release_when_done)
        return True

    def _start(self, object_id: str, what: str, expected_size: int | None) -> _Flight:
        flight = _Flight()
        self._flights[object_id] = flight
        assert self._nursery is not None, "ObjectSource used outside its async context"
        self._nursery.start_soon(self._fly, object_id, what, expected_size, flight)
        return flight

    def _maybe_cached(self, object_id: str) -> bool:
        """False if the index says the disk cache lacks the object: a cold miss
        then skips the disk thread's round trip (about 0.25 ms of CPU here, most
        of it waking threads) and goes straight to the store.

        An LMDB read on the trio thread: a lookup in a memory-mapped B-tree, a
        few microseconds. Every cached file is indexed (insert takes a file the
        index refuses back out), so "absent" is safe. A file that lost its entry
        in a crash is fetched once more, and its insert writes it again.
        """
        return self.cache.indexed(object_id)

    async def _fly(self, object_id: str, what: str, expected_size: int | None, flight: _Flight) -> None:
        try:
            data = None
            if self._maybe_cached(object_id):
                data = await self.disk_threads.run(self.cache.read, object_id)
            if data is not None:
                self.counters.disk_hits += 1
            else:
                self.counters.misses += 1
                flight.fetched = True
                if self._backlog_full():
                    self.counters.backlog_waits += 1
                    while self._backlog_full():
                        await self._backlog_room.park()
                announced = expected_size or 0
                self._fetching_bytes += announced
                started = time.monotonic()
                try:
                    async with self.fetch_limiter:
                        data, siblings = await self._fetch(
                            object_id, what, partial(self.packs.get, object_id, what, expected_size)
                        )
                finally:
                    self._fetching_bytes -= announced
                    self._wake_backlog_waiters()  # a failed fetch frees its share too
                elapsed = time.monotonic() - started
                if len(data) <= SMALL_OBJECT:
                    self.small_fetch_seconds += 0.1 * (elapsed - self.small_fetch_seconds)
                self.counters.fetched_bytes += len(data)
                self.counters.fetched_objects += 1
                if self.on_fetch:
                    self.on_fetch(elapsed, len(data))
                self._queue_write(object_id, data)
                if siblings:
                    self._take_siblings(siblings)
            if expected_size is not None and len(data) != expected_size:
                raise IntegrityError(
                    f"{what} {object_id} is {len(data)} bytes, the tree says {expected_size}"
                )
            self._remember(object_id, data)
            flight.data = data
        except IntegrityError as exc:
            self.counters.verify_failures += 1
            flight.error = exc
        except (NotFoundError, SnapfsError) as exc:
            self.counters.fetch_errors += 1
            flight.error = exc
        except Exception as exc:  # a bug or an unexpected library error: still fail the reader cleanly
            log.exception("unexpected error fetching %s %s", what, object_id)
            self.counters.fetch_errors += 1
            flight.error = SnapfsError(f"{what} {object_id}: {exc}")
        finally:
            del self._flights[object_id]
            flight.done.set()

    def _take_siblings(self, siblings: dict[str, bytes]) -> None:
        """Queue the verified members of a pack just fetched for the cache, and
        serve them from memory until they are written: the reader's next files
        are likely among them. Those cached, in memory or in flight are left."""
        self.counters.pack_fetches += 1
        for object_id, data in siblings.items():
            if (
                object_id in self._memory
                or object_id in self._unwritten
                or object_id in self._flights
                or self.cache.indexed(object_id)
            ):
                continue
            self._queue_write(object_id, data)
            self.counters.pack_siblings += 1

    # --- write backlog (WRITE_BACKLOG_BYTES) --------------------------------

    def _backlog_full(self) -> bool:
        return self._unwritten_bytes + self._fetching_bytes >= self.write_backlog_bytes

    def _wake_backlog_waiters(self) -> None:
        """After the backlog shrank: let parked misses go if there is room now."""
        if not self._backlog_full():
            self._backlog_room.unpark_all()

    @property
    def write_backlog(self) -> int:
        """Bytes fetched and verified, waiting for their cache write."""
        return self._unwritten_bytes

    # --- failure memory ----------------------------------------------------

    @property
    def store_unavailable_for(self) -> float:
        """Seconds since the store was found unavailable, 0.0 while it answers."""
        return 0.0 if self._outage is None else time.monotonic() - self._outage.since

    async def _fetch(self, object_id: str, what: str, fetch: Callable[[], T]) -> T:
        """``fetch()`` (a blocking store fetch) in a worker thread, or an immediate
        StoreUnavailableError while the store is known to be down (see
        OUTAGE_HOLDOFF). Callers hold their fetch slot (``fetch_limiter``, or the
        snapdir source's ``big_limiter``) around it, so the outage is checked
        after any wait for one. The snapdir source's whole-object fetches come
        through here too, so every read of the mount shares one failure memory.

        Without this memory a store that hangs costs every read its whole retry
        budget (attempts x read timeout), each kernel request of it again, and
        fills the fetch slots; with it, one probe at a time pays that cost and
        the other misses fail in microseconds with a line that says why.
        Objects in memory or in the disk cache are served as ever.
        """
        outage = self._outage
        probe = False
        if outage is not None:
            now = time.monotonic()
            if outage.probing or now < outage.retry_at:
                self.counters.fast_failures += 1
                outage.failed_fast += 1
                wait = max(outage.retry_at - now, 0.0)
                raise StoreUnavailableError(
                    f"{what} {object_id}: the store has been unavailable for {now - outage.since:.0f} s "
                    f"(next try in {wait:.1f} s): {outage.error}"
                )
            outage.probing = probe = True
        try:
            result = await self.fetch_threads.run(fetch)
        except StoreUnavailableError as exc:
            self._note_unavailable(exc, probe)
            raise
        except (NotFoundError, IntegrityError):
            self._note_answered()  # "missing" and wrong bytes are answers: the store is up
            raise
        except BaseException:
            if probe and self._outage is outage:
                outage.probing = False  # cancelled, or a bug: the next miss probes instead
            raise
        self._note_answered()
        return result

    def _note_unavailable(self, exc: StoreUnavailableError, probe: bool) -> None:
        now = time.monotonic()
        down = self._streak.record(exc)
        outage = self._outage
        if outage is None:
            if not down:
                return
            self._outage = _Outage(now, str(exc), self.outage_holdoff, now + self.outage_holdoff)
            log.warning(
                "store %s unavailable (%s); misses fail at once for %.0f s, then one fetch probes it",
                self.repo.url,
                exc,
                self.outage_holdoff,
            )
            return
        outage.error = str(exc)
        if probe:
            outage.probing = False
            outage.holdoff = min(outage.holdoff * 2, OUTAGE_HOLDOFF_MAX)
            outage.retry_at = now + outage.holdoff
            log.info("store %s still unavailable; next probe in %.0f s", self.repo.url, outage.holdoff)

    def _note_answered(self) -> None:
        self._streak.record(None)
        outage = self._outage
        if outage is not None:
            self._outage = None
            log.warning(
                "store %s answers again after %.0f s unavailable (%d misses failed at once)",
                self.repo.url,
                time.monotonic() - outage.since,
                outage.failed_fast,
            )

    def _queue_write(self, object_id: str, data: bytes) -> None:
        """Hand verified bytes to the cache writers, and serve them from
        ``_unwritten`` until they are written (trio thread)."""
        # A new Event only when idle: shutdown may already wait on the
        # current one, which must be the one set when writes drain.
        if self._writes_idle.is_set():
            self._writes_idle = trio.Event()
        self._unwritten[object_id] = data
        self._unwritten_bytes += len(data)
        self._write_queue.append((object_id, data))
        if self._writers < WRITERS:
            self._writers += 1
            assert self._nursery is not None
            self._nursery.start_soon(self._drain_writes)

    async def _drain_writes(self) -> None:
        """Write queued objects to the cache, up to WRITE_BATCH per worker-thread
        job: under load, one hand-off to a thread and back per batch instead of
        per object (see WRITERS)."""
        try:
            while self._write_queue:
                queue = self._write_queue
                batch = [queue.popleft()]
                size = len(batch[0][1])
                while queue and len(batch) < WRITE_BATCH and size + len(queue[0][1]) <= WRITE_BATCH_BYTES:
                    size += len(queue[0][1])
                    batch.append(queue.popleft())
                results: list[bool] = []
                try:
                    results = await self.write_threads.run(self._insert_batch, batch)
                finally:
                    self.counters.cache_write_failures += results.count(False)
                    for object_id, data in batch:
                        self._unwritten.pop(object_id, None)
                        self._unwritten_bytes -= len(data)
                    self._wake_backlog_waiters()
                    if not self._unwritten:
                        self._writes_idle.set()
        finally:
            self._writers -= 1

    def _insert_batch(self, batch: list[tuple[str, bytes]]) -> list[bool]:
        """Blocking (a write thread): cache the objects; False where one was not."""
        what = batch[0][0] if len(batch) == 1 else f"{batch[0][0]} and {len(batch) - 1} more"
        try:
            return self.cache.insert_many(batch, verified=True)
        except CacheFullError as exc:
            log.warning("%s; serving object %s without caching it", exc, what)
        except SnapfsError as exc:
            log.warning("cannot cache object %s: %s", what, exc)
        except Exception:  # a bug: caching is an optimisation, never a reason to stop serving
            log.exception("bug: unexpected error caching object %s", what)
        return [False] * len(batch)
