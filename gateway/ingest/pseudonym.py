"""Keyed pseudonyms: HMAC-SHA256 of a direct identifier, truncated to a positive 60-bit integer.

The key lives on the ingest side only (``keys/pseudonym.key``); the query side never reads it.
Unlike Presidio's hash operator (random salt per run) the same identifier always maps to the
same pseudonym under one key, so records of one person still join.

The DuckDB form computes the same HMAC inside the engine (vectorized) from the key's padded
halves passed as prepared-statement parameters, never as SQL text:
HMAC(K, m) = SHA-256((K ⊕ opad) ‖ SHA-256((K ⊕ ipad) ‖ m))  (RFC 2104).

>>> key = bytes(range(32))
>>> pseudonym(key, "42010000000001") == pseudonym(key, "42010000000001")
True
>>> 0 < pseudonym(key, "42010000000001") < 2**60
True
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from gateway.errors import ValidationFailed

__all__ = [
    "KEY_BYTES",
    "PSEUDONYM_HEX_DIGITS",
    "hmac_pads",
    "load_or_create_key",
    "pseudonym",
]

KEY_BYTES = 32
_BLOCK = 64  # SHA-256 block size, RFC 2104's B
# 60 bits keep the pseudonym a positive BIGINT (fast distinct counts); collisions are
# checked on every load.
PSEUDONYM_HEX_DIGITS = 15


def pseudonym(key: bytes, value: str) -> int:
    """Reference pseudonym of one identifier (the DuckDB path must agree with this)."""
    digest = hmac.new(key, value.encode("utf-8"), hashlib.sha256).hexdigest()
    return int(digest[:PSEUDONYM_HEX_DIGITS], 16)


def hmac_pads(key: bytes) -> tuple[bytes, bytes]:
    """(K ⊕ ipad, K ⊕ opad) for a key of at most one block."""
    if len(key) > _BLOCK:
        raise ValidationFailed("pseudonym key longer than one SHA-256 block")
    padded = key.ljust(_BLOCK, b"\0")
    return bytes(b ^ 0x36 for b in padded), bytes(b ^ 0x5C for b in padded)


def load_or_create_key(path: Path) -> bytes:
    """Read the pseudonym key, creating a random one (mode 0600) if absent."""
    if path.exists():
        key = path.read_bytes()
        if len(key) != KEY_BYTES:
            raise ValidationFailed(f"pseudonym key {path.name} must be {KEY_BYTES} bytes")
        return key
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(KEY_BYTES)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key)
    return key
