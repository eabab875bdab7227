"""The sequence allocator: one Redis counter per timeline, advanced by the Lua scripts in lua/."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from timeline.errors import Unavailable
from timeline.model import Timeline
from timeline.settings import Settings

LUA_DIR = Path(__file__).resolve().parent.parent / "lua"

log = logging.getLogger(__name__)


def load_script(name: str) -> str:
    """The source of lua/<name>.lua."""
    return (LUA_DIR / f"{name}.lua").read_text(encoding="utf-8")


def connect_redis(url: str, settings: Settings) -> redis.Redis:
    """A Redis client for the allocator, with the timeouts of the settings and no retries.

    redis-py retries a failed command three times by default. That is wrong here: an
    allocation whose reply was lost may have run, and running it again would skip
    sequences silently. A failure surfaces once, as a 503, and the caller decides.
    """
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=settings.redis_connect_timeout_ms / 1000,
        socket_timeout=settings.redis_socket_timeout_ms / 1000,
        retry=Retry(NoBackoff(), 0),
        max_connections=settings.redis_max_connections,
        client_name="timeline",
    )


class SequenceAllocator:
    """Allocates contiguous sequence ranges, one Redis round trip per request."""

    def __init__(self, client: redis.Redis, key_prefix: str) -> None:
        self._redis = client
        self._prefix = key_prefix
        # register_script calls EVALSHA and reloads the script on NOSCRIPT by itself.
        self._allocate = client.register_script(load_script("allocate"))

    @property
    def client(self) -> redis.Redis:
        return self._redis

    def key(self, timeline: Timeline) -> str:
        """The counter's key: `<prefix>seq:<kind>:<id>`; the kind keeps sync and history apart."""
        return f"{self._prefix}seq:{timeline.kind}:{timeline.id}"

    def allocate(self, timelines: Sequence[Timeline], count: int = 1) -> list[int]:
        """Give each timeline `count` new sequences; return the last one of each range."""
        keys = [self.key(t) for t in timelines]
        reply = self._call("allocate", lambda: self._allocate(keys=keys, args=[count]))
        return [int(last) for last in reply]

    def latest(self, timeline: Timeline) -> int:
        """The newest sequence allocated to the timeline, 0 if none."""
        value = self._call("latest", lambda: self._redis.get(self.key(timeline)))
        return int(value) if value is not None else 0

    def ping(self) -> None:
        self._call("ping", self._redis.ping)

    def close(self) -> None:
        self._redis.close()

    @staticmethod
    def _call(what: str, command: Any) -> Any:
        try:
            return command()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            log.warning("redis %s failed: %s", what, exc)
            raise Unavailable("sequence allocator (redis) is unavailable") from exc
        except redis.ResponseError as exc:
            # READONLY after a failover, OOM, MISCONF, LOADING: Redis refuses, the caller retries.
            log.error("redis %s refused: %s", what, exc)
            raise Unavailable("sequence allocator (redis) refused the request") from exc
