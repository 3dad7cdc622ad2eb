"""Individual consent over HTTP: an admin records a person's consent, the insurer checks the
person's enrollment with the consent token and a DPoP proof; every refusal is audited once."""

from __future__ import annotations

import secrets
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.consent import access_token_hash, jwk_thumbprint, public_jwk
from gateway.service.bootstrap import build_gateway
from tests.conftest import BASE_URL, Env

ENROLLMENT = "/v1/persons/enrollment"


class Insurer:
    """An insurer's DPoP key and the proofs it signs."""

    def __init__(self) -> None:
        self.key = Ed25519PrivateKey.generate()
        self.jwk = public_jwk(self.key.public_key())
        self.jkt = jwk_thumbprint(self.jwk)

    def proof(self, access_token: str, *, htu: str = BASE_URL + ENROLLMENT) -> str:
        claims = {"jti": secrets.token_urlsafe(16), "htm": "POST", "htu": htu,
                  "iat": int(time.time()), "ath": access_token_hash(access_token)}
        return jwt.encode(claims, self.key, algorithm="EdDSA",
                          headers={"typ": "dpop+jwt", "jwk": self.jwk})


def enrolled_person(env: Env) -> tuple[int, str, str]:
    _, rows, _ = env.gateway.store.fetch(
        "SELECT psn_id, insutype, insu_admdvs FROM persons WHERE insu_end_date IS NULL "
        "AND psn_insu_date <= current_date - 2 ORDER BY psn_id LIMIT 1")
    assert rows
    return int(rows[0][0]), str(rows[0][1]), str(rows[0][2])


def consent_body(psn_id: int, insurer: Insurer, *, org: str = "ins-a") -> dict[str, Any]:
    return {
        "subject": str(psn_id),
        "insurer": org,
        "purpose": "enrollment_check",
        "datatypes": ["enrollment.status", "enrollment.insutype", "enrollment.admdvs"],
        "period": {"start": "2020-01-01", "end": "2030-12-31"},
        "valid_until": (datetime.now(UTC) + timedelta(days=30)).isoformat(),
        "dpop_jkt": insurer.jkt,
    }


def give_consent(env: Env, body: dict[str, Any]) -> dict[str, Any]:
    response = env.client.post("/v1/consents", json=body, headers=env.headers("admin"))
    assert response.status_code == 201, response.text
    return dict(response.json())


def check(env: Env, access_token: str, consent: str, proof: str) -> Any:
    return env.client.post(ENROLLMENT, json={}, headers={
        "Authorization": f"Bearer {access_token}", "Consent": consent, "DPoP": proof})


def refused_once(env: Env, send: Any, status: int, code: str,
                 consent_id: str | None) -> None:
    """``send()`` is refused with ``status``/``code`` and adds exactly one audit entry."""
    before = env.gateway.audit.size()
    response = send()
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    assert env.gateway.audit.size() == before + 1
    entry = env.gateway.audit.get(before)
    assert entry.action == "persons.enrollment"
    assert entry.decision == "deny"
    assert entry.error_code == code
    assert entry.consent_id == consent_id
    if consent_id is not None:
        assert entry.subject_pseudonym is not None
        assert len(entry.subject_pseudonym) == 32


@pytest.fixture
def insurer() -> Insurer:
    return Insurer()


def test_enrollment_check_happy_path_then_replay_refused(env: Env, insurer: Insurer) -> None:
    psn_id, insutype, admdvs = enrolled_person(env)
    issued = give_consent(env, consent_body(psn_id, insurer))
    assert issued["token"].count(".") == 2
    header = jwt.get_unverified_header(issued["token"])
    assert header["typ"] == "consent+jwt"
    claims = jwt.decode(issued["token"], options={"verify_signature": False})
    assert claims["client_id"] == "ins-a"
    assert claims["cnf"] == {"jkt": insurer.jkt}
    assert str(psn_id) not in issued["token"]
    assert str(psn_id) not in str(claims)
    assert claims["exp"] - claims["iat"] <= 600

    token = env.token("insurer")
    before = env.gateway.audit.size()
    response = check(env, token, issued["token"], insurer.proof(token))
    assert response.status_code == 200, response.text
    assert response.json() == {"enrolled": True, "insutype": insutype, "insu_admdvs": admdvs}
    assert env.gateway.audit.size() == before + 1
    entry = env.gateway.audit.get(before)
    assert (entry.decision, entry.consent_id) == ("allow", issued["consent_id"])
    assert entry.subject_pseudonym == claims["sub"]
    assert entry.purpose == "enrollment_check"

    # single use: the same consent token, with a fresh proof, is refused
    refused_once(env, lambda: check(env, token, issued["token"], insurer.proof(token)),
                 403, "consent_used", issued["consent_id"])


def test_revoked_consent_refused_on_next_request(env: Env, insurer: Insurer) -> None:
    psn_id, _, _ = enrolled_person(env)
    issued = give_consent(env, consent_body(psn_id, insurer))
    revoked = env.client.delete(f"/v1/consents/{issued['consent_id']}",
                                headers=env.headers("admin"))
    assert revoked.status_code == 200, revoked.text
    assert revoked.json()["state"] == "revoked"
    token = env.token("insurer")
    refused_once(env, lambda: check(env, token, issued["token"], insurer.proof(token)),
                 403, "consent_revoked", issued["consent_id"])
    again = env.client.delete(f"/v1/consents/{issued['consent_id']}",
                              headers=env.headers("admin"))
    assert again.status_code == 409


def test_dpop_with_another_key_refused(env: Env, insurer: Insurer) -> None:
    psn_id, _, _ = enrolled_person(env)
    issued = give_consent(env, consent_body(psn_id, insurer))
    token = env.token("insurer")
    thief = Insurer()
    refused_once(env, lambda: check(env, token, issued["token"], thief.proof(token)),
                 401, "dpop_wrong_key", issued["consent_id"])
    # the refused call spent nothing: the rightful holder still succeeds once
    assert check(env, token, issued["token"], insurer.proof(token)).status_code == 200


def test_dpop_for_another_url_refused(env: Env, insurer: Insurer) -> None:
    psn_id, _, _ = enrolled_person(env)
    issued = give_consent(env, consent_body(psn_id, insurer))
    token = env.token("insurer")
    refused_once(env, lambda: check(env, token, issued["token"],
                                    insurer.proof(token, htu=BASE_URL + "/v1/consents")),
                 401, "dpop_wrong_htu", issued["consent_id"])


def test_consent_of_another_insurer_refused(env: Env, insurer: Insurer) -> None:
    psn_id, _, _ = enrolled_person(env)
    issued = give_consent(env, consent_body(psn_id, insurer, org="ins-b"))
    token = env.token("insurer")  # ins-a presents ins-b's consent
    refused_once(env, lambda: check(env, token, issued["token"], insurer.proof(token)),
                 401, "consent_wrong_client", None)


def test_access_token_as_consent_refused(env: Env, insurer: Insurer) -> None:
    token = env.token("insurer")
    refused_once(env, lambda: check(env, token, token, insurer.proof(token)),
                 401, "consent_wrong_typ", None)


def test_missing_consent_refused(env: Env, insurer: Insurer) -> None:
    token = env.token("insurer")
    refused_once(env, lambda: env.client.post(ENROLLMENT, json={}, headers={
        "Authorization": f"Bearer {token}", "DPoP": insurer.proof(token)}),
                 401, "consent_missing", None)


def test_consents_are_managed_by_admins_only(env: Env, insurer: Insurer) -> None:
    psn_id, _, _ = enrolled_person(env)
    response = env.client.post("/v1/consents", json=consent_body(psn_id, insurer),
                               headers=env.headers("insurer"))
    assert response.status_code == 403
    unknown = env.client.post("/v1/consents", json=consent_body(12345, insurer),
                              headers=env.headers("admin"))
    assert unknown.status_code == 404
    bad = consent_body(psn_id, insurer)
    bad["datatypes"] = ["settlements.summary"]
    assert env.client.post("/v1/consents", json=bad,
                           headers=env.headers("admin")).status_code == 422


def test_jwks_lists_the_active_key(env: Env, insurer: Insurer) -> None:
    response = env.client.get("/.well-known/jwks.json")
    assert response.status_code == 200
    keys = response.json()["keys"]
    assert len(keys) == 1
    assert (keys[0]["alg"], keys[0]["kty"], keys[0]["crv"]) == ("EdDSA", "OKP", "Ed25519")
    assert "d" not in keys[0]
    stored = env.gateway.state.consent_keys()
    assert [(k.kid, k.state) for k in stored] == [(keys[0]["kid"], "active")]
    psn_id, _, _ = enrolled_person(env)
    issued = give_consent(env, consent_body(psn_id, insurer))
    assert jwt.get_unverified_header(issued["token"])["kid"] == keys[0]["kid"]
    verified = jwt.decode(issued["token"], jwt.PyJWK(keys[0]).key, algorithms=["EdDSA"],
                          audience=BASE_URL, issuer=BASE_URL)
    assert verified["consent_id"] == issued["consent_id"]


def test_restart_keeps_the_active_key(env: Env) -> None:
    kid = env.client.get("/.well-known/jwks.json").json()["keys"][0]["kid"]
    again = build_gateway(env.settings)
    try:
        assert again.jwks()["keys"][0]["kid"] == kid
        assert [(k.kid, k.state) for k in again.state.consent_keys()] == [(kid, "active")]
    finally:
        again.audit.close()
