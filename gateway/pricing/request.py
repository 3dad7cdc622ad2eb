"""The body of ``POST /v1/pricing/simulate``: products to price over granted person-year cells.

Only the shape is checked here (pydantic, 400 on failure); whether the dimensions and filters
are granted is the policy's decision, made in :mod:`gateway.service.pricing`.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field, FiniteFloat, model_validator

from gateway.pricing.product import Product
from gateway.pricing.simulate import DEFAULT_ATTACHMENT_POINTS

__all__ = ["PricingRequest"]


class PricingRequest(BaseModel):
    """``{purpose, products, dimensions, filters, year, attachment_points}``.

    >>> r = PricingRequest(products=[{"name": "基础版", "deductible": 15_000,
    ...     "ratio_in_list": 0.8, "ratio_out_of_list": 0.5, "cap": 3_000_000, "premium": 99}],
    ...     dimensions=["age_band"], year=2024)
    >>> r.purpose, r.points(), r.policy_filters()
    ('hmb_pricing', (10000.0, 50000.0, 100000.0, 500000.0), {'year': ['2024']})
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    purpose: str = Field(default="hmb_pricing", min_length=1, max_length=64)
    products: list[Product] = Field(min_length=1, max_length=5)
    dimensions: list[str] = Field(default_factory=list, max_length=5)
    filters: dict[str, list[str | int]] = Field(default_factory=dict, max_length=8)
    year: int | None = Field(default=None, ge=1900, le=2200)
    attachment_points: list[FiniteFloat] | None = Field(default=None, min_length=1, max_length=8)

    @model_validator(mode="after")
    def _consistent(self) -> PricingRequest:
        names = [p.name for p in self.products]
        if len(set(names)) != len(names):
            raise ValueError("products: each product needs its own name")
        if len(set(self.dimensions)) != len(self.dimensions):
            raise ValueError("dimensions: a dimension is listed twice")
        if any(not values for values in self.filters.values()):
            raise ValueError("filters: each filter needs at least one value")
        if self.year is not None and "year" in self.filters:
            raise ValueError("year: give the year either as `year` or in `filters`, not both")
        if self.attachment_points is not None and not all(
            math.isfinite(a) and a >= 0 for a in self.attachment_points
        ):
            raise ValueError("attachment_points: each must be a finite amount ≥ 0")
        return self

    def points(self) -> tuple[float, ...]:
        """The attachment points, sorted and without repeats (the defaults when none given)."""
        given = self.attachment_points
        return DEFAULT_ATTACHMENT_POINTS if given is None else tuple(sorted(set(given)))

    def policy_filters(self) -> dict[str, list[str]]:
        """Filters as the policy reads them (values as strings), with ``year`` folded in."""
        filters = {k: [str(v) for v in vs] for k, vs in self.filters.items()}
        if self.year is not None:
            filters["year"] = [str(self.year)]
        return filters
