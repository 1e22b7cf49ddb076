"""Mount helpers shared by the tests that mount for real: the CLI in a
subprocess, a mount that is always torn down, status, and readers in
separate processes (as a dataloader's workers are)."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path

SNAPFS = [sys.executable, "-m", "snapfs.cli.main"]


def fuse_missing() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if not shutil.which("fusermount3"):
        return "fusermount3 is missing (install fuse3)"
    return None


def snapfs(*args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run([*SNAPFS, *args], capture_output=True, text=True, env=env, timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f"snapfs {' '.join(args)} exited {result.returncode}: {result.stderr}")
    return result


@contextmanager
def mounted(mountpoint: Path, store_url: str, cache: Path, *extra: str):
    snapfs("mount", str(mountpoint), "--store", store_url, "--cache", str(cache), *extra)
    try:
        assert os.path.ismount(mountpoint)
        yield mountpoint
    finally:
        if os.path.ismount(mountpoint):
            subprocess.run([*SNAPFS, "umount", str(mountpoint)], capture_output=True, timeout=60)
        if os.path.ismount(mountpoint):
            subprocess.run(["fusermount3", "-uz", str(mountpoint)], capture_output=True)


def status(mountpoint: Path) -> dict:
    return json.loads(snapfs("status", str(mountpoint), "--json").stdout)


def _hash_files(paths: list[bytes]) -> dict[bytes, bytes]:
    import hashlib

    out = {}
    for path in paths:
        with open(path, "rb") as f:
            out[path] = hashlib.sha256(f.read()).digest()
    return out


def parallel_digests(root: Path, workers: int = 4, exclude: tuple[bytes, ...] = ()) -> dict[bytes, bytes]:
    """sha256 of every regular file under root, read by separate processes."""
    root_b = os.fsencode(root)
    paths = []
    for dirpath, dirnames, filenames in os.walk(root_b):
        dirnames.sort()
        paths += [
            os.path.join(dirpath, n)
            for n in filenames
            if not os.path.islink(os.path.join(dirpath, n))
            and os.path.relpath(os.path.join(dirpath, n), root_b) not in exclude
        ]
    batches = [paths[i::workers] for i in range(workers)]
    out: dict[bytes, bytes] = {}
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for part in pool.map(_hash_files, batches):
            out.update({os.path.relpath(p, root_b): d for p, d in part.items()})
    return out


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False
