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
#: The module that defines each command, and the modules that add options to
#: commands they do not define. `snapfs CMD ...` builds only the parsers those
#: modules register: building all two dozen took 0.06-0.075 s here, against
#: 0.04 s for id's own (imports it needs anyway included). tests/test_cli_core.py
#: checks both maps against the full parser.
COMMANDS = {
    **dict.fromkeys(["id", "push", "pull", "verify", "ls", "cat", "manifest", "diff", "fsck"], "core"),
    **dict.fromkeys(["mount", "umount", "status"], "mount"),
    **dict.fromkeys(["prewarm", "cache"], "cache"),
    **dict.fromkeys(["log", "show", "ancestors", "reproduce", "preflight", "tag", "forget", "gc"], "records"),
    **dict.fromkeys(["sync", "import"], "interop"),
}
EXTENDS = {"records": {"push"}, "interop": {"id", "pull", "mount"}}

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


def modules_for(command: str | None) -> list[str]:
    """The command modules to register for ``command``; all of them for None or
    an unknown word (so that help lists everything and argparse names the choices)."""
    if command not in COMMANDS:
        return COMMAND_MODULES
    wanted = {COMMANDS[command]} | {name for name, extended in EXTENDS.items() if command in extended}
    return [name for name in COMMAND_MODULES if name in wanted]


def _command_word(argv: list[str]) -> str | None:
    # Options all belong to subcommands; the top level has only -h and --version.
    return argv[0] if argv and not argv[0].startswith("-") else None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser for ``command`` alone, or for every command if None."""
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
    for name in modules_for(command):
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
    if argv is None:
        argv = sys.argv[1:]
    parser = build_parser(_command_word(argv))
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
