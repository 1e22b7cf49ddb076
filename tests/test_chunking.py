"""Chunking golden vectors and properties (docs/FORMAT.md §2).

The cut points are part of the format: if any test here fails after an
upgrade of pyfastcdc or a change of parameters, every snapshot ID and all
dedup against earlier pushes would silently change. Do not "fix" the vectors.
"""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path

import pytest

from snapfs import chunking
from snapfs.chunking import MAX_SIZE, MIN_SIZE, MappedFile, chunk_bytes, cut_points
from snapfs.hashing import hash_bytes
from snapfs.scan import hash_file

# random.Random(1234).randbytes(16 << 20): its hash pins the input, so a change
# in CPython's generator is told apart from a change in the chunker.
RANDOM_16MIB_ID = "bee7d38d6a2a168087b6fd8244ae50284d2e1befc7c2e8b3e23b8870ef3d83bb"
RANDOM_16MIB_CUTS = [
    (0, 1587404),
    (1587404, 1421755),
    (3009159, 1160442),
    (4169601, 1241405),
    (5411006, 3271789),
    (8682795, 1996844),
    (10679639, 1311562),
    (11991201, 947877),
    (12939078, 1068759),
    (14007837, 1247231),
    (15255068, 1080793),
    (16335861, 441355),
]
# BLAKE3 of the concatenated hex chunk IDs, in order.
RANDOM_16MIB_CHUNK_IDS_DIGEST = "47f279ecb382924564366e83da6e1821a10815cd2a9933c0597fc08fb51aecf8"
RANDOM_16MIB_FIRST_CHUNK_ID = "f0187147b1ab80f80594a733d92f897bec38b435f825a5a87c28925771195669"


@pytest.fixture(scope="module")
def random_16mib() -> bytes:
    return random.Random(1234).randbytes(16 << 20)


def test_parameters_are_the_documented_ones() -> None:
    assert (chunking.MIN_SIZE, chunking.AVG_SIZE, chunking.MAX_SIZE) == (256 << 10, 1 << 20, 4 << 20)
    assert chunking.NORMALIZED_CHUNKING == 1
    assert chunking.SEED == 0


def test_golden_cut_points(random_16mib: bytes) -> None:
    assert hash_bytes(random_16mib) == RANDOM_16MIB_ID, "the seeded input itself changed"
    assert cut_points(random_16mib) == RANDOM_16MIB_CUTS


def test_golden_chunk_ids(random_16mib: bytes) -> None:
    chunks = chunk_bytes(random_16mib)
    ids = [chunk_id for (chunk_id, _), _ in chunks]
    assert ids[0] == RANDOM_16MIB_FIRST_CHUNK_ID
    assert hash_bytes("".join(ids).encode()) == RANDOM_16MIB_CHUNK_IDS_DIGEST
    # Each view is exactly the bytes its ID names.
    for (chunk_id, length), view in chunks:
        assert len(view) == length and hash_bytes(view) == chunk_id


def test_zeros_are_cut_at_the_maximum() -> None:
    assert cut_points(bytes(10 << 20)) == [(0, MAX_SIZE), (MAX_SIZE, MAX_SIZE), (2 * MAX_SIZE, 2 << 20)]


def test_empty_data_has_no_chunks() -> None:
    assert cut_points(b"") == []
    assert chunk_bytes(b"") == []


@pytest.mark.parametrize("size", [1, 4096, MIN_SIZE - 1, MIN_SIZE])
def test_up_to_min_size_is_one_chunk(size: int) -> None:
    data = random.Random(size).randbytes(size)
    assert cut_points(data) == [(0, size)]


def test_just_above_min_size_is_still_one_chunk() -> None:
    # The gear scan starts at MIN, so MIN+1 bytes cannot be cut.
    data = random.Random(7).randbytes(MIN_SIZE + 1)
    assert cut_points(data) == [(0, MIN_SIZE + 1)]


def test_chunks_tile_the_data_within_bounds(random_16mib: bytes) -> None:
    cuts = cut_points(random_16mib)
    offset = 0
    for i, (start, length) in enumerate(cuts):
        assert start == offset
        assert 0 < length <= MAX_SIZE
        if i < len(cuts) - 1:
            assert length >= MIN_SIZE
        offset += length
    assert offset == len(random_16mib)


def test_matches_the_pure_python_reference() -> None:
    # pyfastcdc's pure-Python module is the algorithm FORMAT.md §2 spells out;
    # the compiled one we run must cut identically (3 MiB keeps this ~0.6 s).
    from pyfastcdc.py import FastCDC as ReferenceFastCDC

    data = random.Random(99).randbytes(3 << 20)
    reference = ReferenceFastCDC(
        chunking.AVG_SIZE,
        min_size=chunking.MIN_SIZE,
        max_size=chunking.MAX_SIZE,
        normalized_chunking=chunking.NORMALIZED_CHUNKING,
        seed=chunking.SEED,
    )
    expected = [(c.offset, c.length) for c in reference.cut_buf(data)]
    assert len(expected) >= 2
    assert cut_points(data) == expected


def test_one_byte_change_moves_at_most_two_chunks(random_16mib: bytes) -> None:
    before = {chunk_id for (chunk_id, _), _ in chunk_bytes(random_16mib)}
    for position in (5, 8 << 20, len(random_16mib) - 3):
        edited = bytearray(random_16mib)
        edited[position] ^= 0xFF
        after = {chunk_id for (chunk_id, _), _ in chunk_bytes(edited)}
        assert 1 <= len(after - before) <= 2, position


def test_insertion_resynchronises(random_16mib: bytes) -> None:
    before = chunk_bytes(random_16mib)
    old_ids = {chunk_id for (chunk_id, _), _ in before}
    edited = random_16mib[: 6 << 20] + b"inserted record" + random_16mib[6 << 20 :]
    new = chunk_bytes(edited)
    new_bytes = sum(length for (chunk_id, length), _ in new if chunk_id not in old_ids)
    # Only the chunk(s) around the insertion are new, not everything after it.
    assert new_bytes <= 2 * MAX_SIZE
    assert len([1 for (chunk_id, _), _ in new if chunk_id in old_ids]) >= len(before) - 2


def test_thread_safe(random_16mib: bytes) -> None:
    results: list[list[tuple[int, int]]] = []
    buffers = [random_16mib, bytes(10 << 20), random_16mib[1000:]]

    def work(buf: bytes) -> None:
        for _ in range(3):
            results.append(cut_points(buf))

    threads = [threading.Thread(target=work, args=(b,)) for b in buffers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    expected = {tuple(cut_points(b)) for b in buffers}
    assert {tuple(r) for r in results} == expected


@pytest.mark.parametrize(
    "size", [0, 1, MIN_SIZE, MIN_SIZE + 1, (1 << 20) - 1, 1 << 20, (1 << 20) + 1, 5 << 20]
)
def test_hash_file_read_and_mmap_paths_agree_with_cut_points(tmp_path: Path, size: int) -> None:
    # scan.hash_file reads files up to 1 MiB and maps larger ones: both paths
    # must give exactly chunk_bytes() of the contents.
    data = random.Random(size).randbytes(size)
    path = tmp_path / "f"
    path.write_bytes(data)
    file_size, chunks, executable = hash_file(os.fsencode(path))
    assert file_size == size
    assert not executable
    assert chunks == [ref for ref, _ in chunk_bytes(data)]


def test_mapped_file_of_an_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty"
    path.write_bytes(b"")
    with MappedFile(str(path)) as mapped:
        assert len(mapped.buffer) == 0
