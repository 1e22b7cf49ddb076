"""What every section shares in one run: the data, the S3 server, results and mounts."""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from . import s3raw
from .common import CLEANUP, Results, lazy_umount, wait_mounted
from .data import DataSet
from .measure import ReadConfig

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Ctx:
    work: Path
    size: str
    ds: DataSet
    results: Results
    cfg: ReadConfig
    server: Any  # support.seaweed.SeaweedServer
    s3: Any  # boto3 S3 client (see s3raw)
    _buckets: set[str] = dataclasses.field(default_factory=set)
    raw_uploaded: bool = False
    snapfs_id: str | None = None  # data/ pushed to the snapfs S3 store, once a section did it

    def s3_env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.server is not None:  # sections that need no S3 run without one
            env.update(self.server.env())
        return env

    def bucket(self, name: str) -> str:
        if name not in self._buckets:
            self.server.create_bucket(name)
            self._buckets.add(name)
        return name

    def stored_bytes(self, bucket: str) -> int:
        return s3raw.bucket_bytes(self.s3, bucket)[0]

    def dir(self, *parts: str, fresh: bool = False) -> Path:
        path = self.work.joinpath(*parts)
        if fresh and path.exists():
            subprocess.run(["rm", "-rf", str(path)], check=True)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def mountpoint(self, name: str) -> Path:
        path = self.work / "mnt" / name
        lazy_umount(path)  # a leftover from a killed earlier run
        path.mkdir(parents=True, exist_ok=True)
        return path

    def log_path(self, name: str) -> Path:
        return self.dir("logs") / f"{name}.log"

    def raw_bucket(self) -> str:
        """The data as plain objects (key = relative path): what boto3, s3fs and rclone read."""
        bucket = self.bucket("raw")
        if not self.raw_uploaded:
            rels = self.ds.rel(self.ds.large) + self.ds.rel(self.ds.small)
            seconds = s3raw.upload_tree(self.s3, bucket, self.ds.root, rels)
            self.results.add("boto3", "push_s", seconds, "s", f"{s3raw.THREADS} threads, plain objects")
            self.raw_uploaded = True
        return bucket


def start_daemon(
    ctx: Ctx, name: str, cmd: list[str], mountpoint: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start a FUSE daemon in the foreground (so its pid is ours) and wait for its mount."""
    with open(ctx.log_path(name), "ab") as log_file:
        proc = subprocess.Popen(
            [str(c) for c in cmd],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            # Its own session: Ctrl-C reaches only the bench, which unmounts first.
            start_new_session=True,
        )
    CLEANUP.process(proc)
    CLEANUP.mount(mountpoint)
    try:
        wait_mounted(mountpoint, proc, timeout=120)
    except RuntimeError as exc:
        tail = " | ".join(ctx.log_path(name).read_text(errors="replace").strip().splitlines()[-3:])
        raise RuntimeError(f"{exc}: {tail}") from None
    return proc


def stop_daemon(proc: subprocess.Popen[bytes] | None, mountpoint: Path) -> None:
    """Unmount, let the daemon exit by itself, and make sure it did.

    A busy or stuck mount is detached lazily at once rather than waited on, so
    an interrupted run does not hang here.
    """
    unmounted = subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True).returncode == 0
    if not unmounted:
        lazy_umount(mountpoint)
    if proc is not None:
        deadline = time.monotonic() + (20 if unmounted else 3)
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        CLEANUP.stop_process(proc, timeout=5)
    lazy_umount(mountpoint)
