"""Subject sign-in: tokens of the agency's identity service, held by persons (参保人).

The identity service signs a short JWT with Ed25519; the gateway trusts exactly one public key
for it (``keys/identity-service.pub.pem``). Header ``{"alg": "EdDSA", "typ": "subject+jwt"}``
and nothing else (so no ``kid``/``jku``/``jwk`` to steer key selection); claims ``iss`` (the
identity service), ``aud`` (the gateway), ``sub`` (the person's keyed certno lookup value, 64
hex digits — never the 身份证号 itself, see :mod:`gateway.consent.lookup`), ``iat``, ``exp``
(at most an hour after ``iat``) and ``jti``.

The distinct ``typ`` keeps the three token kinds apart: an access token (``at+jwt``) or a
consent token (``consent+jwt``) is refused here, and a subject token is refused where either is
expected. Every refusal is an :class:`AuthenticationFailed` with a ``subject_token_*`` code.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

import jwt
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from gateway.consent.lookup import is_lookup
from gateway.consent.token import parse_compact
from gateway.errors import AuthenticationFailed

__all__ = [
    "IDENTITY_ISSUER",
    "MAX_SUBJECT_TOKEN_LIFETIME_S",
    "SUBJECT_TYP",
    "SubjectIdentity",
    "SubjectTokenVerifier",
    "issue_subject_token",
]

SUBJECT_TYP = "subject+jwt"
IDENTITY_ISSUER = "https://idp.yibao.test"
MAX_SUBJECT_TOKEN_LIFETIME_S = 3600
_LEEWAY_S = 30
_PREFIX = "subject_token"
_HEADER = {"alg", "typ"}
_REQUIRED = ("iss", "aud", "sub", "iat", "exp", "jti")


@dataclass(frozen=True)
class SubjectIdentity:
    """A verified subject token: the person's lookup value and the token's id."""

    lookup: str
    jti: str
    exp: int


def _fail(code: str, message: str) -> AuthenticationFailed:
    return AuthenticationFailed(message, code=f"{_PREFIX}_{code}")


def issue_subject_token(key: Ed25519PrivateKey, *, lookup: str, audience: str,
                        issuer: str = IDENTITY_ISSUER, lifetime_s: int = 900,
                        now: float | None = None) -> str:
    """What the identity service signs for a person (the demo's ``gateway token subject``)."""
    if not is_lookup(lookup):
        raise _fail("bad_claim", "sub must be a certno lookup value")
    issued = int(time.time() if now is None else now)
    claims = {"iss": issuer, "aud": audience, "sub": lookup, "iat": issued,
              "exp": issued + lifetime_s, "jti": secrets.token_urlsafe(16)}
    return jwt.encode(claims, key, algorithm="EdDSA", headers={"typ": SUBJECT_TYP})


class SubjectTokenVerifier:
    """Verifies subject tokens against the identity service's one public key."""

    def __init__(self, public_key: Ed25519PublicKey, *, audience: str,
                 issuer: str = IDENTITY_ISSUER,
                 clock: Callable[[], float] = time.time) -> None:
        self._key = public_key
        self.audience = audience
        self.issuer = issuer
        self.clock = clock

    def verify(self, token: str, *, now: float | None = None) -> SubjectIdentity:
        jws = parse_compact(token, prefix=_PREFIX, max_bytes=4096)
        header, claims = jws.header, jws.payload
        if set(header) - _HEADER:
            raise _fail("forbidden_header", "subject token header has members other than "
                                            "alg and typ")
        if header.get("typ") != SUBJECT_TYP:
            raise _fail("wrong_typ", "not a subject token")
        if header.get("alg") != "EdDSA":
            raise _fail("bad_alg", "subject tokens are EdDSA")
        try:
            self._key.verify(jws.signature, jws.signing_input)
        except InvalidSignature:
            raise _fail("bad_signature", "subject token signature does not verify") from None
        for name in _REQUIRED:
            if name not in claims:
                raise _fail("missing_claim", f"subject token lacks {name}")
        for name in ("iat", "exp"):
            if isinstance(claims[name], bool) or not isinstance(claims[name], int):
                raise _fail("bad_claim", f"{name} must be an integer")
        if claims["iss"] != self.issuer:
            raise _fail("wrong_issuer", "subject token of another issuer")
        if claims["aud"] != self.audience:
            raise _fail("wrong_audience", "subject token for another audience")
        if not is_lookup(claims["sub"]):
            raise _fail("bad_claim", "sub is not a certno lookup value")
        jti = claims["jti"]
        if not isinstance(jti, str) or not 0 < len(jti) <= 128:
            raise _fail("bad_claim", "jti must be a short string")
        if now is None:
            now = self.clock()
        iat, exp = int(claims["iat"]), int(claims["exp"])
        if now >= exp + _LEEWAY_S:
            raise _fail("expired", "subject token expired")
        if iat > now + _LEEWAY_S:
            raise _fail("issued_in_future", "subject token issued in the future")
        if not iat < exp <= iat + MAX_SUBJECT_TOKEN_LIFETIME_S:
            raise _fail("lifetime", "subject token lives too long")
        return SubjectIdentity(lookup=str(claims["sub"]), jti=jti, exp=exp)
