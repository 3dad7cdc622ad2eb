"""OAuth 2.0 client credentials with a signed client assertion (RFC 7523) and access tokens
in the JWT profile of RFC 9068.

A client assertion must be signed with the client's registered key (EdDSA or ES256; the
algorithm is fixed per client, never taken from the token), name the token URL as ``aud``,
carry ``iss`` = ``sub`` = client id, a short ``exp`` and a ``jti`` that is spent on first use.
The access token is an Ed25519-signed JWT with header ``typ: at+jwt``; it is verified against
the gateway's own key only, and refused where any other ``typ`` is presented.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ed25519

from gateway.auth.keys import load_public_key_pem
from gateway.errors import AuthenticationFailed
from gateway.state.store import StateStore

__all__ = [
    "ACCESS_TOKEN_TYP",
    "ASSERTION_TYPE",
    "AccessTokenIssuer",
    "Principal",
    "make_client_assertion",
]

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ACCESS_TOKEN_TYP = "at+jwt"  # noqa: S105 - a media type, not a secret
_MAX_ASSERTION_LIFETIME_S = 300
_LEEWAY_S = 30
_FORBIDDEN_HEADERS = ("jku", "x5u", "jwk", "x5c", "crit")
_ROLES = ("admin", "insurer", "auditor", "subject")
_MAX_REMEMBERED_TOKENS = 4096


@dataclass(frozen=True)
class Principal:
    """The authenticated caller of one request."""

    client_id: str
    role: str
    org: str | None
    token_id: str

    def policy_subject(self) -> dict[str, Any]:
        return {"client_id": self.client_id, "role": self.role, "org": self.org}


def make_client_assertion(
    private_key: Any, *, client_id: str, token_url: str, alg: str, lifetime_s: int = 60
) -> str:
    """What a client sends to the token endpoint (used by the demo, tests and examples)."""
    now = int(time.time())
    claims = {
        "iss": client_id,
        "sub": client_id,
        "aud": token_url,
        "iat": now,
        "exp": now + lifetime_s,
        "jti": secrets.token_urlsafe(16),
    }
    return jwt.encode(claims, private_key, algorithm=alg)


def _unverified_header(token: str) -> dict[str, Any]:
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as exc:
        raise AuthenticationFailed("malformed token") from exc
    for name in _FORBIDDEN_HEADERS:
        if name in header:
            raise AuthenticationFailed(f"token header {name} is not accepted")
    return header


class AccessTokenIssuer:
    """Verifies client assertions and issues / verifies access tokens."""

    def __init__(
        self,
        *,
        signing_key: ed25519.Ed25519PrivateKey,
        issuer: str,
        token_url: str,
        state: StateStore,
        ttl_s: int = 600,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._key = signing_key
        self._public = signing_key.public_key()
        self.issuer = issuer
        self.token_url = token_url
        self.state = state
        self.ttl_s = ttl_s
        self.clock = clock
        # token -> (its caller, iat, exp), verified but for time: see verify().
        self._verified: dict[str, tuple[Principal, int, int]] = {}

    # -- token endpoint ----------------------------------------------------------------
    def exchange(self, *, grant_type: str, assertion_type: str, assertion: str) -> dict[str, Any]:
        if grant_type != "client_credentials":
            raise AuthenticationFailed("grant_type must be client_credentials",
                                       code="unsupported_grant_type")
        if assertion_type != ASSERTION_TYPE:
            raise AuthenticationFailed("client_assertion_type must be jwt-bearer",
                                       code="invalid_client")
        principal = self.verify_client_assertion(assertion)
        return {
            "access_token": self.issue(principal),
            "token_type": "Bearer",
            "expires_in": self.ttl_s,
        }

    def verify_client_assertion(self, assertion: str) -> Principal:
        header = _unverified_header(assertion)
        try:
            unverified = jwt.decode(assertion, options={"verify_signature": False})
        except jwt.PyJWTError as exc:
            raise AuthenticationFailed("malformed client assertion", code="invalid_client") from exc
        client_id = unverified.get("iss")
        if not isinstance(client_id, str) or unverified.get("sub") != client_id:
            raise AuthenticationFailed("iss and sub must both be the client id",
                                       code="invalid_client")
        client = self.state.get_client(client_id)
        if client is None or client.disabled:
            raise AuthenticationFailed("unknown client", code="invalid_client")
        public_key, alg = load_public_key_pem(client.public_key_pem)
        if header.get("alg") != alg:
            raise AuthenticationFailed("unexpected signing algorithm", code="invalid_client")
        now = self.clock()
        try:
            claims = jwt.decode(
                assertion,
                public_key,
                algorithms=[alg],
                audience=self.token_url,
                issuer=client_id,
                leeway=_LEEWAY_S,
                options={"require": ["iss", "sub", "aud", "exp", "jti"], "verify_iat": False},
            )
        except jwt.ExpiredSignatureError as exc:
            raise AuthenticationFailed("client assertion expired", code="invalid_client") from exc
        except jwt.InvalidAudienceError as exc:
            raise AuthenticationFailed("client assertion must name the token URL as aud",
                                       code="invalid_client") from exc
        except jwt.PyJWTError as exc:
            raise AuthenticationFailed("client assertion rejected", code="invalid_client") from exc
        exp = int(claims["exp"])
        if exp - now > _MAX_ASSERTION_LIFETIME_S + _LEEWAY_S:
            raise AuthenticationFailed("client assertion lives too long", code="invalid_client")
        jti = claims["jti"]
        if not isinstance(jti, str) or not jti:
            raise AuthenticationFailed("client assertion needs a jti", code="invalid_client")
        if not self.state.spend_jti(
            jti, client_id, (exp + _LEEWAY_S) * 1_000_000_000, int(now * 1_000_000_000)
        ):
            raise AuthenticationFailed("client assertion was already used", code="invalid_client")
        return Principal(client_id=client_id, role=client.role, org=client.org, token_id=jti)

    # -- access tokens -----------------------------------------------------------------
    def issue(self, principal: Principal) -> str:
        now = int(self.clock())
        claims = {
            "iss": self.issuer,
            "sub": principal.client_id,
            "aud": self.issuer,
            "client_id": principal.client_id,
            "role": principal.role,
            "org": principal.org,
            "iat": now,
            "exp": now + self.ttl_s,
            "jti": secrets.token_urlsafe(16),
        }
        return jwt.encode(claims, self._key, algorithm="EdDSA", headers={"typ": ACCESS_TOKEN_TYP})

    def verify(self, token: str) -> Principal:
        """The caller an access token names, or :class:`AuthenticationFailed`.

        A token whose signature and claims were verified once is remembered until it expires
        (its exact characters are the key: the same bytes verify the same way), so a client's
        later requests skip the signature check; the checks of time (``exp``, ``iat``,
        against this issuer's clock) run on every request."""
        now = self.clock()
        remembered = self._verified.get(token)
        if remembered is None:
            remembered = self._verify_signed(token)
            if len(self._verified) >= _MAX_REMEMBERED_TOKENS:
                self._forget_expired(now)
            self._verified[token] = remembered
        principal, iat, exp = remembered
        if now >= exp + _LEEWAY_S:
            self._verified.pop(token, None)
            raise AuthenticationFailed("access token expired")
        if iat > now + _LEEWAY_S:
            raise AuthenticationFailed("invalid access token")
        return principal

    def _forget_expired(self, now: float) -> None:
        for key, (_, _, exp) in list(self._verified.items()):
            if now >= exp + _LEEWAY_S:
                self._verified.pop(key, None)
        while len(self._verified) >= _MAX_REMEMBERED_TOKENS:  # oldest first
            self._verified.pop(next(iter(self._verified)), None)

    def _verify_signed(self, token: str) -> tuple[Principal, int, int]:
        """Signature and claims, but not time: ``(principal, iat, exp)``."""
        header = _unverified_header(token)
        if header.get("typ") != ACCESS_TOKEN_TYP:
            raise AuthenticationFailed("not an access token")
        if header.get("alg") != "EdDSA":
            raise AuthenticationFailed("unexpected signing algorithm")
        try:
            claims = jwt.decode(
                token,
                self._public,
                algorithms=["EdDSA"],
                audience=self.issuer,
                issuer=self.issuer,
                # Time is checked by verify(), on every request, with this issuer's clock.
                options={"require": ["iss", "sub", "aud", "exp", "iat", "jti", "client_id"],
                         "verify_exp": False, "verify_iat": False, "verify_nbf": False},
            )
        except jwt.PyJWTError as exc:
            raise AuthenticationFailed("invalid access token") from exc
        role = claims.get("role")
        iat, exp = claims["iat"], claims["exp"]
        if (role not in _ROLES or claims["client_id"] != claims["sub"]
                or "nbf" in claims
                or not all(isinstance(t, int) and not isinstance(t, bool) for t in (iat, exp))):
            raise AuthenticationFailed("invalid access token")
        org = claims.get("org")
        principal = Principal(
            client_id=str(claims["client_id"]),
            role=str(role),
            org=str(org) if org is not None else None,
            token_id=str(claims["jti"]),
        )
        return principal, iat, exp
