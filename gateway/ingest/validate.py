"""Schema and value checks of a raw extract against the catalog.

Pure SQL construction (sqlglot trees) plus one DuckDB pass per file: every refusal names the
file, the first bad row (1-based, data rows) and the column, never the value.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import duckdb
from sqlglot import exp

from gateway.catalog import FieldType, Source, SourceField
from gateway.errors import IngestRejected

__all__ = ["ROW_COLUMN", "check_columns", "check_values"]

ROW_COLUMN = "_row"  # 1-based data row number added when the raw file is staged

_CAST_TYPES: dict[FieldType, str] = {
    FieldType.STRING: "VARCHAR",
    FieldType.DATE: "DATE",
    FieldType.TIMESTAMP: "TIMESTAMP",
    FieldType.DECIMAL: "DOUBLE",
    FieldType.INTEGER: "BIGINT",
}


def check_columns(file: str, columns: Sequence[str], source: Source) -> None:
    """Refuse undeclared or missing columns (the catalog is the whole list)."""
    declared = set(source.fields)
    for column in columns:
        if column not in declared:
            raise IngestRejected("column is not declared in the catalog", file=file, column=column)
    for field in source.fields:
        if field not in columns:
            raise IngestRejected("declared column is missing", file=file, column=field)


def _bad_value(name: str, field: SourceField, allowed: Sequence[str] | None) -> exp.Expr:
    col = exp.column(name)
    text = exp.cast(col, "VARCHAR")
    conditions: list[exp.Expr] = []
    if not field.nullable:
        conditions.append(exp.Is(this=col, expression=exp.null()))
    if field.type is not FieldType.STRING:
        # A value present but not castable to the declared type is malformed.
        conditions.append(
            exp.and_(
                exp.not_(exp.Is(this=col, expression=exp.null())),
                exp.Is(
                    this=exp.TryCast(this=col, to=exp.DataType.build(_CAST_TYPES[field.type])),
                    expression=exp.null(),
                ),
            )
        )
    else:
        conditions.append(exp.EQ(this=exp.func("trim", text), expression=exp.Literal.string("")))
    if field.type is FieldType.DECIMAL:
        cast = exp.TryCast(this=col, to=exp.DataType.build("DOUBLE"))
        conditions.append(exp.LT(this=cast, expression=exp.Literal.number(0)))
    if allowed is not None:
        conditions.append(
            exp.not_(exp.In(this=text, expressions=[exp.Literal.string(v) for v in allowed]))
        )
    return exp.or_(*conditions)


def check_values(
    con: duckdb.DuckDBPyConnection,
    file: str,
    table: str,
    source: Source,
    allowed_values: Mapping[str, Sequence[str]],
) -> None:
    """One pass over the staged table: the first bad row of each column, earliest wins."""
    selects = [
        exp.Min(
            this=exp.Case(
                ifs=[
                    exp.If(
                        this=_bad_value(name, field, allowed_values.get(name)),
                        true=exp.column(ROW_COLUMN),
                    )
                ]
            )
        ).as_(name)
        for name, field in source.fields.items()
    ]
    query = exp.select(*selects).from_(exp.to_table(table))
    row = con.execute(query.sql(dialect="duckdb")).fetchall()[0]
    worst: tuple[int, str] | None = None
    for name, bad_row in zip(source.fields, row, strict=True):
        if bad_row is not None and (worst is None or bad_row < worst[0]):
            worst = (int(bad_row), name)
    if worst is not None:
        field = source.fields[worst[1]]
        raise IngestRejected(
            f"malformed value (expected {field.type.value}"
            + (", non-empty" if not field.nullable else "")
            + ")",
            file=file,
            row=worst[0],
            column=worst[1],
        )
