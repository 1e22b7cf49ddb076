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


def runtime_dir() -> str:
    """Where this user's daemons put their control sockets (SNAPFS_RUNTIME_DIR
    overrides it)."""
    env = os.environ.get("SNAPFS_RUNTIME_DIR")
    if env:
        return env
    if os.geteuid() == 0:
        return "/run/snapfs"
    base = os.environ.get("XDG_RUNTIME_DIR")
    return os.path.join(base, "snapfs") if base else f"/tmp/snapfs-{os.geteuid()}"


def control_sockets(mountpoint: str) -> list[str]:
    """The control socket a daemon serving ``mountpoint`` listens on: first in
    this user's runtime dir, then in root's (a system mount read by a user)."""
    import blake3

    name = blake3.blake3(os.fsencode(os.path.realpath(mountpoint))).hexdigest()[:32] + ".sock"
    dirs = [runtime_dir()]
    if dirs[0] != "/run/snapfs":
        dirs.append("/run/snapfs")
    return [os.path.join(d, name) for d in dirs]
