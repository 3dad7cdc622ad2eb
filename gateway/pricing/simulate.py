"""The 惠民保 benefit rule over person-year amounts, and the pricing figures of one cell.

Everything here is pure numpy over arrays with one element per person-year (one row of the
``person_years`` dataset). No SQL, no disclosure control: the caller fetches the arrays of one
cell, calls :func:`payouts` and :func:`summarize`, and suppresses the cell before release when
``claimants`` (or the persons behind it) is under the grant's minimum. See ``docs/pricing.md``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict

from gateway.errors import ValidationFailed
from gateway.pricing.product import Product

__all__ = [
    "DEFAULT_ATTACHMENT_POINTS",
    "CellSummary",
    "FloatArray",
    "TailShare",
    "insured_selfpay",
    "payouts",
    "simulate_cell",
    "summarize",
    "summary_from_totals",
]

FloatArray = npt.NDArray[np.float64]

# 1万, 5万, 10万, 50万 元: where 惠民保 claims move from common to rare to catastrophic.
DEFAULT_ATTACHMENT_POINTS: tuple[float, ...] = (10_000.0, 50_000.0, 100_000.0, 500_000.0)


def _array(name: str, values: npt.ArrayLike, *, nonnegative: bool = False) -> FloatArray:
    """One-dimensional, finite float64; errors name the argument, never a value."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValidationFailed(f"{name}: expected a 1-dimensional array, got {arr.ndim} dimensions")
    if not np.isfinite(arr).all():
        raise ValidationFailed(f"{name}: contains NaN or infinite values")
    if nonnegative and arr.size and arr.min() < 0:
        raise ValidationFailed(f"{name}: contains negative values")
    return arr


def _same_length(**arrays: FloatArray) -> None:
    lengths = {name: a.shape[0] for name, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        got = ", ".join(f"{name}={n}" for name, n in lengths.items())
        raise ValidationFailed(f"arrays differ in length: {got}")


def insured_selfpay(
    inscp_scp_amt: npt.ArrayLike,
    hifp_pay: npt.ArrayLike,
    hifmi_pay: npt.ArrayLike,
    fulamt_ownpay_amt: npt.ArrayLike,
    overlmt_selfpay: npt.ArrayLike,
) -> tuple[FloatArray, FloatArray]:
    """The insured's yearly self-pay inside and outside the 医保 list, from ``person_years`` sums.

    目录内自付 = 符合政策范围金额 − 统筹基金支付 − 大病保险支付, floored at 0 (a year whose
    refunds exceed its charges has nothing left to reimburse, not a negative claim).
    目录外 = 全自费 + 超限价自费: both are outside what 基本医保 pays for.

    >>> inl, outl = insured_selfpay([30_000], [18_000], [2_000], [5_000], [1_000])
    >>> float(inl[0]), float(outl[0])
    (10000.0, 6000.0)
    """
    scp = _array("inscp_scp_amt", inscp_scp_amt)
    hifp = _array("hifp_pay", hifp_pay)
    hifmi = _array("hifmi_pay", hifmi_pay)
    ownpay = _array("fulamt_ownpay_amt", fulamt_ownpay_amt)
    overlmt = _array("overlmt_selfpay", overlmt_selfpay)
    _same_length(
        inscp_scp_amt=scp,
        hifp_pay=hifp,
        hifmi_pay=hifmi,
        fulamt_ownpay_amt=ownpay,
        overlmt_selfpay=overlmt,
    )
    in_list = np.maximum(scp - hifp - hifmi, 0.0)
    out_of_list = np.maximum(ownpay + overlmt, 0.0)
    return in_list, out_of_list


def payouts(
    in_list_selfpay: npt.ArrayLike,
    out_of_list: npt.ArrayLike,
    product: Product,
    *,
    special_drug: npt.ArrayLike | None = None,
) -> FloatArray:
    """The product's payout for each person-year.

    One annual deductible (起付线) is shared by 目录内 and 目录外 self-pay and consumed by the
    目录内 amount first; what is left of each part is reimbursed at its own ratio, and the sum is
    capped at 封顶线::

        d_in  = min(in, D);   d_out = min(out, D − d_in)
        pay   = min(cap, r_in·(in − d_in) + r_out·(out − d_out))

    特药 cover, when the product has it and ``special_drug`` amounts are given (``person_years``
    carries none today), is a separate responsibility with no deductible and its own cap, added on
    top. Negative inputs (net refunds) count as 0.

    >>> p = Product(name="x", deductible=10_000, ratio_in_list=0.8, ratio_out_of_list=0.5,
    ...             cap=2_000_000)
    >>> payouts([6_000, 30_000], [8_000, 0], p).tolist()
    [2000.0, 16000.0]
    """
    inl = np.maximum(_array("in_list_selfpay", in_list_selfpay), 0.0)
    outl = np.maximum(_array("out_of_list", out_of_list), 0.0)
    _same_length(in_list_selfpay=inl, out_of_list=outl)

    deductible_in = np.minimum(inl, product.deductible)
    deductible_out = np.minimum(outl, product.deductible - deductible_in)
    # In place from here on: a 4-million-row city should not pay for temporary copies.
    inl -= deductible_in
    outl -= deductible_out
    inl *= product.ratio_in_list
    outl *= product.ratio_out_of_list
    pay = inl
    pay += outl
    np.minimum(pay, product.cap, out=pay)

    if special_drug is not None and product.special_drug_cap is not None:
        drug = np.maximum(_array("special_drug", special_drug), 0.0)
        _same_length(in_list_selfpay=pay, special_drug=drug)
        ratio = product.special_drug_ratio if product.special_drug_ratio is not None else 0.0
        drug *= ratio
        np.minimum(drug, product.special_drug_cap, out=drug)
        pay += drug
    return pay


class TailShare(BaseModel):
    """Share of the cell's total payout that lies above ``attachment`` 元 per person-year.

    ``claimants_above`` is how many person-years reach past the attachment point: when it is small
    the share comes close to one person's amount, so the caller suppresses it like a small cell.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    attachment: float
    share: float | None  # None when the cell paid nothing
    claimants_above: int


class CellSummary(BaseModel):
    """The pricing figures of one cell. Ratios are ``None`` where their denominator is 0."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    person_years: int  # rows summarized
    exposure: float  # person-years (Σ exposure)
    claimants: int  # person-years with payout > 0
    total_payout: float  # 元
    claim_frequency: float | None  # claimants / exposure
    pure_premium: float | None  # total_payout / exposure, 元 per person-year
    mean_payout_per_claimant: float | None  # total_payout / claimants
    tail: tuple[TailShare, ...]
    premium: float | None  # as given
    target_loss_ratio: float | None  # as given
    implied_premium: float | None  # pure_premium / target_loss_ratio
    expected_loss_ratio: float | None  # pure_premium / premium


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator > 0 else None


def summarize(
    exposure: npt.ArrayLike,
    payouts: npt.ArrayLike,
    attachment_points: Sequence[float] = DEFAULT_ATTACHMENT_POINTS,
    *,
    premium: float | None = None,
    target_loss_ratio: float | None = None,
) -> CellSummary:
    """Aggregate one cell's person-year payouts into its pricing figures.

    >>> s = summarize([1.0, 1.0, 0.5, 0.5], [0.0, 20_000.0, 0.0, 4_000.0], (10_000,),
    ...               premium=12_000)
    >>> s.exposure, s.claimants, s.claim_frequency, s.pure_premium
    (3.0, 2, 0.6666666666666666, 8000.0)
    >>> s.tail[0].share, s.expected_loss_ratio
    (0.4166666666666667, 0.6666666666666666)
    """
    exp = _array("exposure", exposure, nonnegative=True)
    pay = _array("payouts", payouts, nonnegative=True)
    _same_length(exposure=exp, payouts=pay)
    points = [float(a) for a in attachment_points]
    if not all(math.isfinite(a) and a >= 0 for a in points):
        raise ValidationFailed("attachment_points: each must be a finite amount ≥ 0")
    if premium is not None and not (math.isfinite(premium) and premium > 0):
        raise ValidationFailed("premium: must be a finite amount > 0")
    if target_loss_ratio is not None and not (
        math.isfinite(target_loss_ratio) and target_loss_ratio > 0
    ):
        raise ValidationFailed("target_loss_ratio: must be > 0")

    tails = []
    for a in points:
        over = pay[pay > a]  # few elements for high attachments: cheaper than a full max()
        tails.append((a, float((over - a).sum()), int(over.size)))
    return summary_from_totals(
        person_years=int(pay.size),
        exposure=float(exp.sum()),
        claimants=int(np.count_nonzero(pay > 0)),
        total_payout=float(pay.sum()),
        tails=tails,
        premium=premium,
        target_loss_ratio=target_loss_ratio,
    )


def summary_from_totals(
    *,
    person_years: int,
    exposure: float,
    claimants: int,
    total_payout: float,
    tails: Sequence[tuple[float, float, int]],
    premium: float | None = None,
    target_loss_ratio: float | None = None,
) -> CellSummary:
    """A cell's figures from its totals: ``tails`` holds, per attachment point ``a``,
    ``(a, Σ max(p_i − a, 0), #{i : p_i > a})``. :func:`summarize` computes these totals from
    the arrays; the pricing endpoint gets them from DuckDB (:mod:`gateway.pricing.sql`).

    >>> s = summary_from_totals(person_years=4, exposure=3.0, claimants=2, total_payout=24_000,
    ...                         tails=[(10_000, 10_000, 1)], premium=12_000)
    >>> s.pure_premium, s.tail[0].share, s.expected_loss_ratio
    (8000.0, 0.4166666666666667, 0.6666666666666666)
    """
    pure = _ratio(total_payout, exposure)
    return CellSummary(
        person_years=person_years,
        exposure=exposure,
        claimants=claimants,
        total_payout=total_payout,
        claim_frequency=_ratio(claimants, exposure),
        pure_premium=pure,
        mean_payout_per_claimant=_ratio(total_payout, claimants),
        tail=tuple(TailShare(attachment=a, share=_ratio(amount, total_payout),
                             claimants_above=above) for a, amount, above in tails),
        premium=premium,
        target_loss_ratio=target_loss_ratio,
        implied_premium=(
            None if pure is None or target_loss_ratio is None else pure / target_loss_ratio
        ),
        expected_loss_ratio=None if pure is None or premium is None else pure / premium,
    )


def simulate_cell(
    exposure: npt.ArrayLike,
    in_list_selfpay: npt.ArrayLike,
    out_of_list: npt.ArrayLike,
    product: Product,
    attachment_points: Sequence[float] = DEFAULT_ATTACHMENT_POINTS,
    *,
    special_drug: npt.ArrayLike | None = None,
) -> CellSummary:
    """:func:`payouts` then :func:`summarize` with the product's premium and target loss ratio."""
    pay = payouts(in_list_selfpay, out_of_list, product, special_drug=special_drug)
    return summarize(
        exposure,
        pay,
        attachment_points,
        premium=product.premium,
        target_loss_ratio=product.target_loss_ratio,
    )
