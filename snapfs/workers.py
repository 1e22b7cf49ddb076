"""A fixed set of worker threads for the mount's hot blocking calls.

``trio.to_thread.run_sync`` is the right tool for occasional blocking work, but
on the mount's read path it is called once per chunk, and there it costs:

- about 100 µs of CPU per call on this 2-core VM (names the thread, copies the
  context, wakes a cached thread through a lock), measured with 25 tasks in a
  loop; a queue served by long-lived threads costs 30-40 µs;
- worse, a limiter slot stays taken until the trio loop has run the task that
  took it. A loop busy replying to the kernel left cache-file reads finished
  but their slots held for a median 2 ms (p90 6 ms) on top of a 5 ms read, so
  the disk idled while readers waited.

Here a worker takes its next job as soon as it finishes one, so the pool's
size alone bounds the concurrency, and the loop is told of each result with
one ``run_sync_soon``. Cancelling a caller whose job has not started drops the
job; a job already running is waited for, as with trio's default.

Each thread also carries its name in the kernel (``snapfs-fetch-3``), so
``top -H``, ``perf`` and ``/proc/PID/task/*/comm`` tell the pools apart; Python
3.11 names threads for itself only.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import outcome
import trio

from .linux import set_thread_name

T = TypeVar("T")

_QUEUED, _RUNNING, _DROPPED = range(3)


class _Job:
    __slots__ = ("fn", "args", "task", "state")

    def __init__(self, fn: Callable[..., Any], args: tuple, task: trio.lowlevel.Task) -> None:
        self.fn = fn
        self.args = args
        self.task = task
        self.state = _QUEUED


class WorkerThreads:
    """``size`` threads serving ``await pool.run(fn, *args)`` from one trio run.

    Start with ``start()`` inside the run, stop with ``close()``, which does not
    wait: its threads finish the jobs already queued, then exit."""

    def __init__(self, size: int, name: str) -> None:
        if size < 1:
            raise ValueError("a worker pool needs at least one thread")
        self.size = size
        self.name = name
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._token: trio.lowlevel.TrioToken | None = None
        self._closed = False

    def start(self) -> None:
        if self._token is not None:
            raise RuntimeError(f"worker pool {self.name} started twice")
        self._token = trio.lowlevel.current_trio_token()
        for i in range(self.size):
            thread = threading.Thread(target=self._work, name=f"{self.name}-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def close(self) -> None:
        """Stop the threads once the jobs already queued are done; later run() calls fail."""
        self._closed = True
        for _ in self._threads:
            self._queue.put(None)
        self._threads = []

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._token is None or self._closed:
            raise RuntimeError(f"worker pool {self.name} used before start() or after close()")
        await trio.lowlevel.checkpoint_if_cancelled()
        job = _Job(fn, args, trio.lowlevel.current_task())
        self._queue.put(job)

        def abort(_raise_cancel: Any) -> trio.lowlevel.Abort:
            with self._lock:
                if job.state == _QUEUED:
                    job.state = _DROPPED
                    return trio.lowlevel.Abort.SUCCEEDED
            return trio.lowlevel.Abort.FAILED

        return await trio.lowlevel.wait_task_rescheduled(abort)

    def _work(self) -> None:
        token = self._token
        assert token is not None
        set_thread_name(threading.current_thread().name)
        while (job := self._queue.get()) is not None:
            with self._lock:
                if job.state == _DROPPED:
                    continue
                job.state = _RUNNING
            result = outcome.capture(job.fn, *job.args)
            try:
                token.run_sync_soon(trio.lowlevel.reschedule, job.task, result)
            except trio.RunFinishedError:
                return
