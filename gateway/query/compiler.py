"""Aggregate query → DuckDB SQL, built as a sqlglot expression tree.

Identifiers come only from the catalog (a name the catalog lacks is refused before any SQL
exists); filter values become literals through sqlglot, never pasted text. Every statement also
counts distinct persons per cell (``_n_persons``), which disclosure control needs.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlglot import exp

from gateway.catalog import Catalog, Dataset, FieldType
from gateway.errors import QueryRejected
from gateway.query.spec import ALLOWED_FUNCTIONS, AggregateQuery

__all__ = ["PERSONS_COLUMN", "CompiledQuery", "compile_aggregate"]

PERSONS_COLUMN = "_n_persons"


@dataclass(frozen=True)
class CompiledQuery:
    sql: str
    dimensions: tuple[str, ...]
    measures: tuple[str, ...]  # output aliases, in order
    tree: exp.Select


def _literal(dataset: Dataset, name: str, value: str | int) -> exp.Expression:
    if dataset.dimensions[name].type is FieldType.INTEGER:
        try:
            return exp.Literal.number(int(value))
        except ValueError as exc:
            raise QueryRejected(f"filter on {name} needs integer values") from exc
    return exp.Literal.string(str(value))


def compile_aggregate(query: AggregateQuery, catalog: Catalog) -> CompiledQuery:
    """Compile a query the policy already allowed; refuses anything outside the catalog.

    >>> from gateway.catalog import default_catalog
    >>> q = AggregateQuery(purpose="hmb_pricing", dataset="settlements", dimensions=["gend"],
    ...                    measures=[{"fn": "sum", "field": "medfee_sumamt"}],
    ...                    filters={"year": [2024]})
    >>> print(compile_aggregate(q, default_catalog()).tree.sql("duckdb", pretty=True))
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
    """
    dataset = catalog.dataset(query.dataset)
    if dataset is None:
        raise QueryRejected(f"unknown dataset {query.dataset}")
    if len(set(query.dimensions)) != len(query.dimensions):
        raise QueryRejected("a dimension is listed twice")
    for name in [*query.dimensions, *query.filters]:
        if name not in dataset.dimensions:
            raise QueryRejected(f"{name} is not a dimension of {query.dataset}")
    person = exp.column(dataset.person_key)
    selects: list[exp.Expr] = [exp.column(d) for d in query.dimensions]
    selects.append(exp.Count(this=exp.Distinct(expressions=[person])).as_(PERSONS_COLUMN))
    aliases: list[str] = []
    for measure in query.measures:
        if measure.fn not in ALLOWED_FUNCTIONS:
            raise QueryRejected(f"aggregate function {measure.fn} is not allowed")
        if measure.fn in ("count_persons", "count"):
            if measure.field is not None:
                raise QueryRejected(f"{measure.fn} takes no field")
            node: exp.Expr = (
                exp.Count(this=exp.Distinct(expressions=[person.copy()]))
                if measure.fn == "count_persons"
                else exp.Count(this=exp.Star())
            )
        else:
            if measure.field is None or measure.field not in dataset.measures:
                raise QueryRejected(f"{measure.fn} needs a measure field of {query.dataset}")
            column = exp.column(measure.field)
            node = exp.Sum(this=column) if measure.fn == "sum" else exp.Avg(this=column)
        if measure.alias in aliases:
            raise QueryRejected(f"measure {measure.alias} is listed twice")
        aliases.append(measure.alias)
        selects.append(node.as_(measure.alias))
    tree = exp.select(*selects).from_(exp.to_table(dataset.table))
    for name, values in sorted(query.filters.items()):
        if not values:
            raise QueryRejected(f"filter on {name} needs at least one value")
        tree = tree.where(
            exp.In(this=exp.column(name), expressions=[_literal(dataset, name, v) for v in values])
        )
    if query.dimensions:
        tree = tree.group_by(*[exp.column(d) for d in query.dimensions]).order_by(
            *[exp.column(d) for d in query.dimensions]
        )
    return CompiledQuery(
        sql=tree.sql(dialect="duckdb"),
        dimensions=tuple(query.dimensions),
        measures=tuple(aliases),
        tree=tree,
    )
