"""The mount daemon: checks, daemonising, signals, systemd notify, status, metrics.

Process model (docs/OPERATIONS.md):
- ``snapfs mount`` forks *before* anything opens LMDB, starts a thread or calls
  pyfuse3.init. The child becomes the daemon, mounts, and reports readiness
  through a pipe; the parent exits 0 only when the mount is live, and non-zero
  with the child's error otherwise.
- ``--foreground`` skips the fork (systemd ``Type=notify``): READY=1 is sent once
  the kernel has the mount.
- SIGTERM, SIGINT and SIGHUP unmount cleanly. The mount uses libfuse's
  ``auto_unmount``, so even a ``kill -9`` leaves no stale mountpoint behind; a
  mountpoint left stale anyway (e.g. by an older daemon) is detected and lazily
  unmounted before mounting again.
- ``snapfs status`` asks the daemon over a unix socket (paths.control_sockets);
  the mount then answers xattr requests with ENOSYS, and the kernel stops
  sending them. Where the socket cannot be made, the status is the
  ``user.snapfs.status`` xattr of the mount's root, as before.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import resource
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass

import trio

from .cache import DiskCache, ObjectSource
from .errors import CacheIndexError, MountError, NotFoundError, SnapfsError, UsageError
from .linux import FUSECTL, ensure_fusectl, limit_malloc_arenas
from .paths import control_sockets
from .repo import Repo
from .store import LocalStore

log = logging.getLogger(__name__)

DEFAULT_CACHE_CAP = 100 << 30


@dataclass
class MountConfig:
    mountpoint: str
    store_url: str | None
    endpoint_url: str | None
    cache_dir: str
    cache_size: int | None
    allow_other: bool = False
    foreground: bool = False
    fetch_concurrency: int = 32
    metrics_port: int | None = None
    metrics_addr: str = "127.0.0.1"
    log_file: str | None = None
    fsync: bool = True
    readahead: int | None = 4 << 20
    prefetch_siblings: int = 16
    skip_open: bool | None = None  # None: whenever pyfuse3 can (fuseops.KERNEL_CAN_SKIP_OPEN)


# --- checks ------------------------------------------------------------------


def _inside(path: str, parent: str) -> bool:
    path, parent = os.path.realpath(path), os.path.realpath(parent)
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def recover_stale(mountpoint: str) -> bool:
    """Lazily unmount a mountpoint whose daemon died; True if there was one."""
    try:
        os.stat(mountpoint)
        return False
    except OSError as exc:
        if exc.errno not in (errno.ENOTCONN, errno.ECONNABORTED):
            return False
    log.warning("%s is a stale mount left by a dead daemon; unmounting it lazily", mountpoint)
    fusermount = shutil.which("fusermount3") or shutil.which("fusermount")
    if fusermount:
        subprocess.run([fusermount, "-uz", mountpoint], check=False, capture_output=True)
    if _is_stale(mountpoint):
        subprocess.run(["umount", "-l", mountpoint], check=False, capture_output=True)
    if _is_stale(mountpoint):
        raise MountError(
            f"{mountpoint} is a stale mount and could not be unmounted (try: fusermount3 -uz {mountpoint})"
        )
    return True


def _is_stale(mountpoint: str) -> bool:
    try:
        os.stat(mountpoint)
        return False
    except OSError as exc:
        return exc.errno in (errno.ENOTCONN, errno.ECONNABORTED)


def check_mountpoint(config: MountConfig, store_root: str | None) -> str:
    mountpoint = os.path.abspath(config.mountpoint)
    if not os.path.exists("/dev/fuse"):
        raise MountError("/dev/fuse is missing: this kernel or container has no FUSE (load the fuse module)")
    if not (shutil.which("fusermount3") or os.geteuid() == 0):
        raise MountError("fusermount3 not found: install the fuse3 package")
    recover_stale(mountpoint)
    if not os.path.isdir(mountpoint):
        if os.path.exists(mountpoint):
            raise UsageError(f"mountpoint {mountpoint} is not a directory")
        os.makedirs(mountpoint, exist_ok=True)
    if os.path.ismount(mountpoint):
        raise MountError(f"{mountpoint} is already mounted (snapfs umount {mountpoint} first)")
    for label, path in (("cache directory", config.cache_dir), ("store", store_root)):
        if path and (_inside(mountpoint, path) or _inside(path, mountpoint)):
            raise UsageError(
                f"refusing to mount at {mountpoint}: it overlaps the {label} {path} (reads would deadlock)"
            )
    if config.allow_other and os.geteuid() != 0:
        try:
            with open("/etc/fuse.conf") as f:
                allowed = any(line.strip() == "user_allow_other" for line in f)
        except OSError:
            allowed = False
        if not allowed:
            raise MountError("--allow-other needs 'user_allow_other' in /etc/fuse.conf for non-root users")
    return mountpoint


def default_cache_size(cache_dir: str) -> int:
    """Half the free space of the cache's filesystem at start, at most 100 GiB."""
    probe = cache_dir
    while not os.path.exists(probe):
        probe = os.path.dirname(probe) or "/"
    usage = shutil.disk_usage(probe)
    return min(DEFAULT_CACHE_CAP, usage.free // 2)


# --- systemd -----------------------------------------------------------------


def sd_notify(message: str) -> None:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        log.warning("cannot notify systemd: %s", exc)


# --- the daemon ----------------------------------------------------------------


def _set_kernel_knob(path: str, value: int) -> bool:
    """Write one sysfs tunable; False (and a log line) where we may not."""
    try:
        with open(path, "w") as f:
            f.write(str(value))
    except OSError as exc:
        log.info("cannot set %s (%s); the kernel default stays", path, exc.strerror)
        return False
    return True


def set_readahead(mountpoint: str, nbytes: int) -> None:
    """Raise the kernel's readahead for this FUSE mount (its bdi): with bigger
    windows the kernel sends fewer, larger reads, which a Python daemon serves
    faster. Call only once FUSE_INIT is done: the kernel sets the bdi's
    readahead while processing it. Needs root; otherwise the default stays."""
    dev = os.stat(mountpoint).st_dev
    _set_kernel_knob(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb", max(4, nbytes // 1024))


# Asynchronous FUSE requests (the kernel's readahead) in flight per mount. The
# kernel's default of 12 is shared by all readers of the mount: 4 readers with
# a 4 MiB window already want 16 reads of 1 MiB. Measured on cache-hit reads of
# 1 GiB, 4 readers, page cache dropped, two runs each interleaved: 680-820 MB/s
# at 12, 787-928 at 64, 853-969 at 256.
MAX_BACKGROUND = 64
#: glibc malloc arenas for the daemon (linux.limit_malloc_arenas).
MALLOC_ARENAS = 2


def set_max_background(mountpoint: str, requests: int) -> None:
    """Let the kernel keep more readahead requests in flight to this mount
    (fusectl's max_background; congestion starts at 3/4 of it). Root only;
    fusectl is mounted first where nothing did (a container without systemd).
    Otherwise the kernel default stays."""
    ensure_fusectl()
    directory = f"{FUSECTL}/{os.minor(os.stat(mountpoint).st_dev)}"
    if _set_kernel_knob(f"{directory}/max_background", requests):
        _set_kernel_knob(f"{directory}/congestion_threshold", requests * 3 // 4)


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def _resolve_name_sync(repo: Repo, name: str) -> str | None:
    """A name or SERIES@latest to a snapshot ID."""
    from . import records

    if name.lower().endswith("@latest"):
        return records.lookup(repo, name).snapshot
    return records.resolve_name(repo, name)


def _list_names_sync(repo: Repo) -> list[str]:
    from . import records

    return records.list_names(repo)


class Daemon:
    """Everything that lives for the life of one mount (in the daemon process)."""

    def __init__(self, config: MountConfig, mountpoint: str) -> None:
        self.config = config
        self.mountpoint = mountpoint
        self.repo = Repo.open(config.store_url, endpoint_url=config.endpoint_url)
        self.cache = DiskCache(config.cache_dir, config.cache_size, fsync=config.fsync)
        swept = self.cache.sweep_temp()
        if swept:
            log.info("swept %d temp files left in the cache by a crash", swept)
        self.started = time.time()
        self.source: ObjectSource | None = None
        self.fs = None
        self.ops = None
        self.metrics = None
        self.control_path: str | None = None

    def status(self) -> dict:
        assert self.source is not None and self.fs is not None and self.ops is not None
        counters = self.source.counters
        total, pinned, objects = self.cache.index.totals()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "pid": os.getpid(),
            "mountpoint": self.mountpoint,
            "store": self.repo.url,
            "cache_dir": self.cache.directory,
            "uptime_seconds": round(time.time() - self.started, 1),
            "hits": counters.memory_hits + counters.disk_hits,
            "memory_hits": counters.memory_hits,
            "disk_hits": counters.disk_hits,
            "misses": counters.misses,
            "fetched_objects": counters.fetched_objects,
            "fetched_bytes": counters.fetched_bytes,
            "small_fetch_ms": round(self.source.small_fetch_seconds * 1000, 2),
            "verify_failures": counters.verify_failures,
            "fetch_errors": counters.fetch_errors,
            "fast_failures": counters.fast_failures,
            "store_unavailable_seconds": round(self.source.store_unavailable_for, 1),
            "cache_write_failures": counters.cache_write_failures,
            "readahead_objects": counters.readahead_objects,
            "pack_fetches": counters.pack_fetches,
            "pack_siblings": counters.pack_siblings,
            "write_backlog_bytes": self.source.write_backlog,
            "backlog_waits": counters.backlog_waits,
            "cache_bytes": total,
            "cache_pinned_bytes": pinned,
            "cache_objects": objects,
            "cache_limit_bytes": self.cache.max_bytes,
            "cache_durability": self.cache.durability,
            "cache_unsynced_objects": self.cache.index.unsynced_count(),
            "cache_sync_failures": counters.cache_sync_failures,
            "rss_bytes": _rss_bytes(),
            "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 3),
            "skip_open": self.ops.skip_open,
            "open_requests": self.ops.open_requests,
            "xattr_requests": self.ops.xattr_requests,
            "control_socket": self.control_path,
            **self.fs.stats(),
        }

    async def _resolve_name(self, name: str) -> str | None:
        moves = name.lower().endswith("@latest")
        if not moves:
            try:
                known = await trio.to_thread.run_sync(self.cache.index.recall_name, name)
            except CacheIndexError as exc:
                log.warning("%s; asking the store for name %r", exc, name)
                known = None
            if known:
                return known
        try:
            snapshot_id = await trio.to_thread.run_sync(_resolve_name_sync, self.repo, name)
        except (NotFoundError, UsageError):
            return None
        except SnapfsError as exc:
            log.warning("cannot resolve name %r: %s", name, exc)
            return None
        if snapshot_id and not moves:
            # Names never move, so remembering them is always right, and it lets
            # a prewarmed node resolve them with the store unreachable.
            try:
                await trio.to_thread.run_sync(self.cache.index.remember_name, name, snapshot_id)
            except CacheIndexError as exc:
                log.warning("%s; name %r resolved but not remembered", exc, name)
        return snapshot_id

    async def _list_names(self) -> list[str]:
        return await trio.to_thread.run_sync(_list_names_sync, self.repo)

    async def run(self, on_ready) -> None:
        from . import fuseops
        from .vfs import TREE_PREFETCH, SnapshotFS

        on_fetch = None
        if self.config.metrics_port is not None:
            from .metrics import start_metrics

            self.metrics = start_metrics(self, self.config.metrics_addr, self.config.metrics_port)
            on_fetch = self.metrics.observe_fetch
        source_class = ObjectSource
        if getattr(self.repo.store, "snapdir", False):
            # snapdir+… stores: whole-object reads and synthesized trees.
            from .snapdir_source import SnapdirObjectSource as source_class
        async with source_class(
            self.repo, self.cache, fetch_concurrency=self.config.fetch_concurrency, on_fetch=on_fetch
        ) as source:
            self.source = source
            self.fs = SnapshotFS(
                source,
                resolve_name=self._resolve_name,
                list_names=self._list_names,
                tree_loader=getattr(source, "load_tree", None),
                sibling_files=self.config.prefetch_siblings,
                tree_prefetch=min(self.config.prefetch_siblings, TREE_PREFETCH),
            )
            control = await self._open_control_socket()
            # With the status on the control socket, getxattr answers ENOSYS and
            # the kernel stops asking: `ls -l` asks two xattrs per file, each a
            # round trip through the daemon (2.6 s of an `ls -lR` of 20,000 files).
            ops = self.ops = fuseops.Operations(
                self.fs, self.status, skip_open=self.config.skip_open, xattr_status=control is None
            )
            if not ops.skip_open and self.config.skip_open is None:
                log.warning(
                    "pyfuse3 lacks read_noopen (scripts/pyfuse3.patch): every open() "
                    "of a file costs a round trip through the daemon; scripts/setup installs it"
                )
            options = fuseops.mount_options(allow_other=self.config.allow_other)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._watch_signals)
                    if control is not None:
                        nursery.start_soon(trio.serve_listeners, self._answer_control, [control])
                    await fuseops.serve(ops, self.mountpoint, options, on_ready)
                    nursery.cancel_scope.cancel()
            finally:
                if self.control_path:
                    with contextlib.suppress(OSError):
                        os.unlink(self.control_path)
        log.info("unmounted %s", self.mountpoint)

    async def _open_control_socket(self) -> trio.SocketListener | None:
        """Listen on this mount's control socket (paths.control_sockets), which
        `snapfs status` asks. None, and the status served as an xattr of the
        mount's root instead, where the socket cannot be made."""
        path = control_sockets(self.mountpoint)[0]
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            directory = os.path.dirname(path)
            os.makedirs(directory, mode=0o755 if os.geteuid() == 0 else 0o700, exist_ok=True)
            if os.path.exists(path):
                if await trio.to_thread.run_sync(_ask_control, path, b"status", 1.0) is not None:
                    raise OSError(errno.EADDRINUSE, f"a live daemon already answers on {path}")
                os.unlink(path)  # left by a daemon that was killed
            await sock.bind(path)
            # Who may ask: as the mount itself allows (allow_other or its owner).
            os.chmod(path, 0o666 if self.config.allow_other else 0o600)
            sock.listen(16)
        except OSError as exc:
            sock.close()
            log.warning(
                "cannot serve status on %s (%s); serving it as the %s xattr of %s instead",
                path,
                exc.strerror or exc,
                _status_xattr_name(),
                self.mountpoint,
            )
            return None
        self.control_path = path
        return trio.SocketListener(sock)

    async def _answer_control(self, stream: trio.SocketStream) -> None:
        """One request line in, one JSON line out. Only ``status`` so far."""
        async with stream:
            try:
                with trio.move_on_after(5):
                    request = b""
                    while b"\n" not in request and len(request) < 1024:
                        data = await stream.receive_some(1024 - len(request))
                        if not data:
                            break
                        request += data
                    command = request.split(b"\n", 1)[0].strip()
                    if command == b"status":
                        reply = self.status()
                    else:
                        reply = {"error": f"unknown request {command[:64]!r}"}
                    await stream.send_all(json.dumps(reply, sort_keys=True).encode() + b"\n")
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    async def _watch_signals(self) -> None:
        from . import fuseops

        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                log.info("received %s: unmounting %s", signal.Signals(signum).name, self.mountpoint)
                sd_notify("STOPPING=1")
                fuseops.terminate()
                return

    def close(self) -> None:
        self.cache.close()
        self.repo.store.close()


def _serve(config: MountConfig, mountpoint: str, ready_fd: int | None) -> int:
    def report(message: str) -> None:
        nonlocal ready_fd
        if ready_fd is not None:
            os.write(ready_fd, message.encode())
            os.close(ready_fd)
            ready_fd = None

    daemon = None
    limit_malloc_arenas(MALLOC_ARENAS)  # before any worker thread starts
    try:
        daemon = Daemon(config, mountpoint)

        def on_ready() -> None:
            if config.readahead:
                set_readahead(mountpoint, config.readahead)
            set_max_background(mountpoint, MAX_BACKGROUND)
            log.info(
                "mounted %s (store %s, cache %s, opens %s)",
                mountpoint,
                daemon.repo.url,
                daemon.cache.directory,
                "skipped (kernel no_open)" if daemon.ops.skip_open else "sent to the daemon",
            )
            report(f"ok {os.getpid()}")
            sd_notify(f"READY=1\nSTATUS=serving {mountpoint}\nMAINPID={os.getpid()}")

        try:
            trio.run(daemon.run, on_ready)
        except BaseExceptionGroup as group:
            # trio's nurseries wrap what a task raised; one error is reported as itself.
            leaf: BaseException = group
            while isinstance(leaf, BaseExceptionGroup) and len(leaf.exceptions) == 1:
                leaf = leaf.exceptions[0]
            raise leaf from None
        return 0
    except SnapfsError as exc:
        log.error("%s", exc)
        report(f"error {exc}")
        return exc.exit_code
    except RuntimeError as exc:  # pyfuse3.init failures arrive as RuntimeError
        log.error("cannot mount %s: %s", mountpoint, exc)
        report(f"error cannot mount {mountpoint}: {exc}")
        return MountError.exit_code
    except Exception as exc:
        log.exception("daemon failed")
        report(f"error {exc}")
        return 1
    finally:
        if daemon is not None:
            daemon.close()


def mount(config: MountConfig) -> int:
    """Mount; in the background unless ``config.foreground``. Returns an exit code."""
    store_root = None
    if not (config.store_url or "").startswith(("s3://", "snapdir+s3://")):
        from .store import open_store

        store = open_store(config.store_url)
        if isinstance(store, LocalStore) or getattr(store, "snapdir", False):
            store_root = store.root  # type: ignore[attr-defined]
    mountpoint = check_mountpoint(config, store_root)
    if config.cache_size is None:
        config.cache_size = default_cache_size(config.cache_dir)
    if config.foreground:
        return _serve(config, mountpoint, None)

    log_file = config.log_file or os.path.join(config.cache_dir, "mount.log")
    # Usually the cache directory, created here first: private, as DiskCache makes it.
    os.makedirs(os.path.dirname(log_file), mode=0o700, exist_ok=True)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the daemon
        os.close(read_fd)
        os.setsid()
        null = os.open(os.devnull, os.O_RDWR)
        log_fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(null, 0)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(null)
        os.close(log_fd)
        os.chdir("/")
        code = 1
        try:
            code = _serve(config, mountpoint, write_fd)
        finally:
            logging.shutdown()
            os._exit(code)
    os.close(write_fd)
    chunks = []
    while True:
        data = os.read(read_fd, 4096)
        if not data:
            break
        chunks.append(data)
    os.close(read_fd)
    message = b"".join(chunks).decode(errors="replace")
    if message.startswith("ok "):
        log.info("daemon %s serving %s; log: %s", message[3:], mountpoint, log_file)
        return 0
    _, status = os.waitpid(pid, 0)
    detail = (
        message[len("error ") :]
        if message.startswith("error ")
        else f"daemon exited ({status}); see {log_file}"
    )
    raise MountError(detail)


# --- status and umount ----------------------------------------------------------


def _status_xattr_name() -> str:
    from .fuseops import STATUS_XATTR

    return STATUS_XATTR.decode()


def _ask_control(path: str, request: bytes, timeout: float = 10.0) -> bytes | None:
    """A daemon's reply on its control socket; None where no daemon listens there."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            return None
        sock.sendall(request + b"\n")
        chunks = []
        while True:
            data = sock.recv(65536)
            if not data:
                break
            chunks.append(data)
    return b"".join(chunks)


def read_status(mountpoint: str) -> dict:
    if _is_stale(mountpoint):
        raise MountError(f"{mountpoint} is a stale mount: its daemon is dead (snapfs mount recovers it)")
    where = os.path.realpath(mountpoint)
    refused = None
    for path in control_sockets(mountpoint):
        try:
            raw = _ask_control(path, b"status")
        except OSError as exc:  # not ours to ask (permissions), or a hung daemon
            refused = f"cannot ask {path}: {exc.strerror or exc}"
            continue
        if raw is None:
            continue
        try:
            status = json.loads(raw)
        except ValueError as exc:
            raise MountError(f"the daemon on {path} gave a malformed status: {exc}") from None
        if os.path.realpath(status.get("mountpoint") or "") == where:
            return status
    # A daemon from before the control socket, or one that could not make it.
    try:
        raw = os.getxattr(mountpoint, _status_xattr_name())
    except OSError as exc:
        if not os.path.ismount(mountpoint):
            raise MountError(f"{mountpoint} is not mounted") from exc
        if refused:
            raise MountError(f"{mountpoint}: {refused}") from exc
        raise MountError(f"{mountpoint} is not a snapfs mount ({exc.strerror})") from exc
    return json.loads(raw)


def umount(mountpoint: str, timeout: float = 30.0) -> None:
    mountpoint = os.path.abspath(mountpoint)
    if recover_stale(mountpoint):
        return
    if not os.path.ismount(mountpoint):
        raise MountError(f"{mountpoint} is not mounted")
    pid = None
    try:
        pid = read_status(mountpoint).get("pid")
    except (MountError, ValueError):
        pass
    fusermount = shutil.which("fusermount3") or shutil.which("fusermount")
    if not fusermount:
        raise MountError("fusermount3 not found: install the fuse3 package")
    result = subprocess.run([fusermount, "-u", mountpoint], capture_output=True, text=True)
    if result.returncode != 0:
        raise MountError(f"cannot unmount {mountpoint}: {result.stderr.strip() or 'busy'}")
    if pid:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        log.warning("daemon %s did not exit within %.0fs after unmount", pid, timeout)
