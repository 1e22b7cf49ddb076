"""Shared plumbing: results, commands, page-cache drops, /proc stats, cleanup.

Every mount and every process the benchmark starts is registered with the
module-level ``CLEANUP`` so that it is torn down at exit, whether the run ends
normally, by an exception or by Ctrl-C / SIGTERM (see ``Cleanup``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
BENCH_VENV = Path(os.environ.get("SNAPFS_BENCH_VENV", REPO / ".bench-venv"))
SNAPFS_VENV = REPO / ".venv"
MB = 1_000_000  # throughput and sizes are reported in decimal MB (10^6 bytes)
CLK_TCK = os.sysconf("SC_CLK_TCK")


class Unavailable(Exception):
    """A tool or section cannot run here; the message is the one-line reason."""


class SnapfsNotReady(Unavailable):
    """A snapfs command is missing or failed: the section reports it and the run goes on."""


@dataclasses.dataclass
class Row:
    tool: str
    metric: str
    value: float
    unit: str
    note: str = ""


class Results:
    """Every measurement of one run, plus the tools/sections that could not run."""

    def __init__(self) -> None:
        self.rows: list[Row] = []
        self.unavailable: list[dict[str, str]] = []
        self.meta: dict[str, object] = {}

    def add(self, tool: str, metric: str, value: float, unit: str, note: str = "") -> None:
        row = Row(tool, metric, float(value), unit, note)
        self.rows.append(row)
        log.info("  %-12s %-18s %12.3f %s%s", tool, metric, value, unit, f"  ({note})" if note else "")

    def fail(self, tool: str, what: str, reason: str) -> None:
        reason = " ".join(str(reason).split())[:400]
        self.unavailable.append({"tool": tool, "what": what, "reason": reason})
        log.warning("  %s %s: %s", tool, what, reason)

    def get(self, tool: str, metric: str) -> float | None:
        for row in self.rows:
            if row.tool == tool and row.metric == metric:
                return row.value
        return None


def which(name: str) -> str:
    """Absolute path of a peer's binary: the bench venv first, then PATH."""
    candidate = BENCH_VENV / "bin" / name
    if os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which(name)
    if not found:
        raise Unavailable(f"`{name}` not installed (run scripts/setup-bench)")
    return found


def run(
    cmd: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    timeout: float = 1800,
    check: bool = True,
    stdout_to: int | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command, capture its output, and raise with its stderr tail on failure."""
    log.debug("run: %s", " ".join(map(str, cmd)))
    try:
        proc = subprocess.run(
            [str(c) for c in cmd],
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=stdout_to if stdout_to is not None else subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            timeout=timeout,
        )
    except FileNotFoundError as exc:
        raise Unavailable(f"`{cmd[0]}` not found") from exc
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"`{_shown(cmd)}` timed out after {timeout:.0f} s") from exc
    if check and proc.returncode != 0:
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-3:]
        raise RuntimeError(f"`{_shown(cmd)}` exited {proc.returncode}: {' | '.join(tail)}")
    return proc


def _shown(cmd: Sequence[str]) -> str:
    """The start of a command for a one-line error; an inline script is elided, so
    the error's own text (which follows) is not cut off by Results.fail."""
    return " ".join(a if len(a) <= 60 else a[:24] + "..." for a in map(str, cmd[:3]))


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def drop_caches() -> None:
    """Empty the page, dentry and inode caches, so the next read is cold.

    FUSE filesystems keep their pages in the same page cache, so this makes a
    FUSE read go back to its daemon too (the daemon's own disk cache stays).
    """
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as exc:
        raise Unavailable(f"cannot drop the page cache ({exc}); cold reads need root") from exc


def proc_stats(pid: int) -> tuple[float, float, float]:
    """(RSS MB, peak RSS MB, CPU seconds incl. reaped children) of a live process."""
    status = Path(f"/proc/{pid}/status").read_text()
    fields = {line.split(":")[0]: line.split(":")[1].strip() for line in status.splitlines() if ":" in line}
    rss = int(fields.get("VmRSS", "0 kB").split()[0]) * 1024 / MB
    hwm = int(fields.get("VmHWM", "0 kB").split()[0]) * 1024 / MB
    # Fields after the parenthesised command name; utime is field 14 overall.
    stat = Path(f"/proc/{pid}/stat").read_text()
    after = stat[stat.rindex(")") + 2 :].split()
    utime, stime, cutime, cstime = (int(x) for x in after[11:15])
    return rss, hwm, (utime + stime + cutime + cstime) / CLK_TCK


def tree_stats(pids: Sequence[int]) -> tuple[float, float, float]:
    """proc_stats summed over a daemon and all its live descendants."""
    seen: set[int] = set()
    todo = list(pids)
    total = [0.0, 0.0, 0.0]
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        with contextlib.suppress(OSError, ValueError):
            rss, hwm, cpu = proc_stats(pid)
            total[0] += rss
            total[1] += hwm
            total[2] += cpu
            for task in Path(f"/proc/{pid}/task").iterdir():
                with contextlib.suppress(OSError):
                    todo.extend(int(c) for c in (task / "children").read_text().split())
    return total[0], total[1], total[2]


def is_mounted(path: str | os.PathLike[str]) -> bool:
    target = os.path.abspath(path)  # not realpath: its lstat would hang on a dead FUSE mount
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def wait_mounted(
    path: str | os.PathLike[str], proc: subprocess.Popen[bytes] | None, timeout: float = 60
) -> None:
    """Poll until ``path`` is a mountpoint; raise with the daemon's exit if it died."""
    deadline = time.monotonic() + timeout
    while not is_mounted(path):
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"mount daemon exited {proc.returncode} before {path} was mounted")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} not mounted after {timeout:.0f} s")
        time.sleep(0.01)


def abort_fuse(path: str | os.PathLike[str]) -> None:
    """Abort the FUSE connection of a mount (fusectl), failing every pending request.

    A lazy unmount alone leaves a hung daemon, and every process stuck in a
    request to it, in D state for good; aborting releases them all. Used only
    for mounts the run is giving up on.
    """
    target = os.path.abspath(path)  # not realpath: its lstat would hang on a dead FUSE mount
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            fstype = fields[fields.index("-") + 1]
            if fields[4] == target and fstype.startswith("fuse"):
                minor = fields[2].split(":")[1]
                with contextlib.suppress(OSError):
                    Path(f"/sys/fs/fuse/connections/{minor}/abort").write_text("1")
                log.warning("aborted the FUSE connection of %s", target)


def lazy_umount(path: str | os.PathLike[str]) -> None:
    """Detach a mount even if its daemon is stuck or dead; quiet when not mounted."""
    if not is_mounted(path):
        return
    for cmd in (
        ["fusermount3", "-uz", str(path)],
        ["fusermount", "-uz", str(path)],
        ["umount", "-l", str(path)],
    ):
        with contextlib.suppress(OSError):
            if subprocess.run(cmd, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL).returncode == 0:
                return


def _own_group(proc: subprocess.Popen[bytes]) -> bool:
    try:
        return os.getpgid(proc.pid) == proc.pid
    except ProcessLookupError:
        return False


def _signal(proc: subprocess.Popen[bytes], sig: int, group: bool) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if group:
            os.killpg(proc.pid, sig)
        elif proc.poll() is None:
            proc.send_signal(sig)


class Cleanup:
    """Mounts and processes to tear down at exit, newest first.

    ``install()`` turns SIGTERM/SIGHUP into an exception, so the ``finally``
    blocks of the run execute for them as they do for Ctrl-C.
    """

    def __init__(self) -> None:
        self._mounts: list[Path] = []
        self._procs: list[subprocess.Popen[bytes]] = []
        self._callbacks: list[Callable[[], None]] = []

    def install(self) -> None:
        def _raise(signum: int, _frame: object) -> None:
            raise KeyboardInterrupt(f"signal {signum}")

        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, _raise)
        # Ctrl-C must reach us even when started from a shell that ignores SIGINT.
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def mount(self, path: str | os.PathLike[str]) -> None:
        self._mounts.append(Path(path))

    def process(self, proc: subprocess.Popen[bytes]) -> None:
        self._procs.append(proc)

    def callback(self, fn: Callable[[], None]) -> None:
        self._callbacks.append(fn)

    def stop_process(self, proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
        """Terminate one process we started, and its process group, then kill what lingers.

        Daemons are started in their own session, so their group holds exactly
        what they forked (JuiceFS runs its FUSE server as a child) and nothing else.
        """
        own_group = _own_group(proc)
        if proc.poll() is None or own_group:
            _signal(proc, signal.SIGTERM, own_group)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
            _signal(proc, signal.SIGKILL, own_group)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        if proc in self._procs:
            self._procs.remove(proc)

    def run_all(self) -> None:
        for path in reversed(self._mounts):
            with contextlib.suppress(Exception):
                # Still mounted here means its section did not unmount it: it failed or was interrupted.
                if is_mounted(path):
                    abort_fuse(path)
                lazy_umount(path)
        self._mounts.clear()
        for proc in reversed(list(self._procs)):
            with contextlib.suppress(Exception):
                self.stop_process(proc, timeout=5)
        for fn in reversed(self._callbacks):
            with contextlib.suppress(Exception):
                fn()
        self._callbacks.clear()


CLEANUP = Cleanup()


def worker_signals() -> None:
    """In a forked worker: leave Ctrl-C and cleanup to the parent, die quietly on SIGTERM."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


@contextlib.contextmanager
def section(results: Results, tool: str, what: str = "section") -> Iterator[None]:
    """Run a block; a failure is recorded as that tool being unavailable, and the run goes on."""
    try:
        yield
    except KeyboardInterrupt:
        raise
    except Unavailable as exc:
        results.fail(tool, what, str(exc))
    except Exception as exc:
        log.debug("%s %s failed", tool, what, exc_info=True)
        results.fail(tool, what, f"failed: {exc}")


def clean_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra)
    return env
