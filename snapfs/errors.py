"""Exception types shared by every layer, each with the exit code the CLI uses.

Errors travel up as exceptions. The CLI turns a SnapfsError into one line on
stderr and ``exit_code``; the FUSE adapter turns it into an errno.
"""

from __future__ import annotations


class SnapfsError(Exception):
    """Base class. ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class UsageError(SnapfsError):
    """A bad argument: wrong syntax, conflicting options, invalid path."""

    exit_code = 2


class NotFoundError(SnapfsError):
    """An unknown reference, name or object."""

    exit_code = 3


class AmbiguousRefError(UsageError):
    """A prefix that matches more than one snapshot."""


class IntegrityError(SnapfsError):
    """Bytes that do not hash to their ID: a corrupt or truncated object."""

    exit_code = 4


class FormatError(IntegrityError):
    """A malformed or hostile encoding (tree, chunk list, record, name)."""


class StoreUnavailableError(SnapfsError):
    """The store cannot be reached or refused the request after retries."""

    exit_code = 5


class AlreadyExistsError(SnapfsError):
    """A create-once object (a name) already exists with other content."""

    exit_code = 6


class DestinationError(SnapfsError):
    """A pull destination that is unsafe or not ours to overwrite."""

    exit_code = 7


class CacheFullError(SnapfsError):
    """The cache cannot hold what was asked, given its size and pins."""

    exit_code = 8


class CacheIndexError(SnapfsError):
    """The cache's LMDB index refused a transaction (most often: its disk is full)."""

    exit_code = 8

    def __init__(self, message: str, *, disk_full: bool = False) -> None:
        super().__init__(message)
        self.disk_full = disk_full


class MountError(SnapfsError):
    """A mount that cannot be started, or a mountpoint in a bad state."""

    exit_code = 9
