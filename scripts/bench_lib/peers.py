"""Baselines (native disk, the Python FUSE limit, raw boto3, b3sum) and peers.

Each function measures one tool on the run's data and S3 server and records
rows in ``ctx.results``. A tool that cannot run raises ``Unavailable`` (or
any error), which the caller records as "unavailable: reason".

Every peer is set up as its own documentation recommends, with its defaults
unless noted, and starts each read measurement cold: its local cache emptied
and the page cache dropped. Pushes and re-pushes are measured by what lands in
the bucket, the same way for every tool.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from . import s3raw
from .common import MB, REPO, Unavailable, drop_caches, run, which
from .context import Ctx, start_daemon, stop_daemon
from .data import DataSet
from .measure import measure_tree
from .readers import read_parallel

log = logging.getLogger(__name__)


def _first_ls(root: Path, started: float) -> float:
    os.listdir(root)
    return time.perf_counter() - started


# -- baselines -----------------------------------------------------------------


def native(ctx: Ctx) -> None:
    measure_tree(ctx.results, "native", ctx.ds.root, ctx.ds, ctx.cfg, cacheless=True)


def fuse_limit(ctx: Ctx) -> None:
    """A minimal pyfuse3 passthrough over the same files: the most a Python FUSE daemon can give."""
    mnt = ctx.mountpoint("fuse-limit")
    drop_caches()
    started = time.perf_counter()
    proc = start_daemon(
        ctx, "fuse-limit", [sys.executable, REPO / "scripts" / "bench_passthrough.py", ctx.ds.root, mnt], mnt
    )
    try:
        ctx.results.add("fuse-limit", "mount_ls_s", _first_ls(mnt, started), "s")
        measure_tree(ctx.results, "fuse-limit", mnt, ctx.ds, ctx.cfg, pids=lambda: [proc.pid], cacheless=True)
    finally:
        stop_daemon(proc, mnt)


def boto3_raw(ctx: Ctx) -> None:
    """Parallel GETs from one Python process: the S3 ceiling every cold ratio sits under."""
    bucket = ctx.raw_bucket()
    ds = ctx.ds
    large = [(rel, p.stat().st_size) for rel, p in zip(ds.rel(ds.large), ds.large, strict=True)]
    small = ds.rel(ds.small)
    note = f"{s3raw.THREADS} threads, one process"
    drop_caches()
    seconds, nbytes = s3raw.get_large(ctx.s3, bucket, large)
    ctx.results.add(
        "boto3", "large_get", nbytes / seconds / MB, "MB/s", note + f", {s3raw.PART >> 20} MiB ranges"
    )
    drop_caches()
    seconds, nbytes = s3raw.get_whole(ctx.s3, bucket, small)
    ctx.results.add("boto3", "small_get", len(small) / seconds, "objects/s", note)
    # Everything, large and small together: what a prewarm of the snapshot must fetch.
    drop_caches()
    t_large, b_large = s3raw.get_large(ctx.s3, bucket, large)
    t_small, b_small = s3raw.get_whole(ctx.s3, bucket, small)
    ctx.results.add("boto3", "all_get", (b_large + b_small) / (t_large + t_small) / MB, "MB/s", note)


def b3sum(ctx: Ctx) -> None:
    """b3sum over every file, page cache warm: the hashing speed `snapfs id` is held to."""
    exe = which("b3sum")
    ds = ctx.ds
    rels = ds.rel(ds.large) + ds.rel(ds.small)
    read_parallel([str(ds.root / r) for r in rels], 2)  # warm the page cache: this measures hashing
    start = time.perf_counter()
    # Relative names keep the argument list short; b3sum hashes each file with all cores.
    run([exe, *rels], cwd=ds.root, stdout_to=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    ctx.results.add("b3sum", "id", ds.total_bytes / seconds / MB, "MB/s", "page cache warm, all files")


# -- S3 FUSE peers -------------------------------------------------------------------


def s3fs(ctx: Ctx) -> None:
    """s3fs-fuse over the plain objects, read-only, its defaults (no local disk cache)."""
    exe = which("s3fs")
    bucket = ctx.raw_bucket()
    mnt = ctx.mountpoint("s3fs")
    passwd = ctx.work / "s3fs.passwd"
    passwd.write_text(f"{ctx.server.access_key}:{ctx.server.secret_key}\n")
    passwd.chmod(0o600)
    cmd = [exe, bucket, mnt, "-f", "-o", f"url={ctx.server.endpoint_url}", "-o", "use_path_request_style"]
    cmd += ["-o", f"passwd_file={passwd}", "-o", "ro"]
    drop_caches()
    started = time.perf_counter()
    proc = start_daemon(ctx, "s3fs", cmd, mnt)
    try:
        ctx.results.add("s3fs", "mount_ls_s", _first_ls(mnt, started), "s")
        measure_tree(ctx.results, "s3fs", mnt, ctx.ds, ctx.cfg, pids=lambda: [proc.pid])
    finally:
        stop_daemon(proc, mnt)


def _rclone_env(ctx: Ctx) -> dict[str, str]:
    env = ctx.s3_env()
    # rclone 1.60 refuses to start with AWS_CA_BUNDLE set ("unable to load custom CA bundle").
    env.pop("AWS_CA_BUNDLE", None)
    env.update(
        RCLONE_CONFIG_BENCH_TYPE="s3",
        RCLONE_CONFIG_BENCH_PROVIDER="SeaweedFS",
        RCLONE_CONFIG_BENCH_ENDPOINT=ctx.server.endpoint_url,
        RCLONE_CONFIG_BENCH_ACCESS_KEY_ID=ctx.server.access_key,
        RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY=ctx.server.secret_key,
        RCLONE_CONFIG_BENCH_REGION=ctx.server.region,
        RCLONE_CONFIG=str(ctx.work / "rclone.conf"),
    )
    return env


def rclone(ctx: Ctx, mode: str) -> None:
    """rclone mount with --vfs-cache-mode off or full; full gets a cache twice the data's size."""
    exe = which("rclone")
    tool = f"rclone-{mode}"
    bucket = ctx.raw_bucket()
    mnt = ctx.mountpoint(tool)
    cache = ctx.dir("cache", tool, fresh=True)
    cmd = [
        exe,
        "mount",
        f"bench:{bucket}",
        mnt,
        "--read-only",
        "--vfs-cache-mode",
        mode,
        "--cache-dir",
        cache,
    ]
    if mode == "full":
        cmd += ["--vfs-cache-max-size", f"{2 * ctx.ds.total_bytes // (1 << 20)}M"]
    drop_caches()
    started = time.perf_counter()
    proc = start_daemon(ctx, tool, cmd, mnt, env=_rclone_env(ctx))
    try:
        ctx.results.add(tool, "mount_ls_s", _first_ls(mnt, started), "s")
        measure_tree(
            ctx.results, tool, mnt, ctx.ds, ctx.cfg, has_cache=mode == "full", pids=lambda: [proc.pid]
        )
    finally:
        stop_daemon(proc, mnt)


def juicefs(ctx: Ctx) -> None:
    """JuiceFS with sqlite3 metadata on the same S3 server, default cache settings.

    The data is first written through a JuiceFS mount (that is its push), then
    the mount is restarted with an empty cache for the reads. The re-push
    copies the changed files over and counts the bytes the bucket grew by.
    """
    exe = which("juicefs")
    bucket = ctx.bucket("juicefs")
    base = ctx.dir("juicefs", fresh=True)
    meta = f"sqlite3://{base / 'meta.db'}"
    cache = base / "cache"
    # A leftover volume from an earlier run would make `format` refuse.
    _empty_bucket(ctx, bucket)
    run(
        [exe, "format", "--storage", "s3", "--bucket", f"{ctx.server.endpoint_url}/{bucket}"]
        + ["--access-key", ctx.server.access_key, "--secret-key", ctx.server.secret_key, meta, "bench"],
        env=ctx.s3_env(),
    )
    mnt = ctx.mountpoint("juicefs")
    cmd = [exe, "mount", meta, mnt, "--cache-dir", cache, "--no-usage-report"]

    proc = start_daemon(ctx, "juicefs-write", cmd, mnt, env=ctx.s3_env())
    try:
        drop_caches()
        start = time.perf_counter()
        run(["cp", "-r", ctx.ds.root, mnt / "data"])
        os.sync()
        ctx.results.add("juicefs", "push_s", time.perf_counter() - start, "s", "cp -r into the mount")
        ctx.results.add("juicefs", "push_mb", ctx.stored_bytes(bucket) / MB, "MB", "bucket size after push")
    finally:
        stop_daemon(proc, mnt)

    shutil.rmtree(cache, ignore_errors=True)
    drop_caches()
    started = time.perf_counter()
    proc = start_daemon(ctx, "juicefs", cmd, mnt, env=ctx.s3_env())
    try:
        root = mnt / "data"
        ctx.results.add("juicefs", "mount_ls_s", _first_ls(root, started), "s")
        measure_tree(ctx.results, "juicefs", root, ctx.ds, ctx.cfg, has_cache=True, pids=lambda: [proc.pid])
        before = ctx.stored_bytes(bucket)
        start = time.perf_counter()
        ctx.ds.apply_changes(root)
        os.sync()
        ctx.results.add("juicefs", "repush_s", time.perf_counter() - start, "s")
        ctx.results.add("juicefs", "repush_mb", (ctx.stored_bytes(bucket) - before) / MB, "MB")
    finally:
        stop_daemon(proc, mnt)


def _empty_bucket(ctx: Ctx, bucket: str) -> None:
    for page in ctx.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
        if keys:
            ctx.s3.delete_objects(Bucket=bucket, Delete={"Objects": keys})


def _restic_env(ctx: Ctx, cache: Path) -> dict[str, str]:
    env = ctx.s3_env()
    env.update(
        RESTIC_REPOSITORY=f"s3:{ctx.server.endpoint_url}/restic",
        RESTIC_PASSWORD="snapfs-bench",
        RESTIC_CACHE_DIR=str(cache),
    )
    return env


def restic(ctx: Ctx) -> None:
    """restic backup to a repository on the same S3, then `restic mount` for the reads.

    restic's local cache holds only metadata (index, trees); it is emptied
    before the mount so the reads start as cold as everyone else's.
    """
    exe = which("restic")
    bucket = ctx.bucket("restic")
    _empty_bucket(ctx, bucket)
    cache = ctx.dir("cache", "restic", fresh=True)
    env = _restic_env(ctx, cache)
    run([exe, "init"], env=env)
    drop_caches()
    start = time.perf_counter()
    run([exe, "backup", "--quiet", "."], env=env, cwd=ctx.ds.root)
    ctx.results.add("restic", "push_s", time.perf_counter() - start, "s", "restic backup")
    ctx.results.add("restic", "push_mb", ctx.stored_bytes(bucket) / MB, "MB", "bucket size after push")

    shutil.rmtree(cache, ignore_errors=True)
    mnt = ctx.mountpoint("restic")
    drop_caches()
    started = time.perf_counter()
    proc = start_daemon(ctx, "restic", [exe, "mount", mnt], mnt, env=env)
    try:
        root = _find_data_root(mnt / "snapshots" / "latest")
        ctx.results.add("restic", "mount_ls_s", _first_ls(root, started), "s", "to the data dir of latest")
        measure_tree(ctx.results, "restic", root, ctx.ds, ctx.cfg, pids=lambda: [proc.pid])
    finally:
        stop_daemon(proc, mnt)

    before = ctx.stored_bytes(bucket)
    drop_caches()
    start = time.perf_counter()
    run([exe, "backup", "--quiet", "."], env=env, cwd=ctx.ds.root_v2)
    ctx.results.add("restic", "repush_s", time.perf_counter() - start, "s")
    ctx.results.add("restic", "repush_mb", (ctx.stored_bytes(bucket) - before) / MB, "MB")


def _find_data_root(top: Path) -> Path:
    """restic keeps the absolute path it backed up; find the dir holding large/ and small/."""
    todo = [top]
    while todo:
        path = todo.pop(0)
        names = set(os.listdir(path))
        if {"large", "small"} <= names:
            return path
        todo.extend(path / n for n in sorted(names) if (path / n).is_dir())
    raise RuntimeError(f"no data directory under {top}")


# -- snapshot tools ------------------------------------------------------------------

_SNAPDIR_RUNNER = r"""
import asyncio, sys, time, snapdir
async def main(op, *args):
    start = time.perf_counter()
    if op == "push":
        out = await snapdir.push(args[0], snapdir.StoreUri(args[1]))
    elif op == "pull":
        out = await snapdir.pull(snapdir.SnapshotId(args[0]), snapdir.StoreUri(args[1]), args[2])
    elif op == "id":
        out = await snapdir.id(args[0])
    print(time.perf_counter() - start, out or "")
asyncio.run(main(*sys.argv[1:]))
"""


def snapdir(ctx: Ctx) -> None:
    """snapdir (PyPI binding) push/pull to s3://snapdir/store, and its id."""
    _snapdir_python()
    bucket = ctx.bucket("snapdir")
    store = f"s3://{bucket}/store"
    _empty_bucket(ctx, bucket)
    ds = ctx.ds
    read_parallel([str(p) for p in ds.large + ds.small], 2)
    seconds, _ = _run_snapdir(ctx, "id", str(ds.root))
    ctx.results.add("snapdir", "id", ds.total_bytes / seconds / MB, "MB/s", "page cache warm")
    drop_caches()
    seconds, snapshot_id = _run_snapdir(ctx, "push", str(ds.root), store)
    ctx.results.add("snapdir", "push_s", seconds, "s")
    ctx.results.add("snapdir", "push_mb", ctx.stored_bytes(bucket) / MB, "MB", "bucket size after push")
    dest = ctx.dir("pull", "snapdir", fresh=True) / "data"
    drop_caches()
    seconds, _ = _run_snapdir(ctx, "pull", snapshot_id, store, str(dest))
    ctx.results.add("snapdir", "pull_s", seconds, "s")
    _check_pulled(dest, ds)
    before = ctx.stored_bytes(bucket)
    drop_caches()
    seconds, _ = _run_snapdir(ctx, "push", str(ds.root_v2), store)
    ctx.results.add("snapdir", "repush_s", seconds, "s")
    ctx.results.add("snapdir", "repush_mb", (ctx.stored_bytes(bucket) - before) / MB, "MB")


def _snapdir_python() -> str:
    from .common import BENCH_VENV

    python = BENCH_VENV / "bin" / "python"
    if not python.exists():
        raise Unavailable(f"bench venv {BENCH_VENV} missing (run scripts/setup-bench)")
    check = subprocess.run([python, "-c", "import snapdir"], capture_output=True, text=True)
    if check.returncode != 0:
        raise Unavailable("snapdir not installed in the bench venv (run scripts/setup-bench)")
    return str(python)


def _run_snapdir(ctx: Ctx, *args: str) -> tuple[float, str]:
    """Run one snapdir operation; returns the process's wall time, as every other
    tool's command is timed (snapfs's included: interpreter start, imports,
    client set-up). The binding's own timer, which leaves those out, is logged."""
    python = _snapdir_python()
    start = time.perf_counter()
    proc = run([python, "-c", _SNAPDIR_RUNNER, *args], env=ctx.s3_env(), check=False)
    wall = time.perf_counter() - start
    seconds, _, out = proc.stdout.strip().partition(" ")
    if proc.returncode != 0:
        # snapdir's binding now and then dies by a signal (SIGSEGV) at interpreter
        # exit, after its operation finished and printed its timing. That timing
        # stands (pulls are still checked byte counts below); any other failure does not.
        tail = " | ".join((proc.stderr or "").strip().splitlines()[-3:])
        if proc.returncode > 0 or not re.fullmatch(r"\d+\.\d+", seconds):
            raise RuntimeError(f"snapdir {args[0]} exited {proc.returncode}: {tail}")
        log.warning(
            "  snapdir %s printed its result, then died by signal %d at exit", args[0], -proc.returncode
        )
    log.info("  snapdir %s: %.2f s inside the binding, %.2f s as a process", args[0], float(seconds), wall)
    return wall, out.strip()


def _check_pulled(dest: Path, ds: DataSet) -> None:
    """A pull that did not bring back every byte must not count as a pull."""
    for src in ds.large + ds.small[:: max(1, len(ds.small) // 50)]:
        copy = dest / src.relative_to(ds.root)
        if not copy.is_file() or copy.stat().st_size != src.stat().st_size:
            raise RuntimeError(f"pull is missing or truncated {copy.relative_to(dest)}")


def dvc(ctx: Ctx) -> None:
    """DVC with a dvc-s3 remote: add + push, pull into an empty cache, re-push of the changes."""
    exe = which("dvc")
    bucket = ctx.bucket("dvc")
    _empty_bucket(ctx, bucket)
    repo = ctx.dir("dvc", fresh=True)
    env = ctx.s3_env()
    env.update(DVC_NO_ANALYTICS="1", DVC_SITE_CACHE_DIR=str(ctx.dir("cache", "dvc-site", fresh=True)))
    run([exe, "init", "--no-scm", "-q"], env=env, cwd=repo)
    run([exe, "remote", "add", "-d", "store", f"s3://{bucket}/store"], env=env, cwd=repo)
    run([exe, "remote", "modify", "store", "endpointurl", ctx.server.endpoint_url], env=env, cwd=repo)
    # DVC tracks files inside its workspace: give it its own copy (not timed).
    run(["cp", "-r", ctx.ds.root, repo / "data"])
    drop_caches()
    start = time.perf_counter()
    run([exe, "add", "-q", "data"], env=env, cwd=repo)
    run([exe, "push", "-q"], env=env, cwd=repo)
    ctx.results.add("dvc", "push_s", time.perf_counter() - start, "s", "dvc add + dvc push")
    ctx.results.add("dvc", "push_mb", ctx.stored_bytes(bucket) / MB, "MB", "bucket size after push")

    shutil.rmtree(repo / "data")
    shutil.rmtree(repo / ".dvc" / "cache", ignore_errors=True)
    drop_caches()
    start = time.perf_counter()
    run([exe, "pull", "-q"], env=env, cwd=repo)
    ctx.results.add("dvc", "pull_s", time.perf_counter() - start, "s", "empty local cache")
    _check_pulled(repo / "data", ctx.ds)

    ctx.ds.apply_changes(repo / "data")
    before = ctx.stored_bytes(bucket)
    drop_caches()
    start = time.perf_counter()
    run([exe, "add", "-q", "data"], env=env, cwd=repo)
    run([exe, "push", "-q"], env=env, cwd=repo)
    ctx.results.add("dvc", "repush_s", time.perf_counter() - start, "s", "dvc add + dvc push")
    ctx.results.add("dvc", "repush_mb", (ctx.stored_bytes(bucket) - before) / MB, "MB")
