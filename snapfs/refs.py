"""Resolve a user-supplied REF to a snapshot ID.

A REF is a full ID or a unique prefix of at least 8 hex digits; names,
``SERIES@latest`` and record IDs are added by snapfs.records.
"""

from __future__ import annotations

from .repo import Repo


def resolve_ref(repo: Repo, ref: str) -> str:
    return repo.resolve(ref)
