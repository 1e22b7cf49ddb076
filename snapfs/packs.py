"""Packs of small objects (format.PackRef, docs/FORMAT.md §11a): writing them
(push, sync) and reading them a whole pack at a time, for readers that will
want the neighbours too (the mount, prewarm, pull, sync).

``Repo.get_object`` reads one packed object with a ranged GET of its pack: right
for ``cat``, and for a reader that wants one file. A reader going through a
dataset wants the rest of the pack soon, and one GET of 4 MiB costs little
more than one of 50 KB: on the loopback SeaweedFS here a small GET is about
1 ms of the server's CPU, whatever its size up to a few hundred KB.

Thread-safe. Several threads asking for objects of one pack fetch it once:
the first fetches, the others wait and take their bytes from its result. The
members of the last packs fetched are kept (``keep_bytes``, verified), and an
object found there costs no request at all, not even for its reference.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Executor

from . import format as fmt
from .errors import IntegrityError
from .repo import Repo

#: Objects from PACK_MIN to PACK_OBJECT_MAX bytes are uploaded PACK_TARGET
#: bytes (at most PACK_MAX_MEMBERS objects) to a pack, in upload order, so a
#: directory's small files share a few packs. 4 MiB is one GET of about 10 ms
#: on the loopback SeaweedFS here, for about 80 files of 50 KB that cost a GET
#: each unpacked; it is also what a reader fetches for the first file it
#: misses. Below PACK_MIN a reference (57 bytes) would outweigh the object.
PACK_TARGET = 4 << 20
PACK_OBJECT_MAX = 256 << 10
PACK_MIN = 128
PACK_MAX_MEMBERS = 1024
#: Whole-pack fetches at once per PackFetcher: each holds a pack two or three
#: times over while it is read, split and verified, and 8 x 4 MiB in flight
#: already keeps a store busy (the loopback SeaweedFS read packs as fast with 4).
PACKS_IN_FLIGHT = 8


def packable(length: int) -> bool:
    return PACK_MIN <= length <= PACK_OBJECT_MAX


def pack_batches(lengths: dict[str, int]) -> tuple[list[list[str]], list[str]]:
    """The objects to upload (ID -> length, in upload order) split into
    pack-sized batches of small ones, in order, and the rest.

    Give it only objects the store lacks: a batch that finds most of its
    members present uploads the rest one by one (a re-push's few changed
    files would each ride alone)."""
    batches: list[list[str]] = []
    rest: list[str] = []
    batch: list[str] = []
    size = 0
    for object_id, length in lengths.items():
        if not packable(length):
            rest.append(object_id)
            continue
        batch.append(object_id)
        size += length
        if size >= PACK_TARGET or len(batch) >= PACK_MAX_MEMBERS:
            batches.append(batch)
            batch, size = [], 0
    if batch:
        batches.append(batch)
    return batches, rest


def plan_packs(
    lengths: dict[str, int],
    present: Callable[[str], bool],
    pool: Executor,
    on_present: Callable[[str, int], None],
) -> tuple[list[list[str]], list[str]]:
    """pack_batches of the objects to upload (ID -> length, in upload order),
    after asking ``present`` (in ``pool``) which small ones the store has
    already: those are handed to ``on_present(ID, length)`` and left out. The
    rest (big ones) are returned unasked, for the caller's own check."""
    small = [object_id for object_id, length in lengths.items() if packable(length)]
    there = {object_id for object_id, yes in zip(small, pool.map(present, small), strict=True) if yes}
    for object_id in there:
        on_present(object_id, lengths[object_id])
    return pack_batches({object_id: n for object_id, n in lengths.items() if object_id not in there})


def put_objects(repo: Repo, objects: list[tuple[str, bytes]]) -> bool:
    """Upload objects the store lacks (checked by the caller, under the push
    lock): two or more as a pack and a reference each, the pack first; one as
    itself. True if a pack was written."""
    if len(objects) == 1:
        repo.put_new_object(objects[0][1], objects[0][0])
        return False
    if not objects:
        return False
    blob, refs = fmt.encode_pack(objects)
    repo.put_pack(blob, refs[0].pack_id)  # before any reference to it
    for (object_id, _data), ref in zip(objects, refs, strict=True):
        repo.put_new_object(fmt.encode_pack_ref(ref), object_id)
    return True


class _PackFlight:
    __slots__ = ("done", "members")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.members: dict[str, bytes] | None = None


class PackFetcher:
    def __init__(self, repo: Repo, keep_bytes: int = 32 << 20) -> None:
        self.repo = repo
        self.keep_bytes = keep_bytes
        self._lock = threading.Lock()
        self._flights: dict[str, _PackFlight] = {}
        self._recent: OrderedDict[str, dict[str, bytes]] = OrderedDict()
        self._recent_bytes = 0
        self._member_pack: dict[str, str] = {}  # member of a pack in _recent -> that pack
        self._in_flight = threading.BoundedSemaphore(PACKS_IN_FLIGHT)
        self.packs_fetched = 0
        self.pack_bytes = 0

    def get(
        self, object_id: str, what: str = "object", size: int | None = None
    ) -> tuple[bytes, dict[str, bytes]]:
        """An object's verified bytes, and its pack's other verified members if this
        call fetched that pack (the caller caches them; other calls get {})."""
        with self._lock:
            pack_id = self._member_pack.get(object_id)
            if pack_id is not None:
                self._recent.move_to_end(pack_id)
                data = self._recent[pack_id][object_id]
                if size is None or len(data) == size:
                    return data, {}
        found = self.repo.get_object_or_ref(object_id, what, size)
        if not isinstance(found, fmt.PackRef):
            return found, {}
        members, fetched = self._pack(found, what)
        data = members.get(object_id)
        if data is None:
            # Not in the pack, or corrupt there: the ranged read tries again and
            # raises IntegrityError with the reason.
            data = self.repo.get_packed(object_id, found, what)
        siblings = {k: v for k, v in members.items() if k != object_id} if fetched else {}
        return data, siblings

    def get_chunk(self, chunk_id: str, length: int) -> bytes:
        """Repo.get_chunk through the packs."""
        data, _siblings = self.get(chunk_id, "chunk", length)
        if len(data) != length:
            raise IntegrityError(f"chunk {chunk_id} is {len(data)} bytes, the tree says {length}")
        return data

    def _pack(self, ref: fmt.PackRef, what: str) -> tuple[dict[str, bytes], bool]:
        with self._lock:
            members = self._recent.get(ref.pack_id)
            if members is not None:
                self._recent.move_to_end(ref.pack_id)
                return members, False
            flight = self._flights.get(ref.pack_id)
            mine = flight is None
            if flight is None:
                flight = self._flights[ref.pack_id] = _PackFlight()
        if not mine:
            flight.done.wait()
            # The fetching thread failed: {} sends this caller to the ranged read.
            return flight.members or {}, False
        try:
            with self._in_flight:
                members = self.repo.fetch_pack(ref, what)
        except BaseException:
            with self._lock:
                del self._flights[ref.pack_id]
            flight.done.set()
            raise
        size = sum(len(v) for v in members.values())
        with self._lock:
            flight.members = members
            del self._flights[ref.pack_id]
            self.packs_fetched += 1
            self.pack_bytes += size
            if size <= self.keep_bytes and ref.pack_id not in self._recent:
                self._recent[ref.pack_id] = members
                self._recent_bytes += size
                for member_id in members:
                    self._member_pack[member_id] = ref.pack_id
                while self._recent_bytes > self.keep_bytes:
                    old_id, old = self._recent.popitem(last=False)
                    self._recent_bytes -= sum(len(v) for v in old.values())
                    for member_id in old:
                        if self._member_pack.get(member_id) == old_id:
                            del self._member_pack[member_id]
        flight.done.set()
        return members, True
