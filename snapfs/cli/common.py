"""Helpers shared by the CLI command modules: options, stores, output, progress."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from ..errors import UsageError


def lazy_import(name: str):
    """``name`` as a module whose code runs on first attribute access.

    Every command module is imported to build the parser, but one run uses
    one command: ``snapfs id`` must not pay for records, gc and sync (start-up
    is most of ``id``'s time on a small tree). Uses the standard library's
    LazyLoader.
    """
    module = sys.modules.get(name)
    if module is not None:
        return module
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(name)
    spec.loader = importlib.util.LazyLoader(spec.loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def lazy_function(module, name: str) -> Callable:
    """``module.name``, looked up only when called (for argparse types of lazy modules)."""

    def call(*args, **kwargs):
        return getattr(module, name)(*args, **kwargs)

    call.__name__ = name
    return call


if TYPE_CHECKING:
    from ..repo import Repo

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b?)\s*$", re.IGNORECASE)


def common_options() -> argparse.ArgumentParser:
    """Options every subcommand accepts, before or after its arguments."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("common options")
    group.add_argument(
        "--store",
        metavar="URL",
        default=None,
        help="store URL: file:///path, a path, or s3://bucket/prefix (default: $SNAPFS_STORE, "
        "else ~/.local/share/snapfs/store)",
    )
    group.add_argument(
        "--endpoint-url",
        metavar="URL",
        default=None,
        help="S3 endpoint for MinIO, Ceph, R2... ($AWS_ENDPOINT_URL)",
    )
    group.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")
    group.add_argument("-v", "--verbose", action="count", default=0, help="more log output on stderr")
    group.add_argument("-q", "--quiet", action="store_true", help="no progress bars or summaries")
    return parent


def open_repo(args: argparse.Namespace) -> Repo:
    from ..repo import Repo

    return Repo.open(args.store, endpoint_url=args.endpoint_url)


def resolve(repo: Repo, ref: str) -> str:
    from ..refs import resolve_ref  # lazy: records is only needed once a REF is resolved

    return resolve_ref(repo, ref)


def print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=True, default=str)
    sys.stdout.write("\n")


def parse_size(text: str) -> int:
    """'10G', '512MiB', '1.5T', '4096' -> bytes (binary multiples)."""
    match = _SIZE_RE.match(text)
    if not match:
        raise UsageError(f"invalid size {text!r} (examples: 512M, 10G, 2TiB)")
    number, unit = float(match.group(1)), match.group(2).lower()
    return int(number * (1024 ** " kmgtp".index(unit or " ")))


def count_arg(text: str) -> int:
    """argparse type for a count that may be 0 but not negative."""
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"invalid count {text!r} (a whole number, 0 or more)") from None
    if value < 0:
        raise UsageError(f"invalid count {text!r} (a whole number, 0 or more)")
    return value


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def stderr(message: str) -> None:
    print(message, file=sys.stderr)


@contextmanager
def progress_bar(
    args: argparse.Namespace, total: int | None, desc: str, unit: str = "B"
) -> Iterator[Callable[[int], None]]:
    """A tqdm bar on a TTY (stderr); a no-op elsewhere or with --quiet."""
    if args.quiet or args.json or not sys.stderr.isatty() or os.environ.get("SNAPFS_NO_PROGRESS"):
        yield lambda n: None
        return
    from tqdm import tqdm

    bar = tqdm(
        total=total, desc=desc, unit=unit, unit_scale=True, unit_divisor=1024, leave=False, file=sys.stderr
    )
    try:
        yield bar.update
    finally:
        bar.close()


def add_command(subparsers, common, name: str, help: str, epilog: str, func) -> argparse.ArgumentParser:
    """A subcommand with the common options, its help as description, and verbatim examples."""
    parser = subparsers.add_parser(
        name,
        parents=[common],
        help=help,
        description=help,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(func=func)
    return parser


def arg_type(check):
    """Wrap a validator that raises UsageError so argparse reports its message before any work starts."""

    def convert(text: str):
        try:
            return check(text)
        except UsageError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc

    convert.__name__ = check.__name__
    return convert


def name_arg(text: str) -> str:
    """argparse type for a snapshot name (validated without touching the store)."""
    from ..records import validate_name

    validate_name(text)
    return text
