"""Raw boto3 against the benchmark's S3 server: the ceiling every S3 ratio is read against.

This is the benchmark's only boto3 import. It uploads the plain tree that
s3fs and rclone mount, measures parallel GET throughput from one Python
process with a thread pool (the "raw limit"), and sums a bucket's bytes so
that every tool's push and re-push is measured the same way: by what landed
in the store.
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from collections.abc import Callable
from pathlib import Path

import boto3
from botocore.config import Config

log = logging.getLogger(__name__)

THREADS = 16
PART = 8 * 1024 * 1024  # ranged GETs of large objects, so 16 threads share 8 shards evenly


def client(endpoint_url: str, access_key: str, secret_key: str, region: str, pool: int = THREADS):
    config = Config(
        max_pool_connections=pool,
        retries={"max_attempts": 5, "mode": "standard"},
        s3={"addressing_style": "path"},
    )
    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name=region,
        config=config,
    )


def _pool_map(fn: Callable, items: list, threads: int) -> list:
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        return list(pool.map(fn, items))


def upload_tree(s3, bucket: str, root: Path, rels: list[str], threads: int = THREADS) -> float:
    """Upload each file as the object ``rel`` (plain keys, as s3fs and rclone expect); return seconds.

    One PUT per file from a thread pool; not upload_file, whose own per-file
    threads would overflow the connection pool.
    """

    def put(rel: str) -> None:
        with open(root / rel, "rb") as f:
            s3.put_object(Bucket=bucket, Key=rel, Body=f)

    start = time.perf_counter()
    _pool_map(put, rels, threads)
    return time.perf_counter() - start


def list_objects(s3, bucket: str, prefix: str = "") -> list[tuple[str, int]]:
    """(key, size) of every object under ``prefix``."""
    out = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        out.extend((obj["Key"], obj["Size"]) for obj in page.get("Contents", []))
    return out


def bucket_bytes(s3, bucket: str) -> tuple[int, int]:
    """(total bytes, object count) stored in ``bucket``."""
    total = 0
    count = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            total += obj["Size"]
            count += 1
    return total, count


def _get_range(s3, bucket: str, key: str, start: int, end: int) -> int:
    body = s3.get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-{end - 1}")["Body"]
    n = 0
    while True:
        piece = body.read(1024 * 1024)
        if not piece:
            return n
        n += len(piece)


def _get_whole(s3, bucket: str, key: str) -> int:
    return len(s3.get_object(Bucket=bucket, Key=key)["Body"].read())


def get_large(s3, bucket: str, objects: list[tuple[str, int]], threads: int = THREADS) -> tuple[float, int]:
    """Ranged parallel GETs of every large object; (seconds, bytes)."""
    parts = [(key, off, min(off + PART, size)) for key, size in objects for off in range(0, size, PART)]
    start = time.perf_counter()
    got = sum(_pool_map(lambda p: _get_range(s3, bucket, *p), parts, threads))
    return time.perf_counter() - start, got


def get_whole(s3, bucket: str, keys: list[str], threads: int = THREADS) -> tuple[float, int]:
    """One GET per object, in parallel; (seconds, bytes)."""
    start = time.perf_counter()
    got = sum(_pool_map(lambda key: _get_whole(s3, bucket, key), keys, threads))
    return time.perf_counter() - start, got
