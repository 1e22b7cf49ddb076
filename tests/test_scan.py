"""Local directory → snapshot ID: what the ID covers and never covers
(docs/FORMAT.md §5), special files, hard links and awkward names.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import socket
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from support.trees import local_state

from snapfs import format as fmt
from snapfs import snapshot
from snapfs.errors import UsageError
from snapfs.repo import Repo
from snapfs.scan import scan


@pytest.fixture(autouse=True)
def _isolated_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Pull resume state lives under XDG_CACHE_HOME; keep it out of the user's home.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


def make_tree(root: Path, order: int = 1) -> Path:
    """A small mixed tree; ``order=-1`` creates the same entries in reverse order."""
    rng = random.Random(42)
    files = {
        b"a.txt": rng.randbytes(1000),
        b"big.bin": rng.randbytes(700_000),
        b"sub/b.txt": rng.randbytes(10),
        b"sub/deeper/c.bin": rng.randbytes(300_000),
        b"tool.sh": b"#!/bin/sh\n",
        b"empty": b"",
    }
    dirs = [b"", b"sub", b"sub/deeper", b"empty-dir"]
    base = os.fsencode(root)
    for d in dirs:
        os.makedirs(os.path.join(base, d), exist_ok=True)
    for rel, data in list(files.items())[::order]:
        with open(os.path.join(base, rel), "wb") as f:
            f.write(data)
        os.chmod(os.path.join(base, rel), 0o755 if rel == b"tool.sh" else 0o644)
    os.symlink(b"a.txt", os.path.join(base, b"link"))
    return root


def tree_id(root: Path) -> str:
    return scan(root).root_id


# --- what the ID never covers ---------------------------------------------------


def test_id_ignores_mtime_order_owner_and_other_mode_bits(tmp_path: Path) -> None:
    original = make_tree(tmp_path / "a")
    reference = tree_id(original)
    assert len(reference) == 64

    copy = make_tree(tmp_path / "b", order=-1)  # other creation (and readdir) order
    for dirpath, dirnames, filenames in os.walk(copy):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            os.utime(path, (1_000_000, 2_000_000), follow_symlinks=False)
            os.lchown(path, 4321, 8765)
    os.chmod(copy / "a.txt", 0o600)  # group/other bits are not covered
    os.chmod(copy / "big.bin", 0o604 | stat.S_IXGRP | stat.S_IXOTH)  # nor group/other x
    os.chmod(copy / "sub", 0o700)  # nor directory modes
    assert tree_id(copy) == reference
    # The directory's own location and name are not covered either.
    moved = tmp_path / "elsewhere" / "renamed-root"
    moved.parent.mkdir()
    shutil.copytree(copy, moved, symlinks=True)
    assert tree_id(moved) == reference


def test_id_ignores_special_files(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "a")
    reference = tree_id(root)
    os.mkfifo(root / "fifo")
    assert tree_id(root) == reference


# --- what the ID covers -----------------------------------------------------------


def _flip_byte(root: Path) -> None:
    data = bytearray((root / "big.bin").read_bytes())
    data[350_000] ^= 1
    (root / "big.bin").write_bytes(bytes(data))


CHANGES: dict[str, Callable[[Path], None]] = {
    "byte flip": _flip_byte,
    "byte flip in a nested file": lambda r: (r / "sub/b.txt").write_bytes(
        b"X" + (r / "sub/b.txt").read_bytes()[1:]
    ),
    "rename": lambda r: os.rename(r / "a.txt", r / "A.txt"),
    "rename of a directory": lambda r: os.rename(r / "sub", r / "sub2"),
    "chmod +x": lambda r: os.chmod(r / "a.txt", 0o744),
    "chmod -x": lambda r: os.chmod(r / "tool.sh", 0o644),
    "new empty dir": lambda r: os.mkdir(r / "sub" / "new-empty"),
    "removed empty dir": lambda r: os.rmdir(r / "empty-dir"),
    "new empty file": lambda r: (r / "sub" / "new-empty-file").write_bytes(b""),
    "symlink target change": lambda r: (os.unlink(r / "link"), os.symlink("big.bin", r / "link")),
    "symlink becomes a file": lambda r: (os.unlink(r / "link"), (r / "link").write_bytes(b"a.txt")),
    "empty file becomes an empty dir": lambda r: (os.unlink(r / "empty"), os.mkdir(r / "empty")),
    "appended byte": lambda r: (r / "a.txt").write_bytes((r / "a.txt").read_bytes() + b"\n"),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_id_changes_with(tmp_path: Path, change: str) -> None:
    root = make_tree(tmp_path / "a")
    before = tree_id(root)
    CHANGES[change](root)
    assert tree_id(root) != before


# --- special files and hard links -------------------------------------------------


def test_special_files_are_skipped_and_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    root = make_tree(tmp_path / "a")
    reference = tree_id(root)
    os.mkfifo(root / "sub" / "a fifo")
    monkeypatch.chdir(root)  # a relative bind keeps the socket path under 108 bytes
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind("sock")
    expected = {str(root / "sub" / "a fifo"), str(root / "sock")}
    try:
        os.mknod(root / "null-dev", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
        expected.add(str(root / "null-dev"))
    except PermissionError:
        pass  # not root: FIFO and socket still cover the rule
    with caplog.at_level(logging.WARNING, logger="snapfs.scan"):
        result = scan(root)
    server.close()
    assert result.root_id == reference
    assert set(result.skipped) == expected
    warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warning) == 1
    assert f"skipped {len(expected)} special file(s)" in warning[0]
    for path in expected:
        assert path in warning[0]


def test_hard_links_become_two_separate_files(tmp_path: Path) -> None:
    root = tmp_path / "src"
    root.mkdir()
    (root / "one").write_bytes(b"shared content\n" * 1000)
    os.link(root / "one", root / "two")
    result = scan(root)
    entries = {e.name: e for e in fmt.decode_tree(result.trees[result.root_id])}
    assert set(entries) == {b"one", b"two"}
    assert entries[b"one"].chunks == entries[b"two"].chunks
    assert result.files == 2 and result.total_bytes == 2 * 15_000
    # Same ID as two independent copies.
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "one").write_bytes(b"shared content\n" * 1000)
    (plain / "two").write_bytes(b"shared content\n" * 1000)
    assert tree_id(plain) == result.root_id

    repo = Repo.open("file://" + str(tmp_path / "store"))
    snapshot_id = snapshot.push(str(root), repo).snapshot_id
    dest = tmp_path / "dest"
    snapshot.pull(repo, snapshot_id, str(dest))
    one, two = os.stat(dest / "one"), os.stat(dest / "two")
    assert one.st_ino != two.st_ino and one.st_nlink == two.st_nlink == 1
    assert (dest / "two").read_bytes() == (root / "one").read_bytes()


# --- awkward names -------------------------------------------------------------------

ODD_NAMES = [
    b"with space",
    b" leading space",
    b"trailing space ",
    b"new\nline",
    b"carriage\rreturn",
    b"tab\there",
    b"\x01\x02\x7f control",
    b"\xff\xfe not utf-8",
    b"caf\xe9 latin-1",
    "café utf-8".encode(),
    "日本語".encode(),
    "e\u0301 decomposed".encode(),  # must not be NFC-normalised into "é"
    b"back\\slash",
    b"-dash",
    b"...",
    b".hidden",
    b"*?[glob]",
    b"n" * 255,
]


def test_odd_names_round_trip_through_push_and_pull(tmp_path: Path) -> None:
    root = tmp_path / "src"
    base = os.fsencode(root)
    os.makedirs(os.path.join(base, b"dir \xff\n"))
    for i, name in enumerate(ODD_NAMES):
        with open(os.path.join(base, name), "wb") as f:
            f.write(b"content %d\n" % i)
        with open(os.path.join(base, b"dir \xff\n", name), "wb") as f:
            f.write(b"nested %d\n" % i)
    os.symlink(b"dir \xff\n/new\nline", os.path.join(base, b"link \xfe"))
    result = scan(root)
    names = [e.name for e in fmt.decode_tree(result.trees[result.root_id])]
    assert names == sorted(ODD_NAMES + [b"dir \xff\n", b"link \xfe"])

    repo = Repo.open("file://" + str(tmp_path / "store"))
    pushed = snapshot.push(str(root), repo)
    assert pushed.snapshot_id == result.root_id
    dest = tmp_path / "dest"
    snapshot.pull(repo, pushed.snapshot_id, str(dest))
    assert local_state(dest) == local_state(root)
    assert sorted(os.listdir(os.fsencode(dest))) == sorted(os.listdir(base))
    assert tree_id(dest) == pushed.snapshot_id
    assert snapshot.verify(repo, str(dest), pushed.snapshot_id) == []


def test_every_byte_except_slash_and_nul_is_a_valid_name(tmp_path: Path) -> None:
    root = tmp_path / "src"
    base = os.fsencode(root)
    os.makedirs(base)
    for byte in range(1, 256):
        if byte == 0x2F:
            continue
        name = bytes([byte]) * (3 if byte == 0x2E else 1)  # "." itself is not a file name
        with open(os.path.join(base, name), "wb") as f:
            f.write(bytes([byte]))
    entries = fmt.decode_tree(scan(root).trees[scan(root).root_id])
    assert len(entries) == 254


# --- scan errors ------------------------------------------------------------------------


def test_scan_of_a_missing_path_or_a_file_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="No such file"):
        scan(tmp_path / "missing")
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(UsageError, match="not a directory"):
        scan(tmp_path / "file")


def test_scan_follows_a_symlinked_root_but_not_symlinks_inside(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "a")
    os.symlink(root, tmp_path / "root-link")
    assert tree_id(tmp_path / "root-link") == tree_id(root)
    os.symlink(root / "sub", root / "sub-link")
    entries = {e.name: e for e in fmt.decode_tree(scan(root).trees[scan(root).root_id])}
    assert entries[b"sub-link"].is_symlink


def test_a_file_swapped_for_a_symlink_mid_batch_fails_cleanly(tmp_path: Path, monkeypatch) -> None:
    # A batch opens all of its files before hashing them (to hint the kernel).
    # A file that turns into a symlink after the walk stat'ed it must not be
    # followed; the scan fails naming it, and no descriptor of the batch leaks.
    from snapfs import scan as scan_mod
    from snapfs.errors import SnapfsError

    root = tmp_path / "tree"
    root.mkdir()
    for i in range(40):
        (root / f"f{i:02d}").write_bytes(os.urandom(40_000))
    (tmp_path / "elsewhere").write_bytes(b"not part of the tree")
    real = scan_mod._hash_batch

    def swap_then_hash(paths, sizes):
        victim = paths[len(paths) // 2]
        os.unlink(victim)
        os.symlink(tmp_path / "elsewhere", victim)
        return real(paths, sizes)

    monkeypatch.setattr(scan_mod, "_hash_batch", swap_then_hash)
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(SnapfsError, match=r"cannot read .*f20: Too many levels of symbolic links"):
        scan(root)
    assert len(os.listdir("/proc/self/fd")) == before


def test_a_batch_holds_a_bounded_number_of_files_open(tmp_path: Path, monkeypatch) -> None:
    from snapfs import scan as scan_mod

    root = tmp_path / "tree"
    root.mkdir()
    for i in range(60):
        (root / f"f{i:02d}").write_bytes(os.urandom(30_000))
    real = scan_mod._hash_fd
    open_counts = []

    def counting(path, fd):
        open_counts.append(len(os.listdir("/proc/self/fd")))
        return real(path, fd)

    monkeypatch.setattr(scan_mod, "_hash_fd", counting)
    before = len(os.listdir("/proc/self/fd"))
    reference = scan(root).root_id
    assert len(open_counts) == 60
    # 1 for listdir's own descriptor; the hashing thread's window is the rest.
    assert max(open_counts) - before <= scan_mod._HINT_AHEAD + 1
    monkeypatch.setattr(scan_mod, "_HINT_AHEAD", 1)
    assert scan(root).root_id == reference  # the window changes nothing but speed
