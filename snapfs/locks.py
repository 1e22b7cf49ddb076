"""The lock protocol between pushes and destructive maintenance (gc, forget).

Why it exists: a push uploads only what the store lacks, and a tree that is
present implies its whole subtree is present. So a push may skip an old,
unreachable tree (left by a forgotten snapshot) in exactly the moment a gc
deletes it, then write its snapshot marker over a hole. The grace period
cannot help: the skipped object is old. This module makes a push and a gc
mutually exclusive, using nothing but the Store interface (put, put-if-absent,
stat, list, delete), so it works on a directory and on any S3 store.

Keys (all small JSON naming owner, host, pid and start time; no secrets):

- ``locks/push-<uuid>``: one per running push, rewritten every HEARTBEAT
  seconds while the push runs, deleted when it ends.
- ``locks/gc``: created once (put-if-absent) by a gc or forget, rewritten every
  HEARTBEAT seconds, deleted when it ends.

Protocol (each side writes its own flag, then reads the other's; with a
linearizable store at least one of two racing parties sees the other):

- push: write P; stat G. G absent: go. G stale: delete it, go. G fresh: delete
  P, wait POLL seconds, start over (until WAIT seconds, then refuse).
- gc: create G (a stale G is deleted first; a fresh one means another gc:
  refuse). Then list ``locks/push-``: stale push locks are deleted; while a
  fresh one exists, keep G (new pushes queue behind it) and wait for the
  running pushes to drain, until WAIT seconds, then release G and refuse.

Staleness is judged on the store's clock: a lock is stale when its mtime is
more than STALE seconds older than the mtime of a key the judge itself just
wrote. Machines' clocks never need to agree.

Fencing: a holder whose lock went stale (a process paused longer than STALE)
may have been overtaken. Before a push writes its snapshot marker and before a
gc deletes each batch, the holder checks ``held()``: the lock key still holds
its token, and its last successful heartbeat started less than STALE/2 ago on
the holder's monotonic clock. A push that lost its lock redoes its upload
under a new lock (cheap: it only uploads what is missing); a gc aborts.

Assumption, documented in docs/RECORDS.md: no single store request takes
longer than STALE/2 seconds from the check to its effect.

Thread-safe: each lock object runs one heartbeat thread of its own.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from types import TracebackType

from .errors import NotFoundError, StoreUnavailableError
from .store import Store

log = logging.getLogger(__name__)

LOCK_PREFIX = "locks/"
PUSH_LOCK_PREFIX = "locks/push-"
GC_LOCK_KEY = "locks/gc"

# Defaults; each can be overridden by an environment variable of the same name
# prefixed SNAPFS_LOCK_ (read when a lock is taken, so tests and operators can
# shorten them without code changes).
DEFAULTS = {
    "HEARTBEAT": 30.0,  # seconds between lock rewrites
    "STALE": 300.0,  # a lock not rewritten for this long is abandoned
    "WAIT": 600.0,  # how long a push waits for a gc (and a gc for pushes) before refusing
    "POLL": 1.0,  # seconds between checks while waiting
}


def setting(name: str) -> float:
    raw = os.environ.get(f"SNAPFS_LOCK_{name}")
    if raw:
        try:
            return float(raw)
        except ValueError:
            log.warning("ignoring SNAPFS_LOCK_%s=%r: not a number", name, raw)
    return DEFAULTS[name]


class LockedError(StoreUnavailableError):
    """The store is busy: a gc or forget holds it, or pushes are running."""


def _owner(kind: str, token: str, command: str) -> bytes:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return json.dumps(
        {
            "kind": kind,
            "token": token,
            "command": command,
            "user": user,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        },
        sort_keys=True,
    ).encode()


def describe(store: Store, key: str) -> str:
    """'gc by alice@node3 (pid 12, started 2026-…Z)' for messages; best effort."""
    try:
        info = json.loads(store.get(key))
        return (
            f"{info.get('command', info.get('kind', '?'))} by {info.get('user', '?')}@{info.get('host', '?')} "
            f"(pid {info.get('pid', '?')}, started {info.get('started', '?')})"
        )
    except (NotFoundError, ValueError, AttributeError):
        return key


class _Lock:
    """Heartbeat and fencing shared by both kinds of lock."""

    key: str

    def __init__(self, store: Store, kind: str, command: str) -> None:
        self.store = store
        self.token = uuid.uuid4().hex
        self.data = _owner(kind, self.token, command)
        self.heartbeat = setting("HEARTBEAT")
        self.stale = setting("STALE")
        self.wait = setting("WAIT")
        self.poll = setting("POLL")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_ok = 0.0  # monotonic time at which the last successful write started
        self._lost = False

    def store_now(self) -> float:
        """The store's clock: the mtime of our own key, just written."""
        return self.store.stat(self.key).mtime

    def _is_ours(self) -> bool:
        try:
            return self.store.get(self.key) == self.data
        except NotFoundError:
            return False

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            started = time.monotonic()
            try:
                if not self._is_ours():
                    log.warning("lost %s on %s: it was removed as stale", self.key, self.store.url)
                    self._lost = True
                    return
                self.store.put(self.key, self.data)
                self._last_ok = started
            except StoreUnavailableError as exc:
                # Keep trying; held() turns false by itself if this lasts.
                log.warning("cannot refresh %s on %s: %s", self.key, self.store.url, exc)

    def _start(self, started: float) -> None:
        self._last_ok = started
        self._thread = threading.Thread(target=self._beat, name=f"snapfs-lock-{self.key}", daemon=True)
        self._thread.start()

    def held(self) -> bool:
        """True if nobody can have treated this lock as stale (the fencing check)."""
        if self._lost or time.monotonic() - self._last_ok >= self.stale / 2:
            return False
        return self._is_ours()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        try:
            # A push lock's key is unique to its holder; the gc lock's key is
            # shared, so it is removed only if it still holds our token.
            if self.key != GC_LOCK_KEY or self._is_ours():
                self.store.delete(self.key)
        except StoreUnavailableError as exc:
            log.warning("cannot remove %s from %s (it will expire): %s", self.key, self.store.url, exc)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


class PushLock(_Lock):
    """Held by a push from its first existence check until its marker, record and name are written.

    ``on_wait`` is called once with a message if the push has to wait for a gc.
    """

    def __init__(self, store: Store, *, on_wait: Callable[[str], None] | None = None) -> None:
        super().__init__(store, "push", "push")
        self.key = PUSH_LOCK_PREFIX + self.token
        self.on_wait = on_wait

    def __enter__(self) -> PushLock:
        deadline = time.monotonic() + self.wait
        told = False
        while True:
            started = time.monotonic()
            self.store.put(self.key, self.data)
            try:
                gc_info = self.store.stat(GC_LOCK_KEY)
            except NotFoundError:
                break
            age = self.store_now() - gc_info.mtime
            if age > self.stale:
                log.warning(
                    "removing stale gc lock on %s (%s, not refreshed for %.0fs)",
                    self.store.url,
                    describe(self.store, GC_LOCK_KEY),
                    age,
                )
                self.store.delete(GC_LOCK_KEY)
                break
            holder = describe(self.store, GC_LOCK_KEY)
            self.store.delete(self.key)
            if time.monotonic() >= deadline:
                raise LockedError(
                    f"{holder} is running on {self.store.url}; push gave up after waiting "
                    f"{self.wait:.0f}s (push again when it has finished)"
                )
            if not told:
                message = f"waiting for {holder} on {self.store.url} to finish"
                # A warning, so a user at a terminal sees why the push pauses.
                log.warning("%s", message)
                if self.on_wait:
                    self.on_wait(message)
                told = True
            time.sleep(self.poll)
        self._start(started)
        return self


class MaintenanceLock(_Lock):
    """Held by gc and forget: excludes pushes (and other maintenance) for its lifetime.

    ``wait``: seconds to wait for running pushes to drain (default SNAPFS_LOCK_WAIT).
    """

    key = GC_LOCK_KEY

    def __init__(
        self,
        store: Store,
        command: str,
        *,
        wait: float | None = None,
        on_wait: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__(store, "gc", command)
        if wait is not None:
            self.wait = wait
        self.on_wait = on_wait

    def _clock(self) -> float:
        """The store's clock when we hold no key yet: write, stat and delete a probe."""
        probe = f"{LOCK_PREFIX}clock-{self.token}"
        self.store.put(probe, b"")
        try:
            return self.store.stat(probe).mtime
        finally:
            self.store.delete(probe)

    def _create(self) -> float:
        started = time.monotonic()
        if self.store.put(self.key, self.data, if_absent=True):
            return started
        try:
            age = self._clock() - self.store.stat(self.key).mtime
        except NotFoundError:
            age = None  # released in between: just try again
        if age is not None and age <= self.stale:
            raise LockedError(
                f"{describe(self.store, self.key)} is already running on {self.store.url}; try again later"
            )
        if age is not None:
            log.warning(
                "removing stale gc lock on %s (%s, not refreshed for %.0fs)",
                self.store.url,
                describe(self.store, self.key),
                age,
            )
            self.store.delete(self.key)
        started = time.monotonic()
        if not self.store.put(self.key, self.data, if_absent=True):
            raise LockedError(
                f"{describe(self.store, self.key)} is already running on {self.store.url}; try again later"
            )
        return started

    def __enter__(self) -> MaintenanceLock:
        started = self._create()
        self._start(started)
        try:
            deadline = time.monotonic() + self.wait
            told = False
            while True:
                fresh = self._fresh_pushes()
                if not fresh:
                    break
                if time.monotonic() >= deadline:
                    raise LockedError(
                        f"{len(fresh)} push(es) still running on {self.store.url} "
                        f"({describe(self.store, fresh[0])}); refusing while a push may rely on "
                        "objects this would delete (try again when they have finished)"
                    )
                if not told:
                    message = f"waiting for {len(fresh)} running push(es) on {self.store.url} to finish"
                    log.info("%s", message)
                    if self.on_wait:
                        self.on_wait(message)
                    told = True
                time.sleep(self.poll)
        except BaseException:
            self.release()
            raise
        return self

    def _fresh_pushes(self) -> list[str]:
        now = self.store_now()
        fresh = []
        for info in self.store.list(PUSH_LOCK_PREFIX):
            age = now - info.mtime
            if age <= self.stale:
                fresh.append(info.key)
            else:
                # Deleting it is the fence: that push, if it ever wakes, sees its
                # lock gone and re-checks its upload before marking anything.
                log.warning(
                    "removing stale push lock %s on %s (%s, not refreshed for %.0fs)",
                    info.key,
                    self.store.url,
                    describe(self.store, info.key),
                    age,
                )
                self.store.delete(info.key)
        return fresh

    def check(self) -> None:
        """Raise LockedError unless the lock is still ours (call before each destructive batch)."""
        if not self.held():
            raise LockedError(
                f"gc lock on {self.store.url} was lost (this process stalled longer than "
                f"{self.stale / 2:.0f}s, or the lock was removed); stopped before deleting more"
            )
