"""Auditor API: a signed checkpoint, inclusion and consistency proofs that an independent
RFC 9162 verifier accepts, and the same refusals as everywhere else."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.audit import AuditEntry, entry_bytes, leaf_hash
from gateway.audit.checkpoint import parse_and_verify_checkpoint
from gateway.audit.merkle import verify_consistency, verify_inclusion
from gateway.auth.keys import load_private_key
from gateway.errors import AuditIntegrityError
from tests.conftest import Env, LoadedStore, make_env
from tests.http.test_cli import _run


@pytest.fixture(params=["sqlite", "postgres"])
def env(request: pytest.FixtureRequest, tmp_path: Path, loaded_store: LoadedStore,
        signing_key_file: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    """The gateway with its audit log on each backend (``GATEWAY_AUDIT_URL`` selects
    PostgreSQL, as in production)."""
    if request.param == "postgres":
        monkeypatch.setenv("GATEWAY_AUDIT_URL", request.getfixturevalue("postgres_url"))
    environment = make_env(tmp_path, loaded_store.store_dir, signing_key_file)
    want = "PostgresAuditLog" if request.param == "postgres" else "SqliteAuditLog"
    assert type(environment.gateway.audit).__name__ == want
    with environment.client:
        yield environment
    environment.gateway.audit.close()


def _public_key(env: Env) -> Any:
    return load_private_key(env.settings.signing_key_path).public_key()


def _query(env: Env) -> int:
    response = env.aggregate("insurer", {"purpose": "hmb_pricing", "dataset": "settlements",
                                         "dimensions": ["gend"], "measures": [{"fn": "count"}]})
    assert response.status_code == 200
    return int(response.headers["Audit-Index"])


def test_checkpoint_is_a_signed_note_over_the_current_tree(env: Env) -> None:
    _query(env)
    auditor = env.headers("auditor")
    response = env.client.get("/v1/audit/checkpoint", headers=auditor)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    checkpoint = parse_and_verify_checkpoint(response.text, _public_key(env),
                                             origin=env.settings.audit_origin)
    assert 0 < checkpoint.size <= env.gateway.audit.size()
    assert checkpoint.root == env.gateway.audit.root(checkpoint.size)


def test_inclusion_proof_of_a_query_entry_verifies(env: Env) -> None:
    index = _query(env)
    auditor = env.headers("auditor")
    note = env.client.get("/v1/audit/checkpoint", headers=auditor).text
    checkpoint = parse_and_verify_checkpoint(note, _public_key(env))
    response = env.client.get("/v1/audit/proof/inclusion",
                              params={"index": index, "tree_size": checkpoint.size},
                              headers=auditor)
    assert response.status_code == 200, response.text
    body = response.json()
    proof = [base64.b64decode(h) for h in body["proof"]]
    # The leaf is recomputed from the entry itself, not taken from the server's answer.
    entry = AuditEntry.model_validate(env.gateway.audit.get(index).model_dump())
    leaf = leaf_hash(entry_bytes(entry))
    verify_inclusion(leaf, index, checkpoint.size, proof, checkpoint.root)
    with pytest.raises(AuditIntegrityError):
        verify_inclusion(leaf, index, checkpoint.size, proof[:-1] or [b"\0" * 32],
                         checkpoint.root)


def test_consistency_between_two_checkpoints_verifies(env: Env) -> None:
    auditor = env.headers("auditor")
    first = parse_and_verify_checkpoint(
        env.client.get("/v1/audit/checkpoint", headers=auditor).text, _public_key(env))
    for _ in range(3):
        _query(env)
    env.gateway.audit.checkpoint(env.gateway.checkpoint_key, origin=env.gateway.audit_origin)
    second = parse_and_verify_checkpoint(
        env.client.get("/v1/audit/checkpoint", headers=auditor).text, _public_key(env))
    assert second.size > first.size
    response = env.client.get("/v1/audit/proof/consistency",
                              params={"first": first.size, "second": second.size},
                              headers=auditor)
    assert response.status_code == 200, response.text
    proof = [base64.b64decode(h) for h in response.json()["proof"]]
    verify_consistency(first.size, second.size, first.root, second.root, proof)


@pytest.mark.parametrize(
    ("path", "params"),
    [("/v1/audit/proof/inclusion", {"index": 10_000, "tree_size": 3}),
     ("/v1/audit/proof/consistency", {"first": 5, "second": 10_000_000})],
)
def test_proof_requests_outside_the_log_are_400(
    env: Env, path: str, params: dict[str, int]
) -> None:
    response = env.client.get(path, params=params, headers=env.headers("auditor"))
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "bad_request"


def test_insurers_get_no_checkpoint_or_proofs(env: Env) -> None:
    insurer = env.headers("insurer")
    assert env.client.get("/v1/audit/checkpoint", headers=insurer).status_code == 403
    response = env.client.get("/v1/audit/proof/inclusion",
                              params={"index": 0, "tree_size": 1}, headers=insurer)
    assert response.status_code == 403


def test_offline_verify_against_an_earlier_checkpoint(env: Env, tmp_path: Path) -> None:
    _query(env)
    first = tmp_path / "first.json"
    assert _run("audit", "export", str(first), "--workdir",
                str(env.settings.workdir)).returncode == 0
    saved = tmp_path / "saved.checkpoint"
    public = str(first.with_suffix(".pub.pem"))
    ok = _run("audit", "verify", str(first), "--public-key", public,
              "--save-checkpoint", str(saved))
    assert ok.returncode == 0, ok.stderr
    assert saved.read_text("utf-8").startswith(env.settings.audit_origin)
    _query(env)
    second = tmp_path / "second.json"
    assert _run("audit", "export", str(second), "--workdir",
                str(env.settings.workdir)).returncode == 0
    extended = _run("audit", "verify", str(second), "--public-key", public,
                    "--previous-checkpoint", str(saved))
    assert extended.returncode == 0, extended.stderr
    # A history cut below what the auditor already saw is caught even though it verifies alone.
    data = json.loads(second.read_text("utf-8"))
    data["entries"] = data["entries"][:2]
    second.write_text(json.dumps(data), "utf-8")
    cut = _run("audit", "verify", str(second), "--public-key", public,
               "--previous-checkpoint", str(saved))
    assert cut.returncode == 9
