"""The policy decision as the gateway uses it, and its strict reading from a policy result.

Every engine (embedded regorus, an OPA server later) hands its raw result to
:func:`decision_from_document`, so a malformed result fails closed the same way everywhere.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

from gateway.errors import PolicyEngineError

__all__ = ["UNDEFINED", "Decision", "Obligations", "Undefined", "decision_from_document"]

_DECISION_KEYS: Final = frozenset({"allow", "reasons", "grant_id", "obligations"})
_OBLIGATION_KEYS: Final = frozenset({"min_cell_size", "max_rows", "mask_fields", "noise"})


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


@dataclass(frozen=True)
class Decision:
    """One policy decision. ``reasons`` is sorted and empty exactly when ``allow`` is true;
    ``obligations`` is set exactly when it is."""

    allow: bool
    reasons: tuple[str, ...]
    grant_id: str | None
    obligations: Obligations | None
    policy_version: str
    engine: str

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
        return {
            "allow": self.allow,
            "reasons": list(self.reasons),
            "grant_id": self.grant_id,
            "obligations": obligations,
            "policy_version": self.policy_version,
            "engine": self.engine,
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
    if not isinstance(value, Mapping) or set(value) != _OBLIGATION_KEYS:
        raise _malformed("obligations do not have the expected members")
    noise = value["noise"]
    if noise is not None and not isinstance(noise, Mapping):
        raise _malformed("obligations.noise is neither null nor an object")
    return Obligations(
        min_cell_size=_positive_int(value["min_cell_size"], "obligations.min_cell_size"),
        max_rows=_positive_int(value["max_rows"], "obligations.max_rows"),
        mask_fields=_strings(value["mask_fields"], "obligations.mask_fields"),
        noise=None if noise is None else MappingProxyType(dict(noise)),
    )


def decision_from_document(
    document: object, *, policy_version: str, engine: str
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
    )
