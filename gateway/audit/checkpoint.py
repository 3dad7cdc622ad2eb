"""Signed checkpoints: a C2SP ``tlog-checkpoint`` body as a C2SP ``signed-note``, Ed25519.

A checkpoint commits the log to its Merkle tree at one size::

    yibao-gateway.local/audit                      origin
    1234                                           tree size, decimal
    XcnaeacGWamtVZy3Ad7Zoqudgjqt...=               base64 of the RFC 6962 root
                                                   (blank line)
    — yibao-gateway.local/audit AbCd...            key name, base64(key ID || signature)

The signature is Ed25519 over the note text (the three lines with their newlines). The key ID
is ``SHA-256(key name || 0x0A || 0x01 || public key)[:4]`` (c2sp.org/signed-note). Parsing is
strict and fails closed: exactly three text lines, a size without leading zeros, a 32-byte
root, and a signature by the expected key name *and* key ID that verifies. Signatures by other
keys (a witness's cosignature, for instance) are ignored, as the spec requires.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass
from typing import Final, NoReturn

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from gateway.audit.entry import HASH_SIZE
from gateway.errors import AuditIntegrityError

__all__ = [
    "ED25519_SIGNATURE_TYPE",
    "MAX_SIGNATURES",
    "Checkpoint",
    "checkpoint_body",
    "key_id",
    "open_note",
    "parse_and_verify_checkpoint",
    "sign_checkpoint",
    "sign_note",
]

#: c2sp.org/signed-note signature type byte of Ed25519.
ED25519_SIGNATURE_TYPE: Final = b"\x01"
#: Signature lines read at most (the spec asks verifiers to accept at least 16).
MAX_SIGNATURES: Final = 16
EM_DASH: Final = "\u2014"
_SIGNATURE_SIZE: Final = 64
_SIZE_RE: Final = re.compile(r"0|[1-9][0-9]*")
# Key names: non-empty, no Unicode spaces, no '+'.
_BAD_NAME_RE: Final = re.compile(r"[\s+]")
_CONTROL_RE: Final = re.compile(r"[\x00-\x09\x0b-\x1f]")


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A verified checkpoint: the log ``origin``, its tree ``size`` and Merkle ``root``."""

    origin: str
    size: int
    root: bytes


def key_id(key_name: str, public_key: Ed25519PublicKey) -> bytes:
    """``SHA-256(key name || 0x0A || 0x01 || 32-byte public key)[:4]`` (c2sp.org/signed-note)."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    data = key_name.encode("utf-8") + b"\n" + ED25519_SIGNATURE_TYPE + raw
    return hashlib.sha256(data).digest()[:4]


def _check_key_name(key_name: str) -> None:
    if not key_name or _BAD_NAME_RE.search(key_name):
        raise ValueError("key name must be non-empty, without spaces or '+'")


def checkpoint_body(origin: str, size: int, root: bytes) -> str:
    """The note text: ``f"{origin}\\n{size}\\n{base64(root)}\\n"``.

    >>> checkpoint_body("demo", 0, bytes(32))
    'demo\\n0\\nAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\\n'
    """
    if not origin or "\n" in origin or _CONTROL_RE.search(origin) or origin != origin.strip():
        raise ValueError("origin must be a non-empty single line without outer whitespace")
    if size < 0 or len(root) != HASH_SIZE:
        raise ValueError(f"checkpoint needs size >= 0 and a {HASH_SIZE}-byte root")
    return f"{origin}\n{size}\n{base64.b64encode(root).decode('ascii')}\n"


def sign_note(text: str, key: Ed25519PrivateKey, key_name: str) -> str:
    """``text`` (ending in a newline) as a signed note with one Ed25519 signature line."""
    _check_key_name(key_name)
    if not text.endswith("\n") or _CONTROL_RE.search(text):
        raise ValueError("note text must end with a newline and hold no control characters")
    signature = key.sign(text.encode("utf-8"))
    blob = base64.b64encode(key_id(key_name, key.public_key()) + signature).decode("ascii")
    return f"{text}\n{EM_DASH} {key_name} {blob}\n"


def sign_checkpoint(
    origin: str, size: int, root: bytes, key: Ed25519PrivateKey, key_name: str | None = None
) -> str:
    """The signed checkpoint note for ``(origin, size, root)``; the key name defaults to the
    origin, as c2sp.org/tlog-checkpoint recommends."""
    return sign_note(
        checkpoint_body(origin, size, root), key, origin if key_name is None else key_name
    )


def _fail(message: str) -> NoReturn:
    raise AuditIntegrityError(f"checkpoint: {message}")


def open_note(text: str, public_key: Ed25519PublicKey, key_name: str) -> str:
    """Verify a signed note and return its text; raise :class:`AuditIntegrityError` unless a
    signature by ``key_name`` with this key's ID is present and every such one verifies."""
    if not isinstance(text, str):
        _fail(f"got {type(text).__name__}, want text")
    if _CONTROL_RE.search(text) or "\r" in text:
        _fail("control characters other than newline")
    if not text.endswith("\n"):
        _fail("does not end with a newline")
    split = text.rfind("\n\n")
    if split < 0:
        _fail("no blank line before the signatures")
    body, lines = text[: split + 1], text[split + 2 : -1].split("\n")
    if len(lines) > MAX_SIGNATURES:
        _fail(f"got {len(lines)} signature lines, want at most {MAX_SIGNATURES}")
    want_id = key_id(key_name, public_key)
    verified = 0
    for number, line in enumerate(lines):
        parts = line.split(" ")
        if len(parts) != 3 or parts[0] != EM_DASH or not parts[1]:
            _fail(f"signature line {number + 1}: want '{EM_DASH} <key name> <base64>'")
        try:
            blob = base64.b64decode(parts[2], validate=True)
        except (ValueError, binascii.Error):
            _fail(f"signature line {number + 1}: not base64")
        if len(blob) < 5:
            _fail(f"signature line {number + 1}: got {len(blob)} bytes, want at least 5")
        if parts[1] != key_name or blob[:4] != want_id:
            continue  # someone else's signature, e.g. a witness's: ignored
        if len(blob) != 4 + _SIGNATURE_SIZE:
            _fail(f"signature by {key_name}: got {len(blob) - 4} bytes, want {_SIGNATURE_SIZE}")
        try:
            public_key.verify(blob[4:], body.encode("utf-8"))
        except InvalidSignature:
            _fail(f"signature by {key_name} does not verify with the given public key")
        verified += 1
    if not verified:
        _fail(f"no signature by key {key_name!r} with ID {want_id.hex()}")
    return body


def parse_and_verify_checkpoint(
    text: str, public_key: Ed25519PublicKey, key_name: str | None = None, origin: str | None = None
) -> Checkpoint:
    """Verify the signed checkpoint ``text`` and return what it commits to.

    ``origin`` is the log the caller expects (``None`` accepts the one in the note); the key
    name defaults to that origin. Raises :class:`AuditIntegrityError` on any mismatch.
    """
    if origin is None:
        first_line = text.split("\n", 1)[0] if isinstance(text, str) else ""
        name = first_line if key_name is None else key_name
    else:
        name = origin if key_name is None else key_name
    body = open_note(text, public_key, name)
    lines = body[:-1].split("\n")
    if len(lines) != 3:
        _fail(f"got {len(lines)} text lines, want 3 (origin, size, root)")
    got_origin, size_text, root_text = lines
    if origin is not None and got_origin != origin:
        _fail(f"origin {got_origin!r}, want {origin!r}")
    if not _SIZE_RE.fullmatch(size_text):
        _fail("tree size is not a decimal number without leading zeros")
    try:
        root = base64.b64decode(root_text, validate=True)
    except (ValueError, binascii.Error):
        _fail("root is not base64")
    if len(root) != HASH_SIZE:
        _fail(f"root: got {len(root)} bytes, want {HASH_SIZE}")
    return Checkpoint(got_origin, int(size_text), root)
