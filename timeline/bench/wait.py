"""timeline-bench --scenario wait: many readers held on `wait_ms`, woken one at a time, and
what holding them costs everyone else.

N waiters, each a keep-alive connection asking `sync?member=<its own>&last_read=<its
last>&wait_ms=30000` and asking again after every reply. A sender sends one message at a time
to a random waiting member; per message, the wake-up latency is the time from the send's 200
to the reply of that member's waiter. Beside them, the other traffic (sends and syncs of
other members, at a fixed rate) is measured in alternating phases, without and with the
waiters held: the ratio of the p99s says what the held waiters cost it.

One process, one thread, non-blocking sockets (selectors): a held waiter costs this client a
socket and a few objects, so 10,000 of them fit in it beside the sender and the traffic.
Requests are HTTP/1.1 written by hand, as the load scenarios' Client writes them.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import heapq
import itertools
import json
import math
import os
import random
import resource
import selectors
import socket
import statistics
import time
import urllib.request
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any
from urllib.parse import quote, urlsplit

from timeline.bench.harness import SYNC_ENTRIES, BenchError, Client, Scenario, reply_head

NAME = "wait"
#: Each waiter's wait_ms: the service's sync_wait_max_ms, as a device following in real time.
WAIT_MS = 30_000
#: The sender's pace: one message at a time, the next at most this often (seconds).
WAKE_EVERY = 0.025
#: A wake-up not received this long after its send's 200 counts as missed (seconds).
WAKE_TIMEOUT = 10.0
#: A waiter is picked for a message once its request has been out this long (seconds): held,
#: not still being read.
HELD_FOR = 0.05
#: Waiters connected at once at most; the next batch once the service holds all but one batch.
RAMP_BATCH = 500
#: Over how long the waiters connect, by default (seconds): their waits then end evenly spread,
#: so that from the first phase on, as in a steady state, N / 30 of them a second time out and
#: ask again (connected at once, none would time out in a phase shorter than 30 s).
RAMP_S = WAIT_MS / 1000
#: After the waiters are held (or gone), before a phase is measured (seconds).
SETTLE = 0.5
#: Traffic before the first phase, not measured (seconds).
WARM_UP = 1.0
#: Descriptors beyond the sockets: the process's own files, pipes, a urllib connection.
FD_MARGIN = 256


def _percentile(values: list[float], q: float) -> float:
    """As Result.percentile: the smallest value with at least q of them at or below it."""
    ordered = sorted(values)
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def _latencies(values: list[float]) -> dict[str, float]:
    return {
        "p50": round(_percentile(values, 0.50), 3),
        "p95": round(_percentile(values, 0.95), 3),
        "p99": round(_percentile(values, 0.99), 3),
        "max": round(max(values, default=0.0), 3),
    }


def raise_fd_limit(needed: int) -> int:
    """Raise this process's RLIMIT_NOFILE to `needed` (up to the hard limit); BenchError
    when the hard limit is below it. Returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return int(soft)
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise BenchError(
            f"{needed:,} file descriptors are needed and the hard limit is {hard:,} "
            "(ulimit -Hn): ask for fewer --waiters, or raise the limit"
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    return needed


# --- The event loop: connections, one request at a time each ------------------------------

Reply = Callable[[int, bytes], None]  # (status, body); status 0: no reply (connection lost)


class _Conn:
    """One client connection, opened again when needed; at most one request in flight."""

    __slots__ = ("connected", "inbuf", "on_reply", "out", "request", "sock", "used")

    def __init__(self) -> None:
        self.sock: socket.socket | None = None  # None: closed, opened by the next request
        self.connected = False
        self.used = False  # a reply came on it: a later close may be a keep-alive timeout
        self.out = b""
        self.inbuf = bytearray()
        self.request = b""  # in flight, to send again once if a kept-alive one was closed
        self.on_reply: Reply | None = None


class _Loop:
    """A selector, timers, and HTTP/1.1 connections to one address."""

    def __init__(self, url: str, token: str | None) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http":
            raise BenchError(f"--scenario {NAME} speaks plain HTTP: {url} is not http://")
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.base = parts.path.rstrip("/")
        found = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        self.family, self.address = found[0][0], found[0][4]
        self.head = f"Host: {self.host}:{self.port}\r\nConnection: keep-alive\r\n"
        if token:
            self.head += f"Authorization: Bearer {token}\r\n"
        self.selector = selectors.DefaultSelector()
        self.timers: list[tuple[float, int, Callable[[], None]]] = []
        self.sequence = itertools.count()

    # timers

    def at(self, when: float, call: Callable[[], None]) -> None:
        heapq.heappush(self.timers, (when, next(self.sequence), call))

    def run_until(self, done: Callable[[], bool], deadline: float) -> bool:
        """Serve sockets and timers until `done()` or `deadline` (time.monotonic)."""
        while True:
            if done():
                return True
            now = time.monotonic()
            if now >= deadline:
                return False
            wait = deadline - now
            if self.timers:
                wait = min(wait, max(0.0, self.timers[0][0] - now))
            for key, _events in self.selector.select(min(wait, 0.1)):
                key.data()
            now = time.monotonic()
            while self.timers and self.timers[0][0] <= now:
                _, _, call = heapq.heappop(self.timers)
                call()

    # connections

    def connect(self) -> _Conn:
        conn = _Conn()
        self._open(conn)
        return conn

    def _open(self, conn: _Conn) -> None:
        sock = socket.socket(self.family, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        code = sock.connect_ex(self.address)
        if code not in (0, errno.EINPROGRESS, errno.EAGAIN):
            sock.close()
            raise OSError(code, f"cannot connect to {self.host}:{self.port}: {os.strerror(code)}")
        conn.sock, conn.connected, conn.inbuf = sock, False, bytearray()
        self.selector.register(sock, selectors.EVENT_WRITE, partial(self._event, conn))

    def request(
        self, conn: _Conn, method: str, path: str, body: bytes | None, on_reply: Reply
    ) -> None:
        length = f"Content-Length: {len(body)}\r\n" if body is not None else ""
        kind = "Content-Type: application/json\r\n" if body is not None else ""
        head = f"{method} {self.base}{path} HTTP/1.1\r\n{self.head}{kind}{length}\r\n".encode()
        conn.request = head + body if body is not None else head
        conn.out = conn.request
        conn.on_reply = on_reply
        if conn.sock is None:
            try:
                self._open(conn)
            except OSError:
                self._lost(conn)
        elif conn.connected:
            self._write(conn)

    def close(self, conn: _Conn) -> None:
        """Close it; a request in flight is forgotten (its reply will not be called)."""
        conn.on_reply = None
        conn.request = conn.out = b""
        self._shut(conn)

    def _shut(self, conn: _Conn) -> None:
        sock, conn.sock, conn.connected = conn.sock, None, False
        if sock is not None:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self.selector.unregister(sock)
            sock.close()

    def _event(self, conn: _Conn) -> None:
        sock = conn.sock
        if sock is None:
            return
        if not conn.connected:
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                self._lost(conn)
                return
            conn.connected = True
            self.selector.modify(sock, selectors.EVENT_READ, partial(self._event, conn))
            if conn.out:
                self._write(conn)
            return
        if conn.out:
            self._write(conn)
        if conn.sock is not None:
            self._read(conn)

    def _write(self, conn: _Conn) -> None:
        assert conn.sock is not None
        try:
            sent = conn.sock.send(conn.out)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._lost(conn)
            return
        conn.out = conn.out[sent:]
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.out else 0)
        self.selector.modify(conn.sock, events, partial(self._event, conn))

    def _read(self, conn: _Conn) -> None:
        assert conn.sock is not None
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._lost(conn)
            return
        if not data:
            self._lost(conn)
            return
        conn.inbuf += data
        parsed = _parse(conn.inbuf)
        if parsed is None:
            return
        status, close, body, used = parsed
        del conn.inbuf[:used]
        conn.used = True
        conn.request = b""
        on_reply, conn.on_reply = conn.on_reply, None
        if close:
            self._shut(conn)  # the next request opens a new one
        if on_reply is not None:
            on_reply(status, body)

    def _lost(self, conn: _Conn) -> None:
        """The connection failed or the server closed it. A request on a kept-alive
        connection that got no byte of reply was closed before it was read (a keep-alive
        timeout): sent once more, on a new connection. Otherwise its reply is status 0."""
        request, on_reply = conn.request, conn.on_reply
        resend = bool(request) and conn.used and not conn.inbuf and on_reply is not None
        self._shut(conn)
        conn.used = False
        if resend:
            conn.out = request
            with contextlib.suppress(OSError):
                self._open(conn)
                return
        conn.request = conn.out = b""
        conn.on_reply = None
        if on_reply is not None:
            on_reply(0, b"")


def _parse(buffer: bytearray) -> tuple[int, bool, bytes, int] | None:
    """A whole reply at the start of `buffer`: (status, close, body, bytes used)."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return None
    try:
        status, length, close = reply_head(bytes(buffer[:end]))
    except ValueError as exc:
        raise BenchError(str(exc)) from None
    total = end + 4 + length
    if len(buffer) < total:
        return None
    return status, close, bytes(buffer[end + 4 : total]), total


# --- The run ---------------------------------------------------------------------------------


@dataclass
class _Waiter:
    index: int
    member: str
    conn: _Conn | None = None
    last_read: int = 0
    asked_at: float = 0.0  # when its request went out; 0: none out


@dataclass
class _Wake:
    member: int  # the waiter's index
    message_id: str
    ok_at: float = 0.0  # the send's 200 came
    woken_at: float = 0.0  # its waiter's reply came


@dataclass
class Phase:
    held: bool  # the waiters were held during it
    seconds: float = 0.0
    waiters_held: float | None = None  # the service's timeline_waiters when it began
    latencies: list[float] = field(default_factory=list)  # traffic, ms
    errors: Counter[int] = field(default_factory=Counter)
    wakes: list[float] = field(default_factory=list)  # wake-up latencies, ms
    timeouts: int = 0  # waits that ended with nothing, and were asked again
    at: float = 0.0  # when it began, seconds after the run did

    def summary(self) -> dict[str, Any]:
        report: dict[str, Any] = {
            "held": self.held,
            "at": round(self.at, 3),
            "seconds": round(self.seconds, 3),
            "waiters_held": self.waiters_held,
            "requests": len(self.latencies) + sum(self.errors.values()),
            "errors": sum(self.errors.values()),
            **_latencies(self.latencies),
        }
        if self.held:
            report["wake_ups"] = len(self.wakes)
            report["wake_p99"] = round(_percentile(self.wakes, 0.99), 3)
            report["waits_timed_out"] = self.timeouts
        return report


@dataclass
class WaitResult:
    waiters: int
    concurrency: int
    rate: float
    ramp: float
    wake_every: float
    phases: list[Phase]
    wakes: list[float]  # wake-up latencies, ms
    wakes_sent: int
    wakes_missed: int
    wakes_early: int  # the waiter's reply came before the send's
    waits_timed_out: int
    waiter_errors: Counter[int]
    sender_errors: Counter[int]
    reconnects: int
    duration: float
    client_cpu: float
    verify: dict[str, Any] | None = None

    def summary(self) -> dict[str, Any]:
        """The report: wake-ups, the traffic without and with the waiters, the details."""
        without = [p for p in self.phases if not p.held]
        held = [p for p in self.phases if p.held]

        def traffic(phases: list[Phase]) -> dict[str, Any]:
            latencies = [v for p in phases for v in p.latencies]
            errors: Counter[int] = Counter()
            for p in phases:
                errors.update(p.errors)
            return {
                "requests": len(latencies) + sum(errors.values()),
                "errors": sum(errors.values()),
                "errors_by_status": {str(k): v for k, v in sorted(errors.items())},
                **_latencies(latencies),
            }

        quiet, busy = traffic(without), traffic(held)
        by_round = [
            round(h.summary()["p99"] / w.summary()["p99"], 3)
            for w, h in zip(without, held, strict=False)
            if w.latencies and h.latencies
        ]
        return {
            "scenario": NAME,
            "waiters": self.waiters,
            "wait_ms": WAIT_MS,
            "concurrency": self.concurrency,
            "traffic_rate": self.rate,
            "ramp_seconds": self.ramp,
            "wake_every_seconds": self.wake_every,
            "duration": round(self.duration, 3),
            "wake_ups": {
                "sent": self.wakes_sent,
                "received": len(self.wakes),
                "missed": self.wakes_missed,
                "before_send_reply": self.wakes_early,
                **_latencies(self.wakes),
            },
            "traffic": {
                "without_waiters": quiet,
                "with_waiters": busy,
                "p99_ratio": round(busy["p99"] / quiet["p99"], 3) if quiet["p99"] else None,
                "p99_ratio_by_round": by_round,
            },
            "phases": [p.summary() for p in self.phases],
            "waits_timed_out": self.waits_timed_out,
            "waiter_errors": {str(k): v for k, v in sorted(self.waiter_errors.items())},
            "sender_errors": {str(k): v for k, v in sorted(self.sender_errors.items())},
            "reconnects": self.reconnects,
            "errors": sum(p.summary()["errors"] for p in self.phases)
            + sum(self.waiter_errors.values())
            + sum(self.sender_errors.values()),
            "verify": self.verify,
            "client_cpu_cores": round(self.client_cpu, 2),
            "client_processes": 1,
        }


class WaitRun:
    """One run of the scenario: prepare, then phases without and with the waiters held."""

    def __init__(
        self,
        url: str,
        scenario: Scenario,
        waiters: int,
        concurrency: int,
        rate: float,
        token: str | None = None,
        progress: Callable[[float, int, int], None] | None = None,
        wake_every: float = WAKE_EVERY,
    ) -> None:
        self.url = url.rstrip("/")
        self.wake_every = wake_every
        self.scenario = scenario
        self.loop = _Loop(url, token)
        self.rng = random.Random(7)  # noqa: S311 - load shapes, not secrets
        self.waiters = [_Waiter(i, f"{scenario.run}-w{i}") for i in range(waiters)]
        self.sender = f"{scenario.run}-sender"
        self.concurrency, self.rate = concurrency, rate
        self.progress = progress
        self.phase: Phase | None = None  # measured now (traffic is booked in it)
        self.holding = False  # waiters ask again after a reply
        self.sending = False  # the sender and the traffic make new requests
        self.traffic: list[_Conn] = []
        self.idle: list[_Conn] = []
        self.queue: deque[tuple[float, Phase | None]] = deque()  # traffic due, not yet sent
        self.in_flight = 0
        self.sender_conn: _Conn | None = None
        self.wake: _Wake | None = None  # the message in flight, until its waiter has it
        self.last_send = 0.0
        self.sender_busy = False
        self.generation = 0  # of the phase: timers of an earlier one do nothing
        self.wakes: list[float] = []
        self.wakes_sent = self.wakes_missed = self.wakes_early = 0
        self.waits_timed_out = self.reconnects = 0
        self.waiter_errors: Counter[int] = Counter()
        self.sender_errors: Counter[int] = Counter()
        self.measured = 0.0  # seconds of phases done
        self.began = time.monotonic()
        self.done_requests = 0
        self.failed_requests = 0
        self._gauge_at = 0.0
        self._gauge: float | None = None
        self._metrics = True  # /metrics answers with timeline_waiters

    # --- the service's own count of held waiters ------------------------------------------

    def held_now(self, fresh: bool = False) -> float | None:
        """timeline_waiters from /metrics (read at most every 0.1 s); None without it."""
        now = time.monotonic()
        if not self._metrics or (not fresh and now - self._gauge_at < 0.1):
            return self._gauge
        self._gauge_at = now
        try:
            with urllib.request.urlopen(self.url + "/metrics", timeout=5) as reply:  # noqa: S310
                text = reply.read().decode()
        except OSError:
            self._metrics, self._gauge = False, None
            return None
        for line in text.splitlines():
            if line.startswith("timeline_waiters "):
                self._gauge = float(line.split()[1])
                return self._gauge
        self._metrics, self._gauge = False, None
        return None

    # --- waiters --------------------------------------------------------------------------

    def _ask(self, waiter: _Waiter) -> None:
        if not self.holding or waiter.conn is None:
            return
        path = (
            f"/timeline/sync?member={quote(waiter.member)}&last_read={waiter.last_read}"
            f"&wait_ms={WAIT_MS}"
        )
        waiter.asked_at = time.monotonic()
        self.loop.request(waiter.conn, "GET", path, None, lambda s, b: self._answered(waiter, s, b))

    def _answered(self, waiter: _Waiter, status: int, body: bytes) -> None:
        now = time.monotonic()
        waiter.asked_at = 0.0
        if status != 200:
            self.waiter_errors[status] += 1
            if status == 0:
                self.reconnects += 1
            self.loop.at(now + 0.1, lambda: self._ask(waiter))
            return
        page = json.loads(body)
        entries = page["entrySet"]
        if not entries:
            self.waits_timed_out += 1
            if self.phase is not None:
                self.phase.timeouts += 1
        else:
            waiter.last_read = int(page["entrySetLastSeq"])
            wake = self.wake
            if wake is not None and wake.member == waiter.index and not wake.woken_at:
                ids = {json.loads(entry["message"]).get("id") for entry in entries}
                if wake.message_id in ids:
                    wake.woken_at = now
                    self._woke(wake)
        self._ask(waiter)

    def hold(self, ramp: float, deadline: float) -> float | None:
        """Connect every waiter, evenly over `ramp` seconds, and have it ask; until the
        service holds them all (or `deadline`). Returns the service's count of held waiters,
        when it gives one."""
        self.holding = True
        count = len(self.waiters)
        step = min(RAMP_BATCH, max(1, math.ceil(count * 0.01 / ramp))) if ramp > 0 else RAMP_BATCH
        started = time.monotonic()
        opened = 0
        while opened < count:
            due = started + ramp * opened / count
            self.loop.run_until(lambda: False, due)
            batch = self.waiters[opened : opened + step]
            for waiter in batch:
                waiter.conn = self.loop.connect()
                self._ask(waiter)
            opened += len(batch)
            # Never more than a batch ahead of the service (a flood of connections would wait
            # in its listen queue, or be refused).
            ramped = partial(self._holding, opened - RAMP_BATCH, time.monotonic())
            self.loop.run_until(ramped, deadline)
        # All but a few: once waits end, some are always between a reply and the next ask.
        everyone = partial(self._holding, count - count // 100, time.monotonic())
        self.loop.run_until(everyone, deadline)
        return self.held_now(fresh=True)

    def _holding(self, target: int, since: float) -> bool:
        held = self.held_now()
        if held is not None:
            return held >= target
        # No /metrics: every request written, and some time for the service to read them.
        written = all(w.conn is None or not w.conn.out for w in self.waiters)
        return written and time.monotonic() - since > 0.2 + len(self.waiters) / 5000

    def let_go(self, deadline: float) -> None:
        """Close every waiter's connection; until the service holds none (or `deadline`)."""
        self.holding = False
        for waiter in self.waiters:
            if waiter.conn is not None:
                self.loop.close(waiter.conn)
                waiter.conn = None
            waiter.asked_at = 0.0
        self.loop.run_until(lambda: (self.held_now() or 0.0) <= 0, deadline)

    # --- the sender: one message at a time to a waiting member ----------------------------

    def _send_next(self, generation: int) -> None:
        if generation != self.generation or not self.sending or self.sender_conn is None:
            return  # a timer of an earlier phase, or the phase is over
        if self.sender_busy or self.wake is not None:
            return  # one at a time: called again when that one is done
        now = time.monotonic()
        every = self.wake_every
        if now < self.last_send + every:
            self.loop.at(self.last_send + every, partial(self._send_next, generation))
            return
        waiter = self._pick(now)
        if waiter is None:
            self.loop.at(now + every, partial(self._send_next, generation))
            return
        self.last_send = now
        self.sender_busy = True
        message_id = f"{self.scenario.run}-{next(self.scenario.counter)}"
        body = {
            "from": self.sender,
            "to": waiter.member,
            "message": {"id": message_id},
            "client_msg_id": message_id,
        }
        timelines = _timelines(self.sender, waiter.member)
        wake = _Wake(waiter.index, message_id) if self.holding else None
        self.wake = wake

        def sent(status: int, _body: bytes) -> None:
            self.sender_busy = False
            if status == 200:
                self.scenario.ledger.record(timelines, [], message_id)
            else:
                self.scenario.ledger.record([], timelines, message_id)
            if status != 200:
                self.sender_errors[status] += 1
            if wake is None:
                self._send_next(generation)
                return
            if status != 200:
                self._next_wake()  # stored or not: no wake-up to wait for
                return
            self.wakes_sent += 1
            wake.ok_at = time.monotonic()
            if wake.woken_at:
                self._woke(wake)
            else:
                self.loop.at(wake.ok_at + WAKE_TIMEOUT, lambda: self._wake_timeout(wake))

        self.loop.request(
            self.sender_conn, "POST", "/timeline/send", json.dumps(body).encode(), sent
        )

    def _pick(self, now: float) -> _Waiter | None:
        if not self.holding:
            return self.rng.choice(self.waiters)
        for _ in range(50):
            waiter = self.rng.choice(self.waiters)
            if waiter.asked_at and now - waiter.asked_at >= HELD_FOR:
                return waiter
        return None

    def _woke(self, wake: _Wake) -> None:
        if not wake.ok_at or self.wake is not wake:
            return  # the send's own reply is still to come
        if wake.woken_at < wake.ok_at:
            self.wakes_early += 1
        latency = max(0.0, wake.woken_at - wake.ok_at) * 1000
        self.wakes.append(latency)
        if self.phase is not None:
            self.phase.wakes.append(latency)
        self._next_wake()

    def _wake_timeout(self, wake: _Wake) -> None:
        if self.wake is wake:
            self.wakes_missed += 1
            self._next_wake()

    def _next_wake(self) -> None:
        self.wake = None
        self._send_next(self.generation)

    # --- the other traffic: sends and syncs of other members, at a fixed rate -------------

    def _arrive(self, when: float, generation: int) -> None:
        if generation != self.generation or not self.sending:
            return
        self.queue.append((when, self.phase))
        self._dispatch()
        following = when + 1 / self.rate
        self.loop.at(following, partial(self._arrive, following, generation))

    def _dispatch(self) -> None:
        while self.idle and self.queue:
            due, phase = self.queue.popleft()
            self._issue(self.idle.pop(), due, phase)

    def _issue(self, conn: _Conn, due: float, phase: Phase | None) -> None:
        self.in_flight += 1
        scenario = self.scenario
        if self.rng.random() < 0.5:
            reader = self.rng.choice(scenario.readers)
            path = f"/timeline/sync?member={quote(reader)}&last_read=0&count={SYNC_ENTRIES}"
            method, body, booked = "GET", None, None
        else:
            sender, receiver = self.rng.sample(scenario.users, 2)
            message_id = f"{scenario.run}-{next(scenario.counter)}"
            path, method = "/timeline/send", "POST"
            body = json.dumps(
                {
                    "from": sender,
                    "to": receiver,
                    "message": {"id": message_id},
                    "client_msg_id": message_id,
                }
            ).encode()
            booked = (_timelines(sender, receiver), message_id)

        def answered(status: int, _body: bytes) -> None:
            self.in_flight -= 1
            if booked is not None:
                timelines, message_id = booked
                if status == 200:
                    scenario.ledger.record(timelines, [], message_id)
                else:
                    scenario.ledger.record([], timelines, message_id)
            if phase is not None:
                self.done_requests += 1
                if status == 200:
                    phase.latencies.append((time.monotonic() - due) * 1000)
                else:
                    phase.errors[status] += 1
                    self.failed_requests += 1
            self.idle.append(conn)
            if self.rate <= 0 and self.sending:
                self.queue.append((time.monotonic(), self.phase))
            self._dispatch()

        self.loop.request(conn, method, path, body, answered)

    # --- phases ---------------------------------------------------------------------------

    def _start(self, phase: Phase | None) -> None:
        """Traffic and the sender on fresh connections, booking into `phase` (None: not
        measured)."""
        self.phase = phase
        self.sending = True
        self.generation += 1
        self.traffic = [self.loop.connect() for _ in range(self.concurrency)]
        self.idle = list(self.traffic)
        self.sender_conn = self.loop.connect()
        now = time.monotonic()
        if self.rate > 0:
            self._arrive(now, self.generation)
        else:
            self.queue.extend((now, phase) for _ in range(self.concurrency))
            self._dispatch()
        self.last_send = 0.0
        self._send_next(self.generation)

    def _stop(self) -> None:
        """No new requests; until those in flight (and the wake-up awaited) are answered."""
        self.sending = False
        self.queue.clear()
        self.loop.run_until(
            lambda: self.in_flight == 0 and self.wake is None,
            time.monotonic() + WAKE_TIMEOUT + 5,
        )
        for conn in [*self.traffic, *([self.sender_conn] if self.sender_conn else [])]:
            self.loop.close(conn)
        self.traffic, self.idle, self.sender_conn, self.in_flight = [], [], None, 0
        self.wake, self.sender_busy, self.phase = None, False, None

    def _measure(self, phase: Phase, seconds: float) -> None:
        self._start(phase)
        started = time.monotonic()
        phase.at = started - self.began
        end = started + seconds

        def tick() -> None:
            now = time.monotonic()
            if self.progress is not None:
                self.progress(
                    self.measured + min(now, end) - started,
                    self.done_requests + len(self.wakes),
                    self.failed_requests + self.wakes_missed,
                )
            if now < end:
                self.loop.at(now + 0.2, tick)

        tick()
        self.loop.run_until(lambda: False, end)
        phase.seconds = time.monotonic() - started
        self.measured += phase.seconds
        self._stop()

    def run(self, seconds: float, phases: int, ramp: float = RAMP_S) -> list[Phase]:
        """`phases` phases of seconds/phases each, alternating without and with the waiters
        held (without first); traffic runs through all of them."""
        done: list[Phase] = []
        self._start(None)
        self.loop.run_until(lambda: False, time.monotonic() + WARM_UP)
        self._stop()
        for number in range(phases):
            phase = Phase(held=number % 2 == 1)
            if phase.held:
                limit = time.monotonic() + ramp + 60 + len(self.waiters) / 100
                phase.waiters_held = self.hold(ramp, limit)
                # What the client keeps for its waiters is not collected again and again: a
                # pause of the load generator's own would be booked as the service's.
                gc.collect()
                gc.freeze()
            else:
                phase.waiters_held = self.held_now(fresh=True)
            self.loop.run_until(lambda: False, time.monotonic() + SETTLE)
            self._measure(phase, seconds / phases)
            if phase.held:
                self.let_go(time.monotonic() + 30)
                gc.unfreeze()
            done.append(phase)
        return done


def _timelines(sender: str, receiver: str) -> list[tuple[str, str]]:
    """What a one-to-one message writes, as the Ledger names it."""
    return [("history", ":".join(sorted((sender, receiver)))), ("sync", sender), ("sync", receiver)]


def run_wait(
    url: str,
    waiters: int,
    duration: float,
    phases: int,
    concurrency: int,
    rate: float,
    ramp: float = RAMP_S,
    token: str | None = None,
    progress: Callable[[float, int, int], None] | None = None,
    scenario: Scenario | None = None,
    wake_every: float = WAKE_EVERY,
) -> tuple[WaitResult, Scenario]:
    """The scenario against the service at `url`: its result, and the Scenario whose ledger
    holds every message it sent (for verify)."""
    raise_fd_limit(waiters + concurrency + FD_MARGIN)
    # Readers of 20 entries and conversations that exist, as the mixed scenario has them.
    scenario = scenario or Scenario("mixed", 1)
    scenario.prepare(Client(url, token))
    cpu, started = time.process_time(), time.monotonic()
    run = WaitRun(url, scenario, waiters, concurrency, rate, token, progress, wake_every)
    try:
        done = run.run(duration, phases, ramp)
    finally:
        run.let_go(time.monotonic() + 5)
        run.loop.selector.close()
    elapsed = time.monotonic() - started
    result = WaitResult(
        waiters=waiters,
        concurrency=concurrency,
        rate=rate,
        ramp=ramp,
        wake_every=wake_every,
        phases=done,
        wakes=run.wakes,
        wakes_sent=run.wakes_sent,
        wakes_missed=run.wakes_missed,
        wakes_early=run.wakes_early,
        waits_timed_out=run.waits_timed_out,
        waiter_errors=run.waiter_errors,
        sender_errors=run.sender_errors,
        reconnects=run.reconnects,
        duration=run.measured,
        client_cpu=(time.process_time() - cpu) / max(elapsed, 1e-9),
    )
    return result, scenario


def _counts(by_status: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in by_status.items()) or "0"


def table(report: dict[str, Any]) -> str:
    """The final table of a wait run, for a terminal."""
    wake, traffic = report["wake_ups"], report["traffic"]
    held = [p["waiters_held"] for p in report["phases"] if p["held"]]
    counted = [h for h in held if h is not None]
    without, busy = traffic["without_waiters"], traffic["with_waiters"]

    def line(t: dict[str, Any]) -> str:
        return (
            f"{t['requests']:,} requests, p50 {t['p50']:.2f} ms, p99 {t['p99']:.2f} ms, "
            f"max {t['max']:.2f} ms" + (f", {t['errors']} errors" if t["errors"] else "")
        )

    by_round = traffic["p99_ratio_by_round"]
    ratio = traffic["p99_ratio"]
    rows = [
        ("scenario", f"wait ({report['waiters']:,} waiters, wait_ms={report['wait_ms']})"),
        ("phases", f"{len(report['phases'])}, without and with the waiters held, alternating; "
                   f"{report['duration']:.1f} s measured"),
        ("waiters held", (f"{min(counted):,.0f}-{max(counted):,.0f} (the service's "
                          "timeline_waiters as each held phase began)") if counted
         else "not reported (no timeline_waiters at /metrics)"),
        ("wake-ups", f"{wake['sent']:,} sent, {wake['received']:,} received, "
                     f"{wake['missed']} missed (one at a time, at most every "
                     f"{report['wake_every_seconds'] * 1000:g} ms)"),
        ("wake-up latency", f"p50 {wake['p50']:.2f} ms, p99 {wake['p99']:.2f} ms, "
                            f"max {wake['max']:.2f} ms (from the send's 200 to the reply)"),
        ("traffic", f"{report['concurrency']} connections, "
                    + (f"{report['traffic_rate']:g} requests/s" if report["traffic_rate"] > 0
                       else "back to back") + ", sends and syncs of other members"),
        ("  without waiters", line(without)),
        ("  with waiters", line(busy)),
        ("  p99 ratio", (f"{ratio:.2f}" if ratio is not None else "-")
         + (f" (by round: {statistics.median(by_round):.2f}, "
            f"{min(by_round):.2f}-{max(by_round):.2f})" if by_round else "")),
        ("waits timed out", f"{report['waits_timed_out']:,} (asked again; the waiters connected "
                            f"over {report['ramp_seconds']:g} s before each held phase)"),
        ("errors", f"waiters: {_counts(report['waiter_errors'])}; "
                   f"sender: {_counts(report['sender_errors'])}"),
        ("load generator CPU", f"{report['client_cpu_cores']:.2f} cores"),
    ]  # fmt: skip
    if report["verify"] is not None:
        verdict = report["verify"]
        rows.append(
            ("verify", f"{'ok' if verdict['ok'] else 'FAILED'} ({verdict['timelines']} timelines)")
        )
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
