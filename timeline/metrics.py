"""Prometheus metrics, correct under several gunicorn workers (prometheus_client multiprocess).

With PROMETHEUS_MULTIPROC_DIR set (gunicorn.conf.py sets it before any worker starts) every
worker writes its samples to files there and a scrape of any worker adds them all up;
without it (tests, `flask run`) the process's own registry is served. A file a worker is
still creating (or died creating) is left out of a scrape rather than failing it.
"""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import REGISTRY

log = logging.getLogger(__name__)

# prometheus_client's public merge of multiprocess files (what MultiProcessCollector.collect
# does with the whole directory); the library leaves it untyped.
_merge: Callable[..., Iterable[Metric]] = MultiProcessCollector.merge

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
    "Expired entries the purge removed (nothing else removes entries).",
    ["kind"],
)
WAITERS = Gauge(
    "timeline_waiters",
    "Reads held until their timeline gets entries (wait_ms), parked now; summed over processes.",
    multiprocess_mode="livesum",
)
WAKE_LATENCY = Histogram(
    "timeline_wake_latency_seconds",
    "From a wake-up's arrival in a process to its waiter's reply being ready.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
)
WAITS_TIMED_OUT = Counter(
    "timeline_waits_timed_out_total",
    "Reads held for their whole wait_ms: answered with what was readable then (often nothing).",
)
WAKES_LOST = Counter(
    "timeline_wakes_not_published_total",
    "Wake-ups a send could not publish (Redis refused): their waiters read at their deadline.",
)
FILES_SKIPPED = Counter(
    "timeline_metrics_files_skipped_total",
    "Worker metrics files left out of a scrape because they could not be read (being created, "
    "or left cut short by a worker that died meanwhile).",
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


class TolerantMultiProcessCollector:
    """prometheus_client's multiprocess collection, leaving out the files it cannot read."""

    # A file that fails can be dropped, or vanish, between the probe and the merge of what is
    # left; a few rounds cover that without looping forever on a directory gone wrong.
    _ROUNDS = 3

    def __init__(self, path: str) -> None:
        self._path = path
        # Files skipped by the previous scrape: skipped again, they are not being created but
        # stuck (their worker died midway), and that deserves a warning, not a debug line.
        self._skipped: set[str] = set()

    def collect(self) -> Iterable[Metric]:
        """Every readable file's samples, merged as MultiProcessCollector.collect does."""
        files = glob.glob(os.path.join(self._path, "*.db"))
        skipped: set[str] = set()
        failure: Exception | None = None
        for _ in range(self._ROUNDS):
            try:
                # One read of every file in the usual case. list(): should merge ever turn
                # lazy, its errors must still surface here and not while the answer is written.
                merged = list(_merge(files, accumulate=True))
            except Exception as exc:
                # Which exception depends on the library version and on where the file was cut
                # (struct.error, RuntimeError, UnicodeDecodeError, JSONDecodeError, OSError):
                # whatever it is, the file is found by reading each one alone.
                failure = exc
                readable = [f for f in files if self._readable(f)]
                skipped.update(set(files) - set(readable))
                files = readable
                continue
            self._skipped = skipped
            return merged
        assert failure is not None
        raise failure

    def _readable(self, path: str) -> bool:
        """Whether prometheus_client reads this one file (its public merge, on it alone)."""
        try:
            list(_merge([path], accumulate=True))
        except Exception as exc:
            FILES_SKIPPED.inc()
            if path in self._skipped:
                log.warning(
                    "metrics file %s still unreadable, left out of every scrape: a worker died "
                    "while creating it? (nothing in it can be read; removing it loses nothing) %r",
                    path,
                    exc,
                )
            else:
                log.debug("metrics file %s not readable yet, left out of the scrape: %r", path, exc)
            return False
        return True


# One per process: it remembers which files the previous scrape skipped.
_collectors: dict[str, TolerantMultiProcessCollector] = {}


def exposition() -> tuple[bytes, str]:
    """The text exposition format of every metric, summed over workers when there are many."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path:
        collector = _collectors.get(path)
        if collector is None:
            collector = _collectors[path] = TolerantMultiProcessCollector(path)
        registry = CollectorRegistry()
        registry.register(collector)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
