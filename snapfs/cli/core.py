"""Snapshot commands: id, push, pull, verify, ls, cat, manifest, diff, fsck."""

from __future__ import annotations

import argparse
import sys
import time

from ..format import display_name
from ..scan import scan
from .common import (
    add_command,
    human_bytes,
    lazy_import,
    open_repo,
    print_json,
    progress_bar,
    resolve,
    stderr,
)

snapshot = lazy_import("snapfs.snapshot")


def register(subparsers, common) -> None:
    p = add_command(
        subparsers,
        common,
        "id",
        "print the snapshot ID of a local directory (no store needed)",
        "The ID depends on names, kinds, exec bits, sizes, contents, symlink targets and\n"
        "empty directories; never on mtimes, owners or walk order.\n\n"
        "example:\n  snapfs id ./data",
        cmd_id,
    )
    p.add_argument("path", help="directory to identify")

    p = add_command(
        subparsers,
        common,
        "push",
        "snapshot a directory into the store and print its ID",
        "Only chunks the store lacks are uploaded; writes go bottom-up, so the snapshot\n"
        "becomes visible only when everything it needs is stored.\n\n"
        "examples:\n  id=$(snapfs push ./data)\n  snapfs push ./ckpt --store s3://bucket/snaps --json",
        cmd_push,
    )
    p.add_argument("path", help="directory to snapshot")
    p.add_argument(
        "-j", "--jobs", type=int, default=None, help="concurrent uploads (default 32 for S3, 8 local)"
    )
    p.add_argument(
        "--no-pack",
        dest="pack",
        action="store_false",
        default=None,
        help="store every small file as an object of its own (on S3 they are packed by default, "
        "~4 MiB a pack, so a cold read of many small files costs a GET per pack, not per file)",
    )
    p.set_defaults(push_extra=None, push_precheck=None)

    p = add_command(
        subparsers,
        common,
        "pull",
        "restore a snapshot into a directory, verified",
        "Every object is verified before it is written; files are written to a temp\n"
        "name and renamed; an interrupted pull resumes by fetching only what is missing.\n\n"
        "example:\n  snapfs pull 3f2a9c01 ./copy",
        cmd_pull,
    )
    p.add_argument("ref", help="snapshot ID or unique prefix (>= 8 hex digits)")
    p.add_argument("dest", help="destination directory (created if missing)")
    p.add_argument("-f", "--force", action="store_true", help="write into a non-empty directory")
    p.add_argument(
        "--unsafe-symlinks", action="store_true", help="allow absolute symlinks and symlinks that leave DEST"
    )
    p.add_argument("-j", "--jobs", type=int, default=None, help="concurrent downloads")

    p = add_command(
        subparsers,
        common,
        "verify",
        "check that a local directory is exactly a snapshot",
        "Exit 0 when identical, 1 with the differences listed otherwise.\n\n"
        "example:\n  snapfs verify ./copy 3f2a9c01",
        cmd_verify,
    )
    p.add_argument("path", help="local directory")
    p.add_argument("ref", help="snapshot reference")

    p = add_command(
        subparsers,
        common,
        "ls",
        "list a directory of a snapshot",
        "examples:\n  snapfs ls 3f2a9c01\n  snapfs ls 3f2a9c01 train -l -R",
        cmd_ls,
    )
    p.add_argument("ref", help="snapshot reference")
    p.add_argument("path", nargs="?", default="", help="path inside the snapshot (default: its root)")
    p.add_argument("-l", "--long", action="store_true", help="mode, size and content ID")
    p.add_argument("-R", "--recursive", action="store_true", help="list subdirectories too")

    p = add_command(
        subparsers,
        common,
        "cat",
        "write a file of a snapshot to stdout, verified",
        "example:\n  snapfs cat 3f2a9c01 labels.csv | head",
        cmd_cat,
    )
    p.add_argument("ref", help="snapshot reference")
    p.add_argument("path", help="file inside the snapshot")

    p = add_command(
        subparsers,
        common,
        "manifest",
        "print a whole snapshot, one line per entry",
        "Each line: KIND MODE SIZE CONTENT-ID PATH (symlinks: KIND MODE SIZE PATH -> TARGET).\n"
        "Non-UTF-8 bytes and control characters in names are printed as \\xNN escapes.\n\n"
        "example:\n  snapfs manifest 3f2a9c01 > manifest.txt",
        cmd_manifest,
    )
    p.add_argument("ref", help="snapshot reference")

    p = add_command(
        subparsers,
        common,
        "diff",
        "show what changed between two snapshots",
        "Lines: A (added), D (deleted), M (modified) with sizes, then a summary line.\n"
        "Identical subtrees are skipped without being fetched.\n\n"
        "example:\n  snapfs diff 3f2a9c01 8b1e44d2 --json",
        cmd_diff,
    )
    p.add_argument("old", help="older snapshot reference")
    p.add_argument("new", help="newer snapshot reference")
    p.add_argument("--stat", action="store_true", help="only the summary counts")

    p = add_command(
        subparsers,
        common,
        "fsck",
        "check the store: every object's hash, every snapshot's references",
        "Exit 0 when the store is sound, 4 with every damaged object named otherwise.\n\n"
        "examples:\n  snapfs fsck --store s3://bucket/snaps\n  snapfs fsck --quick   # references only, no data read",
        cmd_fsck,
    )
    p.add_argument("--quick", action="store_true", help="check references only; do not read and hash objects")
    p.add_argument("-j", "--jobs", type=int, default=None, help="concurrent reads")


def cmd_id(args: argparse.Namespace) -> int:
    with progress_bar(args, None, "hashing") as advance:
        result = scan(args.path, progress=advance)
    if args.json:
        print_json(
            {"id": result.root_id, "files": result.files, "dirs": result.dirs, "bytes": result.total_bytes}
        )
    else:
        print(result.root_id)
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    repo = open_repo(args)
    started = time.monotonic()
    with progress_bar(args, None, "hashing") as advance:
        scanned = scan(args.path, progress=advance)
    if args.push_precheck:
        args.push_precheck(args, repo, scanned.root_id)
    with progress_bar(args, scanned.total_bytes, "uploading") as advance:
        result = snapshot.upload(repo, scanned, jobs=args.jobs, progress=advance, pack=args.pack)
    elapsed = time.monotonic() - started
    extra = args.push_extra(args, repo, result) if args.push_extra else {}
    if args.json:
        print_json({**result.as_dict(), **extra, "id": result.snapshot_id, "seconds": round(elapsed, 3)})
    else:
        print(result.snapshot_id)
    if not args.quiet and not args.json:
        stderr(
            f"pushed {result.files} files, {human_bytes(result.total_bytes)} in {elapsed:.1f}s: "
            f"uploaded {human_bytes(result.uploaded_bytes)} in {result.uploaded_objects} objects"
            + (f" ({result.packs} packs)" if result.packs else "")
            + f", {human_bytes(result.present_bytes)} already present"
        )
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    repo = open_repo(args)
    snapshot_id = resolve(repo, args.ref)
    started = time.monotonic()
    with progress_bar(args, None, "pulling") as advance:
        result = snapshot.pull(
            repo,
            snapshot_id,
            args.dest,
            force=args.force,
            unsafe_symlinks=args.unsafe_symlinks,
            jobs=args.jobs,
            progress=advance,
        )
    elapsed = time.monotonic() - started
    if args.json:
        print_json({**result.as_dict(), "seconds": round(elapsed, 3)})
    elif not args.quiet:
        stderr(
            f"pulled {snapshot_id[:12]} into {args.dest}: {result.fetched_files} files fetched "
            f"({human_bytes(result.fetched_bytes)}), {result.skipped_files} already there, {elapsed:.1f}s"
        )
    return 0


def _change_line(change: snapshot.Change) -> str:
    path = snapshot.display_path(change.path)
    if change.status == "A":
        suffix = "/" if change.new.is_dir else ""  # type: ignore[union-attr]
        return f"A  {path}{suffix}  ({human_bytes(change.new.size)})"  # type: ignore[union-attr]
    if change.status == "D":
        suffix = "/" if change.old.is_dir else ""  # type: ignore[union-attr]
        return f"D  {path}{suffix}  ({human_bytes(change.old.size)})"  # type: ignore[union-attr]
    old, new = change.old, change.new
    detail = f"{human_bytes(old.size)} -> {human_bytes(new.size)}"  # type: ignore[union-attr]
    if old.kind != new.kind:  # type: ignore[union-attr]
        detail = f"{old.kind} -> {new.kind}, " + detail  # type: ignore[union-attr]
    elif old.executable != new.executable:  # type: ignore[union-attr]
        detail = ("+x" if new.executable else "-x") + ", " + detail  # type: ignore[union-attr]
    return f"M  {path}  ({detail})"


def _summary(changes: list[snapshot.Change]) -> dict:
    counts = {"added": 0, "deleted": 0, "modified": 0, "bytes_added": 0, "bytes_deleted": 0}
    for c in changes:
        if c.status == "A":
            counts["added"] += 1
            counts["bytes_added"] += c.new.size  # type: ignore[union-attr]
        elif c.status == "D":
            counts["deleted"] += 1
            counts["bytes_deleted"] += c.old.size  # type: ignore[union-attr]
        else:
            counts["modified"] += 1
            counts["bytes_added"] += c.new.size  # type: ignore[union-attr]
            counts["bytes_deleted"] += c.old.size  # type: ignore[union-attr]
    return counts


def _summary_line(counts: dict) -> str:
    return (
        f"{counts['added']} added, {counts['deleted']} deleted, {counts['modified']} modified "
        f"(+{human_bytes(counts['bytes_added'])}, -{human_bytes(counts['bytes_deleted'])})"
    )


def cmd_verify(args: argparse.Namespace) -> int:
    repo = open_repo(args)
    snapshot_id = resolve(repo, args.ref)
    with progress_bar(args, None, "hashing") as advance:
        changes = snapshot.verify(repo, args.path, snapshot_id, progress=advance)
    if args.json:
        print_json(
            {"snapshot": snapshot_id, "identical": not changes, "changes": [c.as_dict() for c in changes]}
        )
    else:
        for change in changes:
            print(_change_line(change))
        if changes:
            stderr(f"{args.path} differs from {snapshot_id[:12]}: {_summary_line(_summary(changes))}")
        elif not args.quiet:
            stderr(f"{args.path} is exactly {snapshot_id[:12]}")
    return 1 if changes else 0


def cmd_ls(args: argparse.Namespace) -> int:
    repo = open_repo(args)
    snapshot_id = resolve(repo, args.ref)
    entry, children = snapshot.list_dir(repo, snapshot_id, args.path)
    if entry is not None and not entry.is_dir:
        rows = [(args.path.encode("utf-8", "surrogateescape"), entry)]
    elif args.recursive:
        base = args.path.strip("/").encode("utf-8", "surrogateescape")
        tree_id = snapshot_id if entry is None else entry.tree_id
        rows = list(snapshot.walk(repo, tree_id, base))  # type: ignore[arg-type]
    else:
        base = args.path.strip("/").encode("utf-8", "surrogateescape")
        rows = [((base + b"/" + e.name) if (base and args.recursive) else e.name, e) for e in children]
    if args.json:
        print_json(
            [
                {
                    "path": snapshot.display_path(path),
                    "kind": e.kind,
                    "size": e.size,
                    "executable": e.executable,
                    "content": None if e.is_symlink else snapshot.content_id(e),
                    "target": display_name(e.target) if e.is_symlink else None,  # type: ignore[arg-type]
                }
                for path, e in rows
            ]
        )
        return 0
    for path, e in rows:
        name = snapshot.display_path(path) + ("/" if e.is_dir else "")
        if e.is_symlink and args.long:
            name += " -> " + display_name(e.target)  # type: ignore[arg-type]
        if args.long:
            print(f"{snapshot.mode_string(e)} {e.size:>12} {(snapshot.content_id(e) or '-')[:16]:16} {name}")
        else:
            print(name)
    return 0


def cmd_cat(args: argparse.Namespace) -> int:
    repo = open_repo(args)
    snapshot_id = resolve(repo, args.ref)
    out = sys.stdout.buffer
    snapshot.cat(repo, snapshot_id, args.path, out.write)
    out.flush()
    return 0


def cmd_manifest(args: argparse.Namespace) -> int:
    repo = open_repo(args)
    snapshot_id = resolve(repo, args.ref)
    if args.json:
        print_json(
            [
                {
                    "path": snapshot.display_path(p),
                    "kind": e.kind,
                    "size": e.size,
                    "executable": e.executable,
                    "content": snapshot.content_id(e),
                    "target": display_name(e.target) if e.is_symlink else None,
                }  # type: ignore[arg-type]
                for p, e in snapshot.walk(repo, snapshot_id)
            ]
        )
        return 0
    write = sys.stdout.write
    for path, entry in snapshot.walk(repo, snapshot_id):
        write(snapshot.manifest_line(path, entry) + "\n")
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    repo = open_repo(args)
    old_id, new_id = resolve(repo, args.old), resolve(repo, args.new)
    changes = list(snapshot.diff(repo, old_id, new_id))
    counts = _summary(changes)
    if args.json:
        print_json(
            {"old": old_id, "new": new_id, "summary": counts, "changes": [c.as_dict() for c in changes]}
        )
        return 0
    if not args.stat:
        for change in changes:
            print(_change_line(change))
    print(_summary_line(counts))
    return 0


def cmd_fsck(args: argparse.Namespace) -> int:
    repo = open_repo(args)
    with progress_bar(args, None, "checking") as advance:
        report = snapshot.fsck(repo, read_data=not args.quick, jobs=args.jobs, progress=advance)
    if args.json:
        print_json(report.as_dict())
    else:
        for object_id in report.corrupt:
            print(f"corrupt: object {object_id} does not hash to its key")
        for line in report.missing:
            print(f"missing: {line}")
        for line in report.malformed:
            print(f"malformed: {line}")
        stderr(
            f"checked {report.objects} objects ({human_bytes(report.bytes)}) and {report.snapshots} snapshots: "
            + (
                "no damage"
                if report.ok
                else f"{len(report.corrupt)} corrupt, {len(report.missing)} missing, {len(report.malformed)} malformed"
            )
        )
    return 0 if report.ok else 4
