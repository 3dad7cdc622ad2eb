"""惠民保 pricing core: the benefit rule, per-cell pricing figures and the 云南 product limits.

Pure numpy and pydantic, no HTTP and no SQL; the pricing endpoint feeds it one cell's
person-year arrays at a time. See ``docs/pricing.md``.
"""

from gateway.pricing.limits import LimitCheck, all_binding_passed, check_cell, check_limits
from gateway.pricing.product import Product, Tier
from gateway.pricing.simulate import (
    DEFAULT_ATTACHMENT_POINTS,
    CellSummary,
    TailShare,
    insured_selfpay,
    payouts,
    simulate_cell,
    summarize,
    summary_from_totals,
)

__all__ = [
    "DEFAULT_ATTACHMENT_POINTS",
    "CellSummary",
    "LimitCheck",
    "Product",
    "TailShare",
    "Tier",
    "all_binding_passed",
    "check_cell",
    "check_limits",
    "insured_selfpay",
    "payouts",
    "simulate_cell",
    "summarize",
    "summary_from_totals",
]
