"""snapfs.workers: the mount's fixed worker threads."""

from __future__ import annotations

import os
import threading
import time

import pytest
import trio

from snapfs.workers import WorkerThreads


def _run(fn):
    return trio.run(fn)


def test_results_and_errors_come_back_to_the_caller() -> None:
    async def main():
        pool = WorkerThreads(2, "t")
        pool.start()
        try:
            assert await pool.run(lambda a, b: a + b, 2, 3) == 5
            assert await pool.run(threading.current_thread) is not threading.current_thread()
            with pytest.raises(ZeroDivisionError):
                await pool.run(lambda: 1 / 0)
        finally:
            pool.close()

    _run(main)


def test_the_pool_size_bounds_concurrency() -> None:
    running = 0
    peak = 0
    lock = threading.Lock()

    def job() -> None:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.02)
        with lock:
            running -= 1

    async def main():
        pool = WorkerThreads(3, "t")
        pool.start()
        try:
            async with trio.open_nursery() as nursery:
                for _ in range(12):
                    nursery.start_soon(pool.run, job)
        finally:
            pool.close()

    _run(main)
    assert peak == 3


def test_a_cancelled_caller_drops_its_job_if_no_thread_has_taken_it() -> None:
    gate = threading.Event()
    ran: list[str] = []

    def slow() -> None:
        gate.wait(5)
        ran.append("slow")

    async def main():
        pool = WorkerThreads(1, "t")
        pool.start()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pool.run, slow)
                await trio.sleep(0.05)  # slow() holds the only thread
                with trio.move_on_after(0.05) as scope:
                    await pool.run(ran.append, "queued")
                assert scope.cancelled_caught
                gate.set()
            assert await pool.run(lambda: "after") == "after"  # the dropped job was skipped
        finally:
            pool.close()

    _run(main)
    assert ran == ["slow"]


def test_a_cancelled_caller_waits_for_its_running_job() -> None:
    ran: list[str] = []

    def slow() -> str:
        time.sleep(0.3)
        ran.append("slow")
        return "done"

    async def main():
        pool = WorkerThreads(1, "t")
        pool.start()
        try:
            started = time.monotonic()
            with trio.move_on_after(0.05):
                await pool.run(slow)
            assert time.monotonic() - started >= 0.3
        finally:
            pool.close()

    _run(main)
    assert ran == ["slow"]


def test_close_stops_the_threads() -> None:
    async def main():
        pool = WorkerThreads(4, "snapfs-test-close")
        pool.start()
        await pool.run(lambda: None)
        pool.close()

    _run(main)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if not any(t.name.startswith("snapfs-test-close") for t in threading.enumerate()):
            break
        time.sleep(0.01)
    assert not any(t.name.startswith("snapfs-test-close") for t in threading.enumerate())


def test_use_before_start_a_second_start_and_use_after_close_are_refused() -> None:
    async def main():
        pool = WorkerThreads(1, "t")
        with pytest.raises(RuntimeError, match="before start"):
            await pool.run(lambda: None)
        pool.start()
        with pytest.raises(RuntimeError, match="started twice"):
            pool.start()
        assert len(pool._threads) == 1
        pool.close()
        with pytest.raises(RuntimeError, match="after close"):
            await pool.run(lambda: None)

    _run(main)


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc to read thread names")
def test_threads_carry_their_pool_name_in_the_kernel() -> None:
    """top -H and perf show the kernel's name: each pool's threads must be told apart there."""

    def kernel_name() -> str:
        with open(f"/proc/self/task/{threading.get_native_id()}/comm") as f:
            return f.read().strip()

    async def main():
        pool = WorkerThreads(2, "snapfs-fetch")
        pool.start()
        try:
            return await pool.run(kernel_name)
        finally:
            pool.close()

    assert _run(main) in ("snapfs-fetch-0", "snapfs-fetch-1")
