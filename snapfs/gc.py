"""Garbage collection: delete objects no snapshot marker or live record can reach.

Roots are every ``snapshots/<id>`` marker (every push writes one) and the
snapshot of every record without a tombstone. Lineage links (parents, inputs)
are not roots: forgetting an old version frees its data even though newer
versions name it as their parent.

Safety, in order (docs/RECORDS.md has the full argument):

1. The maintenance lock (snapfs.locks) excludes pushes for the whole run, so
   no push can skip an object that this gc is about to delete.
2. Nothing younger than the grace period (default 24h, judged on the store's
   clock) is deleted: covers a crashed push's objects while someone may still
   retry it, and any writer that does not know the lock protocol.
3. Unreachable trees are deleted parents first, and all of them before any
   chunk or chunk list. A push trusts "a present tree implies its whole
   subtree", and this keeps that true at every instant, even if gc dies midway.
4. Before each batch of deletions the lock is checked (fencing): a gc that
   stalled past the stale timeout stops instead of deleting.
5. Any reachable tree or chunk list that cannot be read aborts the run:
   without it, gc cannot know which chunks it references.
6. Packs (format.PackRef) go last, after the references to them: a pack is
   deleted only if it is older than the grace period and none of the members
   its own table lists is reachable or young. A pack whose table cannot be
   read is kept. Packs with some live members are kept whole; the bytes of
   their dead members are reported (``pack_dead_bytes``), for a repack to free.

Synchronous; deletions and reads run in a bounded thread pool.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from . import format as fmt
from . import records
from .errors import NotFoundError, SnapfsError, UsageError
from .hashing import hash_bytes, is_object_id
from .locks import MaintenanceLock
from .repo import Repo

log = logging.getLogger(__name__)

DEFAULT_GRACE = 24 * 3600.0
_BATCH = 256
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)([smhdw]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class GcAbortedError(SnapfsError):
    """gc stopped before deleting anything it could not prove unreachable."""

    exit_code = 4


def parse_duration(text: str) -> float:
    """'24h', '30m', '7d', '1h30m', '90' (seconds), '0' -> seconds."""
    compact = text.strip().lower().replace(" ", "")
    if not compact or _DURATION_RE.sub("", compact):
        raise UsageError(f"invalid duration {text!r} (examples: 24h, 30m, 7d, 1h30m, 0)")
    return sum(float(n) * _UNITS[u] for n, u in _DURATION_RE.findall(compact))


@dataclass
class Freed:
    kind: str  # "tree", "chunklist", "chunk" or "pack"
    object_id: str
    size: int


@dataclass
class GcReport:
    dry_run: bool
    grace: float
    roots: int = 0
    reachable_objects: int = 0
    reachable_bytes: int = 0
    young_objects: int = 0
    young_bytes: int = 0
    packs_kept: int = 0
    pack_bytes_kept: int = 0
    pack_dead_bytes: int = 0  # unreachable members inside kept packs
    freed: list[Freed] = field(default_factory=list)
    dangling_tags: list[str] = field(default_factory=list)

    @property
    def freed_bytes(self) -> int:
        return sum(f.size for f in self.freed)

    def counts(self) -> dict[str, int]:
        out = {"tree": 0, "chunklist": 0, "chunk": 0}
        for f in self.freed:
            out[f.kind] = out.get(f.kind, 0) + 1
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "grace_seconds": self.grace,
            "roots": self.roots,
            "reachable_objects": self.reachable_objects,
            "reachable_bytes": self.reachable_bytes,
            "young_objects": self.young_objects,
            "young_bytes": self.young_bytes,
            "packs_kept": self.packs_kept,
            "pack_bytes_kept": self.pack_bytes_kept,
            "pack_dead_bytes": self.pack_dead_bytes,
            "freed_objects": len(self.freed),
            "freed_bytes": self.freed_bytes,
            "freed_by_kind": self.counts(),
            "freed": [{"kind": f.kind, "id": f.object_id, "size": f.size} for f in self.freed],
            "dangling_tags": self.dangling_tags,
        }


def roots(repo: Repo) -> set[str]:
    """Snapshot IDs that must be kept: every marker and every live record's snapshot."""
    keep = set(repo.snapshot_ids())
    keep.update(r.snapshot for r in records.live_records(repo))
    return keep


def reachable(repo: Repo, root_ids: set[str], pool: ThreadPoolExecutor) -> set[str]:
    """Every object (trees, chunk lists, chunks) reachable from the roots, verified on the way."""
    seen: set[str] = set()
    level = sorted(root_ids)
    for tree_id in level:
        if not repo.has_object(tree_id):
            raise GcAbortedError(
                f"snapshot {tree_id} is marked or recorded but its root tree is missing from {repo.url}; "
                "run snapfs fsck (and forget the broken snapshot) before gc"
            )
    seen.update(level)
    while level:

        def load(tree_id: str) -> list[fmt.Entry]:
            try:
                return repo.get_tree(tree_id)
            except SnapfsError as exc:
                raise GcAbortedError(
                    f"gc stopped, nothing deleted: cannot read reachable tree: {exc}"
                ) from exc

        next_level: list[str] = []
        chunklist_entries: list[fmt.Entry] = []
        for entries in pool.map(load, level):
            for entry in entries:
                if entry.is_dir:
                    if entry.tree_id not in seen:
                        seen.add(entry.tree_id)  # type: ignore[arg-type]
                        next_level.append(entry.tree_id)  # type: ignore[arg-type]
                elif entry.is_file:
                    if entry.chunklist_id is not None:
                        if entry.chunklist_id not in seen:
                            seen.add(entry.chunklist_id)
                            chunklist_entries.append(entry)
                    else:
                        seen.update(chunk_id for chunk_id, _ in entry.chunks)

        def load_chunks(entry: fmt.Entry) -> tuple[fmt.ChunkRef, ...]:
            try:
                return repo.file_chunks(entry)
            except SnapfsError as exc:
                raise GcAbortedError(
                    f"gc stopped, nothing deleted: cannot read reachable chunk list: {exc}"
                ) from exc

        for chunks in pool.map(load_chunks, chunklist_entries):
            seen.update(chunk_id for chunk_id, _ in chunks)
        level = next_level
    return seen


def _classify(repo: Repo, object_id: str) -> tuple[str, list[str]]:
    """(kind, child tree IDs) of an unreachable object; reads 8 bytes unless it is a tree."""
    key = fmt.object_key(object_id)
    try:
        magic = repo.store.get(key, 0, len(fmt.TREE_MAGIC))
        if magic == fmt.CHUNKLIST_MAGIC:
            return "chunklist", []
        if magic != fmt.TREE_MAGIC:
            return "chunk", []
        data = repo.store.get(key)
    except NotFoundError:
        return "gone", []
    if hash_bytes(data) != object_id:
        return "chunk", []  # corrupt: no children we could trust; delete it with the chunks
    try:
        entries = fmt.decode_tree(data)
    except fmt.FormatError:
        return "chunk", []  # a chunk that happens to start with the tree magic
    return "tree", [e.tree_id for e in entries if e.is_dir]  # type: ignore[misc]


def _tree_layers(trees: dict[str, list[str]]) -> list[list[str]]:
    """Unreachable trees in layers, parents before children (Kahn's algorithm on the DAG)."""
    indegree = {tree_id: 0 for tree_id in trees}
    for children in trees.values():
        for child in children:
            if child in indegree:
                indegree[child] += 1
    layer = sorted(t for t, d in indegree.items() if d == 0)
    layers = []
    while layer:
        layers.append(layer)
        following = []
        for tree_id in layer:
            for child in trees[tree_id]:
                if child in indegree:
                    indegree[child] -= 1
                    if indegree[child] == 0:
                        following.append(child)
        layer = sorted(set(following))
    return layers


def _listed(repo: Repo, prefix: str, key_of: Callable[[str], str]) -> Iterator[tuple[str, int, float]]:
    """(ID, size, mtime) of every ``prefix`` key that ``key_of(ID)`` names exactly."""
    for info in repo.store.list(prefix):
        parts = info.key.split("/")
        object_id = parts[1] + parts[2] if len(parts) == 3 else ""
        if len(parts) != 3 or not is_object_id(object_id) or key_of(object_id) != info.key:
            log.warning("gc leaves %s alone: not a key it knows", info.key)
            continue
        yield object_id, info.size, info.mtime


def _objects(repo: Repo) -> Iterator[tuple[str, int, float]]:
    return _listed(repo, "objects/", fmt.object_key)


def _packs(repo: Repo) -> Iterator[tuple[str, int, float]]:
    return _listed(repo, "packs/", fmt.pack_key)


def _pack_members(repo: Repo, pack_id: str) -> list[tuple[str, int, int]] | None:
    """The member table of a pack ([] if it is gone, None if it cannot be read)."""
    key = fmt.pack_key(pack_id)
    what = f"pack {pack_id} in {repo.url}"
    try:
        count = fmt.pack_member_count(repo.store.get(key, 0, fmt.PACK_HEADER_SIZE), what)
        return fmt.decode_pack_table(repo.store.get(key, 0, fmt.pack_header_size(count)), what)
    except NotFoundError:
        return []
    except SnapfsError as exc:  # FormatError, or the store failing on this one
        log.warning("gc keeps %s: cannot read its member table: %s", what, exc)
        return None


def collect(
    repo: Repo,
    *,
    grace: float = DEFAULT_GRACE,
    dry_run: bool = False,
    jobs: int = 16,
    wait: float | None = None,
    on_freed: Callable[[Freed], None] | None = None,
    on_wait: Callable[[str], None] | None = None,
) -> GcReport:
    """Delete (or with ``dry_run`` only list) every unreachable object older than ``grace`` seconds."""
    if grace < 0:
        raise UsageError("the grace period cannot be negative")
    report = GcReport(dry_run, grace)
    lock = (
        contextlib.nullcontext(None)
        if dry_run
        else MaintenanceLock(repo.store, "gc", wait=wait, on_wait=on_wait)
    )
    with lock as held, ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="snapfs-gc") as pool:
        root_ids = roots(repo)
        report.roots = len(root_ids)
        keep = reachable(repo, root_ids, pool)
        # The store's clock (our lock's mtime) decides what is young; a dry run
        # writes nothing, so it uses this machine's clock instead.
        now = held.store_now() if held is not None else time.time()
        candidates: dict[str, int] = {}
        young: set[str] = set()
        for object_id, size, mtime in _objects(repo):
            if object_id in keep:
                report.reachable_objects += 1
                report.reachable_bytes += size
            elif now - mtime < grace:
                report.young_objects += 1
                report.young_bytes += size
                young.add(object_id)
            else:
                candidates[object_id] = size

        kinds: dict[str, str] = {}
        trees: dict[str, list[str]] = {}
        for object_id, (kind, children) in zip(
            candidates, pool.map(lambda o: _classify(repo, o), list(candidates)), strict=True
        ):
            kinds[object_id] = kind
            if kind == "tree":
                trees[object_id] = children
        order = [[Freed("tree", t, candidates[t]) for t in layer] for layer in _tree_layers(trees)]
        order.append(
            [Freed(kinds[o], o, candidates[o]) for o in sorted(kinds) if kinds[o] in ("chunk", "chunklist")]
        )
        # 6. Packs, in a last layer: after every reference to them is gone.
        old_packs: dict[str, int] = {}
        for pack_id, size, mtime in _packs(repo):
            if now - mtime < grace:
                report.packs_kept += 1
                report.pack_bytes_kept += size
            else:
                old_packs[pack_id] = size
        dead_packs = []
        for pack_id, members in zip(
            old_packs, pool.map(lambda p: _pack_members(repo, p), list(old_packs)), strict=True
        ):
            dead = [m for m in members or () if m[0] not in keep and m[0] not in young]
            if members is not None and len(dead) == len(members):
                dead_packs.append(Freed("pack", pack_id, old_packs[pack_id]))
            else:  # some member is live, or the table cannot be read
                report.packs_kept += 1
                report.pack_bytes_kept += old_packs[pack_id]
                report.pack_dead_bytes += sum(length for _id, _offset, length in dead)
        order.append(dead_packs)
        report_lock = threading.Lock()

        def delete(freed: Freed) -> None:
            if not dry_run:
                key_of = fmt.pack_key if freed.kind == "pack" else fmt.object_key
                repo.store.delete(key_of(freed.object_id))
            with report_lock:
                report.freed.append(freed)
            if on_freed:
                on_freed(freed)

        for layer in order:
            for start in range(0, len(layer), _BATCH):
                if held is not None:
                    held.check()
                for _ in pool.map(delete, layer[start : start + _BATCH]):
                    pass

        gone = {f.object_id for f in report.freed}
        for tag, snapshot_id in records.tag_keys(repo):
            if snapshot_id in root_ids:
                continue
            if snapshot_id in gone or not repo.has_object(snapshot_id):
                report.dangling_tags.append(f"{tag}/{snapshot_id}")
                if not dry_run:
                    repo.store.delete(f"{records.TAG_PREFIX}{tag}/{snapshot_id}")
    log.info(
        "gc on %s: %s %d objects (%d bytes), kept %d reachable and %d young",
        repo.url,
        "would free" if dry_run else "freed",
        len(report.freed),
        report.freed_bytes,
        report.reachable_objects,
        report.young_objects,
    )
    return report
