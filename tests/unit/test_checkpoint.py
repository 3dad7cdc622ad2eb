"""Tests of signed checkpoints (``gateway.audit.checkpoint``): C2SP signed-note and
tlog-checkpoint, Ed25519.

The note format is pinned to the published example of the Go reference implementation
(golang.org/x/mod/sumdb/note, package documentation and note_test.go: the "PeterNeumann" key and
note). Ed25519 is deterministic (RFC 8032), so our signer must reproduce it byte for byte.
"""

from __future__ import annotations

import base64
import hashlib

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.audit import merkle
from gateway.audit.checkpoint import (
    Checkpoint,
    checkpoint_body,
    key_id,
    open_note,
    parse_and_verify_checkpoint,
    sign_checkpoint,
    sign_note,
)
from gateway.errors import AuditIntegrityError

# golang.org/x/mod/sumdb/note: PRIVATE+KEY+PeterNeumann+c74f20a3+<0x01 || seed> and
# PeterNeumann+c74f20a3+<0x01 || public key>.
GO_SIGNER = "AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
GO_VERIFIER = "ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
GO_TEXT = (
    "If you think cryptography is the answer to your problem,\n"
    "then you don't know what your problem is.\n"
)
GO_NOTE = (
    GO_TEXT
    + "\n— PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqf"
    "qdngotpRZb6KE6RyyBwJnAM=\n"
)

# RFC 8032 §7.1 TEST 1, as in test_audit.py.
SEED = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
OTHER_SEED = bytes.fromhex("4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb")
ORIGIN = "yibao-gateway.test/audit"
ROOT = bytes.fromhex("5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328")


def go_key() -> Ed25519PrivateKey:
    raw = base64.b64decode(GO_SIGNER)
    assert raw[0] == 1  # Ed25519
    return Ed25519PrivateKey.from_private_bytes(raw[1:])


def key(seed: bytes = SEED) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(seed)


def test_go_reference_note_is_reproduced_byte_for_byte() -> None:
    k = go_key()
    public = k.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert public == base64.b64decode(GO_VERIFIER)[1:]
    assert key_id("PeterNeumann", k.public_key()).hex() == "c74f20a3"
    assert sign_note(GO_TEXT, k, "PeterNeumann") == GO_NOTE
    assert open_note(GO_NOTE, k.public_key(), "PeterNeumann") == GO_TEXT


def test_key_id_is_the_c2sp_hash() -> None:
    k = key()
    raw = k.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    want = hashlib.sha256(ORIGIN.encode() + b"\n\x01" + raw).digest()[:4]
    assert key_id(ORIGIN, k.public_key()) == want


def test_checkpoint_round_trip() -> None:
    note = sign_checkpoint(ORIGIN, 8, ROOT, key())
    body = f"{ORIGIN}\n8\nXcnaeacGWamtVZy3Ad7Zoqudgjqt L0lgz+Nw7/RgQyg=\n".replace(" ", "")
    assert note.startswith(body + "\n— " + ORIGIN + " ")
    assert checkpoint_body(ORIGIN, 8, ROOT) == body
    got = parse_and_verify_checkpoint(note, key().public_key(), ORIGIN, ORIGIN)
    assert got == Checkpoint(ORIGIN, 8, ROOT)
    assert parse_and_verify_checkpoint(note, key().public_key()) == got  # origin from the note
    empty = sign_checkpoint(ORIGIN, 0, merkle.EMPTY_ROOT, key())
    assert parse_and_verify_checkpoint(empty, key().public_key(), None, ORIGIN).size == 0


def test_other_signatures_are_ignored_but_a_bad_one_by_our_key_is_not() -> None:
    note = sign_checkpoint(ORIGIN, 8, ROOT, key())
    body = checkpoint_body(ORIGIN, 8, ROOT)
    witness = sign_note(body, key(OTHER_SEED), "witness.example/w1").split("\n\n", 1)[1]
    cosigned = note + witness
    assert parse_and_verify_checkpoint(cosigned, key().public_key(), None, ORIGIN).size == 8
    assert open_note(cosigned, key(OTHER_SEED).public_key(), "witness.example/w1") == body
    # Same name and key ID as ours, but a signature that does not verify: the note is refused.
    ours = note.split("\n\n", 1)[1]
    blob = bytearray(base64.b64decode(ours.rsplit(" ", 1)[1]))
    blob[-1] ^= 1
    forged = ours.rsplit(" ", 1)[0] + " " + base64.b64encode(bytes(blob)).decode() + "\n"
    with pytest.raises(AuditIntegrityError, match="does not verify"):
        parse_and_verify_checkpoint(note + forged, key().public_key(), None, ORIGIN)


def _resign(body: str) -> str:
    return sign_note(body, key(), ORIGIN)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (sign_checkpoint(ORIGIN, 8, ROOT, key(OTHER_SEED)), "no signature by key"),
        (sign_checkpoint(ORIGIN, 8, ROOT, key(), "other.example/log"), "no signature by key"),
        (
            sign_checkpoint("other.example/log", 8, ROOT, key(), ORIGIN),
            "origin 'other.example/log'",
        ),
        (_resign(f"{ORIGIN}\n08\n{base64.b64encode(ROOT).decode()}\n"), "leading zeros"),
        (_resign(f"{ORIGIN}\n-1\n{base64.b64encode(ROOT).decode()}\n"), "decimal number"),
        (_resign(f"{ORIGIN}\n8\n{base64.b64encode(ROOT[:31]).decode()}\n"), "got 31 bytes"),
        (_resign(f"{ORIGIN}\n8\n!!!\n"), "root is not base64"),
        (_resign(f"{ORIGIN}\n8\n{base64.b64encode(ROOT).decode()}\next\n"), "got 4 text lines"),
        (sign_checkpoint(ORIGIN, 8, ROOT, key()).replace("\n8\n", "\n9\n"), "does not verify"),
        (sign_checkpoint(ORIGIN, 8, ROOT, key())[:-1], "does not end with a newline"),
        (sign_checkpoint(ORIGIN, 8, ROOT, key()).replace("\n\n", "\n"), "no blank line"),
        (sign_checkpoint(ORIGIN, 8, ROOT, key()).replace("— ", "-- "), "want '— <key name>"),
        (sign_checkpoint(ORIGIN, 8, ROOT, key()) + "\t\n", "control characters"),
        (
            checkpoint_body(ORIGIN, 8, ROOT) + "\n" + "— x AAAAAAA=\n" * 17,
            "got 17 signature lines, want at most 16",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) and len(v) < 40 else None,
)
def test_parse_refuses(text: str, message: str) -> None:
    with pytest.raises(AuditIntegrityError, match=message):
        parse_and_verify_checkpoint(text, key().public_key(), None, ORIGIN)


def test_signing_refuses_what_cannot_be_read_back() -> None:
    with pytest.raises(ValueError, match="single line"):
        checkpoint_body("a\nb", 1, ROOT)
    with pytest.raises(ValueError, match="32-byte root"):
        checkpoint_body(ORIGIN, 1, b"short")
    with pytest.raises(ValueError, match="key name"):
        sign_checkpoint(ORIGIN, 1, ROOT, key(), "has space")
    with pytest.raises(ValueError, match="key name"):
        sign_checkpoint(ORIGIN, 1, ROOT, key(), "a+b")
