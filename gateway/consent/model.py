"""The consent record and the authorization it projects into a token.

A :class:`ConsentRecord` is what the agency keeps (modelled on the FHIR R4 ``Consent`` resource:
``status`` → ``state``, ``patient`` → ``subject``, ``provision.actor`` → ``insurer_org``,
``provision.purpose`` → ``purpose``, ``provision.class`` → ``datatypes``, ``provision.dataPeriod``
→ ``period_start``/``period_end``, ``provision.period`` → ``valid_from``/``valid_until``,
``dateTime`` → ``created_at``). What the insurer carries is one :class:`AuthorizationDetail`
(RFC 9396 ``authorization_details`` entry) inside a signed consent token.

``subject`` is the gateway's internal person pseudonym; it never leaves the gateway (the token
carries a pairwise pseudonym instead, see :mod:`gateway.consent.pseudonym`), and a value shaped
like a 身份证号 is refused.

>>> rule = PURPOSES["enrollment_check"]
>>> rule.max_lifetime_s, rule.single_use
(600, True)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "AUTHORIZATION_TYPE",
    "PURPOSES",
    "AuthorizationDetail",
    "ConsentRecord",
    "ConsentState",
    "DataPeriod",
    "PurposeRule",
    "looks_like_resident_id",
]

AUTHORIZATION_TYPE = "yibao_data_access"
_DATATYPE = r"^[a-z][a-z0-9_]*\.[a-z][a-z0-9_]*$"
_ID = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
# 18-character resident identity number (GB 11643): 17 digits and a digit or X check character.
_RESIDENT_ID = re.compile(r"\d{17}[\dXx]")


def looks_like_resident_id(value: str) -> bool:
    """True when ``value`` contains something shaped like a 身份证号 (never a pseudonym).

    >>> looks_like_resident_id("42010119900101123X"), looks_like_resident_id("psn:3f9a6c0e")
    (True, False)
    """
    return _RESIDENT_ID.search(value) is not None


@dataclass(frozen=True)
class PurposeRule:
    """What a consent for one purpose may authorize and how long its token may live."""

    datatypes: frozenset[str]
    actions: frozenset[str]
    max_lifetime_s: int | None  # None: bounded by the consent's validity only
    single_use: bool


PURPOSES: dict[str, PurposeRule] = {
    # 投保身份校验: enrolled or not, 险种, 参保地 — one check, within ten minutes.
    "enrollment_check": PurposeRule(
        datatypes=frozenset({"enrollment.status", "enrollment.insutype", "enrollment.admdvs"}),
        actions=frozenset({"read"}),
        max_lifetime_s=600,
        single_use=True,
    ),
    # 线上快速理赔: the person's settlements in the consented data period.
    "claims_fast_track": PurposeRule(
        datatypes=frozenset(
            {"settlements.summary", "settlements.amounts", "settlements.diagnosis_category"}
        ),
        actions=frozenset({"read"}),
        max_lifetime_s=None,
        single_use=False,
    ),
}


class ConsentState(StrEnum):
    ACTIVE = "active"
    REVOKED = "revoked"
    EXPIRED = "expired"


class DataPeriod(BaseModel):
    """The data period (dates of the records, not of the token), both ends inclusive."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    start: date
    end: date

    @field_validator("start", "end", mode="before")
    @classmethod
    def _iso_date(cls, value: object) -> object:
        if isinstance(value, date) and not isinstance(value, datetime):
            return value
        if isinstance(value, str) and re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
            return value
        raise ValueError("dates are YYYY-MM-DD")

    @model_validator(mode="after")
    def _ordered(self) -> DataPeriod:
        if self.start > self.end:
            raise ValueError("period start after end")
        return self

    def covers(self, other: DataPeriod) -> bool:
        return self.start <= other.start and other.end <= self.end


class AuthorizationDetail(BaseModel):
    """One RFC 9396 ``authorization_details`` entry of type ``yibao_data_access``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    type: Literal["yibao_data_access"]
    actions: tuple[str, ...] = Field(min_length=1, max_length=8)
    datatypes: tuple[str, ...] = Field(min_length=1, max_length=32)
    purpose: str = Field(pattern=r"^[a-z][a-z0-9_]{0,63}$")
    claim_id: str | None = Field(default=None, pattern=_ID)
    period: DataPeriod

    @field_validator("datatypes")
    @classmethod
    def _datatype_names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for item in value:
            if not re.fullmatch(_DATATYPE, item):
                raise ValueError("datatype names are <category>.<name>")
        if len(set(value)) != len(value):
            raise ValueError("datatypes repeated")
        return value

    def to_claim(self) -> dict[str, object]:
        claim: dict[str, object] = {
            "type": self.type,
            "actions": list(self.actions),
            "datatypes": list(self.datatypes),
            "purpose": self.purpose,
            "period": {"start": self.period.start.isoformat(), "end": self.period.end.isoformat()},
        }
        if self.claim_id is not None:
            claim["claim_id"] = self.claim_id
        return claim


class ConsentRecord(BaseModel):
    """The durable consent, as the agency keeps it (FHIR Consent, trimmed to what is decided)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    consent_id: str = Field(pattern=_ID)
    subject: str = Field(min_length=1, max_length=128)
    insurer_org: str = Field(min_length=1, max_length=128)
    purpose: str
    datatypes: tuple[str, ...] = Field(min_length=1)
    period_start: date
    period_end: date
    valid_from: datetime
    valid_until: datetime
    state: ConsentState = ConsentState.ACTIVE
    created_by: str = Field(min_length=1, max_length=128)
    created_at: datetime
    single_use: bool = False
    claim_id: str | None = Field(default=None, pattern=_ID)

    @field_validator("subject")
    @classmethod
    def _pseudonym_only(cls, value: str) -> str:
        if looks_like_resident_id(value):
            raise ValueError("subject must be a pseudonym, never a resident id number")
        return value

    @field_validator("valid_from", "valid_until", "created_at")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            raise ValueError("timestamps must carry a time zone")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ConsentRecord:
        rule = PURPOSES.get(self.purpose)
        if rule is None:
            raise ValueError("unknown purpose")
        outside = sorted(set(self.datatypes) - rule.datatypes)
        if outside:
            raise ValueError(f"datatypes {outside} are not available for purpose {self.purpose}")
        if len(set(self.datatypes)) != len(self.datatypes):
            raise ValueError("datatypes repeated")
        if self.period_start > self.period_end:
            raise ValueError("period_start after period_end")
        if self.valid_from >= self.valid_until:
            raise ValueError("valid_from must be before valid_until")
        if rule.single_use and not self.single_use:
            raise ValueError(f"a {self.purpose} consent is single use")
        return self

    @property
    def rule(self) -> PurposeRule:
        return PURPOSES[self.purpose]

    def authorization_detail(self) -> AuthorizationDetail:
        return AuthorizationDetail(
            type=AUTHORIZATION_TYPE,
            actions=tuple(sorted(self.rule.actions)),
            datatypes=tuple(sorted(self.datatypes)),
            purpose=self.purpose,
            claim_id=self.claim_id,
            period=DataPeriod(start=self.period_start, end=self.period_end),
        )
