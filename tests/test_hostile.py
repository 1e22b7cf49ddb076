"""Hostile store content: objects that hash to their keys but lie in their structure.

BLAKE3 verification cannot catch these (tests/support/hostile.py writes each
object under its own hash); structural validation must. For each case:
``snapfs pull`` refuses with a clear error and writes nothing outside DEST,
the mount answers EIO for that path only (its siblings still read), and
nothing crashes or hangs. The decoders are also fuzzed with hypothesis, alone
and end to end through pull and the mount.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import stat
import struct
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.hostile import (
    HostileWriter,
    chunklist_body,
    dir_entry,
    file_body,
    file_entry,
    raw_chunklist,
    raw_entry,
    self_referencing_tree,
    symlink_body,
    symlink_entry,
)
from support.mounts import fuse_missing, mounted, snapfs, status
from test_faults import probe

from snapfs import format as fmt
from snapfs.cache import DiskCache, ObjectSource
from snapfs.errors import (
    DestinationError,
    FormatError,
    IntegrityError,
    NotFoundError,
    SnapfsError,
)
from snapfs.hashing import hash_bytes
from snapfs.repo import Repo
from snapfs.snapshot import pull
from snapfs.store import LocalStore
from snapfs.vfs import ROOT_INODE, SnapshotFS

_fuse_reason = fuse_missing()
needs_fuse = pytest.mark.skipif(_fuse_reason is not None, reason=f"no FUSE: {_fuse_reason}")
pytestmark = pytest.mark.timeout(240)


# --- the cases ------------------------------------------------------------------------

Case = Callable[[HostileWriter], str]  # builds the hostile tree, returns its ID


def _chunk(w: HostileWriter, data: bytes = b"payload\n") -> tuple[str, int]:
    return w.chunk(data)


def _named(name: bytes) -> Case:
    return lambda w: w.tree([file_entry(name, [_chunk(w)])])


def _over_long_name(w: HostileWriter) -> str:
    return w.tree([file_entry(b"x" * 256, [_chunk(w)])])


def _name_len_past_end(w: HostileWriter) -> str:
    # name_len says 65535, the object ends long before.
    return w.tree([raw_entry("f", b"short", 8, file_body([_chunk(w)]), name_len=0xFFFF)])


def _duplicates(w: HostileWriter) -> str:
    ref = _chunk(w)
    return w.tree([file_entry(b"same", [ref]), file_entry(b"same", [ref])])


def _file_then_dir_same_name(w: HostileWriter) -> str:
    empty = w.tree([])
    return w.tree([dir_entry(b"same", empty), file_entry(b"same", [_chunk(w)])])


def _unsorted(w: HostileWriter) -> str:
    ref = _chunk(w)
    return w.tree([file_entry(b"b", [ref]), file_entry(b"a", [ref])])


def _sizes_disagree(w: HostileWriter) -> str:
    return w.tree([file_entry(b"f", [_chunk(w)], size=1 << 20)])


def _absurd_file_size(w: HostileWriter) -> str:
    return w.tree([raw_entry("f", b"f", 1 << 62, file_body([]))])


def _absurd_dir_size(w: HostileWriter) -> str:
    return w.tree([dir_entry(b"d", w.tree([]), size=(1 << 64) - 1)])


def _absurd_subdirs(w: HostileWriter) -> str:
    return w.tree([dir_entry(b"d", w.tree([]), subdirs=(1 << 32) - 1)])


def _absurd_entry_count(w: HostileWriter) -> str:
    return w.tree([file_entry(b"f", [_chunk(w)])], count=(1 << 32) - 1)


def _count_past_end(w: HostileWriter) -> str:
    return w.tree([file_entry(b"f", [_chunk(w)])], count=1 << 24)


def _too_many_inline_chunks(w: HostileWriter) -> str:
    ref = _chunk(w, b"x")
    return w.tree([raw_entry("f", b"f", 2000, file_body([ref] * 2000))])


def _zero_length_chunk(w: HostileWriter) -> str:
    ref = _chunk(w)
    return w.tree([raw_entry("f", b"f", 8, file_body([ref, (ref[0], 0)]))])


def _oversized_chunk(w: HostileWriter) -> str:
    ref = _chunk(w)
    return w.tree([raw_entry("f", b"f", 5 << 20, file_body([(ref[0], 5 << 20)]))])


def _chunklist_count_mismatch(w: HostileWriter) -> str:
    ref = _chunk(w, b"z")
    listed = w.put(raw_chunklist([ref] * 1025))
    return w.tree([raw_entry("f", b"f", 1026, chunklist_body(listed, 1026))])


def _chunklist_sizes_disagree(w: HostileWriter) -> str:
    ref = _chunk(w, b"z")
    listed = w.put(raw_chunklist([ref] * 1025))
    return w.tree([raw_entry("f", b"f", 1030, chunklist_body(listed, 1025))])


def _chunklist_small_count(w: HostileWriter) -> str:
    # Layout 1 is only for more than 1024 chunks: one canonical encoding per file.
    ref = _chunk(w, b"z")
    listed = w.put(raw_chunklist([ref] * 3))
    return w.tree([raw_entry("f", b"f", 3, chunklist_body(listed, 3))])


def _chunklist_version(w: HostileWriter) -> str:
    ref = _chunk(w, b"z")
    listed = w.put(raw_chunklist([ref] * 1025, version=2))
    return w.tree([raw_entry("f", b"f", 1025, chunklist_body(listed, 1025))])


def _unknown_version(w: HostileWriter) -> str:
    return w.tree([file_entry(b"f", [_chunk(w)])], version=2)


def _bad_magic(w: HostileWriter) -> str:
    return w.tree([file_entry(b"f", [_chunk(w)])], magic=b"NOTATREE")


def _trailing(w: HostileWriter) -> str:
    return w.tree([file_entry(b"f", [_chunk(w)])], trailing=b"\x00")


def _unknown_kind(w: HostileWriter) -> str:
    return w.tree([raw_entry("x", b"f", 0, b"")])


def _flags_on_dir(w: HostileWriter) -> str:
    return w.tree([raw_entry("d", b"d", 0, b"\x00" * 36, flags=1)])


def _unknown_layout(w: HostileWriter) -> str:
    return w.tree([raw_entry("f", b"f", 0, b"\x07")])


def _symlink_nul(w: HostileWriter) -> str:
    return w.tree([raw_entry("l", b"l", 5, symlink_body(b"a\x00/.."))])


def _symlink_empty(w: HostileWriter) -> str:
    return w.tree([raw_entry("l", b"l", 0, symlink_body(b""))])


def _symlink_size_lies(w: HostileWriter) -> str:
    return w.tree([raw_entry("l", b"l", 99, symlink_body(b"target"))])


def _dir_points_at_a_chunk(w: HostileWriter) -> str:
    chunk_id, _ = _chunk(w, b"I am not a tree")
    return w.tree([dir_entry(b"d", chunk_id)])


#: (case, what the error must say). Each is a FormatError (exit 4).
FORMAT_CASES: dict[str, tuple[Case, str]] = {
    "name-dotdot": (_named(b".."), "is not allowed"),
    "name-dot": (_named(b"."), "is not allowed"),
    "name-empty": (_named(b""), "empty entry name"),
    "name-slash": (_named(b"../../escape"), "contains '/' or NUL"),
    "name-nul": (_named(b"a\x00b"), "contains '/' or NUL"),
    "name-over-long": (_over_long_name, "longer than 255 bytes"),
    "name-len-past-end": (_name_len_past_end, "truncated"),
    "duplicate-names": (_duplicates, "not strictly sorted or duplicated"),
    "duplicate-file-and-dir": (_file_then_dir_same_name, "not strictly sorted or duplicated"),
    "unsorted": (_unsorted, "not strictly sorted"),
    "chunk-sizes-disagree": (_sizes_disagree, "chunk sizes add up to 8, not the file size 1048576"),
    "absurd-file-size": (_absurd_file_size, "absurd file size"),
    "absurd-dir-size": (_absurd_dir_size, "absurd directory size"),
    "absurd-subdirs": (_absurd_subdirs, "absurd subdirectory count"),
    "absurd-entry-count": (_absurd_entry_count, "more than the limit"),
    "entry-count-past-end": (_count_past_end, "truncated"),
    "too-many-inline-chunks": (_too_many_inline_chunks, "inline chunks (limit 1024)"),
    "zero-length-chunk": (_zero_length_chunk, "chunk length 0 out of range"),
    "oversized-chunk": (_oversized_chunk, "out of range"),
    "unknown-version": (_unknown_version, "unknown format version 2 (this snapfs reads version 1)"),
    "bad-magic": (_bad_magic, "bad magic"),
    "trailing-bytes": (_trailing, "1 trailing bytes"),
    "unknown-kind": (_unknown_kind, "unknown entry kind"),
    "flags-on-dir": (_flags_on_dir, "invalid flags"),
    "unknown-layout": (_unknown_layout, "unknown chunk layout"),
    "symlink-nul": (_symlink_nul, "invalid symlink target"),
    "symlink-empty": (_symlink_empty, "invalid symlink target"),
    "symlink-size-lies": (_symlink_size_lies, "not its target length"),
    "chunklist-small-count": (_chunklist_small_count, "does not fit size"),
    "dir-is-a-chunk": (_dir_points_at_a_chunk, "bad magic"),
}
#: Hostile files whose tree decodes but whose content does not add up: the
#: directory lists, the file gives EIO when opened or read.
FILE_CASES: dict[str, tuple[Case, str]] = {
    "chunklist-count-mismatch": (_chunklist_count_mismatch, "holds 1025 chunks, the tree says 1026"),
    "chunklist-sizes-disagree": (_chunklist_sizes_disagree, "add up to 1025, not the file size 1030"),
    "chunklist-unknown-version": (_chunklist_version, "unknown format version 2"),
}


@pytest.fixture
def writer(tmp_path: Path) -> HostileWriter:
    return HostileWriter(Repo(LocalStore(str(tmp_path / "store"))))


def pull_into(repo: Repo, snapshot_id: str, tmp_path: Path, **kwargs) -> Path:
    """Pull into OUTER/dest; afterwards OUTER must hold nothing but dest."""
    outer = tmp_path / "outer"
    outer.mkdir(parents=True, exist_ok=True)
    dest = outer / "dest"
    try:
        pull(repo, snapshot_id, str(dest), **kwargs)
    finally:
        assert os.listdir(outer) in ([], ["dest"])
        assert_inside(dest)
    return dest


def assert_inside(dest: Path) -> None:
    """Every entry under dest is a plain file, a directory or a symlink that stays inside."""
    if not dest.exists():
        return
    real_dest = os.path.realpath(dest)
    for dirpath, dirnames, filenames in os.walk(os.fsencode(dest)):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            mode = os.lstat(path).st_mode
            assert stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode), path
            if stat.S_ISLNK(mode):
                resolved = os.path.realpath(path)
                assert os.fsencode(resolved).startswith(os.fsencode(real_dest) + b"/") or os.fsencode(
                    resolved
                ) == os.fsencode(real_dest), (path, resolved)


# --- pull -------------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(FORMAT_CASES))
def test_pull_refuses_hostile_tree(case: str, writer: HostileWriter, tmp_path: Path):
    build, message = FORMAT_CASES[case]
    bad = build(writer)
    snapshot_id, _good = writer.wrapped(bad)
    with pytest.raises(FormatError) as caught:
        pull_into(writer.repo, snapshot_id, tmp_path)
    assert message in str(caught.value)
    if case != "dir-is-a-chunk":  # there the error names the chunk posing as a tree
        assert bad in str(caught.value), "the error must name the object"
    # The hostile tree as the snapshot root is refused just the same.
    root = writer.mark(bad)
    with pytest.raises(FormatError):
        pull_into(writer.repo, root, tmp_path / "again")


@pytest.mark.parametrize("case", sorted(FILE_CASES))
def test_pull_refuses_hostile_chunk_list(case: str, writer: HostileWriter, tmp_path: Path):
    build, message = FILE_CASES[case]
    snapshot_id, _good = writer.wrapped(build(writer))
    with pytest.raises(FormatError) as caught:
        pull_into(writer.repo, snapshot_id, tmp_path)
    assert message in str(caught.value)


def test_pull_refuses_a_chunk_shorter_than_its_ref(writer: HostileWriter, tmp_path: Path):
    """The tree says 9 bytes and the sizes add up; the stored chunk (which hashes
    right) has 8. The length check, not the hash, catches it."""
    chunk_id, length = _chunk(writer)
    bad = writer.tree([raw_entry("f", b"f", length + 1, file_body([(chunk_id, length + 1)]))])
    snapshot_id, _good = writer.wrapped(bad)
    with pytest.raises(IntegrityError, match=f"chunk {chunk_id} is 8 bytes, the tree says 9"):
        pull_into(writer.repo, snapshot_id, tmp_path)


def test_self_referencing_tree_is_impossible_with_verified_hashes(writer: HostileWriter, tmp_path: Path):
    cycle_id, looping = self_referencing_tree(writer)
    # The only way to make the loop is to store bytes under a key they do not
    # hash to, and every reader verifies before it decodes.
    assert hash_bytes(looping) != cycle_id
    assert fmt.decode_tree(looping)[0].tree_id == cycle_id  # structurally it *is* a loop
    writer.mark(cycle_id)
    with pytest.raises(IntegrityError, match=f"tree {cycle_id}.* is corrupt: its bytes hash to"):
        pull_into(writer.repo, cycle_id, tmp_path)
    snapshot_id, _ = writer.wrapped(cycle_id)
    with pytest.raises(IntegrityError, match="corrupt"):
        pull_into(writer.repo, snapshot_id, tmp_path / "wrapped")


def test_pull_missing_subtree_is_not_found(writer: HostileWriter, tmp_path: Path):
    snapshot_id, _ = writer.wrapped("ab" * 32)
    with pytest.raises(NotFoundError, match="objects/ab/" + "ab" * 31 + ": not in store"):
        pull_into(writer.repo, snapshot_id, tmp_path)


SYMLINK_CASES: dict[str, list[tuple[bytes, bytes]]] = {
    # name -> target entries of the hostile tree; the first entry is the one that escapes
    "absolute": [(b"passwd", b"/etc/passwd")],
    "climbs-out": [(b"up", b"../../../../../../etc")],
    "climbs-out-of-snapshot": [(b"up", b"../../sibling")],
    # Each target alone stays inside; followed, x lands above the snapshot.
    "chain": [(b"x", b"sub/up/../.."), (b"sub", None)],
}


def _symlink_tree(writer: HostileWriter, case: str) -> str:
    entries = []
    for name, target in SYMLINK_CASES[case]:
        if target is None:  # sub/ holding up -> ..
            entries.append(dir_entry(name, writer.tree([symlink_entry(b"up", b"..")])))
        else:
            entries.append(symlink_entry(name, target))
    entries.sort(key=lambda e: e[4 : 4 + struct.unpack(">H", e[2:4])[0]])
    return writer.tree(entries)


@pytest.mark.parametrize("case", sorted(SYMLINK_CASES))
def test_pull_refuses_escaping_symlinks(case: str, writer: HostileWriter, tmp_path: Path):
    snapshot_id, good = writer.wrapped(_symlink_tree(writer, case))
    with pytest.raises(DestinationError, match="absolute|escapes the snapshot"):
        pull_into(writer.repo, snapshot_id, tmp_path)
    # Refused before anything was written through or beside the link.
    assert not os.path.lexists(tmp_path / "outer" / "dest" / "bad" / SYMLINK_CASES[case][0][0].decode())


def test_pull_cli_errors_are_one_line_with_exit_codes(writer: HostileWriter, tmp_path: Path):
    url = writer.repo.url
    cases = [
        (writer.wrapped(_named(b"..")(writer))[0], 4, "is not allowed"),
        (writer.wrapped(_unknown_version(writer))[0], 4, "unknown format version 2"),
        (writer.wrapped(_symlink_tree(writer, "absolute"))[0], 7, "is absolute"),
    ]
    for i, (snapshot_id, code, message) in enumerate(cases):
        dest = tmp_path / f"out{i}" / "dest"
        dest.parent.mkdir()
        result = snapfs("pull", snapshot_id, str(dest), "--store", url, check=False)
        assert result.returncode == code, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("snapfs: error: ") and message in lines[0], lines
        assert "Traceback" not in result.stderr
        assert os.listdir(dest.parent) in ([], ["dest"])


# --- hostile records, names and store config ---------------------------------------------


def test_hostile_names_records_and_config_are_clean_errors(writer: HostileWriter, tmp_path: Path):
    url = writer.repo.url
    good_root = writer.snapshot([file_entry(b"a", [_chunk(writer)])])
    record_id = writer.record(
        {"format": "snapfs-record/1", "snapshot": good_root, "name": "evil", "time": "2026-01-01T00:00:00Z"}
    )
    # A name whose pointer leads out of the ID space: it must never become a path.
    writer.name(
        "evil",
        {"format": "snapfs-name/1", "name": "evil", "record": record_id, "snapshot": "../../../etc"},
    )
    writer.name("garbage", b"\xff\xfe not json")
    writer.name(
        "copied", {"format": "snapfs-name/1", "name": "other", "record": record_id, "snapshot": good_root}
    )
    deep_record = writer.record(b"[" * 100_000 + b"]" * 100_000)
    future_record = writer.record({"format": "snapfs-record/9", "snapshot": good_root})
    for ref, message in [
        ("evil", "invalid IDs in the name object"),
        ("garbage", "malformed name object"),
        ("copied", "copied from another name"),
    ]:
        result = snapfs("pull", ref, str(tmp_path / ref), "--store", url, check=False)
        assert result.returncode == 4 and message in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert not (tmp_path / ref).exists()
    for record, message in [(deep_record, "nested too deeply"), (future_record, "unknown record format")]:
        result = snapfs("show", record, "--store", url, check=False)
        assert result.returncode == 4 and message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    # A store written by a future format: push refuses instead of mixing formats.
    writer.repo.store.put("snapfs.json", b'{"format": 2}')
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"x")
    result = snapfs("push", str(src), "--store", url, check=False)
    assert result.returncode == 4 and "uses format 2" in result.stderr, result.stderr


# --- the read path, without FUSE: a cached chunk must still match the length its ref claims ---


def test_a_chunk_in_memory_is_checked_against_each_refs_length(writer: HostileWriter, tmp_path: Path):
    """Two files share a chunk; the second claims it is longer than it is. The first
    read puts the chunk in the memory LRU. Serving the second from memory without
    the length check would hand the kernel a short read (zeros or a truncated file)
    or, across chunks, the next chunk's bytes at the wrong offsets."""
    chunk_id, length = _chunk(writer, b"A" * 50)
    other_id, other_len = _chunk(writer, b"B" * 70)
    snapshot_id = writer.snapshot(
        [
            file_entry(b"a", [(chunk_id, length)]),
            file_entry(b"b", [(chunk_id, length + 10)]),
            file_entry(b"c", [(chunk_id, length + 10), (other_id, other_len)]),
        ]
    )

    async def body() -> None:
        cache = DiskCache(str(tmp_path / "cache"))
        try:
            async with ObjectSource(writer.repo, cache) as source:
                fs = SnapshotFS(source)
                root = await fs.lookup(ROOT_INODE, snapshot_id.encode())
                for name, expect in [(b"a", b"A" * 50), (b"b", None), (b"c", None)]:
                    ino = (await fs.lookup(root.ino, name)).ino
                    fh = await fs.open(ino, os.O_RDONLY)
                    try:
                        if expect is not None:
                            assert await fs.read(fh, 0, 1 << 20) == expect
                        else:
                            with pytest.raises(IntegrityError, match="the tree says 60"):
                                await fs.read(fh, 0, 1 << 20)
                    finally:
                        fs.release(fh)
        finally:
            cache.close()

    trio.run(body)


# --- the mount ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hostile_mount(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[HostileWriter, Path, Path]]:
    if _fuse_reason:
        pytest.skip(f"no FUSE: {_fuse_reason}")
    base = tmp_path_factory.mktemp("hostile")
    writer = HostileWriter(Repo(LocalStore(str(base / "store"))))
    writer.repo.ensure_config()
    with mounted(base / "mnt", writer.repo.url, base / "cache") as mnt:
        yield writer, mnt, base / "cache" / "mount.log"
        pid = status(mnt)["pid"]
        os.kill(pid, 0)  # still alive after everything
    log = (base / "cache" / "mount.log").read_text()
    assert "Traceback" not in log and "bug:" not in log, log[-4000:]


@needs_fuse
@pytest.mark.fuse
def test_mount_gives_eio_for_each_hostile_path_only(hostile_mount):
    writer, mnt, log_path = hostile_mount
    ops: list[tuple[str, str | Path]] = []
    expected: list[tuple[str, dict]] = []
    for case in sorted(FORMAT_CASES):
        bad = FORMAT_CASES[case][0](writer)
        snapshot_id, good = writer.wrapped(bad)
        root = mnt / snapshot_id
        # Where the hostile tree sits: bad/, or bad/d for a dir entry naming a chunk.
        hostile = "bad/d" if case == "dir-is-a-chunk" else "bad"
        ops += [("list", root), ("read", root / "good.txt"), ("list", root / hostile)]
        expected += [
            (case, {"names": ["bad", "good.txt"]}),
            (case, {"sha256": hashlib.sha256(good).hexdigest()}),
            (case, {"errno": errno.EIO}),
        ]
        # The hostile tree as a snapshot root: the lookup itself fails.
        ops.append(("list", mnt / bad / hostile[4:]))
        expected.append((case, {"errno": errno.EIO}))
    for case in sorted(FILE_CASES):
        snapshot_id, _ = writer.wrapped(FILE_CASES[case][0](writer))
        ops += [("list", mnt / snapshot_id / "bad"), ("read", mnt / snapshot_id / "bad" / "f")]
        expected += [(case, {"names": ["f"]}), (case, {"errno": errno.EIO})]
    cycle_id, _ = self_referencing_tree(writer)
    snapshot_id, _ = writer.wrapped(cycle_id)
    ops += [("list", mnt / snapshot_id / "bad"), ("list", mnt / cycle_id)]
    expected += [("self-reference", {"errno": errno.EIO})] * 2
    missing_id, _ = writer.wrapped("cd" * 32)
    ops.append(("list", mnt / missing_id / "bad"))
    expected.append(("missing subtree", {"errno": errno.EIO}))

    results = probe(ops, timeout=120)
    for (case, want), got in zip(expected, results, strict=True):
        assert {k: got.get(k) for k in want} == want, (case, got)
        assert got["seconds"] < 10, (case, got)
    log = log_path.read_text()
    assert "unknown format version 2 (this snapfs reads version 1)" in log
    assert f"tree {cycle_id}" in log and "corrupt" in log


@needs_fuse
@pytest.mark.fuse
def test_mount_refuses_escaping_symlinks_and_serves_the_rest(hostile_mount):
    writer, mnt, log_path = hostile_mount
    inner = writer.tree([symlink_entry(b"up", b"..")])
    data = writer.chunk(b"inside\n")
    snapshot_id = writer.snapshot(
        sorted(
            [
                symlink_entry(b"abs", b"/etc/passwd"),
                symlink_entry(b"climb", b"../../etc/passwd"),
                symlink_entry(b"chain", b"sub/up/../.."),
                symlink_entry(b"fine", b"sub/up/data.txt"),
                symlink_entry(b"dangling", b"no/such/file"),
                dir_entry(b"sub", inner),
                file_entry(b"data.txt", [data]),
            ],
            key=lambda e: e[4 : 4 + struct.unpack(">H", e[2:4])[0]],
        )
    )
    root = mnt / snapshot_id
    results = probe(
        [
            ("readlink", root / "abs"),
            ("readlink", root / "climb"),
            ("readlink", root / "chain"),
            ("read", root / "abs"),
            ("stat", root / "abs"),
            ("readlink", root / "fine"),
            ("read", root / "fine"),
            ("readlink", root / "dangling"),
            ("readlink", root / "sub" / "up"),
        ]
    )
    assert [r.get("errno") for r in results[:4]] == [errno.EIO] * 4, results
    assert stat.S_ISLNK(results[4]["mode"])  # the link itself is still visible
    assert results[5]["target"] == "sub/up/data.txt"
    assert results[6]["sha256"] == hashlib.sha256(b"inside\n").hexdigest()
    assert results[7]["target"] == "no/such/file"
    assert results[8]["target"] == ".."
    log = log_path.read_text()
    assert f"EIO on readlink of {snapshot_id}/abs" in log
    assert "resolves outside snapshot" in log


@needs_fuse
@pytest.mark.fuse
def test_mount_never_serves_a_chunk_at_a_length_its_ref_does_not_have(hostile_mount):
    writer, mnt, _log = hostile_mount
    chunk_id, length = _chunk(writer, os.urandom(50))
    other = _chunk(writer, os.urandom(70))
    snapshot_id = writer.snapshot(
        [
            file_entry(b"a", [(chunk_id, length)]),
            file_entry(b"b", [(chunk_id, length + 10)]),
            file_entry(b"c", [(chunk_id, length + 10), other]),
        ]
    )
    root = mnt / snapshot_id
    results = probe([("read", root / "a"), ("read", root / "b"), ("read", root / "c")])
    assert "sha256" in results[0]
    assert results[1].get("errno") == errno.EIO and results[2].get("errno") == errno.EIO, results


# --- fuzzing ------------------------------------------------------------------------------------


def _valid_tree(rng: random.Random) -> bytes:
    entries = []
    for i in range(rng.randint(0, 4)):
        name = f"e{i}".encode()
        kind = rng.choice("fdl")
        if kind == "f":
            n = rng.randint(0, 3)
            entries.append(
                fmt.file_entry(name, 7 * n, [(os.urandom(32).hex(), 7)] * n, executable=rng.random() < 0.5)[0]
            )
        elif kind == "d":
            entries.append(fmt.dir_entry(name, os.urandom(32).hex(), rng.randint(0, 99), rng.randint(0, 3)))
        else:
            entries.append(fmt.symlink_entry(name, b"../x" * rng.randint(1, 3)))
    return fmt.encode_tree(entries)


@st.composite
def mutated(draw, base: Callable[[random.Random], bytes]) -> bytes:
    """A valid encoding with a few bytes flipped, inserted, deleted or the end cut off."""
    data = bytearray(base(random.Random(draw(st.integers(0, 1 << 30)))))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "cut", "set"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[at] ^= draw(st.integers(1, 255))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and data:
            del data[at : at + draw(st.integers(1, 8))]
        elif op == "cut":
            del data[at:]
        elif op == "set" and len(data) >= at + 4:
            data[at : at + 4] = struct.pack(
                ">I", draw(st.sampled_from([0, 1, 255, 1025, 1 << 24, (1 << 32) - 1]))
            )
    return bytes(data)


def _valid_chunklist(rng: random.Random) -> bytes:
    return fmt.encode_chunklist(
        [(os.urandom(32).hex(), rng.randint(1, 4 << 20)) for _ in range(rng.randint(0, 6))]
    )


tree_inputs = st.one_of(
    st.binary(max_size=300),
    st.binary(max_size=200).map(lambda b: fmt.TREE_MAGIC + b"\x01" + b),
    mutated(_valid_tree),
)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree_inputs)
def test_fuzz_tree_decoder_ends_in_a_clean_error(data: bytes):
    try:
        entries = fmt.decode_tree(data)
    except FormatError:
        return
    # Whatever decodes is exactly what the encoder would write, with safe names.
    assert fmt.encode_tree(entries) == data
    for entry in entries:
        fmt.validate_name(entry.name)


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(st.binary(max_size=200), mutated(_valid_chunklist)),
    st.integers(0, 2000),
    st.integers(0, 1 << 40),
)
def test_fuzz_chunklist_decoder_ends_in_a_clean_error(data: bytes, count: int, size: int):
    try:
        chunks = fmt.decode_chunklist(data, count, size)
    except FormatError:
        return
    assert len(chunks) == count and sum(n for _, n in chunks) == size
    assert fmt.encode_chunklist(chunks) == data


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=10,
)


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=200),
        json_values.map(lambda v: json.dumps(v).encode()),
        st.dictionaries(st.sampled_from(["format", "snapshot", "name"]), json_values).map(
            lambda d: json.dumps({"format": "snapfs-record/1", **d}).encode()
        ),
        st.integers(1, 5000).map(lambda n: b"[" * n + b"]" * n),
        st.integers(1, 5000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
    )
)
def test_fuzz_record_decoder_ends_in_a_clean_error(data: bytes):
    try:
        record = fmt.decode_record(data)
    except FormatError:
        return
    assert isinstance(record, dict) and record["format"] == fmt.RECORD_FORMAT


def _expected_bytes(entry: fmt.Entry, known: dict[str, bytes]) -> bytes | None:
    """A file's bytes if every chunk ref names a known chunk at its true length, else None."""
    if entry.chunklist_id is not None:
        return None
    if not all(chunk_id in known and len(known[chunk_id]) == n for chunk_id, n in entry.chunks):
        return None
    return b"".join(known[chunk_id] for chunk_id, _ in entry.chunks)


def _fuzz_world(tmp: Path) -> tuple[HostileWriter, dict[str, tuple[str, int]]]:
    """A store holding real chunks and subtrees that fuzzed trees can point at."""
    writer = HostileWriter(Repo(LocalStore(str(tmp / "fuzzstore"))))
    refs = {"chunk": writer.chunk(b"0123456"), "empty": (writer.tree([]), 0)}
    refs["sub"] = (writer.tree([file_entry(b"in", [refs["chunk"]])]), 0)
    return writer, refs


def _world_tree(refs: dict[str, tuple[str, int]], rng: random.Random) -> bytes:
    """A tree over the world's real objects (so fuzzed variants that still decode pull for real)."""
    entries = [
        fmt.file_entry(b"f", 7, [refs["chunk"]], executable=False)[0],
        fmt.dir_entry(b"d", refs[rng.choice(["empty", "sub"])][0], 7, 0),
        fmt.symlink_entry(b"l", rng.choice([b"f", b"d/in", b"../x", b"/abs"])),
        fmt.file_entry(b"g", 14, [refs["chunk"]] * 2, executable=True)[0],
    ]
    return fmt.encode_tree(entries)


@pytest.mark.slow
def test_fuzz_pull_end_to_end(tmp_path_factory: pytest.TempPathFactory):
    """Fuzzed root trees, stored under their own hash, pulled for real: each pull
    either writes exactly what the tree says or raises a SnapfsError; nothing
    lands outside DEST."""
    base = tmp_path_factory.mktemp("fuzzpull")
    writer, refs = _fuzz_world(base)
    counter = iter(range(1 << 30))
    outcomes: dict[str, int] = {}

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(mutated(lambda rng: _world_tree(refs, rng)))
    def one(data: bytes) -> None:
        snapshot_id = writer.put(data)
        writer.mark(snapshot_id)
        outer = base / f"o{next(counter)}"
        outer.mkdir()
        try:
            pull(writer.repo, snapshot_id, str(outer / "dest"))
            outcomes["pulled"] = outcomes.get("pulled", 0) + 1
            for entry in fmt.decode_tree(data):
                path = outer / "dest" / os.fsdecode(entry.name)
                if entry.is_file:
                    assert path.read_bytes() == _expected_bytes(entry, {refs["chunk"][0]: b"0123456"})
        except SnapfsError as exc:
            outcomes[type(exc).__name__] = outcomes.get(type(exc).__name__, 0) + 1
        assert os.listdir(outer) in ([], ["dest"])
        assert_inside(outer / "dest")

    one()
    assert outcomes.get("FormatError", 0) > 0, outcomes
    print(f"\nFAULT-TABLE fuzz-pull: {outcomes}")


@needs_fuse
@pytest.mark.fuse
@pytest.mark.slow
def test_fuzz_mount_end_to_end(hostile_mount, tmp_path: Path):
    """The same fuzzed roots through the mount: a reader gets what the tree says or
    an errno, within a deadline; the daemon keeps serving a sound snapshot."""
    writer, mnt, _log = hostile_mount
    refs = {"chunk": writer.chunk(b"0123456"), "empty": (writer.tree([]), 0)}
    refs["sub"] = (writer.tree([file_entry(b"in", [refs["chunk"]])]), 0)
    samples: list[bytes] = []

    @settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(mutated(lambda rng: _world_tree(refs, rng)))
    def collect(data: bytes) -> None:
        samples.append(data)

    collect()
    ops: list[tuple[str, Path]] = []
    for data in samples:
        root = mnt / writer.put(data)
        ops += [
            ("list", root),
            ("read", root / "f"),
            ("read", root / "g"),
            ("readlink", root / "l"),
            ("list", root / "d"),
        ]
    results = probe(ops, timeout=180)
    decoded = 0
    for i, data in enumerate(samples):
        listing, f, g, link, sub = results[5 * i : 5 * i + 5]
        try:
            entries = {e.name: e for e in fmt.decode_tree(data)}
        except FormatError:
            assert listing.get("errno") == errno.EIO, listing
            continue
        decoded += 1
        assert listing["names"] == sorted(os.fsdecode(n) for n in entries)
        for result, name in ((f, b"f"), (g, b"g")):
            entry = entries.get(name)
            if entry is None or not entry.is_file:
                continue
            expected = _expected_bytes(entry, {refs["chunk"][0]: b"0123456"})
            if expected is None:  # refs to chunks that do not exist or lie about their length
                assert result.get("errno") == errno.EIO, (entry, result)
            else:
                assert result.get("sha256") == hashlib.sha256(expected).hexdigest(), (entry, result)
    # A sound snapshot still reads after all that.
    good = writer.snapshot([file_entry(b"ok", [refs["chunk"]])])
    assert probe([("read", mnt / good / "ok")])[0]["sha256"] == hashlib.sha256(b"0123456").hexdigest()
    assert decoded > 0
    print(f"\nFAULT-TABLE fuzz-mount: samples={len(samples)}, decoded={decoded}")


# --- security: what is logged, who can read a mount ------------------------------------------


def _secrets(env: dict[str, str]) -> list[str]:
    return [env["AWS_SECRET_ACCESS_KEY"], env["AWS_ACCESS_KEY_ID"]]


@needs_fuse
@pytest.mark.fuse
@pytest.mark.s3
def test_store_credentials_never_logged_and_records_scrub_secrets(
    s3_env: dict[str, str], s3_store_url: str, s3_server, tmp_path: Path
):
    from support.faultproxy import FaultProxy

    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(os.urandom(300_000))
    (src / "b.txt").write_text("b\n")
    secrets = _secrets(s3_env)
    token = "ghp_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8"
    outputs: dict[str, str] = {}
    with FaultProxy(s3_server.endpoint_url) as proxy:
        endpoint = ["--endpoint-url", proxy.endpoint_url]
        # Retries and failures are where URLs and requests get logged: make some.
        proxy.inject("503", rate=0.3)
        proxy.inject("reset", method="GET", rate=0.1, at=100)
        push_args = ["push", str(src), "--store", s3_store_url, *endpoint, "-vv", "--name", "sec@1"]
        push_args += ["--meta", "api_key=SUPERSECRETVALUE", "--meta", f"note={token}", "--no-git"]
        result = snapfs(*push_args)
        outputs["push"] = result.stderr + result.stdout
        snapshot_id = result.stdout.strip()
        for name, args in {
            "pull": ["pull", snapshot_id, str(tmp_path / "dest"), "--store", s3_store_url, *endpoint, "-vv"],
            "prewarm": ["prewarm", snapshot_id, "--store", s3_store_url, *endpoint, "-vv"]
            + ["--cache", str(tmp_path / "pw")],
            "show": ["show", "sec@1", "--store", s3_store_url, *endpoint, "-vv", "--json"],
        }.items():
            result = snapfs(*args, check=False)
            outputs[name] = result.stderr + result.stdout
        # Credentials in an endpoint URL (a common mistake) are not echoed either.
        result = snapfs(
            "ls", snapshot_id, "--store", s3_store_url, "-vv",
            "--endpoint-url", f"http://{secrets[1]}:{secrets[0]}@127.0.0.1:9/", check=False,
        )  # fmt: skip
        assert result.returncode != 0
        outputs["ls-bad-endpoint"] = result.stderr + result.stdout
        with mounted(tmp_path / "mnt", s3_store_url, tmp_path / "cache", *endpoint, "-vv") as mnt:
            probe([("read", mnt / snapshot_id / "a.bin"), ("read", mnt / "sec@1" / "b.txt")])
            outputs["status"] = snapfs("status", str(mnt), "--json").stdout
        outputs["daemon log"] = (tmp_path / "cache" / "mount.log").read_text()
    assert "DEBUG" in outputs["daemon log"] and "retrying" in (outputs["daemon log"] + outputs["pull"])
    for where, text in outputs.items():
        for secret in secrets:
            assert secret not in text, f"a store credential appears in the {where} output"
    # Records keep the context, never the secrets (docs/RECORDS.md "Secrets").
    repo = Repo.open(s3_store_url)
    for info in repo.store.list("records/"):
        blob = repo.store.get(info.key).decode()
        assert "SUPERSECRETVALUE" not in blob and token not in blob
        assert all(secret not in blob for secret in secrets)
        record = json.loads(blob)
        assert record["meta"]["api_key"] == "<redacted>" and "<redacted>" in record["meta"]["note"]


def _as_nobody(*argv: str) -> subprocess.CompletedProcess:
    def drop() -> None:
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)

    return subprocess.run(list(argv), capture_output=True, text=True, timeout=30, preexec_fn=drop)


@needs_fuse
@pytest.mark.fuse
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_mount_is_read_only_default_permissions_and_private_by_default(writer: HostileWriter, tmp_path: Path):
    snapshot_id = writer.snapshot([file_entry(b"a.txt", [_chunk(writer, b"private\n")])])
    # A mountpoint another user can reach, so only the mount's own options decide.
    base = Path(tempfile.mkdtemp(prefix="snapfs-perm-", dir="/tmp"))
    os.chmod(base, 0o755)
    try:
        for allow_other in (False, True):
            mnt = base / ("shared" if allow_other else "private")
            extra = ["--allow-other"] if allow_other else []
            cache = base / f"cache-{allow_other}"
            with mounted(mnt, writer.repo.url, cache, *extra):
                options = next(
                    line.split()[3].split(",")
                    for line in Path("/proc/mounts").read_text().splitlines()
                    if line.split()[1] == str(mnt)
                )
                assert "ro" in options and "default_permissions" in options, options
                assert ("allow_other" in options) == allow_other, options
                other = _as_nobody("cat", str(mnt / snapshot_id / "a.txt"))
                if allow_other:
                    assert other.returncode == 0 and other.stdout == "private\n", other.stderr
                else:
                    assert other.returncode != 0 and "Permission denied" in other.stderr, other
                    # The owner reads it, of course.
                    assert (mnt / snapshot_id / "a.txt").read_text() == "private\n"
                    # Nor can they go round the mount: the cache they would read is private.
                    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
                    chunk_file = next(cache.glob("objects/*/*"))
                    assert _as_nobody("cat", str(chunk_file)).returncode != 0
                # Nobody writes, not even root (read-only mount, EROFS).
                with pytest.raises(OSError) as caught:
                    (mnt / snapshot_id / "new").write_text("x")
                assert caught.value.errno == errno.EROFS
    finally:
        shutil.rmtree(base, ignore_errors=True)
