"""Packs: on S3, a push stores small objects several hundred to a pack
(format.PackRef), and every reader follows the references, verified."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from support.mounts import fuse_missing, mounted, parallel_digests, status
from support.trees import file_digests, make_mixed_tree

from snapfs import format as fmt
from snapfs import gc
from snapfs.cache import DiskCache
from snapfs.errors import FormatError, IntegrityError, NotFoundError
from snapfs.hashing import hash_bytes
from snapfs.packs import PackFetcher
from snapfs.prewarm import prewarm
from snapfs.repo import Repo
from snapfs.scan import scan
from snapfs.snapshot import fsck, pull, push, walk
from snapfs.sync import sync

pytestmark = pytest.mark.s3


def small_files(root: Path, dirs: int = 3, per_dir: int = 40, size: int = 3000, seed: int = 0) -> Path:
    rng = random.Random(seed)
    for d in range(dirs):
        (root / f"d{d}").mkdir(parents=True, exist_ok=True)
        for i in range(per_dir):
            (root / f"d{d}" / f"f{i:03d}").write_bytes(rng.randbytes(size))
    return root


def chunk_of(repo: Repo, snapshot_id: str, path: str) -> tuple[str, int]:
    entry = repo.lookup_path(snapshot_id, path)
    assert entry is not None and len(entry.chunks) == 1
    return entry.chunks[0]


def ref_of(repo: Repo, object_id: str) -> fmt.PackRef:
    ref = fmt.decode_pack_ref(repo.store.get(fmt.object_key(object_id)))
    assert ref is not None, f"{object_id} is not packed"
    return ref


# --- the encoding ----------------------------------------------------------


def _members() -> list[tuple[str, bytes]]:
    return [(hash_bytes(data), data) for data in (b"a" * 200, os.urandom(3000), b"c")]


def test_pack_round_trip() -> None:
    members = _members()
    blob, refs = fmt.encode_pack(members)
    assert hash_bytes(blob) == refs[0].pack_id and {r.pack_id for r in refs} == {refs[0].pack_id}
    table = fmt.decode_pack(blob)
    assert [(object_id, length) for object_id, _offset, length in table] == [(i, len(d)) for i, d in members]
    for (_object_id, data), ref in zip(members, refs, strict=True):
        assert blob[ref.offset : ref.offset + ref.length] == data
        assert fmt.decode_pack_ref(fmt.encode_pack_ref(ref)) == ref
    # The table alone (what gc reads) says the same.
    assert fmt.decode_pack_table(blob[: fmt.pack_header_size(len(members))]) == table
    # Anything else of a reference's size is not one: an object that happens to be 57 bytes.
    assert fmt.decode_pack_ref(os.urandom(fmt.PACK_REF_SIZE)) is None
    with pytest.raises(ValueError):
        fmt.encode_pack(members + members[:1])


def _bad_packs() -> dict[str, bytes]:
    blob, _refs = fmt.encode_pack(_members())
    head = fmt.PACK_HEADER_SIZE
    entry = fmt.pack_header_size(1) - head
    return {
        "truncated": blob[:-1],
        "trailing byte": blob + b"x",
        "bad magic": b"X" + blob[1:],
        "no members": b"SNAPPACK\x01\x00\x00\x00\x00",
        "a member twice": blob[:head] + blob[head : head + entry] * 2 + blob[head + 2 * entry :],
        "huge count": blob[:9] + (1 << 30).to_bytes(4, "big") + blob[head:],
        "empty": b"",
    }


@pytest.mark.parametrize("case", sorted(_bad_packs()))
def test_malformed_packs_are_refused(case: str) -> None:
    with pytest.raises(FormatError):
        fmt.decode_pack(_bad_packs()[case])


@pytest.mark.parametrize(
    ("offset", "length", "pack_size"),
    [(100, 10, 105), (100, 0, 200), (3, 10, 200), (100, 10, fmt.MAX_PACK_SIZE + 1), (100, 10, 0)],
)
def test_malformed_references_are_refused(offset: int, length: int, pack_size: int) -> None:
    raw = fmt.encode_pack_ref(fmt.PackRef("ab" * 32, offset, length, pack_size))
    with pytest.raises(FormatError):
        fmt.decode_pack_ref(raw)


# --- a real S3 store -------------------------------------------------------


def test_push_packs_small_files_and_every_reader_gets_the_bytes(
    s3_store_url: str, file_store_url: str, tmp_path: Path
) -> None:
    src = make_mixed_tree(tmp_path / "src", large_mib=2)
    small_files(src / "many")
    repo = Repo.open(s3_store_url)
    result = push(str(src), repo)
    # The ID is content only: the same with packs, without them, and on a file store.
    loose = Repo.open(s3_store_url + "-loose")
    assert push(str(src), loose, pack=False).packs == 0
    assert not list(loose.store.list("packs/"))
    assert (
        result.snapshot_id == scan(str(src)).root_id == push(str(src), Repo.open(file_store_url)).snapshot_id
    )
    assert result.packs >= 1
    assert len(list(repo.store.list("packs/"))) == result.packs

    snapshot_id = result.snapshot_id
    small_id, small_len = chunk_of(repo, snapshot_id, "many/d1/f007")
    assert ref_of(repo, small_id).length == small_len == 3000
    # Too small to pack (a reference would outweigh it), and too big: stored as themselves.
    assert (
        repo.store.get(fmt.object_key(chunk_of(repo, snapshot_id, "run.sh")[0]))
        == (src / "run.sh").read_bytes()
    )
    medium_id, _ = chunk_of(repo, snapshot_id, "medium.bin")
    assert hash_bytes(repo.store.get(fmt.object_key(medium_id))) == medium_id

    # Each way of reading returns the bytes: one object, a whole pack, a pull, fsck.
    assert repo.get_object(small_id, "chunk", small_len) == (src / "many/d1/f007").read_bytes()
    fetcher = PackFetcher(repo)
    data, siblings = fetcher.get(small_id, "chunk", small_len)
    assert data == (src / "many/d1/f007").read_bytes() and len(siblings) >= 40
    assert all(hash_bytes(d) == i for i, d in siblings.items())
    sibling = next(iter(siblings))
    assert fetcher.get(sibling)[0] == siblings[sibling]  # from memory: no second pack fetch
    assert fetcher.packs_fetched == 1
    pull(repo, snapshot_id, str(tmp_path / "pulled"))
    assert file_digests(tmp_path / "pulled") == file_digests(src)
    report = fsck(repo)
    assert report.ok, report.as_dict()
    # A re-push finds everything present.
    again = push(str(src), repo)
    assert again.uploaded_bytes == 0 and again.packs == 0


def _packed_pair(repo: Repo, tmp_path: Path) -> tuple[str, dict[str, bytes], fmt.PackRef]:
    src = small_files(tmp_path / "pair", dirs=1, per_dir=6, size=2000, seed=3)
    snapshot_id = push(str(src), repo).snapshot_id
    contents = {
        chunk_of(repo, snapshot_id, f"d0/f{i:03d}")[0]: (src / f"d0/f{i:03d}").read_bytes() for i in range(6)
    }
    ref = ref_of(repo, next(iter(contents)))
    return snapshot_id, contents, ref


def test_a_corrupt_member_fails_alone(s3_store_url: str, tmp_path: Path) -> None:
    repo = Repo.open(s3_store_url)
    _snapshot_id, contents, _ref = _packed_pair(repo, tmp_path)
    victim, *others = list(contents)
    ref = ref_of(repo, victim)
    key = fmt.pack_key(ref.pack_id)
    blob = bytearray(repo.store.get(key))
    blob[ref.offset + 10] ^= 0x01
    repo.store.put(key, bytes(blob))

    with pytest.raises(IntegrityError, match=victim):
        repo.get_object(victim, "chunk", len(contents[victim]))
    for object_id in others:
        assert repo.get_object(object_id, "chunk", len(contents[object_id])) == contents[object_id]
    fetcher = PackFetcher(repo)
    data, siblings = fetcher.get(others[0], "chunk", len(contents[others[0]]))
    assert data == contents[others[0]] and victim not in siblings and set(siblings) == set(others[1:])
    with pytest.raises(IntegrityError, match=victim):
        fetcher.get(victim, "chunk", len(contents[victim]))
    report = fsck(repo)
    assert [c.split()[0] for c in report.corrupt] == [victim]


def test_a_hostile_reference_never_serves_other_bytes(s3_store_url: str, tmp_path: Path) -> None:
    repo = Repo.open(s3_store_url)
    _snapshot_id, contents, _ref = _packed_pair(repo, tmp_path)
    first, second = list(contents)[:2]
    size = len(contents[first])
    ref_key = fmt.object_key(first)
    # A well-formed reference to the right pack, at another member's bytes.
    other = ref_of(repo, second)
    repo.store.put(ref_key, fmt.encode_pack_ref(other))
    with pytest.raises(IntegrityError, match=first):
        repo.get_object(first, "chunk", size)
    # A whole-pack reader finds the object by its own ID in the pack's table,
    # and hashes it: the right bytes, or none.
    assert PackFetcher(repo).get(first, "chunk", size)[0] == contents[first]
    # A reference that claims more bytes than the tree allows.
    repo.store.put(
        ref_key, fmt.encode_pack_ref(fmt.PackRef(other.pack_id, other.offset, size + 1, other.pack_size))
    )
    with pytest.raises(IntegrityError, match="more than"):
        repo.get_object(first, "chunk", size)
    # A reference past the end of its pack.
    bad = fmt.encode_pack_ref(fmt.PackRef(other.pack_id, other.pack_size, 1, other.pack_size + 1))
    repo.store.put(ref_key, bad)
    with pytest.raises(IntegrityError):
        repo.get_object(first, "chunk", size)
    # A reference to a pack that is not there.
    repo.store.put(ref_key, fmt.encode_pack_ref(fmt.PackRef("cd" * 32, other.offset, size, other.pack_size)))
    with pytest.raises(NotFoundError):
        repo.get_object(first, "chunk", size)
    with pytest.raises(NotFoundError):
        PackFetcher(repo).get(first, "chunk", size)


def test_gc_deletes_dead_packs_and_keeps_partly_live_ones(s3_store_url: str, tmp_path: Path) -> None:
    repo = Repo.open(s3_store_url)
    rng = random.Random(5)
    shared = rng.randbytes(4000)
    dead_only = {f"x{i}": rng.randbytes(3000) for i in range(3)}
    (tmp_path / "a").mkdir()
    for name, data in {**dead_only, "shared": shared}.items():
        (tmp_path / "a" / name).write_bytes(data)
    a = push(str(tmp_path / "a"), repo).snapshot_id
    (tmp_path / "b").mkdir()
    for name, data in {"shared": shared, "z1": rng.randbytes(3000), "z2": rng.randbytes(3000)}.items():
        (tmp_path / "b" / name).write_bytes(data)
    b = push(str(tmp_path / "b"), repo).snapshot_id
    c = push(str(small_files(tmp_path / "c", dirs=1, per_dir=4, seed=9)), repo).snapshot_id
    pack_a = ref_of(repo, chunk_of(repo, a, "shared")[0]).pack_id
    pack_b = ref_of(repo, chunk_of(repo, b, "z1")[0]).pack_id
    pack_c = ref_of(repo, chunk_of(repo, c, "d0/f000")[0]).pack_id
    assert len({pack_a, pack_b, pack_c}) == 3

    repo.unmark_snapshot(a)
    repo.unmark_snapshot(c)
    dry = gc.collect(repo, grace=0, dry_run=True)
    assert [f.object_id for f in dry.freed if f.kind == "pack"] == [pack_c]
    report = gc.collect(repo, grace=0)
    assert [f.object_id for f in report.freed if f.kind == "pack"] == [pack_c]
    packs = {info.key for info in repo.store.list("packs/")}
    assert packs == {fmt.pack_key(pack_a), fmt.pack_key(pack_b)}
    # pack_a is kept whole for `shared`; its three dead members are what a repack would free.
    assert report.packs_kept == 2 and report.pack_dead_bytes == sum(len(d) for d in dead_only.values())
    pull(repo, b, str(tmp_path / "pulled-b"))
    assert file_digests(tmp_path / "pulled-b") == file_digests(tmp_path / "b")
    assert fsck(repo).ok
    # Nothing younger than the grace period goes, packs included.
    repo.unmark_snapshot(b)
    young = gc.collect(repo, grace=3600)
    assert not [f for f in young.freed if f.kind == "pack"] and young.packs_kept == 2


def test_prewarm_caches_every_packed_object(s3_store_url: str, tmp_path: Path) -> None:
    src = small_files(tmp_path / "src", dirs=4, per_dir=30, size=20_000, seed=11)
    repo = Repo.open(s3_store_url)
    snapshot_id = push(str(src), repo).snapshot_id
    cache = DiskCache(str(tmp_path / "cache"))
    try:
        result = prewarm(repo, cache, snapshot_id)
        assert not result.failed
        chunks = [c for _path, e in walk(repo, snapshot_id) if e.is_file for c, _ in e.chunks]
        assert len(chunks) == 120 and all(cache.is_cached(c) for c in chunks)
        assert all(hash_bytes(cache.read(c)) == c for c in chunks)
        assert result.fetched_objects >= len(chunks)
        again = prewarm(repo, cache, snapshot_id)
        assert again.fetched_objects == 0 and again.already_cached_objects >= len(chunks)
    finally:
        cache.close()


_fuse = fuse_missing()


@pytest.mark.fuse
@pytest.mark.skipif(_fuse is not None, reason=f"no FUSE: {_fuse}")
def test_mount_reads_a_pack_for_a_cold_miss(s3_store_url: str, tmp_path: Path) -> None:
    src = small_files(tmp_path / "src", dirs=4, per_dir=50, size=40_000, seed=13)
    repo = Repo.open(s3_store_url)
    result = push(str(src), repo)
    files = 200
    with mounted(tmp_path / "mnt", s3_store_url, tmp_path / "cache") as mnt:
        assert parallel_digests(mnt / result.snapshot_id, workers=4) == file_digests(src)
        st = status(mnt)
    # Each pack is fetched about once; the files in it come with it.
    assert 1 <= st["pack_fetches"] <= 2 * result.packs
    assert st["pack_siblings"] >= files // 2
    assert st["misses"] < files // 4, st
    assert st["verify_failures"] == 0


def test_sync_reads_packs_whole_and_packs_again_on_s3(
    s3_store_url: str, file_store_url: str, tmp_path: Path
) -> None:
    src = small_files(tmp_path / "src", dirs=2, per_dir=30, size=5000, seed=17)
    packed = Repo.open(s3_store_url)
    snapshot_id = push(str(src), packed).snapshot_id
    # S3 (packed) -> a file store: objects of their own there.
    local = Repo.open(file_store_url)
    sync(packed, local, [snapshot_id])
    assert not list(local.store.list("packs/"))
    assert fsck(local).ok
    # The file store -> another S3 prefix: packed again.
    again = Repo.open(s3_store_url + "-again")
    result = sync(local, again, [snapshot_id])
    assert result.copied_objects >= 60
    assert list(again.store.list("packs/"))
    assert ref_of(again, chunk_of(again, snapshot_id, "d1/f004")[0]).length == 5000
    pull(again, snapshot_id, str(tmp_path / "pulled"))
    assert file_digests(tmp_path / "pulled") == file_digests(src)
    assert fsck(again).ok


def test_a_repush_packs_its_few_new_files_together(s3_store_url: str, tmp_path: Path) -> None:
    src = small_files(tmp_path / "src", dirs=2, per_dir=50, size=3000, seed=21)
    repo = Repo.open(s3_store_url)
    first = push(str(src), repo)
    changed = [f"d{d}/f{i:03d}" for d in range(2) for i in (7, 19, 33)]
    for rel in changed:
        (src / rel).write_bytes(os.urandom(3000))
    second = push(str(src), repo)
    # Only the six new files are uploaded, and together: one pack, not six objects
    # riding alone in batches of files the store already has.
    assert second.packs == 1, second.as_dict()
    assert second.uploaded_objects == len(changed) + 3  # and the root and two directory trees
    new_packs = {ref_of(repo, chunk_of(repo, second.snapshot_id, rel)[0]).pack_id for rel in changed}
    assert len(new_packs) == 1
    old_pack = ref_of(repo, chunk_of(repo, first.snapshot_id, "d0/f000")[0]).pack_id
    assert ref_of(repo, chunk_of(repo, second.snapshot_id, "d0/f000")[0]).pack_id == old_pack
    assert fsck(repo).ok
