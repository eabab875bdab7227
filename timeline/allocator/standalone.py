"""One Redis: the embedded default, a plain `redis://` URL, or (through sentinel.py) the
primary a set of sentinels names. Every counter is in one bucket: a request is one EVALSHA."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from timeline.allocator import Call, wire
from timeline.settings import Settings


def connect_redis(url: str, settings: Settings) -> redis.Redis:
    """A Redis client for the allocator, with the timeouts of the settings and no retries.

    redis-py retries a failed command three times by default. That is wrong here: an
    allocation whose reply was lost may have run, and running it again would skip
    sequences silently. A failure surfaces once, as a 503, and the caller decides.
    """
    return redis.Redis.from_url(url, **client_options(settings))


def client_options(settings: Settings) -> dict[str, Any]:
    """The allocator's connection options: the settings' timeouts and password, no retries."""
    return {
        "password": settings.redis_password or None,
        "socket_connect_timeout": settings.redis_connect_timeout_ms / 1000,
        "socket_timeout": settings.redis_socket_timeout_ms / 1000,
        "retry": Retry(NoBackoff(), 0),
        "max_connections": settings.redis_max_connections,
        "client_name": "timeline",
    }


class StandaloneRedis:
    """The allocator's view of one Redis (see timeline.allocator.Redis)."""

    mode = "standalone"
    buckets = 1

    def __init__(self, client: redis.Redis, mode: str = "standalone") -> None:
        self.client = client
        self.mode = mode

    def run(self, calls: Sequence[Call]) -> list[Any]:
        replies = wire.run(self.client.connection_pool, calls)
        # No cluster here: a redirection is a refusal like any other error reply.
        return [
            wire.NotRun.of(reply) if isinstance(reply, wire.REDIRECTS) else reply
            for reply in replies
        ]

    def get(self, key: str) -> bytes | None:
        # Every sync asks for its member's counter: straight on a pooled connection, without
        # redis-py's per-command retry and option handling (a third of a sync's Redis time).
        value = wire.command(self.client.connection_pool, "GET", key)
        return value.encode() if isinstance(value, str) else value

    def delete(self, keys: Sequence[str]) -> None:
        if keys:
            self.client.delete(*keys)

    def ping(self) -> None:
        self.client.ping()

    def publish(self, channel: str, message: bytes) -> None:
        self.client.publish(channel, message)

    def pubsub(self) -> Any:
        return self.client.pubsub(ignore_subscribe_messages=False)

    def describe(self) -> str:
        kwargs = self.client.connection_pool.connection_kwargs
        where = kwargs.get("path") or f"{kwargs.get('host')}:{kwargs.get('port')}"
        return f"{self.mode} {where}"

    def close(self) -> None:
        self.client.close()
