"""The Python API: thin, typed wrappers over the operations, for training scripts."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from . import records, snapshot
from .errors import NotFoundError
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


def push(
    path: str | os.PathLike[str],
    store: str | Repo | None = None,
    *,
    jobs: int | None = None,
    name: str | None = None,
    message: str | None = None,
    tags: Sequence[str] = (),
    parents: Sequence[str] | None = None,
    inputs: Sequence[str] = (),
    meta: dict[str, Any] | None = None,
    capture_git: bool = True,
    capture_env: bool = True,
) -> str:
    """Push a directory; returns its snapshot ID. Uploads only what the store lacks.

    With ``name``, ``message``, ``parents``, ``inputs`` or ``meta`` it also
    writes a record (git, environment and command line captured unless turned
    off); ``name`` is create-once (AlreadyExistsError for other content, a
    no-op for the same). ``tags`` label the snapshot. ``parents=None`` means
    "the series' latest" for a ``SERIES@VERSION`` name; ``[]`` means none.
    """
    if name is not None:
        records.validate_name(name)  # before the upload, not after
    tags = [records.validate_tag(t) for t in tags]
    repo = _repo(store)
    result = snapshot.push(os.fspath(path), repo, jobs=jobs)
    if records.wants_record(name=name, message=message, parents=parents, inputs=inputs, meta=meta):
        records.create(
            repo,
            result.snapshot_id,
            name=name,
            message=message,
            tags=tags,
            parents=parents,
            inputs=[_input_ref(repo, i) for i in inputs],
            meta=meta,
            git=capture_git,
            env=capture_env,
            files=result.files,
            total_bytes=result.total_bytes,
        )
    elif tags:
        records.set_tags(repo, result.snapshot_id, tags)
    return result.snapshot_id


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


def resolve(ref: str, store: str | Repo | None = None) -> str:
    """REF (ID, prefix, name, record ID or ``SERIES@latest``) -> snapshot ID."""
    return resolve_ref(_repo(store), ref)


def log(
    series: str | None = None,
    store: str | Repo | None = None,
    *,
    tag: str | None = None,
    include_forgotten: bool = False,
) -> list[dict[str, Any]]:
    """Records, newest first, as ``snapfs log --json`` prints them."""
    return records.log_entries(_repo(store), series, tag=tag, include_forgotten=include_forgotten)


def show(ref: str, store: str | Repo | None = None) -> dict[str, Any]:
    """A snapshot's record, as ``snapfs show --json`` prints it."""
    return records.show(_repo(store), ref)


def ancestors(ref: str, store: str | Repo | None = None, *, depth: int | None = None) -> dict[str, Any]:
    """The lineage above REF as a nested dict (``ancestors`` of each node: parents and inputs)."""
    return records.ancestors(_repo(store), ref, depth=depth)


def tag(ref: str, *tags: str, store: str | Repo | None = None, remove: bool = False) -> list[str]:
    """Add (or remove) labels on a snapshot; returns its tags afterwards."""
    repo = _repo(store)
    return records.set_tags(repo, resolve_ref(repo, ref), tags, remove=remove)


def _input_ref(repo: Repo, ref: str | os.PathLike[str]) -> str:
    """A REF as is; a local directory (``./data``) by its snapshot ID, which must be in the store.

    Hashing a directory reads all of it: it proves the bytes a run used are
    exactly a stored snapshot, at the cost of one pass over the data.
    """
    text = os.fspath(ref)
    if os.path.isdir(text) and ("/" in text or text in (".", "..")):
        snapshot_id = scan(text).root_id
        if not repo.is_snapshot(snapshot_id):
            raise NotFoundError(
                f"input {text} is snapshot {snapshot_id[:16]}, which is not in {repo.url}: push it first"
            )
        return snapshot_id
    return text


def record_run(
    *,
    inputs: Sequence[str | os.PathLike[str]],
    outputs: str | os.PathLike[str],
    meta: dict[str, Any] | None = None,
    name: str | None = None,
    message: str | None = None,
    tags: Sequence[str] = (),
    store: str | Repo | None = None,
    capture_git: bool = True,
    capture_env: bool = True,
) -> dict[str, Any]:
    """Pin what a training run used and produced: push ``outputs`` with a record linking ``inputs``.

    ``inputs`` are REFs (names, IDs) or local directories (hashed and matched to a
    stored snapshot). Returns the new record as ``show`` prints it; its ``id`` is
    the record ID and ``snapshot`` the outputs' snapshot ID.
    """
    repo = _repo(store)
    if name is not None:
        records.validate_name(name)
    tags = [records.validate_tag(t) for t in tags]
    links = [_input_ref(repo, i) for i in inputs]
    result = snapshot.push(os.fspath(outputs), repo)
    created = records.create(
        repo,
        result.snapshot_id,
        name=name,
        message=message,
        tags=tags,
        inputs=links,
        meta=meta,
        git=capture_git,
        env=capture_env,
        files=result.files,
        total_bytes=result.total_bytes,
    )
    return records.record_view(
        created.record, tags=created.tags, is_gone=records.is_forgotten(repo, created.record.id)
    )


__all__ = [
    "open_store",
    "id",
    "push",
    "pull",
    "resolve",
    "log",
    "show",
    "ancestors",
    "tag",
    "record_run",
]
