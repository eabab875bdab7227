"""Killing the Redis primary mid-load (kill -9): Redis Cluster fails a master over to its
replica, Sentinel promotes the replica. Clients retry with their client_msg_id on a 503,
failed members or a dropped connection, as the README tells them to. Afterwards every
touched timeline is exactly 1..N, each message in it once, every acknowledged message
present; how long writes were unavailable is printed (run with -s to see it).

A replica that had not caught up loses the last increments and records of its master: the
counters then lag the store (repaired: the store says where a timeline is) and records are
gone (the store's record of each idempotent message answers the retry).
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from test_e2e import Service, clean_env
from timeline.factory import close_app, create_app
from timeline.settings import Settings
from topologies import ClusterServers, SentinelServers

GROUP = "/timeline/sendGroup"
SEND = "/timeline/send"
SENDERS = 4
#: A retrying client gives up on a message after this long (far above any failover here).
GIVE_UP_S = 40.0


class Load:
    """Senders that retry each message until it is acknowledged; they record when writes
    succeed, so that the longest stretch without one can be told."""

    def __init__(self, app: Any, members: list[str]) -> None:
        self.app = app
        self.members = members
        self.acked: list[tuple[str, list[str]]] = []  # (text, recipients)
        self.successes: list[float] = []
        self.retries = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(w,)) for w in range(SENDERS)]

    def start(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def join(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(GIVE_UP_S + 10)
            assert not thread.is_alive()

    def acknowledged(self) -> int:
        with self.lock:
            return len(self.acked)

    def _run(self, worker: int) -> None:
        client = self.app.test_client()
        n = 0
        while not self.stop.is_set():
            n += 1
            text = f"w{worker}-{n}"
            if n % 3 == 0:
                receiver = self.members[(worker * 7 + n) % len(self.members)]
                path, recipients = SEND, [f"s{worker}", receiver]
                body: dict[str, Any] = {"from": f"s{worker}", "to": receiver}
            else:
                group = self.members[worker % 2 :: 2]
                path, recipients = GROUP, group
                body = {"group_name": f"g{worker % 2}", "group_members": group}
            body |= {"message": {"text": text}, "client_msg_id": text}
            self._deliver(client, path, body)
            with self.lock:
                self.acked.append((text, recipients))

    def _deliver(self, client: Any, path: str, body: dict[str, Any]) -> None:
        deadline = time.monotonic() + GIVE_UP_S
        while True:
            reply = client.post(path, data=json.dumps(body), content_type="application/json")
            document = reply.get_json()
            if reply.status_code == 200 and not document.get("failedMembers"):
                with self.lock:
                    self.successes.append(time.monotonic())
                return
            assert reply.status_code in (200, 503), (reply.status_code, document)
            assert time.monotonic() < deadline, f"{body['client_msg_id']} never stored"
            with self.lock:
                self.retries += 1
            time.sleep(0.05)

    def longest_pause_after(self, moment: float) -> float:
        """The longest time without a successful write from `moment` on."""
        with self.lock:
            times = sorted(t for t in self.successes if t >= moment)
        points = [moment, *times]
        return max(b - a for a, b in itertools.pairwise(points)) if times else 1e9


def wait_until(condition: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.02)


def check_timelines(app: Any, load: Load) -> None:
    """Every touched sync timeline is 1..N, each message in it once, every ack present."""
    client = app.test_client()
    expected: dict[str, list[str]] = {}
    for text, recipients in load.acked:
        for member in recipients:
            expected.setdefault(member, []).append(text)
    for member, texts in expected.items():
        reply = client.get(f"/timeline/sync?member={member}&count=1000").get_json()
        entries = reply["entrySet"]
        seqs = [int(e["sequence"]) for e in entries]
        assert seqs == list(range(1, len(seqs) + 1)), (member, seqs)
        got = [json.loads(e["message"])["text"] for e in entries]
        assert len(got) == len(set(got)), (member, "a message twice")
        assert sorted(got) == sorted(texts), (member, set(texts) ^ set(got))


@pytest.fixture
def sqlite_app_settings(tmp_path: Path, key_prefix: str) -> Settings:
    return Settings(
        redis_key_prefix=key_prefix,
        sqlite_path=str(tmp_path / "timeline.sqlite3"),
        data_dir=str(tmp_path / "var"),
    )


def run_failover(settings: Settings, tmp_path: Path, kill: Callable[[], float], label: str) -> None:
    app = create_app(settings)  # SQLite: the store is not what is under test
    members = [f"m{i}" for i in range(24)]
    load = Load(app, members).start()
    try:
        wait_until(lambda: load.acknowledged() >= 30, 30)
        killed_at = time.monotonic()
        failover_s = kill()
        before = load.acknowledged()
        wait_until(lambda: load.acknowledged() >= before + 30, GIVE_UP_S)
    finally:
        load.join()
    pause = load.longest_pause_after(killed_at)
    print(
        f"\n{label}: failover took {failover_s:.2f} s; writes paused for {pause:.2f} s; "
        f"{len(load.acked)} messages acknowledged, {load.retries} retries"
    )
    # Writes resume within the failover time plus a few seconds.
    assert pause <= failover_s + 5, (pause, failover_s)
    check_timelines(app, load)
    close_app(app)


@pytest.fixture
def cluster(redis_cluster_factory: Callable[..., ClusterServers]) -> ClusterServers:
    return redis_cluster_factory()


@pytest.mark.slow
def test_killing_a_cluster_master_mid_load_loses_and_duplicates_nothing(
    cluster: ClusterServers, sqlite_app_settings: Settings, tmp_path: Path
) -> None:
    settings = sqlite_app_settings.replace(redis_mode="cluster", redis_url=cluster.url)

    def kill() -> float:
        victim = cluster.masters()[0]
        cluster.kill(victim)
        return cluster.wait_failover(victim, timeout=20)

    run_failover(settings, tmp_path, kill, "cluster")


@pytest.mark.slow
def test_killing_the_sentinel_primary_mid_load_loses_and_duplicates_nothing(
    redis_sentinel_factory: Callable[..., SentinelServers],
    sqlite_app_settings: Settings,
    tmp_path: Path,
) -> None:
    servers = redis_sentinel_factory()
    settings = sqlite_app_settings.replace(
        redis_mode="sentinel",
        redis_sentinels=servers.sentinels,
        redis_sentinel_master=servers.master_name,
    )

    old: list[int] = []

    def kill() -> float:
        old.append(servers.kill_primary())
        took = servers.wait_failover(timeout=20)
        # The old primary comes back (empty, a master of nothing until the sentinels demote
        # it, seconds later): no allocation may go there.
        servers.restart(old[0], wait=False)
        return took

    run_failover(settings, tmp_path, kill, "sentinel")
    stats = servers.client(old[0]).info("commandstats")
    assert "cmdstat_evalsha" not in stats, stats.get("cmdstat_evalsha")


@pytest.mark.parametrize("mode", ["cluster", "sentinel"])
def test_redis_forgetting_everything_mid_load_loses_and_duplicates_nothing(
    mode: str,
    redis_cluster: ClusterServers,
    redis_sentinel: SentinelServers,
    sqlite_app_settings: Settings,
    tmp_path: Path,
) -> None:
    """FLUSHALL on every master mid-load: counters are seeded from the store, records come
    back from the store's; every timeline stays 1..N with each message once."""
    if mode == "cluster":
        settings = sqlite_app_settings.replace(redis_mode="cluster", redis_url=redis_cluster.url)
        forget = redis_cluster.flushall
    else:
        settings = sqlite_app_settings.replace(
            redis_mode="sentinel",
            redis_sentinels=redis_sentinel.sentinels,
            redis_sentinel_master=redis_sentinel.master_name,
        )

        def forget() -> None:
            redis_sentinel.client(redis_sentinel.primary_port()).flushall()

    def flush_twice() -> float:
        forget()
        time.sleep(0.3)
        forget()
        return 0.0

    run_failover(settings, tmp_path, flush_twice, f"{mode} FLUSHALL")


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["cluster", "sentinel"])
def test_over_http_a_killed_primary_leaves_every_timeline_whole(
    mode: str,
    redis_cluster_factory: Callable[..., ClusterServers],
    redis_sentinel_factory: Callable[..., SentinelServers],
    tmp_path: Path,
    key_prefix: str,
) -> None:
    """gunicorn (2 workers) driven by timeline-bench, which retries as the README says (a 5xx,
    failedMembers, a dropped connection); a primary killed mid-run. --verify then finds every
    timeline 1..N (holes only where a request never succeeded), nothing twice, and every
    acknowledged message present."""
    env = clean_env(
        TIMELINE_REDIS_MODE=mode,
        TIMELINE_REDIS_KEY_PREFIX=key_prefix,
        TIMELINE_SQLITE_PATH=str(tmp_path / "timeline.sqlite3"),
        TIMELINE_DATA_DIR=str(tmp_path / "var"),
        # Holes of requests that never succeeded become readable after the gap grace: the
        # shortest one allowed (deadline + longest store operation + 1 s), so that --verify
        # need not wait long.
        TIMELINE_REQUEST_DEADLINE_MS="1000",
        TIMELINE_MONGO_OPERATION_TIMEOUT_MS="1000",
        TIMELINE_GAP_GRACE_MS="3000",
    )
    if mode == "cluster":
        cluster = redis_cluster_factory()
        env["TIMELINE_REDIS_URL"] = cluster.url

        def kill() -> None:
            cluster.kill(cluster.masters()[0])
    else:
        servers = redis_sentinel_factory()
        env["TIMELINE_REDIS_SENTINELS"] = servers.sentinels
        env["TIMELINE_REDIS_SENTINEL_MASTER"] = servers.master_name

        def kill() -> None:
            servers.kill_primary()

    service = Service(env, tmp_path / "gunicorn.log").start()
    report = tmp_path / "out.json"
    try:
        load = subprocess.Popen(
            [
                *(sys.executable, "-m", "timeline.bench", "--url", service.base, "--quiet"),
                *("--scenario", "mixed", "--group-size", "8", "--concurrency", "4"),
                *("--duration", "5", "--verify", "--verify-wait", "3.5", "--json", str(report)),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        # Killed once the load is under way (the bench prepares its timelines first).
        wait_until(lambda: service.log.read_text().count("/timeline/sendGroup") >= 50, 60)
        kill()
        out, err = load.communicate(timeout=120)
        assert report.exists(), (load.returncode, out, err)
        result = json.loads(report.read_text())
        print(f"\n{mode} over HTTP: {result['requests']} requests, {result['errors']} errors")
        assert result["verify"]["ok"], (result["verify"], err, out)
        assert result["requests"] > 0
    finally:
        service.stop()
