"""A Store on a local directory: ``file:///path`` or a plain path.

Writes go to a temp file in the target directory, are fsynced and then
renamed into place, so a reader (or a crash) never sees a torn object.
``if_absent`` uses ``os.link`` from the temp file, which fails atomically if
the key already exists. Safe from any thread and any process.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from collections.abc import Iterator

from ..errors import NotFoundError, StoreUnavailableError, UsageError
from .base import ObjectInfo, Store

_TMP_PREFIX = ".tmp-"


class LocalStore(Store):
    def __init__(self, root: str, *, create: bool = True) -> None:
        self.root = os.path.abspath(root)
        self.url = "file://" + self.root
        if create:
            try:
                os.makedirs(self.root, exist_ok=True)
            except OSError as exc:
                raise StoreUnavailableError(
                    f"cannot create store directory {self.root}: {exc.strerror}"
                ) from exc
        elif not os.path.isdir(self.root):
            raise StoreUnavailableError(f"store directory {self.root} does not exist")

    def _path(self, key: str) -> str:
        parts = key.split("/")
        if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise UsageError(f"invalid store key {key!r}")
        return os.path.join(self.root, *parts)

    def get(self, key: str, start: int = 0, length: int | None = None) -> bytes:
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                if start:
                    f.seek(start)
                return f.read() if length is None else f.read(length)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            raise NotFoundError(f"{key}: not in store {self.url}") from exc
        except OSError as exc:
            raise StoreUnavailableError(f"{key}: cannot read from {self.url}: {exc.strerror}") from exc

    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        path = self._path(key)
        directory = os.path.dirname(path)
        if if_absent and os.path.isfile(path):
            return False
        try:
            os.makedirs(directory, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=directory)
        except OSError as exc:
            raise StoreUnavailableError(f"{key}: cannot write to {self.url}: {exc.strerror}") from exc
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if if_absent:
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    return False
            else:
                os.replace(tmp, path)
                tmp = ""
            return True
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise StoreUnavailableError(f"{key}: no space left in {self.url}") from exc
            raise StoreUnavailableError(f"{key}: cannot write to {self.url}: {exc.strerror}") from exc
        finally:
            if tmp:
                try:
                    os.unlink(tmp)
                except FileNotFoundError:
                    pass

    def exists(self, key: str) -> bool:
        return os.path.isfile(self._path(key))

    def stat(self, key: str) -> ObjectInfo:
        try:
            st = os.stat(self._path(key))
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise NotFoundError(f"{key}: not in store {self.url}") from exc
        if not stat.S_ISREG(st.st_mode):
            raise NotFoundError(f"{key}: not in store {self.url}")
        return ObjectInfo(key, st.st_size, st.st_mtime)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        # Walk only the directory that can hold the prefix.
        head, _, _ = prefix.rpartition("/")
        base = os.path.join(self.root, *head.split("/")) if head else self.root
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames.sort()
            rel_dir = os.path.relpath(dirpath, self.root)
            rel_dir = "" if rel_dir == "." else rel_dir.replace(os.sep, "/") + "/"
            if not (rel_dir.startswith(prefix) or prefix.startswith(rel_dir)):
                dirnames[:] = []
                continue
            for name in sorted(filenames):
                if name.startswith(_TMP_PREFIX):
                    continue
                key = rel_dir + name
                if not key.startswith(prefix):
                    continue
                try:
                    st = os.stat(os.path.join(dirpath, name))
                except FileNotFoundError:
                    continue
                yield ObjectInfo(key, st.st_size, st.st_mtime)

    def delete(self, key: str) -> None:
        try:
            os.unlink(self._path(key))
        except FileNotFoundError:
            pass
