"""Helpers of the person-level HTTP tests: sample persons of the test city (by 身份证号), an
insurer's DPoP key, consents, subject sign-in tokens."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import jwt
import pyarrow.compute as pc
import pyarrow.parquet as pq
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.auth.subjects import issue_subject_token
from gateway.consent import access_token_hash, jwk_thumbprint, public_jwk
from gateway.consent.lookup import certno_lookup
from gateway.ingest.pseudonym import pseudonym
from gateway.synth import CityFiles
from tests.conftest import BASE_URL, IDENTITY_KEY, LOOKUP_KEY, PSEUDONYM_KEY, Env

ENROLLMENT = "/v1/persons/enrollment"
SETTLEMENTS = "/v1/persons/settlements"
ENROLLMENT_TYPES = ["enrollment.status", "enrollment.insutype", "enrollment.admdvs"]
CLAIM_TYPES = ["settlements.summary", "settlements.amounts", "settlements.diagnosis_category"]


class Insurer:
    """An insurer's DPoP key and the proofs it signs."""

    def __init__(self) -> None:
        self.key = Ed25519PrivateKey.generate()
        self.jwk = public_jwk(self.key.public_key())
        self.jkt = jwk_thumbprint(self.jwk)

    def proof(self, access_token: str, *, path: str = ENROLLMENT, htm: str = "POST",
              htu: str | None = None, iat: int | None = None) -> str:
        claims = {"jti": secrets.token_urlsafe(16), "htm": htm,
                  "htu": htu if htu is not None else BASE_URL + path,
                  "iat": int(time.time()) if iat is None else iat,
                  "ath": access_token_hash(access_token)}
        return jwt.encode(claims, self.key, algorithm="EdDSA",
                          headers={"typ": "dpop+jwt", "jwk": self.jwk})


@dataclass(frozen=True)
class Person:
    certno: str
    psn_id: int
    insutype: str
    insu_admdvs: str
    settlements: int  # in the test city, all years

    @property
    def lookup(self) -> str:
        return certno_lookup(LOOKUP_KEY, self.certno)


def sample_persons(city: CityFiles, count: int = 3) -> list[Person]:
    """Persons enrolled since before yesterday and still enrolled, with settlements."""
    persons = pq.read_table(city.persons, columns=["psn_no", "certno", "insutype",
                                                   "insu_admdvs", "psn_insu_date",
                                                   "insu_end_date"])
    settled = pq.read_table(city.settlements, columns=["psn_no"]).column("psn_no")
    counts = dict(zip(*(c.to_pylist() for c in pc.value_counts(settled).flatten()),
                      strict=True))
    cutoff = date.today() - timedelta(days=2)
    out: list[Person] = []
    for row in persons.to_pylist():
        if row["insu_end_date"] is not None or row["psn_insu_date"] > cutoff:
            continue
        n = counts.get(row["psn_no"], 0)
        if n < 3:
            continue
        out.append(Person(certno=row["certno"], psn_id=pseudonym(PSEUDONYM_KEY, row["psn_no"]),
                          insutype=row["insutype"], insu_admdvs=row["insu_admdvs"],
                          settlements=n))
        if len(out) == count:
            break
    assert len(out) == count
    return out


def consent_body(person: Person, insurer: Insurer, *, org: str = "ins-a",
                 purpose: str = "enrollment_check", datatypes: list[str] | None = None,
                 period: tuple[str, str] = ("2020-01-01", "2030-12-31"),
                 certno: str | None = "", **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "insurer": org,
        "purpose": purpose,
        "datatypes": datatypes or (ENROLLMENT_TYPES if purpose == "enrollment_check"
                                   else CLAIM_TYPES),
        "period": {"start": period[0], "end": period[1]},
        "valid_until": (datetime.now(UTC) + timedelta(days=30)).isoformat(),
        "dpop_jkt": insurer.jkt,
        **extra,
    }
    if certno is not None:
        body["certno"] = certno or person.certno
    return body


def give_consent(env: Env, body: dict[str, Any], headers: dict[str, str] | None = None
                 ) -> dict[str, Any]:
    response = env.client.post("/v1/consents", json=body,
                               headers=headers or env.headers("admin"))
    assert response.status_code == 201, response.text
    return dict(response.json())


def subject_headers(person: Person, **overrides: Any) -> dict[str, str]:
    token = issue_subject_token(IDENTITY_KEY, lookup=person.lookup,
                                **{"audience": BASE_URL, **overrides})
    return {"Authorization": f"Bearer {token}"}


def call(env: Env, path: str, access_token: str, consent: str | None, proof: str | None,
         body: dict[str, Any] | None = None) -> Any:
    headers = {"Authorization": f"Bearer {access_token}"}
    if consent is not None:
        headers["Consent"] = consent
    if proof is not None:
        headers["DPoP"] = proof
    return env.client.post(path, json=body if body is not None else {}, headers=headers)


def refused_once(env: Env, send: Any, status: int, code: str, consent_id: str | None, *,
                 action: str = "persons.enrollment") -> Any:
    """``send()`` is refused with ``status``/``code`` and adds exactly one audit entry."""
    before = env.gateway.audit.size()
    response = send()
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    assert env.gateway.audit.size() == before + 1
    entry = env.gateway.audit.get(before)
    assert entry.action == action
    assert entry.decision == "deny"
    assert entry.error_code == code
    assert entry.consent_id == consent_id
    if consent_id is not None:
        assert entry.subject_pseudonym is not None
        assert len(entry.subject_pseudonym) == 32
    return response
