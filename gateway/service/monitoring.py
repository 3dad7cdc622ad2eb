"""Alerts that follow the audit log, and the auditor use cases over alerts and reports.

:class:`Monitor` owns one :class:`~gateway.audit.alerts.AlertEngine` and feeds it the log's
entries in order (:meth:`Monitor.catch_up`), from a daemon thread (:meth:`Monitor.start`) and
before every API read, so ``GET /v1/audit/alerts`` never answers from a stale engine.
``gateway_alerts_total{rule=…}`` is served from :data:`gateway.api.metrics.REGISTRY` by one
collector per process that reads the most recently created monitor (tests build many apps; a
second ``REGISTRY.register`` of the same metric name would raise).

:func:`list_alerts` and :func:`audit_report` are use cases like those of
:class:`~gateway.service.gateway.Gateway`: they go through ``Gateway._audit_read``, which asks
the policy for ``audit.read``, audits the read (allowed, denied or failed) and returns an
:class:`~gateway.service.gateway.Audited`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Generator, Iterable
from itertools import islice
from typing import Any, Final, Literal
from zoneinfo import ZoneInfo

from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from gateway.audit.alerts import RULES, Alert, AlertCollector, AlertConfig, AlertEngine
from gateway.audit.entry import ts_bound
from gateway.audit.log import AuditLog, Lease
from gateway.audit.reports import (
    REPORT_KINDS,
    build_report,
    report_chart_svg,
    report_csv,
    report_html,
    report_json,
)
from gateway.audit.scan import iter_entries
from gateway.auth.tokens import Principal
from gateway.errors import BadRequest
from gateway.service.gateway import Audited, Gateway

__all__ = [
    "REPORT_FORMATS",
    "REPORT_TIMEZONE",
    "Monitor",
    "ReportFormat",
    "audit_report",
    "list_alerts",
    "report_content",
]

_log = logging.getLogger("gateway.alerts")

ReportFormat = Literal["json", "csv", "svg", "html"]
REPORT_FORMATS: Final = ("json", "csv", "svg", "html")
#: Report days and hours are local days and hours here.
REPORT_TIMEZONE: Final = "Asia/Shanghai"
#: Entries fed to the engine per tick of the background thread (about 0.3 s of work).
TICK_ENTRIES: Final = 10_000
#: Most alerts one API read returns.
MAX_ALERTS_LIMIT: Final = 1000
#: Name of the alert engine's saved state in the audit store (``AuditLog.save_state``).
STATE_NAME: Final = "alerts"
#: The engine's state is saved at most this often while entries arrive, and on stop.
SAVE_EVERY_S: Final = 5.0
#: How often a monitor whose log another process follows asks for the lease again.
LEASE_RETRY_S: Final = 2.0


class Monitor:
    """One :class:`AlertEngine` following one audit log.

    ``catch_up`` is serialized by a lock (the thread and API reads never feed the engine twice
    over); the engine itself ignores an index it has already seen, so a re-read is harmless.
    Entries written by other processes sharing the log file are seen too: the scan reads the
    store, not this process's queue.

    Of the processes sharing a log (``gateway serve --workers N``) one follows it: the one
    holding the log's ``alerts`` lease (:meth:`AuditLog.try_lease`) runs the thread and saves
    the engine's state; the others ask for the lease every few seconds (taking over when its
    holder dies) and catch up only when an API read needs them to, from the holder's saved
    state when they are far behind. Every worker following every entry cost each request
    about 0.1 ms of CPU per worker, and logged every alert N times.
    """

    def __init__(self, log: AuditLog, config: AlertConfig | None = None, *,
                 tick_entries: int = TICK_ENTRIES) -> None:
        if tick_entries < 1:
            raise ValueError("tick_entries must be >= 1")
        self.log = log
        self.engine = _restored(log, config) or AlertEngine(config)
        self.tick_entries = tick_entries
        self._saved_index = self.engine.last_index
        self._saved_at = time.monotonic()
        self._feed_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lease: Lease | None = None
        _use_for_metrics(self)

    def catch_up(self, max_entries: int | None = None) -> int:
        """Feed the engine the entries after the last one it saw (at most ``max_entries``,
        all of them if ``None``); the number fed. Alerts raised are logged (rule, org, actor,
        indexes: never request data)."""
        with self._feed_lock:
            tick = min(max_entries or self.tick_entries, self.tick_entries)
            if self._lease is None and self.log.size() - 1 - self.engine.last_index > tick:
                self._adopt_saved()  # far behind: start from the follower's state
            rows = iter_entries(self.log, start=self.engine.last_index + 1)
            try:
                fed = 0
                for index, entry in (rows if max_entries is None
                                     else islice(rows, max_entries)):
                    fed += 1
                    for alert in self.engine.observe(index, entry):
                        _log.warning("alert %s (%s) org=%s actor=%s entries %d..%d",
                                     alert.rule, alert.severity, alert.org, alert.actor,
                                     alert.first_index, alert.last_index)
            finally:
                if isinstance(rows, Generator):
                    rows.close()  # ends the store's read snapshot when stopped early
            if fed and time.monotonic() - self._saved_at >= SAVE_EVERY_S:
                self.save()
            return fed

    def save(self) -> None:
        """Save the engine's state (alerts raised, windows, baselines) in the audit store, so
        a restarted gateway lists the same alerts and keeps its baselines without replaying
        the whole log. Only the lease holder saves (a monitor with no thread takes the lease
        for the moment): another process's older engine never overwrites the follower's."""
        last = self.engine.last_index
        if last == self._saved_index:
            return
        lease = self._lease or self.log.try_lease(STATE_NAME)
        if lease is None:
            return
        try:
            self.log.save_state(STATE_NAME, self.engine.snapshot())
        finally:
            if lease is not self._lease:
                lease.release()
        self._saved_index, self._saved_at = last, time.monotonic()

    def from_follower(self) -> None:
        """A monitor that does not follow the log takes the follower's saved state when it is
        further on (``/metrics`` of any worker is then at most ``SAVE_EVERY_S`` behind)."""
        if self._lease is None:
            with self._feed_lock:
                self._adopt_saved()

    def _adopt_saved(self) -> None:
        # With the feed lock held.
        saved = _restored(self.log, self.engine.config)
        if saved is not None and saved.last_index > self.engine.last_index:
            self.engine = saved
            self._saved_index = saved.last_index

    def alerts(self, rule: str | None = None, after_index: int | None = None,
               limit: int = 100) -> list[Alert]:
        """The engine's alerts after catching up with the log (never stale)."""
        self.catch_up()
        return self.engine.alerts(rule=rule, after_index=after_index, limit=limit)

    # -- background thread ---------------------------------------------------------------

    def start(self, interval_s: float = 0.5) -> None:
        """Follow the log from a daemon thread: every ``interval_s``, or at once while a
        backlog remains, feed at most ``tick_entries`` entries. Idempotent."""
        if interval_s <= 0:
            raise ValueError("interval_s must be > 0")
        with self._state_lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, args=(interval_s,),
                                            name="audit-alerts", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread after its current tick (bounded by ``tick_entries``). Idempotent;
        call it before closing the audit log."""
        with self._state_lock:
            thread, self._thread = self._thread, None
            self._stop.set()
        if thread is not None:
            thread.join(timeout)
        try:
            with self._feed_lock:
                self.save()
        except Exception as exc:  # the log may already be unusable; the state is rebuildable
            _log.error("alert state not saved (%s)", type(exc).__name__)
        finally:
            lease, self._lease = self._lease, None
            if lease is not None:
                lease.release()

    @property
    def following(self) -> bool:
        """This process holds the lease: its thread follows the log for all of them."""
        return self._lease is not None

    @property
    def running(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive()

    def _run(self, interval_s: float) -> None:
        failures = 0
        while not self._stop.is_set():
            if self._lease is None and not self._take_lease():
                self._stop.wait(LEASE_RETRY_S)  # another process follows the log
                continue
            try:
                fed = self.catch_up(self.tick_entries)
                failures = 0
            except Exception as exc:  # keep following: a store hiccup must not end alerts
                failures += 1
                if failures == 1 or failures % 100 == 0:
                    _log.error("alert monitor cannot read the audit log (%s, %d in a row)",
                               type(exc).__name__, failures)
                fed = 0
            if fed < self.tick_entries:  # caught up (or failing): wait; else keep going
                self._stop.wait(interval_s * min(1 + failures, 20))

    def _take_lease(self) -> bool:
        try:
            lease = self.log.try_lease(STATE_NAME)
        except Exception as exc:  # the store is down: try again later
            _log.error("alert monitor cannot take its lease (%s)", type(exc).__name__)
            return False
        if lease is None:
            return False
        with self._feed_lock:
            self._adopt_saved()  # whoever followed before may be far ahead of this engine
            self._lease = lease
        return True


def _restored(log: AuditLog, config: AlertConfig | None) -> AlertEngine | None:
    """The engine saved in ``log``, if it was saved under the same config and the log still
    holds every entry it saw (a replaced or shrunk store: start afresh, replay)."""
    try:
        data = log.load_state(STATE_NAME)
        engine = None if data is None else AlertEngine.restore(data, config)
        if engine is None or engine.last_index >= log.size():
            return None
    except Exception as exc:  # a fresh engine replaying the log is always correct
        _log.error("alert state not loaded (%s)", type(exc).__name__)
        return None
    return engine


# -- metrics: one collector per process, reading the current monitor ----------------------

_metrics_lock = threading.Lock()
_metrics_monitor: Monitor | None = None
_metrics_registered = False


class _CurrentMonitorCollector(Collector):
    """``gateway_alerts_total{rule=…}`` of the most recently created monitor (zeros before
    there is one)."""

    def collect(self) -> Iterable[Metric]:
        monitor = _metrics_monitor
        if monitor is not None:
            try:
                monitor.from_follower()
            except Exception as exc:  # a scrape shows the counts this process has
                _log.error("alert state not read for metrics (%s)", type(exc).__name__)
        engine = monitor.engine if monitor is not None else _EMPTY_ENGINE
        return AlertCollector(engine).collect()


_EMPTY_ENGINE: Final = AlertEngine()


def _use_for_metrics(monitor: Monitor) -> None:
    global _metrics_monitor, _metrics_registered
    from gateway.api.metrics import REGISTRY  # the API's registry; imported late, no cycle

    with _metrics_lock:
        _metrics_monitor = monitor
        if not _metrics_registered:
            REGISTRY.register(_CurrentMonitorCollector())
            _metrics_registered = True


# -- use cases ---------------------------------------------------------------------------


def list_alerts(gateway: Gateway, monitor: Monitor, principal: Principal, rule: str | None,
                after_index: int | None, limit: int) -> Audited:
    """The alerts an auditor asked for, oldest first, each naming its audit entries; with the
    counts by rule and the last index the engine has seen (so a client can poll with
    ``after_index``)."""
    request: dict[str, Any] = {"rule": rule, "after_index": after_index, "limit": limit}

    def build() -> dict[str, Any]:
        if rule is not None and rule not in RULES:
            raise BadRequest(f"unknown rule, want one of {list(RULES)}")
        if not 1 <= limit <= MAX_ALERTS_LIMIT:
            raise BadRequest(f"limit must be between 1 and {MAX_ALERTS_LIMIT}")
        found = monitor.alerts(rule=rule, after_index=after_index, limit=limit)
        return {
            "alerts": [a.model_dump(mode="json") for a in found],
            "observed_index": monitor.engine.last_index,
            "counts": monitor.engine.counts_by_rule(),
            "limit": limit,
        }

    return gateway._audit_read(principal, "audit.alerts",
                               {k: v for k, v in request.items() if v is not None}, build)


def audit_report(gateway: Gateway, principal: Principal, since: str | None, until: str | None,
                 bucket: str = "day", kind: str = "access", fmt: str = "json") -> Audited:
    """The auditor report over ``[since, until)`` (dates are local midnights in
    :data:`REPORT_TIMEZONE`). JSON: the body is the report (every table). Other formats: the
    body is ``{"format", "kind", "media_type", "content"}`` and the route serves ``content``
    (CSV: the ``kind`` table; SVG: access over time; HTML: chart and every table)."""
    request = {"since": since, "until": until, "bucket": bucket, "kind": kind, "format": fmt}

    def build() -> dict[str, Any]:
        return _report_body(gateway.audit, since, until, bucket, kind, fmt)

    return gateway._audit_read(principal, "audit.report",
                               {k: v for k, v in request.items() if v is not None}, build)


_MEDIA_TYPES: Final = {
    "csv": "text/csv; charset=utf-8",
    "svg": "image/svg+xml",
    "html": "text/html; charset=utf-8",
}


def report_content(log: AuditLog, since: str | None, until: str | None, bucket: str,
                   kind: str, fmt: str) -> str | dict[str, Any]:
    """The report in ``fmt``: a JSON-ready dict, or the CSV/SVG/HTML text. ``BadRequest``
    for a bad bound, bucket, kind or format. (Shared by the API and ``gateway audit report``.)
    """
    if bucket not in ("day", "hour"):
        raise BadRequest("bucket must be 'day' or 'hour'")
    if kind not in REPORT_KINDS:
        raise BadRequest(f"kind must be one of {list(REPORT_KINDS)}")
    if fmt not in REPORT_FORMATS:
        raise BadRequest(f"format must be one of {list(REPORT_FORMATS)}")
    try:
        zone = ZoneInfo(REPORT_TIMEZONE)
        lo = ts_bound("since", since, zone)
        hi = ts_bound("until", until, zone)
        # Pre-filter with the exact (UTC) bounds so the scan skips rows outside the range.
        report = build_report(iter_entries(log, since=lo, until=hi), since=lo, until=hi,
                              bucket="day" if bucket == "day" else "hour",
                              timezone=REPORT_TIMEZONE)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    if fmt == "json":
        return report_json(report)
    if fmt == "csv":
        return report_csv(report, kind)
    if fmt == "svg":
        return report_chart_svg(report)
    return report_html(report)


def _report_body(log: AuditLog, since: str | None, until: str | None, bucket: str, kind: str,
                 fmt: str) -> dict[str, Any]:
    content = report_content(log, since, until, bucket, kind, fmt)
    if isinstance(content, dict):
        return content
    return {"format": fmt, "kind": kind, "media_type": _MEDIA_TYPES[fmt], "content": content}
