"""The mount's object source for snapdir stores: synthesized trees and whole-object reads.

A snapdir file is one object of any size, named by the BLAKE3 of its
content (docs/SNAPDIR.md). The mount reads it like a one-chunk snapfs file,
with two differences handled here:

- **Trees** are not stored objects. ``load_tree`` asks SnapdirRepo (in a worker
  thread) for the decoded entries of a snapshot's root (by snapdir ID) or of a
  synthesized directory; SnapshotFS takes it as its ``tree_loader``.
- **Large objects.** Objects up to SMALL_OBJECT go through ObjectSource as
  usual (memory LRU, disk cache, verified fetch). A larger one is fetched once
  into the disk cache (parallel ranged GETs into a temp file, hashed whole,
  renamed only when the hash matches; SNAPDIR.md §8 explains why not Bao
  ranges) and served from a read-only memory map of that verified file, so a
  4 KiB read of a 500 MiB file copies 4 KiB, not the file. An object above
  ``max_object`` (``--snapdir-max-object``, default 1 GiB) is refused: the
  read gets EIO and the log says to use ``snapfs import``.

Concurrency: everything here runs on the trio thread except the marked
thread work. Big-object fetches are single-flight per object like
ObjectSource's, in the source's own nursery. Maps are dropped from the LRU
without being closed: a reader that already got one slices it right after its
await returns, and CPython unmaps it when the last reference goes.
"""

from __future__ import annotations

import logging
import mmap
import os
import threading
import time
from collections import OrderedDict
from functools import partial

import trio

from . import snapdir as sd
from .cache import DiskCache, ObjectSource
from .errors import IntegrityError, NotFoundError, SnapfsError
from .format import MAX_CHUNK_SIZE, Entry
from .snapdir_repo import SnapdirRepo, fetch_object_to_fd, too_large_error

log = logging.getLogger(__name__)

#: Objects up to this size take ObjectSource's ordinary path (they fit its memory LRU).
SMALL_OBJECT = MAX_CHUNK_SIZE
_MAPPED_OBJECTS = 64
_PARTS_PER_OBJECT = 8
_BIG_FETCHES = 4


class _BigFlight:
    __slots__ = ("done", "mapped", "error")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.mapped: mmap.mmap | None = None
        self.error: BaseException | None = None


def _map_file(path: str) -> mmap.mmap:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return mmap.mmap(fd, 0, prot=mmap.PROT_READ)
    finally:
        os.close(fd)  # the map keeps its own reference to the file


def map_cached(cache: DiskCache, object_id: str) -> mmap.mmap | None:
    """A read-only map of the object's verified file in the disk cache, or None.
    Blocking: call in a worker thread. Only an indexed file is trusted (see
    DiskCache.is_cached); an unindexed one is fetched and written again."""
    if not cache.indexed(object_id):
        return None  # ask the store
    try:
        mapped = _map_file(cache.path(object_id))
    except FileNotFoundError:
        return None
    cache.touch(object_id)
    return mapped


def fetch_into_cache(repo: SnapdirRepo, cache: DiskCache, object_id: str) -> mmap.mmap:
    """Fetch the object into the disk cache; a read-only map of the verified file.

    Blocking: call in a worker thread. Same crash rules as DiskCache.insert:
    temp file, fetched and verified, synced (DiskCache.sync_file), renamed, then indexed.
    """
    path = cache.path(object_id)
    # The object's own size, not the manifest's: the caller compares the two.
    try:
        size = repo.store.stat(sd.object_key(object_id)).size
    except NotFoundError as exc:
        raise NotFoundError(f"snapdir object {object_id}: missing from {repo.url}") from exc
    if size > repo.max_object:
        raise too_large_error(object_id, size, repo.max_object)
    if cache.max_bytes is not None:
        if size > cache.max_bytes:
            raise SnapfsError(
                f"snapdir object {object_id} is {size} bytes, more than the whole cache ({cache.max_bytes}); "
                "use `snapfs import` to read it lazily in chunks"
            )
        cache.make_room(size)
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".tmp-{os.getpid()}-{threading.get_ident()}-{object_id[:16]}")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        fetch_object_to_fd(repo.store, object_id, fd, size=size, jobs=_PARTS_PER_OBJECT)
        cache.sync_file(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.rename(tmp, path)
    mapped = _map_file(path)
    cache.index_new_file(object_id, size)  # if refused, the map alone serves it
    return mapped


class SnapdirObjectSource(ObjectSource):
    """ObjectSource plus ``load_tree`` and memory-mapped whole objects (see the module docstring)."""

    def __init__(self, repo: SnapdirRepo, cache: DiskCache, **kwargs) -> None:
        super().__init__(repo, cache, **kwargs)
        self.snapdir_repo = repo
        self.max_object = repo.max_object
        self.tree_limiter = trio.CapacityLimiter(4)
        # Each big fetch runs its own ranged GETs in parallel: bound how many at once.
        self.big_limiter = trio.CapacityLimiter(_BIG_FETCHES)
        self._maps: OrderedDict[str, mmap.mmap] = OrderedDict()
        self._big_flights: dict[str, _BigFlight] = {}

    async def load_tree(self, tree_id: str, where: str) -> list[Entry]:
        # The first call for a snapshot reads its manifest and stats small
        # objects: seconds on a big S3 store, so never on the trio thread.
        return await trio.to_thread.run_sync(
            self.snapdir_repo.get_tree, tree_id, where, limiter=self.tree_limiter
        )

    async def get_noting_fetch(self, object_id: str, what: str = "object", expected_size: int | None = None):
        """Verified bytes, or for a large object a read-only map of its verified cache
        file; with False for "fetched", as a large file is no small file's sibling."""
        if expected_size is None or expected_size <= SMALL_OBJECT:
            return await super().get_noting_fetch(object_id, what, expected_size)
        mapped = self._maps.get(object_id)
        if mapped is not None:
            self._maps.move_to_end(object_id)
            self.counters.memory_hits += 1
        else:
            if expected_size > self.max_object:
                self.counters.fetch_errors += 1
                raise too_large_error(object_id, expected_size, self.max_object)
            flight = self._big_flights.get(object_id)
            if flight is None:
                flight = _BigFlight()
                self._big_flights[object_id] = flight
                assert self._nursery is not None, "SnapdirObjectSource used outside its async context"
                self._nursery.start_soon(self._fly_big, object_id, flight)
            await flight.done.wait()
            if flight.error is not None:
                raise flight.error
            assert flight.mapped is not None
            mapped = flight.mapped
        # Checked for every caller: two manifest lines may claim different sizes
        # for one checksum (a hostile manifest); the object's own length decides.
        if len(mapped) != expected_size:
            self.counters.verify_failures += 1
            raise IntegrityError(
                f"snapdir object {object_id} is {len(mapped)} bytes, the manifest says {expected_size}"
            )
        return mapped, False

    async def _fly_big(self, object_id: str, flight: _BigFlight) -> None:
        try:
            mapped = await self.disk_threads.run(map_cached, self.cache, object_id)
            if mapped is not None:
                self.counters.disk_hits += 1
            else:
                self.counters.misses += 1
                started = time.monotonic()
                # Through the failure memory: while the store is known to be down
                # this fails at once instead of paying every ranged GET's retries.
                # The slot is taken first, as _fly does, so a fetch that waited
                # behind hung ones sees an outage found meanwhile.
                async with self.big_limiter:
                    mapped = await self._fetch(
                        object_id,
                        "snapdir object",
                        partial(fetch_into_cache, self.snapdir_repo, self.cache, object_id),
                    )
                size = len(mapped)
                self.counters.fetched_bytes += size
                self.counters.fetched_objects += 1
                if self.on_fetch:
                    self.on_fetch(time.monotonic() - started, size)
            self._maps[object_id] = mapped
            while len(self._maps) > _MAPPED_OBJECTS:
                self._maps.popitem(last=False)  # not closed: see the module docstring
            flight.mapped = mapped
        except IntegrityError as exc:
            self.counters.verify_failures += 1
            flight.error = exc
        except (NotFoundError, SnapfsError) as exc:
            self.counters.fetch_errors += 1
            flight.error = exc
        except Exception as exc:  # a bug or an unexpected library error: still fail the reader cleanly
            log.exception("unexpected error fetching snapdir object %s", object_id)
            self.counters.fetch_errors += 1
            flight.error = SnapfsError(f"snapdir object {object_id}: {exc}")
        finally:
            del self._big_flights[object_id]
            flight.done.set()
