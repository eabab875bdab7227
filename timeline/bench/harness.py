"""The load engine of timeline-bench: keep-alive HTTP workers, scenarios, statistics, verify.

Plain threads and http.client: one persistent connection per worker, no dependency beyond the
standard library, and the harness measures its own CPU so a saturated load generator is seen.
"""

from __future__ import annotations

import http.client
import itertools
import json
import math
import multiprocessing
import random
import socket
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

SCENARIOS = ("send", "sendGroup", "sync", "mixed")
SYNC_ENTRIES = 20  # what a sync request returns in the sync scenario
SEND_USERS = 30  # the user pool of the send scenario: 435 conversations
RETRIES = 3  # more attempts of a send whose outcome is not final
RETRY_PAUSE = 0.05  # seconds before the first of them, doubling


class BenchError(RuntimeError):
    """The service refused what the run needs (preparing it, reading back): no report."""


class Client:
    """One keep-alive connection; reconnects when the server closes it.

    HTTP/1.1 by hand on a plain socket: requests are a few bytes built at once, replies are
    read by Content-Length. http.client parses every header through the email package, which
    cost the harness more CPU per request than the socket work itself; on a machine that
    also runs the service, that CPU is taken from the service being measured. https:// URLs
    go through http.client (TLS is not what this tool measures).
    """

    def __init__(self, url: str, token: str | None = None, timeout: float = 30.0) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.https = parts.scheme == "https"
        self.base = parts.path.rstrip("/")
        self.timeout = timeout
        self.headers = {"Content-Type": "application/json", "Connection": "keep-alive"}
        if token:
            self.headers["Authorization"] = f"Bearer {token}"
        self._head = "".join(f"{k}: {v}\r\n" for k, v in self.headers.items())
        self._head += f"Host: {self.host}:{self.port}\r\n"
        self.conn: http.client.HTTPConnection | None = None
        self.sock: socket.socket | None = None
        self.buffer = b""

    def _connect(self) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
        return cls(self.host, self.port, timeout=self.timeout)

    def request(
        self, method: str, path: str, body: Any = None, parse: bool = True
    ) -> tuple[int, Any]:
        """(status, the reply's JSON); with `parse` False the reply is read, not decoded."""
        data = None if body is None else json.dumps(body).encode()
        if self.https:
            return self._request_tls(method, path, data)
        reused = self.sock is not None
        try:
            self._send(method, path, data)
        except OSError:
            # A kept-alive connection the server had closed: the request never left; send it
            # once more on a new one. Anything later (no reply) is not retried: the server
            # may have done it, and a second POST would be a second message.
            self.close()
            if not reused:
                raise
            self._send(method, path, data)
        try:
            status, close, payload = self._receive()
        except OSError as exc:
            self.close()
            closed_idle = isinstance(exc, _Closed) and exc.before_reply and reused
            if closed_idle or (method == "GET" and isinstance(exc, ConnectionError)):
                # Closed by the server before it read the request (a keep-alive timeout), or
                # a read cut off: once more on a new connection, which a GET can always be.
                self._send(method, path, data)
                status, close, payload = self._receive()
            else:
                raise
        if close:
            self.close()
        if not parse:
            return status, None
        try:
            return status, json.loads(payload) if payload else None
        except ValueError:
            return status, None

    def _send(self, method: str, path: str, data: bytes | None) -> None:
        if self.sock is None:
            self.sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.buffer = b""
        length = f"Content-Length: {len(data)}\r\n" if data is not None else ""
        head = f"{method} {self.base}{path} HTTP/1.1\r\n{self._head}{length}\r\n".encode()
        self.sock.sendall(head + data if data is not None else head)

    def _receive(self) -> tuple[int, bool, bytes]:
        """(status, whether the server closes the connection, body)."""
        assert self.sock is not None
        buffer = self.buffer
        while (end := buffer.find(b"\r\n\r\n")) < 0:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise _Closed(before_reply=not buffer)
            buffer += chunk
        try:
            status, length, close = reply_head(bytes(buffer[:end]))
        except ValueError as exc:
            raise http.client.HTTPException(str(exc)) from None
        buffer = buffer[end + 4 :]
        while len(buffer) < length:
            chunk = self.sock.recv(max(65536, length - len(buffer)))
            if not chunk:
                raise _Closed(before_reply=False)
            buffer += chunk
        self.buffer = buffer[length:]
        return status, close, buffer[:length]

    def _request_tls(self, method: str, path: str, data: bytes | None) -> tuple[int, Any]:
        reused = self.conn is not None
        if self.conn is None:
            self.conn = self._connect()
        try:
            self.conn.request(method, self.base + path, body=data, headers=self.headers)
        except OSError:
            self.close()
            if not reused:
                raise
            self.conn = self._connect()
            self.conn.request(method, self.base + path, body=data, headers=self.headers)
        try:
            reply = self.conn.getresponse()
            payload = reply.read()
        except (http.client.HTTPException, OSError) as exc:
            self.close()
            closed_idle = isinstance(exc, http.client.RemoteDisconnected) and reused
            if closed_idle or (method == "GET" and isinstance(exc, ConnectionError)):
                self.conn = self._connect()
                self.conn.request(method, self.base + path, body=data, headers=self.headers)
                reply = self.conn.getresponse()
                payload = reply.read()
            else:
                raise
        if reply.getheader("Connection", "").lower() == "close":
            self.close()
        try:
            return reply.status, json.loads(payload) if payload else None
        except ValueError:
            return reply.status, None

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None
            self.buffer = b""


def reply_head(head: bytes) -> tuple[int, int, bool]:
    """A reply's status, Content-Length and whether the server closes the connection, from
    its head (up to the blank line). ValueError for a chunked reply: the service sends none."""
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length, close = 0, False
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == "connection":
            close = value.strip().lower() == "close"
        elif name == "transfer-encoding":
            raise ValueError("chunked replies are not expected here")
    return status, length, close


class _Closed(ConnectionError):
    """The server closed the connection; `before_reply`: before any byte of the reply."""

    def __init__(self, before_reply: bool) -> None:
        super().__init__("the server closed the connection")
        self.before_reply = before_reply


@dataclass
class Sample:
    started: float  # seconds since the run began
    latency_ms: float
    status: int  # 0: no reply (connection error)


@dataclass
class Ledger:
    """What the run sent, to verify afterwards: message ids per timeline, acknowledged (a 200
    says the copy is stored) or uncertain (an error, or a member in failedMembers)."""

    acknowledged: dict[tuple[str, str], set[str]] = field(default_factory=lambda: defaultdict(set))
    uncertain: dict[tuple[str, str], set[str]] = field(default_factory=lambda: defaultdict(set))
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(
        self,
        stored: list[tuple[str, str]],
        unsure: list[tuple[str, str]],
        message_id: str,
    ) -> None:
        with self.lock:
            for timeline in stored:
                self.acknowledged[timeline].add(message_id)
            for timeline in unsure:
                self.uncertain[timeline].add(message_id)


@dataclass
class Result:
    scenario: str
    concurrency: int
    duration: float
    samples: list[Sample]
    copies: Counter[str]  # documents written by acknowledged requests: history, sync
    client_cpu: float  # cores the harness itself used on average
    group_size: int = 0
    verify: dict[str, Any] | None = None
    processes: int = 1

    @property
    def requests(self) -> int:
        return len(self.samples)

    def percentile(self, q: float) -> float:
        latencies = sorted(s.latency_ms for s in self.samples)
        if not latencies:
            return 0.0
        return latencies[min(len(latencies) - 1, max(0, math.ceil(q * len(latencies)) - 1))]

    @property
    def errors(self) -> Counter[int]:
        return Counter(s.status for s in self.samples if s.status != 200)

    def summary(self) -> dict[str, Any]:
        """The report: the keys the issue fixes first, then the details."""
        duration = max(self.duration, 1e-9)
        return {
            "scenario": self.scenario,
            "concurrency": self.concurrency,
            "duration": round(self.duration, 3),
            "requests_per_second": round(self.requests / duration, 1),
            "messages_per_second": round(
                (self.copies["history"] + self.copies["sync"]) / duration, 1
            ),
            "p50": round(self.percentile(0.50), 3),
            "p95": round(self.percentile(0.95), 3),
            "p99": round(self.percentile(0.99), 3),
            "max": round(max((s.latency_ms for s in self.samples), default=0.0), 3),
            "errors": sum(self.errors.values()),
            "verify": self.verify,
            "requests": self.requests,
            "errors_by_status": {str(k): v for k, v in sorted(self.errors.items())},
            "history_copies_per_second": round(self.copies["history"] / duration, 1),
            "sync_copies_per_second": round(self.copies["sync"] / duration, 1),
            "group_size": self.group_size,
            "retries": self.copies["retries"],
            "client_cpu_cores": round(self.client_cpu, 2),
            "client_processes": self.processes,
        }


class Scenario:
    """Builds each worker's next request and books what it writes."""

    def __init__(self, name: str, group_size: int, run_id: str | None = None) -> None:
        if name not in SCENARIOS:
            raise ValueError(f"unknown scenario {name!r}")
        self.name = name
        self.group_size = group_size
        self.run = run_id or uuid.uuid4().hex[:8]
        self.ledger = Ledger()
        self.counter = itertools.count()
        self.users = [f"{self.run}-u{i}" for i in range(SEND_USERS)]
        self.members = [f"{self.run}-m{i}" for i in range(group_size)]
        self.readers = [f"{self.run}-r{i}" for i in range(8)]

    def prepare(self, client: Client) -> None:
        """Bring the run to the steady state it measures.

        The sync scenario reads timelines of SYNC_ENTRIES entries: they are written first.
        The send scenarios measure conversations that already exist: one message in each
        first, since a timeline's first message also seeds its counter from the store.
        """
        if self.name in ("send", "mixed"):
            for i, sender in enumerate(self.users):
                for receiver in self.users[i + 1 :]:
                    status, _ = self._send(sender, receiver)(client)
                    if status != 200:
                        raise BenchError(f"preparing the send scenario failed: {status}")
        if self.name in ("sendGroup", "mixed"):
            status, _ = self._group(0)(client)
            if status != 200:
                raise BenchError(f"preparing the sendGroup scenario failed: {status}")
        if self.name in ("sync", "mixed"):
            for reader in self.readers:
                body = {
                    "group_name": f"{self.run}-prep",
                    "group_members": [reader],
                    "messages": [{"n": i} for i in range(SYNC_ENTRIES)],
                }
                status, reply = client.request("POST", "/timeline/sendGroup", body)
                if status != 200:
                    raise BenchError(f"preparing the sync scenario failed: {status} {reply}")

    def next(self, worker: int, rng: random.Random) -> Callable[[Client], tuple[int, Counter[str]]]:
        kind = self.name
        if kind == "mixed":
            kind = rng.choices(("sync", "send", "sendGroup"), weights=(7, 2, 1))[0]
        if kind == "sync":
            reader = rng.choice(self.readers)
            path = f"/timeline/sync?member={quote(reader)}&last_read=0&count={SYNC_ENTRIES}"
            return lambda client: (client.request("GET", path, parse=False)[0], Counter())
        if kind == "send":
            sender, receiver = rng.sample(self.users, 2)
            return self._send(sender, receiver)
        return self._group(worker)

    def _send(self, sender: str, receiver: str) -> Callable[[Client], tuple[int, Counter[str]]]:
        message_id = f"{self.run}-{next(self.counter)}"
        body = {"from": sender, "to": receiver, "message": {"id": message_id}}
        conversation = ":".join(sorted((sender, receiver)))
        timelines = [("history", conversation), ("sync", sender), ("sync", receiver)]
        return self._call("/timeline/send", body, message_id, timelines)

    def _group(self, worker: int) -> Callable[[Client], tuple[int, Counter[str]]]:
        message_id = f"{self.run}-{next(self.counter)}"
        group = f"{self.run}-g{worker}"
        members = self.members or [f"{self.run}-m0"]
        body = {"group_name": group, "group_members": members, "message": {"id": message_id}}
        timelines = [("history", group)] + [("sync", m) for m in members]
        return self._call("/timeline/sendGroup", body, message_id, timelines)

    def _call(
        self, path: str, body: dict[str, Any], message_id: str, timelines: list[tuple[str, str]]
    ) -> Callable[[Client], tuple[int, Counter[str]]]:
        # As the README tells clients: an id of the message's own, and the same request again
        # while the outcome is not final (a 5xx, failedMembers, a dropped connection).
        body = body | {"client_msg_id": message_id}

        def call(client: Client) -> tuple[int, Counter[str]]:
            copies: Counter[str] = Counter()
            lost: OSError | None = None
            for attempt in range(RETRIES + 1):
                if attempt:
                    copies["retries"] += 1
                    time.sleep(min(RETRY_PAUSE * 2 ** (attempt - 1), 1.0))
                try:
                    status, reply = client.request("POST", path, body)
                except OSError as exc:
                    status, reply, lost = 0, None, exc  # sent, or not: unknown
                    continue
                failed = reply.get("failedMembers", []) if status == 200 and reply else []
                if status < 500 and not failed:
                    break
            if lost is not None and status == 0:
                self.ledger.record([], timelines, message_id)
                raise lost
            if status == 200:
                missing = {("sync", member) for member in failed}
                stored = [t for t in timelines if t not in missing]
                self.ledger.record(stored, sorted(missing), message_id)
            else:
                self.ledger.record([], timelines, message_id)
            if status == 200:
                copies["history"] = 1
                copies["sync"] = len(timelines) - 1 - len(failed)
            return status, copies

        return call


def run(
    url: str,
    scenario: Scenario,
    concurrency: int,
    duration: float | None = None,
    requests: int | None = None,
    token: str | None = None,
    progress: Callable[[float, int, int], None] | None = None,
    processes: int = 1,
) -> Result:
    """Drive the service until `duration` seconds pass or `requests` are made, with
    `concurrency` keep-alive workers spread over `processes` processes (one interpreter
    lock each: a single Python process saturates near one core, long before the service)."""
    if (duration is None) == (requests is None):
        raise ValueError("give exactly one of duration and requests")
    scenario.prepare(Client(url, token))
    processes = max(1, min(processes, concurrency))
    context = multiprocessing.get_context("fork")
    done = context.Array("q", processes, lock=False)  # requests made, per process
    failed = context.Array("q", processes, lock=False)  # of them not 200, per process
    budget = context.Value("q", 0)  # requests started, all processes (with --requests)
    started = time.monotonic()
    deadline = started + duration if duration is not None else math.inf
    cpu_started = time.process_time()
    # Message ids go on after those prepare() used, each process in steps of `processes`.
    plan = _Plan(
        url, token, concurrency, processes, requests, started, deadline, next(scenario.counter)
    )
    pipes = []
    children = []
    for index in range(1, processes):
        receiver, sender = context.Pipe(duplex=False)
        child = context.Process(
            target=_child, args=(plan, scenario, index, done, failed, budget, sender), daemon=True
        )
        child.start()
        sender.close()
        pipes.append(receiver)
        children.append(child)
    ledger = scenario.ledger  # the parent's workers book into a ledger of their own too
    own: list[_Part] = []
    thread = threading.Thread(
        target=lambda: own.append(_drive(plan, scenario, 0, done, failed, budget)), daemon=True
    )
    thread.start()
    while thread.is_alive() or any(child.is_alive() for child in children):
        time.sleep(0.2)
        if progress is not None:
            progress(time.monotonic() - started, sum(done), sum(failed))
        if not thread.is_alive() and all(pipe.poll() for pipe in pipes):
            break
    thread.join()
    parts = list(own)
    for pipe, child in zip(pipes, children, strict=True):
        try:
            parts.append(pipe.recv())
        except EOFError:
            child.join(10)
            raise BenchError(
                f"a load process failed (exit status {child.exitcode}): no report"
            ) from None
    for child in children:
        child.join(10)
    elapsed = time.monotonic() - started
    cpu = (time.process_time() - cpu_started + sum(part.cpu for part in parts)) / max(elapsed, 1e-9)
    scenario.ledger = ledger
    total: Counter[str] = Counter()
    for part in parts:
        total.update(part.copies)
        for timeline, ids in part.acknowledged.items():
            ledger.acknowledged[timeline] |= ids
        for timeline, ids in part.uncertain.items():
            ledger.uncertain[timeline] |= ids
    everything = sorted((s for part in parts for s in part.samples), key=lambda s: s.started)
    return Result(
        scenario=scenario.name,
        concurrency=concurrency,
        duration=elapsed,
        samples=everything,
        copies=total,
        client_cpu=cpu,
        group_size=scenario.group_size if scenario.name in ("sendGroup", "mixed") else 0,
        processes=processes,
    )


@dataclass(frozen=True)
class _Plan:
    url: str
    token: str | None
    concurrency: int
    processes: int
    requests: int | None
    started: float  # time.monotonic(): one clock for every process
    deadline: float
    first_id: int  # the first message number after prepare()'s


@dataclass
class _Part:
    """What one process's workers did."""

    samples: list[Sample]
    copies: Counter[str]
    acknowledged: dict[tuple[str, str], set[str]]  # its workers' ledger (see Ledger)
    uncertain: dict[tuple[str, str], set[str]]
    cpu: float  # CPU seconds of the process (0 for the parent's own part: counted apart)


def _child(
    plan: _Plan,
    scenario: Scenario,
    index: int,
    done: Any,
    failed: Any,
    budget: Any,
    pipe: Any,
) -> None:
    cpu = time.process_time()
    part = _drive(plan, scenario, index, done, failed, budget)
    part.cpu = time.process_time() - cpu
    pipe.send(part)
    pipe.close()


def _drive(
    plan: _Plan, scenario: Scenario, index: int, done: Any, failed: Any, budget: Any
) -> _Part:
    """This process's workers (every `processes`-th of them), until the plan's end."""
    # Message ids stay unique across processes: each counts in steps of `processes`.
    scenario.counter = itertools.count(plan.first_id + index, plan.processes)
    ledger = scenario.ledger = Ledger()  # this process's; merged into the run's at the end
    workers = list(range(index, plan.concurrency, plan.processes))
    samples: list[list[Sample]] = [[] for _ in workers]
    copies: list[Counter[str]] = [Counter() for _ in workers]
    lock = threading.Lock()

    def take() -> bool:
        if plan.requests is None:
            return True
        with budget.get_lock():
            if budget.value >= plan.requests:
                return False
            budget.value += 1
            return True

    def worker(slot: int, number: int) -> None:
        client = Client(plan.url, plan.token)
        rng = random.Random(number)  # noqa: S311 - load shapes, not secrets
        own = samples[slot]
        while time.monotonic() < plan.deadline and take():
            call = scenario.next(number, rng)
            begun = time.monotonic()
            try:
                status, written = call(client)
            except OSError:
                status, written = 0, Counter()
            own.append(Sample(begun - plan.started, (time.monotonic() - begun) * 1000, status))
            copies[slot].update(written)
            with lock:
                done[index] += 1
                if status != 200:
                    failed[index] += 1
        client.close()

    threads = [
        threading.Thread(target=worker, args=(slot, number), daemon=True)
        for slot, number in enumerate(workers)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    total: Counter[str] = Counter()
    for written in copies:
        total.update(written)
    return _Part(
        [s for own in samples for s in own],
        total,
        dict(ledger.acknowledged),
        dict(ledger.uncertain),
        0.0,
    )


def _read_all(client: Client, kind: str, timeline: str) -> list[dict[str, Any]]:
    """Every entry of a timeline, paging forward."""
    entries: list[dict[str, Any]] = []
    last = 0
    while True:
        if kind == "sync":
            path = f"/timeline/sync?member={quote(timeline)}&last_read={last}&count=1000"
        elif ":" in timeline:
            a, b = timeline.split(":", 1)
            path = f"/timeline/history/single/{quote(a)}/{quote(b)}?last_read={last}&count=1000"
        else:
            path = f"/timeline/history/group/{quote(timeline)}?last_read={last}&count=1000"
        status, reply = client.request("GET", path)
        if status != 200:
            raise BenchError(f"reading {kind} {timeline} failed: {status} {reply}")
        page = reply["entrySet"]
        entries += page
        if len(page) < 1000:
            return entries
        last = int(page[-1]["sequence"])


def verify(url: str, scenario: Scenario, token: str | None = None) -> dict[str, Any]:
    """Every timeline the run touched holds exactly 1..N, each of its messages once."""
    client = Client(url, token)
    ledger = scenario.ledger
    timelines = set(ledger.acknowledged) | set(ledger.uncertain)
    problems: list[str] = []
    for kind, timeline in sorted(timelines):
        entries = _read_all(client, kind, timeline)
        sequences = [int(e["sequence"]) for e in entries]
        holes = (sequences[-1] if sequences else 0) - len(sequences)
        explained = len(ledger.uncertain[(kind, timeline)])  # failed requests may leave holes
        if sequences != sorted(set(sequences)) or holes > explained:
            problems.append(f"{kind} {timeline}: sequences are not 1..{len(sequences)}")
        ids = Counter(json.loads(e["message"]).get("id") for e in entries)
        ours = ids.keys() & (
            ledger.acknowledged[(kind, timeline)] | ledger.uncertain[(kind, timeline)]
        )
        twice = sorted(i for i in ours if ids[i] > 1)
        missing = sorted(ledger.acknowledged[(kind, timeline)] - ids.keys())
        if twice:
            problems.append(f"{kind} {timeline}: {len(twice)} message(s) stored twice")
        if missing:
            problems.append(f"{kind} {timeline}: {len(missing)} acknowledged message(s) missing")
    client.close()
    return {"ok": not problems, "timelines": len(timelines), "problems": problems[:100]}
