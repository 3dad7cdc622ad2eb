"""Access tokens verified once are remembered by their exact characters, but every check of
time still runs on every request, with the issuer's clock."""

from __future__ import annotations

import json
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.auth import tokens as tokens_module
from gateway.auth.tokens import AccessTokenIssuer, Principal
from gateway.consent.keys import b64url_encode
from gateway.errors import AuthenticationFailed
from gateway.state.store import SqliteStateStore

PRINCIPAL = Principal(client_id="ins-1", role="insurer", org="ins-a", token_id="t")


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def issuer(tmp_path: Path) -> AccessTokenIssuer:
    return AccessTokenIssuer(signing_key=Ed25519PrivateKey.generate(),
                             issuer="https://gw.test", token_url="https://gw.test/v1/oauth/token",
                             state=SqliteStateStore(tmp_path / "state.sqlite"), ttl_s=600,
                             clock=Clock(1_800_000_000.0))


def test_a_remembered_token_still_expires(issuer: AccessTokenIssuer) -> None:
    clock = issuer.clock
    assert isinstance(clock, Clock)
    token = issuer.issue(PRINCIPAL)
    assert issuer.verify(token).client_id == "ins-1"
    clock.now += 600 + 29  # inside the leeway
    assert issuer.verify(token).org == "ins-a"
    clock.now += 1
    with pytest.raises(AuthenticationFailed, match="expired"):
        issuer.verify(token)
    with pytest.raises(AuthenticationFailed, match="expired"):  # and not served again
        issuer.verify(token)


def test_a_token_issued_in_the_future_is_refused_until_its_time(issuer: AccessTokenIssuer
                                                                  ) -> None:
    clock = issuer.clock
    assert isinstance(clock, Clock)
    clock.now += 120
    token = issuer.issue(PRINCIPAL)
    clock.now -= 120
    with pytest.raises(AuthenticationFailed, match="invalid access token"):
        issuer.verify(token)
    clock.now += 120
    assert issuer.verify(token).client_id == "ins-1"


def test_a_tampered_twin_is_verified_afresh_and_refused(issuer: AccessTokenIssuer) -> None:
    token = issuer.issue(PRINCIPAL)
    issuer.verify(token)
    header, _, signature = token.split(".")
    claims = jwt.decode(token, options={"verify_signature": False})
    forged_payload = b64url_encode(
        json.dumps({**claims, "org": "ins-b"}, separators=(",", ":")).encode())
    with pytest.raises(AuthenticationFailed):
        issuer.verify(f"{header}.{forged_payload}.{signature}")


def test_the_memory_is_bounded(issuer: AccessTokenIssuer, monkeypatch: pytest.MonkeyPatch
                               ) -> None:
    monkeypatch.setattr(tokens_module, "_MAX_REMEMBERED_TOKENS", 8)
    tokens = [issuer.issue(PRINCIPAL) for _ in range(20)]
    for token in tokens:
        issuer.verify(token)
        assert len(issuer._verified) <= 8
    assert all(issuer.verify(t).client_id == "ins-1" for t in tokens)  # forgotten: again
