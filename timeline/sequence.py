"""The sequence allocator: one Redis counter per timeline, advanced by the Lua scripts in lua/."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from timeline.errors import Unavailable
from timeline.metrics import dependency_failed
from timeline.model import Kind, Timeline
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


@dataclass(frozen=True, slots=True)
class Allocation:
    """What allocate.lua answered: sequences, a replayed record, or missing counters."""

    lasts: list[int]  # the last sequence of each timeline's range (empty when missing)
    replayed: bool = False  # an earlier attempt of the same message allocated these
    fingerprint: str = ""  # the replayed record's fingerprint
    allocated_ms: int = 0  # when the replayed record's sequences were allocated
    missing: list[int] = field(default_factory=list)  # positions of counters to seed


@dataclass(frozen=True, slots=True)
class Record:
    """An idempotent message's record: its key and the fingerprint of its request."""

    key: str
    fingerprint: str
    ttl_ms: int


class SequenceAllocator:
    """Allocates contiguous sequence ranges, one Redis round trip per request."""

    def __init__(self, client: redis.Redis, key_prefix: str) -> None:
        self._redis = client
        self._prefix = key_prefix
        # register_script calls EVALSHA and reloads the script on NOSCRIPT by itself.
        self._allocate = client.register_script(load_script("allocate"))
        self._seed = client.register_script(load_script("seed"))
        self._reallocate = client.register_script(load_script("reallocate"))

    @property
    def client(self) -> redis.Redis:
        return self._redis

    def key(self, timeline: Timeline) -> str:
        """The counter's key: `<prefix>seq:<kind>:<id>`; the kind keeps sync and history apart."""
        return f"{self._prefix}seq:{timeline.kind}:{timeline.id}"

    def keys(self, history_id: str, members: Sequence[str]) -> list[str]:
        """The counters of a request: its history timeline's, then each member's sync."""
        sync = f"{self._prefix}seq:{Kind.SYNC}:"
        return [f"{self._prefix}seq:{Kind.HISTORY}:{history_id}", *(sync + m for m in members)]

    def record_key(self, conversation: str, client_msg_id: str) -> str:
        """Where an idempotent message's record lives: scoped to its conversation."""
        return f"{self._prefix}msg:{conversation}:{client_msg_id}"

    def allocate(
        self,
        counters: Sequence[str],
        count: int = 1,
        record: Record | None = None,
        now_ms: int = 0,
    ) -> Allocation:
        """Give each counter (see key() and keys()) `count` new sequences, unless one is
        missing or the record shows an earlier attempt; see lua/allocate.lua."""
        keys = list(counters)
        if record is None:
            args: list[Any] = [count, 0, 0, "", 0]
        else:
            keys.insert(0, record.key)
            args = [count, 1, record.ttl_ms, record.fingerprint, now_ms]
        reply = self._call("allocate", lambda: self._allocate(keys=keys, args=args))
        status = reply[0]
        if status == b"ok":
            del reply[0]  # integers already: RESP integers arrive as int (hiredis or not)
            return Allocation(lasts=reply)
        if status == b"missing":
            return Allocation(lasts=[], missing=[int(i) - 1 for i in reply[1:]])
        fingerprint, allocated_ms, *lasts = reply[1].decode().split(",")
        return Allocation(
            lasts=[int(last) for last in lasts],
            replayed=True,
            fingerprint=fingerprint,
            allocated_ms=int(allocated_ms),
        )

    def seed(self, floors: dict[Timeline, int]) -> None:
        """Raise each counter to at least its floor (the store's highest sequence)."""
        keys = [self.key(t) for t in floors]
        values = list(floors.values())
        self._call("seed", lambda: self._seed(keys=keys, args=values))

    def reallocate(
        self,
        moves: Sequence[tuple[Timeline, int, int, int]],
        count: int = 1,
        record: Record | None = None,
    ) -> list[int]:
        """New ranges for (timeline, position in the message, last held, store floor) whose
        sequence was taken; racing attempts of one idempotent message agree on one new
        sequence (lua/reallocate.lua)."""
        keys = [self.key(move[0]) for move in moves]
        args: list[Any] = [count, 0 if record is None else 1]
        for _, position, held, floor in moves:
            args += [position + 1, held, floor]
        if record is not None:
            keys.insert(0, record.key)
        reply = self._call("reallocate", lambda: self._reallocate(keys=keys, args=args))
        return [int(last) for last in reply]

    def latest(self, timeline: Timeline) -> int | None:
        """The newest sequence allocated to the timeline; None if its counter is missing."""
        value = self._call("latest", lambda: self._redis.get(self.key(timeline)))
        return int(value) if value is not None else None

    def ping(self) -> None:
        self._call("ping", self._redis.ping)

    def close(self) -> None:
        self._redis.close()

    @staticmethod
    def _call(what: str, command: Any) -> Any:
        try:
            return command()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            dependency_failed("redis")
            log.warning("redis %s failed: %s", what, exc)
            raise Unavailable("sequence allocator (redis) is unavailable") from exc
        except redis.ResponseError as exc:
            # READONLY after a failover, OOM, MISCONF, LOADING: Redis refuses, the caller retries.
            dependency_failed("redis")
            log.error("redis %s refused: %s", what, exc)
            raise Unavailable("sequence allocator (redis) refused the request") from exc
