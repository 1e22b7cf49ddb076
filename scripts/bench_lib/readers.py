"""Readers in separate processes, as a training job's dataloader workers are.

``read_parallel`` forks N workers, lets each one finish its set-up, then starts
them together and times from the start signal until the last one is done.
Each worker reads whole files with 1 MiB ``readinto`` calls into one buffer, so
the reader itself costs next to nothing and the filesystem is what is measured.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import subprocess
import time
from multiprocessing import get_context
from multiprocessing.connection import Connection
from pathlib import Path

from .common import worker_signals

log = logging.getLogger(__name__)

READ_SIZE = 1024 * 1024


def _worker(paths: list[str], ready: Connection, go: Connection, out: Connection) -> None:
    worker_signals()
    buf = bytearray(READ_SIZE)
    view = memoryview(buf)
    total = 0
    error = ""
    ready.send(True)
    go.recv()
    try:
        for path in paths:
            fd = os.open(path, os.O_RDONLY)
            try:
                while True:
                    n = os.readv(fd, [view])
                    if n == 0:
                        break
                    total += n
            finally:
                os.close(fd)
    except OSError as exc:
        error = f"{exc.strerror} reading {exc.filename or path}"
    out.send((total, error))


def read_parallel(paths: list[str], readers: int, timeout: float = 900) -> tuple[float, int]:
    """Read every path once across ``readers`` processes; return (seconds, bytes).

    The paths are dealt round-robin in the order given. A worker that hits an
    I/O error or the timeout fails the whole measurement, so a broken mount
    never yields a number.
    """
    ctx = get_context("fork")
    readers = max(1, min(readers, len(paths)))
    procs = []
    ready_pipes = []
    go_pipes = []
    out_pipes = []
    for i in range(readers):
        ready_r, ready_w = ctx.Pipe(duplex=False)
        go_r, go_w = ctx.Pipe(duplex=False)
        out_r, out_w = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_worker, args=(paths[i::readers], ready_w, go_r, out_w), daemon=True)
        proc.start()
        procs.append(proc)
        ready_pipes.append(ready_r)
        go_pipes.append(go_w)
        out_pipes.append(out_r)
    try:
        for pipe in ready_pipes:
            pipe.recv()
        start = time.perf_counter()
        for pipe in go_pipes:
            pipe.send(True)
        total = 0
        deadline = time.monotonic() + timeout
        for pipe in out_pipes:
            if not pipe.poll(max(0.0, deadline - time.monotonic())):
                raise RuntimeError(f"readers did not finish within {timeout:.0f} s")
            nbytes, error = pipe.recv()
            if error:
                raise RuntimeError(error)
            total += nbytes
        elapsed = time.perf_counter() - start
    finally:
        for proc in procs:
            if proc.is_alive():
                with contextlib.suppress(Exception):
                    proc.kill()
            proc.join(timeout=5)
    return elapsed, total


def shuffled(paths: list[str], seed: str = "bench-order") -> list[str]:
    """A fixed shuffle: dataloaders read samples in random order, the same each run."""
    out = list(paths)
    random.Random(seed).shuffle(out)
    return out


def time_command(cmd: list[str], timeout: float = 900) -> float:
    """Wall time of a command whose output is discarded (find, ls -lR)."""
    start = time.perf_counter()
    proc = subprocess.run(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, errors="replace", timeout=timeout
    )
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd[:2])}` exited {proc.returncode}: {proc.stderr.strip()[-200:]}")
    return elapsed


def count_find(root: Path, timeout: float = 900) -> tuple[float, int]:
    """Wall time of ``find ROOT`` and the number of entries it printed."""
    start = time.perf_counter()
    proc = subprocess.run(["find", str(root)], capture_output=True, timeout=timeout)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"`find` exited {proc.returncode}: {proc.stderr.decode(errors='replace')[-200:]}")
    return elapsed, proc.stdout.count(b"\n")
