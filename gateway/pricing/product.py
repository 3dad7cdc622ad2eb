"""A 惠民保 product as an insurer proposes it: the benefit terms and how it is priced.

Amounts are in 元 per policy year; ratios are fractions (0.6 means 60%). The model only refuses
terms that cannot be simulated (a negative deductible, a ratio above 100%); whether the terms
meet the 云南 product limits is a separate, reported check (:mod:`gateway.pricing.limits`), so an
insurer can still simulate a non-compliant product and see by how much it misses.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["Product", "Tier"]

# 基础保障 or 升级保障: the two premium levels the 云南 notice distinguishes.
Tier = Literal["basic", "upgraded"]


class Product(BaseModel):
    """One product's terms.

    >>> p = Product(name="示例", deductible=15_000, ratio_in_list=0.8, ratio_out_of_list=0.5,
    ...             cap=2_000_000, premium=69)
    >>> p.tier, p.has_special_drug_cover
    ('basic', False)
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    name: str = Field(min_length=1, max_length=64)
    deductible: float = Field(
        ge=0, description="起付线 (元), one annual deductible over 目录内+目录外"
    )
    ratio_in_list: float = Field(ge=0, le=1, description="目录内报销比例")
    ratio_out_of_list: float = Field(ge=0, le=1, description="目录外报销比例")
    cap: float = Field(gt=0, description="封顶线 (元) over 目录内+目录外 payouts")
    # 特药 cover is a separate responsibility with its own cap; omit both to leave it out.
    special_drug_cap: float | None = Field(default=None, gt=0, description="特药封顶线 (元)")
    special_drug_ratio: float | None = Field(default=None, ge=0, le=1, description="特药报销比例")
    premium: float | None = Field(default=None, gt=0, description="保费 (元 per person-year)")
    target_loss_ratio: float | None = Field(default=None, gt=0, le=1.5, description="目标赔付率")
    tier: Tier = "basic"

    @model_validator(mode="after")
    def _special_drug_terms_together(self) -> Product:
        # A cap without a ratio (or the reverse) is an incomplete responsibility, not a default.
        if (self.special_drug_cap is None) != (self.special_drug_ratio is None):
            missing = (
                "special_drug_ratio" if self.special_drug_ratio is None else "special_drug_cap"
            )
            raise ValueError(f"{missing}: give special_drug_cap and special_drug_ratio together")
        return self

    @property
    def has_special_drug_cover(self) -> bool:
        return self.special_drug_cap is not None
