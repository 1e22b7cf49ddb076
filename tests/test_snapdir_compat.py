"""snapfs.snapdir against the real ``snapdir`` package.

The package lives in its own virtualenv so snapfs never depends on it; it is
driven in a subprocess (its async API can crash at interpreter exit, so the
driver ends with ``os._exit``). Found via ``$SNAPFS_SNAPDIR_PYTHON``, then
``<repo>/.snapdir-venv/bin/python``, then ``/work/snapdir-venv/bin/python``.
Without it these cross-checks skip, unless ``CI`` is set, where they fail.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from snapfs import snapdir as sd
from snapfs.errors import FormatError, IntegrityError, NotFoundError, UsageError
from snapfs.hashing import hash_bytes
from snapfs.store import LocalStore

REPO = Path(__file__).resolve().parent.parent
INSTALL_HINT = "python3 -m venv .snapdir-venv && .snapdir-venv/bin/pip install snapdir"

DRIVER = r"""
import asyncio, json, os, sys
import snapdir

async def run(commands):
    results = []
    for command in commands:
        op = command[0]
        try:
            if op == "manifest":
                manifest = await snapdir.manifest(command[1])
                results.append({
                    "raw": manifest.raw,
                    "id": await snapdir.id(command[1]),
                    "entries": [[e.path, e.path_type.name, e.permissions, e.checksum, e.size]
                                for e in manifest.entries],
                })
            elif op == "push":
                results.append({"id": await snapdir.push(command[1], snapdir.StoreUri(command[2]))})
            elif op == "pull":
                await snapdir.pull(snapdir.SnapshotId(command[1]), snapdir.StoreUri(command[2]), command[3])
                results.append({})
            else:
                raise SystemExit("unknown op " + op)
        except snapdir.SnapdirError as exc:
            results.append({"error": type(exc).__name__ + ": " + str(exc)})
    return results

out = asyncio.run(run(json.loads(sys.argv[1])))
sys.stdout.write(json.dumps(out))
sys.stdout.flush()
os._exit(0)
"""


def _find_snapdir_python() -> tuple[str | None, str]:
    candidates = [
        os.environ.get("SNAPFS_SNAPDIR_PYTHON"),
        str(REPO / ".snapdir-venv" / "bin" / "python"),
        "/work/snapdir-venv/bin/python",
    ]
    for candidate in filter(None, candidates):
        if not os.access(candidate, os.X_OK):
            continue
        probe = subprocess.run(
            [candidate, "-c", "import snapdir, os, sys; sys.stdout.write(snapdir.version()); os._exit(0)"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if probe.returncode == 0:
            return candidate, probe.stdout
        return None, f"{candidate} cannot import snapdir: {probe.stderr.strip()[-300:]}"
    return None, "no Python with the snapdir package (set SNAPFS_SNAPDIR_PYTHON or run: " + INSTALL_HINT + ")"


class SnapdirRunner:
    def __init__(self, python: str, work: Path) -> None:
        self.python = python
        self.work = work
        self.driver = work / "snapdir_driver.py"
        self.driver.write_text(DRIVER)

    def run(self, *commands: list[str]) -> list[dict[str, Any]]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SNAPDIR_")}
        # snapdir's local cache must not land in the developer's home.
        env["HOME"] = str(self.work / "home")
        env["XDG_CACHE_HOME"] = str(self.work / "xdg-cache")
        proc = subprocess.run(
            [self.python, str(self.driver), json.dumps(list(commands))],
            capture_output=True,
            text=True,
            env=env,
            timeout=240,
        )
        assert proc.returncode == 0, f"snapdir driver failed: {proc.stderr[-2000:]}"
        return json.loads(proc.stdout)

    def manifests(self, *paths: str | Path) -> list[dict[str, Any]]:
        return self.run(*(["manifest", str(p)] for p in paths))


@pytest.fixture(scope="session")
def snapdir_runner(tmp_path_factory: pytest.TempPathFactory) -> SnapdirRunner:
    python, detail = _find_snapdir_python()
    if python is None:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set, so the snapdir cross-checks must run: {detail}")
        pytest.skip(detail)
    return SnapdirRunner(python, tmp_path_factory.mktemp("snapdir-driver"))


# -- trees --------------------------------------------------------------------


def _write(path: Path, data: bytes, mode: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if mode is not None:
        path.chmod(mode)


def make_mixed_tree(root: Path, outside: Path) -> Path:
    """Every case the issue names, plus the sort-order and walk corner cases.

    leaf.bin is over 8 MiB so that the memory-mapped, multithreaded hash runs.
    """
    rng = random.Random(8)
    outside.mkdir(parents=True, exist_ok=True)
    (outside / "target.txt").write_bytes(b"outside the tree\n")
    root.mkdir(parents=True)
    _write(root / "README.md", b"hello\n")
    _write(root / "empty.txt", b"")
    _write(root / "also-empty", b"", 0o600)
    (root / "empty_dir").mkdir()
    (root / "empty_dir_700").mkdir(mode=0o700)
    (root / "empty_dir_700").chmod(0o700)
    _write(root / "bin" / "run.sh", b"#!/bin/sh\necho hi\n", 0o755)
    _write(root / "bin" / "setuid", b"suid\n", 0o4755)
    _write(root / "bin" / "readonly", b"ro\n", 0o444)
    _write(root / "data" / "nested" / "deep" / "leaf.bin", rng.randbytes(9 * (1 << 20) + 17))
    _write(root / "data" / "nested" / "same1", b"same content\n")
    _write(root / "data" / "nested" / "same2", b"same content\n", 0o640)
    _write(root / "with space" / "file name.txt", b"spaces\n")
    _write(root / "unicodé" / "ünïcödé.txt", b"nfc\n")
    _write(root / "unicode\u0301" / "nfd", b"nfd\n")
    _write(root / "emoji 🎉.txt", b"party\n")
    for name in ("a-b", "a.b", "a0", "A", "B", "_", "~", "#hash", "tab\there", 'quote"s', "back\\slash"):
        _write(root / name, name.encode() + b"\n")
    _write(root / "a" / "x", b"a/x\n")
    _write(root / ".hidden" / ".git" / "HEAD", b"ref: refs/heads/main\n")
    links = root / "links"
    links.mkdir()
    (links / "to_file").symlink_to("../README.md")
    (links / "to_dir").symlink_to("../data/nested")
    (links / "abs_outside").symlink_to(outside / "target.txt")
    (links / "chain").symlink_to("to_file")
    (links / "dangling").symlink_to("nowhere")
    (links / "self_loop").symlink_to("self_loop")
    (links / "to_empty_dir").symlink_to("../empty_dir")
    os.mkfifo(root / "fifo")
    return root


def make_loop_tree(root: Path) -> Path:
    """A link to its own parent: snapdir walks it until the kernel's ELOOP."""
    (root / "d").mkdir(parents=True)
    _write(root / "d" / "f", b"f\n")
    (root / "d" / "up").symlink_to("..")
    return root


def make_random_tree(root: Path, seed: int) -> Path:
    rng = random.Random(seed)
    alphabet = ["a", "b", "B", "-", ".", "_", " ", "é", "z0", "x y", "ü"]
    root.mkdir(parents=True)
    dirs = [root]
    contents = [b"", b"x", b"hello\n", rng.randbytes(70_000)]
    for _ in range(rng.randint(1, 25)):
        parent = rng.choice(dirs)
        name = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 3))).strip() or "n"
        if name in (".", ".."):
            name += "n"
        path = parent / name
        if path.exists() or path.is_symlink():
            continue
        kind = rng.random()
        if kind < 0.25:
            path.mkdir()
            dirs.append(path)
        elif kind < 0.35:
            target = rng.choice([p for p in root.rglob("*") if not p.is_symlink()] or [root])
            path.symlink_to(os.path.relpath(target, parent))
        else:
            _write(path, rng.choice(contents), rng.choice([0o644, 0o600, 0o755, 0o700, 0o444]))
    return root


def _expected_manifest(result: dict[str, Any]) -> bytes:
    assert "error" not in result, result
    return result["raw"].encode("utf-8") + b"\n"


def _assert_matches(path: Path | str, result: dict[str, Any]) -> None:
    manifest = sd.snapdir_manifest(path)
    assert manifest == _expected_manifest(result), f"manifest of {path} differs from snapdir's"
    assert sd.snapdir_id(path) == result["id"]
    ours = [
        [e.manifest_path, "Directory" if e.kind == sd.KIND_DIR else "File", e.permissions, e.checksum, e.size]
        for e in sd.parse_manifest(manifest)
    ]
    assert ours == result["entries"]


# -- IDs and manifests --------------------------------------------------------------


def test_mixed_tree_id_matches_snapdir(snapdir_runner: SnapdirRunner, tmp_path: Path) -> None:
    tree = make_mixed_tree(tmp_path / "tree", tmp_path / "outside")
    (tmp_path / "root-link").symlink_to("tree")
    variants = [tree, f"{tree}/", f"{tree}/./", tmp_path / "root-link", f"{tmp_path}/root-link/"]
    results = snapdir_runner.manifests(*variants)
    for variant, result in zip(variants, results, strict=True):
        _assert_matches(variant, result)

    manifest = sd.snapdir_manifest(tree).decode()
    # The quirks are really exercised, not silently absent from the tree.
    assert " ./links/to_file\n" in manifest and "F 777 " in manifest  # link: lstat perms
    assert "D 777 " in manifest and " ./links/to_dir/same1\n" in manifest  # dir link followed
    assert "dangling" not in manifest and "self_loop" not in manifest and "fifo" not in manifest
    assert "F 4755 " in manifest and "D 700 " in manifest
    to_file = next(e for e in sd.parse_manifest(manifest) if e.path == "links/to_file")
    assert to_file.size == len("../README.md") and to_file.checksum == hash_bytes(b"hello\n")
    # The ID is the hash of the text with its trailing newline, not of .raw.
    assert results[0]["id"] == hash_bytes(manifest.encode())
    assert results[0]["id"] != hash_bytes(results[0]["raw"].encode())
    # A root given through a symlink records the link's own permissions.
    assert results[3]["raw"].startswith("D 777 ") and results[0]["raw"].startswith("D 755 ")


def test_quirky_trees_match_snapdir(snapdir_runner: SnapdirRunner, tmp_path: Path) -> None:
    loop = make_loop_tree(tmp_path / "loop")
    (tmp_path / "loop-link").symlink_to("loop")
    newline = tmp_path / "newline"
    _write(newline / "new\nline", b"nl\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    only_dangling = tmp_path / "only-dangling"
    only_dangling.mkdir()
    (only_dangling / "gone").symlink_to("missing")
    odd_root = tmp_path / "odd-root"
    odd_root.mkdir()
    (odd_root / "f").write_bytes(b"x")
    odd_root.chmod(0o1750)

    paths = [loop, tmp_path / "loop-link", newline, empty, only_dangling, odd_root]
    results = snapdir_runner.manifests(*paths)
    for path, result in zip(paths, results, strict=True):
        assert sd.snapdir_manifest(path) == _expected_manifest(result), path
        assert sd.snapdir_id(path) == result["id"]
    # The loop stops where path resolution exceeds the kernel's 40 links.
    deepest = max(results[0]["raw"].splitlines(), key=len)
    assert deepest.count("up/") == 40
    assert results[3]["raw"].endswith(f" {sd.EMPTY_CHECKSUM} 0 ./")
    assert results[5]["raw"].startswith("D 1750 ")
    # A name with a newline is written raw, so that manifest cannot be parsed back.
    with pytest.raises(FormatError):
        sd.parse_manifest(sd.snapdir_manifest(newline))


def test_random_trees_match_snapdir(snapdir_runner: SnapdirRunner, tmp_path: Path) -> None:
    trees = [make_random_tree(tmp_path / f"t{seed}", seed) for seed in range(24)]
    for tree, result in zip(trees, snapdir_runner.manifests(*trees), strict=True):
        _assert_matches(tree, result)


def test_unusable_roots_fail_like_snapdir(snapdir_runner: SnapdirRunner, tmp_path: Path) -> None:
    bad_name = tmp_path / "bad-name"
    bad_name.mkdir()
    with open(os.fsencode(bad_name) + b"/caf\xe9", "wb") as f:
        f.write(b"a latin-1 name")
    a_file = tmp_path / "file"
    a_file.write_bytes(b"x")
    missing = tmp_path / "missing"
    results = snapdir_runner.manifests(bad_name, a_file, missing)
    assert all("error" in r for r in results), results
    for path in (bad_name, a_file, missing):
        with pytest.raises(UsageError):
            sd.snapdir_id(path)


# -- reading a store snapdir wrote ------------------------------------------------


@pytest.fixture
def pushed(snapdir_runner: SnapdirRunner, tmp_path: Path) -> tuple[Path, Path, str]:
    """(tree, store directory, snapshot ID) after a real ``snapdir.push``."""
    tree = make_mixed_tree(tmp_path / "tree", tmp_path / "outside")
    store_dir = tmp_path / "snapdir-store"
    [result] = snapdir_runner.run(["push", str(tree), "file://" + str(store_dir)])
    assert "error" not in result, result
    return tree, store_dir, result["id"]


def test_local_store_reads_snapdir_push(pushed: tuple[Path, Path, str]) -> None:
    tree, store_dir, snapshot = pushed
    assert snapshot == sd.snapdir_id(tree)
    store = LocalStore(str(store_dir), create=False)

    assert list(sd.list_snapshot_ids(store)) == [snapshot]
    stored = store.get(sd.manifest_key(snapshot))
    assert stored == sd.snapdir_manifest(tree)
    entries = sd.read_manifest(store, snapshot)
    assert sd.render_manifest(entries) == stored

    files = [e for e in entries if e.kind == sd.KIND_FILE]
    object_keys = {info.key for info in store.list(sd.OBJECTS_PREFIX)}
    assert object_keys == {sd.object_key(e.checksum) for e in files}
    assert {sd.checksum_from_key(k) for k in object_keys} == {e.checksum for e in files}
    for entry in files:
        data = sd.read_object(store, entry.checksum)
        assert data == (tree / entry.path).read_bytes(), entry.path  # follows links, like snapdir
        if not (tree / entry.path).is_symlink():
            assert len(data) == entry.size
    # Exactly the manifests and objects: nothing else in the layout to read.
    assert {info.key for info in store.list()} == object_keys | {sd.manifest_key(snapshot)}


def test_corrupt_or_missing_store_content_is_refused(pushed: tuple[Path, Path, str]) -> None:
    tree, store_dir, snapshot = pushed
    store = LocalStore(str(store_dir), create=False)
    leaf = hash_bytes((tree / "data/nested/deep/leaf.bin").read_bytes())
    path = store_dir / sd.object_key(leaf)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=leaf):
        sd.read_object(store, leaf)
    path.write_bytes(bytes(data[:-1]))
    with pytest.raises(IntegrityError):
        sd.verify_object_chunks(leaf, [path.read_bytes()[:100], path.read_bytes()[100:]])

    manifest_path = store_dir / sd.manifest_key(snapshot)
    manifest_path.write_bytes(manifest_path.read_bytes().replace(b" ./README.md\n", b" ./README.mD\n"))
    with pytest.raises(IntegrityError, match=snapshot):
        sd.read_manifest(store, snapshot)
    manifest_path.unlink()
    with pytest.raises(NotFoundError, match=snapshot):
        sd.read_manifest(store, snapshot)
    with pytest.raises(NotFoundError):
        sd.read_object(store, "0" * 64)


def test_comment_lines_do_not_change_the_id(
    snapdir_runner: SnapdirRunner, pushed: tuple[Path, Path, str], tmp_path: Path
) -> None:
    tree, store_dir, snapshot = pushed
    key = store_dir / sd.manifest_key(snapshot)
    original = key.read_bytes()
    first, rest = original.split(b"\n", 1)
    key.write_bytes(b"# made by hand\n" + first + b"\n#another\n" + rest)
    # snapdir itself accepts the commented manifest under the same ID ...
    [result] = snapdir_runner.run(["pull", snapshot, "file://" + str(store_dir), str(tmp_path / "pulled")])
    assert result == {}
    assert (tmp_path / "pulled" / "data/nested/same2").read_bytes() == b"same content\n"
    # ... and so do we, with the same entries.
    entries = sd.read_manifest(LocalStore(str(store_dir), create=False), snapshot)
    assert sd.render_manifest(entries) == original
    # Other edits still change the ID, for snapdir too.
    key.write_bytes(original.replace(b"\n", b"\n\n", 1))
    shutil.rmtree(tmp_path / "pulled")
    [result] = snapdir_runner.run(["pull", snapshot, "file://" + str(store_dir), str(tmp_path / "pulled")])
    assert result == {}  # snapdir re-renders before hashing, so it tolerates a blank line
    with pytest.raises(IntegrityError):
        sd.verify_manifest_id(snapshot, key.read_bytes())  # we hash the bytes as stored


# -- the parser on hostile input -----------------------------------------------------------

E = sd.EMPTY_CHECKSUM
ROOT = f"D 755 {hash_bytes(E.encode())} 0 ./\n"
GOOD = ROOT + f"F 644 {E} 0 ./a\n"


def _tree(*lines: str) -> str:
    return "".join(line + "\n" for line in lines)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        (GOOD[:-1], "does not end with a newline"),
        (ROOT + "\n" + f"F 644 {E} 0 ./a\n", "empty line"),
        (ROOT + f"F 644 {E} 0 /etc/passwd\n", "absolute path"),
        (ROOT + f"F 644 {E} 0 ./../escape\n", "'..'"),
        (ROOT + f"F 644 {E} 0 ./a/../../x\n", "'..'"),
        (ROOT + f"F 644 {E} 0 ./a/./b\n", "'.'"),
        (ROOT + f"F 644 {E} 0 ./a//b\n", "empty"),
        (f"D 755 {E} 0 .//\n", "empty"),  # found by the fuzz test: a second spelling of the root
        (ROOT + f"D 755 {E} 0 .//a/\n", "empty"),
        (ROOT + f"F 644 {E} 0 ./a\0b\n", "NUL"),
        (ROOT + f"F 644 {E} 0 a\n", "does not start with ./"),
        (GOOD + f"F 644 {E} 0 ./a\n", "duplicate path"),
        (ROOT + f"F 644 {E} 0 ./b\nF 644 {E} 0 ./a\n", "not sorted"),
        (ROOT + f"F 644 {E} 0 ./a\nD 755 {E} 0 ./a/\n", "both as a file and as a directory"),
        (ROOT + f"F 644 {E} 0 ./missing/a\n", "parent directory"),
        (f"F 644 {E} 0 ./a\n", "root directory"),
        (ROOT + f"F 644 {E} 0\n", "expected"),
        (ROOT + f"X 644 {E} 0 ./a\n", "neither F nor D"),
        (ROOT + f"F 0644 {E} 0 ./a\n", "permissions"),
        (ROOT + f"F 8 {E} 0 ./a\n", "permissions"),
        (ROOT + f"F 17777 {E} 0 ./a\n", "permissions"),
        (ROOT + f"F 644 {E.upper()} 0 ./a\n", "checksum"),
        (ROOT + f"F 644 {E[:-1]} 0 ./a\n", "checksum"),
        (ROOT + f"F 644 {E} -1 ./a\n", "size"),
        (ROOT + f"F 644 {E} 01 ./a\n", "size"),
        (ROOT + f"F 644 {E} {1 << 64} ./a\n", "size"),
        (ROOT + f"F 644 {E}  0 ./a\n", "size"),
        (ROOT + f"D 755 {E} 0 ./a\n", "does not end with /"),
        (ROOT + f"F 644 {E} 0 ./a/\n", "file path ends with /"),
        ("# only a comment\n", "no entries"),
        (ROOT.replace(" 0 ./", " 5 ./") + f"F 644 {E} 0 ./a\n", "size 5"),
        (f"D 755 {E} 0 ./\nF 644 {E} 0 ./a\n", "its children give"),
    ],
)
def test_parse_rejects_hostile_manifests(text: str, message: str) -> None:
    with pytest.raises(FormatError, match="snapdir manifest") as info:
        sd.parse_manifest(text)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_parse_rejects_bad_utf8() -> None:
    with pytest.raises(FormatError, match="UTF-8"):
        sd.parse_manifest(GOOD.encode().replace(b"./a", b"./\xff"))


def test_parse_accepts_good_and_comments() -> None:
    entries = sd.parse_manifest("# header\n" + GOOD + "# trailer\n")
    assert [(e.path, e.kind, e.permissions, e.size) for e in entries] == [
        ("", sd.KIND_DIR, 0o755, 0),
        ("a", sd.KIND_FILE, 0o644, 0),
    ]
    assert sd.render_manifest(entries) == GOOD.encode()
    assert sd.manifest_id("# header\n" + GOOD + "# trailer") == hash_bytes(GOOD.encode())
    sd.verify_manifest_id(hash_bytes(GOOD.encode()), "#x\n" + GOOD)
    # check_tree=False lets a caller read a manifest whose directory lines lie.
    lying = ROOT.replace(" 0 ./", " 5 ./") + f"F 644 {E} 0 ./a\n"
    assert len(sd.parse_manifest(lying, check_tree=False)) == 2


@settings(max_examples=300, deadline=None)
@given(position=st.integers(min_value=0, max_value=len(GOOD)), junk=st.binary(max_size=12))
def test_parse_fuzz_only_raises_format_error(position: int, junk: bytes) -> None:
    data = GOOD.encode()
    mutated = data[:position] + junk + data[position:]
    try:
        entries = sd.parse_manifest(mutated)
    except FormatError:
        return
    # Whatever parses must be a faithful reading of the bytes (modulo comments).
    assert hash_bytes(sd.render_manifest(entries)) == sd.manifest_id(mutated)


# -- keys and the module's dependencies ---------------------------------------------------


def test_store_keys() -> None:
    snapshot = "a05b3f7544eb247103c893a1ec6bebfdaa44241b704ddd4af3fafc0c348d0c55"
    assert (
        sd.manifest_key(snapshot)
        == ".manifests/a05/b3f/754/4eb247103c893a1ec6bebfdaa44241b704ddd4af3fafc0c348d0c55"
    )
    assert sd.object_key(E) == ".objects/af1/349/b9f/5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
    assert sd.snapshot_id_from_key(sd.manifest_key(snapshot)) == snapshot
    assert sd.checksum_from_key(sd.object_key(E)) == E
    assert sd.snapshot_id_from_key(sd.object_key(E)) is None
    assert sd.snapshot_id_from_key(".manifests/a05/b3f/754/short") is None
    for bad in ("", "A" * 64, "g" * 64, "0" * 63, "../" + "0" * 61):
        with pytest.raises(UsageError):
            sd.manifest_key(bad)
        with pytest.raises(UsageError):
            sd.object_key(bad)


def test_module_needs_neither_snapdir_nor_blake3_directly() -> None:
    source = (REPO / "snapfs" / "snapdir.py").read_text()
    assert "import blake3" not in source and "import snapdir" not in source
    code = "import sys, snapfs.snapdir; sys.exit('snapdir' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0
