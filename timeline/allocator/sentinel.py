"""Redis Sentinel: the primary the sentinels name, followed through failovers without a
restart. Allocation is standalone's (one EVALSHA per request) against that primary.

redis-py's SentinelConnectionPool asks the sentinels for the primary's address whenever it
opens a connection, and drops its connections when the address changed. A connection to a
node that was demoted (it answers READONLY) is dropped and reported as a connection error
(SentinelManagedConnection): our scripts refuse their first write on a replica before
changing anything, so no allocation ever runs on a replica.
"""

from __future__ import annotations

from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

from timeline.allocator.standalone import StandaloneRedis, client_options
from timeline.settings import Settings, sentinel_addresses


class SentinelRedis(StandaloneRedis):
    """StandaloneRedis on the primary of `master` as the sentinels report it."""

    def __init__(self, sentinel: Sentinel, master: str, settings: Settings) -> None:
        self.sentinel = sentinel
        self.master = master
        super().__init__(
            sentinel.master_for(master, **client_options(settings)),
            mode="sentinel",
        )

    def describe(self) -> str:
        sentinels = ",".join(
            f"{s.connection_pool.connection_kwargs['host']}:{s.connection_pool.connection_kwargs['port']}"
            for s in self.sentinel.sentinels
        )
        return f"sentinel master {self.master} via {sentinels}"

    def close(self) -> None:
        super().close()
        for sentinel in self.sentinel.sentinels:
            sentinel.close()


def connect_sentinel(settings: Settings) -> SentinelRedis:
    """The allocator's Redis behind the sentinels of the settings."""
    assert settings.redis_sentinels
    assert settings.redis_sentinel_master
    timeouts = {
        "socket_connect_timeout": settings.redis_connect_timeout_ms / 1000,
        "socket_timeout": settings.redis_socket_timeout_ms / 1000,
    }
    sentinel = Sentinel(
        sentinel_addresses(settings.redis_sentinels),
        sentinel_kwargs={**timeouts, "retry": Retry(NoBackoff(), 0)},
    )
    return SentinelRedis(sentinel, settings.redis_sentinel_master, settings)
