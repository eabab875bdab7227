"""Reads that wait for the next message (`wait_ms`) through a Redis failover or restart, in
each Redis mode: a held read is never left hanging past its wait_ms (plus a second), and once
Redis is back (or the failover done) the wake-up listener is subscribed again, so a message
sent then wakes a waiter at once rather than at its deadline.

What a held read answers at its deadline is the README's: the normal empty page (200) when its
last read reaches Redis, `TIMELINE_UNAVAILABLE` (503) when Redis cannot be reached ("Wait for
the next message", "Errors"). Each test puts one waiter's deadline inside the outage and one
after the recovery, and asserts each answer exactly.

On a cluster, members are chosen by where their counters live. With every one on the masters
that survive, nothing but the wake-up listener meets the dead node, so it alone has to find
the replica that took over (as in a process whose traffic happens not to touch the failed
slots): redis-py reads its slot map again only after one of its own commands failed, never
after a subscription did. A member on the killed master is how a read that cannot reach
Redis is made.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from support import RedisServer, sample
from test_e2e import Service, service_env
from timeline.factory import close_app, create_app
from timeline.model import Kind, Timeline, conversation_id
from timeline.settings import Settings
from timeline.wakes import Wakes
from topologies import ClusterServers, SentinelServers

pytestmark = pytest.mark.slow

#: The README's bound on a held read: its wait_ms, plus this (a correctness bound, not a
#: performance target).
GRACE_S = 1.0
#: After the recovery: a new waiter (wait_ms=RECOVERED_WAIT_MS) is woken by a new send within
#: WOKEN_WITHIN_S, far from its deadline.
RECOVERED_WAIT_MS = 10_000
WOKEN_WITHIN_S = 2.0
#: How long the listener may take to subscribe again once Redis answers (its retries back off
#: to 1 s).
RESUBSCRIBED_WITHIN_S = 5.0

#: The README's 503 for a Redis that cannot be reached (TIMELINE_UNAVAILABLE), in full.
UNAVAILABLE = {
    "code": 503,
    "reason": "TIMELINE_UNAVAILABLE",
    "message": "sequence allocator (redis) is unavailable",
    "metadata": {},
}


def empty_page() -> dict[str, str | list[Any]]:
    """The normal empty page of a member that never got anything (README: after wait_ms)."""
    return {"latestSeq": "0", "entrySetLastSeq": "0", "entrySet": [], "minSeq": "1"}


# --- waiters ---------------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    body: dict[str, Any]
    headers: dict[str, str]
    seconds: float  # from just before the request was made to its reply


class Waiter:
    """A sync with wait_ms held through the app's test client, in a thread of its own."""

    def __init__(self, app: Any, member: str, wait_ms: int) -> None:
        self.member = member
        self.wait_ms = wait_ms
        self.future: Future[Reply] = Future()
        self.started = time.monotonic()
        self.deadline = self.started + wait_ms / 1000
        path = f"/timeline/sync?member={member}&last_read=0&wait_ms={wait_ms}"

        def run() -> None:
            try:
                started = time.monotonic()
                self.started, self.deadline = started, started + wait_ms / 1000
                reply = app.test_client().get(path)
                seconds = time.monotonic() - started
                self.future.set_result(
                    Reply(reply.status_code, reply.get_json(), dict(reply.headers), seconds)
                )
            except BaseException as exc:  # the test reports it
                self.future.set_exception(exc)

        threading.Thread(target=run, name=f"waiter-{member}", daemon=True).start()

    def reply(self) -> Reply:
        """The reply; the wait (test side) is well beyond the bound, which is asserted."""
        return self.future.result(timeout=self.wait_ms / 1000 + GRACE_S + 15)


def listener(app: Any) -> Wakes:
    wakes: Wakes = app.extensions["timeline"]["wakes"]
    return wakes


def wait_for(condition: Callable[[], bool], what: str, timeout: float) -> float:
    """Poll until `condition()`; the seconds it took (fails the test past `timeout`)."""
    began = time.monotonic()
    while not condition():
        assert time.monotonic() - began < timeout, f"{what}: not within {timeout} s"
        time.sleep(0.01)
    return time.monotonic() - began


def parked(wakes: Wakes, member: str) -> bool:
    return bool(wakes._parked.get(f"s:{member}"))


def hold(app: Any, member: str, wait_ms: int) -> Waiter:
    """A waiter for `member`, once it is parked (it read nothing and waits for a wake-up)."""
    waiter = Waiter(app, member, wait_ms)
    wait_for(lambda: parked(listener(app), member), f"{member}'s sync parking", 5.0)
    return waiter


def assert_within_bound(reply: Reply, waiter: Waiter) -> None:
    bound = waiter.wait_ms / 1000 + GRACE_S
    assert reply.seconds <= bound, (
        f"{waiter.member}: answered after {reply.seconds:.2f} s, past wait_ms + {GRACE_S} s "
        f"({bound:.1f} s): {reply.status} {reply.body}"
    )


def assert_unavailable(reply: Reply, waiter: Waiter) -> None:
    """Redis could not be reached at the deadline: README's 503, within the bound."""
    assert_within_bound(reply, waiter)
    assert (reply.status, reply.body) == (503, UNAVAILABLE)
    assert reply.headers.get("Retry-After") == "1"


def assert_empty_at_deadline(reply: Reply, waiter: Waiter) -> None:
    """Redis answered again before the deadline: the normal empty page (200), at the deadline
    (the listener's resubscription wakes the waiter, which reads nothing and waits again:
    an early answer would be a spurious wake-up turned into an empty page)."""
    assert_within_bound(reply, waiter)
    assert (reply.status, reply.body) == (200, empty_page())
    assert reply.seconds >= waiter.wait_ms / 1000 - 0.05, reply.seconds


def send(app: Any, sender: str, receiver: str, text: str, timeout: float = 10.0) -> float:
    """A send, retried on a 503 with its client_msg_id as the README tells clients to (the
    allocator may still be finding a new master); the moment it was acknowledged."""
    body = {
        "from": sender,
        "to": receiver,
        "message": json.dumps({"t": text}),
        "client_msg_id": f"{text}-{uuid.uuid4().hex[:8]}",
    }
    client = app.test_client()
    deadline = time.monotonic() + timeout
    while True:
        reply = client.post("/timeline/send", data=json.dumps(body))
        if reply.status_code == 200:
            return time.monotonic()
        assert reply.status_code == 503, reply.get_data(as_text=True)
        assert time.monotonic() < deadline, f"the send never succeeded: {reply.get_json()}"
        time.sleep(0.05)


def assert_a_send_wakes_a_new_waiter(app: Any, sender: str, member: str) -> None:
    """After the recovery: the listener subscribes again (on the new master), and a waiter
    that parks after that is woken by the next send, long before its deadline."""
    wakes = listener(app)
    wait_for(
        lambda: wakes.listening, "the wake-up listener subscribing again", RESUBSCRIBED_WITHIN_S
    )
    waiter = hold(app, member, RECOVERED_WAIT_MS)
    sent = send(app, sender, member, "after")
    reply = waiter.reply()
    woken_after = time.monotonic() - sent
    assert reply.status == 200, reply.body
    assert [json.loads(e["message"])["t"] for e in reply.body["entrySet"]] == ["after"]
    # The reply may be ready a little before the future is seen done: measured from the
    # send's acknowledgement to the reply, and the waiter's own time stays far from 10 s.
    assert woken_after <= WOKEN_WITHIN_S, f"woken {woken_after:.2f} s after the send"
    assert reply.seconds < RECOVERED_WAIT_MS / 1000 - 5, reply.seconds


# --- the app of each mode ----------------------------------------------------------------------


@pytest.fixture
def base_settings(tmp_path: Path, key_prefix: str) -> Settings:
    return Settings(
        redis_key_prefix=key_prefix,
        sqlite_path=str(tmp_path / "timeline.sqlite3"),
        data_dir=str(tmp_path / "var"),
        sync_wait_max_ms=30_000,
    )


@pytest.fixture
def make_app() -> Iterator[Callable[[Settings], Any]]:
    apps: list[Any] = []

    def make(settings: Settings) -> Any:
        app = create_app(settings.validate())
        apps.append(app)
        wakes = listener(app)
        wait_for(lambda: wakes.listening, "the wake-up listener subscribing", 10.0)
        return app

    yield make
    for app in apps:
        close_app(app)


# --- standalone: the redis-server killed and started again on its port -------------------------


def test_standalone_a_held_sync_outlives_a_redis_restart(
    redis_factory: Callable[..., RedisServer],
    base_settings: Settings,
    make_app: Callable[[Settings], Any],
) -> None:
    server = redis_factory()
    app = make_app(base_settings.replace(redis_url=server.url))
    # Given two waiters, one whose deadline falls while Redis is down and one whose deadline
    # falls after it is back,
    down = hold(app, "down", 1500)
    back = hold(app, "back", 3000)
    # when Redis is killed (kill -9) mid-wait,
    server.stop()
    # the first is answered at its deadline with the 503 (Redis cannot be reached then);
    assert_unavailable(down.reply(), down)
    # Redis starts again, empty, on the same port, well before the second's deadline,
    server.start()
    assert time.monotonic() < back.deadline - 0.5, "Redis restarted too late for the premise"
    # which then gets the normal empty page, at its deadline, not later;
    assert_empty_at_deadline(back.reply(), back)
    # and a new waiter is woken by a new message at once.
    assert_a_send_wakes_a_new_waiter(app, "sender", "after")


# --- Sentinel: the primary killed, a replica promoted ------------------------------------------


def test_sentinel_a_held_sync_outlives_a_failover(
    redis_sentinel_factory: Callable[..., SentinelServers],
    base_settings: Settings,
    make_app: Callable[[Settings], Any],
) -> None:
    servers = redis_sentinel_factory()
    app = make_app(
        base_settings.replace(
            redis_mode="sentinel",
            redis_sentinels=servers.sentinels,
            redis_sentinel_master=servers.master_name,
        )
    )
    old = servers.primary_port()
    # One deadline in the outage (about 0.5 s after the kill: a failover takes seconds, the
    # sentinels allowing down_after_ms, 1 s, without a reply before they even say the
    # primary is down, then electing a leader), one after the failover.
    down = hold(app, "down", 600)
    back = hold(app, "back", 8000)
    servers.kill_primary()
    killed = time.monotonic()
    reply = down.reply()
    # The premise: no sentinel names a new primary yet (the failover only moves forward, so
    # none did when that read ran either).
    assert set(servers._reported().values()) <= {old, None}, "failed over before the deadline"
    assert_unavailable(reply, down)
    took = servers.wait_failover(timeout=15)
    print(f"\nsentinel failover: {took:.2f} s after the kill")
    assert killed + took < back.deadline - 0.5, "the failover ended too late for the premise"
    assert_empty_at_deadline(back.reply(), back)
    assert servers.primary_port() != old
    assert_a_send_wakes_a_new_waiter(app, "sender", "after")


# --- Cluster: the master of the wake-up channel's slot killed, its replica taking over ---------


def on_masters(app: Any, cluster: ClusterServers, ports: set[int], name: str) -> str:
    """A member id whose sync counter lives on one of the masters `ports`."""
    allocator = app.extensions["timeline"]["service"].allocator
    for n in range(10_000):
        member = f"{name}{n}"
        if cluster.master_of(allocator.key(Timeline(Kind.SYNC, member))) in ports:
            return member
    raise LookupError(f"no member on {ports}")


def pair_on_masters(app: Any, cluster: ClusterServers, ports: set[int]) -> tuple[str, str]:
    """A sender and a receiver whose every counter a send touches (both sync timelines and
    their conversation's history) lives on the masters `ports`."""
    allocator = app.extensions["timeline"]["service"].allocator
    sender = on_masters(app, cluster, ports, "sender")
    for n in range(10_000):
        member = f"after{n}"
        timelines = [
            Timeline(Kind.SYNC, member),
            Timeline(Kind.HISTORY, conversation_id(sender, member)),
        ]
        if all(cluster.master_of(allocator.key(t)) in ports for t in timelines):
            return sender, member
    raise LookupError(f"no pair on {ports}")


def test_cluster_the_listener_follows_its_channel_s_master_through_a_failover(
    redis_cluster_factory: Callable[..., ClusterServers],
    base_settings: Settings,
    make_app: Callable[[Settings], Any],
) -> None:
    """The master of the wake-up channel's slot (the node the listener subscribes on) is
    killed; every waiter and sender lives on the other masters, so nothing but the listener
    itself ever meets the dead node: it alone must find the replica that took over."""
    cluster = redis_cluster_factory()
    app = make_app(base_settings.replace(redis_mode="cluster", redis_url=cluster.url))
    wakes = listener(app)
    victim = cluster.master_of(wakes.channel)
    assert wakes._pubsub is not None  # subscribed, on the master of the channel's slot
    assert wakes._pubsub.get_pubsub_node().port == victim
    others = set(cluster.masters()) - {victim}
    # One deadline in the outage, before the cluster even flags the node as failing (that
    # takes its node timeout, 1 s: until then the other masters serve as usual), one after
    # the failover.
    during = hold(app, on_masters(app, cluster, others, "during"), 600)
    back = hold(app, on_masters(app, cluster, others, "back"), 8000)
    cluster.kill(victim)
    killed = time.monotonic()
    assert during.deadline < killed + cluster.node_timeout_ms / 1000 - 0.2, "premise"
    # Its master answers: the normal empty page, at the deadline.
    assert_empty_at_deadline(during.reply(), during)
    took = cluster.wait_failover(victim, timeout=15)
    print(f"\ncluster failover: {took:.2f} s after the kill")
    assert killed + took < back.deadline - 0.5, "the failover ended too late for the premise"
    assert_empty_at_deadline(back.reply(), back)
    sender, member = pair_on_masters(app, cluster, others)
    assert_a_send_wakes_a_new_waiter(app, sender, member)


def test_cluster_a_held_sync_whose_master_is_killed_answers_503_at_its_deadline(
    redis_cluster_factory: Callable[..., ClusterServers],
    base_settings: Settings,
    make_app: Callable[[Settings], Any],
) -> None:
    """The same kill, with a waiter whose counter is on the killed master: its last read
    cannot reach Redis (the slot has no master until the replica takes over)."""
    cluster = redis_cluster_factory()
    app = make_app(base_settings.replace(redis_mode="cluster", redis_url=cluster.url))
    wakes = listener(app)
    victim = cluster.master_of(wakes.channel)
    others = set(cluster.masters()) - {victim}
    # Its deadline under a second after the kill: a replica takes over only after the
    # node timeout (1 s) and an election.
    down = hold(app, on_masters(app, cluster, {victim}, "down"), 800)
    back = hold(app, on_masters(app, cluster, others, "back"), 8000)
    cluster.kill(victim)
    killed = time.monotonic()
    reply = down.reply()
    assert cluster.master_of(wakes.channel) == victim, "failed over too soon"
    assert_unavailable(reply, down)
    took = cluster.wait_failover(victim, timeout=15)
    print(f"\ncluster failover: {took:.2f} s after the kill")
    assert killed + took < back.deadline - 0.5, "the failover ended too late for the premise"
    assert_empty_at_deadline(back.reply(), back)
    sender, member = pair_on_masters(app, cluster, others)
    assert_a_send_wakes_a_new_waiter(app, sender, member)


# --- over HTTP: gunicorn's workers hold the read without a thread ------------------------------


def held_over_http(service: Service, member: str, wait_ms: int) -> tuple[socket.socket, float]:
    sock = socket.create_connection(("127.0.0.1", service.port))
    started = time.monotonic()
    sock.sendall(
        f"GET /timeline/sync?member={member}&wait_ms={wait_ms} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    )
    return sock, started


def http_reply(sock: socket.socket, timeout: float) -> tuple[int, dict[str, Any], float]:
    """Status, JSON body and the moment the whole reply was read."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in lines[1:]
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed mid-body"
        body += chunk
    at = time.monotonic()
    sock.close()
    return int(lines[0].split()[1]), json.loads(body), at


def waiters_held(service: Service) -> float:
    """The gauge of held reads, summed over the workers (timeline_waiters)."""
    return sample(service.text("/metrics"), "timeline_waiters")


def subscribers(server: RedisServer, channel: str) -> int:
    client = redis.Redis.from_url(server.url, socket_timeout=1)
    try:
        return int(dict(client.pubsub_numsub(channel))[channel.encode()])
    finally:
        client.close()


@pytest.mark.e2e
def test_over_http_a_parked_sync_outlives_a_redis_restart(
    redis_factory: Callable[..., RedisServer], tmp_path: Path, key_prefix: str
) -> None:
    """The same as the standalone test, through gunicorn: a held read is a parked connection
    and a timer of the worker's loop (no thread), on each of 2 workers."""
    server = redis_factory()
    env = service_env(tmp_path, server.url, key_prefix, TIMELINE_SYNC_WAIT_MAX_MS="30000")
    service = Service(env, tmp_path / "gunicorn.log").start()
    channel = f"{key_prefix}wake"
    try:
        wait_for(lambda: subscribers(server, channel) == 2, "both workers subscribing", 10)
        down = [held_over_http(service, f"down{i}", 1500) for i in range(4)]
        back = [held_over_http(service, f"back{i}", 3000) for i in range(4)]
        wait_for(lambda: waiters_held(service) == 8, "8 reads parked", 5)
        server.stop()
        for sock, started in down:
            status, body, at = http_reply(sock, 10)
            assert at - started <= 1.5 + GRACE_S, at - started
            assert (status, body) == (503, UNAVAILABLE)
        server.start()
        for sock, started in back:
            status, body, at = http_reply(sock, 10)
            assert 3.0 - 0.05 <= at - started <= 3.0 + GRACE_S, at - started
            assert (status, body) == (200, empty_page())
        # Both workers' listeners subscribe again (to the restarted Redis) within their
        # retry; then waiters held on either worker are woken by one message.
        wait_for(
            lambda: subscribers(server, channel) == 2,
            "both workers subscribing again",
            RESUBSCRIBED_WITHIN_S,
        )
        waiters = [held_over_http(service, "after", RECOVERED_WAIT_MS) for _ in range(4)]
        wait_for(lambda: waiters_held(service) == 4, "4 reads parked", 5)
        body = {"group_name": "g", "group_members": ["after"], "message": json.dumps({"t": "x"})}
        assert service.request("POST", "/timeline/sendGroup", body)[0] == 200
        sent = time.monotonic()
        for sock, _ in waiters:
            status, page, at = http_reply(sock, RECOVERED_WAIT_MS / 1000 + 5)
            assert status == 200, page
            assert [json.loads(e["message"])["t"] for e in page["entrySet"]] == ["x"]
            assert at - sent <= WOKEN_WITHIN_S, at - sent
    finally:
        service.stop()
