"""The vfs and cache layers driven directly, without FUSE: fast and deterministic."""

from __future__ import annotations

import errno
import os
import random
import stat
import threading
import time
from pathlib import Path

import pytest
import trio
from support.trees import make_mixed_tree

from snapfs import format as fmt
from snapfs import linux
from snapfs.cache import DiskCache, ObjectSource
from snapfs.errors import CacheFullError, IntegrityError, NotFoundError, SnapfsError, StoreUnavailableError
from snapfs.hashing import hash_bytes
from snapfs.repo import Repo
from snapfs.snapshot import push
from snapfs.store import LocalStore
from snapfs.vfs import INDEX_MASK, ROOT_INODE, SnapshotFS, VfsError


class SlowStore(LocalStore):
    """A deliberately slow store: gets of chosen keys sleep first (a real
    implementation of our own Store interface, not a patched client)."""

    def __init__(self, root: str, delay: float) -> None:
        super().__init__(root)
        self.delay = delay
        self.slow_keys: set[str] = set()
        self.gets: list[str] = []

    def get(self, key: str, start: int = 0, length: int | None = None) -> bytes:
        self.gets.append(key)
        if key in self.slow_keys:
            time.sleep(self.delay)
        return super().get(key, start, length)


@pytest.fixture
def pushed(tmp_path: Path):
    src = make_mixed_tree(tmp_path / "src")
    store = SlowStore(str(tmp_path / "store"), delay=0)
    repo = Repo(store)
    snapshot_id = push(str(src), repo).snapshot_id
    return src, repo, store, snapshot_id, tmp_path


def run_fs(
    repo: Repo,
    cache_dir: Path,
    body,
    *,
    source_kwargs: dict | None = None,
    fs_kwargs: dict | None = None,
    **cache_kwargs,
):
    """``body(fs, source)`` on a fresh DiskCache, ObjectSource and SnapshotFS; its result."""

    async def main():
        cache = DiskCache(str(cache_dir), **cache_kwargs)
        try:
            async with ObjectSource(repo, cache, **(source_kwargs or {})) as source:
                fs = SnapshotFS(source, **(fs_kwargs or {}))
                return await body(fs, source)
        finally:
            cache.close()

    return trio.run(main)


async def resolve(fs: SnapshotFS, ino: int, path: bytes):
    attr = None
    for part in [p for p in path.split(b"/") if p]:
        attr = await fs.lookup(ino, part)
        ino = attr.ino
    return ino, attr


async def read_all(fs: SnapshotFS, ino: int, size: int, step: int = 131072) -> bytes:
    fh = await fs.open(ino, os.O_RDONLY)
    try:
        out = bytearray()
        offset = 0
        while offset < size:
            piece = await fs.read(fh, offset, step)
            assert piece, f"short read at {offset}"
            out += piece
            offset += len(piece)
        assert await fs.read(fh, size, step) == b""
        return bytes(out)
    finally:
        fs.release(fh)


async def read_name(fs: SnapshotFS, dir_ino: int, name: str) -> bytes:
    """The whole file ``name`` in directory ``dir_ino``."""
    attr = await fs.lookup(dir_ino, name.encode())
    return await read_all(fs, attr.ino, attr.size)


def test_tree_matches_source(pushed):
    src, repo, _store, snapshot_id, tmp = pushed

    async def body(fs: SnapshotFS, source: ObjectSource):
        root = await fs.lookup(ROOT_INODE, snapshot_id.encode())
        assert stat.S_ISDIR(root.mode)
        # Every regular file reads back byte for byte; attrs follow the source.
        for dirpath, dirnames, filenames in os.walk(os.fsencode(src)):
            rel_dir = os.path.relpath(dirpath, os.fsencode(src))
            rel_dir = b"" if rel_dir == b"." else rel_dir
            for name in filenames + dirnames:
                local = os.path.join(dirpath, name)
                ino, attr = await resolve(fs, root.ino, os.path.join(rel_dir, name))
                st = os.lstat(local)
                assert stat.S_IFMT(attr.mode) == stat.S_IFMT(st.st_mode), local
                if stat.S_ISLNK(st.st_mode):
                    assert await fs.readlink(ino) == os.readlink(local)
                elif stat.S_ISREG(st.st_mode):
                    assert attr.size == st.st_size
                    assert bool(attr.mode & 0o100) == bool(st.st_mode & 0o100)
                    assert attr.blocks == (st.st_size + 511) // 512
                    with open(local, "rb") as f:
                        assert await read_all(fs, ino, attr.size) == f.read(), local
                else:
                    subdirs = sum(1 for e in os.scandir(local) if e.is_dir(follow_symlinks=False))
                    assert attr.nlink == 2 + subdirs
        # readdir lists exactly the source's names, and each attr equals lookup's.
        listed = await fs.readdir(root.ino, 0)
        assert sorted(n for n, _, _ in listed) == sorted(os.listdir(os.fsencode(src)))
        for name, attr, _ in listed:
            assert (await fs.lookup(root.ino, name)).ino == attr.ino
        # The same inode on every path to it; getattr agrees with lookup.
        ino1, _ = await resolve(fs, root.ino, b"small files/img_003.jpg")
        ino2, _ = await resolve(fs, root.ino, b"small files/img_003.jpg")
        assert ino1 == ino2 and ino1 & INDEX_MASK
        assert (await fs.getattr(ino1)).size == os.path.getsize(src / "small files" / "img_003.jpg")

    run_fs(repo, tmp / "cache", body)


def test_random_ranges_read_exact_bytes(pushed):
    src, repo, _store, snapshot_id, tmp = pushed
    data = (src / "large.bin").read_bytes()
    rng = random.Random(5)

    async def body(fs, source):
        root = await fs.lookup(ROOT_INODE, snapshot_id.encode())
        ino, attr = await resolve(fs, root.ino, b"large.bin")
        fh = await fs.open(ino, os.O_RDONLY)
        for _ in range(200):
            offset = rng.randrange(0, len(data) + 10)
            size = rng.choice([1, 4096, 131072, 1 << 20, 3 << 20])
            assert await fs.read(fh, offset, size) == data[offset : offset + size]

    run_fs(repo, tmp / "cache", body)


def test_reads_by_inode_alone_keep_bounded_state(pushed):
    """The kernel's no_open mode: reads name only the inode, never an open handle."""
    src, repo, _store, snapshot_id, tmp = pushed
    names = [b"large.bin", b"medium.bin", b"run.sh"] + [b"small files/img_%03d.jpg" % i for i in range(5)]
    rng = random.Random(11)

    async def body(fs: SnapshotFS, source: ObjectSource):
        root = await fs.lookup(ROOT_INODE, snapshot_id.encode())
        inos = {}
        for name in names:
            ino, attr = await resolve(fs, root.ino, name)
            inos[name] = ino
            data = (src / os.fsdecode(name)).read_bytes()
            for _ in range(20):
                offset = rng.randrange(0, len(data) + 10)
                size = rng.choice([1, 4096, 131072, 1 << 20])
                piece = await fs.read_file(await fs.inode_file(ino), offset, size)
                assert piece == data[offset : offset + size], (name, offset, size)
        # At most 3 files' state is kept, the most recently read; no open handles.
        assert list(fs.inode_files) == [inos[n] for n in names[-3:]]
        assert fs.stats()["inode_files"] == 3 and fs.stats()["open_files"] == 0
        # An evicted file is read again as if new.
        assert (
            await fs.read_file(await fs.inode_file(inos[b"run.sh"]), 0, 100) == (src / "run.sh").read_bytes()
        )
        assert next(reversed(fs.inode_files)) == inos[b"run.sh"]
        # The chunk bound: large.bin alone lists more chunks than allowed, so it
        # stays only while it is the newest.
        large = await fs.inode_file(inos[b"large.bin"])
        assert len(large.chunks) > 4 and list(fs.inode_files) == [inos[b"large.bin"]]
        await fs.inode_file(inos[b"medium.bin"])
        assert list(fs.inode_files) == [inos[b"medium.bin"]]
        # The kernel forgetting an inode drops its state.
        fs.forget(inos[b"medium.bin"])
        assert not fs.inode_files and fs._inode_file_chunks == 0
        with pytest.raises(VfsError) as e:
            await fs.inode_file(root.ino)
        assert e.value.errno == errno.EISDIR

    run_fs(repo, tmp / "cache", body, fs_kwargs={"inode_files": 3, "inode_file_chunks": 4})


def test_errors_are_errnos(pushed):
    _src, repo, _store, snapshot_id, tmp = pushed

    async def body(fs, source):
        root = await fs.lookup(ROOT_INODE, snapshot_id.encode())
        with pytest.raises(VfsError) as e:
            await fs.lookup(root.ino, b"no-such-file")
        assert e.value.errno == errno.ENOENT
        with pytest.raises(VfsError) as e:
            await fs.lookup(ROOT_INODE, b"0" * 64)
        assert e.value.errno == errno.ENOENT
        ino, _ = await resolve(fs, root.ino, b"medium.bin")
        for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC):
            with pytest.raises(VfsError) as e:
                await fs.open(ino, flags)
            assert e.value.errno == errno.EROFS
        with pytest.raises(VfsError) as e:
            await fs.lookup(ino, b"x")
        assert e.value.errno == errno.ENOTDIR

    run_fs(repo, tmp / "cache", body)


def test_single_flight_one_fetch_for_many_readers(pushed):
    _src, repo, store, snapshot_id, tmp = pushed

    async def body(fs, source):
        root = await fs.lookup(ROOT_INODE, snapshot_id.encode())
        ino, attr = await resolve(fs, root.ino, b"medium.bin")
        await _settle(source)  # tree prefetches started by the lookups
        store.gets.clear()
        misses_before = source.counters.misses
        results = []

        async def reader():
            fh = await fs.open(ino, os.O_RDONLY)
            results.append(await fs.read(fh, 0, attr.size))

        async with trio.open_nursery() as nursery:
            for _ in range(32):
                nursery.start_soon(reader)
        assert len(set(results)) == 1 and len(results[0]) == attr.size
        await _settle(source)  # sibling prefetches count their misses before their GETs
        chunk_gets = [k for k in store.gets if k.startswith("objects/")]
        assert len(chunk_gets) == len(set(chunk_gets)), "a chunk was fetched twice"
        assert source.counters.misses - misses_before == len(set(chunk_gets)) >= 1

    run_fs(repo, tmp / "cache", body)


def test_slow_fetch_does_not_block_ls_or_cached_reads(pushed):
    _src, repo, store, snapshot_id, tmp = pushed

    async def body(fs, source):
        root = await fs.lookup(ROOT_INODE, snapshot_id.encode())
        small_ino, small = await resolve(fs, root.ino, b"run.sh")
        assert await read_all(fs, small_ino, small.size)  # now cached
        large_ino, large = await resolve(fs, root.ino, b"large.bin")
        fh = await fs.open(large_ino, os.O_RDONLY)
        chunk_id = fs.handle(fh).chunks[0][0]
        store.slow_keys.add(fmt.object_key(chunk_id))
        store.delay = 2.0
        timings = {}

        async def slow_reader():
            start = trio.current_time()
            await fs.read(fh, 0, 4096)
            timings["slow"] = trio.current_time() - start

        async def fast_work():
            await trio.sleep(0.1)  # let the slow fetch start first
            start = trio.current_time()
            for _ in range(50):
                await fs.readdir(root.ino, 0)
                await fs.lookup(root.ino, b"small files")
                assert await read_all(fs, small_ino, small.size)
            timings["fast"] = trio.current_time() - start

        async with trio.open_nursery() as nursery:
            nursery.start_soon(slow_reader)
            nursery.start_soon(fast_work)
        assert timings["slow"] >= 1.9
        assert timings["fast"] < 0.5, timings

    run_fs(repo, tmp / "cache", body)


def test_corrupt_object_fails_only_that_file(pushed):
    src, repo, store, snapshot_id, tmp = pushed

    async def body(fs, source):
        root = await fs.lookup(ROOT_INODE, snapshot_id.encode())
        ino, attr = await resolve(fs, root.ino, b"medium.bin")
        fh = await fs.open(ino, os.O_RDONLY)
        chunk_id = fs.handle(fh).chunks[0][0]
        path = Path(store.root) / fmt.object_key(chunk_id)
        data = bytearray(path.read_bytes())
        data[100] ^= 0xFF
        path.write_bytes(bytes(data))
        with pytest.raises(IntegrityError) as e:
            await fs.read(fh, 0, 4096)
        assert chunk_id in str(e.value)
        assert source.counters.verify_failures == 1
        # Nothing wrong was cached, and other files still read fine.
        assert not os.path.exists(source.cache.path(chunk_id))
        ok_ino, ok = await resolve(fs, root.ino, b"run.sh")
        assert await read_all(fs, ok_ino, ok.size) == (src / "run.sh").read_bytes()

    run_fs(repo, tmp / "cache", body)


def test_missing_object_is_an_error_not_bytes(pushed):
    _src, repo, store, snapshot_id, tmp = pushed

    async def body(fs, source):
        root = await fs.lookup(ROOT_INODE, snapshot_id.encode())
        ino, _ = await resolve(fs, root.ino, b"medium.bin")
        fh = await fs.open(ino, os.O_RDONLY)
        os.unlink(Path(store.root) / fmt.object_key(fs.handle(fh).chunks[0][0]))
        with pytest.raises(NotFoundError):
            await fs.read(fh, 0, 10)

    run_fs(repo, tmp / "cache", body)


def test_cache_serves_with_store_gone(pushed):
    src, repo, store, snapshot_id, tmp = pushed

    async def read_everything(fs, source):
        root = await fs.lookup(ROOT_INODE, snapshot_id.encode())
        ino, attr = await resolve(fs, root.ino, b"large.bin")
        return await read_all(fs, ino, attr.size)

    assert run_fs(repo, tmp / "cache", read_everything) == (src / "large.bin").read_bytes()
    os.rename(store.root, store.root + ".gone")
    # A new process-equivalent (fresh ObjectSource, empty memory) reads from disk only.
    assert run_fs(repo, tmp / "cache", read_everything) == (src / "large.bin").read_bytes()


def test_a_miss_the_index_rules_out_skips_the_disk(pushed):
    src, repo, store, snapshot_id, tmp = pushed
    data = (src / "medium.bin").read_bytes()
    chunk_id = repo.lookup_path(snapshot_id, "medium.bin").chunks[0][0]
    disk_reads: list[str] = []

    async def get_chunk(expect_store_get: bool) -> None:
        cache = DiskCache(str(tmp / "cache"))
        plain_read = cache.read
        cache.read = lambda object_id: disk_reads.append(object_id) or plain_read(object_id)
        store.gets.clear()
        disk_reads.clear()
        try:
            async with ObjectSource(repo, cache) as source:
                got = await source.get(chunk_id, "chunk")
                assert data.startswith(got) and got
        finally:
            cache.close()
        assert (fmt.object_key(chunk_id) in store.gets) is expect_store_get

    # Cold: the index has no entry, so the disk is not asked; the store is.
    trio.run(get_chunk, True)
    assert disk_reads == []
    # Cached and indexed: the disk is asked and answers; the store is not.
    trio.run(get_chunk, False)
    assert disk_reads == [chunk_id]
    # A cached file whose index entry was lost (say, in a crash) is fetched
    # once more, and caching it again restores the entry.
    cache = DiskCache(str(tmp / "cache"))
    cache.index.remove_many([chunk_id])
    assert os.path.exists(cache.path(chunk_id)) and not cache.index.contains(chunk_id)
    cache.close()
    trio.run(get_chunk, True)
    assert disk_reads == []
    cache = DiskCache(str(tmp / "cache"))
    assert cache.index.contains(chunk_id)
    cache.close()


def test_eviction_keeps_cache_under_limit(tmp_path: Path):
    cache = DiskCache(str(tmp_path / "cache"), max_bytes=10 << 20, fsync=False)
    try:
        blobs = [random.Random(i).randbytes(1 << 20) for i in range(30)]
        from snapfs.hashing import hash_bytes

        ids = [hash_bytes(b) for b in blobs]
        for object_id, blob in zip(ids, blobs, strict=True):
            assert cache.insert(object_id, blob)
            total, _pinned, _n = cache.index.totals()
            assert total <= 10 << 20
        on_disk = sum(os.path.getsize(cache.path(i)) for i in ids if cache.has(i))
        assert on_disk == cache.index.totals()[0]
        assert cache.has(ids[-1]) and not cache.has(ids[0])  # LRU: oldest went first
        with pytest.raises(IntegrityError):
            cache.insert(ids[0], blobs[1])
    finally:
        cache.close()


def test_pins_survive_eviction_and_bound_the_cache(tmp_path: Path):
    from snapfs.hashing import hash_bytes

    cache = DiskCache(str(tmp_path / "cache"), max_bytes=8 << 20, fsync=False)
    try:
        pinned = [random.Random(100 + i).randbytes(1 << 20) for i in range(6)]
        for blob in pinned:
            cache.insert(hash_bytes(blob), blob, pin="snap-a")
        for i in range(10):
            blob = random.Random(i).randbytes(1 << 20)
            cache.insert(hash_bytes(blob), blob)
        assert all(cache.has(hash_bytes(b)) for b in pinned)
        more = [random.Random(200 + i).randbytes(1 << 20) for i in range(3)]
        with pytest.raises(CacheFullError):
            for blob in more:
                cache.insert(hash_bytes(blob), blob, pin="snap-b")
        assert cache.index.unpin("snap-a") == 6
        cache.evict(8 << 20)
        assert not any(cache.has(hash_bytes(b)) for b in pinned)
    finally:
        cache.close()


def test_temp_files_are_swept(tmp_path: Path):
    cache = DiskCache(str(tmp_path / "cache"))
    try:
        stale = Path(cache.objects_dir) / "ab" / ".tmp-123-456-abcdef"
        stale.parent.mkdir(parents=True, exist_ok=True)
        stale.write_bytes(b"torn")
        old = time.time() - 3600
        os.utime(stale, (old, old))
        fresh = stale.with_name(f".tmp-{os.getppid()}-1-fresh")  # its writer is alive
        fresh.write_bytes(b"being written by another process")
        assert cache.sweep_temp() == 1
        assert not stale.exists() and fresh.exists()
    finally:
        cache.close()


def test_tree_lru_is_bounded(pushed):
    _src, repo, _store, snapshot_id, tmp = pushed

    async def body(fs, source):
        fs.tree_cache_entries = 20
        root = await fs.lookup(ROOT_INODE, snapshot_id.encode())
        ino = root.ino
        for level in range(12):
            ino = (await fs.lookup(ino, f"d{level}".encode())).ino
        await fs.readdir(ino, 0)
        assert fs._tree_entries <= 20 or len(fs.trees) == 1
        # Evicted trees come back transparently.
        assert (await fs.lookup(root.ino, b"small files")).ino

    run_fs(repo, tmp / "cache", body)


def test_hostile_tree_gives_error_not_crash(tmp_path: Path):
    """A tree object whose bytes hash to its key but whose content is hostile."""
    store = LocalStore(str(tmp_path / "store"))
    repo = Repo(store)
    bad = fmt.TREE_MAGIC + bytes([1]) + (1).to_bytes(4, "big") + b"f\x00" + (2).to_bytes(2, "big") + b".."
    from snapfs.hashing import hash_bytes

    tree_id = hash_bytes(bad)
    repo.put_object(bad, tree_id)

    async def body(fs, source):
        with pytest.raises(SnapfsError):
            await fs.lookup(ROOT_INODE, tree_id.encode())

    run_fs(repo, tmp_path / "cache", body)


def _small_files_dir(root: Path, count: int) -> Path:
    rng = random.Random(7)
    d = root / "src" / "d"
    d.mkdir(parents=True)
    (d / "a-subdir").mkdir()
    (d / "b-link").symlink_to("f000")
    for i in range(count):
        (d / f"f{i:03d}").write_bytes(rng.randbytes(10_000 + i))
    return root / "src"


def _pushed_small_files(tmp_path: Path, delay: float):
    """40 small files in d/ pushed to a SlowStore: (src, store, repo, snapshot_id, file names)."""
    src = _small_files_dir(tmp_path, 40)
    store = SlowStore(str(tmp_path / "store"), delay=delay)
    repo = Repo(store)
    snapshot_id = push(str(src), repo).snapshot_id
    names = sorted(p.name for p in (src / "d").iterdir() if p.is_file() and not p.is_symlink())
    return src, store, repo, snapshot_id, names


async def _settle(source: ObjectSource) -> None:
    """Wait for background fetches to finish."""
    with trio.fail_after(10):
        while source._flights:
            await trio.sleep(0.005)


def test_cold_small_read_prefetches_its_siblings(tmp_path: Path):
    src, store, repo, snapshot_id, names = _pushed_small_files(tmp_path, delay=0)

    def file_gets(before: int) -> int:
        return sum(1 for k in store.gets[before:] if k.startswith("objects/"))

    def cold(sibling_files: int, cache_dir: Path):
        async def body(fs, source):
            root = await fs.lookup(ROOT_INODE, snapshot_id.encode())
            d = await fs.lookup(root.ino, b"d")
            await fs.lookup(d.ino, names[5].encode())  # the directory's tree is fetched here
            before = len(store.gets)
            assert await read_name(fs, d.ino, names[5]) == (src / "d" / names[5]).read_bytes()
            await _settle(source)
            first = file_gets(before)
            before = len(store.gets)
            # The files after it in the directory are now local: no store reads.
            for name in names[6 : 6 + sibling_files]:
                assert await read_name(fs, d.ino, name) == (src / "d" / name).read_bytes()
            return first, file_gets(before), source.counters.readahead_objects

        return run_fs(repo, cache_dir, body, fs_kwargs={"sibling_files": sibling_files, "tree_prefetch": 0})

    # One cold read fetches the file and the next 8 small files; reading those costs no GET.
    assert cold(8, tmp_path / "cache") == (9, 0, 8)
    # Off: one GET per file.
    assert cold(0, tmp_path / "cache-off") == (1, 0, 0)

    async def warm(fs, source):
        root = await fs.lookup(ROOT_INODE, snapshot_id.encode())
        d = await fs.lookup(root.ino, b"d")
        await read_name(fs, d.ino, names[5])
        await _settle(source)
        return source.counters.readahead_objects

    # A read served by the disk cache is not a cold read: it prefetches nothing.
    assert run_fs(repo, tmp_path / "cache", warm, fs_kwargs={"sibling_files": 8, "tree_prefetch": 0}) == 0

    async def some_cached(fs, source):
        root = await fs.lookup(ROOT_INODE, snapshot_id.encode())
        d = await fs.lookup(root.ino, b"d")
        for name in names[7:9]:
            await read_name(fs, d.ino, name)

    run_fs(repo, tmp_path / "cache-some", some_cached, fs_kwargs={"sibling_files": 0, "tree_prefetch": 0})

    async def cold_beside_cached(fs, source):
        root = await fs.lookup(ROOT_INODE, snapshot_id.encode())
        d = await fs.lookup(root.ino, b"d")
        await fs.lookup(d.ino, names[5].encode())  # the trees come from the disk cache here
        trees_read = source.counters.disk_hits
        await read_name(fs, d.ino, names[5])
        await _settle(source)
        for name in names[6:14]:
            assert await read_name(fs, d.ino, name) == (src / "d" / name).read_bytes()
        return source.counters.readahead_objects, source.counters.disk_hits - trees_read

    # Siblings already on disk are left there (not read into memory on a guess):
    # 6 of the next 8 are prefetched, and the 2 cached ones are read from disk once.
    assert run_fs(
        repo, tmp_path / "cache-some", cold_beside_cached, fs_kwargs={"sibling_files": 8, "tree_prefetch": 0}
    ) == (6, 2)


def test_no_sibling_prefetch_while_another_read_waits(tmp_path: Path):
    src, store, repo, snapshot_id, names = _pushed_small_files(tmp_path, delay=1.0)
    # A file of one chunk: its chunk is the file's bytes.
    store.slow_keys.add(fmt.object_key(hash_bytes((src / "d" / names[0]).read_bytes())))

    async def body(fs, source):
        root = await fs.lookup(ROOT_INODE, snapshot_id.encode())
        d = await fs.lookup(root.ino, b"d")
        for name in names[:6]:
            await fs.lookup(d.ino, name.encode())
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_name, fs, d.ino, names[0])  # waits 1 s on the store
            await trio.sleep(0.1)
            assert source.waiting_reads == 1
            # A cold read meanwhile: its round trip is hidden by the other reader's.
            assert await read_name(fs, d.ino, names[5]) == (src / "d" / names[5]).read_bytes()
            during = source.counters.readahead_objects
            # The slow read, done with no other read waiting, prefetches the next
            # 8 files but the cached names[5]: 7.
        first = source.counters.readahead_objects
        # Alone, a cold read prefetches its 8 siblings.
        await read_name(fs, d.ino, names[20])
        return during, first, source.counters.readahead_objects - first

    result = run_fs(repo, tmp_path / "cache", body, fs_kwargs={"sibling_files": 8, "tree_prefetch": 0})
    assert result == (0, 7, 8)


def test_slow_store_keeps_sibling_prefetch_beside_other_readers(tmp_path: Path):
    src, store, repo, snapshot_id, names = _pushed_small_files(tmp_path, delay=0.05)
    for name in names:
        store.slow_keys.add(fmt.object_key(hash_bytes((src / "d" / name).read_bytes())))

    async def body(fs, source):
        root = await fs.lookup(ROOT_INODE, snapshot_id.encode())
        d = await fs.lookup(root.ino, b"d")
        for name in names:
            await fs.lookup(d.ino, name.encode())
        # One reader first: its cold reads and their prefetches (10 fetches of
        # 50 ms) teach the average what this store costs.
        for name in (names[0], names[10]):
            await read_name(fs, d.ino, name)
            await _settle(source)
        latency, before = source.small_fetch_seconds, source.counters.readahead_objects
        # Then two readers whose fetches land together: the first sees the other
        # waiting, yet 50 ms a file is more than readers alone can hide, so
        # both cold reads prefetch their 4 siblings.
        async with trio.open_nursery() as nursery:
            for name in (names[20], names[30]):
                nursery.start_soon(read_name, fs, d.ino, name)
        await _settle(source)
        return latency, source.counters.readahead_objects - before

    fs_kwargs = {"sibling_files": 4, "tree_prefetch": 0}
    latency, prefetched = run_fs(repo, tmp_path / "cache", body, fs_kwargs=fs_kwargs)
    assert latency > 0.02 and prefetched == 8


def test_readahead_follows_each_sequential_reader_of_a_file(tmp_path: Path):
    src = tmp_path / "src"
    src.mkdir()
    data = random.Random(3).randbytes(24 << 20)
    (src / "big.bin").write_bytes(data)
    store = SlowStore(str(tmp_path / "store"), delay=0)
    repo = Repo(store)
    snapshot_id = push(str(src), repo).snapshot_id

    async def body(fs: SnapshotFS, source: ObjectSource):
        root = await fs.lookup(ROOT_INODE, snapshot_id.encode())
        ino, _attr = await resolve(fs, root.ino, b"big.bin")
        handle = await fs.inode_file(ino)  # one state for every reader, as in no_open mode
        n = len(handle.chunks)
        assert n >= 16
        keys = [fmt.object_key(chunk_id) for chunk_id, _ in handle.chunks]
        # A lone read in the middle is not sequential: nothing is read ahead.
        await fs.read_file(handle, handle.offsets[3] + 5, 4096)
        await _settle(source)
        assert source.counters.readahead_objects == 0
        # Two readers, interleaved: one from the start, one from the middle.
        mid = n // 2
        pos = [0, handle.offsets[mid]]
        for _ in range(3):
            for r in (0, 1):
                piece = await fs.read_file(handle, pos[r], 65536)
                assert piece == data[pos[r] : pos[r] + 65536]
                pos[r] += len(piece)
        await _settle(source)
        assert pos[1] < handle.offsets[mid + 1]  # the second reader is still in its first chunk
        fetched = set(store.gets)
        # Each reader has chunks ahead of it fetched, though neither read them.
        assert keys[1] in fetched and keys[2] in fetched
        assert keys[mid + 1] in fetched and keys[mid + 2] in fetched

    run_fs(repo, tmp_path / "cache", body, fs_kwargs={"sibling_files": 0, "tree_prefetch": 0})


async def _stall_cache_writes(source: ObjectSource) -> threading.Event:
    """Occupy every cache-write thread until the returned event is set."""
    gate = threading.Event()
    busy = threading.Semaphore(0)

    def hold() -> None:
        busy.release()
        gate.wait(30)

    assert source._nursery is not None
    for _ in range(source.write_threads.size):
        source._nursery.start_soon(source.write_threads.run, hold)
    for _ in range(source.write_threads.size):
        while not busy.acquire(blocking=False):
            await trio.sleep(0.001)
    return gate


def test_object_waiting_for_its_cache_write_is_not_fetched_again(pushed):
    src, repo, store, snapshot_id, tmp = pushed

    async def body(fs, source):
        root = await fs.lookup(ROOT_INODE, snapshot_id.encode())
        ino, attr = await resolve(fs, root.ino, b"run.sh")
        gate = await _stall_cache_writes(source)  # hold the cache writes back
        before = len(store.gets)
        first = await read_all(fs, ino, attr.size)
        second = await read_all(fs, ino, attr.size)
        gets = [k for k in store.gets[before:] if k.startswith("objects/")]
        # Still unwritten: the second read was served from the write-back queue.
        assert not os.path.exists(source.cache.path(hash_bytes(first)))
        gate.set()
        return first, second, gets

    first, second, gets = run_fs(
        repo,
        tmp / "cache",
        body,
        source_kwargs={"memory_bytes": 0},
        fs_kwargs={"sibling_files": 0, "tree_prefetch": 0},
    )
    assert first == second == (src / "run.sh").read_bytes()
    assert len(gets) == 1, gets


def test_the_cache_write_backlog_is_bounded(tmp_path: Path):
    """With the cache disk stalled, fetched bytes queue for writing only up to the
    backlog bound: then prefetches stop and a reader's miss waits for the disk,
    instead of the daemon holding every file it has read in memory."""
    src, store, repo, snapshot_id, names = _pushed_small_files(tmp_path, delay=0)
    budget = 50_000  # about five of these files

    async def body(fs, source):
        source.write_backlog_bytes = budget
        root = await fs.lookup(ROOT_INODE, snapshot_id.encode())
        d = await fs.lookup(root.ino, b"d")
        gate = await _stall_cache_writes(source)  # the cache disk stalls
        served = []
        peak = 0

        async def reader():
            nonlocal peak
            for name in names:
                served.append(await read_name(fs, d.ino, name) == (src / "d" / name).read_bytes())
                peak = max(peak, source.write_backlog)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await trio.sleep(0.5)
            stalled = (len(served), source.write_backlog, source.counters.backlog_waits)
            stalled_prefetches = source.counters.readahead_objects
            gate.set()  # the disk catches up: the reader goes on
        await _settle(source)
        while source.write_backlog:
            await trio.sleep(0.01)
        cached = 0
        for name in names:
            cached += all(os.path.exists(source.cache.path(c)) for c, _ in await chunks_of(fs, d, name))
        return stalled, stalled_prefetches, served, peak, cached

    async def chunks_of(fs, d, name):
        entry = await fs.lookup(d.ino, name.encode())
        fh = await fs.open(entry.ino, os.O_RDONLY)
        try:
            return fs.handle(fh).chunks
        finally:
            fs.release(fh)

    (count, backlog, waits), prefetches, served, peak, cached = run_fs(
        repo, tmp_path / "cache", body, fs_kwargs={"sibling_files": 8, "tree_prefetch": 0}
    )
    # Stalled: a few files read, the backlog at its bound (plus the one object that
    # crossed it), a miss parked, and no more prefetches than the bound admitted.
    assert 0 < count < len(names), count
    assert budget <= backlog < budget + 11_000, backlog
    assert waits >= 1
    assert prefetches < 10, prefetches
    # Then every file arrives whole and everything read is written to the cache.
    assert served == [True] * len(names)
    assert peak < budget + 11_000, peak
    assert cached == len(names)


def test_oversized_object_is_refused_after_reading_its_length_plus_one(pushed):
    """A store that answers a chunk's key with far more bytes than the tree
    promises costs the reader that length plus one byte, then an error."""
    src, repo, store, snapshot_id, tmp = pushed
    data = (src / "run.sh").read_bytes()
    key = fmt.object_key(hash_bytes(data))
    (tmp / "store" / key).write_bytes(b"\0" * (16 << 20))
    lengths: list[int | None] = []
    plain_get = store.get

    def recording_get(k: str, start: int = 0, length: int | None = None) -> bytes:
        if k == key:
            lengths.append(length)
        return plain_get(k, start, length)

    store.get = recording_get  # type: ignore[method-assign]

    async def body(fs, source):
        root = await fs.lookup(ROOT_INODE, snapshot_id.encode())
        ino, attr = await resolve(fs, root.ino, b"run.sh")
        with pytest.raises(IntegrityError, match="larger than the 18 bytes expected"):
            await read_all(fs, ino, attr.size)
        return source.counters.verify_failures

    assert len(data) == 18
    assert run_fs(repo, tmp / "cache", body) >= 1
    assert lengths == [len(data) + 1]
    with pytest.raises(IntegrityError, match="larger than"):
        repo.get_chunk(hash_bytes(data), len(data))
    assert lengths[-1] == len(data) + 1


class DownStore(SlowStore):
    """A store that can go down: while ``down``, every get takes ``delay`` seconds
    (the retries a real client spends) and then fails as unavailable."""

    def __init__(self, root: str) -> None:
        super().__init__(root, delay=0)
        self.down = False
        self.down_delay = 0.0

    def get(self, key: str, start: int = 0, length: int | None = None) -> bytes:
        if self.down:
            self.gets.append(key)
            time.sleep(self.down_delay)
            raise StoreUnavailableError(f"{key}: cannot read from {self.url}: connection timed out")
        return super().get(key, start, length)


def _down_store_snapshot(tmp_path: Path) -> tuple[Path, DownStore, Repo, str, list[str]]:
    """12 small files in d/, pushed to a DownStore: (src, store, repo, snapshot ID, file names)."""
    src = _small_files_dir(tmp_path, 12)
    store = DownStore(str(tmp_path / "store"))
    repo = Repo(store)
    snapshot_id = push(str(src), repo).snapshot_id
    names = sorted(p.name for p in (src / "d").iterdir() if p.is_file() and not p.is_symlink())
    return src, store, repo, snapshot_id, names


def test_store_outage_is_remembered_then_probed(tmp_path: Path):
    src, store, repo, snapshot_id, names = _down_store_snapshot(tmp_path)

    async def timed_failure(fs, dir_ino: int, name: str) -> tuple[float, str]:
        started = time.monotonic()
        with pytest.raises(StoreUnavailableError) as caught:
            await read_name(fs, dir_ino, name)
        return time.monotonic() - started, str(caught.value)

    async def body(fs, source):
        root = await fs.lookup(ROOT_INODE, snapshot_id.encode())
        d = await fs.lookup(root.ino, b"d")
        assert await read_name(fs, d.ino, names[0]) == (src / "d" / names[0]).read_bytes()
        store.down, store.down_delay = True, 0.2

        # Each of the first three failures pays the store's full cost...
        for name in names[1:4]:
            seconds, _ = await timed_failure(fs, d.ino, name)
            assert seconds >= 0.2
        assert source.store_unavailable_for > 0
        # ...then misses fail at once, without asking the store, and say why.
        gets = len(store.gets)
        seconds, message = await timed_failure(fs, d.ino, names[4])
        assert seconds < 0.1 and len(store.gets) == gets
        assert "unavailable for" in message and "connection timed out" in message, message
        assert source.counters.fast_failures == 1
        # Cached objects are served as ever.
        assert await read_name(fs, d.ino, names[0]) == (src / "d" / names[0]).read_bytes()

        # After the hold-off one miss probes; it fails, and the hold-off doubles.
        await trio.sleep(0.55)
        seconds, _ = await timed_failure(fs, d.ino, names[5])
        assert seconds >= 0.2 and len(store.gets) == gets + 1
        await trio.sleep(0.55)  # still inside the doubled hold-off (1 s)
        seconds, _ = await timed_failure(fs, d.ino, names[6])
        assert seconds < 0.1 and len(store.gets) == gets + 1

        # The store comes back: the next probe reads, and the outage is over.
        store.down = False
        await trio.sleep(0.5)
        assert await read_name(fs, d.ino, names[6]) == (src / "d" / names[6]).read_bytes()
        assert source.store_unavailable_for == 0
        for name in names[7:]:
            assert await read_name(fs, d.ino, name) == (src / "d" / name).read_bytes()
        assert source.counters.fast_failures == 2

    run_fs(
        repo,
        tmp_path / "cache",
        body,
        source_kwargs={"outage_holdoff": 0.5},
        fs_kwargs={"sibling_files": 0, "tree_prefetch": 0},
    )


def test_a_flaky_store_is_not_an_outage(tmp_path: Path):
    """Failures with answers between them never make other misses fail at once."""
    src, store, repo, snapshot_id, names = _down_store_snapshot(tmp_path)

    async def body(fs, source):
        root = await fs.lookup(ROOT_INODE, snapshot_id.encode())
        d = await fs.lookup(root.ino, b"d")
        for i, name in enumerate(names):
            store.down = i % 3 == 2  # two answers, one failure, ...
            attr = await fs.lookup(d.ino, name.encode())
            if store.down:
                with pytest.raises(StoreUnavailableError):
                    await read_all(fs, attr.ino, attr.size)
            else:
                assert await read_all(fs, attr.ino, attr.size) == (src / "d" / name).read_bytes()
        assert source.counters.fast_failures == 0 and source.store_unavailable_for == 0

    run_fs(repo, tmp_path / "cache", body, fs_kwargs={"sibling_files": 0})


def test_a_walk_meets_prefetched_trees(tmp_path: Path):
    """find/os.walk: after the first directories, each next directory's tree is
    already fetched when the walk gets there; with prefetch off, each costs a GET."""
    src = tmp_path / "src"
    for top in range(3):
        for sub in range(30):
            d = src / f"t{top}" / f"s{sub:02d}"
            d.mkdir(parents=True)
            (d / "f").write_bytes(f"{top}-{sub}".encode())  # distinct trees: no dedup
    store = SlowStore(str(tmp_path / "store"), delay=0)
    repo = Repo(store)
    snapshot_id = push(str(src), repo).snapshot_id

    def object_gets() -> int:
        return sum(1 for key in store.gets if key.startswith("objects/"))

    def walk(tree_prefetch: int, cache_dir: Path) -> tuple[list[int], int, list[str]]:
        start = object_gets()

        async def body(fs, source):
            waited: list[int] = []  # per directory: tree GETs made while visiting it
            seen: list[str] = []
            root = await fs.lookup(ROOT_INODE, snapshot_id.encode())
            stack = [(root.ino, "")]
            while stack:
                ino, path = stack.pop()
                await _settle(source)
                before = object_gets()
                rows = await fs.readdir(ino, 0)
                waited.append(object_gets() - before)
                seen.append(path)
                for name, attr, _next in reversed(rows):
                    if stat.S_ISDIR(attr.mode):
                        stack.append((attr.ino, f"{path}/{name.decode()}"))
            await _settle(source)
            return waited, object_gets() - start, seen

        return run_fs(repo, cache_dir, body, fs_kwargs={"sibling_files": 0, "tree_prefetch": tree_prefetch})

    dirs = 1 + 3 + 3 * 30
    waited, gets, seen = walk(16, tmp_path / "cache-on")
    assert len(seen) == dirs and seen[1] == "/t0" and seen[2] == "/t0/s00"
    # Every tree is fetched once (the root's by the lookup), and no directory
    # visit waits for one: each was prefetched by its parent or a sibling.
    assert gets == dirs, gets
    assert waited == [0] * dirs, waited
    waited_off, gets_off, seen_off = walk(0, tmp_path / "cache-off")
    assert seen_off == seen and gets_off == dirs
    assert waited_off == [0] + [1] * (dirs - 1)


# --- durability: cache files are synced in batches, and a reboot drops what was not ---

needs_deferred_sync = pytest.mark.skipif(
    not linux.can_syncfs() or linux.boot_id() is None,
    reason="deferred sync needs Linux's boot_id and syncfs(2)",
)


def _blobs(n: int, seed: int = 0) -> list[tuple[str, bytes]]:
    blobs = [random.Random(seed + i).randbytes(100_000) for i in range(n)]
    return [(hash_bytes(b), b) for b in blobs]


def _pretend_written_in_another_boot(directory: Path) -> None:
    cache = DiskCache(str(directory))
    with cache.index.env.begin(write=True) as txn:
        txn.put(b"boot", b"a-boot-before-this-one", db=cache.index.meta)
    cache.index.close()  # not cache.close(): that would sync, as a clean shutdown does


@needs_deferred_sync
def test_cache_files_are_synced_in_batches_and_then_unmarked(tmp_path: Path):
    cache = DiskCache(str(tmp_path / "cache"))
    try:
        assert cache.defers_sync
        objects = _blobs(3)
        for object_id, blob in objects:
            assert cache.insert(object_id, blob, verified=True)
        assert sorted(cache.index.unsynced_ids()) == sorted(oid for oid, _ in objects)
        assert cache.sync_pending() == 3
        assert cache.index.unsynced_ids() == []
        assert cache.sync_pending() == 0
    finally:
        cache.close()


@needs_deferred_sync
def test_a_reboot_drops_the_objects_never_synced_and_keeps_the_rest(tmp_path: Path):
    directory = tmp_path / "cache"
    (synced_id, synced), (lost_id, lost) = _blobs(2)
    cache = DiskCache(str(directory))
    assert cache.insert(synced_id, synced, pin="p")
    cache.sync_pending()
    assert cache.insert(lost_id, lost, pin="p")
    # A power loss here: the process never closes the cache (close() would sync).
    cache.index.close()

    # Same boot (the daemon was killed, the kernel lives on): nothing is dropped.
    cache = DiskCache(str(directory))
    assert cache.is_cached(synced_id) and cache.is_cached(lost_id)
    cache.index.close()

    _pretend_written_in_another_boot(directory)
    cache = DiskCache(str(directory))
    try:
        assert cache.is_cached(synced_id)
        assert not cache.index.contains(lost_id) and not cache.has(lost_id)
        total, pinned, count = cache.index.totals()
        assert (total, pinned, count) == (len(synced), len(synced), 1)
        assert cache.index.unsynced_ids() == []
    finally:
        cache.close()


@needs_deferred_sync
def test_a_clean_close_syncs_so_a_reboot_drops_nothing(tmp_path: Path):
    directory = tmp_path / "cache"
    cache = DiskCache(str(directory))
    objects = _blobs(2, seed=10)
    for object_id, blob in objects:
        cache.insert(object_id, blob)
    cache.close()
    _pretend_written_in_another_boot(directory)
    cache = DiskCache(str(directory))
    try:
        assert all(cache.is_cached(oid) for oid, _ in objects)
    finally:
        cache.close()


def test_a_file_without_an_index_entry_is_written_again_not_trusted(tmp_path: Path):
    """What a power loss can leave: a renamed file whose bytes never reached the disk
    and whose (unsynced) index entry was lost. The next insert must replace it."""
    cache = DiskCache(str(tmp_path / "cache"))
    try:
        [(object_id, blob)] = _blobs(1, seed=20)
        path = Path(cache.path(object_id))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\0" * len(blob))
        assert cache.has(object_id) and not cache.is_cached(object_id)
        assert cache.insert(object_id, blob)
        assert path.read_bytes() == blob and cache.is_cached(object_id)
    finally:
        cache.close()


@needs_deferred_sync
def test_the_mount_source_syncs_new_cache_files_in_the_background(pushed, monkeypatch):
    import snapfs.cache as cache_module

    monkeypatch.setattr(cache_module, "SYNC_INTERVAL", 0.05)
    src, repo, store, snapshot_id, tmp = pushed
    chunk_id = repo.lookup_path(snapshot_id, "medium.bin").chunks[0][0]
    cache = DiskCache(str(tmp / "cache"))
    seen: list[list[str]] = []

    async def main() -> None:
        async with ObjectSource(repo, cache) as source:
            await source.get(chunk_id, "chunk")
            with trio.fail_after(10):
                while True:
                    await trio.sleep(0.02)
                    unsynced = await trio.to_thread.run_sync(cache.index.unsynced_ids)
                    seen.append(unsynced)
                    if cache.index.contains(chunk_id) and not unsynced:
                        return

    try:
        trio.run(main)
    finally:
        cache.close()
    assert seen[-1] == []


@needs_deferred_sync
def test_syncs_go_in_pages_and_leave_nothing_behind(tmp_path: Path, monkeypatch):
    import snapfs.cache as cache_module

    monkeypatch.setattr(cache_module, "SYNC_PAGE", 2)
    cache = DiskCache(str(tmp_path / "cache"))
    try:
        objects = _blobs(5, seed=30)
        for object_id, blob in objects:
            cache.insert(object_id, blob)
        assert cache.index.unsynced_count() == 5
        assert cache.sync_pending() == 5
        assert cache.index.unsynced_count() == 0
    finally:
        cache.close()
