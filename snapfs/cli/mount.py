"""Mount commands: mount, umount, status."""

from __future__ import annotations

import argparse
import os

from ..paths import default_cache_dir
from .common import arg_type, count_arg, human_bytes, parse_size, print_json


def register(subparsers, common) -> None:
    p = subparsers.add_parser(
        "mount",
        parents=[common],
        help="mount every snapshot of the store read-only at MOUNTPOINT/<id>",
        description="Mount the store read-only. MOUNTPOINT/<id>/ appears on first access to any\n"
        "snapshot ID; MOUNTPOINT/<name> is a symlink to its ID. Chunks are fetched only\n"
        "when read, verified against their BLAKE3 hash before a byte is served, and kept\n"
        "in a node-local cache shared with other mounts and with `snapfs prewarm`.",
        epilog="examples:\n"
        "  snapfs mount /snap --store s3://bucket/snaps\n"
        "  cat /snap/3f2a9c01.../labels.csv\n"
        "  snapfs mount /snap --foreground --cache /nvme/snapfs --cache-size 500G   # under systemd\n"
        "  snapfs status /snap\n"
        "  snapfs umount /snap",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("mountpoint", help="directory to mount on (created if missing)")
    p.add_argument(
        "--cache", metavar="DIR", default=None, help="cache directory (default: /var/cache/snapfs as root)"
    )
    p.add_argument(
        "--cache-size",
        metavar="SIZE",
        default=None,
        help="cache limit, e.g. 200G (default: half the free space, <= 100G)",
    )
    p.add_argument("--foreground", "-f", action="store_true", help="stay attached (for systemd Type=notify)")
    p.add_argument(
        "--allow-other", action="store_true", help="let other users read the mount (off by default)"
    )
    p.add_argument("--fetch-jobs", type=int, default=32, help="concurrent store fetches (default 32)")
    p.add_argument(
        "--prefetch-siblings",
        type=arg_type(count_arg),
        default=16,
        metavar="N",
        help="on a cold read of a small file, also fetch up to N small files after it in its "
        "directory, as shuffled dataloaders read them all; on a directory's first visit, "
        "the trees of up to min(N, 16) subdirectories and next directories (default 16; 0: off)",
    )
    p.add_argument(
        "--readahead",
        type=parse_size,
        default="4M",
        help="kernel readahead for the mount (read_ahead_kb of its bdi; root only), default 4M",
    )
    p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port")
    p.add_argument(
        "--metrics-addr", default="127.0.0.1", help="address for --metrics-port (default 127.0.0.1)"
    )
    p.add_argument("--log-file", default=None, help="daemon log in the background (default: CACHE/mount.log)")
    p.add_argument(
        "--no-fsync",
        action="store_true",
        help="never sync cache files to disk; after a reboot, what was cached since the last boot is dropped",
    )
    p.add_argument(
        "--fuse-open",
        action="store_true",
        help="send every open() and close() of a file to the daemon. By default the kernel "
        "opens files itself (no_open) when pyfuse3 has scripts/setup's patch, so a warm "
        "re-read never reaches the daemon; this turns that off, for debugging",
    )
    p.set_defaults(func=cmd_mount)

    p = subparsers.add_parser(
        "umount",
        parents=[common],
        help="unmount a snapfs mount and wait for its daemon to exit",
        description="Unmount MOUNTPOINT cleanly. A stale mount left by a dead daemon is removed too.",
        epilog="example:\n  snapfs umount /snap",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("mountpoint")
    p.set_defaults(func=cmd_umount)

    p = subparsers.add_parser(
        "status",
        parents=[common],
        help="show a mount's counters: hits, misses, bytes fetched, verify failures, cache fill",
        epilog="example:\n  snapfs status /snap --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("mountpoint")
    p.set_defaults(func=cmd_status)


def cmd_mount(args: argparse.Namespace) -> int:
    from .. import daemon  # lazy: trio and the daemon are not needed to parse arguments

    config = daemon.MountConfig(
        mountpoint=args.mountpoint,
        store_url=args.store,
        endpoint_url=args.endpoint_url,
        # Absolute: the daemon chdirs to / after forking.
        cache_dir=os.path.abspath(args.cache or default_cache_dir()),
        cache_size=parse_size(args.cache_size) if args.cache_size else None,
        allow_other=args.allow_other,
        foreground=args.foreground,
        fetch_concurrency=args.fetch_jobs,
        metrics_port=args.metrics_port,
        metrics_addr=args.metrics_addr,
        log_file=os.path.abspath(args.log_file) if args.log_file else None,
        fsync=not args.no_fsync,
        readahead=args.readahead,
        prefetch_siblings=args.prefetch_siblings,
        skip_open=False if args.fuse_open else None,
    )
    return daemon.mount(config)


def cmd_umount(args: argparse.Namespace) -> int:
    from .. import daemon  # lazy: trio and the daemon are not needed to parse arguments

    daemon.umount(args.mountpoint)
    return 0


def _store_health(status: dict) -> str:
    failed = status["fast_failures"]
    if status["store_unavailable_seconds"]:
        return (
            f"unavailable for {status['store_unavailable_seconds']} s; "
            f"uncached reads fail at once ({failed} so far)"
        )
    return f"answering ({failed} reads failed at once during outages)" if failed else "answering"


def _fetched(status: dict) -> str:
    text = f"{human_bytes(status['fetched_bytes'])} in {status['fetched_objects']} objects"
    if status.get("small_fetch_ms"):  # absent from daemons before it
        text += f"; small objects take {status['small_fetch_ms']:.1f} ms"
    if status.get("pack_fetches"):  # absent from daemons before packs
        text += f"; {status['pack_fetches']} packs brought {status['pack_siblings']} more objects"
    return text


def _durability(status: dict) -> str:
    if "cache_durability" not in status:  # a daemon from before batched syncs
        return "-"
    text = f"{status['cache_durability']}; {status['cache_unsynced_objects']} objects not yet synced"
    failed = status["cache_sync_failures"]
    return text + (f", {failed} syncs failed" if failed else "")


def _opens(status: dict) -> str:
    if status.get("skip_open"):
        return "skipped: the kernel opens files itself (no_open)"
    if "open_requests" in status:  # a daemon from before no_open has neither field
        return f"{status['open_requests']} sent to the daemon"
    return "-"


def cmd_status(args: argparse.Namespace) -> int:
    from .. import daemon  # lazy: trio and the daemon are not needed to parse arguments

    status = daemon.read_status(args.mountpoint)
    if args.json:
        print_json(status)
        return 0
    lookups = status["hits"] + status["misses"]
    hit_rate = f"{100 * status['hits'] / lookups:.1f}%" if lookups else "-"
    limit = status.get("cache_limit_bytes")
    fill = f"{human_bytes(status['cache_bytes'])}" + (
        f" of {human_bytes(limit)} ({100 * status['cache_bytes'] / limit:.0f}%)" if limit else ""
    )
    rows = [
        ("mountpoint", status["mountpoint"]),
        ("daemon pid", status["pid"]),
        ("store", status["store"]),
        (
            "cache",
            f"{status['cache_dir']}: {fill}, {status['cache_objects']} objects, "
            f"{human_bytes(status['cache_pinned_bytes'])} pinned",
        ),
        (
            "hits",
            f"{status['hits']} ({hit_rate}; {status['memory_hits']} memory, {status['disk_hits']} disk)",
        ),
        ("durability", _durability(status)),
        ("misses", status["misses"]),
        ("fetched", _fetched(status)),
        ("verify failures", status["verify_failures"]),
        ("fetch errors", status["fetch_errors"]),
        ("store health", _store_health(status)),
        ("snapshots open", status["snapshots_open"]),
        ("opens", _opens(status)),
        ("memory", f"{human_bytes(status['rss_bytes'])} RSS, {status['cpu_seconds']} CPU seconds"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0
