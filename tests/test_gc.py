"""Garbage collection and the push/gc lock protocol, against real stores.

What must hold: gc frees exactly the unreachable objects older than the grace
period; every named snapshot still pulls and verifies afterwards; and a gc
racing a push never breaks the push, even when the push skips old objects
that are unreachable at that moment (the hazard is demonstrated first).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import snapfs
from snapfs import format as fmt
from snapfs import gc, locks, records, snapshot
from snapfs.cli.main import main
from snapfs.repo import Repo
from snapfs.scan import scan

SNAPFS = str(Path(sys.executable).with_name("snapfs"))


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def make_tree(root: Path, files: dict[str, bytes | str]) -> Path:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
    return root


def blob(seed: int, size: int) -> bytes:
    return bytes((i * 131 + seed * 7 + (i >> 8)) % 256 for i in range(size))


def objects(repo: Repo) -> set[str]:
    return {info.key.replace("objects/", "").replace("/", "") for info in repo.store.list("objects/")}


def reachable_from(repo: Repo, snapshot_ids: list[str]) -> set[str]:
    """Walked independently of gc: trees, chunk lists and chunks of these snapshots."""
    out: set[str] = set(snapshot_ids)
    for snapshot_id in snapshot_ids:
        for _path, entry in snapshot.walk(repo, snapshot_id):
            if entry.is_dir:
                out.add(entry.tree_id)
            elif entry.is_file:
                if entry.chunklist_id:
                    out.add(entry.chunklist_id)
                out.update(chunk_id for chunk_id, _ in repo.file_chunks(entry))
    return out


def fsck_ok(repo: Repo) -> None:
    report = snapshot.fsck(repo)
    assert report.ok, report.as_dict()


@pytest.fixture
def fast_locks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SNAPFS_LOCK_POLL", "0.05")


# -- what gc frees ----------------------------------------------------------------------


def test_gc_frees_exactly_the_unreachable_objects(
    store_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = ["--store", store_url]
    shared = blob(1, 300_000)
    ds = make_tree(tmp_path / "ds", {"shared.bin": shared, "a.txt": "a"})
    assert run(capsys, "push", str(ds), *store, "--name", "ds@1", "-q")[0] == 0
    make_tree(ds, {"sub/b.txt": "b"})
    assert run(capsys, "push", str(ds), *store, "--name", "ds@2", "-q")[0] == 0
    kept_unnamed = make_tree(tmp_path / "anon", {"note": "kept by an unnamed record"})
    assert run(capsys, "push", str(kept_unnamed), *store, "-m", "keep me", "-q")[0] == 0
    marker_only = make_tree(tmp_path / "marker", {"only": "a marker keeps me"})
    assert run(capsys, "push", str(marker_only), *store, "-q")[0] == 0
    # Two claims that will be dropped: an unnamed push and a named one, both
    # sharing shared.bin with the datasets (which must survive).
    junk = make_tree(
        tmp_path / "junk", {"shared.bin": shared, "u1": blob(2, 1000), "deep/er/u2": blob(3, 5000)}
    )
    assert run(capsys, "push", str(junk), *store, "--tag", "scratch", "-q")[0] == 0
    junk_id = scan(str(junk)).root_id
    exp = make_tree(tmp_path / "exp", {"weights": blob(4, 400_000), "deep/er/u2": blob(3, 5000)})
    assert run(capsys, "push", str(exp), *store, "--name", "exp@1", "-q")[0] == 0
    capsys.readouterr()

    repo = Repo.open(store_url)
    assert run(capsys, "forget", junk_id, *store)[0] == 0
    assert run(capsys, "forget", "exp@1", *store)[0] == 0
    keep_roots = [
        records.resolve_ref(repo, "ds@1"),
        records.resolve_ref(repo, "ds@2"),
        scan(str(kept_unnamed)).root_id,
        scan(str(marker_only)).root_id,
    ]
    before = objects(repo)
    expected_keep = reachable_from(repo, keep_roots)
    expected_free = before - expected_keep
    # Root, deep/ and deep/er/ trees (shared by both), u1, u2 and the weights chunks.
    assert junk_id in expected_free and len(expected_free) >= 6

    # On S3 the small files (u1, u2) are packed: their pack goes too, and nothing else's.
    packs_before = {info.key for info in repo.store.list("packs/")}
    expected_packs = {
        fmt.pack_key(ref.pack_id)
        for ref in (fmt.decode_pack_ref(repo.store.get(fmt.object_key(o))) for o in expected_free)
        if ref is not None
    }
    assert bool(expected_packs) == store_url.startswith("s3://")

    code, out, _ = run(capsys, "gc", "--dry-run", "--grace", "0", *store, "--json")
    assert code == 0
    dry = json.loads(out)
    assert {f["id"] for f in dry["freed"] if f["kind"] != "pack"} == expected_free
    assert {fmt.pack_key(f["id"]) for f in dry["freed"] if f["kind"] == "pack"} == expected_packs
    assert objects(repo) == before  # a dry run deletes nothing

    code, out, err = run(capsys, "gc", "--grace", "0", *store)
    assert code == 0, err
    freed = {
        line.split()[2]
        for line in out.splitlines()
        if line.startswith("freed ") and line.split()[1] != "pack"
    }
    assert freed == expected_free
    assert {info.key for info in repo.store.list("packs/")} == packs_before - expected_packs
    assert {line.split()[1] for line in out.splitlines() if line.startswith("freed ")} >= {"tree", "chunk"}
    assert f"removed tag scratch/{junk_id}" in out
    assert f"gc: freed {len(expected_free)} objects" in err
    assert objects(repo) == expected_keep

    # Every named (and every kept) snapshot still pulls and verifies.
    for ref in ("ds@1", "ds@2", *keep_roots[2:]):
        dest = tmp_path / f"pull-{ref}"
        assert run(capsys, "pull", ref, str(dest), *store, "-q")[0] == 0
        assert run(capsys, "verify", str(dest), ref, *store, "-q")[0] == 0
    assert run(capsys, "fsck", *store, "-q")[0] == 0
    # A second gc finds nothing more.
    assert json.loads(run(capsys, "gc", "--grace", "0", *store, "--json")[1])["freed"] == []


def test_gc_never_frees_anything_younger_than_the_grace(
    file_store_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = ["--store", file_store_url]
    repo = Repo.open(file_store_url)
    snapfs.push(make_tree(tmp_path / "keep", {"k": "keep"}), repo, name="keep@1", capture_git=False)
    junk_id = snapfs.push(make_tree(tmp_path / "junk", {"j": blob(5, 2000), "d/x": "x"}), repo)
    records.forget(repo, junk_id)
    junk_objects = objects(repo) - reachable_from(repo, [records.resolve_ref(repo, "keep@1")])
    assert len(junk_objects) == 4

    report = json.loads(run(capsys, "gc", *store, "--json")[1])  # default grace: 24h
    assert report["freed"] == [] and report["young_objects"] == 4

    root = file_store_url[len("file://") :]
    two_days_ago = time.time() - 2 * 86400
    for object_id in junk_objects:
        os.utime(os.path.join(root, fmt.object_key(object_id)), (two_days_ago, two_days_ago))
    report = json.loads(run(capsys, "gc", "--grace", "3d", *store, "--json")[1])
    assert report["freed"] == [] and report["young_objects"] == 4
    report = json.loads(run(capsys, "gc", *store, "--json")[1])
    assert {f["id"] for f in report["freed"]} == junk_objects


def test_gc_follows_chunk_lists(file_store_url: str) -> None:
    """A file with more than INLINE_MAX_CHUNKS chunks keeps them in a chunk-list object."""
    repo = Repo.open(file_store_url)
    repo.ensure_config()

    def big_file_snapshot(seed: int) -> tuple[str, bytes]:
        pieces = [bytes([seed, i % 256, i // 256]) for i in range(fmt.INLINE_MAX_CHUNKS + 5)]
        chunks = []
        for piece in pieces:
            repo.put_object(piece)
            chunks.append((snapfs.hashing.hash_bytes(piece), len(piece)))
        entry, listing = fmt.file_entry(b"big.bin", sum(len(p) for p in pieces), chunks, executable=False)
        assert listing is not None and entry.chunklist_id
        repo.put_object(listing)
        tree = fmt.encode_tree([entry])
        repo.put_object(tree)
        return snapfs.hashing.hash_bytes(tree), b"".join(pieces)

    kept_id, kept_bytes = big_file_snapshot(1)
    repo.mark_snapshot(kept_id)
    dropped_id, _ = big_file_snapshot(2)  # never marked: unreachable
    report = gc.collect(repo, grace=0)
    kinds = report.counts()
    assert kinds == {"tree": 1, "chunklist": 1, "chunk": fmt.INLINE_MAX_CHUNKS + 5}
    assert dropped_id in {f.object_id for f in report.freed}
    pieces: list[bytes] = []
    snapshot.cat(repo, kept_id, "big.bin", pieces.append)
    assert b"".join(pieces) == kept_bytes
    fsck_ok(repo)


# -- gc racing a push -------------------------------------------------------------------------


def _old_unreachable_tree(repo: Repo, tmp_path: Path) -> tuple[Path, str, str]:
    """A pushed then forgotten snapshot: its objects exist but nothing reaches them."""
    data = make_tree(tmp_path / "data", {f"sub/f{i}": blob(i, 3000) for i in range(6)})
    make_tree(data, {"top": "v1"})
    old_id = snapfs.push(data, repo)
    records.forget(repo, old_id)
    sub_id = next(e.tree_id for e in repo.get_tree(old_id) if e.name == b"sub")
    make_tree(data, {"new-file": blob(99, 4000)})  # the next push reuses sub/ unchanged
    return data, old_id, sub_id


def test_the_race_is_real_without_the_lock(store_url: str, tmp_path: Path) -> None:
    """Control: an unlocked upload skips the old sub/ tree, gc deletes it, the marker points at a hole."""
    repo = Repo.open(store_url)
    data, _old_id, sub_id = _old_unreachable_tree(repo, tmp_path)
    scanned = scan(str(data))
    ran: list[gc.GcReport] = []
    once = threading.Lock()  # upload reports progress from several threads

    def progress(_n: int) -> None:
        if once.acquire(blocking=False):  # mid-upload, after sub/ was seen present and skipped
            ran.append(gc.collect(repo, grace=0))

    snapshot._upload_objects(repo, scanned, progress=progress)
    repo.mark_snapshot(scanned.root_id)
    assert sub_id in {f.object_id for f in ran[0].freed}
    report = snapshot.fsck(repo, read_data=False)
    assert any(sub_id in line for line in report.missing)


def test_gc_during_a_push_refuses_and_the_push_survives(store_url: str, tmp_path: Path) -> None:
    repo = Repo.open(store_url)
    data, _old_id, sub_id = _old_unreachable_tree(repo, tmp_path)
    scanned = scan(str(data))
    outcome: list[BaseException | gc.GcReport] = []
    once = threading.Lock()

    def progress(_n: int) -> None:
        if not once.acquire(blocking=False):
            return

        def try_gc() -> None:
            try:
                outcome.append(gc.collect(repo, grace=0, wait=0))
            except locks.LockedError as exc:
                outcome.append(exc)

        worker = threading.Thread(target=try_gc)
        worker.start()
        worker.join()

    snapshot.upload(repo, scanned, progress=progress)
    assert isinstance(outcome[0], locks.LockedError) and "push(es) still running" in str(outcome[0])
    assert repo.has_object(sub_id)
    fsck_ok(repo)
    assert snapshot.verify(repo, str(data), scanned.root_id) == []


def test_gc_waiting_for_a_push_collects_only_what_stayed_unreachable(
    store_url: str, tmp_path: Path, fast_locks: None
) -> None:
    repo = Repo.open(store_url)
    data, old_id, _sub_id = _old_unreachable_tree(repo, tmp_path)
    scanned = scan(str(data))
    reports: list[gc.GcReport] = []
    worker = threading.Thread(target=lambda: reports.append(gc.collect(repo, grace=0, wait=60)))

    once = threading.Lock()

    def progress(_n: int) -> None:
        if once.acquire(blocking=False):
            worker.start()
            time.sleep(0.5)  # gc now holds its lock and waits for this push to finish

    snapshot.upload(repo, scanned, progress=progress)
    worker.join(60)
    # Only the old root tree was unreachable once the new snapshot was marked.
    assert {f.object_id for f in reports[0].freed} == {old_id}
    fsck_ok(repo)
    dest = tmp_path / "copy"
    snapshot.pull(repo, scanned.root_id, str(dest))
    assert snapshot.verify(repo, str(dest), scanned.root_id) == []


def test_push_waits_for_a_running_gc(store_url: str, tmp_path: Path, fast_locks: None) -> None:
    repo = Repo.open(store_url)
    data = make_tree(tmp_path / "d", {"a": "1"})
    done: list[str] = []
    with locks.MaintenanceLock(repo.store, "gc", wait=0):
        pusher = threading.Thread(target=lambda: done.append(snapfs.push(data, repo)))
        pusher.start()
        time.sleep(1.0)
        assert pusher.is_alive() and not done
        assert not list(repo.snapshot_ids())
    pusher.join(30)
    assert done and repo.is_snapshot(done[0])


def test_locks_expire_and_fence(
    store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = Repo.open(store_url)
    store = ["--store", store_url]
    # A fresh push lock of someone else: gc refuses (exit 5) and says why.
    repo.store.put("locks/push-other", json.dumps({"command": "push", "user": "bob", "host": "n1"}).encode())
    code, _, err = run(capsys, "gc", "--grace", "0", "--wait", "0", *store)
    assert code == 5 and "push(es) still running" in err and "bob@n1" in err
    # Once it is stale (here: after 1s), gc removes it and runs.
    monkeypatch.setenv("SNAPFS_LOCK_STALE", "1")
    time.sleep(2.2)
    code, _, err = run(capsys, "gc", "--grace", "0", *store)
    assert code == 0, err
    assert not repo.store.exists("locks/push-other")

    # A fresh gc lock: a push waits, then gives up with the holder's name.
    monkeypatch.setenv("SNAPFS_LOCK_STALE", "300")
    monkeypatch.setenv("SNAPFS_LOCK_WAIT", "0.3")
    monkeypatch.setenv("SNAPFS_LOCK_POLL", "0.1")
    repo.store.put("locks/gc", json.dumps({"command": "gc", "user": "carol", "host": "n2"}).encode())
    code, _, err = run(capsys, "push", str(make_tree(tmp_path / "d", {"a": "1"})), *store)
    assert code == 5 and "gc by carol@n2" in err
    # A stale gc lock is removed by the next push.
    monkeypatch.setenv("SNAPFS_LOCK_STALE", "1")
    time.sleep(2.2)
    assert run(capsys, "push", str(tmp_path / "d"), *store, "-q")[0] == 0
    assert not repo.store.exists("locks/gc")

    # Fencing: a holder whose key was removed (it was judged stale) knows it.
    with locks.PushLock(repo.store) as push_lock:
        assert push_lock.held()
        repo.store.delete(push_lock.key)
        assert not push_lock.held()
    monkeypatch.setenv("SNAPFS_LOCK_STALE", "300")
    with locks.MaintenanceLock(repo.store, "gc", wait=0) as gc_lock:
        gc_lock.check()
        repo.store.delete(gc_lock.key)
        with pytest.raises(locks.LockedError, match="lost"):
            gc_lock.check()
    assert not list(repo.store.list("locks/"))


def test_concurrent_push_and_gc_processes(file_store_url: str, tmp_path: Path) -> None:
    """Real processes: each round forgets the last snapshot, then pushes a variant of it
    (reusing its now unreachable, grace-0 objects) while a gc runs. No push may break."""
    env = {**os.environ, "SNAPFS_LOCK_POLL": "0.05"}
    repo = Repo.open(file_store_url)
    data = make_tree(
        tmp_path / "d", {f"part{i}/f{j}": blob(i * 10 + j, 20_000) for i in range(4) for j in range(5)}
    )
    pushed: list[str] = []
    previous = None
    for round_number in range(4):
        make_tree(data, {"round": str(round_number)})
        if previous:
            records.forget(repo, previous)
        procs = [
            subprocess.Popen([SNAPFS, "gc", "--grace", "0", "-q", "--store", file_store_url], env=env),
            subprocess.Popen(
                [SNAPFS, "push", str(data), "-q", "--store", file_store_url],
                env=env,
                stdout=subprocess.PIPE,
                text=True,
            ),
            subprocess.Popen([SNAPFS, "gc", "--grace", "0", "-q", "--store", file_store_url], env=env),
        ]
        out, _ = procs[1].communicate(timeout=120)
        assert procs[1].returncode == 0
        for proc in (procs[0], procs[2]):
            assert proc.wait(timeout=120) in (0, 5)  # 5: refused while the push ran
        previous = out.strip()
        pushed.append(previous)
        fsck_ok(repo)
        assert snapshot.verify(repo, str(data), previous) == []
    assert len(set(pushed)) == 4


def test_parse_duration() -> None:
    assert gc.parse_duration("24h") == 86400
    assert gc.parse_duration("1h30m") == 5400
    assert gc.parse_duration("7d") == 7 * 86400
    assert gc.parse_duration("90") == 90
    assert gc.parse_duration("0") == 0
    for bad in ("", "abc", "-1h", "1y"):
        with pytest.raises(snapfs.errors.UsageError):
            gc.parse_duration(bad)
