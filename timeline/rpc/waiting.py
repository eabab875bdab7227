"""Calls held open for a timeline's next entries: reads with `wait_ms`, and Subscribe. The gRPC
side of the HTTP API's `wait_ms` (timeline.api._waiting), on the same timeline.wakes.

The same protocol: take a token (Wakes.watch), read, and only when the page has nothing to
return, park until a wake-up since the token. A wake-up only makes the call read again from
its own `last_read`, so a late, repeated or spurious one costs a read, never an entry, and
the service's reads never step over a hole. A wait that ends with no wake-up for it (and the
listener subscribed all along) answers the page it parked on when only a wake-up could have
changed that page (`settled`), as the HTTP worker does.

No thread per waiter: the server is grpc.aio, so a held call is a coroutine on the server's
event loop, parked on a future that a wake-up (from the listener's thread, through
call_soon_threadsafe), the end of its wait or the server stopping resolves; its client
cancelling, or its deadline passing, cancels it. Only the reads run on the pool's threads.
A server still bounds the calls held at once (`slots`, for their memory): one more is
refused with RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import grpc

from timeline import metrics
from timeline.model import Timeline
from timeline.rpc.status import TooManyWaiting
from timeline.wakes import Token, Wakes, key_of

Page = TypeVar("Page")
#: Runs a blocking function on a thread of the server's pool (Calls.run: `admit`, whether
#: it may be refused when the pool's queue is full).
Run = Callable[..., Awaitable[Any]]

#: A read held by wait_ms answers its page this long before the call's deadline (a quarter
#: of the time left, when that is less), so that the page reaches the client in time.
ANSWER_MARGIN_S = 0.25


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class Hold:
    """One call held open: whether it has taken a slot, and whether it is over. Created and
    awaited on the server's loop; `end` may be called from any thread."""

    def __init__(self, holds: Holds) -> None:
        self._holds = holds
        self._loop = asyncio.get_running_loop()
        self.slotted = False
        self.ended = False
        self._woken: asyncio.Future[None] | None = None

    def end(self) -> None:
        """Stop waiting now: the server stops."""
        self.ended = True
        self._loop.call_soon_threadsafe(self._end)

    def _end(self) -> None:
        if self._woken is not None:
            _resolve(self._woken)

    async def until(
        self,
        timeline: Timeline,
        read: Callable[[], Page],
        ready: Callable[[Page], bool],
        wait_s: float,
        settled: Callable[[Page], bool] | None = None,
    ) -> Page:
        """`read()` (on a thread) again after each wake-up of `timeline` until `ready(page)`,
        for at most `wait_s`; the last page read when that is over, or the call is. A page
        that is `settled` (only a wake-up can change it) is not read again at the end of a
        wait that nothing woke."""
        wakes = self._holds.wakes
        key = key_of(timeline)
        deadline = time.monotonic() + wait_s
        while True:
            token = wakes.watch(key)
            try:
                # A call not held yet is refused, as any, when the pool's queue is full.
                page: Page = await self._holds.run(read, admit=not self.slotted)
                left = deadline - time.monotonic()
                if ready(page) or left <= 0 or self.ended:
                    wakes.unwatch(key)
                    return page
                self._take_slot()
            except BaseException:
                wakes.unwatch(key)
                raise
            quiet = await self._park(wakes, key, token, left)
            if quiet and settled is not None and settled(page):
                return page

    def _take_slot(self) -> None:
        if not self.slotted:
            self._holds._take()
            self.slotted = True

    async def _park(self, wakes: Wakes, key: str, token: Token, timeout_s: float) -> bool:
        """Until a wake-up of `key` since `token`, `timeout_s`, or the end of the call. True
        when it timed out with nothing published for `key` meanwhile (Wakes.cancel)."""
        loop = self._loop
        woken: asyncio.Future[None] = loop.create_future()
        self._woken = woken
        if self.ended:  # ended since the read looked
            wakes.unwatch(key)
            return False

        def wake() -> None:  # on the listener's thread
            loop.call_soon_threadsafe(_resolve, woken)

        if not wakes.park(key, token, wake):
            return False  # a wake-up since the token: read again now
        try:
            await asyncio.wait((woken,), timeout=timeout_s)
        finally:
            quiet = wakes.cancel(key, wake)
        return quiet and not self.ended


class Holds:
    """The held calls of one server: at most `slots` waiting at once, every one ended when
    the server stops."""

    def __init__(self, wakes: Wakes, slots: int, wait_max_ms: int, run: Run) -> None:
        self.wakes = wakes
        self.slots = slots
        self.wait_max_ms = wait_max_ms  # sync_wait_max_ms: no wait is longer
        self.run = run
        self.held = 0  # slots taken
        self.stopping = False
        self._lock = threading.Lock()
        self._open: set[Hold] = set()

    @asynccontextmanager
    async def hold(self, *, slot: bool = False) -> AsyncIterator[Hold]:
        """A hold for the call, its slot taken now with `slot` (a Subscribe, which waits
        all its life), else the first time it parks."""
        hold = Hold(self)
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

    async def read(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        timeline: Timeline,
        wait_ms: int,
        read: Callable[[], Page],
        ready: Callable[[Page], bool],
        settled: Callable[[Page], bool] | None = None,
    ) -> Page:
        """A unary read with `wait_ms` (clamped to wait_max_ms, and ending shortly before the
        call's deadline): `read()` once when 0, else held until `ready` or the wait is over,
        then the page as it is (the normal empty page)."""
        wait_s = min(wait_ms, self.wait_max_ms) / 1000
        remaining = context.time_remaining()
        if remaining is not None:
            wait_s = min(wait_s, remaining - min(ANSWER_MARGIN_S, remaining / 4))
        if wait_s <= 0:
            page: Page = await self.run(read)
            return page
        async with self.hold() as hold:
            page = await hold.until(timeline, read, ready, wait_s, settled)
        if not ready(page):
            metrics.WAITS_TIMED_OUT.inc()
        return page

    def stop(self) -> None:
        """The server stops: every held call ends now (a read answers its page, a Subscribe
        UNAVAILABLE), and any held from now on ends at once. From any thread."""
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
