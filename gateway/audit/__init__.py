"""The append-only, tamper-evident audit log, its Merkle tree, signed checkpoints, export bundle
and offline verifier.

See ``docs/audit.md`` for the entry fields, the hashing, the checkpoints and the bundle format.
"""

from gateway.audit.backends import open_audit_log
from gateway.audit.bundle import (
    BUNDLE_FORMAT,
    BUNDLE_FORMAT_V1,
    VerifiedBundle,
    checkpoint_message,
    export_bundle,
    verify_bundle,
    verify_bundle_checkpoint,
)
from gateway.audit.checkpoint import Checkpoint, parse_and_verify_checkpoint, sign_checkpoint
from gateway.audit.entry import (
    GENESIS,
    LEAF_PREFIX,
    AuditEntry,
    canonical_json,
    chain_hash,
    entry_bytes,
    leaf_hash,
    sha256_tag,
    utc_timestamp,
)
from gateway.audit.log import AuditLog, StoredCheckpoint, StoredRow
from gateway.audit.merkle import EMPTY_ROOT, NODE_PREFIX, verify_consistency, verify_inclusion
from gateway.audit.store import SqliteAuditLog

__all__ = [
    "BUNDLE_FORMAT",
    "BUNDLE_FORMAT_V1",
    "EMPTY_ROOT",
    "GENESIS",
    "LEAF_PREFIX",
    "NODE_PREFIX",
    "AuditEntry",
    "AuditLog",
    "Checkpoint",
    "SqliteAuditLog",
    "StoredCheckpoint",
    "StoredRow",
    "VerifiedBundle",
    "canonical_json",
    "chain_hash",
    "checkpoint_message",
    "entry_bytes",
    "export_bundle",
    "leaf_hash",
    "open_audit_log",
    "parse_and_verify_checkpoint",
    "sha256_tag",
    "sign_checkpoint",
    "utc_timestamp",
    "verify_bundle",
    "verify_bundle_checkpoint",
    "verify_consistency",
    "verify_inclusion",
]
