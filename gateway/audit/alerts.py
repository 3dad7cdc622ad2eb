"""Alerts (预警): pure rules over the audit log, evaluated entry by entry in log order.

An :class:`AlertEngine` is fed ``(index, entry)`` pairs in log order (:meth:`AlertEngine.observe`)
and returns the :class:`Alert` each entry raises. Every rule keeps bounded state (sliding windows
per actor or org, capped maps evicting the least recently seen key), all time comes from the
entries' ``ts`` (never the wall clock), so replaying a log gives the same alerts. Each alert names
the entries behind it (``first_index``, ``last_index``, ``entry_indexes``).

Rules (``docs/alerts.md`` has the parameters and what each one misses):

``refusal_burst``
    >= N denies from one actor within W seconds.
``volume_over_baseline``
    an insurer org's query count in the current window far above the median of its own
    previous windows, and above a minimum absolute count.
``off_hours_access``
    allowed data access (``query.*``, ``persons.*``) outside office hours.
``differencing_pattern``
    many allowed aggregate queries from one actor with the same dataset, dimensions and
    measures whose filters differ by one value, or by one added/removed filter.
``consent_new_key``
    a consent used with a proof-of-possession key (``request["dpop_jkt"]``) other than the first
    one seen with it.
"""

from __future__ import annotations

import functools
import statistics
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, time
from typing import Any, Final, Generic, Literal, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_serializer,
    field_validator,
    model_validator,
)

from gateway.audit.entry import AuditEntry
from gateway.audit.scan import parse_ts

__all__ = [
    "CONSENT_NEW_KEY",
    "DIFFERENCING",
    "OFF_HOURS",
    "REFUSAL_BURST",
    "RULES",
    "VOLUME",
    "Alert",
    "AlertCollector",
    "AlertConfig",
    "AlertEngine",
    "differs_by_one_filter",
]

REFUSAL_BURST: Final = "refusal_burst"
VOLUME: Final = "volume_over_baseline"
OFF_HOURS: Final = "off_hours_access"
DIFFERENCING: Final = "differencing_pattern"
CONSENT_NEW_KEY: Final = "consent_new_key"
RULES: Final = (REFUSAL_BURST, VOLUME, OFF_HOURS, DIFFERENCING, CONSENT_NEW_KEY)

Severity = Literal["low", "medium", "high"]
SEVERITY: Final[Mapping[str, Severity]] = {
    REFUSAL_BURST: "medium",
    VOLUME: "medium",
    OFF_HOURS: "low",
    DIFFERENCING: "high",
    CONSENT_NEW_KEY: "high",
}

# How often (in entries) idle per-key state is swept.
_SWEEP_EVERY: Final = 4096


class AlertConfig(BaseModel):
    """Thresholds of the rules. All durations are in seconds of entry time."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: Rules that run; the others are skipped (their counters stay 0).
    enabled: frozenset[str] = frozenset(RULES)

    # 1. refusal burst
    refusal_burst_count: int = Field(default=10, ge=1)
    refusal_burst_window_s: float = Field(default=60.0, gt=0)

    # 2. volume over baseline (windows are aligned to midnight in ``timezone`` when they are a
    # whole number of days, to the hour otherwise)
    volume_window_s: int = Field(default=86400, ge=60)
    volume_baseline_windows: int = Field(default=7, ge=1, le=366)
    volume_factor: float = Field(default=5.0, gt=0)
    volume_min_count: int = Field(default=200, ge=1)
    volume_min_history: int = Field(default=3, ge=0)
    volume_actions: tuple[str, ...] = ("query.",)

    # 3. off-hours access: office hours are [start, end) local time on ``office_weekdays``
    # (Monday = 0); start > end means hours that span midnight.
    timezone: str = "Asia/Shanghai"
    office_start: time = time(8, 0)
    office_end: time = time(20, 0)
    office_weekdays: frozenset[int] = frozenset({0, 1, 2, 3, 4})
    off_hours_actions: tuple[str, ...] = ("query.", "persons.")
    off_hours_cooldown_s: float = Field(default=3600.0, ge=0)

    # 4. differencing pattern
    differencing_pairs: int = Field(default=5, ge=1)
    differencing_window_s: float = Field(default=600.0, gt=0)
    differencing_history: int = Field(default=64, ge=2, le=1024)
    differencing_value_swaps: bool = False
    differencing_actions: tuple[str, ...] = ("query.aggregate",)

    # 5. consent used from a new key
    consent_key_member: str = "dpop_jkt"
    max_consents: int = Field(default=100_000, ge=1)

    # bounds of the engine's state and output
    max_keys: int = Field(default=10_000, ge=1)
    max_entry_indexes: int = Field(default=50, ge=1)
    keep_alerts: int = Field(default=1000, ge=1)

    @field_serializer("enabled", "office_weekdays")
    def _sorted(self, value: frozenset[Any]) -> list[Any]:
        # Sets dump in hash order, which differs between processes: saved state is sorted.
        return sorted(value)

    @field_validator("enabled")
    @classmethod
    def _known_rules(cls, value: frozenset[str]) -> frozenset[str]:
        unknown = value - set(RULES)
        if unknown:
            raise ValueError(f"unknown rules {sorted(unknown)}, want some of {list(RULES)}")
        return value

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r}") from None
        return value

    @field_validator("office_weekdays")
    @classmethod
    def _weekdays(cls, value: frozenset[int]) -> frozenset[int]:
        if not value <= set(range(7)):
            raise ValueError("office_weekdays are 0 (Monday) .. 6 (Sunday)")
        return value

    @model_validator(mode="after")
    def _hours(self) -> AlertConfig:
        if self.office_start == self.office_end:
            raise ValueError("office_start equals office_end: give a non-empty range")
        return self


class Alert(BaseModel):
    """One alert and the entries behind it.

    ``first_index``/``last_index`` span the entries that made it fire; ``entry_indexes`` lists
    them (at most ``max_entry_indexes``, the most recent kept). ``ts`` is the timestamp of the
    entry that made it fire.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    rule: str
    severity: Severity
    org: str | None
    actor: str | None
    message: str
    first_index: int
    last_index: int
    entry_indexes: list[int]
    ts: str


# -- bounded state --------------------------------------------------------------------------

K = TypeVar("K")
V = TypeVar("V")


class _Lru(Generic[K, V]):
    """A map of at most ``cap`` keys; touching a key makes it the newest, adding one past the
    cap forgets the least recently touched."""

    __slots__ = ("_cap", "_data")

    def __init__(self, cap: int) -> None:
        self._cap = cap
        self._data: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        value = self._data.get(key)
        if value is not None:
            self._data.move_to_end(key)
        return value

    def setdefault(self, key: K, make: Callable[[], V]) -> V:
        value = self._data.get(key)
        if value is None:
            value = self._data[key] = make()
            if len(self._data) > self._cap:
                self._data.popitem(last=False)
        else:
            self._data.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        self._data[key] = value
        self._data.move_to_end(key)
        if len(self._data) > self._cap:
            self._data.popitem(last=False)

    def drop_if(self, stale: Callable[[V], bool]) -> None:
        for key in [k for k, v in self._data.items() if stale(v)]:
            del self._data[key]

    def values(self) -> Iterator[V]:
        return iter(self._data.values())

    def items(self) -> Iterator[tuple[K, V]]:
        """Oldest (least recently touched) first, so putting them back keeps the order."""
        return iter(self._data.items())

    def __len__(self) -> int:
        return len(self._data)


@dataclass(slots=True)
class _Volume:
    bucket: int
    first_index: int
    count: int = 0
    windows_seen: int = 0
    fired: bool = False
    history: deque[int] = field(default_factory=deque)
    recent: deque[int] = field(default_factory=deque)


@dataclass(frozen=True, slots=True)
class _Query:
    t: float
    index: int
    filters: frozenset[tuple[str, frozenset[str]]]


@dataclass(slots=True)
class _Consent:
    jkt: str
    first_index: int
    other_keys: set[str] = field(default_factory=set)


FilterSet = Mapping[str, frozenset[str]]
_SNAPSHOT_VERSION: Final = 1


def _filters_json(filters: frozenset[tuple[str, frozenset[str]]]) -> list[list[Any]]:
    return sorted([key, sorted(values)] for key, values in filters)


def _filters_from_json(data: list[list[Any]]) -> frozenset[tuple[str, frozenset[str]]]:
    return frozenset((str(key), frozenset(str(v) for v in values)) for key, values in data)


def _normalize_filters(raw: Any) -> dict[str, frozenset[str]] | None:
    """``{key: frozenset of values as strings}``, or ``None`` if ``raw`` is not a filter map."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        return None
    out: dict[str, frozenset[str]] = {}
    for key, values in raw.items():
        if not isinstance(key, str):
            return None
        if isinstance(values, list | tuple):
            out[key] = frozenset(str(v) for v in values)
        else:
            out[key] = frozenset({str(values)})
    return out


def differs_by_one_filter(a: FilterSet, b: FilterSet, *, value_swaps: bool = False) -> str | None:
    """How two filter maps differ, if by exactly one step; ``None`` otherwise.

    A step is one filter added or removed (the other filters equal), or one value added to or
    removed from one filter's value list; with ``value_swaps``, also one value replaced by
    another. The returned string names the filter.

    >>> R, G = frozenset({"R03"}), frozenset({"1"})
    >>> differs_by_one_filter({"insu_admdvs": R}, {"insu_admdvs": R, "gend": G})
    "filter 'gend' added or removed"
    >>> differs_by_one_filter({"a": frozenset({"R03", "R04"})}, {"a": R})
    "one value of filter 'a' added or removed"
    >>> differs_by_one_filter({"a": R}, {"a": frozenset({"R04"})}) is None
    True
    """
    diff = [k for k in a.keys() | b.keys() if a.get(k) != b.get(k)]
    if len(diff) != 1:
        return None
    key = diff[0]
    va, vb = a.get(key), b.get(key)
    if va is None or vb is None:
        return f"filter {key!r} added or removed"
    if len(va ^ vb) == 1:
        return f"one value of filter {key!r} added or removed"
    if value_swaps and len(va) == len(vb) and len(va - vb) == 1:
        return f"one value of filter {key!r} replaced"
    return None


def _shape(request: Mapping[str, Any]) -> bytes:
    """What two queries must share to be compared: dataset, dimensions (as a set), measures
    (as a set of ``(fn, field)``, output labels ignored so renaming a column does not hide a
    tracker) and HAVING. ``order_by`` and ``limit`` only arrange the same cells."""
    dims = request.get("dimensions") or []
    measures = request.get("measures") or []
    if isinstance(measures, list):
        measures = sorted(
            {
                (str(m.get("fn")), str(m.get("field")))
                if isinstance(m, dict)
                else (str(m), "")
                for m in measures
            }
        )
    return orjson.dumps(
        [
            request.get("dataset"),
            sorted({str(d) for d in dims}) if isinstance(dims, list) else dims,
            measures,
            request.get("having"),
        ],
        option=orjson.OPT_SORT_KEYS,
    )


@functools.lru_cache(maxsize=1024)
def _matches(action: str, prefixes: tuple[str, ...]) -> bool:
    """Whether ``action`` is one of ``prefixes`` or starts with one ending in ``.``."""
    return any(action == p or (p.endswith(".") and action.startswith(p)) for p in prefixes)


class AlertEngine:
    """Evaluates every enabled rule on each entry, in log order.

    Thread-safe: one lock guards ``observe`` and the read methods. Entries whose index is not
    greater than the last one observed are ignored, so a tailer that re-reads is harmless.
    """

    def __init__(self, config: AlertConfig | None = None) -> None:
        self.config = cfg = config or AlertConfig()
        self._zone = ZoneInfo(cfg.timezone)
        self._lock = threading.Lock()
        self._last_index = -1
        self._observed = 0
        self._counts: dict[str, int] = dict.fromkeys(RULES, 0)
        self._alerts: deque[Alert] = deque(maxlen=cfg.keep_alerts)
        self._denies: _Lru[str, deque[tuple[float, int]]] = _Lru(cfg.max_keys)
        self._volume: _Lru[str, _Volume] = _Lru(cfg.max_keys)
        self._off_hours: _Lru[str, float] = _Lru(cfg.max_keys)
        self._queries: _Lru[tuple[str, bytes], deque[_Query]] = _Lru(cfg.max_keys)
        self._pairs: _Lru[str, deque[tuple[float, int, int, frozenset[Any], str]]] = _Lru(
            cfg.max_keys
        )
        self._consents: _Lru[str, _Consent] = _Lru(cfg.max_consents)

    # -- public API ------------------------------------------------------------------------

    def observe(self, index: int, entry: AuditEntry) -> list[Alert]:
        """The alerts that entry ``index`` raises (usually none)."""
        with self._lock:
            if index <= self._last_index:
                return []
            self._last_index = index
            self._observed += 1
            t = parse_ts(entry.ts)
            local = datetime.fromtimestamp(t, self._zone)
            enabled = self.config.enabled
            raised: list[Alert] = []
            if REFUSAL_BURST in enabled:
                self._refusal_burst(index, entry, t, raised)
            if VOLUME in enabled:
                self._volume_rule(index, entry, t, local, raised)
            if OFF_HOURS in enabled:
                self._off_hours_rule(index, entry, t, local, raised)
            if DIFFERENCING in enabled:
                self._differencing(index, entry, t, raised)
            if CONSENT_NEW_KEY in enabled:
                self._consent(index, entry, raised)
            for alert in raised:
                self._counts[alert.rule] += 1
                self._alerts.append(alert)
            if self._observed % _SWEEP_EVERY == 0:
                self._sweep(t)
            return raised

    def observe_many(self, entries: Iterable[tuple[int, AuditEntry]]) -> list[Alert]:
        """Every alert the entries raise, in order."""
        out: list[Alert] = []
        for index, entry in entries:
            out += self.observe(index, entry)
        return out

    def counts_by_rule(self) -> dict[str, int]:
        """Alerts raised so far by rule, every rule present (for a Prometheus counter)."""
        with self._lock:
            return dict(self._counts)

    def alerts(
        self, *, rule: str | None = None, after_index: int | None = None, limit: int = 100
    ) -> list[Alert]:
        """The most recent alerts kept (at most ``keep_alerts``), oldest first: those of
        ``rule`` and whose ``last_index`` is greater than ``after_index`` if given."""
        with self._lock:
            found = [
                a
                for a in self._alerts
                if (rule is None or a.rule == rule)
                and (after_index is None or a.last_index > after_index)
            ]
        return found[-limit:] if limit > 0 else []

    @property
    def last_index(self) -> int:
        """Index of the last entry observed; -1 before the first."""
        return self._last_index

    def state_size(self) -> int:
        """Number of remembered items across all rules (bounded by the config; for tests)."""
        with self._lock:
            size = len(self._alerts) + len(self._off_hours) + len(self._consents)
            size += sum(len(d) + 1 for d in self._denies.values())
            size += sum(len(v.history) + len(v.recent) + 1 for v in self._volume.values())
            size += sum(len(d) + 1 for d in self._queries.values())
            size += sum(len(d) + 1 for d in self._pairs.values())
            size += sum(len(c.other_keys) for c in self._consents.values())
            return size

    # -- persistence -----------------------------------------------------------------------

    def snapshot(self) -> bytes:
        """The engine's whole state as JSON bytes: alerts kept, counters and every rule's
        windows and baselines, with the config it was built under. :meth:`restore` of it
        continues exactly where this engine stopped (replaying the log gives the same)."""
        with self._lock:
            state = {
                "version": _SNAPSHOT_VERSION,
                "config": self.config.model_dump(mode="json"),
                "last_index": self._last_index,
                "observed": self._observed,
                "counts": self._counts,
                "alerts": [a.model_dump(mode="json") for a in self._alerts],
                "denies": [[k, list(v)] for k, v in self._denies.items()],
                "volume": [
                    [k, [v.bucket, v.first_index, v.count, v.windows_seen, v.fired,
                         list(v.history), list(v.recent)]]
                    for k, v in self._volume.items()
                ],
                "off_hours": list(self._off_hours.items()),
                "queries": [
                    [actor, shape.decode("utf-8"),
                     [[q.t, q.index, _filters_json(q.filters)] for q in v]]
                    for (actor, shape), v in self._queries.items()
                ],
                "pairs": [
                    [k, [[t, a, b, [_filters_json(f) for f in key], how]
                         for t, a, b, key, how in v]]
                    for k, v in self._pairs.items()
                ],
                "consents": [
                    [k, [v.jkt, v.first_index, sorted(v.other_keys)]]
                    for k, v in self._consents.items()
                ],
            }
        return orjson.dumps(state)

    @classmethod
    def restore(cls, data: bytes, config: AlertConfig | None = None) -> AlertEngine | None:
        """An engine continuing from :meth:`snapshot` ``data``; ``None`` if the data is not a
        snapshot of this version or was taken under another config (the caller then starts
        afresh and replays the log)."""
        engine = cls(config)
        try:
            state = orjson.loads(data)
            # Compared as configs, not as JSON: ``enabled`` is a set, dumped in the hash
            # order of the process that saved it (another order in every process).
            if state.get("version") != _SNAPSHOT_VERSION or AlertConfig.model_validate(
                state.get("config")
            ) != engine.config:
                return None
            engine._last_index = int(state["last_index"])
            engine._observed = int(state["observed"])
            engine._counts = {rule: int(state["counts"].get(rule, 0)) for rule in RULES}
            engine._alerts.extend(Alert.model_validate(a) for a in state["alerts"])
            for k, v in state["denies"]:
                engine._denies.put(k, deque((float(t), int(i)) for t, i in v))
            for k, (bucket, first, count, seen, fired, history, recent) in state["volume"]:
                engine._volume.put(k, _Volume(bucket, first, count, seen, fired,
                                              deque(history), deque(recent)))
            for k, last in state["off_hours"]:
                engine._off_hours.put(k, float(last))
            for actor, shape, queries in state["queries"]:
                engine._queries.put((actor, shape.encode("utf-8")), deque(
                    _Query(float(t), int(i), _filters_from_json(f)) for t, i, f in queries))
            for k, pairs in state["pairs"]:
                engine._pairs.put(k, deque(
                    (float(t), int(a), int(b),
                     frozenset(_filters_from_json(f) for f in key), str(how))
                    for t, a, b, key, how in pairs))
            for k, (jkt, first, others) in state["consents"]:
                engine._consents.put(k, _Consent(jkt, int(first), set(others)))
        except (ValueError, TypeError, KeyError, AttributeError):
            return None  # not ours, or damaged: replaying the log is always correct
        return engine

    # -- rules -----------------------------------------------------------------------------

    def _alert(
        self,
        rule: str,
        entry: AuditEntry,
        message: str,
        indexes: Iterable[int],
        *,
        actor: str | None,
    ) -> Alert:
        ordered = sorted(set(indexes))
        return Alert(
            rule=rule,
            severity=SEVERITY[rule],
            org=entry.org,
            actor=actor,
            message=message,
            first_index=ordered[0],
            last_index=ordered[-1],
            entry_indexes=ordered[-self.config.max_entry_indexes :],
            ts=entry.ts,
        )

    def _refusal_burst(
        self, index: int, entry: AuditEntry, t: float, raised: list[Alert]
    ) -> None:
        if entry.decision != "deny":
            return
        cfg = self.config
        window = self._denies.setdefault(entry.actor, deque)
        window.append((t, index))
        while t - window[0][0] > cfg.refusal_burst_window_s:
            window.popleft()
        if len(window) >= cfg.refusal_burst_count:
            span = t - window[0][0]
            raised.append(
                self._alert(
                    REFUSAL_BURST,
                    entry,
                    f"{len(window)} refusals for actor {entry.actor!r} within {span:.0f} s "
                    f"(threshold {cfg.refusal_burst_count} in {cfg.refusal_burst_window_s:g} s)",
                    (i for _, i in window),
                    actor=entry.actor,
                )
            )
            window.clear()  # the next alert needs a fresh burst

    def _bucket(self, t: float, local: datetime) -> int:
        offset = local.utcoffset()
        shift = offset.total_seconds() if offset is not None else 0.0
        return int((t + shift) // self.config.volume_window_s)

    def _volume_rule(
        self, index: int, entry: AuditEntry, t: float, local: datetime, raised: list[Alert]
    ) -> None:
        cfg = self.config
        if entry.role != "insurer" or entry.org is None:
            return
        if not _matches(entry.action, cfg.volume_actions):
            return
        bucket = self._bucket(t, local)
        state = self._volume.setdefault(entry.org, lambda: _Volume(bucket, index))
        k = cfg.volume_baseline_windows
        if bucket > state.bucket:  # close the window (and any empty ones in between)
            gap = bucket - state.bucket
            state.history.append(state.count)
            state.history.extend([0] * min(gap - 1, k))
            while len(state.history) > k:
                state.history.popleft()
            state.windows_seen = min(state.windows_seen + gap, 1 << 30)
            state.bucket, state.count, state.first_index, state.fired = bucket, 0, index, False
            state.recent.clear()
        # an entry stamped slightly earlier than the window (clock skew between workers)
        # counts in the current window
        state.count += 1
        state.recent.append(index)
        while len(state.recent) > cfg.max_entry_indexes:
            state.recent.popleft()
        if state.fired or state.windows_seen < cfg.volume_min_history:
            return
        if state.count < cfg.volume_min_count:
            return
        baseline = statistics.median(state.history) if state.history else 0.0
        if state.count <= cfg.volume_factor * baseline:
            return
        state.fired = True
        raised.append(
            self._alert(
                VOLUME,
                entry,
                f"insurer {entry.org!r}: {state.count} queries in the current "
                f"{cfg.volume_window_s} s window, over {cfg.volume_factor:g}x the median "
                f"{baseline:g} of its previous {len(state.history)} windows",
                [state.first_index, *state.recent],
                actor=None,
            )
        )

    def _in_office_hours(self, local: datetime) -> bool:
        cfg = self.config
        now = local.time().replace(tzinfo=None)
        start, end = cfg.office_start, cfg.office_end
        if start < end:
            return local.weekday() in cfg.office_weekdays and start <= now < end
        # hours span midnight: the early part belongs to the previous day's shift
        if now >= start:
            return local.weekday() in cfg.office_weekdays
        if now < end:
            return (local.weekday() - 1) % 7 in cfg.office_weekdays
        return False

    def _off_hours_rule(
        self, index: int, entry: AuditEntry, t: float, local: datetime, raised: list[Alert]
    ) -> None:
        cfg = self.config
        if entry.decision != "allow" or not _matches(entry.action, cfg.off_hours_actions):
            return
        if self._in_office_hours(local):
            return
        last = self._off_hours.get(entry.actor)
        if last is not None and t - last < cfg.off_hours_cooldown_s:
            return
        self._off_hours.put(entry.actor, t)
        raised.append(
            self._alert(
                OFF_HOURS,
                entry,
                f"{entry.action} by {entry.actor!r} at {local.strftime('%Y-%m-%d %H:%M %a')} "
                f"{cfg.timezone}, outside office hours "
                f"{cfg.office_start:%H:%M}-{cfg.office_end:%H:%M}",
                [index],
                actor=entry.actor,
            )
        )

    def _differencing(self, index: int, entry: AuditEntry, t: float, raised: list[Alert]) -> None:
        cfg = self.config
        request = entry.request
        if entry.decision != "allow" or request is None:
            return
        if not _matches(entry.action, cfg.differencing_actions):
            return
        filters = _normalize_filters(request.get("filters"))
        if filters is None:
            return
        shape = _shape(request)
        frozen = frozenset(filters.items())
        recent = self._queries.setdefault((entry.actor, shape), deque)
        horizon = t - cfg.differencing_window_s
        while recent and recent[0].t < horizon:
            recent.popleft()
        pairs = self._pairs.setdefault(entry.actor, deque)
        while pairs and pairs[0][0] < horizon:
            pairs.popleft()
        known = {p[3] for p in pairs}
        for prev in recent:
            if prev.filters == frozen:
                continue
            how = differs_by_one_filter(
                dict(prev.filters), filters, value_swaps=cfg.differencing_value_swaps
            )
            key = frozenset({prev.filters, frozen})
            if how is None or key in known:
                continue
            known.add(key)
            pairs.append((t, prev.index, index, key, how))
        # keep one (the newest) query per distinct filter set
        for i, prev in enumerate(recent):
            if prev.filters == frozen:
                del recent[i]
                break
        recent.append(_Query(t, index, frozen))
        while len(recent) > cfg.differencing_history:
            recent.popleft()
        if len(pairs) >= cfg.differencing_pairs:
            _, a, b, _, how = pairs[-1]
            raised.append(
                self._alert(
                    DIFFERENCING,
                    entry,
                    f"{len(pairs)} pairs of aggregate queries by {entry.actor!r} on dataset "
                    f"{request.get('dataset')!r} with the same dimensions and measures differ "
                    f"by one filter step within {cfg.differencing_window_s:g} s "
                    f"(e.g. entries {a} and {b}: {how})",
                    [i for p in pairs for i in (p[1], p[2])],
                    actor=entry.actor,
                )
            )
            pairs.clear()

    def _consent(self, index: int, entry: AuditEntry, raised: list[Alert]) -> None:
        if entry.consent_id is None or entry.request is None:
            return
        jkt = entry.request.get(self.config.consent_key_member)
        if not isinstance(jkt, str) or not jkt:
            return
        state = self._consents.setdefault(entry.consent_id, lambda: _Consent(jkt, index))
        if jkt == state.jkt or jkt in state.other_keys or len(state.other_keys) >= 16:
            return
        state.other_keys.add(jkt)
        raised.append(
            self._alert(
                CONSENT_NEW_KEY,
                entry,
                f"consent {entry.consent_id!r} used with key {jkt!r}, first used with key "
                f"{state.jkt!r} (entry {state.first_index})",
                [state.first_index, index],
                actor=entry.actor,
            )
        )

    def _sweep(self, t: float) -> None:
        cfg = self.config
        self._denies.drop_if(lambda d: not d or t - d[-1][0] > cfg.refusal_burst_window_s)
        self._off_hours.drop_if(lambda last: t - last >= cfg.off_hours_cooldown_s)
        self._queries.drop_if(lambda d: not d or t - d[-1].t > cfg.differencing_window_s)
        self._pairs.drop_if(lambda d: not d or t - d[-1][0] > cfg.differencing_window_s)


class AlertCollector(Collector):
    """Prometheus collector of ``gateway_alerts_total{rule=…}`` from an engine's counts.

    ``REGISTRY.register(AlertCollector(engine))``.
    """

    def __init__(self, engine: AlertEngine) -> None:
        self._engine = engine

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(
            "gateway_alerts", "Alerts raised by the audit-log rules", labels=["rule"]
        )
        for rule, count in sorted(self._engine.counts_by_rule().items()):
            family.add_metric([rule], count)
        yield family
