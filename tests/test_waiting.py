"""Reads that wait for the next message (`wait_ms`): answered as soon as an entry beyond
`last_read` is readable, never past a hole, never losing a wake-up (the interleaving forced),
across processes, and without a thread per waiter in the HTTP worker."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import pytest

from support import CountedReads, put
from test_e2e import Service, service_env
from timeline.factory import create_app
from timeline.model import Kind, Message, Timeline
from timeline.settings import Settings
from timeline.store import Store
from timeline.wakes import Wakes


def send(client: Any, sender: str, receiver: str, text: str) -> Any:
    body = {"from": sender, "to": receiver, "message": json.dumps({"t": text})}
    reply = client.post("/timeline/send", data=json.dumps(body))
    assert reply.status_code == 200, reply.get_data(as_text=True)
    return reply


def texts(page: dict[str, Any]) -> list[str]:
    return [json.loads(entry["message"])["t"] for entry in page["entrySet"]]


def wakes_of(app: Any) -> Wakes:
    wakes: Wakes = app.extensions["timeline"]["wakes"]
    deadline = time.monotonic() + 5
    while not wakes.listening:  # subscribed: what is published from now on is heard
        assert time.monotonic() < deadline, "the wake-up listener never subscribed"
        time.sleep(0.01)
    return wakes


@pytest.fixture
def waiting_app(settings: Settings, store: Store) -> Any:
    app = create_app(settings.replace(sync_wait_max_ms=10_000), store=store)
    wakes_of(app)
    yield app
    app.extensions["timeline"]["wakes"].stop()


def in_background(call: Callable[[], Any]) -> Any:
    pool = ThreadPoolExecutor(1)
    future = pool.submit(call)
    pool.shutdown(wait=False)
    return future


# --- the contract, through the app -----------------------------------------------------------


def test_without_wait_ms_a_sync_answers_at_once(waiting_app: Any) -> None:
    client = waiting_app.test_client()
    started = time.monotonic()
    assert client.get("/timeline/sync?member=b").get_json()["entrySet"] == []
    assert time.monotonic() - started < 2.0  # nothing waited (the bound is the behaviour)


def test_readable_entries_are_returned_at_once(waiting_app: Any) -> None:
    client = waiting_app.test_client()
    send(client, "a", "b", "there")
    started = time.monotonic()
    page = client.get("/timeline/sync?member=b&wait_ms=10000").get_json()
    assert texts(page) == ["there"]
    assert time.monotonic() - started < 5.0  # not the 10 s wait


def test_a_waiting_sync_is_answered_by_the_next_message(waiting_app: Any) -> None:
    client = waiting_app.test_client()
    waiter = in_background(
        lambda: waiting_app.test_client().get("/timeline/sync?member=b&wait_ms=10000")
    )
    time.sleep(0.3)
    assert not waiter.done()
    send(client, "a", "b", "hello")
    page = waiter.result(timeout=5).get_json()  # not the 10 s wait
    assert texts(page) == ["hello"]
    assert page["entrySetLastSeq"] == "1"


def test_a_wait_that_ends_empty_is_the_normal_empty_page(waiting_app: Any) -> None:
    client = waiting_app.test_client()
    started = time.monotonic()
    page = client.get("/timeline/sync?member=b&wait_ms=300").get_json()
    assert time.monotonic() - started >= 0.3
    assert page == {"latestSeq": "0", "entrySetLastSeq": "0", "entrySet": [], "minSeq": "1"}


def test_wait_ms_is_clamped_to_the_setting_and_checked_as_an_int64(
    settings: Settings, store: Store
) -> None:
    app = create_app(settings.replace(sync_wait_max_ms=200), store=store)
    client = app.test_client()
    started = time.monotonic()
    assert client.get("/timeline/sync?member=b&wait_ms=600000").status_code == 200
    assert time.monotonic() - started < 5.0  # clamped to 0.2 s, not refused
    for bad in ("-1", "x", "1.5", "99999999999999999999"):
        reply = client.get(f"/timeline/sync?member=b&wait_ms={bad}")
        assert reply.status_code == 400, bad
        assert reply.get_json()["metadata"]["field"] == "wait_ms"
    app.extensions["timeline"]["wakes"].stop()


def test_forward_history_waits_too(waiting_app: Any) -> None:
    client = waiting_app.test_client()
    send(client, "a", "b", "one")
    waiter = in_background(
        lambda: waiting_app.test_client().get(
            "/timeline/history/single/b/a?last_read=1&wait_ms=10000"
        )
    )
    time.sleep(0.3)
    assert not waiter.done()
    send(client, "b", "a", "two")
    assert texts(waiter.result(timeout=5).get_json()) == ["two"]


def test_a_waiter_is_never_answered_beyond_a_hole(waiting_app: Any, store: Store) -> None:
    # Given a member whose seq 1 is allocated and not yet written (a write in flight),
    service = waiting_app.extensions["timeline"]["service"]
    wakes = waiting_app.extensions["timeline"]["wakes"]

    b = Timeline(Kind.SYNC, "b")
    service.allocator.allocate([b], 1, None, int(time.time() * 1000))
    waiter = in_background(
        lambda: waiting_app.test_client().get("/timeline/sync?member=b&wait_ms=10000")
    )
    # when seq 2 is stored and its wake-up published, the waiter reads again and still
    # waits: handing out 2 would move the device past 1 for good;
    now = int(time.time() * 1000)
    service.allocator.allocate([b], 1, None, now)
    put(store, Kind.SYNC, "b", 2, Message({"t": "2"}, '{"t":"2"}'), now, "m2")
    wakes.publish([b])
    time.sleep(0.5)
    assert not waiter.done()
    # once seq 1 lands, it is answered with both, in order.
    put(store, Kind.SYNC, "b", 1, Message({"t": "1"}, '{"t":"1"}'), now, "m1")
    wakes.publish([b])
    assert texts(waiter.result(timeout=5).get_json()) == ["1", "2"]


class SendsBetweenReadAndPark:
    """A store whose first sync page of `member` comes back empty, after which (before the
    reader can park) another request stores a message for that member and its wake-up is
    heard: the interleaving that loses a wake-up when a waiter parks without checking."""

    def __init__(self, store: Store, member: str) -> None:
        self._store = store
        self._member = member
        self.between: Callable[[], None] | None = None

    def page(self, kind: Kind, timeline_id: str, *args: Any) -> Any:
        page = self._store.page(kind, timeline_id, *args)
        between, self.between = self.between, None
        if between is not None and kind is Kind.SYNC and timeline_id == self._member:
            between()
        return page

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def test_a_message_stored_between_the_read_and_the_park_wakes_the_waiter(
    settings: Settings, store: Store
) -> None:
    racing = SendsBetweenReadAndPark(store, "b")
    app = create_app(settings.replace(sync_wait_max_ms=10_000), store=racing)  # type: ignore[arg-type]
    wakes = wakes_of(app)
    sender = app.test_client()

    def send_and_hear_it() -> None:
        epoch = wakes._watched["s:b"][0]
        send(sender, "a", "b", "raced")
        deadline = time.monotonic() + 5
        while wakes._watched["s:b"][0] == epoch:  # the listener heard the wake-up
            assert time.monotonic() < deadline, "the wake-up was never heard"
            time.sleep(0.005)

    racing.between = send_and_hear_it
    started = time.monotonic()
    page = app.test_client().get("/timeline/sync?member=b&wait_ms=10000").get_json()
    # A waiter that parked anyway would sleep through the whole 10 s and answer empty.
    assert texts(page) == ["raced"]
    assert time.monotonic() - started < 9.0
    wakes.stop()


class Unpublished:
    """Redis as a listener that was not subscribed at the time sees it: PUBLISH reaches no
    one."""

    def __init__(self, redis: Any) -> None:
        self._redis = redis

    def publish(self, channel: str, message: bytes) -> None:
        return None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._redis, name)


def test_a_resubscription_wakes_every_waiter(waiting_app: Any) -> None:
    # A wake-up published while the listener was not subscribed is lost to it: every waiter
    # reads again when it subscribes (here, as if it just had).
    wakes = waiting_app.extensions["timeline"]["wakes"]
    waiter = in_background(
        lambda: waiting_app.test_client().get("/timeline/sync?member=b&wait_ms=10000")
    )
    time.sleep(0.3)
    redis = wakes._redis
    wakes._redis = Unpublished(redis)
    send(waiting_app.test_client(), "a", "b", "lost")
    time.sleep(0.3)  # the publisher ran: its wake-up went nowhere
    wakes._redis = redis
    assert not waiter.done()
    wakes._wake_all()
    assert texts(waiter.result(timeout=5).get_json()) == ["lost"]


@pytest.fixture
def counted(settings: Settings, store: Store) -> Iterator[tuple[Any, CountedReads]]:
    counting = CountedReads(store, "b")
    app = create_app(settings.replace(sync_wait_max_ms=10_000), store=counting)  # type: ignore[arg-type]
    wakes_of(app)
    yield app, counting
    app.extensions["timeline"]["wakes"].stop()


def held_sync(app: Any, wait_ms: int) -> Any:
    """b's sync with wait_ms, asked from a thread of its own, and given time to park."""
    waiter = in_background(
        lambda: app.test_client().get(f"/timeline/sync?member=b&wait_ms={wait_ms}")
    )
    time.sleep(0.2)
    return waiter


def test_a_quiet_wait_ends_on_the_page_it_read_without_reading_again(
    counted: tuple[Any, CountedReads],
) -> None:
    # A member with nothing allocated past last_read: only a write, which publishes, can
    # change its page. A wait that no wake-up ends answers the page it read, once.
    app, counting = counted
    service = app.extensions["timeline"]["service"]
    waiter = held_sync(app, 600)
    # (A sequence allocated meanwhile, its write still in flight: no wake-up yet.)
    service.allocator.allocate([Timeline(Kind.SYNC, "b")], 1, None, int(time.time() * 1000))
    page = waiter.result(timeout=5).get_json()
    assert page == {"latestSeq": "0", "entrySetLastSeq": "0", "entrySet": [], "minSeq": "1"}
    assert counting.reads == 1


def test_a_wait_whose_listener_lost_the_channel_reads_again_at_its_end(
    counted: tuple[Any, CountedReads],
) -> None:
    # The listener lost its channel during the wait (what was published meanwhile never
    # reached it): the wait's end reads again, and finds the message.
    app, counting = counted
    wakes = app.extensions["timeline"]["wakes"]
    waiter = held_sync(app, 800)
    redis = wakes._redis
    wakes._redis = Unpublished(redis)
    wakes.listening = False  # as the listener marks a lost channel, until it subscribes again
    try:
        send(app.test_client(), "a", "b", "unheard")
        assert texts(waiter.result(timeout=5).get_json()) == ["unheard"]
    finally:
        wakes._redis = redis
        wakes.listening = True
    assert counting.reads == 2


def test_a_wait_stopped_at_a_hole_reads_again_at_its_end(
    counted: tuple[Any, CountedReads], store: Store
) -> None:
    # Seq 1 allocated and never written, seq 2 stored: the wait stops before the hole. A
    # seal publishes nothing, so its end reads again and finds 2 past the sealed hole.
    app, counting = counted
    service = app.extensions["timeline"]["service"]
    b = Timeline(Kind.SYNC, "b")
    now = int(time.time() * 1000)
    service.allocator.allocate([b], 2, None, now)
    put(store, Kind.SYNC, "b", 2, Message({"t": "2"}, '{"t":"2"}'), now, "m2")
    waiter = held_sync(app, 800)
    time.sleep(0.1)
    store.seal(Kind.SYNC, [("b", 1)], now)
    assert texts(waiter.result(timeout=5).get_json()) == ["2"]
    assert counting.reads == 2


# --- the HTTP worker: across processes, no thread per waiter --------------------------------


@pytest.fixture
def served(tmp_path: Path, redis_url: str) -> Iterator[Service]:
    env = service_env(tmp_path, redis_url, f"test:{uuid.uuid4().hex[:12]}:")
    service = Service(env, tmp_path / "gunicorn.log").start()  # 2 workers
    yield service
    service.stop()


def hold(service: Service, member: str, wait_ms: int = 20_000) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", service.port))
    sock.sendall(
        f"GET /timeline/sync?member={member}&wait_ms={wait_ms} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    )
    return sock


def reply_of(sock: socket.socket, timeout: float = 10.0) -> dict[str, Any]:
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        body += sock.recv(65536)
    assert head.startswith(b"HTTP/1.1 200"), head
    page: dict[str, Any] = json.loads(body)
    return page


def worker_threads(service: Service) -> int:
    assert service.process is not None
    workers = psutil.Process(service.process.pid).children()
    return sum(
        worker.num_threads() for worker in workers if "gunicorn" in " ".join(worker.cmdline())
    )


@pytest.mark.e2e
def test_waiters_on_every_worker_are_woken_and_hold_no_thread(served: Service) -> None:
    # 600 waiters for 3 members, spread over both workers, then 600 more,
    members = ["w0", "w1", "w2"]
    held = [hold(served, members[i % 3]) for i in range(600)]
    time.sleep(1.0)
    threads_held = worker_threads(served)
    held += [hold(served, members[i % 3]) for i in range(600)]
    time.sleep(1.0)
    # hold no thread: the count does not grow with the waiters (each worker's pool makes its
    # http_threads, 4, as requests are first read, and no more; a few more are its own:
    # the main loop, the purge, the wake-up listener and publisher),
    assert worker_threads(served) == threads_held <= 2 * (4 + 6)
    # and one group message wakes every one of them, whichever worker holds it.
    body = {"group_name": "g", "group_members": members, "message": json.dumps({"t": "all"})}
    status, _ = served.request("POST", "/timeline/sendGroup", body)
    assert status == 200
    for sock in held:
        assert texts(reply_of(sock)) == ["all"]
        sock.close()


@pytest.mark.e2e
def test_a_waiter_whose_client_leaves_is_let_go(served: Service) -> None:
    for _ in range(50):
        hold(served, "gone").close()
    time.sleep(0.5)
    text = urllib.request.urlopen(f"{served.base}/metrics", timeout=10).read().decode()
    # The gauge of waiters held counts none of them once their clients have left.
    held = [line for line in text.splitlines() if line.startswith("timeline_waiters ")]
    assert held, text[:500]
    assert float(held[0].split()[1]) == 0.0


@pytest.mark.e2e
def test_the_worker_ends_a_quiet_wait_on_the_page_it_parked_on(
    served: Service, redis_client: Any
) -> None:
    # Held by a worker (parked, no thread) with nothing allocated past last_read. A sequence
    # allocated meanwhile (a write in flight: no wake-up) is not seen at the deadline: the
    # worker answers the page the wait parked on, without reading again.
    sock = hold(served, "quiet", wait_ms=1500)
    time.sleep(0.5)
    prefix = served.env["TIMELINE_REDIS_KEY_PREFIX"]
    redis_client.incr(f"{prefix}seq:sync:quiet")
    started = time.monotonic()
    page = reply_of(sock)
    assert time.monotonic() - started > 0.5  # answered at the deadline, not before
    assert page == {"latestSeq": "0", "entrySetLastSeq": "0", "entrySet": [], "minSeq": "1"}
    sock.close()
    # The next read sees the allocation.
    _, body = served.request("GET", "/timeline/sync?member=quiet")
    assert body["latestSeq"] == "1"


def test_wakes_run_in_their_own_threads_only(waiting_app: Any) -> None:
    names = {thread.name for thread in threading.enumerate()}
    assert {"timeline-wakes", "timeline-wake-publish"} <= names
