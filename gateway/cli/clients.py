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
from gateway.state.store import ClientRecord, SqliteStateStore

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
    SqliteStateStore(settings.state_path).add_client(
        ClientRecord(client_id=client_id, role=role, org=org,
                     public_key_pem=public_key_pem(key), alg=checked_alg)
    )


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
