"""Individual consent, wired: the consent key set and pairwise key of the serving process, the
request body of ``POST /v1/consents``, and the 投保身份校验 answer.

The use cases themselves (issue, revoke, enrollment check) are methods of
:class:`gateway.service.gateway.Gateway`, so they share its policy, state and audit. See
``docs/consent.md`` ("Endpoints as built").
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, date, timedelta, timezone
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from gateway.auth.keys import load_private_key
from gateway.consent.keys import ConsentKeySet, public_jwk
from gateway.consent.model import PURPOSES, DataPeriod
from gateway.errors import PolicyDenied, ValidationFailed
from gateway.ingest.pseudonym import load_or_create_key
from gateway.state.store import StateStore

__all__ = [
    "ENROLLMENT_ACTION",
    "ENROLLMENT_DATATYPES",
    "ENROLLMENT_PURPOSE",
    "ConsentConfig",
    "ConsentRequest",
    "consent_refused",
    "enrollment_answer",
    "load_consent_config",
    "person_from_subject",
    "subject_from_person",
]

ENROLLMENT_ACTION = "persons.enrollment"
ENROLLMENT_PURPOSE = "enrollment_check"
ENROLLMENT_DATATYPES = tuple(sorted(PURPOSES[ENROLLMENT_PURPOSE].datatypes))
# The ingest pseudonym is a positive 60-bit integer (gateway.ingest.pseudonym).
_MAX_PSN_ID = 2**60
_SUBJECT_PREFIX = "psn:"
# 参保 dates are local dates of the agency: China Standard Time, no daylight saving.
CHINA_TZ = timezone(timedelta(hours=8), "CST")
# A claims consent token lives at most as long as its consent, and never above a year.
MAX_TOKEN_LIFETIME = timedelta(days=366)


@dataclass(frozen=True)
class ConsentConfig:
    """What the serving process needs to issue and verify consent tokens."""

    key_set: ConsentKeySet
    pairwise_key: bytes
    issuer: str  # also the audience: the agency issues, the gateway is the audience


def load_consent_config(key_path: Path, pairwise_path: Path, *, issuer: str,
                        state: StateStore) -> ConsentConfig | None:
    """Load the consent signing key (and the pairwise key) if the key file exists, register
    its public JWK as active in the state store, and activate it in memory. None when the
    deployment has no consent key: the consent endpoints then answer 503."""
    if not key_path.exists():
        return None
    key = load_private_key(key_path)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValidationFailed("the consent signing key must be Ed25519")
    pairwise_key = load_or_create_key(pairwise_path)
    now = time.time()
    key_set = ConsentKeySet()
    kid = key_set.add(key, now=now)
    jwk = public_jwk(key.public_key())
    ref = f"file:{key_path.name}"
    # Idempotent across restarts and worker processes: published (pending) before it is made
    # active; a retired key never signs again.
    current = {k.kid: k.state for k in state.consent_keys()}.get(kid)
    if current == "retired":
        raise ValidationFailed("the consent signing key is retired; install a new key file")
    if current is None:
        state.save_consent_key(kid, "pending", jwk, private_key_ref=ref)
    if current != "active":
        state.save_consent_key(kid, "active", jwk, private_key_ref=ref)
    key_set.activate(kid, now=now)
    return ConsentConfig(key_set=key_set, pairwise_key=pairwise_key, issuer=issuer)


def subject_from_person(psn_id: str) -> str:
    """The consent record's ``subject`` for the store pseudonym ``psn_id`` (decimal): written
    in hex with a prefix, since a 19-digit decimal is shaped like a 身份证号 and is refused."""
    if not psn_id.isdecimal() or not psn_id.isascii() or len(psn_id) > 19:
        raise ValidationFailed("subject must be a store pseudonym (psn_id) in decimal")
    value = int(psn_id)
    if not 0 < value < _MAX_PSN_ID:
        raise ValidationFailed("subject is not a store pseudonym (psn_id)")
    return f"{_SUBJECT_PREFIX}{value:x}"


def person_from_subject(subject: str) -> int:
    """The store ``psn_id`` of a consent record's ``subject``."""
    if not subject.startswith(_SUBJECT_PREFIX):
        raise ValidationFailed("consent subject is not a store pseudonym")
    return int(subject.removeprefix(_SUBJECT_PREFIX), 16)


def consent_refused(message: str, code: str) -> PolicyDenied:
    """A 403 with its own error code (revoked, already used, not this insurer's consent)."""
    err = PolicyDenied([message])
    err.code = code  # type: ignore[misc]
    return err


class ConsentRequest(BaseModel):
    """``POST /v1/consents`` (admin, on a person's behalf)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    subject: str = Field(min_length=1, max_length=19, pattern=r"^[0-9]+$",
                         description="the person's store pseudonym psn_id, in decimal")
    insurer: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                         description="the insurer's org")
    purpose: str = Field(min_length=1, max_length=64)
    datatypes: tuple[str, ...] = Field(min_length=1, max_length=32)
    period: DataPeriod
    valid_until: AwareDatetime
    dpop_jkt: str = Field(pattern=r"^[A-Za-z0-9_-]{43}$",
                          description="RFC 7638 thumbprint of the insurer's DPoP key")

    def audit_request(self) -> dict[str, Any]:
        """The request as audited: everything but the person's pseudonym."""
        return {
            "insurer": self.insurer,
            "purpose": self.purpose,
            "datatypes": list(self.datatypes),
            "period": {"start": self.period.start.isoformat(),
                       "end": self.period.end.isoformat()},
            "valid_until": self.valid_until.astimezone(UTC).isoformat(),
            "dpop_jkt": self.dpop_jkt,
        }


def enrollment_answer(row: tuple[Any, ...] | None, today: date) -> dict[str, Any]:
    """``{enrolled, insutype, insu_admdvs}`` from ``(insutype, insu_admdvs, psn_insu_date,
    insu_end_date)``; 险种 and 参保地 only while enrolled, nothing else ever."""
    if row is None:
        return {"enrolled": False, "insutype": None, "insu_admdvs": None}
    insutype, admdvs, start, end = row
    enrolled = start is not None and start <= today and (end is None or today < end)
    if not enrolled:
        return {"enrolled": False, "insutype": None, "insu_admdvs": None}
    return {"enrolled": True, "insutype": insutype, "insu_admdvs": admdvs}
