"""The benefit rule as a DuckDB expression tree, and the one pricing statement built on it.

The rule is the one of :func:`gateway.pricing.simulate.payouts` and
:func:`~gateway.pricing.simulate.insured_selfpay`, written with sqlglot nodes so that DuckDB
applies it to every person-year where the data lives: the rows never leave the engine, only
one row of figures per cell does. ``tests/unit/test_pricing_sql.py`` runs both forms on the same
amounts and compares them.

The statement (:func:`pricing_statement`):

1. ``_pay`` (:func:`payout_rows`): per person-year, the dimensions, the person, the exposure
   and each product's payout (``_pay_0``, ``_pay_1``, …);
2. figures over person-years, per cell and once over all cells (``GROUPING SETS``): exposure,
   claimant years, total payout, the amount above each attachment point;
3. figures over persons, which disclosure control needs — persons, claimant persons, persons
   past each attachment point, the two largest per-person payouts: with one year selected each
   row is a person and they come from the same aggregate; with the year among the dimensions
   that holds within each cell and only the overall row needs each person's years added up;
   otherwise each person's payouts are first added up within the cell (and within everything,
   for the overall row) and joined in.

Only one row per cell and the overall row leave DuckDB, through Arrow.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlglot import exp

from gateway.catalog import Dataset, FieldType
from gateway.disclosure.noise import FINGERPRINT_COLUMN, RECORDS_COLUMN
from gateway.errors import QueryRejected
from gateway.pricing.product import Product

__all__ = [
    "BENEFIT_FIELDS",
    "PAYOUT_BOUND",
    "Clips",
    "PricingColumns",
    "in_list_selfpay_sql",
    "one_row_per_person",
    "out_of_list_sql",
    "payout_rows",
    "payout_sql",
    "pricing_statement",
]

# What the benefit rule reads and the exposure it is priced over.
BENEFIT_FIELDS = ("inscp_scp_amt", "hifp_pay", "hifmi_pay", "fulamt_ownpay_amt",
                  "overlmt_selfpay", "exposure")
# The name of a grant's per person-year payout bound among its noise ``bounds``.
PAYOUT_BOUND = "payout"
_PERSON = "_psn"
_GROUPING = "_all_cells"
_ROW_HASH = "_rh"


@dataclass(frozen=True)
class Clips:
    """Per person-year contribution bounds of the noisy statement (published with the
    answer): each product's payout clipped at its bound, the exposure clamped into
    ``exposure``."""

    payouts: tuple[float, ...]  # one per product, 元
    exposure: tuple[int, int]  # person-years


def _number(value: float) -> exp.Expr:
    # A DOUBLE literal: a bare 0.8 would be DECIMAL(2,1) in DuckDB, and the rule is in doubles
    # like the numpy one.
    return exp.cast(exp.Literal.number(repr(float(value))), exp.DataType.Type.DOUBLE)


def _amount(name: str) -> exp.Expr:
    return exp.Coalesce(this=exp.column(name), expressions=[exp.Literal.number(0)])


# DuckDB's GREATEST / LEAST by name: sqlglot's own nodes render as CASE trees (to emulate
# NULL propagation) that nest exponentially here; every argument is non-NULL anyway.
def _greatest(*args: exp.Expr) -> exp.Expr:
    return exp.Anonymous(this="GREATEST", expressions=list(args))


def _least(*args: exp.Expr) -> exp.Expr:
    return exp.Anonymous(this="LEAST", expressions=list(args))


def in_list_selfpay_sql() -> exp.Expr:
    """目录内自付 = max(0, inscp_scp_amt − hifp_pay − hifmi_pay), as a DOUBLE (the decimal
    difference is exact; the rule then works in doubles)."""
    diff = exp.Sub(this=exp.Sub(this=_amount("inscp_scp_amt"), expression=_amount("hifp_pay")),
                   expression=_amount("hifmi_pay"))
    return exp.cast(_greatest(diff, exp.Literal.number(0)), exp.DataType.Type.DOUBLE)


def out_of_list_sql() -> exp.Expr:
    """目录外 = max(0, fulamt_ownpay_amt + overlmt_selfpay), as a DOUBLE."""
    total = exp.Add(this=_amount("fulamt_ownpay_amt"), expression=_amount("overlmt_selfpay"))
    return exp.cast(_greatest(total, exp.Literal.number(0)), exp.DataType.Type.DOUBLE)


def payout_sql(in_list: exp.Expr, out_of_list: exp.Expr, product: Product) -> exp.Expr:
    """One product's payout of one person-year (see ``payouts``)::

        d_in  = min(in, D);   d_out = min(out, D − d_in)
        pay   = min(cap, r_in·(in − d_in) + r_out·(out − d_out))

    Inputs are floored at 0 first, as in the numpy rule. 特药 is not part of it:
    ``person_years`` has no special-drug amounts.

    >>> p = Product(name="x", deductible=10_000, ratio_in_list=0.8, ratio_out_of_list=0.5,
    ...             cap=2_000_000)
    >>> len(payout_sql(exp.column("i"), exp.column("o"), p).sql("duckdb")) > 0
    True
    """
    zero = exp.Literal.number(0)
    inl = _greatest(in_list, zero)
    outl = _greatest(out_of_list, zero)
    deductible = _number(product.deductible)
    d_in = _least(inl.copy(), deductible.copy())
    d_out = _least(outl.copy(), exp.Sub(this=deductible.copy(), expression=d_in.copy()))
    paid_in = exp.Mul(this=exp.Paren(this=exp.Sub(this=inl.copy(), expression=d_in)),
                      expression=_number(product.ratio_in_list))
    paid_out = exp.Mul(this=exp.Paren(this=exp.Sub(this=outl.copy(), expression=d_out)),
                       expression=_number(product.ratio_out_of_list))
    return _least(_number(product.cap), exp.Add(this=paid_in, expression=paid_out))


@dataclass(frozen=True)
class PricingColumns:
    """Names of the statement's result columns, in order (see :func:`pricing_statement`)."""

    dimensions: tuple[str, ...]
    products: int
    points: tuple[float, ...]
    bounded: bool = False  # with the noisy statement's record count and fingerprint

    @property
    def grouping(self) -> str:
        return _GROUPING

    def names(self) -> list[str]:
        names = [*self.dimensions, _GROUPING, "persons", "person_years", "exposure"]
        if self.bounded:
            names += [RECORDS_COLUMN, FINGERPRINT_COLUMN]
        for j in range(self.products):
            names += [f"claimants_{j}", f"claimant_persons_{j}", f"total_{j}", f"top1_{j}",
                      f"top2_{j}"]
            for i in range(len(self.points)):
                names += [f"tail_{j}_{i}", f"above_{j}_{i}", f"above_persons_{j}_{i}"]
        return names


def _literal(dataset: Dataset, name: str, value: str) -> exp.Expression:
    if dataset.dimensions[name].type is FieldType.INTEGER:
        try:
            return exp.Literal.number(int(value))
        except ValueError as exc:
            raise QueryRejected(f"filter on {name} needs integer values") from exc
    return exp.Literal.string(value)


def _count_if(condition: exp.Expr) -> exp.Expr:
    # BIGINT: a SUM of integers is a HUGEINT in DuckDB, a decimal in Arrow
    return exp.cast(exp.Sum(this=exp.If(this=condition, true=exp.Literal.number(1),
                                        false=exp.Literal.number(0))),
                    exp.DataType.Type.BIGINT)


def _second(column: exp.Expr) -> exp.Expr:
    """The second-largest value (0 when there is none): DuckDB's top-n ``MAX(x, 2)``."""
    top = exp.Bracket(this=exp.Max(this=column, count=exp.Literal.number(2)),
                      expressions=[exp.Literal.number(1)])  # sqlglot is 0-based: DuckDB's [2]
    return exp.Coalesce(this=top, expressions=[exp.Literal.number(0)])


def one_row_per_person(filters: dict[str, list[str]]) -> bool:
    """``person_years`` holds one row per person and year (ingest builds it from persons ×
    years), so with one year selected every row is a distinct person."""
    return len(filters.get("year", [])) == 1


def _grouped(tree: exp.Select, dims: Sequence[exp.Expr]) -> exp.Select:
    """Group by each cell and once over everything (``_all_cells`` tells them apart)."""
    if not dims:
        return tree.select(exp.Literal.number(1).as_(_GROUPING))
    sets = exp.GroupingSets(expressions=[exp.Tuple(expressions=[d.copy() for d in dims]),
                                         exp.Tuple(expressions=[])])
    # GROUPING of the first dimension: 0 on a cell's row, 1 on the overall row
    flag = exp.Anonymous(this="GROUPING", expressions=[dims[0].copy()])
    return tree.select(flag.as_(_GROUPING)).group_by(sets)


def payout_rows(
    dataset: Dataset,
    dimensions: Sequence[str],
    filters: dict[str, list[str]],
    products: Sequence[Product],
    clips: Clips | None = None,
) -> exp.Select:
    """Per person-year: the dimensions, the person (``_psn``), the exposure (``_exposure``) and
    each product's payout (``_pay_0``, ``_pay_1``, …), over the rows the filters select.
    With ``clips`` (noise), each is clipped to its bound and a hash of the row (``_rh``) is
    carried for the fingerprint of what a cell covers."""
    for name in [*dimensions, *filters]:
        if name not in dataset.dimensions:
            raise QueryRejected(f"{name} is not a dimension of {dataset.table}")
    for name in BENEFIT_FIELDS:
        if name not in dataset.measures:
            raise QueryRejected(f"{name} is not a measure of {dataset.table}")
    dims = [exp.column(d) for d in dimensions]
    exposure = _amount("exposure")
    pays = [payout_sql(exp.column("_in"), exp.column("_out"), p) for p in products]
    hashed: list[exp.Expr] = []
    if clips is not None:
        lo, hi = clips.exposure
        exposure = _least(_greatest(exposure, exp.Literal.number(lo)), exp.Literal.number(hi))
        pays = [_least(pay, _number(bound)) for pay, bound in
                zip(pays, clips.payouts, strict=True)]
        hashed = [exp.func("HASH", exp.column("rowid")).as_(_ROW_HASH)]
    base = exp.select(
        *[d.copy() for d in dims],
        exp.column(dataset.person_key).as_(_PERSON),
        exposure.as_("_exposure"),
        in_list_selfpay_sql().as_("_in"),
        out_of_list_sql().as_("_out"),
        *hashed,
    ).from_(exp.to_table(dataset.table))
    for name, values in sorted(filters.items()):
        base = base.where(exp.In(this=exp.column(name),
                                 expressions=[_literal(dataset, name, v) for v in values]))
    return exp.select(
        *[d.copy() for d in dims], exp.column(_PERSON), exp.column("_exposure"),
        *[pay.as_(f"_pay_{j}") for j, pay in enumerate(pays)],
        *([exp.column(_ROW_HASH)] if hashed else []),
    ).from_(base.subquery("_base"))


def pricing_statement(
    dataset: Dataset,
    dimensions: Sequence[str],
    filters: dict[str, list[str]],
    products: Sequence[Product],
    points: Sequence[float],
    clips: Clips | None = None,
) -> tuple[exp.Query, PricingColumns]:
    """The one statement pricing every product over every cell and overall.

    With ``clips`` (the grant asks for noise) every figure is of clipped payouts and exposure
    (:func:`payout_rows`), and each row also counts its records (``_records``) and fingerprints
    them (``_fingerprint``, ``BIT_XOR(HASH(rowid))`` as in aggregates), to key stored answers.

    Result rows: the cells in dimension order, then the overall row (``_all_cells`` ≠ 0).
    Figures per row (:class:`PricingColumns`): persons, person-years, exposure, and per product
    claimant person-years, claimant persons, total payout, the two largest per-person payouts,
    and per attachment point the amount above it, the person-years and the persons past it.

    Row figures come from one aggregate over the person-years. Person figures need each
    person's payouts added up within the cell (and within all cells for the overall row): a
    per-person stage with two aggregates per product, skipped when one year is selected
    (each row is then a distinct person) and run over everything only, for the overall row,
    when the year is a dimension (each row of a cell is then a distinct person).
    """
    dims = [exp.column(d) for d in dimensions]
    zero = exp.Literal.number(0)
    rows = payout_rows(dataset, dimensions, filters, products, clips)
    columns = PricingColumns(dimensions=tuple(dimensions), products=len(products),
                             points=tuple(points), bounded=clips is not None)
    single = one_row_per_person(filters)
    # person_years has one row per person and year: with the year among the dimensions every
    # row of a cell is a distinct person too; only the overall row needs persons added up.
    cells_single = single or "year" in dimensions

    # Figures over person-years.
    by_rows: list[exp.Expr] = [
        exp.Count(this=exp.Star()).as_("person_years"),
        exp.Sum(this=exp.column("_exposure")).as_("exposure"),
    ]
    if clips is not None:
        by_rows += [exp.Count(this=exp.Star()).as_(RECORDS_COLUMN),
                    exp.func("BIT_XOR", exp.column(_ROW_HASH)).as_(FINGERPRINT_COLUMN)]
    for j in range(len(products)):
        pay = exp.column(f"_pay_{j}")
        by_rows += [
            _count_if(exp.GT(this=pay.copy(), expression=zero.copy())).as_(f"claimants_{j}"),
            exp.Sum(this=pay.copy()).as_(f"total_{j}"),
        ]
        for i, point in enumerate(points):
            by_rows += [
                exp.Sum(this=_greatest(exp.Sub(this=pay.copy(), expression=_number(point)),
                                       zero.copy())).as_(f"tail_{j}_{i}"),
                _count_if(exp.GT(this=pay.copy(), expression=_number(point))).as_(
                    f"above_{j}_{i}"),
            ]
    # The per-person stage: each person's payout sum and largest yearly payout per product.
    per_person = [e for j in range(len(products)) for e in (
        exp.Sum(this=exp.column(f"_pay_{j}")).as_(f"_sum_{j}"),
        exp.Max(this=exp.column(f"_pay_{j}")).as_(f"_max_{j}"))]

    def by_persons(rows_are_persons: bool) -> list[exp.Expr]:
        """Figures over persons: from rows that are persons, or from the per-person stage."""
        figures: list[exp.Expr] = [exp.Count(this=exp.Star()).as_("persons")]
        for j in range(len(products)):
            person_sum = exp.column(f"_pay_{j}" if rows_are_persons else f"_sum_{j}")
            person_max = exp.column(f"_pay_{j}" if rows_are_persons else f"_max_{j}")
            figures += [
                _count_if(exp.GT(this=person_sum.copy(), expression=zero.copy())).as_(
                    f"claimant_persons_{j}"),
                exp.Max(this=person_sum.copy()).as_(f"top1_{j}"),
                _second(person_sum.copy()).as_(f"top2_{j}"),
            ]
            figures += [
                _count_if(exp.GT(this=person_max.copy(), expression=_number(point))).as_(
                    f"above_persons_{j}_{i}") for i, point in enumerate(points)]
        return figures

    row_names = [str(e.alias) for e in by_rows]
    person_names = [str(e.alias) for e in by_persons(True)]
    everyone = (exp.select(exp.column(_PERSON), *[e.copy() for e in per_person])
                .from_("_pay").group_by(exp.column(_PERSON)))
    tree: exp.Query
    ctes: list[tuple[str, exp.Query]] = [("_pay", rows)]
    if single:
        tree = _grouped(exp.select(*[d.copy() for d in dims], *by_rows, *by_persons(True))
                        .from_("_pay"), dims)
    elif cells_single and dims:
        # cells straight from the rows; the overall row's person figures from one per-person
        # stage over everything
        totals = _grouped(exp.select(*[d.copy() for d in dims], *by_rows, *by_persons(True))
                          .from_("_pay"), dims)
        flag = exp.column(_GROUPING, table="_t")
        cells = (exp.select(*[exp.column(n, table="_t") for n in
                              [*dimensions, _GROUPING, *row_names, *person_names]])
                 .from_("_t").where(exp.EQ(this=flag.copy(), expression=zero.copy())))
        overall = (exp.select(*[exp.column(n, table="_t") for n in
                                [*dimensions, _GROUPING, *row_names]],
                              *[exp.column(n, table="_o") for n in person_names])
                   .from_("_t").join("_o", join_type="cross")
                   .where(exp.EQ(this=flag.copy(), expression=exp.Literal.number(1))))
        tree = exp.union(cells, overall, distinct=False)
        ctes += [("_t", totals),
                 ("_o", exp.select(*by_persons(False)).from_(everyone.subquery("_everyone")))]
    else:
        # Persons within each cell, and persons within everything (a person may sit in
        # several cells: several years, or an age band that changes): two per-person stages.
        cell_people = (exp.select(*[d.copy() for d in dims], exp.column(_PERSON), *per_person)
                       .from_("_pay").group_by(*[d.copy() for d in dims], exp.column(_PERSON)))
        ctes.append(("_pp", cell_people))
        per_cell = exp.select(*by_persons(False)).from_("_pp")
        # everyone's sums from the (cell, person) sums: fewer rows than the person-years
        everyone = (exp.select(exp.column(_PERSON), *[
            e for j in range(len(products)) for e in (
                exp.Sum(this=exp.column(f"_sum_{j}")).as_(f"_sum_{j}"),
                exp.Max(this=exp.column(f"_max_{j}")).as_(f"_max_{j}"))])
            .from_("_pp").group_by(exp.column(_PERSON)))
        people: exp.Query
        if dims:
            people = per_cell.select(*[d.copy() for d in dims],
                                     exp.Literal.number(0).as_(_GROUPING)).group_by(
                *[d.copy() for d in dims])
            overall_people = exp.select(
                *by_persons(False),
                *[exp.cast(exp.Null(), exp.DataType.Type.VARCHAR if
                           dataset.dimensions[d].type is not FieldType.INTEGER
                           else exp.DataType.Type.BIGINT).as_(d) for d in dimensions],
                exp.Literal.number(1).as_(_GROUPING),
            ).from_(everyone.subquery("_everyone"))
            people = exp.union(people, overall_people, distinct=False)
        else:
            people = per_cell.select(exp.Literal.number(1).as_(_GROUPING))
        totals = _grouped(exp.select(*[d.copy() for d in dims], *by_rows).from_("_pay"), dims)
        # each row of totals meets its person figures: same dimension values (NULL-safe, a
        # dimension may hold NULL) and the same side of the grouping sets
        on = exp.and_(*[
            exp.NullSafeEQ(this=exp.column(k, table="_t"), expression=exp.column(k, table="_p"))
            for k in [*dimensions, _GROUPING]
        ])
        tree = (exp.select(*[exp.column(n, table="_t") for n in
                             [*dimensions, _GROUPING, *row_names]],
                           *[exp.column(n, table="_p") for n in person_names])
                .from_(totals.subquery("_t"))
                .join(people.subquery("_p"), on=on))
    for name, query in ctes:  # in order: each may read the ones before
        tree = tree.with_(name, as_=query)
    if dims:
        table = None if single or cells_single else "_t"
        tree = tree.order_by(exp.column(_GROUPING, table=table),
                             *[exp.column(d, table=table) for d in dimensions])
    return tree, columns
