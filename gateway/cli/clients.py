"""Client registration and token fetching shared by the CLI and the demo."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx

from gateway.auth.keys import (
    Alg,
    generate_private_key,
    load_private_key,
    public_key_pem,
    write_private_key,
)
from gateway.auth.tokens import ASSERTION_TYPE, make_client_assertion
from gateway.errors import AuthenticationFailed, ValidationFailed
from gateway.settings import Settings
from gateway.state.store import ClientRecord, open_state_store

__all__ = ["fetch_token", "register_client", "request_token"]

_ROLES = ("admin", "insurer", "auditor")


def register_client(
    settings: Settings, *, client_id: str, role: str, org: str | None, alg: str, key_path: Path
) -> None:
    if role not in _ROLES:
        raise ValidationFailed(f"role must be one of {', '.join(_ROLES)}")
    if role == "insurer" and not org:
        raise ValidationFailed("an insurer client needs --org")
    if alg not in ("EdDSA", "ES256"):
        raise ValidationFailed("alg must be EdDSA or ES256")
    checked_alg: Alg = "EdDSA" if alg == "EdDSA" else "ES256"
    key = generate_private_key(checked_alg)
    write_private_key(key_path, key)
    state = open_state_store(settings.state_url, settings.state_path)
    try:
        state.add_client(ClientRecord(client_id=client_id, role=role, org=org,
                                      public_key_pem=public_key_pem(key), alg=checked_alg))
    finally:
        state.close()


def request_token(base_url: str, client_id: str, key_path: Path, alg: str) -> str:
    """RFC 7523 client credentials: sign an assertion, exchange it for an access token."""
    token_url = base_url.rstrip("/") + "/v1/oauth/token"
    assertion = make_client_assertion(load_private_key(key_path), client_id=client_id,
                                      token_url=token_url, alg=alg)
    response = httpx.post(token_url, data={
        "grant_type": "client_credentials",
        "client_assertion_type": ASSERTION_TYPE,
        "client_assertion": assertion,
    }, timeout=10.0)
    if response.status_code != 200:
        raise AuthenticationFailed(f"token request failed with HTTP {response.status_code}")
    token: Any = response.json()["access_token"]
    return str(token)


def fetch_token(credentials: Path, role: str) -> str:
    creds = json.loads(credentials.read_text("utf-8"))
    client = creds["clients"].get(role)
    if client is None:
        raise ValidationFailed(f"no {role} client in {credentials.name}")
    return request_token(creds["base_url"], client["client_id"],
                         Path(client["private_key_path"]), client["alg"])


def consent_walkthrough(credentials: Path) -> dict[str, Any]:
    """Every consent path against a running demo, as an insurer and a person would call it:
    an admin consents for a sample person (by 身份证号), the insurer checks enrollment and reads
    settlements (Consent + DPoP), the person lists every access and revokes."""
    import secrets
    import subprocess
    import sys
    import time
    from datetime import UTC, datetime, timedelta

    import jwt

    from gateway.consent import access_token_hash, public_jwk

    creds = json.loads(credentials.read_text("utf-8"))
    base = creds["base_url"]
    insurer = creds["clients"]["insurer"]
    dpop_key = load_private_key(Path(insurer["dpop_key_path"]))
    jwk = public_jwk(dpop_key.public_key())
    certno = creds["persons"][0]["certno"]
    admin = fetch_token(credentials, "admin")
    access = fetch_token(credentials, "insurer")

    def consent(purpose: str, datatypes: list[str]) -> dict[str, Any]:
        response = httpx.post(base + "/v1/consents", timeout=30,
                              headers={"Authorization": f"Bearer {admin}"}, json={
            "certno": certno, "insurer": insurer["org"], "purpose": purpose,
            "datatypes": datatypes, "period": {"start": "2020-01-01", "end": "2030-12-31"},
            "valid_until": (datetime.now(UTC) + timedelta(days=30)).isoformat(),
            "dpop_jkt": insurer["dpop_jkt"]})
        answer: dict[str, Any] = response.json()
        return answer

    def person_call(path: str, token: str, body: dict[str, Any]) -> Any:
        proof = jwt.encode({"jti": secrets.token_urlsafe(16), "htm": "POST", "htu": base + path,
                            "iat": int(time.time()), "ath": access_token_hash(access)},
                           dpop_key, algorithm="EdDSA",
                           headers={"typ": "dpop+jwt", "jwk": jwk})
        return httpx.post(base + path, json=body, timeout=30, headers={
            "Authorization": f"Bearer {access}", "Consent": token, "DPoP": proof}).json()

    check = consent("enrollment_check",
                    ["enrollment.status", "enrollment.insutype", "enrollment.admdvs"])
    claims = consent("claims_fast_track", ["settlements.summary", "settlements.amounts",
                                           "settlements.diagnosis_category"])
    out: dict[str, Any] = {
        "enrollment": person_call("/v1/persons/enrollment", check["token"], {}),
        "settlements": person_call("/v1/persons/settlements", claims["token"], {
            "datatypes": ["settlements.summary", "settlements.diagnosis_category"],
            "period": {"start": "2020-01-01", "end": "2030-12-31"}}),
    }
    subject = subprocess.run(  # noqa: S603 - our own CLI, fixed arguments
        [sys.executable, "-m", "gateway.cli.main", "token", "subject", certno, "--workdir",
         str(credentials.parent)], capture_output=True, text=True, check=True).stdout.strip()
    person = {"Authorization": f"Bearer {subject}"}
    out["revoked"] = httpx.delete(f"{base}/v1/consents/{claims['consent_id']}", headers=person,
                                  timeout=30).json()
    out["my_access"] = httpx.get(base + "/v1/subjects/me/access", headers=person,
                                 timeout=30).json()
    return out


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 3 or sys.argv[1] != "walkthrough":
        raise SystemExit("usage: python -m gateway.cli.clients walkthrough CREDENTIALS")
    print(json.dumps(consent_walkthrough(Path(sys.argv[2])), ensure_ascii=False, indent=1))
