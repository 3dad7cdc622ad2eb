"""Real 湖北省 行政区划 (GB/T 2260) used by the synthetic city and by address generalization.

Codes and names are the current county-level units of every prefecture-level unit of Hubei, plus
the four county-level units the province administers directly (仙桃, 潜江, 天门, 神农架), which
are their own 医保区划 and have no county below them. Weights are rough resident populations in
units of 10,000 (2020 census order of magnitude); they only steer where synthetic people live.

``address_prefixes`` / ``county_code_for_address`` are what ingest uses to turn a free-text
address into a county code, so every prefix here must place an address in exactly one county.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = [
    "COUNTIES",
    "PREFECTURES",
    "PROVINCE_CODE",
    "PROVINCE_NAME",
    "County",
    "Prefecture",
    "address_prefixes",
    "county_code_for_address",
    "prefecture_code_for_address",
]

PROVINCE_CODE = "420000"
PROVINCE_NAME = "湖北省"


class County(NamedTuple):
    code: str
    name: str
    prefecture_code: str
    weight: float


class Prefecture(NamedTuple):
    code: str
    name: str
    weight: float
    # Where most of the prefecture's 三级 hospitals are (the biggest urban district).
    hub_code: str
    # Other spellings seen in addresses (e.g. 恩施州); the canonical name is always accepted.
    aliases: tuple[str, ...]
    counties: tuple[County, ...]
    # True for 仙桃/潜江/天门/神农架: the unit is itself county-level, its only county is itself.
    county_level: bool


# (code, name, weight, hub, aliases, ((county code, county name, weight), ...))
_Raw = tuple[str, str, float, str, tuple[str, ...], tuple[tuple[str, str, float], ...]]
_RAW: tuple[_Raw, ...] = (
    ("420100", "武汉市", 1232, "420106", ("武汉",), (
        ("420102", "江岸区", 96), ("420103", "江汉区", 65), ("420104", "硚口区", 67),
        ("420105", "汉阳区", 84), ("420106", "武昌区", 129), ("420107", "青山区", 53),
        ("420111", "洪山区", 165), ("420112", "东西湖区", 85), ("420113", "汉南区", 46),
        ("420114", "蔡甸区", 55), ("420115", "江夏区", 97), ("420116", "黄陂区", 115),
        ("420117", "新洲区", 86),
    )),
    ("420200", "黄石市", 247, "420202", ("黄石",), (
        ("420202", "黄石港区", 25), ("420203", "西塞山区", 25), ("420204", "下陆区", 18),
        ("420205", "铁山区", 6), ("420222", "阳新县", 78), ("420281", "大冶市", 91),
    )),
    ("420300", "十堰市", 321, "420302", ("十堰",), (
        ("420302", "茅箭区", 45), ("420303", "张湾区", 42), ("420304", "郧阳区", 56),
        ("420322", "郧西县", 41), ("420323", "竹山县", 38), ("420324", "竹溪县", 30),
        ("420325", "房县", 38), ("420381", "丹江口市", 40),
    )),
    ("420500", "宜昌市", 401, "420502", ("宜昌",), (
        ("420502", "西陵区", 55), ("420503", "伍家岗区", 25), ("420504", "点军区", 11),
        ("420505", "猇亭区", 7), ("420506", "夷陵区", 52), ("420525", "远安县", 17),
        ("420526", "兴山县", 15), ("420527", "秭归县", 32), ("420528", "长阳土家族自治县", 33),
        ("420529", "五峰土家族自治县", 16), ("420581", "宜都市", 37), ("420582", "当阳市", 42),
        ("420583", "枝江市", 43),
    )),
    ("420600", "襄阳市", 526, "420606", ("襄阳",), (
        ("420602", "襄城区", 52), ("420606", "樊城区", 100), ("420607", "襄州区", 83),
        ("420624", "南漳县", 44), ("420625", "谷城县", 50), ("420626", "保康县", 23),
        ("420682", "老河口市", 44), ("420683", "枣阳市", 88), ("420684", "宜城市", 46),
    )),
    ("420700", "鄂州市", 108, "420704", ("鄂州",), (
        ("420702", "梁子湖区", 13), ("420703", "华容区", 22), ("420704", "鄂城区", 73),
    )),
    ("420800", "荆门市", 260, "420802", ("荆门",), (
        ("420802", "东宝区", 41), ("420804", "掇刀区", 30), ("420822", "沙洋县", 46),
        ("420881", "钟祥市", 85), ("420882", "京山市", 53),
    )),
    ("420900", "孝感市", 427, "420902", ("孝感",), (
        ("420902", "孝南区", 84), ("420921", "孝昌县", 48), ("420922", "大悟县", 48),
        ("420923", "云梦县", 45), ("420981", "应城市", 52), ("420982", "安陆市", 48),
        ("420984", "汉川市", 88),
    )),
    ("421000", "荆州市", 523, "421002", ("荆州",), (
        ("421002", "沙市区", 62), ("421003", "荆州区", 55), ("421022", "公安县", 73),
        ("421024", "江陵县", 26), ("421081", "石首市", 48), ("421083", "洪湖市", 66),
        ("421087", "松滋市", 59), ("421088", "监利市", 87),
    )),
    ("421100", "黄冈市", 588, "421102", ("黄冈",), (
        ("421102", "黄州区", 47), ("421121", "团风县", 29), ("421122", "红安县", 53),
        ("421123", "罗田县", 50), ("421124", "英山县", 32), ("421125", "浠水县", 77),
        ("421126", "蕲春县", 75), ("421127", "黄梅县", 80), ("421181", "麻城市", 88),
        ("421182", "武穴市", 58),
    )),
    ("421200", "咸宁市", 265, "421202", ("咸宁",), (
        ("421202", "咸安区", 60), ("421221", "嘉鱼县", 31), ("421222", "通城县", 39),
        ("421223", "崇阳县", 40), ("421224", "通山县", 35), ("421281", "赤壁市", 48),
    )),
    ("421300", "随州市", 205, "421303", ("随州",), (
        ("421303", "曾都区", 65), ("421321", "随县", 56), ("421381", "广水市", 74),
    )),
    ("422800", "恩施土家族苗族自治州", 346, "422801", ("恩施州",), (
        ("422801", "恩施市", 78), ("422802", "利川市", 70), ("422822", "建始县", 41),
        ("422823", "巴东县", 42), ("422825", "宣恩县", 30), ("422826", "咸丰县", 30),
        ("422827", "来凤县", 25), ("422828", "鹤峰县", 19),
    )),
    ("429004", "仙桃市", 113, "429004", ("仙桃",), ()),
    ("429005", "潜江市", 89, "429005", ("潜江",), ()),
    ("429006", "天门市", 116, "429006", ("天门",), ()),
    ("429021", "神农架林区", 8, "429021", ("神农架",), ()),
)


def _build() -> tuple[dict[str, Prefecture], dict[str, County]]:
    prefectures: dict[str, Prefecture] = {}
    counties: dict[str, County] = {}
    for code, name, weight, hub, aliases, raw_counties in _RAW:
        if raw_counties:
            members = tuple(County(c, n, code, w) for c, n, w in raw_counties)
        else:
            members = (County(code, name, code, weight),)
        prefectures[code] = Prefecture(
            code, name, weight, hub, aliases, members, county_level=not raw_counties
        )
        for county in members:
            counties[county.code] = county
    return prefectures, counties


# Both keyed by 6-digit code, in code order.
PREFECTURES, COUNTIES = _build()


def address_prefixes() -> list[tuple[str, str]]:
    """(prefix, county code) pairs: an address starting with ``prefix`` lies in that county.

    Prefixes come with and without the leading 湖北省 and with each prefecture alias. No prefix
    is a prefix of another, so an address matches at most one of them (ingest relies on this).
    """
    codes: dict[str, str] = {}
    for pref in PREFECTURES.values():
        for pref_name in (pref.name, *pref.aliases):
            for county in pref.counties:
                tail = "" if pref.county_level else county.name
                for head in (PROVINCE_NAME, ""):
                    codes[head + pref_name + tail] = county.code
    # 仙桃 vs 仙桃市: keep only the shorter spelling, which already covers the longer one.
    ordered = sorted(codes)
    kept: list[tuple[str, str]] = []
    for prefix in ordered:
        if kept and prefix.startswith(kept[-1][0]):
            if codes[prefix] != kept[-1][1]:
                raise ValueError(f"address prefix {prefix} is ambiguous")
            continue
        kept.append((prefix, codes[prefix]))
    return kept


def _strip_province(addr: str) -> str:
    text = addr.strip()
    for head in (PROVINCE_NAME, "湖北"):
        if text.startswith(head):
            return text[len(head):]
    return text


def _match_prefecture(text: str) -> tuple[Prefecture, str] | None:
    """The prefecture ``text`` starts with and the rest of the text, longest name first."""
    best: tuple[Prefecture, str] | None = None
    best_len = 0
    for pref in PREFECTURES.values():
        for name in (pref.name, *pref.aliases):
            if len(name) > best_len and text.startswith(name):
                best, best_len = (pref, text[len(name):]), len(name)
    return best


def county_code_for_address(addr: str) -> str | None:
    """6-digit county code of an address such as "湖北省武汉市江岸区解放大道1号", or None.

    Reads province (optional), prefecture and county in that order. If the prefecture is missing
    the county name alone is accepted when exactly one Hubei county has that name. Text that
    cannot be placed in a single county of Hubei (other provinces, a prefecture without county,
    garbage) gives None.
    """
    text = _strip_province(addr)
    found = _match_prefecture(text)
    if found is not None:
        pref, rest = found
        if pref.county_level:
            return pref.code
        for county in pref.counties:
            if rest.startswith(county.name):
                return county.code
        return None
    hits = {c.code for c in COUNTIES.values() if text.startswith(c.name)}
    return hits.pop() if len(hits) == 1 else None


def prefecture_code_for_address(addr: str) -> str | None:
    """6-digit prefecture-level code (医保区划) of an address, or None when not in Hubei."""
    county = county_code_for_address(addr)
    if county is not None:
        return COUNTIES[county].prefecture_code
    found = _match_prefecture(_strip_province(addr))
    return found[0].code if found is not None else None
