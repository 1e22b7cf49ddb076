"""Object stores: ``open_store(url)`` picks the backend from the URL.

- ``file:///abs/path``, or a plain path: :class:`LocalStore`
- ``s3://bucket/prefix``: :class:`S3Store` (endpoint from ``--endpoint-url`` or
  ``AWS_ENDPOINT_URL``; credentials from boto3's standard chain)
- ``snapdir+file:///path``, ``snapdir+s3://bucket/prefix``: a read-only view of
  a store written by the ``snapdir`` package (snapfs/store/snapdir.py)
- no URL: ``SNAPFS_STORE`` if set, else the embedded default store, a
  directory under the user's data dir.
"""

from __future__ import annotations

import os

from ..errors import UsageError
from .base import ObjectInfo, Store
from .local import LocalStore

__all__ = ["ObjectInfo", "Store", "LocalStore", "open_store", "default_store_url"]


def default_store_url() -> str:
    env = os.environ.get("SNAPFS_STORE")
    if env:
        return env
    data_home = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return "file://" + os.path.join(data_home, "snapfs", "store")


def open_store(url: str | None = None, *, endpoint_url: str | None = None) -> Store:
    """Open the store at ``url`` (see module docstring)."""
    url = url or default_store_url()
    if url.startswith("snapdir+"):
        from .snapdir import SnapdirStore

        return SnapdirStore.from_url(url, endpoint_url=endpoint_url)
    if url.startswith("s3://"):
        from .s3 import S3Store

        return S3Store.from_url(url, endpoint_url=endpoint_url)
    if url.startswith("file://"):
        path = url[len("file://") :]
        if not path.startswith("/"):
            raise UsageError(f"file store URL must be absolute: {url}")
        return LocalStore(path)
    if "://" in url:
        raise UsageError(
            f"unsupported store URL {url!r} (use file://PATH, a path, s3://BUCKET/PREFIX or snapdir+…)"
        )
    return LocalStore(url)
