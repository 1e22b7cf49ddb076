"""A small keep-alive HTTP/1.1 client for S3 object GETs and PUTs.

Why not urllib3 (which botocore uses, and this path used before): on a
loopback SeaweedFS, 2,000 GETs of 50 KB objects on 8 threads cost 0.48-0.52
ms of client CPU per request through a urllib3 PoolManager, and 0.11-0.13 ms
through a socket with a buffered reader. The client's cost is paid a second
time on the server: SeaweedFS (Go) spent 1.07-1.14 ms of CPU per GET for the
urllib3 client and 0.60-0.63 ms for the lean one. The request bytes were the
same (adding urllib3's headers to the lean client changed nothing); adding
0.4 ms of busy CPU per request to the lean client reproduced urllib3's server
cost exactly. A slower client makes the server's threads park and wake once
more per request. On a 2-core node both processes share the CPUs, so small
reads through the mount are bound by that sum.

What it does, and all it does:

- one request at a time per connection; idle connections are kept in a
  last-in-first-out pool (up to ``max_idle``) and reused;
- ``http`` and ``https`` (the ``ssl`` module, verifying against ``ca_file``);
- responses framed by Content-Length, chunked encoding, or the connection's
  close; 1xx interim responses are skipped;
- an idle connection the server has closed is noticed before reuse (a
  zero-timeout poll, as urllib3 does) and replaced; if the close crosses the
  request, so that a reused connection ends without a byte of response, the
  request is sent once more on a new connection (only idempotent requests
  come here);
- every other failure raises an ``OSError`` (refused, reset, timed out, a
  body shorter than its Content-Length, a malformed response), and the
  connection is dropped. Retrying is the caller's business;
- lines and headers are bounded, a body is read in pieces of at most 16 MiB
  (a Content-Length that is never sent costs no allocation), and a request
  line or header with a line break is refused before anything is sent.

Timeouts are per socket operation, as in urllib3: ``connect_timeout`` for
the TCP and TLS handshake, ``read_timeout`` for each send and receive.
"""

from __future__ import annotations

import select
import socket
import ssl
import threading
from urllib.parse import urlsplit

_MAX_LINE = 65536
_MAX_HEADERS = 200
# Bodies are read whole, but in pieces of at most this much: a server that
# announces a Content-Length it never sends must not make us allocate it.
_BODY_PIECE = 16 << 20
_FORBIDDEN_IN_HEAD = ("\r", "\n", "\0")


_DEFAULT_PORTS = {"http": 80, "https": 443}


def host_header(url: str) -> str:
    """The Host header for ``url``: an IPv6 address in brackets, and the port
    only when it is not the scheme's default. Both what HTTPPool sends and
    what s3._SigV4 signs, which must be the same string (as botocore writes it)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    if parts.port is not None and parts.port != _DEFAULT_PORTS.get(parts.scheme):
        host = f"{host}:{parts.port}"
    return host


class HTTPProtocolError(OSError):
    """A response that breaks HTTP/1.1 framing, or ends before it should."""


class Response:
    __slots__ = ("status", "headers", "data")

    def __init__(self, status: int, headers: dict[str, str], data: bytes) -> None:
        self.status = status
        self.headers = headers  # names in lower case
        self.data = data


class _Connection:
    __slots__ = ("sock", "file", "used")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.file = sock.makefile("rb")
        self.used = False  # has carried a request before

    def dropped(self) -> bool:
        """True if the idle connection has something to read: the server's
        close (or stray bytes), either way unusable for a new request."""
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        return bool(poller.poll(0))

    def close(self) -> None:
        for closer in (self.file.close, self.sock.close):
            try:
                closer()
            except OSError:
                pass


class _StaleConnection(Exception):
    """A reused connection was closed by the server before it answered."""


class HTTPPool:
    """Keep-alive connections to one ``scheme://host:port``, shared by threads."""

    def __init__(
        self,
        base_url: str,
        *,
        connect_timeout: float,
        read_timeout: float,
        max_idle: int,
        ca_file: str | None = None,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url}")
        self.host = parts.hostname
        self.port = parts.port or _DEFAULT_PORTS[parts.scheme]
        self.host_header = host_header(base_url)
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_idle = max_idle
        self.tls: ssl.SSLContext | None = None
        if parts.scheme == "https":
            self.tls = ssl.create_default_context(cafile=ca_file)
        self._idle: list[_Connection] = []
        self._lock = threading.Lock()
        self.connections_made = 0
        self.resent = 0  # requests sent again after a close crossed them

    def _connect(self) -> _Connection:
        sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.tls is not None:
                sock = self.tls.wrap_socket(sock, server_hostname=self.host)
            sock.settimeout(self.read_timeout)
        except BaseException:
            sock.close()
            raise
        self.connections_made += 1
        return _Connection(sock)

    def _checkout(self, *, fresh: bool = False) -> _Connection:
        while not fresh:
            with self._lock:
                if not self._idle:
                    break
                conn = self._idle.pop()
            if not conn.dropped():
                return conn
            conn.close()
        return self._connect()

    def _checkin(self, conn: _Connection) -> None:
        conn.used = True
        with self._lock:
            if len(self._idle) < self.max_idle:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def request(
        self, method: str, target: str, headers: dict[str, str] | None = None, body: bytes | None = None
    ) -> Response:
        """Send ``method target`` (target: the path, already quoted) and read the
        whole response. Only for idempotent requests: a request on a stale
        reused connection is sent again."""
        lines = [f"{method} {target} HTTP/1.1", f"Host: {self.host_header}"]
        if headers:
            lines.extend(f"{name}: {value}" for name, value in headers.items())
        for line in lines:
            if any(c in line for c in _FORBIDDEN_IN_HEAD) or line.startswith(" "):
                raise ValueError(
                    f"refusing to send a request line or header with a line break: {line[:80]!r}"
                )
        if body is not None or method in ("PUT", "POST"):
            lines.append(f"Content-Length: {len(body) if body is not None else 0}")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        fresh = False
        while True:
            conn = self._checkout(fresh=fresh)
            try:
                response, reusable = self._exchange(conn, method, head, body)
            except _StaleConnection:
                conn.close()
                self.resent += 1
                fresh = True  # once more, on a new connection: it cannot be stale
                continue
            except BaseException:
                conn.close()
                raise
            if reusable:
                self._checkin(conn)
            else:
                conn.close()
            return response

    def _exchange(
        self, conn: _Connection, method: str, head: bytes, body: bytes | None
    ) -> tuple[Response, bool]:
        sock, file = conn.sock, conn.file
        try:
            if body and len(body) <= 65536:
                sock.sendall(head + body)
            else:
                sock.sendall(head)
                if body:
                    sock.sendall(body)
            line = _readline(file)
        except BrokenPipeError:
            if conn.used:
                raise _StaleConnection() from None  # closed by the server before our request
            raise
        if not line:
            if conn.used:
                raise _StaleConnection()
            raise HTTPProtocolError("the server closed the connection without a response")
        while True:
            version, status = _status_line(line)
            headers = _read_headers(file)
            if not 100 <= status < 200:
                break
            line = _readline(file)  # an interim response; the real one follows
        connection = headers.get("connection", "").lower()
        keep_alive = connection != "close" and (version == "HTTP/1.1" or connection == "keep-alive")
        if method == "HEAD" or status in (204, 304):
            return Response(status, headers, b""), keep_alive
        if "chunked" in headers.get("transfer-encoding", "").lower():
            return Response(status, headers, _read_chunked(file)), keep_alive
        length = headers.get("content-length")
        if length is None:
            return Response(status, headers, file.read()), False  # framed by the close
        if not (length.isascii() and length.isdigit()):  # int() would take "+1", " 1", "1_0"
            raise HTTPProtocolError(f"bad Content-Length {length!r}")
        return Response(status, headers, _read_exact(file, int(length))), keep_alive


def _read_exact(file, size: int) -> bytes:  # type: ignore[no-untyped-def]
    # A body of one piece costs no copy: b"".join returns a lone bytes as is.
    pieces = []
    got = 0
    while got < size:
        piece = file.read(min(_BODY_PIECE, size - got))
        if not piece:
            raise HTTPProtocolError(f"the body ended after {got} of {size} bytes")
        pieces.append(piece)
        got += len(piece)
    return b"".join(pieces)


def _readline(file) -> bytes:  # type: ignore[no-untyped-def]
    return file.readline(_MAX_LINE + 1)


def _whole_line(line: bytes, what: str) -> bytes:
    if len(line) > _MAX_LINE or not line.endswith(b"\n"):
        raise HTTPProtocolError(f"{what} is cut off or too long")
    return line


def _status_line(line: bytes) -> tuple[str, int]:
    parts = _whole_line(line, "the status line").split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise HTTPProtocolError(f"not an HTTP/1.x status line: {line[:80]!r}")
    return parts[0].decode("ascii"), int(parts[1])


def _read_headers(file) -> dict[str, str]:  # type: ignore[no-untyped-def]
    headers: dict[str, str] = {}
    for _ in range(_MAX_HEADERS):
        line = _whole_line(_readline(file), "a response header")
        if line in (b"\r\n", b"\n"):
            return headers
        name, sep, value = line.partition(b":")
        if not sep:
            raise HTTPProtocolError(f"malformed response header: {line[:80]!r}")
        key = name.strip().lower().decode("latin-1")
        text = value.strip().decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    raise HTTPProtocolError(f"more than {_MAX_HEADERS} response headers")


def _read_chunked(file) -> bytes:  # type: ignore[no-untyped-def]
    pieces = []
    while True:
        line = _whole_line(_readline(file), "a chunk header")
        try:
            size = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise HTTPProtocolError(f"bad chunk size {line[:40]!r}") from None
        if size < 0:
            raise HTTPProtocolError(f"bad chunk size {line[:40]!r}")
        if size == 0:
            _read_headers(file)  # trailers, up to the blank line
            return b"".join(pieces)
        try:
            piece = _read_exact(file, size)
        except HTTPProtocolError:
            raise HTTPProtocolError("a chunked body ended early") from None
        if _readline(file) not in (b"\r\n", b"\n"):
            raise HTTPProtocolError("a chunked body ended early")
        pieces.append(piece)
