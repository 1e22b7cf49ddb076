"""Cache commands: prewarm, and cache stats|verify|evict|clear|unpin."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
from typing import TYPE_CHECKING

from ..errors import SnapfsError, StoreUnavailableError

if TYPE_CHECKING:
    from ..cache import DiskCache
    from ..prewarm import PrewarmPlan
from ..paths import default_cache_dir
from .common import human_bytes, open_repo, parse_size, print_json, resolve, stderr

log = logging.getLogger(__name__)


def _cache_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cache", metavar="DIR", default=None, help="cache directory (default: the mount's default)"
    )
    p.add_argument("--cache-size", metavar="SIZE", default=None, help="cache limit, as given to snapfs mount")


def _open_cache(args: argparse.Namespace) -> DiskCache:
    from ..cache import DiskCache

    size = parse_size(args.cache_size) if getattr(args, "cache_size", None) else None
    return DiskCache(args.cache or default_cache_dir(), size)


def register(subparsers, common) -> None:
    p = subparsers.add_parser(
        "prewarm",
        parents=[common],
        help="fetch a snapshot into this node's cache before a job starts",
        description="Fetch every tree and chunk of REF (or only those under PATHs) into the cache the\n"
        "mount uses, verified, concurrently. Already-cached objects are skipped, so an\n"
        "interrupted prewarm resumes. Safe while a mount serves from the same cache.",
        epilog="examples:\n"
        "  snapfs prewarm 3f2a9c01 --store s3://bucket/snaps\n"
        "  snapfs prewarm imagenet@latest train/ --jobs 64 --pin --cache-size 500G\n"
        "  snapfs cache unpin imagenet@latest",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("ref", help="snapshot reference")
    p.add_argument("paths", nargs="*", metavar="PATH", help="only these paths inside the snapshot")
    p.add_argument("-j", "--jobs", type=int, default=32, help="concurrent fetches (default 32)")
    p.add_argument("--pin", action="store_true", help="protect the objects from eviction until 'cache unpin'")
    _cache_args(p)
    p.set_defaults(func=cmd_prewarm)

    p = subparsers.add_parser(
        "cache",
        parents=[common],
        help="inspect and manage this node's cache: stats, verify, evict, clear, unpin",
        description="Manage the node-local cache shared by mounts and prewarms.",
        epilog="examples:\n"
        "  snapfs cache stats\n"
        "  snapfs cache verify          # re-hash every cached object, drop bad ones\n"
        "  snapfs cache evict --to 50G  # evict unpinned objects, least recently used first\n"
        "  snapfs cache unpin 3f2a9c01\n"
        "  snapfs cache clear",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("action", choices=["stats", "verify", "evict", "clear", "unpin"])
    p.add_argument("ref", nargs="?", help="for unpin: the snapshot whose pin to drop")
    p.add_argument(
        "--to", metavar="SIZE", default="0", help="for evict: target size (default 0: all unpinned)"
    )
    _cache_args(p)
    p.set_defaults(func=cmd_cache)


class _Progress:
    """A tqdm bar on a TTY; log lines every 10 s elsewhere (systemd, ssh without -t)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.enabled = not (args.quiet or args.json)
        self.tty = sys.stderr.isatty()
        self.bar = None
        self.lock = threading.Lock()
        self.total_bytes = 0
        self.done_bytes = 0
        self.done_objects = 0
        self.started = time.monotonic()
        self.last_log = self.started

    def start(self, plan: PrewarmPlan) -> None:
        self.total_bytes = plan.missing_bytes
        if not self.enabled:
            return
        stderr(
            f"prewarm {plan.snapshot_id[:12]}: {len(plan.objects)} objects, {human_bytes(plan.total_bytes)}; "
            f"{len(plan.missing)} objects ({human_bytes(plan.missing_bytes)}) to fetch"
        )
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(
                total=plan.missing_bytes,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc="prewarm",
                file=sys.stderr,
                leave=False,
            )

    def __call__(self, nbytes: int, nobjects: int) -> None:
        with self.lock:
            self.done_bytes += nbytes
            self.done_objects += nobjects
            if self.bar is not None:
                self.bar.update(nbytes)
                self.bar.set_postfix(objects=self.done_objects, refresh=False)
            elif self.enabled and time.monotonic() - self.last_log >= 10:
                self.last_log = time.monotonic()
                elapsed = self.last_log - self.started
                rate = self.done_bytes / elapsed if elapsed else 0
                eta = (self.total_bytes - self.done_bytes) / rate if rate else 0
                stderr(
                    f"prewarm: {human_bytes(self.done_bytes)} of {human_bytes(self.total_bytes)}, "
                    f"{self.done_objects} objects, {human_bytes(rate)}/s, ETA {eta:.0f}s"
                )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def cmd_prewarm(args: argparse.Namespace) -> int:
    from .. import prewarm as prewarm_mod

    repo = open_repo(args)
    snapshot_id = resolve(repo, args.ref)
    cache = _open_cache(args)
    progress = _Progress(args)
    try:
        result = prewarm_mod.prewarm(
            repo,
            cache,
            snapshot_id,
            args.paths or None,
            jobs=args.jobs,
            pin=args.pin,
            progress=progress,
            on_plan=progress.start,
        )
    finally:
        progress.close()
        cache.close()
    if args.json:
        print_json(result.as_dict())
    elif not args.quiet:
        rate = result.fetched_bytes / result.seconds if result.seconds else 0
        stderr(
            f"prewarmed {snapshot_id[:12]}: {result.objects} objects, {human_bytes(result.bytes_total)}; "
            f"fetched {human_bytes(result.fetched_bytes)} in {result.fetched_objects} objects "
            f"({human_bytes(rate)}/s), {result.already_cached_objects} already cached"
            + (", pinned" if result.pinned else "")
            + f", {result.seconds:.1f}s"
        )
    if not result.ok:
        for line in result.failed[:10]:
            stderr(f"failed: {line}")
        if result.store_unavailable is not None:
            raise StoreUnavailableError(
                f"prewarm of {snapshot_id[:12]} stopped: the store failed several fetches in a row, "
                f"{len(result.failed)} objects not fetched ({result.store_unavailable}); rerun to retry"
            )
        raise SnapfsError(
            f"prewarm of {snapshot_id[:12]} failed for {len(result.failed)} objects; rerun to retry"
        )
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    cache = _open_cache(args)
    try:
        return {"stats": _stats, "verify": _verify, "evict": _evict, "clear": _clear, "unpin": _unpin}[
            args.action
        ](args, cache)
    finally:
        cache.close()


def _stats(args: argparse.Namespace, cache: DiskCache) -> int:
    total, pinned, objects = cache.index.totals()
    pins = cache.index.pin_names()
    snapshots = []
    from .. import prewarm as prewarm_mod

    repo = None
    for snapshot_id, last_used in sorted(cache.index.known_snapshots().items(), key=lambda kv: -kv[1]):
        row = {"snapshot": snapshot_id, "last_used": last_used, "pinned_objects": pins.get(snapshot_id, 0)}
        try:
            repo = repo or open_repo(args)
            # store_trees=False: a report must not change what it reports on.
            plan = prewarm_mod.plan(repo, cache, snapshot_id, store_trees=False)
            row.update(
                total_bytes=plan.total_bytes,
                cached_bytes=plan.total_bytes - plan.missing_bytes,
                objects=len(plan.objects),
                cached_objects=len(plan.objects) - len(plan.missing),
            )
        except SnapfsError as exc:
            row["error"] = str(exc)
        snapshots.append(row)
    stats = {
        "cache_dir": cache.directory,
        "bytes": total,
        "pinned_bytes": pinned,
        "objects": objects,
        "snapshots": snapshots,
    }
    if args.json:
        print_json(stats)
        return 0
    print(f"cache {cache.directory}: {human_bytes(total)} in {objects} objects, {human_bytes(pinned)} pinned")
    for row in snapshots:
        if "error" in row:
            print(f"  {row['snapshot'][:16]}  ({row['error']})")
            continue
        share = 100 * row["cached_bytes"] / row["total_bytes"] if row["total_bytes"] else 100
        pin = "  pinned" if row["pinned_objects"] else ""
        print(
            f"  {row['snapshot'][:16]}  {human_bytes(row['cached_bytes'])} of {human_bytes(row['total_bytes'])}"
            f" ({share:.0f}%){pin}"
        )
    return 0


def _verify(args: argparse.Namespace, cache: DiskCache) -> int:
    from ..hashing import hash_bytes

    bad = []
    checked = 0
    for item in cache.index.iter_objects():
        data = cache.read(item.object_id)
        checked += 1
        if data is None or hash_bytes(data) != item.object_id:
            bad.append(item.object_id)
    cache.remove(bad)
    if args.json:
        print_json({"checked": checked, "bad": bad})
    else:
        for object_id in bad:
            print(f"dropped: {object_id} (missing or corrupt)")
        stderr(f"verified {checked} cached objects: {len(bad)} bad, dropped")
    return 1 if bad else 0


def _evict(args: argparse.Namespace, cache: DiskCache) -> int:
    target = parse_size(args.to)
    total, _pinned, _n = cache.index.totals()
    freed = cache.evict(total - target)
    if args.json:
        print_json({"freed_bytes": freed, "bytes": cache.index.totals()[0]})
    else:
        stderr(f"evicted {human_bytes(freed)}; cache now {human_bytes(cache.index.totals()[0])}")
    return 0


def _clear(args: argparse.Namespace, cache: DiskCache) -> int:
    ids = [item.object_id for item in cache.index.iter_objects()]
    freed = cache.remove(ids)
    cache.index.clear()
    # Files the index never learned of (a crash between rename and index write).
    for dirpath, _dirs, files in os.walk(cache.objects_dir):
        for name in files:
            os.unlink(os.path.join(dirpath, name))
    if args.json:
        print_json({"freed_bytes": freed, "objects": len(ids)})
    else:
        stderr(f"cleared {len(ids)} objects ({human_bytes(freed)}) from {cache.directory}")
    return 0


def _unpin(args: argparse.Namespace, cache: DiskCache) -> int:
    if not args.ref:
        raise SnapfsError("cache unpin needs a snapshot reference")
    pins = cache.index.pin_names()
    snapshot_id = args.ref if args.ref in pins else resolve(open_repo(args), args.ref)
    released = cache.index.unpin(snapshot_id)
    if args.json:
        print_json({"snapshot": snapshot_id, "released_objects": released})
    else:
        stderr(f"unpinned {snapshot_id[:12]}: {released} objects may now be evicted")
    return 0
