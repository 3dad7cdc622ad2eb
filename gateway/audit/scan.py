"""Reading entries back for alerts and reports: timestamps, time bounds and a log scan.

Pure helpers shared by :mod:`gateway.audit.alerts` and :mod:`gateway.audit.reports`; nothing
here reads the wall clock.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, date, datetime, time, tzinfo
from typing import Final, TypeAlias

import orjson

from gateway.audit.entry import AuditEntry, utc_timestamp
from gateway.audit.log import AuditLog

__all__ = ["IndexedEntry", "iter_entries", "parse_ts", "ts_bound"]

#: What alerts and reports consume: an entry and its 0-based index in the log.
IndexedEntry: TypeAlias = tuple[int, AuditEntry]

_DATE_RE: Final = re.compile(r"\d{4}-\d{2}-\d{2}")


def parse_ts(ts: str) -> float:
    """Seconds since the epoch of an entry timestamp (``2026-11-22T07:29:05.123456Z``).

    >>> parse_ts("1970-01-01T00:01:00.500000Z")
    60.5
    """
    return datetime.fromisoformat(ts).timestamp()


def ts_bound(name: str, value: str | datetime | None, zone: tzinfo = UTC) -> str | None:
    """A ``since``/``until`` bound in entry-timestamp form, so it compares as a string.

    ``value`` is an aware datetime, an RFC 3339 timestamp with a zone, or a ``YYYY-MM-DD`` date,
    which means its midnight in ``zone`` (UTC unless given). ``ValueError`` otherwise.

    >>> ts_bound("since", "2026-01-02")
    '2026-01-02T00:00:00.000000Z'
    """
    if value is None:
        return None
    if isinstance(value, str):
        if _DATE_RE.fullmatch(value):
            day = date.fromisoformat(value)
            value = datetime.combine(day, time(0), tzinfo=zone)
        else:
            try:
                value = datetime.fromisoformat(value)
            except ValueError:
                raise ValueError(f"{name} must be YYYY-MM-DD or an RFC 3339 timestamp") from None
    if value.tzinfo is None:
        raise ValueError(f"{name} must carry a time zone (e.g. Z or +08:00)")
    return utc_timestamp(value)


def iter_entries(
    log: AuditLog,
    *,
    start: int = 0,
    since: str | datetime | None = None,
    until: str | datetime | None = None,
) -> Iterator[IndexedEntry]:
    """``(index, entry)`` for every stored entry from index ``start``, in log order, from one
    snapshot; with ``since`` (inclusive) / ``until`` (exclusive) only those in that time range
    (dates are midnight UTC here; rows outside the range are skipped before validation)."""
    lo = ts_bound("since", since)
    hi = ts_bound("until", until)
    for row in log.iter_rows(start):
        obj = orjson.loads(row.entry_json)
        ts = obj.get("ts")
        if isinstance(ts, str) and ((lo is not None and ts < lo) or (hi is not None and ts >= hi)):
            continue
        yield row.index, AuditEntry.model_validate(obj)
