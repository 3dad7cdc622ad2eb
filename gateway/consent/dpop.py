"""DPoP proofs (RFC 9449 §4.3): the insurer proves, on every call, that it holds the key the
consent token is bound to (``cnf.jkt``).

Checks, in order (each refusal has its own ``dpop_*`` code): present; shape (size, three
segments, strict base64url, JSON objects, no duplicate member); header members only ``typ``,
``alg``, ``jwk``; ``typ`` exactly ``dpop+jwt``; ``alg`` EdDSA or ES256 (asymmetric only); ``jwk``
a public Ed25519 / P-256 key matching ``alg`` with no private member; signature verifies with
that ``jwk``; claims ``jti``, ``htm``, ``htu``, ``iat``, ``ath`` present; ``htm`` and ``htu``
exactly the request's (``htu`` without query and fragment); ``iat`` neither in the future nor
older than ``max_age_s``; ``ath`` = base64url(SHA-256(access token)); the RFC 7638 thumbprint of
``jwk`` equals ``expected_jkt``; and last, ``jti`` not seen before (so a refused proof never
spends a ``jti``). The caller's ``seen_jti`` must remember each ``jti`` until the proof's
``replay_window_ends`` (``iat + max_age_s + leeway_s``: from the proof itself, so a replay of
it maps to the same moment whenever it comes; after it the proof is refused as stale).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn
from urllib.parse import urlsplit, urlunsplit

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from jwt import PyJWK
from jwt.exceptions import PyJWKError

from gateway.consent.keys import b64url_decode, b64url_encode, ed25519_verify, jwk_thumbprint
from gateway.consent.token import parse_compact
from gateway.errors import AuthenticationFailed

__all__ = ["DPOP_ALGS", "DPOP_TYP", "DpopProof", "access_token_hash", "verify_dpop_proof"]

DPOP_TYP = "dpop+jwt"
# alg -> (kty, crv, coordinate members)
DPOP_ALGS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "EdDSA": ("OKP", "Ed25519", ("x",)),
    "ES256": ("EC", "P-256", ("x", "y")),
}
_MAX_PROOF_BYTES = 4096
_HEADER_MEMBERS = frozenset({"typ", "alg", "jwk"})
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
_OPTIONAL_JWK_MEMBERS = frozenset({"kid", "alg", "use"})
_REQUIRED_CLAIMS = ("jti", "htm", "htu", "iat", "ath")
_JTI = re.compile(r"[\x21-\x7e]{16,128}")
_COORDINATE_BYTES = 32
_SIGNATURE_BYTES = 64


def _fail(code: str, message: str) -> NoReturn:
    raise AuthenticationFailed(message, code=f"dpop_{code}")


def access_token_hash(access_token: str) -> str:
    """``ath``: base64url(SHA-256(the access token's octets)), RFC 9449 §4.2."""
    return b64url_encode(hashlib.sha256(access_token.encode("utf-8")).digest())


def _target_uri(htu: str) -> str:
    parts = urlsplit(htu)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


@dataclass(frozen=True)
class DpopProof:
    jti: str
    jkt: str
    iat: int
    replay_window_ends: int  # s; accepted until then, so its jti is remembered until then


def _public_jwk(alg: str, jwk: object) -> dict[str, Any]:
    if not isinstance(jwk, dict):
        _fail("bad_jwk", "header jwk must be a JSON object")
    if _PRIVATE_MEMBERS & set(jwk):
        _fail("bad_jwk", "header jwk carries private key members")
    kty, crv, coordinates = DPOP_ALGS[alg]
    if jwk.get("kty") != kty or jwk.get("crv") != crv:
        _fail("bad_jwk", f"alg {alg} needs a {kty} {crv} jwk")
    allowed = {"kty", "crv", *coordinates} | _OPTIONAL_JWK_MEMBERS
    if set(jwk) - allowed:
        _fail("bad_jwk", "header jwk has unexpected members")
    if "alg" in jwk and jwk["alg"] != alg:
        _fail("bad_jwk", "jwk alg differs from header alg")
    if "use" in jwk and jwk["use"] != "sig":
        _fail("bad_jwk", "jwk use must be sig")
    for name in coordinates:
        value = jwk.get(name)
        try:
            raw = b64url_decode(value) if isinstance(value, str) else b""
        except ValueError:
            raw = b""
        if len(raw) != _COORDINATE_BYTES:
            _fail("bad_jwk", f"jwk {name} must be {_COORDINATE_BYTES} bytes of base64url")
    return jwk


@functools.lru_cache(maxsize=1024)
def _proof_key(alg: str, coordinates: tuple[str, ...]) -> PyJWK:
    """The public key of a checked jwk (an insurer signs every proof with the same key, and
    loading it costs more than the signature check)."""
    kty, crv, names = DPOP_ALGS[alg]
    return PyJWK({"kty": kty, "crv": crv, **dict(zip(names, coordinates, strict=True))},
                 algorithm=alg)


@functools.lru_cache(maxsize=1024)
def _thumbprint(alg: str, coordinates: tuple[str, ...]) -> str:
    kty, crv, names = DPOP_ALGS[alg]
    return jwk_thumbprint({"kty": kty, "crv": crv, **dict(zip(names, coordinates, strict=True))})


def verify_dpop_proof(
    proof: object,
    *,
    htm: str,
    htu: str,
    access_token: str,
    expected_jkt: str,
    now: float,
    seen_jti: Callable[[str], bool],
    max_age_s: int = 60,
    leeway_s: int = 5,
    issued_after: int | None = None,
) -> DpopProof:
    """Verify the ``DPoP`` header of one request.

    ``seen_jti(jti)`` records ``jti`` and returns True when it is new, False when it was seen
    already (a replay); it is called only once every other check has passed.
    ``issued_after`` (s): a proof whose ``iat`` is not past it is stale too (the state
    store's ``dpop_rekeyed_iat_bound``: proofs whose spends may not be remembered).
    """
    if proof is None or proof == "":
        _fail("missing", "DPoP proof missing")
    jws = parse_compact(proof, prefix="dpop", max_bytes=_MAX_PROOF_BYTES)
    header = jws.header
    unexpected = sorted(set(header) - _HEADER_MEMBERS)
    if unexpected:
        _fail("forbidden_header", f"header members {unexpected} are not accepted")
    if header.get("typ") != DPOP_TYP:
        _fail("wrong_typ", f"header typ must be {DPOP_TYP}")
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in DPOP_ALGS:
        _fail("bad_alg", f"header alg must be one of {sorted(DPOP_ALGS)}")
    jwk = _public_jwk(alg, header.get("jwk"))
    coordinates = tuple(jwk[name] for name in DPOP_ALGS[alg][2])
    try:
        key = _proof_key(alg, coordinates)
    except PyJWKError:
        _fail("bad_jwk", "header jwk is not a valid public key")
    if len(jws.signature) != _SIGNATURE_BYTES:
        _fail("bad_signature", "proof signature does not verify with its jwk")
    if isinstance(key.key, Ed25519PublicKey):
        verified = ed25519_verify(key.key, jws.signature, jws.signing_input)
    else:
        verified = key.Algorithm.verify(jws.signing_input, key.key, jws.signature)
    if not verified:
        _fail("bad_signature", "proof signature does not verify with its jwk")
    claims = jws.payload
    missing = [name for name in _REQUIRED_CLAIMS if name not in claims]
    if missing:
        _fail("missing_claim", f"claims {missing} are required")
    jti, iat = claims["jti"], claims["iat"]
    if not isinstance(jti, str) or not _JTI.fullmatch(jti):
        _fail("bad_claim", "jti must be 16 to 128 printable ASCII characters")
    if isinstance(iat, bool) or not isinstance(iat, int):
        _fail("bad_claim", "iat must be an integer")
    if not all(isinstance(claims[name], str) for name in ("htm", "htu", "ath")):
        _fail("bad_claim", "htm, htu and ath must be strings")
    if claims["htm"] != htm:
        _fail("wrong_htm", "htm is not the request method")
    if claims["htu"] != _target_uri(htu):
        _fail("wrong_htu", "htu is not the request URI (without query and fragment)")
    if iat > now + leeway_s:
        _fail("future", "proof issued in the future")
    if iat < now - max_age_s - leeway_s:
        _fail("stale", f"proof older than {max_age_s} s")
    if issued_after is not None and iat <= issued_after:
        _fail("stale", "proof issued before the replay store changed")
    if not hmac.compare_digest(claims["ath"].encode(), access_token_hash(access_token).encode()):
        _fail("wrong_ath", "ath is not the hash of the presented token")
    jkt = _thumbprint(alg, coordinates)
    if not hmac.compare_digest(jkt.encode(), expected_jkt.encode()):
        _fail("wrong_key", "proof key is not the key the consent is bound to")
    if not seen_jti(jti):
        _fail("replay", "proof jti already used")
    return DpopProof(jti=jti, jkt=jkt, iat=iat, replay_window_ends=iat + max_age_s + leeway_s)
