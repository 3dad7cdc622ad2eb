"""ed25519_verify (libsodium through PyNaCl) on the consented hot path: the RFC 8032 vectors
verify, and on random keys, messages and tampered signatures it agrees with OpenSSL's verifier
(``cryptography``), the slow reference."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from gateway.consent.keys import ed25519_verify

VECTORS = json.loads((Path(__file__).parents[1] / "vectors" / "ed25519" / "rfc8032.json")
                     .read_text("utf-8"))["vectors"]


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_rfc8032_vectors_verify_and_their_tampered_twins_do_not(vector: dict[str, str]
                                                                 ) -> None:
    public = Ed25519PublicKey.from_public_bytes(bytes.fromhex(vector["public_key"]))
    message = bytes.fromhex(vector["message"])
    signature = bytes.fromhex(vector["signature"])
    assert ed25519_verify(public, signature, message)
    assert not ed25519_verify(public, signature, message + b"\x00")
    for position in (0, 31, 32, 63):
        flipped = bytearray(signature)
        flipped[position] ^= 0x01
        assert not ed25519_verify(public, bytes(flipped), message)
    assert not ed25519_verify(public, signature[:-1], message)
    assert not ed25519_verify(public, signature + b"\x00", message)


def _openssl_verifies(public: Ed25519PublicKey, signature: bytes, message: bytes) -> bool:
    try:
        public.verify(signature, message)
    except InvalidSignature:
        return False
    return True


def test_agrees_with_openssl_on_random_and_tampered_signatures() -> None:
    rng = random.Random(20261204)
    keys = [Ed25519PrivateKey.generate() for _ in range(8)]
    checked = accepted = 0
    for _ in range(300):
        signer = rng.choice(keys)
        verifier = signer if rng.random() < 0.8 else rng.choice(keys)
        message = os.urandom(rng.randrange(0, 600))
        signature = bytearray(signer.sign(message))
        if rng.random() < 0.5:  # tamper with one bit of the signature or of the message
            if rng.random() < 0.5:
                signature[rng.randrange(64)] ^= 1 << rng.randrange(8)
            elif message:
                message = bytes([message[0] ^ 0x80]) + message[1:]
        public = verifier.public_key()
        want = _openssl_verifies(public, bytes(signature), message)
        assert ed25519_verify(public, bytes(signature), message) is want
        checked += 1
        accepted += want
    assert 50 < accepted < checked  # both outcomes were exercised
