"""Audit entries and the hashes over them: pure functions, no I/O.

The bytes that are hashed for an entry are :func:`canonical_json` of the entry's JSON object
(:func:`entry_bytes`). Each entry gets an RFC 6962 leaf hash, and the log chains the leaves::

    leaf_i  = SHA-256(0x00 || entry_bytes_i)          # RFC 6962 §2.1 leaf
    chain_i = SHA-256(chain_{i-1} || leaf_i),   chain_{-1} = 32 zero bytes (GENESIS)

Leaf hashing is kept apart from chaining so that an RFC 6962 Merkle tree can later be built over
the same leaves.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
from datetime import UTC, date, datetime, time, tzinfo
from typing import Any, Final

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import to_jsonable_python

__all__ = [
    "DECISIONS",
    "GENESIS",
    "HASH_SIZE",
    "LEAF_PREFIX",
    "PERSONAL_FIELDS",
    "ROLES",
    "AuditEntry",
    "canonical_json",
    "chain_hash",
    "check_personal",
    "entry_bytes",
    "entry_from_stored",
    "leaf_hash",
    "personal_commitment",
    "sha256_tag",
    "split_entry",
    "ts_bound",
    "utc_timestamp",
]

#: RFC 6962 §2.1: a leaf is hashed with a 0x00 prefix, an interior node with 0x01, so a leaf can
#: never be passed off as a node of a Merkle tree built later over the same leaves.
LEAF_PREFIX: Final = b"\x00"
HASH_SIZE: Final = 32
#: The chain value before the first entry.
GENESIS: Final = bytes(HASH_SIZE)

ROLES: Final = frozenset({"insurer", "admin", "auditor", "subject", "anonymous"})
DECISIONS: Final = frozenset({"allow", "deny", "error"})

# Fixed width, so that timestamps compare as strings in the same order as in time.
_TS_RE: Final = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z")
_EXAMPLE_TS: Final = "2026-11-22T07:29:05.123456Z"
_DIGEST_RE: Final = re.compile(r"sha256:[0-9a-f]{64}")
# A pseudonym that looks like a 身份证号 or a mobile number is almost surely a raw identifier.
_RAW_ID_RE: Final = re.compile(r"\d{17}[\dXx]|1\d{10}")


def canonical_json(obj: Any) -> bytes:
    """The byte string that is hashed: UTF-8 JSON with keys sorted by code point, no
    insignificant whitespace, non-ASCII characters written as themselves.

    NaN and infinities have no JSON form and are refused, as are strings that cannot be
    encoded as UTF-8 (lone surrogates), unsupported types and keys of mixed types; all raise
    :class:`ValueError`. (Entries reach here through ``model_dump(mode="json")``, so their
    keys are always strings.)

    This is not RFC 8785 (JCS): numbers are written as Python writes them (shortest round-trip
    repr for floats) and keys are ordered by code point rather than UTF-16 unit. Parsing the
    output and serializing again gives the same bytes, which is what the verifier relies on.

    >>> canonical_json({"b": 1, "a": ["医保", 2.5]})
    b'{"a":["\\xe5\\x8c\\xbb\\xe4\\xbf\\x9d",2.5],"b":1}'
    """
    try:
        text = json.dumps(
            obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )
    except TypeError as exc:  # unsupported type or non-string keys: not canonical JSON
        raise ValueError(f"not canonical JSON: {exc}") from exc
    return text.encode("utf-8")


def leaf_hash(data: bytes) -> bytes:
    """RFC 6962 leaf hash: SHA-256(0x00 || data).

    >>> leaf_hash(b"").hex()
    '6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d'
    """
    return hashlib.sha256(LEAF_PREFIX + data).digest()


def chain_hash(prev: bytes, leaf: bytes) -> bytes:
    """The chain value after ``leaf``: SHA-256(prev || leaf); ``prev`` is GENESIS for entry 0."""
    if len(prev) != HASH_SIZE or len(leaf) != HASH_SIZE:
        raise ValueError(
            f"chain_hash needs two {HASH_SIZE}-byte hashes, got {len(prev)} and {len(leaf)}"
        )
    return hashlib.sha256(prev + leaf).digest()


def sha256_tag(data: bytes) -> str:
    """``"sha256:<hex>"`` of ``data``, the form of ``request_hash`` and ``response_hash``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def utc_timestamp(when: datetime | None = None) -> str:
    """RFC 3339 UTC with microseconds, e.g. ``2026-11-22T07:29:05.123456Z``; now by default."""
    if when is None:
        when = datetime.now(UTC)
    elif when.tzinfo is None:
        raise ValueError("timestamp must be timezone-aware")
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class AuditEntry(BaseModel):
    """One request, allowed or denied, as it is recorded. Never holds personal data: people
    appear only as keyed pseudonyms, requests only as the query spec received."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    ts: str
    actor: str
    role: str
    org: str | None = None
    action: str
    purpose: str | None = None
    decision: str
    reasons: list[str] = Field(default_factory=list)
    status: int = Field(ge=100, le=599)
    error_code: str | None = None
    policy_version: str | None = None
    # The policies that decided: the signed bundle's manifest revision (or policy_version
    # without a bundle), and the OPA server's decision id when OPA decided (docs/policy.md).
    bundle_revision: str | None = None
    decision_id: str | None = None
    grant_id: str | None = None
    request: dict[str, Any] | None = None
    request_hash: str | None = None
    fields: list[str] = Field(default_factory=list)
    field_justifications: dict[str, str] = Field(default_factory=dict)
    cells_released: int = Field(default=0, ge=0)
    cells_suppressed: int = Field(default=0, ge=0)
    data_version: str | None = None
    response_hash: str | None = None
    subject_pseudonym: str | None = None
    consent_id: str | None = None
    budget_spent: float | None = Field(default=None, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _fill_request_hash(cls, data: Any) -> Any:
        # The hash is derived, so fill it in when omitted and refuse one that disagrees.
        if not isinstance(data, dict) or data.get("request") is None:
            return data
        digest = sha256_tag(canonical_json(to_jsonable_python(data["request"])))
        given = data.get("request_hash")
        if given is None:
            return {**data, "request_hash": digest}
        if given != digest:
            raise ValueError("request_hash does not match canonical_json(request)")
        return data

    @field_validator("ts")
    @classmethod
    def _check_ts(cls, value: str) -> str:
        if not _TS_RE.fullmatch(value):
            raise ValueError("ts must be RFC 3339 UTC with microseconds, e.g. " + _EXAMPLE_TS)
        return value

    @field_validator("role")
    @classmethod
    def _check_role(cls, value: str) -> str:
        if value not in ROLES:
            raise ValueError(f"role must be one of {sorted(ROLES)}")
        return value

    @field_validator("decision")
    @classmethod
    def _check_decision(cls, value: str) -> str:
        if value not in DECISIONS:
            raise ValueError(f"decision must be one of {sorted(DECISIONS)}")
        return value

    @field_validator("request_hash", "response_hash")
    @classmethod
    def _check_digest(cls, value: str | None) -> str | None:
        if value is not None and not _DIGEST_RE.fullmatch(value):
            raise ValueError("must be 'sha256:' followed by 64 lowercase hex digits")
        return value

    @field_validator("subject_pseudonym")
    @classmethod
    def _check_pseudonym(cls, value: str | None) -> str | None:
        if value is not None and _RAW_ID_RE.fullmatch(value):
            raise ValueError("subject_pseudonym looks like a raw identifier, not a pseudonym")
        return value


def entry_bytes(entry: AuditEntry, salt: bytes | None = None) -> bytes:
    """The leaf bytes of ``entry``: canonical JSON of every member, nulls and defaults
    included, with the personal members replaced by their salted commitment (see
    :func:`split_entry`; without ``salt`` an entry that names someone gets a random one)."""
    return split_entry(entry, salt)[0]


_DATE_RE: Final = re.compile(r"\d{4}-\d{2}-\d{2}")


def ts_bound(name: str, value: str | datetime | None, zone: tzinfo = UTC) -> str | None:
    """A ``since``/``until`` bound in entry-timestamp form, so it compares as a string.

    ``value`` is an aware datetime, an RFC 3339 timestamp with a zone, or a ``YYYY-MM-DD`` date,
    which means its midnight in ``zone`` (UTC unless given). ``ValueError`` otherwise.

    >>> ts_bound("since", "2026-01-02")
    '2026-01-02T00:00:00.000000Z'
    """
    if value is None:
        return None
    if isinstance(value, str):
        if _DATE_RE.fullmatch(value):
            day = date.fromisoformat(value)
            value = datetime.combine(day, time(0), tzinfo=zone)
        else:
            try:
                value = datetime.fromisoformat(value)
            except ValueError:
                raise ValueError(f"{name} must be YYYY-MM-DD or an RFC 3339 timestamp") from None
    if value.tzinfo is None:
        raise ValueError(f"{name} must carry a time zone (e.g. Z or +08:00)")
    return utc_timestamp(value)


# -- personal data outside the leaf (docs/audit.md "Personal data and erasure") ---------------

#: The members that are personal data: a keyed pseudonym still points at one person, and a
#: consent id names that person's authorization. They are stored beside the leaf, erasable.
PERSONAL_FIELDS: Final = ("subject_pseudonym", "consent_id")
#: Domain separation of the commitment from every other hash in the log.
_COMMITMENT_PREFIX: Final = b"yibao-gateway/audit-personal/v1\n"
SALT_SIZE: Final = 16


def personal_commitment(salt: bytes, personal: bytes) -> str:
    """``sha256:<hex>`` of ``prefix || salt || personal`` (the canonical JSON of the personal
    part). The random salt is stored and erased with the personal part, so once both are gone
    the commitment cannot be brute-forced back to a pseudonym."""
    if len(salt) != SALT_SIZE:
        raise ValueError(f"salt: got {len(salt)} bytes, want {SALT_SIZE}")
    return "sha256:" + hashlib.sha256(_COMMITMENT_PREFIX + salt + personal).hexdigest()


def split_entry(
    entry: AuditEntry, salt: bytes | None = None
) -> tuple[bytes, tuple[bytes, bytes] | None]:
    """The leaf bytes of ``entry`` and its personal part ``(salt, canonical JSON)``, or
    ``None`` when the entry names no one.

    The leaf is the entry without :data:`PERSONAL_FIELDS`, plus ``"personal"``: the
    :func:`personal_commitment` of the personal part, or ``null`` when the entry names no one.
    ``salt`` (random by default) must be stored with the personal part."""
    # The append path's hot spot. Validated members are already JSON values except the few
    # typed loosely (floats, Any); only those are checked, and anything that is not plain
    # JSON goes the reference way (pydantic's JSON mode, then canonical_json).
    obj = dict(entry.__dict__)
    fast = True
    for name in _LOOSE_MEMBERS:
        if not _plain(obj[name]):
            fast = False
            break
    if not fast:
        obj = entry.model_dump(mode="json")
    serialize = _canonical if fast else canonical_json
    personal = {name: obj.pop(name) for name in PERSONAL_FIELDS}
    if all(v is None for v in personal.values()):
        obj["personal"] = None
        return serialize(obj), None
    data = canonical_json(personal)
    if salt is None:
        salt = os.urandom(SALT_SIZE)
    obj["personal"] = personal_commitment(salt, data)
    return serialize(obj), (salt, data)


def _canonical(obj: dict[str, Any]) -> bytes:
    """:func:`canonical_json` of plain JSON values (no floats: checked by the caller), by
    orjson: the same bytes (keys sorted by code point, which is UTF-8 byte order; the same
    escapes; tested against the reference), a fifth of the time."""
    try:
        return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError:  # an int beyond 64 bits, a lone surrogate: the reference
        return canonical_json(obj)


def _plain(value: Any) -> bool:
    """Whether ``value`` is JSON made of dicts with str keys, lists, str, int, bool and None:
    what orjson writes exactly as :func:`canonical_json` does (floats are written apart).
    Loops rather than ``all()`` over generators: this runs for every appended entry."""
    kind = type(value)
    if kind is str or value is None or kind is int or kind is bool:
        return True
    if kind is dict:
        for key, item in value.items():  # noqa: SIM110 (a loop: no generator per node)
            if type(key) is not str or not _plain(item):
                return False
        return True
    if kind is list:
        for item in value:  # noqa: SIM110
            if not _plain(item):
                return False
        return True
    return False


def _loose_members() -> tuple[str, ...]:
    plain = {str, int, bool, str | None, int | None, bool | None, list[str], dict[str, str]}
    return tuple(
        name for name, info in AuditEntry.model_fields.items() if info.annotation not in plain
    )


_LOOSE_MEMBERS: Final = _loose_members()


def entry_from_stored(entry_json: str | bytes, personal_json: str | bytes | None) -> AuditEntry:
    """The :class:`AuditEntry` of a stored leaf and its personal part (``None`` once erased,
    or when there was none). Leaves written before the split carry the members inline."""
    obj = json.loads(entry_json)
    if "personal" not in obj:
        return AuditEntry.model_validate(obj)
    del obj["personal"]
    if personal_json is not None:
        obj.update(json.loads(personal_json))
    return AuditEntry.model_validate(obj)


def check_personal(commitment: str | None, salt: bytes, personal: bytes) -> bool:
    """Whether the stored personal part opens the leaf's commitment (constant time)."""
    if commitment is None:
        return False
    return hmac.compare_digest(personal_commitment(salt, personal), commitment)
