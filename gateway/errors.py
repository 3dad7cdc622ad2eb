"""The one error tree of the gateway.

Every failure the gateway reports is a :class:`GatewayError`. Each subclass carries a stable
English ``code``, an HTTP ``status`` and a CLI ``exit_code``; the API maps them to
``{"error": {"code", "message"}}`` in one exception handler (``gateway.api.errors``) and the CLI
maps them to exit codes in one place (``gateway.cli.main``). Messages never carry personal data
or stack traces: they name fields, files, rows and columns, never values.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

__all__ = [
    "AuditIntegrityError",
    "AuditUnavailable",
    "AuthenticationFailed",
    "BadRequest",
    "BudgetExhausted",
    "CatalogError",
    "Conflict",
    "GatewayError",
    "IngestRejected",
    "IntegrityViolation",
    "NotFound",
    "PolicyDenied",
    "PolicyEngineError",
    "QueryRejected",
    "QueryTimeout",
    "RateLimited",
    "StoreUnavailable",
    "ValidationFailed",
]


class GatewayError(Exception):
    """Root of every error the gateway raises on purpose."""

    code: ClassVar[str] = "internal_error"
    status: ClassVar[int] = 500
    exit_code: ClassVar[int] = 1

    def __init__(self, message: str, *, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = details or {}

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        body.update(self.details)
        return {"error": body}


class BadRequest(GatewayError, ValueError):
    """Malformed input: not JSON, missing members, wrong types."""

    code = "bad_request"
    status = 400
    exit_code = 2


class ValidationFailed(GatewayError, ValueError):
    """Well-formed input that the catalog or the domain rules refuse (e.g. a grant wider than
    its purpose)."""

    code = "validation_failed"
    status = 422
    exit_code = 2


class QueryRejected(BadRequest):
    """A query that can never be run: unknown dataset, min/max, row-level select."""

    code = "query_rejected"


class AuthenticationFailed(GatewayError):
    """Missing, malformed, expired or replayed credentials."""

    code = "invalid_token"
    status = 401
    exit_code = 3

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code  # type: ignore[misc]


class PolicyDenied(GatewayError, PermissionError):
    """The policy answered deny; ``reasons`` are the policy's own."""

    code = "policy_denied"
    status = 403
    exit_code = 4

    def __init__(self, reasons: Sequence[str], *, audit_id: int | None = None) -> None:
        self.reasons = sorted(set(reasons)) or ["denied by default"]
        super().__init__("request denied by policy", details={"reasons": self.reasons})
        if audit_id is not None:
            self.details["audit_id"] = audit_id


class NotFound(GatewayError, LookupError):
    code = "not_found"
    status = 404
    exit_code = 5


class Conflict(GatewayError):
    code = "conflict"
    status = 409
    exit_code = 6


class IntegrityViolation(Conflict):
    """A store refused a write by a constraint (unique, check, foreign key), whichever
    database backs it."""


class RateLimited(GatewayError):
    """Too many requests for the grant's rate limit; ``retry_after_s`` (the API's
    ``Retry-After``) says when the next one is allowed."""

    code = "rate_limited"
    status = 429
    exit_code = 7

    def __init__(self, message: str, *, retry_after_s: int | None = None,
                 details: dict[str, Any] | None = None) -> None:
        super().__init__(message, details=details)
        self.retry_after_s = retry_after_s


class BudgetExhausted(RateLimited):
    """A privacy budget (the grant's for this period, or the data version's global cap) cannot
    pay for the release; the details say what remains, never any data."""

    code = "budget_exhausted"

    def __init__(self, message: str, *, remaining: float, scope: str) -> None:
        super().__init__(message, details={"remaining": remaining, "scope": scope})


class QueryTimeout(GatewayError, TimeoutError):
    code = "query_timeout"
    status = 503
    exit_code = 8


class PolicyEngineError(GatewayError):
    """The policy engine is missing, failed to load, or errored: callers deny (fail closed)."""

    code = "policy_unavailable"
    status = 503
    exit_code = 8


class StoreUnavailable(GatewayError):
    """A store (query store, state, audit) cannot be read or written."""

    code = "store_unavailable"
    status = 503
    exit_code = 8


class AuditUnavailable(StoreUnavailable):
    """The audit entry could not be made durable, so the request must not succeed."""

    code = "audit_unavailable"


class CatalogError(GatewayError, ValueError):
    """The catalog file is invalid."""

    code = "catalog_invalid"
    status = 500
    exit_code = 2


class IngestRejected(GatewayError, ValueError):
    """A load refused as a whole; names the file, row and column, never the value."""

    code = "ingest_rejected"
    status = 422
    exit_code = 2

    def __init__(
        self, reason: str, *, file: str, row: int | None = None, column: str | None = None
    ) -> None:
        where = f"{file}" + (f", row {row}" if row is not None else "")
        where += f", column {column}" if column is not None else ""
        super().__init__(
            f"{where}: {reason}", details={"file": file, "row": row, "column": column}
        )
        self.reason = reason
        self.file = file
        self.row = row
        self.column = column


class AuditIntegrityError(GatewayError):
    """The audit log does not verify."""

    code = "audit_integrity"
    status = 500
    exit_code = 9

    def __init__(
        self, message: str, *, index: int | None = None, expected: str = "", calculated: str = ""
    ) -> None:
        super().__init__(message)
        self.index = index
        self.expected = expected
        self.calculated = calculated
