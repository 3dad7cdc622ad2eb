"""Token endpoint (RFC 7523 client assertions) and bearer-token checks."""

from __future__ import annotations

import time
from pathlib import Path

import jwt

from gateway.auth.keys import generate_private_key, load_private_key
from gateway.auth.tokens import ASSERTION_TYPE
from tests.conftest import Env


def _exchange(env: Env, assertion: str, **form: str) -> tuple[int, dict[str, object]]:
    data = {"grant_type": "client_credentials", "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": assertion, **form}
    response = env.client.post("/v1/oauth/token", data=data)
    return response.status_code, response.json()


def test_eddsa_and_es256_clients_get_rfc9068_tokens(env: Env) -> None:
    for role in ("insurer", "insurer_b"):
        status, body = _exchange(env, env.assertion(role))
        assert status == 200, body
        token = str(body["access_token"])
        assert jwt.get_unverified_header(token)["typ"] == "at+jwt"
        claims = jwt.decode(token, options={"verify_signature": False})
        assert claims["client_id"] == claims["sub"]
        assert claims["role"] == "insurer"
        assert claims["exp"] - claims["iat"] <= 3600
        assert body["token_type"] == "Bearer"


def test_assertion_is_single_use(env: Env) -> None:
    assertion = env.assertion("insurer")
    assert _exchange(env, assertion)[0] == 200
    status, body = _exchange(env, assertion)
    assert status == 401
    assert "already used" in str(body["error"])


def test_assertion_must_name_the_token_url(env: Env) -> None:
    status, body = _exchange(env, env.assertion("insurer", aud="http://testserver/other"))
    assert status == 401
    assert body["error"]["code"] == "invalid_client"  # type: ignore[index]


def test_assertion_signed_by_another_key_is_refused(env: Env) -> None:
    now = int(time.time())
    forged = jwt.encode({"iss": "t-insurer", "sub": "t-insurer", "aud": env.settings.token_url,
                         "iat": now, "exp": now + 60, "jti": "x1"},
                        generate_private_key("EdDSA"), algorithm="EdDSA")
    assert _exchange(env, forged)[0] == 401


def test_algorithm_is_fixed_per_client(env: Env) -> None:
    # An HMAC token "signed" with the client's public key must never verify (alg confusion).
    now = int(time.time())
    claims = {"iss": "t-insurer", "sub": "t-insurer", "aud": env.settings.token_url,
              "iat": now, "exp": now + 60, "jti": "x2"}
    forged = jwt.encode(claims, "not-a-key-but-long-enough-for-hs256-32b", algorithm="HS256")
    assert _exchange(env, forged)[0] == 401


def test_expired_and_overlong_assertions_are_refused(env: Env) -> None:
    key = load_private_key(Path(env.credentials["insurer"]["private_key_path"]))
    now = int(time.time())
    base = {"iss": "t-insurer", "sub": "t-insurer", "aud": env.settings.token_url}
    expired = jwt.encode({**base, "iat": now - 600, "exp": now - 300, "jti": "e1"}, key,
                         algorithm="EdDSA")
    overlong = jwt.encode({**base, "iat": now, "exp": now + 86400, "jti": "e2"}, key,
                          algorithm="EdDSA")
    assert _exchange(env, expired)[0] == 401
    assert _exchange(env, overlong)[0] == 401


def test_unknown_client_and_wrong_grant_type(env: Env) -> None:
    assert _exchange(env, env.assertion("insurer", client_id="nobody"))[0] == 401
    status, body = _exchange(env, env.assertion("insurer"), grant_type="password")
    assert status == 401
    assert body["error"]["code"] == "unsupported_grant_type"  # type: ignore[index]


def test_token_endpoint_needs_a_form(env: Env) -> None:
    response = env.client.post("/v1/oauth/token", json={"grant_type": "client_credentials"})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "bad_request"


def test_assertion_is_not_an_access_token_and_vice_versa(env: Env) -> None:
    assertion = env.assertion("insurer")
    response = env.client.get("/v1/catalog", headers={"Authorization": f"Bearer {assertion}"})
    assert response.status_code == 401
    token = env.token("insurer")
    assert _exchange(env, token)[0] == 401


def test_tampered_access_token_is_refused(env: Env) -> None:
    token = env.token("insurer")
    header, _, signature = token.split(".")
    claims = jwt.decode(token, options={"verify_signature": False})
    claims["role"] = "admin"
    forged_payload = jwt.utils.base64url_encode(
        jwt.api_jws.json.dumps(claims).encode()).decode()
    forged = ".".join([header, forged_payload, signature])
    response = env.client.get("/v1/grants", headers={"Authorization": f"Bearer {forged}"})
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


def test_missing_or_malformed_bearer(env: Env) -> None:
    for header in ({}, {"Authorization": "Basic abc"}, {"Authorization": "Bearer not.a.jwt"}):
        response = env.client.get("/v1/catalog", headers=header)
        assert response.status_code == 401
        assert set(response.json()["error"]) >= {"code", "message"}
