"""The HTTP front (timeline/worker.py) under gunicorn, over real sockets: slow and silent
clients hold no thread and are closed on time, every HTTP-layer error is the envelope, and a
request cut short by a worker's abort is a 503 (or a dropped connection) that a retry with
the same client_msg_id completes exactly once."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis

from support import readable
from test_e2e import Service, clean_env, service_env

pytestmark = pytest.mark.e2e

# Short timeouts, so that the test sees them expire; the defaults are 10 s, 10 s and 5 s.
READ_TIMEOUT = 3.0
WRITE_TIMEOUT = 3.0
KEEPALIVE = 2.0
# How late the server may close a connection past its timeout: generous, for a loaded 2-core
# machine. What is checked is that the timeout closes it, not how promptly.
SLACK = 4.0
TCP_ESTABLISHED = 1


@pytest.fixture(scope="module")
def front(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[Service]:
    """The service as `make run` serves it (2 workers, the front's default threads), with
    short HTTP timeouts."""
    tmp = tmp_path_factory.mktemp("front")
    env = service_env(
        tmp,
        redis_url,
        f"test:{uuid.uuid4().hex[:12]}:",
        TIMELINE_HTTP_READ_TIMEOUT_MS=str(int(READ_TIMEOUT * 1000)),
        TIMELINE_HTTP_WRITE_TIMEOUT_MS=str(int(WRITE_TIMEOUT * 1000)),
        TIMELINE_HTTP_KEEPALIVE_MS=str(int(KEEPALIVE * 1000)),
        # A 12 MB page (store_a_large_timeline), whole: the slow reader of a big reply.
        TIMELINE_PAGE_MAX_BYTES=str(16 << 20),
    )
    service = Service(env, tmp / "gunicorn.log").start()
    yield service
    service.stop()


def connect(service: Service, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before the handshake
    sock.connect(("127.0.0.1", service.port))
    return sock


def read_all(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """Everything until the server closes (EOF or reset)."""
    sock.settimeout(timeout)
    received = b""
    try:
        while data := sock.recv(65536):
            received += data
    except ConnectionResetError:
        pass
    return received


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


def parse(raw: bytes) -> Reply:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Reply(int(lines[0].split()[1]), headers, body)


def assert_envelope(raw: bytes, status: int, reason: str) -> dict[str, Any]:
    """A whole reply that is the service's error envelope, and nothing else."""
    reply = parse(raw)
    assert reply.status == status, raw[:300]
    assert reply.headers["content-type"] == "application/json"
    assert reply.headers["x-request-id"]
    assert int(reply.headers["content-length"]) == len(reply.body)
    error = json.loads(reply.body)
    assert list(error) == ["code", "reason", "message", "metadata"]
    assert (error["code"], error["reason"]) == (status, reason)
    assert error["message"]
    assert isinstance(error["metadata"], dict)
    return dict(error)


# --- slow and silent clients -------------------------------------------------------------


@dataclass
class Slow:
    """One slow connection's story: when it was opened, when the server closed it, and what
    the server said meanwhile."""

    kind: str
    opened: float = 0.0
    closed: float | None = None
    received: bytes = b""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def lasted(self) -> float:
        assert self.closed is not None, f"{self.kind}: the server never closed it"
        return self.closed - self.opened


def drip(
    service: Service,
    kind: str,
    prefix: bytes,
    trickle: bytes,
    give_up: float,
    opened: threading.Semaphore | None = None,
) -> Slow:
    """Send `prefix`, then `trickle` one byte a second; read whatever comes, until the server
    closes the connection (or give_up seconds pass). `opened` is released once connected."""
    story = Slow(kind)
    sock = connect(service)
    story.opened = time.monotonic()
    try:
        sock.sendall(prefix)
        if opened is not None:
            opened.release()
        sent = 0
        while time.monotonic() - story.opened < give_up:
            if readable(sock, 1.0):
                try:
                    data = sock.recv(65536)
                except ConnectionResetError:
                    data = b""
                if not data:
                    story.closed = time.monotonic()
                    break
                story.received += data
            elif sent < len(trickle):
                try:
                    sock.send(trickle[sent : sent + 1])
                except OSError:  # reset by the server: closed
                    story.closed = time.monotonic()
                    break
                sent += 1
    finally:
        sock.close()
    return story


def never_read(
    service: Service, request: bytes, give_up: float, opened: threading.Semaphore | None = None
) -> Slow:
    """Ask for a large reply and never read it; the server must give up on it and close."""
    story = Slow("never reads its reply")
    sock = connect(service, rcvbuf=4096)
    try:
        sock.sendall(request)
        story.opened = time.monotonic()
        if opened is not None:
            opened.release()
        # The connection's TCP state says when the server closed it (a reset or a FIN), without
        # reading: polled, since nothing else tells a client that does not read.
        while time.monotonic() - story.opened < give_up:
            state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
            if state != TCP_ESTABLISHED:
                story.closed = time.monotonic()
                break
            time.sleep(0.02)
        story.received = read_all(sock, timeout=5)
    finally:
        sock.close()
    return story


BIG_MEMBER = "big-reader"
BIG_ENTRIES = 200


def store_a_large_timeline(service: Service) -> None:
    """200 messages of 60 KB for one member: a sync of it is a 12 MB reply."""
    for batch in range(4):
        messages = [{"i": batch * 50 + i, "pad": "x" * 60_000} for i in range(50)]
        body = {"from": "big-sender", "to": BIG_MEMBER, "messages": messages}
        status, _ = service.request("POST", "/timeline/send", body)
        assert status == 200


@pytest.mark.slow
def test_slow_and_silent_clients_neither_delay_others_nor_outstay_their_timeouts(
    front: Service,
) -> None:
    store_a_large_timeline(front)
    host = f"Host: 127.0.0.1:{front.port}\r\n".encode()
    sync_head = b"GET /timeline/sync?member=probe HTTP/1.1\r\n" + host + b"\r\n"
    body = json.dumps({"from": "slow", "to": "probe", "message": {"x": 1}}).encode()
    post_head = (
        b"POST /timeline/send HTTP/1.1\r\n" + host + f"Content-Length: {len(body)}\r\n\r\n".encode()
    )
    big_sync = (
        f"GET /timeline/sync?member={BIG_MEMBER}&count={BIG_ENTRIES} HTTP/1.1\r\n".encode()
        + host
        + b"\r\n"
    )
    give_up = 3 * (READ_TIMEOUT + WRITE_TIMEOUT) + SLACK
    kinds = {
        "silent": lambda opened=None: drip(front, "silent", b"", b"", give_up, opened),
        "trickles its headers": lambda opened=None: drip(
            front, "trickles its headers", b"", sync_head, give_up, opened
        ),
        "trickles its body": lambda opened=None: drip(
            front, "trickles its body", post_head, body, give_up, opened
        ),
        "never reads its reply": lambda opened=None: never_read(front, big_sync, give_up, opened),
    }
    stop = threading.Event()
    cycles: list[Slow] = []

    def reconnect(kind: str) -> None:
        """A client that comes back as soon as it is closed, for as long as the test runs."""
        while not stop.is_set():
            cycles.append(kinds[kind]())

    opened = threading.Semaphore(0)
    with ThreadPoolExecutor(max_workers=21) as pool:
        held = [pool.submit(make, opened) for make in kinds.values() for _ in range(4)]
        again = [pool.submit(reconnect, kind) for kind in ("silent", "trickles its headers")]
        again += [pool.submit(reconnect, kind) for kind in ("silent", "trickles its headers")]
        for _ in held:  # all 16 are connected, their requests (or the start of them) sent
            assert opened.acquire(timeout=30)
        started = time.monotonic()
        latencies: list[tuple[float, float]] = []  # (when it ended, seconds it took)
        i = 0
        while not all(f.done() for f in held) or time.monotonic() - started < READ_TIMEOUT:
            begun = time.monotonic()
            if i % 2:
                status, reply = front.request("GET", "/timeline/sync?member=probe&count=1000")
            else:
                message = {"from": "probe-sender", "to": "probe", "message": {"n": i}}
                status, reply = front.request("POST", "/timeline/send", message)
            ended = time.monotonic()
            assert status == 200, reply
            latencies.append((ended, ended - begun))
            i += 1
        stop.set()
        stories = [f.result() for f in held]
        for f in again:
            f.result()

    # Each probe request was answered as if nobody else were there: generously under 5 s
    # (the sync worker made such a request wait 30 s; the measured figures are in
    # docs/benchmarks.md).
    assert max(took for _, took in latencies) < 5.0, latencies
    # ... and many of them while all 16 slow connections were held.
    first_closed = min(story.closed or float("inf") for story in stories)
    assert sum(1 for ended, _ in latencies if ended < first_closed) >= 5

    for story in stories + cycles:
        timeout = WRITE_TIMEOUT if story.kind == "never reads its reply" else READ_TIMEOUT
        # Closed by its timeout: not before it, and not long after it.
        assert timeout - 0.1 <= story.lasted <= timeout + SLACK, (story.kind, story.lasted)
        if story.kind == "silent":
            assert story.received == b""  # nothing to answer: just closed
        elif story.kind.startswith("trickles"):
            # Part of a request came: it is answered 408 before the close.
            error = assert_envelope(story.received, 408, "TIMELINE_REQUEST_TIMEOUT")
            assert error["metadata"] == {"limit_ms": str(int(READ_TIMEOUT * 1000))}
        else:
            # The reply was abandoned: the client got less than it announced.
            reply = parse(story.received)
            assert reply.status == 200
            assert len(reply.body) < int(reply.headers["content-length"])
    assert len(cycles) >= 4  # the reconnecting clients were each closed at least once

    # The reply that was abandoned is served whole to a client that reads it.
    status, page = front.request("GET", f"/timeline/sync?member={BIG_MEMBER}&count=1000")
    assert status == 200
    assert [int(e["sequence"]) for e in page["entrySet"]] == list(range(1, BIG_ENTRIES + 1))


def test_an_idle_kept_alive_connection_is_closed_after_the_keepalive_timeout(
    front: Service,
) -> None:
    sock = connect(front)
    try:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(10)
        reply = sock.recv(65536)
        answered = time.monotonic()
        assert parse(reply).headers["connection"] == "keep-alive"
        assert read_all(sock) == b""  # then nothing, and the server closes
        idle = time.monotonic() - answered
        assert KEEPALIVE - 0.1 <= idle <= KEEPALIVE + SLACK
    finally:
        sock.close()


# --- what the HTTP layer answers ---------------------------------------------------------


def exchange(service: Service, raw: bytes) -> bytes:
    sock = connect(service)
    try:
        sock.sendall(raw)
        return read_all(sock)
    finally:
        sock.close()


HEADERS_101 = b"".join(b"X-Header-%d: v\r\n" % i for i in range(101))


@pytest.mark.parametrize(
    ("request_bytes", "status", "reason"),
    [
        pytest.param(b"GARBAGE\r\n\r\n", 400, "TIMELINE_INVALID_PARAM", id="garbage-line"),
        pytest.param(
            b"GET /timeline/sync?member=" + b"a" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
            414,
            "TIMELINE_URI_TOO_LONG",
            id="5000-byte-url",
        ),
        pytest.param(
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n",
            431,
            "TIMELINE_HEADERS_TOO_LARGE",
            id="9000-byte-header",
        ),
        pytest.param(
            b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + HEADERS_101 + b"\r\n",
            431,
            "TIMELINE_HEADERS_TOO_LARGE",
            id="101-headers",
        ),
        pytest.param(
            b"GET /healthz HTTP/1.1\nHost: x\n\n", 400, "TIMELINE_INVALID_PARAM", id="bare-lf"
        ),
        pytest.param(
            b"POST /timeline/send HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"zz\r\nabc\r\n0\r\n\r\n",
            400,
            "TIMELINE_INVALID_PARAM",
            id="bad-chunk-size",
        ),
        pytest.param(
            b"POST /timeline/send HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            400,
            "TIMELINE_INVALID_PARAM",
            id="length-and-chunked",
        ),
        pytest.param(
            b"POST /timeline/send HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n",
            413,
            "TIMELINE_PAYLOAD_TOO_LARGE",
            id="declared-body-over-limit",
        ),
    ],
)
def test_http_layer_errors_are_the_envelope(
    front: Service, request_bytes: bytes, status: int, reason: str
) -> None:
    raw = exchange(front, request_bytes)
    assert_envelope(raw, status, reason)
    assert parse(raw).headers["connection"] == "close"


def test_an_error_carries_the_request_id_the_client_gave(front: Service) -> None:
    raw = exchange(
        front,
        b"GET /healthz HTTP/1.1\r\nX-Request-ID: front-7\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n",
    )
    assert_envelope(raw, 431, "TIMELINE_HEADERS_TOO_LARGE")
    assert parse(raw).headers["x-request-id"] == "front-7"


def test_a_chunked_body_over_the_limit_is_refused_without_being_buffered(front: Service) -> None:
    sock = connect(front)
    try:
        sock.sendall(
            b"POST /timeline/send HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        piece = b"x" * (1 << 20)
        try:
            for _ in range(5):  # 5 MiB, over the 4 MiB body limit
                sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        except OSError:
            pass  # refused before all of it was sent
        raw = read_all(sock)
    finally:
        sock.close()
    error = assert_envelope(raw, 413, "TIMELINE_PAYLOAD_TOO_LARGE")
    assert error["metadata"] == {"limit": str(4 * 1024 * 1024)}


def test_framing_keeps_requests_apart(front: Service) -> None:
    """Chunked bodies, pipelined requests and Expect: 100-continue, read by the front and
    parsed by gunicorn, arrive at the app whole and in order."""
    body = json.dumps({"from": "frame-a", "to": "frame-b", "message": {"k": "chunked"}}).encode()
    chunked = b"".join(
        b"%x\r\n%s\r\n" % (len(body[i : i + 7]), body[i : i + 7]) for i in range(0, len(body), 7)
    )
    pipelined = (
        b"POST /timeline/send HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        + chunked
        + b"0\r\n\r\n"
        + b"GET /timeline/sync?member=frame-b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    raw = exchange(front, pipelined)
    head_end = raw.index(b"\r\n\r\n") + 4
    first_end = head_end + int(parse(raw).headers["content-length"])
    first, second = parse(raw[:first_end]), parse(raw[first_end:])
    assert (first.status, json.loads(first.body)) == (200, {"sequence": "1"})
    assert second.status == 200
    entries = json.loads(second.body)["entrySet"]
    assert [json.loads(e["message"]) for e in entries] == [{"k": "chunked"}]

    sock = connect(front)
    try:
        body = json.dumps({"from": "frame-a", "to": "frame-b", "message": {"k": "expect"}}).encode()
        sock.sendall(
            b"POST /timeline/send HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
            + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        )
        sock.settimeout(10)
        assert sock.recv(65536) == b"HTTP/1.1 100 Continue\r\n\r\n"  # before the body is sent
        sock.sendall(body)
        reply = parse(read_all(sock))
    finally:
        sock.close()
    assert (reply.status, json.loads(reply.body)) == (200, {"sequence": "2"})


# --- a worker aborted mid-request --------------------------------------------------------


def send_group(service: Service, body: dict[str, Any]) -> tuple[int | None, bytes]:
    """One sendGroup on its own connection: (status, body), or (None, what came) when the
    connection was dropped before a whole reply."""
    conn = http.client.HTTPConnection("127.0.0.1", service.port, timeout=30)
    try:
        conn.request("POST", "/timeline/sendGroup", json.dumps(body).encode())
        reply = conn.getresponse()
        payload = reply.read()
        if reply.status != 200:
            assert reply.getheader("Content-Type") == "application/json", payload[:200]
            assert reply.getheader("X-Request-ID")
        return reply.status, payload
    except (http.client.HTTPException, ConnectionError) as exc:
        return None, str(exc).encode()
    finally:
        conn.close()


@pytest.fixture
def patient(tmp_path: Path, redis_url: str, key_prefix: str) -> Iterator[Service]:
    """The service, with store writes that wait up to 5 s for SQLite's lock (a test holds it,
    so that a request is certainly in flight when its worker is aborted)."""
    env = service_env(
        tmp_path,
        redis_url,
        key_prefix,
        TIMELINE_SQLITE_BUSY_TIMEOUT_MS="5000",
        TIMELINE_GAP_GRACE_MS="9000",  # at least the request deadline + 5 s + 1 s
    )
    service = Service(env, tmp_path / "gunicorn.log").start()
    yield service
    service.stop()


def test_a_request_cut_by_a_worker_abort_is_retried_to_exactly_once(
    patient: Service, redis_url: str, key_prefix: str
) -> None:
    service = patient
    database = service.env["TIMELINE_SQLITE_PATH"]
    client = redis.Redis.from_url(redis_url)
    members = [f"abort-m{i}" for i in range(200)]
    messages = [{"i": i} for i in range(20)]
    body = {
        "group_name": "abort-group",
        "group_members": members,
        "messages": messages,
        "client_msg_id": "abort-0001",
    }
    lock = sqlite3.connect(database, isolation_level=None)
    try:
        lock.execute("BEGIN IMMEDIATE")  # every store write now waits
        with ThreadPoolExecutor(1) as pool:
            attempt = pool.submit(send_group, service, body)
            # In flight: its sequences are allocated (the counter exists), its write waits.
            deadline = time.monotonic() + 10
            while not client.exists(f"{key_prefix}seq:history:abort-group"):
                assert time.monotonic() < deadline, "the request never reached Redis"
                assert not attempt.done(), attempt.result()
                time.sleep(0.01)
            assert service.process is not None
            workers = psutil.Process(service.process.pid).children()
            for worker in workers:
                worker.send_signal(signal.SIGABRT)  # what gunicorn's timeout sends
            status, payload = attempt.result(timeout=30)
        lock.execute("ROLLBACK")
    finally:
        lock.close()
        client.close()
    if status is not None:  # else: the connection was dropped, also allowed
        assert status == 503, payload[:300]
        error = json.loads(payload)
        assert (error["code"], error["reason"]) == (503, "TIMELINE_UNAVAILABLE")

    # The client retries, same id and body, until the answer is final (as README says).
    deadline = time.monotonic() + 60
    while True:
        status, payload = send_group(service, body)
        if status == 200 and json.loads(payload) == {"failedMembers": []}:
            break
        assert time.monotonic() < deadline, (status, payload[:300])
        time.sleep(0.2)

    expected = list(range(1, len(messages) + 1))
    for member in members:
        status, page = service.request("GET", f"/timeline/sync?member={member}&count=1000")
        assert status == 200
        assert [int(e["sequence"]) for e in page["entrySet"]] == expected, member
        assert [json.loads(e["message"])["i"] for e in page["entrySet"]] == list(range(20))
    status, page = service.request("GET", "/timeline/history/group/abort-group?count=1000")
    assert [int(e["sequence"]) for e in page["entrySet"]] == expected
    assert [json.loads(e["message"])["i"] for e in page["entrySet"]] == list(range(20))


# --- measured, not asserted: `python tests/test_front.py [gunicorn args]` ---------------------


def measure(gunicorn_args: list[str], seconds: float = 10.0) -> None:  # pragma: no cover
    """The figures of docs/benchmarks.md: a probe's latency alone, then with 16 slow or silent
    connections held and 4 reconnecting, against `gunicorn app:app` as `make run` starts it
    (the embedded default, default settings) plus `gunicorn_args` (e.g. `-k sync --threads 1`
    for gunicorn's sync worker)."""
    import statistics
    import subprocess
    import sys
    import tempfile
    import urllib.request

    from support import free_port

    failed: list[str] = []

    def probe(service: Service, until: float) -> list[float]:
        """Requests one after the other, each on a new connection, each given 120 s; how long
        each took (a failure counts with the time it took)."""
        took: list[float] = []
        i = 0
        while time.monotonic() < until:
            begun = time.monotonic()
            if i % 2:
                request = urllib.request.Request(service.base + "/timeline/sync?member=probe")
            else:
                body = {"from": "probe-sender", "to": "probe", "message": {"n": i}}
                request = urllib.request.Request(
                    service.base + "/timeline/send", data=json.dumps(body).encode()
                )
            try:
                with urllib.request.urlopen(request, timeout=120) as reply:
                    reply.read()
            except OSError as exc:
                failed.append(repr(exc))
            took.append(time.monotonic() - begun)
            i += 1
        return took

    def show(label: str, took: list[float]) -> None:
        cuts = statistics.quantiles(took, n=100) if len(took) > 1 else took * 99
        print(
            f"{label}: {len(took)} requests, p50 {cuts[49] * 1000:.1f} ms, p99 "
            f"{cuts[98] * 1000:.1f} ms, max {max(took) * 1000:.1f} ms, failed {len(failed)}",
            flush=True,
        )
        failed.clear()

    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        env = clean_env(TIMELINE_DATA_DIR=f"{tmp}/var", TIMELINE_SQLITE_PATH=f"{tmp}/t.sqlite3")
        env |= {"PORT": str(port), "TIMELINE_LOG_LEVEL": "warning"}
        process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "app:app", *gunicorn_args],
            cwd=Path(__file__).resolve().parent.parent,
            env=env,
            stderr=subprocess.DEVNULL,
        )
        service = Service(env, Path(tmp) / "unused.log")
        service.port, service.base = port, f"http://127.0.0.1:{port}"
        try:
            for _ in range(100):
                try:
                    urllib.request.urlopen(service.base + "/healthz", timeout=1).close()
                    break
                except OSError:
                    time.sleep(0.1)
            store_a_large_timeline(service)
            show("alone", probe(service, time.monotonic() + seconds))

            host = f"Host: 127.0.0.1:{port}\r\n".encode()
            head = b"GET /timeline/sync?member=probe HTTP/1.1\r\n" + host + b"\r\n"
            big = f"GET /timeline/sync?member={BIG_MEMBER}&count={BIG_ENTRIES} HTTP/1.1\r\n"
            give_up = 120.0
            kinds = [
                lambda opened=None: drip(service, "silent", b"", b"", give_up, opened),
                lambda opened=None: drip(service, "trickle", b"", head, give_up, opened),
                lambda opened=None: drip(
                    service,
                    "trickle body",
                    b"POST /timeline/send HTTP/1.1\r\n" + host + b"Content-Length: 64\r\n\r\n",
                    b"{" * 64,
                    give_up,
                    opened,
                ),
                lambda opened=None: never_read(
                    service, big.encode() + host + b"\r\n", give_up, opened
                ),
            ]
            stop = threading.Event()

            def reconnect() -> None:
                while not stop.is_set():
                    kinds[0]()

            opened = threading.Semaphore(0)
            with ThreadPoolExecutor(21) as pool:
                held = [pool.submit(kind, opened) for kind in kinds for _ in range(4)]
                again = [pool.submit(reconnect) for _ in range(4)]
                for _ in held:
                    opened.acquire()
                show(
                    "with 16 slow held + 4 reconnecting", probe(service, time.monotonic() + seconds)
                )
                stop.set()
                for story in sorted((f.result() for f in held), key=lambda s: s.kind):
                    closed = "never" if story.closed is None else f"{story.lasted:.1f} s"
                    print(f"  {story.kind}: closed by the server after {closed}")
                for f in again:
                    f.result()
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(30)


if __name__ == "__main__":  # pragma: no cover
    import sys

    measure(sys.argv[1:])
