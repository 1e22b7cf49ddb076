"""One Store suite, run against every backend (``store_url`` is parametrized).

S3 runs against a real loopback SeaweedFS; nothing is mocked. The S3-only
tests at the end cover what only a network store can do wrong: unreachable
endpoints, credentials, and URLs.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

from snapfs.errors import NotFoundError, StoreUnavailableError, UsageError
from snapfs.store import Store, open_store


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    opened = open_store(store_url)
    try:
        yield opened
    finally:
        opened.close()


def pattern(size: int, seed: int = 0) -> bytes:
    """Deterministic bytes where every offset differs from its neighbours."""
    block = bytes((i * 31 + seed) % 251 for i in range(251))
    return (block * (size // len(block) + 1))[:size]


# -- round trip ------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 1000, 300_000])
def test_put_get_round_trip(store: Store, size: int) -> None:
    data = pattern(size, seed=size)
    assert store.put("objects/ab/cdef", data) is True
    assert store.get("objects/ab/cdef") == data


def test_put_without_if_absent_overwrites(store: Store) -> None:
    store.put("names/latest", b"first")
    assert store.put("names/latest", b"second") is True
    assert store.get("names/latest") == b"second"


def test_large_object_round_trip_and_range(store: Store) -> None:
    data = pattern(8 * 1024 * 1024 + 17, seed=3)
    store.put("objects/big", data)
    assert store.stat("objects/big").size == len(data)
    assert store.get("objects/big") == data
    middle = 4 * 1024 * 1024 - 5
    assert store.get("objects/big", middle, 1024 * 1024) == data[middle : middle + 1024 * 1024]


def test_store_url_round_trips_through_open_store(store: Store) -> None:
    store.put("records/r1", b"record")
    reopened = open_store(store.url)
    try:
        assert reopened.url == store.url
        assert reopened.get("records/r1") == b"record"
    finally:
        reopened.close()


# -- ranged reads ------------------------------------------------------------


def test_ranged_reads(store: Store) -> None:
    data = pattern(10_000)
    store.put("objects/r", data)
    assert store.get("objects/r", 0, 10) == data[:10]
    assert store.get("objects/r", 1234, 100) == data[1234:1334]
    assert store.get("objects/r", 9_990) == data[9_990:]
    assert store.get("objects/r", 5000, None) == data[5000:]
    # A range running past the end is cut short, as a file read would be.
    assert store.get("objects/r", 9_995, 100) == data[9_995:]
    assert store.get("objects/r", 0, 10_000) == data


def test_ranges_at_and_past_the_end_are_empty(store: Store) -> None:
    store.put("objects/r", b"0123456789")
    assert store.get("objects/r", 10) == b""
    assert store.get("objects/r", 10, 5) == b""
    assert store.get("objects/r", 50, 5) == b""
    assert store.get("objects/r", 3, 0) == b""


def test_range_of_empty_object(store: Store) -> None:
    store.put("objects/empty", b"")
    assert store.get("objects/empty", 0, 10) == b""
    assert store.get("objects/empty") == b""


# -- missing keys and bad keys -------------------------------------------------


def test_missing_key_raises_not_found(store: Store) -> None:
    with pytest.raises(NotFoundError) as info:
        store.get("objects/nope")
    message = str(info.value)
    assert "objects/nope" in message and store.url in message
    with pytest.raises(NotFoundError):
        store.get("objects/nope", 5, 10)
    with pytest.raises(NotFoundError):
        store.get("objects/nope", 0, 0)
    with pytest.raises(NotFoundError):
        store.stat("objects/nope")
    assert store.exists("objects/nope") is False


@pytest.mark.parametrize("key", ["", "/abs", "a//b", "a/../b", "./a", "a/"])
def test_invalid_keys_are_usage_errors(store: Store, key: str) -> None:
    with pytest.raises(UsageError):
        store.put(key, b"x")
    with pytest.raises(UsageError):
        store.get(key)


# -- put if_absent ---------------------------------------------------------------


def test_put_if_absent_creates_once(store: Store) -> None:
    assert store.put("names/v1", b"snapshot-a", if_absent=True) is True
    assert store.put("names/v1", b"snapshot-b", if_absent=True) is False
    assert store.get("names/v1") == b"snapshot-a"


@pytest.mark.parametrize("round_", range(3))
def test_put_if_absent_race_has_exactly_one_winner(store: Store, round_: int) -> None:
    racers = 8
    key = f"names/race-{round_}"
    barrier = threading.Barrier(racers)
    results: list[bool | BaseException] = [False] * racers

    def racer(index: int) -> None:
        barrier.wait()
        try:
            results[index] = store.put(key, f"writer-{index}".encode() * 1000, if_absent=True)
        except BaseException as exc:  # reported below, not swallowed
            results[index] = exc

    threads = [threading.Thread(target=racer, args=(i,)) for i in range(racers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors
    winners = [i for i, won in enumerate(results) if won is True]
    assert len(winners) == 1, results
    assert store.get(key) == f"writer-{winners[0]}".encode() * 1000


# -- exists, stat, list ----------------------------------------------------------


def test_exists_and_stat(store: Store) -> None:
    before = time.time()
    store.put("objects/aa/1", b"12345")
    info = store.stat("objects/aa/1")
    assert info.key == "objects/aa/1"
    assert info.size == 5
    # The server's clock and ours are the same machine's; allow coarse mtimes.
    assert before - 5 <= info.mtime <= time.time() + 5
    assert store.exists("objects/aa/1") is True


def test_a_directory_is_not_a_key(store: Store, request: pytest.FixtureRequest) -> None:
    store.put("objects/aa/1", b"12345")
    assert store.exists("objects/aa") is False
    with pytest.raises(NotFoundError):
        store.stat("objects/aa")
    with pytest.raises(NotFoundError):
        store.get("objects/aa")


LIST_KEYS = {
    "objects/aa/1": b"a",
    "objects/aa/2": b"bb",
    "objects/ab/3": b"ccc",
    "objects/abc": b"dddd",
    "records/r1": b"eeeee",
    "names/deep/er/still/n1": b"f",
    "top": b"gg",
}


@pytest.fixture
def listed_store(store: Store) -> Store:
    for key, data in LIST_KEYS.items():
        store.put(key, data)
    return store


def listing(store: Store, prefix: str = "") -> dict[str, int]:
    return {info.key: info.size for info in store.list(prefix)}


def test_list_everything(listed_store: Store) -> None:
    assert listing(listed_store) == {key: len(data) for key, data in LIST_KEYS.items()}


@pytest.mark.parametrize(
    ("prefix", "expected"),
    [
        ("objects/", {"objects/aa/1", "objects/aa/2", "objects/ab/3", "objects/abc"}),
        ("objects/aa/", {"objects/aa/1", "objects/aa/2"}),
        # A prefix is a string prefix, not a directory: "objects/ab" matches "objects/abc".
        ("objects/ab", {"objects/ab/3", "objects/abc"}),
        ("objects/aa/1", {"objects/aa/1"}),
        ("names/deep/er/", {"names/deep/er/still/n1"}),
        ("t", {"top"}),
        ("nothing/", set()),
        ("objects/zz", set()),
    ],
)
def test_list_with_prefix(listed_store: Store, prefix: str, expected: set[str]) -> None:
    assert set(listing(listed_store, prefix)) == expected


def test_list_empty_store(store: Store) -> None:
    assert list(store.list()) == []
    assert list(store.list("objects/")) == []


def test_list_reports_sizes_and_mtimes(listed_store: Store) -> None:
    for info in listed_store.list("objects/aa/"):
        assert info.size == len(LIST_KEYS[info.key])
        assert info.mtime > 1_600_000_000


# -- delete --------------------------------------------------------------------


def test_delete_is_idempotent(store: Store) -> None:
    store.put("objects/d", b"x")
    store.put("objects/keep", b"y")
    store.delete("objects/d")
    assert store.exists("objects/d") is False
    with pytest.raises(NotFoundError):
        store.get("objects/d")
    store.delete("objects/d")
    store.delete("objects/never-existed")
    assert set(listing(store)) == {"objects/keep"}
    # A deleted key can be created again, if_absent included.
    assert store.put("objects/d", b"z", if_absent=True) is True


# -- concurrency -------------------------------------------------------------------


def test_one_store_is_safe_from_many_threads(store: Store) -> None:
    keys = [f"objects/t/{i:02d}" for i in range(16)]
    for i, key in enumerate(keys):
        store.put(key, pattern(20_000, seed=i))
    failures: list[str] = []

    def reader(worker: int) -> None:
        for n in range(8):
            index = (worker + n) % len(keys)
            expected = pattern(20_000, seed=index)
            start = (worker * 997) % 15_000
            if store.get(keys[index], start, 3000) != expected[start : start + 3000]:
                failures.append(f"worker {worker} key {keys[index]} start {start}")

    threads = [threading.Thread(target=reader, args=(w,)) for w in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not failures


# -- S3 only ------------------------------------------------------------------------


def closed_port() -> socket.socket:
    """A bound but not listening loopback socket: connecting to it is refused."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    return sock


@pytest.mark.s3
@pytest.mark.parametrize("operation", ["get", "put", "put_if_absent", "stat", "list", "delete"])
def test_s3_unreachable_endpoint_fails_fast(
    s3_store_url: str, s3_env: dict[str, str], operation: str
) -> None:
    with closed_port() as sock:
        endpoint = f"http://127.0.0.1:{sock.getsockname()[1]}"
        store = open_store(s3_store_url, endpoint_url=endpoint)
        calls = {
            "get": lambda: store.get("objects/x"),
            "put": lambda: store.put("objects/x", b"data"),
            "put_if_absent": lambda: store.put("objects/x", b"data", if_absent=True),
            "stat": lambda: store.stat("objects/x"),
            "list": lambda: list(store.list("objects/")),
            "delete": lambda: store.delete("objects/x"),
        }
        started = time.monotonic()
        with pytest.raises(StoreUnavailableError) as info:
            calls[operation]()
        elapsed = time.monotonic() - started
        store.close()
    # Five attempts with 50 ms-based backoff; the bound leaves room for a slow CI box.
    assert elapsed < 10, f"{operation} took {elapsed:.1f} s to give up"
    message = str(info.value)
    assert s3_store_url in message and endpoint in message
    assert "\n" not in message
    assert s3_env["AWS_SECRET_ACCESS_KEY"] not in message


@pytest.mark.s3
def test_s3_wrong_secret_is_store_unavailable_without_leaking_it(
    s3_store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    wrong_secret = "wrong-secret-" + os.urandom(8).hex()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong_secret)
    store = open_store(s3_store_url)
    try:
        with pytest.raises(StoreUnavailableError) as info:
            store.put("objects/x", b"data")
    finally:
        store.close()
    message = str(info.value)
    assert "objects/x" in message and s3_store_url in message
    assert wrong_secret not in message


@pytest.mark.s3
def test_s3_prefixes_isolate_stores_in_one_bucket(s3_store_url: str) -> None:
    outer = open_store(s3_store_url)
    inner = open_store(s3_store_url + "/inner")
    try:
        inner.put("objects/a", b"inner")
        outer.put("objects/a", b"outer")
        assert inner.get("objects/a") == b"inner"
        assert outer.get("objects/a") == b"outer"
        assert listing(inner) == {"objects/a": 5}
        # The outer store sees the inner one's objects under its own keys, as a
        # directory store would.
        assert listing(outer) == {"objects/a": 5, "inner/objects/a": 5}
    finally:
        inner.close()
        outer.close()


@pytest.mark.s3
def test_s3_url_is_normalised_and_free_of_credentials(s3_env: dict[str, str]) -> None:
    store = open_store("s3://snapfs-test/some/prefix/")
    try:
        assert store.url == "s3://snapfs-test/some/prefix"
        assert s3_env["AWS_ACCESS_KEY_ID"] not in repr(store)
    finally:
        store.close()


@pytest.mark.s3
@pytest.mark.parametrize(
    "url",
    ["s3://", "s3:///prefix", "s3://bad/bucket?x=1", "s3://b!d/p", "s3://bucket/a/../b", "s3://bucket/a//b"],
)
def test_s3_bad_urls_are_usage_errors(s3_env: dict[str, str], url: str) -> None:
    with pytest.raises(UsageError):
        open_store(url)


@pytest.mark.s3
def test_s3_credentials_in_url_are_refused_without_echoing_them(s3_env: dict[str, str]) -> None:
    with pytest.raises(UsageError) as info:
        open_store("s3://AKIDEXAMPLE:hunter2secret@bucket/prefix")
    assert "hunter2secret" not in str(info.value)


class FlakyHTTPServer:
    """A loopback HTTP server that answers every request with ``responses[n]``
    (the last one repeats): raw bytes written before the connection is closed.
    It stands in for a misbehaving S3 endpoint; botocore itself is untouched."""

    def __init__(self, responses: list[bytes]) -> None:
        self.responses = responses
        self.requests = 0
        self.lock = threading.Lock()
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.endpoint_url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            request = b""
            while b"\r\n\r\n" not in request:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                request += chunk
            with self.lock:
                response = self.responses[min(self.requests, len(self.responses) - 1)]
                self.requests += 1
            if response:
                conn.sendall(response)
            else:
                time.sleep(3)  # hang: say nothing until the client gives up

    def close(self) -> None:
        self.listener.close()


def http_200(body: bytes, declared_length: int | None = None) -> bytes:
    length = len(body) if declared_length is None else declared_length
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % length + body


@pytest.mark.s3
def test_s3_truncated_body_is_retried_never_returned(s3_env: dict[str, str]) -> None:
    full = b"0123456789" * 10
    server = FlakyHTTPServer([http_200(full[:37], declared_length=len(full)), http_200(full)])
    try:
        store = open_store("s3://flaky/p", endpoint_url=server.endpoint_url)
        assert store.get("objects/x") == full
        assert server.requests == 2
        store.close()
    finally:
        server.close()


@pytest.mark.s3
def test_s3_always_truncated_body_is_store_unavailable(
    s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SNAPFS_S3_MAX_ATTEMPTS", "3")
    server = FlakyHTTPServer([http_200(b"short", declared_length=100)])
    try:
        store = open_store("s3://flaky/p", endpoint_url=server.endpoint_url)
        with pytest.raises(StoreUnavailableError) as info:
            store.get("objects/x")
        assert "objects/x" in str(info.value) and "s3://flaky/p" in str(info.value)
        assert server.requests == 3
        store.close()
    finally:
        server.close()


@pytest.mark.s3
def test_s3_hung_server_times_out(s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SNAPFS_S3_READ_TIMEOUT", "0.5")
    monkeypatch.setenv("SNAPFS_S3_MAX_ATTEMPTS", "2")
    server = FlakyHTTPServer([b""])
    try:
        store = open_store("s3://hung/p", endpoint_url=server.endpoint_url)
        started = time.monotonic()
        with pytest.raises(StoreUnavailableError):
            store.get("objects/x")
        elapsed = time.monotonic() - started
        store.close()
    finally:
        server.close()
    # Two attempts of 0.5 s each plus a short backoff, never the 3 s hang.
    assert 0.9 < elapsed < 2.9, elapsed


@pytest.mark.s3
def test_s3_endpoint_userinfo_never_reaches_messages(s3_store_url: str) -> None:
    with closed_port() as sock:
        endpoint = f"http://someone:endpoint-password@127.0.0.1:{sock.getsockname()[1]}"
        store = open_store(s3_store_url, endpoint_url=endpoint)
        try:
            assert "endpoint-password" not in store.endpoint_url  # type: ignore[attr-defined]
            with pytest.raises(StoreUnavailableError) as info:
                store.stat("objects/x")
        finally:
            store.close()
    assert "endpoint-password" not in str(info.value)
    with pytest.raises(UsageError) as bad:
        open_store(s3_store_url, endpoint_url="http://someone:endpoint-password@:::bad")
    assert "endpoint-password" not in str(bad.value)


@pytest.mark.s3
def test_s3_fast_path_steps_aside_for_a_proxy(s3_store_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """botocore sends through HTTP_PROXY; the fast path, which cannot, must not
    go around it, and comes back where NO_PROXY exempts the endpoint."""
    for name in ("NO_PROXY", "no_proxy", "HTTPS_PROXY", "https_proxy", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    proxied = open_store(s3_store_url)
    exempt_host = urlsplit(proxied.endpoint_url).hostname  # type: ignore[attr-defined]
    assert proxied._fast is None  # type: ignore[attr-defined]
    proxied.close()
    monkeypatch.setenv("NO_PROXY", exempt_host)
    direct = open_store(s3_store_url)
    assert direct._fast is not None  # type: ignore[attr-defined]
    direct.put("objects/p", b"direct")
    assert direct.get("objects/p") == b"direct"
    direct.close()


@pytest.mark.s3
@pytest.mark.parametrize("fast", ["1", "0"], ids=["fast-path", "boto3"])
def test_s3_put_paths_agree(s3_store_url: str, fast: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """PUT over the signed urllib3 path and over boto3 store the same bytes and
    answer the same: a bytearray or an empty body, If-None-Match, a missing
    bucket (read: SeaweedFS creates buckets on PUT)."""
    monkeypatch.setenv("SNAPFS_S3_FAST_GET", fast)
    store = open_store(s3_store_url)
    try:
        assert (store._fast is not None) == (fast == "1")  # type: ignore[attr-defined]
        data = os.urandom(300_000)
        assert store.put("objects/view", bytearray(data[1000:]))
        assert store.get("objects/view") == data[1000:]
        assert store.put("objects/empty", b"")
        assert store.get("objects/empty") == b"" and store.stat("objects/empty").size == 0
        assert store.put("names/once", b"first", if_absent=True) is True
        assert store.put("names/once", b"second", if_absent=True) is False
        assert store.get("names/once") == b"first"
    finally:
        store.close()
    bucket = s3_store_url.removeprefix("s3://").partition("/")[0]
    missing = open_store(s3_store_url.replace(bucket, "no-such-bucket-" + os.urandom(4).hex(), 1))
    try:
        with pytest.raises(StoreUnavailableError, match="does not exist") as info:
            missing.get("objects/x")
        assert "\n" not in str(info.value)
    finally:
        missing.close()


@pytest.mark.parametrize(
    "base",
    [
        "http://127.0.0.1:8333/bench/",
        "https://s3.eu-west-1.amazonaws.com/my-bucket/",
        "https://b.s3.amazonaws.com:443/",
    ],
)
@pytest.mark.parametrize("token", [None, "FwoGZXIvYXdzEJr//////////wEaDH+token=="])
def test_s3_request_signing_matches_botocore(base: str, token: str | None) -> None:
    """The fast path signs requests itself; every header it adds must equal what
    botocore's S3SigV4Auth adds to the same request at the same second."""
    from urllib.parse import quote, urlsplit

    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    from snapfs.store.s3 import _SigV4

    region = "eu-west-1"
    credentials = Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", token)
    signer = _SigV4(base, region)
    cases = [
        ("GET", "snaps/objects/ab/" + "c" * 62, None, None),
        ("GET", "snaps/objects/ab/cd", {"Range": "bytes=1048576-2097151"}, None),
        ("GET", "odd prefix/ü+=&?%/obj~x", None, None),
        ("PUT", "snaps/objects/ab/cd", None, os.urandom(70_000)),
        ("PUT", "snaps/names/x@1.0", {"If-None-Match": "*"}, b"snapshot-id\n"),
        ("PUT", "snaps/objects/empty", None, b""),
    ]
    for method, key, headers, body in cases:
        path = urlsplit(base).path + quote(key, safe="/~")
        reference = AWSRequest(
            method=method, url=base + quote(key, safe="/~"), headers=dict(headers or {}), data=body
        )
        S3SigV4Auth(credentials.get_frozen_credentials(), "s3", region).add_auth(reference)
        expected = {k.lower(): v for k, v in reference.headers.items()}
        ours = signer.sign(
            method, path, headers, body, credentials.get_frozen_credentials(), amz_date=expected["x-amz-date"]
        )
        assert {k.lower(): v for k, v in ours.items()} == expected, (method, key, base)
        assert "Signature=" in ours["Authorization"] and ("x-amz-security-token" in expected) == bool(token)
