"""The 云南 惠民保 product limits (云医保〔2023〕152号), checked one by one with their figures.

Source passages (seeds/002), quoted in ``docs/pricing.md``:
- (九) "起付线不高于１５０００元,报销比例不低于３０％,封顶线不低于２００万元"
- (十) "原则上基础保障平均保费水平不超过１００元,升级保障平均保费水平不超过２００元"
- (十一) "年度保费满期赔付率原则上不低于７０％"

A check that lacks its figure (no premium, no expected loss ratio) fails: compliance that cannot
be shown is not assumed.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict

from gateway.pricing.product import Product
from gateway.pricing.simulate import CellSummary

__all__ = [
    "MAX_DEDUCTIBLE",
    "MAX_PREMIUM",
    "MIN_CAP",
    "MIN_LOSS_RATIO",
    "MIN_RATIO",
    "LimitCheck",
    "all_binding_passed",
    "check_cell",
    "check_limits",
]

MAX_DEDUCTIBLE = 15_000.0  # 起付线不高于15000元
MIN_RATIO = 0.30  # 报销比例不低于30%
MIN_CAP = 2_000_000.0  # 封顶线不低于200万元
MAX_PREMIUM = {"basic": 100.0, "upgraded": 200.0}  # 基础 ≤ 100元, 升级 ≤ 200元
MIN_LOSS_RATIO = 0.70  # 年度保费满期赔付率不低于70%

# A loss ratio computed as pure premium / premium carries float noise; 0.7 must not fail as
# 0.6999999999999999. Terms as given (元, ratios) are compared exactly: 15,000.01 is over 15,000.
_COMPUTED_RATIO_TOLERANCE = 1e-9


class LimitCheck(BaseModel):
    """One limit, its figure and the verdict.

    ``binding`` is False for checks reported as information only (the 目录外 ratio).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    passed: bool
    figure: float | None
    limit: float
    message: str
    binding: bool = True


def _limit_check(
    name: str,
    figure: float | None,
    limit: float,
    label: str,
    *,
    at_least: bool,
    unit: str | None = None,
    binding: bool = True,
    tolerance: float = 0.0,
) -> LimitCheck:
    """One limit: an amount in ``unit``, or a ratio (shown as a percentage) when no unit."""
    sign = "≥" if at_least else "≤"
    limit_text = f"{limit:.0%}" if unit is None else f"{limit:,.2f} {unit}"
    if figure is None:
        return LimitCheck(name=name, passed=False, figure=None, limit=limit, binding=binding,
                          message=f"{label}: no figure given, limit {sign} {limit_text}")
    ok = figure >= limit - tolerance if at_least else figure <= limit + tolerance
    verdict = ("meets" if ok else "is below") if at_least else ("within" if ok else "exceeds")
    figure_text = f"{figure:.2%}" if unit is None else f"{figure:,.2f} {unit}"
    note = "" if binding else " (information: the limit is applied to 目录内)"
    return LimitCheck(
        name=name, passed=ok, figure=figure, limit=limit, binding=binding,
        message=f"{label} {figure_text} {verdict} the limit {sign} {limit_text}{note}",
    )


def check_limits(
    product: Product,
    expected_loss_ratio: float | None,
    *,
    premium: float | None = None,
) -> list[LimitCheck]:
    """Check a product against each 云南 limit, in the order the notice states them.

    ``premium`` overrides ``product.premium`` (e.g. the implied premium of a product priced by
    target loss ratio, or an exposure-weighted average of per-cell premiums: the notice limits the
    *average* premium). The 报销比例 limit binds on the 目录内 ratio; the 目录外 ratio is
    reported against the same 30% as information, because the notice allows "差异化报销比例"
    for 目录内/外 without saying the floor applies to each.

    >>> p = Product(name="x", deductible=15_000, ratio_in_list=0.3, ratio_out_of_list=0.2,
    ...             cap=2_000_000, premium=100)
    >>> [(c.name, c.passed) for c in check_limits(p, 0.7)]  # doctest: +NORMALIZE_WHITESPACE
    [('deductible', True), ('ratio_in_list', True), ('ratio_out_of_list', False),
     ('cap', True), ('premium', True), ('loss_ratio', True)]
    """
    price = premium if premium is not None else product.premium
    return [
        _limit_check("deductible", product.deductible, MAX_DEDUCTIBLE, "起付线",
                     at_least=False, unit="元"),
        _limit_check("ratio_in_list", product.ratio_in_list, MIN_RATIO, "目录内报销比例",
                     at_least=True),
        _limit_check("ratio_out_of_list", product.ratio_out_of_list, MIN_RATIO,
                     "目录外报销比例", at_least=True, binding=False),
        _limit_check("cap", product.cap, MIN_CAP, "封顶线", at_least=True, unit="元"),
        _limit_check("premium", price, MAX_PREMIUM[product.tier],
                     "基础保障保费" if product.tier == "basic" else "升级保障保费",
                     at_least=False, unit="元"),
        _limit_check("loss_ratio", expected_loss_ratio, MIN_LOSS_RATIO, "预期满期赔付率",
                     at_least=True, tolerance=_COMPUTED_RATIO_TOLERANCE),
    ]


def check_cell(product: Product, summary: CellSummary) -> list[LimitCheck]:
    """:func:`check_limits` with the premium and loss ratio the simulation gives.

    With a premium, the expected loss ratio is the simulated one (pure premium / premium). Priced
    by target loss ratio instead, the premium checked is the implied one and the loss ratio is the
    target, which the implied premium meets by construction.
    """
    if product.premium is not None:
        return check_limits(product, summary.expected_loss_ratio)
    loss_ratio = product.target_loss_ratio if summary.implied_premium is not None else None
    return check_limits(product, loss_ratio, premium=summary.implied_premium)


def all_binding_passed(checks: Sequence[LimitCheck]) -> bool:
    """True when every binding check passed (information-only checks do not count)."""
    return all(c.passed for c in checks if c.binding)
