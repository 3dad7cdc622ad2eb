"""Seeded synthetic 参保人 and 结算 extracts of Hubei province, shaped like the national platform's.

Everything is drawn with numpy, vectorized over chunks of ``CHUNK`` persons; each chunk has its
own random stream (``SeedSequence(seed, spawn_key=(chunk,))``), so a seed always gives the same
data. Faker contributes only its zh_CN surname and given-name tables, never its own randomness.

The model, in short: an age/sex pyramid; 职工 (310) for most employed adults and their retirees,
居民 (390) for everyone else; latent health drives chronic conditions and use; yearly counts of
普通门诊 / 药店 / 住院 / 门诊慢特病 are Poisson with gamma frailty, so most people have few
settlements and chronic patients many; costs are lognormal with a Pareto tail for inpatients;
amounts are split by ``gateway.synth.policy`` in integer cents.
"""

from __future__ import annotations

import datetime as dt
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from faker.providers.person.zh_CN import Provider as ZhPerson
from tqdm import tqdm  # type: ignore[import-untyped, unused-ignore]

from gateway.synth import clinical as cl
from gateway.synth import policy
from gateway.synth.idcard import check_digits
from gateway.synth.regions import COUNTIES, PREFECTURES, PROVINCE_NAME

__all__ = [
    "CHUNK",
    "PERSONS_SCHEMA",
    "SETTLEMENTS_SCHEMA",
    "CityFiles",
    "generate_city",
]

I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]
Bool = npt.NDArray[np.bool_]

CHUNK = 50_000  # persons per chunk: ~0.5M settlements, ~0.6 GB peak

PERSONS_SCHEMA = pa.schema(
    [
        ("psn_no", pa.string()),
        ("psn_name", pa.string()),
        ("certno", pa.string()),
        ("gend", pa.string()),
        ("brdy", pa.date32()),
        ("insutype", pa.string()),
        ("insu_admdvs", pa.string()),
        ("tel", pa.string()),
        ("addr", pa.string()),
        ("psn_insu_date", pa.date32()),
        ("insu_end_date", pa.date32()),
    ]
)
AMOUNT_COLUMNS = (
    "medfee_sumamt",
    "inscp_scp_amt",
    "fulamt_ownpay_amt",
    "overlmt_selfpay",
    "hifp_pay",
    "hifmi_pay",
    "maf_pay",
    "acct_pay",
    "psn_cash_pay",
    "psn_part_amt",
)
SETTLEMENTS_SCHEMA = pa.schema(
    [
        ("setl_id", pa.string()),
        ("mdtrt_id", pa.string()),
        ("psn_no", pa.string()),
        ("med_type", pa.string()),
        ("fixmedins_code", pa.string()),
        ("hosp_lv", pa.string()),
        ("setl_time", pa.timestamp("us")),
        ("dise_codg", pa.string()),
        ("dise_name", pa.string()),
        *[(name, pa.float64()) for name in AMOUNT_COLUMNS],
    ]
)


@dataclass(frozen=True)
class CityFiles:
    persons: Path
    settlements: Path
    person_count: int
    settlement_count: int


# ---------------------------------------------------------------------------------------------
# Static tables
# ---------------------------------------------------------------------------------------------

# Share of the population in 5-year bands 0-4 .. 90-94 (a Chinese city around 2020).
_AGE_BANDS = np.array(
    [5.0, 5.9, 5.6, 5.0, 5.3, 6.8, 8.5, 7.4, 6.9, 8.2, 8.5, 7.2, 5.3, 5.6, 4.0, 2.5, 1.6, 0.9, 0.3]
)
_MALE_SHARE = 0.51
_MOVED_SHARE = 0.10  # 户籍 county (certno) differs from where the person lives
_JOIN_DURING = 0.05  # adults who first enrol during the period (new jobs, migrants)
_LEAVE_RATE = 0.012  # per year: moved away or switched schemes

_MOBILE_PREFIXES = np.array(
    [*range(130, 140), 150, 151, 152, 153, 155, 156, 157, 158, 159, 173, 175, 176, 177, 178,
     *range(180, 190), 191, 193, 195, 196, 197, 198, 199],
    dtype=np.int64,
)

_ROAD_STEMS = (
    "解放", "中山", "人民", "建设", "和平", "胜利", "友谊", "长江", "汉江", "东湖", "沿江", "沿河",
    "滨江", "发展", "新华", "青年", "民主", "工农", "文化", "学府", "体育", "公园", "车站", "航空",
    "东风", "幸福", "团结", "花园", "光明", "复兴", "振兴", "兴业", "创业", "金桥", "银湖", "黄鹤",
    "楚天", "荆楚", "江城", "南湖", "北湖", "雄楚", "珞喻", "民族", "民生", "新民", "园林", "桂园",
    "梅园", "柳林", "丹桂", "紫荆", "石牌", "龙泉", "凤凰", "白沙", "中南", "中北", "育才", "科技",
)
_ROAD_SUFFIXES = ("路", "路", "路", "路", "大道", "街", "街", "大街")
_TOWN_STEMS = (
    "城关", "新店", "白沙", "石桥", "龙泉", "长岭", "马坪", "杨店", "三里", "双河", "金山", "柳林",
    "新集", "张家", "李家", "王家", "刘家", "黄土", "桥口", "河口", "高店", "丰山", "花园", "永安",
)
_VILLAGE_STEMS = (
    "高桥", "大湾", "新庄", "红星", "先锋", "东升", "向阳", "和平", "柏树", "枫树", "桃园", "梨园",
    "杨林", "竹林", "石门", "团山", "土桥", "大冲", "小河", "新湾", "塘口", "畈上", "岗上", "堰口",
)

# Hospital level indices 0..3 -> hosp_lv; first 5-digit number of each level's institutions.
_LEVELS = ("1", "2", "3", "9")
_LEVEL_OFFSET = np.array([2000, 1000, 0, 5000], dtype=np.int64)
_MED_TYPES = ("11", "14", "21", "41")

# Level mix [一级, 二级, 三级, 未定级] per visit category (see _level_category).
_LEVEL_MIX = np.array(
    [
        [0.40, 0.25, 0.20, 0.15],  # 普通门诊, adult
        [0.25, 0.30, 0.35, 0.10],  # 普通门诊, child
        [0.20, 0.40, 0.40, 0.00],  # 门诊慢特病
        [0.00, 0.30, 0.70, 0.00],  # 门诊慢特病: dialysis, cancer
        [0.12, 0.48, 0.40, 0.00],  # 住院
        [0.02, 0.25, 0.73, 0.00],  # 住院, severe
        [0.05, 0.50, 0.45, 0.00],  # 住院, delivery
        [0.00, 0.00, 0.00, 1.00],  # 药店
    ]
)
_SEVERE = tuple(
    cl.dx_index(c) for c in ("I21.9", "I61.9", "S72.0", "N18.5", "C91.0", "C92.0", "C34.9",
                             "C16.9", "C18.9", "C22.0", "C50.9", "C61")
)

_CONDITIONS = len(cl.CHRONIC)
_CANCER = next(i for i, c in enumerate(cl.CHRONIC) if c.code == "CANCER")
_DIALYSIS = next(i for i, c in enumerate(cl.CHRONIC) if c.code == "N18.5")
_SCHIZOPHRENIA = next(i for i, c in enumerate(cl.CHRONIC) if c.code == "F20.9")
# Visit kinds of the count model: then one 门诊慢特病 kind per chronic condition.
_K_OUT, _K_PHARM, _K_IN, _K_BIRTH, _K_SPECIAL0 = 0, 1, 2, 3, 4
_KINDS = _K_SPECIAL0 + _CONDITIONS

_OUT_DX, _OUT_CDF = cl.dx_table(cl.ACUTE_OUTPATIENT)
_IN_DX, _IN_CDF = cl.dx_table(cl.INPATIENT)
_IN_MEDIAN, _IN_TAIL = cl.inpatient_cost_arrays()
_IS_CANCER_DX = np.zeros(len(cl.DX_CODES), dtype=np.bool_)
_IS_CANCER_DX[cl.CANCER_DX] = True
_TERMINAL_DX = np.array(
    [cl.dx_index(c) for c in ("I63.9", "I61.9", "I21.9", "I50.9", "J18.9", "J44.1")],
    dtype=np.int64,
)
_TERMINAL_CDF = np.cumsum([0.25, 0.15, 0.15, 0.15, 0.2, 0.1])


def _cdf(weights: F64) -> F64:
    c = np.cumsum(weights)
    cdf: F64 = c / c[-1]
    return cdf


def _pick(cdf: F64, u: F64) -> I64:
    """Inverse-CDF draw from one categorical distribution."""
    idx: I64 = np.minimum(np.searchsorted(cdf, u, side="right"), len(cdf) - 1).astype(np.int64)
    return idx


def _pick_rows(cdf_table: F64, row: I64, u: F64) -> I64:
    """Inverse-CDF draw where each draw has its own distribution ``cdf_table[row]``."""
    idx = np.empty(len(u), dtype=np.int64)
    # One pass per distribution (a handful), not a rows x categories matrix: keeps memory flat.
    for r in range(cdf_table.shape[0]):
        mask = row == r
        idx[mask] = np.searchsorted(cdf_table[r], u[mask], side="right")
    picked: I64 = np.minimum(idx, cdf_table.shape[1] - 1)
    return picked


@dataclass(frozen=True)
class _Geo:
    """Region tables as arrays indexed by county position."""

    code: I64
    code_str: list[str]
    name_in_addr: list[str]  # "" for province-administered units: the prefecture already says it
    pref: I64
    pref_code: list[str]
    pref_name: list[str]
    cdf: F64
    rural_share: F64
    cost_factor: F64
    facilities: I64  # [county, level] number of hospitals
    pharmacies: I64
    hub: I64  # per county: the hub county of its prefecture
    wuhan_core: I64  # county positions of Wuhan's seven central districts
    wuhan_core_cdf: F64
    wuhan_pref: int


def _geo() -> _Geo:
    counties = list(COUNTIES.values())
    pos = {c.code: i for i, c in enumerate(counties)}
    prefs = list(PREFECTURES.values())
    pref_pos = {p.code: i for i, p in enumerate(prefs)}
    weight = np.array(
        [
            PREFECTURES[c.prefecture_code].weight
            * c.weight
            / sum(m.weight for m in PREFECTURES[c.prefecture_code].counties)
            for c in counties
        ]
    )
    rural = np.array(
        [0.45 if c.name.endswith("县") else 0.08 if c.name.endswith("区") else 0.30
         for c in counties]
    )
    wuhan = PREFECTURES["420100"]
    core_codes = ("420102", "420103", "420104", "420105", "420106", "420107", "420111")
    hub = np.array([pos[PREFECTURES[c.prefecture_code].hub_code] for c in counties])
    facilities = np.zeros((len(counties), 4), dtype=np.int64)
    for i, c in enumerate(counties):
        pref = PREFECTURES[c.prefecture_code]
        # A county gets a 三级 hospital from about 400k people; hubs and core Wuhan many more.
        n3 = int(c.weight // 40)
        if hub[i] == i:
            n3 += 2 + int(pref.weight // 150)
        if c.code in core_codes:
            n3 = n3 * 3 + 3
        facilities[i] = [max(3, int(c.weight // 3)), max(1, int(c.weight // 12)), n3,
                         max(2, int(c.weight // 4))]
    pharmacies = np.array([min(999, max(10, int(c.weight * 1.5))) for c in counties])
    core = np.array([pos[c] for c in core_codes], dtype=np.int64)
    return _Geo(
        code=np.array([int(c.code) for c in counties], dtype=np.int64),
        code_str=[c.code for c in counties],
        name_in_addr=[
            "" if PREFECTURES[c.prefecture_code].county_level else c.name for c in counties
        ],
        pref=np.array([pref_pos[c.prefecture_code] for c in counties], dtype=np.int64),
        pref_code=[p.code for p in prefs],
        pref_name=[p.name for p in prefs],
        cdf=_cdf(weight),
        rural_share=rural,
        cost_factor=np.array([1.2 if c.prefecture_code == wuhan.code else 1.0 for c in counties]),
        facilities=facilities,
        pharmacies=pharmacies,
        hub=hub.astype(np.int64),
        wuhan_core=core,
        wuhan_core_cdf=_cdf(np.array([counties[i].weight for i in core], dtype=np.float64)),
        wuhan_pref=pref_pos[wuhan.code],
    )


@dataclass(frozen=True)
class _Names:
    surnames: list[str]
    surname_cdf: F64
    single: tuple[list[str], list[str]]  # one-character given names, (male, female)
    double: tuple[list[str], list[str]]  # two-character given names as listed by Faker
    chars: tuple[list[str], list[str]]  # every character of that sex's names, for new pairs


def _names() -> _Names:
    last = dict(ZhPerson.last_names)
    # 红霞 is listed among men's names but is a woman's name.
    male = [n for n in dict.fromkeys(ZhPerson.first_names_male) if n != "红霞"]
    female = list(dict.fromkeys(ZhPerson.first_names_female))
    return _Names(
        surnames=list(last),
        surname_cdf=_cdf(np.array(list(last.values()), dtype=np.float64)),
        single=([n for n in male if len(n) == 1], [n for n in female if len(n) == 1]),
        double=([n for n in male if len(n) == 2], [n for n in female if len(n) == 2]),
        chars=(list(dict.fromkeys("".join(male))), list(dict.fromkeys("".join(female)))),
    )


# ---------------------------------------------------------------------------------------------
# Arrow string helpers (vectorized, no per-row Python)
# ---------------------------------------------------------------------------------------------


def _take(values: list[str], idx: I64) -> pa.Array:
    return pa.array(values, pa.string()).take(pa.array(idx))


def _digits(x: I64, width: int) -> pa.Array:
    return pc.utf8_lpad(pc.cast(pa.array(x), pa.string()), width=width, padding="0")


def _join(*parts: pa.Array | str) -> pa.Array:
    return pc.binary_join_element_wise(*parts, "")


def _when(mask: Bool, value: pa.Array | str, other: pa.Array | str = "") -> pa.Array:
    return pc.if_else(pa.array(mask), value, other)


def _day(year: int, month: int = 1, day: int = 1) -> int:
    return (dt.date(year, month, day) - dt.date(1970, 1, 1)).days


# ---------------------------------------------------------------------------------------------
# Persons
# ---------------------------------------------------------------------------------------------


class _CertnoSequencer:
    """Gives each (county, birth date, sex) its next unused 顺序码 across all chunks."""

    def __init__(self) -> None:
        self._keys = np.zeros(0, dtype=np.int64)
        self._counts = np.zeros(0, dtype=np.int64)

    def next(self, key: I64) -> I64:
        """Occurrence number of each key, counting every key already seen in earlier chunks."""
        uniq, inverse, counts = np.unique(key, return_inverse=True, return_counts=True)
        order = np.argsort(inverse, kind="stable")
        starts = np.cumsum(counts) - counts
        rank = np.empty(len(key), dtype=np.int64)
        rank[order] = np.arange(len(key)) - np.repeat(starts, counts)
        pos = np.searchsorted(self._keys, uniq)
        found = pos < len(self._keys)
        found[found] = self._keys[pos[found]] == uniq[found]
        before = np.zeros(len(uniq), dtype=np.int64)
        before[found] = self._counts[pos[found]]
        totals = self._counts.copy()
        totals[pos[found]] += counts[found]
        keys = np.concatenate([self._keys, uniq[~found]])
        totals = np.concatenate([totals, counts[~found]])
        merged = np.argsort(keys, kind="stable")
        self._keys, self._counts = keys[merged], totals[merged]
        return (rank + before[inverse]).astype(np.int64)


@dataclass
class _People:
    """One chunk of persons: the Arrow table plus the hidden traits settlements depend on."""

    table: pa.Table
    psn_no: pa.Array
    female: Bool
    birth: I64  # days since 1970-01-01
    resident: I64  # 0 职工 (310), 1 居民 (390)
    county: I64  # county position where the person lives
    start: I64  # enrolment start day
    end: I64  # enrolment end day (inclusive), far future when still enrolled
    deceased: Bool
    conditions: Bool  # [person, condition]
    cancer_dx: I64
    health: F64
    assisted: Bool


def _ages_at(day: int | I64, birth: I64) -> F64:
    return np.asarray((day - birth) / 365.25, dtype=np.float64)


def _make_people(
    rng: np.random.Generator,
    first: int,
    n: int,
    years: tuple[int, ...],
    geo: _Geo,
    names: _Names,
    certnos: _CertnoSequencer,
) -> _People:
    period_start, period_end = _day(years[0]), _day(years[-1], 12, 31)
    female = rng.random(n) >= _MALE_SHARE

    # Age at the end of the period, so babies born during it exist and join at birth.
    band = _pick(_cdf(_AGE_BANDS), rng.random(n))
    age_days = ((band * 5 + rng.random(n) * 5) * 365.25).astype(np.int64)
    birth = period_end - age_days
    age0 = _ages_at(period_start, birth)

    county = _pick(geo.cdf, rng.random(n))
    moved = rng.random(n) < _MOVED_SHARE
    hukou = np.where(moved, _pick(geo.cdf, rng.random(n)), county)

    # Latent health: drives chronic conditions, frailty and mortality together.
    health = rng.standard_normal(n)
    conditions = np.zeros((n, _CONDITIONS), dtype=np.bool_)
    for c, cond in enumerate(cl.CHRONIC):
        logit = (age0 - cond.mid) / cond.scale + 0.8 * health
        conditions[:, c] = rng.random(n) < cond.top / (1.0 + np.exp(-logit))
    conditions[age0 < 16, _SCHIZOPHRENIA] = False
    cancer_w = np.array([[w if s in ("", sex) else 0.0 for _, s, w in cl.CANCER_CODES]
                         for sex in "MF"])
    cancer_cdf = np.cumsum(cancer_w, axis=1) / cancer_w.sum(axis=1, keepdims=True)
    site = _pick_rows(cancer_cdf, female.astype(np.int64), rng.random(n))
    cancer_dx = np.array([cl.dx_index(c) for c, _, _ in cl.CANCER_CODES], dtype=np.int64)[site]

    # 职工 for most working adults (and they stay 职工 once retired); the rest 居民.
    retire_age = np.where(female, 55.0, 60.0)
    p_employee = np.select(
        [age0 < 18, age0 < 23, age0 < retire_age], [0.0, 0.25, 0.82], default=0.55
    )
    resident = (rng.random(n) >= p_employee).astype(np.int64)

    # 参保日期: most long before the period; newborns at birth; a few join during it.
    long_ago = rng.integers(_day(1999), period_start, n)
    start = np.maximum(long_ago, birth + rng.integers(0, 90, n))
    joiner = (rng.random(n) < _JOIN_DURING) & (birth < period_start)
    start = np.where(joiner, rng.integers(period_start, period_end + 1, n), start)
    start = np.minimum(start, period_end)

    # 终止: death (Gompertz hazard, worse health dies sooner) or leaving, during the period.
    n_years = len(years)
    q_death = np.minimum(0.00005 * np.exp(0.09 * (age0 + n_years / 2) + 0.3 * health), 0.5)
    p_death = 1.0 - (1.0 - q_death) ** n_years
    p_leave = 1.0 - (1.0 - _LEAVE_RATE) ** n_years
    u = rng.random(n)
    deceased = u < p_death
    leaves = (~deceased) & (u < p_death + p_leave)
    first_day = np.maximum(start, period_start)
    end_draw = first_day + (rng.random(n) * (period_end - first_day + 1)).astype(np.int64)
    ending = (deceased | leaves) & (first_day <= period_end)
    deceased &= ending
    end = np.where(ending, np.minimum(end_draw, period_end), np.iinfo(np.int32).max)

    assisted = rng.random(n) < np.where(resident == 1, 0.045 + 0.03 * (age0 >= 70), 0.004)

    table = _person_table(
        rng, first, n, female, birth, resident, county, hukou, start, end, ending, geo, names,
        certnos,
    )
    return _People(
        table=table,
        psn_no=table.column("psn_no").combine_chunks(),
        female=female,
        birth=birth,
        resident=resident,
        county=county,
        start=start,
        end=end,
        deceased=deceased,
        conditions=conditions,
        cancer_dx=cancer_dx,
        health=health,
        assisted=assisted,
    )


def _person_table(
    rng: np.random.Generator,
    first: int,
    n: int,
    female: Bool,
    birth: I64,
    resident: I64,
    county: I64,
    hukou: I64,
    start: I64,
    end: I64,
    ending: Bool,
    geo: _Geo,
    names: _Names,
    certnos: _CertnoSequencer,
) -> pa.Table:
    sex = female.astype(np.int64)
    psn_no = _join("42010000", _digits(np.arange(first + 1, first + n + 1, dtype=np.int64), 12))

    # Name: weighted surname; one- or two-character given name by sex and generation.
    surname_idx = _pick(names.surname_cdf, rng.random(n))
    surname = _take(names.surnames, surname_idx)
    compound = np.array([len(s) > 1 for s in names.surnames])[surname_idx]
    birth_year = birth.astype("datetime64[D]").astype("datetime64[Y]").astype(np.int64) + 1970
    one_char = compound | (rng.random(n) < 0.22)
    # Faker's two-character names (秀英, 建国) are old-fashioned; few men's ones are listed.
    old = birth_year < 1975
    p_traditional = np.where(female, np.where(old, 0.6, 0.1), np.where(old, 0.12, 0.02))
    traditional = rng.random(n) < p_traditional
    given: pa.Array | None = None
    for s in (0, 1):
        single, double, chars = names.single[s], names.double[s], names.chars[s]
        a = _take(single, rng.integers(0, len(single), n))
        b = _take(chars, rng.integers(0, len(chars), n))
        c = _take(chars, rng.integers(0, len(chars), n))
        d = _take(double, rng.integers(0, len(double), n))
        this = _when(one_char, a, _when(traditional, d, _join(b, c)))
        given = this if given is None else _when(sex == 1, this, given)
    psn_name = _join(surname, given if given is not None else "")

    # 身份证号: 户籍 county + birth date + 顺序码 (odd male / even female) + check digit.
    days = birth.astype("datetime64[D]")
    month_start = days.astype("datetime64[M]")
    ymd = (
        birth_year * 10_000
        + (month_start.astype(np.int64) % 12 + 1) * 100
        + (days - month_start).astype(np.int64)
        + 1
    )
    key = (geo.code[hukou] * 100_000 + (birth + 40_000)) * 2 + sex
    occurrence = certnos.next(key)
    # A per-cell starting point keeps 顺序码 from all being 001; the occurrence keeps them unique.
    spread = (key % 1_000_003) * 7_919 % 499
    slot = spread + occurrence
    seq = np.where(sex == 0, 2 * (slot % 500) + 1, 2 * (slot % 499) + 2)
    first17 = geo.code[hukou] * 100_000_000_000 + ymd * 1000 + seq
    certno = _join(pc.cast(pa.array(first17), pa.string()),
                   _take(list("0123456789X"), check_digits(first17)))

    prefix = _MOBILE_PREFIXES[rng.integers(0, len(_MOBILE_PREFIXES), n)]
    tel = pc.cast(pa.array(prefix * 100_000_000 + rng.integers(0, 100_000_000, n)), pa.string())

    addr = _address(rng, n, county, geo)
    pref = geo.pref[county]
    return pa.table(
        {
            "psn_no": psn_no,
            "psn_name": psn_name,
            "certno": certno,
            "gend": _take(["1", "2"], sex),
            "brdy": pa.array(birth.astype(np.int32), pa.date32()),
            "insutype": _take(["310", "390"], resident),
            "insu_admdvs": _take(geo.pref_code, pref),
            "tel": tel,
            "addr": addr,
            "psn_insu_date": pa.array(start.astype(np.int32), pa.date32()),
            "insu_end_date": pa.array(
                np.where(ending, end, 0).astype(np.int32), pa.date32(), mask=~ending
            ),
        },
        schema=PERSONS_SCHEMA,
    )


def _address(rng: np.random.Generator, n: int, county: I64, geo: _Geo) -> pa.Array:
    head = _join(PROVINCE_NAME, _take(geo.pref_name, geo.pref[county]),
                 _take(geo.name_in_addr, county))
    road = _join(
        _take(list(_ROAD_STEMS), rng.integers(0, len(_ROAD_STEMS), n)),
        _take(list(_ROAD_SUFFIXES), rng.integers(0, len(_ROAD_SUFFIXES), n)),
    )
    number = _join(pc.cast(pa.array(1 + (rng.pareto(1.2, n) * 40).astype(np.int64) % 2000),
                           pa.string()), "号")
    building = pc.cast(pa.array(rng.integers(1, 40, n)), pa.string())
    unit = pc.cast(pa.array(rng.integers(1, 7, n)), pa.string())
    room = pc.cast(pa.array(rng.integers(1, 33, n) * 100 + rng.integers(1, 7, n)), pa.string())
    shape = rng.random(n)
    flat = _join(building, "栋", _when(shape < 0.35, _join(unit, "单元"), ""), room, "室")
    urban = _join(road, number, _when(shape < 0.85, flat, ""))
    rural = _join(
        _take(list(_TOWN_STEMS), rng.integers(0, len(_TOWN_STEMS), n)), "镇",
        _take(list(_VILLAGE_STEMS), rng.integers(0, len(_VILLAGE_STEMS), n)), "村",
        pc.cast(pa.array(rng.integers(1, 13, n)), pa.string()), "组",
        pc.cast(pa.array(rng.integers(1, 60, n)), pa.string()), "号",
    )
    return _join(head, _when(rng.random(n) < geo.rural_share[county], rural, urban))


# ---------------------------------------------------------------------------------------------
# Settlements
# ---------------------------------------------------------------------------------------------


def _yearly_rates(
    people: _People, mid_age: F64, resident: I64, exposure: F64, rng: np.random.Generator
) -> F64:
    """Expected settlements [person, year, kind] for the count model."""
    n, n_years = mid_age.shape
    female = people.female[:, None]
    cond = people.conditions.astype(np.float64)
    extra_out = cond @ np.array([c.extra_outpatient for c in cl.CHRONIC])
    extra_in = cond @ np.array([c.extra_inpatient for c in cl.CHRONIC])

    out = np.interp(mid_age, [0, 2, 5, 10, 15, 20, 30, 40, 50, 60, 70, 80, 90],
                    [2.2, 2.0, 1.2, 0.8, 0.5, 0.5, 0.55, 0.65, 0.85, 1.1, 1.4, 1.6, 1.7])
    # Women of childbearing age see doctors far more (pregnancy, gynaecology).
    out *= np.where(female, 1.08 + 0.7 * np.exp(-(((mid_age - 30) / 8) ** 2)), 1.0)
    out *= np.where(resident[:, None] == 0, 1.1, 1.0)
    pharm = np.where(resident[:, None] == 0, 0.6 + 0.012 * mid_age, 0.1 + 0.003 * mid_age)
    inpatient = np.interp(mid_age, [0, 1, 5, 15, 20, 40, 50, 60, 70, 80, 90],
                          [0.14, 0.10, 0.06, 0.04, 0.05, 0.07, 0.10, 0.16, 0.25, 0.38, 0.46])
    births = np.where(female, 0.045 * np.exp(-(((mid_age - 29) / 5) ** 2)), 0.0)

    # Gamma frailty (mean 1) tied to latent health: overdispersed counts, heavy users.
    h = people.health[:, None]
    f_out = rng.gamma(0.9, 1 / 0.9, (n, 1)) * np.exp(0.25 * h - 0.03)
    f_in = rng.gamma(1.2, 1 / 1.2, (n, 1)) * np.exp(0.3 * h - 0.045)
    f_special = rng.gamma(4.0, 1 / 4.0, (n, 1))

    rates = np.zeros((n, n_years, _KINDS))
    rates[:, :, _K_OUT] = (out + 0.6 * extra_out[:, None]) * f_out
    rates[:, :, _K_PHARM] = (pharm + 0.4 * extra_out[:, None]) * f_out
    rates[:, :, _K_IN] = (inpatient + extra_in[:, None]) * f_in
    rates[:, :, _K_BIRTH] = births
    registered = people.conditions & (
        rng.random(people.conditions.shape) < np.array([c.registered for c in cl.CHRONIC])
    )
    visits = registered * np.array([c.visits14 for c in cl.CHRONIC]) * f_special
    # Dialysis runs on a fixed schedule (about 3 sessions a week), not on frailty.
    visits[:, _DIALYSIS] = registered[:, _DIALYSIS] * 150 * rng.gamma(40.0, 1 / 40.0, n)
    rates[:, :, _K_SPECIAL0:] = visits[:, None, :]
    return rates * exposure[:, :, None]


def _settlements(
    rng: np.random.Generator,
    people: _People,
    years: tuple[int, ...],
    geo: _Geo,
    first_id: int,
) -> pa.Table:
    n, n_years = len(people.birth), len(years)
    year_start = np.array([_day(y) for y in years], dtype=np.int64)
    year_end = np.array([_day(y, 12, 31) for y in years], dtype=np.int64)
    win_start = np.maximum(people.start[:, None], year_start[None, :])
    win_end = np.minimum(people.end[:, None], year_end[None, :])
    win_len = np.maximum(win_end - win_start + 1, 0)
    exposure = win_len / (year_end - year_start + 1)[None, :]
    mid_age = _ages_at((year_start + year_end)[None, :] // 2, people.birth[:, None]).clip(0)

    rates = _yearly_rates(people, mid_age, people.resident, exposure, rng)
    counts = rng.poisson(rates).ravel()
    cell = np.repeat(np.arange(counts.size, dtype=np.int64), counts)
    p = cell // (n_years * _KINDS)
    y = (cell // _KINDS) % n_years
    kind = cell % _KINDS
    day = win_start[p, y] + (rng.random(len(cell)) * win_len[p, y]).astype(np.int64)

    # End-of-life admissions for many who die: expensive and close to the death date.
    dying = np.flatnonzero(people.deceased & (rng.random(n) < 0.7))
    dying_year = np.minimum(np.searchsorted(year_end, people.end[dying]), n_years - 1)
    # With a gap in ``years`` a death can fall in a year that is not generated.
    listed = year_start[dying_year] <= people.end[dying]
    dying, dying_year = dying[listed], dying_year[listed]
    p = np.concatenate([p, dying])
    y = np.concatenate([y, dying_year])
    kind = np.concatenate([kind, np.full(len(dying), _K_IN)])
    day = np.concatenate([day, people.end[dying]])
    terminal = np.zeros(len(p), dtype=np.bool_)
    terminal[len(cell):] = True
    rows = len(p)

    med = np.select(
        [kind == _K_OUT, kind == _K_PHARM, kind >= _K_SPECIAL0],
        [policy.MED_OUTPATIENT, policy.MED_PHARMACY, policy.MED_SPECIAL],
        default=policy.MED_INPATIENT,
    ).astype(np.int64)
    age = mid_age[p, y]
    female = people.female[p]
    group = female.astype(np.int64) * 5 + cl.age_group(age)
    conditions = people.conditions[p]
    cancer_dx = people.cancer_dx[p]

    dx = _diagnoses(rng, kind, med, group, conditions, cancer_dx, terminal)
    level = _levels(rng, med, kind, dx, age)
    fac_county, remote = _facility_county(rng, people.county[p], level, med, dx, geo)
    number = _facility_number(rng, fac_county, level, med, geo)

    year_index = np.array(years, dtype=np.int64)[y] - years[0]
    place = geo.cost_factor[fac_county]
    total = _costs(rng, med, kind, dx, level, age, year_index, terminal, place)
    ownpay, overlmt = _out_of_list(rng, total, med, dx)

    # Sort by person then time: yearly deductibles, caps and balances accumulate in that order.
    seconds = _time_of_day(rng, med)
    micros = (day * 86_400 + seconds) * 1_000_000
    order = np.lexsort((micros, p))
    p, y, med, level, dx, micros, total, ownpay, overlmt = (
        a[order] for a in (p, y, med, level, dx, micros, total, ownpay, overlmt)
    )
    fac_county, remote, number, age = fac_county[order], remote[order], number[order], age[order]
    key = p * n_years + y
    boundary = np.flatnonzero(np.diff(key)) + 1
    starts = np.concatenate([[0], boundary]).astype(np.int64)
    group_start = np.repeat(starts, np.diff(np.concatenate([starts, [rows]])))

    resident = people.resident[p]
    retiree = (resident == 0) & (age >= np.where(people.female[p], 55.0, 60.0))
    balance = _account_balance(rng, n, n_years, people.resident, mid_age, people.female)[p, y]
    account_used = rng.random(rows) < np.choose(med, [0.85, 0.80, 0.60, 0.97])
    split = policy.settle(
        group_start=group_start,
        med=med,
        level=level,
        resident=resident,
        retiree=retiree,
        remote=remote,
        total=total,
        ownpay=ownpay,
        overlmt=overlmt,
        pharmacy_pooled=rng.random(rows) < 0.3,
        assisted=people.assisted[p],
        account_balance=balance,
        account_used=account_used,
    )

    ids = np.arange(first_id, first_id + rows, dtype=np.int64)
    fac_prefix = _take(["H", "P"], (med == policy.MED_PHARMACY).astype(np.int64))
    columns: dict[str, pa.Array] = {
        "setl_id": _join("S", _digits(ids, 14)),
        "mdtrt_id": _join("M", _digits(ids, 14)),
        "psn_no": people.psn_no.take(pa.array(p)),
        "med_type": _take(list(_MED_TYPES), med),
        "fixmedins_code": _join(fac_prefix, _take(geo.code_str, fac_county), _digits(number, 5)),
        "hosp_lv": _take(list(_LEVELS), level),
        "setl_time": pa.array(micros, pa.timestamp("us")),
        "dise_codg": _take(list(cl.DX_CODES), dx),
        "dise_name": _take(list(cl.DX_NAMES), dx),
    }
    for name in AMOUNT_COLUMNS:
        cents: I64 = getattr(split, name)
        columns[name] = pa.array(cents / 100.0, pa.float64())
    return pa.table(columns, schema=SETTLEMENTS_SCHEMA)


def _diagnoses(
    rng: np.random.Generator,
    kind: I64,
    med: I64,
    group: I64,
    conditions: Bool,
    cancer_dx: I64,
    terminal: Bool,
) -> I64:
    rows = len(kind)

    def code_of(condition: I64) -> I64:
        code = cl.CHRONIC_CODE_INDEX[condition]
        resolved: I64 = np.where(code < 0, cancer_dx, code)
        return resolved

    # 普通门诊 / 药店: acute reasons, or half the time one of the person's chronic conditions.
    dx = np.where(
        med == policy.MED_INPATIENT,
        _IN_DX[_pick_rows(_IN_CDF, group, rng.random(rows))],
        _OUT_DX[_pick_rows(_OUT_CDF, group, rng.random(rows))],
    )
    n_cond = conditions.sum(axis=1)
    chosen = np.floor(rng.random(rows) * n_cond).astype(np.int64)
    which = np.argmax(np.cumsum(conditions, axis=1, dtype=np.int8) > chosen[:, None], axis=1)
    own = code_of(which.astype(np.int64))
    outpatient = (med == policy.MED_OUTPATIENT) | (med == policy.MED_PHARMACY)
    dx = np.where(outpatient & (n_cond > 0) & (rng.random(rows) < 0.5), own, dx)

    # 住院: a known condition explains part of the admissions (cancer most of them).
    inpatient = kind == _K_IN
    for c, cond in enumerate(cl.CHRONIC):
        if cond.inpatient_share <= 0:
            continue
        hit = inpatient & conditions[:, c] & (rng.random(rows) < cond.inpatient_share)
        code = cancer_dx if cond.code == "CANCER" else np.full(rows, cl.dx_index(cond.code))
        if cond.code == "J44.9":
            code = np.full(rows, cl.dx_index("J44.1"))  # admissions are exacerbations
        dx = np.where(hit, code, dx)
    dx = np.where(
        kind == _K_BIRTH,
        np.where(rng.random(rows) < 0.55, cl.dx_index("O80"), cl.dx_index("O82.9")),
        dx,
    )
    special = np.clip(kind - _K_SPECIAL0, 0, _CONDITIONS - 1)
    dx = np.where(kind >= _K_SPECIAL0, code_of(special), dx)
    dying_dx = _TERMINAL_DX[_pick(_TERMINAL_CDF, rng.random(rows))]
    last = np.where(conditions[:, _CANCER], cancer_dx, dying_dx)
    return np.where(terminal, last, dx).astype(np.int64)


def _levels(rng: np.random.Generator, med: I64, kind: I64, dx: I64, age: F64) -> I64:
    severe = np.isin(dx, _SEVERE)
    category = np.select(
        [
            (med == policy.MED_OUTPATIENT) & (age >= 15),
            med == policy.MED_OUTPATIENT,
            (med == policy.MED_SPECIAL) & ~severe,
            med == policy.MED_SPECIAL,
            kind == _K_BIRTH,
            (med == policy.MED_INPATIENT) & ~severe,
            med == policy.MED_INPATIENT,
        ],
        [0, 1, 2, 3, 6, 4, 5],
        default=7,
    ).astype(np.int64)
    return _pick_rows(np.cumsum(_LEVEL_MIX, axis=1), category, rng.random(len(med)))


def _facility_county(
    rng: np.random.Generator, home: I64, level: I64, med: I64, dx: I64, geo: _Geo
) -> tuple[I64, Bool]:
    """Where the care happens: home county, the prefecture hub for 三级, or Wuhan on referral."""
    rows = len(home)
    tertiary = level == 2
    county = np.where(tertiary & (geo.facilities[home, 2] == 0), geo.hub[home], home)
    core = geo.wuhan_core[_pick(geo.wuhan_core_cdf, rng.random(rows))]
    in_wuhan = geo.pref[home] == geo.wuhan_pref
    suburb = in_wuhan & ~np.isin(home, geo.wuhan_core)
    county = np.where(tertiary & suburb & (rng.random(rows) < 0.6), core, county)
    serious = (med != policy.MED_OUTPATIENT) & (med != policy.MED_PHARMACY) & np.isin(dx, _SEVERE)
    refer_p = np.where(serious, 0.15, 0.03)
    remote = tertiary & ~in_wuhan & (med != policy.MED_PHARMACY) & (rng.random(rows) < refer_p)
    return np.where(remote, core, county).astype(np.int64), remote


def _facility_number(
    rng: np.random.Generator, county: I64, level: I64, med: I64, geo: _Geo
) -> I64:
    pharmacy = med == policy.MED_PHARMACY
    size = np.where(pharmacy, geo.pharmacies[county], geo.facilities[county, level])
    # Skewed towards low numbers: a few big institutions take most of the visits.
    k = np.floor(size * rng.random(len(county)) ** 1.6).astype(np.int64)
    return np.where(pharmacy, 1 + k, _LEVEL_OFFSET[level] + 1 + k)


def _costs(
    rng: np.random.Generator,
    med: I64,
    kind: I64,
    dx: I64,
    level: I64,
    age: F64,
    year_index: I64,
    terminal: Bool,
    place: F64,
) -> I64:
    """Total cost in cents: lognormal bodies, Pareto tail for catastrophic admissions."""
    rows = len(med)
    chronic_dx = np.isin(dx, cl.CHRONIC_CODE_INDEX) | np.isin(dx, cl.CANCER_DX)
    special = np.clip(kind - _K_SPECIAL0, 0, _CONDITIONS - 1)
    cost14 = np.array([c.cost14 for c in cl.CHRONIC])[special]
    sigma14 = np.array([c.sigma14 for c in cl.CHRONIC])[special]
    inpatient = med == policy.MED_INPATIENT

    median = np.choose(
        med,
        [
            np.where(chronic_dx, 200.0, 130.0) * np.array([0.7, 1.0, 1.6, 0.6])[level],
            cost14 * np.array([0.8, 1.0, 1.25, 1.0])[level],
            _IN_MEDIAN[dx] * np.array([0.55, 1.0, 1.6, 1.0])[level],
            np.where(chronic_dx, 160.0, 90.0),
        ],
    )
    median = median * np.where(age < 15, 0.75, np.where(age >= 75, 1.15, 1.0))
    sigma = np.choose(med, [np.full(rows, 0.75), sigma14, np.full(rows, 0.55), np.full(rows, 0.8)])
    cost = median * np.exp(sigma * rng.standard_normal(rows))

    # Catastrophic admissions (ICU, transplants, CAR-T, ...): Pareto above 80,000 元.
    p_tail = 0.0008 * _IN_TAIL[dx] * np.where(level == 2, 2.0, 1.0) * np.where(terminal, 4.0, 1.0)
    tail = inpatient & (rng.random(rows) < p_tail)
    big = 80_000.0 * (1.0 + rng.pareto(1.6, rows))
    # Soften the far tail (benefit reviews, deaths) instead of a hard cap that would pile up.
    big = np.where(big > 2e6, 2e6 * (1.0 + 0.5 * np.log(np.maximum(big, 2e6) / 2e6)), big)
    cost = np.where(tail, np.maximum(cost, big), cost)
    cost = np.where(terminal & ~tail, cost * 2.5, cost)

    cost = cost * place * 1.05**year_index
    return np.maximum(np.round(cost * 100), 500).astype(np.int64)


def _out_of_list(
    rng: np.random.Generator, total: I64, med: I64, dx: I64
) -> tuple[I64, I64]:
    """目录外 (全自费) and 超限价 parts of each total, in cents."""
    rows = len(total)
    cancer = _IS_CANCER_DX[dx]
    size = np.clip(np.log10(np.maximum(total, 1) / 2_000_000), 0, 2)
    mean = np.choose(
        med,
        [np.full(rows, 0.04), np.where(cancer, 0.18, 0.03), 0.06 + 0.10 * cancer + 0.06 * size,
         np.full(rows, 0.12)],
    )
    concentration = 6.0
    share = np.minimum(rng.beta(mean * concentration, (1 - mean) * concentration), 0.9)
    ownpay = np.floor(total * share).astype(np.int64)
    has_overlimit = rng.random(rows) < np.where(med == policy.MED_INPATIENT, 0.2, 0.05)
    over_share = rng.uniform(0.003, 0.03, rows)
    overlmt = np.where(has_overlimit, np.floor(total * over_share), 0).astype(np.int64)
    return ownpay, overlmt


def _time_of_day(rng: np.random.Generator, med: I64) -> I64:
    latest = np.array([17.5, 17.5, 17.0, 21.0])[med] * 3600
    seconds: I64 = (8 * 3600 + rng.random(len(med)) * (latest - 8 * 3600)).astype(np.int64)
    return seconds


def _account_balance(
    rng: np.random.Generator,
    n: int,
    n_years: int,
    resident: I64,
    mid_age: F64,
    female: Bool,
) -> I64:
    """Yearly 个人账户 credit in cents: a share of wages for workers, a flat sum for retirees."""
    wage = np.exp(np.log(1800.0) + 0.45 * rng.standard_normal((n, 1)))
    pension = np.exp(np.log(1400.0) + 0.2 * rng.standard_normal((n, 1)))
    retired = mid_age >= np.where(female, 55.0, 60.0)[:, None]
    yuan = np.where(retired, pension, wage) * (resident == 0)[:, None]
    return np.round(np.broadcast_to(yuan, (n, n_years)) * 100).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def generate_city(
    out_dir: Path,
    *,
    persons: int = 100_000,
    years: tuple[int, ...] = (2022, 2023, 2024, 2025),
    seed: int = 7,
    progress: bool = True,
) -> CityFiles:
    """Write ``persons.parquet`` and ``settlements.parquet`` for a synthetic Hubei population.

    Deterministic for a seed. Memory stays bounded by one chunk of ``CHUNK`` persons.
    """
    if persons < 1:
        raise ValueError("persons must be at least 1")
    years = tuple(sorted(set(years)))
    if not years or years[0] < 1950 or years[-1] > 2100:
        raise ValueError("years must be calendar years between 1950 and 2100")
    out_dir.mkdir(parents=True, exist_ok=True)
    persons_path = out_dir / "persons.parquet"
    settlements_path = out_dir / "settlements.parquet"
    geo, names, certnos = _geo(), _names(), _CertnoSequencer()
    settlement_count = 0
    with (
        pq.ParquetWriter(persons_path, PERSONS_SCHEMA, compression="zstd") as person_writer,
        pq.ParquetWriter(settlements_path, SETTLEMENTS_SCHEMA, compression="zstd") as setl_writer,
        tqdm(total=persons, unit="psn", desc="synth city", file=sys.stderr,
             disable=not progress) as bar,
    ):
        for chunk, first in enumerate(range(0, persons, CHUNK)):
            rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(chunk,)))
            n = min(CHUNK, persons - first)
            people = _make_people(rng, first, n, years, geo, names, certnos)
            person_writer.write_table(people.table)
            table = _settlements(rng, people, years, geo, settlement_count + 1)
            setl_writer.write_table(table)
            settlement_count += table.num_rows
            bar.update(n)
            bar.set_postfix(settlements=settlement_count)
    return CityFiles(
        persons=persons_path,
        settlements=settlements_path,
        person_count=persons,
        settlement_count=settlement_count,
    )
