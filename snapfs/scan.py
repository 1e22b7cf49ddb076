"""Turn a local directory into snapfs trees: the snapshot ID without any store.

What the ID covers (docs/FORMAT.md): names, kinds, the executable bit, sizes,
contents, symlink targets and empty directories. Never mtime, owner, inode
numbers, walk order or the machine. Hard links become separate files; FIFOs,
sockets and devices are skipped and reported. Symlinks are stored, not followed.

Files are chunked and hashed in a thread pool (pyfastcdc and blake3 both
release the GIL). Directories are walked sequentially, children before parents.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from . import format as fmt
from .chunking import MIN_SIZE, MappedFile, cut_points
from .errors import SnapfsError, UsageError
from .format import ChunkRef, Entry
from .hashing import hash_bytes

log = logging.getLogger(__name__)

# Files up to this size are read with one read() instead of being mapped.
_SMALL_READ = 1 << 20


@dataclass
class ScanResult:
    root_id: str
    trees: dict[str, bytes] = field(default_factory=dict)  # tree_id -> encoding
    chunklists: dict[str, bytes] = field(default_factory=dict)  # chunklist_id -> encoding
    tree_paths: dict[str, bytes] = field(default_factory=dict)  # tree_id -> a local dir with that content
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    total_bytes: int = 0
    skipped: list[str] = field(default_factory=list)  # special files, as printable paths


class FileChangedError(SnapfsError):
    pass


def hash_file(path: bytes) -> tuple[int, list[ChunkRef], bool]:
    """Chunk and hash one regular file: (size, chunks, executable)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise SnapfsError(f"cannot read {os.fsdecode(path)}: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        executable = bool(st.st_mode & stat.S_IXUSR)
        size = st.st_size
        if size <= _SMALL_READ:
            data = os.read(fd, size + 1)
            if len(data) != size:
                raise FileChangedError(f"{os.fsdecode(path)} changed size while it was read")
            if size <= MIN_SIZE:
                return size, ([(hash_bytes(data), size)] if size else []), executable
            view = memoryview(data)
            return size, [(hash_bytes(view[o : o + n]), n) for o, n in cut_points(view)], executable
        with MappedFile(path, fd=fd) as mapped:
            view = mapped.buffer
            if len(view) != size:
                raise FileChangedError(f"{os.fsdecode(path)} changed size while it was read")
            chunks = [(hash_bytes(view[o : o + n]), n) for o, n in cut_points(view)]
            return size, chunks, executable
    except OSError as exc:
        raise SnapfsError(f"cannot read {os.fsdecode(path)}: {exc.strerror}") from exc
    finally:
        os.close(fd)


def _list_dir(path: bytes) -> list[os.DirEntry]:
    try:
        with os.scandir(path) as it:
            return sorted(it, key=lambda d: d.name)
    except OSError as exc:
        raise SnapfsError(f"cannot list {os.fsdecode(path)}: {exc.strerror}") from exc


def scan(
    root: str | bytes,
    *,
    jobs: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> ScanResult:
    """Build every tree of the directory ``root``; ``progress(n_bytes)`` is called as files are hashed."""
    root_b = os.fsencode(root)
    try:
        st = os.stat(root_b)
    except OSError as exc:
        raise UsageError(f"{os.fsdecode(root_b)}: {exc.strerror}") from exc
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{os.fsdecode(root_b)}: not a directory")

    result = ScanResult(root_id="")
    jobs = jobs or min(8, (os.cpu_count() or 2) * 2)
    # Post-order walk with an explicit stack: depth is bounded by the format, not by Python's recursion.
    # Each frame: [path, pending subdir names, entries built so far, subtree total bytes, depth]
    with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="snapfs-hash") as pool:

        def open_dir(path: bytes, depth: int) -> list:
            if depth > fmt.MAX_DEPTH:
                raise SnapfsError(f"{os.fsdecode(path)}: deeper than {fmt.MAX_DEPTH} levels")
            entries: list[Entry] = []
            subdirs: list[bytes] = []
            files: list[tuple[bytes, bytes]] = []
            total = 0
            for d in _list_dir(path):
                name = d.name
                try:
                    fmt.validate_name(name)
                except fmt.FormatError as exc:
                    raise SnapfsError(f"{os.fsdecode(d.path)}: {exc}") from exc
                try:
                    mode = d.stat(follow_symlinks=False).st_mode
                except OSError as exc:
                    raise SnapfsError(f"cannot stat {os.fsdecode(d.path)}: {exc.strerror}") from exc
                if stat.S_ISDIR(mode):
                    subdirs.append(name)
                elif stat.S_ISREG(mode):
                    files.append((name, d.path))
                elif stat.S_ISLNK(mode):
                    target = os.readlink(d.path)
                    if len(target) > fmt.MAX_TARGET_LEN:
                        raise SnapfsError(f"{os.fsdecode(d.path)}: symlink target too long")
                    entries.append(fmt.symlink_entry(name, target))
                    result.symlinks += 1
                else:
                    result.skipped.append(os.fsdecode(d.path))
            for (name, _), (size, chunks, executable) in zip(
                files, pool.map(hash_file, [p for _, p in files]), strict=True
            ):
                entry, blob = fmt.file_entry(name, size, chunks, executable=executable)
                if blob is not None:
                    result.chunklists[entry.chunklist_id] = blob  # type: ignore[index]
                entries.append(entry)
                total += size
                if progress:
                    progress(size)
            result.files += len(files)
            return [path, list(reversed(subdirs)), entries, total, depth]

        stack = [open_dir(root_b, 0)]
        while True:
            frame = stack[-1]
            path, pending, entries, total, depth = frame
            if pending:
                stack.append(open_dir(os.path.join(path, pending.pop()), depth + 1))
                continue
            encoded = fmt.encode_tree(entries)
            tree_id = hash_bytes(encoded)
            result.trees[tree_id] = encoded
            result.tree_paths.setdefault(tree_id, path)
            result.dirs += 1
            stack.pop()
            if not stack:
                result.root_id = tree_id
                result.total_bytes = total
                break
            parent = stack[-1]
            subdirs = sum(1 for e in entries if e.is_dir)
            parent[2].append(fmt.dir_entry(os.path.basename(path), tree_id, total, subdirs))
            parent[3] += total
    if result.skipped:
        shown = ", ".join(result.skipped[:10]) + (" ..." if len(result.skipped) > 10 else "")
        log.warning("skipped %d special file(s) (FIFOs, sockets, devices): %s", len(result.skipped), shown)
    return result
