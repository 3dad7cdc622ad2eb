"""The consent key set and the JOSE primitives the consent token and DPoP proofs share.

Consent tokens are signed with Ed25519 (``alg`` EdDSA, the only algorithm of every key here).
Each key's ``kid`` is its RFC 7638 thumbprint. A key moves only forward:

``pending`` → ``active`` → ``retired``

- ``add`` creates a pending key: it is in :meth:`ConsentKeySet.publish_jwks` at once but signs
  nothing, so every verifier can learn it before its first use;
- ``activate`` lets it sign (the most recently activated key that holds a private part signs;
  older active keys still verify the tokens they signed);
- ``retire`` ends it: it leaves the JWKS and verifies nothing, ever again (re-adding it is refused).

Every change calls ``on_change`` with a :class:`KeyEvent`, so the caller can audit it.

>>> ks = ConsentKeySet()
>>> kid = ks.add(Ed25519PrivateKey.from_private_bytes(bytes(32)), now=0)
>>> ks.state(kid), len(ks.publish_jwks()["keys"])
('pending', 1)
>>> ks.activate(kid, now=1); ks.retire(kid, now=2); ks.publish_jwks()
{'keys': []}
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import nacl.exceptions
import nacl.signing
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from gateway.errors import ValidationFailed

__all__ = [
    "CONSENT_ALG",
    "ConsentKeySet",
    "KeyEvent",
    "KeyState",
    "VerificationKey",
    "b64url_decode",
    "b64url_encode",
    "ed25519_verify",
    "jwk_thumbprint",
    "public_jwk",
]

CONSENT_ALG = "EdDSA"
_ED25519_SIGNATURE_BYTES = 64
KeyState = Literal["pending", "active", "retired"]
_B64URL = re.compile(r"[A-Za-z0-9_-]*")
_B64URL_VALUE = {
    c: i for i, c in enumerate(
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
}
# The last character of 2 (3) leftover characters carries 4 (2) bits beyond the data.
_UNUSED_BITS = {2: 0x0F, 3: 0x03}
# RFC 7638 §3.2: the required members of each key type, in lexicographic order.
_THUMBPRINT_MEMBERS: dict[str, tuple[str, ...]] = {
    "OKP": ("crv", "kty", "x"),  # RFC 8037 §2
    "EC": ("crv", "kty", "x", "y"),
}


def b64url_encode(data: bytes) -> str:
    """Unpadded base64url (RFC 7515 §2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(segment: str) -> bytes:
    """Strict unpadded base64url: refuses padding, foreign characters, impossible lengths and
    non-canonical trailing bits (so one byte string has exactly one encoding).

    >>> b64url_decode("AQI"), b64url_encode(b"\\x01\\x02")
    (b'\\x01\\x02', 'AQI')
    >>> b64url_decode("AQJ")
    Traceback (most recent call last):
    ...
    ValueError: non-canonical base64url
    """
    tail = len(segment) % 4
    if tail == 1 or not _B64URL.fullmatch(segment):
        raise ValueError("not unpadded base64url")
    # Canonical: the bits the last character carries beyond the data are zero (checked
    # here rather than by encoding the result again: the check runs on every request).
    if tail and _B64URL_VALUE[segment[-1]] & _UNUSED_BITS[tail]:
        raise ValueError("non-canonical base64url")
    try:
        standard = segment.replace("-", "+").replace("_", "/")
        return binascii.a2b_base64(standard + "=" * (-tail % 4))
    except (binascii.Error, ValueError) as exc:
        raise ValueError("not unpadded base64url") from exc


@functools.lru_cache(maxsize=256)
def _sodium_key(public: bytes) -> nacl.signing.VerifyKey:
    return nacl.signing.VerifyKey(public)


def ed25519_verify(public_key: Ed25519PublicKey, signature: bytes, message: bytes) -> bool:
    """RFC 8032 Ed25519 verification, through libsodium (PyNaCl): about twice as fast as
    OpenSSL's on this machine (``bench/enrollment_http.py`` measures both), and stricter (it
    also refuses small-order keys and ``R``). It runs twice on every consented request.

    >>> from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    >>> key = Ed25519PrivateKey.generate()
    >>> ed25519_verify(key.public_key(), key.sign(b"msg"), b"msg")
    True
    >>> ed25519_verify(key.public_key(), key.sign(b"msg"), b"other")
    False
    """
    if len(signature) != _ED25519_SIGNATURE_BYTES:
        return False
    try:
        _sodium_key(public_key.public_bytes_raw()).verify(message, signature)
    except nacl.exceptions.BadSignatureError:
        return False
    return True


def jwk_thumbprint(jwk: Mapping[str, Any]) -> str:
    """RFC 7638 SHA-256 thumbprint of an OKP or EC public JWK, base64url.

    The RFC 8037 Appendix A.3 example (the RFC 8032 TEST 1 public key):

    >>> jwk_thumbprint({"kty": "OKP", "crv": "Ed25519",
    ...                 "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"})
    'kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k'
    """
    members = _THUMBPRINT_MEMBERS.get(str(jwk.get("kty")))
    if members is None:
        raise ValueError("thumbprints are defined here for OKP and EC keys only")
    required = {}
    for name in members:
        value = jwk.get(name)
        if not isinstance(value, str):
            raise ValueError(f"jwk member {name} missing")
        required[name] = value
    canonical = json.dumps(required, separators=(",", ":"), sort_keys=True, ensure_ascii=False)
    return b64url_encode(hashlib.sha256(canonical.encode("utf-8")).digest())


def public_jwk(key: Ed25519PublicKey | ec.EllipticCurvePublicKey) -> dict[str, str]:
    """The required public members of an Ed25519 or P-256 key as a JWK."""
    if isinstance(key, Ed25519PublicKey):
        raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return {"crv": "Ed25519", "kty": "OKP", "x": b64url_encode(raw)}
    if not isinstance(key.curve, ec.SECP256R1):
        raise ValueError("only P-256 EC keys")
    numbers = key.public_numbers()
    return {
        "crv": "P-256",
        "kty": "EC",
        "x": b64url_encode(numbers.x.to_bytes(32, "big")),
        "y": b64url_encode(numbers.y.to_bytes(32, "big")),
    }


@dataclass(frozen=True)
class KeyEvent:
    """One change of the key set, for the audit log."""

    kid: str
    old_state: KeyState | None
    new_state: KeyState
    at: float


@dataclass(frozen=True)
class VerificationKey:
    kid: str
    alg: str
    public_key: Ed25519PublicKey
    state: KeyState


@dataclass
class _Entry:
    kid: str
    public_key: Ed25519PublicKey
    private_key: Ed25519PrivateKey | None
    state: KeyState
    activated: int = 0


class ConsentKeySet:
    """The agency's consent signing keys (in memory; loading and persisting them is the
    caller's)."""

    def __init__(self, *, on_change: Callable[[KeyEvent], None] | None = None) -> None:
        self._entries: dict[str, _Entry] = {}
        self._on_change = on_change
        self._activations = 0

    def _event(self, kid: str, old: KeyState | None, new: KeyState, now: float) -> None:
        if self._on_change is not None:
            self._on_change(KeyEvent(kid=kid, old_state=old, new_state=new, at=now))

    def add(self, key: Ed25519PrivateKey | Ed25519PublicKey, *, now: float) -> str:
        """Publish a new key (pending); a public key alone verifies but never signs."""
        if isinstance(key, Ed25519PrivateKey):
            private: Ed25519PrivateKey | None = key
            public = key.public_key()
        elif isinstance(key, Ed25519PublicKey):
            private, public = None, key
        else:
            raise ValidationFailed("consent keys are Ed25519")
        kid = jwk_thumbprint(public_jwk(public))
        if kid in self._entries:
            raise ValidationFailed(f"key {kid} is already in the key set")
        self._entries[kid] = _Entry(
            kid=kid, public_key=public, private_key=private, state="pending"
        )
        self._event(kid, None, "pending", now)
        return kid

    def _move(self, kid: str, want: tuple[KeyState, ...], new: KeyState, now: float) -> _Entry:
        entry = self._entries.get(kid)
        if entry is None:
            raise ValidationFailed("unknown key id")
        if entry.state not in want:
            raise ValidationFailed(f"key {kid} is {entry.state}, cannot become {new}")
        old = entry.state
        entry.state = new
        self._event(kid, old, new, now)
        return entry

    def activate(self, kid: str, *, now: float) -> None:
        entry = self._move(kid, ("pending",), "active", now)
        self._activations += 1
        entry.activated = self._activations

    def retire(self, kid: str, *, now: float) -> None:
        self._move(kid, ("pending", "active"), "retired", now)

    def state(self, kid: str) -> KeyState:
        entry = self._entries.get(kid)
        if entry is None:
            raise ValidationFailed("unknown key id")
        return entry.state

    def signing_key(self) -> tuple[str, Ed25519PrivateKey]:
        """The most recently activated key with a private part; fails closed if none."""
        candidates = [e for e in self._entries.values()
                      if e.state == "active" and e.private_key is not None]
        if not candidates:
            raise ValidationFailed("no active consent signing key")
        entry = max(candidates, key=lambda e: e.activated)
        assert entry.private_key is not None  # noqa: S101 - narrowed by the filter above
        return entry.kid, entry.private_key

    def lookup(self, kid: str) -> VerificationKey | None:
        """The key named ``kid`` in this set (a dictionary lookup: never a path or a URL)."""
        entry = self._entries.get(kid)
        if entry is None:
            return None
        return VerificationKey(kid=entry.kid, alg=CONSENT_ALG, public_key=entry.public_key,
                               state=entry.state)

    def publish_jwks(self) -> dict[str, list[dict[str, str]]]:
        """The JWKS of ``/.well-known/jwks.json``: pending and active keys, sorted by kid."""
        keys = []
        for kid in sorted(self._entries):
            entry = self._entries[kid]
            if entry.state == "retired":
                continue
            keys.append({**public_jwk(entry.public_key), "kid": kid, "alg": CONSENT_ALG,
                         "use": "sig"})
        return {"keys": keys}
