"""Real mounts: readers in separate processes, as a dataloader's workers are."""

from __future__ import annotations

import errno
import importlib.metadata
import json
import os
import re
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path

import pytest
from support.mounts import alive, fuse_missing, mounted, parallel_digests, snapfs, status
from support.trees import file_digests, make_mixed_tree

from snapfs import format as fmt
from snapfs.cache import DiskCache
from snapfs.repo import Repo
from snapfs.snapshot import push

REPO = Path(__file__).resolve().parent.parent

_reason = fuse_missing()
if _reason and os.environ.get("CI"):
    raise RuntimeError(f"CI must run the mount tests, but FUSE is unavailable: {_reason}")
pytestmark = [pytest.mark.fuse, pytest.mark.skipif(_reason is not None, reason=f"no FUSE: {_reason}")]


@pytest.fixture
def sample(tmp_path: Path):
    src = make_mixed_tree(tmp_path / "src")
    return src


def test_readers_in_other_processes_see_exact_bytes(sample: Path, store_url: str, tmp_path: Path):
    snapshot_id = push(str(sample), Repo.open(store_url)).snapshot_id
    with mounted(tmp_path / "mnt", store_url, tmp_path / "cache") as mnt:
        root = mnt / snapshot_id
        assert parallel_digests(root) == file_digests(sample)
        # Metadata that cp -a, tar, rsync and find rely on.
        for dirpath, dirnames, filenames in os.walk(os.fsencode(sample)):
            for name in dirnames + filenames:
                local = os.path.join(dirpath, name)
                mirrored = os.path.join(os.fsencode(root), os.path.relpath(local, os.fsencode(sample)))
                a, b = os.lstat(local), os.lstat(mirrored)
                assert (a.st_mode & 0o170000) == (b.st_mode & 0o170000), local
                if os.path.islink(local):
                    assert os.readlink(local) == os.readlink(mirrored)
                elif os.path.isfile(local):
                    assert a.st_size == b.st_size and (a.st_mode & 0o100) == (b.st_mode & 0o100)
                    assert b.st_blocks == (a.st_size + 511) // 512 and b.st_nlink == 1
                    assert b.st_mtime == 946684800
                else:
                    assert b.st_nlink == a.st_nlink, local
        # A copy made with cp -a from the mount has the snapshot's ID.
        copy = tmp_path / "copy"
        subprocess.run(["cp", "-a", str(root), str(copy)], check=True)
        assert snapfs("id", str(copy)).stdout.strip() == snapshot_id
        # ls of the mountpoint lists the snapshots opened during this mount.
        assert snapshot_id in os.listdir(mnt)
        counters = status(mnt)
        assert counters["misses"] > 0 and counters["verify_failures"] == 0 and counters["fetch_errors"] == 0
        durability_line = next(
            line for line in snapfs("status", str(mnt)).stdout.splitlines() if line.startswith("durability")
        )
    # The unmount synced what the mount cached: a reboot now would drop nothing.
    cache = DiskCache(str(tmp_path / "cache"))
    try:
        assert cache.index.totals()[2] > 0
        if cache.defers_sync:
            assert counters["cache_durability"].startswith("synced in batches")
            assert "objects not yet synced" in durability_line
            assert cache.index.unsynced_count() == 0
    finally:
        cache.close()


@pytest.mark.parametrize("fuse_open", [False, True], ids=["kernel-opens", "daemon-opens"])
def test_warm_rereads_skip_the_daemon(sample: Path, file_store_url: str, tmp_path: Path, fuse_open: bool):
    from snapfs.fuseops import KERNEL_CAN_SKIP_OPEN

    assert KERNEL_CAN_SKIP_OPEN, "pyfuse3 lacks scripts/pyfuse3.patch; run scripts/setup"
    # The patch level install-pyfuse3 builds: an older build lacks the GIL-free read reply.
    level = re.search(r"^PATCH_LEVEL=(\S+)$", (REPO / "scripts" / "install-pyfuse3").read_text(), re.M)
    assert level and importlib.metadata.version("pyfuse3").endswith("+" + level[1]), "run scripts/setup"
    snapshot_id = push(str(sample), Repo.open(file_store_url)).snapshot_id
    expected = file_digests(sample)
    extra = ("--fuse-open",) if fuse_open else ()
    with mounted(tmp_path / "mnt", file_store_url, tmp_path / "cache", *extra) as mnt:
        assert parallel_digests(mnt / snapshot_id, workers=2) == expected
        first = status(mnt)
        assert parallel_digests(mnt / snapshot_id, workers=2) == expected
        second = status(mnt)
        opens_line = next(
            line for line in snapfs("status", str(mnt)).stdout.splitlines() if line.startswith("opens")
        )
    assert ("sent to the daemon" if fuse_open else "no_open") in opens_line
    assert first["skip_open"] is second["skip_open"] is not fuse_open
    # Not asserted: that the warm pass sends no READ. This machine's DAMON
    # (kdamond, action pageout) drops clean page cache within seconds.
    assert first["read_requests"] > 0
    if fuse_open:
        assert first["open_requests"] == second["open_requests"] - len(expected) == len(expected)
    else:
        # The first OPEN is answered ENOSYS (one per reader at most, if they
        # race to it); after it the kernel opens files itself.
        assert 1 <= first["open_requests"] == second["open_requests"] <= 2
        assert first["inode_files"] > 0 and first["open_files"] == 0


def test_writes_fail_with_erofs(sample: Path, file_store_url: str, tmp_path: Path):
    snapshot_id = push(str(sample), Repo.open(file_store_url)).snapshot_id
    with mounted(tmp_path / "mnt", file_store_url, tmp_path / "cache") as mnt:
        root = mnt / snapshot_id
        attempts = [
            lambda: open(root / "run.sh", "w"),
            lambda: open(root / "run.sh", "a"),
            lambda: open(root / "new-file", "w"),
            lambda: os.mkdir(root / "newdir"),
            lambda: os.unlink(root / "run.sh"),
            lambda: os.rename(root / "run.sh", root / "moved.sh"),
            lambda: os.chmod(root / "run.sh", 0o600),
            lambda: os.symlink("x", root / "newlink"),
            lambda: os.truncate(root / "run.sh", 0),
        ]
        for attempt in attempts:
            with pytest.raises(OSError) as e:
                attempt()
            assert e.value.errno == errno.EROFS
        assert (root / "run.sh").read_bytes() == (sample / "run.sh").read_bytes()


def test_corrupt_object_gives_eio_for_that_file_only(sample: Path, file_store_url: str, tmp_path: Path):
    repo = Repo.open(file_store_url)
    snapshot_id = push(str(sample), repo).snapshot_id
    entry = repo.lookup_path(snapshot_id, "medium.bin")
    chunk_id = entry.chunks[0][0]
    path = Path(repo.store.root) / fmt.object_key(chunk_id)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with mounted(tmp_path / "mnt", file_store_url, tmp_path / "cache") as mnt:
        root = mnt / snapshot_id
        with pytest.raises(OSError) as e:
            (root / "medium.bin").read_bytes()
        assert e.value.errno == errno.EIO
        # Everything else is still served, byte for byte.
        expected = file_digests(sample)
        del expected[b"medium.bin"]
        assert parallel_digests(root, workers=2, exclude=(b"medium.bin",)) == expected
        assert status(mnt)["verify_failures"] >= 1
    log = (tmp_path / "cache" / "mount.log").read_text()
    assert chunk_id in log and snapshot_id in log and "medium.bin" in log


def test_store_unreachable_cached_files_stay_readable(sample: Path, file_store_url: str, tmp_path: Path):
    repo = Repo.open(file_store_url)
    snapshot_id = push(str(sample), repo).snapshot_id
    with mounted(tmp_path / "mnt", file_store_url, tmp_path / "cache") as mnt:
        root = mnt / snapshot_id
        first = (root / "large.bin").read_bytes()
        store_root = repo.store.root
        os.rename(store_root, store_root + ".away")
        try:
            # Drop the page cache so the bytes must come from the daemon's disk cache.
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
            assert (root / "large.bin").read_bytes() == first == (sample / "large.bin").read_bytes()
            with pytest.raises(OSError) as e:
                (root / "small files" / "img_000.jpg").read_bytes()  # never read: not cached
            assert e.value.errno == errno.EIO
        finally:
            os.rename(store_root + ".away", store_root)
        # The store is back: the file that failed now reads.
        assert (root / "small files" / "img_000.jpg").read_bytes() == (
            sample / "small files" / "img_000.jpg"
        ).read_bytes()


def test_second_mount_over_warm_cache_fetches_nothing(sample: Path, file_store_url: str, tmp_path: Path):
    snapshot_id = push(str(sample), Repo.open(file_store_url)).snapshot_id
    with mounted(tmp_path / "mnt", file_store_url, tmp_path / "cache") as mnt:
        parallel_digests(mnt / snapshot_id, workers=2)
    with mounted(tmp_path / "mnt", file_store_url, tmp_path / "cache") as mnt:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        assert parallel_digests(mnt / snapshot_id, workers=2) == file_digests(sample)
        counters = status(mnt)
        assert counters["misses"] == 0 and counters["fetched_bytes"] == 0
        assert counters["hits"] > 0


def test_mount_tunes_its_own_fuse_connection(file_store_url: str, tmp_path: Path):
    # As root: readahead of the bdi and the kernel's async-request budget.
    if os.geteuid() != 0 or not os.path.isdir("/sys/fs/fuse/connections"):
        pytest.skip("tuning a FUSE connection needs root and fusectl")
    from snapfs.daemon import MAX_BACKGROUND

    with mounted(tmp_path / "mnt", file_store_url, tmp_path / "cache") as mnt:
        dev = os.stat(mnt).st_dev
        conn = Path(f"/sys/fs/fuse/connections/{os.minor(dev)}")
        assert int((conn / "max_background").read_text()) == MAX_BACKGROUND > 12
        assert int((conn / "congestion_threshold").read_text()) == MAX_BACKGROUND * 3 // 4
        bdi = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
        assert int(bdi.read_text()) == 4096


def test_sigterm_unmounts_cleanly(sample: Path, file_store_url: str, tmp_path: Path):
    snapshot_id = push(str(sample), Repo.open(file_store_url)).snapshot_id
    mnt = tmp_path / "mnt"
    with mounted(mnt, file_store_url, tmp_path / "cache"):
        assert (mnt / snapshot_id / "run.sh").read_bytes()
        pid = status(mnt)["pid"]
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (os.path.ismount(mnt) or alive(pid)):
            time.sleep(0.1)
        assert not os.path.ismount(mnt)
        assert not alive(pid)
        assert os.listdir(mnt) == []


def test_kill_9_leaves_no_stuck_mount(sample: Path, file_store_url: str, tmp_path: Path):
    snapshot_id = push(str(sample), Repo.open(file_store_url)).snapshot_id
    mnt = tmp_path / "mnt"
    with mounted(mnt, file_store_url, tmp_path / "cache"):
        assert (mnt / snapshot_id / "run.sh").read_bytes()
        pid = status(mnt)["pid"]
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and os.path.ismount(mnt):
            time.sleep(0.1)
        assert not os.path.ismount(mnt), "a dead daemon left its mount behind"
    # And mounting again just works, with the cache intact.
    with mounted(mnt, file_store_url, tmp_path / "cache"):
        assert (mnt / snapshot_id / "run.sh").read_bytes() == (sample / "run.sh").read_bytes()


def test_refuses_mount_inside_store_or_cache(file_store_url: str, tmp_path: Path):
    Repo.open(file_store_url).ensure_config()
    store_root = file_store_url[len("file://") :]
    result = snapfs(
        "mount",
        os.path.join(store_root, "mnt"),
        "--store",
        file_store_url,
        "--cache",
        str(tmp_path / "cache"),
        check=False,
    )
    assert result.returncode == 2 and "overlaps the store" in result.stderr
    result = snapfs(
        "mount",
        str(tmp_path / "cache" / "mnt"),
        "--store",
        file_store_url,
        "--cache",
        str(tmp_path / "cache"),
        check=False,
    )
    assert result.returncode == 2 and "overlaps the cache" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_status_comes_from_the_control_socket_and_ls_l_asks_no_xattrs(
    sample: Path, file_store_url: str, tmp_path: Path
):
    snapshot_id = push(str(sample), Repo.open(file_store_url)).snapshot_id
    with mounted(tmp_path / "mnt", file_store_url, tmp_path / "cache") as mnt:
        socket_path = status(mnt)["control_socket"]
        assert socket_path and stat.S_ISSOCK(os.stat(socket_path).st_mode)
        assert stat.S_IMODE(os.stat(socket_path).st_mode) == 0o600  # no --allow-other
        # Anything but "status" is refused in one line, and an endless request
        # line is cut at 1 KiB rather than read on.
        for request in (b"rm -rf /\n", b"x" * 5000):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(10)
                sock.connect(socket_path)
                sock.sendall(request)
                reply = json.loads(sock.makefile("rb").readline())
            assert reply["error"].startswith("unknown request")
        entries = sum(len(d) + len(f) for _, d, f in os.walk(sample))
        listing = subprocess.run(["ls", "-lR", str(mnt / snapshot_id)], capture_output=True, check=True)
        assert all(os.fsencode(name) in listing.stdout for name in os.listdir(sample))
        with pytest.raises(OSError) as raised:
            os.getxattr(mnt / snapshot_id, "user.anything")
        assert raised.value.errno == errno.EOPNOTSUPP
        # One ENOSYS and the kernel answers every later getxattr itself.
        assert entries > 10 and status(mnt)["xattr_requests"] <= 2
    assert not os.path.exists(socket_path)


def test_status_falls_back_to_the_xattr_without_a_control_socket(
    file_store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("SNAPFS_RUNTIME_DIR", str(blocker / "run"))
    with mounted(tmp_path / "mnt", file_store_url, tmp_path / "cache") as mnt:
        counters = status(mnt)
        assert counters["control_socket"] is None and counters["pid"] > 0
        assert json.loads(os.getxattr(mnt, "user.snapfs.status"))["pid"] == counters["pid"]
    assert "cannot serve status on" in (tmp_path / "cache" / "mount.log").read_text()


def test_status_of_unmounted_dir_is_one_line_error(tmp_path: Path):
    result = snapfs("status", str(tmp_path), check=False)
    assert result.returncode == 9
    assert result.stderr.strip().splitlines() == [f"snapfs: error: {tmp_path} is not mounted"]


def test_names_are_symlinks_and_latest_follows_new_versions(tmp_path: Path, file_store_url: str):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("v1\n")
    id1 = snapfs(
        "push", str(src), "--store", file_store_url, "--name", "ds@1", "-q", "--no-git"
    ).stdout.strip()
    with mounted(tmp_path / "mnt", file_store_url, tmp_path / "cache") as mnt:
        assert os.readlink(mnt / "ds@1") == id1
        assert os.readlink(mnt / "ds@latest") == id1
        assert (mnt / "ds@1" / "a.txt").read_text() == "v1\n"
        assert {"ds@1"} <= set(os.listdir(mnt))
        (src / "a.txt").write_text("v2\n")
        id2 = snapfs(
            "push", str(src), "--store", file_store_url, "--name", "ds@2", "-q", "--no-git"
        ).stdout.strip()
        assert id2 != id1
        deadline = time.monotonic() + 10  # the root's entries expire after one second
        while time.monotonic() < deadline and os.readlink(mnt / "ds@latest") != id2:
            time.sleep(0.2)
        assert os.readlink(mnt / "ds@latest") == id2
        assert (mnt / "ds@latest" / "a.txt").read_text() == "v2\n"
        assert os.readlink(mnt / "ds@1") == id1  # names never move
        with pytest.raises(FileNotFoundError):
            os.readlink(mnt / "no-such-name")
