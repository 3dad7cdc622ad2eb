"""Persons signed in with the identity service's token: consents for themselves, revoking
their own (only their own), and the list of every access to their data."""

from __future__ import annotations

import pytest

from gateway.synth import CityFiles
from tests.conftest import Env
from tests.http.persons import (
    ENROLLMENT,
    Insurer,
    Person,
    call,
    consent_body,
    give_consent,
    sample_persons,
    subject_headers,
)


@pytest.fixture(scope="module")
def people(city: CityFiles) -> list[Person]:
    return sample_persons(city, 2)


def test_person_consents_revokes_and_sees_every_access(env: Env, people: list[Person]) -> None:
    me, other = people
    insurer = Insurer()
    mine = subject_headers(me)
    issued = give_consent(env, consent_body(me, insurer, certno=None), headers=mine)
    stored = env.gateway.state.get_consent(issued["consent_id"])
    assert stored is not None
    assert stored.record.subject == f"psn:{me.psn_id:x}"
    assert stored.record.created_by.startswith("subject:")

    # The insurer uses it once (allowed), then once more (refused: single use).
    token = env.token("insurer")
    assert call(env, ENROLLMENT, token, issued["token"], insurer.proof(token)).status_code == 200
    assert call(env, ENROLLMENT, token, issued["token"], insurer.proof(token)).status_code == 403
    # An admin records a second consent on the person's behalf; it stays live.
    second = give_consent(env, consent_body(me, insurer))

    response = env.client.get("/v1/subjects/me/access", headers=mine)
    assert response.status_code == 200, response.text
    body = response.json()
    checks = [a for a in body["access"] if a["action"] == "persons.enrollment"]
    assert [(a["decision"], a["who"]["org"], a["purpose"]) for a in checks] == [
        ("allow", "ins-a", "enrollment_check"), ("deny", "ins-a", "enrollment_check")]
    assert checks[1]["error_code"] == "consent_used"
    assert checks[0]["fields"] == ["enrollment.admdvs", "enrollment.insutype",
                                   "enrollment.status"]
    assert {a["action"] for a in body["access"]} >= {"consents.create", "persons.enrollment"}
    # single use but unexpired: the first consent is still listed as live
    assert {c["consent_id"] for c in body["consents"]} == {issued["consent_id"],
                                                            second["consent_id"]}
    assert me.certno not in response.text
    assert str(me.psn_id) not in response.text

    # Another person sees none of it, and cannot revoke my consent (404: not theirs to know).
    theirs = env.client.get("/v1/subjects/me/access", headers=subject_headers(other)).json()
    assert theirs == {"access": [], "consents": []}
    foreign = env.client.delete(f"/v1/consents/{second['consent_id']}",
                                headers=subject_headers(other))
    assert foreign.status_code == 404
    # I can.
    revoked = env.client.delete(f"/v1/consents/{second['consent_id']}", headers=mine)
    assert revoked.status_code == 200, revoked.text
    live = env.client.get("/v1/subjects/me/access", headers=mine).json()["consents"]
    assert [c["consent_id"] for c in live] == [issued["consent_id"]]


def test_subject_tokens_are_checked(env: Env, people: list[Person]) -> None:
    me = people[0]
    insurer = Insurer()
    # A person may not name anyone by certno, nor use admin or insurer actions.
    named = env.client.post("/v1/consents", json=consent_body(me, insurer),
                            headers=subject_headers(me))
    assert named.status_code == 422
    assert env.client.get("/v1/catalog", headers=subject_headers(me)).status_code == 401
    # An access token is no subject token, and the reverse.
    assert env.client.get("/v1/subjects/me/access",
                          headers=env.headers("insurer")).status_code == 401
    for headers, code in (
        (subject_headers(me, lifetime_s=-100), "subject_token_expired"),
        (subject_headers(me, lifetime_s=7200), "subject_token_lifetime"),
        (subject_headers(me, issuer="https://attacker.test"), "subject_token_wrong_issuer"),
        (subject_headers(me, audience="https://other.test"),
         "subject_token_wrong_audience"),
        (subject_headers(Person("11010519491231002X", 1, "", "", 0)), "subject_unknown"),
    ):
        before = env.gateway.audit.size()
        response = env.client.get("/v1/subjects/me/access", headers=headers)
        assert response.status_code == 401, response.text
        assert response.json()["error"]["code"] == code
        assert env.gateway.audit.size() == before + 1
        assert env.gateway.audit.get(before).error_code == code
