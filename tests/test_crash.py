"""Crashes, a full cache disk and concurrency: kill -9 at the worst moment, then check
that what is left is consistent and serves the right bytes.

- kill -9 of the daemon while it fetches and writes, and of a prewarm mid-write:
  the next start leaves no temp file behind and every cached object verifies;
- a mountpoint left stale by a dead daemon (its FUSE connection aborted through
  /sys/fs/fuse/connections/N/abort, N taken from *our own* mountpoint's device
  number, never anyone else's): ``snapfs mount`` recovers it;
- the cache on an 8 MiB tmpfs: the mount keeps serving, prewarm says the disk is full;
- two daemons on one cache, 32 readers on one cold file (one fetch per chunk),
  two overlapping pushes, a push during gc, kill -9 mid-push.

Every wait is bounded; readers are separate processes with a deadline.
"""

from __future__ import annotations

import ctypes
import errno
import glob
import hashlib
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from support.faultproxy import FaultProxy
from support.mounts import alive, fuse_missing, mounted, snapfs, status
from support.trees import file_digests
from test_faults import assert_nothing_dangles, cli, one_line_error, probe, probe_finish, probe_start

from snapfs.cache import DiskCache, ObjectSource
from snapfs.errors import CacheIndexError
from snapfs.hashing import hash_bytes
from snapfs.repo import Repo
from snapfs.snapshot import push

_fuse_reason = fuse_missing()
needs_fuse = pytest.mark.skipif(_fuse_reason is not None, reason=f"no FUSE: {_fuse_reason}")
pytestmark = pytest.mark.timeout(240)


# --- helpers ------------------------------------------------------------------------------


def make_data(root: Path, seed: int, *, large_mib: int = 8, small: int = 16) -> Path:
    rng = random.Random(seed)
    root.mkdir(parents=True)
    (root / "large.bin").write_bytes(rng.randbytes(large_mib << 20))
    (root / "small").mkdir()
    for i in range(small):
        (root / "small" / f"{i:03d}.dat").write_bytes(rng.randbytes(rng.randint(1000, 100_000)))
    return root


def temp_files(cache: Path) -> list[Path]:
    return sorted(cache.glob("objects/*/.tmp-*"))


def precreate_object_dirs(cache: Path) -> list[Path]:
    """Create objects/00..ff up front so inotify can watch every place a temp file appears."""
    dirs = [cache / "objects" / f"{i:02x}" for i in range(256)]
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
    return dirs


_IN_CREATE = 0x100
_libc = ctypes.CDLL(None, use_errno=True)


def kill_while_writing(pid: int, dirs: list[Path], timeout: float = 60.0) -> Path:
    """SIGKILL ``pid`` at a moment when one of its cache temp files exists.

    inotify reports each temp file as it is created; the process is frozen
    (SIGSTOP) at once and the file checked: if it is still there, the kill lands
    mid-write; if it was already renamed, the process resumes and we wait for
    the next. Returns the temp file the kill left behind."""
    fd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    assert fd >= 0, os.strerror(ctypes.get_errno())
    try:
        watches = {}
        for d in dirs:
            wd = _libc.inotify_add_watch(fd, os.fsencode(d), _IN_CREATE)
            assert wd >= 0, os.strerror(ctypes.get_errno())
            watches[wd] = d
        prefix = f".tmp-{pid}-".encode()
        deadline = time.monotonic() + timeout
        import select

        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.5)
            if not ready:
                if not alive(pid):
                    raise AssertionError(f"process {pid} ended before it wrote a temp file")
                continue
            try:
                buf = os.read(fd, 65536)
            except BlockingIOError:
                continue
            offset = 0
            while offset < len(buf):
                wd, _mask, _cookie, length = struct.unpack_from("iIII", buf, offset)
                name = buf[offset + 16 : offset + 16 + length].rstrip(b"\0")
                offset += 16 + length
                if not name.startswith(prefix):
                    continue
                os.kill(pid, signal.SIGSTOP)
                _wait_stopped(pid)
                path = watches[wd] / os.fsdecode(name)
                if path.exists():
                    os.kill(pid, signal.SIGKILL)
                    _wait_dead(pid)
                    return path
                os.kill(pid, signal.SIGCONT)
        raise AssertionError(f"no temp file of {pid} caught within {timeout}s")
    finally:
        os.close(fd)


def _wait_stopped(pid: int, timeout: float = 20.0) -> None:
    """Wait until every thread of ``pid`` has stopped. kill(SIGSTOP) returns before
    they all have: a writer thread can still rename its temp file meanwhile, and
    since cache files are no longer fsynced one by one that window is a few
    microseconds wide, so the file checked would be gone by the SIGKILL."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = []
        for task in glob.glob(f"/proc/{pid}/task/*/stat"):
            try:
                with open(task) as f:
                    states.append(f.read().rsplit(")", 1)[1].split()[0])
            except (OSError, IndexError):
                continue  # the thread is gone
        if all(state in ("T", "t", "Z", "X") for state in states):
            return
        time.sleep(0.001)
    raise AssertionError(f"process {pid} did not stop within {timeout}s of SIGSTOP")


def _wait_dead(pid: int, timeout: float = 20.0) -> None:
    """Wait until ``pid`` is gone or a zombie (never reaps it: Popen owners still can)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return
        time.sleep(0.02)
    raise AssertionError(f"process {pid} still alive {timeout}s after SIGKILL")


def wait_unmounted(mnt: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and os.path.ismount(mnt):
        time.sleep(0.05)
    assert not os.path.ismount(mnt), f"{mnt} still mounted"


@pytest.fixture
def s3_proxy(s3_env, s3_server, monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultProxy]:
    monkeypatch.setenv("SNAPFS_NO_PROGRESS", "1")
    with FaultProxy(s3_server.endpoint_url) as proxy:
        yield proxy


def cache_verify(cache: Path) -> dict:
    result = snapfs("cache", "verify", "--cache", str(cache), "--json")
    return json.loads(result.stdout)


# --- kill -9 -----------------------------------------------------------------------------------


@needs_fuse
@pytest.mark.fuse
@pytest.mark.s3
def test_kill_9_daemon_mid_fetch_and_write_then_restart_is_consistent(
    s3_store_url: str, s3_proxy: FaultProxy, tmp_path: Path
):
    src = make_data(tmp_path / "src", 1)
    snapshot_id = push(str(src), Repo.open(s3_store_url)).snapshot_id
    digests = file_digests(src)
    cache, mnt = tmp_path / "cache", tmp_path / "mnt"
    dirs = precreate_object_dirs(cache)
    endpoint = ["--endpoint-url", s3_proxy.endpoint_url]
    # Slow bodies: many fetches are in flight when the kill lands.
    s3_proxy.inject("trickle", method="GET", key="objects/|packs/", piece=256 << 10, delay=0.01)
    with mounted(mnt, s3_store_url, cache, *endpoint):
        pid = status(mnt)["pid"]
        root = mnt / snapshot_id
        reader = probe_start(
            [
                ("read", root / "large.bin"),
                *[("read", root / "small" / n) for n in sorted(os.listdir(src / "small"))],
            ]
        )
        try:
            torn = kill_while_writing(pid, dirs)
        finally:
            reader.kill()
            reader.communicate(timeout=30)
        wait_unmounted(mnt)  # auto_unmount: no stale mount after kill -9
        assert torn.exists(), "the kill left no temp file: nothing was tested"
        s3_proxy.clear()
        # Restart on the same cache: temp files of the dead daemon are gone at once,
        # and everything it cached verifies.
        with mounted(mnt, s3_store_url, cache, *endpoint) as again:
            assert temp_files(cache) == [], temp_files(cache)
            results = probe([("read", again / snapshot_id / os.fsdecode(rel)) for rel in sorted(digests)])
            assert [r.get("sha256") for r in results] == [digests[rel].hex() for rel in sorted(digests)]
    report = cache_verify(cache)
    assert report["bad"] == [] and report["checked"] > 0, report


@pytest.mark.s3
def test_kill_9_prewarm_mid_write_then_rerun_resumes(s3_store_url: str, s3_proxy: FaultProxy, tmp_path: Path):
    # Large chunks: a temp file lives while its bytes are written (no fsync per file
    # since syncs are batched), and a 1-4 MiB write is a window the kill can hit.
    src = make_data(tmp_path / "src", 2, large_mib=48)
    repo = Repo.open(s3_store_url)
    snapshot_id = push(str(src), repo).snapshot_id
    cache = tmp_path / "cache"
    dirs = precreate_object_dirs(cache)
    args = [
        snapshot_id,
        "--store",
        s3_store_url,
        "--cache",
        str(cache),
        "--endpoint-url",
        s3_proxy.endpoint_url,
    ]
    s3_proxy.inject("trickle", method="GET", key="objects/|packs/", piece=256 << 10, delay=0.01)
    proc = subprocess.Popen([sys.executable, "-m", "snapfs.cli.main", "prewarm", *args, "-q"])
    try:
        torn = kill_while_writing(proc.pid, dirs)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
    assert torn.exists() and proc.returncode == -signal.SIGKILL
    s3_proxy.clear()
    # What the killed prewarm cached: files the index vouches for. A file renamed
    # into place but not yet indexed is written again by design (an unindexed file
    # is never trusted), and with 32 fetch threads queued on LMDB's one writer,
    # several can be in that state at the kill.
    cached = DiskCache(str(cache))
    try:
        before = {d.name + p.name for d in dirs for p in d.iterdir() if not p.name.startswith(".tmp-")}
        vouched = {object_id for object_id in before if cached.indexed(object_id)}
    finally:
        cached.close()
    result = cli("prewarm", *args, "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["ok"] and summary["already_cached_objects"] >= len(vouched)
    assert temp_files(cache) == [], "the rerun must sweep the dead prewarm's temp files"
    report = cache_verify(cache)
    assert report["bad"] == [] and report["checked"] == summary["objects"]


def test_kill_9_push_leaves_no_marker_and_rerun_completes(tmp_path: Path, file_store_url: str, monkeypatch):
    src = make_data(tmp_path / "src", 3, large_mib=24, small=40)
    store_root = Path(file_store_url[len("file://") :])
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "snapfs.cli.main",
            "push",
            str(src),
            "--store",
            file_store_url,
            "--name",
            "ds@1",
        ]
        + ["--no-git", "-q", "--jobs", "2"]
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(list(store_root.glob("objects/*/*"))) < 5:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the push finished before the kill"
    repo = Repo.open(file_store_url)
    counts = assert_nothing_dangles(repo)
    assert counts == {"snapshots": 0, "records": 0, "names": 0}
    assert list(repo.store.list("locks/push-")), "the dead push's lock is still there"
    result = cli("push", str(src), "--store", file_store_url, "--name", "ds@1", "--no-git", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["present_objects"] > 0  # what the killed push uploaded is not sent again
    assert assert_nothing_dangles(repo)["names"] == 1
    # The dead push's lock goes stale; gc takes it away and runs.
    monkeypatch.setenv("SNAPFS_LOCK_STALE", "1")
    time.sleep(1.5)
    result = cli("gc", "--store", file_store_url, "--grace", "0")
    assert result.returncode == 0, result.stderr
    assert not list(repo.store.list("locks/"))
    dest = tmp_path / "dest"
    assert cli("pull", "ds@1", str(dest), "--store", file_store_url).returncode == 0
    assert file_digests(dest) == file_digests(src)


# --- stale mountpoints -------------------------------------------------------------------------


def _connection_of(mnt: Path) -> Path:
    """/sys/fs/fuse/connections/N of *this* mount: N is its device number."""
    conn = Path("/sys/fs/fuse/connections") / str(os.stat(mnt).st_dev)
    assert (conn / "abort").exists(), conn
    return conn


def _helper_of(mnt: Path, daemon_pid: int) -> int:
    """The daemon's own fusermount3 auto_unmount helper for ``mnt`` (its child)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            argv = (proc / "cmdline").read_bytes().split(b"\0")[:-1]
        except (OSError, IndexError, ValueError):
            continue
        if ppid == daemon_pid and argv and b"fusermount" in argv[0] and argv[-1] == os.fsencode(mnt):
            return int(proc.name)
    raise AssertionError(f"no auto_unmount helper of daemon {daemon_pid} for {mnt}")


@needs_fuse
@pytest.mark.fuse
def test_stale_mountpoint_is_recovered(tmp_path: Path, file_store_url: str):
    src = make_data(tmp_path / "src", 4, large_mib=1, small=2)
    snapshot_id = push(str(src), Repo.open(file_store_url)).snapshot_id
    mnt, cache = tmp_path / "mnt", tmp_path / "cache"
    with mounted(mnt, file_store_url, cache):
        # 1. Abort the connection: the daemon's loop ends and auto_unmount cleans up.
        pid = status(mnt)["pid"]
        (_connection_of(mnt) / "abort").write_text("1")
        _wait_dead(pid)
        wait_unmounted(mnt)
    with mounted(mnt, file_store_url, cache):
        # 2. A daemon that dies with no helper left to unmount (an older daemon, or
        # the helper killed too): the mountpoint is stale, "Transport endpoint is
        # not connected", until snapfs mount recovers it.
        pid = status(mnt)["pid"]
        helper = _helper_of(mnt, pid)
        conn = _connection_of(mnt)
        os.kill(pid, signal.SIGSTOP)  # it must not unmount on its way out
        os.kill(helper, signal.SIGKILL)
        _wait_dead(helper)
        (conn / "abort").write_text("1")
        os.kill(pid, signal.SIGKILL)
        _wait_dead(pid)
        time.sleep(1.2)  # the root's attributes stay cached for a second (vfs.ROOT_ATTR_TIMEOUT)
        with pytest.raises(OSError) as caught:
            os.stat(mnt)
        assert caught.value.errno == errno.ENOTCONN
        result = snapfs("status", str(mnt), check=False)
        assert result.returncode == 9 and "stale mount" in result.stderr
        recovered = snapfs("mount", str(mnt), "--store", file_store_url, "--cache", str(cache))
        assert "stale mount left by a dead daemon; unmounting it lazily" in recovered.stderr
        assert (mnt / snapshot_id / "large.bin").read_bytes() == (src / "large.bin").read_bytes()


# --- the cache disk is full ------------------------------------------------------------------


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "tiny"
    path.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(path)], capture_output=True
    )
    if result.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail(f"cannot mount a tmpfs: {result.stderr.decode()}")
        pytest.skip(f"cannot mount a tmpfs: {result.stderr.decode()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


@needs_fuse
@pytest.mark.fuse
def test_cache_disk_full_mount_keeps_serving_and_prewarm_says_so(
    tiny_disk: Path, tmp_path: Path, file_store_url: str
):
    src = make_data(tmp_path / "src", 5, large_mib=12, small=24)
    snapshot_id = push(str(src), Repo.open(file_store_url)).snapshot_id
    digests = file_digests(src)
    cache = tiny_disk / "cache"
    # A limit far above the disk: only the disk itself can say no.
    with mounted(
        tmp_path / "mnt",
        file_store_url,
        cache,
        "--cache-size",
        "1G",
        "--log-file",
        str(tmp_path / "mount.log"),
    ) as mnt:
        root = mnt / snapshot_id
        ops = [("read", root / os.fsdecode(rel)) for rel in sorted(digests)]
        first = probe(ops, timeout=120)
        assert [r.get("sha256") for r in first] == [digests[rel].hex() for rel in sorted(digests)], first
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        second = probe(ops, timeout=120)
        assert [r.get("sha256") for r in second] == [digests[rel].hex() for rel in sorted(digests)]
        counters = status(mnt)
        assert counters["cache_write_failures"] > 0, counters
        assert counters["verify_failures"] == 0 and counters["fetch_errors"] == 0, counters
        # A prewarm on the same full disk fails, saying why, while the mount serves on.
        result = cli(
            "prewarm", snapshot_id, "--store", file_store_url, "--cache", str(cache), "--cache-size", "1G"
        )
        assert result.returncode != 0
        assert "rerun to retry" in one_line_error(result)
        failed = [line for line in result.stderr.splitlines() if line.startswith("failed: ")]
        assert failed and "is full (no space left on device)" in failed[0], result.stderr
        assert probe([("read", root / "small" / "000.dat")])[0]["sha256"] == digests[b"small/000.dat"].hex()
        os.kill(counters["pid"], 0)
    log = (tmp_path / "mount.log").read_text()
    assert "is full" in log and "Traceback" not in log and "bug:" not in log, log[-3000:]
    assert temp_files(cache) == []


def fill_disk(path: Path) -> Path:
    """Write ``path`` until the disk says ENOSPC; returns it."""
    with open(path, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    return path


def test_full_disk_under_the_cache_index(tiny_disk: Path, file_store_url: str, caplog):
    """LMDB fails its commit when the disk is full. That must surface as one
    CacheIndexError that says so, never as a raw lmdb.Error: one escaped from the
    daemon's 5-second LRU flush and took a mount down (trio's nursery was left open)."""
    rng = random.Random(11)
    blobs = [rng.randbytes(40_000) for _ in range(12)]
    ids = [hash_bytes(b) for b in blobs]
    cache = DiskCache(str(tiny_disk / "cache"))
    try:
        assert all(cache.insert(oid, b) for oid, b in zip(ids, blobs, strict=True))
        # Index entries enough that re-dating them all needs pages the disk cannot give.
        many = [hash_bytes(n.to_bytes(4, "big")) for n in range(4000)]
        cache.index.add_many([(oid, 100) for oid in many])
        time.sleep(1.1)  # touches within the same second are skipped
        filler = fill_disk(tiny_disk / "filler")
        with pytest.raises(CacheIndexError, match="disk is full") as raised:
            cache.index.add_many([(hash_bytes(b"x" * n), n) for n in range(1, 2000)])
        assert raised.value.disk_full

        async def body() -> None:
            # Disk hits queue LRU touches; flushing them at exit hits the full disk.
            async with ObjectSource(Repo.open(file_store_url), cache) as source:
                for oid, b in zip(ids, blobs, strict=True):
                    assert await source.get(oid, expected_size=len(b)) == b
                assert source.counters.disk_hits == len(ids)
                for oid in many:
                    cache.touch(oid)

        caplog.set_level("WARNING", logger="snapfs")
        trio.run(body)
        assert any("last-access times are not being recorded" in r.getMessage() for r in caplog.records)
        # A write that cannot be cached is refused cleanly: no file, no index entry.
        extra = rng.randbytes(40_000)
        assert cache.insert(hash_bytes(extra), extra) is False
        assert not cache.has(hash_bytes(extra)) and cache.disk_full and temp_files(tiny_disk / "cache") == []
        filler.unlink()
        cache.index.add_many([(hash_bytes(extra), len(extra))])  # recovered once space is back
        assert cache.index.get(hash_bytes(extra)) is not None
    finally:
        cache.close()


# --- concurrency -------------------------------------------------------------------------------


@needs_fuse
@pytest.mark.fuse
def test_two_daemons_on_one_cache(tmp_path: Path, file_store_url: str):
    src = make_data(tmp_path / "src", 6, large_mib=6, small=30)
    snapshot_id = push(str(src), Repo.open(file_store_url)).snapshot_id
    digests = file_digests(src)
    cache = tmp_path / "cache"
    order = sorted(digests)
    with (
        mounted(tmp_path / "a", file_store_url, cache, "--log-file", str(tmp_path / "a.log")) as a,
        mounted(tmp_path / "b", file_store_url, cache, "--log-file", str(tmp_path / "b.log")) as b,
    ):
        # Both cold, both reading the same objects at once, in opposite orders.
        readers = []
        for root, names in ((a, order), (b, order[::-1]), (a, order[::-1]), (b, order)):
            ops = [("read", root / snapshot_id / os.fsdecode(rel)) for rel in names]
            readers.append((probe_start(ops), ops, names))
        for proc, ops, names in readers:
            results = probe_finish(proc, ops, timeout=120)
            assert [r.get("sha256") for r in results] == [digests[rel].hex() for rel in names]
        for mnt in (a, b):
            counters = status(mnt)
            assert counters["verify_failures"] == 0 and counters["fetch_errors"] == 0, counters
    report = cache_verify(cache)
    assert report["bad"] == [] and report["checked"] > len(digests)
    assert temp_files(cache) == []
    for log in ("a.log", "b.log"):
        text = (tmp_path / log).read_text()
        assert "Traceback" not in text and "bug:" not in text, text[-3000:]


_ROTATED = r"""
import hashlib, sys
path, offset = sys.argv[1], int(sys.argv[2])
digest = hashlib.sha256()
with open(path, "rb") as f:
    for start, stop in ((offset, None), (0, offset)):
        f.seek(start)
        left = None if stop is None else stop - start
        while left is None or left > 0:
            piece = f.read(1 << 20 if left is None else min(1 << 20, left))
            if not piece:
                break
            digest.update(piece)
            if left is not None:
                left -= len(piece)
print(digest.hexdigest())
"""


@needs_fuse
@pytest.mark.fuse
@pytest.mark.s3
@pytest.mark.slow
def test_32_readers_on_one_cold_large_file_fetch_each_chunk_once(
    s3_store_url: str, s3_proxy: FaultProxy, tmp_path: Path
):
    src = tmp_path / "src"
    src.mkdir()
    data = random.Random(8).randbytes(40 << 20)
    (src / "big.bin").write_bytes(data)
    repo = Repo.open(s3_store_url)
    snapshot_id = push(str(src), repo).snapshot_id
    chunks = repo.lookup_path(snapshot_id, "big.bin").chunks
    assert len(chunks) > 8
    with mounted(
        tmp_path / "mnt", s3_store_url, tmp_path / "cache", "--endpoint-url", s3_proxy.endpoint_url
    ) as mnt:
        path = mnt / snapshot_id / "big.bin"
        probe([("stat", path)])  # trees first: the count below is about chunks
        s3_proxy.reset_counters()
        # Slow bodies keep every fetch in flight long enough for the others to pile onto it.
        s3_proxy.inject("trickle", method="GET", key="objects/|packs/", piece=256 << 10, delay=0.005)
        offsets = [len(data) * i // 32 for i in range(32)]
        readers = [
            subprocess.Popen(
                [sys.executable, "-c", _ROTATED, str(path), str(offset)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for offset in offsets
        ]
        try:
            outputs = [proc.communicate(timeout=180) for proc in readers]
        finally:
            for proc in readers:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        for (out, err), offset, proc in zip(outputs, offsets, readers, strict=True):
            assert proc.returncode == 0, err
            assert out.strip() == hashlib.sha256(data[offset:] + data[:offset]).hexdigest()
        gets = Counter(
            r.path.rsplit("/", 2)[-2] + r.path.rsplit("/", 1)[-1]
            for r in s3_proxy.records
            if r.method == "GET"
        )
        chunk_ids = {chunk_id for chunk_id, _ in chunks}
        assert set(gets) == chunk_ids, "every chunk fetched, nothing else"
        assert max(gets.values()) == 1, {k[:12]: v for k, v in gets.items() if v > 1}
        counters = status(mnt)
        assert counters["fetched_objects"] >= len(chunk_ids) and counters["fetch_errors"] == 0
    print(
        f"\nFAULT-TABLE 32-readers: chunks={len(chunk_ids)}, gets={sum(gets.values())}, bytes_checked={32 * len(data)}"
    )


def test_two_overlapping_pushes_at_once(store_url: str, tmp_path: Path):
    base = make_data(tmp_path / "a", 9, large_mib=6, small=30)
    other = tmp_path / "b"
    shutil.copytree(base, other)
    (other / "small" / "000.dat").write_bytes(b"changed")
    (other / "extra.bin").write_bytes(os.urandom(300_000))
    runs = [
        subprocess.Popen(
            [sys.executable, "-m", "snapfs.cli.main", "push", str(path), "--store", store_url]
            + ["--name", f"ds@{name}", "--no-git", "-q"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, path in (("a", base), ("b", other))
    ]
    outs = [proc.communicate(timeout=120) for proc in runs]
    assert [proc.returncode for proc in runs] == [0, 0], outs
    repo = Repo.open(store_url)
    assert assert_nothing_dangles(repo) == {"snapshots": 2, "records": 2, "names": 2}
    for name, path in (("a", base), ("b", other)):
        dest = tmp_path / f"pulled-{name}"
        assert cli("pull", f"ds@{name}", str(dest), "--store", store_url).returncode == 0
        assert file_digests(dest) == file_digests(path)


def _wait_for_key(repo: Repo, prefix: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if list(repo.store.list(prefix)):
            return
        assert proc.poll() is None, f"finished before {prefix} was seen"
        time.sleep(0.02)
    raise AssertionError(f"no {prefix} within {timeout}s")


@pytest.mark.s3
@pytest.mark.slow
def test_push_during_gc_never_marks_a_hole(
    s3_store_url: str, s3_proxy: FaultProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Push a snapshot and forget it, so every object is unreachable and old enough for
    gc --grace 0; then run a re-push of the same data (which skips trees it finds
    present) and that gc at the same time, in both orders. The slow one goes through
    the fault proxy (trickled GETs for gc, hung PUT responses for the push) so the
    other one surely starts while it holds its lock. Either way the visible snapshot
    is complete and pulls exact bytes."""
    monkeypatch.setenv("SNAPFS_LOCK_POLL", "0.05")
    monkeypatch.setenv("SNAPFS_LOCK_WAIT", "120")
    src = make_data(tmp_path / "src", 10, large_mib=3, small=40)
    repo = Repo.open(s3_store_url)
    slow = ["--endpoint-url", s3_proxy.endpoint_url]
    assert cli("push", str(src), "--store", s3_store_url, "-q").returncode == 0
    claim = cli("id", str(src)).stdout.strip()
    outcomes = []
    for round_, first in enumerate(["gc", "push"]):
        forgot = cli("forget", claim, "--store", s3_store_url)
        assert forgot.returncode == 0, forgot.stderr
        claim = f"ds@{round_}"
        gc_cmd = [
            sys.executable,
            "-m",
            "snapfs.cli.main",
            "gc",
            "--store",
            s3_store_url,
            "--grace",
            "0",
            "-v",
        ]
        push_cmd = [sys.executable, "-m", "snapfs.cli.main", "push", str(src), "--store", s3_store_url]
        push_cmd += ["--name", claim, "--no-git", "-q"]
        s3_proxy.clear()
        if first == "gc":
            # Its deletions hang (the store acts, the answer is late): gc holds its lock for seconds.
            s3_proxy.inject("hang", method="DELETE", key="objects/", count=2, seconds=2.0, reach_store=True)
            gc = subprocess.Popen(
                [*gc_cmd, *slow], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
            )
            _wait_for_key(repo, "locks/gc", gc)
            pusher = subprocess.Popen(push_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        else:
            # Every object is present already: the push only asks (HEAD), so slow those answers.
            s3_proxy.inject("hang", method="HEAD", key="objects/", count=3, seconds=1.0, reach_store=True)
            pusher = subprocess.Popen(
                [*push_cmd, *slow], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
            )
            _wait_for_key(repo, "locks/push-", pusher)
            gc = subprocess.Popen(gc_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        _, gc_err = gc.communicate(timeout=180)
        _, push_err = pusher.communicate(timeout=180)
        assert gc.returncode == 0, gc_err
        assert pusher.returncode == 0, push_err
        waited = " and ".join(
            w
            for w, seen in (
                ("push waited for gc", "waiting for gc" in push_err),
                ("gc waited for push", "running push(es)" in gc_err),
            )
            if seen
        )
        assert waited, (first, gc_err, push_err)
        outcomes.append(waited)
        s3_proxy.clear()
        assert_nothing_dangles(repo)
        dest = tmp_path / f"pulled-{round_}"
        assert cli("pull", claim, str(dest), "--store", s3_store_url).returncode == 0
        assert file_digests(dest) == file_digests(src)
    print(f"\nFAULT-TABLE push-during-gc: rounds={len(outcomes)}, outcomes={outcomes}")
