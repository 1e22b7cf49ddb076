"""The fault proxy does what each fault says, seen by a real S3 client against real SeaweedFS.

The client is botocore's own S3 client (what ``boto3.client("s3")`` returns;
boto3 itself is imported only by snapfs.store.s3), unpatched, pointed at the
proxy. Each test pins down what botocore does with a fault, because that is
what snapfs.store.s3 has to handle.
"""

from __future__ import annotations

import concurrent.futures
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import botocore.session
import pytest
from botocore.config import Config
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    EndpointConnectionError,
    FlexibleChecksumError,
    IncompleteReadError,
    ReadTimeoutError,
    ResponseStreamingError,
)
from support.faultproxy import FaultProxy

pytestmark = [pytest.mark.s3, pytest.mark.timeout(60)]

BUCKET = "snapfs-test"  # the session bucket conftest creates; tests stay under their own prefix

S3Client = Any  # botocore builds the client class at run time
MakeClient = Callable[..., S3Client]


@pytest.fixture
def proxy(s3_server: Any) -> Iterator[FaultProxy]:
    s3_server.create_bucket(BUCKET)  # idempotent
    with FaultProxy(s3_server.endpoint_url) as running:
        yield running
    # close() ends hangs and idle keep-alive connections; nothing may linger.
    assert [t.name for t in threading.enumerate() if t.name.startswith("faultproxy")] == []


@pytest.fixture
def make_client(
    s3_server: Any, proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> MakeClient:
    """A factory of S3 clients that talk to the store through ``proxy``."""
    # A developer's ~/.aws must not change retries, regions or endpoints here.
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    for name in (
        "AWS_PROFILE",
        "AWS_RETRY_MODE",
        "AWS_MAX_ATTEMPTS",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
    ):
        monkeypatch.delenv(name, raising=False)
    session = botocore.session.get_session()

    def make(attempts: int = 1, read_timeout: float = 10.0, **config: Any) -> S3Client:
        return session.create_client(
            "s3",
            endpoint_url=proxy.endpoint_url,
            region_name=s3_server.region,
            aws_access_key_id=s3_server.access_key,
            aws_secret_access_key=s3_server.secret_key,
            config=Config(
                retries={"mode": "standard", "total_max_attempts": attempts},
                connect_timeout=2.0,
                read_timeout=read_timeout,
                s3={"addressing_style": "path"},
                **config,
            ),
        )

    return make


@pytest.fixture
def prefix() -> str:
    return f"faultproxy-{uuid.uuid4().hex[:8]}/"


def _payload(size: int) -> bytes:
    return os.urandom(size)


def _put(client: S3Client, key: str, data: bytes) -> None:
    client.put_object(Bucket=BUCKET, Key=key, Body=data)


def _get(client: S3Client, key: str, **kwargs: Any) -> bytes:
    return client.get_object(Bucket=BUCKET, Key=key, **kwargs)["Body"].read()


# -- passthrough -------------------------------------------------------------


def test_passthrough_round_trip_is_exact(proxy: FaultProxy, make_client: MakeClient, prefix: str) -> None:
    client = make_client()
    small = _payload(1000)
    # Over 1 MiB, so botocore sends Expect: 100-continue and streams the body.
    large = _payload(3 * 1024 * 1024 + 17)
    _put(client, prefix + "objects/small", small)
    _put(client, prefix + "objects/large", large)

    assert _get(client, prefix + "objects/small") == small
    assert _get(client, prefix + "objects/large") == large
    assert _get(client, prefix + "objects/large", Range="bytes=1048570-1048589") == large[1048570:1048590]
    assert client.head_object(Bucket=BUCKET, Key=prefix + "objects/large")["ContentLength"] == len(large)
    listed = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    assert sorted(item["Key"] for item in listed["Contents"]) == [
        prefix + "objects/large",
        prefix + "objects/small",
    ]
    # Store errors pass through untouched: a create-once PUT on an existing key.
    with pytest.raises(ClientError) as caught:
        client.put_object(Bucket=BUCKET, Key=prefix + "objects/small", Body=b"other", IfNoneMatch="*")
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    with pytest.raises(ClientError) as caught:
        client.head_object(Bucket=BUCKET, Key=prefix + "missing")
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404

    stats = proxy.stats()
    assert stats.faults == {}
    assert stats.requests == 9 == len(proxy.records)
    assert stats.bytes_to_store >= len(small) + len(large)
    assert stats.bytes_to_client >= len(small) + len(large) + 20
    # Keep-alive: one client, one thread, one pooled connection for everything.
    assert stats.connections == 1


def test_concurrent_requests_share_pooled_connections(
    proxy: FaultProxy, make_client: MakeClient, prefix: str
) -> None:
    client = make_client(max_pool_connections=8)
    objects = {f"{prefix}objects/{n}": _payload(50_000 + n) for n in range(16)}
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda item: _put(client, *item), objects.items()))
        for _ in range(2):
            fetched = dict(zip(objects, pool.map(lambda key: _get(client, key), objects), strict=True))
            assert fetched == objects
    stats = proxy.stats()
    assert stats.requests == 48
    assert 1 < stats.connections <= 8


# -- 500 and 503 -------------------------------------------------------------


def test_503_on_every_request_is_retried_then_fails_with_503(
    proxy: FaultProxy, make_client: MakeClient, prefix: str
) -> None:
    client = make_client(attempts=3)
    _put(client, prefix + "objects/a", b"x" * 100)
    proxy.reset_counters()
    proxy.inject("503", rate=1.0, method="GET")

    with pytest.raises(ClientError) as caught:
        _get(client, prefix + "objects/a")
    response = caught.value.response
    assert response["Error"]["Code"] == "SlowDown"
    assert response["ResponseMetadata"]["HTTPStatusCode"] == 503
    assert response["ResponseMetadata"]["RetryAttempts"] == 2
    assert proxy.stats().faults == {"503": 3}
    assert proxy.stats().requests == 3


def test_503_on_the_next_two_requests_recovers(
    proxy: FaultProxy, make_client: MakeClient, prefix: str
) -> None:
    client = make_client(attempts=3)
    data = _payload(10_000)
    _put(client, prefix + "objects/a", data)
    proxy.reset_counters()
    proxy.inject("503", count=2)

    response = client.get_object(Bucket=BUCKET, Key=prefix + "objects/a")
    assert response["Body"].read() == data
    assert response["ResponseMetadata"]["RetryAttempts"] == 2
    assert [(r.status, r.fault) for r in proxy.records] == [(503, "503"), (503, "503"), (200, None)]


def test_500_on_head_is_retried_and_matchers_spare_other_requests(
    proxy: FaultProxy, make_client: MakeClient, prefix: str
) -> None:
    client = make_client(attempts=2)
    _put(client, prefix + "objects/a", b"abc")
    proxy.inject("500", count=1, method="HEAD", key=r"objects/a$")
    # GETs and other keys do not match and do not use up the count.
    assert _get(client, prefix + "objects/a") == b"abc"
    with pytest.raises(ClientError):
        client.head_object(Bucket=BUCKET, Key=prefix + "objects/ab")  # 404 from the store
    response = client.head_object(Bucket=BUCKET, Key=prefix + "objects/a")
    assert response["ResponseMetadata"]["RetryAttempts"] == 1
    assert proxy.stats().faults == {"500": 1}


def test_fault_rate_is_a_probability(proxy: FaultProxy, make_client: MakeClient, prefix: str) -> None:
    client = make_client()
    _put(client, prefix + "objects/a", b"abc")
    proxy.inject("500", rate=0.5, method="HEAD")
    outcomes = []
    for _ in range(40):
        try:
            client.head_object(Bucket=BUCKET, Key=prefix + "objects/a")
            outcomes.append(200)
        except ClientError as exc:
            outcomes.append(exc.response["ResponseMetadata"]["HTTPStatusCode"])
    assert set(outcomes) == {200, 500}
    assert 8 <= outcomes.count(500) <= 32
    assert proxy.stats().faults == {"500": outcomes.count(500)}


# -- hang ----------------------------------------------------------------------


def test_hang_trips_the_read_timeout(proxy: FaultProxy, make_client: MakeClient, prefix: str) -> None:
    client = make_client(read_timeout=0.5)
    _put(client, prefix + "objects/a", b"abc")
    proxy.inject("hang", count=1, seconds=20)

    started = time.monotonic()
    with pytest.raises(ReadTimeoutError):
        _get(client, prefix + "objects/a")
    assert time.monotonic() - started < 3.0
    # The client dropped that connection; the next request gets a new one and works.
    assert _get(client, prefix + "objects/a") == b"abc"


def test_hang_mid_body_trips_the_read_timeout_while_streaming(
    proxy: FaultProxy, make_client: MakeClient, prefix: str
) -> None:
    client = make_client(read_timeout=0.5)
    _put(client, prefix + "objects/a", _payload(200_000))
    proxy.inject("hang", count=1, seconds=20, at=100_000)

    response = client.get_object(Bucket=BUCKET, Key=prefix + "objects/a")  # headers arrive
    started = time.monotonic()
    with pytest.raises(ReadTimeoutError):
        response["Body"].read()
    assert time.monotonic() - started < 3.0


# -- reset ---------------------------------------------------------------------


def test_reset_before_response_is_a_connection_error_and_retried(
    proxy: FaultProxy, make_client: MakeClient, prefix: str
) -> None:
    data = _payload(5000)
    _put(make_client(), prefix + "objects/a", data)
    proxy.inject("reset", count=1)
    with pytest.raises(ConnectionClosedError):
        _get(make_client(attempts=1), prefix + "objects/a")

    proxy.inject("reset", count=1)
    response = make_client(attempts=2).get_object(Bucket=BUCKET, Key=prefix + "objects/a")
    assert response["Body"].read() == data
    assert response["ResponseMetadata"]["RetryAttempts"] == 1
    assert proxy.stats().faults == {"reset": 2}


def test_reset_mid_body_fails_the_stream(proxy: FaultProxy, make_client: MakeClient, prefix: str) -> None:
    client = make_client()
    _put(client, prefix + "objects/a", _payload(300_000))
    proxy.inject("reset", count=1, at=150_000)
    response = client.get_object(Bucket=BUCKET, Key=prefix + "objects/a")
    with pytest.raises(ResponseStreamingError):
        response["Body"].read()


def test_reset_after_the_store_acted_hides_a_successful_put(
    proxy: FaultProxy, make_client: MakeClient, prefix: str
) -> None:
    client = make_client()
    proxy.inject("reset", count=1, method="PUT", reach_store=True)
    with pytest.raises(ConnectionClosedError):
        client.put_object(Bucket=BUCKET, Key=prefix + "names/n", Body=b"v1", IfNoneMatch="*")
    # The client saw a failure, yet the object exists: a retried create-once
    # PUT then gets 412, which snapfs must treat as "already there".
    assert _get(client, prefix + "names/n") == b"v1"
    with pytest.raises(ClientError) as caught:
        client.put_object(Bucket=BUCKET, Key=prefix + "names/n", Body=b"v1", IfNoneMatch="*")
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412


# -- truncate, flip, trickle -----------------------------------------------------


def test_truncated_body_is_detected(proxy: FaultProxy, make_client: MakeClient, prefix: str) -> None:
    client = make_client()
    _put(client, prefix + "objects/a", _payload(100_000))
    proxy.inject("truncate", count=2, get_only=True)
    for ranged in ({}, {"Range": "bytes=0-49999"}):
        response = client.get_object(Bucket=BUCKET, Key=prefix + "objects/a", **ranged)
        with pytest.raises((ResponseStreamingError, IncompleteReadError)):
            response["Body"].read()
    assert proxy.stats().faults == {"truncate": 2}


def test_flip_changes_bytes_but_not_length(proxy: FaultProxy, make_client: MakeClient, prefix: str) -> None:
    data = _payload(100_000)
    checked = make_client()  # botocore's default: validate a full GET's CRC32 when the store sends one
    unchecked = make_client(response_checksum_validation="when_required")
    _put(checked, prefix + "objects/a", data)
    _put(checked, prefix + "other/a", data)
    proxy.inject("flip", rate=1.0, method="GET", key=r"/objects/", nbytes=3)

    # A ranged GET carries no checksum: the client gets wrong bytes silently.
    flipped = _get(checked, prefix + "objects/a", Range="bytes=0-9999")
    assert len(flipped) == 10_000
    assert [i for i in range(10_000) if flipped[i] != data[i]] == [1666, 5000, 8333]
    # A full GET without checksum validation: also silent.
    flipped = _get(unchecked, prefix + "objects/a")
    assert len(flipped) == len(data)
    assert sum(a != b for a, b in zip(flipped, data, strict=True)) == 3
    # With it (the default), botocore raises once the body is read.
    with pytest.raises(FlexibleChecksumError):
        _get(checked, prefix + "objects/a")
    # The key matcher spares everything else.
    assert _get(unchecked, prefix + "other/a") == data
    assert proxy.stats().faults == {"flip": 3}


def test_trickle_is_slow_but_correct(proxy: FaultProxy, make_client: MakeClient, prefix: str) -> None:
    client = make_client()
    data = _payload(64 * 1024)
    _put(client, prefix + "objects/a", data)
    proxy.inject("trickle", count=1, piece=4096, delay=0.03)

    started = time.monotonic()
    assert _get(client, prefix + "objects/a") == data
    slow = time.monotonic() - started
    started = time.monotonic()
    assert _get(client, prefix + "objects/a") == data
    fast = time.monotonic() - started
    assert slow >= 15 * 0.03  # 16 pieces, a pause between each
    assert fast < slow / 3


def test_body_faults_skip_bodiless_and_error_responses(
    proxy: FaultProxy, make_client: MakeClient, prefix: str
) -> None:
    client = make_client(response_checksum_validation="when_required")
    _put(client, prefix + "objects/a", b"abc")
    rule = proxy.inject("flip", count=1)
    client.head_object(Bucket=BUCKET, Key=prefix + "objects/a")  # no body
    with pytest.raises(ClientError):
        _get(client, prefix + "objects/missing")  # a 404 body
    assert rule.remaining == 1 and proxy.stats().faults == {}
    assert _get(client, prefix + "objects/a") != b"abc"
    assert rule.remaining == 0


# -- down and up -------------------------------------------------------------------


def test_down_refuses_connections_then_up_serves_on_the_same_port(
    proxy: FaultProxy, make_client: MakeClient, prefix: str
) -> None:
    client = make_client()
    _put(client, prefix + "objects/a", b"abc")  # leaves a pooled connection open
    port = proxy.port

    proxy.down()
    assert not proxy.is_up
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass
    started = time.monotonic()
    with pytest.raises(EndpointConnectionError):
        _get(client, prefix + "objects/a")
    assert time.monotonic() - started < 2.0

    proxy.up()
    assert proxy.is_up and proxy.port == port
    assert _get(client, prefix + "objects/a") == b"abc"

    proxy.down(how="reset")
    # The RST races the client's connect(): botocore reports either (both retryable).
    with pytest.raises((EndpointConnectionError, ConnectionClosedError)):
        _get(client, prefix + "objects/a")
    proxy.up()
    assert _get(client, prefix + "objects/a") == b"abc"


def test_inject_rejects_what_it_cannot_do(proxy: FaultProxy) -> None:
    with pytest.raises(ValueError, match="unknown fault kind"):
        proxy.inject("teapot")
    with pytest.raises(ValueError, match="no parameter"):
        proxy.inject("flip", seconds=3)
    with pytest.raises(ValueError, match="rate"):
        proxy.inject("503", rate=1.5)
    with pytest.raises(ValueError, match="http://host:port"):
        FaultProxy("https://127.0.0.1:9000")
