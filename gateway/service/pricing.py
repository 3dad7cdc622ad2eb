"""The pricing use case: simulate 惠民保 products over granted person-year cells.

One policy decision (a ``query.aggregate`` over ``person_years`` summing the fields the benefit
rule reads), one SQL statement (sqlglot, values as literals), the pure core of
:mod:`gateway.pricing` per cell and product, disclosure control on every figure, one audit entry
(``pricing.simulate``) whatever the outcome. See ``docs/pricing.md``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson
from sqlglot import exp

from gateway.auth.tokens import Principal
from gateway.catalog import Dataset, FieldType
from gateway.disclosure.complementary import MAX_EXACT_CELLS, Table, complementary_suppression
from gateway.disclosure.rules import CellContribution, magnitude_sensitivity
from gateway.errors import GatewayError, QueryRejected
from gateway.pricing import (
    CellSummary,
    LimitCheck,
    Product,
    all_binding_passed,
    check_cell,
    insured_selfpay,
    payouts,
    summarize,
)
from gateway.pricing.request import PricingRequest
from gateway.pricing.simulate import FloatArray
from gateway.service.gateway import Audited, Gateway

__all__ = ["ACTION", "BENEFIT_FIELDS", "DATASET", "build_sql", "simulate"]

ACTION = "pricing.simulate"
DATASET = "person_years"
# What the benefit rule reads (insured_selfpay's arguments) and the exposure it is priced over.
BENEFIT_FIELDS = ("inscp_scp_amt", "hifp_pay", "hifmi_pay", "fulamt_ownpay_amt",
                  "overlmt_selfpay", "exposure")
_PERSON = "_psn"
_RATIO_CHECKS = frozenset({"ratio_in_list", "ratio_out_of_list", "loss_ratio"})

IntArray = np.ndarray[Any, np.dtype[np.int64]]


def _money(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def _ratio(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def _literal(dataset: Dataset, name: str, value: str) -> exp.Expression:
    if dataset.dimensions[name].type is FieldType.INTEGER:
        try:
            return exp.Literal.number(int(value))
        except ValueError as exc:
            raise QueryRejected(f"filter on {name} needs integer values") from exc
    return exp.Literal.string(value)


def build_sql(request: PricingRequest, dataset: Dataset) -> str:
    """The one statement: the cell's dimensions, the person and the benefit fields per row.

    >>> from gateway.catalog import default_catalog
    >>> ds = default_catalog().datasets["person_years"]
    >>> r = PricingRequest(products=[{"name": "x", "deductible": 0, "ratio_in_list": 1,
    ...     "ratio_out_of_list": 1, "cap": 1}], dimensions=["gend"], year=2024)
    >>> print(build_sql(r, ds))  # doctest: +NORMALIZE_WHITESPACE
    SELECT gend, psn_id AS _psn, COALESCE(inscp_scp_amt, 0) AS inscp_scp_amt,
    COALESCE(hifp_pay, 0) AS hifp_pay, COALESCE(hifmi_pay, 0) AS hifmi_pay,
    COALESCE(fulamt_ownpay_amt, 0) AS fulamt_ownpay_amt,
    COALESCE(overlmt_selfpay, 0) AS overlmt_selfpay, COALESCE(exposure, 0) AS exposure
    FROM person_years WHERE year IN (2024) ORDER BY gend, _psn
    """
    filters = request.policy_filters()
    for name in [*request.dimensions, *filters]:
        if name not in dataset.dimensions:
            raise QueryRejected(f"{name} is not a dimension of {DATASET}")
    for name in BENEFIT_FIELDS:
        if name not in dataset.measures:
            raise QueryRejected(f"{name} is not a measure of {DATASET}")
    selects: list[exp.Expr] = [exp.column(d) for d in request.dimensions]
    selects.append(exp.column(dataset.person_key).as_(_PERSON))
    selects += [
        exp.Coalesce(this=exp.column(f), expressions=[exp.Literal.number(0)]).as_(f)
        for f in BENEFIT_FIELDS
    ]
    tree = exp.select(*selects).from_(exp.to_table(dataset.table))
    for name, values in sorted(filters.items()):
        tree = tree.where(exp.In(this=exp.column(name),
                                 expressions=[_literal(dataset, name, v) for v in values]))
    tree = tree.order_by(*[exp.column(d) for d in request.dimensions], exp.column(_PERSON))
    return tree.sql(dialect="duckdb")


def _distinct(persons: IntArray, mask: np.ndarray[Any, np.dtype[np.bool_]] | None = None) -> int:
    return int(np.unique(persons if mask is None else persons[mask]).size)


def _magnitude(persons: IntArray, pay: FloatArray) -> str | None:
    """Dominance / p% on the cell's payout, with each person's payouts over the cell summed."""
    positive = pay > 0
    if not positive.any():
        return None
    _, inverse = np.unique(persons[positive], return_inverse=True)
    per_person = np.bincount(inverse, weights=pay[positive])
    top = np.sort(per_person)[::-1]
    contribution = CellContribution(
        total=float(per_person.sum()),
        top1=float(top[0]),
        top2=float(top[1]) if top.size > 1 else 0.0,
    )
    return magnitude_sensitivity(contribution)


def _release(
    summary: CellSummary,
    persons: IntArray,
    pay: FloatArray,
    points: Sequence[float],
    min_cell_size: int,
) -> tuple[dict[str, Any], str | None, CellSummary | None]:
    """The released figures of one cell, its suppression reason, and the summary safe to check
    limits against (None when the payout figures are withheld)."""
    n_persons = _distinct(persons)
    if n_persons < min_cell_size:
        figures: dict[str, Any] = {
            "person_years": None, "exposure": None, "claimants": None, "claim_frequency": None,
            "pure_premium": None, "mean_payout_per_claimant": None, "total_payout": None,
            "tail": [{"attachment": a, "share": None} for a in points],
            "implied_premium": None, "expected_loss_ratio": None,
        }
        return figures, "primary", None
    figures = {
        "person_years": summary.person_years,
        "exposure": _money(summary.exposure),
    }
    claimant_persons = _distinct(persons, pay > 0)
    reason = "few_claimants" if claimant_persons < min_cell_size else _magnitude(persons, pay)
    if reason is not None:
        counts_ok = reason != "few_claimants"
        figures.update({
            "claimants": summary.claimants if counts_ok else None,
            "claim_frequency": _ratio(summary.claim_frequency) if counts_ok else None,
            "pure_premium": None, "mean_payout_per_claimant": None, "total_payout": None,
            "tail": [{"attachment": a, "share": None} for a in points],
            "implied_premium": None, "expected_loss_ratio": None,
        })
        return figures, reason, None
    tail = []
    for share in summary.tail:
        above = _distinct(persons, pay > share.attachment)
        tail.append({"attachment": share.attachment,
                     "share": _ratio(share.share) if above >= min_cell_size else None})
    figures.update({
        "claimants": summary.claimants,
        "claim_frequency": _ratio(summary.claim_frequency),
        "pure_premium": _money(summary.pure_premium),
        "mean_payout_per_claimant": _money(summary.mean_payout_per_claimant),
        "total_payout": _money(summary.total_payout),
        "tail": tail,
        "implied_premium": _money(summary.implied_premium),
        "expected_loss_ratio": _ratio(summary.expected_loss_ratio),
    })
    return figures, None, summary


def _protect_complements(
    cells_json: list[dict[str, Any]],
    reasons: list[str | None],
    runs: Sequence[tuple[tuple[Any, ...], int, int]],
    persons: IntArray,
    exposure: FloatArray,
    pay: FloatArray,
    points: Sequence[float],
    min_cell_size: int,
) -> None:
    """Complementary suppression across the cells of one product (in place): no withheld
    exposure or payout can be rebuilt from the released cells and the line totals (the
    ``overall`` figures, or a coarser request). Extra cells get reason ``secondary``."""
    if len(runs) < 2 or all(r is None for r in reasons):
        return
    table = Table(keys=[key for key, _, _ in runs],
                  persons=[_distinct(persons[a:b]) for _, a, b in runs])
    all_hidden = {i for i, r in enumerate(reasons) if r == "primary"}
    pay_hidden = {i for i, r in enumerate(reasons) if r is not None}
    exposures = [float(exposure[a:b].sum()) for _, a, b in runs]
    totals = [float(pay[a:b].sum()) for _, a, b in runs]
    extra_all: frozenset[int] = frozenset()
    if all_hidden:
        extra_all = complementary_suppression(
            table, all_hidden, [exposures], min_cell_size=min_cell_size,
            max_exact_cells=MAX_EXACT_CELLS).secondary
    extra_pay = complementary_suppression(
        table, pay_hidden, [totals], min_cell_size=min_cell_size,
        also_suppressed=extra_all, max_exact_cells=MAX_EXACT_CELLS).secondary
    payout_figures = ["pure_premium", "mean_payout_per_claimant", "total_payout",
                      "implied_premium", "expected_loss_ratio"]
    for i in sorted(extra_all | extra_pay):
        if i in extra_all:
            cells_json[i].update(dict.fromkeys(
                [*payout_figures, "person_years", "exposure", "claimants", "claim_frequency"]))
        elif reasons[i] is None:
            cells_json[i].update(dict.fromkeys(payout_figures))
        else:
            continue  # its payout figures are already withheld
        cells_json[i]["tail"] = [{"attachment": a, "share": None} for a in points]
        if reasons[i] != "primary":
            cells_json[i]["suppressed"] = reasons[i] = "secondary"


def _limits(product: Product, overall: CellSummary | None,
            fallback: CellSummary) -> list[LimitCheck]:
    """Limit checks against the overall summary; withheld figures fail closed (figure null)."""
    summary = overall or fallback.model_copy(update={
        "pure_premium": None, "implied_premium": None, "expected_loss_ratio": None,
    })
    checks = check_cell(product, summary)
    return [
        c.model_copy(update={"figure": _ratio(c.figure) if c.name in _RATIO_CHECKS
                             else _money(c.figure)})
        for c in checks
    ]


def _cells(dim_columns: list[tuple[Any, ...]], n_rows: int) -> list[tuple[tuple[Any, ...], int,
                                                                          int]]:
    """(key, start, stop) of each run of equal dimension values (rows come sorted by them)."""
    if not dim_columns:
        return [((), 0, n_rows)] if n_rows else []
    keys = list(zip(*dim_columns, strict=True))
    runs: list[tuple[tuple[Any, ...], int, int]] = []
    start = 0
    for i in range(1, n_rows + 1):
        if i == n_rows or keys[i] != keys[start]:
            runs.append((keys[start], start, i))
            start = i
    return runs


def simulate(gateway: Gateway, principal: Principal, request: PricingRequest) -> Audited:
    """Price each product over each granted cell and overall; one audit entry per call."""
    request_json = request.model_dump(mode="json", exclude_none=True)
    filters = request.policy_filters()
    fields = sorted(set(request.dimensions) | set(filters) | set(BENEFIT_FIELDS))
    purpose = gateway.catalog.purposes.get(request.purpose)
    justifications = {f: purpose.necessary_fields[f] for f in fields
                      if purpose is not None and f in purpose.necessary_fields}
    common: dict[str, Any] = {
        "purpose": request.purpose, "request": request_json, "fields": fields,
        "field_justifications": justifications,
    }
    resource = {
        "dataset": DATASET,
        "dimensions": list(request.dimensions),
        "measures": [{"fn": "sum", "field": f} for f in BENEFIT_FIELDS],
        "filters": filters,
        "fields": fields,
    }
    obligations = gateway.authorize_query(principal, ACTION, request.purpose, resource,
                                             common)
    min_cell_size = obligations.min_cell_size
    points = request.points()
    try:
        dataset = gateway.catalog.datasets.get(DATASET)
        if dataset is None:
            raise QueryRejected(f"unknown dataset {DATASET}")
        sql = build_sql(request, dataset)
        _, rows, data_version = gateway.store.fetch(sql)
        n_dims = len(request.dimensions)
        columns = list(zip(*rows, strict=True)) if rows else [()] * (n_dims + 1 +
                                                                     len(BENEFIT_FIELDS))
        runs = _cells(columns[:n_dims], len(rows))
        if len(runs) > obligations.max_rows:
            raise QueryRejected(
                f"{len(runs)} cells exceed the grant's {obligations.max_rows}")
        persons: IntArray = np.asarray(columns[n_dims], dtype=np.int64)
        values = {f: np.asarray(columns[n_dims + 1 + i], dtype=np.float64)
                  for i, f in enumerate(BENEFIT_FIELDS)}
        in_list, out_of_list = insured_selfpay(
            values["inscp_scp_amt"], values["hifp_pay"], values["hifmi_pay"],
            values["fulamt_ownpay_amt"], values["overlmt_selfpay"])
        exposure = values["exposure"]
        products_json: list[dict[str, Any]] = []
        released = suppressed = 0
        for product in request.products:
            pay = payouts(in_list, out_of_list, product)
            cells_json = []
            reasons: list[str | None] = []
            for key, start, stop in runs:
                summary = summarize(exposure[start:stop], pay[start:stop], points,
                                    premium=product.premium,
                                    target_loss_ratio=product.target_loss_ratio)
                figures, reason, _ = _release(summary, persons[start:stop], pay[start:stop],
                                              points, min_cell_size)
                cells_json.append({**dict(zip(request.dimensions, key, strict=True)),
                                   **figures, "suppressed": reason})
                reasons.append(reason)
            _protect_complements(cells_json, reasons, runs, persons, exposure, pay, points,
                                 min_cell_size)
            for reason in reasons:
                if reason is None:
                    released += 1
                else:
                    suppressed += 1
            total = summarize(exposure, pay, points, premium=product.premium,
                              target_loss_ratio=product.target_loss_ratio)
            overall, overall_reason, safe = _release(total, persons, pay, points, min_cell_size)
            checks = _limits(product, safe, total)
            products_json.append({
                "name": product.name,
                "tier": product.tier,
                "premium": product.premium,
                "target_loss_ratio": product.target_loss_ratio,
                "cells": cells_json,
                "overall": {**overall, "suppressed": overall_reason},
                "limits": [c.model_dump(mode="json") for c in checks],
                "limits_passed": all_binding_passed(checks),
            })
    except GatewayError as exc:
        gateway.record(principal, ACTION, status=exc.status, decision="error",
                       error_code=exc.code, reasons=[exc.message], **common)
        raise
    notes = [
        f"cells with fewer than {min_cell_size} persons are suppressed (primary); with fewer "
        f"than {min_cell_size} claimants, or a payout dominated by one or two persons "
        "(dominance n=2 k=0.90, p% p=0.10), the payout figures are withheld",
        f"a tail share is withheld when fewer than {min_cell_size} persons are above its "
        "attachment point",
        "claimants count person-years with a payout; group by year to count each person once",
        "the benefit rule: 目录内自付 = max(0, inscp_scp_amt − hifp_pay − hifmi_pay), "
        "目录外 = fulamt_ownpay_amt + overlmt_selfpay; one deductible, 目录内 first "
        "(docs/pricing.md)",
        "limit checks use the overall figures; a withheld figure fails its check",
    ]
    if any(p.has_special_drug_cover for p in request.products):
        notes.append("特药 cover is not simulated: person_years carries no special-drug "
                     "amounts, so its payout is not included (not priced at 0)")
    body: dict[str, Any] = {
        "products": products_json,
        "dimensions": list(request.dimensions),
        "attachment_points": list(points),
        "data_version": data_version,
        "min_cell_size": min_cell_size,
        "notes": notes,
    }
    audit_id = gateway.record(
        principal, ACTION, status=200, decision="allow", cells_released=released,
        cells_suppressed=suppressed, data_version=data_version,
        response_hash="sha256:" + hashlib.sha256(orjson.dumps(body)).hexdigest(), **common,
    )
    body["audit_id"] = audit_id
    return Audited(body=body, audit_id=audit_id)
