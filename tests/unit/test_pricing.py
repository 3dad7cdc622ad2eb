"""The 惠民保 pricing core: benefit rule, cell figures, 云南 limits, product validation.

The vectorized code is checked against hand-computed cases and against a slow, literal
per-person loop written here from the rule's wording.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from gateway.errors import ValidationFailed
from gateway.pricing import (
    CellSummary,
    Product,
    all_binding_passed,
    check_cell,
    check_limits,
    insured_selfpay,
    payouts,
    simulate_cell,
    summarize,
)


def product(**overrides: Any) -> Product:
    terms: dict[str, Any] = {
        "name": "测试",
        "deductible": 10_000,
        "ratio_in_list": 0.8,
        "ratio_out_of_list": 0.5,
        "cap": 2_000_000,
    }
    terms.update(overrides)
    return Product(**terms)


# --- slow reference implementations: one person at a time, straight from the wording ----------


def slow_payout(in_list: float, out_of_list: float, p: Product) -> float:
    in_list, out_of_list = max(in_list, 0.0), max(out_of_list, 0.0)
    left = p.deductible  # one annual deductible, 目录内 first
    take = min(in_list, left)
    in_list -= take
    left -= take
    take = min(out_of_list, left)
    out_of_list -= take
    return min(p.cap, p.ratio_in_list * in_list + p.ratio_out_of_list * out_of_list)


def slow_payout_out_first(in_list: float, out_of_list: float, p: Product) -> float:
    """The other deductible order, only to bound how much the order matters."""
    take_out = min(out_of_list, p.deductible)
    take_in = min(in_list, p.deductible - take_out)
    raw = p.ratio_in_list * (in_list - take_in) + p.ratio_out_of_list * (out_of_list - take_out)
    return min(p.cap, raw)


def slow_summary(
    exposure: list[float], pay: list[float], points: list[float], premium: float, target: float
) -> dict[str, Any]:
    total_exposure = 0.0
    total = 0.0
    claimants = 0
    for e, x in zip(exposure, pay, strict=True):
        total_exposure += e
        total += x
        if x > 0:
            claimants += 1
    tail = []
    for a in points:
        excess = 0.0
        above = 0
        for x in pay:
            if x > a:
                excess += x - a
                above += 1
        tail.append((a, excess / total, above))
    pure = total / total_exposure
    return {
        "exposure": total_exposure,
        "claimants": claimants,
        "total_payout": total,
        "claim_frequency": claimants / total_exposure,
        "pure_premium": pure,
        "mean_payout_per_claimant": total / claimants,
        "tail": tail,
        "implied_premium": pure / target,
        "expected_loss_ratio": pure / premium,
    }


# --- the benefit rule, by hand ------------------------------------------------------------------


def test_self_pay_from_person_year_sums() -> None:
    in_list, out_of_list = insured_selfpay(
        inscp_scp_amt=[30_000, 5_000, 0],
        hifp_pay=[18_000, 4_000, 0],
        hifmi_pay=[2_000, 1_500, 0],  # second row: funds paid more than the in-list amount
        fulamt_ownpay_amt=[5_000, 0, 700],
        overlmt_selfpay=[1_000, 0, 300],
    )
    assert in_list.tolist() == [10_000.0, 0.0, 0.0]
    assert out_of_list.tolist() == [6_000.0, 0.0, 1_000.0]


def test_deductible_boundary_pays_nothing_at_and_cents_above() -> None:
    p = product(deductible=10_000, ratio_in_list=0.8)
    got = payouts([10_000, 10_000.01, 9_999.99], [0, 0, 0.01], p)
    assert got[0] == 0.0
    assert got[1] == pytest.approx(0.008)
    assert got[2] == 0.0  # 9,999.99 + 0.01 is exactly the deductible


def test_deductible_consumes_in_list_first_then_out_of_list() -> None:
    p = product(deductible=10_000, ratio_in_list=0.8, ratio_out_of_list=0.5)
    # 6,000 of 目录内 uses 6,000 of the deductible; 4,000 of 目录外 is left to pay at 50%.
    assert payouts([6_000], [8_000], p).tolist() == [2_000.0]
    # Out-of-list alone meets the whole deductible.
    assert payouts([0], [30_000], p).tolist() == [10_000.0]


def test_ratios_apply_to_each_part_after_deductible() -> None:
    p = product(deductible=0, ratio_in_list=0.9, ratio_out_of_list=0.4)
    assert payouts([1_000], [1_000], p).tolist() == [pytest.approx(1_300.0)]
    p = product(deductible=1_000, ratio_in_list=0.9, ratio_out_of_list=0.4)
    assert payouts([3_000], [2_000], p).tolist() == [pytest.approx(0.9 * 2_000 + 0.4 * 2_000)]


def test_cap_binds_exactly() -> None:
    p = product(deductible=0, ratio_in_list=1.0, ratio_out_of_list=1.0, cap=2_000_000)
    got = payouts([1_500_000, 1_999_999, 3_000_000], [500_000, 0, 0], p)
    assert got.tolist() == [2_000_000.0, 1_999_999.0, 2_000_000.0]


def test_negative_amounts_count_as_zero() -> None:
    p = product(deductible=0)
    assert payouts([-500.0], [-10.0], p).tolist() == [0.0]


def test_inputs_are_not_modified() -> None:
    in_list = np.array([20_000.0, 50_000.0])
    out_of_list = np.array([1_000.0, 0.0])
    payouts(in_list, out_of_list, product())
    assert in_list.tolist() == [20_000.0, 50_000.0]
    assert out_of_list.tolist() == [1_000.0, 0.0]


def test_special_drug_cover_is_added_with_its_own_cap() -> None:
    p = product(deductible=10_000, special_drug_cap=1_000_000, special_drug_ratio=0.6)
    got = payouts([0, 0], [0, 0], p, special_drug=[50_000, 3_000_000])
    assert got.tolist() == [30_000.0, 1_000_000.0]
    # Without cover the amounts are ignored: the same arrays can be fed to several products.
    assert payouts([0], [0], product(), special_drug=[50_000]).tolist() == [0.0]


def test_array_errors_name_the_argument() -> None:
    p = product()
    with pytest.raises(ValidationFailed, match="arrays differ in length"):
        payouts([1.0, 2.0], [1.0], p)
    with pytest.raises(ValidationFailed, match="in_list_selfpay: contains NaN"):
        payouts([math.nan], [1.0], p)
    with pytest.raises(ValidationFailed, match="out_of_list: expected a 1-dimensional"):
        payouts([1.0], [[1.0]], p)
    with pytest.raises(ValidationFailed, match="exposure: contains negative"):
        summarize([-1.0], [0.0])
    with pytest.raises(ValidationFailed, match="payouts: contains negative"):
        summarize([1.0], [-1.0])
    with pytest.raises(ValidationFailed, match="attachment_points"):
        summarize([1.0], [0.0], (math.inf,))
    with pytest.raises(ValidationFailed, match="premium"):
        summarize([1.0], [0.0], premium=0.0)


# --- properties over random arrays -------------------------------------------------------------


def random_amounts(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Mostly zero, a long right tail, some exact zeros and a few large claims."""
    has = rng.random(n) < 0.3
    in_list = np.where(has, rng.lognormal(9.0, 1.5, n), 0.0)
    out_of_list = np.where(rng.random(n) < 0.5, rng.lognormal(8.5, 1.8, n), 0.0) * has
    return in_list, out_of_list


def random_product(rng: np.random.Generator) -> Product:
    return product(
        deductible=float(rng.choice([0.0, 5_000.0, 15_000.0, rng.uniform(0, 30_000)])),
        ratio_in_list=float(rng.uniform(0, 1)),
        ratio_out_of_list=float(rng.uniform(0, 1)),
        cap=float(rng.choice([50_000.0, 2_000_000.0, rng.uniform(1_000, 3_000_000)])),
    )


SEEDS = range(20)


@pytest.mark.parametrize("seed", SEEDS)
def test_payouts_match_the_slow_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    in_list, out_of_list = random_amounts(rng, 500)
    p = random_product(rng)
    fast = payouts(in_list, out_of_list, p)
    slow = [slow_payout(float(a), float(b), p) for a, b in zip(in_list, out_of_list, strict=True)]
    np.testing.assert_allclose(fast, slow, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("seed", SEEDS)
def test_payout_bounds(seed: int) -> None:
    rng = np.random.default_rng(seed)
    in_list, out_of_list = random_amounts(rng, 2_000)
    p = random_product(rng)
    pay = payouts(in_list, out_of_list, p)
    ratio_max = max(p.ratio_in_list, p.ratio_out_of_list)
    assert (pay >= 0).all()
    assert (pay <= p.cap).all()
    assert (pay <= ratio_max * (in_list + out_of_list) + 1e-9).all()
    assert (pay <= p.ratio_in_list * in_list + p.ratio_out_of_list * out_of_list + 1e-9).all()
    assert (pay[in_list + out_of_list <= p.deductible] == 0).all()


@pytest.mark.parametrize("seed", SEEDS)
def test_payouts_are_monotone_in_terms_and_amounts(seed: int) -> None:
    rng = np.random.default_rng(seed)
    in_list, out_of_list = random_amounts(rng, 2_000)
    p = random_product(rng)
    base = payouts(in_list, out_of_list, p)
    tol = 1e-9

    def with_(**terms: float) -> np.ndarray:
        return payouts(in_list, out_of_list, p.model_copy(update=terms))

    assert (with_(deductible=p.deductible + 1_000) <= base + tol).all()
    assert (with_(cap=p.cap * 1.5) >= base - tol).all()
    assert (with_(ratio_in_list=min(1.0, p.ratio_in_list + 0.1)) >= base - tol).all()
    assert (with_(ratio_out_of_list=min(1.0, p.ratio_out_of_list + 0.1)) >= base - tol).all()
    more_in = payouts(in_list + rng.uniform(0, 5_000, in_list.size), out_of_list, p)
    more_out = payouts(in_list, out_of_list + rng.uniform(0, 5_000, in_list.size), p)
    assert (more_in >= base - tol).all()
    assert (more_out >= base - tol).all()


@pytest.mark.parametrize("seed", SEEDS)
def test_deductible_order_changes_payout_by_at_most_deductible_times_ratio_gap(seed: int) -> None:
    # The documented bound on the in-list-first choice (docs/pricing.md).
    rng = np.random.default_rng(seed)
    in_list, out_of_list = random_amounts(rng, 500)
    p = random_product(rng)
    ours = payouts(in_list, out_of_list, p)
    bound = p.deductible * abs(p.ratio_in_list - p.ratio_out_of_list) + 1e-6
    for got, a, b in zip(ours, in_list, out_of_list, strict=True):
        assert abs(got - slow_payout_out_first(float(a), float(b), p)) <= bound


# --- the cell summary --------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_summary_matches_the_slow_loop(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 60))
    exposure = rng.choice([1.0, 0.5, 0.25, rng.uniform(0, 1)], n)
    pay = np.where(rng.random(n) < 0.4, rng.lognormal(10, 1.5, n), 0.0)
    pay[0] = 1.0  # at least one claimant so every ratio is defined
    points = [10_000.0, 50_000.0, 100_000.0, 500_000.0]
    got = summarize(exposure, pay, points, premium=90.0, target_loss_ratio=0.8)
    want = slow_summary(exposure.tolist(), pay.tolist(), points, 90.0, 0.8)
    assert got.person_years == n
    assert got.claimants == want["claimants"]
    for key in (
        "exposure",
        "total_payout",
        "claim_frequency",
        "pure_premium",
        "mean_payout_per_claimant",
        "implied_premium",
        "expected_loss_ratio",
    ):
        assert getattr(got, key) == pytest.approx(want[key], rel=1e-12), key
    assert len(got.tail) == len(points)
    for share, (a, fraction, above) in zip(got.tail, want["tail"], strict=True):
        assert share.attachment == a
        assert share.share == pytest.approx(fraction, rel=1e-12, abs=1e-15)
        assert share.claimants_above == above


def test_summary_by_hand() -> None:
    s = summarize(
        [1.0, 1.0, 0.5, 0.5], [0.0, 20_000.0, 0.0, 4_000.0], (10_000, 50_000), premium=12_000
    )
    assert (s.exposure, s.claimants, s.total_payout) == (3.0, 2, 24_000.0)
    assert s.claim_frequency == pytest.approx(2 / 3)
    assert s.pure_premium == 8_000.0
    assert s.mean_payout_per_claimant == 12_000.0
    assert [(t.share, t.claimants_above) for t in s.tail] == [(10_000 / 24_000, 1), (0.0, 0)]
    assert s.expected_loss_ratio == pytest.approx(8_000 / 12_000)
    assert s.implied_premium is None  # no target given


def test_summary_of_empty_and_claim_free_cells_leaves_ratios_undefined() -> None:
    empty = summarize([], [], target_loss_ratio=0.8, premium=90)
    assert (empty.person_years, empty.exposure, empty.claimants) == (0, 0.0, 0)
    assert empty.claim_frequency is None
    assert empty.pure_premium is None
    assert empty.implied_premium is None
    assert empty.expected_loss_ratio is None
    quiet = summarize([1.0, 1.0], [0.0, 0.0], premium=90)
    assert quiet.claim_frequency == 0.0
    assert quiet.pure_premium == 0.0
    assert quiet.expected_loss_ratio == 0.0
    assert quiet.mean_payout_per_claimant is None
    assert all(t.share is None for t in quiet.tail)


def test_simulate_cell_uses_the_products_premium_and_target() -> None:
    p = product(deductible=0, ratio_in_list=1.0, premium=100, target_loss_ratio=0.8)
    s = simulate_cell([1.0, 1.0], [150.0, 0.0], [0.0, 0.0], p)
    assert s.pure_premium == 75.0
    assert s.expected_loss_ratio == 0.75
    assert s.implied_premium == pytest.approx(93.75)


# --- the 云南 limits at their boundaries -------------------------------------------------------


def compliant(**overrides: Any) -> Product:
    terms: dict[str, Any] = {
        "deductible": 15_000,
        "ratio_in_list": 0.3,
        "ratio_out_of_list": 0.3,
        "cap": 2_000_000,
        "premium": 100,
        "tier": "basic",
    }
    terms.update(overrides)
    return product(**terms)


def verdicts(p: Product, loss_ratio: float | None = 0.7) -> dict[str, bool]:
    return {c.name: c.passed for c in check_limits(p, loss_ratio)}


def test_limits_pass_exactly_at_each_boundary() -> None:
    checks = check_limits(compliant(), 0.70)
    assert [c.name for c in checks] == [
        "deductible",
        "ratio_in_list",
        "ratio_out_of_list",
        "cap",
        "premium",
        "loss_ratio",
    ]
    assert all(c.passed for c in checks)
    assert all_binding_passed(checks)
    figures = {c.name: (c.figure, c.limit) for c in checks}
    assert figures["deductible"] == (15_000.0, 15_000.0)
    assert figures["cap"] == (2_000_000.0, 2_000_000.0)
    assert figures["loss_ratio"] == (0.70, 0.70)


@pytest.mark.parametrize(
    ("overrides", "loss_ratio", "failing"),
    [
        ({"deductible": 15_000.01}, 0.7, "deductible"),
        ({"ratio_in_list": 0.2999}, 0.7, "ratio_in_list"),
        ({"ratio_in_list": 0.3 - 1e-12}, 0.7, "ratio_in_list"),  # terms compare exactly
        ({"cap": 1_999_999.99}, 0.7, "cap"),
        ({"premium": 100.01}, 0.7, "premium"),
        ({"premium": 200.01, "tier": "upgraded"}, 0.7, "premium"),
        ({}, 0.6999, "loss_ratio"),
        ({}, None, "loss_ratio"),
        ({"premium": None}, 0.7, "premium"),
    ],
)
def test_limits_fail_just_past_each_boundary(
    overrides: dict[str, Any], loss_ratio: float | None, failing: str
) -> None:
    got = verdicts(compliant(**overrides), loss_ratio)
    assert [name for name, ok in got.items() if not ok] == [failing]


def test_premium_limit_depends_on_tier() -> None:
    assert not verdicts(compliant(premium=150))["premium"]
    assert verdicts(compliant(premium=150, tier="upgraded"))["premium"]
    assert verdicts(compliant(premium=200, tier="upgraded"))["premium"]


def test_out_of_list_ratio_is_information_only() -> None:
    checks = check_limits(compliant(ratio_out_of_list=0.1), 0.8)
    out = next(c for c in checks if c.name == "ratio_out_of_list")
    assert not out.passed
    assert not out.binding
    assert out.figure == pytest.approx(0.1)
    assert "information" in out.message
    assert all_binding_passed(checks)


def test_each_check_carries_its_figure_in_the_message() -> None:
    checks = {c.name: c for c in check_limits(compliant(deductible=20_000), 0.65)}
    assert "20,000.00" in checks["deductible"].message
    assert "exceeds" in checks["deductible"].message
    assert "65.00%" in checks["loss_ratio"].message


def test_computed_loss_ratio_of_seventy_percent_passes() -> None:
    # 0.7 computed from a simulation may carry float noise below 0.7.
    p = compliant(premium=100, deductible=0, ratio_in_list=1.0)
    s = simulate_cell([1.0] * 10, [70.0 / 1.0] * 10, [0.0] * 10, p)
    assert s.expected_loss_ratio == pytest.approx(0.7)
    assert verdicts(p, 0.7 - 1e-12)["loss_ratio"]
    assert {c.name: c.passed for c in check_cell(p, s)}["loss_ratio"]


def test_check_cell_with_a_target_checks_the_implied_premium() -> None:
    p = compliant(premium=None, target_loss_ratio=0.8, deductible=0, ratio_in_list=1.0)
    cheap = simulate_cell([1.0, 1.0], [120.0, 0.0], [0.0, 0.0], p)  # pure 60 → 75 元
    checks = {c.name: c for c in check_cell(p, cheap)}
    assert checks["premium"].figure == pytest.approx(75.0)
    assert checks["premium"].passed
    assert checks["loss_ratio"].figure == 0.8
    dear = simulate_cell([1.0, 1.0], [200.0, 0.0], [0.0, 0.0], p)  # pure 100 → 125 元
    assert not {c.name: c.passed for c in check_cell(p, dear)}["premium"]


def test_check_cell_without_exposure_fails_closed() -> None:
    p = compliant(premium=None, target_loss_ratio=0.8)
    empty: CellSummary = simulate_cell([], [], [], p)
    got = {c.name: c for c in check_cell(p, empty)}
    assert not got["premium"].passed
    assert got["premium"].figure is None
    assert not got["loss_ratio"].passed


# --- product validation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"deductible": -0.01}, "deductible"),
        ({"deductible": math.nan}, "deductible"),
        ({"ratio_in_list": 1.01}, "ratio_in_list"),
        ({"ratio_out_of_list": -0.1}, "ratio_out_of_list"),
        ({"cap": 0}, "cap"),
        ({"premium": 0}, "premium"),
        ({"target_loss_ratio": 1.51}, "target_loss_ratio"),
        ({"target_loss_ratio": 0}, "target_loss_ratio"),
        ({"tier": "gold"}, "tier"),
        ({"name": ""}, "name"),
        ({"special_drug_ratio": 1.2, "special_drug_cap": 1}, "special_drug_ratio"),
        ({"special_drug_cap": 1_000_000}, "special_drug_ratio"),
        ({"special_drug_ratio": 0.5}, "special_drug_cap"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_validation_errors_name_the_field(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        product(**overrides)
    assert field in str(caught.value)


def test_optional_terms_may_be_omitted_and_products_are_frozen() -> None:
    p = product()
    assert (p.special_drug_cap, p.premium, p.target_loss_ratio, p.tier) == (
        None,
        None,
        None,
        "basic",
    )
    assert product(target_loss_ratio=1.5).target_loss_ratio == 1.5
    with pytest.raises(ValidationError):
        p.deductible = 0  # type: ignore[misc]


# --- the worked example of docs/pricing.md --------------------------------------------------


def test_worked_example_in_docs() -> None:
    """The figures quoted in docs/pricing.md; change both together."""
    rows = [
        (12_000, 2_000),
        (18_000, 0),
        (9_000, 21_000),
        (40_000, 10_000),
        (60_000, 80_000),
        (150_000, 300_000),
        (25_000, 5_000),
        (16_000, 4_000),
        (30_000, 0),
        (0, 20_000),
        (14_000, 3_000),
        (20_000, 0),
    ]
    in_list = np.zeros(5_000)
    out_of_list = np.zeros(5_000)
    exposure = np.ones(5_000)
    exposure[-400:] = 0.5
    for i, (inl, outl) in enumerate(rows):
        in_list[i], out_of_list[i] = inl, outl
    basic = Product(
        name="基础版", deductible=15_000, ratio_in_list=0.8, ratio_out_of_list=0.5,
        cap=3_000_000, premium=99, tier="basic",
    )  # fmt: skip
    upgraded = Product(
        name="升级版", deductible=10_000, ratio_in_list=0.9, ratio_out_of_list=0.6,
        cap=4_000_000, target_loss_ratio=0.85, tier="upgraded",
    )  # fmt: skip

    assert payouts(in_list[:12], out_of_list[:12], basic).tolist() == [
        0, 2_400, 7_500, 25_000, 76_000, 258_000, 10_500, 2_800, 12_000, 2_500, 1_000, 4_000,
    ]  # fmt: skip
    sa = simulate_cell(exposure, in_list, out_of_list, basic)
    assert (sa.exposure, sa.claimants, sa.total_payout) == (4_800.0, 11, 401_700.0)
    assert round(sa.claim_frequency or 0, 6) == 0.002292
    assert sa.pure_premium == 83.6875
    assert round(sa.mean_payout_per_claimant or 0, 2) == 36_518.18
    assert [(round(t.share or 0, 4), t.claimants_above) for t in sa.tail] == [
        (0.8252, 5), (0.5825, 2), (0.3933, 1), (0.0, 0),
    ]  # fmt: skip
    assert round(sa.expected_loss_ratio or 0, 4) == 0.8453
    assert all_binding_passed(check_cell(basic, sa))

    dear = basic.model_copy(update={"premium": 125.0})
    d = simulate_cell(exposure, in_list, out_of_list, dear)
    assert round(d.expected_loss_ratio or 0, 4) == 0.6695
    assert [c.name for c in check_cell(dear, d) if not c.passed] == ["premium", "loss_ratio"]

    sb = simulate_cell(exposure, in_list, out_of_list, upgraded)
    assert (sb.claimants, sb.total_payout, sb.pure_premium) == (12, 516_900.0, 107.6875)
    assert round(sb.implied_premium or 0, 2) == 126.69
    assert all_binding_passed(check_cell(upgraded, sb))
