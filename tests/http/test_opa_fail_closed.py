"""The gateway with the real OPA server as its policy engine, over HTTP (TestClient), built
from settings (GATEWAY_POLICY_ENGINE=opa, the signed bundle): decisions are audited with the
bundle revision and OPA's decision id; OPA killed, slower than its timeout or answering
garbage means 503 ``policy_unavailable``, audited, and ``/readyz`` not ready.

The slow and broken servers are a real HTTP proxy in front of the real OPA (tests/opa.py),
not a fake engine. Also: embedded (regorus) decisions are audited with the policy digest, and
an audit entry takes only the trace of its own decision."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.audit import AuditEntry
from gateway.policy.bundle import write_signing_key
from gateway.synth import CityFiles
from tests.conftest import Env, LoadedStore, make_env
from tests.http.persons import (
    ENROLLMENT,
    Insurer,
    call,
    consent_body,
    give_consent,
    sample_persons,
)
from tests.opa import OpaServer, Proxy, build_bundle, opa_binary

QUERY = {"purpose": "hmb_pricing", "dataset": "settlements", "dimensions": ["gend"],
         "measures": [{"fn": "count_persons"}]}
REVISION = "r-http-1"


@dataclass(frozen=True)
class SignedBundle:
    path: Path
    public_key: Path


@pytest.fixture(scope="module")
def signed_bundle(tmp_path_factory: pytest.TempPathFactory) -> SignedBundle:
    opa_binary()
    directory = tmp_path_factory.mktemp("opa-bundle")
    write_signing_key(directory / "k.pem", directory / "k.pub.pem")
    path = build_bundle(directory / "k.pem", directory / "bundle.tar.gz", revision=REVISION)
    return SignedBundle(path, directory / "k.pub.pem")


@dataclass
class OpaEnv:
    env: Env
    server: OpaServer
    proxy: Proxy


def _open(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, loaded_store: LoadedStore,
          signing_key_file: Path, bundle: SignedBundle, *, through_proxy: bool) -> OpaEnv:
    server = OpaServer(opa_binary(), bundle=bundle.path, verification_key=bundle.public_key)
    proxy = Proxy(server.port)
    monkeypatch.setenv("GATEWAY_POLICY_ENGINE", "opa")
    monkeypatch.setenv("GATEWAY_OPA_URL", proxy.url if through_proxy else server.url)
    monkeypatch.setenv("GATEWAY_OPA_TIMEOUT_S", "0.5")
    monkeypatch.setenv("GATEWAY_POLICY_BUNDLE_PATH", str(bundle.path))
    monkeypatch.setenv("GATEWAY_POLICY_BUNDLE_KEY_PATH", str(bundle.public_key))
    try:
        env = make_env(tmp_path, loaded_store.store_dir, signing_key_file)
    except BaseException:
        proxy.stop()
        server.stop()
        raise
    return OpaEnv(env, server, proxy)


@pytest.fixture
def opa_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, loaded_store: LoadedStore,
            signing_key_file: Path, signed_bundle: SignedBundle) -> Iterator[OpaEnv]:
    """The gateway deciding through a proxy in front of OPA (the proxy can turn slow or
    broken)."""
    opened = _open(monkeypatch, tmp_path, loaded_store, signing_key_file, signed_bundle,
                   through_proxy=True)
    with opened.env.client:
        yield opened
    opened.env.gateway.audit.close()
    opened.proxy.stop()
    opened.server.stop()


@pytest.fixture
def direct_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, loaded_store: LoadedStore,
               signing_key_file: Path, signed_bundle: SignedBundle) -> Iterator[OpaEnv]:
    """The gateway talking to OPA directly (so that killing OPA leaves nothing answering)."""
    opened = _open(monkeypatch, tmp_path, loaded_store, signing_key_file, signed_bundle,
                   through_proxy=False)
    with opened.env.client:
        yield opened
    opened.env.gateway.audit.close()
    opened.proxy.stop()
    opened.server.stop()


def last_entry(env: Env) -> AuditEntry:
    return env.gateway.audit.get(env.gateway.audit.size() - 1)


def assert_refused_and_audited(env: Env, message: str) -> None:
    before = env.gateway.audit.size()
    response = env.aggregate("insurer", QUERY)
    assert response.status_code == 503, response.text
    body = response.json()
    assert body["error"]["code"] == "policy_unavailable"
    assert message in body["error"]["message"]
    assert "echo of the input" not in response.text  # OPA's own text never leaks
    assert "rows" not in body
    # Obtaining the token is audited too; the query's entry is the last one.
    assert env.gateway.audit.size() > before
    entry = last_entry(env)
    assert entry.action.startswith("query")
    assert (entry.decision, entry.status, entry.error_code) == ("error", 503, "policy_unavailable")
    assert entry.bundle_revision == REVISION  # what the gateway expected to decide with
    assert entry.decision_id is None  # OPA never decided
    assert env.client.get("/healthz").status_code == 200  # liveness stays up


def test_opa_decides_and_the_audit_names_the_bundle_and_the_decision(opa_env: OpaEnv) -> None:
    env = opa_env.env
    response = env.aggregate("insurer", QUERY)
    assert response.status_code == 200, response.text
    entry = env.gateway.audit.get(response.json()["audit_id"])
    assert entry.decision == "allow"
    assert entry.bundle_revision == REVISION
    assert entry.decision_id  # OPA's id, also in its decision log
    assert entry.decision_id in opa_env.server.log()
    denied = env.aggregate("insurer", {**QUERY, "dimensions": ["psn_no"]})
    assert denied.status_code in (400, 403), denied.text
    ready = env.client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"]["policy"] is True


def test_a_consented_check_decided_by_opa_carries_its_decision_id(
        opa_env: OpaEnv, city: CityFiles) -> None:
    """Person-level calls run on the event loop; with OPA the decision is taken off it, in a
    worker thread, and its trace still reaches the audit entry of this request."""
    env, insurer = opa_env.env, Insurer()
    (person,) = sample_persons(city, 1)
    consent = give_consent(env, consent_body(person, insurer))
    token = env.token("insurer")
    response = call(env, ENROLLMENT, token, consent["token"], insurer.proof(token))
    assert response.status_code == 200, response.text
    entry = env.gateway.audit.get(int(response.headers["Audit-Index"]))
    assert (entry.action, entry.decision) == ("persons.enrollment", "allow")
    assert entry.bundle_revision == REVISION
    assert entry.decision_id
    assert entry.decision_id in opa_env.server.log()


def test_a_deny_from_opa_is_audited_with_its_decision_id(opa_env: OpaEnv) -> None:
    env = opa_env.env
    response = env.client.get("/v1/grants", headers=env.headers("insurer"))
    assert response.status_code == 403
    entry = last_entry(env)
    assert (entry.decision, entry.bundle_revision) == ("deny", REVISION)
    assert entry.decision_id
    assert entry.decision_id in opa_env.server.log()


PROVENANCE = b'"provenance": {"bundles": {"b": {"revision": "' + REVISION.encode() + b'"}}}'


@pytest.mark.parametrize(("status", "garbage", "message"), [
    (200, b"<html>proxy error</html>", "malformed JSON"),
    (200, b"[1, 2]", "malformed JSON"),
    (200, b'{' + PROVENANCE + b', "result": {"allow": "yes"}}',
     "the policy decision is malformed"),
    (200, b'{' + PROVENANCE + b'}', "the policy decision is undefined"),
    (200, b'{"result": {"allow": false, "reasons": ["no"], "grant_id": null, "obligations": null}}',
     "the OPA server runs no policy bundle, the gateway verified " + REVISION),
    (500, b'{"code": "internal_error", "message": "echo of the input"}',
     "the OPA server answered HTTP 500"),
])
def test_a_malformed_answer_is_503_and_audited(opa_env: OpaEnv, status: int, garbage: bytes,
                                               message: str) -> None:
    opa_env.env.token("insurer")  # the token endpoint makes no decision
    opa_env.proxy.garbage_status = status
    opa_env.proxy.garbage = garbage
    assert_refused_and_audited(opa_env.env, message)
    ready = opa_env.env.client.get("/readyz")  # health answers; the probe decision does not
    assert ready.status_code == 503
    assert ready.json()["checks"]["policy"] is False
    opa_env.proxy.garbage = None  # OPA answers properly again: ready, and allowed again
    assert opa_env.env.client.get("/readyz").status_code == 200
    assert opa_env.env.aggregate("insurer", QUERY).status_code == 200


def test_a_server_slower_than_the_timeout_is_503_and_not_ready(opa_env: OpaEnv) -> None:
    opa_env.proxy.delay_s = 5.0  # ten times the gateway's 0.5 s timeout
    assert_refused_and_audited(opa_env.env, "did not answer in time")
    ready = opa_env.env.client.get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["checks"]["policy"] is False
    assert ready.json()["error"]["code"] == "not_ready"


def test_a_killed_server_is_503_and_not_ready(direct_env: OpaEnv) -> None:
    env = direct_env.env
    assert env.aggregate("insurer", QUERY).status_code == 200
    direct_env.server.stop()
    assert_refused_and_audited(env, "cannot be reached")
    ready = env.client.get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["status"] == "not_ready"
    assert ready.json()["checks"]["policy"] is False


def test_a_restarted_server_gets_its_data_back_through_readiness(direct_env: OpaEnv) -> None:
    env = direct_env.env
    assert env.aggregate("insurer", QUERY).status_code == 200
    port = direct_env.server.port
    direct_env.server.stop()
    # The same address, a fresh OPA: the bundle again, but none of the gateway's data.
    direct_env.server = OpaServer(opa_binary(), bundle=env.settings.policy_bundle_path,
                                  verification_key=env.settings.policy_bundle_key_path,
                                  port=port)
    assert env.client.get("/readyz").status_code == 200  # noticed, and pushed the data again
    assert env.aggregate("insurer", QUERY).status_code == 200


def test_embedded_decisions_are_audited_with_the_policy_digest(env: Env) -> None:
    response = env.aggregate("insurer", QUERY)
    assert response.status_code == 200, response.text
    entry = env.gateway.audit.get(response.json()["audit_id"])
    assert entry.bundle_revision == env.gateway.policy.version  # no bundle: the digest
    assert entry.decision_id is None  # regorus has no decision log


def test_an_entry_takes_the_trace_of_its_own_decision_only(env: Env) -> None:
    env.gateway.policy.decide({})  # a decision in this context…
    first = env.gateway.record(None, "test.decided", status=403, decision="deny")
    second = env.gateway.record(None, "test.undecided", status=401, decision="deny")
    assert env.gateway.audit.get(first).bundle_revision == env.gateway.policy.revision
    assert env.gateway.audit.get(second).bundle_revision is None  # …is recorded once
