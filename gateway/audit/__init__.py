"""The append-only, tamper-evident audit log, its signed export bundle and offline verifier.

See ``docs/audit.md`` for the entry fields, the hashing and the bundle format.
"""

from gateway.audit.bundle import BUNDLE_FORMAT, checkpoint_message, export_bundle, verify_bundle
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
from gateway.audit.log import AuditLog, StoredRow
from gateway.audit.store import SqliteAuditLog

__all__ = [
    "BUNDLE_FORMAT",
    "GENESIS",
    "LEAF_PREFIX",
    "AuditEntry",
    "AuditLog",
    "SqliteAuditLog",
    "StoredRow",
    "canonical_json",
    "chain_hash",
    "checkpoint_message",
    "entry_bytes",
    "export_bundle",
    "leaf_hash",
    "sha256_tag",
    "utc_timestamp",
    "verify_bundle",
]
