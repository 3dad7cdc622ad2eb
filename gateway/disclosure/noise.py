"""Noise on released aggregates, when the grant asks for it (docs/disclosure.md, "Noise").

* **Unit of privacy: one person-year.** Each person-year's contribution to a cell is bounded in
  SQL before anything is summed: amounts are clamped to the grant's published ``bounds`` per
  field, record counts to ``max_records`` per person-year (settlements); a person-year adds at
  most 1 to a person count. On ``settlements`` one person-year can fall into several cells of a
  result only through record-level dimensions (医疗类别, 医院等级), so the sensitivity is the
  per-cell bound times the number of such cells (``cells_per_person_year``).
* **Mechanisms**: OpenDP's discrete Laplace (``laplace``, pure ε) or discrete Gaussian
  (``gaussian``, ρ-zCDP, charged as (ε, δ)) on integers — counts as they are, amounts in
  cents. OpenDP samples with its own CSPRNG; there is no floating-point noise anywhere.
* **Calibration once per template**: the scale of a (mechanism, ε share, sensitivity) is
  computed once and the OpenDP measurement cached; a query only samples (~0.2 ms).
* **Post-processing**: negative counts become 0, counts are rounded to the grant's
  ``rounding``, a mean is the noisy sum over the noisy count.

Group keys are public catalog values: releasing which cells exist spends nothing.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal

from sqlglot import exp

from gateway.catalog import Catalog, Dataset, FieldType
from gateway.errors import QueryRejected, ValidationFailed
from gateway.query.spec import AggregateQuery, Measure

__all__ = [
    "FINGERPRINT_COLUMN",
    "RECORDS_COLUMN",
    "NoiseSpec",
    "NoisyPlan",
    "Sampler",
    "Series",
    "calibrate",
    "noisy_plan",
    "round_count",
]

Mechanism = Literal["laplace", "gaussian"]
FINGERPRINT_COLUMN = "_fingerprint"
RECORDS_COLUMN = "_records"
_PY = "_person_year"


@dataclass(frozen=True)
class NoiseSpec:
    """The grant's noise obligation, read strictly (fail closed on anything odd)."""

    mechanism: Mechanism
    epsilon: float  # per query, shared evenly by the released series
    delta: float = 0.0  # gaussian only
    bounds: Mapping[str, tuple[int, int]] = field(default_factory=dict)  # yuan, per person-year
    max_records: int = 1  # settlements per person-year that count

    @classmethod
    def from_obligation(cls, value: Mapping[str, Any]) -> NoiseSpec:
        mechanism = value.get("mechanism")
        if mechanism not in ("laplace", "gaussian"):
            raise ValidationFailed("noise.mechanism must be laplace or gaussian")
        epsilon = value.get("epsilon")
        if isinstance(epsilon, bool) or not isinstance(epsilon, int | float) or not (
            0 < epsilon <= 10
        ):
            raise ValidationFailed("noise.epsilon must be in (0, 10]")
        delta = value.get("delta", 0.0) or 0.0
        if mechanism == "gaussian" and not (0 < float(delta) < 1e-3):
            raise ValidationFailed("noise.delta must be in (0, 0.001) for gaussian noise")
        bounds: dict[str, tuple[int, int]] = {}
        for name, pair in dict(value.get("bounds") or {}).items():
            lo, hi = (int(x) for x in pair)
            if not lo <= hi:
                raise ValidationFailed("noise.bounds need lower <= upper")
            bounds[str(name)] = (lo, hi)
        max_records = int(value.get("max_records", 1))
        if max_records < 1:
            raise ValidationFailed("noise.max_records must be at least 1")
        return cls(mechanism, float(epsilon), float(delta), bounds, max_records)

    def published(self) -> dict[str, Any]:
        """What the response and the catalog show (everything here is public)."""
        return {
            "mechanism": self.mechanism,
            "epsilon": self.epsilon,
            **({"delta": self.delta} if self.mechanism == "gaussian" else {}),
            "unit": "person-year",
            "bounds": {k: list(v) for k, v in sorted(self.bounds.items())},
            "max_records_per_person_year": self.max_records,
        }


class Sampler:
    """OpenDP measurements, one per (mechanism, scale), built once and reused."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, float], Any] = {}

    def measurement(self, mechanism: Mechanism, scale: float) -> Any:
        key = (mechanism, scale)
        found = self._cache.get(key)
        if found is None:
            import opendp.prelude as dp  # imported on first use: ~0.3 s

            dp.enable_features("contrib")
            # 64-bit: sums in cents over a city pass 2**31.
            space = dp.vector_domain(dp.atom_domain(T="i64"))
            with self._lock:
                if mechanism == "laplace":
                    found = dp.m.make_laplace(space, dp.l1_distance(T="i64"), scale=scale)
                else:
                    found = dp.m.make_gaussian(space, dp.l2_distance(T=float), scale=scale)
                self._cache[key] = found
        return found

    def add(self, mechanism: Mechanism, scale: float, values: Sequence[int]) -> list[int]:
        if not values:
            return []
        return [int(v) for v in self.measurement(mechanism, scale)(list(values))]


def _rho_for(epsilon: float, delta: float) -> float:
    """The ρ-zCDP whose (ε, δ) conversion ε = ρ + 2√(ρ ln 1/δ) meets ``epsilon``."""
    log = math.log(1 / delta)
    root = -math.sqrt(log) + math.sqrt(log + epsilon)
    return root * root


@dataclass(frozen=True)
class Series:
    """One noised number per cell: a column of the bounded SQL."""

    name: str  # column alias in the bounded SQL
    measure: str  # the output measure it serves (a mean has two series)
    kind: Literal["count", "amount"]  # amounts are in cents
    sensitivity: int  # per cell, per person-year (count units or cents)
    bounds: tuple[int, int] | None = None  # published clamp, yuan


@dataclass(frozen=True)
class NoisyPlan:
    """The bounded statement of a query and how to noise it (cached per template)."""

    sql: str
    series: tuple[Series, ...]
    scales: tuple[float, ...]  # per series
    cells_per_person_year: int
    epsilon: float  # charged when any cell of the answer is new
    spec: NoiseSpec
    dimensions: tuple[str, ...]
    measures: tuple[Measure, ...]
    guards: tuple[int, ...] = ()  # lower bounds checked by trailing MIN columns

    def lower_bounds_hold(self, row: Sequence[Any]) -> bool:
        """The trailing guard columns of a bounded row are at or above their bounds."""
        tail = row[len(row) - len(self.guards):] if self.guards else ()
        return all(v is None or v >= lo for v, lo in zip(tail, self.guards, strict=True))

    def published(self) -> dict[str, Any]:
        return {**self.spec.published(), "cells_per_person_year": self.cells_per_person_year,
                "scales": {s.name: round(sc, 4) for s, sc in zip(self.series, self.scales,
                                                                 strict=True)}}


def calibrate(series: Sequence[Series], spec: NoiseSpec, cells: int = 1) -> tuple[float, ...]:
    """The noise scale of each series: ε of one query shared evenly by the series, each
    person-year reaching ``cells`` cells. Laplace: Δ₁ · cells / share; Gaussian: ρ-zCDP with
    ρ + 2√(ρ ln 1/δ) = share and σ = Δ₂ √cells / √(2ρ).

    >>> calibrate([Series("n", "n", "count", 1), Series("s", "s", "amount", 100)],
    ...           NoiseSpec("laplace", 1.0))
    (2.0, 200.0)
    """
    if not series:
        return ()
    share = spec.epsilon / len(series)
    if spec.mechanism == "laplace":
        return tuple(s.sensitivity * cells / share for s in series)
    rho = _rho_for(share, spec.delta)
    return tuple(s.sensitivity * math.sqrt(cells) / math.sqrt(2 * rho) for s in series)


def _literal(dataset: Dataset, name: str, value: str | int) -> exp.Expr:
    if dataset.dimensions[name].type is FieldType.INTEGER:
        try:
            return exp.Literal.number(int(value))
        except ValueError as exc:
            raise QueryRejected(f"filter on {name} needs integer values") from exc
    return exp.Literal.string(str(value))


def _clamp(expr: exp.Expr, lo: int, hi: int) -> exp.Expr:
    """Clamp into [lo, hi]. Amounts are never negative (ingest refuses them), so with
    ``lo <= 0`` only the upper clamp is computed, and a guard column (``MIN``) checks the
    lower bound instead (a fraction of the cost; the gateway fails closed if it is broken)."""
    upper = exp.Literal.number(hi)
    if lo <= 0:
        return exp.func("LEAST", expr, upper)
    return exp.func("LEAST", exp.func("GREATEST", expr, exp.Literal.number(lo)), upper)


def _record_level(catalog: Catalog, dataset_name: str) -> set[str]:
    """Dimensions that vary within a person-year (not dimensions of person_years)."""
    if dataset_name == "person_years" or "person_years" not in catalog.datasets:
        return set()
    yearly = set(catalog.datasets["person_years"].dimensions)
    return set(catalog.datasets[dataset_name].dimensions) - yearly


def noisy_plan(query: AggregateQuery, catalog: Catalog, spec: NoiseSpec) -> NoisyPlan:
    """The bounded SQL (per person-year contributions clamped) and the calibrated scales.

    Columns: dimensions, ``_n_persons`` (exact, for suppression), ``_records`` and
    ``_fingerprint`` (what the cell covers, to key stored answers), then one column per series.
    """
    dataset = catalog.dataset(query.dataset)
    if dataset is None:
        raise QueryRejected(f"unknown dataset {query.dataset}")
    per_year = query.dataset == "person_years"
    record_dims = _record_level(catalog, query.dataset)
    cells = 1
    for d in query.dimensions:
        if d in record_dims:
            values = query.filters.get(d) or dataset.dimensions[d].values
            if not values:
                raise QueryRejected(f"noise needs a bounded number of values for {d}")
            cells *= len(values)
    series: list[Series] = []
    for m in query.measures:
        if m.fn == "count_persons":
            series.append(Series(m.alias, m.output, "count", 1))
        elif m.fn == "count":
            series.append(Series(m.alias, m.output, "count", 1 if per_year else spec.max_records))
        else:
            assert m.field is not None  # noqa: S101 - checked by the compiler
            if m.field not in spec.bounds:
                raise QueryRejected(f"the grant publishes no noise bounds for {m.field}")
            lo, hi = spec.bounds[m.field]
            cents = 100 * max(abs(lo), abs(hi))
            series.append(Series(f"_nsum_{m.field}", m.output, "amount", cents, (lo, hi)))
            if m.fn == "mean":
                series.append(Series(f"_ncnt_{m.field}", m.output, "count",
                                     1 if per_year else spec.max_records))
    scales = calibrate(series, spec, cells)

    dims = [exp.column(d) for d in query.dimensions]
    person = exp.column(dataset.person_key)
    where: list[exp.Expr] = []
    for name, values in sorted(query.filters.items()):
        if name not in dataset.dimensions or not values:
            raise QueryRejected(f"filter on {name} is not a dimension filter")
        where.append(exp.In(this=exp.column(name),
                            expressions=[_literal(dataset, name, v) for v in values]))
    fingerprint = exp.func("BIT_XOR", exp.func("HASH", exp.column("rowid")))
    # A person has one person-year per year: within one year, rows (person_years) or
    # per-person-year groups (settlements) are persons, and COUNT(*) replaces the costly
    # COUNT(DISTINCT psn_id) exactly.
    single_year = "year" in query.dimensions or len(query.filters.get("year", [])) == 1

    def persons() -> exp.Expr:
        if single_year:
            return exp.Count(this=exp.Star())
        return exp.Count(this=exp.Distinct(expressions=[person.copy()]))

    guards: list[tuple[str, int]] = []

    def guard(column: exp.Expr, s: Series) -> list[exp.Expr]:
        lo, _ = _bounds(s)
        if lo > 0:
            return []
        name = f"_min{len(guards)}"
        guards.append((name, lo))
        return [exp.Min(this=column).as_(name)]

    if per_year:
        # One row is one person-year: clamp each row.
        cols: list[exp.Expr] = [
            persons().as_("_n_persons"),
            exp.Count(this=exp.Star()).as_(RECORDS_COLUMN),
            fingerprint.as_(FINGERPRINT_COLUMN),
        ]
        for s, m in _series_measures(series, query.measures):
            if s.name.startswith("_nsum_"):
                cols.append(exp.Sum(this=_clamp(exp.column(str(m.field)), *_bounds(s)))
                            .as_(s.name))
            elif s.name.startswith("_ncnt_"):
                cols.append(exp.Count(this=exp.column(str(m.field))).as_(s.name))
            elif m.fn == "count_persons":
                cols.append(persons().as_(s.name))
            else:
                cols.append(exp.Count(this=exp.Star()).as_(s.name))
        for s, m in _series_measures(series, query.measures):
            if s.name.startswith("_nsum_"):
                cols += guard(exp.column(str(m.field)), s)
        tree = exp.select(*[d.copy() for d in dims], *cols).from_(exp.to_table(dataset.table))
    else:
        # Stage 1: one row per (cell, person-year); stage 2: clamp, then add up.
        year = exp.column("year")
        group = [*[d.copy() for d in dims], person.copy()]
        if "year" not in query.dimensions:
            group.append(year)
        fields = sorted({m.field for m in query.measures if m.field is not None})
        inner = exp.select(
            *[g.copy() for g in group],
            exp.Count(this=exp.Star()).as_("_rows"),
            *[exp.Sum(this=exp.column(f)).as_(f"_s_{f}") for f in fields],
            *[exp.Count(this=exp.column(f)).as_(f"_c_{f}") for f in fields],
            fingerprint.as_("_fp"),
        ).from_(exp.to_table(dataset.table)).group_by(*[g.copy() for g in group])
        for w in where:
            inner = inner.where(w)
        where = []
        cap = exp.Literal.number(spec.max_records)
        cols = [
            persons().as_("_n_persons"),
            exp.Sum(this=exp.column("_rows")).as_(RECORDS_COLUMN),
            exp.func("BIT_XOR", exp.column("_fp")).as_(FINGERPRINT_COLUMN),
        ]
        for s, m in _series_measures(series, query.measures):
            if s.name.startswith("_nsum_"):
                cols.append(exp.Sum(this=_clamp(exp.column(f"_s_{m.field}"), *_bounds(s)))
                            .as_(s.name))
            elif s.name.startswith("_ncnt_"):
                cols.append(exp.Sum(this=exp.func("LEAST", exp.column(f"_c_{m.field}"),
                                                  cap.copy())).as_(s.name))
            elif m.fn == "count_persons":
                cols.append(persons().as_(s.name))
            else:
                cols.append(exp.Sum(this=exp.func("LEAST", exp.column("_rows"), cap.copy()))
                            .as_(s.name))
        for s, m in _series_measures(series, query.measures):
            if s.name.startswith("_nsum_"):
                cols += guard(exp.column(f"_s_{m.field}"), s)
        tree = exp.select(*[d.copy() for d in dims], *cols).from_(_PY).with_(_PY, as_=inner)
    for w in where:
        tree = tree.where(w)
    if query.dimensions:
        tree = tree.group_by(*[d.copy() for d in dims]).order_by(*[d.copy() for d in dims])
    epsilon = spec.epsilon
    return NoisyPlan(
        sql=tree.sql(dialect="duckdb"), series=tuple(series), scales=scales,
        cells_per_person_year=cells, epsilon=epsilon, spec=spec,
        dimensions=tuple(query.dimensions), measures=tuple(query.measures),
        guards=tuple(lo for _, lo in guards),
    )


def _bounds(series: Series) -> tuple[int, int]:
    if series.bounds is None:
        raise QueryRejected("an amount series has no published bounds")
    return series.bounds


def _series_measures(
    series: Sequence[Series], measures: Sequence[Measure]
) -> list[tuple[Series, Measure]]:
    by_output = {m.output: m for m in measures}
    return [(s, by_output[s.measure]) for s in series]


def to_units(value: Any, kind: str) -> int:
    """An exact bounded value in integer units (cents for amounts)."""
    if value is None:
        return 0
    if kind == "amount":
        return int((Decimal(str(value)) * 100).to_integral_value())
    return int(value)


def round_count(value: int, step: int) -> int:
    """Round a released count to the nearest multiple of ``step`` (halves up), never below 0.

    >>> [round_count(v, 5) for v in (-3, 2, 3, 12, 13)]
    [0, 0, 5, 10, 15]
    """
    value = max(value, 0)
    if step <= 1:
        return value
    return (value + step // 2) // step * step
