"""Records, names, tags and lineage: the metadata that points at snapshots.

Nothing here changes a snapshot's ID; everything lives in the store next to
the objects (docs/RECORDS.md is the specification):

    records/<record-id>            immutable JSON record; its ID is the BLAKE3 of
                                   its canonical encoding (format.encode_record)
    names/<name>                   create-once pointer {record, snapshot, time}
    tags/<tag>/<snapshot-id>       one key per (tag, snapshot): a mutable label
    forgotten/<record-id>          tombstone: the record no longer claims its data

Writes go bottom-up: objects and the snapshot marker (snapshot.upload), then
the record, then the name, then tags, so a visible name never points at a
missing record or missing content. Record and name writes happen under a push
lock (snapfs.locks), so a concurrent forget + gc cannot collect the snapshot
between its marker check and the record that claims it.

Context capture (git, environment, command line, metadata) scrubs secrets
before anything is stored: credentials in remote URLs, secret-looking
arguments and well-known token formats never reach a record.

Every function is synchronous and safe from any thread; parallel reads use a
small thread pool of their own.
"""

from __future__ import annotations

import getpass
import importlib.metadata
import json
import logging
import os
import platform
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from . import format as fmt
from .errors import (
    AlreadyExistsError,
    AmbiguousRefError,
    FormatError,
    IntegrityError,
    NotFoundError,
    SnapfsError,
    UsageError,
)
from .hashing import hash_bytes, is_object_id
from .locks import MaintenanceLock, PushLock
from .repo import MIN_PREFIX, Repo

log = logging.getLogger(__name__)

NAME_PREFIX = "names/"
RECORD_PREFIX = "records/"
TAG_PREFIX = "tags/"
FORGOTTEN_PREFIX = "forgotten/"
NAME_FORMAT = "snapfs-name/1"
FORGOTTEN_FORMAT = "snapfs-forgotten/1"
LATEST = "latest"
REDACTED = "<redacted>"

_READ_JOBS = 16
_MAX_NAME_LEN = 128
_PART = r"[A-Za-z0-9][A-Za-z0-9._+-]*"
_NAME_RE = re.compile(rf"^(?P<series>{_PART})(?:@(?P<version>{_PART}))?$")
_TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")
_META_KEY_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
# Names that could be read as an ID prefix are refused, so a REF never has two meanings.
_HEXISH_RE = re.compile(r"^[0-9a-fA-F]{8,}$")
_HEX_RE = re.compile(r"^[0-9a-f]+$")


# --- names and tags -----------------------------------------------------------


def validate_name(name: str) -> tuple[str | None, str | None]:
    """Check a snapshot name; returns (series, version), both None for a plain name.

    A name is ``[A-Za-z0-9][A-Za-z0-9._+-]*``, optionally ``SERIES@VERSION`` with
    both parts of that form, at most 128 characters. Refused: ``@latest`` (it
    is a moving reference), and names of 8+ hex digits (they read as ID prefixes).
    """
    if not isinstance(name, str) or not name:
        raise UsageError("a snapshot name cannot be empty")
    if len(name) > _MAX_NAME_LEN:
        raise UsageError(f"name {name[:40]!r}... is longer than {_MAX_NAME_LEN} characters")
    match = _NAME_RE.match(name)
    if not match:
        raise UsageError(
            f"invalid name {name!r}: use letters, digits and . _ + - (starting with a letter or digit), "
            "optionally SERIES@VERSION, e.g. imagenet@1.2.0"
        )
    if _HEXISH_RE.match(name):
        raise UsageError(f"invalid name {name!r}: it would read as a snapshot ID prefix; add a letter")
    version = match.group("version")
    if version is not None and version.lower() == LATEST:
        raise UsageError(f"invalid name {name!r}: '@latest' always means the newest version of a series")
    if version is None:
        return None, None
    return match.group("series"), version


def series_of(name: str | None) -> str | None:
    if not name or "@" not in name:
        return None
    return name.split("@", 1)[0]


def validate_tag(tag: str) -> str:
    if not isinstance(tag, str) or not _TAG_RE.match(tag):
        raise UsageError(
            f"invalid tag {tag!r}: use up to 64 letters, digits and . _ + - (starting with a letter or digit)"
        )
    return tag


def version_key(version: str) -> tuple:
    """Natural order for versions: 1.10.0 after 1.9.0; numbers before words in each position."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.findall(r"\d+|[^\d]+", version))


# --- secret scrubbing ----------------------------------------------------------

_SECRET_WORDS = {
    "password",
    "passwd",
    "passphrase",
    "pwd",
    "secret",
    "secrets",
    "token",
    "apikey",
    "credential",
    "credentials",
    "auth",
    "authorization",
    "cookie",
    "bearer",
    "signature",
    "privatekey",
    "accesskey",
    "secretkey",
}
# "<qualifier> key" pairs: api key, access key, private key...
_KEY_QUALIFIERS = {"api", "access", "secret", "private", "ssh", "signing", "encryption", "client", "master"}
# Well-known token formats, redacted wherever they appear (argv, URLs, metadata).
_TOKEN_RE = re.compile(
    r"(?:gh[pousr]_[A-Za-z0-9]{16,}|github_pat_[A-Za-z0-9_]{20,}|glpat-[A-Za-z0-9_-]{16,}"
    r"|xox[abposr]-[A-Za-z0-9-]{10,}|(?:AKIA|ASIA)[0-9A-Z]{16}|hf_[A-Za-z0-9]{20,}"
    r"|sk-[A-Za-z0-9_-]{20,}|npm_[A-Za-z0-9]{30,}|pypi-[A-Za-z0-9_-]{30,}"
    r"|eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,})"
)
# A user name kept in a remote URL: the conventional account of git hosting,
# which is no secret and which ssh needs. Anything else in userinfo is dropped.
_SAFE_URL_USERS = {"git"}
_URL_IN_TEXT_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s\"'<>]+")


def _words(name: str) -> list[str]:
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", name)
    return [w for w in re.split(r"[^A-Za-z0-9]+", spaced.lower()) if w]


def is_secret_name(name: str) -> bool:
    """True for option and key names that usually carry secrets (token, api_key, DB_PASSWORD...).

    Whole words only: ``max_tokens`` and ``author`` are not secrets.
    """
    words = _words(name)
    if any(w in _SECRET_WORDS for w in words):
        return True
    return any(a in _KEY_QUALIFIERS and b in ("key", "keys") for a, b in zip(words, words[1:], strict=False))


def redact_tokens(text: str) -> str:
    """Replace well-known token formats and credentials in any URL inside ``text``."""
    text = _URL_IN_TEXT_RE.sub(lambda m: sanitize_url(m.group(0)), text)
    return _TOKEN_RE.sub(REDACTED, text)


def sanitize_url(url: str) -> str:
    """A remote URL with every credential removed, for any scheme and for scp-style remotes.

    Removed: userinfo (user and password; only the conventional ``git`` user is
    kept, without a password), the whole query string and the fragment (git
    needs neither, and a rule keeping "harmless" parameters is one new
    parameter name away from a leak), and well-known token formats anywhere.
    """
    url = url.strip()
    if "://" in url:
        try:
            parts = urlsplit(url)
            userinfo, at, hostport = parts.netloc.rpartition("@")
            netloc = (userinfo + "@" if at and userinfo in _SAFE_URL_USERS else "") + hostport
            cleaned = urlunsplit((parts.scheme, netloc, parts.path, "", ""))
        except ValueError:
            return "<redacted: unparseable URL>"
        return _TOKEN_RE.sub(REDACTED, cleaned)
    # scp-style [user[:password]@]host:path (git's rule: a ':' before the first '/').
    head, slash, tail = url.partition("/")
    if "@" in head or (":" in head and not url.startswith("/")):
        userinfo, at, hostpart = head.rpartition("@")
        kept = userinfo + "@" if at and userinfo in _SAFE_URL_USERS else ""
        url = kept + hostpart + slash + tail
        url = re.split(r"[?#]", url, maxsplit=1)[0]
    return _TOKEN_RE.sub(REDACTED, url)


def redact_argv(argv: Sequence[str]) -> list[str]:
    """The command line with secret-looking arguments replaced by <redacted>.

    ``--token X``, ``--api-key=X``, ``DB_PASSWORD=X``, credentials in URLs and
    well-known token formats anywhere. Errs on the side of redacting: the
    argument after any secret-named option is redacted even if it was a flag.
    """
    out: list[str] = []
    redact_next = False
    for arg in argv:
        arg = str(arg)
        if redact_next:
            redact_next = False
            if not arg.startswith("-"):
                out.append(REDACTED)
                continue
        if arg.startswith("-") and len(arg) > 1:
            option, eq, value = arg.partition("=")
            if is_secret_name(option.lstrip("-")):
                if eq:
                    out.append(f"{option}={REDACTED}")
                else:
                    out.append(option)
                    redact_next = True
                continue
            out.append(f"{option}={_redact_value(value)}" if eq else redact_tokens(arg))
            continue
        out.append(_redact_value(arg))
    return out


def _redact_value(value: str) -> str:
    key, eq, rest = value.partition("=")
    if eq and _META_KEY_RE.match(key) and is_secret_name(key):
        return f"{key}={REDACTED}"
    return redact_tokens(value)


def redact_meta(meta: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """User metadata with secret-named keys and token-looking values redacted; also the redacted keys."""
    out: dict[str, Any] = {}
    redacted: list[str] = []
    for key, value in meta.items():
        if is_secret_name(key):
            out[key] = REDACTED
            redacted.append(key)
        elif isinstance(value, str):
            clean = redact_tokens(value)
            if clean != value:
                redacted.append(key)
            out[key] = clean
        else:
            out[key] = value
    return out, redacted


def parse_meta_value(text: str) -> Any:
    """'0.89' -> 0.89, '12' -> 12, 'true' -> True; anything else stays a string ('007' too)."""
    if text in ("true", "false") or re.fullmatch(r"-?(0|[1-9]\d*)(\.\d+)?([eE][+-]?\d+)?", text):
        value = json.loads(text)
        if isinstance(value, float) and value in (float("inf"), float("-inf")):
            return text
        return value
    return text


def parse_meta(items: Iterable[str]) -> dict[str, Any]:
    """``["accuracy=0.89", "split=train"]`` -> ``{"accuracy": 0.89, "split": "train"}``."""
    meta: dict[str, Any] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq:
            raise UsageError(f"--meta {item!r}: expected KEY=VALUE, e.g. accuracy=0.89")
        check_meta_key(key)
        if key in meta:
            raise UsageError(f"--meta {key} given twice")
        meta[key] = parse_meta_value(value)
    return meta


def check_meta_key(key: str) -> None:
    if not isinstance(key, str) or not _META_KEY_RE.match(key):
        raise UsageError(f"invalid metadata key {key!r}: use up to 128 letters, digits and _ . -")


# --- context capture ---------------------------------------------------------------


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def current_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


def _git(cwd: str, *args: str) -> str | None:
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "LC_ALL": "C", "GIT_OPTIONAL_LOCKS": "0"}
    try:
        done = subprocess.run(
            ["git", "-C", cwd, *args], capture_output=True, text=True, timeout=30, env=env, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.debug("git %s in %s failed: %s", " ".join(args), cwd, exc)
        return None
    if done.returncode != 0:
        return None
    return done.stdout.rstrip("\n")


@dataclass
class GitState:
    """The git work tree around a directory, as preflight and records need it."""

    top: str
    commit: str | None
    branch: str | None
    dirty_paths: list[str]
    untracked_paths: list[str]
    remote_name: str | None
    remote_url: str | None  # raw, may hold credentials: never store or print it
    subdir: str

    @property
    def dirty(self) -> bool:
        return bool(self.dirty_paths or self.untracked_paths)

    def as_record(self) -> dict[str, Any]:
        """What a record stores: no file names (they can be sensitive), no credentials."""
        return {
            "commit": self.commit,
            "branch": self.branch,
            "dirty": self.dirty,
            "remote": sanitize_url(self.remote_url) if self.remote_url else None,
            "remote_name": self.remote_name,
            "subdir": self.subdir,
        }


def git_state(cwd: str = ".") -> GitState | None:
    """The git state of the work tree containing ``cwd``; None outside a work tree or without git."""
    top = _git(cwd, "rev-parse", "--show-toplevel")
    if not top:
        return None
    commit = _git(cwd, "rev-parse", "--verify", "-q", "HEAD")
    branch = _git(cwd, "symbolic-ref", "--short", "-q", "HEAD")
    status = _git(cwd, "status", "--porcelain=v1", "-z", "--untracked-files=normal") or ""
    dirty: list[str] = []
    untracked: list[str] = []
    fields = status.split("\0")
    i = 0
    while i < len(fields):
        item = fields[i]
        i += 1
        if len(item) < 4:
            continue
        code, path = item[:2], item[3:]
        if code == "??":
            untracked.append(path)
        else:
            dirty.append(path)
            if "R" in code or "C" in code:
                i += 1  # the rename's source path follows
    remote_name = None
    upstream = _git(cwd, "rev-parse", "--abbrev-ref", "--symbolic-full-name", "@{upstream}")
    remotes = (_git(cwd, "remote") or "").split()
    if upstream and "/" in upstream and upstream.split("/", 1)[0] in remotes:
        remote_name = upstream.split("/", 1)[0]
    elif "origin" in remotes:
        remote_name = "origin"
    elif remotes:
        remote_name = remotes[0]
    remote_url = _git(cwd, "config", "--get", f"remote.{remote_name}.url") if remote_name else None
    subdir = (_git(cwd, "rev-parse", "--show-prefix") or "").rstrip("/")
    return GitState(top, commit, branch, dirty, untracked, remote_name, remote_url, subdir)


def capture_env() -> dict[str, Any]:
    """Python version, platform and installed distributions with their versions."""
    packages: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        try:
            name = dist.metadata["Name"]
        except (KeyError, OSError):
            continue
        if name:
            packages[re.sub(r"[-_.]+", "-", name).lower()] = dist.version
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "packages": dict(sorted(packages.items())),
    }


def capture_context(
    *, git: bool = True, env: bool = True, argv: Sequence[str] | None = None, cwd: str = "."
) -> dict[str, Any]:
    """The context fields of a record: time, user, host, git, env and the redacted command line."""
    from . import __version__

    state = git_state(cwd) if git else None
    return {
        "time": _now(),
        "user": current_user(),
        "host": socket.gethostname(),
        "git": state.as_record() if state else None,
        "env": capture_env() if env else None,
        "command": redact_argv(sys.argv if argv is None else argv),
        "snapfs": __version__,
    }


# --- records --------------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    """An immutable record as stored: ``id`` is the BLAKE3 of its canonical encoding."""

    id: str
    data: dict[str, Any]

    @property
    def snapshot(self) -> str:
        return self.data["snapshot"]

    @property
    def name(self) -> str | None:
        return self.data.get("name")

    @property
    def time(self) -> str:
        return self.data.get("time") or ""

    @property
    def series(self) -> str | None:
        return series_of(self.name)

    def sort_key(self) -> tuple:
        """Newest last: record time, then natural version order, then record ID (deterministic)."""
        version = self.name.split("@", 1)[1] if self.name and "@" in self.name else ""
        return (self.time, version_key(version), self.id)


@dataclass(frozen=True)
class NameEntry:
    name: str
    record: str
    snapshot: str
    time: str

    def sort_key(self) -> tuple:
        """The rule for ``SERIES@latest``: greatest record time, then version, then record ID."""
        version = self.name.split("@", 1)[1] if "@" in self.name else ""
        return (self.time, version_key(version), self.record)


_cache_lock = threading.Lock()
_record_cache: dict[tuple[str, str], Record] = {}
_CACHE_MAX = 4096


def _pool_map(func: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
    if len(items) <= 1:
        return [func(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(_READ_JOBS, len(items)), thread_name_prefix="snapfs-rec") as pool:
        return list(pool.map(func, items))


def read_record(repo: Repo, record_id: str) -> Record:
    """Fetch, verify and decode a record (records are immutable, so they are cached)."""
    cache_key = (repo.url, record_id)
    with _cache_lock:
        cached = _record_cache.get(cache_key)
    if cached is not None:
        return cached
    data = repo.store.get(fmt.record_key(record_id))
    actual = hash_bytes(data)
    if actual != record_id:
        raise IntegrityError(f"record {record_id} in {repo.url} is corrupt: its bytes hash to {actual}")
    decoded = fmt.decode_record(data, f"record {record_id}")
    if not is_object_id(str(decoded.get("snapshot", ""))):
        raise FormatError(f"record {record_id}: no valid snapshot ID")
    record = Record(record_id, decoded)
    with _cache_lock:
        if len(_record_cache) >= _CACHE_MAX:
            _record_cache.clear()
        _record_cache[cache_key] = record
    return record


def has_record(repo: Repo, record_id: str) -> bool:
    return repo.store.exists(fmt.record_key(record_id))


def write_record(repo: Repo, data: dict[str, Any]) -> Record:
    blob = fmt.encode_record(data)
    record_id = hash_bytes(blob)
    repo.store.put(fmt.record_key(record_id), blob, if_absent=True)
    return Record(record_id, fmt.decode_record(blob))


def record_ids(repo: Repo, prefix: str = "") -> list[str]:
    ids = []
    for info in repo.store.list(RECORD_PREFIX + prefix):
        record_id = info.key[len(RECORD_PREFIX) :]
        if is_object_id(record_id):
            ids.append(record_id)
    return ids


def all_records(repo: Repo) -> list[Record]:
    """Every readable record, oldest first. Unreadable ones are logged and skipped."""

    def load(record_id: str) -> Record | None:
        try:
            return read_record(repo, record_id)
        except (NotFoundError, IntegrityError) as exc:
            log.warning("skipping record %s: %s", record_id, exc)
            return None

    records = [r for r in _pool_map(load, record_ids(repo)) if r is not None]
    return sorted(records, key=Record.sort_key)


def forgotten(repo: Repo) -> dict[str, dict[str, Any]]:
    """Tombstones by record ID: {record_id: {name, snapshot, time, user, host}}."""
    keys = [
        info.key[len(FORGOTTEN_PREFIX) :]
        for info in repo.store.list(FORGOTTEN_PREFIX)
        if is_object_id(info.key[len(FORGOTTEN_PREFIX) :])
    ]

    def load(record_id: str) -> tuple[str, dict[str, Any]]:
        try:
            return record_id, json.loads(repo.store.get(FORGOTTEN_PREFIX + record_id))
        except (NotFoundError, ValueError):
            return record_id, {}

    return dict(_pool_map(load, keys))


def is_forgotten(repo: Repo, record_id: str) -> bool:
    return repo.store.exists(FORGOTTEN_PREFIX + record_id)


def live_records(repo: Repo) -> list[Record]:
    gone = forgotten(repo)
    return [r for r in all_records(repo) if r.id not in gone]


# --- names ---------------------------------------------------------------------------


def _decode_name(name: str, raw: bytes) -> NameEntry:
    try:
        data = json.loads(raw)
        entry = NameEntry(name, data["record"], data["snapshot"], data.get("time", ""))
    except (ValueError, KeyError, TypeError) as exc:
        raise FormatError(f"name {name}: malformed name object") from exc
    if data.get("format") != NAME_FORMAT or data.get("name") != name:
        raise FormatError(f"name {name}: unknown format or a name object copied from another name")
    if not (is_object_id(entry.record) and is_object_id(entry.snapshot)):
        raise FormatError(f"name {name}: invalid IDs in the name object")
    return entry


def read_name(repo: Repo, name: str) -> NameEntry | None:
    """The name's pointer, or None if the name was never created (forgotten names still return)."""
    try:
        raw = repo.store.get(NAME_PREFIX + name)
    except NotFoundError:
        return None
    return _decode_name(name, raw)


def name_keys(repo: Repo, prefix: str = "") -> list[str]:
    names = []
    for info in repo.store.list(NAME_PREFIX + prefix):
        name = info.key[len(NAME_PREFIX) :]
        if _NAME_RE.match(name):
            names.append(name)
    return sorted(names)


def name_entries(repo: Repo, prefix: str = "", *, include_forgotten: bool = False) -> list[NameEntry]:
    """Every name under ``prefix`` with its pointer (one LIST, one GET per name)."""
    names = name_keys(repo, prefix)
    gone = set() if include_forgotten else set(forgotten(repo))

    def load(name: str) -> NameEntry | None:
        try:
            return read_name(repo, name)
        except FormatError as exc:
            log.warning("skipping %s", exc)
            return None

    return [e for e in _pool_map(load, names) if e is not None and e.record not in gone]


def list_names(repo: Repo) -> list[str]:
    """Live (not forgotten) names, sorted: one LIST of names/ plus one of forgotten/.

    For the mount's ``ls /snap``. Tombstones are rare, so their GETs are few.
    """
    names = name_keys(repo)
    gone = forgotten(repo)
    if not gone:
        return names
    dead = {t.get("name") for t in gone.values() if t.get("name")}
    return [n for n in names if n not in dead]


def resolve_name(repo: Repo, name: str) -> str:
    """Name -> snapshot ID in two small requests (GET the name, HEAD its tombstone).

    Names never move, so a caller may cache the answer; a later ``forget`` makes
    the name unresolvable (NotFoundError) but never points it elsewhere.
    """
    entry = read_name(repo, name)
    if entry is None:
        raise NotFoundError(f"no name {name!r} in {repo.url}")
    if is_forgotten(repo, entry.record):
        raise NotFoundError(
            f"name {name!r} was forgotten (it was snapshot {entry.snapshot}); its data may have been collected"
        )
    return entry.snapshot


def series_latest(repo: Repo, series: str) -> NameEntry | None:
    """The latest live version of a series (see NameEntry.sort_key for the rule)."""
    entries = name_entries(repo, series + "@")
    entries = [e for e in entries if e.name.split("@", 1)[0] == series]
    return max(entries, key=NameEntry.sort_key) if entries else None


# --- tags ----------------------------------------------------------------------------


def tag_keys(repo: Repo, tag: str | None = None) -> list[tuple[str, str]]:
    pairs = []
    for info in repo.store.list(TAG_PREFIX + (tag + "/" if tag else "")):
        parts = info.key[len(TAG_PREFIX) :].split("/")
        if len(parts) == 2 and _TAG_RE.match(parts[0]) and is_object_id(parts[1]):
            pairs.append((parts[0], parts[1]))
    return pairs


def all_tags(repo: Repo) -> dict[str, list[str]]:
    """{snapshot_id: [tags, sorted]} in one LIST."""
    out: dict[str, list[str]] = {}
    for tag, snapshot_id in tag_keys(repo):
        out.setdefault(snapshot_id, []).append(tag)
    return {k: sorted(v) for k, v in out.items()}


def tags_of(repo: Repo, snapshot_id: str) -> list[str]:
    return all_tags(repo).get(snapshot_id, [])


def snapshots_tagged(repo: Repo, tag: str) -> list[str]:
    return sorted({snapshot_id for _, snapshot_id in tag_keys(repo, validate_tag(tag))})


def set_tags(repo: Repo, snapshot_id: str, tags: Iterable[str], *, remove: bool = False) -> list[str]:
    """Add (or remove) labels; one key per (tag, snapshot), so concurrent taggers never clash."""
    stamp = json.dumps({"time": _now(), "user": current_user(), "host": socket.gethostname()}).encode()
    for tag in tags:
        key = f"{TAG_PREFIX}{validate_tag(tag)}/{snapshot_id}"
        if remove:
            repo.store.delete(key)
        else:
            repo.store.put(key, stamp)
    return tags_of(repo, snapshot_id)


# --- references ------------------------------------------------------------------------


@dataclass
class Resolved:
    """What a REF denotes: always a snapshot; a record when the REF names one."""

    ref: str
    kind: str  # "id", "prefix", "name", "latest" or "record"
    snapshot: str
    record_id: str | None = None
    name: str | None = None

    def record(self, repo: Repo) -> Record | None:
        return read_record(repo, self.record_id) if self.record_id else None


def lookup(repo: Repo, ref: str, *, allow_forgotten: bool = False) -> Resolved:
    """Resolve a REF: full ID, record ID, name, ``SERIES@latest`` or a unique hex prefix (>= 8).

    Order: ``@latest``; a 64-hex string (snapshot marker, then record, then any
    tree object); a name; a hex prefix over snapshots and records. Names that
    look like hex prefixes are refused at creation, so no REF has two meanings.
    """
    ref = ref.strip()
    if not ref:
        raise UsageError("empty snapshot reference")
    if "@" in ref and ref.rsplit("@", 1)[1].lower() == LATEST:
        series = ref.rsplit("@", 1)[0]
        if not _NAME_RE.match(series) or "@" in series:
            raise UsageError(f"invalid series {series!r} in {ref!r}")
        entry = series_latest(repo, series)
        if entry is None:
            raise NotFoundError(f"no live version of series {series!r} in {repo.url}")
        return Resolved(ref, "latest", entry.snapshot, entry.record, entry.name)
    lowered = ref.lower()
    if is_object_id(lowered):
        if repo.is_snapshot(lowered):
            return Resolved(ref, "id", lowered)
        if has_record(repo, lowered):
            record = read_record(repo, lowered)
            return Resolved(ref, "record", record.snapshot, record.id, record.name)
        if repo.has_object(lowered):
            return Resolved(ref, "id", lowered)
        raise NotFoundError(f"snapshot {lowered} not found in {repo.url}")
    if _NAME_RE.match(ref) and not _HEXISH_RE.match(ref):
        entry = read_name(repo, ref)
        if entry is not None:
            if not allow_forgotten and is_forgotten(repo, entry.record):
                raise NotFoundError(
                    f"name {ref!r} was forgotten (it was snapshot {entry.snapshot}); "
                    "its data may have been collected"
                )
            return Resolved(ref, "name", entry.snapshot, entry.record, entry.name)
    if _HEX_RE.match(lowered):
        if len(lowered) < MIN_PREFIX:
            raise UsageError(
                f"{ref!r} is neither a known name nor a usable ID prefix (give at least {MIN_PREFIX} hex digits)"
            )
        snapshots = sorted(set(repo.snapshot_ids(lowered)))
        records = sorted(set(record_ids(repo, lowered)))
        if len(snapshots) + len(records) > 1:
            shown = [s[:16] for s in snapshots[:5]] + [f"record {r[:16]}" for r in records[:5]]
            raise AmbiguousRefError(f"ID prefix {ref!r} is ambiguous: {', '.join(shown)}")
        if snapshots:
            return Resolved(ref, "prefix", snapshots[0])
        if records:
            record = read_record(repo, records[0])
            return Resolved(ref, "record", record.snapshot, record.id, record.name)
        raise NotFoundError(f"no snapshot or record matches {ref!r} in {repo.url}")
    if _NAME_RE.match(ref):
        raise NotFoundError(f"no name {ref!r} in {repo.url} (snapfs log lists the names)")
    raise NotFoundError(f"{ref!r} is not a snapshot ID, ID prefix, name or SERIES@latest")


def resolve_ref(repo: Repo, ref: str) -> str:
    """REF -> snapshot ID (see lookup)."""
    return lookup(repo, ref).snapshot


def records_for_snapshot(repo: Repo, snapshot_id: str, *, include_forgotten: bool = False) -> list[Record]:
    """Every record of a snapshot, oldest first (reads all records: the store keeps no index)."""
    gone = set() if include_forgotten else set(forgotten(repo))
    return [r for r in all_records(repo) if r.snapshot == snapshot_id and r.id not in gone]


def record_for(repo: Repo, resolved: Resolved) -> Record | None:
    """The record a REF denotes; for a bare snapshot ID, its newest live record if any."""
    if resolved.record_id:
        return read_record(repo, resolved.record_id)
    records = records_for_snapshot(repo, resolved.snapshot)
    return records[-1] if records else None


def link(repo: Repo, ref: str) -> dict[str, Any]:
    """A lineage entry for --parent / --input: {snapshot, record, name}, pinned to concrete IDs.

    ``SERIES@latest`` is stored as the concrete name it meant at that moment; a
    bare ID is linked to the snapshot's newest live record, if it has one.
    """
    resolved = lookup(repo, ref)
    record = record_for(repo, resolved)
    return {
        "snapshot": resolved.snapshot,
        "record": record.id if record else None,
        "name": record.name if record else None,
    }


# --- creating records -----------------------------------------------------------------


@dataclass
class Created:
    record: Record
    created: bool  # False: the name already held this snapshot (a no-op)
    tags: list[str] = field(default_factory=list)
    redacted_meta: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        data = self.record.data
        return {
            "record": self.record.id,
            "name": data.get("name"),
            "created": self.created,
            "parents": data.get("parents", []),
            "inputs": data.get("inputs", []),
            "tags": self.tags,
        }


def wants_record(
    *,
    name: str | None = None,
    message: str | None = None,
    parents: Sequence[str] | None = None,
    inputs: Sequence[str] | None = None,
    meta: dict[str, Any] | None = None,
) -> bool:
    """A plain push (no name, message, lineage or metadata) writes only the snapshot marker."""
    return bool(name or message or parents or inputs or meta)


def _already_exists(entry: NameEntry, snapshot_id: str, repo: Repo) -> AlreadyExistsError:
    state = " (forgotten; names are never reused)" if is_forgotten(repo, entry.record) else ""
    return AlreadyExistsError(
        f"name {entry.name!r} already exists{state} for snapshot {entry.snapshot[:16]} "
        f"(recorded {entry.time}); names never move, so snapshot {snapshot_id[:16]} was pushed but not "
        "named: pick a new name or version"
    )


def check_name_free(repo: Repo, name: str, snapshot_id: str) -> None:
    """Before an upload: fail early if ``name`` already names other content.

    ``create`` checks again atomically (create-once); this only saves a user
    from uploading a whole dataset to learn the name was taken.
    """
    validate_name(name)
    entry = read_name(repo, name)
    if entry is not None and entry.snapshot != snapshot_id:
        state = " (forgotten; names are never reused)" if is_forgotten(repo, entry.record) else ""
        raise AlreadyExistsError(
            f"name {name!r} already exists{state} for snapshot {entry.snapshot[:16]} "
            f"(recorded {entry.time}); names never move: pick a new name or version"
        )


def _ensure_marked(repo: Repo, snapshot_id: str) -> None:
    """Under a push lock: the snapshot must still be whole before a record claims it."""
    if repo.is_snapshot(snapshot_id):
        return
    # A concurrent forget removed the marker. A present root tree still implies
    # its whole subtree (gc deletes parents before children), so re-mark it.
    if repo.has_object(snapshot_id):
        repo.mark_snapshot(snapshot_id)
        return
    raise NotFoundError(
        f"snapshot {snapshot_id} is no longer in {repo.url}: a forget and a gc removed it while it "
        "was being recorded; push it again"
    )


def create(
    repo: Repo,
    snapshot_id: str,
    *,
    name: str | None = None,
    message: str | None = None,
    tags: Sequence[str] = (),
    parents: Sequence[str] | None = None,
    inputs: Sequence[str] = (),
    meta: dict[str, Any] | None = None,
    git: bool = True,
    env: bool = True,
    argv: Sequence[str] | None = None,
    cwd: str = ".",
    files: int | None = None,
    total_bytes: int | None = None,
) -> Created:
    """Write the record (and name, and tags) for a pushed snapshot.

    Pushing an existing name with the same snapshot is a no-op (tags are still
    added); with another snapshot it raises AlreadyExistsError. For
    ``SERIES@VERSION`` without ``parents``, the parent is the series' latest
    live version (NameEntry.sort_key). ``parents=[]`` records no parent.
    """
    tags = [validate_tag(t) for t in dict.fromkeys(tags)]
    if name is not None:
        series, _version = validate_name(name)
        existing = read_name(repo, name)
        if existing is not None:
            if existing.snapshot != snapshot_id or is_forgotten(repo, existing.record):
                raise _already_exists(existing, snapshot_id, repo)
            current = set_tags(repo, snapshot_id, tags) if tags else tags_of(repo, snapshot_id)
            return Created(read_record(repo, existing.record), False, current)
    else:
        series = None
    meta = dict(meta or {})
    for key in meta:
        check_meta_key(key)
    clean_meta, redacted = redact_meta(meta)
    for key in redacted:
        log.warning("metadata %r looks like a secret; stored as %s", key, REDACTED)

    if parents is None:
        latest = series_latest(repo, series) if series else None
        parent_links = (
            [{"snapshot": latest.snapshot, "record": latest.record, "name": latest.name}] if latest else []
        )
    else:
        parent_links = [link(repo, p) for p in parents]
    input_links = [link(repo, i) for i in inputs]

    data: dict[str, Any] = {
        "format": fmt.RECORD_FORMAT,
        "snapshot": snapshot_id,
        "name": name,
        "message": message,
        "tags": sorted(tags),
        "parents": parent_links,
        "inputs": input_links,
        "meta": clean_meta,
        "files": files,
        "bytes": total_bytes,
        **capture_context(git=git, env=env, argv=argv, cwd=cwd),
    }
    with PushLock(repo.store):
        _ensure_marked(repo, snapshot_id)
        record = write_record(repo, data)
        if name is not None:
            pointer = {
                "format": NAME_FORMAT,
                "name": name,
                "record": record.id,
                "snapshot": snapshot_id,
                "time": record.time,
            }
            blob = json.dumps(pointer, sort_keys=True, separators=(",", ":")).encode()
            if not repo.store.put(NAME_PREFIX + name, blob, if_absent=True):
                # Lost a race for the name. Our record is referenced by nothing and
                # nobody has seen its ID, so it goes; the winner decides the outcome.
                winner = read_name(repo, name)
                if winner is None:
                    raise SnapfsError(f"name {name!r} in {repo.url} exists but cannot be read; try again")
                if winner.record != record.id:
                    repo.store.delete(fmt.record_key(record.id))
                if winner.snapshot != snapshot_id:
                    raise _already_exists(winner, snapshot_id, repo)
                current = set_tags(repo, snapshot_id, tags) if tags else tags_of(repo, snapshot_id)
                return Created(read_record(repo, winner.record), False, current, redacted)
        current = set_tags(repo, snapshot_id, tags) if tags else tags_of(repo, snapshot_id)
    log.info(
        "recorded %s for snapshot %s as record %s", name or "(unnamed)", snapshot_id[:12], record.id[:12]
    )
    return Created(record, True, current, redacted)


# --- forget ---------------------------------------------------------------------------


def forget(repo: Repo, ref: str) -> dict[str, Any]:
    """Remove a claim so ``gc`` may collect the data.

    A name or record REF: writes a tombstone for that record (the record and
    the name stay: the name is reserved forever and no longer resolves). When
    no live record claims the snapshot any more, its marker is removed too.
    A bare snapshot ID: removes the marker, refusing while live records claim it.
    Runs under the maintenance lock, like gc, so it never races a push.
    """
    with MaintenanceLock(repo.store, "forget"):
        resolved = lookup(repo, ref, allow_forgotten=True)
        snapshot_id = resolved.snapshot
        record = resolved.record(repo)
        already = False
        if record is not None:
            already = is_forgotten(repo, record.id)
            if not already:
                tombstone = {
                    "format": FORGOTTEN_FORMAT,
                    "record": record.id,
                    "snapshot": snapshot_id,
                    "name": record.name,
                    "time": _now(),
                    "user": current_user(),
                    "host": socket.gethostname(),
                }
                repo.store.put(FORGOTTEN_PREFIX + record.id, json.dumps(tombstone, sort_keys=True).encode())
        claims = records_for_snapshot(repo, snapshot_id)
        if record is None and claims:
            listed = ", ".join(r.name or f"record {r.id[:12]}" for r in claims[:5])
            raise UsageError(f"snapshot {snapshot_id[:16]} is still claimed by {listed}: forget those first")
        unmarked = False
        if not claims and repo.is_snapshot(snapshot_id):
            repo.unmark_snapshot(snapshot_id)
            unmarked = True
        return {
            "snapshot": snapshot_id,
            "record": record.id if record else None,
            "name": record.name if record else None,
            "already_forgotten": already,
            "unmarked": unmarked,
            "still_claimed_by": [r.name or r.id for r in claims],
        }


# --- reading back: show, log, ancestors ----------------------------------------------------


def record_view(record: Record, *, tags: list[str], is_gone: bool) -> dict[str, Any]:
    """A record as ``show --json`` and ``log --json`` print it: stored fields plus id, tags, forgotten.

    ``tags`` are the snapshot's current labels; the record's own ``tags`` field
    (the labels given at push time) is kept as ``pushed_tags``.
    """
    data = dict(record.data)
    data["pushed_tags"] = data.pop("tags", [])
    return {**data, "id": record.id, "tags": tags, "forgotten": is_gone}


def show(repo: Repo, ref: str) -> dict[str, Any]:
    resolved = lookup(repo, ref, allow_forgotten=True)
    record = record_for(repo, resolved)
    tags = tags_of(repo, resolved.snapshot)
    if record is None:
        return {
            "id": None,
            "snapshot": resolved.snapshot,
            "name": None,
            "tags": tags,
            "forgotten": False,
            "marked": repo.is_snapshot(resolved.snapshot),
        }
    return record_view(record, tags=tags, is_gone=is_forgotten(repo, record.id))


def log_entries(
    repo: Repo, series: str | None = None, *, tag: str | None = None, include_forgotten: bool = False
) -> list[dict[str, Any]]:
    """Records, newest first, optionally only one series and/or one tag.

    With ``tag``, tagged snapshots that have no record are listed too, as
    entries with ``id: null``.
    """
    gone = forgotten(repo)
    if series is not None:
        if not _NAME_RE.match(series) or "@" in series:
            raise UsageError(f"invalid series {series!r}: give the part before '@', e.g. imagenet")
        entries = name_entries(repo, series + "@", include_forgotten=True)
        plain = read_name(repo, series)
        if plain is not None:
            entries.append(plain)
        ids = sorted({e.record for e in entries if e.name == series or e.name.split("@", 1)[0] == series})
        records = [r for r in _pool_map(lambda i: read_record(repo, i), ids)]
    else:
        records = all_records(repo)
    if not include_forgotten:
        records = [r for r in records if r.id not in gone]
    tags = all_tags(repo)
    bare: list[str] = []
    if tag is not None:
        validate_tag(tag)
        tagged = {sid for sid, labels in tags.items() if tag in labels}
        records = [r for r in records if r.snapshot in tagged]
        if series is None:
            recorded = {r.snapshot for r in all_records(repo)}
            bare = sorted(tagged - recorded)
    records.sort(key=Record.sort_key, reverse=True)
    out = [record_view(r, tags=tags.get(r.snapshot, []), is_gone=r.id in gone) for r in records]
    out.extend(
        {
            "id": None,
            "snapshot": sid,
            "name": None,
            "time": None,
            "tags": tags.get(sid, []),
            "forgotten": False,
        }
        for sid in bare
    )
    return out


def ancestors(repo: Repo, ref: str, *, depth: int | None = None) -> dict[str, Any]:
    """The lineage graph above a REF as a tree: each node's ``ancestors`` are its parents and inputs.

    A node seen earlier in the walk is listed again with ``seen: true`` and not
    expanded (lineage is a DAG: two models can share a dataset).
    """
    resolved = lookup(repo, ref, allow_forgotten=True)
    root_record = record_for(repo, resolved)
    gone = forgotten(repo)
    seen: set[str] = set()

    def node(snapshot_id: str, record: Record | None, relation: str, level: int) -> dict[str, Any]:
        out: dict[str, Any] = {
            "relation": relation,
            "snapshot": snapshot_id,
            "record": record.id if record else None,
            "name": record.name if record else None,
            "time": record.time if record else None,
            "message": record.data.get("message") if record else None,
            "forgotten": bool(record and record.id in gone),
            "ancestors": [],
        }
        key = record.id if record else snapshot_id
        if key in seen:
            out["seen"] = True
            return out
        seen.add(key)
        if record is None or (depth is not None and level >= depth):
            return out
        for relation_name, links in (
            ("parent", record.data.get("parents", [])),
            ("input", record.data.get("inputs", [])),
        ):
            for item in links:
                child: Record | None = None
                if item.get("record"):
                    try:
                        child = read_record(repo, item["record"])
                    except NotFoundError:
                        child = None
                out["ancestors"].append(node(item["snapshot"], child, relation_name, level + 1))
        return out

    return node(resolved.snapshot, root_record, "root", 0)


# --- reproduce and preflight ------------------------------------------------------------------


def reproduce(repo: Repo, ref: str) -> dict[str, Any]:
    """What ``snapfs reproduce`` prints, as data: code, environment, data, command and results."""
    resolved = lookup(repo, ref, allow_forgotten=True)
    record = record_for(repo, resolved)
    if record is None:
        raise NotFoundError(
            f"snapshot {resolved.snapshot[:16]} has no record (it was pushed without --name, -m, "
            "--input or --meta), so there is nothing to reproduce beyond `snapfs pull`"
        )
    data = record.data
    return {
        "snapshot": record.snapshot,
        "record": record.id,
        "name": record.name,
        "store": repo.url,
        "git": data.get("git"),
        "env": data.get("env"),
        "inputs": data.get("inputs", []),
        "parents": data.get("parents", []),
        "command": data.get("command"),
        "meta": data.get("meta", {}),
        "forgotten": is_forgotten(repo, record.id),
    }


def requirements(env: dict[str, Any] | None) -> list[str]:
    """pip requirement lines for a record's environment (``name==version``)."""
    if not env:
        return []
    return [f"{name}=={version}" for name, version in sorted(env.get("packages", {}).items())]


@dataclass
class PreflightReport:
    ok: bool
    reasons: list[str]
    git: dict[str, Any] | None
    data: list[dict[str, Any]]
    configs: list[dict[str, Any]]

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def preflight(
    repo: Repo,
    data_refs: Sequence[str],
    configs: Sequence[str] = (),
    *,
    cwd: str = ".",
    allow_untracked: bool = False,
) -> PreflightReport:
    """The "refuse to train unpinned" check: clean code, immutable data refs, committed configs."""
    reasons: list[str] = []
    state = git_state(cwd)
    if state is None:
        reasons.append(f"{os.path.abspath(cwd)} is not in a git work tree: the code is not pinned")
    else:
        if state.commit is None:
            reasons.append(f"git work tree {state.top} has no commit yet: the code is not pinned")
        problems = list(state.dirty_paths)
        if not allow_untracked:
            problems += [f"{p} (untracked)" for p in state.untracked_paths]
        if problems:
            shown = ", ".join(problems[:5]) + (f" and {len(problems) - 5} more" if len(problems) > 5 else "")
            reasons.append(
                f"git work tree {state.top} is dirty ({len(state.dirty_paths)} modified, "
                f"{len(state.untracked_paths)} untracked): {shown}; commit or stash first"
            )
    data: list[dict[str, Any]] = []
    for ref in data_refs:
        item: dict[str, Any] = {"ref": ref, "snapshot": None, "pinned": False}
        data.append(item)
        try:
            resolved = lookup(repo, ref)
        except SnapfsError as exc:
            reasons.append(f"data {ref!r}: {exc}")
            continue
        item["snapshot"] = resolved.snapshot
        if resolved.kind == "latest":
            reasons.append(
                f"data {ref!r} moves with every new version (today it is {resolved.name} = "
                f"{resolved.snapshot[:16]}): pin {resolved.name} or the full ID"
            )
        elif resolved.kind == "prefix":
            reasons.append(
                f"data {ref!r} is an ID prefix that a later snapshot can make ambiguous: "
                f"pin the full ID {resolved.snapshot}"
            )
        elif not repo.is_snapshot(resolved.snapshot):
            reasons.append(f"data {ref!r}: snapshot {resolved.snapshot[:16]} is not marked in {repo.url}")
        else:
            item["pinned"] = True
    config_items: list[dict[str, Any]] = []
    for path in configs:
        item = {"path": path, "committed": False}
        config_items.append(item)
        if not os.path.isfile(os.path.join(cwd, path)):
            reasons.append(f"config {path}: no such file")
            continue
        if state is None:
            reasons.append(f"config {path} is not committed (not in a git work tree)")
            continue
        if _git(cwd, "ls-files", "--error-unmatch", "--", path) is None:
            reasons.append(f"config {path} is not tracked by git: commit it")
            continue
        if _git(cwd, "status", "--porcelain", "--", path):
            reasons.append(f"config {path} has uncommitted changes: commit it")
            continue
        item["committed"] = True
        item["blob"] = _git(cwd, "rev-parse", f"HEAD:./{path}")
    return PreflightReport(not reasons, reasons, state.as_record() if state else None, data, config_items)


__all__ = [
    "Record",
    "NameEntry",
    "Resolved",
    "Created",
    "validate_name",
    "validate_tag",
    "sanitize_url",
    "redact_argv",
    "capture_context",
    "create",
    "lookup",
    "resolve_ref",
    "resolve_name",
    "list_names",
    "series_latest",
    "set_tags",
    "forget",
    "show",
    "log_entries",
    "ancestors",
    "reproduce",
    "preflight",
]
