"""Chinese PII recognizers, the offline analyzer, the column scanner and scrubbing."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import astuple
from typing import Any

import duckdb
import pyarrow as pa
import pytest
from faker import Faker

from gateway.ingest.pii import (
    CN_BANK_CARD,
    CN_ID_CARD,
    CN_MOBILE,
    PERSON,
    PiiFinding,
    build_analyzer,
    lexicon,
    scan_arrow_table,
    scrub_text,
)
from gateway.ingest.pii.checksums import is_valid_id_card, luhn_valid
from gateway.ingest.pii.recognizers import ChineseNameRecognizer
from gateway.ingest.pii.scanner import digit_prefilter_regex, name_prefilter_regex

THRESHOLD = 0.6

# Diagnosis names of the kind found in 结算 extracts; several start with a surname
# character (高, 支, 白, 阿, 常, 冠...) and none may ever be taken for a person.
DIAGNOSES = [
    "高血压", "2型糖尿病", "慢性肾脏病5期", "急性阑尾炎", "肺恶性肿瘤",
    "冠状动脉粥样硬化性心脏病", "脑梗死", "支气管哮喘", "乳腺恶性肿瘤", "正常分娩",
    "高血压3级", "高脂血症", "高尿酸血症", "1型糖尿病", "糖尿病肾病", "慢性阻塞性肺疾病",
    "社区获得性肺炎", "急性上呼吸道感染", "急性支气管炎", "支气管扩张", "肺结核",
    "慢性胃炎", "胃恶性肿瘤", "结肠恶性肿瘤", "直肠恶性肿瘤", "肝恶性肿瘤", "肝硬化",
    "胆囊结石", "急性胰腺炎", "慢性乙型病毒性肝炎", "脑出血", "短暂性脑缺血发作",
    "帕金森病", "阿尔茨海默病", "癫痫", "偏头痛", "心房颤动", "心力衰竭",
    "急性心肌梗死", "不稳定型心绞痛", "白内障", "青光眼", "年龄相关性黄斑变性",
    "类风湿关节炎", "骨关节炎", "腰椎间盘突出症", "股骨颈骨折", "骨质疏松",
    "甲状腺功能亢进症", "甲状腺恶性肿瘤", "缺铁性贫血", "白血病", "淋巴瘤",
    "前列腺增生", "尿路感染", "肾病综合征", "子宫平滑肌瘤", "宫颈恶性肿瘤",
    "剖宫产", "抑郁症", "精神分裂症", "银屑病", "带状疱疹", "艾滋病", "痛风",
]  # fmt: skip
BRIEF_DIAGNOSES = DIAGNOSES[:10]

_ID_WEIGHTS = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2]


# Independent re-implementations, so the tests do not trust the module's own checksums.
def id_check(first17: str) -> str:
    return "10X98765432"[sum(int(d) * w for d, w in zip(first17, _ID_WEIGHTS, strict=True)) % 11]


def make_id(region: str = "420102", birth: str = "19900101", seq: str = "123") -> str:
    body = region + birth + seq
    return body + id_check(body)


def luhn(number: str) -> bool:
    digits = [int(d) for d in number][::-1]
    total = sum(digits[0::2]) + sum(sum(divmod(2 * d, 10)) for d in digits[1::2])
    return total % 10 == 0


def make_card(prefix: str, length: int, rng: random.Random) -> str:
    body = prefix + "".join(str(rng.randrange(10)) for _ in range(length - len(prefix) - 1))
    return next(body + d for d in "0123456789" if luhn(body + d))


def bad_luhn(number: str) -> str:
    last = (int(number[-1]) + 1) % 10
    return number[:-1] + str(last)


@pytest.fixture(scope="module")
def analyzer() -> Any:
    return build_analyzer()


def found(analyzer: Any, text: str, entity: str) -> list[str]:
    results = analyzer.analyze(text=text, language="zh", score_threshold=THRESHOLD)
    return [text[r.start : r.end] for r in results if r.entity_type == entity]


# --- checksum helpers ------------------------------------------------------------------


def test_checksums_agree_with_independent_implementations() -> None:
    rng = random.Random(7)
    for _ in range(500):
        number = "".join(str(rng.randrange(10)) for _ in range(rng.randrange(12, 20)))
        assert luhn_valid(number) == luhn(number)
    assert is_valid_id_card("11010519491231002X")  # the GB 11643 worked example
    assert is_valid_id_card(make_id())


def test_lexicon_is_consistent() -> None:
    # A name character that is also a "never in a given name" character would make the
    # recognizer contradict itself; a known given name must be reachable.
    assert not lexicon.NAME_CHARS & lexicon.NOT_NAME_GIVEN_CHARS
    assert all(not set(g) & lexicon.NOT_NAME_GIVEN_CHARS for g in lexicon.KNOWN_GIVEN_NAMES)
    assert {"王", "李", "张", "高", "支", "冠"} <= lexicon.SINGLE_SURNAMES
    assert {"欧阳", "司马", "诸葛", "上官"} <= lexicon.COMPOUND_SURNAMES


# --- 身份证号 ---------------------------------------------------------------------------


def test_id_card_embedded_in_chinese_text(analyzer: Any) -> None:
    number = make_id()
    assert found(analyzer, f"患者身份证{number}已核验", CN_ID_CARD) == [number]
    assert found(analyzer, number, CN_ID_CARD) == [number]
    assert found(analyzer, f"certno:{number};", CN_ID_CARD) == [number]


def test_id_card_with_lowercase_x(analyzer: Any) -> None:
    number = next(
        make_id(seq=f"{s:03d}") for s in range(1000) if make_id(seq=f"{s:03d}").endswith("X")
    )
    lower = number[:-1] + "x"
    assert found(analyzer, f"证件号{lower}。", CN_ID_CARD) == [lower]
    assert found(analyzer, "11010519491231002x", CN_ID_CARD) == ["11010519491231002x"]


def test_id_card_bad_checksum_not_found(analyzer: Any) -> None:
    number = make_id()
    wrong = number[:-1] + ("0" if number[-1] != "0" else "1")
    assert found(analyzer, f"身份证{wrong}", CN_ID_CARD) == []


def test_id_card_bad_date_or_region_not_found(analyzer: Any) -> None:
    # Checksums are valid, so only the date / region rules can reject them.
    for number in (
        make_id(birth="19901301"),  # month 13
        make_id(birth="19900230"),  # 30 February
        make_id(birth="18500101"),  # before 1900
        make_id(region="990102"),  # no such province
        make_id(region="020102"),
    ):
        assert id_check(number[:17]) == number[17]
        assert found(analyzer, f"号码{number}", CN_ID_CARD) == []
    rng = random.Random(3)
    for _ in range(200):  # random 18-digit runs: almost never a plausible date + checksum
        number = "".join(str(rng.randrange(10)) for _ in range(18))
        if not is_valid_id_card(number):
            assert found(analyzer, number, CN_ID_CARD) == []


def test_id_card_inside_longer_digit_run_not_found(analyzer: Any) -> None:
    number = make_id()
    assert found(analyzer, f"1{number}", CN_ID_CARD) == []
    assert found(analyzer, f"{number}5", CN_ID_CARD) == []
    assert found(analyzer, number[:15], CN_ID_CARD) == []  # legacy 15-digit: ignored


# --- mobile ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("13812345678", "13812345678"),
        ("联系电话：13812345678。", "13812345678"),
        ("手机138 1234 5678", "138 1234 5678"),
        ("tel 138-1234-5678", "138-1234-5678"),
        ("+86 13812345678", "+86 13812345678"),
        ("8613812345678", "8613812345678"),
        ("电话19912345678转人工", "19912345678"),
        ("17012345678", "17012345678"),
    ],
)
def test_mobile_found(analyzer: Any, text: str, expected: str) -> None:
    assert found(analyzer, text, CN_MOBILE) == [expected]


@pytest.mark.parametrize(
    "text",
    [
        "138123456789",  # 12-digit run
        "2138123456789",
        "1381234567",  # 10 digits
        "12812345678",  # no 12x mobiles
        "15412345678",  # 154 unassigned
        "H13010200001",  # 定点医药机构 code, letter-prefixed
        "13812345678A",
        "138-1234 5678",  # mixed separators
        "结算金额 1381.23 元",
    ],
)
def test_mobile_not_found(analyzer: Any, text: str) -> None:
    assert found(analyzer, text, CN_MOBILE) == []


# --- bank cards ------------------------------------------------------------------------


def test_bank_card_found(analyzer: Any) -> None:
    rng = random.Random(11)
    assert found(analyzer, "4111111111111111", CN_BANK_CARD) == ["4111111111111111"]
    assert found(analyzer, "卡号5555555555554444已绑定", CN_BANK_CARD) == ["5555555555554444"]
    for prefix, length in (("62", 19), ("62", 16), ("4", 16), ("53", 16), ("6013", 19)):
        card = make_card(prefix, length, rng)
        assert luhn(card)
        assert found(analyzer, f"银行卡{card}", CN_BANK_CARD) == [card]
    card = make_card("6222", 19, rng)
    grouped = " ".join([card[0:4], card[4:8], card[8:12], card[12:16], card[16:]])
    assert found(analyzer, f"账号 {grouped}", CN_BANK_CARD) == [grouped]


def test_bank_card_rejected(analyzer: Any) -> None:
    rng = random.Random(12)
    card = make_card("62", 19, rng)
    assert found(analyzer, bad_luhn(card), CN_BANK_CARD) == []
    assert found(analyzer, "4111111111111112", CN_BANK_CARD) == []
    assert found(analyzer, f"9{card}", CN_BANK_CARD) == []  # inside a longer run
    assert found(analyzer, f"{card}1", CN_BANK_CARD) == []
    assert found(analyzer, make_card("9", 16, rng), CN_BANK_CARD) == []  # no such issuer


def test_id_card_is_not_a_bank_card(analyzer: Any) -> None:
    # Both start with 4 (a Visa prefix); the second even passes Luhn.
    numeric = [n for s in range(1000) if (n := make_id(seq=f"{s:03d}")).isdigit()]
    failing = next(n for n in numeric if not luhn(n))
    passing = next(n for n in numeric if luhn(n))
    for number in (failing, passing):
        results = analyzer.analyze(text=number, language="zh", score_threshold=THRESHOLD)
        assert [r.entity_type for r in results] == [CN_ID_CARD]


# --- names -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("患者张伟于2023年3月入院", "张伟"),
        ("王秀英", "王秀英"),
        ("欧阳娜娜", "欧阳娜娜"),
        ("李明", "李明"),
        ("联系人：李小明，电话见附件", "李小明"),
        ("参保人 赵建国 已完成身份校验", "赵建国"),
        ("请联系诸葛亮先生", "诸葛亮"),
        ("高明", "高明"),  # a word in running text, a name alone in a cell
        ("张伟来诊，由王芳陪同", "张伟,王芳"),
        ("姓名：王芳", "王芳"),
        ("患者为刘洋", "刘洋"),
        ("患者高超因脑梗死入院", "高超"),  # 高超 is also a word; context decides
    ],
)
def test_names_found(analyzer: Any, text: str, expected: str) -> None:
    assert sorted(found(analyzer, text, PERSON)) == sorted(expected.split(","))


def test_known_name_scores_high() -> None:
    rec = ChineseNameRecognizer()
    (cand,) = rec.find_candidates("王秀英")
    assert cand.score >= 0.85
    (cand,) = rec.find_candidates("患者张伟于")
    assert cand.score >= 0.85


def test_faker_names_found_in_cells_and_sentences(analyzer: Any) -> None:
    fake = Faker("zh_CN")
    fake.seed_instance(5)
    for _ in range(300):
        name = fake.name()
        assert found(analyzer, name, PERSON) == [name]
        assert name in found(analyzer, f"患者{name}于今日出院", PERSON)


@pytest.mark.parametrize("diagnosis", DIAGNOSES)
def test_diagnoses_never_names(analyzer: Any, diagnosis: str) -> None:
    for text in (
        diagnosis,
        f"诊断：{diagnosis}",
        f"患者{diagnosis}病史10年",
        f"病人因{diagnosis}入院",
        f"入院诊断{diagnosis}，出院诊断{diagnosis}",
    ):
        assert found(analyzer, text, PERSON) == [], text


def test_common_words_not_names_in_running_text(analyzer: Any) -> None:
    text = "血压高峰时段在早晨，病情平静，原因已查明，转沈阳市医院，夜间安静入睡"
    assert found(analyzer, text, PERSON) == []


# --- analyzer wiring -------------------------------------------------------------------


def test_analyzer_has_only_chinese_recognizers(analyzer: Any) -> None:
    assert set(analyzer.get_supported_entities("zh")) == {
        CN_ID_CARD,
        CN_MOBILE,
        CN_BANK_CARD,
        PERSON,
    }
    assert len(analyzer.registry.recognizers) == 4
    assert build_analyzer([CN_MOBILE]).get_supported_entities("zh") == [CN_MOBILE]
    with pytest.raises(ValueError, match="no recognizer"):
        build_analyzer(["US_SSN"])


def test_scrub_text(analyzer: Any) -> None:
    number = make_id()
    text = f"患者张伟（身份证{number}）因高血压入院，联系人王秀英，电话138-1234-5678。"
    assert scrub_text(text, analyzer) == (
        "患者<PERSON>（身份证<CN_ID_CARD>）因高血压入院，联系人<PERSON>，电话<CN_MOBILE>。"
    )
    assert scrub_text("2型糖尿病，支气管哮喘", analyzer) == "2型糖尿病，支气管哮喘"


# --- DuckDB prefilter soundness ----------------------------------------------------------


def prefilter_passes(texts: list[str]) -> list[bool]:
    con = duckdb.connect()
    con.register("texts", pa.table({"v": texts}))
    sql = "SELECT regexp_matches(v, $d) OR regexp_matches(v, $n) FROM texts"
    params = {"d": digit_prefilter_regex(), "n": name_prefilter_regex()}
    return [bool(row[0]) for row in con.execute(sql, params).fetchall()]


def test_prefilters_pass_every_detectable_value(analyzer: Any) -> None:
    # The DuckDB regexes must be a superset of the recognizers, or PII slips through.
    fake = Faker("zh_CN")
    fake.seed_instance(9)
    rng = random.Random(9)
    noise = "0123456789 -+xXA号王伟：,"
    tokens: list[str] = []
    for _ in range(600):
        mobile = f"1{rng.choice('3456789')}{rng.randrange(10**9):09d}"
        card = make_card(rng.choice(["62", "4", "55"]), rng.randrange(16, 20), rng)
        tokens += [
            make_id(seq=f"{rng.randrange(1000):03d}").lower(),
            mobile,
            f"+86 {mobile}",
            f"{mobile[:3]}-{mobile[3:7]}-{mobile[7:]}",
            card,
            " ".join(card[i : i + 4] for i in range(0, len(card), 4)),
            fake.name(),
        ]
    texts = [
        "".join(rng.choice(noise) for _ in range(rng.randrange(3)))
        + token
        + "".join(rng.choice(noise) for _ in range(rng.randrange(3)))
        for token in tokens
    ]
    texts += ["欧阳娜娜", "南宫问天", "诸葛亮", *DIAGNOSES]
    detected = 0
    for text, passes in zip(texts, prefilter_passes(texts), strict=True):
        if analyzer.analyze(text=text, language="zh", score_threshold=0.01):
            detected += 1
            assert passes, text
    assert detected > len(tokens) // 4  # the fuzz really exercises the recognizers
    # Shapes no recognizer accepts are dropped in DuckDB already.
    assert (
        prefilter_passes(["高血压", "H13010200001", "S20230000000", "1381234567890"]) == [False] * 4
    )


# --- scanner ---------------------------------------------------------------------------


def clean_codes(n: int) -> list[str]:
    # 10-digit-or-shorter codes: nothing the recognizers could report.
    return [f"H{i % 97:02d}{i:08d}" if i % 3 else f"I{i % 1000:03d}.x{i % 7}" for i in range(n)]


@pytest.fixture
def counting(analyzer: Any) -> Iterator[list[str]]:
    seen: list[str] = []
    original = analyzer.analyze

    def wrapper(text: str, language: str, **kwargs: Any) -> Any:
        seen.append(text)
        return original(text=text, language=language, **kwargs)

    analyzer.analyze = wrapper
    try:
        yield seen
    finally:
        del analyzer.analyze


def test_scanner_finds_needle_in_100k_rows(analyzer: Any) -> None:
    n = 100_000
    notes = [DIAGNOSES[i % len(DIAGNOSES)] for i in range(n)]
    number = make_id()
    notes[73_421] = "复诊，联系电话13812345678"
    notes[88_000] = "复诊，联系电话13812345678"  # same value later: one finding, first row
    codes = clean_codes(n)
    codes[12_345] = f"证件{number}"
    table = pa.table({"note": notes, "code": codes, "other": list(range(n))})
    findings = scan_arrow_table(table, ["note", "code"], analyzer=analyzer)
    assert findings == [
        PiiFinding("code", 12_345, CN_ID_CARD, 1.0),
        PiiFinding("note", 73_421, CN_MOBILE, 0.75),
    ]
    for finding in findings:  # never the value, nor any part of it
        assert all("13812345678" not in str(v) and number not in str(v) for v in astuple(finding))


def test_scanner_high_cardinality_column(analyzer: Any) -> None:
    n = 50_000
    codes = clean_codes(n)  # every value distinct: the filter-rows-first plan
    codes[49_999] = "王秀英"
    codes[7] = "卡号4111111111111111"
    table = pa.table({"c": codes})
    assert scan_arrow_table(table, ["c"], analyzer=analyzer) == [
        PiiFinding("c", 7, CN_BANK_CARD, 1.0),
        PiiFinding("c", 49_999, PERSON, 0.85),
    ]


def test_scanner_analyzes_each_distinct_value_once(analyzer: Any, counting: list[str]) -> None:
    values = ["联系人王秀英", "13812345678", "高血压", "支气管哮喘", None, ""] * 5_000
    table = pa.table({"a": values, "b": list(reversed(values))})
    findings = scan_arrow_table(table, ["a", "b"], analyzer=analyzer)
    # Only prefilter survivors reach Presidio, each distinct value once per column.
    assert sorted(counting) == sorted(["联系人王秀英", "13812345678", "支气管哮喘"] * 2)
    assert [(f.column, f.row, f.entity_type) for f in findings] == [
        ("a", 0, PERSON),
        ("a", 1, CN_MOBILE),
        ("b", 4, CN_MOBILE),
        ("b", 5, PERSON),
    ]
    counting.clear()
    scan_arrow_table(table, ["a"], analyzer=analyzer, prefilter=False)
    assert sorted(counting) == sorted(["联系人王秀英", "13812345678", "高血压", "支气管哮喘"])


def test_scanner_clean_diagnosis_columns(analyzer: Any) -> None:
    rng = random.Random(1)
    n = 200_000
    table = pa.table(
        {
            "dise_name": [rng.choice(DIAGNOSES) for _ in range(n)],
            "brief": pa.chunked_array(
                [[BRIEF_DIAGNOSES[i % 10] for i in range(n // 2)]] * 2, type=pa.string()
            ),
        }
    )
    assert scan_arrow_table(table, ["dise_name", "brief"], analyzer=analyzer) == []


def test_scanner_non_string_columns(analyzer: Any) -> None:
    table = pa.table(
        {
            "tel": pa.array([10_000_000_000, 13_812_345_678, None], type=pa.int64()),
            "big": pa.array(["x", "y", "z"]).dictionary_encode(),
            "amt": pa.array([1.5, 2.0, 3.25]),
        }
    )
    assert scan_arrow_table(table, ["amt", "big", "tel"], analyzer=analyzer) == [
        PiiFinding("tel", 1, CN_MOBILE, 0.75)
    ]
    with pytest.raises(KeyError):
        scan_arrow_table(table, ["missing"], analyzer=analyzer)
