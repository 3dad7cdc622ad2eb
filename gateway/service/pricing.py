"""The pricing use case: simulate 惠民保 products over granted person-year cells.

One policy decision (a ``query.aggregate`` over ``person_years`` summing the fields the benefit
rule reads), one SQL statement (:mod:`gateway.pricing.sql`: the benefit rule applied by DuckDB
to every person-year, one row of figures per cell and one overall, fetched through Arrow),
the pure core of :mod:`gateway.pricing` for each cell's figures and limit checks, disclosure
control on every figure — and, when the grant asks, noise on the additive bases, the privacy
budget and rounding through the aggregate's path (``DisclosureControl.noisy_answers``) — one
audit entry (``pricing.simulate``) whatever the outcome. See ``docs/pricing.md``.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import numpy as np
import orjson

from gateway.auth.tokens import Principal
from gateway.disclosure.complementary import MAX_EXACT_CELLS, Table, complementary_suppression
from gateway.disclosure.control import DisclosureOptions, NoisyCells
from gateway.disclosure.noise import (
    FINGERPRINT_COLUMN,
    RECORDS_COLUMN,
    NoiseSpec,
    Series,
    calibrate,
    round_count,
    to_units,
)
from gateway.disclosure.rules import CellContribution, magnitude_sensitivity
from gateway.errors import GatewayError, QueryRejected, StoreUnavailable
from gateway.pricing import (
    CellSummary,
    LimitCheck,
    Product,
    all_binding_passed,
    check_cell,
    summary_from_totals,
)
from gateway.pricing.request import PricingRequest
from gateway.pricing.sql import BENEFIT_FIELDS, PAYOUT_BOUND, Clips, pricing_statement
from gateway.service.gateway import Audited, Gateway

__all__ = ["ACTION", "BENEFIT_FIELDS", "DATASET", "simulate"]

ACTION = "pricing.simulate"
DATASET = "person_years"
_RATIO_CHECKS = frozenset({"ratio_in_list", "ratio_out_of_list", "loss_ratio"})
_PAYOUT_FIGURES = ("pure_premium", "mean_payout_per_claimant", "total_payout",
                   "implied_premium", "expected_loss_ratio")


def _money(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def _ratio(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


class _Figures:
    """The statement's result as numpy columns, by name; row ``r`` is a cell or overall."""

    def __init__(self, columns: dict[str, np.ndarray[Any, Any]]) -> None:
        self.columns = columns

    def count(self, name: str, r: int) -> int:
        value = self.columns[name][r]
        return 0 if value is None or value != value else int(value)  # NULL / NaN → 0

    def amount(self, name: str, r: int) -> float:
        value = self.columns[name][r]
        return 0.0 if value is None or value != value else float(value)  # NULL / NaN → 0


@dataclass(frozen=True)
class _NoisyPricing:
    """The noisy form of one pricing template, built once (``DisclosureControl.template``):
    the statement over clipped person-years, the additive series it noises with their scales,
    and per series the statement columns it releases (products with equal terms share)."""

    sql: str
    clips: Clips
    series: tuple[Series, ...]
    scales: tuple[float, ...]
    columns: tuple[tuple[str, ...], ...]

    def published(self, spec: NoiseSpec, names: Sequence[str]) -> dict[str, Any]:
        return {**spec.published(), "cells_per_person_year": 1,
                "payout_bounds": dict(zip(names, self.clips.payouts, strict=True)),
                "exposure_bounds": list(self.clips.exposure),
                "scales": {c[0]: round(sc, 4) for c, sc in zip(self.columns, self.scales,
                                                                 strict=True)}}


def _terms(product: Product) -> list[float]:
    """What a product's payouts depend on (not its name, premium, target or tier)."""
    return [product.deductible, product.ratio_in_list, product.ratio_out_of_list, product.cap]


def _noisy_pricing(request: PricingRequest, dataset: Any, filters: dict[str, list[str]],
                   points: Sequence[float], spec: NoiseSpec) -> _NoisyPricing:
    """Clip each person-year's payout at the product's cap or, lower, the grant's published
    ``payout`` bound, and its exposure into the grant's ``exposure`` bounds (default [0, 1],
    what a person-year is); then one series per additive base — person-years, exposure, and
    per product claimants, total payout and the amount above each attachment point under
    the clip — each bounded per person-year, ε shared evenly (``calibrate``)."""
    granted = spec.bounds.get(PAYOUT_BOUND)
    clips = Clips(
        payouts=tuple(p.cap if granted is None else min(p.cap, float(granted[1]))
                      for p in request.products),
        exposure=spec.bounds.get("exposure", (0, 1)))
    tree, _ = pricing_statement(dataset, request.dimensions, filters, request.products, points,
                                clips)
    series: dict[str, Series] = {}
    columns: dict[str, list[str]] = {}

    def add(name: str, column: str, kind: str, bound: float) -> None:
        # The names match the aggregate series of the same base (``count``, ``_nsum_exposure``),
        # so both endpoints answer it from one stored answer.
        hi = math.ceil(bound)
        if kind == "count":
            series.setdefault(name, Series(name, column, "count", 1))
        else:
            series.setdefault(name, Series(name, column, "amount", 100 * hi, (0, hi)))
        columns.setdefault(name, []).append(column)

    add("count", "person_years", "count", 1)
    lo, hi = clips.exposure
    series["_nsum_exposure"] = Series("_nsum_exposure", "exposure", "amount",
                                      100 * max(abs(lo), abs(hi)), (lo, hi))
    columns["_nsum_exposure"] = ["exposure"]
    for j, (product, bound) in enumerate(zip(request.products, clips.payouts, strict=True)):
        terms = json.dumps([*_terms(product), bound])
        add(f"claimants{terms}", f"claimants_{j}", "count", 1)
        add(f"payout{terms}", f"total_{j}", "amount", bound)
        for i, a in enumerate(points):
            if a < bound:  # above the clip the amount is 0 whatever the data: nothing to noise
                add(f"tail{terms}@{a!r}", f"tail_{j}_{i}", "amount", bound - a)
    ordered = tuple(series.values())
    return _NoisyPricing(tree.sql(dialect="duckdb"), clips, ordered, calibrate(ordered, spec),
                         tuple(tuple(columns[s.name]) for s in ordered))


def _released(figures: _Figures, rounding: int, points: Sequence[float],
              noisy: tuple[_NoisyPricing, Sequence[int], Sequence[Sequence[int]]] | None,
              ) -> _Figures:
    """The figures the cells are priced from: the statement's, or with noise its noisy
    answers (rows ``rows``, one answer per series) — counts at least 0, amounts in 元 at
    least 0, an amount above an attachment point at most the total payout — with counts
    rounded to the grant's ``rounding``. Derived figures are computed from these."""
    if noisy is None and rounding <= 1:
        return figures
    counts = ["person_years", *[c for c in figures.columns if c.startswith("claimants_")]]
    columns = {c: np.array(v, dtype=object) for c, v in figures.columns.items()}
    if noisy is None:
        for c in counts:
            columns[c] = np.array([round_count(figures.count(c, r), rounding)
                                   for r in range(len(columns[c]))], dtype=object)
        return _Figures(columns)
    plan, rows, values = noisy
    for r, answers in zip(rows, values, strict=True):
        for s, value, names in zip(plan.series, answers, plan.columns, strict=True):
            for c in names:
                columns[c][r] = (round_count(value, rounding) if s.kind == "count"
                                 else max(value, 0) / 100)
        for j, bound in enumerate(plan.clips.payouts):
            for i, a in enumerate(points):
                tail = columns[f"tail_{j}_{i}"]
                tail[r] = 0.0 if a >= bound else min(tail[r], columns[f"total_{j}"][r])
    return _Figures(columns)


def _summary(f: _Figures, r: int, j: int, points: Sequence[float],
             product: Product) -> CellSummary:
    return summary_from_totals(
        person_years=f.count("person_years", r),
        exposure=f.amount("exposure", r),
        claimants=f.count(f"claimants_{j}", r),
        total_payout=f.amount(f"total_{j}", r),
        tails=[(a, f.amount(f"tail_{j}_{i}", r), f.count(f"above_{j}_{i}", r))
               for i, a in enumerate(points)],
        premium=product.premium,
        target_loss_ratio=product.target_loss_ratio,
    )


def _release(
    summary: CellSummary,
    f: _Figures,
    r: int,
    j: int,
    points: Sequence[float],
    min_cell_size: int,
    rules: tuple[Decimal, Decimal],
    withheld: str | None = None,
) -> tuple[dict[str, Any], str | None, CellSummary | None]:
    """The released figures of one cell, its suppression reason, and the summary safe to check
    limits against (None when the payout figures are withheld). ``withheld`` names a reason
    found before (the difference check) that withholds every figure, as primary does."""
    if withheld is not None or f.count("persons", r) < min_cell_size:
        figures: dict[str, Any] = {
            "person_years": None, "exposure": None, "claimants": None, "claim_frequency": None,
            "pure_premium": None, "mean_payout_per_claimant": None, "total_payout": None,
            "tail": [{"attachment": a, "share": None} for a in points],
            "implied_premium": None, "expected_loss_ratio": None,
        }
        return figures, withheld or "primary", None
    figures = {
        "person_years": summary.person_years,
        "exposure": _money(summary.exposure),
    }
    reason: str | None
    if f.count(f"claimant_persons_{j}", r) < min_cell_size:
        reason = "few_claimants"
    else:
        # dominance / p% on each person's payouts in the cell, added up over their years
        k, p = rules
        reason = magnitude_sensitivity(CellContribution(
            total=f.amount(f"total_{j}", r), top1=f.amount(f"top1_{j}", r),
            top2=f.amount(f"top2_{j}", r)), k=k, p=p)
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
    for i, share in enumerate(summary.tail):
        above = f.count(f"above_persons_{j}_{i}", r)
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


# Reasons that withhold every figure of a cell, its person count included.
_ALL_WITHHELD = frozenset({"primary", "difference"})


def _protect_complements(
    cells_json: list[dict[str, Any]],
    reasons: list[str | None],
    table: Table,
    exposures: list[float],
    totals: list[float],
    points: Sequence[float],
    min_cell_size: int,
) -> None:
    """Complementary suppression across the cells of one product (in place): no withheld
    exposure or payout can be rebuilt from the released cells and the line totals (the
    ``overall`` figures, or a coarser request). Extra cells get reason ``secondary``."""
    if len(cells_json) < 2 or all(r is None for r in reasons):
        return
    all_hidden = {i for i, r in enumerate(reasons) if r in _ALL_WITHHELD}
    pay_hidden = {i for i, r in enumerate(reasons) if r is not None}
    extra_all: frozenset[int] = frozenset()
    if all_hidden:
        extra_all = complementary_suppression(
            table, all_hidden, [exposures], min_cell_size=min_cell_size,
            max_exact_cells=MAX_EXACT_CELLS).secondary
    extra_pay = complementary_suppression(
        table, pay_hidden, [totals], min_cell_size=min_cell_size,
        also_suppressed=extra_all, max_exact_cells=MAX_EXACT_CELLS).secondary
    for i in sorted(extra_all | extra_pay):
        if i in extra_all:
            cells_json[i].update(dict.fromkeys(
                [*_PAYOUT_FIGURES, "person_years", "exposure", "claimants", "claim_frequency"]))
        elif reasons[i] is None:
            cells_json[i].update(dict.fromkeys(_PAYOUT_FIGURES))
        else:
            continue  # its payout figures are already withheld
        cells_json[i]["tail"] = [{"attachment": a, "share": None} for a in points]
        if reasons[i] not in _ALL_WITHHELD:
            cells_json[i]["suppressed"] = reasons[i] = "secondary"


def _limits(product: Product, overall: CellSummary | None,
            fallback: CellSummary, noisy: bool) -> list[LimitCheck]:
    """Limit checks against the overall summary; withheld figures fail closed (figure null).
    A check whose figure was computed from noisy figures (the simulated loss ratio, or the
    implied premium) says so."""
    summary = overall or fallback.model_copy(update={
        "pure_premium": None, "implied_premium": None, "expected_loss_ratio": None,
    })
    checks = check_cell(product, summary)
    simulated = "loss_ratio" if product.premium is not None else "premium"
    return [
        c.model_copy(update={
            "figure": _ratio(c.figure) if c.name in _RATIO_CHECKS else _money(c.figure),
            **({"message": c.message + " (computed on noisy figures)"}
               if noisy and c.name == simulated and c.figure is not None else {}),
        })
        for c in checks
    ]


def _price_products(
    request: PricingRequest, figures: _Figures, shown: _Figures,
    keys: Sequence[tuple[Any, ...]], cell_rows: Sequence[int], overall_row: int, table: Table,
    points: Sequence[float], min_cell_size: int, rules: tuple[Decimal, Decimal],
    withheld: Mapping[int, tuple[str, str | None]], *, noisy: bool,
) -> tuple[list[dict[str, Any]], int, int]:
    """Each product's released cells, overall figures and limit checks; ``withheld`` holds
    the rows the difference check refused (the overall row is ``len(cell_rows)``). What is
    withheld is decided on the exact ``figures``; what is released is priced from ``shown``
    (the same, or noisy and rounded)."""
    products_json: list[dict[str, Any]] = []
    released = suppressed = 0
    overall_withheld = withheld.get(len(cell_rows))
    for j, product in enumerate(request.products):
        cells_json = []
        reasons: list[str | None] = []
        for i, (key, r) in enumerate(zip(keys, cell_rows, strict=True)):
            summary = _summary(shown, r, j, points, product)
            refused = withheld.get(i)
            cell, reason, _ = _release(summary, figures, r, j, points, min_cell_size,
                                       rules, refused[0] if refused else None)
            cells_json.append({**dict(zip(request.dimensions, key, strict=True)),
                               **cell, "suppressed": reason})
            reasons.append(reason)
        _protect_complements(
            cells_json, reasons, table,
            [figures.amount("exposure", r) for r in cell_rows],
            [figures.amount(f"total_{j}", r) for r in cell_rows], points, min_cell_size)
        for reason in reasons:
            if reason is None:
                released += 1
            else:
                suppressed += 1
        total = _summary(shown, overall_row, j, points, product)
        overall, overall_reason, safe = _release(
            total, figures, overall_row, j, points, min_cell_size, rules,
            overall_withheld[0] if overall_withheld else None)
        checks = _limits(product, safe, total, noisy)
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
    return products_json, released, suppressed


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
    spent: float | None = None
    try:
        options = DisclosureOptions.from_obligations(obligations)
        dataset = gateway.catalog.datasets.get(DATASET)
        if dataset is None:
            raise QueryRejected(f"unknown dataset {DATASET}")
        spec = options.noise
        plan: _NoisyPricing | None = None
        if spec is not None:
            # calibrated once per template: shape, products' terms, noise obligation
            plan = gateway.disclosure.template(
                ["pricing", request.dimensions, sorted(filters.items()),
                 [_terms(p) for p in request.products], list(points), spec.published()],
                lambda: _noisy_pricing(request, dataset, filters, points, spec))
            sql = plan.sql
        else:
            tree, _ = pricing_statement(dataset, request.dimensions, filters, request.products,
                                        points)
            sql = tree.sql(dialect="duckdb")
        arrow, data_version = gateway.store.fetch_arrow(sql)
        figures = _Figures({name: arrow.column(name).to_numpy(zero_copy_only=False)
                            for name in arrow.column_names})
        flags = arrow.column("_all_cells").to_pylist()
        overall_row = arrow.num_rows - 1  # the overall row comes last (there always is one)
        if overall_row < 0 or not flags[overall_row]:
            raise StoreUnavailable("pricing statement returned no overall row")
        if request.dimensions:
            cell_rows = [r for r in range(overall_row) if not flags[r]]
        else:  # the one cell is the overall row (none when nothing matched)
            cell_rows = [0] if figures.count("person_years", 0) else []
        if len(cell_rows) > obligations.max_rows:
            raise QueryRejected(
                f"{len(cell_rows)} cells exceed the grant's {obligations.max_rows}")
        keys = [tuple(arrow.column(d)[r].as_py() for d in request.dimensions)
                for r in cell_rows]
        table = Table(keys=keys, persons=[figures.count("persons", r) for r in cell_rows])
        rules = gateway.magnitude_rules(common.get("grant_id"))
        products_json: list[dict[str, Any]] = []
        released = suppressed = 0
        # The difference check across requests, as for aggregates: every cell and the overall
        # row (a margin over the request's filters) against what was released before.
        checked = [(tuple(request.dimensions), key) for key in keys] + [((), ())]
        with gateway.disclosure.cell_release(
            DATASET, filters, checked,
            [figures.count("persons", r) for r in [*cell_rows, overall_row]],
            data_version, obligations, org=principal.org,
        ) as check:
            report: dict[str, Any] = {"difference_k": options.difference_k,
                                      "rounding": options.rounding, "noise": None,
                                      "budget": None}
            noisy = None
            if plan is not None and spec is not None:
                # Noise on the additive bases of every cell (withheld ones too) and overall
                # (the sum of the cells unless answered before), paid before release.
                rows = cell_rows if request.dimensions else [overall_row]

                def cover(r: int) -> tuple[Any, Any]:
                    return (arrow.column(FINGERPRINT_COLUMN)[r].as_py(),
                            arrow.column(RECORDS_COLUMN)[r].as_py())

                got = gateway.disclosure.noisy_answers(
                    NoisyCells(
                        series=plan.series, scales=plan.scales, spec=spec,
                        epsilon=spec.epsilon, dimensions=tuple(request.dimensions),
                        filters=filters, groups=keys if request.dimensions else [()],
                        covers=[cover(r) for r in rows],
                        exact=[[figures.count(names[0], r) if s.kind == "count"
                                else to_units(figures.amount(names[0], r), "amount")
                                for s, names in zip(plan.series, plan.columns, strict=True)]
                               for r in rows],
                        totals=[cover(overall_row)] if request.dimensions else []),
                    data_version=data_version, dataset=DATASET, options=options,
                    grant_id=common.get("grant_id"))
                noisy = (plan, [*rows, overall_row] if request.dimensions else rows,
                         got.values)
                report["noise"] = plan.published(spec, [p.name for p in request.products])
                report["budget"], spent = got.budget, got.charged
            shown = _released(figures, options.rounding, points, noisy)
            products_json, released, suppressed = _price_products(
                request, figures, shown, keys, cell_rows, overall_row, table, points,
                min_cell_size, rules, check.withheld, noisy=noisy is not None)
            shown_rows = {i for p in products_json for i, c in enumerate(p["cells"])
                          if c["suppressed"] not in _ALL_WITHHELD | {"secondary"}}
            if products_json and products_json[0]["overall"]["suppressed"] not in _ALL_WITHHELD:
                shown_rows.add(len(cell_rows))
            report["release_id"] = check.remember(sorted(shown_rows))
    except GatewayError as exc:
        gateway.record_failure(principal, ACTION, exc, common)
        raise
    rules = gateway.magnitude_rules(common.get("grant_id"))
    notes = [
        f"cells with fewer than {min_cell_size} persons are suppressed (primary); with fewer "
        f"than {min_cell_size} claimants, or a payout dominated by one or two persons "
        f"(dominance n=2 k={rules[0]}, p% p={rules[1]}), the payout figures are withheld",
        f"a tail share is withheld when fewer than {min_cell_size} persons are above its "
        "attachment point",
        "claimants count person-years with a payout; group by year to count each person once",
        "the benefit rule: 目录内自付 = max(0, inscp_scp_amt − hifp_pay − hifmi_pay), "
        "目录外 = fulamt_ownpay_amt + overlmt_selfpay; one deductible, 目录内 first "
        "(docs/pricing.md)",
        "limit checks use the overall figures; a withheld figure fails its check",
    ]
    if report["noise"] is not None:
        notes.append(
            f"noise: {report['noise']['mechanism']}, ε = {report['noise']['epsilon']} per query "
            "over person-years, on person-years, exposure, claimants, total payout and the "
            "amounts above attachment points (each person-year's payout clipped at "
            "disclosure.noise.payout_bounds); every ratio is computed from these noisy figures; "
            "the same question asked again answers the stored figures, free")
    if options.rounding > 1:
        notes.append(f"counts (person-years, claimants) rounded to multiples of "
                     f"{options.rounding}")
    if any(p.has_special_drug_cover for p in request.products):
        notes.append("特药 cover is not simulated: person_years carries no special-drug "
                     "amounts, so its payout is not included (not priced at 0)")
    body: dict[str, Any] = {
        "products": products_json,
        "dimensions": list(request.dimensions),
        "attachment_points": list(points),
        "data_version": data_version,
        "min_cell_size": min_cell_size,
        "disclosure": report,
        "notes": notes,
    }
    audit_id = gateway.record(
        principal, ACTION, status=200, decision="allow", cells_released=released,
        cells_suppressed=suppressed, data_version=data_version,
        response_hash="sha256:" + hashlib.sha256(orjson.dumps(body)).hexdigest(),
        budget_spent=spent, **common,
    )
    body["audit_id"] = audit_id
    return Audited(body=body, audit_id=audit_id)
