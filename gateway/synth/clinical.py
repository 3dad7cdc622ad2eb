"""Diagnoses, chronic conditions and unit costs of the synthetic city.

Numbers are plausible orders of magnitude for a Chinese city around 2022 (元, 二级医院 prices),
not statistics of any real population. Frequencies are relative weights per age group
(0-14, 15-39, 40-59, 60-74, 75+).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import numpy.typing as npt

__all__ = [
    "AGE_GROUP_EDGES",
    "CANCER_CODES",
    "CHRONIC",
    "DX_CODES",
    "DX_NAMES",
    "ChronicCondition",
    "age_group",
    "dx_index",
    "dx_table",
    "inpatient_cost_arrays",
]

# (ICD-10 code, 中文诊断名称). Order is the index used everywhere.
DIAGNOSES: tuple[tuple[str, str], ...] = (
    ("I10", "高血压"),
    ("E11.9", "2型糖尿病"),
    ("J18.9", "肺炎"),
    ("C34.9", "肺恶性肿瘤"),
    ("K35.8", "急性阑尾炎"),
    ("N18.5", "慢性肾脏病5期"),
    ("O80", "单胎顺产"),
    ("O82.9", "剖宫产单胎分娩"),
    ("J06.9", "急性上呼吸道感染"),
    ("J20.9", "急性支气管炎"),
    ("J03.9", "急性扁桃体炎"),
    ("R50.9", "发热"),
    ("A09", "感染性胃肠炎"),
    ("K29.7", "胃炎"),
    ("J30.4", "变应性鼻炎"),
    ("J45.9", "哮喘"),
    ("L30.9", "皮炎"),
    ("H10.9", "结膜炎"),
    ("K02.9", "龋病"),
    ("N39.0", "泌尿道感染"),
    ("M54.5", "腰痛"),
    ("M17.9", "膝关节病"),
    ("M51.2", "腰椎间盘突出症"),
    ("Z34.9", "正常妊娠监督"),
    ("N40", "前列腺增生"),
    ("H25.9", "老年性白内障"),
    ("E78.5", "高脂血症"),
    ("I25.1", "冠状动脉粥样硬化性心脏病"),
    ("J44.9", "慢性阻塞性肺疾病"),
    ("J44.1", "慢性阻塞性肺疾病伴急性加重"),
    ("I69.3", "脑梗死后遗症"),
    ("I63.9", "脑梗死"),
    ("I61.9", "脑出血"),
    ("I21.9", "急性心肌梗死"),
    ("I50.9", "心力衰竭"),
    ("K80.2", "胆囊结石"),
    ("K56.7", "肠梗阻"),
    ("K92.2", "胃肠道出血"),
    ("S72.0", "股骨颈骨折"),
    ("S06.0", "脑震荡"),
    ("D25.9", "子宫平滑肌瘤"),
    ("F20.9", "精神分裂症"),
    ("C50.9", "乳房恶性肿瘤"),
    ("C16.9", "胃恶性肿瘤"),
    ("C18.9", "结肠恶性肿瘤"),
    ("C22.0", "肝细胞癌"),
    ("C61", "前列腺恶性肿瘤"),
    ("C91.0", "急性淋巴细胞白血病"),
    ("C92.0", "急性髓样白血病"),
)
DX_CODES: tuple[str, ...] = tuple(c for c, _ in DIAGNOSES)
DX_NAMES: tuple[str, ...] = tuple(n for _, n in DIAGNOSES)
_INDEX = {c: i for i, c in enumerate(DX_CODES)}


def dx_index(code: str) -> int:
    return _INDEX[code]


# Lower edges of the five age groups the weight tables are written for.
AGE_GROUP_EDGES = np.array([0, 15, 40, 60, 75], dtype=np.float64)


def age_group(age: npt.NDArray[np.float64]) -> npt.NDArray[np.int64]:
    return (np.searchsorted(AGE_GROUP_EDGES, age, side="right") - 1).clip(0, 4).astype(np.int64)


# Sex restriction: "" both, "M" male only, "F" female only.
_W = tuple[float, float, float, float, float]

# 普通门诊 / 药店 reasons for people without (or besides) a chronic condition.
ACUTE_OUTPATIENT: tuple[tuple[str, str, _W], ...] = (
    ("J06.9", "", (30, 15, 10, 8, 8)),
    ("J20.9", "", (10, 5, 5, 6, 7)),
    ("J03.9", "", (8, 4, 2, 1, 1)),
    ("R50.9", "", (10, 2, 1, 1, 1)),
    ("A09", "", (8, 4, 3, 2, 2)),
    ("K29.7", "", (1, 8, 10, 8, 6)),
    ("J30.4", "", (5, 5, 3, 1, 1)),
    ("J45.9", "", (3, 1, 1, 2, 2)),
    ("L30.9", "", (5, 5, 4, 3, 3)),
    ("H10.9", "", (3, 2, 2, 2, 2)),
    ("K02.9", "", (5, 3, 2, 1, 1)),
    ("N39.0", "F", (1, 6, 4, 3, 3)),
    ("N39.0", "M", (0.5, 1, 1, 2, 3)),
    ("M54.5", "", (0, 4, 7, 6, 5)),
    ("M17.9", "", (0, 1, 4, 7, 8)),
    ("M51.2", "", (0, 2, 4, 3, 2)),
    ("Z34.9", "F", (0, 9, 0.2, 0, 0)),
    ("N40", "M", (0, 0, 2, 6, 8)),
    ("H25.9", "", (0, 0, 1, 3, 4)),
    ("E78.5", "", (0, 1, 3, 3, 2)),
)

# 住院 reasons for people whose stay is not explained by a known chronic condition or a birth.
INPATIENT: tuple[tuple[str, str, _W], ...] = (
    ("J18.9", "", (40, 6, 6, 12, 20)),
    ("J20.9", "", (10, 2, 2, 3, 4)),
    ("A09", "", (8, 2, 1, 1, 1)),
    ("K35.8", "", (6, 8, 4, 2, 1)),
    ("K80.2", "", (0, 4, 8, 6, 4)),
    ("K56.7", "", (1, 1, 2, 3, 4)),
    ("K92.2", "", (0, 1, 2, 3, 4)),
    ("I63.9", "", (0, 1, 8, 18, 22)),
    ("I61.9", "", (0, 0.3, 2, 3, 3)),
    ("I21.9", "", (0, 0.5, 3, 4, 4)),
    ("I25.1", "", (0, 0.5, 6, 10, 12)),
    ("I50.9", "", (0, 0.2, 1, 4, 10)),
    ("I10", "", (0, 1, 4, 5, 5)),
    ("E11.9", "", (0, 1, 4, 5, 4)),
    ("J44.1", "", (0, 0, 1, 6, 10)),
    ("S72.0", "", (0, 0.2, 0.5, 2, 6)),
    ("S06.0", "", (3, 3, 2, 1, 1)),
    ("M51.2", "", (0, 4, 6, 4, 2)),
    ("M17.9", "", (0, 0.5, 2, 4, 4)),
    ("H25.9", "", (0, 0, 2, 6, 6)),
    ("N40", "M", (0, 0, 2, 5, 6)),
    ("D25.9", "F", (0, 3, 6, 1, 0)),
    ("N39.0", "", (1, 1, 1, 2, 3)),
    ("C91.0", "", (0.6, 0.1, 0.05, 0.05, 0.02)),
    ("C92.0", "", (0.1, 0.2, 0.3, 0.3, 0.2)),
    ("C34.9", "", (0, 0.2, 2, 4, 3)),
    ("C16.9", "", (0, 0.2, 1, 2, 2)),
    ("C18.9", "", (0, 0.2, 1, 2, 2)),
    ("C22.0", "", (0, 0.2, 1, 1.5, 1)),
    ("C50.9", "F", (0, 1, 3, 2, 1)),
)


def dx_table(
    rows: tuple[tuple[str, str, _W], ...],
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """Diagnosis indices and a cumulative-probability table indexed by [sex*5 + age group].

    Sex index 0 is male, 1 female.
    """
    codes = np.array([dx_index(c) for c, _, _ in rows], dtype=np.int64)
    weights = np.zeros((10, len(rows)), dtype=np.float64)
    for k, (_, sex, w) in enumerate(rows):
        for s, letter in enumerate("MF"):
            if sex in ("", letter):
                weights[s * 5 : s * 5 + 5, k] = w
    cdf = np.cumsum(weights, axis=1)
    return codes, cdf / cdf[:, -1:]


class ChronicCondition(NamedTuple):
    code: str  # "CANCER" stands for the person's own cancer site
    # Prevalence = top * logistic((age - mid) / scale), shifted by the person's health score.
    top: float
    mid: float
    scale: float
    registered: float  # share certified for 门诊慢特病 (med_type 14)
    visits14: float  # 门诊慢特病 settlements per year when certified
    extra_outpatient: float  # added 普通门诊 + 药店 visits per year
    extra_inpatient: float  # added admissions per year
    inpatient_share: float  # share of the person's admissions coded with this condition
    cost14: float  # median cost of one 门诊慢特病 settlement
    sigma14: float


CHRONIC: tuple[ChronicCondition, ...] = (
    ChronicCondition("I10", 0.60, 62, 9, 0.20, 4, 1.0, 0.01, 0.05, 220, 0.5),
    ChronicCondition("E11.9", 0.25, 62, 10, 0.35, 6, 1.2, 0.02, 0.08, 380, 0.5),
    ChronicCondition("I25.1", 0.20, 72, 8, 0.40, 6, 0.8, 0.10, 0.25, 350, 0.5),
    ChronicCondition("J44.9", 0.15, 72, 8, 0.40, 6, 0.8, 0.25, 0.40, 380, 0.5),
    ChronicCondition("I69.3", 0.12, 74, 8, 0.40, 6, 0.6, 0.15, 0.25, 330, 0.5),
    ChronicCondition("N18.5", 0.002, 60, 10, 1.00, 150, 0.5, 0.80, 0.45, 470, 0.15),
    ChronicCondition("CANCER", 0.05, 75, 9, 0.80, 10, 1.0, 2.00, 0.70, 2200, 1.0),
    ChronicCondition("F20.9", 0.006, 35, 5, 0.90, 10, 0.3, 0.15, 0.60, 420, 0.4),
    ChronicCondition("E78.5", 0.35, 55, 10, 0.00, 0, 0.6, 0.00, 0.00, 0, 0.0),
)
CHRONIC_CODE_INDEX = np.array(
    [dx_index(c.code) if c.code != "CANCER" else -1 for c in CHRONIC], dtype=np.int64
)

# Cancer site of a person with the CANCER condition: (code, sex, relative weight).
CANCER_CODES: tuple[tuple[str, str, float], ...] = (
    ("C34.9", "", 30),
    ("C16.9", "", 15),
    ("C18.9", "", 15),
    ("C22.0", "", 12),
    ("C50.9", "F", 30),
    ("C61", "M", 10),
)

# Inpatient median cost (元, 二级 hospital, first year) and relative odds of a catastrophic stay.
_INPATIENT_COST: dict[str, tuple[float, float]] = {
    "I10": (5000, 0.3), "E11.9": (6500, 0.5), "J18.9": (6000, 1.5), "C34.9": (18000, 6),
    "K35.8": (9000, 0.5), "N18.5": (12000, 2), "O80": (4500, 0.2), "O82.9": (9000, 0.4),
    "J20.9": (4000, 0.3), "A09": (3000, 0.3), "N39.0": (4500, 0.3), "K80.2": (14000, 0.8),
    "K56.7": (10000, 1.5), "K92.2": (12000, 2), "I63.9": (12000, 1.5), "I61.9": (30000, 6),
    "I21.9": (35000, 4), "I25.1": (15000, 1), "I50.9": (10000, 2), "J44.1": (9000, 1.5),
    "S72.0": (32000, 2), "S06.0": (5000, 1), "M51.2": (12000, 0.5), "M17.9": (20000, 0.5),
    "H25.9": (6000, 0.1), "N40": (10000, 0.3), "D25.9": (12000, 0.3), "C91.0": (50000, 25),
    "C92.0": (60000, 25), "C16.9": (20000, 6), "C18.9": (18000, 6), "C22.0": (20000, 7),
    "C50.9": (15000, 4), "C61": (15000, 3), "F20.9": (12000, 0.5), "I69.3": (10000, 1),
    "J44.9": (8000, 1),
}


def inpatient_cost_arrays() -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """(median, catastrophic odds) per diagnosis index; outpatient-only codes get defaults."""
    median = np.full(len(DX_CODES), 6000.0)
    tail = np.ones(len(DX_CODES))
    for code, (m, t) in _INPATIENT_COST.items():
        median[dx_index(code)] = m
        tail[dx_index(code)] = t
    return median, tail


CANCER_DX = np.array(
    [i for i, c in enumerate(DX_CODES) if c.startswith("C")], dtype=np.int64
)
