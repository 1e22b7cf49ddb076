"""The cache index in LMDB: the only module that imports lmdb.

One environment per cache directory, opened separately by every process that
uses the cache (the daemon, prewarms, ``snapfs cache``). LMDB serialises write
transactions across processes, so the totals stay exact however many writers
there are. Transactions are short and never held across an ``await``: every
method opens and commits its own. Methods block; async callers run them in
worker threads.

Databases:
    objects  object_id(32) -> size u64 | atime u64 (seconds) | pins u32
    lru      atime u64 | object_id(32) -> b""        (oldest first)
    pins     pin_name NUL object_id(32) -> b""       (what each pin holds)
    meta     b"total" -> u64 bytes indexed; b"pinned" -> u64 bytes pinned;
             b"boot" -> the boot ID under which the ``unsynced`` entries were written
    unsynced object_id(32) -> b""        (indexed, but the file may not be on disk yet)
    names    name -> snapshot_id (names never move, so they can be remembered offline)
    snaps    snapshot_id -> u64 last time it was prewarmed or opened by a mount
"""

from __future__ import annotations

import errno
import os
import struct
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import lmdb

from .errors import CacheFullError, CacheIndexError, SnapfsError

_OBJ = struct.Struct(">QQI")
_U64 = struct.Struct(">Q")
_MAP_SIZE = 1 << 40  # sparse; only what is used takes disk space
_MAX_READERS = 512


@dataclass(frozen=True)
class IndexedObject:
    object_id: str
    size: int
    atime: int
    pins: int


def _key(object_id: str) -> bytes:
    return bytes.fromhex(object_id)


class CacheIndex:
    def __init__(self, path: str) -> None:
        self.path = path
        os.makedirs(path, exist_ok=True)
        try:
            self.env = lmdb.open(
                path,
                map_size=_MAP_SIZE,
                max_dbs=8,
                max_readers=_MAX_READERS,
                subdir=True,
                # Durability of the index is not needed for correctness: an
                # object counts as cached only once its file and its entry are
                # both there, and a file without an entry is written again (see
                # DiskCache). A lost entry costs a fetch, never a wrong byte.
                sync=False,
                metasync=False,
                lock=True,
            )
        except lmdb.Error as exc:
            raise SnapfsError(f"cannot open cache index {path}: {exc}") from exc
        self.objects = self.env.open_db(b"objects")
        self.lru = self.env.open_db(b"lru")
        self.pins = self.env.open_db(b"pins")
        self.meta = self.env.open_db(b"meta")
        self.names = self.env.open_db(b"names")
        self.snaps = self.env.open_db(b"snaps")
        self.unsynced = self.env.open_db(b"unsynced")

    def close(self) -> None:
        try:
            self.env.sync(True)
        except lmdb.Error:
            pass  # nothing to lose: the index is not needed for correctness (see above)
        self.env.close()

    @contextmanager
    def _begin(self, write: bool = False):
        """A transaction whose LMDB errors (a full disk fails the commit) come out as
        CacheIndexError, which callers that can live without the index catch."""
        try:
            with self.env.begin(write=write) as txn:
                yield txn
        except lmdb.Error as exc:
            # LMDB reports a failed page write as EIO; say what it usually is.
            try:
                full = os.statvfs(self.path).f_bavail == 0
            except OSError:
                full = False
            full = full or getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT)
            reason = "its disk is full (no space left on device)" if full else str(exc)
            raise CacheIndexError(f"cache index {self.path}: {reason}", disk_full=full) from exc

    # --- helpers run inside a transaction --------------------------------

    def _get_total(self, txn, key: bytes) -> int:
        raw = txn.get(key, db=self.meta)
        return _U64.unpack(raw)[0] if raw else 0

    def _add_total(self, txn, key: bytes, delta: int) -> None:
        txn.put(key, _U64.pack(max(0, self._get_total(txn, key) + delta)), db=self.meta)

    # --- queries ---------------------------------------------------------

    def get(self, object_id: str) -> IndexedObject | None:
        with self._begin() as txn:
            raw = txn.get(_key(object_id), db=self.objects)
        if raw is None:
            return None
        size, atime, pins = _OBJ.unpack(raw)
        return IndexedObject(object_id, size, atime, pins)

    def contains(self, object_id: str) -> bool:
        with self._begin() as txn:
            return txn.get(_key(object_id), db=self.objects) is not None

    def contains_many(self, object_ids: Iterable[str]) -> set[str]:
        with self._begin() as txn:
            return {oid for oid in object_ids if txn.get(_key(oid), db=self.objects) is not None}

    def totals(self) -> tuple[int, int, int]:
        """(bytes indexed, bytes pinned, objects indexed)."""
        with self._begin() as txn:
            entries = txn.stat(self.objects)["entries"]
            return self._get_total(txn, b"total"), self._get_total(txn, b"pinned"), entries

    def iter_objects(self) -> Iterator[IndexedObject]:
        with self._begin() as txn:
            for key, raw in txn.cursor(db=self.objects):
                size, atime, pins = _OBJ.unpack(raw)
                yield IndexedObject(key.hex(), size, atime, pins)

    # --- updates ---------------------------------------------------------

    def add(
        self, object_id: str, size: int, pin: str | None = None, *, unsynced_boot: bytes | None = None
    ) -> None:
        """Record an object after its file has been renamed into place."""
        self.add_many([(object_id, size)], pin=pin, unsynced_boot=unsynced_boot)

    def add_many(
        self, items: Iterable[tuple[str, int]], pin: str | None = None, *, unsynced_boot: bytes | None = None
    ) -> None:
        """Record objects. With ``unsynced_boot`` (this boot's ID) their files are
        not yet known to be on disk: they stay in ``unsynced`` until mark_synced_keys."""
        now = int(time.time())
        with self._begin(write=True) as txn:
            if unsynced_boot is not None and txn.get(b"boot", db=self.meta) != unsynced_boot:
                txn.put(b"boot", unsynced_boot, db=self.meta)
            for object_id, size in items:
                key = _key(object_id)
                if unsynced_boot is not None:
                    txn.put(key, b"", db=self.unsynced)
                raw = txn.get(key, db=self.objects)
                if raw is None:
                    pins = 0
                    self._add_total(txn, b"total", size)
                else:
                    size, old_atime, pins = _OBJ.unpack(raw)
                    txn.delete(_U64.pack(old_atime) + key, db=self.lru)
                if pin is not None and txn.put(
                    pin.encode() + b"\0" + key, b"", db=self.pins, overwrite=False
                ):
                    if pins == 0:
                        self._add_total(txn, b"pinned", size)
                    pins += 1
                txn.put(key, _OBJ.pack(size, now, pins), db=self.objects)
                txn.put(_U64.pack(now) + key, b"", db=self.lru)

    def touch_many(self, object_ids: Iterable[str], when: int | None = None) -> None:
        """Move objects to the young end of the LRU (batched by the caller)."""
        now = int(when if when is not None else time.time())
        with self._begin(write=True) as txn:
            for key, size, atime, pins in self._indexed(txn, object_ids):
                if atime == now:
                    continue
                txn.delete(_U64.pack(atime) + key, db=self.lru)
                txn.put(_U64.pack(now) + key, b"", db=self.lru)
                txn.put(key, _OBJ.pack(size, now, pins), db=self.objects)

    def remove_many(self, object_ids: Iterable[str]) -> int:
        """Forget objects (their files are deleted by the caller); returns bytes freed."""
        with self._begin(write=True) as txn:
            return self._remove_in(txn, object_ids)

    def _indexed(self, txn, object_ids: Iterable[str]) -> Iterator[tuple[bytes, int, int, int]]:
        """(key, size, atime, pins) of those of ``object_ids`` the index holds."""
        for object_id in object_ids:
            key = _key(object_id)
            raw = txn.get(key, db=self.objects)
            if raw is not None:
                yield (key, *_OBJ.unpack(raw))

    def _remove_in(self, txn, object_ids: Iterable[str]) -> int:
        freed = 0
        for key, size, atime, pins in self._indexed(txn, object_ids):
            txn.delete(key, db=self.objects)
            txn.delete(_U64.pack(atime) + key, db=self.lru)
            txn.delete(key, db=self.unsynced)
            self._add_total(txn, b"total", -size)
            if pins:
                self._add_total(txn, b"pinned", -size)
                cursor = txn.cursor(db=self.pins)
                for pin_key in [k for k, _ in cursor if k.endswith(b"\0" + key)]:
                    txn.delete(pin_key, db=self.pins)
            freed += size
        return freed

    # --- durability of the files (DiskCache.sync_pending) -------------------

    def unsynced_count(self) -> int:
        with self._begin() as txn:
            return txn.stat(self.unsynced)["entries"]

    def unsynced_ids(self) -> list[str]:
        return [key.hex() for key in self.unsynced_keys()]

    def unsynced_keys(self, limit: int | None = None) -> list[bytes]:
        """Raw keys of (up to ``limit``) unsynced objects, in key order."""
        with self._begin() as txn:
            out = []
            for key, _ in txn.cursor(db=self.unsynced):
                if limit is not None and len(out) >= limit:
                    break
                out.append(key)
            return out

    def mark_synced_keys(self, keys: Iterable[bytes]) -> None:
        with self._begin(write=True) as txn:
            for key in keys:
                txn.delete(key, db=self.unsynced)

    def take_unsynced_from_another_boot(self, boot: bytes) -> list[str]:
        """After a reboot: forget the objects whose files were never synced (a power
        loss may have left them short or empty), in one transaction, and return
        their IDs for the caller to delete the files. Empty when the entries are
        this boot's: a crashed process leaves its writes in the page cache,
        which the kernel still writes back."""
        with self._begin(write=True) as txn:
            stored = txn.get(b"boot", db=self.meta)
            if stored is None or stored == boot:
                return []
            txn.put(b"boot", boot, db=self.meta)
            ids = [key.hex() for key, _ in txn.cursor(db=self.unsynced)]
            self._remove_in(txn, ids)
            txn.drop(self.unsynced, delete=False)
        return ids

    def eviction_candidates(self, bytes_needed: int, limit: int = 100_000) -> list[tuple[str, int]]:
        """Oldest unpinned objects adding up to at least ``bytes_needed``."""
        out: list[tuple[str, int]] = []
        total = 0
        with self._begin() as txn:
            for key, _ in txn.cursor(db=self.lru):
                if total >= bytes_needed or len(out) >= limit:
                    break
                object_key = key[8:]
                raw = txn.get(object_key, db=self.objects)
                if raw is None:
                    continue
                size, _atime, pins = _OBJ.unpack(raw)
                if pins:
                    continue
                out.append((object_key.hex(), size))
                total += size
        return out

    # --- pins ------------------------------------------------------------

    def check_pin_fits(self, new_bytes: int, capacity: int) -> None:
        _total, pinned, _n = self.totals()
        if pinned + new_bytes > capacity:
            raise CacheFullError(
                f"pinning {new_bytes} more bytes would exceed the cache size {capacity} "
                f"({pinned} bytes already pinned); unpin something or raise --cache-size"
            )

    def unpin(self, pin: str) -> int:
        """Drop a pin; returns the number of objects it held."""
        prefix = pin.encode() + b"\0"
        released = 0
        with self._begin(write=True) as txn:
            cursor = txn.cursor(db=self.pins)
            keys = []
            if cursor.set_range(prefix):
                for key, _ in cursor:
                    if not key.startswith(prefix):
                        break
                    keys.append(key)
            for key in keys:
                txn.delete(key, db=self.pins)
                object_key = key[len(prefix) :]
                raw = txn.get(object_key, db=self.objects)
                if raw is None:
                    continue
                size, atime, pins = _OBJ.unpack(raw)
                pins = max(0, pins - 1)
                if pins == 0:
                    self._add_total(txn, b"pinned", -size)
                txn.put(object_key, _OBJ.pack(size, atime, pins), db=self.objects)
                released += 1
        return released

    def pinned_subset(self, object_ids: Iterable[str]) -> set[str]:
        """Those of ``object_ids`` that some pin holds."""
        with self._begin() as txn:
            out = set()
            for object_id in object_ids:
                raw = txn.get(_key(object_id), db=self.objects)
                if raw is not None and _OBJ.unpack(raw)[2]:
                    out.add(object_id)
            return out

    def pin_names(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        with self._begin() as txn:
            for key, _ in txn.cursor(db=self.pins):
                name = key.split(b"\0", 1)[0].decode()
                counts[name] = counts.get(name, 0) + 1
        return counts

    # --- names -----------------------------------------------------------

    def remember_name(self, name: str, snapshot_id: str) -> None:
        with self._begin(write=True) as txn:
            txn.put(name.encode(), snapshot_id.encode(), db=self.names)

    def recall_name(self, name: str) -> str | None:
        with self._begin() as txn:
            raw = txn.get(name.encode(), db=self.names)
        return raw.decode() if raw else None

    # --- snapshots seen on this node ---------------------------------------

    def remember_snapshot(self, snapshot_id: str) -> None:
        with self._begin(write=True) as txn:
            txn.put(snapshot_id.encode(), _U64.pack(int(time.time())), db=self.snaps)

    def known_snapshots(self) -> dict[str, int]:
        with self._begin() as txn:
            return {k.decode(): _U64.unpack(v)[0] for k, v in txn.cursor(db=self.snaps)}

    def clear(self) -> None:
        with self._begin(write=True) as txn:
            for db in (self.objects, self.lru, self.pins, self.meta, self.snaps, self.unsynced):
                txn.drop(db, delete=False)
