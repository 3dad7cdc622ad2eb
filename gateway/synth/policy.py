"""A simplified 基本医保 benefit policy, evaluated in integer cents so every split adds up.

Rows must be sorted by person and time; ``group_start[i]`` is the index of the first row of row
i's person-year, because deductibles, annual caps, 大病 thresholds and 个人账户 balances run per
person and calendar year. Parameters are typical of a Hubei city, not a copy of any 文件.

hifmi_pay carries 居民大病保险 and, for 职工 (whose 大额医疗补助 has no column of its own here),
the 大额 supplement, both paid on the year's cumulative in-list self-burden above a threshold.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = ["MED_INPATIENT", "MED_OUTPATIENT", "MED_PHARMACY", "MED_SPECIAL", "Split", "settle"]

I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]
Bool = npt.NDArray[np.bool_]

# Internal med_type indices (the strings written out are "11", "14", "21", "41").
MED_OUTPATIENT, MED_SPECIAL, MED_INPATIENT, MED_PHARMACY = 0, 1, 2, 3
# Internal hospital level indices 0..3 for levels "1", "2", "3", "9".

# [职工, 居民] x level; 统筹 ratio within the policy range.
_OUT_RATIO = np.array([[0.70, 0.60, 0.50, 0.50], [0.55, 0.50, 0.40, 0.40]])
_OUT_DEDUCTIBLE = np.array([30_000, 0])  # cents per year
_OUT_CAP = np.array([300_000, 40_000])  # cents per year
_IN_RATIO = np.array([[0.92, 0.88, 0.85, 0.85], [0.85, 0.75, 0.60, 0.60]])
_IN_DEDUCTIBLE = np.array([[20_000, 40_000, 80_000, 80_000], [20_000, 50_000, 100_000, 100_000]])
_SPECIAL_RATIO = np.array([0.85, 0.70])
_IN_CAP = np.array([40_000_000, 20_000_000])  # 统筹 annual limit
_MI_THRESHOLD = np.array([2_000_000, 1_500_000])
_MI_RATIO = np.array([0.80, 0.60])
_MI_CAP = np.array([50_000_000, 40_000_000])
_RETIREE_BONUS = 0.05  # 退休人员 pay less; capped below
_REMOTE_PENALTY = 0.10  # 转外就医 (referral out of the insuring prefecture) pays less
_MAF_RATIO = 0.70


@dataclass(frozen=True)
class Split:
    """Every amount of a settlement in cents; see the module docstring for the identities."""

    medfee_sumamt: I64
    inscp_scp_amt: I64
    fulamt_ownpay_amt: I64
    overlmt_selfpay: I64
    hifp_pay: I64
    hifmi_pay: I64
    maf_pay: I64
    acct_pay: I64
    psn_cash_pay: I64
    psn_part_amt: I64


def _gcum(x: I64, group_start: I64) -> I64:
    """Inclusive running sum of ``x`` that restarts at each group."""
    total = np.cumsum(x)
    return total - (total[group_start] - x[group_start])


def _capped(increment: I64, cap: I64, group_start: I64) -> I64:
    """Per-row share of a per-group running total that may not exceed ``cap``."""
    run = _gcum(increment, group_start)
    share: I64 = np.minimum(run, cap) - np.minimum(run - increment, cap)
    return share


def _above(amount: I64, threshold: I64, group_start: I64) -> I64:
    """Per-row part of a running total that lies above ``threshold`` (a yearly deductible)."""
    run = _gcum(amount, group_start)
    part: I64 = np.maximum(run - threshold, 0) - np.maximum(run - amount - threshold, 0)
    return part


def _times(cents: I64, ratio: F64) -> I64:
    # Floor keeps the fund's share from ever exceeding the base it is a share of.
    return np.floor(cents * ratio).astype(np.int64)


def settle(
    *,
    group_start: I64,
    med: I64,
    level: I64,
    resident: I64,
    retiree: Bool,
    remote: Bool,
    total: I64,
    ownpay: I64,
    overlmt: I64,
    pharmacy_pooled: Bool,
    assisted: Bool,
    account_balance: I64,
    account_used: Bool,
) -> Split:
    """Split each settlement's total between the funds and the person.

    ``resident`` is 0 for 职工 (310) and 1 for 居民 (390); ``account_balance`` is the person-year's
    个人账户 credit (0 for 居民).
    """
    inlist = total - ownpay - overlmt
    employee = resident == 0

    # 普通门诊统筹 (also 职工 purchases at 门诊统筹定点药店): yearly deductible and cap.
    out_pool = (med == MED_OUTPATIENT) | ((med == MED_PHARMACY) & pharmacy_pooled & employee)
    out_base = np.where(out_pool, inlist, 0)
    out_ratio = _OUT_RATIO[resident, level] + np.where(employee & retiree, 0.10, 0.0)
    out_raw = _times(_above(out_base, _OUT_DEDUCTIBLE[resident], group_start), out_ratio)
    out_pay = _capped(out_raw, _OUT_CAP[resident], group_start)

    # 住院 and 门诊慢特病: per-admission deductible, ratio by level, shared yearly cap.
    in_pool = (med == MED_INPATIENT) | (med == MED_SPECIAL)
    in_ratio = np.where(med == MED_INPATIENT, _IN_RATIO[resident, level], _SPECIAL_RATIO[resident])
    in_ratio = in_ratio + np.where(retiree, _RETIREE_BONUS, 0.0)
    in_ratio = in_ratio - np.where(remote, _REMOTE_PENALTY, 0.0)
    in_ratio = np.minimum(in_ratio, 0.95)
    deductible = np.where(med == MED_INPATIENT, _IN_DEDUCTIBLE[resident, level], 0)
    in_raw = np.where(in_pool, _times(np.maximum(inlist - deductible, 0), in_ratio), 0)
    in_pay = _capped(in_raw, _IN_CAP[resident], group_start)

    hifp = out_pay + in_pay

    # 大病/大额: share of the year's in-list self-burden above the threshold.
    burden = np.where(in_pool, inlist - hifp, 0)
    mi_raw = _times(_above(burden, _MI_THRESHOLD[resident], group_start), _MI_RATIO[resident])
    hifmi = _capped(mi_raw, _MI_CAP[resident], group_start)

    # 医疗救助 for 低保/特困 people, on what is left of the in-list burden.
    maf = np.where(
        assisted & in_pool, _times(inlist - hifp - hifmi, np.full(len(total), _MAF_RATIO)), 0
    )

    part = total - hifp - hifmi - maf
    # 个人账户 pays the person's share until the year's credit is used up.
    eligible = np.where(account_used & employee, part, 0)
    acct = _capped(eligible, account_balance, group_start)
    return Split(
        medfee_sumamt=total,
        inscp_scp_amt=inlist,
        fulamt_ownpay_amt=ownpay,
        overlmt_selfpay=overlmt,
        hifp_pay=hifp,
        hifmi_pay=hifmi,
        maf_pay=maf,
        acct_pay=acct,
        psn_cash_pay=part - acct,
        psn_part_amt=part,
    )
