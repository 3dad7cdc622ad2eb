"""Aggregate query → DuckDB SQL, built as a sqlglot expression tree.

Identifiers come only from the catalog (a name the catalog lacks is refused before any SQL
exists); filter values become literals through sqlglot, never pasted text. Every statement also
counts distinct persons per cell (``_n_persons``), which disclosure control needs.

A query with sum or mean measures also yields, per cell and per summed field, the inputs of the
dominance and p% rules: the cell total and the two largest *per-person* sums (a person's records
in the cell add up first). One statement does both: a per-person stage (``_per_person``, grouped
by the dimensions and the person) feeds the cell aggregates, so no second scan or join is
needed. Count-only queries keep the single-stage statement (no per-person stage to pay for).

Given the stored column types, a per-person sum of a ``DECIMAL(p, s)`` column with p ≤ 18 is
kept as ``DECIMAL(18, s)`` (DuckDB's 64-bit decimal; its ``SUM`` widens to a 128-bit one).
The cell aggregates over the per-person rows (sum, the top-2 list) then run on 64-bit
integers: on the benchmark city the statement went from 1.24–1.28× the CPU time of the plain
``COUNT(DISTINCT)`` SQL to 1.10–1.13× (docs/benchmarks.md). Same scale, so no value changes;
a person whose sum would not fit fails the query (a conversion error), never rounds it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from sqlglot import exp

from gateway.catalog import Catalog, Dataset, FieldType
from gateway.disclosure.suppression import magnitude_field
from gateway.errors import QueryRejected
from gateway.query.spec import ALLOWED_FUNCTIONS, AggregateQuery, Measure, measure_from_alias

__all__ = ["PERSONS_COLUMN", "CompiledQuery", "compile_aggregate"]

PERSONS_COLUMN = "_n_persons"
_PER_PERSON = "_per_person"
_ROWS = "_rows"


@dataclass(frozen=True)
class CompiledQuery:
    sql: str
    dimensions: tuple[str, ...]
    measures: tuple[str, ...]  # output names (label, else alias), in order, then hidden ones
    tree: exp.Select
    hidden: int = 0  # trailing measures computed only for HAVING / ORDER BY, never returned
    column_of: dict[str, str] = field(default_factory=dict)  # alias or label -> result column
    # Summed fields whose (total, top1, top2) trail each row, in that order (dominance / p%).
    contribution_fields: tuple[str, ...] = ()
    # Output name of each sum / mean measure -> its field (labels hide the field in the name).
    measure_fields: dict[str, str] = field(default_factory=dict)


def _literal(dataset: Dataset, name: str, value: str | int) -> exp.Expression:
    if dataset.dimensions[name].type is FieldType.INTEGER:
        try:
            return exp.Literal.number(int(value))
        except ValueError as exc:
            raise QueryRejected(f"filter on {name} needs integer values") from exc
    return exp.Literal.string(str(value))




def _check(measure: Measure, dataset: Dataset, dataset_name: str) -> None:
    if measure.fn not in ALLOWED_FUNCTIONS:
        raise QueryRejected(f"aggregate function {measure.fn} is not allowed")
    if measure.fn in ("count_persons", "count"):
        if measure.field is not None:
            raise QueryRejected(f"{measure.fn} takes no field")
    elif measure.field is None or measure.field not in dataset.measures:
        raise QueryRejected(f"{measure.fn} needs a measure field of {dataset_name}")


def _aggregate(measure: Measure, dataset: Dataset, dataset_name: str) -> exp.Expr:
    """The aggregate expression of one measure over the table (checked against the catalog)."""
    _check(measure, dataset, dataset_name)
    if measure.fn == "count_persons":
        return exp.Count(this=exp.Distinct(expressions=[exp.column(dataset.person_key)]))
    if measure.fn == "count":
        return exp.Count(this=exp.Star())
    column = exp.column(measure.field or "")  # _check: sum and mean have a field
    return exp.Sum(this=column) if measure.fn == "sum" else exp.Avg(this=column)


def _sum_of(name: str) -> str:
    return f"_sum_{name}"


def _count_of(name: str) -> str:
    return f"_cnt_{name}"


_DECIMAL = re.compile(r"DECIMAL\((\d+),\s*(\d+)\)")


def _per_person_sum(name: str, column_types: Mapping[str, str]) -> exp.Expr:
    """A person's sum of one field within a cell, as a 64-bit decimal where the column allows.

    >>> _per_person_sum("x", {"x": "DECIMAL(18,2)"}).sql("duckdb")
    'CAST(SUM(x) AS DECIMAL(18, 2))'
    >>> _per_person_sum("x", {"x": "DOUBLE"}).sql("duckdb")
    'SUM(x)'
    """
    total = exp.Sum(this=exp.column(name))
    found = _DECIMAL.fullmatch(column_types.get(name, "").upper().replace(" ", ""))
    if found is None or int(found.group(1)) > 18:
        return total
    return exp.Cast(this=total, to=exp.DataType.build(f"DECIMAL(18, {int(found.group(2))})"))


def _over_persons(measure: Measure, dataset: Dataset) -> exp.Expr:
    """The same measure, computed from the per-person stage (one row per person and cell)."""
    if measure.fn == "count_persons":
        return exp.Count(this=exp.column(dataset.person_key))
    if measure.fn == "count":
        return exp.Sum(this=exp.column(_ROWS))
    total = exp.Sum(this=exp.column(_sum_of(measure.field or "")))  # _check: field is set
    if measure.fn == "sum":
        return total
    # = AVG(field): non-null values summed over non-null values counted
    return exp.Div(this=total, expression=exp.Sum(this=exp.column(_count_of(measure.field or ""))))


def _top_two(field_name: str, per_person: exp.Expr | None = None) -> list[exp.Expr]:
    """Cell total, largest and second-largest per-person sum of one field."""
    per_person = per_person or exp.column(_sum_of(field_name))
    # MAX(x, 2) is DuckDB's top-n aggregate (a list, largest first, NULLs skipped like MAX):
    # one aggregate gives both (DuckDB computes an aggregate written twice once). sqlglot's
    # Bracket index is 0-based and rendered 1-based for DuckDB. One contributor only: no
    # second, so 0; none at all: no first, NULL as MAX(x) would give.
    def top(i: int) -> exp.Expr:
        return exp.Bracket(this=exp.Max(this=per_person.copy(), count=exp.Literal.number(2)),
                           expressions=[exp.Literal.number(i)])

    return [
        exp.Sum(this=per_person.copy()).as_(f"_total_{field_name}"),
        top(0).as_(f"_top1_{field_name}"),
        exp.Coalesce(this=top(1), expressions=[exp.Literal.number(0)]).as_(
            f"_top2_{field_name}"),
    ]


# Datasets with one row per person and year (ingest builds person_years from persons ×
# years; tests/unit/test_pricing_sql.py checks it on a loaded store). With the year among the
# dimensions, or one year selected, every row of a cell is a distinct person.
_ONE_ROW_PER_PERSON_AND_YEAR = frozenset({"person_years"})


def _rows_are_persons(query: AggregateQuery) -> bool:
    return query.dataset in _ONE_ROW_PER_PERSON_AND_YEAR and (
        "year" in query.dimensions or len(query.filters.get("year", [])) == 1)


def compile_aggregate(
    query: AggregateQuery, catalog: Catalog, *, contributions: bool = True,
    column_types: Mapping[str, str] | None = None,
) -> CompiledQuery:
    """Compile a query the policy already allowed; refuses anything outside the catalog.

    ``column_types`` (column name → DuckDB type of the dataset's table, e.g. from
    :meth:`gateway.query.store.QueryStore.column_types`) lets the per-person stage keep 64-bit
    decimal sums; without it the statement is written for any column type.

    >>> from gateway.catalog import default_catalog
    >>> q = AggregateQuery(purpose="hmb_pricing", dataset="settlements", dimensions=["gend"],
    ...                    measures=[{"fn": "sum", "field": "medfee_sumamt"}],
    ...                    filters={"year": [2024]})
    >>> print(compile_aggregate(q, default_catalog(), contributions=False).tree.sql(
    ...     "duckdb", pretty=True))
    SELECT
      gend,
      COUNT(DISTINCT psn_id) AS _n_persons,
      SUM(medfee_sumamt) AS sum_medfee_sumamt
    FROM settlements
    WHERE
      year IN (2024)
    GROUP BY
      gend
    ORDER BY
      gend

    With ``contributions`` (the default) a sum or mean measure adds the per-person stage and the
    trailing ``_total_f, _top1_f, _top2_f`` of each summed field:

    >>> print(compile_aggregate(q, default_catalog()).tree.sql("duckdb", pretty=True))
    WITH _per_person AS (
      SELECT
        gend,
        psn_id,
        SUM(medfee_sumamt) AS _sum_medfee_sumamt
      FROM settlements
      WHERE
        year IN (2024)
      GROUP BY
        gend,
        psn_id
    )
    SELECT
      gend,
      COUNT(psn_id) AS _n_persons,
      SUM(_sum_medfee_sumamt) AS sum_medfee_sumamt,
      SUM(_sum_medfee_sumamt) AS _total_medfee_sumamt,
      MAX(_sum_medfee_sumamt, 2)[1] AS _top1_medfee_sumamt,
      COALESCE(MAX(_sum_medfee_sumamt, 2)[2], 0) AS _top2_medfee_sumamt
    FROM _per_person
    GROUP BY
      gend
    ORDER BY
      gend

    HAVING, ORDER BY and LIMIT (from SQL, or the JSON members ``having``, ``order_by``,
    ``limit``) never reach the SQL: they shape the released result after disclosure control.

    >>> q = AggregateQuery(purpose="hmb_pricing", dataset="settlements", dimensions=["gend"],
    ...                    measures=[{"fn": "count_persons", "label": "persons"}],
    ...                    having=[{"measure": "persons", "op": ">=", "value": 100}],
    ...                    order_by=[{"column": "persons", "desc": True}], limit=5)
    >>> c = compile_aggregate(q, default_catalog())
    >>> c.measures
    ('persons',)
    >>> print(c.tree.sql("duckdb", pretty=True))
    SELECT
      gend,
      COUNT(DISTINCT psn_id) AS _n_persons,
      COUNT(DISTINCT psn_id) AS count_persons
    FROM settlements
    GROUP BY
      gend
    ORDER BY
      gend
    """
    dataset = catalog.dataset(query.dataset)
    if dataset is None:
        raise QueryRejected(f"unknown dataset {query.dataset}")
    if len(set(query.dimensions)) != len(query.dimensions):
        raise QueryRejected("a dimension is listed twice")
    for name in [*query.dimensions, *query.filters]:
        if name not in dataset.dimensions:
            raise QueryRejected(f"{name} is not a dimension of {query.dataset}")
    measures: list[Measure] = []  # in output order, hidden ones last
    outputs: list[str] = list(query.dimensions)
    by_output: dict[str, Measure] = {}
    canonical = {m.alias for m in query.measures}
    for measure in query.measures:
        _check(measure, dataset, query.dataset)
        if measure.alias in {m.alias for m in measures}:
            raise QueryRejected(f"measure {measure.alias} is listed twice")
        relabelled = measure.label not in (None, measure.alias)
        if (
            measure.output in outputs
            or measure.output == PERSONS_COLUMN
            or (relabelled and measure.output in canonical)
            # a label that reads as another sum / mean would be disclosed as that field's sum
            or (relabelled and magnitude_field(measure.output) is not None)
        ):
            raise QueryRejected("two output columns share a name")
        measures.append(measure)
        outputs.append(measure.output)
        by_output[measure.alias] = by_output[measure.output] = measure
    # A HAVING or ORDER BY on an aggregate the caller did not select is computed as a hidden
    # measure: disclosed under the same rules, used for shaping, then dropped.
    hidden = 0
    wanted = [c.measure for c in query.having or []]
    wanted += [o.column for o in query.order_by or [] if o.column not in query.dimensions]
    for name in wanted:
        if name in by_output:
            continue
        extra = measure_from_alias(name)
        if extra is None:
            raise QueryRejected("HAVING or ORDER BY names a column that is not in the result")
        _check(extra, dataset, query.dataset)
        by_output[name] = extra
        measures.append(extra)
        hidden += 1

    summed = list(dict.fromkeys(m.field for m in measures if m.field is not None))
    dims = [exp.column(d) for d in query.dimensions]
    person = exp.column(dataset.person_key)
    source = exp.select().from_(exp.to_table(dataset.table))
    for name, values in sorted(query.filters.items()):
        if not values:
            raise QueryRejected(f"filter on {name} needs at least one value")
        source = source.where(
            exp.In(this=exp.column(name), expressions=[_literal(dataset, name, v) for v in values])
        )
    selects: list[exp.Expr] = [d.copy() for d in dims]
    contribution_fields: tuple[str, ...] = ()
    if contributions and summed and _rows_are_persons(query):
        # Each row of a cell is a distinct person: the rows are the per-person sums already.
        selects.append(exp.Count(this=person.copy()).as_(PERSONS_COLUMN))
        selects += [(exp.Count(this=person.copy()) if m.fn == "count_persons"
                     else _aggregate(m, dataset, query.dataset)).as_(m.alias) for m in measures]
        for f in summed:
            selects += _top_two(f, exp.column(f))
        contribution_fields = tuple(summed)
        tree = source.select(*selects)
    elif contributions and summed:
        # Stage 1: one row per (cell, person) with the person's sums; stage 2: the cell. Only
        # the aggregates the measures need: each costs a state per (cell, person).
        averaged = list(dict.fromkeys(m.field for m in measures
                                      if m.fn == "mean" and m.field is not None))
        counted = any(m.fn == "count" for m in measures)
        inner = source.select(
            *[d.copy() for d in dims], person.copy(),
            *([exp.Count(this=exp.Star()).as_(_ROWS)] if counted else []),
            *[_per_person_sum(f, column_types or {}).as_(_sum_of(f)) for f in summed],
            *[exp.Count(this=exp.column(f)).as_(_count_of(f)) for f in averaged],
        ).group_by(*[d.copy() for d in dims], person.copy())
        selects.append(exp.Count(this=person.copy()).as_(PERSONS_COLUMN))
        selects += [_over_persons(m, dataset).as_(m.alias) for m in measures]
        for f in summed:
            selects += _top_two(f)
        contribution_fields = tuple(summed)
        tree = exp.select(*selects).from_(_PER_PERSON).with_(_PER_PERSON, as_=inner)
    else:
        selects.append(exp.Count(this=exp.Distinct(expressions=[person])).as_(PERSONS_COLUMN))
        selects += [_aggregate(m, dataset, query.dataset).as_(m.alias) for m in measures]
        tree = source.select(*selects)
    if query.dimensions:
        tree = tree.group_by(*[d.copy() for d in dims])
    # HAVING, ORDER BY on measures and LIMIT act on released values only (see
    # gateway/query/shaping.py): applied to exact values in SQL they would reveal cells that
    # disclosure control suppresses. Here they are only checked to name result columns.
    if query.dimensions:
        tree = tree.order_by(*[d.copy() for d in dims])
    return CompiledQuery(
        sql=tree.sql(dialect="duckdb"),
        dimensions=tuple(query.dimensions),
        measures=tuple(by_output[m.alias].output for m in measures),
        tree=tree,
        hidden=hidden,
        column_of={**{d: d for d in query.dimensions},
                   **{name: m.output for name, m in by_output.items()}},
        contribution_fields=contribution_fields,
        measure_fields={by_output[m.alias].output: m.field for m in measures
                        if m.field is not None},
    )
