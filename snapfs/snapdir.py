"""snapdir interop: its manifest, its snapshot ID and its store layout.

The ``snapdir`` PyPI package (a Rust tool with Python bindings) describes a
tree as one flat text manifest and stores every file whole, addressed by its
BLAKE3. This module reproduces that format exactly, without depending on the
package, so snapfs can compute ``snapdir.id(PATH)`` and read a store that
snapdir wrote. The rules, quirks included, are written down in
``docs/SNAPDIR.md``; the tests compare every one of them with the real package.

In short:

- manifest line: ``KIND PERMS CHECKSUM SIZE PATH`` (``F`` or ``D``; ``%o`` of
  ``st_mode & 0o7777``; lowercase hex BLAKE3; decimal; ``./``-relative path,
  directories ending in ``/``), sorted by the UTF-8 bytes of PATH.
- a directory's checksum is BLAKE3 of its direct children's checksums, sorted,
  deduplicated and concatenated as hex; its size is the sum of theirs.
- symlinks are followed: type, content and checksum come from the target, but
  PERMS and (for files) SIZE come from the link's own ``lstat``.
- snapshot ID = BLAKE3 of the manifest lines with ``#`` comment lines removed,
  each line ending in ``\\n`` (so the text ends with one newline).
- store keys: ``.manifests/iii/iii/iii/<rest>`` and ``.objects/ccc/ccc/ccc/<rest>``.

Everything here is synchronous. The walk hashes files in a small thread pool
(BLAKE3 releases the GIL); all other functions are pure or do one store call,
and are safe from any thread.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import re
import stat
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import FormatError, IntegrityError, NotFoundError, SnapfsError, UsageError
from .hashing import hash_bytes, is_object_id, new_hasher

if TYPE_CHECKING:
    from .store.base import Store

log = logging.getLogger(__name__)

KIND_FILE = "file"
KIND_DIR = "dir"

MANIFESTS_PREFIX = ".manifests/"
OBJECTS_PREFIX = ".objects/"

#: BLAKE3 of no bytes: the checksum of an empty file and of an empty directory.
EMPTY_CHECKSUM = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"

# Errors that make snapdir silently drop a symlink from the walk (dangling
# link, link loop, or more than 40 links on the way). Anything else aborts.
_SKIPPED_LINK_ERRNOS = frozenset({errno.ENOENT, errno.ELOOP})

_READ_BLOCK = 1 << 20
_MMAP_MIN = 8 << 20  # the size from which hashing.hash_bytes uses threads
_HASH_WORKERS = max(2, min(8, (os.cpu_count() or 2) * 2))

_CHECKSUM_RE = re.compile(r"[0-9a-f]{64}")
_PERMS_RE = re.compile(r"0|[1-7][0-7]{0,3}")
_SIZE_RE = re.compile(r"0|[1-9][0-9]{0,19}")
_MAX_SIZE = (1 << 64) - 1
_SHARD_KEY_RE = re.compile(r"([0-9a-f]{3})/([0-9a-f]{3})/([0-9a-f]{3})/([0-9a-f]{55})")


@dataclass(frozen=True, slots=True)
class SnapdirEntry:
    """One manifest line.

    ``path`` is relative and slash-separated, without snapdir's ``./`` prefix
    or a directory's trailing ``/``; the root is ``""``.
    """

    path: str
    kind: str  # KIND_FILE or KIND_DIR
    permissions: int  # st_mode & 0o7777 as snapdir recorded it (0o777 for a followed symlink)
    checksum: str
    size: int

    @property
    def manifest_path(self) -> str:
        """The PATH field as snapdir writes it: ``./``, ``./a/``, ``./a/f``."""
        if not self.path:
            return "./"
        return "./" + self.path + ("/" if self.kind == KIND_DIR else "")

    @property
    def executable(self) -> bool:
        return bool(self.permissions & 0o111)

    def line(self) -> str:
        kind = "D" if self.kind == KIND_DIR else "F"
        return f"{kind} {self.permissions:o} {self.checksum} {self.size} {self.manifest_path}"


# -- computing a manifest from a tree -----------------------------------------


@dataclass(slots=True)
class _Node:
    path: str  # relative, as in SnapdirEntry
    fs_path: str
    is_dir: bool
    permissions: int
    size: int  # files: lstat size; dirs: filled in bottom-up
    checksum: str = ""
    children: list[_Node] | None = None


def _normalize_root(path: str) -> str:
    """The root as Rust's ``Path::components`` sees it.

    snapdir ``lstat``s this form for the root's permissions, so empty and ``.``
    components and trailing slashes must go: ``link/`` and ``link/.`` both
    report the symlink's own 777, as snapdir does.
    """
    parts = [part for part in path.split("/") if part not in ("", ".")]
    if path.startswith("/"):
        return "/" + "/".join(parts)
    return "/".join(parts) or "."


def _check_utf8(fs_path: str) -> None:
    try:
        fs_path.encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(fs_path).decode("utf-8", "backslashreplace")
        raise UsageError(f"{shown}: path is not valid UTF-8 (snapdir cannot describe it)") from None


def _os_error(fs_path: str, exc: OSError) -> SnapfsError:
    return SnapfsError(f"{fs_path}: {exc.strerror or exc}")


def _walk(root: str) -> tuple[_Node, list[_Node], list[_Node]]:
    """Stat the whole tree: (root, every directory, each listed after its parent; every file)."""
    root_fs = _normalize_root(root)
    try:
        root_st = os.stat(root_fs)
        root_lst = os.lstat(root_fs)
    except FileNotFoundError as exc:
        raise UsageError(f"{root}: no such directory") from exc
    except OSError as exc:
        raise _os_error(root, exc) from exc
    if not stat.S_ISDIR(root_st.st_mode):
        raise UsageError(f"{root}: not a directory")

    top = _Node("", root_fs, True, root_lst.st_mode & 0o7777, 0, children=[])
    dirs = [top]
    files: list[_Node] = []
    stack = [top]
    while stack:
        parent = stack.pop()
        try:
            with os.scandir(parent.fs_path) as it:
                listing = list(it)
        except OSError as exc:
            raise _os_error(parent.fs_path, exc) from exc
        for entry in listing:
            # Joined by hand, never resolved: a link loop must reach the
            # kernel's 40-link limit (ELOOP) exactly where it does for snapdir.
            fs_path = parent.fs_path + "/" + entry.name if parent.fs_path != "/" else "/" + entry.name
            _check_utf8(fs_path)
            is_link = False
            try:
                is_link = entry.is_symlink()
                lst = entry.stat(follow_symlinks=False)
                st = os.stat(fs_path) if is_link else lst
            except OSError as exc:
                if is_link and exc.errno in _SKIPPED_LINK_ERRNOS:
                    log.debug("snapdir walk: skipping unresolvable symlink %s (%s)", fs_path, exc.strerror)
                    continue
                raise _os_error(fs_path, exc) from exc
            path = entry.name if not parent.path else parent.path + "/" + entry.name
            if stat.S_ISDIR(st.st_mode):
                node = _Node(path, fs_path, True, lst.st_mode & 0o7777, 0, children=[])
                dirs.append(node)
                stack.append(node)
            elif stat.S_ISREG(st.st_mode):
                # Size from lstat: a followed symlink records the length of
                # its target path, not of the content (a snapdir quirk).
                node = _Node(path, fs_path, False, lst.st_mode & 0o7777, lst.st_size)
                files.append(node)
            else:
                continue  # fifos, sockets, devices: snapdir leaves them out
            assert parent.children is not None
            parent.children.append(node)
    return top, dirs, files


def _hash_file(fs_path: str) -> str:
    try:
        with open(fs_path, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            if size < _MMAP_MIN:
                # One read and one hash call: per-file overhead is what
                # limits trees of many small files.
                data = f.read()
                if len(data) == size:
                    return hash_bytes(data)
                f.seek(0)  # the file changed size under us: fall back to streaming
            else:
                # hash_bytes spreads inputs this large over blake3's threads.
                with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                    return hash_bytes(mapped)
            hasher = new_hasher()
            while block := f.read(_READ_BLOCK):
                hasher.update(block)
            return hasher.hexdigest()
    except (OSError, ValueError) as exc:  # ValueError: mmap of a file truncated meanwhile
        raise SnapfsError(f"{fs_path}: cannot read: {getattr(exc, 'strerror', None) or exc}") from exc


def _directory_checksum(child_checksums: Iterable[str]) -> str:
    return hash_bytes("".join(sorted(set(child_checksums))).encode("ascii"))


def snapdir_entries(path: str | os.PathLike[str]) -> list[SnapdirEntry]:
    """The entries of ``snapdir.manifest(path)`` (default options), in manifest order."""
    root = os.fspath(path)
    top, dirs, files = _walk(root)
    if files:
        with ThreadPoolExecutor(max_workers=min(_HASH_WORKERS, len(files))) as pool:
            for node, checksum in zip(files, pool.map(_hash_file, [f.fs_path for f in files]), strict=True):
                node.checksum = checksum
    # Every directory is listed after its parent, so the reverse finishes
    # children before their parent.
    for node in reversed(dirs):
        assert node.children is not None
        node.checksum = _directory_checksum(child.checksum for child in node.children)
        node.size = sum(child.size for child in node.children)
    entries = [
        SnapdirEntry(n.path, KIND_DIR if n.is_dir else KIND_FILE, n.permissions, n.checksum, n.size)
        for n in (*dirs, *files)
    ]
    entries.sort(key=lambda e: e.manifest_path.encode("utf-8"))
    log.debug("snapdir manifest of %s: %d dirs, %d files", root, len(dirs), len(files))
    return entries


def render_manifest(entries: Iterable[SnapdirEntry]) -> bytes:
    """The manifest text snapdir stores: one line per entry, each ending in ``\\n``."""
    return "".join(entry.line() + "\n" for entry in entries).encode("utf-8")


def snapdir_manifest(path: str | os.PathLike[str]) -> bytes:
    """The manifest snapdir would store for ``path``.

    This is ``snapdir.manifest(path).raw`` plus the final newline, i.e. the
    exact bytes of the ``.manifests/…`` object ``snapdir.push`` writes.
    """
    return render_manifest(snapdir_entries(path))


def snapdir_id(path: str | os.PathLike[str]) -> str:
    """Exactly what ``await snapdir.id(path)`` returns."""
    return hash_bytes(snapdir_manifest(path))


# -- the ID of a stored manifest ------------------------------------------------


def _strip_comments(data: bytes) -> bytes:
    if not data.startswith(b"#") and b"\n#" not in data:
        return data
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the text ends in a newline
    kept = [line + b"\n" for line in lines if not line.startswith(b"#")]
    if tail and not tail.startswith(b"#"):
        kept.append(tail)
    return b"".join(kept)


def manifest_id(manifest: bytes | str) -> str:
    """The snapshot ID of stored manifest text: BLAKE3 with ``#`` lines removed."""
    data = manifest.encode("utf-8") if isinstance(manifest, str) else bytes(manifest)
    return hash_bytes(_strip_comments(data))


def verify_manifest_id(snapdir_id: str, manifest: bytes | str) -> None:
    """Raise IntegrityError unless ``manifest`` hashes to ``snapdir_id``.

    Stricter than snapdir, which re-sorts and re-renders what it parsed before
    hashing and so also accepts unsorted, CRLF or blank-line variants of a
    manifest. snapdir never writes those; we refuse them, so the bytes we parse
    are exactly the bytes the ID names.
    """
    actual = manifest_id(manifest)
    if actual != snapdir_id:
        raise IntegrityError(f"snapdir manifest {snapdir_id}: content hashes to {actual}")


# -- parsing a stored manifest ----------------------------------------------------


def _line_error(lineno: int, line: str, problem: str) -> FormatError:
    shown = line if len(line) <= 120 else line[:117] + "..."
    return FormatError(f"snapdir manifest line {lineno}: {problem}: {shown!r}")


def _parse_path(lineno: int, line: str, raw_path: str, kind: str) -> str:
    if "\0" in raw_path:
        raise _line_error(lineno, line, "path contains NUL")
    if raw_path.startswith("/"):
        raise _line_error(lineno, line, "absolute path (only ./-relative manifests can be read)")
    if not raw_path.startswith("./"):
        raise _line_error(lineno, line, "path does not start with ./")
    if raw_path == "./" and kind == KIND_DIR:
        return ""
    rel = raw_path[2:]
    if kind == KIND_DIR:
        if not raw_path.endswith("/"):
            raise _line_error(lineno, line, "directory path does not end with /")
        rel = rel[:-1]
    elif raw_path.endswith("/"):
        raise _line_error(lineno, line, "file path ends with /")
    for part in rel.split("/"):
        if part in ("", ".", ".."):
            raise _line_error(lineno, line, f"path has an empty, '.' or '..' component ({part!r})")
    return rel


def _parse_line(lineno: int, line: str) -> SnapdirEntry:
    fields = line.split(" ", 4)
    if len(fields) != 5:
        raise _line_error(lineno, line, "expected 'KIND PERMS CHECKSUM SIZE PATH'")
    kind_field, perms, checksum, size, raw_path = fields
    if kind_field == "F":
        kind = KIND_FILE
    elif kind_field == "D":
        kind = KIND_DIR
    else:
        raise _line_error(lineno, line, f"kind {kind_field!r} is neither F nor D")
    if not _PERMS_RE.fullmatch(perms):
        raise _line_error(lineno, line, f"permissions {perms!r} are not canonical octal up to 7777")
    if not _CHECKSUM_RE.fullmatch(checksum):
        raise _line_error(lineno, line, "checksum is not 64 lowercase hex digits")
    if not _SIZE_RE.fullmatch(size) or int(size) > _MAX_SIZE:
        raise _line_error(lineno, line, f"size {size!r} is not a canonical unsigned 64-bit integer")
    rel = _parse_path(lineno, line, raw_path, kind)
    return SnapdirEntry(rel, kind, int(perms, 8), checksum, int(size))


def parse_manifest(manifest: bytes | str, *, check_tree: bool = True) -> list[SnapdirEntry]:
    """Parse stored manifest text strictly; hostile input raises FormatError.

    Accepted: snapdir's own output, plus ``#`` comment lines (which the ID
    ignores). Refused: bad UTF-8, a missing final newline, blank lines, any
    malformed field, absolute paths, NUL, empty/``.``/``..`` components,
    duplicate paths, a name that is both a file and a directory, unsorted
    lines, an entry whose parent directory is not listed, and a first entry
    other than the root ``./``. With ``check_tree`` every directory's checksum
    and size must also match its children, so a directory line cannot lie.
    """
    if isinstance(manifest, str):
        text = manifest
    else:
        try:
            text = bytes(manifest).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise FormatError(f"snapdir manifest is not valid UTF-8 (byte {exc.start})") from None
    if not text:
        raise FormatError("snapdir manifest is empty")
    if not text.endswith("\n"):
        raise FormatError("snapdir manifest does not end with a newline")

    entries: list[SnapdirEntry] = []
    dirs: set[str] = set()
    names: set[str] = set()
    previous = b""
    for lineno, line in enumerate(text[:-1].split("\n"), start=1):
        if line.startswith("#"):
            continue
        if not line:
            raise _line_error(lineno, line, "empty line")
        entry = _parse_line(lineno, line)
        key = entry.manifest_path.encode("utf-8")
        if not entries:
            if entry.path or entry.kind != KIND_DIR:
                raise _line_error(lineno, line, "the first entry must be the root directory ./")
        elif key == previous:
            raise _line_error(lineno, line, "duplicate path")
        elif key < previous:
            raise _line_error(lineno, line, "entries are not sorted by path")
        elif entry.path in names:
            raise _line_error(lineno, line, "path is listed both as a file and as a directory")
        else:
            parent = entry.path.rpartition("/")[0]
            if parent not in dirs:
                raise _line_error(lineno, line, "parent directory is not listed before it")
        previous = key
        names.add(entry.path)
        if entry.kind == KIND_DIR:
            dirs.add(entry.path)
        entries.append(entry)
    if not entries:
        raise FormatError("snapdir manifest has no entries")
    if check_tree:
        check_manifest_tree(entries)
    return entries


def check_manifest_tree(entries: list[SnapdirEntry]) -> None:
    """Raise FormatError unless every directory's checksum and size follow from its children.

    ``entries`` must be a parsed manifest (root first, parents listed).
    """
    children: dict[str, list[SnapdirEntry]] = {e.path: [] for e in entries if e.kind == KIND_DIR}
    for entry in entries:
        if entry.path:
            children[entry.path.rpartition("/")[0]].append(entry)
    for entry in entries:
        if entry.kind != KIND_DIR:
            continue
        kids = children[entry.path]
        expected = _directory_checksum(kid.checksum for kid in kids)
        if entry.checksum != expected:
            raise FormatError(
                f"snapdir manifest: directory {entry.manifest_path!r} has checksum {entry.checksum}, "
                f"but its children give {expected}"
            )
        total = sum(kid.size for kid in kids)
        if entry.size != total:
            raise FormatError(
                f"snapdir manifest: directory {entry.manifest_path!r} has size {entry.size}, "
                f"but its children add up to {total}"
            )


# -- store layout -------------------------------------------------------------------


def _sharded(kind: str, hex_id: str) -> str:
    if not is_object_id(hex_id):
        raise UsageError(f"not a snapdir {kind}: {hex_id!r} (expected 64 lowercase hex digits)")
    return f"{hex_id[:3]}/{hex_id[3:6]}/{hex_id[6:9]}/{hex_id[9:]}"


def manifest_key(snapdir_id: str) -> str:
    """Store key of a snapshot's manifest, relative to the store prefix."""
    return MANIFESTS_PREFIX + _sharded("snapshot ID", snapdir_id)


def object_key(checksum: str) -> str:
    """Store key of a file's content, relative to the store prefix."""
    return OBJECTS_PREFIX + _sharded("object checksum", checksum)


def _unshard(prefix: str, key: str) -> str | None:
    if not key.startswith(prefix):
        return None
    match = _SHARD_KEY_RE.fullmatch(key[len(prefix) :])
    return "".join(match.groups()) if match else None


def snapshot_id_from_key(key: str) -> str | None:
    """The snapshot ID a ``.manifests/…`` key names, or None for any other key."""
    return _unshard(MANIFESTS_PREFIX, key)


def checksum_from_key(key: str) -> str | None:
    """The checksum an ``.objects/…`` key names, or None for any other key."""
    return _unshard(OBJECTS_PREFIX, key)


# -- verification and store reads ---------------------------------------------------


def verify_object(checksum: str, data: bytes | bytearray | memoryview) -> None:
    """Raise IntegrityError unless ``data`` hashes to ``checksum``."""
    actual = hash_bytes(data)
    if actual != checksum:
        raise IntegrityError(f"snapdir object {checksum}: content hashes to {actual}")


def verify_object_chunks(checksum: str, chunks: Iterable[bytes | bytearray | memoryview]) -> int:
    """Streaming form of verify_object, for objects too large to hold; returns the size."""
    hasher = new_hasher()
    total = 0
    for chunk in chunks:
        hasher.update(chunk)
        total += len(chunk)
    actual = hasher.hexdigest()
    if actual != checksum:
        raise IntegrityError(f"snapdir object {checksum}: content hashes to {actual}")
    return total


def read_manifest(store: Store, snapdir_id: str) -> list[SnapdirEntry]:
    """Fetch, verify and parse one snapshot's manifest from a snapdir store."""
    key = manifest_key(snapdir_id)
    try:
        data = store.get(key)
    except NotFoundError as exc:
        raise NotFoundError(f"snapdir snapshot {snapdir_id}: no manifest at {key} in {store.url}") from exc
    verify_manifest_id(snapdir_id, data)
    return parse_manifest(data)


def read_object(store: Store, checksum: str) -> bytes:
    """Fetch one whole object and verify it before returning a byte of it.

    There is deliberately no expected size: an ``F`` line's SIZE is the length
    of the symlink's target path when the entry was a followed symlink, so
    only the object itself knows its length.
    """
    key = object_key(checksum)
    try:
        data = store.get(key)
    except NotFoundError as exc:
        raise NotFoundError(f"snapdir object {checksum}: missing at {key} in {store.url}") from exc
    verify_object(checksum, data)
    return data


def list_snapshot_ids(store: Store) -> Iterator[str]:
    """Every snapshot ID with a manifest in the store (unverified; keys only)."""
    for info in store.list(MANIFESTS_PREFIX):
        snapshot = snapshot_id_from_key(info.key)
        if snapshot is None:
            log.debug("snapdir store %s: ignoring unexpected key %s", store.url, info.key)
            continue
        yield snapshot
