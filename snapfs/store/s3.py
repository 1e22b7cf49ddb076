"""A Store on S3 or any S3-compatible server: ``s3://bucket/prefix``.

The only module that imports boto3. It uses nothing beyond plain S3 (GET with
Range, PUT, HEAD, DELETE, ListObjectsV2, conditional PUT), so the same code
serves AWS S3, MinIO, Ceph RGW, Cloudflare R2 and SeaweedFS.

Configuration comes from where boto3 users expect it:

- endpoint: the ``endpoint_url`` argument, else boto3's own lookup
  (``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL``, the config file), else AWS;
- credentials and region: boto3's standard chain (env, profile, instance role);
- ``SNAPFS_S3_CONNECT_TIMEOUT`` (default 5 s), ``SNAPFS_S3_READ_TIMEOUT``
  (default 30 s) and ``SNAPFS_S3_MAX_ATTEMPTS`` (default 5, including the
  first) bound how long one call can block. A mount's worker thread cannot be
  cancelled, so every call must end on its own.

Concurrency: one boto3 client is created per store and shared by all threads
(clients are thread-safe; sessions are not, so the session is used only in
``__init__``). The connection pool holds enough connections for the 64-way
concurrency of prewarm and the mount's fetchers.

``put(if_absent=True)`` first asks HEAD (an existing object is never uploaded
again), then PUTs with ``If-None-Match: *``, which the server checks
atomically: 412 means another writer won. A server that ignores the header
(old MinIO/Ceph releases) degrades to HEAD-then-PUT: content-addressed
objects stay correct (both writers store the same bytes) but two racing
creators of the same *name* could both believe they won.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import random
import re
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, urlsplit
from urllib.request import getproxies, proxy_bypass

import boto3
import botocore.config
import botocore.exceptions
import botocore.httpsession
import botocore.loaders
import botocore.session

from ..errors import NotFoundError, StoreUnavailableError, UsageError
from .base import ObjectInfo, Store
from .http import HTTPPool, Response, host_header

log = logging.getLogger(__name__)

_DEFAULT_CONNECT_TIMEOUT = 5.0
_DEFAULT_READ_TIMEOUT = 30.0
_DEFAULT_MAX_ATTEMPTS = 5
# Prewarm and the mount run up to 64 requests at once; urllib3 would otherwise
# open and drop extra connections (default pool: 10) with a warning each time.
_MAX_POOL_CONNECTIONS = 96
# AWS answers 409 ConditionalRequestConflict while another conditional write
# to the same key is in flight; it resolves in milliseconds.
_CONFLICT_RETRIES = 6
_CONFLICT_CODES = ("ConditionalRequestConflict", "OperationAborted")

_NOT_FOUND_CODES = {"NoSuchKey", "NotFound", "404"}
_DENIED_CODES = {
    "AccessDenied",
    "403",
    "Forbidden",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
}
# Errors in the middle of a streamed body: botocore's retries cover only the
# request up to the response headers, so get() retries these itself.
_STREAM_ERRORS = (
    botocore.exceptions.ResponseStreamingError,
    botocore.exceptions.IncompleteReadError,
    botocore.exceptions.ReadTimeoutError,
    botocore.exceptions.ConnectionClosedError,
)
_BUCKET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_USERINFO_RE = re.compile(r"//[^/@\s]*@")


_loader_lock = threading.Lock()
_shared_loader: botocore.loaders.Loader | None = None


def _new_botocore_session() -> botocore.session.Session:
    """A fresh botocore session that reuses one process-wide model loader.

    A fresh session per store keeps credentials and config independent (a
    session caches them); sharing the loader skips re-parsing botocore's JSON
    service models, which makes each further client ~3x cheaper to create
    (~0.1 s instead of ~0.3 s here). The loader only caches immutable-by-use
    model data, so sharing it across threads at worst loads a file twice.
    """
    global _shared_loader
    with _loader_lock:
        if _shared_loader is None:
            _shared_loader = botocore.loaders.create_loader()
        loader = _shared_loader
    session = botocore.session.get_session()
    session.register_component("data_loader", loader)
    return session


def _env_number(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise UsageError(f"{name}={raw!r} is not a number") from None
    if value <= 0:
        raise UsageError(f"{name}={raw!r} must be positive")
    return value


def _strip_userinfo(text: str) -> str:
    """``text`` (a URL or a message quoting one) without ``user:password@`` parts."""
    return _USERINFO_RE.sub("//", text)


def _error_code(exc: botocore.exceptions.ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _xml_code(body: bytes) -> str:
    """The <Code> of an S3 XML error body, or ''."""
    match = re.search(rb"<Code>([^<]{1,64})</Code>", body or b"")
    return match.group(1).decode("ascii", "replace") if match else ""


def _http_status(exc: botocore.exceptions.ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


_RETRYABLE_STATUS = {429, 500, 502, 503, 504}


_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
# botocore.auth.SIGNED_HEADERS_BLACKLIST: headers proxies may change, never signed.
_UNSIGNED_HEADERS = frozenset(("expect", "transfer-encoding", "user-agent", "x-amzn-trace-id"))


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


class _SigV4:
    """AWS Signature Version 4 headers for one S3 object request without a query
    string: exactly what botocore's S3SigV4Auth adds to the same request (the
    payload's SHA-256 included, as botocore signs it on http and https alike
    when no Content-MD5 is sent). tests/test_store.py checks the two header by
    header, with and without a session token.

    Why not S3SigV4Auth itself: building an AWSRequest for it and signing cost
    about a quarter of a 50 KB GET's client CPU. Measured against SeaweedFS,
    2,000 x 50 KB S3Store.get calls on 8 threads, three rounds each: 1.21-1.36
    ms of client CPU per GET with botocore's signer, 0.86-0.98 ms with this
    one (643-709 against 852-982 objects/s). The signing key is derived once
    a day per secret instead of on every request.
    """

    def __init__(self, base_url: str, region: str) -> None:
        if urlsplit(base_url).query:
            raise ValueError("object URLs with a query string are not signed here")
        self.host = host_header(base_url)  # the one HTTPPool sends
        self.region = region
        self.scope_tail = f"/{region}/s3/aws4_request"
        self._key: tuple[str, str, bytes] | None = None  # (secret, date, signing key)

    def _signing_key(self, secret: str, date: str) -> bytes:
        cached = self._key
        if cached is not None and cached[0] == secret and cached[1] == date:
            return cached[2]
        key = _hmac(("AWS4" + secret).encode(), date)
        for part in (self.region, "s3", "aws4_request"):
            key = _hmac(key, part)
        self._key = (secret, date, key)
        return key

    def sign(
        self,
        method: str,
        path: str,
        headers: dict[str, str] | None,
        body: bytes | None,
        credentials: Any,
        amz_date: str | None = None,
    ) -> dict[str, str]:
        """The request's headers with X-Amz-Date, X-Amz-Content-SHA256, the
        session token if any, and Authorization added. ``path`` is the URL path,
        already quoted; ``credentials`` are frozen botocore credentials."""
        amz_date = amz_date or time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        payload_hash = hashlib.sha256(body).hexdigest() if body else _EMPTY_SHA256
        out = dict(headers) if headers else {}
        out["X-Amz-Date"] = amz_date
        if credentials.token:
            out["X-Amz-Security-Token"] = credentials.token
        out["X-Amz-Content-SHA256"] = payload_hash
        signed = {
            k.lower(): " ".join(v.split()) for k, v in out.items() if k.lower() not in _UNSIGNED_HEADERS
        }
        signed.setdefault("host", self.host)
        names = sorted(signed)
        signed_names = ";".join(names)
        canonical = "\n".join(
            (method, path, "", *(f"{n}:{signed[n]}" for n in names), "", signed_names, payload_hash)
        )
        date = amz_date[:8]
        scope = date + self.scope_tail
        to_sign = f"AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
        signature = hmac.new(
            self._signing_key(credentials.secret_key, date), to_sign.encode(), hashlib.sha256
        ).hexdigest()
        out["Authorization"] = (
            f"AWS4-HMAC-SHA256 Credential={credentials.access_key}/{scope}, "
            f"SignedHeaders={signed_names}, Signature={signature}"
        )
        return out


class _FastRequests:
    """GET and PUT signed by _SigV4 over snapfs.store.http's keep-alive pool.

    Measured here against SeaweedFS on 50 KB objects: boto3's get_object costs
    3.2-3.6 ms of client CPU per request, this path about 0.5 ms over urllib3
    and 0.1-0.2 ms over HTTPPool (whose docstring has the figures, including
    what a slow client costs the server). Small-file reads through the mount
    and pushes of many small files are bound by that cost. What makes S3
    portable still comes from botocore: the URL layout (addressing style,
    region, custom endpoint) is taken once from a presigned URL that botocore
    builds, and the credentials are the session's (refreshed as they expire:
    instance roles, STS). Signing is _SigV4, checked against botocore's
    S3SigV4Auth in the tests.
    Set SNAPFS_S3_FAST_GET=0 to use boto3's get_object and put_object; they
    are also used when an HTTP proxy is configured for the endpoint.
    """

    def __init__(
        self, client: Any, credentials: Any, bucket: str, connect_timeout: float, read_timeout: float
    ) -> None:
        probe_key = "snapfs-probe"
        probe = client.generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": probe_key}, ExpiresIn=60
        )
        parts = urlsplit(probe)
        if not parts.path.endswith("/" + probe_key):
            raise ValueError(f"unexpected presigned URL layout: {parts.path}")
        if parts.scheme in getproxies() and not proxy_bypass(parts.hostname or ""):
            # botocore sends through the proxy (HTTP(S)_PROXY); so must every request.
            raise ValueError(f"a proxy is configured for {parts.scheme}")
        self.base = f"{parts.scheme}://{parts.netloc}{parts.path[: -len(probe_key)]}"
        self.base_path = parts.path[: -len(probe_key)]
        self.region = client.meta.region_name or "us-east-1"
        self.signer = _SigV4(self.base, self.region)
        self.credentials = credentials  # botocore Credentials: refreshable ones refresh themselves
        if self.credentials is None:
            raise botocore.exceptions.NoCredentialsError()
        self.pool = HTTPPool(
            self.base,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_idle=_MAX_POOL_CONNECTIONS,
            ca_file=os.environ.get("AWS_CA_BUNDLE") or botocore.httpsession.DEFAULT_CA_BUNDLE,
        )

    def request(
        self, method: str, object_key: str, headers: dict[str, str] | None = None, body: bytes | None = None
    ) -> Response:
        path = self.base_path + quote(object_key, safe="/~")
        if body is not None and not isinstance(body, bytes):
            body = bytes(body)  # signed and sent whole
        signed = self.signer.sign(method, path, headers, body, self.credentials.get_frozen_credentials())
        return self.pool.request(method, path, signed, body)


class S3Store(Store):
    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self._key_prefix = self.prefix + "/" if self.prefix else ""
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"

        self._max_attempts = int(_env_number("SNAPFS_S3_MAX_ATTEMPTS", _DEFAULT_MAX_ATTEMPTS))
        custom_endpoint = (
            endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        )
        config = botocore.config.Config(
            connect_timeout=_env_number("SNAPFS_S3_CONNECT_TIMEOUT", _DEFAULT_CONNECT_TIMEOUT),
            read_timeout=_env_number("SNAPFS_S3_READ_TIMEOUT", _DEFAULT_READ_TIMEOUT),
            retries={
                "mode": "standard",
                "max_attempts": self._max_attempts,
            },
            max_pool_connections=_MAX_POOL_CONNECTIONS,
            tcp_keepalive=True,
            # Objects are verified by BLAKE3 one layer up. botocore >= 1.36
            # adds CRC checksums to every PUT by default, which several
            # S3-compatible servers reject; ask for them only where S3 requires.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            # A self-hosted endpoint (MinIO, Ceph, SeaweedFS, a LAN hostname)
            # rarely has wildcard DNS for bucket.host; AWS keeps its default.
            s3={"addressing_style": "path"} if custom_endpoint else None,
        )
        try:
            session = boto3.session.Session(botocore_session=_new_botocore_session())
            # endpoint_url=None lets boto3 apply its own lookup (env, config file).
            self._client: Any = session.client("s3", endpoint_url=endpoint_url or None, config=config)
        except ValueError as exc:  # a malformed endpoint URL; botocore quotes it
            raise UsageError(f"cannot set up S3 client for {self.url}: {_strip_userinfo(str(exc))}") from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise StoreUnavailableError(
                f"cannot set up S3 client for {self.url}: {_strip_userinfo(str(exc))}"
            ) from exc
        #: Where requests go, without credentials, for messages.
        self.endpoint_url = _strip_userinfo(self._client.meta.endpoint_url)
        self._fast: _FastRequests | None = None
        if os.environ.get("SNAPFS_S3_FAST_GET", "1") != "0":
            try:
                self._fast = _FastRequests(
                    self._client,
                    session.get_credentials(),
                    bucket,
                    _env_number("SNAPFS_S3_CONNECT_TIMEOUT", _DEFAULT_CONNECT_TIMEOUT),
                    _env_number("SNAPFS_S3_READ_TIMEOUT", _DEFAULT_READ_TIMEOUT),
                )
            except (ValueError, AttributeError, botocore.exceptions.BotoCoreError) as exc:
                log.debug(
                    "fast request path unavailable for %s (%s); using boto3", self.url, type(exc).__name__
                )
        log.debug("opened %s at %s", self.url, self.endpoint_url)

    @classmethod
    def from_url(cls, url: str, *, endpoint_url: str | None = None) -> S3Store:
        """Open ``s3://bucket`` or ``s3://bucket/some/prefix``."""
        if not url.startswith("s3://"):
            raise UsageError(f"not an S3 store URL: {_strip_userinfo(url)!r} (expected s3://BUCKET/PREFIX)")
        rest = url[len("s3://") :]
        bucket, _, prefix = rest.partition("/")
        if "@" in bucket:
            # Never echo the URL: the part before '@' is probably a secret.
            raise UsageError(
                "credentials do not belong in an s3:// URL; use AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile"
            )
        if not bucket:
            raise UsageError(f"S3 store URL has no bucket: {url!r} (expected s3://BUCKET/PREFIX)")
        if not _BUCKET_RE.match(bucket):
            raise UsageError(f"invalid S3 bucket name {bucket!r} in {url!r}")
        if "?" in prefix or "#" in prefix or any(part in (".", "..") for part in prefix.split("/")):
            raise UsageError(f"invalid prefix in S3 store URL {url!r}")
        if "//" in prefix.strip("/"):
            raise UsageError(f"empty path component in S3 store URL {url!r}")
        return cls(bucket, prefix, endpoint_url=endpoint_url)

    # -- helpers -----------------------------------------------------------

    def _object_key(self, key: str) -> str:
        # Same rules as LocalStore, so a key valid on one backend is valid on all.
        if not key or key.startswith("/") or any(p in ("", ".", "..") for p in key.split("/")):
            raise UsageError(f"invalid store key {key!r}")
        return self._key_prefix + key

    def _where(self) -> str:
        return f"{self.url} (endpoint {self.endpoint_url})"

    def _translate(self, exc: Exception, key: str, action: str) -> Exception:
        """One snapfs exception, with one line naming the key and the store, for ``exc``."""
        if isinstance(exc, botocore.exceptions.ClientError):
            code = _error_code(exc)
            status = _http_status(exc)
            if code in _NOT_FOUND_CODES:
                return NotFoundError(f"{key}: not in store {self.url}")
            if code == "NoSuchBucket":
                return StoreUnavailableError(
                    f"{key}: bucket {self.bucket!r} does not exist at {self.endpoint_url}"
                )
            if code in _DENIED_CODES:
                return StoreUnavailableError(
                    f"{key}: cannot {action} {self._where()}: access denied ({code}); check the S3 credentials"
                )
            message = exc.response.get("Error", {}).get("Message") or ""
            detail = f"{code or 'HTTP ' + str(status)}" + (f": {message}" if message else "")
            return StoreUnavailableError(f"{key}: cannot {action} {self._where()}: {detail}")
        if isinstance(
            exc, botocore.exceptions.NoCredentialsError | botocore.exceptions.PartialCredentialsError
        ):
            return StoreUnavailableError(
                f"{key}: no usable S3 credentials for {self.url} "
                "(set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or an instance role)"
            )
        if isinstance(exc, botocore.exceptions.ParamValidationError):
            return UsageError(f"{key}: invalid S3 request for {self.url}: {exc}")
        if isinstance(exc, botocore.exceptions.ConnectionError):
            return StoreUnavailableError(
                f"{key}: cannot reach {self._where()} after {self._max_attempts} attempts: {type(exc).__name__}"
            )
        if isinstance(exc, botocore.exceptions.HTTPClientError | botocore.exceptions.IncompleteReadError):
            return StoreUnavailableError(
                f"{key}: connection to {self._where()} broke off, {self._max_attempts} attempts: "
                f"{type(exc).__name__}"
            )
        return StoreUnavailableError(f"{key}: cannot {action} {self._where()}: {exc}")

    # -- Store interface -------------------------------------------------------

    def get(self, key: str, start: int = 0, length: int | None = None) -> bytes:
        object_key = self._object_key(key)
        if start < 0 or (length is not None and length < 0):
            raise UsageError(f"{key}: invalid range start={start} length={length}")
        if length == 0:
            # An empty Range is not expressible in HTTP; still report a missing key.
            self.stat(key)
            return b""
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": object_key}
        if length is not None:
            params["Range"] = f"bytes={start}-{start + length - 1}"
        elif start:
            params["Range"] = f"bytes={start}-"
        if self._fast is not None:
            return self._fast_get(key, object_key, params.get("Range"))
        for attempt in range(1, self._max_attempts + 1):
            # botocore retries the request up to the response headers; an
            # error in the middle of the body is retried here, by a new request.
            try:
                response = self._client.get_object(**params)
            except botocore.exceptions.ClientError as exc:
                if _error_code(exc) == "InvalidRange":
                    # The range starts at or past the end: the local store
                    # returns b"" for that, and so does this one.
                    return b""
                raise self._translate(exc, key, "read from") from exc
            except botocore.exceptions.BotoCoreError as exc:
                raise self._translate(exc, key, "read from") from exc
            # Not `with body`: StreamingBody.__enter__ hands out the raw urllib3
            # stream, whose read() skips botocore's length check and error mapping.
            body = response["Body"]
            try:
                return body.read()
            except _STREAM_ERRORS as exc:
                if attempt == self._max_attempts:
                    raise self._translate(exc, key, "read from") from exc
                log.warning(
                    "%s: read from %s broke off (%s); retrying (%d/%d)",
                    key,
                    self.url,
                    type(exc).__name__,
                    attempt,
                    self._max_attempts,
                )
                time.sleep(min(0.05 * 2**attempt, 2.0))
            finally:
                body.close()
        raise AssertionError("unreachable")  # the loop returns or raises

    def _fast_request(
        self,
        key: str,
        action: str,
        method: str,
        object_key: str,
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
    ) -> Response:
        """One request over _FastRequests, retried like botocore's standard mode
        (connection errors, 429 and 5xx), with its errors mapped to one line.
        Returns the first response that is not worth retrying; the caller reads
        its status. Only for idempotent requests: GET, and PUT of
        content-addressed or conditional objects."""
        detail = ""
        for attempt in range(1, self._max_attempts + 1):
            try:
                response = self._fast.request(method, object_key, headers, body)  # type: ignore[union-attr]
            except OSError as exc:
                # Refused, reset, timed out, or a body shorter than its
                # Content-Length (HTTPPool checks it): all worth a new request.
                detail = type(exc).__name__
            else:
                status = response.status
                if status < 300 or status in (304, 404, 409, 412, 416):
                    return response
                code = _xml_code(response.data)
                if status in (401, 403):
                    raise StoreUnavailableError(
                        f"{key}: cannot {action} {self._where()}: access denied ({code or status}); "
                        "check the S3 credentials"
                    )
                if status not in _RETRYABLE_STATUS:
                    raise StoreUnavailableError(
                        f"{key}: cannot {action} {self._where()}: HTTP {status} {code}"
                    )
                detail = f"HTTP {status} {code}".strip()
            if attempt < self._max_attempts:
                log.info(
                    "%s: %s on %s failed (%s); retrying (%d/%d)",
                    key,
                    method,
                    self.url,
                    detail,
                    attempt,
                    self._max_attempts,
                )
                # Exponential backoff with full jitter, as botocore's standard mode does.
                time.sleep(random.uniform(0, min(0.1 * 2**attempt, 5.0)))
        raise StoreUnavailableError(
            f"{key}: cannot {action} {self._where()} after {self._max_attempts} attempts: {detail}"
        )

    def _no_bucket(self, key: str, response: Response) -> StoreUnavailableError | None:
        if _xml_code(response.data) == "NoSuchBucket":
            return StoreUnavailableError(
                f"{key}: bucket {self.bucket!r} does not exist at {self.endpoint_url}"
            )
        return None

    def _fast_get(self, key: str, object_key: str, range_header: str | None) -> bytes:
        """get() over _FastRequests, with the same retry budget and error mapping."""
        headers = {"Range": range_header} if range_header else None
        response = self._fast_request(key, "read from", "GET", object_key, headers)
        status = response.status
        if status in (200, 206):
            return response.data
        if status == 416:
            return b""
        if status == 404:
            raise self._no_bucket(key, response) or NotFoundError(f"{key}: not in store {self.url}")
        raise StoreUnavailableError(
            f"{key}: cannot read from {self._where()}: HTTP {status} {_xml_code(response.data)}"
        )

    def _fast_put_once(self, key: str, object_key: str, data: bytes, if_absent: bool) -> bool | None:
        """One PUT over _FastRequests (retried inside for transport errors): True if
        stored, False if If-None-Match found the key there, None on a conditional
        write conflict worth another try."""
        headers = {"If-None-Match": "*"} if if_absent else None
        response = self._fast_request(key, "write to", "PUT", object_key, headers, data)
        status = response.status
        if 200 <= status < 300:
            return True
        if status == 412 and if_absent:
            return False
        code = _xml_code(response.data)
        if status == 409 and if_absent and code in _CONFLICT_CODES:
            return None
        if status == 404:
            raise self._no_bucket(key, response) or StoreUnavailableError(
                f"{key}: cannot write to {self._where()}: HTTP 404 {code}"
            )
        raise StoreUnavailableError(f"{key}: cannot write to {self._where()}: HTTP {status} {code}")

    def _boto3_put_once(self, key: str, object_key: str, data: bytes, if_absent: bool) -> bool | None:
        """One put_object; the same answers as _fast_put_once."""
        condition = {"IfNoneMatch": "*"} if if_absent else {}
        try:
            self._client.put_object(Bucket=self.bucket, Key=object_key, Body=data, **condition)
            return True
        except botocore.exceptions.ClientError as exc:
            code, status = _error_code(exc), _http_status(exc)
            if if_absent and (status == 412 or code == "PreconditionFailed"):
                return False
            if if_absent and status == 409 and code in _CONFLICT_CODES:
                return None
            raise self._translate(exc, key, "write to") from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise self._translate(exc, key, "write to") from exc

    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        object_key = self._object_key(key)
        # Skip the upload of an object that is already there (the common case
        # when pushing a new version) and cover servers without If-None-Match.
        if if_absent and self.exists(key):
            return False
        put_once = self._fast_put_once if self._fast is not None else self._boto3_put_once
        for conflict in range(_CONFLICT_RETRIES):
            stored = put_once(key, object_key, data, if_absent)
            if stored is not None:
                return stored
            log.debug("%s: conditional write conflict on %s; retrying", key, self.url)
            time.sleep(0.02 * 2**conflict)
        # Still contended: whoever holds the key now, it is not us.
        if self.exists(key):
            return False
        raise StoreUnavailableError(
            f"{key}: conditional write to {self._where()} kept conflicting; try again"
        )

    def exists(self, key: str) -> bool:
        try:
            self.stat(key)
        except NotFoundError:
            return False
        return True

    def stat(self, key: str) -> ObjectInfo:
        object_key = self._object_key(key)
        try:
            head = self._client.head_object(Bucket=self.bucket, Key=object_key)
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            raise self._translate(exc, key, "stat on") from exc
        return ObjectInfo(key, int(head["ContentLength"]), head["LastModified"].timestamp())

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        paginator = self._client.get_paginator("list_objects_v2")
        pages = paginator.paginate(Bucket=self.bucket, Prefix=self._key_prefix + prefix)
        strip = len(self._key_prefix)
        try:
            for page in pages:
                for entry in page.get("Contents", ()):
                    object_key: str = entry["Key"]
                    # Folder markers ("dir/") made by consoles and some tools are
                    # not objects of ours, and not valid keys.
                    if object_key.endswith("/"):
                        continue
                    yield ObjectInfo(
                        object_key[strip:], int(entry["Size"]), entry["LastModified"].timestamp()
                    )
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            raise self._translate(exc, prefix or "(all keys)", "list") from exc

    def delete(self, key: str) -> None:
        object_key = self._object_key(key)
        try:
            self._client.delete_object(Bucket=self.bucket, Key=object_key)
        except botocore.exceptions.ClientError as exc:
            if _error_code(exc) in _NOT_FOUND_CODES:
                return
            raise self._translate(exc, key, "delete from") from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise self._translate(exc, key, "delete from") from exc

    def close(self) -> None:
        if self._fast is not None:
            self._fast.pool.close()
        self._client.close()
