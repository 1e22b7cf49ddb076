"""The Python API: thin, typed wrappers over the operations, for training scripts."""

from __future__ import annotations

import os

from . import snapshot
from .refs import resolve_ref
from .repo import Repo
from .scan import scan


def open_store(url: str | None = None, *, endpoint_url: str | None = None) -> Repo:
    """Open a store (``file://``, a path, ``s3://bucket/prefix``; default: the embedded store)."""
    return Repo.open(url, endpoint_url=endpoint_url)


def _repo(store: str | Repo | None) -> Repo:
    return store if isinstance(store, Repo) else open_store(store)


def id(path: str | os.PathLike[str]) -> str:  # noqa: A001 - mirrors `snapfs id`
    """The snapshot ID of a local directory, without touching any store."""
    return scan(os.fspath(path)).root_id


def push(path: str | os.PathLike[str], store: str | Repo | None = None, *, jobs: int | None = None) -> str:
    """Push a directory; returns its snapshot ID. Uploads only what the store lacks."""
    return snapshot.push(os.fspath(path), _repo(store), jobs=jobs).snapshot_id


def pull(
    ref: str,
    dest: str | os.PathLike[str],
    store: str | Repo | None = None,
    *,
    force: bool = False,
    jobs: int | None = None,
) -> str:
    """Restore a snapshot into ``dest`` (verified, atomic per file, resumable); returns its ID."""
    repo = _repo(store)
    snapshot_id = resolve_ref(repo, ref)
    snapshot.pull(repo, snapshot_id, os.fspath(dest), force=force, jobs=jobs)
    return snapshot_id


__all__ = ["open_store", "id", "push", "pull"]
