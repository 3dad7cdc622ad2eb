"""Prometheus metrics of the API (a registry of our own, so tests can start many apps)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

__all__ = ["REGISTRY", "REQUESTS", "REQUEST_SECONDS"]

REGISTRY = CollectorRegistry()
REQUESTS = Counter(
    "gateway_requests_total", "HTTP requests by route and status", ["route", "status"],
    registry=REGISTRY,
)
REQUEST_SECONDS = Histogram(
    "gateway_request_seconds", "HTTP request latency by route", ["route"], registry=REGISTRY,
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
