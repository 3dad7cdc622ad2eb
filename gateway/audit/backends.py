"""Choose the audit log's store from configuration: SQLite by default, PostgreSQL when the
audit URL says so. (The PostgreSQL driver is imported only when it is used.)"""

from __future__ import annotations

import os
from typing import Any

from gateway.audit.log import AuditLog
from gateway.audit.store import SqliteAuditLog
from gateway.errors import ValidationFailed

__all__ = ["open_audit_log"]

_POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def open_audit_log(url: str | None, path: str | os.PathLike[str], **options: Any) -> AuditLog:
    """The audit log at ``url`` (``postgresql://…``: :class:`PostgresAuditLog`) or, when
    ``url`` is ``None``, in the SQLite file ``path``. Any other URL is refused
    (:class:`ValidationFailed`)."""
    if url is None:
        return SqliteAuditLog(path, **options)
    if url.startswith(_POSTGRES_SCHEMES):
        from gateway.audit.postgres import PostgresAuditLog

        return PostgresAuditLog(url, **options)
    scheme = url.split(":", 1)[0]
    raise ValidationFailed(f"audit_url: unsupported scheme {scheme!r}, want postgresql://")
