"""A fault-injecting HTTP proxy in front of a loopback S3 server, for the fault suite.

Clients (boto3 with ``endpoint_url=proxy.endpoint_url``, the snapfs CLI, the
daemon) talk to the proxy; it forwards every request to the real S3 endpoint
byte for byte, and, when a test asks for it, breaks the exchange the way real
networks and stores do::

    with FaultProxy(s3_server.endpoint_url) as proxy:
        proxy.inject("flip", rate=1.0, method="GET", key=r"objects/")
        proxy.inject("503", count=2)            # the next 2 requests only
        ...
        proxy.clear()
        proxy.down(); proxy.up()                # store unreachable, then back

Fault kinds (parameters in brackets, with defaults):

- ``"500"`` / ``"503"``: answer without contacting the store with an S3 XML
  ``InternalError`` / ``SlowDown`` error, which botocore classifies as
  retryable. The connection stays open, as a real S3 front end keeps it.
- ``"hang"`` [seconds=30, at=None, reach_store=False]: send nothing for
  ``seconds`` (or until the client gives up and closes), then close. With
  ``at=N`` the status line, headers and the first N body bytes are sent first.
- ``"reset"`` [at=None, reach_store=False]: abort the connection with a TCP RST
  (SO_LINGER 0) before the response, or after N body bytes with ``at=N``.
- ``"truncate"`` [keep=None]: send the real headers (so Content-Length promises
  the whole body) but only ``keep`` bytes (default half), then close cleanly.
- ``"flip"`` [nbytes=1]: invert ``nbytes`` bytes spread evenly over the body
  (the first at its middle); length and headers unchanged.
- ``"trickle"`` [piece=1024, delay=0.01]: send the body ``piece`` bytes at a
  time, sleeping ``delay`` seconds between pieces; the bytes are correct.

``reach_store=True`` forwards the request first (the store acts on it) and
breaks only the response: the case where a PUT succeeded but the client
never heard so.

Every rule has a trigger: ``rate`` (probability per matching request, 0..1)
and/or ``count`` (fire on at most the next N matching requests); with
neither it fires on every matching request. Matchers, all optional, are
ANDed: ``method`` (one or several), ``key`` (regex searched in the decoded
request path ``/bucket/key``; a plain substring works), ``ranged`` (True: only
requests with a Range header; False: only without). Rules are tried in the
order they were added; the first that fires wins, one fault per request.
Body faults (hang/reset with ``at``, truncate, flip, trickle) apply only to
2xx responses with a body longer than their offset; when they do not apply
the request passes through and a ``count`` is not used up.

Down: ``down()`` closes the listening socket (new connections are refused)
and aborts every open connection; ``down(how="reset")`` keeps listening but
resets each new connection at once. ``up()`` listens again on the same port.

Counters: ``stats()`` (requests seen, faults injected per kind, body bytes
forwarded each way, connections accepted) and ``records`` (the last
requests: method, path, status, fault).

Not a full HTTP proxy: it speaks HTTP/1.1 to one plain-http upstream, as S3
clients do. It answers ``Expect: 100-continue`` itself and drops that header
upstream (botocore never signs it); every other header, including Host and
Authorization, is forwarded unchanged so SigV4 signatures stay valid.

Concurrency: one accept thread plus one thread per client connection, each
with its own upstream connection (keep-alive on both sides, so boto3's pooled
connections are reused). Rules, counters and the up/down state are guarded
by one lock; every public method is safe from any thread while requests are
in flight.
"""

from __future__ import annotations

import collections
import dataclasses
import email.utils
import logging
import random
import re
import select
import socket
import struct
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import Any

import pytest

log = logging.getLogger(__name__)

FAULT_KINDS = ("500", "503", "hang", "reset", "truncate", "flip", "trickle")

#: Parameters each kind accepts, with defaults.
_DEFAULT_PARAMS: dict[str, dict[str, Any]] = {
    "500": {},
    "503": {},
    "hang": {"seconds": 30.0, "at": None, "reach_store": False},
    "reset": {"at": None, "reach_store": False},
    "truncate": {"keep": None},
    "flip": {"nbytes": 1},
    "trickle": {"piece": 1024, "delay": 0.01},
}

_ERRORS = {
    "500": (
        500,
        "Internal Server Error",
        "InternalError",
        "We encountered an internal error. Please try again.",
    ),
    "503": (503, "Slow Down", "SlowDown", "Please reduce your request rate."),
}

_IO_SIZE = 256 * 1024
_MAX_HEAD_LINE = 64 * 1024
_MAX_HEAD_LINES = 256
#: How long the proxy waits on the store before giving up on a request.
UPSTREAM_TIMEOUT = 120.0
RECORDS_KEPT = 10_000


class _ProtocolError(Exception):
    """The peer sent something this proxy cannot frame; the connection is dropped."""


class _Abort(Exception):
    """The fault ended this connection on purpose (reset, hang, truncate)."""


@dataclasses.dataclass(eq=False)  # identity: remove() must drop this rule, not an equal one
class FaultRule:
    """One ``inject`` call: which requests it matches, how often, and what it does."""

    kind: str
    rate: float | None
    remaining: int | None
    methods: frozenset[str] | None
    key: re.Pattern[str] | None
    ranged: bool | None
    params: dict[str, Any]
    fired: int = 0

    def matches(self, method: str, path: str, has_range: bool) -> bool:
        if self.methods is not None and method not in self.methods:
            return False
        if self.key is not None and not self.key.search(path):
            return False
        if self.ranged is not None and self.ranged != has_range:
            return False
        return True

    @property
    def acts_on_body(self) -> bool:
        """True if this fault needs the store's response (it breaks the body)."""
        if self.kind in ("truncate", "flip", "trickle"):
            return True
        return self.kind in ("hang", "reset") and self.params["at"] is not None


@dataclasses.dataclass(frozen=True)
class RequestRecord:
    method: str
    path: str
    ranged: bool
    status: int | None  # what the client was told; None if it got no status line
    fault: str | None


@dataclasses.dataclass(frozen=True)
class ProxyStats:
    requests: int
    faults: dict[str, int]
    bytes_to_store: int  # request body bytes forwarded
    bytes_to_client: int  # response body bytes sent (after any fault)
    connections: int

    @property
    def bytes_forwarded(self) -> int:
        return self.bytes_to_store + self.bytes_to_client


@dataclasses.dataclass
class _Request:
    method: str
    target: str
    path: str
    head_lines: list[bytes]
    headers: dict[str, str]  # lower-cased names; last value wins (enough for framing)

    @property
    def has_range(self) -> bool:
        return "range" in self.headers


@dataclasses.dataclass
class _Response:
    status: int
    head_lines: list[bytes]
    headers: dict[str, str]
    framing: str  # "none", "length", "chunked" or "close"
    length: int  # for framing == "length"
    keep_alive: bool


class FaultProxy:
    """See the module docstring."""

    def __init__(
        self, upstream_url: str, *, seed: int | None = 0, upstream_timeout: float = UPSTREAM_TIMEOUT
    ) -> None:
        parsed = urllib.parse.urlsplit(upstream_url)
        if parsed.scheme != "http" or not parsed.hostname or not parsed.port:
            raise ValueError(f"FaultProxy needs an http://host:port upstream, not {upstream_url!r}")
        self.upstream = (parsed.hostname, parsed.port)
        self.upstream_url = upstream_url
        self.upstream_timeout = upstream_timeout
        self.port = 0
        self._lock = threading.Lock()
        self._random = random.Random(seed)
        self._rules: list[FaultRule] = []
        self._requests = 0
        self._faults: collections.Counter[str] = collections.Counter()
        self._bytes_to_store = 0
        self._bytes_to_client = 0
        self._connections = 0
        self._records: collections.deque[RequestRecord] = collections.deque(maxlen=RECORDS_KEPT)
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._reset_new_connections = False
        self._conns: set[_Connection] = set()
        self._threads: set[threading.Thread] = set()
        self._closing = threading.Event()
        self._started = False

    # -- lifecycle -----------------------------------------------------------

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FaultProxy:
        if self._started:
            raise RuntimeError("FaultProxy already started")
        self._started = True
        self._listen()
        log.info("fault proxy %s -> %s", self.endpoint_url, self.upstream_url)
        return self

    def close(self) -> None:
        """Stop listening, end every connection (and any hang), join the threads; idempotent."""
        self._closing.set()
        self._stop_listening()
        with self._lock:
            conns = list(self._conns)
            threads = list(self._threads)
        for conn in conns:
            conn.abort()
        for thread in threads:
            thread.join(timeout=5.0)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- faults --------------------------------------------------------------

    def inject(
        self,
        kind: str,
        *,
        rate: float | None = None,
        count: int | None = None,
        method: str | Iterable[str] | None = None,
        key: str | None = None,
        ranged: bool | None = None,
        get_only: bool = False,
        **params: Any,
    ) -> FaultRule:
        """Add a fault rule (see the module docstring); returns it so a test can ``remove`` it."""
        kind = str(kind)
        if kind not in _DEFAULT_PARAMS:
            raise ValueError(f"unknown fault kind {kind!r}; expected one of {', '.join(FAULT_KINDS)}")
        unknown = set(params) - set(_DEFAULT_PARAMS[kind])
        if unknown:
            raise ValueError(f"fault {kind!r} takes no parameter(s) {', '.join(sorted(unknown))}")
        if rate is not None and not 0.0 <= rate <= 1.0:
            raise ValueError(f"rate must be within 0..1, not {rate}")
        if count is not None and count < 0:
            raise ValueError(f"count must be >= 0, not {count}")
        if get_only:
            if method is not None:
                raise ValueError("give either get_only=True or method=..., not both")
            method = "GET"
        methods: frozenset[str] | None = None
        if method is not None:
            methods = frozenset([method.upper()] if isinstance(method, str) else (m.upper() for m in method))
        merged = {**_DEFAULT_PARAMS[kind], **params}
        for name in ("at", "keep"):
            if merged.get(name) is not None and merged[name] < 0:
                raise ValueError(f"{name} must be >= 0, not {merged[name]}")
        if kind == "flip" and merged["nbytes"] < 1:
            raise ValueError("flip needs nbytes >= 1")
        if kind == "trickle" and merged["piece"] < 1:
            raise ValueError("trickle needs piece >= 1")
        rule = FaultRule(
            kind=kind,
            rate=rate,
            remaining=count,
            methods=methods,
            key=re.compile(key) if key is not None else None,
            ranged=ranged,
            params=merged,
        )
        with self._lock:
            self._rules.append(rule)
        return rule

    def remove(self, rule: FaultRule) -> None:
        with self._lock:
            if rule in self._rules:
                self._rules.remove(rule)

    def clear(self) -> None:
        """Remove every rule; requests already being broken finish their fault. Counters stay."""
        with self._lock:
            self._rules.clear()

    # -- up and down ---------------------------------------------------------

    def down(self, *, how: str = "refuse") -> None:
        """Make the store unreachable and end every open connection.

        ``how="refuse"``: close the listening socket, so connecting fails with
        ECONNREFUSED. ``how="reset"``: keep listening but reset every new
        connection at once (a crashed server behind a live load balancer).
        """
        if how not in ("refuse", "reset"):
            raise ValueError(f"down(how=...) is 'refuse' or 'reset', not {how!r}")
        if how == "refuse":
            self._stop_listening()
        with self._lock:
            if how == "reset" and self._listener is None:
                raise RuntimeError("down(how='reset') needs the proxy listening; call up() first")
            self._reset_new_connections = how == "reset"
            conns = list(self._conns)
        for conn in conns:
            conn.abort()

    def up(self) -> None:
        """Serve again, on the same port."""
        with self._lock:
            self._reset_new_connections = False
            if self._listener is None:
                self._listen_locked()

    @property
    def is_up(self) -> bool:
        with self._lock:
            return self._listener is not None and not self._reset_new_connections

    # -- counters ------------------------------------------------------------

    def stats(self) -> ProxyStats:
        with self._lock:
            return ProxyStats(
                requests=self._requests,
                faults=dict(self._faults),
                bytes_to_store=self._bytes_to_store,
                bytes_to_client=self._bytes_to_client,
                connections=self._connections,
            )

    @property
    def requests_seen(self) -> int:
        return self.stats().requests

    @property
    def faults_injected(self) -> dict[str, int]:
        return self.stats().faults

    @property
    def bytes_forwarded(self) -> int:
        return self.stats().bytes_forwarded

    @property
    def records(self) -> list[RequestRecord]:
        with self._lock:
            return list(self._records)

    def reset_counters(self) -> None:
        with self._lock:
            self._requests = 0
            self._faults.clear()
            self._bytes_to_store = self._bytes_to_client = self._connections = 0
            self._records.clear()

    # -- internals: listening ------------------------------------------------

    def _listen(self) -> None:
        with self._lock:
            self._listen_locked()

    def _listen_locked(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # Coming back up on the same port must work while connections from
        # the previous incarnation sit in TIME_WAIT.
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind(("127.0.0.1", self.port))
        except OSError as exc:
            listener.close()
            raise RuntimeError(f"fault proxy cannot listen on 127.0.0.1:{self.port}: {exc}") from exc
        listener.listen(128)
        self.port = listener.getsockname()[1]
        self._listener = listener
        thread = threading.Thread(
            target=self._accept_loop, args=(listener,), name=f"faultproxy-accept-{self.port}", daemon=True
        )
        self._accept_thread = thread
        thread.start()

    def _stop_listening(self) -> None:
        """Close the listener; returns once nothing accepts any more. Called without the lock."""
        with self._lock:
            listener, self._listener = self._listener, None
            thread, self._accept_thread = self._accept_thread, None
        if listener is None:
            return
        # shutdown() wakes a thread blocked in accept() on Linux; close() alone
        # would not, and the kernel would keep accepting into the backlog.
        try:
            listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        listener.close()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5.0)

    def _accept_loop(self, listener: socket.socket) -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except OSError:
                return  # the listener was shut down
            conn = _Connection(self, sock)
            thread = threading.Thread(target=self._serve, args=(conn,), name="faultproxy-conn", daemon=True)
            with self._lock:
                self._connections += 1
                # A connection accepted while down() was closing this
                # listener must not slip through as served.
                refuse = (
                    self._listener is not listener or self._reset_new_connections or self._closing.is_set()
                )
                if not refuse:
                    self._conns.add(conn)
                    # Finished threads are pruned here, not by themselves, so
                    # close() can join every thread that might still be alive.
                    self._threads = {t for t in self._threads if t.is_alive()}
                    self._threads.add(thread)
            if refuse:
                conn.close_now(rst=True)
                continue
            thread.start()

    def _serve(self, conn: _Connection) -> None:
        try:
            conn.run()
        finally:
            with self._lock:
                self._conns.discard(conn)

    # -- internals: rules and counters ---------------------------------------

    def _pick(self, request: _Request) -> FaultRule | None:
        with self._lock:
            self._requests += 1
            for rule in self._rules:
                if rule.remaining == 0 or not rule.matches(request.method, request.path, request.has_range):
                    continue
                if rule.rate is not None and self._random.random() >= rule.rate:
                    continue
                if rule.remaining is not None:
                    rule.remaining -= 1
                return rule
        return None

    def _refund(self, rule: FaultRule) -> None:
        """A picked body fault could not apply (no body, error status): give its count back."""
        with self._lock:
            if rule.remaining is not None:
                rule.remaining += 1

    def _fired(self, rule: FaultRule) -> None:
        with self._lock:
            rule.fired += 1
            self._faults[rule.kind] += 1

    def _count_bytes(self, to_store: int = 0, to_client: int = 0) -> None:
        with self._lock:
            self._bytes_to_store += to_store
            self._bytes_to_client += to_client

    def _record(self, request: _Request, status: int | None, fault: str | None) -> None:
        with self._lock:
            self._records.append(
                RequestRecord(request.method, request.path, request.has_range, status, fault)
            )

    def _wait(self, seconds: float, client: socket.socket | None = None) -> None:
        """Sleep up to ``seconds``; return early if the proxy closes or ``client`` hangs up."""
        deadline = time.monotonic() + seconds
        while not self._closing.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            if client is not None and _peer_closed(client):
                return
            self._closing.wait(min(remaining, 0.1))


class _Connection:
    """One client connection and its upstream connection, served by one thread."""

    def __init__(self, proxy: FaultProxy, client: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.client_in = client.makefile("rb", buffering=_IO_SIZE)
        self.upstream: socket.socket | None = None
        self.upstream_in: Any = None
        self._aborted = False

    def close_now(self, *, rst: bool) -> None:
        """Close a connection no thread serves (yet)."""
        _close_quietly(self.client_in)
        if rst:
            _reset(self.client)
        else:
            _close_quietly(self.client)

    def abort(self) -> None:
        """From another thread: end this connection now (wakes the serving thread)."""
        self._aborted = True
        for sock in (self.client, self.upstream):
            if sock is None:
                continue
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def run(self) -> None:
        try:
            while not self._aborted:
                request = self._read_request()
                if request is None:
                    break
                if not self._handle(request):
                    break
        except _Abort:
            pass
        except (OSError, _ProtocolError, ValueError) as exc:
            # A client that gives up (read timeout) or a down() lands here.
            log.debug("fault proxy connection ended: %s", exc)
        finally:
            self._close_upstream()
            _close_quietly(self.client_in)
            _close_quietly(self.client)

    # -- requests ------------------------------------------------------------

    def _read_request(self) -> _Request | None:
        lines = _read_head(self.client_in, allow_eof=True)
        if lines is None:
            return None
        try:
            method, target, version = lines[0].decode("latin-1").split()
        except ValueError:
            raise _ProtocolError(f"bad request line {lines[0][:100]!r}") from None
        if not version.startswith("HTTP/1."):
            raise _ProtocolError(f"unsupported HTTP version {version!r}")
        path = urllib.parse.unquote(urllib.parse.urlsplit(target).path)
        return _Request(method.upper(), target, path, lines, _parse_headers(lines))

    def _handle(self, request: _Request) -> bool:
        """Serve one request; False if the client connection must end afterwards."""
        proxy = self.proxy
        if request.headers.get("expect", "").lower() == "100-continue":
            # Answered here so the client sends its body at once (and a fault
            # that replies without the store still sees a well-framed body).
            self.client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        rule = proxy._pick(request)
        client_wants_close = request.headers.get("connection", "").lower() == "close"

        if rule is not None and rule.kind in _ERRORS:
            self._drain_request_body(request)
            proxy._fired(rule)
            self._send_error(request, rule.kind)
            proxy._record(request, _ERRORS[rule.kind][0], rule.kind)
            return not client_wants_close

        if rule is not None and not rule.acts_on_body and not rule.params["reach_store"]:
            # hang/reset before the store ever sees the request.
            proxy._fired(rule)
            proxy._record(request, None, rule.kind)
            self._break_before_response(rule)
            return False

        self._forward_request(request)
        response = self._read_response(request)

        if rule is not None and not rule.acts_on_body:
            # hang/reset after the store acted on the request.
            proxy._fired(rule)
            proxy._record(request, None, rule.kind)
            self._close_upstream()
            self._break_before_response(rule)
            return False

        buffered: bytes | None = None
        if rule is not None:
            applicable, buffered = self._prepare_body_fault(rule, response)
            if applicable:
                proxy._fired(rule)
                proxy._record(request, response.status, rule.kind)
                return self._send_broken_body(rule, response, buffered) and not client_wants_close
            proxy._refund(rule)

        proxy._record(request, response.status, None)
        self.client.sendall(b"".join(response.head_lines))
        if buffered is None:
            self._relay_body(response)
        elif buffered:
            self.client.sendall(buffered)
            proxy._count_bytes(to_client=len(buffered))
        if not response.keep_alive:
            self._close_upstream()
        return not client_wants_close and response.framing != "close"

    def _drain_request_body(self, request: _Request) -> None:
        for _ in _request_body_pieces(self.client_in, request.headers):
            pass

    def _forward_request(self, request: _Request) -> None:
        upstream = self._ensure_upstream()
        head = [line for line in request.head_lines if not line.lower().startswith(b"expect:")]
        upstream.sendall(b"".join(head))
        sent = 0
        for piece in _request_body_pieces(self.client_in, request.headers):
            upstream.sendall(piece)
            sent += len(piece)
        if sent:
            self.proxy._count_bytes(to_store=sent)

    def _ensure_upstream(self) -> socket.socket:
        if self.upstream is not None and _peer_closed(self.upstream):
            # The store closed an idle keep-alive connection; a request sent
            # on it would be lost, so open a fresh one instead.
            self._close_upstream()
        if self.upstream is None:
            sock = socket.create_connection(self.proxy.upstream, timeout=10.0)
            sock.settimeout(self.proxy.upstream_timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.upstream = sock
            self.upstream_in = sock.makefile("rb", buffering=_IO_SIZE)
        return self.upstream

    def _close_upstream(self) -> None:
        if self.upstream_in is not None:
            _close_quietly(self.upstream_in)
        if self.upstream is not None:
            _close_quietly(self.upstream)
        self.upstream = None
        self.upstream_in = None

    # -- responses -----------------------------------------------------------

    def _read_response(self, request: _Request) -> _Response:
        while True:
            lines = _read_head(self.upstream_in, allow_eof=False)
            assert lines is not None
            parts = lines[0].decode("latin-1").split(None, 2)
            if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
                raise _ProtocolError(f"bad status line from the store {lines[0][:100]!r}")
            status = int(parts[1])
            if 100 <= status < 200 and status != 101:
                continue  # interim response; we answered 100-continue ourselves
            break
        headers = _parse_headers(lines)
        keep_alive = parts[0] == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
        if request.method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            framing, length = "none", 0
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            framing, length = "chunked", 0
        elif "content-length" in headers:
            framing, length = "length", int(headers["content-length"])
            if length == 0:
                framing = "none"
        else:
            framing, length, keep_alive = "close", 0, False
        return _Response(status, lines, headers, framing, length, keep_alive)

    def _relay_body(self, response: _Response) -> None:
        sent = 0
        for piece in _response_body_pieces(self.upstream_in, response, raw=True):
            self.client.sendall(piece)
            sent += len(piece)
        if sent:
            self.proxy._count_bytes(to_client=sent)

    def _prepare_body_fault(self, rule: FaultRule, response: _Response) -> tuple[bool, bytes | None]:
        """Whether ``rule`` can break this response's body, and the body if it had to be read.

        A body delimited by Content-Length is left unread (it is streamed
        later, returned as None). A chunked or close-delimited body is read
        whole and the head rewritten with a Content-Length, which the fault
        then breaks; that body is returned so it can be sent either way.
        """
        if not 200 <= response.status < 300 or response.framing == "none":
            return False, None
        buffered: bytes | None = None
        if response.framing != "length":
            buffered = b"".join(_response_body_pieces(self.upstream_in, response, raw=False))
            if not response.keep_alive:
                self._close_upstream()
            response.head_lines = _with_content_length(response.head_lines, len(buffered))
            response.framing, response.length = "length", len(buffered)
        if rule.kind in ("hang", "reset"):
            offset = rule.params["at"]
        elif rule.kind == "truncate":
            offset = rule.params["keep"]
        else:
            offset = None
        applicable = response.length > 0 and (offset is None or offset < response.length)
        return applicable, buffered

    def _send_broken_body(self, rule: FaultRule, response: _Response, buffered: bytes | None) -> bool:
        """Send the head and the broken body; True if the connection may be reused."""
        proxy = self.proxy
        length = response.length
        kind, params = rule.kind, rule.params
        if kind == "truncate":
            limit = params["keep"] if params["keep"] is not None else length // 2
        elif kind in ("hang", "reset"):
            limit = params["at"]
        else:
            limit = length
        flip_at: list[int] = []
        if kind == "flip":
            count = min(params["nbytes"], length)
            flip_at = sorted({(length * (2 * i + 1)) // (2 * count) for i in range(count)})

        self.client.sendall(b"".join(response.head_lines))
        if buffered is None:
            pieces: Iterator[bytes] = _response_body_pieces(self.upstream_in, response, raw=False)
        else:
            pieces = iter([buffered])
        offset = 0
        upstream_drained = True
        for piece in pieces:
            if offset >= limit:
                upstream_drained = False
                break
            if offset + len(piece) > limit:
                piece = piece[: limit - offset]
                upstream_drained = False
            if flip_at:
                piece = _flip(piece, offset, flip_at)
            if kind == "trickle":
                self._trickle(piece, params["piece"], params["delay"])
            else:
                self.client.sendall(piece)
            offset += len(piece)
            proxy._count_bytes(to_client=len(piece))
        if offset < length:
            upstream_drained = False

        if kind in ("flip", "trickle"):
            if not response.keep_alive or not upstream_drained:
                self._close_upstream()
            return response.keep_alive
        self._close_upstream()
        if kind == "truncate":
            # A clean FIN after fewer bytes than Content-Length promised.
            try:
                self.client.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            raise _Abort
        self._break_before_response(rule)
        return False

    def _trickle(self, data: bytes | memoryview, piece: int, delay: float) -> None:
        view = memoryview(data)
        for start in range(0, len(view), piece):
            if start:
                self.proxy._wait(delay)
            self.client.sendall(view[start : start + piece])

    def _break_before_response(self, rule: FaultRule) -> None:
        """Carry out a hang or a reset on the client connection; always ends it."""
        if rule.kind == "hang":
            self.proxy._wait(rule.params["seconds"], client=self.client)
            raise _Abort
        _close_quietly(self.client_in)
        _reset(self.client)
        raise _Abort

    def _send_error(self, request: _Request, kind: str) -> None:
        status, reason, code, message = _ERRORS[kind]
        request_id = uuid.uuid4().hex[:16].upper()
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>{message}</Message>"
            f"<Resource>{_xml_escape(request.path)}</Resource>"
            f"<RequestId>{request_id}</RequestId><HostId>faultproxy</HostId></Error>"
        ).encode()
        head = (
            f"HTTP/1.1 {status} {reason}\r\n"
            f"Content-Type: application/xml\r\n"
            f"Content-Length: {len(body)}\r\n"
            f"x-amz-request-id: {request_id}\r\n"
            f"Date: {email.utils.formatdate(usegmt=True)}\r\n"
            f"Server: faultproxy\r\n\r\n"
        ).encode()
        # A HEAD response never has a body; botocore then classifies by status.
        self.client.sendall(head if request.method == "HEAD" else head + body)


# -- HTTP framing helpers -----------------------------------------------------


def _read_head(stream: Any, *, allow_eof: bool) -> list[bytes] | None:
    """The status/request line and header lines, up to and including the blank line."""
    first = stream.readline(_MAX_HEAD_LINE)
    while first in (b"\r\n", b"\n"):  # stray CRLF between messages is allowed
        first = stream.readline(_MAX_HEAD_LINE)
    if not first:
        if allow_eof:
            return None
        raise _ProtocolError("the store closed the connection without a response")
    lines = [first]
    while True:
        line = stream.readline(_MAX_HEAD_LINE)
        if not line:
            raise _ProtocolError("connection closed inside a header block")
        lines.append(line)
        if line in (b"\r\n", b"\n"):
            return lines
        if len(lines) > _MAX_HEAD_LINES:
            raise _ProtocolError("header block too long")


def _parse_headers(lines: list[bytes]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in lines[1:-1]:
        name, sep, value = line.decode("latin-1").partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return headers


def _with_content_length(lines: list[bytes], length: int) -> list[bytes]:
    kept = [
        line
        for line in lines[1:-1]
        if not line.lower().startswith((b"transfer-encoding:", b"content-length:"))
    ]
    return [lines[0], *kept, f"Content-Length: {length}\r\n".encode(), lines[-1]]


def _request_body_pieces(stream: Any, headers: dict[str, str]) -> Iterator[bytes]:
    """The request body as it came in (chunk framing included, for a verbatim forward)."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        yield from _chunked_pieces(stream, raw=True)
    elif "content-length" in headers:
        yield from _fixed_pieces(stream, int(headers["content-length"]))


def _response_body_pieces(stream: Any, response: _Response, *, raw: bool) -> Iterator[bytes]:
    if response.framing == "length":
        yield from _fixed_pieces(stream, response.length)
    elif response.framing == "chunked":
        yield from _chunked_pieces(stream, raw=raw)
    elif response.framing == "close":
        while piece := stream.read1(_IO_SIZE):
            yield piece


def _fixed_pieces(stream: Any, length: int) -> Iterator[bytes]:
    remaining = length
    while remaining > 0:
        piece = stream.read1(min(remaining, _IO_SIZE))
        if not piece:
            raise _ProtocolError(f"connection closed {remaining} bytes before the end of a body")
        remaining -= len(piece)
        yield piece


def _chunked_pieces(stream: Any, *, raw: bool) -> Iterator[bytes]:
    """A chunked body: its raw bytes (``raw``), or just the decoded data."""
    while True:
        size_line = stream.readline(_MAX_HEAD_LINE)
        if not size_line:
            raise _ProtocolError("connection closed inside a chunked body")
        try:
            size = int(size_line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise _ProtocolError(f"bad chunk size line {size_line[:100]!r}") from None
        if raw:
            yield size_line
        if size == 0:
            while True:  # trailers, then the blank line
                trailer = stream.readline(_MAX_HEAD_LINE)
                if not trailer:
                    raise _ProtocolError("connection closed inside chunked trailers")
                if raw:
                    yield trailer
                if trailer in (b"\r\n", b"\n"):
                    return
        yield from _fixed_pieces(stream, size)
        crlf = stream.readline(_MAX_HEAD_LINE)
        if crlf not in (b"\r\n", b"\n"):
            raise _ProtocolError("chunk not followed by CRLF")
        if raw:
            yield crlf


def _flip(piece: bytes | memoryview, offset: int, positions: list[int]) -> bytes:
    hits = [p - offset for p in positions if offset <= p < offset + len(piece)]
    if not hits:
        return bytes(piece)
    mutable = bytearray(piece)
    for index in hits:
        mutable[index] ^= 0xFF
    return bytes(mutable)


def _xml_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


# -- socket helpers -------------------------------------------------------------


def _peer_closed(sock: socket.socket) -> bool:
    """True if the peer has closed (EOF or error pending) on an otherwise idle socket."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return False
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def _reset(sock: socket.socket) -> None:
    """Close with a TCP RST instead of a FIN: SO_LINGER on, timeout 0."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    _close_quietly(sock)


def _close_quietly(closable: Any) -> None:
    try:
        closable.close()
    except OSError:
        pass


# -- pytest fixture -------------------------------------------------------------


@pytest.fixture
def fault_proxy(s3_server: Any) -> Iterator[FaultProxy]:
    """A fresh FaultProxy in front of the session's ``s3_server``, with no faults set."""
    with FaultProxy(s3_server.endpoint_url) as proxy:
        yield proxy
