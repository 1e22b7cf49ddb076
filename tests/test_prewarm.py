"""Prewarm, the cache commands, pins, offline mounts, metrics, the systemd units
and scripts/prewarm-nodes: end to end, as an operator runs them.

Expected object sets are computed here by walking the snapshot with Repo, not
with snapfs.prewarm.plan, so a planning bug cannot hide behind its own answer.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from support.faultproxy import FaultProxy
from support.mounts import fuse_missing, mounted, parallel_digests, snapfs, status
from support.trees import file_digests, make_mixed_tree

from snapfs import format as fmt
from snapfs.repo import Repo
from snapfs.snapshot import push

REPO_ROOT = Path(__file__).resolve().parent.parent
SNAPFS = [sys.executable, "-m", "snapfs.cli.main"]
_fuse_reason = fuse_missing()
# Only the tests that mount need FUSE; the rest run anywhere.
needs_fuse = pytest.mark.skipif(_fuse_reason is not None, reason=f"no FUSE: {_fuse_reason}")
# Loopback only: a developer's HTTP_PROXY must not see the metrics scrape.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# --- helpers -------------------------------------------------------------------


def snapshot_objects(repo: Repo, snapshot_id: str, paths: list[str] | None = None) -> dict[str, int]:
    """object_id -> size of every tree, chunk list and chunk a prewarm of ``paths`` needs,
    including the trees on the way down to each path (the mount walks them)."""
    objects: dict[str, int] = {}

    def add_tree(tree_id: str) -> list[fmt.Entry]:
        data = repo.get_object(tree_id, "tree")
        objects[tree_id] = len(data)
        return fmt.decode_tree(data)

    def add_entry(entry: fmt.Entry) -> None:
        if entry.is_dir:
            for child in add_tree(entry.tree_id):
                add_entry(child)
        elif entry.is_file:
            if entry.chunklist_id is not None:
                objects[entry.chunklist_id] = len(repo.get_object(entry.chunklist_id))
            for chunk_id, length in repo.file_chunks(entry):
                objects[chunk_id] = length

    for path in paths or [""]:
        parts = [p.encode() for p in path.split("/") if p]
        entries = add_tree(snapshot_id)
        if not parts:
            for entry in entries:
                add_entry(entry)
            continue
        for depth, part in enumerate(parts):
            entry = next(e for e in entries if e.name == part)
            if depth == len(parts) - 1:
                add_entry(entry)
            else:
                entries = add_tree(entry.tree_id)
    return objects


def cached_ids(cache: Path) -> set[str]:
    """IDs of the object files in a cache directory (temp files excluded)."""
    out = set()
    for dirpath, _dirs, files in os.walk(cache / "objects"):
        prefix = os.path.basename(dirpath)
        out.update(prefix + name for name in files if not name.startswith(".tmp-"))
    return out


def prewarm_json(*args: str, check: bool = True) -> tuple[dict, subprocess.CompletedProcess]:
    result = snapfs("prewarm", *args, "--json", check=check)
    return (json.loads(result.stdout) if result.stdout.strip() else {}), result


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def scrape(port: int) -> dict[str, float]:
    with _DIRECT.open(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        match = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{[^}]*\})?\s+(\S+)$", line)
        if match and not line.startswith("#"):
            values[match.group(1)] = float(match.group(2))
    return values


def drop_page_cache() -> None:
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


@pytest.fixture
def sample(tmp_path: Path) -> Path:
    return make_mixed_tree(tmp_path / "src", large_mib=2)


def _status_and_metrics(mnt: Path, port: int) -> tuple[dict, dict]:
    """The mount's status and a metrics scrape that agree: taken when no background
    fetch (readahead, tree prefetch) finished between the two."""
    keys = ("hits", "misses", "fetched_bytes", "fetched_objects", "cache_bytes")
    for _ in range(100):
        first = status(mnt)
        metrics = scrape(port)
        if all(status(mnt)[k] == first[k] for k in keys):
            return first, metrics
        time.sleep(0.05)
    raise AssertionError("the mount's counters kept changing for 5 s with no reader")


@pytest.fixture
def proxy(request: pytest.FixtureRequest):
    """A FaultProxy in front of the session's SeaweedFS (for S3 tests only)."""
    server = request.getfixturevalue("s3_server")
    with FaultProxy(server.endpoint_url) as running:
        yield running


# --- prewarm, then the mount needs no store ---------------------------------------


@pytest.mark.fuse
@needs_fuse
@pytest.mark.parametrize("kind", ["file", pytest.param("s3", marks=pytest.mark.s3)])
def test_prewarmed_mount_reads_everything_with_the_store_unreachable(
    kind: str, sample: Path, tmp_path: Path, request: pytest.FixtureRequest
):
    store_url = request.getfixturevalue(f"{kind}_store_url")
    repo = Repo.open(store_url)
    snapshot_id = push(str(sample), repo).snapshot_id
    expected = snapshot_objects(repo, snapshot_id)
    cache = tmp_path / "cache"
    endpoint: list[str] = []
    proxy = None
    if kind == "s3":
        proxy = request.getfixturevalue("proxy")
        endpoint = ["--endpoint-url", proxy.endpoint_url]

    summary, _ = prewarm_json(snapshot_id, "--store", store_url, "--cache", str(cache), *endpoint)
    assert summary["ok"] and summary["failed_count"] == 0
    assert summary["objects"] == len(expected) and summary["bytes_total"] == sum(expected.values())
    # Every object, trees included, came from the store and is counted as fetched.
    assert summary["fetched_objects"] == len(expected) and summary["fetched_bytes"] == sum(expected.values())
    assert cached_ids(cache) == set(expected)

    # Now take the store away: S3 behind a proxy that refuses connections, or an
    # empty directory where the file store was.
    if proxy is not None:
        assert proxy.requests_seen > 0, "the prewarm did not go through the proxy"
        proxy.down()
    else:
        store_root = store_url[len("file://") :]
        os.rename(store_root, store_root + ".away")
    with mounted(tmp_path / "mnt", store_url, cache, *endpoint) as mnt:
        assert parallel_digests(mnt / snapshot_id, workers=2) == file_digests(sample)
        assert os.readlink(mnt / snapshot_id / "odd" / "link-to-medium") == "../medium.bin"
        counters = status(mnt)
    assert counters["misses"] == 0 and counters["fetched_bytes"] == 0, counters
    assert counters["fetch_errors"] == 0 and counters["verify_failures"] == 0, counters
    assert counters["hits"] >= len(expected)


# --- prewarm beside a serving mount; metrics --------------------------------------


@pytest.mark.fuse
@pytest.mark.s3
@needs_fuse
def test_prewarm_while_the_mount_serves_and_metrics_follow(
    sample: Path, tmp_path: Path, s3_store_url: str, proxy: FaultProxy
):
    repo = Repo.open(s3_store_url)
    snapshot_id = push(str(sample), repo).snapshot_id
    expected = snapshot_objects(repo, snapshot_id)
    cache = tmp_path / "cache"
    endpoint = ["--endpoint-url", proxy.endpoint_url]
    port = free_port()
    digests = file_digests(sample)
    with mounted(tmp_path / "mnt", s3_store_url, cache, *endpoint, "--metrics-port", str(port)) as mnt:
        root = mnt / snapshot_id
        # A few cold reads: the counters and the metrics must show them.
        for name in (b"run.sh", b"medium.bin", b"small files/img_000.jpg"):
            assert _sha(os.path.join(os.fsencode(root), name)) == digests[name]
        before, metrics = _status_and_metrics(mnt, port)
        assert before["misses"] > 0 and before["fetched_bytes"] >= 700_000
        assert metrics["snapfs_cache_misses_total"] == before["misses"]
        assert metrics["snapfs_fetched_bytes_total"] == before["fetched_bytes"]
        assert metrics["snapfs_fetch_seconds_count"] == before["fetched_objects"] > 0
        assert metrics["snapfs_fetch_seconds_sum"] > 0
        assert metrics["snapfs_cache_hits_total"] == before["hits"]
        assert metrics["snapfs_cache_bytes"] == before["cache_bytes"] > 0

        # Slow every GET down so the prewarm is still running while readers work.
        proxy.inject("trickle", method="GET", key="objects/|packs/", piece=64 << 10, delay=0.02)
        already = cached_ids(cache)
        prewarm = subprocess.Popen(
            [*SNAPFS, "prewarm", snapshot_id, "--store", s3_store_url, "--cache", str(cache), "--json"]
            + [*endpoint, "--jobs", "2"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + 60
            while not cached_ids(cache) - already and time.monotonic() < deadline:
                time.sleep(0.05)
            assert prewarm.poll() is None, "the prewarm finished before the readers started"
            # Readers in other processes, on the same cache, while the prewarm writes into it.
            small = parallel_digests(root / "small files", workers=2)
            assert small == {
                os.path.relpath(k, b"small files"): v
                for k, v in digests.items()
                if k.startswith(b"small files/")
            }
            out, err = prewarm.communicate(timeout=120)
        finally:
            if prewarm.poll() is None:
                prewarm.kill()
                prewarm.wait()
        assert prewarm.returncode == 0, err
        assert json.loads(out)["ok"]
        proxy.clear()

        # Everything is in the cache now: the rest reads without one store request.
        after_prewarm = status(mnt)
        requests_before = proxy.requests_seen
        drop_page_cache()
        rest = parallel_digests(
            root, workers=2, exclude=tuple(k for k in digests if k.startswith(b"small files/"))
        )
        assert rest == {k: v for k, v in digests.items() if not k.startswith(b"small files/")}
        final, metrics = _status_and_metrics(mnt, port)
        assert (
            final["misses"] == after_prewarm["misses"]
            and final["fetched_bytes"] == after_prewarm["fetched_bytes"]
        )
        assert proxy.requests_seen == requests_before
        assert metrics["snapfs_cache_misses_total"] == final["misses"]
        assert metrics["snapfs_fetch_seconds_count"] == final["fetched_objects"]

        # The daemon and the prewarm wrote the same cache: all of it is sound.
        verify = snapfs("cache", "verify", "--cache", str(cache), "--json")
        report = json.loads(verify.stdout)
        assert report["bad"] == [] and report["checked"] == len(expected)
    assert cached_ids(cache) == set(expected)


def _sha(path: bytes) -> bytes:
    import hashlib

    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).digest()


# --- resumable ----------------------------------------------------------------------


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.s3
def test_interrupted_prewarm_fetches_only_what_is_missing(
    sample: Path, tmp_path: Path, s3_store_url: str, proxy: FaultProxy
):
    repo = Repo.open(s3_store_url)
    snapshot_id = push(str(sample), repo).snapshot_id
    expected = snapshot_objects(repo, snapshot_id)
    cache = tmp_path / "cache"
    args = [snapshot_id, "--store", s3_store_url, "--cache", str(cache), "--endpoint-url", proxy.endpoint_url]
    # Slow enough that an interrupt lands in the middle, with one fetch at a time.
    # Prewarm fetches the largest objects first, and the trickle slows only
    # objects over one 64 KiB piece (the few large chunks, ~0.2-0.4 s each):
    # interrupt as soon as the first is cached, while the next is in flight.
    proxy.inject("trickle", method="GET", key="objects/|packs/", piece=64 << 10, delay=0.02)
    assert sum(1 for size in expected.values() if size > 64 << 10) >= 2
    first = subprocess.Popen(
        [*SNAPFS, "prewarm", *args, "--jobs", "1"],
        stderr=subprocess.PIPE,
        text=True,
        # As a prewarm in a terminal gets Ctrl-C: a test run started in the
        # background (nohup, `&` in a script) has SIGINT ignored, and children
        # inherit that, so this SIGINT would never arrive.
        preexec_fn=_default_sigint,
    )
    try:
        deadline = time.monotonic() + 60
        while not cached_ids(cache) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert first.poll() is None, "the prewarm finished before it could be interrupted"
        first.send_signal(signal.SIGINT)
        _, err = first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 130 and "interrupted" in err
    present = cached_ids(cache)
    assert 0 < len(present) < len(expected) and present <= set(expected)
    proxy.clear()

    requests_before = proxy.requests_seen
    summary, _ = prewarm_json(*args)
    assert summary["ok"]
    assert summary["already_cached_objects"] == len(present)
    assert summary["fetched_objects"] == len(expected) - len(present)
    assert summary["fetched_bytes"] == sum(size for oid, size in expected.items() if oid not in present)
    # One GET per missing object (the ref resolution adds a couple of small requests).
    assert proxy.requests_seen - requests_before <= summary["fetched_objects"] + 3
    assert cached_ids(cache) == set(expected)

    # Objects that vanish from the cache directory behind the index's back (an
    # operator's rm, a disk error) are fetched again too.
    gone = sorted(oid for oid in expected if oid != snapshot_id)[:3]
    for object_id in gone:
        os.unlink(cache / "objects" / object_id[:2] / object_id[2:])
    summary, _ = prewarm_json(*args)
    assert summary["fetched_objects"] == len(gone)
    assert summary["fetched_bytes"] == sum(expected[oid] for oid in gone)
    assert cached_ids(cache) == set(expected)


# --- paths --------------------------------------------------------------------------


def test_prewarm_of_paths_fetches_only_those_subtrees(sample: Path, tmp_path: Path, file_store_url: str):
    repo = Repo.open(file_store_url)
    snapshot_id = push(str(sample), repo).snapshot_id
    paths = ["small files", "d0/d1/d2", "medium.bin"]
    expected = snapshot_objects(repo, snapshot_id, paths)
    everything = snapshot_objects(repo, snapshot_id)
    assert len(expected) < len(everything) - 2  # large.bin's chunks and odd/ are left out
    cache = tmp_path / "cache"
    summary, _ = prewarm_json(snapshot_id, *paths, "--store", file_store_url, "--cache", str(cache))
    assert summary["objects"] == len(expected) and summary["bytes_total"] == sum(expected.values())
    assert summary["fetched_objects"] == len(expected)
    # Exactly those subtrees, plus the trees on the way down to them.
    assert cached_ids(cache) == set(expected)

    # A path that is not in the snapshot is a one-line "not found" error.
    result = snapfs(
        "prewarm", snapshot_id, "no/such", "--store", file_store_url, "--cache", str(cache), check=False
    )
    assert result.returncode == 3 and "no/such" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_prewarm_rewrites_a_file_the_index_does_not_vouch_for(
    sample: Path, tmp_path: Path, file_store_url: str
):
    """A power loss can leave a renamed cache file whose bytes never reached the disk
    and whose index entry was lost. prewarm must fetch and write it again, not adopt it."""
    repo = Repo.open(file_store_url)
    snapshot_id = push(str(sample), repo).snapshot_id
    chunk_id, length = repo.lookup_path(snapshot_id, "medium.bin").chunks[0]
    cache = tmp_path / "cache"
    torn = cache / "objects" / chunk_id[:2] / chunk_id[2:]
    torn.parent.mkdir(parents=True)
    torn.write_bytes(b"\0" * length)
    summary, _ = prewarm_json(snapshot_id, "medium.bin", "--store", file_store_url, "--cache", str(cache))
    assert summary["fetched_objects"] >= 1
    assert torn.read_bytes() == repo.get_chunk(chunk_id, length)
    assert chunk_id in cached_ids(cache)


# --- pins ---------------------------------------------------------------------------


def test_pins_survive_eviction_until_unpinned(tmp_path: Path, file_store_url: str):
    repo = Repo.open(file_store_url)
    ids, objects = [], []
    for seed in (1, 2, 3):
        snapshot_id = push(
            str(make_mixed_tree(tmp_path / f"src{seed}", seed=seed, large_mib=1)), repo
        ).snapshot_id
        ids.append(snapshot_id)
        objects.append(snapshot_objects(repo, snapshot_id))
    pinned_id, other_id, third_id = ids
    pinned, other, third = objects
    cache = tmp_path / "cache"
    base = ["--store", file_store_url, "--cache", str(cache)]
    size_a, size_b, _size_c = (sum(o.values()) for o in objects)
    # Room for A and B with slack for the 90% low watermark, not for C as well.
    limit = str(int((size_a + size_b) / 0.85))

    summary, _ = prewarm_json(pinned_id, "--pin", "--cache-size", limit, *base)
    assert summary["pinned"] and summary["fetched_objects"] == len(pinned)
    # Rerunning a pinned prewarm (a unit restarted on every boot) is a no-op, not "cache full".
    summary, _ = prewarm_json(pinned_id, "--pin", "--cache-size", limit, *base)
    assert summary["fetched_objects"] == 0 and summary["already_cached_objects"] == len(pinned)

    prewarm_json(third_id, *base)
    snapfs("cache", "evict", "--to", "0", "--cache", str(cache))
    left = cached_ids(cache)
    assert set(pinned) <= left and not (set(third) - set(pinned)) & left

    # Eviction pressure: C (unpinned, oldest) then B under a limit that fits A and B only.
    prewarm_json(third_id, *base)
    time.sleep(1.1)  # LRU times have one-second resolution: make C strictly older than B
    summary, _ = prewarm_json(other_id, "--cache-size", limit, "--jobs", "2", *base)
    assert summary["ok"]
    left = cached_ids(cache)
    assert set(pinned) <= left and set(other) <= left
    assert (set(third) - set(pinned) - set(other)) - left, "nothing of C was evicted"
    stats = json.loads(snapfs("cache", "stats", "--json", *base).stdout)
    # Each fetch makes room before it writes, so concurrent fetches may overshoot
    # the limit by what they hold in flight: at most --jobs objects.
    assert stats["bytes"] <= int(limit) + 2 * max(other.values())
    assert stats["pinned_bytes"] == size_a

    # A pinned prewarm that cannot fit beside A's pin fails before fetching a chunk.
    snapfs("cache", "evict", "--to", "0", "--cache", str(cache))
    # B shares some objects with A (identical files and directories); those are pinned already.
    tight = str(size_a + sum(size for oid, size in other.items() if oid not in pinned) - 1)
    before = cached_ids(cache)
    summary, result = prewarm_json(other_id, "--pin", "--cache-size", tight, *base, check=False)
    assert result.returncode == 8, result.stderr
    assert "unpin" in result.stderr and "--cache-size" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    new = cached_ids(cache) - before
    other_trees = {oid for oid in other if oid not in pinned and _is_tree(repo, oid)}
    assert new <= other_trees, "chunks were fetched for a prewarm that could not fit"
    assert json.loads(snapfs("cache", "stats", "--json", *base).stdout)["pinned_bytes"] == size_a

    # Unpin: now A goes with the next eviction.
    result = snapfs("cache", "unpin", pinned_id, "--json", *base)
    assert json.loads(result.stdout)["released_objects"] == len(pinned)
    snapfs("cache", "evict", "--to", "0", "--cache", str(cache))
    assert cached_ids(cache) == set()


def _is_tree(repo: Repo, object_id: str) -> bool:
    try:
        fmt.decode_tree(repo.get_object(object_id))
    except Exception:
        return False
    return True


# --- failures -----------------------------------------------------------------------


def test_a_corrupt_object_fails_the_prewarm_and_names_it(sample: Path, tmp_path: Path, file_store_url: str):
    repo = Repo.open(file_store_url)
    snapshot_id = push(str(sample), repo).snapshot_id
    expected = snapshot_objects(repo, snapshot_id)
    bad_chunk = repo.lookup_path(snapshot_id, "medium.bin").chunks[0][0]
    path = Path(repo.store.root) / fmt.object_key(bad_chunk)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    cache = tmp_path / "cache"
    summary, result = prewarm_json(snapshot_id, "--store", file_store_url, "--cache", str(cache), check=False)
    assert result.returncode != 0
    assert not summary["ok"] and summary["failed_count"] == 1 and summary["failed"][0].startswith(bad_chunk)
    assert f"failed: {bad_chunk}" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("snapfs: error: prewarm of")
    assert summary["fetched_objects"] == len(expected) - 1
    # Every good object is cached; the bad one is not.
    assert cached_ids(cache) == set(expected) - {bad_chunk}


# --- cache stats --------------------------------------------------------------------


def test_cache_stats_shows_cached_and_total_bytes_per_snapshot(
    sample: Path, tmp_path: Path, file_store_url: str
):
    repo = Repo.open(file_store_url)
    snapshot_id = push(str(sample), repo).snapshot_id
    everything = snapshot_objects(repo, snapshot_id)
    part = snapshot_objects(repo, snapshot_id, ["small files"])
    cache = tmp_path / "cache"
    base = ["--store", file_store_url, "--cache", str(cache)]

    def stats() -> dict:
        return json.loads(snapfs("cache", "stats", "--json", *base).stdout)

    empty = stats()
    assert empty["bytes"] == 0 and empty["objects"] == 0 and empty["snapshots"] == []

    prewarm_json(snapshot_id, "small files", *base)
    after_part = stats()
    assert after_part["bytes"] == sum(part.values()) and after_part["objects"] == len(part)
    [row] = after_part["snapshots"]
    assert row["snapshot"] == snapshot_id
    assert row["total_bytes"] == sum(everything.values()) and row["objects"] == len(everything)
    assert row["cached_bytes"] == sum(part.values()) and row["cached_objects"] == len(part)
    assert row["pinned_objects"] == 0

    prewarm_json(snapshot_id, *base)
    [row] = stats()["snapshots"]
    assert row["cached_bytes"] == row["total_bytes"] == sum(everything.values())


# --- the systemd units ----------------------------------------------------------------


def unit_exec(unit: str, key: str, env: dict[str, str], replace: dict[str, list[str]]) -> list[str]:
    """The argv systemd would run for ``key`` of a unit: $VAR expands to words, ${VAR} to one word."""
    text = (REPO_ROOT / "systemd" / unit).read_text()
    [line] = [line for line in text.splitlines() if line.startswith(f"{key}=")]
    argv: list[str] = []
    for word in shlex.split(line[len(key) + 1 :]):
        if re.fullmatch(r"\$[A-Za-z_][A-Za-z0-9_]*", word):
            argv += env.get(word[1:], "").split()
        elif re.fullmatch(r"\$\{[A-Za-z_][A-Za-z0-9_]*\}", word):
            argv.append(env.get(word[2:-1], ""))
        else:
            argv += replace.get(word, [word])
    return argv


def read_env_file(path: Path) -> dict[str, str]:
    """The variables an EnvironmentFile= sets (comments and blank lines skipped)."""
    env = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            env[name.strip()] = shlex.split(value)[0] if value.strip() else ""
    return env


def test_env_example_documents_every_variable_the_units_use():
    documented = set(read_env_file(REPO_ROOT / "systemd" / "snapfs.env.example"))
    for unit in ("snapfs.service", "snapfs-prewarm@.service"):
        text = (REPO_ROOT / "systemd" / unit).read_text()
        exec_lines = "\n".join(line for line in text.splitlines() if line.startswith("Exec"))
        used = set(re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", exec_lines))
        assert used and used <= documented, (unit, used - documented)
        assert "EnvironmentFile=-/etc/snapfs/snapfs.env" in text.splitlines()
    # SNAPFS_STORE and SNAPFS_CACHE reach snapfs through the environment, not argv.
    assert {"SNAPFS_STORE", "SNAPFS_CACHE", "SNAPFS_CACHE_ARGS"} <= documented


@pytest.mark.fuse
@needs_fuse
def test_service_execstart_notifies_ready_only_once_mounted(
    sample: Path, tmp_path: Path, file_store_url: str
):
    snapshot_id = push(str(sample), Repo.open(file_store_url)).snapshot_id
    mnt = tmp_path / "snap"
    env_file = tmp_path / "snapfs.env"
    env_file.write_text(
        f"SNAPFS_STORE={file_store_url}\nSNAPFS_CACHE={tmp_path / 'cache'}\n"
        'SNAPFS_CACHE_ARGS="--cache-size 1G"\nSNAPFS_MOUNT_ARGS="--fetch-jobs 8 -v"\n'
    )
    settings = read_env_file(env_file)
    argv = unit_exec(
        "snapfs.service", "ExecStart", settings, {"/usr/local/bin/snapfs": SNAPFS, "/snap": [str(mnt)]}
    )
    assert "--foreground" in argv and "--cache-size" in argv and "--fetch-jobs" in argv
    notify_path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(notify_path)
        notify.settimeout(60)
        log_path = tmp_path / "daemon.log"
        with open(log_path, "w") as log_file:
            daemon = subprocess.Popen(
                argv,
                env={**os.environ, **settings, "NOTIFY_SOCKET": notify_path},
                stdout=log_file,
                stderr=log_file,
            )
        try:
            messages = []
            while not any("READY=1" in m for m in messages):
                message = notify.recv(4096).decode()
                # Checked the moment READY arrives: the mount must already be live.
                mounted_at_ready = os.path.ismount(mnt)
                messages.append(message)
            assert mounted_at_ready, f"READY=1 arrived before {mnt} was mounted"
            assert f"MAINPID={daemon.pid}" in messages[-1]
            assert (mnt / snapshot_id / "run.sh").read_bytes() == (sample / "run.sh").read_bytes()
            # Settings from the env file reached the daemon.
            counters = status(mnt)
            assert (
                counters["cache_dir"] == str(tmp_path / "cache") and counters["cache_limit_bytes"] == 1 << 30
            )
            assert counters["store"] == file_store_url

            daemon.send_signal(signal.SIGTERM)
            assert daemon.wait(timeout=60) == 0, log_path.read_text()
            assert "STOPPING=1" in notify.recv(4096).decode()
        finally:
            if daemon.poll() is None:
                daemon.kill()
                daemon.wait()
            if os.path.ismount(mnt):
                subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)
    assert not os.path.ismount(mnt) and os.listdir(mnt) == []


# --- scripts/prewarm-nodes ---------------------------------------------------------------

PREWARM_NODES = [sys.executable, str(REPO_ROOT / "scripts" / "prewarm-nodes")]

# A stand-in for ssh that runs the remote command on this machine, as ssh would
# on the host, and logs each call. Host "down" fails the way ssh does.
FAKE_SSH = """#!/bin/sh
while [ $# -gt 0 ]; do
  case "$1" in
    -o|-p|-i|-l) shift 2 ;;
    -*) shift ;;
    *) break ;;
  esac
done
host="$1"; shift
echo "$host" >> "$FAKE_SSH_LOG"
if [ "$host" = down ]; then
  echo "ssh: connect to host down port 22: Connection refused" >&2
  exit 255
fi
exec sh -c "$*"
"""


@pytest.fixture
def fake_ssh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    script = tmp_path / "fake-ssh"
    script.write_text(FAKE_SSH)
    script.chmod(0o755)
    monkeypatch.setenv("FAKE_SSH_LOG", str(tmp_path / "ssh.log"))
    return script


def test_prewarm_nodes_dry_run_prints_commands_and_runs_nothing(tmp_path: Path, fake_ssh: Path):
    hosts_file = tmp_path / "hosts"
    hosts_file.write_text("# training nodes\nnode-a\n\nuser@node-b  # rack 2\nnode-a\n")
    result = subprocess.run(
        [*PREWARM_NODES, "3f2a9c01", "--hosts-file", str(hosts_file), "--dry-run", "--jobs-per-host", "64"]
        + ["--ssh-command", str(fake_ssh), "--ssh-opts", "-p 2222", "--", "--pin", "--store", "s3://b/p q"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert [line.split(":", 1)[0] for line in lines] == ["node-a", "user@node-b"]  # deduplicated, in order
    argv = shlex.split(lines[1].split(": ", 1)[1])
    assert argv[0] == str(fake_ssh) and "BatchMode=yes" in argv and argv[argv.index("-p") + 1] == "2222"
    assert argv[-2] == "user@node-b"
    remote = shlex.split(argv[-1])  # what the remote shell parses
    assert remote[:2] == ["sh", "-c"]
    assert remote[remote.index("3f2a9c01") :] == [
        "3f2a9c01",
        "--json",
        "--jobs",
        "64",
        "--pin",
        "--store",
        "s3://b/p q",
    ]
    assert "/etc/snapfs/snapfs.env" in remote
    assert not (tmp_path / "ssh.log").exists(), "--dry-run ran ssh"


def test_prewarm_nodes_runs_prewarm_on_each_host_and_tabulates(
    sample: Path, tmp_path: Path, file_store_url: str, fake_ssh: Path
):
    repo = Repo.open(file_store_url)
    snapshot_id = push(str(sample), repo).snapshot_id
    total = sum(snapshot_objects(repo, snapshot_id).values())
    cache = tmp_path / "cache"
    # The node's settings, as the units read them; prewarm-nodes sources this file.
    env_file = tmp_path / "snapfs.env"
    env_file.write_text(
        f'SNAPFS_STORE={file_store_url}\nSNAPFS_CACHE={cache}\nSNAPFS_CACHE_ARGS="--cache-size 1G"\n'
    )
    snapfs_bin = f"{shlex.quote(sys.executable)} -m snapfs.cli.main"
    common = ["--ssh-command", str(fake_ssh), "--env-file", str(env_file), "--snapfs", snapfs_bin]
    # One host at a time: node-a fetches everything, node-b (same cache here) finds it all cached.
    result = subprocess.run(
        [*PREWARM_NODES, snapshot_id, "--hosts", "node-a,down,node-b", "--parallel", "1", "--json", *common],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
    )
    assert result.returncode == 1, result.stderr
    rows = {row["host"]: row for row in json.loads(result.stdout)}
    assert list(rows) == ["node-a", "down", "node-b"]
    assert rows["node-a"]["status"] == "ok" and rows["node-a"]["fetched_bytes"] == total
    assert rows["node-b"]["status"] == "ok" and rows["node-b"]["fetched_bytes"] == 0
    assert rows["node-b"]["already_cached_bytes"] == total
    assert rows["down"]["status"] == "unreachable" and "Connection refused" in rows["down"]["error"]
    assert cached_ids(cache) == set(snapshot_objects(repo, snapshot_id))
    assert (tmp_path / "ssh.log").read_text().split() == ["node-a", "down", "node-b"]

    # A prewarm that fails on the host: its error reaches the table.
    table = subprocess.run(
        [*PREWARM_NODES, "0" * 64, "--hosts", "node-a", *common],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
    )
    assert table.returncode == 1
    header, row, summary = table.stdout.strip().splitlines()
    assert header.split()[:3] == ["HOST", "STATUS", "FETCHED"]
    assert row.split()[:2] == ["node-a", "failed"] and "not found" in row
    assert summary.startswith("0 of 1 hosts ok")
