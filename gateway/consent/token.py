"""The consent token: a signed projection of a :class:`~gateway.consent.model.ConsentRecord`.

Header ``{"alg": "EdDSA", "kid": <RFC 7638 thumbprint>, "typ": "consent+jwt"}``; claims
``iss``, ``sub`` (pairwise), ``aud``, ``client_id``, ``iat``, ``nbf``, ``exp``, ``jti``,
``consent_id``, ``authorization_details`` (RFC 9396) and ``cnf.jkt`` (RFC 9449). See
``docs/consent.md`` for the profile, the order of the checks and the error codes.

Verification parses the compact serialization itself before any cryptography: three segments,
strict base64url, UTF-8, JSON objects with no duplicate member at any depth (Python's ``json``
keeps the last duplicate silently, so a signed ``{"sub": A, "sub": B}`` would mean different
things to different parsers). Every refusal raises with its own ``code``.

Revocation and single-use consumption need the state store: :class:`VerifiedConsent` exposes
``jti`` and ``consent_id`` so the caller consumes atomically by ``jti`` — never by a hash of the
token string, since a re-encoded or malleated twin of a token has another hash but the same
``jti``.
"""

from __future__ import annotations

import json
import math
import re
import secrets
from collections.abc import Collection
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NoReturn

import jwt
from pydantic import ValidationError

from gateway.consent.keys import CONSENT_ALG, ConsentKeySet, b64url_decode, ed25519_verify
from gateway.consent.model import (
    PURPOSES,
    AuthorizationDetail,
    ConsentRecord,
    ConsentState,
    DataPeriod,
)
from gateway.consent.pseudonym import pairwise_sub
from gateway.errors import AuthenticationFailed, PolicyDenied, ValidationFailed

__all__ = [
    "CONSENT_TYP",
    "MAX_TOKEN_BYTES",
    "REQUIRED_CLAIMS",
    "CompactJws",
    "VerifiedConsent",
    "issue_consent_token",
    "parse_compact",
    "verify_consent_token",
]

CONSENT_TYP = "consent+jwt"
MAX_TOKEN_BYTES = 8192
REQUIRED_CLAIMS = (
    "iss", "sub", "aud", "client_id", "iat", "nbf", "exp", "jti", "consent_id",
    "authorization_details", "cnf",
)
_STRING_CLAIMS = ("iss", "sub", "aud", "client_id", "jti", "consent_id")
_TIME_CLAIMS = ("iat", "nbf", "exp")
_HEADER_MEMBERS = frozenset({"alg", "kid", "typ"})
_KID = re.compile(r"[A-Za-z0-9_-]{1,128}")
_JKT = re.compile(r"[A-Za-z0-9_-]{43}")
_MAX_STRING = 256
_ED25519_SIGNATURE_BYTES = 64


# -- compact serialization -------------------------------------------------------------------


@dataclass(frozen=True)
class CompactJws:
    """A JWS compact serialization whose shape has been checked (not its signature)."""

    header: dict[str, Any]
    payload: dict[str, Any]
    signing_input: bytes
    signature: bytes


class _DuplicateMember(ValueError):
    pass


def _pairs_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in pairs:
        if name in out:
            raise _DuplicateMember(name)
        out[name] = value
    return out


def _no_constants(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def _fail(prefix: str, code: str, message: str) -> NoReturn:
    raise AuthenticationFailed(message, code=f"{prefix}_{code}")


def _json_object(prefix: str, what: str, segment: str) -> dict[str, Any]:
    try:
        raw = b64url_decode(segment)
    except ValueError:
        _fail(prefix, "malformed", f"{what} segment is not unpadded base64url")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        _fail(prefix, "malformed", f"{what} is not UTF-8")
    try:
        value = json.loads(
            text, object_pairs_hook=_pairs_without_duplicates, parse_constant=_no_constants
        )
    except _DuplicateMember:
        _fail(prefix, "duplicate_member", f"{what} has a duplicate JSON member")
    except (ValueError, RecursionError):
        _fail(prefix, "malformed", f"{what} is not JSON")
    if not isinstance(value, dict):
        _fail(prefix, "malformed", f"{what} is not a JSON object")
    return value


def parse_compact(token: object, *, prefix: str, max_bytes: int = MAX_TOKEN_BYTES) -> CompactJws:
    """Check the shape of a compact JWS; error codes are ``<prefix>_too_large``,
    ``<prefix>_malformed`` and ``<prefix>_duplicate_member``."""
    if not isinstance(token, str):
        _fail(prefix, "malformed", "token is not a string")
    if len(token) > max_bytes:
        _fail(prefix, "too_large", f"token has {len(token)} characters, want at most {max_bytes}")
    if not token.isascii():
        _fail(prefix, "malformed", "token is not ASCII")
    parts = token.split(".")
    if len(parts) != 3:
        _fail(prefix, "malformed", f"token has {len(parts)} segments, want 3")
    header_b64, payload_b64, signature_b64 = parts
    if not header_b64 or not payload_b64:
        _fail(prefix, "malformed", "empty header or payload segment")
    header = _json_object(prefix, "header", header_b64)
    payload = _json_object(prefix, "payload", payload_b64)
    try:
        signature = b64url_decode(signature_b64)
    except ValueError:
        _fail(prefix, "malformed", "signature segment is not unpadded base64url")
    return CompactJws(
        header=header,
        payload=payload,
        signing_input=f"{header_b64}.{payload_b64}".encode("ascii"),
        signature=signature,
    )


# -- issuing ---------------------------------------------------------------------------------


def issue_consent_token(
    record: ConsentRecord,
    *,
    key_set: ConsentKeySet,
    issuer: str,
    audience: str,
    client_id: str,
    cnf_jkt: str,
    now: float,
    max_lifetime: timedelta,
    pairwise_key: bytes,
    jti: str | None = None,
) -> str:
    """Sign the token of an active consent for ``client_id`` (a client of ``record.insurer_org``),
    bound to the DPoP key whose thumbprint is ``cnf_jkt``.

    ``exp`` is the earliest of ``now + max_lifetime``, the purpose's maximum (ten minutes for an
    enrollment check) and the end of the consent's validity.
    """
    if record.state is not ConsentState.ACTIVE:
        raise ValidationFailed(f"consent is {record.state.value}, not active")
    valid_from, valid_until = record.valid_from.timestamp(), record.valid_until.timestamp()
    if not valid_from <= now < valid_until:
        raise ValidationFailed("consent is not valid at this time")
    if not _JKT.fullmatch(cnf_jkt):
        raise ValidationFailed("cnf_jkt must be an RFC 7638 SHA-256 thumbprint")
    lifetime_s = int(max_lifetime.total_seconds())
    if lifetime_s <= 0:
        raise ValidationFailed("max_lifetime must be positive")
    rule = record.rule
    if rule.max_lifetime_s is not None:
        lifetime_s = min(lifetime_s, rule.max_lifetime_s)
    iat = int(now)
    exp = min(iat + lifetime_s, math.floor(valid_until))
    if exp <= iat:
        raise ValidationFailed("consent validity ends within the second")
    kid, private_key = key_set.signing_key()
    claims: dict[str, Any] = {
        "iss": issuer,
        "sub": pairwise_sub(pairwise_key, record.subject, record.insurer_org),
        "aud": audience,
        "client_id": client_id,
        "iat": iat,
        "nbf": iat,
        "exp": exp,
        "jti": jti if jti is not None else secrets.token_urlsafe(18),
        "consent_id": record.consent_id,
        "authorization_details": [record.authorization_detail().to_claim()],
        "cnf": {"jkt": cnf_jkt},
    }
    return jwt.encode(
        claims, private_key, algorithm=CONSENT_ALG, headers={"kid": kid, "typ": CONSENT_TYP}
    )


# -- verifying -------------------------------------------------------------------------------


@dataclass(frozen=True)
class VerifiedConsent:
    """What a verified consent token says; the caller still checks revocation and, for a
    single-use consent, consumes ``jti`` atomically (until ``replay_window_ends``)."""

    jti: str
    consent_id: str
    sub: str
    client_id: str
    issuer: str
    kid: str
    iat: int
    nbf: int
    exp: int
    cnf_jkt: str
    detail: AuthorizationDetail
    authorization_details: tuple[AuthorizationDetail, ...]
    single_use: bool
    replay_window_ends: float

    def policy_input(self) -> dict[str, Any]:
        """The verified claims as the policy sees them."""
        return {
            "consent_id": self.consent_id,
            "sub": self.sub,
            "client_id": self.client_id,
            "jti": self.jti,
            "exp": self.exp,
            "single_use": self.single_use,
            "authorization_details": [d.to_claim() for d in self.authorization_details],
        }


def _scope_denied(reason: str) -> PolicyDenied:
    err = PolicyDenied([reason])
    err.code = "consent_scope"  # type: ignore[misc]
    return err


def _claims(payload: dict[str, Any]) -> tuple[dict[str, Any], tuple[AuthorizationDetail, ...]]:
    missing = [name for name in REQUIRED_CLAIMS if name not in payload]
    if missing:
        _fail("consent", "missing_claim", f"claims {missing} are required")
    for name in _STRING_CLAIMS:
        value = payload[name]
        if not isinstance(value, str) or not value or len(value) > _MAX_STRING:
            _fail("consent", "bad_claim", f"claim {name} must be a non-empty string")
    for name in _TIME_CLAIMS:
        value = payload[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            _fail("consent", "bad_claim", f"claim {name} must be a non-negative integer")
    cnf = payload["cnf"]
    if not isinstance(cnf, dict) or not isinstance(cnf.get("jkt"), str) \
            or not _JKT.fullmatch(cnf["jkt"]):
        _fail("consent", "bad_claim", "claim cnf must carry an RFC 7638 jkt")
    raw_details = payload["authorization_details"]
    if not isinstance(raw_details, list) or not 1 <= len(raw_details) <= 8:
        _fail("consent", "bad_claim", "authorization_details must be a list of 1 to 8 objects")
    details = []
    for item in raw_details:
        try:
            detail = AuthorizationDetail.model_validate(item)
        except ValidationError:
            _fail("consent", "bad_claim", "an authorization_details entry is invalid")
        if detail.purpose not in PURPOSES:
            _fail("consent", "bad_claim", "an authorization_details entry names an unknown purpose")
        details.append(detail)
    return payload, tuple(details)


def verify_consent_token(
    token: object,
    *,
    key_set: ConsentKeySet,
    issuer: str,
    audience: str,
    client_id: str,
    now: float,
    required_datatypes: Collection[str],
    purpose: str,
    period: DataPeriod | None = None,
    action: str = "read",
    claim_id: str | None = None,
    leeway_s: int = 30,
) -> VerifiedConsent:
    """Verify a consent token presented by ``client_id`` (the authenticated insurer) for a
    request of ``purpose`` reading ``required_datatypes`` over ``period``; raise or return.
    ``token`` may be the token already split by :func:`parse_compact` (a caller that reads
    ahead, unverified, which consent it names)."""
    jws = token if isinstance(token, CompactJws) else parse_compact(token, prefix="consent")
    header = jws.header
    # -- header: only alg, kid and typ, each exactly as expected ---------------------------
    unexpected = sorted(set(header) - _HEADER_MEMBERS)
    if unexpected:
        _fail("consent", "forbidden_header", f"header members {unexpected} are not accepted")
    if header.get("typ") != CONSENT_TYP:
        _fail("consent", "wrong_typ", f"header typ must be {CONSENT_TYP}")
    alg = header.get("alg")
    if alg != CONSENT_ALG:
        _fail("consent", "bad_alg", f"header alg must be {CONSENT_ALG}")
    kid = header.get("kid")
    if not isinstance(kid, str) or not _KID.fullmatch(kid):
        _fail("consent", "unknown_kid", "header kid is missing or not a key id")
    key = key_set.lookup(kid)
    if key is None:
        _fail("consent", "unknown_kid", "header kid is not in the consent key set")
    if key.state == "retired":
        _fail("consent", "key_retired", "the signing key is retired")
    if alg != key.alg:
        _fail("consent", "bad_alg", "header alg is not the algorithm of this kid")
    # -- signature -----------------------------------------------------------------------
    if len(jws.signature) != _ED25519_SIGNATURE_BYTES:
        _fail("consent", "bad_signature",
              f"signature has {len(jws.signature)} bytes, want {_ED25519_SIGNATURE_BYTES}")
    if not ed25519_verify(key.public_key, jws.signature, jws.signing_input):
        _fail("consent", "bad_signature", "signature does not verify")
    # -- claims --------------------------------------------------------------------------
    claims, details = _claims(jws.payload)
    if claims["iss"] != issuer:
        _fail("consent", "wrong_issuer", "iss is not this agency")
    if claims["aud"] != audience:
        _fail("consent", "wrong_audience", "aud is not this gateway")
    if claims["client_id"] != client_id:
        _fail("consent", "wrong_client", "the consent was issued to another insurer")
    iat, nbf, exp = claims["iat"], claims["nbf"], claims["exp"]
    if now >= exp + leeway_s:
        _fail("consent", "expired", "consent token expired")
    if nbf > now + leeway_s:
        _fail("consent", "not_yet_valid", "consent token not valid yet (nbf)")
    if iat > now + leeway_s:
        _fail("consent", "issued_in_future", "consent token issued in the future (iat)")
    if not iat <= nbf < exp:
        _fail("consent", "lifetime", "want iat <= nbf < exp")
    for detail in details:
        limit = PURPOSES[detail.purpose].max_lifetime_s
        if limit is not None and exp - iat > limit:
            _fail("consent", "lifetime",
                  f"token lives {exp - iat} s, want at most {limit} s for {detail.purpose}")
    # -- scope ---------------------------------------------------------------------------
    wanted = set(required_datatypes)
    if not wanted:
        raise _scope_denied("the request names no datatype")
    covering = None
    for detail in details:
        if detail.purpose != purpose or action not in detail.actions:
            continue
        if not wanted <= set(detail.datatypes):
            continue
        if period is not None and not detail.period.covers(period):
            continue
        if detail.claim_id is not None and detail.claim_id != claim_id:
            continue
        covering = detail
        break
    if covering is None:
        raise _scope_denied(
            "the consent does not cover this purpose, action, datatypes, period or claim"
        )
    return VerifiedConsent(
        jti=claims["jti"],
        consent_id=claims["consent_id"],
        sub=claims["sub"],
        client_id=claims["client_id"],
        issuer=claims["iss"],
        kid=kid,
        iat=iat,
        nbf=nbf,
        exp=exp,
        cnf_jkt=claims["cnf"]["jkt"],
        detail=covering,
        authorization_details=details,
        single_use=PURPOSES[covering.purpose].single_use,
        replay_window_ends=exp + leeway_s,
    )
