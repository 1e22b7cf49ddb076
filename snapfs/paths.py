"""Where snapfs keeps its local state (XDG base dirs, or system dirs as root)."""

from __future__ import annotations

import os


def _home(*parts: str) -> str:
    return os.path.join(os.path.expanduser("~"), *parts)


def user_cache_dir() -> str:
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or _home(".cache"), "snapfs")


def default_cache_dir() -> str:
    """The chunk cache shared by mounts and prewarms on this node."""
    env = os.environ.get("SNAPFS_CACHE")
    if env:
        return env
    if os.geteuid() == 0:
        return "/var/cache/snapfs"
    return user_cache_dir()


def pull_state_dir() -> str:
    return os.path.join(user_cache_dir(), "pulls")
