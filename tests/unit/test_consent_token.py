"""Tests of the consent token: issuing, the key set, pairwise subjects and every refusal.

The tampering cases are data files in ``tests/vectors/consent/``, each named after its tampering
with a description, the verification context and the expected error code; run this module as a
script to regenerate them (``.venv/bin/python tests/unit/test_consent_token.py``), and
``test_vectors_are_current`` keeps the committed files equal to what the code produces. Keys are
the published RFC 8032 §7.1 test keys, so no key file is committed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import sys
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import ValidationError

from gateway.consent import (
    CONSENT_TYP,
    ConsentKeySet,
    ConsentRecord,
    DataPeriod,
    KeyEvent,
    VerifiedConsent,
    issue_consent_token,
    jwk_thumbprint,
    pairwise_sub,
    public_jwk,
    verify_consent_token,
)
from gateway.consent.keys import b64url_encode
from gateway.consent.token import REQUIRED_CLAIMS
from gateway.errors import AuthenticationFailed, GatewayError, PolicyDenied, ValidationFailed

REPO = Path(__file__).resolve().parents[2]
VECTOR_DIR = REPO / "tests" / "vectors" / "consent"

# RFC 8032 §7.1 TEST 1, 2 and 3 secret keys (published test keys).
SEED_1 = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
SEED_2 = bytes.fromhex("4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb")
SEED_3 = bytes.fromhex("c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7")
KID_1 = "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"  # RFC 8037 Appendix A.3

ISSUER = "https://consent.yibao.test"
AUDIENCE = "https://gateway.yibao.test"
CLIENT_A = "insurer-pingan"
CLIENT_B = "insurer-taikang"
PAIRWISE_KEY = bytes(range(32))
NOW = 1_790_000_000  # 2026-09-21T13:33:20Z
LEEWAY = 30
PERSON = "psn:3f9a6c0e1b7d4a52"
B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
NON_UTF8_PAYLOAD = b'{"sub":"\xff"}'
ENROLLMENT_TYPES = ["enrollment.admdvs", "enrollment.insutype", "enrollment.status"]


def key(seed: bytes) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(seed)


DPOP_JKT = jwk_thumbprint(public_jwk(key(SEED_3).public_key()))


def key_set(*, retired: tuple[str, ...] = ()) -> ConsentKeySet:
    """TEST 1 (signing) and TEST 2 (older, still active) keys; ``retired`` kids retired."""
    ks = ConsentKeySet()
    kid_2 = ks.add(key(SEED_2), now=0)
    ks.activate(kid_2, now=1)
    kid_1 = ks.add(key(SEED_1), now=2)
    ks.activate(kid_1, now=3)
    for kid in retired:
        ks.retire(kid, now=4)
    return ks


def enrollment_record(**changes: Any) -> ConsentRecord:
    fields: dict[str, Any] = {
        "consent_id": "consent-0001",
        "subject": PERSON,
        "insurer_org": "中国平安",
        "purpose": "enrollment_check",
        "datatypes": tuple(ENROLLMENT_TYPES),
        "period_start": date(2026, 1, 1),
        "period_end": date(2026, 9, 21),
        "valid_from": datetime(2026, 9, 1, tzinfo=UTC),
        "valid_until": datetime(2026, 12, 31, tzinfo=UTC),
        "created_by": "admin-01",
        "created_at": datetime(2026, 9, 1, tzinfo=UTC),
        "single_use": True,
    }
    fields.update(changes)
    return ConsentRecord(**fields)


def claims_record(**changes: Any) -> ConsentRecord:
    fields: dict[str, Any] = {
        "consent_id": "consent-0002",
        "purpose": "claims_fast_track",
        "datatypes": ("settlements.amounts", "settlements.summary"),
        "period_start": date(2026, 1, 1),
        "period_end": date(2026, 6, 30),
        "single_use": False,
        "claim_id": "CLM-2026-0001",
    }
    fields.update(changes)
    return enrollment_record(**fields)


def issue(record: ConsentRecord | None = None, *, ks: ConsentKeySet | None = None,
          lifetime: timedelta = timedelta(minutes=10), jti: str = "jti-0001",
          now: float = NOW) -> str:
    return issue_consent_token(
        record or enrollment_record(),
        key_set=ks or key_set(),
        issuer=ISSUER,
        audience=AUDIENCE,
        client_id=CLIENT_A,
        cnf_jkt=DPOP_JKT,
        now=now,
        max_lifetime=lifetime,
        pairwise_key=PAIRWISE_KEY,
        jti=jti,
    )


def context(**changes: Any) -> dict[str, Any]:
    ctx: dict[str, Any] = {
        "now": NOW,
        "client_id": CLIENT_A,
        "purpose": "enrollment_check",
        "required_datatypes": ["enrollment.status"],
        "period": None,
        "claim_id": None,
        "retired": [],
    }
    ctx.update(changes)
    return ctx


def verify(token: object, ctx: dict[str, Any] | None = None) -> VerifiedConsent:
    ctx = ctx or context()
    period = ctx["period"]
    return verify_consent_token(
        token,
        key_set=key_set(retired=tuple(ctx["retired"])),
        issuer=ISSUER,
        audience=AUDIENCE,
        client_id=ctx["client_id"],
        now=ctx["now"],
        leeway_s=LEEWAY,
        required_datatypes=ctx["required_datatypes"],
        purpose=ctx["purpose"],
        period=DataPeriod(start=period["start"], end=period["end"]) if period else None,
        claim_id=ctx["claim_id"],
    )


def refused(token: object, ctx: dict[str, Any] | None = None) -> GatewayError:
    with pytest.raises((AuthenticationFailed, PolicyDenied)) as info:
        verify(token, ctx)
    return info.value


# -- hand-built tokens -----------------------------------------------------------------------


def _compact(obj: dict[str, Any] | str) -> str:
    text = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"),
                                                       ensure_ascii=False)
    return b64url_encode(text.encode("utf-8"))


def parts(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    h, p, _ = token.split(".")
    return (json.loads(base64.urlsafe_b64decode(h + "==")),
            json.loads(base64.urlsafe_b64decode(p + "==")))


def signed(header: dict[str, Any] | str, payload: dict[str, Any] | str,
           seed: bytes = SEED_1) -> str:
    """A token signed by the TEST key ``seed`` over exactly these header and payload texts."""
    signing_input = f"{_compact(header)}.{_compact(payload)}"
    return f"{signing_input}.{b64url_encode(key(seed).sign(signing_input.encode()))}"


def hs256(header: dict[str, Any], payload: dict[str, Any], secret: bytes) -> str:
    signing_input = f"{_compact(header)}.{_compact(payload)}"
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url_encode(mac)}"


def header_1(**changes: Any) -> dict[str, Any]:
    header: dict[str, Any] = {"alg": "EdDSA", "kid": KID_1, "typ": CONSENT_TYP}
    header.update(changes)
    return {k: v for k, v in header.items() if v is not None}


# -- vectors ---------------------------------------------------------------------------------


def build_vectors() -> dict[str, dict[str, Any]]:
    """Every tampered token, deterministically (Ed25519 signatures are deterministic)."""
    good = issue()
    _, claims = parts(good)
    public_1 = key(SEED_1).public_key()
    pem = public_1.public_bytes(serialization.Encoding.PEM,
                                serialization.PublicFormat.SubjectPublicKeyInfo)
    der = public_1.public_bytes(serialization.Encoding.DER,
                                serialization.PublicFormat.SubjectPublicKeyInfo)
    jwk_json = json.dumps({**public_jwk(public_1), "kid": KID_1}).encode()
    h, p, s = good.split(".")
    sig = bytearray(base64.urlsafe_b64decode(s + "=="))
    sig[10] ^= 0x01
    other = issue(claims_record(), jti="jti-0002")

    v: dict[str, dict[str, Any]] = {}

    def add(name: str, description: str, expected: str | None, token: str,
            ctx: dict[str, Any] | None = None) -> None:
        v[name] = {"description": description, "expected_error": expected, "token": token,
                   "context": ctx or context()}

    add("valid-token", "an enrollment-check consent token as issued", None, good)
    add("valid-claims-token", "a claims consent token read inside its period and claim", None,
        other, context(purpose="claims_fast_track", required_datatypes=["settlements.summary"],
                       period={"start": "2026-02-01", "end": "2026-03-31"},
                       claim_id="CLM-2026-0001"))
    # -- algorithm ---------------------------------------------------------------------------
    add("alg-none", "alg none, signature kept", "consent_bad_alg",
        f"{_compact(header_1(alg='none'))}.{p}.{s}")
    add("alg-none-empty-signature", "alg none with an empty signature segment",
        "consent_bad_alg", f"{_compact(header_1(alg='none'))}.{p}.")
    add("alg-NONE-uppercase", "alg NONE in capitals, empty signature", "consent_bad_alg",
        f"{_compact(header_1(alg='NONE'))}.{p}.")
    add("hs256-public-key-pem", "HS256 keyed with the consent public key as PEM",
        "consent_bad_alg", hs256(header_1(alg="HS256"), claims, pem))
    add("hs256-public-key-der", "HS256 keyed with the consent public key as DER",
        "consent_bad_alg", hs256(header_1(alg="HS256"), claims, der))
    add("hs256-public-key-jwk", "HS256 keyed with the consent public key as JWK JSON",
        "consent_bad_alg", hs256(header_1(alg="HS256"), claims, jwk_json))
    add("alg-es256-for-eddsa-kid", "header alg ES256 for an EdDSA kid", "consent_bad_alg",
        signed(header_1(alg="ES256"), claims))
    add("alg-not-string", "header alg is a list", "consent_bad_alg",
        signed(header_1(alg=["EdDSA"]), claims))
    # -- kid ---------------------------------------------------------------------------------
    add("unknown-kid", "kid of a key not in the set (the DPoP key's thumbprint)",
        "consent_unknown_kid", signed(header_1(kid=DPOP_JKT), claims, SEED_3))
    add("kid-missing", "no kid", "consent_unknown_kid", signed(header_1(kid=None), claims))
    add("kid-not-string", "kid is a number", "consent_unknown_kid",
        signed(header_1(kid=1), claims))
    add("kid-path-like", "kid is a path", "consent_unknown_kid",
        signed(header_1(kid="../../keys/consent.pem"), claims))
    add("retired-key", "signed by a key that has since been retired", "consent_key_retired",
        good, context(retired=[KID_1]))
    # -- forbidden header members ----------------------------------------------------------
    for name, value in [("jku", "https://attacker.test/jwks.json"),
                        ("x5u", "https://attacker.test/cert.pem"),
                        ("jwk", public_jwk(key(SEED_3).public_key())),
                        ("x5c", ["MIIB"]), ("crit", ["exp"]), ("b64", False)]:
        add(f"{name}-header", f"header carries {name} (never fetched, never trusted)",
            "consent_forbidden_header", signed(header_1(**{name: value}), claims))
    # -- typ ---------------------------------------------------------------------------------
    add("typ-missing", "no typ header", "consent_wrong_typ", signed(header_1(typ=None), claims))
    add("typ-jwt", "typ JWT", "consent_wrong_typ", signed(header_1(typ="JWT"), claims))
    add("access-token-as-consent", "an at+jwt access token presented as a consent",
        "consent_wrong_typ", signed(header_1(typ="at+jwt"), claims))
    # -- shape -------------------------------------------------------------------------------
    add("two-segments", "signature segment cut", "consent_malformed", f"{h}.{p}")
    add("four-segments", "an extra segment", "consent_malformed", f"{good}.{s}")
    add("bad-base64", "a character outside base64url in the payload", "consent_malformed",
        f"{h}.{p[:10]}*{p[11:]}.{s}")
    add("padded-base64", "padding on the header segment", "consent_malformed",
        f"{h}{'=' * (-len(h) % 4) or '=='}.{p}.{s}")
    add("non-canonical-signature", "the signature's unused trailing bits set (a re-encoded "
        "twin)", "consent_malformed",
        f"{h}.{p}.{s[:-1]}{B64URL[B64URL.index(s[-1]) + 1]}")
    add("non-utf8-payload", "payload bytes are not UTF-8", "consent_malformed",
        f"{h}.{b64url_encode(NON_UTF8_PAYLOAD)}.{s}")
    add("payload-not-object", "payload is a JSON array", "consent_malformed",
        f"{h}.{_compact('[1,2]')}.{s}")
    add("oversized", "a token over 8192 characters", "consent_too_large",
        signed(header_1(), {**claims, "pad": "x" * 8192}))
    # -- duplicates --------------------------------------------------------------------------
    body = json.dumps(claims, separators=(",", ":"), ensure_ascii=False)
    add("duplicate-sub", "payload names sub twice (json.loads would keep the second)",
        "consent_duplicate_member", signed(header_1(), body[:-1] + ',"sub":"someone-else"}'))
    add("duplicate-alg-header", "header names alg twice, none then EdDSA",
        "consent_duplicate_member",
        signed(f'{{"alg":"none","alg":"EdDSA","kid":"{KID_1}","typ":"{CONSENT_TYP}"}}', claims))
    nested = body.replace('"purpose":"enrollment_check"',
                          '"purpose":"enrollment_check","purpose":"claims_fast_track"')
    add("duplicate-nested-member", "authorization_details entry names purpose twice",
        "consent_duplicate_member", signed(header_1(), nested))
    # -- signature ---------------------------------------------------------------------------
    add("flipped-signature-byte", "one bit of the signature flipped", "consent_bad_signature",
        f"{h}.{p}.{b64url_encode(bytes(sig))}")
    add("tampered-payload", "client_id changed to insurer B after signing", "consent_bad_signature",
        f"{h}.{_compact({**claims, 'client_id': CLIENT_B})}.{s}")
    add("payload-swapped", "payload of another consent token under this signature",
        "consent_bad_signature", f"{h}.{other.split('.')[1]}.{s}")
    add("signed-by-other-key", "TEST 2 signature under the TEST 1 kid",
        "consent_bad_signature", signed(header_1(), claims, SEED_2))
    add("empty-signature", "alg EdDSA, empty signature", "consent_bad_signature", f"{h}.{p}.")
    # -- claims ------------------------------------------------------------------------------
    for name in REQUIRED_CLAIMS:
        add(f"missing-{name}", f"claim {name} removed, re-signed", "consent_missing_claim",
            signed(header_1(), {k: val for k, val in claims.items() if k != name}))
    add("exp-string", "exp as a string", "consent_bad_claim",
        signed(header_1(), {**claims, "exp": str(claims["exp"])}))
    add("cnf-without-jkt", "cnf without jkt", "consent_bad_claim",
        signed(header_1(), {**claims, "cnf": {"jwk": {}}}))
    add("details-unknown-type", "authorization_details of another type", "consent_bad_claim",
        signed(header_1(), {**claims, "authorization_details": [
            {**claims["authorization_details"][0], "type": "payment_initiation"}]}))
    add("wrong-issuer", "iss of another issuer", "consent_wrong_issuer",
        signed(header_1(), {**claims, "iss": "https://attacker.test"}))
    add("wrong-audience", "aud of another service", "consent_wrong_audience",
        signed(header_1(), {**claims, "aud": "https://other.yibao.test"}))
    add("audience-list", "aud as a list containing the gateway (aud is exactly one string)",
        "consent_bad_claim",
        signed(header_1(), {**claims, "aud": [AUDIENCE, "https://other.yibao.test"]}))
    add("other-insurer", "insurer A's consent presented by insurer B", "consent_wrong_client",
        good, context(client_id=CLIENT_B))
    # -- time --------------------------------------------------------------------------------
    exp = claims["exp"]
    add("expired-beyond-leeway", "now = exp + leeway", "consent_expired", good,
        context(now=exp + LEEWAY))
    add("expired-within-leeway", "now = exp + leeway - 1: accepted", None, good,
        context(now=exp + LEEWAY - 1))
    add("nbf-future", "nbf beyond now + leeway", "consent_not_yet_valid", good,
        context(now=NOW - LEEWAY - 1))
    add("nbf-within-leeway", "nbf = now + leeway: accepted", None, good,
        context(now=NOW - LEEWAY))
    add("iat-future", "iat beyond now + leeway (nbf kept)", "consent_issued_in_future",
        signed(header_1(), {**claims, "iat": NOW + LEEWAY + 1, "nbf": NOW}))
    add("lifetime-too-long", "an enrollment check token living an hour", "consent_lifetime",
        signed(header_1(), {**claims, "exp": NOW + 3600}))
    # -- scope -------------------------------------------------------------------------------
    claims_ctx = context(purpose="claims_fast_track", required_datatypes=["settlements.summary"],
                         period={"start": "2026-02-01", "end": "2026-03-31"},
                         claim_id="CLM-2026-0001")
    add("datatype-outside", "asks settlements.diagnosis_category, not consented",
        "consent_scope", other,
        {**claims_ctx, "required_datatypes": ["settlements.diagnosis_category"]})
    add("purpose-outside", "claims consent used for an enrollment check", "consent_scope",
        other, {**claims_ctx, "purpose": "enrollment_check"})
    add("period-outside", "asks data past the consented period", "consent_scope", other,
        {**claims_ctx, "period": {"start": "2026-06-01", "end": "2026-07-31"}})
    add("claim-outside", "asks another claim than the consented one", "consent_scope", other,
        {**claims_ctx, "claim_id": "CLM-2026-0002"})
    add("no-datatype", "the request names no datatype", "consent_scope", good,
        context(required_datatypes=[]))
    return v


def write_vectors(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in out_dir.glob("*.json"):
        path.unlink()
    for name, vector in build_vectors().items():
        text = json.dumps(vector, ensure_ascii=False, indent=1) + "\n"
        (out_dir / f"{name}.json").write_text(text, encoding="utf-8")


VECTORS = sorted(VECTOR_DIR.glob("*.json"))


def test_vectors_are_current() -> None:
    expected = {f"{name}.json": json.dumps(vec, ensure_ascii=False, indent=1) + "\n"
                for name, vec in build_vectors().items()}
    committed = {p.name: p.read_text(encoding="utf-8") for p in VECTORS}
    assert sorted(committed) == sorted(expected)
    for name, text in expected.items():
        assert committed[name] == text, name


@pytest.mark.parametrize("path", VECTORS, ids=[p.stem for p in VECTORS])
def test_vector(path: Path) -> None:
    vector = json.loads(path.read_text(encoding="utf-8"))
    assert vector["description"]
    if vector["expected_error"] is None:
        verify(vector["token"], vector["context"])
    else:
        assert refused(vector["token"], vector["context"]).code == vector["expected_error"]


def test_every_error_code_has_a_vector() -> None:
    codes = {v["expected_error"] for v in build_vectors().values()}
    assert codes >= {
        "consent_malformed", "consent_too_large", "consent_duplicate_member",
        "consent_forbidden_header", "consent_wrong_typ", "consent_bad_alg",
        "consent_unknown_kid", "consent_key_retired", "consent_bad_signature",
        "consent_missing_claim", "consent_bad_claim", "consent_wrong_issuer",
        "consent_wrong_audience", "consent_wrong_client", "consent_expired",
        "consent_not_yet_valid", "consent_issued_in_future", "consent_lifetime", "consent_scope",
    }


# -- positive path and what it exposes -------------------------------------------------------


def test_valid_token_profile() -> None:
    token = issue()
    header, claims = parts(token)
    assert header == {"alg": "EdDSA", "kid": KID_1, "typ": "consent+jwt"}
    assert set(claims) == set(REQUIRED_CLAIMS)
    assert claims["exp"] - claims["iat"] == 600
    assert claims["authorization_details"] == [{
        "type": "yibao_data_access", "actions": ["read"], "datatypes": ENROLLMENT_TYPES,
        "purpose": "enrollment_check", "period": {"start": "2026-01-01", "end": "2026-09-21"},
    }]
    assert claims["cnf"] == {"jkt": DPOP_JKT}
    assert PERSON not in token
    assert PERSON not in json.dumps(claims)
    verified = verify(token)
    assert (verified.jti, verified.consent_id, verified.single_use) == ("jti-0001",
                                                                       "consent-0001", True)
    assert verified.cnf_jkt == DPOP_JKT
    assert verified.replay_window_ends == claims["exp"] + LEEWAY
    assert verified.policy_input()["consent_id"] == "consent-0001"


def test_reencoded_twin_keeps_jti_but_changes_hash() -> None:
    """Why single use is keyed by jti: the same signed claims re-encoded (here: key order and
    whitespace, re-signed by the holder of the key; a parser-level twin is the same idea) hash
    differently, yet name the same jti."""
    token = issue()
    _, claims = parts(token)
    twin = signed(header_1(), json.dumps(dict(reversed(claims.items())), indent=1))
    assert hashlib.sha256(twin.encode()).digest() != hashlib.sha256(token.encode()).digest()
    assert verify(twin).jti == verify(token).jti


def test_scope_refusal_is_a_policy_denial_with_its_code() -> None:
    err = refused(issue(), context(required_datatypes=["settlements.summary"]))
    assert isinstance(err, PolicyDenied)
    assert err.status == 403
    assert err.to_json()["error"]["code"] == "consent_scope"


def test_authentication_refusals_are_401() -> None:
    err = refused(issue(), context(client_id=CLIENT_B))
    assert isinstance(err, AuthenticationFailed)
    assert (err.status, err.code) == (401, "consent_wrong_client")
    assert err.to_json()["error"]["code"] == "consent_wrong_client"


def test_non_string_token_is_malformed() -> None:
    assert refused(b"a.b.c").code == "consent_malformed"
    assert refused(None).code == "consent_malformed"


def test_older_active_key_still_verifies() -> None:
    ks = ConsentKeySet()
    kid_2 = ks.add(key(SEED_2), now=0)
    ks.activate(kid_2, now=1)
    token = issue(ks=ks)
    assert parts(token)[0]["kid"] == kid_2
    verify(token)  # the standard set has TEST 2 active too


# -- issuing bounds --------------------------------------------------------------------------


def test_enrollment_token_is_capped_at_ten_minutes() -> None:
    _, claims = parts(issue(lifetime=timedelta(days=30)))
    assert claims["exp"] - claims["iat"] == 600


def test_claims_token_is_capped_by_consent_validity() -> None:
    _, claims = parts(issue(claims_record(), lifetime=timedelta(days=365)))
    assert claims["exp"] == int(datetime(2026, 12, 31, tzinfo=UTC).timestamp())
    _, short = parts(issue(claims_record(), lifetime=timedelta(hours=1)))
    assert short["exp"] - short["iat"] == 3600


def test_issue_refuses_inactive_or_out_of_validity_consents() -> None:
    with pytest.raises(ValidationFailed):
        issue(enrollment_record(state="revoked"))
    with pytest.raises(ValidationFailed):
        issue(now=datetime(2027, 1, 1, tzinfo=UTC).timestamp())
    with pytest.raises(ValidationFailed):
        issue(now=datetime(2026, 8, 31, tzinfo=UTC).timestamp())
    with pytest.raises(ValidationFailed):
        issue(lifetime=timedelta(0))


def test_model_refuses_what_a_consent_may_not_say() -> None:
    with pytest.raises(ValidationError):
        enrollment_record(single_use=False)  # an enrollment check is single use
    with pytest.raises(ValidationError):
        enrollment_record(datatypes=("settlements.summary",))  # not for this purpose
    with pytest.raises(ValidationError):
        enrollment_record(subject="42010119900101123X")  # a 身份证号, not a pseudonym
    with pytest.raises(ValidationError):
        enrollment_record(purpose="marketing")
    with pytest.raises(ValidationError):
        enrollment_record(valid_until=datetime(2026, 8, 1, tzinfo=UTC))
    with pytest.raises(ValidationError):
        enrollment_record(valid_from=datetime(2026, 9, 1))  # naive


# -- key set ---------------------------------------------------------------------------------


def test_key_rotation() -> None:
    events: list[KeyEvent] = []
    ks = ConsentKeySet(on_change=events.append)
    kid_2 = ks.add(key(SEED_2), now=10)
    with pytest.raises(ValidationFailed):
        ks.signing_key()  # pending keys sign nothing
    assert [k["kid"] for k in ks.publish_jwks()["keys"]] == [kid_2]  # published before use
    ks.activate(kid_2, now=20)
    kid_1 = ks.add(key(SEED_1), now=30)
    assert ks.signing_key()[0] == kid_2
    ks.activate(kid_1, now=40)
    assert ks.signing_key()[0] == kid_1 == KID_1
    ks.retire(kid_2, now=50)
    assert [k["kid"] for k in ks.publish_jwks()["keys"]] == [kid_1]
    assert ks.publish_jwks()["keys"][0] == {
        "crv": "Ed25519", "kty": "OKP", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo",
        "kid": KID_1, "alg": "EdDSA", "use": "sig",
    }
    with pytest.raises(ValidationFailed):
        ks.activate(kid_2, now=60)  # retired is final
    with pytest.raises(ValidationFailed):
        ks.add(key(SEED_2), now=70)  # and cannot come back
    assert [(e.kid, e.old_state, e.new_state, e.at) for e in events] == [
        (kid_2, None, "pending", 10), (kid_2, "pending", "active", 20),
        (kid_1, None, "pending", 30), (kid_1, "pending", "active", 40),
        (kid_2, "active", "retired", 50),
    ]


def test_public_only_key_verifies_but_never_signs() -> None:
    ks = ConsentKeySet()
    kid = ks.add(key(SEED_1).public_key(), now=0)
    ks.activate(kid, now=1)
    with pytest.raises(ValidationFailed):
        ks.signing_key()
    verify_consent_token(issue(), key_set=ks, issuer=ISSUER, audience=AUDIENCE,
                         client_id=CLIENT_A, now=NOW, required_datatypes=["enrollment.status"],
                         purpose="enrollment_check")


# -- pairwise subjects -----------------------------------------------------------------------


def test_pairwise_subjects_are_unlinkable_and_stable() -> None:
    a = pairwise_sub(PAIRWISE_KEY, PERSON, "中国平安")
    b = pairwise_sub(PAIRWISE_KEY, PERSON, "泰康人寿")
    assert a != b
    assert len(a) == len(b) == 32
    assert a == pairwise_sub(PAIRWISE_KEY, PERSON, "中国平安")
    assert a != pairwise_sub(bytes(32), PERSON, "中国平安")
    assert parts(issue())[1]["sub"] == a
    # the separator keeps (person, org) pairs apart
    assert pairwise_sub(PAIRWISE_KEY, "ab", "c") != pairwise_sub(PAIRWISE_KEY, "a", "bc")


def test_pairwise_subject_refuses_identity_numbers_and_short_keys() -> None:
    with pytest.raises(ValidationFailed):
        pairwise_sub(PAIRWISE_KEY, "42010119900101123X", "中国平安")
    with pytest.raises(ValidationFailed):
        pairwise_sub(b"short", PERSON, "中国平安")


def test_thumbprint_known_answer() -> None:
    # RFC 8037 Appendix A.3
    assert jwk_thumbprint(public_jwk(key(SEED_1).public_key())) == KID_1
    # RFC 7638 §3.1 member order for EC: crv, kty, x, y whatever the input order
    jwk = {"y": "y", "x": "x", "kty": "EC", "crv": "P-256", "kid": "ignored"}
    digest = hashlib.sha256(b'{"crv":"P-256","kty":"EC","x":"x","y":"y"}').digest()
    assert jwk_thumbprint(jwk) == b64url_encode(digest)



def test_consent_token_is_refused_where_an_access_token_is_expected() -> None:
    from typing import cast

    from gateway.auth.tokens import AccessTokenIssuer

    issuer = AccessTokenIssuer(signing_key=key(SEED_1), issuer=AUDIENCE,
                               token_url=AUDIENCE + "/oauth/token", state=cast(Any, None))
    with pytest.raises(AuthenticationFailed, match="not an access token"):
        issuer.verify(issue())


if __name__ == "__main__":
    write_vectors(VECTOR_DIR)
    sys.exit(0)


# -- 身份证号 lookup and subject sign-in tokens ------------------------------------------------


def test_certno_lookup_is_keyed_normalized_and_checked() -> None:
    from gateway.consent.lookup import certno_lookup, is_lookup, normalize_certno

    certno = "11010519491231002X"  # GB 11643 example: check character X
    assert normalize_certno(" 11010519491231002x") == certno
    a = certno_lookup(bytes(32), certno)
    assert is_lookup(a)
    assert certno not in a
    assert a != certno_lookup(bytes(range(32)), certno)  # another key, another value
    reference = hmac.new(bytes(32), b"yibao-certno-lookup:" + certno.encode(),
                         hashlib.sha256).hexdigest()
    assert a == reference
    for bad in ("11010519491231002", "110105194912310021", "1101051949123100XX", "x" * 18):
        with pytest.raises(ValidationFailed) as err:
            normalize_certno(bad)
        assert bad not in err.value.message
    with pytest.raises(ValidationFailed):
        certno_lookup(bytes(16), certno)


def _subject_verifier(now: float = NOW) -> Any:
    from gateway.auth.subjects import SubjectTokenVerifier

    return SubjectTokenVerifier(key(SEED_1).public_key(), audience=AUDIENCE,
                                clock=lambda: now)


def test_subject_token_round_trip_and_refusals() -> None:
    from gateway.auth.subjects import SUBJECT_TYP, issue_subject_token

    lookup = "ab" * 32
    good = issue_subject_token(key(SEED_1), lookup=lookup, audience=AUDIENCE, now=NOW)
    assert _subject_verifier().verify(good).lookup == lookup
    claims = json.loads(base64.urlsafe_b64decode(good.split(".")[1] + "=="))

    def signed(header: dict[str, Any], body: dict[str, Any], seed: bytes = SEED_1) -> str:
        signing_input = f"{_compact(header)}.{_compact(body)}"
        return f"{signing_input}.{b64url_encode(key(seed).sign(signing_input.encode()))}"

    header = {"alg": "EdDSA", "typ": SUBJECT_TYP}
    cases = {
        "subject_token_forbidden_header": signed({**header, "kid": "x"}, claims),
        "subject_token_wrong_typ": signed({**header, "typ": CONSENT_TYP}, claims),
        "subject_token_bad_alg": signed({**header, "alg": "HS256"}, claims),
        "subject_token_bad_signature": signed(header, claims, SEED_2),
        "subject_token_missing_claim": signed(header, {k: v for k, v in claims.items()
                                                       if k != "jti"}),
        "subject_token_bad_claim": signed(header, {**claims, "sub": "11010519491231002X"}),
        "subject_token_wrong_issuer": signed(header, {**claims, "iss": "https://x.test"}),
        "subject_token_wrong_audience": signed(header, {**claims, "aud": "https://x.test"}),
        "subject_token_lifetime": signed(header, {**claims, "exp": claims["iat"] + 7200}),
        "subject_token_duplicate_member": signed(
            header, json.dumps(claims, separators=(",", ":"))[:-1] + f',"sub":"{"cd" * 32}"}}'),
    }
    for code, token in cases.items():
        with pytest.raises(AuthenticationFailed) as err:
            _subject_verifier().verify(token)
        assert err.value.code == code, code
    with pytest.raises(AuthenticationFailed) as err:
        _subject_verifier(now=claims["exp"] + 30).verify(good)
    assert err.value.code == "subject_token_expired"
    assert _subject_verifier(now=claims["exp"] + 29).verify(good).lookup == lookup
