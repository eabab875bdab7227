"""Prometheus metrics, correct under several gunicorn workers (prometheus_client multiprocess).

With PROMETHEUS_MULTIPROC_DIR set (gunicorn.conf.py sets it before any worker starts) every
worker writes its samples to files there and a scrape of any worker adds them all up;
without it (tests, `flask run`) the process's own registry is served.
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.registry import REGISTRY

REQUEST_DURATION = Histogram(
    "timeline_http_request_duration_seconds",
    "Time to answer an HTTP request; its _count is the number of requests.",
    ["route", "method", "status"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
MESSAGES_WRITTEN = Counter(
    "timeline_messages_written_total",
    "Documents stored: one history copy and one sync copy per recipient of each message.",
    ["kind"],
)
FAN_OUT = Histogram(
    "timeline_fan_out_recipients",
    "Recipients (sync timelines) of each message sent.",
    buckets=(1, 2, 5, 10, 50, 100, 500, 1000, 5000, 10000),
)
FAILED_MEMBERS = Counter(
    "timeline_failed_members_total",
    "Sync copies that could not be stored and were reported to the caller.",
)
DEPENDENCY_ERRORS = Counter(
    "timeline_dependency_errors_total",
    "Failed or refused calls to a dependency (retried ones included).",
    ["dependency"],
)
SEQUENCE_REPAIRS = Counter(
    "timeline_sequence_repairs_total",
    "Counters seeded from the store (Redis lost them, or a new timeline) or moved past a "
    "sequence another message held.",
    ["repair"],
)


ACKED = Counter(
    "timeline_acks_total",
    "Ack requests served (each removes a member's sync entries up to a sequence).",
)
EXPIRED_REMOVED = Counter(
    "timeline_expired_removed_total",
    "Expired entries removed by the SQLite purge (MongoDB's TTL index removes its own).",
    ["kind"],
)


# The children used on every request, resolved once: labels() costs a lock and a lookup.
HISTORY_WRITTEN = MESSAGES_WRITTEN.labels("history")
SYNC_WRITTEN = MESSAGES_WRITTEN.labels("sync")
_durations: dict[tuple[str, str, int], Any] = {}


def observe_request(route: str, method: str, status: int, seconds: float) -> None:
    child = _durations.get((route, method, status))
    if child is None:
        child = _durations[(route, method, status)] = REQUEST_DURATION.labels(
            route, method, str(status)
        )
    child.observe(seconds)


def dependency_failed(dependency: str) -> None:
    DEPENDENCY_ERRORS.labels(dependency).inc()


def exposition() -> tuple[bytes, str]:
    """The text exposition format of every metric, summed over workers when there are many."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
