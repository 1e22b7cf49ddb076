"""The snapshot commands end to end, run as a user types them (.venv/bin/snapfs
in a subprocess): id, push, pull, verify, ls, cat, manifest, diff, fsck.

Checks the contract of the CLI: machine-friendly stdout (push prints only the
ID), diagnostics on stderr, and for every bad input exactly one line on stderr
and the documented exit code.
"""

from __future__ import annotations

import json
import os
import random
import re
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from snapfs import format as fmt
from snapfs.hashing import hash_bytes
from snapfs.repo import Repo

SNAPFS = str(Path(sys.executable).with_name("snapfs"))
ID_RE = re.compile(r"^[0-9a-f]{64}$")
MiB = 1 << 20


@dataclass
class Env:
    vars: dict[str, str]
    store_dir: Path

    @property
    def store_url(self) -> str:
        return "file://" + str(self.store_dir)


def make_env(base: Path) -> Env:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SNAPFS_", "AWS_"))}
    env.update(
        SNAPFS_STORE="file://" + str(base / "store"),
        XDG_CACHE_HOME=str(base / "xdg-cache"),
        XDG_DATA_HOME=str(base / "xdg-data"),
        SNAPFS_NO_PROGRESS="1",
    )
    return Env(env, base / "store")


def snapfs(env: Env, *args: str | Path, ok: bool = True) -> subprocess.CompletedProcess[bytes]:
    proc = subprocess.run([SNAPFS, *map(str, args)], env=env.vars, capture_output=True, timeout=60)
    if ok:
        assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return proc


def one_error_line(proc: subprocess.CompletedProcess[bytes]) -> str:
    lines = proc.stderr.decode(errors="replace").splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("snapfs: error: "), lines
    return lines[0]


def make_dataset(root: Path) -> Path:
    rng = random.Random(11)
    (root / "train" / "shards").mkdir(parents=True)
    (root / "empty dir").mkdir()
    (root / "train" / "shards" / "shard-0.bin").write_bytes(rng.randbytes(2 * MiB + 3))
    (root / "train" / "a.jpg").write_bytes(rng.randbytes(5000))
    (root / "labels.csv").write_bytes(b"id,label\n1,cat\n2,dog\n")
    (root / "run.sh").write_bytes(b"#!/bin/sh\necho hi\n")
    os.chmod(root / "run.sh", 0o755)
    os.symlink("labels.csv", root / "labels-link")
    with open(os.path.join(os.fsencode(root), b"odd \xff\nname"), "wb") as f:
        f.write(b"odd\n")
    return root


@dataclass
class Pushed:
    env: Env
    src: Path
    snapshot_id: str


@pytest.fixture(scope="module")
def pushed(tmp_path_factory: pytest.TempPathFactory) -> Pushed:
    """One store with the dataset pushed, shared by the read-only tests."""
    base = tmp_path_factory.mktemp("cli")
    env = make_env(base)
    src = make_dataset(base / "src")
    proc = snapfs(env, "push", src)
    snapshot_id = proc.stdout.decode().strip()
    return Pushed(env, src, snapshot_id)


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return make_env(tmp_path)


# --- the happy path ----------------------------------------------------------


def test_id_prints_only_the_id(pushed: Pushed) -> None:
    proc = snapfs(pushed.env, "id", pushed.src)
    assert proc.stdout.decode() == pushed.snapshot_id + "\n"
    assert proc.stderr == b""


def test_push_prints_only_the_id_and_a_summary_on_stderr(env: Env, tmp_path: Path) -> None:
    src = make_dataset(tmp_path / "src")
    proc = snapfs(env, "push", src)
    snapshot_id = proc.stdout.decode()
    assert (
        ID_RE.match(snapshot_id.rstrip("\n")) and snapshot_id.endswith("\n") and snapshot_id.count("\n") == 1
    )
    assert re.search(r"pushed 5 files, .* uploaded .* in \d+ objects", proc.stderr.decode())
    assert (env.store_dir / "snapshots" / snapshot_id.strip()).exists()

    again = snapfs(env, "push", src)
    assert again.stdout == proc.stdout
    assert re.search(r"uploaded 0 B in 0 objects", again.stderr.decode())
    as_json = json.loads(snapfs(env, "push", "--json", src).stdout)
    assert as_json["id"] == snapshot_id.strip() and as_json["uploaded_bytes"] == 0


def test_push_warns_about_special_files_on_stderr(env: Env, tmp_path: Path) -> None:
    src = make_dataset(tmp_path / "src")
    os.mkfifo(src / "a-fifo")
    proc = snapfs(env, "push", "-q", src)
    assert ID_RE.match(proc.stdout.decode().strip())
    assert "skipped 1 special file(s)" in proc.stderr.decode() and "a-fifo" in proc.stderr.decode()


def test_pull_then_verify(pushed: Pushed, tmp_path: Path) -> None:
    dest = tmp_path / "copy"
    proc = snapfs(pushed.env, "pull", pushed.snapshot_id[:12], dest)
    assert proc.stdout == b""
    assert "5 files fetched" in proc.stderr.decode()
    assert os.stat(dest / "run.sh").st_mode & 0o777 == 0o755
    assert os.readlink(dest / "labels-link") == "labels.csv"

    ok = snapfs(pushed.env, "verify", dest, pushed.snapshot_id)
    assert ok.stdout == b"" and "is exactly" in ok.stderr.decode()

    (dest / "labels.csv").write_bytes(b"id,label\n")
    os.chmod(dest / "run.sh", 0o644)
    (dest / "train" / "extra.txt").write_bytes(b"x")
    bad = snapfs(pushed.env, "verify", dest, pushed.snapshot_id, ok=False)
    assert bad.returncode == 1
    lines = bad.stdout.decode().splitlines()
    assert sorted(line.split()[0] + " " + line.split()[1] for line in lines) == [
        "A train/extra.txt",
        "M labels.csv",
        "M run.sh",
    ]
    assert "differs from" in bad.stderr.decode()


def test_ls(pushed: Pushed) -> None:
    root = snapfs(pushed.env, "ls", pushed.snapshot_id).stdout.decode().splitlines()
    assert root == ["empty dir/", "labels-link", "labels.csv", "odd \\xff\\nname", "run.sh", "train/"]
    long = snapfs(pushed.env, "ls", "-l", "-R", pushed.snapshot_id).stdout.decode().splitlines()
    by_name = {line.split(maxsplit=3)[3]: line.split(maxsplit=3)[:3] for line in long}
    assert set(by_name) == {
        "empty dir/",
        "labels-link -> labels.csv",
        "labels.csv",
        "odd \\xff\\nname",
        "run.sh",
        "train/",
        "train/a.jpg",
        "train/shards/",
        "train/shards/shard-0.bin",
    }
    assert by_name["run.sh"][:2] == ["-rwxr-xr-x", "18"]
    assert by_name["labels.csv"][:2] == ["-rw-r--r--", "21"]
    assert by_name["train/"][:2] == ["drwxr-xr-x", str(2 * MiB + 3 + 5000)]
    assert by_name["labels-link -> labels.csv"] == ["lrwxrwxrwx", "10", "-"]
    assert re.fullmatch(r"[0-9a-f]{16}", by_name["train/shards/shard-0.bin"][2])
    listing = json.loads(snapfs(pushed.env, "ls", "--json", pushed.snapshot_id, "train/shards").stdout)
    assert listing[0]["path"] == "shard-0.bin" and listing[0]["size"] == 2 * MiB + 3


def test_cat_streams_exact_bytes(pushed: Pushed) -> None:
    proc = snapfs(pushed.env, "cat", pushed.snapshot_id, "train/shards/shard-0.bin")
    assert proc.stdout == (pushed.src / "train" / "shards" / "shard-0.bin").read_bytes()
    odd = snapfs(pushed.env, "cat", pushed.snapshot_id, os.fsdecode(b"odd \xff\nname"))
    assert odd.stdout == b"odd\n"


def test_manifest(pushed: Pushed) -> None:
    lines = snapfs(pushed.env, "manifest", pushed.snapshot_id).stdout.decode().splitlines()
    assert len(lines) == 9
    fields = {
        line.split()[-1] if not line.startswith("l ") else line.split()[3]: line.split() for line in lines
    }
    assert fields["run.sh"][:3] == ["f", "755", "18"]
    assert ID_RE.match(fields["run.sh"][3])
    assert fields["labels-link"] == ["l", "777", "10", "labels-link", "->", "labels.csv"]
    assert fields["train/shards/shard-0.bin"][:3] == ["f", "644", str(2 * MiB + 3)]
    assert next(line for line in lines if line.endswith(" empty dir")).split()[:3] == ["d", "755", "0"]
    assert any(line.endswith("odd \\xff\\nname") for line in lines)  # one line per entry, even with a newline


def test_diff_text_and_json(env: Env, tmp_path: Path) -> None:
    src = make_dataset(tmp_path / "src")
    old = snapfs(env, "push", "-q", src).stdout.decode().strip()
    (src / "labels.csv").write_bytes(b"id,label\n1,cat\n")
    os.unlink(src / "run.sh")
    (src / "empty dir" / "new.bin").write_bytes(b"\x00" * 2048)
    new = snapfs(env, "push", "-q", src).stdout.decode().strip()

    text = snapfs(env, "diff", old, new).stdout.decode().splitlines()
    assert text[:-1] == [
        "M  labels.csv  (21 B -> 15 B)",
        "D  run.sh  (18 B)",
        "A  empty dir/new.bin  (2.0 KiB)",
    ]
    assert text[-1] == "1 added, 1 deleted, 1 modified (+2.0 KiB, -39 B)"

    report = json.loads(snapfs(env, "diff", "--json", old, new).stdout)
    assert (report["old"], report["new"]) == (old, new)
    assert report["summary"] == {
        "added": 1,
        "deleted": 1,
        "modified": 1,
        "bytes_added": 2048 + 15,
        "bytes_deleted": 18 + 21,
    }
    modified = next(c for c in report["changes"] if c["status"] == "M")
    assert modified["path"] == "labels.csv"
    assert (modified["old"]["size"], modified["new"]["size"]) == (21, 15)
    assert modified["old"]["content"] != modified["new"]["content"]


def test_fsck_clean_then_corrupt(env: Env, tmp_path: Path) -> None:
    src = make_dataset(tmp_path / "src")
    snapshot_id = snapfs(env, "push", "-q", src).stdout.decode().strip()
    clean = snapfs(env, "fsck")
    assert clean.stdout == b"" and "no damage" in clean.stderr.decode()

    repo = Repo.open(env.store_url)
    entry = repo.lookup_path(snapshot_id, "labels.csv")
    assert entry is not None
    chunk_id = entry.chunks[0][0]
    path = env.store_dir / fmt.object_key(chunk_id)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x20
    path.write_bytes(bytes(data))

    bad = snapfs(env, "fsck", ok=False)
    assert bad.returncode == 4
    # The damaged object is named (fsck also lists it under "missing" for the file that needs it).
    assert bad.stdout.decode().splitlines()[0] == f"corrupt: object {chunk_id} does not hash to its key"
    assert all(chunk_id in line for line in bad.stdout.decode().splitlines())
    assert "1 corrupt" in bad.stderr.decode()

    cat = snapfs(env, "cat", snapshot_id, "labels.csv", ok=False)
    assert cat.returncode == 4 and cat.stdout == b""
    error = cat.stderr.decode().splitlines()[-1]
    assert error.startswith("snapfs: error: chunk " + chunk_id) and "is corrupt" in error
    pull = snapfs(env, "pull", snapshot_id, tmp_path / "dest", ok=False)
    assert pull.returncode == 4 and chunk_id in pull.stderr.decode().splitlines()[-1]
    assert not (tmp_path / "dest" / "labels.csv").exists()


def test_corrupt_object_gives_one_line(env: Env, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"hello world\n")
    snapshot_id = snapfs(env, "push", "-q", src).stdout.decode().strip()
    (env.store_dir / fmt.object_key(hash_bytes(b"hello world\n"))).write_bytes(b"hellO world\n")
    proc = snapfs(env, "cat", snapshot_id, "a", ok=False)
    assert proc.returncode == 4
    assert "is corrupt" in one_error_line(proc)


# --- bad inputs: one line on stderr, the documented exit code -------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["ls", "0" * 64], 3, "not found"),
        (["cat", "ffffffff", "x"], 3, "no snapshot"),
        (["pull", "abc", "{tmp}/dest"], 2, "at least 8 hex digits"),
        (["ls", "{id}", "no/such/path"], 3, "no such file"),
        (["cat", "{id}", "train"], 2, "is a directory"),
        (["push", "{tmp}/missing"], 2, "No such file"),
        (["pull", "{id}", "{src}"], 7, "not empty"),
        (["ls", "{id}", "--store", "ftp://x/y"], 2, "unsupported store URL"),
    ],
)
def test_bad_input_gives_one_line_and_an_exit_code(
    pushed: Pushed, tmp_path: Path, args: list[str], code: int, message: str
) -> None:
    subst = {"{tmp}": str(tmp_path), "{id}": pushed.snapshot_id, "{src}": str(pushed.src)}
    argv = [next((a.replace(k, v) for k, v in subst.items() if k in a), a) for a in args]
    proc = snapfs(pushed.env, *argv, ok=False)
    assert proc.returncode == code, proc.stderr
    assert proc.stdout == b""
    assert message in one_error_line(proc)


def test_unreachable_s3_endpoint_exits_5(env: Env) -> None:
    env.vars.update(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test", AWS_DEFAULT_REGION="us-east-1")
    port = _closed_port()
    proc = snapfs(
        env,
        "ls",
        "12345678",
        "--store",
        "s3://bucket/prefix",
        "--endpoint-url",
        f"http://127.0.0.1:{port}",
        ok=False,
    )
    assert proc.returncode == 5
    assert f"127.0.0.1:{port}" in one_error_line(proc)


def test_unknown_format_version_exits_4(env: Env, tmp_path: Path) -> None:
    # A tree written by a future snapfs (version byte 2) in a store we can read.
    tree = b"SNAPTREE\x02" + b"\x00\x00\x00\x00"
    repo = Repo.open(env.store_url)
    repo.ensure_config()
    tree_id = hash_bytes(tree)
    repo.put_object(tree)
    repo.mark_snapshot(tree_id)
    proc = snapfs(env, "ls", tree_id, ok=False)
    assert proc.returncode == 4
    assert "unknown format version 2" in one_error_line(proc)


def test_ls_of_a_non_utf8_file_path(pushed: Pushed) -> None:
    proc = snapfs(pushed.env, "ls", pushed.snapshot_id, os.fsdecode(b"odd \xff\nname"), ok=False)
    assert proc.returncode == 0, proc.stderr


def _shape(parser) -> dict:
    """What a subcommand's parser accepts and prints: its options, defaults and help texts."""
    return {
        "options": sorted(
            (tuple(a.option_strings) or (a.dest,), a.default if not callable(a.default) else "callable")
            for a in parser._actions
        ),
        "defaults": sorted(parser._defaults),
        "description": parser.description,
        "epilog": parser.epilog,
    }


def test_one_command_parser_equals_the_full_one() -> None:
    """`snapfs CMD` builds only CMD's modules (cli/main.py COMMANDS, EXTENDS); each must
    give CMD exactly the parser the full build gives it, extensions included."""
    from snapfs.cli import main

    full = main.build_parser()._subparsers._group_actions[0].choices
    assert sorted(full) == sorted(main.COMMANDS), "COMMANDS in cli/main.py is out of date"
    for command in main.COMMANDS:
        alone = main.build_parser(command)._subparsers._group_actions[0].choices
        assert len(alone) < len(full), command
        assert _shape(alone[command]) == _shape(full[command]), command
    # Anything else (no command, an option, a typo) gets every command: help lists
    # them all, and argparse names the valid choices.
    assert main.modules_for(None) == main.modules_for("pusj") == main.COMMAND_MODULES


def test_a_mistyped_command_lists_the_choices(env: Env) -> None:
    result = subprocess.run([SNAPFS, "pusj", "x"], capture_output=True, text=True, env=env.vars)
    assert result.returncode == 2
    assert "invalid choice: 'pusj'" in result.stderr and "'push'" in result.stderr and "'gc'" in result.stderr
