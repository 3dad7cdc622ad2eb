"""The typed aggregate query: what an insurer may ask, before any policy looks at it."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, FiniteFloat

__all__ = [
    "ALLOWED_FUNCTIONS",
    "MAX_LIMIT",
    "AggregateQuery",
    "Having",
    "Measure",
    "OrderItem",
    "measure_from_alias",
]

# min/max are never offered: each is one person's value.
ALLOWED_FUNCTIONS = ("count_persons", "count", "sum", "mean")
MAX_LIMIT = 10000
_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"


class Measure(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    fn: str = Field(min_length=1, max_length=32)
    field: str | None = Field(default=None, min_length=1, max_length=64)
    # Output column name chosen by the asker (SQL ``AS``); the SQL itself always uses ``alias``.
    label: str | None = Field(default=None, min_length=1, max_length=64, pattern=_NAME)

    @property
    def alias(self) -> str:
        return self.fn if self.field is None else f"{self.fn}_{self.field}"

    @property
    def output(self) -> str:
        """The result column name: the label if one was given, else the canonical alias."""
        return self.label or self.alias


def measure_from_alias(alias: str) -> Measure | None:
    """Read a canonical alias back into a measure (``sum_hifp_pay`` → sum of hifp_pay).

    >>> measure_from_alias("mean_hifp_pay")
    Measure(fn='mean', field='hifp_pay', label=None)
    >>> measure_from_alias("count"), measure_from_alias("max_hifp_pay")
    (Measure(fn='count', field=None, label=None), None)
    """
    if alias in ("count_persons", "count"):
        return Measure(fn=alias)
    fn, _, field = alias.partition("_")
    if fn in ("sum", "mean") and field:
        return Measure(fn=fn, field=field)
    return None


class Having(BaseModel):
    """One HAVING condition: ``<measure alias> <op> <number>`` (conditions are ANDed)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    measure: str = Field(min_length=1, max_length=80)
    op: Literal["=", "<>", "<", "<=", ">", ">="]
    value: int | FiniteFloat


class OrderItem(BaseModel):
    """Sort by an output column: a dimension, a measure alias or a measure label."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    column: str = Field(min_length=1, max_length=80)
    desc: bool = False


class AggregateQuery(BaseModel):
    """``{purpose, dataset, dimensions, measures, filters}`` as in the product brief."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    purpose: str = Field(min_length=1, max_length=64)
    dataset: str = Field(min_length=1, max_length=64)
    dimensions: list[str] = Field(default_factory=list, max_length=8)
    measures: list[Measure] = Field(min_length=1, max_length=16)
    filters: dict[str, list[str | int]] = Field(default_factory=dict, max_length=8)
    # None (the default) keeps the JSON request, its audit record and its SQL as they were.
    having: list[Having] | None = Field(default=None, max_length=8)
    order_by: list[OrderItem] | None = Field(default=None, max_length=16)
    limit: int | None = Field(default=None, ge=1, le=MAX_LIMIT)

    def fields(self) -> list[str]:
        """Every catalog field the query touches (dimensions, measure fields, filter keys,
        and the fields of measures compared in HAVING)."""
        touched = set(self.dimensions) | set(self.filters)
        touched |= {m.field for m in self.measures if m.field is not None}
        for cond in self.having or []:
            measure = measure_from_alias(cond.measure)
            if measure is not None and measure.field is not None:
                touched.add(measure.field)
        return sorted(touched)

    def policy_resource(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "dimensions": list(self.dimensions),
            "measures": [m.model_dump(exclude_none=True) for m in self.measures],
            "filters": {k: [str(v) for v in vs] for k, vs in self.filters.items()},
            "fields": self.fields(),
        }
