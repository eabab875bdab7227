"""The sequence allocator: one Redis counter per timeline, advanced by the Lua scripts in lua/.

One class, `Allocator`, for every Redis topology; what differs between them lives in one
module each and reaches the allocator through the `Redis` protocol below:

- standalone: one Redis (the embedded default too); every request is one EVALSHA;
- sentinel: the same, against the primary the sentinels name, followed through failovers;
- cluster: Redis Cluster. A script may only touch keys of one hash slot there, so counters
  are spread over a fixed number of *buckets*, each a hash tag (`seq:{17}:sync:alice`): a
  request makes one script call per bucket it touches, all calls to one node in one
  pipeline, all nodes at once: one round trip of wall time.

Atomicity is per bucket (standalone: one bucket, so per request). An idempotent message
keeps one record per bucket, beside the counters it covers, written by the same script
call that advanced them: a retry recomputes the same buckets and each one replays or
allocates. A bucket whose call was refused (the script did not run) or whose outcome is
unknown (a timeout, a dropped connection: it may have run) is reported as failed; with a
record its call is sent once more first, since a second run only replays the first.
"""

from __future__ import annotations

import hashlib
import logging
import re
import zlib
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Protocol

import redis

from timeline.errors import Unavailable
from timeline.metrics import dependency_failed
from timeline.model import Kind, Timeline

#: The scripts: lua/ of the repository, which the build maps into the package as
#: timeline.lua (pyproject.toml), so that a wheel holds them and an editable install reads
#: the checkout's.
LUA_DIR = resources.files("timeline.lua")

log = logging.getLogger(__name__)


def load_script(name: str) -> str:
    """The source of lua/<name>.lua."""
    return LUA_DIR.joinpath(f"{name}.lua").read_text(encoding="utf-8")


@dataclass(frozen=True, slots=True)
class Script:
    """A Lua script of lua/, with the SHA1 that EVALSHA names it by."""

    name: str
    source: str
    sha: str

    @classmethod
    def load(cls, name: str) -> Script:
        source = load_script(name)
        return cls(name, source, hashlib.sha1(source.encode()).hexdigest())  # noqa: S324


SCRIPTS = {name: Script.load(name) for name in ("allocate", "seed", "reallocate", "release")}


@dataclass(frozen=True, slots=True)
class Call:
    """One script call: its keys all live in one bucket (one hash slot on a cluster)."""

    script: Script
    keys: list[str]
    args: list[Any]
    bucket: int


class NotRun(Exception):
    """A call that certainly did not run: the node refused it (an error reply, a connection
    that could not be opened) or kept redirecting it. Any other exception a `Redis.run`
    returns means the outcome is unknown: the call may have run."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        #: Redis's error code when the node refused it (OOM, READONLY, ...), else None.
        self.code = code

    @classmethod
    def of(cls, exc: BaseException, context: str = "") -> NotRun:
        """The call `exc` stopped: its text and Redis's error code (see `error_code`)."""
        code, text = _parse_error(exc)
        return cls(f"{context}{text}", code)


# --- Redis's error codes ---------------------------------------------------------------------

#: The code of each error reply that redis-py raises as a class of its own, removing the code
#: from the message: its parser's table (`EXCEPTION_CLASSES`, private) inverted by hand,
#: subclasses first.
_CODE_OF_CLASS: tuple[tuple[type[Exception], str], ...] = (
    (redis.exceptions.OutOfMemoryError, "OOM"),
    (redis.exceptions.ReadOnlyError, "READONLY"),
    (redis.exceptions.NoScriptError, "NOSCRIPT"),
    (redis.exceptions.BusyLoadingError, "LOADING"),
    (redis.exceptions.ExecAbortError, "EXECABORT"),
    (redis.exceptions.NoPermissionError, "NOPERM"),
    (redis.exceptions.AuthenticationError, "NOAUTH"),  # WRONGPASS too: one class for both
    (redis.exceptions.MovedError, "MOVED"),  # an AskError
    (redis.exceptions.AskError, "ASK"),
    (redis.exceptions.TryAgainError, "TRYAGAIN"),
    (redis.exceptions.MasterDownError, "MASTERDOWN"),  # a ClusterDownError
    (redis.exceptions.ClusterDownError, "CLUSTERDOWN"),
    (redis.exceptions.ClusterCrossSlotError, "CROSSSLOT"),
)
#: Where Redis before 7.0 puts the code of a script's failed command: after the script's
#: line, `...: @user_script:1: @user_script: 1: -OOM command not allowed ...` (redis.call)
#: or `@user_script: 1: -READONLY You can't write ...` (an error redis.pcall returned).
_SCRIPT_CODE = re.compile(r"(?P<where>.*@user_script:\s?\d+): -?(?P<code>[A-Z][A-Z0-9_]+)(?= |$)")
#: A code that leads the message (one redis-py has no class for: MISCONF, BUSY, ...).
_LEADING_CODE = re.compile(r"[A-Z][A-Z0-9_]+(?= |$)")


def _parse_error(exc: BaseException) -> tuple[str | None, str]:
    if isinstance(exc, NotRun):
        return exc.code, str(exc)
    text = str(exc)
    status = getattr(exc, "status_code", None)  # the code redis-py parsed (recent ones)
    if not isinstance(status, str):
        status = next((code for kind, code in _CODE_OF_CLASS if isinstance(exc, kind)), None)
    if status is None and not isinstance(exc, redis.ResponseError):
        return None, text  # no reply of Redis: a timeout, a refused connection
    if status in (None, "ERR"):
        # A script's error on Redis 6.2: the reply is ERR, the command's own code inside.
        inside = _SCRIPT_CODE.search(text)
        if inside:
            return inside["code"], f"{text[inside.start('code') :]} ({inside['where']})"
    if status is None:
        leading = _LEADING_CODE.match(text)
        status = leading[0] if leading else "ERR"
    if text == status or text.startswith(f"{status} "):
        return status, text
    return status, f"{status} {text}"


def error_code(exc: BaseException) -> str | None:
    """Redis's code of an error reply (OOM, READONLY, LOADING, MISCONF, ERR, ...), the same
    whatever the server's version and however redis-py presents it: the exception's class,
    the code inside a script's error (Redis 6.2), or the code leading the message. None for
    an error that is no reply of Redis (a timeout, a dropped connection)."""
    return _parse_error(exc)[0]


def error_text(exc: BaseException) -> str:
    """The error for the log: Redis's code first (`OOM command not allowed when ...`), as
    `error_code` reads it; the exception's text as it is when it has none."""
    return _parse_error(exc)[1]


def _logged(exc: BaseException) -> tuple[str, dict[str, Any]]:
    """An error as a log line gives it: `error_text`, and the record's structured field of
    its Redis code (see timeline.logs), read once."""
    code, text = _parse_error(exc)
    return text, {"fields": {"redis_error": code}} if code else {}


class Redis(Protocol):
    """What the allocator needs of a Redis topology (one module each)."""

    #: `standalone`, `sentinel` or `cluster`.
    mode: str
    #: How many buckets counters are spread over (1: every key in one, no hash tags).
    buckets: int

    def run(self, calls: Sequence[Call]) -> list[Any]:
        """Run every call, all at once where the topology allows: each call's reply, or an
        exception instance (NotRun: it did not run; any other: unknown). Redirections and
        unknown scripts are dealt with here; a call is never sent again once it may have
        run."""
        ...

    def get(self, key: str) -> bytes | None:
        """GET (safe to repeat); raises redis errors."""
        ...

    def delete(self, keys: Sequence[str]) -> None:
        """DEL each key (safe to repeat); raises redis errors."""
        ...

    def ping(self) -> None:
        """Raise a redis error unless every node that allocates answers."""
        ...

    def describe(self) -> str:
        """A line for the log: the mode and where it points."""
        ...

    def publish(self, channel: str, message: bytes) -> None:
        """PUBLISH (to every subscriber, on any node of a cluster); raises redis errors."""
        ...

    def pubsub(self) -> Any:
        """A new redis-py PubSub (a connection of its own) for subscribing."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Record:
    """An idempotent message: where its records live (a conversation and the client's id),
    the fingerprint of its request, and how long the records are kept."""

    conversation: str
    client_msg_id: str
    fingerprint: str
    ttl_ms: int


@dataclass(frozen=True, slots=True)
class Replay:
    """Positions whose sequences an earlier attempt of the message allocated (its record)."""

    positions: tuple[int, ...]
    fingerprint: str
    allocated_ms: int


@dataclass(slots=True)
class Allocation:
    """What one allocate() call did, by position in the request's timelines."""

    #: The last sequence of each allocated (or replayed) position's range.
    lasts: dict[int, int] = field(default_factory=dict)
    #: Positions whose sequences come from an earlier attempt's record.
    replays: list[Replay] = field(default_factory=list)
    #: Positions whose counters are missing (Redis lost them, or the timelines are new).
    missing: list[int] = field(default_factory=list)
    #: Positions allocated nothing because a counter of their bucket is missing (the missing
    #: ones included): seed the missing counters and ask again for these.
    pending: list[int] = field(default_factory=list)
    #: Positions whose bucket was refused or whose outcome is unknown (no record to replay
    #: it, or its second send failed too).
    failed: list[int] = field(default_factory=list)


def _parse_record(value: bytes | str) -> tuple[str, int, list[int]]:
    text = value.decode() if isinstance(value, bytes) else value
    fingerprint, allocated_ms, *lasts = text.split(",")
    return fingerprint, int(allocated_ms), [int(last) for last in lasts]


class Allocator:
    """Allocates contiguous sequence ranges: one script call per bucket a request touches,
    sent together (on one Redis: one EVALSHA per request)."""

    def __init__(self, client: Redis, key_prefix: str) -> None:
        self._redis = client
        self._prefix = key_prefix
        self._buckets = client.buckets
        # Each bucket's key prefix, built once: a 10,000-member request makes 10,001 keys.
        self._counter_prefixes = [
            f"{key_prefix}seq:{self._tag(bucket)}" for bucket in range(self._buckets)
        ]

    @property
    def redis(self) -> Redis:
        return self._redis

    def bucket(self, timeline: Timeline) -> int:
        """The bucket of a timeline's counter: crc32 of `kind:id`, modulo the buckets."""
        if self._buckets == 1:
            return 0
        return zlib.crc32(f"{timeline.kind.value}:{timeline.id}".encode()) % self._buckets

    def _tag(self, bucket: int) -> str:
        return "" if self._redis.buckets == 1 else f"{{{bucket}}}:"

    def key(self, timeline: Timeline) -> str:
        """The counter's key: `<prefix>seq:<kind>:<id>` on one Redis; on a cluster the
        bucket's hash tag comes first, `<prefix>seq:{<bucket>}:<kind>:<id>`."""
        return self._key(timeline, self.bucket(timeline))

    def _key(self, timeline: Timeline, bucket: int) -> str:
        return f"{self._counter_prefixes[bucket]}{timeline.kind.value}:{timeline.id}"

    def record_key(self, record: Record, bucket: int) -> str:
        """Where an idempotent message's record of one bucket lives (scoped to its
        conversation): `<prefix>msg:<conversation>:<client_msg_id>` on one Redis; on a
        cluster `<prefix>msg:{<bucket>}:<buckets>:<conversation>:<client_msg_id>`: the
        number of buckets in the key, since a record lists the sequences of its bucket's
        timelines, which another number of buckets groups otherwise."""
        tag = self._tag(bucket)
        if tag:
            tag = f"{tag}{self._buckets}:"
        return f"{self._prefix}msg:{tag}{record.conversation}:{record.client_msg_id}"

    def groups(
        self, timelines: Sequence[Timeline], positions: Collection[int] | None = None
    ) -> list[tuple[int, list[int]]]:
        """The buckets of these positions (all: None), each with its positions in request
        order; a bucket is listed whole or not at all, in the order of its first position."""
        if self._buckets == 1:
            return [(0, list(range(len(timelines))))]
        members: dict[int, list[int]] = {}
        for position, timeline in enumerate(timelines):
            members.setdefault(self.bucket(timeline), []).append(position)
        if positions is None:
            return list(members.items())
        wanted = {self.bucket(timelines[p]) for p in positions}
        return [(bucket, ps) for bucket, ps in members.items() if bucket in wanted]

    # --- allocating ----------------------------------------------------------------------

    def allocate(
        self,
        timelines: Sequence[Timeline],
        count: int = 1,
        record: Record | None = None,
        now_ms: int = 0,
        positions: Collection[int] | None = None,
    ) -> Allocation:
        """Give each timeline (those of the buckets of `positions`; None: all) `count` new
        sequences, bucket by bucket, unless a counter of the bucket is missing or its record
        shows an earlier attempt; see lua/allocate.lua."""
        groups = self.groups(timelines, positions)
        calls = [
            self._allocate_call(timelines, bucket, ps, count, record, now_ms)
            for bucket, ps in groups
        ]
        replies = self._run("allocate", calls)
        allocation = Allocation()
        again: list[int] = []
        for index, reply in enumerate(replies):
            if record is not None and _unknown(reply):
                again.append(index)  # may have run: a second send replays it if it did
            else:
                self._take(allocation, groups[index][1], reply)
        if again:
            replies = self._run("allocate", [calls[i] for i in again])
            for index, reply in zip(again, replies, strict=True):
                self._take(allocation, groups[index][1], reply)
        return allocation

    def _allocate_call(
        self,
        timelines: Sequence[Timeline],
        bucket: int,
        positions: list[int],
        count: int,
        record: Record | None,
        now_ms: int,
    ) -> Call:
        prefix = self._counter_prefixes[bucket]
        kinds = {kind: f"{prefix}{kind.value}:" for kind in Kind}
        keys = [kinds[kind] + id_ for kind, id_ in map(timelines.__getitem__, positions)]
        if record is None:
            args: list[Any] = [count, 0, 0, "", 0]
        else:
            keys.insert(0, self.record_key(record, bucket))
            args = [count, 1, record.ttl_ms, record.fingerprint, now_ms]
        return Call(SCRIPTS["allocate"], keys, args, bucket)

    @staticmethod
    def _take(allocation: Allocation, positions: list[int], reply: Any) -> None:
        if isinstance(reply, BaseException):
            allocation.failed.extend(positions)
            return
        status = reply[0]
        if status == b"ok":
            allocation.lasts.update(zip(positions, reply[1:], strict=True))
        elif status == b"missing":
            allocation.missing.extend(positions[int(i) - 1] for i in reply[1:])
            allocation.pending.extend(positions)
        else:
            fingerprint, allocated_ms, lasts = _parse_record(reply[1])
            if len(lasts) == len(positions):
                allocation.lasts.update(zip(positions, lasts, strict=True))
            # A record of another size is another request's: the fingerprint says so.
            allocation.replays.append(Replay(tuple(positions), fingerprint, allocated_ms))

    def seed(self, floors: Mapping[Timeline, int]) -> None:
        """Raise each counter to at least its floor (the store's highest sequence)."""
        by_bucket: dict[int, tuple[list[str], list[int]]] = {}
        for timeline, floor in floors.items():
            keys, values = by_bucket.setdefault(self.bucket(timeline), ([], []))
            keys.append(self.key(timeline))
            values.append(floor)
        calls = [Call(SCRIPTS["seed"], k, list(v), b) for b, (k, v) in by_bucket.items()]
        for reply in self._run("seed", calls):
            if isinstance(reply, BaseException):
                raise Unavailable("sequence allocator (redis) could not seed counters")

    def reallocate(
        self,
        timelines: Sequence[Timeline],
        moves: Sequence[tuple[int, int, int]],
        count: int = 1,
        record: Record | None = None,
    ) -> list[int]:
        """New ranges for (position, last held, store floor) of the message's timelines
        whose sequence was taken; racing attempts of one idempotent message agree on one new
        sequence (lua/reallocate.lua). Raises Unavailable unless every bucket answered."""
        groups = dict(self.groups(timelines, [move[0] for move in moves]))
        by_bucket: dict[int, list[int]] = {}
        for index, (position, _, _) in enumerate(moves):
            by_bucket.setdefault(self.bucket(timelines[position]), []).append(index)
        calls = []
        for bucket, indexes in by_bucket.items():
            keys = [self.key(timelines[moves[i][0]]) for i in indexes]
            args: list[Any] = [count, 0 if record is None else 1]
            for i in indexes:
                position, held, floor = moves[i]
                args += [groups[bucket].index(position) + 1, held, floor]
            if record is not None:
                keys.insert(0, self.record_key(record, bucket))
            calls.append(Call(SCRIPTS["reallocate"], keys, args, bucket))
        lasts = [0] * len(moves)
        for (_, indexes), reply in zip(
            by_bucket.items(), self._run("reallocate", calls), strict=True
        ):
            if isinstance(reply, BaseException):
                raise Unavailable("sequence allocator (redis) could not move sequences")
            for i, last in zip(indexes, reply, strict=True):
                lasts[i] = int(last)
        return lasts

    def release(
        self, timelines: Sequence[Timeline], count: int, lasts: Mapping[int, int]
    ) -> set[int]:
        """Give back the ranges ending at these lasts (position: last) where nothing was
        allocated after them (lua/release.lua); the positions given back. Nothing may have
        been written in them. Raises Unavailable only when Redis cannot be reached at all."""
        by_bucket: dict[int, list[int]] = {}
        for position in lasts:
            by_bucket.setdefault(self.bucket(timelines[position]), []).append(position)
        calls = [
            Call(
                SCRIPTS["release"],
                [self.key(timelines[p]) for p in positions],
                [count, *(lasts[p] for p in positions)],
                bucket,
            )
            for bucket, positions in by_bucket.items()
        ]
        released: set[int] = set()
        for positions, reply in zip(by_bucket.values(), self._run("release", calls), strict=True):
            if not isinstance(reply, BaseException):
                released.update(p for p, done in zip(positions, reply, strict=True) if done)
        return released

    def forget(
        self, timelines: Sequence[Timeline], record: Record, positions: Collection[int]
    ) -> None:
        """Delete the message's records of the buckets of these positions."""
        keys = [self.record_key(record, bucket) for bucket, _ in self.groups(timelines, positions)]
        self._command("forget", lambda: self._redis.delete(keys))

    def latest(self, timeline: Timeline) -> int | None:
        """The newest sequence allocated to the timeline; None if its counter is missing."""
        value = self._command("latest", lambda: self._redis.get(self.key(timeline)))
        return int(value) if value is not None else None

    def ping(self) -> None:
        self._command("ping", self._redis.ping)

    def describe(self) -> str:
        return self._redis.describe()

    def close(self) -> None:
        self._redis.close()

    # --- failures --------------------------------------------------------------------------

    def _run(self, what: str, calls: list[Call]) -> list[Any]:
        try:
            replies = self._redis.run(calls)
        except redis.RedisError as exc:  # the topology itself is unreachable
            dependency_failed("redis")
            text, extra = _logged(exc)
            log.warning("redis %s failed: %s", what, text, extra=extra)
            raise Unavailable("sequence allocator (redis) is unavailable") from exc
        failures = [reply for reply in replies if isinstance(reply, BaseException)]
        if failures:
            dependency_failed("redis")
            text, extra = _logged(failures[0])
            log.warning(
                "redis %s: %d of %d bucket call(s) failed (%s: %s)",
                what,
                len(failures),
                len(calls),
                "refused" if isinstance(failures[0], NotRun) else "outcome unknown",
                text,
                extra=extra,
            )
        return replies

    @staticmethod
    def _command(what: str, command: Any) -> Any:
        try:
            return command()
        except (redis.ConnectionError, redis.TimeoutError) as exc:  # LOADING too, to redis-py
            dependency_failed("redis")
            text, extra = _logged(exc)
            log.warning("redis %s failed: %s", what, text, extra=extra)
            raise Unavailable("sequence allocator (redis) is unavailable") from exc
        except redis.RedisError as exc:
            # READONLY after a failover, OOM, MISCONF, CLUSTERDOWN: Redis refuses, the caller
            # retries.
            dependency_failed("redis")
            text, extra = _logged(exc)
            log.error("redis %s refused: %s", what, text, extra=extra)
            raise Unavailable("sequence allocator (redis) refused the request") from exc


def _unknown(reply: Any) -> bool:
    return isinstance(reply, BaseException) and not isinstance(reply, NotRun)


def open_allocator(settings: Any, url: str | None) -> Allocator:
    """The allocator of the settings' Redis mode; `url` is the standalone or cluster URL
    (the embedded redis-server's when none is configured)."""
    mode = settings.redis_mode
    if mode == "cluster":
        from timeline.allocator.cluster import ClusterRedis

        assert url is not None
        return Allocator(ClusterRedis(url, settings), settings.redis_key_prefix)
    if mode == "sentinel":
        from timeline.allocator.sentinel import connect_sentinel

        return Allocator(connect_sentinel(settings), settings.redis_key_prefix)
    from timeline.allocator.standalone import StandaloneRedis, connect_redis

    assert url is not None
    return Allocator(StandaloneRedis(connect_redis(url, settings)), settings.redis_key_prefix)
