"""Reading entries back for alerts and reports: timestamps, time bounds and a log scan.

Pure helpers shared by :mod:`gateway.audit.alerts` and :mod:`gateway.audit.reports`; nothing
here reads the wall clock.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import TypeAlias

import orjson

from gateway.audit.entry import AuditEntry, ts_bound
from gateway.audit.log import AuditLog

__all__ = ["IndexedEntry", "iter_entries", "parse_ts"]

#: What alerts and reports consume: an entry and its 0-based index in the log.
IndexedEntry: TypeAlias = tuple[int, AuditEntry]



def parse_ts(ts: str) -> float:
    """Seconds since the epoch of an entry timestamp (``2026-11-22T07:29:05.123456Z``).

    >>> parse_ts("1970-01-01T00:01:00.500000Z")
    60.5
    """
    return datetime.fromisoformat(ts).timestamp()


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
        if "personal" in obj:  # schema 3 leaf: the personal part is stored beside it
            del obj["personal"]
            if row.personal_json is not None:
                obj.update(orjson.loads(row.personal_json))
        yield row.index, AuditEntry.model_validate(obj)
