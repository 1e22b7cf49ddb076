"""Resolve a user-supplied REF to a snapshot ID.

A REF is a full snapshot ID, a unique prefix of at least 8 hex digits, a
record ID (or its prefix), a name such as ``imagenet@1.2.0``, or
``SERIES@latest``. The rules and their order live in snapfs.records.lookup.
"""

from __future__ import annotations

from .records import lookup
from .repo import Repo


def resolve_ref(repo: Repo, ref: str) -> str:
    """REF -> snapshot ID; NotFoundError, AmbiguousRefError or UsageError otherwise."""
    return lookup(repo, ref).snapshot
