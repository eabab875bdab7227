"""Calls held open for a timeline's next entries: reads with `wait_ms`, and Subscribe. The gRPC
side of the HTTP API's `wait_ms` (timeline.api._waiting), on the same timeline.wakes.

The same protocol: take a token (Wakes.watch), read, and only when the page has nothing to
return, park until a wake-up since the token. A wake-up only makes the call read again from
its own `last_read`, so a late, repeated or spurious one costs a read, never an entry, and
the service's reads never step over a hole.

What differs is the thread. grpcio's server runs each call on a thread of its pool until it
ends, so a held call holds one. A server sets `slots` threads aside for them (its pool has
that many more than the calls it runs at once, timeline.rpc.server), and a call that would
wait beyond them is refused with RESOURCE_EXHAUSTED: held calls never take the threads the
other calls run on. A parked call sleeps on an Event that a wake-up, the end of the call
(its client cancelled, its deadline passed) or the server stopping sets.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import grpc

from timeline import metrics
from timeline.model import Timeline
from timeline.rpc.status import TooManyWaiting
from timeline.wakes import Token, Wakes, key_of

Page = TypeVar("Page")

#: A read held by wait_ms answers its page this long before the call's deadline (a quarter
#: of the time left, when that is less), so that the page reaches the client in time.
ANSWER_MARGIN_S = 0.25


class Hold:
    """One call held open: whether it has taken a slot, and whether it is over."""

    def __init__(self, holds: Holds, context: grpc.ServicerContext) -> None:
        self._holds = holds
        self.slotted = False
        self.ended = False
        self._woken = threading.Event()
        # Run by grpc when the call terminates: its client cancelled, its deadline passed.
        if not context.add_callback(self.end):
            self.ended = True  # it already has

    def end(self) -> None:
        """Stop waiting now: the call is over, or the server stops."""
        self.ended = True
        self._woken.set()

    def until(
        self,
        timeline: Timeline,
        read: Callable[[], Page],
        ready: Callable[[Page], bool],
        wait_s: float,
    ) -> Page:
        """`read()` again after each wake-up of `timeline` until `ready(page)`, for at most
        `wait_s`; the last page read when that is over, or the call is."""
        wakes = self._holds.wakes
        key = key_of(timeline)
        deadline = time.monotonic() + wait_s
        while True:
            token = wakes.watch(key)
            try:
                page = read()
                left = deadline - time.monotonic()
                if ready(page) or left <= 0 or self.ended:
                    wakes.unwatch(key)
                    return page
                self._take_slot()
            except BaseException:
                wakes.unwatch(key)
                raise
            self._park(wakes, key, token, left)

    def _take_slot(self) -> None:
        if not self.slotted:
            self._holds._take()
            self.slotted = True

    def _park(self, wakes: Wakes, key: str, token: Token, timeout_s: float) -> None:
        woken = threading.Event()
        self._woken = woken
        if self.ended:  # ended since the read looked: end() set the previous Event
            wakes.unwatch(key)
            return
        if not wakes.park(key, token, woken.set):
            return  # a wake-up since the token: read again now
        try:
            woken.wait(timeout_s)
        finally:
            wakes.cancel(key, woken.set)


class Holds:
    """The held calls of one server: at most `slots` waiting at once, every one ended when
    the server stops."""

    def __init__(self, wakes: Wakes, slots: int, wait_max_ms: int) -> None:
        self.wakes = wakes
        self.slots = slots
        self.wait_max_ms = wait_max_ms  # sync_wait_max_ms: no wait is longer
        self.held = 0  # slots taken
        self.stopping = False
        self._lock = threading.Lock()
        self._open: set[Hold] = set()

    @contextmanager
    def hold(self, context: grpc.ServicerContext, *, slot: bool = False) -> Iterator[Hold]:
        """A hold for the call, its slot taken now with `slot` (a Subscribe, which waits
        all its life), else the first time it parks."""
        hold = Hold(self, context)
        with self._lock:
            if self.stopping:
                hold.ended = True
            self._open.add(hold)
        try:
            if slot:
                hold._take_slot()
            yield hold
        finally:
            with self._lock:
                self._open.discard(hold)
                if hold.slotted:
                    self.held -= 1

    def read(
        self,
        context: grpc.ServicerContext,
        timeline: Timeline,
        wait_ms: int,
        read: Callable[[], Page],
        ready: Callable[[Page], bool],
    ) -> Page:
        """A unary read with `wait_ms` (clamped to wait_max_ms, and ending shortly before the
        call's deadline): `read()` once when 0, else held until `ready` or the wait is over,
        then the page as it is (the normal empty page)."""
        wait_s = min(wait_ms, self.wait_max_ms) / 1000
        remaining = context.time_remaining()
        if remaining is not None:
            wait_s = min(wait_s, remaining - min(ANSWER_MARGIN_S, remaining / 4))
        if wait_s <= 0:
            return read()
        with self.hold(context) as hold:
            page = hold.until(timeline, read, ready, wait_s)
        if not ready(page):
            metrics.WAITS_TIMED_OUT.inc()
        return page

    def stop(self) -> None:
        """The server stops: every held call ends now (a read answers its page, a Subscribe
        UNAVAILABLE), and any held from now on ends at once."""
        with self._lock:
            self.stopping = True
            ending = list(self._open)
        for hold in ending:
            hold.end()

    def _take(self) -> None:
        with self._lock:
            if self.held >= self.slots:
                raise TooManyWaiting(
                    f"this server holds as many calls waiting for messages as it allows "
                    f"({self.slots}): try again later",
                )
            self.held += 1
