"""The typed aggregate query: what an insurer may ask, before any policy looks at it."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["ALLOWED_FUNCTIONS", "AggregateQuery", "Measure"]

# min/max are never offered: each is one person's value.
ALLOWED_FUNCTIONS = ("count_persons", "count", "sum", "mean")


class Measure(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    fn: str = Field(min_length=1, max_length=32)
    field: str | None = Field(default=None, min_length=1, max_length=64)

    @property
    def alias(self) -> str:
        return self.fn if self.field is None else f"{self.fn}_{self.field}"


class AggregateQuery(BaseModel):
    """``{purpose, dataset, dimensions, measures, filters}`` as in the product brief."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    purpose: str = Field(min_length=1, max_length=64)
    dataset: str = Field(min_length=1, max_length=64)
    dimensions: list[str] = Field(default_factory=list, max_length=8)
    measures: list[Measure] = Field(min_length=1, max_length=16)
    filters: dict[str, list[str | int]] = Field(default_factory=dict, max_length=8)

    def fields(self) -> list[str]:
        """Every catalog field the query touches (dimensions, measure fields, filter keys)."""
        touched = set(self.dimensions) | set(self.filters)
        touched |= {m.field for m in self.measures if m.field is not None}
        return sorted(touched)

    def policy_resource(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "dimensions": list(self.dimensions),
            "measures": [m.model_dump(exclude_none=True) for m in self.measures],
            "filters": {k: [str(v) for v in vs] for k, vs in self.filters.items()},
            "fields": self.fields(),
        }
