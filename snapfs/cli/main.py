"""The ``snapfs`` command: parse, dispatch, and turn errors into one line and an exit code.

Each command group lives in its own module with ``register(subparsers, common)``
that adds its subcommands, each with ``func(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from ..errors import SnapfsError
from .common import common_options

COMMAND_MODULES = ["core", "mount", "cache", "records", "interop"]

DESCRIPTION = """\
snapfs: immutable, content-addressed snapshots of datasets and checkpoints.

A snapshot's ID is the BLAKE3 hash of its manifest: it names exactly which
bytes a run trained on. Snapshots live in a store (a local directory by
default, or any S3-compatible bucket); training nodes mount them read-only and
fetch only the chunks they read, verified before a byte is served.
"""

EPILOG = """\
examples:
  id=$(snapfs push ./imagenet --store s3://bucket/snaps)   push, print the ID
  snapfs ls $id -l                                           list the root
  snapfs pull $id ./copy && snapfs verify ./copy $id          restore and check
  snapfs diff OLD NEW --json                                 what changed
  snapfs mount /snap && cat /snap/$id/labels.csv             lazy, verified reads

Run 'snapfs COMMAND --help' for each command's options and examples.
Exit codes: 0 ok, 1 differences or failure, 2 usage, 3 not found, 4 corrupt data,
5 store unavailable, 6 already exists, 7 unsafe destination, 8 cache full, 9 mount error.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="snapfs",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"snapfs {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    common = common_options()
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f".{name}", __package__)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__package__}.{name}":
                raise
            continue
        module.register(subparsers, common)
    return parser


def setup_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity == 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="snapfs: %(levelname)s: %(message)s", stream=sys.stderr)
    if verbosity < 3:
        for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    setup_logging(getattr(args, "verbose", 0))
    try:
        code = args.func(args)
    except SnapfsError as exc:
        print(f"snapfs: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("snapfs: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `snapfs manifest ID | head`: not an error for the user.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
