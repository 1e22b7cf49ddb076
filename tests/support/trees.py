"""Deterministic sample trees for tests: every kind of entry the format knows."""

from __future__ import annotations

import os
import random
import stat
from pathlib import Path


def make_mixed_tree(root: Path, seed: int = 7, large_mib: int = 6) -> Path:
    """A tree with multi-chunk, small and empty files, symlinks, exec bits,
    deep and empty directories, and odd names (spaces, newline, non-UTF-8)."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "large.bin").write_bytes(rng.randbytes(large_mib << 20))
    (root / "medium.bin").write_bytes(rng.randbytes(700_000))
    (root / "empty.txt").write_bytes(b"")
    (root / "run.sh").write_bytes(b"#!/bin/sh\necho hi\n")
    os.chmod(root / "run.sh", 0o755)
    small = root / "small files"
    small.mkdir()
    for i in range(40):
        (small / f"img_{i:03d}.jpg").write_bytes(rng.randbytes(rng.randint(1, 60_000)))
    deep = root
    for level in range(12):
        deep = deep / f"d{level}"
    deep.mkdir(parents=True)
    (deep / "bottom.txt").write_bytes(b"deep down\n")
    (root / "empty dir").mkdir()
    odd = root / "odd"
    odd.mkdir()
    (odd / "new\nline").write_bytes(b"newline name\n")
    (odd / "spa ce").write_bytes(b"space name\n")
    (odd / "ünï").write_bytes(b"unicode name\n")
    os.close(os.open(os.path.join(os.fsencode(odd), b"raw-\xff\xfe"), os.O_CREAT | os.O_WRONLY, 0o644))
    with open(os.path.join(os.fsencode(odd), b"raw-\xff\xfe"), "wb") as f:
        f.write(b"non-utf8 name\n")
    os.symlink("../medium.bin", odd / "link-to-medium")
    os.symlink("d1/d2", root / "d0" / "link-to-dir")
    os.symlink("missing-target", odd / "dangling")
    return root


def file_digests(root: Path | bytes) -> dict[bytes, bytes]:
    """{relative path: sha256} for every regular file, reading with plain open/read."""
    import hashlib

    out: dict[bytes, bytes] = {}
    root_b = os.fsencode(root)
    for dirpath, dirnames, filenames in os.walk(root_b):
        dirnames.sort()
        for name in filenames:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                continue
            with open(path, "rb") as f:
                out[os.path.relpath(path, root_b)] = hashlib.sha256(f.read()).digest()
    return out


def local_state(root: Path | bytes) -> dict[bytes, tuple]:
    """{relative path: (kind, exec bit, bytes or target)} read with plain syscalls."""
    root_b = os.fsencode(root)
    out: dict[bytes, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root_b):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root_b)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("l", False, os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("d", False, None)
            else:
                with open(path, "rb") as f:
                    out[rel] = ("f", bool(st.st_mode & stat.S_IXUSR), f.read())
    return out
