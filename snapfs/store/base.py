"""The Store interface: a tiny, synchronous key/value view of an object store.

Keys are relative, slash-separated strings such as ``objects/ab/cdef…``,
``records/<id>`` or ``names/<name>``. A Store knows nothing about hashes or
trees; verification lives one level up in :mod:`snapfs.repo`.

Every method may be called from any thread; implementations must be
thread-safe. Methods are blocking: async callers run them in worker threads.

Errors: a missing key raises :class:`snapfs.errors.NotFoundError`; an
unreachable or failing backend raises
:class:`snapfs.errors.StoreUnavailableError` once retries are exhausted.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    mtime: float  # seconds since the epoch, as the backend reports it


class Store(abc.ABC):
    """A flat namespace of immutable-by-convention blobs."""

    #: The URL this store was opened from, with any credentials removed.
    url: str

    @abc.abstractmethod
    def get(self, key: str, start: int = 0, length: int | None = None) -> bytes:
        """Return the bytes of ``key``, or ``length`` bytes from ``start``."""

    @abc.abstractmethod
    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        """Write ``data`` at ``key`` atomically (a reader sees all or nothing).

        With ``if_absent=True`` the write happens only if the key does not yet
        exist, atomically where the backend supports it (S3 ``If-None-Match:
        *``, ``O_EXCL``/link on a filesystem). Returns True if this call
        created the key, False if it already existed (and nothing was written).
        Without ``if_absent`` it always writes and returns True.
        """

    @abc.abstractmethod
    def exists(self, key: str) -> bool:
        """True if ``key`` exists."""

    @abc.abstractmethod
    def stat(self, key: str) -> ObjectInfo:
        """Size and mtime of ``key``; NotFoundError if it does not exist."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every key starting with ``prefix``, in no particular order."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key``; deleting a missing key is not an error."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections and pools."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"
