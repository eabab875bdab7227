"""End to end: the service under gunicorn with 2 workers, driven over HTTP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import pytest

from support import free_port, sample

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.e2e


class Service:
    """gunicorn serving app:app from the repository, as `make run` does."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.env = env | {"PORT": str(self.port), "HOST": "127.0.0.1", "WEB_CONCURRENCY": "2"}
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Service:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "gunicorn", "app:app"],
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 20
        while True:
            try:
                status, _ = self.request("GET", "/timeline/sync?member=probe")
                if status == 200:
                    return self
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"gunicorn did not come up:\n{self.log.read_text()}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                # A test that failed may leave gunicorn unable to stop in time: never leave
                # it (or its workers) running after the test.
                for child in psutil.Process(self.process.pid).children(recursive=True):
                    child.kill()
                self.process.kill()
                self.process.wait(10)
                raise
            finally:
                self.process = None

    def workers(self) -> int:
        assert self.process is not None
        return len(psutil.Process(self.process.pid).children())

    def text(self, path: str) -> str:
        with urllib.request.urlopen(self.base + path, timeout=10) as reply:
            return str(reply.read().decode())

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method)
        try:
            with urllib.request.urlopen(request, timeout=10) as reply:
                return reply.status, json.loads(reply.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())


def clean_env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIMELINE_")}
    return env | values


def service_env(
    directory: Path, redis_url: str, key_prefix: str, **settings: str
) -> dict[str, str]:
    """A service's environment: this Redis under its own key prefix, its store and data
    directory under `directory`, and these TIMELINE_* settings."""
    return clean_env(
        TIMELINE_REDIS_URL=redis_url,
        TIMELINE_REDIS_KEY_PREFIX=key_prefix,
        TIMELINE_SQLITE_PATH=str(directory / "timeline.sqlite3"),
        TIMELINE_DATA_DIR=str(directory / "var"),
        **settings,
    )


@pytest.fixture
def service(tmp_path: Path, redis_url: str, key_prefix: str) -> Iterator[Service]:
    env = service_env(tmp_path, redis_url, key_prefix)
    running = Service(env, tmp_path / "gunicorn.log").start()
    yield running
    running.stop()


def test_seed_example_over_http(service: Service) -> None:
    assert service.workers() == 2
    sends = [
        ("/timeline/send", {"from": "a", "to": "b", "message": '{"text":"吃了吗？"}'}),
        ("/timeline/send", {"from": "b", "to": "a", "message": '{"text":"吃了"}'}),
    ]
    for text in ("大家好", "报三围", "初次见面，多多指教"):
        body = {"group_name": "group_a", "group_members": ["a", "c", "d"]}
        sends.append(("/timeline/sendGroup", body | {"message": json.dumps({"text": text})}))
    for path, body in sends:
        assert service.request("POST", path, body)[0] == 200

    status, sync = service.request("GET", "/timeline/sync?member=a&last_read=0&count=10")
    assert status == 200
    assert [(e["sequence"], json.loads(e["message"])["text"]) for e in sync["entrySet"]] == [
        ("1", "吃了吗？"),
        ("2", "吃了"),
        ("3", "大家好"),
        ("4", "报三围"),
        ("5", "初次见面，多多指教"),
    ]
    assert (sync["latestSeq"], sync["entrySetLastSeq"]) == ("5", "5")
    _, history = service.request("GET", "/timeline/history/single/b/a")
    assert [e["sequence"] for e in history["entrySet"]] == ["1", "2"]
    _, history = service.request("GET", "/timeline/history/group/group_a")
    assert [e["sequence"] for e in history["entrySet"]] == ["1", "2", "3"]

    status, error = service.request("POST", "/timeline/send", {"from": "a"})
    assert status == 400
    assert error["reason"] == "TIMELINE_INVALID_PARAM"


def test_concurrent_clients_over_http_leave_timelines_contiguous(service: Service) -> None:
    members = [f"u{i}" for i in range(20)]

    def one(i: int) -> int:
        body = {"group_name": "room", "group_members": members, "message": {"i": i}}
        return service.request("POST", "/timeline/sendGroup", body)[0]

    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(one, range(60))) == {200}
    for member in members:
        _, sync = service.request("GET", f"/timeline/sync?member={member}&count=1000")
        assert [int(e["sequence"]) for e in sync["entrySet"]] == list(range(1, 61))
        assert sorted(json.loads(e["message"])["i"] for e in sync["entrySet"]) == list(range(60))


def test_embedded_default_starts_persists_and_stops_its_redis(tmp_path: Path) -> None:
    data = tmp_path / "var"
    env = clean_env(TIMELINE_DATA_DIR=str(data), TIMELINE_SQLITE_PATH=str(data / "t.sqlite3"))
    log = tmp_path / "gunicorn.log"

    first = Service(env, log).start()
    try:
        assert first.request(
            "POST", "/timeline/send", {"from": "a", "to": "b", "message": "{}"}
        ) == (
            200,
            {"sequence": "1"},
        )
        assert (data / "redis.sock").exists()
    finally:
        first.stop()
    # gunicorn stopped its redis-server, which flushed its AOF on the way out.
    assert not (data / "redis.sock").exists()
    aof = [p for p in data.rglob("timeline.aof*") if p.is_file()]  # 7.x: appendonlydir/
    assert sum(p.stat().st_size for p in aof) > 0

    second = Service(env, log).start()
    try:
        body = {"from": "a", "to": "b", "message": "{}"}
        assert second.request("POST", "/timeline/send", body) == (200, {"sequence": "2"})
        _, sync = second.request("GET", "/timeline/sync?member=b")
        assert [e["sequence"] for e in sync["entrySet"]] == ["1", "2"]
    finally:
        second.stop()


def test_overlapping_instances_share_the_embedded_redis_until_the_last_exits(
    tmp_path: Path,
) -> None:
    data = tmp_path / "var"
    env = clean_env(TIMELINE_DATA_DIR=str(data), TIMELINE_SQLITE_PATH=str(data / "t.sqlite3"))
    body = {"from": "a", "to": "b", "message": "{}"}
    old = Service(env, tmp_path / "old.log").start()
    new = Service(env, tmp_path / "new.log").start()  # a restart that overlaps the old one
    try:
        assert old.request("POST", "/timeline/send", body) == (200, {"sequence": "1"})
        old.stop()  # the old one exits first: it must not take the server with it
        assert new.request("POST", "/timeline/send", body) == (200, {"sequence": "2"})
    finally:
        old.stop()
        new.stop()
    assert not (data / "redis.sock").exists()  # the last one out stopped it


def test_probes_metrics_logs_and_document_under_gunicorn(
    tmp_path: Path, redis_factory: Any, key_prefix: str
) -> None:
    redis_server = redis_factory()
    env = service_env(tmp_path, redis_server.url, key_prefix)
    service = Service(env, tmp_path / "gunicorn.log").start()
    try:
        assert service.request("GET", "/healthz") == (200, {"status": "ok"})
        assert service.request("GET", "/readyz")[0] == 200
        for i in range(20):
            body = {"group_name": "g", "group_members": ["a", "b", "c"], "message": {"i": i}}
            assert service.request("POST", "/timeline/sendGroup", body)[0] == 200

        # Whichever worker answers the scrape, the counts are those of all workers.
        for _ in range(6):
            text = service.text("/metrics")
            assert sample(text, "timeline_messages_written_total", kind="history") == 20
            assert sample(text, "timeline_messages_written_total", kind="sync") == 60

        status, document = service.request("GET", "/openapi.json")
        assert status == 200
        assert "/timeline/sendGroup" in document["paths"]

        request = urllib.request.Request(
            service.base + "/timeline/sync?member=a", headers={"X-Request-ID": "e2e-req-42"}
        )
        with urllib.request.urlopen(request, timeout=10) as reply:
            assert reply.headers["X-Request-ID"] == "e2e-req-42"

        redis_server.stop()
        status, error = service.request("GET", "/readyz")
        assert status == 503
        assert error["metadata"]["redis"] == "down"
        assert service.request("GET", "/healthz")[0] == 200
    finally:
        service.stop()

    lines = [json.loads(line) for line in service.log.read_text().splitlines() if line]
    access = [line for line in lines if line.get("logger") == "timeline.access"]
    [tagged] = [line for line in access if line.get("request_id") == "e2e-req-42"]
    assert (tagged["method"], tagged["path"], tagged["status"]) == ("GET", "/timeline/sync", 200)
    assert tagged["duration_ms"] > 0
    assert len([line for line in access if line["path"] == "/timeline/sendGroup"]) == 20


def bench(service: Service, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "timeline.bench", "--url", service.base, "--quiet", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_timeline_bench_reports_and_verifies_a_run(service: Service, tmp_path: Path) -> None:
    report = tmp_path / "out.json"
    plot = tmp_path / "out.png"
    done = bench(
        service,
        *("--scenario", "sendGroup", "--group-size", "5", "--concurrency", "2"),
        *("--requests", "40", "--verify", "--json", str(report), "--plot", str(plot)),
    )
    assert done.returncode == 0, done.stderr + service.log.read_text()[-4000:]
    result = json.loads(report.read_text())
    for key in ("requests_per_second", "messages_per_second", "p50", "p95", "p99", "max"):
        assert result[key] > 0, key
    assert (result["scenario"], result["concurrency"], result["errors"]) == ("sendGroup", 2, 0)
    assert result["requests"] == 40
    assert result["verify"] == {"ok": True, "timelines": 7, "problems": []}  # 2 groups + 5
    assert result["messages_per_second"] == pytest.approx(6 * result["requests_per_second"], 0.01)
    assert plot.read_bytes().startswith(b"\x89PNG")


def test_timeline_bench_verify_fails_on_a_broken_timeline(service: Service, tmp_path: Path) -> None:
    import sqlite3

    report = tmp_path / "out.json"
    # A store that loses a copy behind the service's back: the sync timeline of one member.
    path = service.env["TIMELINE_SQLITE_PATH"]
    stop = threading.Event()

    def vandal() -> None:
        while not stop.is_set():
            conn = sqlite3.connect(path, timeout=5)
            conn.execute("DELETE FROM chat_sync WHERE seq = 2 AND id LIKE '%-m0'")
            conn.commit()
            conn.close()
            time.sleep(0.05)

    thread = threading.Thread(target=vandal)
    thread.start()
    try:
        done = bench(
            service,
            *("--scenario", "sendGroup", "--group-size", "3", "--concurrency", "1"),
            *("--requests", "20", "--verify", "--json", str(report)),
        )
    finally:
        stop.set()
        thread.join()
    assert done.returncode == 1
    verdict = json.loads(report.read_text())["verify"]
    assert verdict["ok"] is False
    assert any("m0" in problem for problem in verdict["problems"])
