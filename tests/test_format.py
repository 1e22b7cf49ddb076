"""The format: golden vectors, an independent re-implementation of the spec,
encode/decode round trips and hostile-input decoding (docs/FORMAT.md §3–§10).

A failure of a golden test means snapshot IDs changed. That is a format
change: bump FORMAT_VERSION and write it down, never edit the vector to match.
"""

from __future__ import annotations

import os
import random
import re
import stat
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from snapfs import format as fmt
from snapfs.chunking import cut_points
from snapfs.errors import FormatError
from snapfs.format import Entry, dir_entry, file_entry, symlink_entry
from snapfs.hashing import hash_bytes
from snapfs.repo import content_id
from snapfs.scan import scan

MiB = 1 << 20

# --- the worked example of FORMAT.md §6 ---------------------------------------

HELLO_ID = "8e4c7c1b99dbfd50e7a95185fead5ee1448fa904a2fdd778eaf5f2dbfd629a99"
RUN_SH_ID = "4b694fa6468140836e2f43625aca1150ec72032dc23a12e13416ca026c647ef3"
EMPTY_TREE_HEX = "534e4150545245450100000000"
EMPTY_TREE_ID = "c8694674689072bebe424471e432c289cf1eed0343d35198950086869d5a9cea"
BIN_TREE_HEX = (
    "534e415054524545010000000264000005656d7074790000000000000000c8694674689072bebe424471e432"
    "c289cf1eed0343d35198950086869d5a9cea000000006601000672756e2e7368000000000000001200000000"
    "014b694fa6468140836e2f43625aca1150ec72032dc23a12e13416ca026c647ef300000012"
)
BIN_TREE_ID = "290eb847b18ec6f79445029d03ceb80e4f26e6d20ae9a328344a69ac74c72fd3"
EXAMPLE_ROOT_HEX = (
    "534e415054524545010000000466000005612e747874000000000000000600000000018e4c7c1b99dbfd50e7"
    "a95185fead5ee1448fa904a2fdd778eaf5f2dbfd629a99000000066400000362696e0000000000000012290e"
    "b847b18ec6f79445029d03ceb80e4f26e6d20ae9a328344a69ac74c72fd3000000016c0000046c696e6b0000"
    "0000000000050005612e747874660000047a65726f00000000000000000000000000"
)
EXAMPLE_ID = "71703648b43fa6e1037c00cb061331675fa4c8bab06f6a5e4f3ddb10ea54e938"
EMPTY_FILE_CONTENT_ID = "4c5da6b636ad02b48349bfb81f74f06eefea1258c22c9968dd4ec845240f8712"
HELLO_CONTENT_ID = "fa90875df36856d2b7397c5e43fa4e415329f35d35ddd3269a5da9036c935673"

# --- the golden tree built on disk by build_golden_tree() ---------------------

GOLDEN_TREE_ID = "81a88bdf35e0acc4d83ffe969fb1c1d097e5fe7e6ed9fe4f680fbcce63510b1e"

# --- a file with more than 1024 chunks (chunk-list layout) --------------------

BIG_CHUNKLIST_ID = "4603adbfeaa8db9ec1980f47d185e7ec8172a86042fd09c79a34222cbb8f3507"
BIG_TREE_HEX = (
    "534e4150545245450100000001660100036269670000000000000401014603adbfeaa8db9ec1980f47d185e7ec81"
    "72a86042fd09c79a34222cbb8f350700000401"
)
BIG_TREE_ID = "f55f2e479a94930abcae84743d640127990faa3b700d5883ccff976bef984fe5"


def build_worked_example(root: Path) -> None:
    (root / "bin" / "empty").mkdir(parents=True)
    (root / "a.txt").write_bytes(b"hello\n")
    (root / "bin" / "run.sh").write_bytes(b"#!/bin/sh\necho hi\n")
    os.chmod(root / "a.txt", 0o644)
    os.chmod(root / "bin" / "run.sh", 0o755)
    os.symlink("a.txt", root / "link")
    (root / "zero").write_bytes(b"")
    os.chmod(root / "zero", 0o644)


def build_golden_tree(root: Path) -> None:
    """A fixed tree: seeded contents, a multi-chunk file, an exec file, a
    symlink, an empty dir, an empty file and awkward names."""
    rng = random.Random(20240501)
    base = os.fsencode(root)

    def path(rel: bytes) -> bytes:
        return os.path.join(base, rel)

    def write(rel: bytes, data: bytes, mode: int = 0o644) -> None:
        with open(path(rel), "wb") as f:
            f.write(data)
        os.chmod(path(rel), mode)

    for directory in (b"", b"data", b"bin", b"empty-dir", b"sub dir", b"sub dir/nested"):
        os.makedirs(path(directory), exist_ok=True)
    write(b"README.md", b"snapfs golden tree\n")
    write(b"data/shard-000.bin", rng.randbytes(3 * MiB + 12345))
    for i in range(5):
        write(b"data/small-%d.txt" % i, rng.randbytes(rng.randrange(1, 5000)))
    write(b"bin/tool.sh", b"#!/bin/sh\necho golden\n", 0o755)
    write(b"empty-file", b"")
    os.symlink(b"data/small-0.txt", path(b"link"))
    os.symlink(b"../../README.md", path(b"sub dir/nested/up-link"))
    write(b"sub dir/nested/name with space\nand newline", rng.randbytes(100))
    write(b"caf\xe9-latin1", b"latin-1 name\n")
    write("café-utf8".encode(), b"utf-8 name\n")


def spec_tree_id(path: bytes) -> tuple[str, int]:
    """FORMAT.md §3–§5 re-implemented from the text alone: (tree ID, total file bytes)."""
    u16, u32, u64 = (struct.Struct(f">{c}").pack for c in "HIQ")
    encoded_entries = []
    total = 0
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        mode = os.lstat(full).st_mode
        flags = 0
        if stat.S_ISLNK(mode):
            target = os.readlink(full)
            kind, size, body = b"l", len(target), u16(len(target)) + target
        elif stat.S_ISDIR(mode):
            tree_id, size = spec_tree_id(full)
            subdirs = sum(
                1 for child in os.listdir(full) if stat.S_ISDIR(os.lstat(os.path.join(full, child)).st_mode)
            )
            kind, body = b"d", bytes.fromhex(tree_id) + u32(subdirs)
            total += size
        elif stat.S_ISREG(mode):
            with open(full, "rb") as f:
                data = f.read()
            refs = b"".join(bytes.fromhex(hash_bytes(data[o : o + n])) + u32(n) for o, n in cut_points(data))
            count = len(cut_points(data))
            if count <= 1024:
                body = b"\x00" + u32(count) + refs
            else:
                body = b"\x01" + bytes.fromhex(hash_bytes(b"SNAPLIST\x01" + u32(count) + refs)) + u32(count)
            kind, size, flags = b"f", len(data), 1 if mode & 0o100 else 0
            total += size
        else:
            continue
        encoded_entries.append(kind + bytes([flags]) + u16(len(name)) + name + u64(size) + body)
    tree = b"SNAPTREE\x01" + u32(len(encoded_entries)) + b"".join(encoded_entries)
    return hash_bytes(tree), total


# --- golden vectors ---------------------------------------------------------------


def test_worked_example_encodings_are_golden() -> None:
    assert hash_bytes(b"hello\n") == HELLO_ID
    assert hash_bytes(b"#!/bin/sh\necho hi\n") == RUN_SH_ID
    empty = fmt.encode_tree([])
    assert empty.hex() == EMPTY_TREE_HEX and hash_bytes(empty) == EMPTY_TREE_ID
    run_sh, _ = file_entry(b"run.sh", 18, [(RUN_SH_ID, 18)], executable=True)
    bin_tree = fmt.encode_tree([run_sh, dir_entry(b"empty", EMPTY_TREE_ID, 0, 0)])
    assert bin_tree.hex() == BIN_TREE_HEX and hash_bytes(bin_tree) == BIN_TREE_ID
    a_txt, _ = file_entry(b"a.txt", 6, [(HELLO_ID, 6)], executable=False)
    zero, _ = file_entry(b"zero", 0, [], executable=False)
    # Given in scrambled order: the encoder sorts.
    root = fmt.encode_tree(
        [
            zero,
            symlink_entry(b"link", b"a.txt"),
            a_txt,
            dir_entry(b"bin", BIN_TREE_ID, 18, 1),
        ]
    )
    assert root.hex() == EXAMPLE_ROOT_HEX
    assert hash_bytes(root) == EXAMPLE_ID


def test_worked_example_scanned_from_disk(tmp_path: Path) -> None:
    build_worked_example(tmp_path / "ex")
    result = scan(tmp_path / "ex")
    assert result.root_id == EXAMPLE_ID
    assert result.trees[EXAMPLE_ID].hex() == EXAMPLE_ROOT_HEX
    assert result.total_bytes == 24


def test_content_ids_are_golden() -> None:
    assert fmt.encode_chunklist([]).hex() == "534e41504c4953540100000000"
    empty, _ = file_entry(b"zero", 0, [], executable=False)
    assert content_id(empty) == EMPTY_FILE_CONTENT_ID
    hello, _ = file_entry(b"a.txt", 6, [(HELLO_ID, 6)], executable=True)
    assert content_id(hello) == HELLO_CONTENT_ID
    assert content_id(dir_entry(b"d", EMPTY_TREE_ID, 0, 0)) == EMPTY_TREE_ID
    assert content_id(symlink_entry(b"l", b"x")) is None


def test_golden_tree_id(tmp_path: Path) -> None:
    build_golden_tree(tmp_path / "golden")
    result = scan(tmp_path / "golden")
    assert (result.files, result.dirs, result.symlinks) == (12, 6, 2)
    assert any(len(fmt.decode_tree(t)) and _has_multichunk(t) for t in result.trees.values())
    assert result.root_id == GOLDEN_TREE_ID


def _has_multichunk(tree: bytes) -> bool:
    return any(e.is_file and e.chunk_count > 1 for e in fmt.decode_tree(tree))


def test_independent_implementation_of_the_spec_agrees(tmp_path: Path) -> None:
    build_golden_tree(tmp_path / "golden")
    build_worked_example(tmp_path / "ex")
    assert spec_tree_id(os.fsencode(tmp_path / "golden"))[0] == GOLDEN_TREE_ID
    assert spec_tree_id(os.fsencode(tmp_path / "ex")) == (EXAMPLE_ID, 24)


def test_chunklist_layout_is_golden() -> None:
    x_id = hash_bytes(b"x")
    entry, blob = file_entry(b"big", 1025, [(x_id, 1)] * 1025, executable=True)
    assert blob is not None and entry.chunklist_id == BIG_CHUNKLIST_ID == hash_bytes(blob)
    assert blob[:13].hex() == "534e41504c4953540100000401"
    assert len(blob) == 13 + 1025 * 36
    tree = fmt.encode_tree([entry])
    assert tree.hex() == BIG_TREE_HEX and hash_bytes(tree) == BIG_TREE_ID
    # The content ID has one formula for both layouts.
    assert content_id(entry) == BIG_CHUNKLIST_ID
    assert fmt.decode_chunklist(blob, 1025, 1025) == ((x_id, 1),) * 1025


def test_layout_threshold_is_1024_chunks() -> None:
    x_id = hash_bytes(b"x")
    inline, blob = file_entry(b"f", 1024, [(x_id, 1)] * 1024, executable=False)
    assert blob is None and inline.chunklist_id is None and len(inline.chunks) == 1024
    listed, blob = file_entry(b"f", 1025, [(x_id, 1)] * 1025, executable=False)
    assert blob is not None and listed.chunks == ()
    assert fmt.decode_tree(fmt.encode_tree([inline])) == [inline]
    assert fmt.decode_tree(fmt.encode_tree([listed])) == [listed]


def test_store_keys() -> None:
    assert (
        fmt.object_key(EXAMPLE_ID)
        == "objects/71/703648b43fa6e1037c00cb061331675fa4c8bab06f6a5e4f3ddb10ea54e938"
    )
    assert fmt.record_key("ab" * 32) == "records/" + "ab" * 32


# --- hand-made hostile trees ----------------------------------------------------

U16, U32, U64 = (struct.Struct(f">{c}").pack for c in "HIQ")


def raw_tree(
    *entries: bytes, count: int | None = None, version: int = 1, magic: bytes = b"SNAPTREE"
) -> bytes:
    return magic + bytes([version]) + U32(len(entries) if count is None else count) + b"".join(entries)


def raw_entry(kind: bytes, name: bytes, size: int, body: bytes, flags: int = 0) -> bytes:
    return kind + bytes([flags]) + U16(len(name)) + name + U64(size) + body


def inline_body(*chunks: tuple[str, int]) -> bytes:
    return b"\x00" + U32(len(chunks)) + b"".join(bytes.fromhex(c) + U32(n) for c, n in chunks)


GOOD_FILE = raw_entry(b"f", b"a", 6, inline_body((HELLO_ID, 6)))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "truncated"),
        (raw_tree(magic=b"SNAPLIST"), "bad magic"),
        (raw_tree(version=2), "unknown format version 2"),
        (raw_tree(version=0), "unknown format version 0"),
        (raw_tree(count=(1 << 24) + 1), "limit"),
        (raw_tree(count=1 << 24), "truncated"),
        (raw_tree(GOOD_FILE) + b"\x00", "trailing"),
        (raw_tree(raw_entry(b"x", b"a", 0, b"")), "kind"),
        (raw_tree(raw_entry(b"f", b"", 0, inline_body())), "empty entry name"),
        (raw_tree(raw_entry(b"f", b".", 0, inline_body())), "not allowed"),
        (raw_tree(raw_entry(b"f", b"..", 0, inline_body())), "not allowed"),
        (raw_tree(raw_entry(b"f", b"a/b", 0, inline_body())), "'/' or NUL"),
        (raw_tree(raw_entry(b"f", b"a\x00", 0, inline_body())), "'/' or NUL"),
        (raw_tree(raw_entry(b"f", b"n" * 256, 0, inline_body())), "longer than 255"),
        (raw_tree(GOOD_FILE, GOOD_FILE), "not strictly sorted"),
        (raw_tree(raw_entry(b"f", b"b", 0, inline_body()), GOOD_FILE), "not strictly sorted"),
        (raw_tree(raw_entry(b"d", b"d", 0, bytes(32) + U32(0), flags=1)), "invalid flags"),
        (raw_tree(raw_entry(b"f", b"a", 6, inline_body((HELLO_ID, 6)), flags=2)), "invalid flags"),
        (raw_tree(raw_entry(b"f", b"a", 7, inline_body((HELLO_ID, 6)))), "add up to"),
        (raw_tree(raw_entry(b"f", b"a", 0, inline_body((HELLO_ID, 0)))), "out of range"),
        (raw_tree(raw_entry(b"f", b"a", 5 << 20, inline_body((HELLO_ID, 5 << 20)))), "out of range"),
        (raw_tree(raw_entry(b"f", b"a", 1 << 51, inline_body())), "absurd file size"),
        (raw_tree(raw_entry(b"f", b"a", 0, b"\x02")), "unknown chunk layout"),
        (raw_tree(raw_entry(b"f", b"a", 1025, b"\x00" + U32(1025))), "inline chunks"),
        (raw_tree(raw_entry(b"f", b"a", 1024, b"\x01" + bytes(32) + U32(1024))), "does not fit"),
        (raw_tree(raw_entry(b"f", b"a", 1024, b"\x01" + bytes(32) + U32(1025))), "does not fit"),
        (
            raw_tree(raw_entry(b"f", b"a", 1025 * (4 << 20) + 1, b"\x01" + bytes(32) + U32(1025))),
            "does not fit",
        ),
        (raw_tree(raw_entry(b"d", b"d", 1 << 61, bytes(32) + U32(0))), "absurd directory size"),
        (raw_tree(raw_entry(b"d", b"d", 0, bytes(32) + U32((1 << 24) + 1))), "absurd subdirectory count"),
        (raw_tree(raw_entry(b"d", b"d", 0, bytes(32))), "truncated"),
        (raw_tree(raw_entry(b"l", b"l", 0, U16(0))), "invalid symlink target"),
        (raw_tree(raw_entry(b"l", b"l", 3, U16(3) + b"a\x00b")), "invalid symlink target"),
        (raw_tree(raw_entry(b"l", b"l", 4096, U16(4096) + b"a" * 4096)), "invalid symlink target"),
        (raw_tree(raw_entry(b"l", b"l", 2, U16(1) + b"a")), "not its target length"),
    ],
)
def test_hostile_trees_are_rejected(data: bytes, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        fmt.decode_tree(data, "tree T")


def test_decode_error_names_the_object() -> None:
    with pytest.raises(
        FormatError, match=r"^tree abc: unknown format version 2 \(this snapfs reads version 1\)"
    ):
        fmt.decode_tree(raw_tree(version=2), "tree abc")


def test_hand_made_good_tree_decodes() -> None:
    assert fmt.decode_tree(raw_tree(GOOD_FILE)) == [file_entry(b"a", 6, [(HELLO_ID, 6)], executable=False)[0]]


@pytest.mark.parametrize(
    ("data", "count", "size", "message"),
    [
        (b"SNAPTREE\x01" + U32(0), 0, 0, "bad magic"),
        (b"SNAPLIST\x02" + U32(0), 0, 0, "unknown format version 2"),
        (b"SNAPLIST\x01" + U32(1), 2, 1, "tree says 2"),
        (b"SNAPLIST\x01" + U32(1) + bytes.fromhex(HELLO_ID) + U32(6), 1, 7, "add up to"),
        (b"SNAPLIST\x01" + U32(1) + bytes.fromhex(HELLO_ID) + U32(6) + b"!", 1, 6, "trailing"),
        (b"SNAPLIST\x01" + U32(2) + bytes.fromhex(HELLO_ID) + U32(6), 2, 12, "truncated"),
    ],
)
def test_hostile_chunklists_are_rejected(data: bytes, count: int, size: int, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        fmt.decode_chunklist(data, count, size)


def test_encoder_rejects_bad_names_and_duplicates() -> None:
    with pytest.raises(FormatError, match="duplicate"):
        fmt.encode_tree([symlink_entry(b"x", b"a"), symlink_entry(b"x", b"b")])
    with pytest.raises(FormatError):
        fmt.encode_tree([symlink_entry(b"a/b", b"a")])
    with pytest.raises(FormatError, match="must be bytes"):
        fmt.validate_name("str")  # type: ignore[arg-type]


def test_exec_bit_only_on_files() -> None:
    # A non-file "executable" flag is dropped by the encoder, not written.
    entry = Entry(b"d", fmt.KIND_DIR, 0, True, tree_id=EMPTY_TREE_ID)
    assert fmt.decode_tree(fmt.encode_tree([entry]))[0].executable is False


# --- hypothesis: round trips -------------------------------------------------------

names = (
    st.binary(min_size=1, max_size=255)
    .map(lambda b: b.replace(b"/", b"_").replace(b"\x00", b"~"))
    .filter(lambda b: b not in (b".", b".."))
)
object_ids = st.binary(min_size=32, max_size=32).map(bytes.hex)
chunk_refs = st.tuples(object_ids, st.integers(1, fmt.MAX_CHUNK_SIZE))


@st.composite
def file_entries(draw: st.DrawFn) -> Entry:
    name = draw(names)
    executable = draw(st.booleans())
    if draw(st.integers(0, 9)) == 0:
        # Chunk-list layout: only the count and ID are in the tree.
        count = draw(st.integers(fmt.INLINE_MAX_CHUNKS + 1, 1 << 20))
        size = draw(st.integers(count, count * fmt.MAX_CHUNK_SIZE))
        return Entry(name, fmt.KIND_FILE, size, executable, (), draw(object_ids), count)
    chunks = draw(st.lists(chunk_refs, max_size=12))
    entry, _ = file_entry(name, sum(n for _, n in chunks), chunks, executable=executable)
    return entry


entries = st.one_of(
    file_entries(),
    st.builds(dir_entry, names, object_ids, st.integers(0, 1 << 60), st.integers(0, fmt.MAX_ENTRIES)),
    st.builds(
        symlink_entry,
        names,
        st.binary(min_size=1, max_size=fmt.MAX_TARGET_LEN).map(lambda b: b.replace(b"\x00", b"0")),
    ),
)
entry_lists = st.lists(entries, max_size=12, unique_by=lambda e: e.name)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(entry_lists, st.randoms(use_true_random=False))
def test_tree_round_trip(tree_entries: list[Entry], rnd: random.Random) -> None:
    encoded = fmt.encode_tree(tree_entries)
    decoded = fmt.decode_tree(encoded)
    assert decoded == sorted(tree_entries, key=lambda e: e.name)
    assert fmt.encode_tree(decoded) == encoded
    shuffled = list(tree_entries)
    rnd.shuffle(shuffled)
    assert fmt.encode_tree(shuffled) == encoded  # walk order never matters


@settings(max_examples=200, deadline=None)
@given(st.lists(chunk_refs, max_size=50))
def test_chunklist_round_trip(chunks: list[tuple[str, int]]) -> None:
    size = sum(n for _, n in chunks)
    assert fmt.decode_chunklist(fmt.encode_chunklist(chunks), len(chunks), size) == tuple(chunks)


@given(names)
def test_valid_names_pass(name: bytes) -> None:
    fmt.validate_name(name)


@example(b"")
@example(b".")
@example(b"..")
@example(b"...")
@example(b"a/b")
@example(b"/")
@example(b"\x00")
@example(b"x" * 255)
@example(b"x" * 256)
@given(st.binary(max_size=300))
def test_name_validation_is_exactly_the_rule(name: bytes) -> None:
    valid = 1 <= len(name) <= 255 and b"/" not in name and b"\x00" not in name and name not in (b".", b"..")
    if valid:
        fmt.validate_name(name)
    else:
        with pytest.raises(FormatError):
            fmt.validate_name(name)


# --- hypothesis: hostile bytes end in FormatError only -------------------------------


def _decode_tree_or_format_error(data: bytes) -> None:
    try:
        decoded = fmt.decode_tree(data)
    except FormatError:
        return
    # Whatever is accepted is the one canonical encoding of what it decodes to.
    assert fmt.encode_tree(decoded) == data


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=400))
def test_decode_tree_arbitrary_bytes(data: bytes) -> None:
    _decode_tree_or_format_error(data)
    _decode_tree_or_format_error(b"SNAPTREE\x01" + data)


@st.composite
def mutations(draw: st.DrawFn, valid: bytes) -> bytes:
    data = bytearray(valid)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "delete", "insert", "truncate"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[pos] = draw(st.sampled_from([0, 1, 0x2F, 0x2E, 0x64, 0x66, 0x6C, 0xFF]))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 40))]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=40))
        else:
            del data[pos:]
    return bytes(data)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), entry_lists.filter(bool))
def test_decode_tree_mutated_encodings(data: st.DataObject, tree_entries: list[Entry]) -> None:
    _decode_tree_or_format_error(data.draw(mutations(fmt.encode_tree(tree_entries))))


@settings(max_examples=150, deadline=None)
@given(st.data(), st.lists(chunk_refs, min_size=1, max_size=20))
def test_decode_chunklist_mutated_and_arbitrary(data: st.DataObject, chunks: list[tuple[str, int]]) -> None:
    size = sum(n for _, n in chunks)
    for blob in (
        data.draw(mutations(fmt.encode_chunklist(chunks))),
        data.draw(st.binary(max_size=200)),
    ):
        count = data.draw(st.sampled_from([len(chunks), 0, 1, 1 << 32 - 1]))
        try:
            fmt.decode_chunklist(blob, count, data.draw(st.sampled_from([size, 0, size + 1])))
        except FormatError:
            pass


# --- records -----------------------------------------------------------------------------


def test_record_encoding_is_canonical() -> None:
    record = {
        "tags": ["b", "a"],
        "format": fmt.RECORD_FORMAT,
        "message": "café\n",
        "nested": {"z": 1, "a": None},
    }
    encoded = fmt.encode_record(record)
    assert encoded == (
        b'{"format":"snapfs-record/1","message":"caf\xc3\xa9\\n","nested":{"a":null,"z":1},"tags":["b","a"]}'
    )
    assert fmt.decode_record(encoded) == record
    assert fmt.encode_record(dict(reversed(list(record.items())))) == encoded


@pytest.mark.parametrize("bad", [{"x": float("nan")}, {"x": float("inf")}, {"x": object()}, {"x": "\udcff"}])
def test_unencodable_records_are_format_errors(bad: dict) -> None:
    with pytest.raises(FormatError):
        fmt.encode_record(bad)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xff",
        b"[]",
        b'"x"',
        b"{}",
        b'{"format":"snapfs-record/2"}',
        b"[" * 100_000,
        b'{"a":' * 100_000,
        b"1" * 10_000,
    ],
)
def test_bad_records_are_format_errors(data: bytes) -> None:
    with pytest.raises(FormatError):
        fmt.decode_record(data)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode)))
def test_decode_record_arbitrary_bytes(data: bytes) -> None:
    try:
        record = fmt.decode_record(data)
    except FormatError:
        return
    assert record["format"] == fmt.RECORD_FORMAT


# --- docs/FORMAT.md quotes the code's own vectors ------------------------------------


def test_format_md_quotes_the_golden_vectors() -> None:
    """The spec's worked example and vectors must be the ones the code produces."""
    doc = (Path(__file__).parents[1] / "docs" / "FORMAT.md").read_text()
    blocks = re.findall(r"```\n(.*?)```", doc, re.S)

    def annotated_hex(block: str) -> str:
        # Hex tokens before the two-space gap that starts each annotation.
        return "".join(
            token
            for line in block.splitlines()
            for token in re.split(r"\s{2,}", line.strip())[0].split()
            if re.fullmatch(r"[0-9a-f]+", token)
        )

    dumps = [annotated_hex(b) for b in blocks if b.startswith("534e415054524545 01")]
    assert dumps == [BIN_TREE_HEX, EXAMPLE_ROOT_HEX]
    one_string = next(b for b in blocks if b.replace("\n", "").startswith(EXAMPLE_ROOT_HEX[:60]))
    assert one_string.replace("\n", "") == EXAMPLE_ROOT_HEX
    for vector in (
        EXAMPLE_ID,
        BIN_TREE_ID,
        EMPTY_TREE_ID,
        EMPTY_TREE_HEX,
        EMPTY_FILE_CONTENT_ID,
        HELLO_ID,
        RUN_SH_ID,
    ):
        assert vector in doc, vector
    assert "(0, 1587404) (1587404, 1421755)" in doc and "(16335861, 441355)" in doc


@given(st.binary(min_size=0, max_size=300))
def test_display_name_is_reversible(raw: bytes) -> None:
    shown = fmt.display_name(raw)
    assert shown.isprintable()
    assert fmt.parse_display_name(shown) == raw


def test_display_name_keeps_distinct_names_distinct() -> None:
    names = ["é".encode(), b"\xe9", rb"\xe9", b"a\nb", rb"a\nb"]
    assert len({fmt.display_name(n) for n in names}) == len(names)
    assert fmt.display_name("日本".encode()) == "日本"
