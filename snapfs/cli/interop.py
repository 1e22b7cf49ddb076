"""Commands between stores: sync, import; snapdir options for id, pull and mount.

- ``snapfs sync REF... --from URL --to URL``: copy snapshots between snapfs stores.
- ``snapfs import SNAPDIR_ID --from snapdir+URL``: re-chunk a snapdir snapshot into a snapfs store.
- ``snapfs id --format snapdir PATH``: the ID the ``snapdir`` package gives PATH.
- ``snapfs pull SNAPDIR_ID DEST --store snapdir+URL``: streamed whole-object restore.
- ``snapfs mount … --snapdir-max-object SIZE``: the mount's whole-object limit.

The last three extend parsers that cli/core.py and cli/mount.py own, through
``subparsers.choices`` (like cli/records.py extends push), and fall back to
the original command for everything that is not snapdir.
"""

from __future__ import annotations

import argparse
import os
import time

from ..errors import UsageError
from ..hashing import hash_bytes
from ..store import default_store_url
from ..store.snapdir import is_snapdir_url
from .common import (
    add_command,
    arg_type,
    human_bytes,
    lazy_function,
    lazy_import,
    name_arg,
    open_repo,
    parse_size,
    print_json,
    progress_bar,
    stderr,
)

interop = lazy_import("snapfs.interop")
records = lazy_import("snapfs.records")
sync_ops = lazy_import("snapfs.sync")
snapdir = lazy_import("snapfs.snapdir")
snapdir_repo = lazy_import("snapfs.snapdir_repo")
repo_module = lazy_import("snapfs.repo")


def register(subparsers, common) -> None:
    p = add_command(
        subparsers,
        common,
        "sync",
        "copy snapshots with their objects, records, names and tags to another store",
        "Copies only what the destination lacks, verifies every object in transit and\n"
        "writes bottom-up under the destination's push lock, so the destination never\n"
        "shows a half-copied snapshot. Run it again to resume: it copies only the rest.\n"
        "REF: a name, SERIES@latest, an ID or a unique prefix, as the source resolves it.\n\n"
        "examples:\n"
        "  snapfs sync imagenet@1.2.0 --from file:///data/store --to s3://bucket/snaps\n"
        "  snapfs sync --all --from s3://bucket/snaps --to s3://other-region/snaps -j 64\n"
        "  snapfs sync resnet@latest --from s3://bucket/snaps --to ~/.local/share/snapfs/store",
        cmd_sync,
    )
    p.add_argument("refs", nargs="*", metavar="REF", help="snapshots to copy")
    p.add_argument("--from", dest="source", required=True, metavar="URL", help="source store")
    p.add_argument("--to", dest="dest", required=True, metavar="URL", help="destination store")
    p.add_argument("--all", action="store_true", help="every snapshot and live record of the source")
    p.add_argument(
        "-j", "--jobs", type=int, default=None, help="concurrent copies (default 32 with S3, else 8)"
    )

    p = add_command(
        subparsers,
        common,
        "import",
        "copy a snapdir snapshot into a snapfs store, chunked, with a record naming its snapdir ID",
        "Each snapdir object is streamed, verified against its BLAKE3, cut into snapfs\n"
        "chunks and uploaded if missing; trees and the snapshot marker follow, bottom-up.\n"
        "Prints the snapfs snapshot ID. The record's meta holds snapdir_id.\n\n"
        "examples:\n"
        "  snapfs import 3f2a9c01… --from snapdir+s3://bucket/snapdir --store s3://bucket/snapfs\n"
        "  snapfs import 3f2a9c01… --from snapdir+file:///srv/snapdir --name imagenet@1.0",
        cmd_import,
    )
    p.add_argument("snapdir_id", metavar="SNAPDIR_ID", help="the snapdir snapshot ID (or a unique prefix)")
    p.add_argument(
        "--from", dest="source", required=True, metavar="URL", help="snapdir+file://… or snapdir+s3://…"
    )
    p.add_argument("--name", type=arg_type(name_arg), help="create-once name for the imported snapshot")
    p.add_argument("-m", "--message", help="what this snapshot is")
    p.add_argument(
        "--tag",
        action="append",
        default=[],
        type=arg_type(lazy_function(records, "validate_tag")),
        help="label (repeatable)",
    )
    p.add_argument("-j", "--jobs", type=int, default=None, help="objects processed at once")

    # `snapfs CMD` builds only the parsers CMD needs (cli/main.py): each may be absent.
    choices = subparsers.choices
    if "id" in choices:
        _extend_id(choices["id"])
    if "pull" in choices:
        _extend_pull(choices["pull"])
    if "mount" in choices:
        _extend_mount(choices["mount"])


def _extend_id(ident: argparse.ArgumentParser) -> None:
    ident.add_argument(
        "--format",
        choices=["snapfs", "snapdir"],
        default="snapfs",
        help="snapdir: print exactly what the snapdir package's `snapdir id` gives for PATH",
    )
    ident.set_defaults(func=_chain(ident, cmd_id_snapdir, lambda args: args.format == "snapdir"))
    ident.epilog = (ident.epilog or "") + "\n  snapfs id --format snapdir ./data   # the snapdir package's ID"


def _extend_pull(pull: argparse.ArgumentParser) -> None:
    pull.set_defaults(
        func=_chain(pull, cmd_pull_snapdir, lambda args: is_snapdir_url(args.store or default_store_url()))
    )
    pull.epilog = (pull.epilog or "") + "\n  snapfs pull SNAPDIR_ID ./copy --store snapdir+s3://bucket/prefix"


def _extend_mount(mount: argparse.ArgumentParser) -> None:
    mount.add_argument(
        "--snapdir-max-object",
        type=parse_size,
        default=None,
        metavar="SIZE",
        help=f"snapdir stores: largest whole object a read may fetch (default 1G; ${snapdir_repo.MAX_OBJECT_ENV})",
    )
    mount.set_defaults(
        func=_chain(mount, _mount_with_limit, lambda args: args.snapdir_max_object is not None)
    )
    mount.epilog = (
        mount.epilog or ""
    ) + "\n  snapfs mount /snap --store snapdir+s3://bucket/prefix   # /snap/<snapdir-id>/"


def _chain(parser: argparse.ArgumentParser, func, applies):
    """Run ``func`` when ``applies(args)``, else the command the parser had."""
    original = parser.get_default("func")

    def run(args: argparse.Namespace) -> int:
        if applies(args):
            return func(args, original)
        return original(args)

    return run


# --- id --format snapdir ---------------------------------------------------------


def cmd_id_snapdir(args: argparse.Namespace, _original) -> int:
    entries = snapdir.snapdir_entries(args.path)
    snapdir_id = hash_bytes(snapdir.render_manifest(entries))
    if args.json:
        files = [e for e in entries if e.kind == "file"]
        print_json(
            {
                "id": snapdir_id,
                "format": "snapdir",
                "files": len(files),
                "dirs": len(entries) - len(files),
                "bytes": entries[0].size,
            }
        )
    else:
        print(snapdir_id)
    return 0


# --- pull from a snapdir store -------------------------------------------------------


def cmd_pull_snapdir(args: argparse.Namespace, _original) -> int:
    repo = open_repo(args)
    assert isinstance(repo, snapdir_repo.SnapdirRepo)
    snapdir_id = repo.resolve(args.ref)
    if args.unsafe_symlinks:
        stderr("snapfs: note: snapdir snapshots hold no symlinks; --unsafe-symlinks has no effect")
    started = time.monotonic()
    with progress_bar(args, None, "pulling") as advance:
        result = interop.pull(repo, snapdir_id, args.dest, force=args.force, jobs=args.jobs, progress=advance)
    elapsed = time.monotonic() - started
    if args.json:
        print_json({**result.as_dict(), "seconds": round(elapsed, 3)})
    elif not args.quiet:
        stderr(
            f"pulled snapdir snapshot {snapdir_id[:12]} into {args.dest}: {result.fetched_files} files fetched "
            f"({human_bytes(result.fetched_bytes)}), {result.skipped_files} already there, {elapsed:.1f}s"
        )
    return 0


# --- mount option ---------------------------------------------------------------------


def _mount_with_limit(args: argparse.Namespace, original) -> int:
    # The daemon (forked from this process) reads the limit from its environment.
    os.environ[snapdir_repo.MAX_OBJECT_ENV] = str(args.snapdir_max_object)
    return original(args)


# --- sync -------------------------------------------------------------------------------


def cmd_sync(args: argparse.Namespace) -> int:
    if not args.refs and not args.all:
        raise UsageError("give one or more REFs to sync, or --all")
    source = repo_module.Repo.open(args.source, endpoint_url=args.endpoint_url)
    dest = repo_module.Repo.open(args.dest, endpoint_url=args.endpoint_url)
    try:
        with progress_bar(args, None, "syncing") as advance:
            result = sync_ops.sync(
                source, dest, args.refs, everything=args.all, jobs=args.jobs, progress=advance
            )
    finally:
        source.store.close()
        dest.store.close()
    if args.json:
        print_json(result.as_dict())
    elif not args.quiet:
        rate = result.copied_bytes / result.seconds / 1e6 if result.seconds else 0.0
        stderr(
            f"synced {len(result.snapshots)} snapshot(s) to {result.destination}: copied "
            f"{human_bytes(result.copied_bytes)} in {result.copied_objects} objects ({rate:.0f} MB/s), "
            f"{result.present_objects} already there; {result.records} records, {len(result.names)} names, "
            f"{result.tags} tags; {result.seconds:.1f}s"
        )
    return 0


# --- import ------------------------------------------------------------------------------


def cmd_import(args: argparse.Namespace) -> int:
    if not is_snapdir_url(args.source):
        raise UsageError(
            f"--from must be a snapdir store (snapdir+file:///PATH or snapdir+s3://…), not {args.source!r}"
        )
    source = repo_module.Repo.open(args.source, endpoint_url=args.endpoint_url)
    assert isinstance(source, snapdir_repo.SnapdirRepo)
    dest = open_repo(args)
    if getattr(dest.store, "snapdir", False):
        raise UsageError("--store must be a snapfs store: import writes snapfs objects")
    snapdir_id = source.resolve(args.snapdir_id)
    started = time.monotonic()
    with progress_bar(args, None, "importing") as advance:
        result = interop.import_snapshot(source, dest, snapdir_id, jobs=args.jobs, progress=advance)
    # A rerun without a new name reuses the record an earlier import wrote.
    earlier = [
        r
        for r in records.records_for_snapshot(dest, result.snapshot_id)
        if (r.data.get("meta") or {}).get("snapdir_id") == snapdir_id
        and (args.name is None or r.name == args.name)
    ]
    if earlier and not args.tag and not args.message:
        created = records.Created(earlier[-1], False)
    else:
        created = records.create(
            dest,
            result.snapshot_id,
            name=args.name,
            message=args.message,
            tags=args.tag,
            meta={"snapdir_id": snapdir_id, "snapdir_store": source.url},
            git=False,
            files=result.files,
            total_bytes=result.total_bytes,
        )
    result.record = created.record.id
    result.name = created.record.name
    elapsed = time.monotonic() - started
    if args.json:
        print_json({**result.as_dict(), "id": result.snapshot_id, "seconds": round(elapsed, 3)})
    else:
        print(result.snapshot_id)
    if not args.quiet and not args.json:
        stderr(
            f"imported snapdir snapshot {snapdir_id[:12]} ({result.files} files, {human_bytes(result.total_bytes)}) "
            f"as {result.snapshot_id[:12]}: uploaded {human_bytes(result.uploaded_bytes)} in "
            f"{result.uploaded_objects} objects, {human_bytes(result.present_bytes)} already present; "
            f"record {created.record.id[:12]}" + (f", name {args.name}" if args.name else "")
        )
    return 0
