"""Checksum and plausibility checks shared by the recognizers and their tests.

Pure functions over digit strings, so they can be unit-tested without Presidio.
"""

from __future__ import annotations

import datetime as _dt

__all__ = [
    "ID_CARD_PROVINCES",
    "id_card_check_char",
    "is_valid_id_card",
    "luhn_check_digit",
    "luhn_valid",
]

# GB 11643-1999: weight of position i is 2**(17 - i) mod 11.
_ID_WEIGHTS = tuple(pow(2, 17 - i, 11) for i in range(17))
# ISO 7064 MOD 11-2: check character indexed by (weighted sum mod 11).
_ID_CHECK_CHARS = "10X98765432"

# GB/T 2260 province-level codes; the first two digits of every 身份证号 are one of these.
# Tighter than "first digit 1-8" and it costs nothing.
ID_CARD_PROVINCES = frozenset(
    {
        *range(11, 16),  # 北京 天津 河北 山西 内蒙古
        *range(21, 24),  # 辽宁 吉林 黑龙江
        *range(31, 38),  # 上海 江苏 浙江 安徽 福建 江西 山东
        *range(41, 47),  # 河南 湖北 湖南 广东 广西 海南
        *range(50, 55),  # 重庆 四川 贵州 云南 西藏
        *range(61, 66),  # 陕西 甘肃 青海 宁夏 新疆
        71,  # 台湾
        81,  # 香港
        82,  # 澳门
        83,  # 港澳台居民居住证
    }
)

_MIN_BIRTH_YEAR = 1900
_MAX_BIRTH_YEAR = 2100


def id_card_check_char(first17: str) -> str:
    """Return the MOD 11-2 check character for the first 17 digits of a 身份证号."""
    if len(first17) != 17 or not first17.isascii() or not first17.isdigit():
        raise ValueError("expected 17 ASCII digits")
    total = sum(int(d) * w for d, w in zip(first17, _ID_WEIGHTS, strict=True))
    return _ID_CHECK_CHARS[total % 11]


def is_valid_id_card(value: str) -> bool:
    """True for an 18-character 身份证号 with a valid region, birth date and check char."""
    if len(value) != 18 or not value.isascii():
        return False
    body, check = value[:17], value[17].upper()
    if not body.isdigit() or not (check.isdigit() or check == "X"):
        return False
    if int(body[:2]) not in ID_CARD_PROVINCES:
        return False
    year, month, day = int(body[6:10]), int(body[10:12]), int(body[12:14])
    if not _MIN_BIRTH_YEAR <= year <= _MAX_BIRTH_YEAR:
        return False
    try:
        _dt.date(year, month, day)
    except ValueError:
        return False
    return id_card_check_char(body) == check


def _luhn_sum(digits: str, *, double_first: bool) -> int:
    # Walk from the right; every second digit (starting per double_first) is doubled.
    total = 0
    double = double_first
    for ch in reversed(digits):
        d = ord(ch) - 48
        if double:
            d *= 2
            if d > 9:
                d -= 9
        total += d
        double = not double
    return total


def luhn_valid(digits: str) -> bool:
    """True when an ASCII digit string passes the Luhn (mod 10) check."""
    if not digits or not digits.isascii() or not digits.isdigit():
        return False
    return _luhn_sum(digits, double_first=False) % 10 == 0


def luhn_check_digit(payload: str) -> str:
    """Return the digit that makes ``payload + digit`` Luhn-valid."""
    if not payload or not payload.isascii() or not payload.isdigit():
        raise ValueError("expected ASCII digits")
    return str((10 - _luhn_sum(payload, double_first=True) % 10) % 10)
