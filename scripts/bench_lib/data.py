"""Deterministic benchmark data: large shards, many small files, and a changed copy.

Every byte comes from ``random.Random(seed)`` with a fixed string seed per file,
so two runs (or two machines) build identical trees and identical snapshot IDs.
The contents are random, so no peer gains from compression.

``data_v2`` is the "next version" used for re-push: unchanged files are hard
links to ``data`` (no copy, no extra disk), and the changed ones are new files:
one shard of 8 with 64 KiB overwritten in its middle, plus 1% of the small files
rewritten with new contents of the same size.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import shutil
import time
from multiprocessing import get_context
from pathlib import Path

from .common import worker_signals

log = logging.getLogger(__name__)

KiB = 1024
MiB = 1024 * KiB

SIZES: dict[str, dict[str, int]] = {
    "small": {"shards": 8, "shard_bytes": 16 * MiB, "files": 2_000, "file_bytes": 50 * KiB, "dirs": 100},
    "medium": {"shards": 8, "shard_bytes": 128 * MiB, "files": 20_000, "file_bytes": 50 * KiB, "dirs": 100},
    "large": {"shards": 8, "shard_bytes": 512 * MiB, "files": 50_000, "file_bytes": 50 * KiB, "dirs": 250},
}
SHARD_EDIT_BYTES = 64 * KiB
CHANGED_SHARD = 3
SMALL_CHANGE_EVERY = 100  # 1% of the small files
FORMAT_VERSION = 1  # bump when the generator changes, so stale trees are rebuilt


@dataclasses.dataclass
class DataSet:
    root: Path  # data/ : large/ and small/ below it
    root_v2: Path  # data_v2/ : the changed version
    large: list[Path]
    small: list[Path]
    changed: list[str]  # paths relative to root that differ in v2
    changed_bytes: int  # bytes whose contents differ between v1 and v2

    @property
    def large_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.large)

    @property
    def small_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.small)

    @property
    def total_bytes(self) -> int:
        return self.large_bytes + self.small_bytes

    def rel(self, paths: list[Path]) -> list[str]:
        return [str(p.relative_to(self.root)) for p in paths]

    def small_halves(self) -> tuple[list[str], list[str]]:
        """Two disjoint halves (even / odd directories) of the small files, for two cold reads."""
        even = [p for p in self.small if int(p.parent.name[1:]) % 2 == 0]
        odd = [p for p in self.small if int(p.parent.name[1:]) % 2 == 1]
        return self.rel(even), self.rel(odd)

    def apply_changes(self, dest: Path) -> None:
        """Make a copy of v1 at ``dest`` into v2 by copying over the changed files."""
        for rel in self.changed:
            target = dest / rel
            tmp = target.with_name(target.name + ".bench-tmp")
            shutil.copyfile(self.root_v2 / rel, tmp)
            os.replace(tmp, target)


def _random_bytes(seed: str, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def _write_small_dir(args: tuple[str, int, list[int], int]) -> None:
    root, dir_index, file_indexes, size = args
    directory = Path(root) / "small" / f"d{dir_index:03d}"
    directory.mkdir(parents=True, exist_ok=True)
    for i in file_indexes:
        _write(directory / f"f{i:06d}.bin", _random_bytes(f"small-{i}", size))


def _layout(root: Path, spec: dict[str, int]) -> tuple[list[Path], list[Path]]:
    large = [root / "large" / f"shard-{i:02d}.bin" for i in range(spec["shards"])]
    small = [root / "small" / f"d{i % spec['dirs']:03d}" / f"f{i:06d}.bin" for i in range(spec["files"])]
    small.sort()
    return large, small


def generate(workdir: Path, size: str) -> DataSet:
    """Build (or reuse, when the stamp matches) data/ and data_v2/ under ``workdir``."""
    spec = SIZES[size]
    root = workdir / "data"
    root_v2 = workdir / "data_v2"
    stamp_path = workdir / "data.stamp.json"
    stamp = {"format": FORMAT_VERSION, **spec}
    large, small = _layout(root, spec)
    changed_small = [p for i, p in enumerate(small) if i % SMALL_CHANGE_EVERY == SMALL_CHANGE_EVERY // 2]
    changed = [large[CHANGED_SHARD], *changed_small]
    dataset = DataSet(
        root=root,
        root_v2=root_v2,
        large=large,
        small=small,
        changed=[str(p.relative_to(root)) for p in changed],
        changed_bytes=SHARD_EDIT_BYTES + len(changed_small) * spec["file_bytes"],
    )
    if stamp_path.exists() and json.loads(stamp_path.read_text()) == stamp and root_v2.is_dir():
        log.info("data: reusing %s (%s)", root, size)
        return dataset

    start = time.monotonic()
    for stale in (root, root_v2):
        if stale.exists():
            shutil.rmtree(stale)
    stamp_path.unlink(missing_ok=True)
    log.info(
        "data: generating %d x %d MiB shards and %d x %d KiB files in %d dirs under %s",
        spec["shards"],
        spec["shard_bytes"] // MiB,
        spec["files"],
        spec["file_bytes"] // KiB,
        spec["dirs"],
        root,
    )
    jobs: list[tuple[str, int, list[int], int]] = []
    for d in range(spec["dirs"]):
        jobs.append((str(root), d, list(range(d, spec["files"], spec["dirs"])), spec["file_bytes"]))
    with get_context("fork").Pool(os.cpu_count() or 2, initializer=worker_signals) as pool:
        shard_jobs = pool.starmap_async(
            _write_shard, [(str(p), f"shard-{i}", spec["shard_bytes"]) for i, p in enumerate(large)]
        )
        pool.map(_write_small_dir, jobs)
        shard_jobs.get()

    # v2: hard links for what did not change, new files for what did.
    for path in [*large, *small]:
        target = root_v2 / path.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(path, target)
    shard_v2 = root_v2 / large[CHANGED_SHARD].relative_to(root)
    shard_v2.unlink()
    data = bytearray(large[CHANGED_SHARD].read_bytes())
    middle = len(data) // 2
    data[middle : middle + SHARD_EDIT_BYTES] = _random_bytes("shard-edit", SHARD_EDIT_BYTES)
    _write(shard_v2, bytes(data))
    for path in changed_small:
        target = root_v2 / path.relative_to(root)
        target.unlink()
        _write(target, _random_bytes(f"changed-{path.name}", spec["file_bytes"]))
    stamp_path.write_text(json.dumps(stamp))
    log.info("data: generated in %.1f s", time.monotonic() - start)
    return dataset


def _write_shard(path: str, seed: str, size: int) -> None:
    # In 16 MiB pieces, so a 512 MiB shard never sits in memory twice.
    piece = 16 * MiB
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        for offset in range(0, size, piece):
            f.write(_random_bytes(f"{seed}-{offset}", min(piece, size - offset)))


def cdc_changed_bytes(dataset: DataSet, avg_size: int = 1 * MiB) -> int:
    """Bytes of the v2 chunks that v1 lacks, with FastCDC at DESIGN §1's parameters.

    This is the ideal a chunk-deduplicating push can reach (the changed chunks'
    bytes), independent of snapfs: the re-push target is a ratio to it.
    Small files below the minimum chunk size are one chunk each.
    """
    from pyfastcdc import FastCDC  # the snapfs venv has it (snapfs's chunker)

    cdc = FastCDC(avg_size=avg_size)

    def chunks(path: Path) -> dict[bytes, int]:
        import hashlib

        return {hashlib.sha256(c.data).digest(): c.length for c in cdc.cut_file(str(path))}

    total = 0
    for rel in dataset.changed:
        old = chunks(dataset.root / rel)
        new = chunks(dataset.root_v2 / rel)
        total += sum(length for digest, length in new.items() if digest not in old)
    return total


# -- the 1,000,000-file tree for the scale section --------------------------------


def _write_scale_dir(args: tuple[str, int, int]) -> None:
    root, dir_index, files = args
    directory = os.path.join(root, f"d{dir_index:04d}")
    os.makedirs(directory, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    for i in range(files):
        # Distinct tiny contents, like per-sample label or metadata files.
        fd = os.open(os.path.join(directory, f"f{i:04d}.txt"), flags, 0o644)
        try:
            os.write(fd, b"%d/%d\n" % (dir_index, i))
        finally:
            os.close(fd)


def generate_scale(workdir: Path, dirs: int = 1000, files: int = 1000) -> tuple[Path, bool]:
    """A tree of dirs x files tiny files, reused when its stamp matches; (root, newly generated)."""
    root = workdir / "scale"
    stamp_path = workdir / "scale.stamp.json"
    stamp = {"format": FORMAT_VERSION, "dirs": dirs, "files": files}
    if stamp_path.exists() and json.loads(stamp_path.read_text()) == stamp:
        log.info("scale: reusing %s", root)
        return root, False
    if root.exists():
        shutil.rmtree(root)
    start = time.monotonic()
    with get_context("fork").Pool(os.cpu_count() or 2, initializer=worker_signals) as pool:
        pool.map(_write_scale_dir, [(str(root), d, files) for d in range(dirs)], chunksize=8)
    stamp_path.write_text(json.dumps(stamp))
    log.info("scale: generated %d files in %.1f s", dirs * files, time.monotonic() - start)
    return root, True


def change_scale_files(root: Path, count: int = 10) -> list[str]:
    """Rewrite ``count`` files spread across the tree; returns their relative paths."""
    dirs = sorted(p.name for p in root.iterdir())
    changed = []
    for k in range(count):
        directory = dirs[(k * 97) % len(dirs)]
        path = root / directory / f"f{(k * 131) % 1000:04d}.txt"
        path.write_bytes(b"changed %d\n" % k)
        changed.append(str(path.relative_to(root)))
    return changed


def restore_scale_files(root: Path, changed: list[str]) -> None:
    """Undo change_scale_files, so a reused tree has v1's contents again."""
    for rel in changed:
        d, f = rel.split("/")
        (root / rel).write_bytes(b"%d/%d\n" % (int(d[1:]), int(f[1:5])))
