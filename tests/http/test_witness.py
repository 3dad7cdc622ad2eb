"""A witness countersigns a checkpoint only if the log grew append-only since its last one."""

from __future__ import annotations

import base64
from dataclasses import replace

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.audit.checkpoint import open_note, parse_and_verify_checkpoint
from gateway.audit.witness import WitnessState, witness_checkpoint
from gateway.auth.keys import load_private_key
from gateway.errors import AuditIntegrityError
from tests.conftest import Env

WITNESS = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))


def _round(env: Env, previous: WitnessState | None, *, tamper: bool = False
           ) -> tuple[str, WitnessState]:
    auditor = env.headers("auditor")
    note = env.client.get("/v1/audit/checkpoint", headers=auditor).text

    def consistency(first: int, second: int) -> list[bytes]:
        body = env.client.get("/v1/audit/proof/consistency",
                              params={"first": first, "second": second}, headers=auditor).json()
        proof = [base64.b64decode(h) for h in body["proof"]]
        if tamper and proof:
            proof[0] = bytes(32)
        return proof

    log_key = load_private_key(env.settings.signing_key_path).public_key()
    return witness_checkpoint(note, log_key=log_key,  # type: ignore[arg-type]
                              origin=env.settings.audit_origin, previous=previous,
                              fetch_consistency=consistency, witness_key=WITNESS,
                              witness_name="regulator-witness")


def _grow(env: Env) -> None:
    for _ in range(3):
        env.aggregate("insurer", {"purpose": "hmb_pricing", "dataset": "settlements",
                                  "measures": [{"fn": "count"}]})
    env.gateway.audit.checkpoint(env.gateway.checkpoint_key, origin=env.gateway.audit_origin)


def test_cosigned_note_carries_both_signatures(env: Env) -> None:
    cosigned, state = _round(env, None)
    log_key = load_private_key(env.settings.signing_key_path).public_key()
    body = open_note(cosigned, WITNESS.public_key(), "regulator-witness")
    assert body == open_note(cosigned, log_key, env.settings.audit_origin)  # type: ignore[arg-type]
    assert parse_and_verify_checkpoint(cosigned, log_key).size == state.size  # type: ignore[arg-type]


def test_append_only_growth_is_witnessed_again(env: Env) -> None:
    _, first = _round(env, None)
    _grow(env)
    _, second = _round(env, first)
    assert second.size > first.size


def test_a_bad_consistency_proof_is_not_signed(env: Env) -> None:
    _, first = _round(env, None)
    _grow(env)
    with pytest.raises(AuditIntegrityError):
        _round(env, first, tamper=True)


def test_a_fork_at_the_same_size_is_refused(env: Env) -> None:
    note, state = _round(env, None)
    log_key = load_private_key(env.settings.signing_key_path).public_key()
    seen_other_root = replace(state, root=bytes(32))
    with pytest.raises(AuditIntegrityError, match="fork"):
        witness_checkpoint(note, log_key=log_key,  # type: ignore[arg-type]
                           origin=env.settings.audit_origin, previous=seen_other_root,
                           fetch_consistency=lambda a, b: [], witness_key=WITNESS,
                           witness_name="regulator-witness")


def test_a_shrunk_log_is_refused(env: Env) -> None:
    _, state = _round(env, None)
    with pytest.raises(AuditIntegrityError, match="shrank"):
        _round(env, replace(state, size=state.size + 1000))
