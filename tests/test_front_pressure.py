"""The HTTP front (timeline/worker.py) under pressure, over real sockets: silent connections at
the connection cap are shed oldest first, a worker over its memory budget refuses new requests
and drops its slowest readers, a pipelined request that will not run is answered 503, and what
RFC 9112 requires of a request's Host and Transfer-Encoding is enforced."""

from __future__ import annotations

import contextlib
import json
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_front import assert_envelope, connect, parse, read_all

from support import readable
from test_e2e import Service, service_env

pytestmark = pytest.mark.e2e


def start(tmp: Path, redis_url: str, workers: int = 1, **settings: str) -> Service:
    env = service_env(tmp, redis_url, f"test:{uuid.uuid4().hex[:12]}:", **settings)
    service = Service(env, tmp / "gunicorn.log")
    service.env["WEB_CONCURRENCY"] = str(workers)
    return service.start()


@pytest.fixture
def capped(tmp_path: Path, redis_url: str) -> Iterator[Service]:
    """One worker that holds 20 connections at most."""
    service = start(tmp_path, redis_url, TIMELINE_HTTP_MAX_CONNECTIONS="20")
    yield service
    service.stop()


def closed_by_server(sock: socket.socket, timeout: float) -> bool:
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_at_the_cap_silent_connections_are_shed_oldest_first(capped: Service) -> None:
    # Given twice as many connections as the worker holds, none of which sends anything,
    silent = []
    for _ in range(40):
        silent.append(connect(capped))
        time.sleep(0.005)  # an order the worker sees
    # then a real client is still served, at once (no read timeout to wait out: 10 s),
    started = time.monotonic()
    status, body = capped.request("POST", "/timeline/send", {"from": "a", "to": "b", "message": {}})
    assert status == 200, body
    assert time.monotonic() - started < 5.0  # not the 10 s read timeout
    # because the oldest silent ones were closed to make room, and the newest kept.
    assert all(closed_by_server(sock, 5.0) for sock in silent[:20])
    assert not any(closed_by_server(sock, 0.2) for sock in silent[-5:])
    for sock in silent:
        sock.close()


def test_a_connection_with_a_request_under_way_is_not_shed(capped: Service) -> None:
    # Given a client that has sent half of its request, then 40 silent connections,
    started = connect(capped)
    body = json.dumps({"from": "a", "to": "b", "message": {}}).encode()
    head = (
        f"POST /timeline/send HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    started.sendall(head)
    time.sleep(0.1)
    silent = [connect(capped) for _ in range(40)]
    time.sleep(0.3)
    # then its request, completed, is served: it was never a silent one to shed.
    started.sendall(body)
    reply = parse(read_until_reply(started))
    assert reply.status == 200, reply
    for sock in [started, *silent]:
        sock.close()


def read_until_reply(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """One whole reply (its Content-Length read)."""
    sock.settimeout(timeout)
    received = b""
    while b"\r\n\r\n" not in received:
        received += sock.recv(65536)
    head, _, body = received.partition(b"\r\n\r\n")
    length = int(parse(head + b"\r\n\r\n").headers["content-length"])
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


# --- the memory budget ----------------------------------------------------------------------


@pytest.fixture
def small_budget(tmp_path: Path, redis_url: str) -> Iterator[Service]:
    """One worker with a 1 MiB budget."""
    service = start(tmp_path, redis_url, TIMELINE_HTTP_MEMORY_BUDGET_BYTES=str(1 << 20))
    yield service
    service.stop()


def test_over_its_budget_a_worker_reads_no_more_bodies_and_refuses_new_requests(
    small_budget: Service,
) -> None:
    # Given two uploads of 3 MB that sent 600 KB each and stopped: 1.2 MB held, over budget,
    uploads = []
    for _ in range(2):
        sock = connect(small_budget)
        sock.sendall(
            b"POST /timeline/send HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 3000000\r\n\r\n" + b" " * 600_000
        )
        uploads.append(sock)
    time.sleep(0.5)
    # a new request is refused at once: 503 with Retry-After, naming the budget;
    sock = connect(small_budget)
    sock.sendall(b"GET /timeline/sync?member=someone HTTP/1.1\r\nHost: x\r\n\r\n")
    raw = read_all(sock)
    error = assert_envelope(raw, 503, "TIMELINE_UNAVAILABLE")
    assert parse(raw).headers["retry-after"] == "1"
    assert error["metadata"] == {"budget_bytes": str(1 << 20)}
    sock.close()
    # When the uploads go away (the one read on is seen to; then, under three quarters of
    # the budget, the paused one is read again and seen to), requests are served again.
    for upload in uploads:
        upload.close()
    time.sleep(0.5)
    status, _ = small_budget.request("GET", "/timeline/sync?member=someone")
    assert status == 200


BIG = "big-page"
BUDGET = 12 << 20


@pytest.fixture
def budgeted(tmp_path: Path, redis_url: str) -> Iterator[Service]:
    """One worker with a 12 MiB budget, and a member whose sync page is about 7.2 MB (the
    kernel takes up to 4 MB of a reply into a socket's send buffer: at least 3.2 MB of each
    stays with the worker, and at most 7.2 MB)."""
    service = start(
        tmp_path,
        redis_url,
        TIMELINE_HTTP_MEMORY_BUDGET_BYTES=str(BUDGET),
        TIMELINE_HTTP_WRITE_TIMEOUT_MS="60000",
        TIMELINE_PAGE_MAX_BYTES=str(16 << 20),
    )
    for batch in range(6):
        messages = [{"i": batch * 10 + i, "pad": '"' * 30_000} for i in range(10)]
        body = {"from": "s", "to": BIG, "messages": messages}
        status, _ = service.request("POST", "/timeline/send", body)
        assert status == 200
    yield service
    service.stop()


def slow_reader(service: Service) -> socket.socket:
    """Asks for the big page and never reads it (a small receive buffer: most of the reply
    stays with the server)."""
    sock = connect(service, rcvbuf=4096)
    sock.sendall(f"GET /timeline/sync?member={BIG}&count=100 HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    return sock


def test_over_its_budget_a_worker_drops_its_slowest_readers_first(budgeted: Service) -> None:
    # Given readers that never read a 7.2 MB page, until the worker is over its budget (then
    # the next one is refused at the door, 503),
    readers = []
    for _ in range(5):
        readers.append(slow_reader(budgeted))
        assert readable(readers[-1], 20.0), "no reply started"
    # when they have been sending for over a second (what makes a reader slow),
    time.sleep(1.5)
    # then the oldest are dropped until the worker is under its budget; new requests are
    # served, and the newest readers (within the budget) get their page whole.
    status, _ = budgeted.request("GET", "/timeline/sync?member=someone")
    assert status == 200
    outcomes = "".join(outcome(read_all(reader, timeout=30.0)) for reader in readers)
    served = outcomes.replace("r", "")
    assert served.startswith("c")  # the oldest was dropped
    assert served.endswith("w")  # the newest served got its page whole
    assert "wc" not in served  # oldest first
    assert "r" not in outcomes[: len(served)]  # refused only once over the budget
    assert "dropping a slow reader" in budgeted.log.read_text()
    for reader in readers:
        reader.close()


def outcome(raw: bytes) -> str:
    """r: refused (503, the worker was over its budget); c: cut short (dropped); w: whole."""
    reply = parse(raw)
    if reply.status == 503:
        return "r"
    assert reply.status == 200
    return "c" if len(reply.body) < int(reply.headers["content-length"]) else "w"


# --- pipelining, Host, Transfer-Encoding ---------------------------------------------------


@pytest.fixture
def served(tmp_path: Path, redis_url: str) -> Iterator[Service]:
    service = start(tmp_path, redis_url)
    yield service
    service.stop()


def test_a_pipelined_request_that_will_not_run_is_answered_503(served: Service) -> None:
    body = json.dumps({"from": "a", "to": "piped", "message": {}}).encode()
    sock = connect(served)
    sock.sendall(
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        b"POST /timeline/send HTTP/1.1\r\nHost: x\r\nX-Request-ID: second\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    raw = read_all(sock)
    first_end = raw.index(b"\r\n\r\n") + 4
    first = parse(raw[:first_end])
    first_length = int(first.headers["content-length"])
    assert first.status == 200
    second = raw[first_end + first_length :]
    error = assert_envelope(second, 503, "TIMELINE_UNAVAILABLE")
    assert "not run" in error["message"]
    assert parse(second).headers["retry-after"] == "1"
    assert parse(second).headers["x-request-id"] == "second"
    # and it was not run: nothing was sent to "piped".
    status, page = served.request("GET", "/timeline/sync?member=piped")
    assert (status, page["entrySet"]) == (200, [])


@pytest.mark.parametrize(
    ("request_bytes", "status", "reason"),
    [
        (b"GET /healthz HTTP/1.1\r\n\r\n", 400, "TIMELINE_INVALID_PARAM"),
        (b"GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, "TIMELINE_INVALID_PARAM"),
        (b"GET /healthz HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n", 400, "TIMELINE_INVALID_PARAM"),
        (
            b"POST /timeline/send HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: identity, chunked\r\n"
            b"\r\n2\r\n{}\r\n0\r\n\r\n",
            501,
            "TIMELINE_NOT_IMPLEMENTED",
        ),
        (
            b"POST /timeline/send HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, chunked\r\n"
            b"\r\n2\r\n{}\r\n0\r\n\r\n",
            400,  # gunicorn's own refusal
            "TIMELINE_INVALID_PARAM",
        ),
    ],
)
def test_what_rfc_9112_refuses_is_refused(
    served: Service, request_bytes: bytes, status: int, reason: str
) -> None:
    sock = connect(served)
    sock.sendall(request_bytes)
    assert_envelope(read_all(sock), status, reason)
    sock.close()


def test_http_1_0_without_host_is_served(served: Service) -> None:
    sock = connect(served)
    sock.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
    assert parse(read_all(sock)).status == 200
    sock.close()


def test_a_head_over_the_limits_that_never_ends_is_431(served: Service) -> None:
    # Found by tests/test_front_differential.py: it was a 400 ("it ended before its framing
    # did"), where gunicorn answers 431.
    sock = connect(served)
    with contextlib.suppress(OSError):  # the server may answer and close mid-send
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: " + b"v" * 830_000)
    assert_envelope(read_all(sock), 431, "TIMELINE_HEADERS_TOO_LARGE")
    sock.close()
