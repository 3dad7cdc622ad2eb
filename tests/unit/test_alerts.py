"""Tests of the alert rules (gateway.audit.alerts) over synthetic entries: each rule fires at its
threshold and not below, windows slide, state stays bounded, and replay is deterministic."""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import UTC, datetime, time, timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from gateway.audit.alerts import (
    CONSENT_NEW_KEY,
    DIFFERENCING,
    OFF_HOURS,
    REFUSAL_BURST,
    RULES,
    VOLUME,
    Alert,
    AlertCollector,
    AlertConfig,
    AlertEngine,
    differs_by_one_filter,
)
from gateway.audit.entry import AuditEntry, utc_timestamp

# Monday 2026-11-23 10:00 in Asia/Shanghai (02:00 UTC): inside office hours.
MONDAY_10 = datetime(2026, 11, 23, 2, 0, tzinfo=UTC)


def make(
    t: float,
    *,
    actor: str = "client-a",
    org: str | None = "insurer-a",
    role: str = "insurer",
    action: str = "query.aggregate",
    decision: str = "allow",
    request: dict[str, Any] | None = None,
    consent_id: str | None = None,
    reasons: list[str] | None = None,
    base: datetime = MONDAY_10,
) -> AuditEntry:
    """An entry ``t`` seconds after ``base``."""
    return AuditEntry(
        ts=utc_timestamp(base + timedelta(seconds=t)),
        actor=actor,
        role=role,
        org=org,
        action=action,
        decision=decision,
        status={"allow": 200, "deny": 403, "error": 500}[decision],
        request=request,
        consent_id=consent_id,
        reasons=reasons or [],
    )


def only(rules: set[str], **overrides: Any) -> AlertConfig:
    return AlertConfig(enabled=frozenset(rules), **overrides)


def query(filters: dict[str, list[str | int]], *, dims: list[str] | None = None,
          dataset: str = "settlements") -> dict[str, Any]:
    return {
        "purpose": "惠民保定价",
        "dataset": dataset,
        "dimensions": dims if dims is not None else ["age_band"],
        "measures": [{"fn": "count_persons"}, {"fn": "sum", "field": "medfee_sumamt"}],
        "filters": filters,
    }


class Feeder:
    """Feeds entries with consecutive indexes and records what each raised."""

    def __init__(self, engine: AlertEngine) -> None:
        self.engine = engine
        self.index = 0

    def __call__(self, entry: AuditEntry) -> list[Alert]:
        raised = self.engine.observe(self.index, entry)
        self.index += 1
        return raised


# -- 1. refusal burst -----------------------------------------------------------------------


def test_refusal_burst_fires_at_threshold_not_below() -> None:
    feed = Feeder(AlertEngine(only({REFUSAL_BURST})))
    for i in range(9):
        assert feed(make(i * 5, decision="deny", reasons=["no grant"])) == []
    [alert] = feed(make(45, decision="deny"))
    assert alert.rule == REFUSAL_BURST
    assert alert.severity == "medium"
    assert alert.actor == "client-a"
    assert alert.org == "insurer-a"
    assert alert.entry_indexes == list(range(10))
    assert (alert.first_index, alert.last_index) == (0, 9)
    assert alert.ts == utc_timestamp(MONDAY_10 + timedelta(seconds=45))
    # the next alert needs a fresh burst of ten
    for i in range(9):
        assert feed(make(46 + i, decision="deny")) == []
    assert len(feed(make(56, decision="deny"))) == 1


def test_refusal_burst_window_slides() -> None:
    feed = Feeder(AlertEngine(only({REFUSAL_BURST})))
    # one deny every 7 s: any ten span 63 s > 60 s
    assert all(feed(make(i * 7, decision="deny")) == [] for i in range(50))
    # nine quick denies, a pause longer than the window, then nine more: no ten in 60 s
    feed2 = Feeder(AlertEngine(only({REFUSAL_BURST})))
    for i in range(9):
        assert feed2(make(i, decision="deny")) == []
    for i in range(9):
        assert feed2(make(200 + i, decision="deny")) == []
    # the tenth inside the second group's window fires
    [alert] = feed2(make(230, decision="deny"))
    assert alert.first_index == 9
    assert alert.last_index == 18


def test_refusal_burst_two_actors_interleaved() -> None:
    engine = AlertEngine(only({REFUSAL_BURST}))
    raised: list[Alert] = []
    for i in range(19):
        actor = "client-a" if i % 2 == 0 else "client-b"
        raised += engine.observe(i, make(i, actor=actor, decision="deny"))
    # client-a has 10 denies (i = 0, 2, ..., 18), client-b only 9
    assert [a.actor for a in raised] == ["client-a"]
    assert raised[0].entry_indexes == list(range(0, 19, 2))
    assert engine.observe(19, make(19, actor="client-b", decision="error")) == []


# -- 2. volume over baseline ----------------------------------------------------------------

DAY = 86400.0


def volume_config(**overrides: Any) -> AlertConfig:
    return only({VOLUME}, **{"volume_min_count": 50, **overrides})


def test_volume_fires_when_over_factor_times_median() -> None:
    feed = Feeder(AlertEngine(volume_config()))
    for day in range(7):
        for q in range(20):
            assert feed(make(day * DAY + q * 60)) == []
    # day 8: the 100th query is not over 5 x 20, the 101st is
    for q in range(100):
        assert feed(make(7 * DAY + q * 10)) == [], q
    [alert] = feed(make(7 * DAY + 1001))
    assert alert.rule == VOLUME
    assert alert.org == "insurer-a"
    assert alert.actor is None
    assert "101 queries" in alert.message
    assert alert.first_index == 140  # the day's first query
    assert alert.last_index == 240
    assert len(alert.entry_indexes) <= AlertConfig().max_entry_indexes
    # once per window
    assert all(feed(make(7 * DAY + 2000 + q)) == [] for q in range(300))
    # the next day starts afresh; its baseline now includes the spike (median still 20)
    assert all(feed(make(8 * DAY + q)) == [] for q in range(100))
    assert len(feed(make(8 * DAY + 500))) == 1


def test_volume_first_days_and_small_counts_do_not_alert() -> None:
    feed = Feeder(AlertEngine(volume_config()))
    # first day, no history: 1000 queries and no alert
    assert all(feed(make(q)) == [] for q in range(1000))
    feed2 = Feeder(AlertEngine(volume_config()))
    for day in range(5):
        for q in range(2):
            feed2(make(day * DAY + q))
    # 49 queries are > 5 x 2 but below the minimum absolute count of 50
    assert all(feed2(make(5 * DAY + q)) == [] for q in range(49))
    assert len(feed2(make(5 * DAY + 60))) == 1


def test_volume_counts_empty_windows_and_insurers_only() -> None:
    feed = Feeder(AlertEngine(volume_config()))
    for day in range(7):
        for q in range(20):
            feed(make(day * DAY + q))
    # a silent week: the baseline is now zeros, so 50 queries alert
    for q in range(49):
        assert feed(make(14 * DAY + q)) == []
    assert len(feed(make(14 * DAY + 49))) == 1
    # admins and non-query actions are not counted
    feed3 = Feeder(AlertEngine(volume_config(volume_min_history=0)))
    assert all(feed3(make(q, role="admin", org="医保局")) == [] for q in range(500))
    assert all(feed3(make(q, action="catalog.read")) == [] for q in range(500))
    assert len(feed3(make(600))) == 0
    assert feed3.engine.counts_by_rule()[VOLUME] == 0


def test_volume_windows_are_local_days() -> None:
    # 23:59 and 00:01 Shanghai time fall in different windows
    engine = AlertEngine(
        volume_config(volume_min_history=0, volume_min_count=2, volume_factor=1.0)
    )
    late = datetime(2026, 11, 23, 15, 59, tzinfo=UTC)  # 23:59 +08:00
    assert engine.observe(0, make(0, base=late)) == []
    # 00:01 next local day (same UTC day): a new window whose first query is not over the
    # previous window's 1; with UTC days this would be the 2nd query of the window and fire
    assert engine.observe(1, make(120, base=late)) == []
    assert len(engine.observe(2, make(130, base=late))) == 1


# -- 3. off-hours access --------------------------------------------------------------------


def at_local(day: int, hh: int, mm: int = 0, ss: int = 0) -> float:
    """Seconds after MONDAY_10 of local (Shanghai) time ``hh:mm:ss`` on Monday + ``day``."""
    return day * DAY + (hh - 10) * 3600 + mm * 60 + ss


@pytest.mark.parametrize(
    ("when", "fires"),
    [
        (at_local(0, 10), False),
        (at_local(0, 8), False),
        (at_local(0, 19, 59, 59), False),
        (at_local(0, 20), True),
        (at_local(0, 7, 59, 59), True),
        (at_local(0, 23, 30), True),
        (at_local(0, 3), True),
        (at_local(5, 10), True),  # Saturday
        (at_local(6, 12), True),  # Sunday
        (at_local(4, 19), False),  # Friday
    ],
)
def test_off_hours_boundaries(when: float, fires: bool) -> None:
    engine = AlertEngine(only({OFF_HOURS}))
    raised = engine.observe(0, make(when))
    assert bool(raised) is fires
    if fires:
        assert raised[0].rule == OFF_HOURS
        assert raised[0].entry_indexes == [0]
        assert raised[0].severity == "low"


def test_off_hours_only_allowed_data_access() -> None:
    engine = AlertEngine(only({OFF_HOURS}))
    night = at_local(0, 23)
    assert engine.observe(0, make(night, decision="deny")) == []
    assert engine.observe(1, make(night, action="catalog.read")) == []
    assert engine.observe(2, make(night, action="audit.read", role="auditor")) == []
    assert len(engine.observe(3, make(night, action="persons.enrollment"))) == 1


def test_off_hours_cooldown_per_actor() -> None:
    feed = Feeder(AlertEngine(only({OFF_HOURS})))
    night = at_local(0, 21)
    assert len(feed(make(night))) == 1
    assert feed(make(night + 600)) == []
    assert len(feed(make(night + 60, actor="client-b"))) == 1
    assert len(feed(make(night + 3600))) == 1


def test_off_hours_configurable_days_and_overnight_hours() -> None:
    every_day = AlertEngine(only({OFF_HOURS}, office_weekdays=frozenset(range(7))))
    assert every_day.observe(0, make(at_local(5, 10))) == []
    night_shift = AlertEngine(
        only({OFF_HOURS}, office_start=time(22), office_end=time(6), off_hours_cooldown_s=0)
    )
    assert night_shift.observe(0, make(at_local(0, 23))) == []
    assert night_shift.observe(1, make(at_local(1, 5, 59))) == []  # Tuesday early: Monday's shift
    assert len(night_shift.observe(2, make(at_local(0, 10)))) == 1  # day time is off
    assert len(night_shift.observe(3, make(at_local(1, 12)))) == 1
    # Saturday 01:00 belongs to Friday's shift; Sunday 01:00 to Saturday's, which is off
    assert night_shift.observe(4, make(at_local(5, 1))) == []
    assert len(night_shift.observe(5, make(at_local(6, 1)))) == 1


# -- 4. differencing ------------------------------------------------------------------------

TRACKER: list[dict[str, list[str | int]]] = [
    {"insu_admdvs": ["R03"]},
    {"insu_admdvs": ["R03"], "gend": [1]},
    {"insu_admdvs": ["R03"], "age_band": ["60-69"]},
    {"insu_admdvs": ["R03"], "psn_type": ["11"]},
    {"insu_admdvs": ["R03", "R04"]},
    {"insu_admdvs": ["R03"], "dise_code": ["E11"]},
]


def test_differencing_fires_on_tracker_pattern_at_threshold() -> None:
    feed = Feeder(AlertEngine(only({DIFFERENCING})))
    for i, filters in enumerate(TRACKER[:5]):
        assert feed(make(i * 30, request=query(filters))) == []  # 4 pairs so far
    [alert] = feed(make(150, request=query(TRACKER[5])))
    assert alert.rule == DIFFERENCING
    assert alert.severity == "high"
    assert alert.entry_indexes == [0, 1, 2, 3, 4, 5]
    assert "'dise_code'" in alert.message
    assert "settlements" in alert.message


def test_differencing_ignores_exploratory_queries() -> None:
    feed = Feeder(AlertEngine(only({DIFFERENCING})))
    # the same filters over different dimensions: different questions, not a tracker
    dims = [["age_band"], ["gend"], ["insu_admdvs"], ["age_band", "gend"], ["psn_type"],
            ["dise_code"], ["gend", "insu_admdvs"]]
    for i, d in enumerate(dims):
        assert feed(make(i, request=query(TRACKER[i % 6], dims=d))) == []
    # walking through regions one at a time (one value replaced) is not differencing
    for i in range(20):
        assert feed(make(100 + i, request=query({"insu_admdvs": [f"R{i:02d}"]}))) == []
    # repeating the same pair of questions counts once
    for i in range(20):
        assert feed(make(200 + i, request=query(TRACKER[i % 2], dataset="claims"))) == []
    assert feed.engine.counts_by_rule()[DIFFERENCING] == 0


def test_differencing_value_swaps_when_enabled() -> None:
    feed = Feeder(AlertEngine(only({DIFFERENCING}, differencing_value_swaps=True)))
    raised: list[Alert] = []
    for i in range(4):
        raised += feed(make(i, request=query({"insu_admdvs": [f"R{i:02d}"]})))
    # 4 regions give 6 swapped pairs: the 5th pair arrives with the 4th query
    assert len(raised) == 1


def test_differencing_window_slides_and_ignores_denies() -> None:
    feed = Feeder(AlertEngine(only({DIFFERENCING})))
    # one query every 150 s: the base query leaves the 600 s window before the 5th pair
    for i, filters in enumerate(TRACKER):
        assert feed(make(i * 150, request=query(filters))) == []
    feed2 = Feeder(AlertEngine(only({DIFFERENCING})))
    for i, filters in enumerate(TRACKER):
        assert feed2(make(i, request=query(filters), decision="deny")) == []
    # other actors do not pair with each other
    feed3 = Feeder(AlertEngine(only({DIFFERENCING})))
    for i, filters in enumerate(TRACKER):
        assert feed3(make(i, actor=f"client-{i}", request=query(filters))) == []


def test_differs_by_one_filter() -> None:
    r03, r04, g1 = frozenset({"R03"}), frozenset({"R04"}), frozenset({"1"})
    both = frozenset({"R03", "R04"})
    assert differs_by_one_filter({"a": r03}, {"a": r03, "g": g1}) is not None
    assert differs_by_one_filter({"a": r03, "g": g1}, {"a": r03}) is not None
    assert differs_by_one_filter({}, {"a": both}) is not None  # one filter added
    assert differs_by_one_filter({"a": both}, {"a": r03}) is not None
    assert differs_by_one_filter({"a": r03}, {"a": r03}) is None
    assert differs_by_one_filter({"a": r03}, {"a": r04}) is None
    assert differs_by_one_filter({"a": r03}, {"a": r04}, value_swaps=True) is not None
    assert differs_by_one_filter({"a": r03}, {"a": r04, "g": g1}) is None
    assert differs_by_one_filter({"a": both}, {"a": frozenset({"R05"})}) is None


# -- 5. consent from a new key --------------------------------------------------------------


def test_consent_new_key() -> None:
    feed = Feeder(AlertEngine(only({CONSENT_NEW_KEY})))
    req_a = {"dpop_jkt": "thumb-A"}
    assert feed(make(0, action="persons.enrollment", consent_id="c-1", request=req_a)) == []
    assert feed(make(1, action="persons.enrollment", consent_id="c-1", request=req_a)) == []
    # no key recorded: nothing to compare
    assert feed(make(2, action="persons.enrollment", consent_id="c-1")) == []
    assert feed(make(3, consent_id="c-1", request={"other": 1})) == []
    [alert] = feed(make(4, action="persons.enrollment", consent_id="c-1",
                        request={"dpop_jkt": "thumb-B"}))
    assert alert.rule == CONSENT_NEW_KEY
    assert alert.entry_indexes == [0, 4]
    assert "thumb-A" in alert.message
    assert "thumb-B" in alert.message
    # the same new key again does not repeat the alert; a third key does
    assert feed(make(5, consent_id="c-1", request={"dpop_jkt": "thumb-B"})) == []
    assert len(feed(make(6, consent_id="c-1", request={"dpop_jkt": "thumb-C"}))) == 1
    # another consent has its own first key
    assert feed(make(7, consent_id="c-2", request={"dpop_jkt": "thumb-B"})) == []
    assert feed.engine.counts_by_rule()[CONSENT_NEW_KEY] == 2


# -- the engine -----------------------------------------------------------------------------


def mixed_stream(
    n: int, seed: int = 1, step: float = 1.0
) -> Iterator[tuple[int, AuditEntry]]:
    """``n`` entries from many actors, orgs and consents, one per ``step`` seconds."""
    rng = random.Random(seed)
    for i in range(n):
        actor = f"client-{rng.randrange(5000)}"
        decision = rng.choice(["allow", "allow", "allow", "deny"])
        kind = rng.random()
        if kind < 0.6:
            filters: dict[str, list[str | int]] = {"insu_admdvs": [f"R{rng.randrange(20):02d}"]}
            if rng.random() < 0.5:
                filters["gend"] = [rng.choice([1, 2])]
            yield i, make(i * step, actor=actor, org=f"insurer-{rng.randrange(300)}",
                          decision=decision, request=query(filters))
        elif kind < 0.9:
            yield i, make(i * step, actor=actor, action="persons.enrollment", decision=decision,
                          consent_id=f"consent-{rng.randrange(10**6)}",
                          request={"dpop_jkt": f"k{rng.randrange(3)}"})
        else:
            yield i, make(i * step, actor=actor, action="catalog.read", decision=decision)


def test_state_stays_bounded_for_100k_entries() -> None:
    config = AlertConfig(max_keys=200, max_consents=1000, keep_alerts=100,
                         volume_min_count=10, volume_window_s=3600)
    engine = AlertEngine(config)
    peak = 0
    for index, entry in mixed_stream(100_000):
        engine.observe(index, entry)
        if index % 5000 == 0:
            peak = max(peak, engine.state_size())
    peak = max(peak, engine.state_size())
    # per rule at most max_keys keys, each holding a bounded window
    per_key = (config.refusal_burst_count + config.differencing_history
               + config.differencing_pairs + config.differencing_history
               + config.volume_baseline_windows + config.max_entry_indexes + 4)
    bound = config.keep_alerts + config.max_consents * 17 + 5 * config.max_keys * per_key
    assert peak <= bound
    assert len(engine.alerts(limit=10_000)) <= config.keep_alerts
    assert engine.last_index == 99_999
    counts = engine.counts_by_rule()
    assert set(counts) == set(RULES)
    assert counts[OFF_HOURS] > 0
    assert counts[CONSENT_NEW_KEY] > 0


def test_replay_is_deterministic_and_reobserving_is_ignored() -> None:
    stream = list(mixed_stream(5000, seed=3, step=0.05))
    first = AlertEngine(AlertConfig(volume_min_count=5, volume_window_s=60))
    second = AlertEngine(AlertConfig(volume_min_count=5, volume_window_s=60))
    a = first.observe_many(stream)
    b = second.observe_many(stream)
    assert a == b
    assert a  # the mix raises something
    assert first.observe_many(stream[:100]) == []  # already seen
    assert first.counts_by_rule() == second.counts_by_rule()
    assert sum(first.counts_by_rule().values()) == len(a)
    last = a[-1]
    assert first.alerts(rule=last.rule)[-1] == last
    assert first.alerts(after_index=last.last_index) == []


def test_collector_exports_counts() -> None:
    engine = AlertEngine(only({OFF_HOURS}))
    engine.observe(0, make(at_local(0, 22)))
    registry = CollectorRegistry()
    registry.register(AlertCollector(engine))
    assert registry.get_sample_value("gateway_alerts_total", {"rule": OFF_HOURS}) == 1
    assert registry.get_sample_value("gateway_alerts_total", {"rule": REFUSAL_BURST}) == 0


def test_config_is_validated() -> None:
    with pytest.raises(ValidationError, match="unknown rules"):
        AlertConfig(enabled=frozenset({"nope"}))
    with pytest.raises(ValidationError, match="time zone"):
        AlertConfig(timezone="Mars/Olympus")
    with pytest.raises(ValidationError, match="office_weekdays"):
        AlertConfig(office_weekdays=frozenset({7}))
    with pytest.raises(ValidationError):
        AlertConfig(refusal_burst_count=0)
    with pytest.raises(ValidationError, match="non-empty"):
        AlertConfig(office_start=time(8), office_end=time(8))
    # JSON-style input (lists, "HH:MM") is accepted
    cfg = AlertConfig.model_validate({"office_weekdays": [0, 1, 2, 3, 4, 5],
                                      "office_start": "09:00", "enabled": [OFF_HOURS]})
    assert cfg.office_start == time(9)
    assert cfg.enabled == frozenset({OFF_HOURS})


def test_differencing_shape_ignores_labels_and_order_but_not_having() -> None:
    def labelled(i: int, filters: dict[str, list[str | int]], **extra: Any) -> dict[str, Any]:
        q = query(filters)
        q["measures"] = [{"fn": "count_persons", "label": f"n{i}"},
                         {"fn": "sum", "field": "medfee_sumamt"}][:: 1 if i % 2 else -1]
        q["dimensions"] = ["age_band"]
        return {**q, **extra}

    # renamed output columns, reordered measures, order_by and limit do not hide the tracker
    feed = Feeder(AlertEngine(only({DIFFERENCING})))
    raised: list[Alert] = []
    for i, filters in enumerate(TRACKER):
        raised += feed(make(i, request=labelled(i, filters, order_by=[{"column": "age_band"}],
                                                 limit=10 + i)))
    assert len(raised) == 1
    # a different HAVING each time is a different question
    feed2 = Feeder(AlertEngine(only({DIFFERENCING})))
    for i, filters in enumerate(TRACKER):
        having = [{"measure": "count_persons", "op": ">=", "value": 10 + i}]
        assert feed2(make(i, request=labelled(i, filters, having=having))) == []


# -- persistence ------------------------------------------------------------------------------


def _tracker_and_volume_stream() -> list[tuple[int, AuditEntry]]:
    """Every rule fires, on state that straddles any cut: a volume baseline built over
    minutes, a refusal burst, a consent's first key, a differencing tracker, night queries."""
    timed: list[tuple[float, AuditEntry]] = [(float(i), e) for i, e in mixed_stream(400, seed=5)]
    for k in range(12):
        timed.append((30.0 + 5.0 * k, make(30.0 + 5.0 * k, actor="prober", decision="deny")))
    timed.append((1.5, make(1.5, actor="holder", action="persons.enrollment",
                            consent_id="c1", request={"dpop_jkt": "k0"})))
    timed.append((350.5, make(350.5, actor="holder", action="persons.enrollment",
                              consent_id="c1", request={"dpop_jkt": "k1"})))
    for k in range(12):
        filters: dict[str, list[str | int]] = (
            {"insu_admdvs": ["R01", f"R{10 + k}"]} if k % 2 else {"insu_admdvs": ["R01"]})
        timed.append((25.0 * k + 0.7, make(25.0 * k + 0.7, actor="tracker",
                                           request=query(filters))))
    for minute in range(6):
        for k in range(2 if minute < 5 else 30):
            t = 60.0 * minute + k * 0.9 + 0.3
            timed.append((t, make(t, actor="bulk-1", org="bulk", action="query.sql")))
    timed.append((399.9, make(399.9, base=MONDAY_10 + timedelta(hours=12), actor="night")))
    timed.sort(key=lambda pair: pair[0])
    return list(enumerate(e for _, e in timed))


@pytest.mark.parametrize("cut", [1, 150, 300, 460])
def test_a_restored_snapshot_continues_as_if_never_stopped(cut: int) -> None:
    config = AlertConfig(volume_min_count=5, volume_window_s=60, volume_min_history=1)
    stream = _tracker_and_volume_stream()
    reference = AlertEngine(config)
    everything = reference.observe_many(stream)
    assert {a.rule for a in everything} == set(RULES)

    before = AlertEngine(config)
    before.observe_many(stream[:cut])
    restored = AlertEngine.restore(before.snapshot(), config)
    assert restored is not None
    assert restored.last_index == cut - 1
    assert restored.alerts(limit=1000) == before.alerts(limit=1000)  # raised ones still listed
    restored.observe_many(stream[cut:])
    assert restored.alerts(limit=1000) == reference.alerts(limit=1000)
    assert restored.counts_by_rule() == reference.counts_by_rule()
    assert restored.state_size() == reference.state_size()
    assert restored.snapshot() == reference.snapshot()


def test_a_snapshot_under_another_config_or_damaged_is_not_restored() -> None:
    engine = AlertEngine(AlertConfig())
    engine.observe_many(mixed_stream(50))
    data = engine.snapshot()
    assert AlertEngine.restore(data, AlertConfig()) is not None
    assert AlertEngine.restore(data, AlertConfig(refusal_burst_count=3)) is None
    assert AlertEngine.restore(data[:-10], AlertConfig()) is None
    assert AlertEngine.restore(b'{"version": 99}', AlertConfig()) is None


def test_a_restarted_monitor_lists_the_alerts_and_keeps_its_place(tmp_path: Path) -> None:
    from gateway.audit import SqliteAuditLog
    from gateway.service.monitoring import Monitor

    with SqliteAuditLog(tmp_path / "audit.db") as log:
        for k in range(12):
            log.append(make(float(k), actor="prober", decision="deny"))
        monitor = Monitor(log)
        assert monitor.catch_up() == 12
        raised = monitor.engine.alerts()
        assert [a.rule for a in raised] == [REFUSAL_BURST]
        monitor.stop()  # saves the engine's state in the store

    with SqliteAuditLog(tmp_path / "audit.db") as log:
        log.append(make(20.0, actor="prober", decision="deny"))
        again = Monitor(log)
        # Listed before reading a single entry: nothing replayed, nothing lost.
        assert again.engine.alerts() == raised
        assert again.engine.last_index == 11
        assert again.catch_up() == 1  # only the new entry
        again.stop()
        # Another config: the saved state does not apply, the log is replayed.
        other = Monitor(log, AlertConfig(refusal_burst_count=3))
        assert other.engine.last_index == -1
        assert other.catch_up() == 13


def _log_of(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> Any:
    if kind == "sqlite":
        from gateway.audit import SqliteAuditLog

        return SqliteAuditLog(tmp_path / "audit.db")
    from gateway.audit.postgres import PostgresAuditLog

    return PostgresAuditLog(str(request.getfixturevalue("postgres_url")))


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_one_process_holds_the_lease_until_it_releases_or_dies(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest,
) -> None:
    """The lease behind "one alert follower per log": another open file (SQLite) or session
    (PostgreSQL) is another process as far as the lock goes."""
    with _log_of(kind, tmp_path, request) as first, _log_of(kind, tmp_path, request) as second:
        lease = first.try_lease("alerts")
        assert lease is not None
        assert second.try_lease("alerts") is None
        assert first.try_lease("alerts") is None  # not re-entrant: one holder
        other = second.try_lease("other-follower")  # leases are per name
        assert other is not None
        other.release()
        lease.release()
        lease.release()  # idempotent
        taken = second.try_lease("alerts")
        assert taken is not None
        taken.release()


def test_a_lease_holder_that_dies_gives_the_lease_up(tmp_path: Path) -> None:
    import subprocess
    import sys

    from gateway.audit import SqliteAuditLog

    path = tmp_path / "audit.db"
    SqliteAuditLog(path).close()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\n"
         "from gateway.audit import SqliteAuditLog\n"
         f"log = SqliteAuditLog({str(path)!r}); lease = log.try_lease('alerts')\n"
         "print(lease is not None, flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "True"
        with SqliteAuditLog(path) as log:
            assert log.try_lease("alerts") is None
            holder.kill()
            holder.wait()
            lease = log.try_lease("alerts")
            assert lease is not None
            lease.release()
    finally:
        holder.kill()
        holder.wait()


def test_of_two_monitors_one_follows_and_the_other_takes_over_when_it_stops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two workers' monitors on one log: one thread follows it and saves the state; the other
    waits, answers a read by catching up itself, never overwrites the saved state, and
    follows once the first stops."""
    import time

    from gateway.audit import SqliteAuditLog
    from gateway.service import monitoring
    from gateway.service.monitoring import Monitor

    monkeypatch.setattr(monitoring, "LEASE_RETRY_S", 0.05)
    with SqliteAuditLog(tmp_path / "audit.db") as log:
        for k in range(12):
            log.append(make(float(k), actor="prober", decision="deny"))
        first, second = Monitor(log), Monitor(log)
        first.start(interval_s=0.02)
        second.start(interval_s=0.02)
        deadline = time.monotonic() + 10
        while first.engine.last_index < 11 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert first.following
        assert not second.following
        time.sleep(0.2)
        assert second.engine.last_index == -1  # its thread did not feed it
        first.save()
        second.from_follower()  # what /metrics of the other worker shows: the saved state
        assert second.engine.last_index == 11
        second.engine = monitoring.AlertEngine()  # as it was: the read below catches up itself
        assert [a.rule for a in second.alerts()] == [REFUSAL_BURST]  # a read catches up
        first.stop()  # saves and gives the lease up
        saved = log.load_state(monitoring.STATE_NAME)
        second.stop()  # not the follower: its state is not saved over the follower's
        assert log.load_state(monitoring.STATE_NAME) == saved
        second.start(interval_s=0.02)
        deadline = time.monotonic() + 10
        while not second.following and time.monotonic() < deadline:
            time.sleep(0.01)
        assert second.following
        log.append(make(30.0, actor="prober", decision="deny"))
        while second.engine.last_index < 12 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert second.engine.last_index == 12
        second.stop()


def test_saved_state_is_restored_by_a_process_of_another_hash_seed(tmp_path: Path) -> None:
    """The config saved with the state holds sets; a process with another string hash seed
    (every process, by default) once read them in another order, found "another config" and
    replayed the whole log at every start."""
    import os
    import subprocess
    import sys

    from gateway.audit import SqliteAuditLog
    from gateway.service.monitoring import Monitor

    path = tmp_path / "audit.db"
    with SqliteAuditLog(path) as log:
        for k in range(5):
            log.append(make(float(k), actor="prober", decision="deny"))
    restore = ("import sys\nfrom gateway.audit import SqliteAuditLog\n"
               "from gateway.service.monitoring import Monitor\n"
               f"log = SqliteAuditLog({str(path)!r}); m = Monitor(log)\n"
               "print(m.engine.last_index); m.catch_up(); m.stop(); log.close()\n")
    seen = []
    for seed in ("1", "2", "3", "4"):
        out = subprocess.run([sys.executable, "-c", restore], capture_output=True, text=True,
                             env={**os.environ, "PYTHONHASHSEED": seed}, check=True)
        seen.append(int(out.stdout.strip()))
    assert seen == [-1, 4, 4, 4]  # replayed once, then restored by every other process
    with SqliteAuditLog(path) as log:
        assert Monitor(log).engine.last_index == 4
