"""snapfs.store.http: the keep-alive HTTP/1.1 client under S3Store's fast path.

The S3 suites (test_store, test_faults) run it against SeaweedFS and through
the fault proxy. These tests cover what neither server does on its own: each
framing a response may use, servers that close idle connections, a close
that crosses a request, malformed answers and TLS. The server is a scripted
socket server: each connection gets a list of steps, one per request.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import struct
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from snapfs.store.http import HTTPPool, HTTPProtocolError

Step = Callable[[socket.socket, bytes], bool]  # sends a reply; False ends the connection


def reply(raw: bytes) -> Step:
    def step(sock: socket.socket, _request: bytes) -> bool:
        sock.sendall(raw)
        return True

    return step


def reply_then_close(raw: bytes) -> Step:
    def step(sock: socket.socket, _request: bytes) -> bool:
        sock.sendall(raw)
        return False

    return step


def close_without_reply(sock: socket.socket, _request: bytes) -> bool:
    return False


def reset(sock: socket.socket, _request: bytes) -> bool:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    return False


def ok(body: bytes, extra: str = "") -> bytes:
    return f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


class ScriptedServer:
    """Accepts connections on 127.0.0.1; connection N plays ``scripts[N]``, one step
    per request received, then closes. Records every request it read."""

    def __init__(self, scripts: list[list[Step]], tls: ssl.SSLContext | None = None) -> None:
        self.scripts = scripts
        self.tls = tls
        self.requests: list[tuple[int, bytes]] = []  # (connection number, request head + body)
        self.ended = threading.Semaphore(0)  # released as each connection ends
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        for number, script in enumerate(self.scripts):
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            if self.tls is not None:
                try:
                    sock = self.tls.wrap_socket(sock, server_side=True)
                except (ssl.SSLError, OSError):
                    sock.close()
                    continue
            try:
                with sock, sock.makefile("rb") as reader:
                    for step in script:
                        request = _read_request(reader)
                        if request is None:
                            break
                        self.requests.append((number, request))
                        if not step(sock, request):
                            break
            except OSError:
                pass  # the client went away mid-reply
            self.ended.release()

    def close(self) -> None:
        # shutdown() wakes an accept() still waiting for a connection that never
        # comes (close() alone does not on Linux, and the join would time out).
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        self.thread.join(timeout=5)


def _read_request(reader) -> bytes | None:  # type: ignore[no-untyped-def]
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        line = reader.readline()
        if not line:
            return None
        head += line
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head + reader.read(length)


@pytest.fixture
def serve() -> Iterator[Callable[..., ScriptedServer]]:
    servers: list[ScriptedServer] = []

    def start(*scripts: list[Step], tls: ssl.SSLContext | None = None) -> ScriptedServer:
        server = ScriptedServer(list(scripts), tls)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def pool_for(server: ScriptedServer, scheme: str = "http", **kwargs) -> HTTPPool:  # type: ignore[no-untyped-def]
    options = {"connect_timeout": 2.0, "read_timeout": 2.0, "max_idle": 4, **kwargs}
    return HTTPPool(f"{scheme}://127.0.0.1:{server.port}/bucket/", **options)


def test_keep_alive_reuses_one_connection_and_sends_what_it_is_given(serve) -> None:
    server = serve([reply(ok(b"first")), reply(ok(b"second")), reply(ok(b""))])
    pool = pool_for(server)
    first = pool.request("GET", "/bucket/a%20b", {"Range": "bytes=0-4"})
    assert (first.status, first.data) == (200, b"first")
    second = pool.request("PUT", "/bucket/k", {"X-Amz-Date": "x"}, b"payload")
    assert second.data == b"second"
    empty = pool.request("PUT", "/bucket/empty", None, b"")
    assert empty.status == 200 and empty.data == b""
    assert pool.connections_made == 1 and [n for n, _ in server.requests] == [0, 0, 0]
    get, put, put_empty = (request for _, request in server.requests)
    assert get.startswith(b"GET /bucket/a%20b HTTP/1.1\r\n")
    assert f"Host: 127.0.0.1:{server.port}\r\n".encode() in get and b"Range: bytes=0-4\r\n" in get
    assert b"Content-Length" not in get
    assert put.endswith(b"Content-Length: 7\r\n\r\npayload")
    assert put_empty.endswith(b"Content-Length: 0\r\n\r\n")
    pool.close()


def test_chunked_and_close_framed_bodies_and_interim_responses(serve) -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nTrailer: x\r\n\r\n"
    )
    interim = b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b"after 100")
    close_framed = b"HTTP/1.1 404 Not Found\r\nConnection: close\r\n\r\n<Error><Code>NoSuchKey</Code></Error>"
    server = serve([reply(chunked), reply(interim), reply_then_close(close_framed)], [reply(ok(b"x"))])
    pool = pool_for(server)
    assert pool.request("GET", "/bucket/c").data == b"hello world"
    assert pool.request("GET", "/bucket/i").data == b"after 100"
    missing = pool.request("GET", "/bucket/m")
    assert missing.status == 404 and missing.data.endswith(b"</Error>")
    assert missing.headers["connection"] == "close"
    # "Connection: close" was honoured: the next request opens a new connection.
    assert pool.request("GET", "/bucket/n").data == b"x"
    assert pool.connections_made == 2


def test_an_idle_connection_the_server_closed_is_replaced_before_use(serve) -> None:
    server = serve([reply_then_close(ok(b"one"))], [reply(ok(b"two"))])
    pool = pool_for(server)
    assert pool.request("GET", "/bucket/a").data == b"one"  # no "Connection: close": kept idle
    assert server.ended.acquire(timeout=2)  # ... until the server has closed it
    assert pool.request("GET", "/bucket/b").data == b"two"
    assert pool.connections_made == 2
    # Seen closed before use: the second request was sent once, on the new connection.
    assert pool.resent == 0 and [n for n, _ in server.requests] == [0, 1]


def test_a_close_that_crosses_the_request_resends_it_once_on_a_new_connection(serve) -> None:
    server = serve(
        [reply(ok(b"one")), close_without_reply],
        [close_without_reply],
    )
    pool = pool_for(server)
    assert pool.request("GET", "/bucket/a").data == b"one"
    with pytest.raises(HTTPProtocolError, match="closed the connection without a response"):
        pool.request("GET", "/bucket/b")
    # Sent on the reused connection, then once on a new one, which is not retried.
    assert pool.resent == 1 and [n for n, _ in server.requests] == [0, 0, 1]


def test_a_reset_is_an_error_for_the_caller_to_retry_not_resent_silently(serve) -> None:
    server = serve([reply(ok(b"one")), reset], [reply(ok(b"two"))])
    pool = pool_for(server)
    assert pool.request("GET", "/bucket/a").data == b"one"
    with pytest.raises(ConnectionResetError):
        pool.request("GET", "/bucket/b")
    assert len(server.requests) == 2
    assert pool.request("GET", "/bucket/c").data == b"two"  # the broken connection was dropped


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", "ended after 5 of 10 bytes"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "bad Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: ten\r\n\r\n", "bad Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1_0\r\n\r\n0123456789", "bad Content-Length"),
        (b"SSH-2.0-OpenSSH_9.2\r\n\r\n", "not an HTTP/1.x status line"),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "malformed response header"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "bad chunk size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel", "chunked body ended early"),
        (b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70000 + b"\r\n\r\n", "cut off or too long"),
        (b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 300 + b"\r\n", "more than 200 response headers"),
    ],
    ids=[
        "short-body",
        "negative-length",
        "bad-length",
        "underscore-length",
        "not-http",
        "bad-header",
        "bad-chunk",
        "short-chunk",
        "long-header",
        "many-headers",
    ],
)
def test_malformed_responses_raise_and_drop_the_connection(serve, raw: bytes, match: str) -> None:
    server = serve([reply_then_close(raw)], [reply(ok(b"fine"))])
    pool = pool_for(server)
    with pytest.raises(HTTPProtocolError, match=match):
        pool.request("GET", "/bucket/x")
    assert pool.request("GET", "/bucket/y").data == b"fine"
    assert pool.connections_made == 2


def test_a_length_announced_but_never_sent_is_an_error_not_an_allocation(serve) -> None:
    server = serve(
        [reply_then_close(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000000\r\n\r\n" + b"x" * 100)]
    )
    pool = pool_for(server)
    with pytest.raises(HTTPProtocolError, match="ended after 100 of 1000000000000 bytes"):
        pool.request("GET", "/bucket/liar")


def test_a_body_larger_than_one_piece_arrives_whole(serve) -> None:
    body = bytes(range(256)) * (80 * 1024 + 3)  # about 20 MiB: more than one 16 MiB piece
    server = serve([reply(ok(body))])
    assert pool_for(server).request("GET", "/bucket/big").data == body


@pytest.mark.parametrize(
    ("target", "headers"),
    [
        ("/bucket/a\r\nX-Evil: 1", None),
        ("/bucket/a", {"Range": "bytes=0-1\r\nX-Evil: 1"}),
        ("/bucket/a", {"X\nY": "z"}),
    ],
    ids=["target", "value", "name"],
)
def test_line_breaks_in_the_request_head_are_refused_before_sending(serve, target, headers) -> None:
    server = serve([reply(ok(b"never"))])
    pool = pool_for(server)
    with pytest.raises(ValueError, match="line break"):
        pool.request("GET", target, headers)
    assert pool.connections_made == 0 and server.requests == []


def test_a_silent_server_times_out(serve) -> None:
    server = serve([lambda sock, request: threading.Event().wait(1) or False])
    pool = pool_for(server, read_timeout=0.3)
    with pytest.raises(TimeoutError):
        pool.request("GET", "/bucket/slow")


def test_refused_connection_is_an_oserror() -> None:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    pool = HTTPPool(f"http://127.0.0.1:{port}/", connect_timeout=1, read_timeout=1, max_idle=1)
    with pytest.raises(ConnectionRefusedError):
        pool.request("GET", "/x")


def test_rejects_urls_it_cannot_serve() -> None:
    for url in ("ftp://host/x", "http:///nohost"):
        with pytest.raises(ValueError, match="not an http"):
            HTTPPool(url, connect_timeout=1, read_timeout=1, max_idle=1)
    pool = HTTPPool("https://[::1]/b/", connect_timeout=1, read_timeout=1, max_idle=1)
    assert pool.host_header == "[::1]" and pool.port == 443


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return key, cert


def test_https_verifies_the_server_against_the_ca_file(serve, certificate: tuple[Path, Path]) -> None:
    key, cert = certificate
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    server = serve([reply(ok(b"secret")), reply(ok(b"again"))], [], tls=tls)
    trusted = pool_for(server, "https", ca_file=str(cert))
    assert trusted.request("GET", "/bucket/a").data == b"secret"
    assert trusted.request("GET", "/bucket/b").data == b"again"
    assert trusted.connections_made == 1
    # Without the CA file, the self-signed certificate is refused.
    untrusted = pool_for(server, "https")
    with pytest.raises(ssl.SSLCertVerificationError):
        untrusted.request("GET", "/bucket/c")
