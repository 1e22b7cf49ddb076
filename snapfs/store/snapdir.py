"""A read-only view of a store written by the ``snapdir`` package: ``snapdir+file://`` and ``snapdir+s3://``.

The inner store is an ordinary LocalStore or S3Store on the snapdir layout
(``.manifests/…`` and ``.objects/…``; docs/SNAPDIR.md §5). This wrapper only
marks the store as snapdir-shaped, so ``Repo.open`` hands it to
:class:`snapfs.snapdir_repo.SnapdirRepo`, and refuses every write: the user's
snapdir bucket is theirs, and snapfs must never drop its own keys (``locks/``,
``snapfs.json``, ``snapshots/``) into it.

Opening a ``snapdir+file://`` store never creates a directory: a mistyped path
is an error, not a new empty store.

Thread-safe as far as the inner store is (both backends are).
"""

from __future__ import annotations

from collections.abc import Iterator

from ..errors import UsageError
from .base import ObjectInfo, Store
from .local import LocalStore

SCHEME_PREFIX = "snapdir+"


def is_snapdir_url(url: str | None) -> bool:
    return bool(url) and url.startswith(SCHEME_PREFIX)  # type: ignore[union-attr]


class SnapdirStore(Store):
    """Delegates reads to ``inner``; every write raises UsageError."""

    #: Marker read by Repo.open (a duck-typed flag rather than an import, so the
    #: repo layer does not depend on this module).
    snapdir = True

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.url = SCHEME_PREFIX + inner.url
        # The mount refuses a mountpoint inside a local store; expose its root.
        self.root: str | None = getattr(inner, "root", None)

    @classmethod
    def from_url(cls, url: str, *, endpoint_url: str | None = None) -> SnapdirStore:
        if not is_snapdir_url(url):
            raise UsageError(f"not a snapdir store URL: {url!r}")
        inner_url = url[len(SCHEME_PREFIX) :]
        if inner_url.startswith("file://"):
            path = inner_url[len("file://") :]
            if not path.startswith("/"):
                raise UsageError(f"snapdir file store URL must be absolute: {url}")
            return cls(LocalStore(path, create=False))
        if inner_url.startswith("s3://"):
            from .s3 import S3Store

            return cls(S3Store.from_url(inner_url, endpoint_url=endpoint_url))
        raise UsageError(
            f"unsupported snapdir store URL {url!r} (use snapdir+file:///PATH or snapdir+s3://BUCKET/PREFIX)"
        )

    def _read_only(self, key: str) -> UsageError:
        return UsageError(
            f"{key}: {self.url} is a snapdir store, which snapfs only reads "
            "(copy it into a snapfs store with `snapfs import`)"
        )

    def get(self, key: str, start: int = 0, length: int | None = None) -> bytes:
        return self.inner.get(key, start, length)

    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        raise self._read_only(key)

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def stat(self, key: str) -> ObjectInfo:
        return self.inner.stat(key)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        return self.inner.list(prefix)

    def delete(self, key: str) -> None:
        raise self._read_only(key)

    def close(self) -> None:
        self.inner.close()
