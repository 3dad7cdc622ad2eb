"""The policy decision as the gateway uses it, and its strict reading from a policy result.

Every engine (embedded regorus, an OPA server later) hands its raw result to
:func:`decision_from_document`, so a malformed result fails closed the same way everywhere.
"""

from __future__ import annotations

import contextvars
import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

from gateway.errors import PolicyEngineError

__all__ = [
    "UNDEFINED",
    "Decision",
    "Obligations",
    "PolicyTrace",
    "Undefined",
    "decision_from_document",
    "note_policy_trace",
    "take_policy_trace",
]

_DECISION_KEYS: Final = frozenset({"allow", "reasons", "grant_id", "obligations"})
_OBLIGATION_KEYS: Final = frozenset({"min_cell_size", "max_rows", "mask_fields", "noise"})
# Cross-request disclosure control of aggregate queries (difference k, rounding, budget).
_OPTIONAL_OBLIGATION_KEYS: Final = frozenset({"disclosure"})


class Undefined(enum.Enum):
    """The policy produced no value at all (an undefined rule)."""

    UNDEFINED = enum.auto()


UNDEFINED: Final = Undefined.UNDEFINED


@dataclass(frozen=True)
class Obligations:
    """What the gateway must do to a result it is allowed to release."""

    min_cell_size: int
    max_rows: int
    mask_fields: tuple[str, ...] = ()
    noise: Mapping[str, Any] | None = None
    disclosure: Mapping[str, Any] | None = None  # read by gateway.disclosure.control


@dataclass(frozen=True)
class Decision:
    """One policy decision. ``reasons`` is sorted and empty exactly when ``allow`` is true;
    ``obligations`` is set exactly when it is.

    ``bundle_revision`` names the policies that decided: the signed bundle's manifest
    revision, or ``policy_version`` when the policies came from a directory. ``decision_id``
    is the OPA server's id of this decision (its decision log), None from regorus; it is not
    part of what was decided, so two equal decisions may carry different ids.
    """

    allow: bool
    reasons: tuple[str, ...]
    grant_id: str | None
    obligations: Obligations | None
    policy_version: str
    engine: str
    bundle_revision: str = ""
    decision_id: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not self.bundle_revision:
            object.__setattr__(self, "bundle_revision", self.policy_version)

    def to_json(self) -> dict[str, Any]:
        """The decision as JSON-ready data (for the audit log)."""
        obligations = None
        if self.obligations is not None:
            noise = self.obligations.noise
            obligations = {
                "min_cell_size": self.obligations.min_cell_size,
                "max_rows": self.obligations.max_rows,
                "mask_fields": list(self.obligations.mask_fields),
                "noise": None if noise is None else dict(noise),
            }
            if self.obligations.disclosure is not None:
                obligations["disclosure"] = dict(self.obligations.disclosure)
        return {
            "allow": self.allow,
            "reasons": list(self.reasons),
            "grant_id": self.grant_id,
            "obligations": obligations,
            "policy_version": self.policy_version,
            "engine": self.engine,
            "bundle_revision": self.bundle_revision,
            "decision_id": self.decision_id,
        }


def _malformed(what: str) -> PolicyEngineError:
    # Names the member, never its value: the value may echo request data.
    return PolicyEngineError(f"the policy decision is malformed: {what}")


def _strings(value: object, what: str) -> tuple[str, ...]:
    # Rego sets arrive as Python sets from regorus and as arrays over JSON.
    if not isinstance(value, list | tuple | set | frozenset):
        raise _malformed(f"{what} is not a list")
    if not all(isinstance(item, str) for item in value):
        raise _malformed(f"{what} holds a non-string")
    return tuple(sorted(set(value)))


def _positive_int(value: object, what: str) -> int:
    # bool is an int in Python; a policy that says `true` here is broken.
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _malformed(f"{what} is not a positive integer")
    return value


def _obligations(value: object) -> Obligations:
    if not isinstance(value, Mapping) or not (
        _OBLIGATION_KEYS <= set(value) <= _OBLIGATION_KEYS | _OPTIONAL_OBLIGATION_KEYS
    ):
        raise _malformed("obligations do not have the expected members")
    noise = value["noise"]
    if noise is not None and not isinstance(noise, Mapping):
        raise _malformed("obligations.noise is neither null nor an object")
    disclosure = value.get("disclosure")
    if disclosure is not None and not isinstance(disclosure, Mapping):
        raise _malformed("obligations.disclosure is neither null nor an object")
    return Obligations(
        min_cell_size=_positive_int(value["min_cell_size"], "obligations.min_cell_size"),
        max_rows=_positive_int(value["max_rows"], "obligations.max_rows"),
        mask_fields=_strings(value["mask_fields"], "obligations.mask_fields"),
        noise=None if noise is None else MappingProxyType(dict(noise)),
        disclosure=None if disclosure is None else MappingProxyType(dict(disclosure)),
    )


def decision_from_document(
    document: object,
    *,
    policy_version: str,
    engine: str,
    bundle_revision: str = "",
    decision_id: str | None = None,
) -> Decision:
    """Read the policy's decision document strictly; anything off raises
    :class:`PolicyEngineError` so that the caller denies (fail closed)."""
    if document is UNDEFINED:
        raise PolicyEngineError("the policy decision is undefined")
    if not isinstance(document, Mapping) or set(document) != _DECISION_KEYS:
        raise _malformed("it does not have the members allow, reasons, grant_id, obligations")
    allow = document["allow"]
    if not isinstance(allow, bool):
        raise _malformed("allow is not a boolean")
    reasons = _strings(document["reasons"], "reasons")
    grant_id = document["grant_id"]
    if grant_id is not None and not isinstance(grant_id, str):
        raise _malformed("grant_id is neither null nor a string")
    if allow:
        if reasons:
            raise _malformed("an allow carries reasons")
        obligations: Obligations | None = _obligations(document["obligations"])
    else:
        if not reasons:
            raise _malformed("a deny carries no reason")
        if grant_id is not None or document["obligations"] is not None:
            raise _malformed("a deny carries a grant or obligations")
        obligations = None
    return Decision(
        allow=allow,
        reasons=reasons,
        grant_id=grant_id,
        obligations=obligations,
        policy_version=policy_version,
        engine=engine,
        bundle_revision=bundle_revision,
        decision_id=decision_id,
    )


@dataclass(frozen=True)
class PolicyTrace:
    """Which policies answered the last decision made in this context, for the audit entry
    that records it: set by every engine's ``decide`` (also when it fails: then
    ``decision_id`` is None), taken by the service layer when it writes the entry."""

    bundle_revision: str
    decision_id: str | None = None


# One per request: FastAPI runs each sync endpoint in a copy of the context, so a trace never
# crosses requests; taking it clears it, so an entry never carries an older decision's trace.
_TRACE: Final[contextvars.ContextVar[PolicyTrace | None]] = contextvars.ContextVar(
    "gateway_policy_trace", default=None
)


def note_policy_trace(bundle_revision: str, decision_id: str | None = None) -> None:
    _TRACE.set(PolicyTrace(bundle_revision, decision_id))


def take_policy_trace() -> PolicyTrace | None:
    """The trace of the last decision in this context, once; None if there was none."""
    trace = _TRACE.get()
    if trace is not None:
        _TRACE.set(None)
    return trace
