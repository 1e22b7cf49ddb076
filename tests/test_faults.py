"""Store faults against the mount, pull, prewarm and push, through a real HTTP fault proxy.

Every client here (the mount daemon, the snapfs CLI) talks to the loopback
SeaweedFS through tests/support/faultproxy.py, which breaks requests the way
networks and stores do: 500/503 at a rate, hangs past the client's timeout,
resets, truncated bodies, flipped bytes, slow trickles. The rule under test
(issue 7): a reader gets the right bytes or EIO within a bounded time, never
wrong bytes and never a hang; transient faults are retried away; pull and
prewarm finish correctly or fail with one clear line and resume when rerun;
a push completes or leaves nothing visible that points at missing data.

Readers run in separate processes with a deadline (``probe``), so a hung
mount fails the test instead of hanging CI. The client timeouts are shortened
through snapfs's own environment variables (SNAPFS_S3_READ_TIMEOUT, ...).
"""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
import time
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.faultproxy import FaultProxy
from support.mounts import fuse_missing, mounted, status
from support.trees import file_digests

from snapfs.cache import OUTAGE_AFTER, OUTAGE_HOLDOFF_MAX
from snapfs.repo import Repo
from snapfs.snapshot import push

SNAPFS = [sys.executable, "-m", "snapfs.cli.main"]
BUCKET = "snapfs-test"
#: Client limits for every process under test: short, so a fault that must end
#: in EIO does so in seconds. A GET that hangs costs at most
#: attempts x (read timeout + backoff).
CLIENT_ENV = {
    "SNAPFS_S3_READ_TIMEOUT": "2",
    "SNAPFS_S3_CONNECT_TIMEOUT": "2",
    "SNAPFS_S3_MAX_ATTEMPTS": "3",
    "SNAPFS_NO_PROGRESS": "1",
}
#: The longest one failing read may take under CLIENT_ENV: 3 attempts of a 2 s
#: timeout plus botocore's backoff, and the kernel may ask twice (readahead,
#: then the page itself).
EIO_BOUND = 45.0

_fuse_reason = fuse_missing()
needs_fuse = pytest.mark.skipif(_fuse_reason is not None, reason=f"no FUSE: {_fuse_reason}")
pytestmark = [pytest.mark.s3, pytest.mark.timeout(240)]


# --- readers in other processes, with a deadline ----------------------------------------

_PROBE = r"""
import hashlib, json, os, sys, time
for op, path in json.load(sys.stdin):
    started = time.monotonic()
    try:
        if op == "read":
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                while True:
                    piece = f.read(1 << 20)
                    if not piece:
                        break
                    digest.update(piece)
            result = {"sha256": digest.hexdigest()}
        elif op == "list":
            result = {"names": sorted(os.listdir(path))}
        elif op == "readlink":
            result = {"target": os.readlink(path)}
        elif op == "stat":
            st = os.lstat(path)
            result = {"mode": st.st_mode, "size": st.st_size}
        else:
            raise SystemExit("unknown op " + op)
    except OSError as exc:
        result = {"errno": exc.errno}
    result["op"], result["path"] = op, path
    result["seconds"] = round(time.monotonic() - started, 3)
    print(json.dumps(result), flush=True)
"""


def probe_start(ops: list[tuple[str, str | bytes | Path]]) -> subprocess.Popen:
    """Start a reader process running ``ops`` ((op, path) pairs) in order."""
    plain = [(op, os.fsdecode(path)) for op, path in ops]
    proc = subprocess.Popen(
        [sys.executable, "-c", _PROBE],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        errors="surrogateescape",
    )
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(plain))  # the reader takes all of it before it starts
    proc.stdin.close()
    proc.stdin = None  # communicate() must not touch it again
    return proc


def probe_finish(proc: subprocess.Popen, ops: list, timeout: float) -> list[dict]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate(timeout=30)
        done = [json.loads(line) for line in out.splitlines() if line.strip()]
        hung = ops[len(done)] if len(done) < len(ops) else None
        raise AssertionError(f"reader hung for {timeout:.0f}s on {hung}; finished: {done}") from None
    assert proc.returncode == 0, err
    results = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert len(results) == len(ops), (results, err)
    return results


def probe(ops: list[tuple[str, str | bytes | Path]], timeout: float = 60.0) -> list[dict]:
    """Run ``ops`` in a separate reader process; fail if it does not finish in time."""
    return probe_finish(probe_start(ops), ops, timeout)


#: After an outage, the mount fails misses at once until a probe finds the store
#: back (snapfs.cache OUTAGE_HOLDOFF, doubling to OUTAGE_HOLDOFF_MAX per failed
#: probe): reads are right again within that, plus one probe.
RECOVERY_BOUND = OUTAGE_HOLDOFF_MAX + 15.0


def probe_until_right(ops: list[tuple[str, str | bytes | Path]], shas: list[str]) -> tuple[list[dict], float]:
    """Run ``ops`` until every read gives its sha256 in ``shas``; fail after RECOVERY_BOUND.
    Returns the last results and the seconds it took."""
    started = time.monotonic()
    while True:
        results = probe(ops)
        if [r.get("sha256") for r in results] == shas:
            return results, time.monotonic() - started
        if time.monotonic() - started > RECOVERY_BOUND:
            raise AssertionError(f"not right {RECOVERY_BOUND:.0f} s after the fault ended: {results}")
        time.sleep(0.5)


def reads_of(root: Path | bytes, digests: dict[bytes, bytes]) -> list[tuple[str, bytes]]:
    return [("read", os.path.join(os.fsencode(root), rel)) for rel in sorted(digests)]


def classify(results: list[dict], root: Path | bytes, digests: dict[bytes, bytes]) -> dict[str, list]:
    """Sort read results into right bytes, EIO and anything else (wrong bytes, other errors)."""
    root_b = os.fsencode(root)
    out: dict[str, list] = {"right": [], "eio": [], "bad": []}
    for result in results:
        rel = os.path.relpath(os.fsencode(result["path"]), root_b)
        if "sha256" in result and result["sha256"] == digests[rel].hex():
            out["right"].append(rel)
        elif result.get("errno") == errno.EIO:
            out["eio"].append(rel)
        else:
            out["bad"].append((rel, result))
    return out


# --- fixtures ---------------------------------------------------------------------------


def make_tree(root: Path, seed: int, *, large: int = 3 << 20, small: int = 24) -> Path:
    """A small dataset: one multi-chunk file, one mid-size file, many small ones."""
    import random

    rng = random.Random(seed)
    root.mkdir(parents=True)
    (root / "large.bin").write_bytes(rng.randbytes(large))
    (root / "medium.bin").write_bytes(rng.randbytes(400_000))
    (root / "small").mkdir()
    for i in range(small):
        (root / "small" / f"{i:03d}.dat").write_bytes(rng.randbytes(rng.randint(1, 40_000)))
    return root


@pytest.fixture(scope="module")
def s3_module(s3_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """AWS environment for this module's processes (module scope: one mount serves many tests)."""
    s3_server.create_bucket(BUCKET)
    home = tmp_path_factory.mktemp("aws")
    env = {
        **s3_server.env(),
        "AWS_CONFIG_FILE": str(home / "no-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(home / "no-credentials"),
        **CLIENT_ENV,
    }
    with pytest.MonkeyPatch.context() as patch:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_PROFILE"):
            patch.delenv(name, raising=False)
        for name, value in env.items():
            patch.setenv(name, value)
        yield env


@pytest.fixture(scope="module")
def module_proxy(s3_server, s3_module) -> Iterator[FaultProxy]:
    with FaultProxy(s3_server.endpoint_url, seed=7) as proxy:
        yield proxy


@pytest.fixture
def proxy(module_proxy: FaultProxy) -> Iterator[FaultProxy]:
    """The module's proxy, with no faults at the start and end of each test."""
    module_proxy.clear()
    if not module_proxy.is_up:
        module_proxy.up()
    module_proxy.reset_counters()
    yield module_proxy
    module_proxy.clear()
    if not module_proxy.is_up:
        module_proxy.up()


@pytest.fixture(scope="module")
def store(s3_module) -> str:
    """One S3 store for the module; each test pushes its own data into it (directly, not
    through the proxy), so every test starts cold."""
    return f"s3://{BUCKET}/faults-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def mount(store: str, module_proxy: FaultProxy, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    if _fuse_reason:
        pytest.skip(f"no FUSE: {_fuse_reason}")
    base = tmp_path_factory.mktemp("faultmount")
    with mounted(
        base / "mnt", store, base / "cache", "--endpoint-url", module_proxy.endpoint_url, "-v"
    ) as mnt:
        yield mnt
    log = (base / "cache" / "mount.log").read_text()
    assert "Traceback" not in log and "bug:" not in log, log[-4000:]


@pytest.fixture
def dataset(store: str, tmp_path: Path, request: pytest.FixtureRequest) -> tuple[str, Path, dict]:
    """A fresh snapshot (never read yet) and the sha256 of each of its files."""
    src = make_tree(tmp_path / "src", _seed(request.node.name))
    snapshot_id = push(str(src), Repo.open(store)).snapshot_id
    return snapshot_id, src, file_digests(src)


def _seed(name: str) -> int:
    return zlib.crc32(name.encode()) % 100_000


def summary(kind: str, **facts: object) -> None:
    """One line per fault for the issue's table (visible with pytest -s or -rA)."""
    print(f"\nFAULT-TABLE {kind}: " + ", ".join(f"{k}={v}" for k, v in facts.items()))


# --- the mount under each fault ---------------------------------------------------------

#: Transient faults: each object's fetch may fail a few times and must then succeed.
#: (kind, proxy parameters). All hit only object GETs, so lookups of the snapshot
#: root fail too when they are unlucky: that is part of the test.
TRANSIENT = {
    "503-rate-0.3": ("503", {"rate": 0.3}),
    "500-rate-0.3": ("500", {"rate": 0.3}),
    "hang-before-response-x2": ("hang", {"count": 2, "seconds": 30}),
    "hang-mid-body-x2": ("hang", {"count": 2, "seconds": 30, "at": 4096}),
    "reset-rate-0.3": ("reset", {"rate": 0.3}),
    "reset-mid-body-rate-0.3": ("reset", {"rate": 0.3, "at": 4096}),
    "truncate-rate-0.3": ("truncate", {"rate": 0.3}),
    "flip-x3": ("flip", {"count": 3}),
    "trickle-64k": ("trickle", {"piece": 64 << 10, "delay": 0.005}),
}


@needs_fuse
@pytest.mark.fuse
@pytest.mark.parametrize("fault", sorted(TRANSIENT))
def test_mount_transient_fault_right_bytes_or_eio_then_recovers(
    fault: str, mount: Path, proxy: FaultProxy, dataset
):
    snapshot_id, _src, digests = dataset
    kind, params = TRANSIENT[fault]
    proxy.inject(kind, method="GET", key="objects/|packs/", **params)
    root = mount / snapshot_id
    started = time.monotonic()
    results = probe([("list", root), *reads_of(root, digests)], timeout=180)
    elapsed = time.monotonic() - started
    injected = proxy.faults_injected.get(kind, 0)
    proxy.clear()
    sorted_out = classify(results[1:], root, digests)
    assert sorted_out["bad"] == [], f"wrong bytes or an unexpected error under {fault}: {sorted_out['bad']}"
    assert injected > 0, f"{fault} never fired"
    # Retried away: nearly everything reads right under the fault itself...
    assert len(sorted_out["right"]) >= 0.8 * len(digests), sorted_out
    assert max(r["seconds"] for r in results) < EIO_BOUND, results
    # ...and whatever gave EIO reads right once the fault is gone (no error is cached).
    again = classify(probe(reads_of(root, {rel: digests[rel] for rel in sorted_out["eio"]})), root, digests)
    assert again["right"] == sorted(sorted_out["eio"]), again
    summary(
        fault,
        files=len(digests),
        right=len(sorted_out["right"]),
        eio=len(sorted_out["eio"]),
        wrong=0,
        faults=injected,
        seconds=round(elapsed, 1),
        bytes_checked=sum(os.path.getsize(_src / os.fsdecode(rel)) for rel in digests),
    )


#: Faults that never clear while they are set: every affected read must end in EIO
#: within EIO_BOUND, and read right after the fault is removed.
PERSISTENT = {
    "hang-always": ("hang", {"seconds": 60}),
    "hang-mid-body-always": ("hang", {"seconds": 60, "at": 4096}),
    "truncate-always": ("truncate", {}),
    "flip-always": ("flip", {}),
    "reset-always": ("reset", {}),
    "503-always": ("503", {}),
}


@needs_fuse
@pytest.mark.fuse
@pytest.mark.parametrize(
    "fault",
    [pytest.param(f, marks=pytest.mark.slow) if f.startswith("hang") else f for f in sorted(PERSISTENT)],
)
def test_mount_persistent_fault_is_eio_within_a_bound(fault: str, mount: Path, proxy: FaultProxy, dataset):
    snapshot_id, src, digests = dataset
    root = mount / snapshot_id
    # Trees first, without faults: this test is about reading file data.
    probe([("list", root), ("list", root / "small")])
    kind, params = PERSISTENT[fault]
    proxy.inject(kind, method="GET", key="objects/|packs/", **params)
    # Several chunks (a read spans two), and one; a hang costs seconds, so one file there.
    targets = [b"large.bin"] if kind == "hang" else [b"large.bin", b"small/000.dat"]
    before = status(mount)
    results = probe([("read", root / os.fsdecode(t)) for t in targets], timeout=2 * EIO_BOUND + 30)
    proxy.clear()
    for result in results:
        assert result.get("errno") == errno.EIO, (fault, result)
        assert result["seconds"] < EIO_BOUND, (fault, result)
    after = status(mount)
    if kind == "flip":
        assert after["verify_failures"] > before["verify_failures"]
    else:
        assert after["fetch_errors"] > before["fetch_errors"]
    _again, recovered = probe_until_right(
        [("read", root / os.fsdecode(t)) for t in targets], [digests[t].hex() for t in targets]
    )
    summary(
        fault,
        files=len(targets),
        eio=len(targets),
        wrong=0,
        max_seconds=max(r["seconds"] for r in results),
        then_right=len(targets),
        right_again_after_s=round(recovered, 1),
        bytes_checked=sum((src / os.fsdecode(t)).stat().st_size for t in targets),
    )


@needs_fuse
@pytest.mark.fuse
def test_mount_store_down_then_up(mount: Path, proxy: FaultProxy, store: str, dataset, tmp_path: Path):
    snapshot_id, src, digests = dataset
    root = mount / snapshot_id
    probe([("list", root)])
    cached = probe([("read", root / "medium.bin")])[0]
    # Listing the root prefetched the trees below it; a snapshot never opened has none.
    unseen = push(str(make_tree(tmp_path / "unseen", 5, small=2)), Repo.open(store)).snapshot_id
    proxy.down()
    results = probe(
        [
            ("read", root / "large.bin"),
            ("read", root / "medium.bin"),
            ("list", root / "small"),
            ("list", mount / unseen),
        ]
    )
    assert results[0].get("errno") == errno.EIO and results[0]["seconds"] < EIO_BOUND, results
    assert results[1]["sha256"] == cached["sha256"] == digests[b"medium.bin"].hex()  # cached: still served
    assert results[2].get("names") == sorted(os.fsdecode(r)[6:] for r in digests if r.startswith(b"small/"))
    assert results[3].get("errno") == errno.EIO, results  # a tree never fetched
    proxy.up()
    _again, recovered = probe_until_right(
        reads_of(root, digests), [digests[rel].hex() for rel in sorted(digests)]
    )
    summary(
        "store-down",
        eio_seconds=results[0]["seconds"],
        cached_served=True,
        then_right=len(digests),
        right_again_after_s=round(recovered, 1),
    )


@needs_fuse
@pytest.mark.fuse
@pytest.mark.slow
def test_mount_hung_store_fails_fast_after_the_first_eio(mount: Path, proxy: FaultProxy, dataset):
    """A hung store costs its timeouts until the mount has seen it fail three times
    in a row; after that, misses give EIO at once, cached files are still served,
    and once the store answers again reads are right."""
    snapshot_id, src, digests = dataset
    root = mount / snapshot_id
    probe([("list", root), ("list", root / "small")])
    # An uncached read that succeeds: the store answers (no outage left from before).
    cached, _ = probe_until_right([("read", root / "medium.bin")], [digests[b"medium.bin"].hex()])
    cached = cached[0]
    proxy.inject("hang", method="GET", key="objects/|packs/", seconds=60)
    smalls = sorted(rel for rel in digests if rel.startswith(b"small/"))
    assert len(smalls) >= 6, smalls
    before = status(mount)
    results = probe(
        [("read", root / os.fsdecode(rel)) for rel in smalls[:6]] + [("read", root / "medium.bin")],
        timeout=6 * EIO_BOUND,
    )
    after = status(mount)
    shown = cli("status", str(mount)).stdout
    proxy.clear()
    assert re.search(r"store health +unavailable for [\d.]+ s; uncached reads fail at once", shown), shown
    assert all(r.get("errno") == errno.EIO for r in results[:6]), results
    slow, fast = results[0], results[3:6]
    # The first read pays the timeouts (3 attempts of 2 s each; the kernel may ask
    # twice, and each ask counts as one failure of the three)...
    assert slow["seconds"] > 4, slow
    # ...and once three fetches in a row failed, misses fail at once, though the
    # store still hangs.
    assert all(r["seconds"] < 1 for r in fast), fast
    assert after["fast_failures"] - before["fast_failures"] >= 3, after
    assert after["store_unavailable_seconds"] > 0, after
    assert results[6].get("sha256") == cached["sha256"] == digests[b"medium.bin"].hex()
    reads = [("read", root / os.fsdecode(rel)) for rel in smalls[:6]]
    _again, recovered = probe_until_right(reads, [digests[rel].hex() for rel in smalls[:6]])
    assert status(mount)["store_unavailable_seconds"] == 0
    assert re.search(r"store health +answering \(\d+ reads failed at once", cli("status", str(mount)).stdout)
    summary(
        "hang-outage-memory",
        first_eio_s=slow["seconds"],
        then_eio_s=[r["seconds"] for r in fast],
        cached_served=True,
        right_again_after_s=round(recovered, 1),
    )


# --- pull, prewarm and push under faults ---------------------------------------------------


def cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([*SNAPFS, *args], capture_output=True, text=True, timeout=timeout)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("snapfs: error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    return errors[0]


MIXED = [
    ("503", {"rate": 0.1}),
    ("reset", {"rate": 0.05, "at": 2048}),
    ("truncate", {"rate": 0.05}),
    ("hang", {"count": 1, "seconds": 30}),
    ("flip", {"count": 2}),
]


def test_pull_under_transient_faults_completes_or_resumes(
    proxy: FaultProxy, store: str, dataset, tmp_path: Path
):
    snapshot_id, _src, digests = dataset
    for kind, params in MIXED:
        proxy.inject(kind, method="GET", key="objects/|packs/", **params)
    dest = tmp_path / "dest"
    runs = []
    for _ in range(5):
        result = cli("pull", snapshot_id, str(dest), "--store", store, "--endpoint-url", proxy.endpoint_url)
        runs.append(result.returncode)
        if result.returncode == 0:
            break
        assert result.returncode in (4, 5), result.stderr
        one_line_error(result)
    injected = sum(proxy.faults_injected.values())
    assert runs[-1] == 0, runs
    assert injected > 0
    assert file_digests(dest) == digests
    assert not [p for p in dest.rglob(".snapfs-tmp-*")]
    summary("pull-mixed", runs=runs, faults=injected, files=len(digests), wrong=0)


def test_pull_hard_fault_fails_clearly_and_rerun_resumes(
    proxy: FaultProxy, store: str, dataset, tmp_path: Path
):
    snapshot_id, _src, digests = dataset
    repo = Repo.open(store)
    bad_chunk = repo.lookup_path(snapshot_id, "large.bin").chunks[1][0]
    proxy.inject("flip", method="GET", key=bad_chunk[2:])
    dest = tmp_path / "dest"
    args = ["pull", snapshot_id, str(dest), "--store", store, "--endpoint-url", proxy.endpoint_url, "--json"]
    first = cli(*args)
    assert first.returncode == 4, first.stderr
    line = one_line_error(first)
    assert bad_chunk in line and "corrupt" in line, line
    assert not (dest / "large.bin").exists()  # never a partly verified file under its name
    assert not [p for p in dest.rglob(".snapfs-tmp-*")]
    # pull stops starting new files after a failure; what it did write is exact.
    present = file_digests(dest)
    assert b"large.bin" not in present
    assert all(digests[rel] == digest for rel, digest in present.items())
    proxy.clear()
    second = cli(*args)
    assert second.returncode == 0, second.stderr
    report = json.loads(second.stdout)
    assert report["skipped_files"] == len(present), report
    assert report["fetched_files"] == len(digests) - len(present), report
    assert file_digests(dest) == digests
    summary("pull-flip-one-chunk", first_exit=4, kept=len(present), resumed=report["fetched_files"], wrong=0)


def test_prewarm_under_faults_reports_clearly_and_resumes(
    proxy: FaultProxy, store: str, dataset, tmp_path: Path
):
    snapshot_id, _src, _digests = dataset
    repo = Repo.open(store)
    bad_chunk = repo.lookup_path(snapshot_id, "large.bin").chunks[0][0]
    cache = tmp_path / "cache"
    args = [
        "prewarm",
        snapshot_id,
        "--store",
        store,
        "--cache",
        str(cache),
        "--endpoint-url",
        proxy.endpoint_url,
    ]
    # The hard fault first (rules are tried in order), then transient ones on the
    # chunks only: a tree that fails ends the plan itself, another clean outcome
    # test_pull_under_transient_faults_completes_or_resumes already covers.
    chunk_ids = {c for rel in _digests for c, _ in repo.lookup_path(snapshot_id, os.fsdecode(rel)).chunks}
    proxy.inject("truncate", method="GET", key=bad_chunk[2:])
    for kind, params in MIXED:
        proxy.inject(kind, method="GET", key="|".join(c[2:] for c in chunk_ids), **params)
    first = cli(*args, "--json")
    assert first.returncode != 0
    line = one_line_error(first)
    assert "rerun to retry" in line and snapshot_id[:12] in line, line
    assert bad_chunk in first.stderr  # the failed object is named
    report = json.loads(first.stdout)
    assert not report["ok"] and report["failed_count"] >= 1
    assert not [p for p in cache.rglob(".tmp-*")]
    proxy.clear()
    second = cli(*args, "--json")
    assert second.returncode == 0, second.stderr
    again = json.loads(second.stdout)
    assert again["ok"] and again["fetched_objects"] == report["failed_count"], again
    verify = json.loads(cli("cache", "verify", "--cache", str(cache), "--json").stdout)
    assert verify["bad"] == [] and verify["checked"] == again["objects"]
    summary(
        "prewarm-truncate-one-chunk+mixed",
        first_failed=report["failed_count"],
        rerun_fetched=again["fetched_objects"],
        verified=verify["checked"],
    )


def test_prewarm_stops_when_the_store_is_down_and_a_rerun_completes(
    proxy: FaultProxy, store: str, dataset, tmp_path: Path
):
    """Three chunk fetches in a row failing as unavailable stop the prewarm: the rest
    is listed as not fetched instead of each paying the client's retries."""
    snapshot_id, _src, digests = dataset
    repo = Repo.open(store)
    chunk_ids = {c for rel in digests for c, _ in repo.lookup_path(snapshot_id, os.fsdecode(rel)).chunks}
    cache = tmp_path / "cache"
    args = ["prewarm", snapshot_id, "--store", store, "--cache", str(cache)]
    args += ["--endpoint-url", proxy.endpoint_url, "--jobs", "2", "--json"]
    proxy.inject("reset", method="GET", key="|".join(c[2:] for c in chunk_ids))
    first = cli(*args)
    assert first.returncode == 5, first.stderr
    line = one_line_error(first)
    assert "stopped" in line and "rerun to retry" in line and snapshot_id[:12] in line, line
    report = json.loads(first.stdout)
    # Every chunk failed or was skipped; only the trees (fetched by the plan) are in.
    assert report["failed_count"] == len(chunk_ids), report
    assert report["fetched_objects"] + report["failed_count"] == report["objects"], report
    assert report["store_unavailable"], report
    # 2 jobs: the three failures in a row, and at most one more fetch in flight,
    # each 3 attempts (CLIENT_ENV); without the stop, every chunk would be tried.
    tried = proxy.faults_injected.get("reset", 0)
    assert tried <= (OUTAGE_AFTER + 1) * 3 < len(chunk_ids) * 3, (tried, len(chunk_ids))
    proxy.clear()
    second = cli(*args)
    assert second.returncode == 0, second.stderr
    again = json.loads(second.stdout)
    assert again["ok"] and again["fetched_objects"] == len(chunk_ids), again
    verify = json.loads(cli("cache", "verify", "--cache", str(cache), "--json").stdout)
    assert verify["bad"] == [] and verify["checked"] == again["objects"]
    summary("prewarm-store-down", chunks=len(chunk_ids), requests_tried=tried, rerun_fetched=len(chunk_ids))


def assert_nothing_dangles(repo: Repo) -> dict[str, int]:
    """No visible marker, record or name points at missing data."""
    from snapfs import records
    from snapfs.snapshot import fsck

    report = fsck(repo, read_data=True)
    assert report.ok, report.as_dict()
    markers = set(repo.snapshot_ids())
    record_ids = records.record_ids(repo)
    for record_id in record_ids:
        record = records.read_record(repo, record_id)
        assert record.snapshot in markers or repo.has_object(record.snapshot), record_id
    names = records.name_keys(repo)
    for name in names:
        entry = records.read_name(repo, name)
        assert entry is not None and entry.snapshot in markers, name
        assert records.has_record(repo, entry.record), name
    return {"snapshots": len(markers), "records": len(record_ids), "names": len(names)}


@pytest.fixture
def push_store(s3_module) -> str:
    return f"s3://{BUCKET}/push-{uuid.uuid4().hex[:8]}"


def test_push_under_transient_faults_completes(proxy: FaultProxy, push_store: str, tmp_path: Path):
    src = make_tree(tmp_path / "src", 11)
    proxy.inject("500", method="PUT", rate=0.15)
    proxy.inject("reset", method="PUT", rate=0.1, reach_store=True)  # stored, but the client never heard
    proxy.inject("503", method="HEAD", rate=0.1)
    runs = []
    for _ in range(4):
        result = cli(
            "push",
            str(src),
            "--store",
            push_store,
            "--endpoint-url",
            proxy.endpoint_url,
            "--name",
            "ds@1",
            "--no-git",
            "-q",
        )
        runs.append(result.returncode)
        if result.returncode == 0:
            break
        one_line_error(result)
    injected = sum(proxy.faults_injected.values())
    proxy.clear()
    assert runs[-1] == 0, runs
    assert injected > 0
    repo = Repo.open(push_store)
    counts = assert_nothing_dangles(repo)
    assert counts["names"] == 1
    dest = tmp_path / "dest"
    assert cli("pull", "ds@1", str(dest), "--store", push_store).returncode == 0
    assert file_digests(dest) == file_digests(src)
    summary("push-put-500+reset-after-store+head-503", runs=runs, faults=injected, **counts)


@pytest.mark.parametrize(
    "where",
    ["objects/[0-7]", "snapshots/", "records/", "names/"],
    ids=["half-the-objects", "marker", "record", "name"],
)
def test_push_that_fails_leaves_nothing_dangling_and_rerun_completes(
    where: str, proxy: FaultProxy, push_store: str, tmp_path: Path
):
    src = make_tree(tmp_path / "src", 12, small=8)
    proxy.inject("500", method="PUT", key=where)
    args = ["push", str(src), "--store", push_store, "--endpoint-url", proxy.endpoint_url]
    args += ["--name", "ds@1", "--no-git", "--json"]
    first = cli(*args)
    assert first.returncode == 5, first.stderr
    one_line_error(first)
    repo = Repo.open(push_store)
    counts = assert_nothing_dangles(repo)
    assert counts["names"] == 0
    if where != "records/" and where != "names/":
        assert counts["snapshots"] == 0 and counts["records"] == 0
    proxy.clear()
    second = cli(*args)
    assert second.returncode == 0, second.stderr
    counts = assert_nothing_dangles(repo)
    assert counts["names"] == 1 and counts["snapshots"] == 1
    summary(f"push-500-on-{where}", first_exit=5, rerun_exit=0, **counts)
