"""The load engine of timeline-bench: keep-alive HTTP workers, scenarios, statistics, verify.

Plain threads and http.client: one persistent connection per worker, no dependency beyond the
standard library, and the harness measures its own CPU so a saturated load generator is seen.
"""

from __future__ import annotations

import http.client
import itertools
import json
import math
import random
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
    """One keep-alive connection; reconnects when the server closes it."""

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
        self.conn: http.client.HTTPConnection | None = None

    def _connect(self) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
        return cls(self.host, self.port, timeout=self.timeout)

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        reused = self.conn is not None
        if self.conn is None:
            self.conn = self._connect()
        try:
            self.conn.request(method, self.base + path, body=data, headers=self.headers)
        except OSError:
            # A kept-alive connection the server had closed: the request never left; send it
            # once more on a new one. Anything later (no reply) is not retried: the server
            # may have done it, and a second POST would be a second message.
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
                # Closed by the server before it read the request (a keep-alive timeout), or
                # a read cut off: once more on a new connection, which a GET can always be.
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
            return lambda client: (client.request("GET", path)[0], Counter())
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
) -> Result:
    """Drive the service until `duration` seconds pass or `requests` are made."""
    if (duration is None) == (requests is None):
        raise ValueError("give exactly one of duration and requests")
    scenario.prepare(Client(url, token))
    samples: list[list[Sample]] = [[] for _ in range(concurrency)]
    copies: list[Counter[str]] = [Counter() for _ in range(concurrency)]
    budget = itertools.count()
    started = time.perf_counter()
    deadline = started + duration if duration is not None else math.inf
    cpu_started = time.process_time()

    def worker(index: int) -> None:
        client = Client(url, token)
        rng = random.Random(index)  # noqa: S311 - load shapes, not secrets
        own = samples[index]
        while time.perf_counter() < deadline:
            if requests is not None and next(budget) >= requests:
                break
            call = scenario.next(index, rng)
            begun = time.perf_counter()
            try:
                status, written = call(client)
            except OSError:
                status, written = 0, Counter()
            own.append(Sample(begun - started, (time.perf_counter() - begun) * 1000, status))
            copies[index].update(written)
        client.close()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    while any(thread.is_alive() for thread in threads):
        time.sleep(0.2)
        if progress is not None:
            done = sum(len(own) for own in samples)
            errors = sum(1 for own in samples for s in own if s.status != 200)
            progress(time.perf_counter() - started, done, errors)
    elapsed = time.perf_counter() - started
    cpu = (time.process_time() - cpu_started) / max(elapsed, 1e-9)
    total: Counter[str] = Counter()
    for written in copies:
        total.update(written)
    everything = sorted((s for own in samples for s in own), key=lambda s: s.started)
    return Result(
        scenario=scenario.name,
        concurrency=concurrency,
        duration=elapsed,
        samples=everything,
        copies=total,
        client_cpu=cpu,
        group_size=scenario.group_size if scenario.name in ("sendGroup", "mixed") else 0,
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
