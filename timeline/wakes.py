"""Waking readers that wait for a timeline's next entries (`wait_ms`): who waits in this
process, and the Redis channel that tells every process, on every host, that timelines got
entries.

Borrowed, not built: Redis pub/sub through redis-py (PUBLISH and one subscribed connection
per process), in each of the three Redis modes. A wake-up carries no data: the waiter reads
its page again from its own `last_read`, as any reader does, so a wake-up that is late,
repeated or spurious costs a read and never a message (the lesson of push-then-pull chat
services: a gap between push and pull loses messages, a pull after a bare wake cannot).

No lost wake-up. A waiter takes a token (`watch`) before it reads. A wake-up for its timeline
after that changes the token, and so does every (re)subscription of the listener (a message
published while it was not subscribed is lost to it): parking with a stale token is refused,
and the waiter reads again at once. The writer publishes after its copies are stored, so
either the waiter's read sees them, or the wake-up comes after its token was taken.

A parked waiter is a callback, nothing more: the HTTP worker's main loop holds the
connection (no thread), a thread elsewhere (the Flask test client, gRPC) waits on an Event.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

from timeline.model import Kind, Timeline

log = logging.getLogger(__name__)

#: The channel, under the deployment's key prefix.
CHANNEL = "wake"
#: How long the listener waits between tries to subscribe again after losing Redis.
_RETRY_S = (0.05, 0.1, 0.2, 0.5, 1.0)

Token = tuple[int, int]


def _metrics() -> Any:
    # Not at import: the HTTP worker's module imports this one in gunicorn's master, before
    # the metrics directory exists (prometheus_client opens its files at import).
    from timeline import metrics

    return metrics


#: In a request's WSGI environ. CAN_PARK: set by the HTTP worker (timeline.worker), which can
#: hold a waiting read without a thread: a read with nothing to return then raises Parked,
#: the API leaves it under PARKED, and the worker runs the request again when woken (with
#: WAIT_UNTIL, the same deadline) or at its deadline (with SETTLED, the page it parked on,
#: when nothing can have changed it: see Parked).
CAN_PARK = "timeline.can_park"
PARKED = "timeline.parked"
WAIT_UNTIL = "timeline.wait_until"
SETTLED = "timeline.settled"


class Parked(Exception):
    """A read with nothing to return yet, to be held until `wakes` wakes `key` (`token`
    says since when) or `deadline` (time.monotonic) passes.

    `page` is the reply (its JSON: bytes, which the collector need not walk) when the
    deadline comes and nothing woke it, so that the read need not run again: only a read
    whose emptiness a wake-up is sure to end carries one (a sync with nothing allocated
    beyond `last_read`: whatever comes next is a write that publishes once stored). One
    stopped before a hole does not (a hole can be sealed without a wake-up, and readers seal
    old ones themselves): it reads again."""

    # Slots, and no args: a held request keeps this, and the cycle collector walks each
    # object it keeps (a dict and a tuple more, per waiter, otherwise).
    __slots__ = ("deadline", "key", "page", "token", "wakes")

    def __init__(
        self, wakes: Wakes, key: str, token: Token, deadline: float, page: bytes | None = None
    ) -> None:
        super().__init__()
        self.wakes, self.key, self.token, self.deadline = wakes, key, token, deadline
        self.page = page


def key_of(timeline: Timeline) -> str:
    """A timeline as the channel names it: `s:<member>` or `h:<conversation>`."""
    return ("s:" if timeline.kind is Kind.SYNC else "h:") + timeline.id


class Wakes:
    """Waiters of this process, by timeline, and the listener that wakes them."""

    def __init__(self, redis: Any, channel: str) -> None:
        self._redis = redis  # timeline.allocator.Redis: publish() and pubsub()
        self.channel = channel
        self._lock = threading.Lock()
        self._era = 0  # changes whenever the listener (re)subscribes: every token then does
        # Per timeline watched: [epoch (wake-ups since it was first watched), watchers].
        self._watched: dict[str, list[int]] = {}
        self._parked: dict[str, list[Callable[[], None]]] = {}
        self.listening = False
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._pubsub: Any = None
        self._queue: list[str] = []
        self._queued = threading.Condition(threading.Lock())

    # --- waiters ----------------------------------------------------------------------------

    def watch(self, key: str) -> Token:
        """Before reading: the token a wake-up after this changes."""
        with self._lock:
            entry = self._watched.setdefault(key, [0, 0])
            entry[1] += 1
            return self._era, entry[0]

    def unwatch(self, key: str) -> None:
        """The read found entries (or the wait is over): no parking."""
        with self._lock:
            self._release(key)

    def park(self, key: str, token: Token, wake: Callable[[], None]) -> bool:
        """Call `wake` (once, from the listener's thread) at the next wake-up of `key`, unless
        one came since `token` was taken: then False, and the caller reads again now. The
        watch is the parked waiter's until it is woken or cancelled."""
        with self._lock:
            entry = self._watched.get(key)
            if entry is None or token != (self._era, entry[0]):
                self._release(key)
                return False
            self._parked.setdefault(key, []).append(wake)
            _metrics().WAITERS.inc()
            return True

    def cancel(self, key: str, wake: Callable[[], None]) -> bool:
        """The waiter gives up (its wait is over, its client went away); nothing if it was
        woken already. True when nothing for `key` can have been published since it parked:
        it was not woken, and the listener has held the channel all along (a loss ends in
        a resubscription, which wakes every waiter; until then `listening` is False)."""
        with self._lock:
            parked = self._parked.get(key)
            if parked is None or wake not in parked:
                return False
            parked.remove(wake)
            if not parked:
                del self._parked[key]
            _metrics().WAITERS.dec()
            self._release(key)
            return self.listening

    def wait(self, key: str, token: Token, timeout_s: float) -> bool:
        """In a thread: until the next wake-up of `key` (or one since `token`), at most
        `timeout_s`. For callers with a thread to spare; the HTTP worker parks instead.
        True when it timed out with nothing published for `key` meanwhile (as `cancel`)."""
        woken = threading.Event()
        if not self.park(key, token, woken.set):
            return False
        try:
            woken.wait(timeout_s)
        finally:
            quiet = self.cancel(key, woken.set)
        return quiet

    def _release(self, key: str) -> None:
        entry = self._watched.get(key)
        if entry is not None:
            entry[1] -= 1
            if entry[1] <= 0:
                del self._watched[key]

    def _wake(self, keys: Iterable[str]) -> None:
        woken: list[Callable[[], None]] = []
        with self._lock:
            for key in keys:
                entry = self._watched.get(key)
                if entry is None:
                    continue  # nobody here waits for it
                entry[0] += 1
                for wake in self._parked.pop(key, ()):
                    woken.append(wake)
                    self._release(key)
            _metrics().WAITERS.dec(len(woken))
        for wake in woken:
            wake()

    def _wake_all(self) -> None:
        """The listener (re)subscribed: what was published meanwhile is lost to it, so every
        token changes and every parked waiter reads again."""
        with self._lock:
            self._era += 1
            woken = [(key, wake) for key, wakes in self._parked.items() for wake in wakes]
            self._parked.clear()
            for key, _ in woken:
                self._release(key)
            _metrics().WAITERS.dec(len(woken))
        for _, wake in woken:
            wake()

    # --- the channel ------------------------------------------------------------------------

    def publish(self, timelines: Iterable[Timeline]) -> None:
        """Tell every process these timelines got entries (after they are stored). Off the
        request's path: the keys are queued for the publisher thread, which sends what
        has queued since its last PUBLISH in one (under load, many sends' in one), so a
        send pays no Redis round trip for it. A failure is logged, never raised: the
        message is stored, and a waiter reads it at its deadline, or sooner when the
        listener resubscribes (the same if this process dies before publishing)."""
        keys = [key_of(timeline) for timeline in timelines]
        if keys:
            with self._queued:
                self._queue.extend(keys)
                self._queued.notify()

    def _publish(self) -> None:
        while True:
            with self._queued:
                while not self._queue and not self._stopping.is_set():
                    self._queued.wait()
                if not self._queue:
                    return
                keys, self._queue = self._queue, []
            payload = "\n".join(dict.fromkeys(keys)).encode()
            try:
                self._redis.publish(self.channel, payload)
            except Exception as exc:  # Redis refused: the waiters read at their deadline
                _metrics().WAKES_LOST.inc()
                log.warning("wake-up not published: %s", exc)

    def start(self) -> None:
        """The listener, subscribed to the channel, and the publisher: daemon threads of
        this process."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._listen, name="timeline-wakes", daemon=True)
            self._thread.start()
            threading.Thread(
                target=self._publish, name="timeline-wake-publish", daemon=True
            ).start()

    def stop(self) -> None:
        self._stopping.set()
        with self._queued:
            self._queued.notify()
        pubsub = self._pubsub
        if pubsub is not None:
            try:
                pubsub.close()
            except Exception:  # closing a broken connection
                log.debug("closing the wake-up subscription failed", exc_info=True)

    def _rediscover(self) -> None:
        """Before subscribing again after a loss, on a Redis Cluster: read the slot map
        again. redis-py subscribes on the master of the channel's slot as its map says, and
        reads the map again only after one of its own commands failed (when the next command
        runs), never after a subscription failed: once that master is killed and a replica
        took over, the listener would otherwise try the dead node for as long as nothing
        else this process sends meets it (a quiet process, or traffic that touches only the
        other masters), and every waiter would sleep to its deadline. A map read while the
        failover is still under way still names the dead node: the next try reads it again.
        (Sentinel needs nothing: its pool asks the sentinels for the primary at every
        connection.)"""
        if getattr(self._redis, "mode", None) == "cluster":
            self._redis.client.nodes_manager.initialize()

    def _listen(self) -> None:
        tries = 0
        while not self._stopping.is_set():
            try:
                if tries:
                    self._rediscover()
                self._pubsub = pubsub = self._redis.pubsub()
                pubsub.subscribe(self.channel)
                subscribed = False
                while not self._stopping.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message is None:
                        continue
                    if message["type"] == "subscribe":
                        subscribed = self.listening = True
                        tries = 0
                        self._wake_all()  # what was published before this is lost to us
                    elif message["type"] == "message" and subscribed:
                        data = message["data"]
                        text = data.decode() if isinstance(data, bytes) else str(data)
                        self._wake(text.split("\n"))
            except Exception as exc:  # Redis gone, failing over, restarting
                if self._stopping.is_set():
                    return
                self.listening = False
                # Once per loss, not per try: Redis may stay away for a while.
                (log.debug if tries else log.warning)(
                    "wake-up channel lost, subscribing again: %s", exc
                )
            finally:
                self.listening = False
                pubsub, self._pubsub = self._pubsub, None
                if pubsub is not None:
                    try:
                        pubsub.close()
                    except Exception:
                        log.debug("closing the wake-up subscription failed", exc_info=True)
            self._stopping.wait(_RETRY_S[min(tries, len(_RETRY_S) - 1)])
            tries += 1
