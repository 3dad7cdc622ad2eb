"""Grants: what an insurer may ask, for one purpose, capped by that purpose's necessary fields.

Validation is pure (catalog in, errors out); storage and the policy data document are built
from the same records, so the policy always sees exactly what the agency granted.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from gateway.catalog import Catalog
from gateway.errors import ValidationFailed
from gateway.pricing.sql import PAYOUT_BOUND
from gateway.state.store import GrantRecord

__all__ = [
    "BudgetRequest",
    "GrantRequest",
    "NoiseRequest",
    "grant_to_json",
    "new_grant_record",
    "policy_data",
    "validate_grant",
]


class NoiseRequest(BaseModel):
    """Noise on every released value (docs/disclosure.md, "Noise"): ``epsilon`` per query,
    each person-year's contribution clamped to the published ``bounds`` (yuan, per summed
    field) and ``max_records`` settlements."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mechanism: Literal["laplace", "gaussian"] = "laplace"
    epsilon: float = Field(gt=0, le=10)
    delta: float | None = Field(default=None, gt=0, lt=1e-3)
    bounds: dict[str, tuple[int, int]] = Field(default_factory=dict, max_length=32)
    max_records: int = Field(default=20, ge=1, le=10_000)


class BudgetRequest(BaseModel):
    """The grant's privacy budget: at most ``epsilon`` per ``period`` (China time)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epsilon: float = Field(gt=0, le=100)
    period: Literal["day", "month", "year", "grant"] = "month"


class GrantRequest(BaseModel):
    """A scope the agency grants to one insurer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    insurer: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    purpose: str = Field(min_length=1, max_length=64)
    datasets: list[str] = Field(min_length=1, max_length=8)
    dimensions: list[str] = Field(default_factory=list, max_length=32)
    measures: list[str] = Field(default_factory=list, max_length=32)
    filters: dict[str, list[str]] = Field(default_factory=dict, max_length=8)
    min_cell_size: int | None = Field(default=None, ge=1, le=1000)
    max_rows: int | None = Field(default=None, ge=1, le=1_000_000)
    rate_limit_per_minute: int = Field(default=600, ge=1, le=100_000)
    # Magnitude rules on sums and means (docs/disclosure.md); unset: k = 0.90, p = 0.10.
    dominance_k: float | None = Field(default=None, gt=0.5, le=1)
    p_percent: float | None = Field(default=None, gt=0, lt=1)
    # Cross-request disclosure control (docs/disclosure.md); the policy turns them into
    # obligations. Unset: difference k = min_cell_size, no rounding, no noise.
    difference_k: int | None = Field(default=None, ge=2, le=1000)
    rounding: int | None = Field(default=None, ge=1, le=1000)
    noise: NoiseRequest | None = None
    budget: BudgetRequest | None = None
    valid_from: datetime | None = None
    valid_until: datetime | None = None


def _ns(moment: datetime) -> int:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1_000_000) * 1000


def validate_grant(request: GrantRequest, catalog: Catalog, now: datetime) -> tuple[int, int]:
    """Refuse a grant the catalog or its purpose does not allow; returns its validity in ns."""
    purpose = catalog.purposes.get(request.purpose)
    if purpose is None:
        raise ValidationFailed(f"unknown purpose {request.purpose}")
    problems: list[str] = []
    dims: set[str] = set()
    measures: set[str] = set()
    for name in request.datasets:
        dataset = catalog.dataset(name)
        if dataset is None:
            problems.append(f"unknown dataset {name}")
            continue
        dims |= set(dataset.dimensions)
        measures |= set(dataset.measures)
    problems += [f"unknown dimension {d}" for d in request.dimensions if d not in dims]
    problems += [f"unknown measure field {m}" for m in request.measures if m not in measures]
    for name, values in request.filters.items():
        if name not in request.dimensions:
            problems.append(f"filter on {name} needs {name} among the granted dimensions")
        if not values:
            problems.append(f"filter on {name} needs at least one value")
    necessary = purpose.necessary_fields
    touched = sorted(set(request.dimensions) | set(request.measures) | set(request.filters))
    problems += [
        f"field {f} is not necessary for purpose {request.purpose}"
        for f in touched
        if f not in necessary
    ]
    if request.noise is not None:
        if request.budget is None:
            problems.append("noise needs a budget")
        # ``payout``: the per person-year payout bound of pricing (docs/pricing.md)
        problems += [f"noise bounds name {f}, which is not a granted measure"
                     for f in request.noise.bounds if f not in request.measures
                     and not (f == PAYOUT_BOUND and "person_years" in request.datasets)]
        problems += [f"noise bounds of {f} need lower <= upper"
                     for f, (lo, hi) in request.noise.bounds.items() if lo > hi]
        if request.noise.mechanism == "gaussian" and request.noise.delta is None:
            problems.append("gaussian noise needs delta")
    elif request.budget is not None:
        problems.append("a budget is spent by noise: set noise too")
    floor = catalog.defaults.min_cell_size_floor
    if request.min_cell_size is not None and request.min_cell_size < floor:
        problems.append(f"min_cell_size must be at least {floor}")
    start = request.valid_from or now
    end = request.valid_until or start + timedelta(days=purpose.max_grant_days)
    if end <= start:
        problems.append("valid_until must be after valid_from")
    if end <= now:
        problems.append("valid_until is in the past")
    if end - start > timedelta(days=purpose.max_grant_days):
        problems.append(f"a {request.purpose} grant may last at most {purpose.max_grant_days} days")
    if problems:
        raise ValidationFailed("grant refused", details={"problems": sorted(set(problems))})
    return _ns(start), _ns(end)


def new_grant_record(
    request: GrantRequest, catalog: Catalog, *, created_by: str, now: datetime
) -> GrantRecord:
    valid_from_ns, valid_until_ns = validate_grant(request, catalog, now)
    body = {
        "datasets": sorted(set(request.datasets)),
        "dimensions": sorted(set(request.dimensions)),
        "measures": sorted(set(request.measures)),
        "filters": {k: sorted(set(v)) for k, v in request.filters.items()},
        "min_cell_size": request.min_cell_size or catalog.defaults.min_cell_size,
        "max_rows": request.max_rows or catalog.defaults.max_rows,
        "rate_limit_per_minute": request.rate_limit_per_minute,
    }
    for option in ("dominance_k", "p_percent"):
        if (value := getattr(request, option)) is not None:
            body[option] = value
    for option in ("difference_k", "rounding"):
        if (number := getattr(request, option)) is not None:
            body[option] = number
    if request.noise is not None:
        body["noise"] = request.noise.model_dump(mode="json", exclude_none=True)
    if request.budget is not None:
        body["budget"] = request.budget.model_dump(mode="json")
    return GrantRecord(
        grant_id="g-" + secrets.token_hex(8),
        insurer=request.insurer,
        purpose=request.purpose,
        body=body,
        valid_from_ns=valid_from_ns,
        valid_until_ns=valid_until_ns,
        revoked_at_ns=None,
        created_by=created_by,
        created_at_ns=_ns(now),
    )


def _iso(ns: int | None) -> str | None:
    if ns is None:
        return None
    return datetime.fromtimestamp(ns / 1e9, tz=UTC).isoformat().replace("+00:00", "Z")


def grant_to_json(grant: GrantRecord, now_ns: int) -> dict[str, Any]:
    if grant.revoked_at_ns is not None:
        status = "revoked"
    elif now_ns >= grant.valid_until_ns:
        status = "expired"
    elif now_ns < grant.valid_from_ns:
        status = "pending"
    else:
        status = "active"
    return {
        "grant_id": grant.grant_id,
        "insurer": grant.insurer,
        "purpose": grant.purpose,
        **grant.body,
        "valid_from": _iso(grant.valid_from_ns),
        "valid_until": _iso(grant.valid_until_ns),
        "revoked_at": _iso(grant.revoked_at_ns),
        "created_by": grant.created_by,
        "status": status,
    }


# Grant options the policy turns into disclosure obligations (authz.rego, allowance).
_DISCLOSURE_OPTIONS = ("difference_k", "rounding", "noise", "budget")


def catalog_document(catalog: Catalog) -> dict[str, Any]:
    """The catalog as the policy sees it (``data.gateway.catalog``)."""
    return {
        "datasets": {
            name: {"dimensions": sorted(ds.dimensions), "measures": sorted(ds.measures)}
            for name, ds in catalog.datasets.items()
        },
        "purposes": {
            name: {"necessary_fields": sorted(p.necessary_fields)}
            for name, p in catalog.purposes.items()
        },
        "defaults": {
            "min_cell_size": catalog.defaults.min_cell_size,
            "min_cell_size_floor": catalog.defaults.min_cell_size_floor,
            "max_rows": catalog.defaults.max_rows,
        },
    }


def policy_data(catalog: Catalog, grants: Iterable[GrantRecord]) -> dict[str, Any]:
    """The whole data document the policy evaluates against (see docs/policy.md)."""
    return {
        "gateway": {
            "catalog": catalog_document(catalog),
            "grants": {
                g.grant_id: {
                    "grant_id": g.grant_id,
                    "insurer": g.insurer,
                    "purpose": g.purpose,
                    "datasets": g.body["datasets"],
                    "dimensions": g.body["dimensions"],
                    "measures": g.body["measures"],
                    "filters": g.body["filters"],
                    "min_cell_size": g.body["min_cell_size"],
                    "max_rows": g.body["max_rows"],
                    **{k: g.body[k] for k in _DISCLOSURE_OPTIONS if k in g.body},
                    "valid_from_ns": g.valid_from_ns,
                    "valid_until_ns": g.valid_until_ns,
                    "revoked": g.revoked_at_ns is not None,
                }
                for g in grants
            },
        }
    }
