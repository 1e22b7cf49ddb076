"""snapfs sync between stores: file -> S3, S3 -> file, resume, reruns, records, names, tags, corruption.

Real stores only: a directory and the loopback SeaweedFS. The CLI is run in a
subprocess, as a user types it; the library is called directly where a test
needs to stop a sync halfway.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support.trees import make_mixed_tree

from snapfs import format as fmt
from snapfs import records
from snapfs import repo as repo_module
from snapfs.errors import AlreadyExistsError, IntegrityError, UsageError
from snapfs.locks import LockedError, MaintenanceLock
from snapfs.repo import Repo
from snapfs.snapshot import push, verify
from snapfs.sync import sync

SNAPFS = [sys.executable, "-m", "snapfs.cli.main"]


def cli(*args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SNAPFS_NO_PROGRESS": "1"}
    proc = subprocess.run([*SNAPFS, *args], capture_output=True, text=True, env=env, timeout=120)
    if ok:
        assert proc.returncode == 0, proc.stderr
    return proc


def object_keys(repo: Repo) -> set[str]:
    return {info.key for info in repo.store.list("objects/")}


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return make_mixed_tree(tmp_path / "data", large_mib=3)


def push_named(tree: Path, url: str, name: str, *, tags: tuple[str, ...] = ()) -> str:
    repo = Repo.open(url)
    snapshot_id = push(str(tree), repo).snapshot_id
    records.create(repo, snapshot_id, name=name, message="first", tags=tags, git=False, env=False)
    return snapshot_id


def assert_complete_copy(tree: Path, url: str, snapshot_id: str, name: str, tag: str) -> None:
    """The copy is usable from the destination alone: pull, name, record and tag all work."""
    repo = Repo.open(url)
    assert repo.is_snapshot(snapshot_id)
    assert records.resolve_name(repo, name) == snapshot_id
    record = records.lookup(repo, name).record(repo)
    assert record is not None and record.data["message"] == "first"
    assert tag in records.tags_of(repo, snapshot_id)
    assert verify(repo, str(tree), snapshot_id) == []


@pytest.mark.s3
def test_file_to_s3_to_file_with_records_names_tags(
    tree: Path, file_store_url: str, s3_store_url: str, tmp_path: Path
) -> None:
    snapshot_id = push_named(tree, file_store_url, "corpus@1", tags=("release",))

    out = cli("sync", "corpus@1", "--from", file_store_url, "--to", s3_store_url, "--json")
    first = json.loads(out.stdout)
    assert first["snapshots"] == [snapshot_id]
    assert first["names"] == ["corpus@1"] and first["records"] == 1 and first["tags"] == 1
    assert first["copied_objects"] == len(object_keys(Repo.open(file_store_url)))
    assert_complete_copy(tree, s3_store_url, snapshot_id, "corpus@1", "release")

    # Nothing is copied again: the root tree is present, so its subtree is not even listed.
    again = json.loads(
        cli("sync", "corpus@1", "--from", file_store_url, "--to", s3_store_url, "--json").stdout
    )
    assert again["copied_objects"] == 0 and again["copied_bytes"] == 0
    assert again["names"] == [] and again["records"] == 0 and again["tags"] == 0

    # And back to a laptop: S3 -> a fresh directory store, by @latest.
    laptop = "file://" + str(tmp_path / "laptop")
    back = json.loads(cli("sync", "corpus@latest", "--from", s3_store_url, "--to", laptop, "--json").stdout)
    assert back["copied_bytes"] == first["copied_bytes"]
    assert_complete_copy(tree, laptop, snapshot_id, "corpus@1", "release")
    assert object_keys(Repo.open(laptop)) == object_keys(Repo.open(file_store_url))


class Interrupted(Exception):
    pass


@pytest.fixture(params=["file", pytest.param("s3", marks=pytest.mark.s3)])
def dest_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "file":
        return "file://" + str(tmp_path / "dest")
    return request.getfixturevalue("s3_store_url")


def test_interrupted_sync_shows_nothing_and_resumes_with_only_the_rest(
    tree: Path, file_store_url: str, dest_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On S3, find present chunks with one LIST instead of HEADs even for this small tree.
    monkeypatch.setattr(repo_module, "_LIST_MIN_CANDIDATES", 1)
    snapshot_id = push_named(tree, file_store_url, "corpus@1")
    source = Repo.open(file_store_url)
    dest = Repo.open(dest_url)
    seen = 0

    def stop_halfway(nbytes: int) -> None:
        # Called per chunk, or per pack of small ones where the destination packs (S3).
        nonlocal seen
        seen += 1
        if seen == 5:
            raise Interrupted

    with pytest.raises(Interrupted):
        sync(source, dest, ["corpus@1"], jobs=1, progress=stop_halfway)
    partial = object_keys(dest)
    assert 0 < len(partial) < len(object_keys(source))
    # Bottom-up: nothing is visible, and no tree is there yet (chunks come first).
    assert not dest.is_snapshot(snapshot_id)
    assert records.read_name(dest, "corpus@1") is None
    assert not any(fmt.object_key(snapshot_id) == k for k in partial)

    result = sync(source, dest, ["corpus@1"])
    assert result.copied_objects == len(object_keys(source)) - len(partial)
    assert object_keys(dest) == object_keys(source)
    assert_complete_copy_no_tag(tree, dest, snapshot_id)


def assert_complete_copy_no_tag(tree: Path, repo: Repo, snapshot_id: str) -> None:
    assert repo.is_snapshot(snapshot_id)
    assert records.resolve_name(repo, "corpus@1") == snapshot_id
    assert verify(repo, str(tree), snapshot_id) == []


def test_corrupt_source_object_fails_naming_it_and_leaves_nothing_visible(
    tree: Path, file_store_url: str, tmp_path: Path
) -> None:
    snapshot_id = push_named(tree, file_store_url, "corpus@1")
    source = Repo.open(file_store_url)
    medium = next(e for e in source.get_tree(snapshot_id) if e.name == b"medium.bin")
    chunk_id = medium.chunks[0][0]
    path = Path(source.store.root) / fmt.object_key(chunk_id)
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))

    dest_url = "file://" + str(tmp_path / "dest")
    out = cli("sync", "corpus@1", "--from", file_store_url, "--to", dest_url, ok=False)
    assert out.returncode == IntegrityError.exit_code
    assert chunk_id in out.stderr and "corrupt" in out.stderr
    assert out.stderr.count("\n") == 1 or "error:" in out.stderr.splitlines()[-1]
    dest = Repo.open(dest_url)
    assert not dest.is_snapshot(snapshot_id)
    assert records.read_name(dest, "corpus@1") is None
    assert not dest.has_object(snapshot_id)
    assert not dest.has_object(chunk_id)


def test_name_taken_at_destination_is_an_error_after_the_copy(
    tree: Path, file_store_url: str, tmp_path: Path
) -> None:
    snapshot_id = push_named(tree, file_store_url, "corpus@1")
    other_tree = tmp_path / "other"
    other_tree.mkdir()
    (other_tree / "f").write_bytes(b"other\n")
    dest_url = "file://" + str(tmp_path / "dest")
    other_id = push_named(other_tree, dest_url, "corpus@1")

    with pytest.raises(AlreadyExistsError, match="corpus@1"):
        sync(Repo.open(file_store_url), Repo.open(dest_url), ["corpus@1"])
    dest = Repo.open(dest_url)
    # The data and the record arrived; the name kept its first meaning.
    assert dest.is_snapshot(snapshot_id)
    assert records.resolve_name(dest, "corpus@1") == other_id


def test_all_copies_every_snapshot_and_skips_forgotten_names(
    tree: Path, file_store_url: str, tmp_path: Path
) -> None:
    first = push_named(tree, file_store_url, "corpus@1")
    (tree / "new.txt").write_bytes(b"second version\n")
    second = push_named(tree, file_store_url, "corpus@2")
    unnamed_dir = tmp_path / "unnamed"
    unnamed_dir.mkdir()
    (unnamed_dir / "x").write_bytes(b"x\n")
    source = Repo.open(file_store_url)
    unnamed = push(str(unnamed_dir), source).snapshot_id
    gone_dir = tmp_path / "gone"
    gone_dir.mkdir()
    (gone_dir / "y").write_bytes(b"y\n")
    gone = push_named(gone_dir, file_store_url, "old@1")
    records.forget(source, "old@1")

    dest = Repo.open("file://" + str(tmp_path / "dest"))
    result = sync(source, dest, everything=True)
    assert set(result.snapshots) == {first, second, unnamed}
    assert sorted(result.names) == ["corpus@1", "corpus@2"]
    assert records.lookup(dest, "corpus@latest").snapshot == second
    assert not dest.is_snapshot(gone) and records.read_name(dest, "old@1") is None
    assert dest.is_snapshot(unnamed)


def test_sync_waits_for_a_gc_at_the_destination(
    tree: Path, file_store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    push_named(tree, file_store_url, "corpus@1")
    dest = Repo.open("file://" + str(tmp_path / "dest"))
    monkeypatch.setenv("SNAPFS_LOCK_WAIT", "0.3")
    monkeypatch.setenv("SNAPFS_LOCK_POLL", "0.1")
    with MaintenanceLock(dest.store, "gc"), pytest.raises(LockedError, match="gc"):
        sync(Repo.open(file_store_url), dest, ["corpus@1"])
    assert not object_keys(dest)


def test_refusals(file_store_url: str, tmp_path: Path) -> None:
    snapdir_dir = tmp_path / "snapdir"
    snapdir_dir.mkdir()
    with pytest.raises(UsageError, match="snapfs import"):
        sync(Repo.open("snapdir+file://" + str(snapdir_dir)), Repo.open(file_store_url), ["x"])
    with pytest.raises(UsageError, match="only reads"):
        sync(Repo.open(file_store_url), Repo.open("snapdir+file://" + str(snapdir_dir)), ["x"])
    with pytest.raises(UsageError, match="same store"):
        sync(Repo.open(file_store_url), Repo.open(file_store_url), ["x"])
    out = cli("sync", "--from", file_store_url, "--to", "file://" + str(tmp_path / "d"), ok=False)
    assert out.returncode == 2 and out.stderr.strip().endswith("give one or more REFs to sync, or --all")
