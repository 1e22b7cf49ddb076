"""Record commands: push --name/--tag/--input..., log, show, ancestors, reproduce, preflight, tag, forget, gc."""

from __future__ import annotations

import argparse
import shlex
import threading
from typing import TYPE_CHECKING, Any

from ..errors import UsageError
from .common import (
    add_command,
    arg_type,
    human_bytes,
    lazy_function,
    lazy_import,
    name_arg,
    open_repo,
    print_json,
    stderr,
)

if TYPE_CHECKING:
    from ..snapshot import PushResult

gc = lazy_import("snapfs.gc")
records = lazy_import("snapfs.records")


def _meta_item(text: str) -> tuple[str, Any]:
    key, eq, value = text.partition("=")
    if not eq:
        raise UsageError(f"{text!r}: expected KEY=VALUE, e.g. accuracy=0.89")
    records.check_meta_key(key)
    return key, records.parse_meta_value(value)


def register(subparsers, common) -> None:
    # `snapfs CMD` builds only the parsers CMD needs (cli/main.py): push may be absent.
    if "push" in subparsers.choices:
        _extend_push(subparsers.choices["push"])
    _register_commands(subparsers, common)


def _extend_push(push: argparse.ArgumentParser) -> None:
    group = push.add_argument_group(
        "record options (any of --name, -m, --parent, --input, --meta writes a record; "
        "a plain push only marks the snapshot)"
    )
    group.add_argument(
        "--name",
        type=arg_type(name_arg),
        help="create-once name, e.g. imagenet@1.2.0 (SERIES@VERSION records the series' latest as parent)",
    )
    group.add_argument("-m", "--message", help="what this snapshot is")
    group.add_argument(
        "--tag",
        action="append",
        default=[],
        type=arg_type(lazy_function(records, "validate_tag")),
        help="label (repeatable)",
    )
    group.add_argument("--parent", action="append", metavar="REF", help="previous version (repeatable)")
    group.add_argument("--no-parent", action="store_true", help="record no parent, even for SERIES@VERSION")
    group.add_argument(
        "--input", action="append", default=[], metavar="REF", help="data this was made from (repeatable)"
    )
    group.add_argument(
        "--meta",
        action="append",
        default=[],
        type=arg_type(_meta_item),
        metavar="KEY=VALUE",
        help="user metadata; numbers and true/false are stored as such (repeatable)",
    )
    group.add_argument(
        "--no-git", action="store_true", help="do not record the git commit, branch and remote"
    )
    group.add_argument("--no-env", action="store_true", help="do not record Python, platform and packages")
    push.set_defaults(push_extra=push_extra, push_precheck=push_precheck)
    push.epilog = (push.epilog or "") + (
        "\n  snapfs push ./data --name imagenet@1.2.0 -m 'fixed 80 boxes' --tag release\n"
        "  snapfs push ./ckpt --name resnet@1 --input imagenet@1.2.0 --meta accuracy=0.89"
    )


def _register_commands(subparsers, common) -> None:
    p = add_command(
        subparsers,
        common,
        "log",
        "list recorded snapshots, newest first",
        "examples:\n  snapfs log\n  snapfs log imagenet\n  snapfs log --tag production --json",
        cmd_log,
    )
    p.add_argument("series", nargs="?", help="only this series (the part of a name before '@')")
    p.add_argument(
        "--tag", type=arg_type(lazy_function(records, "validate_tag")), help="only snapshots with this tag"
    )
    p.add_argument("--all", action="store_true", help="include forgotten records")

    p = add_command(
        subparsers,
        common,
        "show",
        "show a snapshot's record: name, lineage, git, environment, metadata",
        "REF: a name, SERIES@latest, a snapshot or record ID, or a unique prefix.\n\n"
        "examples:\n  snapfs show imagenet@1.2.0\n  snapfs show imagenet@latest --json",
        cmd_show,
    )
    p.add_argument("ref", help="snapshot reference")

    p = add_command(
        subparsers,
        common,
        "ancestors",
        "show the lineage above a snapshot as a tree (parents and inputs)",
        "example:\n  snapfs ancestors resnet@1   # which dataset, in which version, it was trained on",
        cmd_ancestors,
    )
    p.add_argument("ref", help="snapshot reference")
    p.add_argument("--depth", type=int, default=None, help="stop after this many levels")

    p = add_command(
        subparsers,
        common,
        "reproduce",
        "print the steps to reproduce a recorded snapshot",
        "Covers the git checkout, the Python environment, getting the data and the\n"
        "recorded command and results.\n\n"
        "examples:\n  snapfs reproduce resnet@1\n"
        "  snapfs reproduce resnet@1 --requirements > requirements.txt",
        cmd_reproduce,
    )
    p.add_argument("ref", help="snapshot reference")
    p.add_argument("--requirements", action="store_true", help="print only name==version lines for pip")

    p = add_command(
        subparsers,
        common,
        "preflight",
        "refuse to train unpinned: check code, data and config are pinned",
        "Exit 0 when the git work tree is clean, every --data is an immutable name or\n"
        "full ID that exists, and every --config is committed; 1 with the reasons otherwise.\n\n"
        "example:\n  snapfs preflight --data imagenet@1.2.0 --config configs/train.yaml && python train.py",
        cmd_preflight,
    )
    p.add_argument("--data", action="append", required=True, metavar="REF", help="data the run will use")
    p.add_argument("--config", action="append", default=[], metavar="FILE", help="config file the run uses")
    p.add_argument(
        "--allow-untracked", action="store_true", help="untracked files do not make the tree dirty"
    )

    p = add_command(
        subparsers,
        common,
        "tag",
        "add (or with --remove, remove) labels on a snapshot",
        "examples:\n  snapfs tag imagenet@1.2.0 production baseline\n  snapfs tag 3f2a9c01 production --remove",
        cmd_tag,
    )
    p.add_argument("ref", help="snapshot reference")
    p.add_argument("tags", nargs="+", type=arg_type(lazy_function(records, "validate_tag")), metavar="TAG")
    p.add_argument("--remove", action="store_true", help="remove the tags instead")

    p = add_command(
        subparsers,
        common,
        "forget",
        "drop a record's claim on its data, so gc can collect it",
        "The record stays (lineage still shows it, marked forgotten) and its name stays\n"
        "reserved: it no longer resolves and is never reused. When no live record claims\n"
        "the snapshot any more, its marker is removed too; gc then frees what nothing\n"
        "else references. A bare snapshot ID removes the marker of an unnamed push.\n\n"
        "examples:\n  snapfs forget experiment@3\n  snapfs forget 3f2a9c01",
        cmd_forget,
    )
    p.add_argument("ref", help="name, record ID or snapshot ID")

    p = add_command(
        subparsers,
        common,
        "gc",
        "delete objects that no snapshot or live record reaches",
        "Never deletes anything younger than --grace, and never runs while a push is in\n"
        "progress (it waits for running pushes, and new pushes wait for it). Prints every\n"
        "object it frees.\n\n"
        "examples:\n  snapfs gc --dry-run\n  snapfs gc --grace 7d",
        cmd_gc,
    )
    p.add_argument("--dry-run", action="store_true", help="only list what would be freed")
    p.add_argument(
        "--grace",
        type=arg_type(lazy_function(gc, "parse_duration")),
        default=None,
        metavar="DURATION",
        help="keep unreachable objects younger than this (default 24h; e.g. 30m, 7d, 0)",
    )
    p.add_argument(
        "--wait",
        type=arg_type(lazy_function(gc, "parse_duration")),
        default=None,
        metavar="DURATION",
        help="how long to wait for running pushes (default 10m)",
    )
    p.add_argument("-j", "--jobs", type=int, default=16, help="concurrent reads and deletes")


# --- push ------------------------------------------------------------------------


def push_precheck(args: argparse.Namespace, repo, snapshot_id: str) -> None:
    """Runs after hashing, before any upload: a taken name fails in seconds, not after the upload."""
    if args.name:
        records.check_name_free(repo, args.name, snapshot_id)


def push_extra(args: argparse.Namespace, repo, result: PushResult) -> dict:
    """Called by `snapfs push` after the upload: write the record, name and tags."""
    meta: dict[str, Any] = {}
    for key, value in args.meta:
        if key in meta:
            raise UsageError(f"--meta {key} given twice")
        meta[key] = value
    parents = [] if args.no_parent else args.parent
    if args.no_parent and args.parent:
        raise UsageError("--parent and --no-parent contradict each other")
    if not records.wants_record(
        name=args.name, message=args.message, parents=parents, inputs=args.input, meta=meta
    ):
        if args.tag:
            return {"tags": records.set_tags(repo, result.snapshot_id, args.tag)}
        return {}
    created = records.create(
        repo,
        result.snapshot_id,
        name=args.name,
        message=args.message,
        tags=args.tag,
        parents=parents,
        inputs=args.input,
        meta=meta,
        git=not args.no_git,
        env=not args.no_env,
        files=result.files,
        total_bytes=result.total_bytes,
    )
    if not args.quiet and not args.json:
        data = created.record.data
        if not created.created:
            stderr(f"{args.name} already names this snapshot: nothing recorded")
        else:
            lineage = [f"parent {_link_label(p)}" for p in data.get("parents", [])]
            lineage += [f"input {_link_label(i)}" for i in data.get("inputs", [])]
            stderr(
                f"recorded {args.name or 'an unnamed record'} (record {created.record.id[:12]})"
                + (": " + ", ".join(lineage) if lineage else "")
            )
    return created.as_dict()


# --- output helpers ----------------------------------------------------------------


def _when(time_text: str | None) -> str:
    if not time_text:
        return "-"
    return time_text[:19].replace("T", " ") + "Z"


def _link_label(item: dict) -> str:
    return f"{item.get('name') or '(unnamed)'} {item['snapshot'][:12]}"


def _label(entry: dict) -> str:
    if entry.get("name"):
        return entry["name"]
    if entry.get("id") or entry.get("record"):
        return f"(record {(entry.get('id') or entry.get('record'))[:12]})"
    return "(no record)"


# --- commands --------------------------------------------------------------------------


def cmd_log(args: argparse.Namespace) -> int:
    repo = open_repo(args)
    entries = records.log_entries(repo, args.series, tag=args.tag, include_forgotten=args.all)
    if args.json:
        print_json(entries)
        return 0
    for entry in entries:
        parts = [_when(entry.get("time")), entry["snapshot"][:12], _label(entry)]
        if entry.get("tags"):
            parts.append("[" + ", ".join(entry["tags"]) + "]")
        if entry.get("forgotten"):
            parts.append("(forgotten)")
        if entry.get("message"):
            parts.append(entry["message"].splitlines()[0])
        print("  ".join(parts))
    if not entries and not args.quiet:
        stderr("no recorded snapshots" + (f" in series {args.series}" if args.series else ""))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    repo = open_repo(args)
    view = records.show(repo, args.ref)
    if args.json:
        print_json(view)
        return 0
    rows: list[tuple[str, str]] = [("snapshot", view["snapshot"])]
    if view.get("id") is None:
        rows.append(("record", "none (pushed without --name, -m, --input or --meta)"))
        rows.append(("tags", ", ".join(view["tags"]) or "-"))
        _print_rows(rows)
        return 0
    rows = [
        ("name", (view.get("name") or "(unnamed)") + ("  (forgotten)" if view["forgotten"] else ""))
    ] + rows
    rows.append(("record", view["id"]))
    rows.append(("time", f"{_when(view.get('time'))} by {view.get('user')} on {view.get('host')}"))
    if view.get("message"):
        rows.append(("message", view["message"]))
    rows.append(("tags", ", ".join(view["tags"]) or "-"))
    if view.get("files") is not None:
        rows.append(("size", f"{view['files']} files, {human_bytes(view.get('bytes') or 0)}"))
    for key in ("parents", "inputs"):
        for item in view.get(key, []):
            rows.append((key[:-1], _link_label(item)))
    git = view.get("git")
    if git:
        state = "dirty" if git.get("dirty") else "clean"
        rows.append(
            ("git", f"{git.get('commit') or '(no commit)'} on {git.get('branch') or '(detached)'}, {state}")
        )
        if git.get("remote"):
            rows.append(("remote", f"{git.get('remote_name')} {git['remote']}"))
    env = view.get("env")
    if env:
        rows.append(
            (
                "env",
                f"{env.get('implementation')} {env.get('python')} on {env.get('platform')}, "
                f"{len(env.get('packages', {}))} packages",
            )
        )
    if view.get("command"):
        rows.append(("command", shlex.join(view["command"])))
    for key, value in sorted((view.get("meta") or {}).items()):
        rows.append(("meta", f"{key}={value}"))
    _print_rows(rows)
    return 0


def _print_rows(rows: list[tuple[str, str]]) -> None:
    for key, value in rows:
        print(f"{key + ':':<10} {value}")


def cmd_ancestors(args: argparse.Namespace) -> int:
    repo = open_repo(args)
    tree = records.ancestors(repo, args.ref, depth=args.depth)
    if args.json:
        print_json(tree)
        return 0

    def line(node: dict) -> str:
        parts = [_label(node), node["snapshot"][:12], _when(node.get("time"))]
        if node.get("forgotten"):
            parts.append("(forgotten)")
        if node.get("message"):
            parts.append(repr(node["message"].splitlines()[0]))
        if node.get("seen"):
            parts.append("(see above)")
        return "  ".join(parts)

    print(line(tree))

    def walk(node: dict, prefix: str) -> None:
        children = node["ancestors"]
        for i, child in enumerate(children):
            last = i == len(children) - 1
            print(f"{prefix}{'└── ' if last else '├── '}{child['relation']}: {line(child)}")
            walk(child, prefix + ("    " if last else "│   "))

    walk(tree, "")
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    repo = open_repo(args)
    steps = records.reproduce(repo, args.ref)
    if args.requirements:
        for req in records.requirements(steps["env"]):
            print(req)
        return 0
    if args.json:
        print_json({**steps, "requirements": records.requirements(steps["env"])})
        return 0
    store = f" --store {shlex.quote(steps['store'])}"
    label = steps["name"] or steps["snapshot"][:12]
    out = [f"To reproduce {label} (snapshot {steps['snapshot']}, record {steps['record'][:12]}):"]
    if steps["forgotten"]:
        out.append("  note: this record was forgotten; its data may have been garbage-collected")
    git = steps["git"]
    out.append("")
    out.append("1. Code")
    if git and git.get("commit"):
        if git.get("remote"):
            out.append(f"   git clone {shlex.quote(git['remote'])} src && cd src")
        out.append(
            f"   git checkout {git['commit']}" + (f"   # branch {git['branch']}" if git.get("branch") else "")
        )
        if git.get("subdir"):
            out.append(f"   cd {shlex.quote(git['subdir'])}")
        if git.get("dirty"):
            out.append("   warning: the work tree had uncommitted changes; they were not recorded")
    else:
        out.append("   no git information was recorded (pushed outside a git work tree or with --no-git)")
    env = steps["env"]
    out.append("")
    out.append("2. Environment")
    if env:
        out.append(f"   {env.get('implementation')} {env.get('python')} on {env.get('platform')}")
        out.append(f"   snapfs reproduce {shlex.quote(args.ref)}{store} --requirements > requirements.txt")
        out.append(f"   pip install -r requirements.txt   # {len(env.get('packages', {}))} pinned packages")
    else:
        out.append("   no environment was recorded (pushed with --no-env)")
    out.append("")
    out.append("3. Data")
    for item in steps["inputs"]:
        where = item.get("name") or item["snapshot"][:12]
        out.append(f"   input {where}: snapfs pull {item['snapshot']} ./{where}{store}")
        out.append(f"      or mount: snapfs mount /snap{store}  and read /snap/{item['snapshot']}")
    out.append(f"   this snapshot: snapfs pull {steps['snapshot']} ./{label}{store}")
    out.append("")
    out.append("4. Run")
    if steps["command"]:
        out.append(f"   {shlex.join(steps['command'])}")
    else:
        out.append("   no command line was recorded")
    out.append("")
    out.append("5. Expected results")
    if steps["meta"]:
        for key, value in sorted(steps["meta"].items()):
            out.append(f"   {key}: {value}")
    else:
        out.append("   no metadata was recorded")
    print("\n".join(out))
    return 0


def cmd_preflight(args: argparse.Namespace) -> int:
    repo = open_repo(args)
    report = records.preflight(repo, args.data, args.config, allow_untracked=args.allow_untracked)
    if args.json:
        print_json(report.as_dict())
        return 0 if report.ok else 1
    if report.ok:
        git = report.git or {}
        data = ", ".join(f"{d['ref']} = {d['snapshot'][:12]}" for d in report.data)
        configs = ", ".join(c["path"] for c in report.configs)
        print(
            f"preflight ok: code {git.get('commit', '?')[:12]} (clean), data {data}"
            + (f", config {configs} committed" if configs else "")
        )
        return 0
    print("preflight failed:")
    for reason in report.reasons:
        print(f"  - {reason}")
    return 1


def cmd_tag(args: argparse.Namespace) -> int:
    repo = open_repo(args)
    snapshot_id = records.resolve_ref(repo, args.ref)
    current = records.set_tags(repo, snapshot_id, args.tags, remove=args.remove)
    if args.json:
        print_json({"snapshot": snapshot_id, "tags": current})
    elif not args.quiet:
        print(f"{snapshot_id[:12]}: {', '.join(current) or '(no tags)'}")
    return 0


def cmd_forget(args: argparse.Namespace) -> int:
    repo = open_repo(args)
    result = records.forget(repo, args.ref)
    if args.json:
        print_json(result)
        return 0
    what = result["name"] or (f"record {result['record'][:12]}" if result["record"] else None)
    if what:
        print(f"{'already forgot' if result['already_forgotten'] else 'forgot'} {what}")
    if result["unmarked"]:
        print(
            f"snapshot {result['snapshot'][:12]} is no longer claimed: `snapfs gc` frees what nothing "
            "else references once it is older than the grace period"
        )
    elif result["still_claimed_by"]:
        print(
            f"snapshot {result['snapshot'][:12]} is still claimed by {', '.join(result['still_claimed_by'])}"
        )
    elif not what:
        print(f"snapshot {result['snapshot'][:12]} was not marked: nothing to do")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    repo = open_repo(args)
    verb = "would free" if args.dry_run else "freed"
    printing = threading.Lock()  # deletions report from gc's worker threads

    def on_freed(freed: gc.Freed) -> None:
        if not args.json and not args.quiet:
            with printing:
                print(f"{verb} {freed.kind:<9} {freed.object_id}  {human_bytes(freed.size)}")

    report = gc.collect(
        repo,
        grace=(gc.DEFAULT_GRACE if args.grace is None else args.grace),
        dry_run=args.dry_run,
        jobs=args.jobs,
        wait=args.wait,
        on_freed=on_freed,
        on_wait=None if args.quiet else stderr,
    )
    if args.json:
        print_json(report.as_dict())
        return 0
    counts = report.counts()
    for tag in report.dangling_tags:
        print(f"{'would remove' if args.dry_run else 'removed'} tag {tag} (its snapshot is gone)")
    if not args.quiet:
        stderr(
            f"gc: {verb} {len(report.freed) - counts.get('pack', 0)} objects"
            + (f" and {counts['pack']} packs" if counts.get("pack") else "")
            + f", {human_bytes(report.freed_bytes)} "
            f"({counts['tree']} trees, {counts['chunklist']} chunk lists, {counts['chunk']} chunks); "
            f"kept {report.reachable_objects} reachable objects ({human_bytes(report.reachable_bytes)}) "
            f"of {report.roots} snapshots and {report.young_objects} unreachable objects younger than "
            f"the grace period ({human_bytes(report.young_bytes)})"
            + (
                f", and {report.packs_kept} packs ({human_bytes(report.pack_bytes_kept)}, "
                f"{human_bytes(report.pack_dead_bytes)} of it unreachable members)"
                if report.packs_kept
                else ""
            )
        )
    return 0
