"""Aggregate query → DuckDB SQL, built as a sqlglot expression tree.

Identifiers come only from the catalog (a name the catalog lacks is refused before any SQL
exists); filter values become literals through sqlglot, never pasted text. Every statement also
counts distinct persons per cell (``_n_persons``), which disclosure control needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlglot import exp

from gateway.catalog import Catalog, Dataset, FieldType
from gateway.errors import QueryRejected
from gateway.query.spec import ALLOWED_FUNCTIONS, AggregateQuery, Measure, measure_from_alias

__all__ = ["PERSONS_COLUMN", "CompiledQuery", "compile_aggregate"]

PERSONS_COLUMN = "_n_persons"


@dataclass(frozen=True)
class CompiledQuery:
    sql: str
    dimensions: tuple[str, ...]
    measures: tuple[str, ...]  # output names (label, else alias), in order, then hidden ones
    tree: exp.Select
    hidden: int = 0  # trailing measures computed only for HAVING / ORDER BY, never returned
    column_of: dict[str, str] = field(default_factory=dict)  # alias or label -> result column


def _literal(dataset: Dataset, name: str, value: str | int) -> exp.Expression:
    if dataset.dimensions[name].type is FieldType.INTEGER:
        try:
            return exp.Literal.number(int(value))
        except ValueError as exc:
            raise QueryRejected(f"filter on {name} needs integer values") from exc
    return exp.Literal.string(str(value))




def _aggregate(measure: Measure, dataset: Dataset, dataset_name: str) -> exp.Expr:
    """The aggregate expression of one measure (checked against the catalog)."""
    if measure.fn not in ALLOWED_FUNCTIONS:
        raise QueryRejected(f"aggregate function {measure.fn} is not allowed")
    if measure.fn in ("count_persons", "count"):
        if measure.field is not None:
            raise QueryRejected(f"{measure.fn} takes no field")
        if measure.fn == "count_persons":
            return exp.Count(this=exp.Distinct(expressions=[exp.column(dataset.person_key)]))
        return exp.Count(this=exp.Star())
    if measure.field is None or measure.field not in dataset.measures:
        raise QueryRejected(f"{measure.fn} needs a measure field of {dataset_name}")
    column = exp.column(measure.field)
    return exp.Sum(this=column) if measure.fn == "sum" else exp.Avg(this=column)


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
    person = exp.column(dataset.person_key)
    selects: list[exp.Expr] = [exp.column(d) for d in query.dimensions]
    selects.append(exp.Count(this=exp.Distinct(expressions=[person])).as_(PERSONS_COLUMN))
    aliases: list[str] = []
    outputs: list[str] = list(query.dimensions)
    by_output: dict[str, Measure] = {}
    canonical = {m.alias for m in query.measures}
    for measure in query.measures:
        node = _aggregate(measure, dataset, query.dataset)
        if measure.alias in aliases:
            raise QueryRejected(f"measure {measure.alias} is listed twice")
        if (
            measure.output in outputs
            or measure.output == PERSONS_COLUMN
            or (measure.label not in (None, measure.alias) and measure.output in canonical)
        ):
            raise QueryRejected("two output columns share a name")
        aliases.append(measure.alias)
        outputs.append(measure.output)
        by_output[measure.alias] = by_output[measure.output] = measure
        selects.append(node.as_(measure.alias))
    # A HAVING or ORDER BY on an aggregate the caller did not select is computed as a hidden
    # measure: disclosed under the same rules, used for shaping, then dropped.
    hidden: list[str] = []
    wanted = [c.measure for c in query.having or []]
    wanted += [o.column for o in query.order_by or [] if o.column not in query.dimensions]
    for name in wanted:
        if name in by_output:
            continue
        extra = measure_from_alias(name)
        if extra is None:
            raise QueryRejected("HAVING or ORDER BY names a column that is not in the result")
        by_output[name] = extra
        aliases.append(extra.alias)
        hidden.append(extra.alias)
        selects.append(_aggregate(extra, dataset, query.dataset).as_(extra.alias))
    tree = exp.select(*selects).from_(exp.to_table(dataset.table))
    for name, values in sorted(query.filters.items()):
        if not values:
            raise QueryRejected(f"filter on {name} needs at least one value")
        tree = tree.where(
            exp.In(this=exp.column(name), expressions=[_literal(dataset, name, v) for v in values])
        )
    if query.dimensions:
        tree = tree.group_by(*[exp.column(d) for d in query.dimensions])
    # HAVING, ORDER BY on measures and LIMIT act on released values only (see
    # gateway/query/shaping.py): applied to exact values in SQL they would reveal cells that
    # disclosure control suppresses. Here they are only checked to name result columns.
    if query.dimensions:
        tree = tree.order_by(*[exp.column(d) for d in query.dimensions])
    return CompiledQuery(
        sql=tree.sql(dialect="duckdb"),
        dimensions=tuple(query.dimensions),
        measures=tuple(by_output[a].output for a in aliases),
        tree=tree,
        hidden=len(hidden),
        column_of={**{d: d for d in query.dimensions},
                   **{name: m.output for name, m in by_output.items()}},
    )
