"""Canonical encodings of trees, chunk lists and records (pure, no I/O).

docs/FORMAT.md is the specification; this module is its reference
implementation. Every decoder validates everything it reads and raises
FormatError for any input that is not the one canonical encoding a correct
encoder would produce, so hostile store content ends in a clean error, never a
crash, a hang or a path outside the snapshot.

Integers are big-endian. Object IDs travel as lowercase hex strings in Python
and as 32 raw bytes on the wire.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .errors import FormatError
from .hashing import DIGEST_LEN, hash_bytes

FORMAT_VERSION = 1

TREE_MAGIC = b"SNAPTREE"
CHUNKLIST_MAGIC = b"SNAPLIST"

KIND_FILE = "f"
KIND_DIR = "d"
KIND_SYMLINK = "l"
_KINDS = {ord(KIND_FILE): KIND_FILE, ord(KIND_DIR): KIND_DIR, ord(KIND_SYMLINK): KIND_SYMLINK}

FLAG_EXEC = 0x01

# Limits that keep hostile input bounded. Chosen above anything a real
# filesystem produces (NAME_MAX 255, PATH_MAX 4096).
MAX_NAME_LEN = 255
MAX_TARGET_LEN = 4095
MAX_ENTRIES = 1 << 24
MAX_CHUNK_SIZE = 4 << 20
MAX_FILE_SIZE = 1 << 50  # 1 PiB
MAX_DEPTH = 1024
# A file with more chunks than this keeps its chunk list in a separate object,
# so that listing a directory never drags in megabytes of chunk IDs.
INLINE_MAX_CHUNKS = 1024
MAX_CHUNKLIST = (MAX_FILE_SIZE // (256 << 10)) + 1

_TREE_HEADER = struct.Struct(">8sBI")
_ENTRY_HEAD = struct.Struct(">BBH")
_U64 = struct.Struct(">Q")
_U32 = struct.Struct(">I")
_U16 = struct.Struct(">H")
_CHUNK = struct.Struct(">32sI")

ChunkRef = tuple[str, int]  # (chunk_id, length)


def validate_name(name: bytes) -> None:
    """Raise FormatError unless ``name`` is a safe single path component."""
    if not isinstance(name, bytes):
        raise FormatError(f"entry name must be bytes, not {type(name).__name__}")
    if not name:
        raise FormatError("empty entry name")
    if len(name) > MAX_NAME_LEN:
        raise FormatError(f"entry name longer than {MAX_NAME_LEN} bytes: {display_name(name[:40])}...")
    if name in (b".", b".."):
        raise FormatError(f"entry name {name.decode()!r} is not allowed")
    if b"/" in name or b"\x00" in name:
        raise FormatError(f"entry name contains '/' or NUL: {display_name(name)}")


_SHORT_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}
_SHORT_UNESCAPES = {"\\": b"\\", "n": b"\n", "t": b"\t", "r": b"\r"}


def display_name(name: bytes) -> str:
    r"""A printable, reversible form of a raw name, for listings and messages.

    Printable Unicode stays as it is. A backslash becomes ``\\``; newline, tab
    and carriage return become ``\n``, ``\t``, ``\r``; bytes that are not valid
    UTF-8 and other ASCII control characters become ``\xNN``; other unprintable
    characters ``\uNNNN`` or ``\UNNNNNNNN``. Every escape has one meaning, so
    parse_display_name recovers the raw name.
    """
    out = []
    for char in name.decode("utf-8", "surrogateescape"):
        code = ord(char)
        if char in _SHORT_ESCAPES:
            out.append(_SHORT_ESCAPES[char])
        elif 0xDC80 <= code <= 0xDCFF:  # a byte that is not valid UTF-8
            out.append(f"\\x{code - 0xDC00:02x}")
        elif char.isprintable():
            out.append(char)
        elif code < 0x80:
            out.append(f"\\x{code:02x}")
        elif code <= 0xFFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    return "".join(out)


def parse_display_name(text: str) -> bytes:
    """The inverse of display_name."""
    out = bytearray()
    i = 0
    while i < len(text):
        char = text[i]
        if char != "\\":
            out += char.encode("utf-8")
            i += 1
            continue
        kind = text[i + 1 : i + 2]
        if kind in _SHORT_UNESCAPES:
            out += _SHORT_UNESCAPES[kind]
            i += 2
        elif kind == "x":
            out.append(int(text[i + 2 : i + 4], 16))
            i += 4
        elif kind in ("u", "U"):
            width = 4 if kind == "u" else 8
            out += chr(int(text[i + 2 : i + 2 + width], 16)).encode("utf-8")
            i += 2 + width
        else:
            raise FormatError(f"invalid escape at {i} in {text!r}")
    return bytes(out)


@dataclass(frozen=True, slots=True)
class Entry:
    """One directory entry. Exactly one of chunks/chunklist_id/tree_id/target is meaningful, by kind."""

    name: bytes
    kind: str
    size: int
    executable: bool = False
    chunks: tuple[ChunkRef, ...] = ()
    chunklist_id: str | None = None
    chunk_count: int = 0
    tree_id: str | None = None
    target: bytes | None = None
    subdirs: int = 0  # dirs only: how many directories it holds (for nlink, without fetching it)

    @property
    def is_dir(self) -> bool:
        return self.kind == KIND_DIR

    @property
    def is_file(self) -> bool:
        return self.kind == KIND_FILE

    @property
    def is_symlink(self) -> bool:
        return self.kind == KIND_SYMLINK

    @property
    def object_id(self) -> str | None:
        """The ID this entry's content is addressed by, for diffs: tree, chunk list or None."""
        return self.tree_id or self.chunklist_id


def file_entry(
    name: bytes, size: int, chunks: Sequence[ChunkRef], *, executable: bool
) -> tuple[Entry, bytes | None]:
    """Build a file entry; returns (entry, chunk-list object bytes or None)."""
    if len(chunks) > INLINE_MAX_CHUNKS:
        blob = encode_chunklist(chunks)
        return (
            Entry(name, KIND_FILE, size, executable, (), hash_bytes(blob), len(chunks)),
            blob,
        )
    return Entry(name, KIND_FILE, size, executable, tuple(chunks), None, len(chunks)), None


def dir_entry(name: bytes, tree_id: str, total_size: int, subdirs: int) -> Entry:
    return Entry(name, KIND_DIR, total_size, tree_id=tree_id, subdirs=subdirs)


def symlink_entry(name: bytes, target: bytes) -> Entry:
    return Entry(name, KIND_SYMLINK, len(target), target=target)


# --- trees -----------------------------------------------------------------


def encode_tree(entries: Iterable[Entry]) -> bytes:
    """The canonical encoding of one directory. Entries are sorted here."""
    ordered = sorted(entries, key=lambda e: e.name)
    parts = [_TREE_HEADER.pack(TREE_MAGIC, FORMAT_VERSION, len(ordered))]
    previous = None
    for entry in ordered:
        validate_name(entry.name)
        if entry.name == previous:
            raise FormatError(f"duplicate entry name {display_name(entry.name)}")
        previous = entry.name
        flags = FLAG_EXEC if (entry.kind == KIND_FILE and entry.executable) else 0
        parts.append(_ENTRY_HEAD.pack(ord(entry.kind), flags, len(entry.name)))
        parts.append(entry.name)
        parts.append(_U64.pack(entry.size))
        if entry.kind == KIND_FILE:
            if entry.chunklist_id is not None:
                parts.append(b"\x01" + bytes.fromhex(entry.chunklist_id) + _U32.pack(entry.chunk_count))
            else:
                parts.append(b"\x00" + _U32.pack(len(entry.chunks)))
                parts.extend(_CHUNK.pack(bytes.fromhex(cid), length) for cid, length in entry.chunks)
        elif entry.kind == KIND_DIR:
            assert entry.tree_id is not None
            parts.append(bytes.fromhex(entry.tree_id) + _U32.pack(entry.subdirs))
        elif entry.kind == KIND_SYMLINK:
            assert entry.target is not None
            parts.append(_U16.pack(len(entry.target)) + entry.target)
        else:
            raise FormatError(f"unknown entry kind {entry.kind!r}")
    return b"".join(parts)


class _Reader:
    __slots__ = ("data", "pos", "what")

    def __init__(self, data: bytes, what: str) -> None:
        self.data = memoryview(data)
        self.pos = 0
        self.what = what

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise FormatError(f"{self.what}: truncated at byte {self.pos}")
        out = bytes(self.data[self.pos : end])
        self.pos = end
        return out

    def unpack(self, st: struct.Struct) -> tuple:
        end = self.pos + st.size
        if end > len(self.data):
            raise FormatError(f"{self.what}: truncated at byte {self.pos}")
        out = st.unpack_from(self.data, self.pos)
        self.pos = end
        return out

    def done(self) -> None:
        if self.pos != len(self.data):
            raise FormatError(f"{self.what}: {len(self.data) - self.pos} trailing bytes")


def _check_version(magic: bytes, version: int, expected: bytes, what: str) -> None:
    if magic != expected:
        raise FormatError(f"{what}: not a snapfs object (bad magic)")
    if version != FORMAT_VERSION:
        raise FormatError(
            f"{what}: unknown format version {version} (this snapfs reads version {FORMAT_VERSION})"
        )


def _read_chunks(reader: _Reader, count: int, size: int, what: str) -> tuple[ChunkRef, ...]:
    chunks = []
    total = 0
    for _ in range(count):
        digest, length = reader.unpack(_CHUNK)
        if not 0 < length <= MAX_CHUNK_SIZE:
            raise FormatError(f"{what}: chunk length {length} out of range")
        total += length
        chunks.append((digest.hex(), length))
    if total != size:
        raise FormatError(f"{what}: chunk sizes add up to {total}, not the file size {size}")
    return tuple(chunks)


def decode_tree(data: bytes, what: str = "tree") -> list[Entry]:
    """Decode and fully validate a tree object."""
    reader = _Reader(data, what)
    magic, version, count = reader.unpack(_TREE_HEADER)
    _check_version(magic, version, TREE_MAGIC, what)
    if count > MAX_ENTRIES:
        raise FormatError(f"{what}: {count} entries is more than the limit {MAX_ENTRIES}")
    entries: list[Entry] = []
    previous: bytes | None = None
    for _ in range(count):
        kind_byte, flags, name_len = reader.unpack(_ENTRY_HEAD)
        kind = _KINDS.get(kind_byte)
        if kind is None:
            raise FormatError(f"{what}: unknown entry kind byte {kind_byte}")
        name = reader.take(name_len)
        try:
            validate_name(name)
        except FormatError as exc:
            # Name the tree too: a hostile name must be traceable to its object.
            raise FormatError(f"{what}: {exc}") from None
        if previous is not None and name <= previous:
            raise FormatError(f"{what}: entries not strictly sorted or duplicated at {display_name(name)}")
        previous = name
        entry_what = f"{what}: entry {display_name(name)}"
        if flags & ~FLAG_EXEC or (flags and kind != KIND_FILE):
            raise FormatError(f"{entry_what}: invalid flags {flags:#x}")
        (size,) = reader.unpack(_U64)
        if kind == KIND_FILE:
            if size > MAX_FILE_SIZE:
                raise FormatError(f"{entry_what}: absurd file size {size}")
            layout = reader.take(1)[0]
            if layout == 0:
                (n,) = reader.unpack(_U32)
                if n > INLINE_MAX_CHUNKS:
                    raise FormatError(f"{entry_what}: {n} inline chunks (limit {INLINE_MAX_CHUNKS})")
                chunks = _read_chunks(reader, n, size, entry_what)
                entries.append(Entry(name, kind, size, bool(flags), chunks, None, n))
            elif layout == 1:
                list_id = reader.take(DIGEST_LEN).hex()
                (n,) = reader.unpack(_U32)
                if not INLINE_MAX_CHUNKS < n <= MAX_CHUNKLIST or not n <= size <= n * MAX_CHUNK_SIZE:
                    raise FormatError(f"{entry_what}: chunk count {n} does not fit size {size}")
                entries.append(Entry(name, kind, size, bool(flags), (), list_id, n))
            else:
                raise FormatError(f"{entry_what}: unknown chunk layout {layout}")
        elif kind == KIND_DIR:
            if size > MAX_FILE_SIZE * 1024:
                raise FormatError(f"{entry_what}: absurd directory size {size}")
            tree_id = reader.take(DIGEST_LEN).hex()
            (subdirs,) = reader.unpack(_U32)
            if subdirs > MAX_ENTRIES:
                raise FormatError(f"{entry_what}: absurd subdirectory count {subdirs}")
            entries.append(Entry(name, kind, size, tree_id=tree_id, subdirs=subdirs))
        else:
            (target_len,) = reader.unpack(_U16)
            target = reader.take(target_len)
            if not 0 < target_len <= MAX_TARGET_LEN or b"\x00" in target:
                raise FormatError(f"{entry_what}: invalid symlink target")
            if size != target_len:
                raise FormatError(f"{entry_what}: symlink size {size} is not its target length")
            entries.append(Entry(name, kind, size, target=target))
    reader.done()
    return entries


# --- chunk lists -----------------------------------------------------------


def encode_chunklist(chunks: Sequence[ChunkRef]) -> bytes:
    parts = [CHUNKLIST_MAGIC, bytes([FORMAT_VERSION]), _U32.pack(len(chunks))]
    parts.extend(_CHUNK.pack(bytes.fromhex(cid), length) for cid, length in chunks)
    return b"".join(parts)


def decode_chunklist(data: bytes, count: int, size: int, what: str = "chunk list") -> tuple[ChunkRef, ...]:
    """Decode a chunk-list object and check it against the entry that points to it."""
    reader = _Reader(data, what)
    magic = reader.take(8)
    version = reader.take(1)[0]
    _check_version(magic, version, CHUNKLIST_MAGIC, what)
    (n,) = reader.unpack(_U32)
    if n != count:
        raise FormatError(f"{what}: holds {n} chunks, the tree says {count}")
    chunks = _read_chunks(reader, n, size, what)
    reader.done()
    return chunks


# --- records ---------------------------------------------------------------

RECORD_FORMAT = "snapfs-record/1"


def encode_record(record: dict) -> bytes:
    """Canonical JSON: sorted keys, no whitespace, UTF-8, no NaN."""
    try:
        return json.dumps(
            record, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        ).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise FormatError(f"record cannot be encoded: {exc}") from exc


def decode_record(data: bytes, what: str = "record") -> dict:
    try:
        record = json.loads(data.decode("utf-8"))
    except RecursionError as exc:
        # json recurses per nesting level: hostile "[[[[..." must not escape as a crash.
        raise FormatError(f"{what}: JSON nested too deeply") from exc
    except (UnicodeDecodeError, ValueError) as exc:
        raise FormatError(f"{what}: not valid JSON: {exc}") from exc
    if not isinstance(record, dict):
        raise FormatError(f"{what}: not a JSON object")
    if record.get("format") != RECORD_FORMAT:
        raise FormatError(f"{what}: unknown record format {record.get('format')!r}")
    return record


# --- packs ------------------------------------------------------------------
#
# On S3 a push stores small objects several hundred to a pack, because a cold
# read of many small files costs one GET each otherwise (docs/FORMAT.md §11a;
# snapfs.packs writes and reads them). A pack is ``packs/ab/cdef…``, keyed by the BLAKE3 of its bytes:
#
#     "SNAPPACK" | version u8 | count u32 | count x (id 32 bytes | length u32) | members' bytes
#
# Each packed object keeps its key, ``objects/ab/cdef…``, which then holds a
# 57-byte reference instead of the object's bytes:
#
#     "SNAPPREF" | version u8 | pack id 32 bytes | offset u64 | length u32 | pack size u32
#
# So every existing question ("is this object stored?", "which objects are
# there?") keeps its answer, and the object's ID is still the hash of its own
# bytes: a reader follows the reference and hashes what it finds there. A
# reference is never trusted: it can only point a reader at bytes that must
# hash to the ID it asked for.

PACK_MAGIC = b"SNAPPACK"
PACK_REF_MAGIC = b"SNAPPREF"
_PACK_HEADER = struct.Struct(">8sBI")
_PACK_REF = struct.Struct(">8sB32sQII")
PACK_REF_SIZE = _PACK_REF.size
PACK_HEADER_SIZE = _PACK_HEADER.size
#: Bounds for hostile packs: well above what a push writes (packs.PACK_TARGET).
MAX_PACK_SIZE = 16 << 20
MAX_PACK_MEMBERS = 1 << 16


@dataclass(frozen=True)
class PackRef:
    """Where a packed object's bytes are: ``length`` bytes at ``offset`` of a pack."""

    pack_id: str
    offset: int
    length: int
    pack_size: int


def pack_header_size(count: int) -> int:
    return PACK_HEADER_SIZE + count * _CHUNK.size


def encode_pack(members: Sequence[tuple[str, bytes]]) -> tuple[bytes, list[PackRef]]:
    """A pack of ``members`` (id, bytes), in the order given, and a PackRef for each.

    The refs name the pack by its hash, so they come out with it."""
    if not members or len(members) > MAX_PACK_MEMBERS:
        raise ValueError(f"a pack holds 1 to {MAX_PACK_MEMBERS} objects, not {len(members)}")
    if len({object_id for object_id, _ in members}) != len(members):
        raise ValueError("a pack holds each object once")
    parts = [_PACK_HEADER.pack(PACK_MAGIC, FORMAT_VERSION, len(members))]
    parts += [_CHUNK.pack(bytes.fromhex(object_id), len(data)) for object_id, data in members]
    parts += [data for _, data in members]
    blob = b"".join(parts)
    if len(blob) > MAX_PACK_SIZE:
        raise ValueError(f"a pack is at most {MAX_PACK_SIZE} bytes, not {len(blob)}")
    pack_id = hash_bytes(blob)
    refs = []
    offset = pack_header_size(len(members))
    for _, data in members:
        refs.append(PackRef(pack_id, offset, len(data), len(blob)))
        offset += len(data)
    return blob, refs


def pack_member_count(head: bytes | memoryview, what: str = "pack") -> int:
    """The member count in the first PACK_HEADER_SIZE bytes of a pack, validated."""
    if len(head) < PACK_HEADER_SIZE:
        raise FormatError(f"{what}: truncated header")
    magic, version, count = _PACK_HEADER.unpack_from(head, 0)
    _check_version(magic, version, PACK_MAGIC, what)
    if not 1 <= count <= MAX_PACK_MEMBERS:
        raise FormatError(f"{what}: {count} members (1 to {MAX_PACK_MEMBERS} allowed)")
    return count


def decode_pack_table(data: bytes | memoryview, what: str = "pack") -> list[tuple[str, int, int]]:
    """The (id, offset, length) of every member, from a pack's first
    ``pack_header_size(count)`` bytes (or more), validated."""
    count = pack_member_count(data, what)
    offset = pack_header_size(count)
    if offset > len(data):
        raise FormatError(f"{what}: truncated member table")
    members = []
    seen = set()
    for i in range(count):
        digest, length = _CHUNK.unpack_from(data, PACK_HEADER_SIZE + i * _CHUNK.size)
        if digest in seen:
            raise FormatError(f"{what}: member {digest.hex()} listed twice")
        seen.add(digest)
        members.append((digest.hex(), offset, length))
        offset += length
    if offset > MAX_PACK_SIZE:
        raise FormatError(f"{what}: members add up to {offset} bytes, more than {MAX_PACK_SIZE}")
    return members


def decode_pack(data: bytes | memoryview, what: str = "pack") -> list[tuple[str, int, int]]:
    """The (id, offset, length) of every member of a whole pack, validated.

    Validates the layout only: each member's bytes are checked against its ID
    by the caller, which is the only check that makes them trusted."""
    members = decode_pack_table(data, what)
    _, offset, length = members[-1]
    if offset + length != len(data):
        raise FormatError(f"{what}: members cover {offset + length} bytes, the pack has {len(data)}")
    return members


def encode_pack_ref(ref: PackRef) -> bytes:
    return _PACK_REF.pack(
        PACK_REF_MAGIC, FORMAT_VERSION, bytes.fromhex(ref.pack_id), ref.offset, ref.length, ref.pack_size
    )


def decode_pack_ref(data: bytes, what: str = "object") -> PackRef | None:
    """The PackRef that ``data`` encodes; None if it is not one; FormatError if it is a
    malformed one (the right magic, but a layout no encoder writes)."""
    if len(data) != PACK_REF_SIZE or not data.startswith(PACK_REF_MAGIC):
        return None
    magic, version, digest, offset, length, pack_size = _PACK_REF.unpack(data)
    _check_version(magic, version, PACK_REF_MAGIC, what)
    if not 0 < pack_size <= MAX_PACK_SIZE:
        raise FormatError(f"{what}: reference to a pack of {pack_size} bytes")
    if length < 1 or offset < pack_header_size(1) or offset + length > pack_size:
        raise FormatError(f"{what}: reference to bytes {offset}-{offset + length} of a {pack_size}-byte pack")
    return PackRef(digest.hex(), offset, length, pack_size)


# --- store keys ------------------------------------------------------------


def object_key(object_id: str) -> str:
    return f"objects/{object_id[:2]}/{object_id[2:]}"


def pack_key(pack_id: str) -> str:
    return f"packs/{pack_id[:2]}/{pack_id[2:]}"


def record_key(record_id: str) -> str:
    return f"records/{record_id}"
