"""Individual consent: the consent record, its signed token, DPoP proofs and pairwise subjects.

Pure functions and in-memory types only: HTTP routes, the state store (revocation, single-use
consumption by ``jti``) and the policy input are wired elsewhere. See ``docs/consent.md``.
"""

from gateway.consent.dpop import DPOP_TYP, DpopProof, access_token_hash, verify_dpop_proof
from gateway.consent.keys import (
    CONSENT_ALG,
    ConsentKeySet,
    KeyEvent,
    KeyState,
    jwk_thumbprint,
    public_jwk,
)
from gateway.consent.model import (
    AUTHORIZATION_TYPE,
    PURPOSES,
    AuthorizationDetail,
    ConsentRecord,
    ConsentState,
    DataPeriod,
    PurposeRule,
)
from gateway.consent.pseudonym import pairwise_sub
from gateway.consent.token import (
    CONSENT_TYP,
    VerifiedConsent,
    issue_consent_token,
    parse_compact,
    verify_consent_token,
)

__all__ = [
    "AUTHORIZATION_TYPE",
    "CONSENT_ALG",
    "CONSENT_TYP",
    "DPOP_TYP",
    "PURPOSES",
    "AuthorizationDetail",
    "ConsentKeySet",
    "ConsentRecord",
    "ConsentState",
    "DataPeriod",
    "DpopProof",
    "KeyEvent",
    "KeyState",
    "PurposeRule",
    "VerifiedConsent",
    "access_token_hash",
    "issue_consent_token",
    "jwk_thumbprint",
    "pairwise_sub",
    "parse_compact",
    "public_jwk",
    "verify_consent_token",
    "verify_dpop_proof",
]
