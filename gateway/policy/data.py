"""The policy data document, and the index the engines derive from it.

Shape (see ``policies/schemas/gateway/*.json`` and ``docs/policy.md``)::

    {"gateway": {"catalog": {"datasets": {...}, "purposes": {...}, "defaults": {...}},
                 "grants": {"g-1": {...}, ...},
                 "grant_index": {"ins-001": {"hmb_pricing": ["g-1"]}}}}

The service layer builds ``catalog`` and ``grants``; every engine adds ``grant_index`` with
:func:`with_grant_index` before evaluating, so callers never build or see it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Final

from gateway.errors import PolicyEngineError

__all__ = ["ENCODER", "encode_data", "is_mapping", "with_grant_index"]


def is_mapping(value: object) -> bool:
    # Callers are typed, but a request body may still hand over anything.
    return isinstance(value, Mapping)


def _plain(value: object) -> object:
    # Mappings other than dict (e.g. MappingProxyType) are JSON objects too.
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"{type(value).__name__} is not JSON")


# One encoder for every call: json.dumps with options builds a new one each time.
ENCODER: Final = json.JSONEncoder(separators=(",", ":"), allow_nan=False, default=_plain)


def encode_data(data: object) -> str:
    """The data document with its grant index, as compact JSON; PolicyEngineError if it is
    not a JSON object (every engine then fails closed)."""
    if not isinstance(data, Mapping):
        raise PolicyEngineError("policy data must be a JSON object")
    try:
        return ENCODER.encode(with_grant_index(data))
    except (TypeError, ValueError):
        raise PolicyEngineError("policy data is not a JSON document") from None

# The policies live at data.gateway.authz; data stored there would collide with them.
_POLICY_NAMESPACE = "authz"


def with_grant_index(data: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` with ``gateway.grant_index`` ({insurer: {purpose: [grant ids]}}) derived
    from ``gateway.grants``, replacing any index given.

    The index saves the policy from walking every grant of every insurer on each decision.
    It only narrows the search: the policy still checks each grant's insurer and purpose, so
    a wrong index can hide a grant (deny) but never hand one over.

    >>> doc = {"gateway": {"grants": {"g-2": {"insurer": "i", "purpose": "p"},
    ...                               "g-1": {"insurer": "i", "purpose": "p"}}}}
    >>> with_grant_index(doc)["gateway"]["grant_index"]
    {'i': {'p': ['g-1', 'g-2']}}
    """
    gateway_doc = data.get("gateway")
    if gateway_doc is None:
        return dict(data)
    if not isinstance(gateway_doc, Mapping):
        raise PolicyEngineError("policy data: gateway is not an object")
    if _POLICY_NAMESPACE in gateway_doc:
        raise PolicyEngineError("policy data: gateway.authz is reserved for the policies")
    grants = gateway_doc.get("grants")
    if grants is None:
        return dict(data)
    if not isinstance(grants, Mapping):
        raise PolicyEngineError("policy data: gateway.grants is not an object")
    index: dict[str, dict[str, list[str]]] = {}
    for grant_id, grant in grants.items():
        # A grant the policy could not match stays out; the policy would skip it anyway.
        if not isinstance(grant, Mapping):
            continue
        insurer, purpose = grant.get("insurer"), grant.get("purpose")
        if isinstance(insurer, str) and isinstance(purpose, str):
            index.setdefault(insurer, {}).setdefault(purpose, []).append(str(grant_id))
    for by_purpose in index.values():
        for ids in by_purpose.values():
            ids.sort()
    return {**data, "gateway": {**gateway_doc, "grant_index": index}}
