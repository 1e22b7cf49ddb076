"""Hostile store content for the hostile-input suite: objects that a malicious or
broken writer could put into a store.

Every object written here hashes to its key, exactly as a real one does, so
BLAKE3 verification passes and only structural validation (snapfs.format's
decoders, the length checks, the symlink rules) stands between the bytes and a
reader. snapfs's own encoder refuses to build most of these (bad names,
duplicates, wrong sizes), so trees are assembled field by field here, following
docs/FORMAT.md §3-§4 literally; nothing is sorted or checked.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from snapfs import format as fmt
from snapfs.hashing import hash_bytes
from snapfs.repo import SNAPSHOT_PREFIX, Repo

ChunkRef = tuple[str, int]


# --- raw encodings (no validation at all) --------------------------------------------


def raw_entry(
    kind: str | int,
    name: bytes,
    size: int,
    body: bytes,
    *,
    flags: int = 0,
    name_len: int | None = None,
) -> bytes:
    """One tree entry: kind, flags, name length, name, size, then ``body`` verbatim."""
    kind_byte = ord(kind) if isinstance(kind, str) else kind
    length = len(name) if name_len is None else name_len
    return struct.pack(">BBH", kind_byte, flags, length) + name + struct.pack(">Q", size) + body


def file_body(chunks: Sequence[ChunkRef], *, count: int | None = None) -> bytes:
    """Inline layout 0: count, then (chunk ID, length) per chunk."""
    n = len(chunks) if count is None else count
    return (
        b"\x00"
        + struct.pack(">I", n)
        + b"".join(bytes.fromhex(c) + struct.pack(">I", n_) for c, n_ in chunks)
    )


def chunklist_body(chunklist_id: str, count: int) -> bytes:
    """Layout 1: a separate chunk-list object with ``count`` chunks."""
    return b"\x01" + bytes.fromhex(chunklist_id) + struct.pack(">I", count)


def dir_body(tree_id: str, subdirs: int = 0) -> bytes:
    return bytes.fromhex(tree_id) + struct.pack(">I", subdirs)


def symlink_body(target: bytes) -> bytes:
    return struct.pack(">H", len(target)) + target


def file_entry(name: bytes, chunks: Sequence[ChunkRef], *, size: int | None = None, flags: int = 0) -> bytes:
    total = sum(n for _, n in chunks) if size is None else size
    return raw_entry("f", name, total, file_body(chunks), flags=flags)


def dir_entry(name: bytes, tree_id: str, *, size: int = 0, subdirs: int = 0) -> bytes:
    return raw_entry("d", name, size, dir_body(tree_id, subdirs))


def symlink_entry(name: bytes, target: bytes) -> bytes:
    return raw_entry("l", name, len(target), symlink_body(target))


def raw_tree(
    entries: Iterable[bytes],
    *,
    count: int | None = None,
    version: int = fmt.FORMAT_VERSION,
    magic: bytes = fmt.TREE_MAGIC,
    trailing: bytes = b"",
) -> bytes:
    """A tree object from pre-encoded entries, in the order given."""
    items = list(entries)
    n = len(items) if count is None else count
    return magic + struct.pack(">BI", version, n) + b"".join(items) + trailing


def raw_chunklist(
    chunks: Sequence[ChunkRef], *, count: int | None = None, version: int = fmt.FORMAT_VERSION
) -> bytes:
    n = len(chunks) if count is None else count
    body = b"".join(bytes.fromhex(c) + struct.pack(">I", length) for c, length in chunks)
    return fmt.CHUNKLIST_MAGIC + struct.pack(">BI", version, n) + body


# --- writing into a store -------------------------------------------------------------


@dataclass
class HostileWriter:
    """Writes objects, markers, records and names straight into a store, bypassing
    every check push makes. Each object lands under the BLAKE3 of its bytes."""

    repo: Repo

    def put(self, data: bytes) -> str:
        object_id = hash_bytes(data)
        self.repo.store.put(fmt.object_key(object_id), data, if_absent=True)
        return object_id

    def put_under(self, object_id: str, data: bytes) -> None:
        """Write ``data`` under a key it does NOT hash to (a broken or lying store)."""
        self.repo.store.put(fmt.object_key(object_id), data)

    def chunk(self, data: bytes) -> ChunkRef:
        return self.put(data), len(data)

    def tree(self, entries: Iterable[bytes], **kwargs) -> str:
        return self.put(raw_tree(entries, **kwargs))

    def mark(self, snapshot_id: str) -> str:
        self.repo.ensure_config()
        self.repo.store.put(SNAPSHOT_PREFIX + snapshot_id, b"", if_absent=True)
        return snapshot_id

    def snapshot(self, entries: Iterable[bytes], **kwargs) -> str:
        """A marked snapshot whose root tree holds ``entries`` as given."""
        return self.mark(self.tree(entries, **kwargs))

    def wrapped(self, hostile_tree_id: str, good: bytes = b"good bytes\n") -> tuple[str, bytes]:
        """A sound root holding ``bad/`` (the hostile tree) and ``good.txt``, so a test
        can show that only the hostile path fails. Returns (snapshot ID, good bytes)."""
        entries = sorted(
            [dir_entry(b"bad", hostile_tree_id), file_entry(b"good.txt", [self.chunk(good)])],
            key=_entry_name,
        )
        return self.snapshot(entries), good

    def record(self, data: dict | bytes) -> str:
        blob = data if isinstance(data, bytes) else json.dumps(data, sort_keys=True).encode()
        record_id = hash_bytes(blob)
        self.repo.store.put(fmt.record_key(record_id), blob)
        return record_id

    def name(self, name: str, pointer: dict | bytes) -> None:
        blob = pointer if isinstance(pointer, bytes) else json.dumps(pointer, sort_keys=True).encode()
        self.repo.store.put("names/" + name, blob)


def _entry_name(encoded: bytes) -> bytes:
    (name_len,) = struct.unpack(">H", encoded[2:4])
    return encoded[4 : 4 + name_len]


def self_referencing_tree(writer: HostileWriter) -> tuple[str, bytes]:
    """Try to build a tree that contains itself.

    A tree's ID is the hash of bytes that include its children's IDs, so a tree
    holding its own ID needs a BLAKE3 fixed point. The best a writer can do is
    hash a version with a placeholder and then store the bytes that name that
    hash under it; those bytes hash to something else. Returns (the ID the
    cycle points at, the bytes stored under it); ``Repo.get_object`` refuses
    them as corrupt, so a reader never walks the loop.
    """
    placeholder = "00" * 32
    first = raw_tree([dir_entry(b"loop", placeholder)])
    cycle_id = hash_bytes(first)
    looping = raw_tree([dir_entry(b"loop", cycle_id)])
    assert hash_bytes(looping) != cycle_id  # the fixed point does not exist
    writer.put_under(cycle_id, looping)
    return cycle_id, looping
