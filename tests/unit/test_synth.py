"""The seeded synthetic city: determinism, schema, identifiers, regions and money arithmetic."""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
import re
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from gateway.synth import CityFiles, certno_check_digit, generate_city, is_valid_certno
from gateway.synth.clinical import DIAGNOSES
from gateway.synth.idcard import check_digits
from gateway.synth.regions import (
    COUNTIES,
    PREFECTURES,
    PROVINCE_CODE,
    address_prefixes,
    county_code_for_address,
    prefecture_code_for_address,
)

PERSONS = 2_000
YEARS = (2022, 2023, 2024, 2025)

PERSON_TYPES = {
    "psn_no": pa.string(),
    "psn_name": pa.string(),
    "certno": pa.string(),
    "gend": pa.string(),
    "brdy": pa.date32(),
    "insutype": pa.string(),
    "insu_admdvs": pa.string(),
    "tel": pa.string(),
    "addr": pa.string(),
    "psn_insu_date": pa.date32(),
    "insu_end_date": pa.date32(),
}
AMOUNTS = (
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
SETTLEMENT_TYPES = {
    "setl_id": pa.string(),
    "mdtrt_id": pa.string(),
    "psn_no": pa.string(),
    "med_type": pa.string(),
    "fixmedins_code": pa.string(),
    "hosp_lv": pa.string(),
    "setl_time": pa.timestamp("us"),
    "dise_codg": pa.string(),
    "dise_name": pa.string(),
    **{name: pa.float64() for name in AMOUNTS},
}


@pytest.fixture(scope="module")
def city(tmp_path_factory: pytest.TempPathFactory) -> CityFiles:
    return generate_city(tmp_path_factory.mktemp("city"), persons=PERSONS, seed=11, progress=False)


@pytest.fixture(scope="module")
def persons(city: CityFiles) -> pa.Table:
    return pq.read_table(city.persons)


@pytest.fixture(scope="module")
def settlements(city: CityFiles) -> pa.Table:
    return pq.read_table(city.settlements)


def _cents(table: pa.Table, column: str) -> npt.NDArray[np.int64]:
    values = table.column(column).to_numpy()
    cents: npt.NDArray[np.int64] = np.round(values * 100).astype(np.int64)
    # Amounts are whole cents: no value may carry a third decimal.
    assert np.allclose(values * 100, cents, atol=1e-6)
    return cents


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- 身份证号 ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("first17", "check"),
    [
        ("11010519491231002", "X"),  # GB 11643-1999 example
        ("44052418800101001", "4"),
        ("42010219900307001", "0"),
    ],
)
def test_certno_check_digit_known_vectors(first17: str, check: str) -> None:
    assert certno_check_digit(first17) == check
    assert is_valid_certno(first17 + check)


@pytest.mark.parametrize("bad", ["", "1101051949123100", "110105194912310021", "1101051949123100a"])
def test_certno_check_digit_rejects_malformed_input(bad: str) -> None:
    with pytest.raises(ValueError, match="17 ASCII digits"):
        certno_check_digit(bad)


def test_certno_validation_rejects_bad_date_and_wrong_check() -> None:
    assert not is_valid_certno("110105194913310027")  # month 13
    assert not is_valid_certno("110105194912310021")  # check should be X
    assert not is_valid_certno("11010519491231002x")  # lower-case x is not the check character


def test_vectorized_check_digits_match_scalar() -> None:
    rng = np.random.default_rng(0)
    first17 = rng.integers(10**16, 10**17, 500, dtype=np.int64)
    expected = [certno_check_digit(str(v)) for v in first17]
    got = ["0123456789X"[i] for i in check_digits(first17)]
    assert got == expected


# --- regions -------------------------------------------------------------------------------


def test_regions_are_real_hubei_units() -> None:
    assert PROVINCE_CODE == "420000"
    assert set(PREFECTURES) == {
        "420100", "420200", "420300", "420500", "420600", "420700", "420800", "420900",
        "421000", "421100", "421200", "421300", "422800", "429004", "429005", "429006", "429021",
    }  # fmt: skip
    wuhan = {c.code: c.name for c in PREFECTURES["420100"].counties}
    assert wuhan == {
        "420102": "江岸区", "420103": "江汉区", "420104": "硚口区", "420105": "汉阳区",
        "420106": "武昌区", "420107": "青山区", "420111": "洪山区", "420112": "东西湖区",
        "420113": "汉南区", "420114": "蔡甸区", "420115": "江夏区", "420116": "黄陂区",
        "420117": "新洲区",
    }  # fmt: skip
    for pref in PREFECTURES.values():
        assert len(pref.counties) >= (1 if pref.county_level else 3)
        assert all(c.code[:4] == pref.code[:4] for c in pref.counties)
        assert pref.hub_code in {c.code for c in pref.counties}
    assert max(PREFECTURES.values(), key=lambda p: p.weight).code == "420100"
    assert all(COUNTIES[c].prefecture_code in PREFECTURES for c in COUNTIES)


@pytest.mark.parametrize(
    ("addr", "county"),
    [
        ("湖北省武汉市江岸区解放大道1234号5栋201室", "420102"),
        ("湖北省武汉市江汉区江汉路1号", "420103"),
        ("湖北省恩施土家族苗族自治州恩施市舞阳大街8号", "422801"),
        ("湖北省恩施州利川市胜利路2号", "422802"),
        ("湖北省随州市随县城关镇高桥村3组5号", "421321"),
        ("湖北省仙桃市沙嘴街道1号", "429004"),
        ("湖北省神农架林区松柏镇", "429021"),
        ("武汉市洪山区珞喻路1037号", "420111"),
        ("东西湖区金银湖路1号", "420112"),
    ],
)
def test_county_code_for_address_places_known_addresses(addr: str, county: str) -> None:
    assert county_code_for_address(addr) == county


@pytest.mark.parametrize(
    "addr",
    [
        "",
        "北京市东城区东华门街道1号",
        "湖北省武汉市",
        "湖北省武汉市光谷大道1号",
        "随便写的地址",
        "湖北省",
    ],
)
def test_county_code_for_address_refuses_what_it_cannot_place(addr: str) -> None:
    assert county_code_for_address(addr) is None


def test_prefecture_code_for_address() -> None:
    assert prefecture_code_for_address("湖北省武汉市光谷大道1号") == "420100"
    assert prefecture_code_for_address("湖北省宜昌市夷陵区1号") == "420500"
    assert prefecture_code_for_address("湖北省潜江市园林路1号") == "429005"
    assert prefecture_code_for_address("上海市黄浦区") is None


def test_address_prefixes_are_unambiguous() -> None:
    prefixes = address_prefixes()
    texts = sorted(p for p, _ in prefixes)
    assert len(texts) == len(set(texts))
    for a, b in itertools.pairwise(texts):
        assert not b.startswith(a), (a, b)
    for prefix, code in prefixes:
        assert county_code_for_address(prefix + "幸福路1号") == code


# --- generated files -----------------------------------------------------------------------


def test_schema_is_exact(persons: pa.Table, settlements: pa.Table, city: CityFiles) -> None:
    assert dict(zip(persons.schema.names, persons.schema.types, strict=True)) == PERSON_TYPES
    assert persons.schema.names == list(PERSON_TYPES)
    assert settlements.schema.names == list(SETTLEMENT_TYPES)
    assert dict(zip(settlements.schema.names, settlements.schema.types, strict=True)) == (
        SETTLEMENT_TYPES
    )
    assert persons.num_rows == city.person_count == PERSONS
    assert settlements.num_rows == city.settlement_count
    nullable = {"insu_end_date"}
    for name in persons.schema.names:
        if name not in nullable:
            assert persons.column(name).null_count == 0, name
    for name in settlements.schema.names:
        assert settlements.column(name).null_count == 0, name


def test_same_seed_same_bytes_other_seed_other_data(tmp_path: Path, city: CityFiles) -> None:
    again = generate_city(tmp_path / "a", persons=PERSONS, seed=11, progress=False)
    assert _sha(again.persons) == _sha(city.persons)
    assert _sha(again.settlements) == _sha(city.settlements)
    assert pq.read_table(again.settlements).equals(pq.read_table(city.settlements))
    other = generate_city(tmp_path / "b", persons=PERSONS, seed=12, progress=False)
    assert _sha(other.persons) != _sha(city.persons)


def test_progress_bar_goes_to_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    generate_city(tmp_path, persons=50, seed=1, progress=True)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "50/50" in captured.err


def test_short_period_and_tiny_city(tmp_path: Path) -> None:
    files = generate_city(tmp_path, persons=300, years=(2024,), seed=3, progress=False)
    times = pq.read_table(files.settlements).column("setl_time").to_numpy()
    assert files.settlement_count > 0
    assert times.min() >= np.datetime64("2024-01-01")
    assert times.max() < np.datetime64("2025-01-01")
    with pytest.raises(ValueError, match="persons"):
        generate_city(tmp_path, persons=0, progress=False)


def test_person_identifiers(persons: pa.Table) -> None:
    rows = persons.to_pylist()
    psn_nos = [r["psn_no"] for r in rows]
    assert len(set(psn_nos)) == len(rows)
    assert all(re.fullmatch(r"42010000\d{12}", p) for p in psn_nos)
    certnos = [r["certno"] for r in rows]
    assert len(set(certnos)) == len(rows)
    mobile = re.compile(r"1(3\d|5[0-35-9]|7[35-8]|8\d|9[135-9])\d{8}")
    for r in rows:
        certno = r["certno"]
        assert is_valid_certno(certno), certno
        assert certno[:6] in COUNTIES
        assert certno[6:14] == r["brdy"].strftime("%Y%m%d")
        assert int(certno[14:17]) % 2 == (1 if r["gend"] == "1" else 0)
        assert r["gend"] in ("1", "2")
        assert mobile.fullmatch(r["tel"]), r["tel"]
        assert 2 <= len(r["psn_name"]) <= 4
        assert all("\u4e00" <= ch <= "\u9fff" for ch in r["psn_name"])
    assert len({r["psn_name"] for r in rows}) > 0.8 * len(rows)


def test_demography(persons: pa.Table) -> None:
    brdy = persons.column("brdy").to_numpy().astype("datetime64[D]")
    age = (np.datetime64("2025-12-31") - brdy).astype(np.int64) / 365.25
    assert age.min() >= 0
    assert age.max() < 100
    assert 0.25 < np.mean((age >= 30) & (age < 60)) < 0.6
    insutype = persons.column("insutype").to_numpy(zero_copy_only=False)
    assert set(insutype) == {"310", "390"}
    assert 0.45 < np.mean(insutype == "310") < 0.65
    # Children are 居民; 职工 are adults.
    assert not np.any((insutype == "310") & (age < 16))
    female = persons.column("gend").to_numpy(zero_copy_only=False) == "2"
    assert 0.44 < female.mean() < 0.54


def test_enrolment_dates(persons: pa.Table) -> None:
    start = persons.column("psn_insu_date").to_numpy().astype("datetime64[D]")
    brdy = persons.column("brdy").to_numpy().astype("datetime64[D]")
    end_col = persons.column("insu_end_date")
    ended = end_col.is_valid().to_numpy(zero_copy_only=False)
    end = end_col.fill_null(dt.date(2099, 1, 1)).to_numpy().astype("datetime64[D]")
    assert np.all(start >= brdy)
    assert np.mean(start < np.datetime64("2022-01-01")) > 0.8
    assert np.mean(start >= np.datetime64("2022-01-01")) > 0.02
    assert 0.01 < ended.mean() < 0.2
    assert np.all(end[ended] >= start[ended])
    assert np.all(end[ended] <= np.datetime64("2025-12-31"))


def test_addresses_map_back_to_counties(persons: pa.Table) -> None:
    prefixes = address_prefixes()
    moved = 0
    for r in persons.to_pylist():
        addr = r["addr"]
        assert addr.startswith("湖北省")
        county = county_code_for_address(addr)
        assert county is not None, addr
        assert COUNTIES[county].prefecture_code == r["insu_admdvs"]
        assert sum(addr.startswith(p) for p, _ in prefixes) == 1
        assert [c for p, c in prefixes if addr.startswith(p)] == [county]
        moved += county != r["certno"][:6]
    assert 0.03 * PERSONS < moved < 0.2 * PERSONS


def test_insured_prefectures_follow_population(persons: pa.Table) -> None:
    admdvs = persons.column("insu_admdvs").to_numpy(zero_copy_only=False)
    assert set(admdvs) <= set(PREFECTURES)
    values, counts = np.unique(admdvs, return_counts=True)
    assert values[np.argmax(counts)] == "420100"


def test_amounts_add_up_to_the_cent(settlements: pa.Table, persons: pa.Table) -> None:
    c = {name: _cents(settlements, name) for name in AMOUNTS}
    for name, cents in c.items():
        assert np.all(cents >= 0), name
    assert np.all(c["medfee_sumamt"] > 0)
    assert np.array_equal(
        c["medfee_sumamt"], c["inscp_scp_amt"] + c["fulamt_ownpay_amt"] + c["overlmt_selfpay"]
    )
    assert np.array_equal(
        c["psn_part_amt"], c["medfee_sumamt"] - c["hifp_pay"] - c["hifmi_pay"] - c["maf_pay"]
    )
    assert np.array_equal(c["psn_part_amt"], c["acct_pay"] + c["psn_cash_pay"])
    assert np.all(c["hifp_pay"] <= c["inscp_scp_amt"])
    assert np.all(c["hifp_pay"] + c["hifmi_pay"] + c["maf_pay"] <= c["inscp_scp_amt"])

    insutype = dict(zip(persons.column("psn_no").to_pylist(),
                        persons.column("insutype").to_pylist(), strict=True))
    resident = np.array([insutype[p] == "390" for p in settlements.column("psn_no").to_pylist()])
    assert not np.any(c["acct_pay"][resident] > 0)
    assert np.any(c["acct_pay"][~resident] > 0)

    med = settlements.column("med_type").to_numpy(zero_copy_only=False)
    assert np.all(c["hifmi_pay"][(med == "11") | (med == "41")] == 0)
    assert np.any(c["hifmi_pay"] > 0)
    maf_share = np.mean(c["maf_pay"] > 0)
    assert 0 < maf_share < 0.05
    # 统筹 pays most of an inpatient bill, little of a pharmacy purchase.
    inpatient = med == "21"
    assert c["hifp_pay"][inpatient].sum() > 0.5 * c["medfee_sumamt"][inpatient].sum()
    assert c["hifp_pay"][med == "41"].sum() < 0.2 * c["medfee_sumamt"][med == "41"].sum()


def test_settlements_lie_inside_enrolment_and_years(
    settlements: pa.Table, persons: pa.Table
) -> None:
    index = {p: i for i, p in enumerate(persons.column("psn_no").to_pylist())}
    rows = np.array([index[p] for p in settlements.column("psn_no").to_pylist()])
    day = settlements.column("setl_time").to_numpy().astype("datetime64[D]")
    start = persons.column("psn_insu_date").to_numpy().astype("datetime64[D]")[rows]
    end = (
        persons.column("insu_end_date").fill_null(dt.date(2025, 12, 31))
        .to_numpy().astype("datetime64[D]")[rows]
    )
    assert np.all(day >= start)
    assert np.all(day <= end)
    assert day.min() >= np.datetime64("2022-01-01")
    assert day.max() <= np.datetime64("2025-12-31")
    ids = settlements.column("setl_id").to_pylist()
    assert len(set(ids)) == len(ids)
    assert len(set(settlements.column("mdtrt_id").to_pylist())) == len(ids)


def test_settlement_codes(settlements: pa.Table) -> None:
    med = settlements.column("med_type").to_numpy(zero_copy_only=False)
    level = settlements.column("hosp_lv").to_numpy(zero_copy_only=False)
    code = settlements.column("fixmedins_code").to_numpy(zero_copy_only=False)
    assert set(med) == {"11", "14", "21", "41"}
    assert set(level) <= {"1", "2", "3", "9"}
    pharmacy = med == "41"
    assert np.all(level[pharmacy] == "9")
    assert all(c.startswith("P") for c in code[pharmacy])
    assert all(c.startswith("H") for c in code[~pharmacy])
    for c in set(code):
        assert re.fullmatch(r"[HP]\d{11}", c), c
        assert c[1:7] in COUNTIES
    # One institution, one level.
    pairs = set(zip(code, level, strict=True))
    assert len(pairs) == len(set(code))
    names = dict(DIAGNOSES)
    for dx, name in set(zip(settlements.column("dise_codg").to_pylist(),
                            settlements.column("dise_name").to_pylist(), strict=True)):
        assert names[dx] == name
        assert re.fullmatch(r"[A-Z]\d{2}(\.\d)?", dx), dx


def test_utilization_volume_and_age_effect(settlements: pa.Table, persons: pa.Table) -> None:
    per_person = settlements.num_rows / persons.num_rows
    assert 6 < per_person < 14
    psn = persons.column("psn_no").to_pylist()
    brdy = persons.column("brdy").to_numpy().astype("datetime64[D]")
    age = (np.datetime64("2022-01-01") - brdy).astype(np.int64) / 365.25
    counts = pc.value_counts(settlements.column("psn_no")).to_pylist()
    n = dict.fromkeys(psn, 0) | {d["values"]: d["counts"] for d in counts}
    visits = np.array([n[p] for p in psn])
    assert visits[age >= 70].mean() > 1.5 * visits[(age >= 20) & (age < 40)].mean()
    # Most people have few settlements; a few chronic patients have very many.
    assert np.median(visits) < per_person
    assert visits.max() > 10 * per_person


def test_inpatient_costs_are_heavy_tailed(settlements: pa.Table) -> None:
    med = settlements.column("med_type").to_numpy(zero_copy_only=False)
    total = settlements.column("medfee_sumamt").to_numpy()
    inpatient = total[med == "21"]
    outpatient = total[med == "11"]
    assert 5_000 < np.median(inpatient) < 25_000
    assert 50 < np.median(outpatient) < 400
    assert inpatient.max() > 10 * np.median(inpatient)
    assert np.percentile(inpatient, 99) > 4 * np.median(inpatient)


def test_sex_and_age_shape_outpatient_use(settlements: pa.Table, persons: pa.Table) -> None:
    brdy = persons.column("brdy").to_numpy().astype("datetime64[D]")
    age = (np.datetime64("2022-01-01") - brdy).astype(np.int64) / 365.25
    female = persons.column("gend").to_numpy(zero_copy_only=False) == "2"
    young = (age >= 20) & (age < 40)
    index = {p: i for i, p in enumerate(persons.column("psn_no").to_pylist())}
    outpatient = settlements.filter(pc.equal(settlements.column("med_type"), "11"))
    visits = np.bincount([index[p] for p in outpatient.column("psn_no").to_pylist()],
                         minlength=persons.num_rows)
    # ~280 people per group with overdispersed counts: only the direction is stable across seeds.
    assert visits[young & female].mean() > visits[young & ~female].mean()
