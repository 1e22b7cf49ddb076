"""Snapshot operations on every backend: push, pull, verify, diff, ls/cat, fsck.

``store_url`` (tests/conftest.py) runs each test on a ``file://`` store and on
a real loopback SeaweedFS ``s3://`` store. Nothing is mocked: corruption is
made by rewriting stored bytes, interruption by deleting pulled files.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.trees import local_state

from snapfs import format as fmt
from snapfs import repo as repo_module
from snapfs import snapshot
from snapfs.errors import (
    DestinationError,
    IntegrityError,
    NotFoundError,
    UsageError,
)
from snapfs.format import file_entry
from snapfs.hashing import hash_bytes
from snapfs.refs import resolve_ref
from snapfs.repo import Repo
from snapfs.scan import scan
from snapfs.store import LocalStore

MiB = 1 << 20


@pytest.fixture(autouse=True)
def _isolated_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Pull resume state lives under XDG_CACHE_HOME; keep it out of the user's home.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


@pytest.fixture
def repo(store_url: str) -> Iterator[Repo]:
    opened = Repo.open(store_url)
    try:
        yield opened
    finally:
        opened.store.close()


@pytest.fixture
def file_repo(file_store_url: str) -> Repo:
    """Pull-side safety does not depend on the backend: these run on file:// only."""
    return Repo.open(file_store_url)


def make_dataset(root: Path, seed: int = 3) -> Path:
    """Multi-chunk, small, empty and exec files, symlinks, nested and empty dirs."""
    rng = random.Random(seed)
    (root / "train" / "shards").mkdir(parents=True)
    (root / "empty dir").mkdir()
    (root / "train" / "shards" / "shard-0.bin").write_bytes(rng.randbytes(3 * MiB + 5))
    for i in range(6):
        (root / "train" / f"img-{i}.jpg").write_bytes(rng.randbytes(rng.randrange(1, 40_000)))
    (root / "labels.csv").write_bytes(b"id,label\n" + b"".join(b"%d,%d\n" % (i, i % 7) for i in range(500)))
    (root / "empty.txt").write_bytes(b"")
    (root / "run.sh").write_bytes(b"#!/bin/sh\necho training\n")
    os.chmod(root / "run.sh", 0o755)
    os.symlink("labels.csv", root / "labels-link")
    os.symlink("../labels.csv", root / "train" / "up-link")
    os.symlink("shards/shard-0.bin", root / "train" / "shard-link")
    os.symlink("does-not-exist", root / "dangling")
    return root


def corrupt_object(repo: Repo, object_id: str) -> None:
    """Flip one byte of a stored object in place, the way bit rot would."""
    key = fmt.object_key(object_id)
    if isinstance(repo.store, LocalStore):
        path = os.path.join(repo.store.root, *key.split("/"))
        with open(path, "r+b") as f:
            first = f.read(1)
            f.seek(0)
            f.write(bytes([first[0] ^ 0x01]))
    else:
        data = bytearray(repo.store.get(key))
        data[0] ^= 0x01
        repo.store.put(key, bytes(data))


def first_chunk_of(repo: Repo, snapshot_id: str, path: str) -> str:
    entry = repo.lookup_path(snapshot_id, path)
    assert entry is not None and entry.is_file
    return repo.file_chunks(entry)[0][0]


# --- push and pull ---------------------------------------------------------------


def test_push_pull_round_trip_is_exact(repo: Repo, tmp_path: Path) -> None:
    src = make_dataset(tmp_path / "src")
    pushed = snapshot.push(str(src), repo)
    assert pushed.snapshot_id == scan(src).root_id
    assert pushed.files == 10 and pushed.uploaded_objects > 0
    assert repo.is_snapshot(pushed.snapshot_id)
    assert pushed.snapshot_id in set(repo.snapshot_ids())

    dest = tmp_path / "dest"
    pulled = snapshot.pull(repo, pushed.snapshot_id, str(dest))
    assert pulled.fetched_files == 10 and pulled.skipped_files == 0
    assert pulled.total_bytes == pushed.total_bytes
    assert local_state(dest) == local_state(src)
    assert os.stat(dest / "run.sh").st_mode & 0o777 == 0o755
    assert os.stat(dest / "labels.csv").st_mode & 0o777 == 0o644
    assert os.readlink(dest / "dangling") == "does-not-exist"
    assert scan(dest).root_id == pushed.snapshot_id
    assert snapshot.verify(repo, str(dest), pushed.snapshot_id) == []


def test_repush_uploads_nothing(repo: Repo, tmp_path: Path) -> None:
    src = make_dataset(tmp_path / "src")
    first = snapshot.push(str(src), repo)
    again = snapshot.push(str(src), repo)
    assert again.snapshot_id == first.snapshot_id
    assert (again.uploaded_objects, again.uploaded_bytes) == (0, 0)
    # An identical copy elsewhere dedups just the same.
    copy = make_dataset(tmp_path / "copy")
    assert snapshot.push(str(copy), repo).uploaded_bytes == 0


def test_push_with_one_list_instead_of_heads(
    repo: Repo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On S3 a push lists the store's objects instead of a HEAD per chunk once
    # that is cheaper; forced here for a small tree. The counts must not change.
    monkeypatch.setattr(repo_module, "_LIST_MIN_CANDIDATES", 1)
    src = make_dataset(tmp_path / "src")
    first = snapshot.push(str(src), repo)
    assert first.present_objects == 0 and first.uploaded_objects > 0
    (src / "labels.csv").write_bytes(b"id,label\n0,3\n")
    second = snapshot.push(str(src), repo)
    # The new file's chunk and the root tree; every other chunk found present.
    assert second.uploaded_objects == 2 and second.present_objects > 0
    snapshot.pull(repo, second.snapshot_id, str(tmp_path / "dest"))
    assert local_state(tmp_path / "dest") == local_state(src)


@pytest.fixture(scope="module")
def big_file_bytes() -> bytes:
    return random.Random(64).randbytes(64 * MiB)


def test_one_byte_change_reuploads_about_one_chunk(repo: Repo, tmp_path: Path, big_file_bytes: bytes) -> None:
    src = tmp_path / "src"
    (src / "shards").mkdir(parents=True)
    (src / "shards" / "big.bin").write_bytes(big_file_bytes)
    (src / "other.txt").write_bytes(b"unchanged\n")
    first = snapshot.push(str(src), repo)
    assert first.uploaded_bytes >= 64 * MiB

    edited = bytearray(big_file_bytes)
    edited[37 * MiB + 12345] ^= 0xFF
    (src / "shards" / "big.bin").write_bytes(edited)
    second = snapshot.push(str(src), repo)
    assert second.snapshot_id != first.snapshot_id
    assert second.uploaded_bytes <= 8 * MiB
    # One or two chunks, plus the two trees on the path to the change.
    assert second.uploaded_objects <= 4
    changes = list(snapshot.diff(repo, first.snapshot_id, second.snapshot_id))
    assert [(c.status, c.path) for c in changes] == [("M", b"shards/big.bin")]


def test_pull_resumes_fetching_only_what_is_missing(repo: Repo, tmp_path: Path) -> None:
    src = make_dataset(tmp_path / "src")
    snapshot_id = snapshot.push(str(src), repo).snapshot_id
    dest = tmp_path / "dest"
    snapshot.pull(repo, snapshot_id, str(dest))

    # An interrupted pull: two files never arrived, one is torn, a temp file is left.
    os.unlink(dest / "labels.csv")
    os.unlink(dest / "train" / "img-3.jpg")
    with open(dest / "train" / "shards" / "shard-0.bin", "r+b") as f:
        f.truncate(MiB)
    os.unlink(dest / "train" / "up-link")
    (dest / "train" / (snapshot.TMP_PREFIX + "deadbeef")).write_bytes(b"partial chunk data")

    again = snapshot.pull(repo, snapshot_id, str(dest))
    assert again.fetched_files == 3
    assert again.skipped_files == 7
    assert again.fetched_bytes == (
        len((src / "labels.csv").read_bytes())
        + len((src / "train" / "img-3.jpg").read_bytes())
        + (3 * MiB + 5)
    )
    assert local_state(dest) == local_state(src)  # the temp file is gone too


def test_pull_after_a_failed_pull_fetches_only_the_rest(repo: Repo, tmp_path: Path) -> None:
    src = make_dataset(tmp_path / "src")
    snapshot_id = snapshot.push(str(src), repo).snapshot_id
    chunk_id = first_chunk_of(repo, snapshot_id, "train/shards/shard-0.bin")
    key = fmt.object_key(chunk_id)
    good = repo.store.get(key)
    corrupt_object(repo, chunk_id)
    dest = tmp_path / "dest"
    with pytest.raises(IntegrityError):
        snapshot.pull(repo, snapshot_id, str(dest), jobs=1)
    present = {p for p, v in local_state(dest).items() if v[0] == "f"}
    assert b"train/shards/shard-0.bin" not in present

    repo.store.put(key, good)  # the store is repaired; pull again
    again = snapshot.pull(repo, snapshot_id, str(dest))
    assert again.fetched_files == 10 - len(present)
    assert again.skipped_files == len(present)
    assert local_state(dest) == local_state(src)


def test_pull_refuses_a_foreign_non_empty_destination(file_repo: Repo, tmp_path: Path) -> None:
    src = make_dataset(tmp_path / "src")
    snapshot_id = snapshot.push(str(src), file_repo).snapshot_id
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "precious.txt").write_bytes(b"not yours")
    with pytest.raises(DestinationError, match="--force"):
        snapshot.pull(file_repo, snapshot_id, str(dest))
    assert os.listdir(dest) == ["precious.txt"]

    snapshot.pull(file_repo, snapshot_id, str(dest), force=True)
    assert (dest / "precious.txt").read_bytes() == b"not yours"
    assert (dest / "labels.csv").read_bytes() == (src / "labels.csv").read_bytes()

    # An earlier pull of another snapshot is foreign too.
    (src / "labels.csv").write_bytes(b"v2\n")
    other_id = snapshot.push(str(src), file_repo).snapshot_id
    mine = tmp_path / "mine"
    snapshot.pull(file_repo, snapshot_id, str(mine))
    with pytest.raises(DestinationError):
        snapshot.pull(file_repo, other_id, str(mine))
    # A file where DEST should be is refused even with --force.
    (tmp_path / "a-file").write_bytes(b"x")
    with pytest.raises(DestinationError):
        snapshot.pull(file_repo, snapshot_id, str(tmp_path / "a-file"), force=True)


def _push_with_link(repo: Repo, tmp_path: Path, link_path: str, target: str) -> str:
    src = tmp_path / "src"
    (src / "sub" / "deeper").mkdir(parents=True)
    (src / "a.txt").write_bytes(b"a\n")
    os.symlink(target, src / link_path)
    return snapshot.push(str(src), repo).snapshot_id


def _outside_listing(tmp_path: Path) -> set[str]:
    """Everything under tmp_path except DEST, the store and the pull state."""
    listing = set()
    for d, dirs, files in os.walk(tmp_path):
        for n in dirs + files:
            rel = os.path.relpath(os.path.join(d, n), tmp_path)
            if rel.split(os.sep)[0] not in ("dest", "store", "xdg-cache"):
                listing.add(rel)
    return listing


@pytest.mark.parametrize(
    ("link_path", "target"),
    [
        ("abs", "/etc/passwd"),
        ("abs-dir", "/"),
        ("up", ".."),
        ("up-file", "../outside.txt"),
        ("sub/up2", "../../outside.txt"),
        ("sub/deeper/up3", "../../../x"),
        ("climb", "sub/../../x"),
        ("dots", "./sub/./../.."),
    ],
)
def test_pull_refuses_symlinks_that_escape(
    file_repo: Repo, tmp_path: Path, link_path: str, target: str
) -> None:
    snapshot_id = _push_with_link(file_repo, tmp_path, link_path, target)
    before = _outside_listing(tmp_path)
    with pytest.raises(DestinationError, match="absolute|escapes"):
        snapshot.pull(file_repo, snapshot_id, str(tmp_path / "dest"))
    assert not os.path.lexists(tmp_path / "dest" / link_path)
    assert _outside_listing(tmp_path) == before


@pytest.mark.parametrize(
    ("link_path", "target"),
    [("sub/up", "../a.txt"), ("sub/deeper/up", "../../a.txt"), ("self", "."), ("round", "sub/../a.txt")],
)
def test_pull_allows_symlinks_that_stay_inside(
    file_repo: Repo, tmp_path: Path, link_path: str, target: str
) -> None:
    snapshot_id = _push_with_link(file_repo, tmp_path, link_path, target)
    snapshot.pull(file_repo, snapshot_id, str(tmp_path / "dest"))
    assert os.readlink(tmp_path / "dest" / link_path) == target


def test_unsafe_symlinks_are_allowed_when_asked(file_repo: Repo, tmp_path: Path) -> None:
    snapshot_id = _push_with_link(file_repo, tmp_path, "abs", "/etc/passwd")
    snapshot.pull(file_repo, snapshot_id, str(tmp_path / "dest"), unsafe_symlinks=True)
    assert os.readlink(tmp_path / "dest" / "abs") == "/etc/passwd"


def test_pull_refuses_an_escape_through_a_chain_of_symlinks(file_repo: Repo, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    os.symlink("..", src / "sub" / "up")  # fine on its own: points at the root
    os.symlink("sub/up/..", src / "x")  # lexically inside, really the parent of DEST
    snapshot_id = snapshot.push(str(src), file_repo).snapshot_id
    dest = tmp_path / "dest"
    try:
        snapshot.pull(file_repo, snapshot_id, str(dest))
    except DestinationError:
        return
    assert os.path.realpath(dest / "x").startswith(str(dest) + os.sep), "x resolves outside DEST"


def test_pull_never_writes_through_symlinks_in_dest(file_repo: Repo, tmp_path: Path) -> None:
    src = make_dataset(tmp_path / "src")
    snapshot_id = snapshot.push(str(src), file_repo).snapshot_id
    dest = tmp_path / "dest"
    snapshot.pull(file_repo, snapshot_id, str(dest))
    victim_dir = tmp_path / "victim-dir"
    victim_dir.mkdir()
    victim_file = tmp_path / "victim.txt"
    victim_file.write_bytes(b"do not touch")

    # Someone swapped a pulled file and a pulled directory for symlinks to the outside.
    os.unlink(dest / "labels.csv")
    os.symlink(victim_file, dest / "labels.csv")
    os.rename(dest / "train", tmp_path / "old-train")
    os.symlink(victim_dir, dest / "train")

    with pytest.raises(DestinationError, match="not a directory"):
        snapshot.pull(file_repo, snapshot_id, str(dest))
    assert os.listdir(victim_dir) == []
    snapshot.pull(file_repo, snapshot_id, str(dest), force=True)
    assert os.listdir(victim_dir) == []
    assert victim_file.read_bytes() == b"do not touch"
    assert local_state(dest) == local_state(src)


# --- integrity -----------------------------------------------------------------------


def test_corrupt_chunk_fails_the_pull_and_leaves_no_partial_file(repo: Repo, tmp_path: Path) -> None:
    src = make_dataset(tmp_path / "src")
    snapshot_id = snapshot.push(str(src), repo).snapshot_id
    chunk_id = first_chunk_of(repo, snapshot_id, "train/shards/shard-0.bin")
    corrupt_object(repo, chunk_id)
    dest = tmp_path / "dest"
    with pytest.raises(IntegrityError, match=f"chunk {chunk_id} .*is corrupt"):
        snapshot.pull(repo, snapshot_id, str(dest))
    shards = dest / "train" / "shards"
    assert not os.path.lexists(shards / "shard-0.bin")
    assert [n for n in os.listdir(shards) if n.startswith(snapshot.TMP_PREFIX)] == []


def test_corrupt_chunk_fails_cat(file_repo: Repo, tmp_path: Path) -> None:
    src = make_dataset(tmp_path / "src")
    snapshot_id = snapshot.push(str(src), file_repo).snapshot_id
    chunk_id = first_chunk_of(file_repo, snapshot_id, "labels.csv")
    corrupt_object(file_repo, chunk_id)
    with pytest.raises(IntegrityError, match=chunk_id):
        snapshot.cat(file_repo, snapshot_id, "labels.csv", lambda b: None)


def test_corrupt_tree_fails_ls_with_the_tree_named(file_repo: Repo, tmp_path: Path) -> None:
    src = make_dataset(tmp_path / "src")
    snapshot_id = snapshot.push(str(src), file_repo).snapshot_id
    train = file_repo.lookup_path(snapshot_id, "train")
    assert train is not None
    corrupt_object(file_repo, train.tree_id)  # type: ignore[arg-type]
    with pytest.raises(IntegrityError, match=train.tree_id):  # type: ignore[arg-type]
        snapshot.list_dir(file_repo, snapshot_id, "train")


def test_fsck_names_a_corrupt_object(repo: Repo, tmp_path: Path) -> None:
    src = make_dataset(tmp_path / "src")
    snapshot_id = snapshot.push(str(src), repo).snapshot_id
    clean = snapshot.fsck(repo)
    assert clean.ok and clean.snapshots == 1 and clean.objects > 10

    chunk_id = first_chunk_of(repo, snapshot_id, "labels.csv")
    corrupt_object(repo, chunk_id)
    report = snapshot.fsck(repo)
    assert not report.ok
    assert report.corrupt == [chunk_id]
    # --quick reads no data, so it cannot see bit rot.
    assert snapshot.fsck(repo, read_data=False).ok


def test_fsck_names_a_missing_object(repo: Repo, tmp_path: Path) -> None:
    src = make_dataset(tmp_path / "src")
    snapshot_id = snapshot.push(str(src), repo).snapshot_id
    chunk_id = first_chunk_of(repo, snapshot_id, "run.sh")
    repo.store.delete(fmt.object_key(chunk_id))
    report = snapshot.fsck(repo, read_data=False)
    assert not report.ok
    assert len(report.missing) == 1 and chunk_id in report.missing[0] and "run.sh" in report.missing[0]


# --- verify and diff ---------------------------------------------------------------


def test_verify_lists_every_difference(file_repo: Repo, tmp_path: Path) -> None:
    src = make_dataset(tmp_path / "src")
    snapshot_id = snapshot.push(str(src), file_repo).snapshot_id
    dest = tmp_path / "dest"
    snapshot.pull(file_repo, snapshot_id, str(dest))
    assert snapshot.verify(file_repo, str(dest), snapshot_id) == []

    (dest / "labels.csv").write_bytes(b"changed\n")
    os.chmod(dest / "empty.txt", 0o755)
    os.unlink(dest / "train" / "img-0.jpg")
    (dest / "train" / "new.txt").write_bytes(b"new")
    os.rmdir(dest / "empty dir")
    changes = snapshot.verify(file_repo, str(dest), snapshot_id)
    assert sorted((c.status, c.path) for c in changes) == [
        ("A", b"train/new.txt"),
        ("D", b"empty dir"),
        ("D", b"train/img-0.jpg"),
        ("M", b"empty.txt"),
        ("M", b"labels.csv"),
    ]


def test_diff_reports_changes_and_skips_identical_subtrees(repo: Repo, tmp_path: Path) -> None:
    src = make_dataset(tmp_path / "src")
    old_id = snapshot.push(str(src), repo).snapshot_id
    old_labels_size = len((src / "labels.csv").read_bytes())
    (src / "labels.csv").write_bytes(b"id,label\n")
    os.unlink(src / "empty.txt")
    (src / "empty dir" / "now-full.txt").write_bytes(b"1234")
    os.unlink(src / "labels-link")
    os.symlink("run.sh", src / "labels-link")
    os.chmod(src / "run.sh", 0o644)
    new_id = snapshot.push(str(src), repo).snapshot_id

    fetched: list[str] = []

    def get_tree(tree_id: str) -> list[fmt.Entry]:
        fetched.append(tree_id)
        return repo.get_tree(tree_id)

    changes = list(snapshot.diff_trees(get_tree, old_id, get_tree, new_id))
    assert [(c.status, c.path) for c in changes] == [
        ("D", b"empty.txt"),
        ("M", b"labels-link"),
        ("M", b"labels.csv"),
        ("M", b"run.sh"),
        ("A", b"empty dir/now-full.txt"),
    ]
    labels = next(c for c in changes if c.path == b"labels.csv")
    assert (labels.old.size, labels.new.size) == (old_labels_size, 9)  # type: ignore[union-attr]
    train = repo.lookup_path(old_id, "train")
    assert train is not None and train.tree_id not in fetched  # identical subtree never fetched
    as_json = next(c for c in changes if c.path == b"run.sh").as_dict()
    assert as_json["old"]["executable"] is True and as_json["new"]["executable"] is False
    assert list(snapshot.diff(repo, new_id, new_id)) == []


# --- listing, cat, refs ---------------------------------------------------------------


def test_ls_cat_and_walk(repo: Repo, tmp_path: Path) -> None:
    src = make_dataset(tmp_path / "src")
    snapshot_id = snapshot.push(str(src), repo).snapshot_id
    entry, children = snapshot.list_dir(repo, snapshot_id)
    assert entry is None
    assert [e.name for e in children] == sorted(os.listdir(os.fsencode(src)))
    entry, children = snapshot.list_dir(repo, snapshot_id, "train/shards")
    assert entry is not None and entry.is_dir and entry.size == 3 * MiB + 5
    assert [e.name for e in children] == [b"shard-0.bin"]

    out: list[bytes] = []
    size = snapshot.cat(repo, snapshot_id, "train/shards/shard-0.bin", out.append)
    assert size == 3 * MiB + 5 and len(out) >= 2  # multi-chunk, streamed chunk by chunk
    assert b"".join(out) == (src / "train" / "shards" / "shard-0.bin").read_bytes()
    with pytest.raises(UsageError, match="is a directory"):
        snapshot.cat(repo, snapshot_id, "train", out.append)
    with pytest.raises(UsageError, match="symlink"):
        snapshot.cat(repo, snapshot_id, "labels-link", out.append)
    with pytest.raises(NotFoundError):
        snapshot.cat(repo, snapshot_id, "train/nope", out.append)
    with pytest.raises(NotFoundError, match="not a directory"):
        snapshot.cat(repo, snapshot_id, "labels.csv/x", out.append)

    walked = {p: e for p, e in snapshot.walk(repo, snapshot_id)}
    assert set(walked) == set(local_state(src))
    assert walked[b"run.sh"].executable


def test_refs_resolve_full_ids_and_prefixes(repo: Repo, tmp_path: Path) -> None:
    snapshot_id = snapshot.push(str(make_dataset(tmp_path / "src")), repo).snapshot_id
    assert resolve_ref(repo, snapshot_id) == snapshot_id
    assert resolve_ref(repo, snapshot_id.upper()) == snapshot_id
    assert resolve_ref(repo, snapshot_id[:8]) == snapshot_id
    with pytest.raises(UsageError):
        resolve_ref(repo, snapshot_id[:7])
    with pytest.raises(NotFoundError):
        resolve_ref(repo, "0" * 64 if not snapshot_id.startswith("0000") else "f" * 64)
    with pytest.raises(NotFoundError):
        resolve_ref(repo, "deadbeef" if not snapshot_id.startswith("deadbeef") else "beefdead")
    # Two snapshots sharing a prefix: the prefix is ambiguous (a usage error).
    twin = snapshot_id[:10] + ("0" if snapshot_id[10] != "0" else "1") + snapshot_id[11:]
    repo.store.put("snapshots/" + twin, b"")
    with pytest.raises(UsageError, match="ambiguous"):
        resolve_ref(repo, snapshot_id[:10])
    assert resolve_ref(repo, snapshot_id[:11]) == snapshot_id


def test_file_with_a_chunk_list_object_pulls_and_cats(file_repo: Repo, tmp_path: Path) -> None:
    # More than 1024 chunks needs > 1 GiB from the real chunker; build the
    # snapshot by hand instead (the format allows any chunk lengths).
    chunk = b"0123456789"
    chunk_id = hash_bytes(chunk)
    count = fmt.INLINE_MAX_CHUNKS + 1
    entry, blob = file_entry(
        b"huge.bin", count * len(chunk), [(chunk_id, len(chunk))] * count, executable=True
    )
    assert blob is not None
    tree = fmt.encode_tree([entry])
    snapshot_id = hash_bytes(tree)
    file_repo.ensure_config()
    file_repo.put_object(chunk)
    file_repo.put_object(blob)
    file_repo.put_object(tree)
    file_repo.mark_snapshot(snapshot_id)

    dest = tmp_path / "dest"
    snapshot.pull(file_repo, snapshot_id, str(dest))
    assert (dest / "huge.bin").read_bytes() == chunk * count
    assert os.stat(dest / "huge.bin").st_mode & 0o100
    assert scan(dest).root_id != snapshot_id  # the real chunker would cut it differently
    out: list[bytes] = []
    snapshot.cat(file_repo, snapshot_id, "huge.bin", out.append)
    assert b"".join(out) == chunk * count
    assert snapshot.fsck(file_repo).ok
    corrupt_object(file_repo, entry.chunklist_id)  # type: ignore[arg-type]
    with pytest.raises(IntegrityError, match=f"chunk list {entry.chunklist_id}"):
        snapshot.cat(file_repo, snapshot_id, "huge.bin", out.append)
