"""Individual consent over HTTP: an admin records a person's consent (the person named by
身份证号), the insurer checks the person's enrollment with the consent token and a DPoP proof;
the whole negative suite of the issue, each refused with its status and code and audited once;
key rotation through the gateway's own use cases."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.auth.keys import load_private_key
from gateway.auth.tokens import Principal
from gateway.consent.keys import b64url_encode
from gateway.consent.token import REQUIRED_CLAIMS
from gateway.errors import Conflict
from gateway.service.bootstrap import build_gateway
from gateway.synth import CityFiles
from tests.conftest import BASE_URL, Env
from tests.http.persons import (
    ENROLLMENT,
    SETTLEMENTS,
    Insurer,
    Person,
    call,
    consent_body,
    give_consent,
    refused_once,
    sample_persons,
)

ADMIN = Principal(client_id="t-admin", role="admin", org=None,
                  token_id="test")


@pytest.fixture
def insurer() -> Insurer:
    return Insurer()


@pytest.fixture(scope="module")
def person(city: CityFiles) -> Person:
    return sample_persons(city, 1)[0]


def check(env: Env, access_token: str, consent: str | None, proof: str | None) -> Any:
    return call(env, ENROLLMENT, access_token, consent, proof)


def test_enrollment_check_happy_path_then_replay_refused(env: Env, insurer: Insurer,
                                                          person: Person) -> None:
    before = env.gateway.audit.size()
    issued = give_consent(env, consent_body(person, insurer))
    # The consent call's audit entry names the person only by the pairwise pseudonym.
    created = next(e for e in (env.gateway.audit.get(i)
                               for i in range(before, env.gateway.audit.size()))
                   if e.action == "consents.create")
    assert created.subject_pseudonym is not None
    assert person.certno not in created.model_dump_json()
    assert str(person.psn_id) not in created.model_dump_json()
    header = jwt.get_unverified_header(issued["token"])
    assert header["typ"] == "consent+jwt"
    claims = jwt.decode(issued["token"], options={"verify_signature": False})
    assert claims["client_id"] == "ins-a"
    assert claims["cnf"] == {"jkt": insurer.jkt}
    for raw in (person.certno, str(person.psn_id)):
        assert raw not in issued["token"]
        assert raw not in str(claims)
    assert claims["exp"] - claims["iat"] <= 600
    stored = env.gateway.state.get_consent(issued["consent_id"])
    assert stored is not None
    assert person.certno not in stored.record.model_dump_json()

    token = env.token("insurer")
    before = env.gateway.audit.size()
    response = check(env, token, issued["token"], insurer.proof(token))
    assert response.status_code == 200, response.text
    assert response.json() == {"enrolled": True, "insutype": person.insutype,
                               "insu_admdvs": person.insu_admdvs}
    assert env.gateway.audit.size() == before + 1
    entry = env.gateway.audit.get(before)
    assert (entry.decision, entry.consent_id) == ("allow", issued["consent_id"])
    assert entry.subject_pseudonym == claims["sub"]
    assert entry.purpose == "enrollment_check"

    # single use: the same consent token, with a fresh proof, is refused
    refused_once(env, lambda: check(env, token, issued["token"], insurer.proof(token)),
                 403, "consent_used", issued["consent_id"])


def test_certno_is_normalized_and_never_echoed(env: Env, insurer: Insurer,
                                               person: Person) -> None:
    lower = person.certno.lower()
    issued = give_consent(env, consent_body(person, insurer, certno=f" {lower} "))
    stored = env.gateway.state.get_consent(issued["consent_id"])
    assert stored is not None
    assert stored.record.subject == f"psn:{person.psn_id:x}"
    # A valid but unknown 身份证号 is 404; a malformed one 422; neither is echoed or audited.
    unknown = "11010519491231002X"
    for certno, status in ((unknown, 404), (person.certno[:-1] + "Z", 422),
                           (person.certno[:17] + ("0" if person.certno[17] != "0" else "1"),
                            422)):
        before = env.gateway.audit.size()
        response = env.client.post("/v1/consents",
                                   json=consent_body(person, insurer, certno=certno),
                                   headers=env.headers("admin"))
        assert response.status_code == status, response.text
        assert certno not in response.text
        for index in range(before, env.gateway.audit.size()):
            assert certno not in env.gateway.audit.get(index).model_dump_json()
    missing = env.client.post("/v1/consents", json=consent_body(person, insurer, certno=None),
                              headers=env.headers("admin"))
    assert missing.status_code == 422


def test_revoked_consent_refused_on_next_request(env: Env, insurer: Insurer,
                                                 person: Person) -> None:
    issued = give_consent(env, consent_body(person, insurer))
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


def test_consents_are_managed_by_admins_only(env: Env, insurer: Insurer,
                                             person: Person) -> None:
    response = env.client.post("/v1/consents", json=consent_body(person, insurer),
                               headers=env.headers("insurer"))
    assert response.status_code == 403
    bad = consent_body(person, insurer)
    bad["datatypes"] = ["settlements.summary"]
    assert env.client.post("/v1/consents", json=bad,
                           headers=env.headers("admin")).status_code == 422


def test_jwks_lists_the_active_key(env: Env, insurer: Insurer, person: Person) -> None:
    response = env.client.get("/.well-known/jwks.json")
    assert response.status_code == 200
    keys = response.json()["keys"]
    assert len(keys) == 1
    assert (keys[0]["alg"], keys[0]["kty"], keys[0]["crv"]) == ("EdDSA", "OKP", "Ed25519")
    assert "d" not in keys[0]
    stored = env.gateway.state.consent_keys()
    assert [(k.kid, k.state) for k in stored] == [(keys[0]["kid"], "active")]
    issued = give_consent(env, consent_body(person, insurer))
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


# --- key rotation ---------------------------------------------------------------------------


def key_events(env: Env, since: int) -> list[dict[str, Any]]:
    entries = [env.gateway.audit.get(i) for i in range(since, env.gateway.audit.size())]
    return [dict(e.request or {}) for e in entries if e.action == "consents.keys"]


def test_key_rotation_publishes_first_and_retires_for_good(env: Env, insurer: Insurer,
                                                          person: Person) -> None:
    old_kid = env.client.get("/.well-known/jwks.json").json()["keys"][0]["kid"]
    old_token = give_consent(env, consent_body(person, insurer))["token"]
    before = env.gateway.audit.size()

    # A new key is published (pending) before it signs anything.
    new_kid = env.gateway.change_consent_key(ADMIN, "add").body["kid"]
    published = {k["kid"] for k in env.client.get("/.well-known/jwks.json").json()["keys"]}
    assert published == {old_kid, new_kid}
    still_old = give_consent(env, consent_body(person, insurer))["token"]
    assert jwt.get_unverified_header(still_old)["kid"] == old_kid
    # Activation waits until verifiers caching the JWKS (max-age 300 s) have seen it.
    with pytest.raises(Conflict, match="published for less than"):
        env.gateway.change_consent_key(ADMIN, "activate", new_kid, min_pending_s=300)
    env.gateway.change_consent_key(ADMIN, "activate", new_kid)
    fresh = give_consent(env, consent_body(person, insurer))
    assert jwt.get_unverified_header(fresh["token"])["kid"] == new_kid
    # Both verify while both are active.
    token = env.token("insurer")
    assert check(env, token, fresh["token"], insurer.proof(token)).status_code == 200

    # Retired: out of the JWKS, and a token it signed verifies nothing any more.
    env.gateway.change_consent_key(ADMIN, "retire", old_kid)
    published = {k["kid"] for k in env.client.get("/.well-known/jwks.json").json()["keys"]}
    assert published == {new_kid}
    refused_once(env, lambda: check(env, token, old_token, insurer.proof(token)),
                 401, "consent_key_retired", None)
    with pytest.raises(Conflict, match="retired"):
        env.gateway.change_consent_key(ADMIN, "activate", old_kid)
    with pytest.raises(Conflict, match="only active key"):
        env.gateway.change_consent_key(ADMIN, "retire", new_kid)

    events = key_events(env, before)
    assert [(e["op"], e.get("from"), e.get("to")) for e in events] == [
        ("add", None, "pending"),
        ("activate", None, None),  # refused: too early
        ("activate", "pending", "active"),
        ("retire", "active", "retired"),
        ("activate", None, None),  # refused: retired
        ("retire", None, None),  # refused: the only active key
    ]
    # A restarted worker follows the registry: the retired file key stays retired.
    again = build_gateway(env.settings)
    try:
        assert {k["kid"] for k in again.jwks()["keys"]} == {new_kid}
    finally:
        again.audit.close()


def test_a_key_retired_in_another_process_stops_verifying_here(env: Env, insurer: Insurer,
                                                               person: Person) -> None:
    issued = give_consent(env, consent_body(person, insurer))
    other = build_gateway(env.settings)  # another worker process, same state
    try:
        new_kid = other.change_consent_key(ADMIN, "add").body["kid"]
        other.change_consent_key(ADMIN, "activate", new_kid)
        old_kid = jwt.get_unverified_header(issued["token"])["kid"]
        other.change_consent_key(ADMIN, "retire", old_kid)
    finally:
        other.audit.close()
    token = env.token("insurer")
    refused_once(env, lambda: check(env, token, issued["token"], insurer.proof(token)),
                 401, "consent_key_retired", None)
    assert {k["kid"] for k in env.client.get("/.well-known/jwks.json").json()["keys"]} == {
        new_kid}


# --- the negative suite ---------------------------------------------------------------------


def _seg(obj: Any) -> str:
    text = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
    return b64url_encode(text.encode("utf-8"))


@dataclass
class Case:
    """One consented call to make and what must come back."""

    env: Env
    insurer: Insurer
    issued: dict[str, Any]
    access: str
    key: Ed25519PrivateKey
    other: str  # another consent's token (same insurer, another person)

    @property
    def token(self) -> str:
        return str(self.issued["token"])

    @property
    def header(self) -> dict[str, Any]:
        return dict(jwt.get_unverified_header(self.token))

    @property
    def claims(self) -> dict[str, Any]:
        return dict(jwt.decode(self.token, options={"verify_signature": False}))

    def signed(self, header: dict[str, Any] | str, claims: dict[str, Any] | str,
               key: Ed25519PrivateKey | None = None) -> str:
        signing_input = f"{_seg(header)}.{_seg(claims)}"
        sig = (key or self.key).sign(signing_input.encode("ascii"))
        return f"{signing_input}.{b64url_encode(sig)}"

    def send(self, consent: str | None = None, proof: str | None = "fresh",
             now: float | None = None) -> Any:
        if proof == "fresh":
            proof = self.insurer.proof(self.access, iat=int(now if now is not None
                                                            else self.env.clock()))
        return check(self.env, self.access, self.token if consent is None else consent, proof)


def _hs256(case: Case, secret: bytes) -> str:
    header = {**case.header, "alg": "HS256"}
    signing_input = f"{_seg(header)}.{_seg(case.claims)}"
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url_encode(mac)}"


def _public(case: Case, encoding: str) -> bytes:
    public = case.key.public_key()
    if encoding == "pem":
        return public.public_bytes(serialization.Encoding.PEM,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)
    if encoding == "der":
        return public.public_bytes(serialization.Encoding.DER,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)
    jwks = case.env.client.get("/.well-known/jwks.json").json()
    return json.dumps(jwks["keys"][0]).encode()


def _without(case: Case, name: str) -> str:
    return case.signed(case.header, {k: v for k, v in case.claims.items() if k != name})


def _with(case: Case, **claims: Any) -> str:
    return case.signed(case.header, {**case.claims, **claims})


def _header(case: Case, **members: Any) -> str:
    header = {**case.header, **members}
    return case.signed({k: v for k, v in header.items() if v is not None}, case.claims)


def _flip(case: Case) -> str:
    h, p, s = case.token.split(".")
    sig = bytearray(base64.urlsafe_b64decode(s + "=="))
    sig[10] ^= 0x01
    return f"{h}.{p}.{b64url_encode(bytes(sig))}"


def _swapped(case: Case) -> str:
    h, _, s = case.token.split(".")
    return f"{h}.{case.other.split('.')[1]}.{s}"


def _duplicate(case: Case) -> str:
    body = json.dumps(case.claims, separators=(",", ":"))
    return case.signed(case.header, body[:-1] + ',"sub":"someone-else-entirely-000000000"}')


SWAP_PERSON: list[Person] = []
NON_UTF8 = b'{"sub":"\xff"}'

# name -> (build the send() call, status, code, whether the consent id is known when refused)
NEGATIVE: dict[str, tuple[Callable[[Case], Any], int, str, bool]] = {
    "alg-none": (lambda c: c.send(f"{_seg({**c.header, 'alg': 'none'})}.{_seg(c.claims)}."),
                 401, "consent_bad_alg", False),
    "alg-NONE": (lambda c: c.send(f"{_seg({**c.header, 'alg': 'NONE'})}.{_seg(c.claims)}."),
                 401, "consent_bad_alg", False),
    "empty-signature": (lambda c: c.send(c.token.rsplit(".", 1)[0] + "."),
                        401, "consent_bad_signature", False),
    "hs256-pem": (lambda c: c.send(_hs256(c, _public(c, "pem"))), 401, "consent_bad_alg", False),
    "hs256-der": (lambda c: c.send(_hs256(c, _public(c, "der"))), 401, "consent_bad_alg", False),
    "hs256-jwk": (lambda c: c.send(_hs256(c, _public(c, "jwk"))), 401, "consent_bad_alg", False),
    "alg-es256": (lambda c: c.send(_header(c, alg="ES256")), 401, "consent_bad_alg", False),
    "kid-unknown": (lambda c: c.send(_header(c, kid=c.insurer.jkt)),
                    401, "consent_unknown_kid", False),
    "kid-not-string": (lambda c: c.send(_header(c, kid=12345)), 401, "consent_unknown_kid",
                       False),
    "kid-path-like": (lambda c: c.send(_header(c, kid="../../keys/consent-signing.pem")),
                      401, "consent_unknown_kid", False),
    "jku": (lambda c: c.send(_header(c, jku=BASE_URL + "/jwks.json")),
            401, "consent_forbidden_header", False),
    "x5u": (lambda c: c.send(_header(c, x5u=BASE_URL + "/cert.pem")),
            401, "consent_forbidden_header", False),
    "jwk": (lambda c: c.send(_header(c, jwk=c.insurer.jwk)),
            401, "consent_forbidden_header", False),
    "crit": (lambda c: c.send(_header(c, crit=["exp"])), 401, "consent_forbidden_header", False),
    "two-segments": (lambda c: c.send(c.token.rsplit(".", 1)[0]), 401, "consent_malformed",
                     False),
    "four-segments": (lambda c: c.send(c.token + ".AA"), 401, "consent_malformed", False),
    "bad-base64": (lambda c: c.send("*" + c.token[1:]), 401, "consent_malformed", False),
    "non-utf8": (lambda c: c.send(f"{_seg(c.header)}.{b64url_encode(NON_UTF8)}."
                                  + c.token.split(".")[2]), 401, "consent_malformed", False),
    "oversized": (lambda c: c.send(_with(c, pad="x" * 8192)), 401, "consent_too_large", False),
    "typ-missing": (lambda c: c.send(_header(c, typ=None)), 401, "consent_wrong_typ", False),
    "typ-jwt": (lambda c: c.send(_header(c, typ="JWT")), 401, "consent_wrong_typ", False),
    "access-token-as-consent": (lambda c: c.send(c.access), 401, "consent_wrong_typ", False),
    "flipped-signature-byte": (lambda c: c.send(_flip(c)), 401, "consent_bad_signature", False),
    "payload-swapped": (lambda c: c.send(_swapped(c)), 401, "consent_bad_signature", False),
    "signed-by-other-key": (lambda c: c.send(c.signed(c.header, c.claims,
                                                      Ed25519PrivateKey.generate())),
                            401, "consent_bad_signature", False),
    "duplicate-member": (lambda c: c.send(_duplicate(c)), 401, "consent_duplicate_member",
                         False),
    "wrong-aud": (lambda c: c.send(_with(c, aud="https://other.yibao.test")),
                  401, "consent_wrong_audience", False),
    "wrong-iss": (lambda c: c.send(_with(c, iss="https://attacker.test")),
                  401, "consent_wrong_issuer", False),
    "wrong-client": (lambda c: c.send(_with(c, client_id="ins-b")),
                     401, "consent_wrong_client", False),
    "expired": (lambda c: c.send(now=_at(c, c.claims["exp"] + 30.2)), 401, "consent_expired",
                False),
    "nbf-future": (lambda c: c.send(_with(c, nbf=int(time.time()) + 40,
                                          exp=int(time.time()) + 400)),
                   401, "consent_not_yet_valid", False),
    "dpop-missing": (lambda c: c.send(proof=None), 401, "dpop_missing", True),
    "dpop-stale": (lambda c: c.send(proof=c.insurer.proof(c.access, iat=int(time.time()) - 120)),
                   401, "dpop_stale", True),
    "dpop-wrong-method": (lambda c: c.send(proof=c.insurer.proof(c.access, htm="GET")),
                          401, "dpop_wrong_htm", True),
    "dpop-wrong-url": (lambda c: c.send(proof=c.insurer.proof(c.access, path="/v1/consents")),
                       401, "dpop_wrong_htu", True),
    "dpop-wrong-key": (lambda c: c.send(proof=Insurer().proof(c.access)), 401, "dpop_wrong_key",
                       True),
    "dpop-other-token": (lambda c: c.send(proof=c.insurer.proof(c.access + "x")),
                         401, "dpop_wrong_ath", True),
}
for _claim in REQUIRED_CLAIMS:
    NEGATIVE[f"missing-{_claim}"] = (
        lambda c, name=_claim: c.send(_without(c, name)), 401, "consent_missing_claim", False)


def _at(case: Case, moment: float) -> float:
    """Move the gateway's clock so that its now is ``moment``; returns it."""
    case.env.clock.offset = moment - time.time()
    return moment


@pytest.fixture
def case(env: Env, insurer: Insurer, person: Person, city: CityFiles) -> Case:
    if not SWAP_PERSON:
        SWAP_PERSON.append(sample_persons(city, 2)[1])
    issued = give_consent(env, consent_body(person, insurer))
    key = load_private_key(env.settings.consent_key_path)
    assert isinstance(key, Ed25519PrivateKey)
    other = give_consent(env, consent_body(SWAP_PERSON[0], insurer))["token"]
    return Case(env=env, insurer=insurer, issued=issued, access=env.token("insurer"), key=key,
                other=other)


@pytest.fixture
def no_outbound(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Records any outbound connection attempt (a jku/x5u must never be fetched)."""
    attempts: list[Any] = []

    def refuse(self: socket.socket, address: Any) -> None:
        attempts.append(address)
        raise OSError("outbound connection attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    return attempts


@pytest.mark.parametrize("name", sorted(NEGATIVE))
def test_negative_suite(name: str, case: Case, no_outbound: list[Any]) -> None:
    build, status, code, knows_consent = NEGATIVE[name]
    refused_once(case.env, lambda: build(case), status, code,
                 case.issued["consent_id"] if knows_consent else None)
    assert no_outbound == []


def test_dpop_replay_refused(case: Case) -> None:
    proof = case.insurer.proof(case.access)
    first = case.issued["token"]
    # Another consent: what is replayed is the proof.
    other_id = jwt.decode(case.other, options={"verify_signature": False})["consent_id"]
    assert case.send(first, proof=proof).status_code == 200
    refused_once(case.env, lambda: case.send(case.other, proof=proof),
                 401, "dpop_replay", other_id)


def test_a_proof_replayed_later_is_still_refused(case: Case) -> None:
    """Replay ids are stored under the expiry the proof itself gives (its iat), not the
    moment it was spent: a replay 50 s on, while the proof is still fresh, meets the first."""
    now = _at(case, float(int(time.time())))
    proof = case.insurer.proof(case.access, iat=int(now))
    other_id = jwt.decode(case.other, options={"verify_signature": False})["consent_id"]
    assert case.send(case.issued["token"], proof=proof).status_code == 200
    _at(case, now + 50)
    refused_once(case.env, lambda: case.send(case.other, proof=proof),
                 401, "dpop_replay", other_id)


def test_a_single_use_consent_used_again_later_is_still_refused(case: Case) -> None:
    now = _at(case, float(int(time.time())))
    assert case.send(now=now).status_code == 200
    later = _at(case, now + 300)
    refused_once(case.env, lambda: case.send(now=later), 403, "consent_used",
                 case.issued["consent_id"])


def test_a_proof_issued_before_the_replay_store_changed_is_refused(case: Case) -> None:
    """After migration 4 the ids of proofs spent before it are gone; the gateway refuses a
    proof whose iat is not past the bound the migration kept (the state store's own test
    covers how it is computed)."""
    now = int(_at(case, float(int(time.time()))))
    config = case.env.gateway._consent_config()
    config.dpop_iat_bound = now - 10  # as loaded from the store after such a migration
    refused_once(case.env, lambda: case.send(proof=case.insurer.proof(case.access,
                                                                      iat=now - 10)),
                 401, "dpop_stale", case.issued["consent_id"])
    assert case.send(proof=case.insurer.proof(case.access, iat=now - 9)).status_code == 200


@pytest.mark.parametrize(("offset", "accepted"), [(29.5, True), (30.2, False)])
def test_expiry_leeway_boundary(case: Case, offset: float, accepted: bool) -> None:
    now = _at(case, case.claims["exp"] + offset)
    response = case.send(now=now)
    if accepted:
        assert response.status_code == 200, response.text
    else:
        assert response.json()["error"]["code"] == "consent_expired"


@pytest.mark.parametrize(("ahead", "accepted"), [(29, True), (31, False)])
def test_not_before_leeway_boundary(case: Case, ahead: int, accepted: bool) -> None:
    now = int(time.time())
    _at(case, now)
    token = _with(case, iat=now + ahead, nbf=now + ahead, exp=now + ahead + 500)
    response = case.send(token, now=now)
    if accepted:
        assert response.status_code == 200, response.text
    else:
        assert response.json()["error"]["code"] in ("consent_not_yet_valid",
                                                     "consent_issued_in_future")


def test_scope_outside_the_consent_is_refused(env: Env, insurer: Insurer,
                                              person: Person) -> None:
    """Datatype, purpose and period outside the consent: 403 consent_scope, audited once."""
    claims = give_consent(env, consent_body(
        person, insurer, purpose="claims_fast_track", datatypes=["settlements.summary"],
        period=("2023-01-01", "2023-12-31")))
    enrollment = give_consent(env, consent_body(person, insurer))
    token = env.token("insurer")

    def settlements(consent: str, body: dict[str, Any]) -> Any:
        return call(env, SETTLEMENTS, token, consent,
                    insurer.proof(token, path=SETTLEMENTS), body)

    inside = {"datatypes": ["settlements.summary"],
              "period": {"start": "2023-03-01", "end": "2023-03-31"}}
    for body in ({**inside, "datatypes": ["settlements.amounts"]},
                 {**inside, "period": {"start": "2023-12-01", "end": "2024-01-31"}}):
        refused_once(env, lambda b=body: settlements(claims["token"], b), 403, "consent_scope",
                     None, action="persons.settlements")
    refused_once(env, lambda: settlements(enrollment["token"], inside), 403, "consent_scope",
                 None, action="persons.settlements")
    # and a claims consent is no enrollment consent
    refused_once(env, lambda: check(env, token, claims["token"], insurer.proof(token)),
                 403, "consent_scope", None)
    assert settlements(claims["token"], inside).status_code == 200


def test_consent_of_another_insurer_refused(env: Env, insurer: Insurer,
                                            person: Person) -> None:
    issued = give_consent(env, consent_body(person, insurer, org="ins-b"))
    token = env.token("insurer")  # ins-a presents ins-b's consent
    refused_once(env, lambda: check(env, token, issued["token"], insurer.proof(token)),
                 401, "consent_wrong_client", None)


def test_missing_consent_refused(env: Env, insurer: Insurer) -> None:
    # The first consent call of a process also records the start-up key registration.
    env.client.get("/.well-known/jwks.json")
    token = env.token("insurer")
    refused_once(env, lambda: check(env, token, None, insurer.proof(token)),
                 401, "consent_missing", None)


def test_consent_key_file_is_never_in_the_state(env: Env) -> None:
    text = Path(env.settings.state_path).read_bytes()
    pem = env.settings.consent_key_path.read_bytes()
    assert pem not in text
    assert b"PRIVATE KEY" not in text


@pytest.mark.parametrize(("path", "body", "named"), [
    (ENROLLMENT, b'{"psn_no": "secret-value"}', "psn_no: extra_forbidden"),
    (ENROLLMENT, b"not json at all", "body: json_invalid"),
    (ENROLLMENT, b"[]", "body: model_type"),
    (SETTLEMENTS, b'{"datatypes": ["settlements.summary"]}', "period: missing"),
    (SETTLEMENTS, b'{"datatypes": [], "period": {"start": "2024-01-01", "end": "2024-02-01"}}',
     "datatypes: too_short"),
])
def test_a_bad_body_is_400_naming_the_member_never_the_value(
    env: Env, insurer: Insurer, path: str, body: bytes, named: str,
) -> None:
    """The person endpoints read their body themselves (gateway.api.deps.json_body): the
    same 400 as FastAPI's body parameters, after authentication (no token: 401 first)."""
    token = env.token("insurer")
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json",
               "DPoP": insurer.proof(token, path=path)}
    response = env.client.post(path, content=body, headers=headers)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "bad_request"
    assert named in error["message"]
    assert "secret-value" not in response.text
    anonymous = env.client.post(path, content=body,
                                headers={"Content-Type": "application/json"})
    assert anonymous.status_code == 401


def test_the_person_endpoints_document_their_bodies(env: Env) -> None:
    spec = env.client.get("/openapi.json").json()
    for path, member in ((ENROLLMENT, None), (SETTLEMENTS, "period")):
        body = spec["paths"][path]["post"]["requestBody"]
        assert body["required"] is True
        schema = body["content"]["application/json"]["schema"]
        assert schema["additionalProperties"] is False
        if member:
            assert member in schema["properties"]


def test_person_endpoints_are_counted_by_route_in_metrics(env: Env, insurer: Insurer) -> None:
    """The direct routes still go through the middleware: counted under their template."""
    token = env.token("insurer")
    for path in (ENROLLMENT, SETTLEMENTS):
        env.client.post(path, json={}, headers={"Authorization": f"Bearer {token}",
                                                "DPoP": insurer.proof(token, path=path)})
    text = env.client.get("/metrics").text
    for path in (ENROLLMENT, SETTLEMENTS):
        assert f'gateway_requests_total{{route="{path}",status=' in text


def test_a_serving_app_holds_the_person_index_before_its_first_check(env: Env) -> None:
    """The app's start (lifespan) loads the serving version's persons: the first 投保身份校验
    does not wait for a read of the whole table."""
    config = env.gateway.consent
    assert config is not None
    assert config.persons is not None
    assert not config.persons.stale()
