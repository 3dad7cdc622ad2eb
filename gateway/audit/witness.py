"""Witnessing: a second party (an insurer, the regulator) countersigns the gateway's checkpoints
only after checking that the log grew append-only since the last checkpoint it saw.

The witness keeps its own state (the last checkpoint it accepted). A checkpoint that is
smaller, or of the same size with another root, or whose consistency proof fails, is refused and
the state is left as it was: that is the evidence of a forked or rewritten log. The
cosignature is an ordinary Ed25519 signed-note line by the witness's key over the same
checkpoint body, appended to the note (c2sp.org/signed-note allows several signers).
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from gateway.audit.checkpoint import (
    Checkpoint,
    open_note,
    parse_and_verify_checkpoint,
    sign_note,
)
from gateway.audit.merkle import verify_consistency
from gateway.errors import AuditIntegrityError

__all__ = ["WitnessState", "cosign", "witness_checkpoint"]

ConsistencyFetcher = Callable[[int, int], Sequence[bytes]]


@dataclass(frozen=True)
class WitnessState:
    """The last checkpoint this witness accepted."""

    origin: str
    size: int
    root: bytes
    note: str

    @classmethod
    def load(cls, path: Path) -> WitnessState | None:
        if not path.exists():
            return None
        data = json.loads(path.read_text("utf-8"))
        return cls(origin=data["origin"], size=int(data["size"]),
                   root=base64.b64decode(data["root"]), note=data["note"])

    def save(self, path: Path) -> None:
        staged = path.with_suffix(path.suffix + ".tmp")
        staged.write_text(json.dumps({
            "origin": self.origin, "size": self.size,
            "root": base64.b64encode(self.root).decode("ascii"), "note": self.note,
        }, indent=2), "utf-8")
        os.replace(staged, path)


def cosign(note: str, log_key: Ed25519PublicKey, origin: str, witness_key: Ed25519PrivateKey,
           witness_name: str) -> str:
    """``note`` with one more signature line, by the witness, over the same body."""
    body = open_note(note, log_key, origin)
    own = sign_note(body, witness_key, witness_name)
    return note + own[len(body) + 1:]


def witness_checkpoint(
    note: str,
    *,
    log_key: Ed25519PublicKey,
    origin: str,
    previous: WitnessState | None,
    fetch_consistency: ConsistencyFetcher,
    witness_key: Ed25519PrivateKey,
    witness_name: str,
) -> tuple[str, WitnessState]:
    """Check ``note`` against the witness's last accepted checkpoint; return the cosigned note
    and the new state, or raise :class:`AuditIntegrityError` (nothing is signed)."""
    checkpoint: Checkpoint = parse_and_verify_checkpoint(note, log_key, origin=origin)
    if previous is not None:
        if previous.origin != checkpoint.origin:
            raise AuditIntegrityError(
                f"witness: origin {checkpoint.origin!r}, want {previous.origin!r}")
        if checkpoint.size < previous.size:
            raise AuditIntegrityError(
                f"witness: log shrank from {previous.size} to {checkpoint.size} entries",
                index=checkpoint.size)
        if checkpoint.size == previous.size:
            if checkpoint.root != previous.root:
                raise AuditIntegrityError(
                    f"witness: two different roots for size {checkpoint.size}: a fork",
                    expected=previous.root.hex(), calculated=checkpoint.root.hex())
        elif previous.size > 0:
            proof = fetch_consistency(previous.size, checkpoint.size)
            verify_consistency(previous.size, checkpoint.size, previous.root, checkpoint.root,
                               list(proof))
    cosigned = cosign(note, log_key, checkpoint.origin, witness_key, witness_name)
    state = WitnessState(origin=checkpoint.origin, size=checkpoint.size, root=checkpoint.root,
                         note=note)
    return cosigned, state
