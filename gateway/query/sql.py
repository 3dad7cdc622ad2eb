"""SQL for analysts: a small SELECT subset, read into the same :class:`AggregateQuery` as JSON.

The statement is parsed with sqlglot (DuckDB dialect) and never run as written: it is read into
an :class:`AggregateQuery`, which then takes the one policy, compiler and disclosure path that
JSON queries take. Anything outside the subset is refused with a :class:`QueryRejected` whose
message names the construct (``OR``, ``JOIN``, ``MIN``, a subquery, an identifier) and never
repeats a value the asker wrote. The grammar and the refusal list are in ``docs/sql.md``.

>>> from gateway.catalog import default_catalog
>>> q = parse_sql(
...     "SELECT age_band, count_persons(), SUM(psn_part_amt) AS burden FROM settlements"
...     " WHERE year = 2024 AND med_type IN ('21', '14') GROUP BY age_band"
...     " HAVING count_persons() >= 100 ORDER BY burden DESC LIMIT 5",
...     purpose="hmb_pricing", catalog=default_catalog())
>>> q.dimensions, [m.output for m in q.measures], q.filters
(['age_band'], ['count_persons', 'burden'], {'year': [2024], 'med_type': ['21', '14']})
>>> q.having
[Having(measure='count_persons', op='>=', value=100)]
>>> q.order_by, q.limit
([OrderItem(column='sum_psn_part_amt', desc=True)], 5)
>>> parse_sql("SELECT gend, COUNT(*) FROM settlements WHERE psn_no <> 0 GROUP BY gend",
...           purpose="hmb_pricing", catalog=default_catalog())  # doctest: +ELLIPSIS
Traceback (most recent call last):
gateway.errors.QueryRejected: psn_no is an identifier and may not appear in a query ...
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import sqlglot
from pydantic import ValidationError
from sqlglot import exp

from gateway.catalog import Catalog, Dataset, Sensitivity
from gateway.errors import QueryRejected
from gateway.query.compiler import PERSONS_COLUMN
from gateway.query.spec import MAX_LIMIT, AggregateQuery, Having, Measure, OrderItem

__all__ = ["COUNT_PERSONS", "MAX_SQL_CHARS", "identifier_names", "parse_sql"]

COUNT_PERSONS = "count_persons"
MAX_SQL_CHARS = 20_000

# Aggregates that return one row's value: never offered, and refused by name.
_ONE_PERSON: dict[type[exp.Expr], str] = {
    exp.Min: "MIN", exp.Max: "MAX", exp.ArgMin: "ARG_MIN", exp.ArgMax: "ARG_MAX",
    exp.Median: "MEDIAN", exp.Quantile: "QUANTILE", exp.PercentileCont: "PERCENTILE_CONT",
    exp.PercentileDisc: "PERCENTILE_DISC", exp.First: "FIRST", exp.Last: "LAST",
    exp.AnyValue: "ANY_VALUE", exp.Mode: "MODE", exp.FirstValue: "FIRST_VALUE",
    exp.LastValue: "LAST_VALUE", exp.NthValue: "NTH_VALUE",
}
# Every node type the subset can contain; anything else is refused by name.
_ALLOWED_NODES: tuple[type[exp.Expr], ...] = (
    exp.Select, exp.From, exp.Table, exp.TableAlias, exp.Identifier, exp.Column, exp.Alias,
    exp.Anonymous, exp.Count, exp.Star, exp.Sum, exp.Avg, exp.Where, exp.And, exp.Paren,
    exp.EQ, exp.NEQ, exp.GT, exp.GTE, exp.LT, exp.LTE, exp.In, exp.Literal, exp.Neg,
    exp.Group, exp.Having, exp.Order, exp.Ordered, exp.Limit,
)
_NODE_NAMES: dict[type[exp.Expr], str] = {
    exp.Or: "OR (join conditions with AND; list alternatives with IN)",
    exp.Not: "NOT (list the wanted values with IN)", exp.Xor: "XOR", exp.Like: "LIKE",
    exp.ILike: "ILIKE",
    exp.Between: "BETWEEN", exp.Is: "IS", exp.Null: "NULL", exp.Boolean: "TRUE/FALSE",
    exp.Placeholder: "a parameter ($1, ?)", exp.Parameter: "a parameter", exp.Filter: "FILTER",
    exp.Distinct: "DISTINCT", exp.Tuple: "tuples", exp.Exists: "EXISTS",
    exp.TableSample: "TABLESAMPLE", exp.Rollup: "ROLLUP", exp.Cube: "CUBE",
    exp.GroupingSets: "GROUPING SETS", exp.Offset: "OFFSET", exp.Lateral: "LATERAL",
    exp.Pivot: "PIVOT", exp.Unnest: "UNNEST", exp.Interval: "INTERVAL", exp.Dot: "dotted names",
    exp.LimitOptions: "LIMIT PERCENT / WITH TIES",
    exp.Add: "arithmetic (+)", exp.Sub: "arithmetic (-)", exp.Mul: "arithmetic (*)",
    exp.Div: "arithmetic (/)", exp.IntDiv: "arithmetic (//)", exp.Mod: "arithmetic (%)",
    exp.DPipe: "string concatenation (||)",
}
_OPS: dict[type[exp.Expr], str] = {
    exp.EQ: "=", exp.NEQ: "<>", exp.GT: ">", exp.GTE: ">=", exp.LT: "<", exp.LTE: "<=",
}
_FLIPPED = {"=": "=", "<>": "<>", ">": "<", ">=": "<=", "<": ">", "<=": ">="}
_SELECT_ARGS = {"expressions", "from_", "where", "group", "having", "order", "limit"}
_CLAUSE_NAMES = {
    "from_": "FROM", "with_": "WITH", "distinct": "SELECT DISTINCT", "sample": "TABLESAMPLE",
    "for_": "FOR", "into": "INTO", "qualify": "QUALIFY", "offset": "OFFSET", "windows": "WINDOW",
    "joins": "JOIN", "laterals": "LATERAL", "pivots": "PIVOT", "prewhere": "PREWHERE",
    "connect": "CONNECT BY", "locks": "FOR UPDATE", "settings": "SETTINGS", "format": "FORMAT",
}
_LABEL = re.compile(r"^[a-z_][a-z0-9_]{0,63}$")
_INTEGER = re.compile(r"^[0-9]{1,18}$")
_DECIMAL = re.compile(r"^[0-9]{1,18}(\.[0-9]{0,12})?$|^\.[0-9]{1,12}$")


def identifier_names(catalog: Catalog) -> frozenset[str]:
    """Names that may appear nowhere in a query: every direct identifier of every source
    (also the dropped ones) and every dataset's person key.

    >>> from gateway.catalog import default_catalog
    >>> sorted(identifier_names(default_catalog()))
    ['addr', 'certno', 'mdtrt_id', 'psn_id', 'psn_name', 'psn_no', 'setl_id', 'tel']
    """
    names = {ds.person_key.lower() for ds in catalog.datasets.values()}
    for source in catalog.sources.values():
        names |= {
            name.lower()
            for name, spec in source.fields.items()
            if spec.sensitivity is Sensitivity.DIRECT_IDENTIFIER
        }
    return frozenset(names)


def parse_sql(sql: str, *, purpose: str, catalog: Catalog) -> AggregateQuery:
    """Read one SELECT of the subset into the aggregate query it asks; refuse anything else."""
    statement = _parse_one(sql)
    _refuse_constructs(statement, sql, catalog)
    return _Reader(statement, catalog).query(purpose)


# -- parsing and the structural refusals ----------------------------------------------------------
def _parse_one(sql: str) -> exp.Select:
    if len(sql) > MAX_SQL_CHARS:
        raise QueryRejected(f"SQL is longer than {MAX_SQL_CHARS} characters")
    parsed: list[exp.Expr | None] | None
    try:
        parsed = list(sqlglot.parse(sql, read="duckdb"))
    except Exception:  # any parser failure; its text quotes the input, so it never leaves here
        parsed = None
    if parsed is None:  # raised outside the handler: no chained parser error to leak
        raise QueryRejected("SQL could not be parsed")
    statements = [s for s in parsed if s is not None]
    if not statements:
        raise QueryRejected("SQL could not be parsed")
    if len(statements) > 1:
        raise QueryRejected("multiple statements (;) are not allowed: send one SELECT")
    root = statements[0]
    if isinstance(root, exp.SetOperation):
        raise QueryRejected(f"set operations ({_set_name(root)}) are not allowed")
    if isinstance(root, exp.Subquery):
        raise QueryRejected("subqueries are not allowed")
    if not isinstance(root, exp.Select):
        raise QueryRejected("only a single SELECT statement is allowed")
    return root


def _set_name(node: exp.Expr) -> str:
    names: dict[type[exp.Expr], str] = {
        exp.Union: "UNION", exp.Intersect: "INTERSECT", exp.Except: "EXCEPT"
    }
    return names.get(type(node), "UNION/INTERSECT/EXCEPT")


def _function_name(node: exp.Func, sql: str) -> str:
    """The function's name for a message: one of sqlglot's names for it (the one written, if
    it appears in the text), never the asker's text itself."""
    if isinstance(node, exp.Anonymous):
        name = node.name
        return name.upper() if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,40}", name) else "(unnamed)"
    names = type(node).sql_names() or [type(node).__name__.upper()]
    for name in names:
        if re.search(rf"\b{re.escape(name)}\s*\(", sql, flags=re.IGNORECASE):
            return name
    return names[0]


def _refuse_constructs(root: exp.Select, sql: str, catalog: Catalog) -> None:
    """Refuse, by name, everything that is never part of the subset, wherever it appears."""
    nodes = list(root.walk())
    # Pass order fixes which message wins when a statement breaks several rules.
    if root.args.get("with_") or any(isinstance(n, exp.With | exp.CTE) for n in nodes):
        raise QueryRejected("WITH (common table expressions) is not allowed")
    for node in nodes:
        if isinstance(node, exp.SetOperation):
            raise QueryRejected(f"set operations ({_set_name(node)}) are not allowed")
    for node in nodes:
        if (isinstance(node, exp.Query) and node is not root) or isinstance(node, exp.Subquery):
            raise QueryRejected("subqueries are not allowed")
    for node in nodes:
        if isinstance(node, exp.Window | exp.WindowSpec):
            raise QueryRejected("window functions (OVER) are not allowed")
    for node in nodes:
        if isinstance(node, exp.Join) or (
            isinstance(node, exp.Select | exp.Table) and node.args.get("joins")
        ):
            raise QueryRejected(
                "JOIN is not allowed: the catalog declares no joins between datasets"
            )
    forbidden = identifier_names(catalog)
    for node in nodes:
        if isinstance(node, exp.Identifier) and node.name.lower() in forbidden:
            raise QueryRejected(
                f"{node.name.lower()} is an identifier and may not appear in a query"
                f" (count persons with {COUNT_PERSONS}())"
            )
    for node in nodes:
        if isinstance(node, exp.Star) and not isinstance(node.parent, exp.Count):
            raise QueryRejected("SELECT * is not allowed: it selects rows; name dimensions and"
                                " aggregates")
    if root.args.get("distinct"):
        raise QueryRejected("SELECT DISTINCT is not allowed: group by dimensions instead")
    for node in nodes:
        for kind, name in _ONE_PERSON.items():
            if isinstance(node, kind):
                raise QueryRejected(f"{name} is not allowed: it is one person's value")
    for node in nodes:
        if isinstance(node, exp.Distinct):
            raise QueryRejected(
                f"DISTINCT inside an aggregate is not allowed (count persons with"
                f" {COUNT_PERSONS}())"
            )
        if (
            isinstance(node, exp.Func)
            and not isinstance(node, exp.Connector | exp.Binary | exp.Predicate)
            and not _allowed_function(node)
        ):
            raise QueryRejected(f"function {_function_name(node, sql)} is not allowed")
    for key, value in root.args.items():
        if value and key not in _SELECT_ARGS:
            name = _CLAUSE_NAMES.get(key, key.rstrip("_").upper())
            raise QueryRejected(f"{name} is not allowed")
    for node in nodes:
        if not isinstance(node, _ALLOWED_NODES):
            name = _NODE_NAMES.get(type(node), type(node).__name__.upper())
            if isinstance(node, exp.Binary | exp.Unary) and type(node) not in _NODE_NAMES:
                name = f"the operator {name}"
            raise QueryRejected(f"{name} is not allowed")


def _allowed_function(node: exp.Func) -> bool:
    if isinstance(node, exp.Anonymous):
        return node.name.lower() in (COUNT_PERSONS, "mean")
    return type(node) in (exp.Count, exp.Sum, exp.Avg)


# -- reading the tree into an AggregateQuery ------------------------------------------------------
def _unparen(node: exp.Expr) -> exp.Expr:
    while isinstance(node, exp.Paren):
        node = node.this
    return node


def _conjuncts(node: exp.Expr) -> list[exp.Expr]:
    node = _unparen(node)
    if isinstance(node, exp.And):
        return _conjuncts(node.this) + _conjuncts(node.expression)
    return [node]


def _is_aggregate(node: exp.Expr) -> bool:
    return isinstance(node, exp.Count | exp.Sum | exp.Avg | exp.Anonymous)


@dataclass
class _Select:
    """The SELECT list, read: dimensions and measures, and how output names map to them."""

    dimensions: list[str] = field(default_factory=list)
    measures: list[Measure] = field(default_factory=list)
    positions: list[str] = field(default_factory=list)  # ORDER BY n → output key
    names: dict[str, str] = field(default_factory=dict)  # output name → dimension or alias


class _Reader:
    def __init__(self, root: exp.Select, catalog: Catalog) -> None:
        self.root = root
        self.catalog = catalog
        self.name, self.dataset, self.qualifiers = self._from()

    # FROM
    def _from(self) -> tuple[str, Dataset, set[str]]:
        source = self.root.args.get("from_")
        if source is None:
            raise QueryRejected("FROM is required: name one dataset")
        table = source.this
        if not isinstance(table, exp.Table) or not isinstance(table.this, exp.Identifier):
            raise QueryRejected("FROM must name one dataset table")
        for key, value in table.args.items():
            if value and key not in ("this", "alias"):
                name = {"db": "a schema-qualified name", "catalog": "a catalog-qualified name"}.get(
                    key, _CLAUSE_NAMES.get(key, key.upper()))
                raise QueryRejected(f"{name} is not allowed in FROM")
        wanted = table.name.lower()
        for name, dataset in self.catalog.datasets.items():
            if wanted in (name.lower(), dataset.table.lower()):
                qualifiers = {wanted}
                alias = table.args.get("alias")
                if alias is not None:
                    if alias.args.get("columns"):
                        raise QueryRejected("column aliases on the FROM table are not allowed")
                    qualifiers.add(alias.name.lower())
                return name, dataset, qualifiers
        known = ", ".join(sorted(self.catalog.datasets))
        raise QueryRejected(f"FROM names a table that is not a dataset (datasets: {known})")

    def _column(self, node: exp.Expr, clause: str) -> str:
        """The lower-case name of a plain column reference (qualifier checked)."""
        if not isinstance(node, exp.Column) or not isinstance(node.this, exp.Identifier):
            raise QueryRejected(f"{clause} takes column names here, not expressions")
        if node.args.get("db") or node.args.get("catalog"):
            raise QueryRejected("schema-qualified column names are not allowed")
        if node.table and node.table.lower() not in self.qualifiers:
            raise QueryRejected(f"{clause} qualifies a column with a table not in FROM")
        return node.name.lower()

    def _field_kind(self, name: str) -> str:
        if name in self.dataset.dimensions:
            return "dimension"
        if name in self.dataset.measures:
            return "measure"
        return "unknown"

    # measures
    def _measure(self, node: exp.Expr) -> Measure:
        node = _unparen(node)
        if isinstance(node, exp.Anonymous):
            fn = node.name.lower()
            if fn == COUNT_PERSONS:
                if node.expressions:
                    raise QueryRejected(f"{COUNT_PERSONS}() takes no arguments")
                return Measure(fn=COUNT_PERSONS)
            if len(node.expressions) != 1:
                raise QueryRejected("MEAN takes one measure column")
            return Measure(fn="mean", field=self._measure_field(node.expressions[0], "MEAN"))
        if isinstance(node, exp.Count):
            if not isinstance(node.this, exp.Star) or node.expressions:
                raise QueryRejected(
                    f"COUNT takes only *: count rows with COUNT(*), persons with"
                    f" {COUNT_PERSONS}()"
                )
            return Measure(fn="count")
        if isinstance(node, exp.Sum | exp.Avg):
            fn, label = ("sum", "SUM") if isinstance(node, exp.Sum) else ("mean", "AVG")
            extra = [k for k, v in node.args.items() if v and k != "this"]
            if extra:
                raise QueryRejected(f"{label} takes one measure column")
            return Measure(fn=fn, field=self._measure_field(node.this, label))
        raise QueryRejected("only aggregates may appear here")

    def _measure_field(self, node: exp.Expr, fn: str) -> str:
        name = self._column(_unparen(node), fn)
        kind = self._field_kind(name)
        if kind == "measure":
            return name
        if kind == "dimension":
            raise QueryRejected(f"{fn} needs a measure field of {self.name}; {name} is a dimension")
        raise QueryRejected(f"{fn} names a column that is not a measure of {self.name}")

    # SELECT
    def _select(self) -> _Select:
        out = _Select()
        for item in self.root.expressions:
            alias: str | None = None
            node = item
            if isinstance(item, exp.Alias):
                alias, node = item.alias.lower(), item.this
            node = _unparen(node)
            if isinstance(node, exp.Column):
                name = self._column(node, "SELECT")
                kind = self._field_kind(name)
                if kind == "measure":
                    raise QueryRejected(
                        f"row-level select: {name} is selected without an aggregate"
                        " (use SUM or AVG)"
                    )
                if kind == "unknown":
                    raise QueryRejected(f"SELECT names a column that is not a dimension of"
                                        f" {self.name}")
                if alias not in (None, name):
                    raise QueryRejected("a dimension may only be aliased to its own name")
                if name in out.dimensions:
                    raise QueryRejected(f"dimension {name} is selected twice")
                out.dimensions.append(name)
                out.positions.append(name)
                self._name(out, name, name)
            elif _is_aggregate(node):
                measure = self._measure(node)
                if any(m.alias == measure.alias for m in out.measures):
                    raise QueryRejected(f"measure {measure.alias} is selected twice")
                label = None
                if alias is not None and alias != measure.alias:
                    if not _LABEL.fullmatch(alias):
                        raise QueryRejected("an output name must be a plain lower-case name")
                    if alias in self.dataset.fields() or alias == PERSONS_COLUMN:
                        raise QueryRejected(
                            "an output name may not be another column of the dataset"
                        )
                    label = alias
                measure = Measure(fn=measure.fn, field=measure.field, label=label)
                out.measures.append(measure)
                out.positions.append(measure.alias)
                self._name(out, measure.alias, measure.alias)
                if label is not None:
                    self._name(out, label, measure.alias)
            else:
                raise QueryRejected(
                    "SELECT takes dimension columns and aggregates (COUNT(*),"
                    f" {COUNT_PERSONS}(), SUM, AVG) only"
                )
        if not out.measures:
            raise QueryRejected(
                "row-level select: a query needs at least one aggregate (COUNT(*),"
                f" {COUNT_PERSONS}(), SUM, AVG)"
            )
        return out

    @staticmethod
    def _name(out: _Select, name: str, target: str) -> None:
        if out.names.get(name, target) != target:
            raise QueryRejected("two output columns share a name")
        out.names[name] = target

    # WHERE
    def _filters(self) -> dict[str, list[str | int]]:
        where = self.root.args.get("where")
        filters: dict[str, list[str | int]] = {}
        if where is None:
            return filters
        for cond in _conjuncts(where.this):
            if isinstance(cond, exp.EQ):
                left, right = _unparen(cond.this), _unparen(cond.expression)
                if not isinstance(left, exp.Column):
                    left, right = right, left
                column, values = left, [right]
            elif isinstance(cond, exp.In):
                if cond.args.get("query") or cond.args.get("unnest") or cond.args.get("field"):
                    raise QueryRejected("IN takes a list of values only")
                column, values = _unparen(cond.this), list(cond.expressions)
                if not values:
                    raise QueryRejected("IN needs at least one value")
            else:
                if any(_is_aggregate(n) for n in cond.walk()):
                    raise QueryRejected("aggregates are compared in HAVING, not WHERE")
                for col in cond.find_all(exp.Column):
                    if self._field_kind(col.name.lower()) == "measure":
                        raise QueryRejected(
                            f"WHERE may not compare measures ({col.name.lower()}); filter"
                            " dimensions, or compare aggregates in HAVING"
                        )
                op = _OPS.get(type(cond))
                what = f"the comparison {op}" if op else "this condition"
                raise QueryRejected(
                    f"{what} is not allowed in WHERE: use dimension = value or"
                    " dimension IN (values), joined by AND"
                )
            if _is_aggregate(column):
                raise QueryRejected("aggregates are compared in HAVING, not WHERE")
            name = self._column(column, "WHERE")
            kind = self._field_kind(name)
            if kind == "measure":
                raise QueryRejected(f"WHERE may not compare measures ({name}); filter dimensions,"
                                    " or compare aggregates in HAVING")
            if kind == "unknown":
                raise QueryRejected(f"WHERE names a column that is not a dimension of {self.name}")
            if name in filters:
                raise QueryRejected(f"{name} is filtered twice: use one IN list")
            filters[name] = [self._filter_value(v, name) for v in values]
        return filters

    @staticmethod
    def _filter_value(node: exp.Expr, name: str) -> str | int:
        node = _unparen(node)
        negative = isinstance(node, exp.Neg)
        if negative:
            node = _unparen(node.this)
        if isinstance(node, exp.Literal):
            if node.is_string and not negative:
                return str(node.this)
            if not node.is_string and _INTEGER.fullmatch(node.this):
                return -int(node.this) if negative else int(node.this)
        if isinstance(node, exp.Column):
            raise QueryRejected(f"the filter on {name} compares two columns; compare with values")
        raise QueryRejected(f"the filter on {name} takes string or integer values only")

    # GROUP BY
    def _check_group(self, sel: _Select) -> None:
        group = self.root.args.get("group")
        grouped: list[str] = []
        if group is not None:
            for key, value in group.args.items():
                if value and key != "expressions":
                    raise QueryRejected(f"GROUP BY {key.upper()} is not allowed")
            for node in group.expressions:
                node = _unparen(node)
                if isinstance(node, exp.Literal) and not node.is_string:
                    name = self._position(node, sel, "GROUP BY")
                else:
                    name = self._column(node, "GROUP BY")
                if self._field_kind(name) != "dimension":
                    raise QueryRejected("GROUP BY takes dimensions only")
                grouped.append(name)
        if len(set(grouped)) != len(grouped) or set(grouped) != set(sel.dimensions):
            raise QueryRejected(
                "GROUP BY must list exactly the selected dimensions (a selected column outside"
                " GROUP BY would select rows)"
            )

    def _position(self, node: exp.Literal, sel: _Select, clause: str) -> str:
        if not _INTEGER.fullmatch(node.this) or not 1 <= int(node.this) <= len(sel.positions):
            raise QueryRejected(f"{clause} position is not a column of the SELECT list")
        return sel.positions[int(node.this) - 1]

    # HAVING
    def _having(self, sel: _Select) -> list[Having]:
        having = self.root.args.get("having")
        if having is None:
            return []
        conditions: list[Having] = []
        for cond in _conjuncts(having.this):
            op = _OPS.get(type(cond))
            if op is None or not isinstance(cond, exp.Binary):
                raise QueryRejected(
                    "HAVING takes comparisons (=, <>, <, <=, >, >=) of an aggregate with a number,"
                    " joined by AND"
                )
            left, right = _unparen(cond.this), _unparen(cond.expression)
            if not _is_aggregate(left) and not isinstance(left, exp.Column):
                left, right, op = right, left, _FLIPPED[op]
            if not _is_aggregate(left) and not isinstance(left, exp.Column):
                raise QueryRejected("HAVING compares an aggregate or a measure output column")
            conditions.append(
                Having(measure=self._measure_ref(left, sel), op=op, value=self._number(right))
            )
        return conditions

    def _measure_ref(self, node: exp.Expr, sel: _Select) -> str:
        if _is_aggregate(node):
            return self._measure(node).alias
        name = self._column(node, "HAVING")
        target = sel.names.get(name)
        if target is None or target in sel.dimensions:
            if self._field_kind(name) == "dimension":
                raise QueryRejected("HAVING compares aggregates; filter dimensions in WHERE")
            raise QueryRejected("HAVING names a column that is not a measure of the query")
        return target

    @staticmethod
    def _number(node: exp.Expr) -> int | float:
        negative = isinstance(node, exp.Neg)
        if negative:
            node = _unparen(node.this)
        if isinstance(node, exp.Literal) and not node.is_string:
            if _INTEGER.fullmatch(node.this):
                value: int | float = int(node.this)
            elif _DECIMAL.fullmatch(node.this):
                value = float(node.this)
            else:
                raise QueryRejected("HAVING compares with a plain number")
            return -value if negative else value
        raise QueryRejected("HAVING compares with a number")

    # ORDER BY, LIMIT
    def _order(self, sel: _Select) -> list[OrderItem]:
        order = self.root.args.get("order")
        items: list[OrderItem] = []
        if order is None:
            return items
        for ordered in order.expressions:
            if not isinstance(ordered, exp.Ordered):
                raise QueryRejected("ORDER BY takes output columns")
            if ordered.args.get("nulls_first"):
                raise QueryRejected("NULLS FIRST is not allowed in ORDER BY")
            if ordered.args.get("with_fill"):
                raise QueryRejected("WITH FILL is not allowed in ORDER BY")
            node = _unparen(ordered.this)
            if isinstance(node, exp.Literal) and not node.is_string:
                column = self._position(node, sel, "ORDER BY")
            elif _is_aggregate(node):
                column = self._measure(node).alias
                if column not in sel.positions:
                    raise QueryRejected("ORDER BY names an aggregate that is not selected")
            else:
                name = self._column(node, "ORDER BY")
                target = sel.names.get(name)
                if target is None:
                    raise QueryRejected("ORDER BY names a column that is not in the result")
                column = target
            if any(i.column == column for i in items):
                raise QueryRejected("ORDER BY names a column twice")
            items.append(OrderItem(column=column, desc=bool(ordered.args.get("desc"))))
        return items

    def _limit(self) -> int | None:
        limit = self.root.args.get("limit")
        if limit is None:
            return None
        for key, value in limit.args.items():
            if value and key != "expression":
                raise QueryRejected(f"LIMIT {key.upper().replace('_', ' ')} is not allowed")
        node = limit.expression
        if (
            not isinstance(node, exp.Literal)
            or node.is_string
            or not _INTEGER.fullmatch(node.this)
            or not 1 <= int(node.this) <= MAX_LIMIT
        ):
            raise QueryRejected(f"LIMIT takes a whole number from 1 to {MAX_LIMIT}")
        return int(node.this)

    def query(self, purpose: str) -> AggregateQuery:
        sel = self._select()
        self._check_group(sel)
        filters = self._filters()
        having = self._having(sel)
        order = self._order(sel)
        limit = self._limit()
        try:
            return AggregateQuery(
                purpose=purpose, dataset=self.name, dimensions=sel.dimensions,
                measures=sel.measures, filters=filters, having=having or None,
                order_by=order or None, limit=limit,
            )
        except ValidationError:
            pass  # its text quotes values; say which limits apply instead
        raise QueryRejected(
            "the query exceeds the limits of an aggregate query (at most 8 dimensions, 16"
            " measures, 8 filtered dimensions, 8 HAVING conditions)"
        )
