"""BLAKE3 hashing: the only module that imports blake3.

Every object ID in snapfs is the lowercase hex BLAKE3-256 of the object's raw
bytes. blake3 releases the GIL, so these functions are safe and useful to call
from worker threads.
"""

from __future__ import annotations

import re

import blake3

ID_HEX_LEN = 64
DIGEST_LEN = 32
_ID_RE = re.compile(r"^[0-9a-f]{64}$")

# Inputs at least this large are hashed with blake3's internal threads.
_MULTITHREAD_MIN = 8 << 20


def hash_bytes(data: bytes | bytearray | memoryview) -> str:
    """Return the hex object ID of ``data``."""
    if len(data) >= _MULTITHREAD_MIN:
        return blake3.blake3(data, max_threads=blake3.blake3.AUTO).hexdigest()
    return blake3.blake3(data).hexdigest()


def digest_bytes(data: bytes | bytearray | memoryview) -> bytes:
    """Return the raw 32-byte digest of ``data``."""
    return blake3.blake3(data).digest()


def new_hasher() -> blake3.blake3:
    """An incremental hasher with ``update()`` and ``hexdigest()``."""
    return blake3.blake3()


def is_object_id(text: str) -> bool:
    return bool(_ID_RE.match(text))


def id_to_digest(object_id: str) -> bytes:
    return bytes.fromhex(object_id)


def digest_to_id(digest: bytes) -> str:
    return digest.hex()
