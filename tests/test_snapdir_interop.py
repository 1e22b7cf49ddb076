"""snapdir stores read by snapfs: pull, mount and import of snapshots the real ``snapdir`` package wrote.

Stores are written by the real package (driven in its own virtualenv, as in
test_snapdir_compat.py) on a directory and on the loopback SeaweedFS. Every
check compares with the original files, read through the symlinks snapdir
followed, so a wrong byte, a wrong size or a missing file fails.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import test_snapdir_compat
from support.mounts import mounted
from test_snapdir_compat import SnapdirRunner
from test_snapdir_compat import make_mixed_tree as make_snapdir_tree

from snapfs import format as fmt
from snapfs import records, snapdir_repo
from snapfs import snapdir as sd
from snapfs.hashing import hash_bytes
from snapfs.repo import Repo
from snapfs.snapshot import walk

SNAPFS = [sys.executable, "-m", "snapfs.cli.main"]
# The real package in its own virtualenv, shared with test_snapdir_compat (a session fixture).
snapdir_runner = test_snapdir_compat.snapdir_runner
LEAF = "data/nested/deep/leaf.bin"  # 9 MiB: a whole object above the chunk limit and the part size


def cli(*args: str | Path, ok: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SNAPFS_NO_PROGRESS": "1"}
    proc = subprocess.run([*SNAPFS, *map(str, args)], capture_output=True, text=True, env=env, timeout=180)
    if ok:
        assert proc.returncode == 0, proc.stderr
    return proc


def expected_files(tree: Path) -> tuple[dict[str, tuple[bytes, bool]], set[str]]:
    """What a restore must contain: {file: (content, executable)} and the directories, from the manifest."""
    files, dirs = {}, set()
    for entry in sd.snapdir_entries(tree):
        if entry.kind == sd.KIND_DIR:
            dirs.add(entry.path)
        else:
            # Through the symlinks snapdir followed: the content, never the link.
            files[entry.path] = ((tree / entry.path).read_bytes(), entry.executable)
    return files, dirs


def assert_same_tree(tree: Path, restored: Path, *, check_modes: bool = True) -> None:
    files, dirs = expected_files(tree)
    got_files, got_dirs = {}, {""}
    for dirpath, dirnames, filenames in os.walk(restored):
        rel = os.path.relpath(dirpath, restored)
        base = "" if rel == "." else rel + "/"
        got_dirs.update(base + d for d in dirnames)
        for name in filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            assert stat.S_ISREG(st.st_mode), f"{base + name} is not a regular file"
            with open(path, "rb") as f:
                got_files[base + name] = (f.read(), bool(st.st_mode & stat.S_IXUSR))
            assert st.st_size == len(got_files[base + name][0])
    assert got_dirs == dirs
    assert sorted(got_files) == sorted(files)
    for path, (content, executable) in files.items():
        assert got_files[path][0] == content, f"{path}: bytes differ"
        if check_modes:
            assert got_files[path][1] == executable, f"{path}: exec bit differs"


@pytest.fixture(params=["file", pytest.param("s3", marks=pytest.mark.s3)])
def snapdir_store(request: pytest.FixtureRequest, tmp_path: Path, snapdir_runner: SnapdirRunner):
    """(tree, snapdir store URL for snapfs, snapshot ID) after a real ``snapdir push``."""
    tree = make_snapdir_tree(tmp_path / "tree", tmp_path / "outside")
    if request.param == "file":
        inner = "file://" + str(tmp_path / "snapdir-store")
    else:
        inner = request.getfixturevalue("s3_store_url")  # sets the AWS_* env the driver inherits
    [result] = snapdir_runner.run(["push", str(tree), inner])
    assert "error" not in result, result
    assert result["id"] == sd.snapdir_id(tree)
    return tree, "snapdir+" + inner, result["id"]


def test_id_format_snapdir_is_the_packages_id(snapdir_runner: SnapdirRunner, tmp_path: Path) -> None:
    tree = make_snapdir_tree(tmp_path / "tree", tmp_path / "outside")
    [theirs] = snapdir_runner.manifests(tree)
    ours = cli("id", "--format", "snapdir", tree).stdout
    assert ours == theirs["id"] + "\n"
    as_json = json.loads(cli("id", "--format", "snapdir", tree, "--json").stdout)
    assert as_json["id"] == theirs["id"] and as_json["format"] == "snapdir"
    # The default format is still snapfs's own ID.
    assert cli("id", tree).stdout.strip() != theirs["id"]


def test_pull_restores_the_original_bytes(snapdir_store, tmp_path: Path) -> None:
    tree, url, snapdir_id = snapdir_store
    dest = tmp_path / "restored"
    out = json.loads(cli("pull", snapdir_id[:12], dest, "--store", url, "--json").stdout)
    assert out["snapshot_id"] == snapdir_id and out["fetched_files"] == out["files"] > 30
    assert_same_tree(tree, dest)
    # Pulling again resumes: everything is already there and verified, nothing fetched.
    again = json.loads(cli("pull", snapdir_id, dest, "--store", url, "--json").stdout)
    assert again["fetched_files"] == 0 and again["skipped_files"] == out["files"]


def test_mount_serves_the_original_bytes(snapdir_store, tmp_path: Path) -> None:
    tree, url, snapdir_id = snapdir_store
    with mounted(tmp_path / "mnt", url, tmp_path / "cache") as mnt:
        root = mnt / snapdir_id
        assert_same_tree(tree, root)
        # A followed symlink's manifest SIZE is its target's length; the mount shows the content's.
        assert os.stat(root / "links" / "to_file").st_size == len(b"hello\n")
        assert os.stat(root / LEAF).st_size == (tree / LEAF).stat().st_size
        with open(root / LEAF, "rb") as f:  # random access into a memory-mapped whole object
            f.seek(5 << 20)
            assert f.read(4096) == (tree / LEAF).read_bytes()[5 << 20 : (5 << 20) + 4096]
        status = json.loads(cli("status", mnt, "--json").stdout)
        assert status["verify_failures"] == 0 and status["fetch_errors"] == 0


def test_mount_refuses_objects_over_the_limit_with_eio(snapdir_runner: SnapdirRunner, tmp_path: Path) -> None:
    tree = make_snapdir_tree(tmp_path / "tree", tmp_path / "outside")
    store = tmp_path / "snapdir-store"
    [result] = snapdir_runner.run(["push", str(tree), "file://" + str(store)])
    cache = tmp_path / "cache"
    with mounted(
        tmp_path / "mnt", "snapdir+file://" + str(store), cache, "--snapdir-max-object", "1M"
    ) as mnt:
        root = mnt / result["id"]
        with pytest.raises(OSError) as caught:
            (root / LEAF).read_bytes()
        assert caught.value.errno == 5  # EIO
        assert (root / "README.md").read_bytes() == b"hello\n"  # the rest of the mount still serves
    log = (cache / "mount.log").read_text()
    assert "EIO" in log and "leaf.bin" in log and "snapfs import" in log


def test_import_then_pull_round_trips_and_records_the_snapdir_id(snapdir_store, tmp_path: Path) -> None:
    tree, url, snapdir_id = snapdir_store
    store = "file://" + str(tmp_path / "snapfs-store")
    out = json.loads(
        cli("import", snapdir_id, "--from", url, "--store", store, "--name", "corpus@1", "--json").stdout
    )
    snapshot_id = out["id"]
    assert out["uploaded_objects"] > 0 and out["files"] > 30
    shown = json.loads(cli("show", "corpus@1", "--store", store, "--json").stdout)
    assert shown["snapshot"] == snapshot_id
    assert shown["meta"]["snapdir_id"] == snapdir_id

    dest = tmp_path / "pulled"
    cli("pull", "corpus@1", dest, "--store", store)
    assert_same_tree(tree, dest)
    assert cli("verify", dest, snapshot_id, "--store", store).returncode == 0
    assert cli("id", dest).stdout.strip() == snapshot_id
    # The re-chunked snapshot reads lazily: the 9 MiB file is several chunks.
    repo = Repo.open(store)
    leaf = repo.lookup_path(snapshot_id, LEAF)
    assert leaf is not None and len(leaf.chunks) > 1

    # A rerun uploads nothing and keeps the one record.
    again = json.loads(cli("import", snapdir_id, "--from", url, "--store", store, "--json").stdout)
    assert again["id"] == snapshot_id and again["uploaded_objects"] == 0
    assert again["record"] == out["record"]
    assert len(records.records_for_snapshot(repo, snapshot_id)) == 1


@pytest.mark.s3
def test_import_into_s3_packs_the_small_files(
    snapdir_runner: SnapdirRunner, s3_store_url: str, tmp_path: Path
) -> None:
    tree = make_snapdir_tree(tmp_path / "tree", tmp_path / "outside")
    (tree / "images").mkdir()
    for i in range(12):
        (tree / "images" / f"{i:02d}.jpg").write_bytes(os.urandom(3000 + i))
    inner = "file://" + str(tmp_path / "snapdir-store")
    [pushed] = snapdir_runner.run(["push", str(tree), inner])
    assert "error" not in pushed, pushed
    out = json.loads(
        cli("import", pushed["id"], "--from", "snapdir+" + inner, "--store", s3_store_url, "--json").stdout
    )
    repo = Repo.open(s3_store_url)
    packs = list(repo.store.list("packs/"))
    assert packs, "an import into S3 packs its small files, as a push does"
    image = repo.lookup_path(out["id"], "images/05.jpg")
    assert fmt.decode_pack_ref(repo.store.get(fmt.object_key(image.chunks[0][0]))) is not None
    dest = tmp_path / "pulled"
    cli("pull", out["id"], dest, "--store", s3_store_url)
    assert_same_tree(tree, dest)
    assert cli("fsck", "--store", s3_store_url).returncode == 0


def _corrupt_object(store: Path, checksum: str) -> None:
    path = store / sd.object_key(checksum)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_corrupt_object_fails_pull_and_gives_eio_in_the_mount(
    snapdir_runner: SnapdirRunner, tmp_path: Path
) -> None:
    tree = make_snapdir_tree(tmp_path / "tree", tmp_path / "outside")
    store = tmp_path / "snapdir-store"
    [result] = snapdir_runner.run(["push", str(tree), "file://" + str(store)])
    url = "snapdir+file://" + str(store)
    big, small = hash_bytes((tree / LEAF).read_bytes()), hash_bytes(b"spaces\n")
    _corrupt_object(store, big)
    _corrupt_object(store, small)

    dest = tmp_path / "restored"
    out = cli("pull", result["id"], dest, "--store", url, ok=False)
    assert out.returncode == 4 and "corrupt" in out.stderr
    assert big in out.stderr or small in out.stderr
    # A file is renamed into place only after its bytes verified.
    assert not (dest / LEAF).exists() and not (dest / "with space" / "file name.txt").exists()

    with mounted(tmp_path / "mnt", url, tmp_path / "cache") as mnt:
        root = mnt / result["id"]
        for rel in (LEAF, "with space/file name.txt"):
            with pytest.raises(OSError) as caught:
                (root / rel).read_bytes()
            assert caught.value.errno == 5
        assert (root / "README.md").read_bytes() == b"hello\n"


def test_hostile_manifest_is_refused_and_nothing_escapes(tmp_path: Path) -> None:
    store = tmp_path / "snapdir-store"
    content = b"pwned\n"
    checksum = hash_bytes(content)
    dir_checksum = hash_bytes(checksum.encode())
    manifest = f"D 755 {dir_checksum} 6 ./\nF 644 {checksum} 6 ./../escape\n".encode()
    snapdir_id = hash_bytes(manifest)
    for key, data in ((sd.manifest_key(snapdir_id), manifest), (sd.object_key(checksum), content)):
        (store / key).parent.mkdir(parents=True, exist_ok=True)
        (store / key).write_bytes(data)
    dest = tmp_path / "deep" / "dest"
    out = cli("pull", snapdir_id, dest, "--store", "snapdir+file://" + str(store), ok=False)
    assert out.returncode == 4 and "./../escape" in out.stderr
    assert not (tmp_path / "deep" / "escape").exists() and not dest.exists()


def test_snapdir_stores_are_never_written_or_created(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "f").write_bytes(b"f\n")
    store = tmp_path / "snapdir-store"
    store.mkdir()
    out = cli("push", data, "--store", "snapdir+file://" + str(store), ok=False)
    assert out.returncode == 2 and "only reads" in out.stderr
    assert list(store.iterdir()) == []
    missing = tmp_path / "typo"
    out = cli("ls", "0" * 64, "--store", "snapdir+file://" + str(missing), ok=False)
    assert out.returncode == 5 and "does not exist" in out.stderr
    assert not missing.exists()


@pytest.mark.parametrize("by_listing", [False, True], ids=["head", "list"])
def test_file_sizes_come_from_the_objects(
    snapdir_store, by_listing: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    tree, url, snapdir_id = snapdir_store
    if by_listing:
        monkeypatch.setattr(snapdir_repo, "_LIST_MIN_STATS", 1)
    repo = Repo.open(url)
    assert isinstance(repo, snapdir_repo.SnapdirRepo)
    files, _dirs = expected_files(tree)
    sizes = {}
    for path, entry in walk(repo, snapdir_id):
        if entry.is_file:
            sizes[path.decode()] = entry.size
    assert sizes == {path: len(content) for path, (content, _exec) in files.items()}
    # The quirk this guards against: the manifest records the link's length for to_file.
    manifest = {e.path: e.size for e in sd.snapdir_entries(tree)}
    assert manifest["links/to_file"] == len("../README.md") != sizes["links/to_file"]


def _write_snapdir_store(store: Path, files: dict[str, tuple[bytes, int]]) -> str:
    """A one-directory snapdir store by hand: {name: (content, SIZE to record)}; returns the ID."""
    lines, checksums = [], []
    for name, (content, size) in sorted(files.items()):
        checksum = hash_bytes(content)
        checksums.append(checksum)
        lines.append(f"F 644 {checksum} {size} ./{name}\n")
        key = store / sd.object_key(checksum)
        key.parent.mkdir(parents=True, exist_ok=True)
        key.write_bytes(content)
    root = f"D 755 {hash_bytes(''.join(sorted(set(checksums))).encode())} {sum(s for _, s in files.values())} ./\n"
    manifest = (root + "".join(lines)).encode()
    snapdir_id = hash_bytes(manifest)
    key = store / sd.manifest_key(snapdir_id)
    key.parent.mkdir(parents=True, exist_ok=True)
    key.write_bytes(manifest)
    return snapdir_id


def test_vfs_never_serves_an_object_at_a_size_the_manifest_lies_about(tmp_path: Path) -> None:
    """Two lines share one checksum; one claims the wrong SIZE. Without FUSE: the vfs and its source."""
    import trio

    from snapfs.cache import DiskCache
    from snapfs.errors import IntegrityError
    from snapfs.snapdir_source import SnapdirObjectSource
    from snapfs.vfs import ROOT_INODE, SnapshotFS

    big = os.urandom(6 << 20)  # above the 4 MiB whole-object threshold: the memory-mapped path
    other = os.urandom(5 << 20)
    small = b"x" * 5000
    snapdir_id = _write_snapdir_store(
        tmp_path / "store",
        {
            # Two lines, one content, two SIZEs: the object's own size decides for both.
            "big": (big, len(big)),
            "big-lie": (big, len(big) - 1),
            # One line, a wrong SIZE, nothing to contradict it: reads must fail.
            "other-lie": (other, len(other) + 7),
            "small-lie": (small, 6000),
        },
    )
    repo = Repo.open("snapdir+file://" + str(tmp_path / "store"))

    async def main() -> None:
        cache = DiskCache(str(tmp_path / "cache"), fsync=False)
        try:
            async with SnapdirObjectSource(repo, cache) as source:
                fs = SnapshotFS(source, tree_loader=source.load_tree)
                root = (await fs.lookup(ROOT_INODE, snapdir_id.encode())).ino

                async def read(name: bytes) -> bytes:
                    attr = await fs.lookup(root, name)
                    fh = await fs.open(attr.ino, os.O_RDONLY)
                    try:
                        return await fs.read(fh, 0, attr.size)
                    finally:
                        fs.release(fh)

                assert await read(b"big") == big and await read(b"big-lie") == big
                for liar in (b"other-lie", b"small-lie"):
                    with pytest.raises(IntegrityError, match="bytes"):
                        await read(liar)
                assert source.counters.verify_failures == 2
        finally:
            cache.close()

    trio.run(main)


def test_mount_remembers_an_outage_for_whole_snapdir_objects(tmp_path: Path) -> None:
    """Big snapdir objects take their own fetch path (ranged GETs into the disk
    cache); a down store must still be remembered there, as for chunks."""
    import time

    import trio
    from test_vfs import DownStore, read_name

    from snapfs.cache import DiskCache
    from snapfs.errors import StoreUnavailableError
    from snapfs.snapdir_repo import SnapdirRepo
    from snapfs.snapdir_source import SnapdirObjectSource
    from snapfs.vfs import ROOT_INODE, SnapshotFS

    class DownSnapdirStore(DownStore):
        def stat(self, key: str):
            if self.down:
                self.gets.append(key)
                time.sleep(self.down_delay)
                raise StoreUnavailableError(f"{key}: cannot read from {self.url}: connection timed out")
            return super().stat(key)

    # Above the 4 MiB whole-object threshold: the memory-mapped path.
    contents = {f"big{i}": os.urandom((4 << 20) + 4096 * (i + 1)) for i in range(6)}
    snapdir_id = _write_snapdir_store(tmp_path / "store", {n: (c, len(c)) for n, c in contents.items()})
    store = DownSnapdirStore(str(tmp_path / "store"))
    repo = SnapdirRepo(store)

    async def main() -> None:
        cache = DiskCache(str(tmp_path / "cache"), fsync=False)
        try:
            async with SnapdirObjectSource(repo, cache, outage_holdoff=0.5) as source:
                fs = SnapshotFS(source, tree_loader=source.load_tree)
                root = (await fs.lookup(ROOT_INODE, snapdir_id.encode())).ino

                async def read(name: str) -> bytes:
                    return await read_name(fs, root, name)

                async def timed_failure(name: str) -> tuple[float, str]:
                    started = time.monotonic()
                    with pytest.raises(StoreUnavailableError) as caught:
                        await read(name)
                    return time.monotonic() - started, str(caught.value)

                assert await read("big0") == contents["big0"]
                store.down, store.down_delay = True, 0.2
                for name in ("big1", "big2", "big3"):
                    seconds, _ = await timed_failure(name)
                    assert seconds >= 0.2
                asked = len(store.gets)
                seconds, message = await timed_failure("big4")
                assert seconds < 0.1 and len(store.gets) == asked, (seconds, len(store.gets) - asked)
                assert "unavailable for" in message and "connection timed out" in message, message
                assert source.counters.fast_failures == 1
                assert await read("big0") == contents["big0"]  # verified and cached: served as ever

                store.down = False
                await trio.sleep(0.6)  # past the hold-off: the next miss probes, and reads
                assert await read("big5") == contents["big5"]
                assert source.store_unavailable_for == 0
                assert await read("big4") == contents["big4"]
        finally:
            cache.close()

    trio.run(main)
