"""Redis Cluster: counters in buckets (hash tags), one pipeline per master, all at once.

A script may only touch keys of one hash slot, so a request's counters are grouped by bucket
(timeline.allocator.Allocator.bucket: crc32 of the timeline, modulo `redis_buckets`), each
bucket one hash tag and so one slot. Buckets rather than natural slots: a 10,000-member
group touches at most `redis_buckets` script calls instead of thousands.

Every call is sent to the master of its bucket's slot; the calls of one master go in one
pipeline, and every master's pipeline is sent before any reply is read, so the masters work
at the same time. redis-py's own cluster client is used for what is safe to repeat (the
slot map, GET, SET, PING) but never to run a script: it retries a command that timed out
(an allocation that may have run would run again and skip sequences), and its pipeline
refuses EVALSHA. Here, a call is sent again only when its reply says it did not run:

- MOVED (the slot has another master now: a failover, a resharding): the slot map is
  read again and the call goes to the new master;
- ASK (the slot is being migrated): the call goes to the named node, after ASKING;
- TRYAGAIN, CLUSTERDOWN (a migration or a failover in progress): after a short wait;
- no connection to the master (it is down; a replica may be taking over): the slot map is
  read again, a few times, then the bucket is reported refused;
- NOSCRIPT: the script is loaded on that node (wire.py).

A timeout or a dropped connection leaves the outcome unknown: the call is not sent again
here (timeline.allocator decides: a call with an idempotency record replays, one without
is reported as failed).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot
from redis.exceptions import AskError, MovedError, RedisClusterException
from redis.retry import Retry

from timeline.allocator import Call, NotRun, error_text, wire
from timeline.settings import Settings

log = logging.getLogger(__name__)

#: How often a call may be redirected (or find its master down) before it is reported
#: refused; the rounds stop sooner once redis_socket_timeout_ms has passed.
ROUNDS = 5
_WAIT_S = 0.02


class ClusterRedis:
    """The allocator's view of a Redis Cluster (see timeline.allocator.Redis)."""

    mode = "cluster"

    def __init__(self, url: str, settings: Settings) -> None:
        self.buckets = settings.redis_buckets
        self._url = url
        self._kwargs: dict[str, Any] = {
            "password": settings.redis_password or None,
            "socket_connect_timeout": settings.redis_connect_timeout_ms / 1000,
            "socket_timeout": settings.redis_socket_timeout_ms / 1000,
            "max_connections": settings.redis_max_connections,
            "client_name": "timeline",
            # No retries: a connection that cannot be had is a fast 503 (or, for a script
            # call, a refusal this module deals with); redis-py would reconnect and wait.
            "retry": Retry(NoBackoff(), 0),
            # Buckets of the masters that answer are served while another is down.
            "require_full_coverage": False,
        }
        self._slots = [key_slot(f"{{{b}}}".encode()) for b in range(self.buckets)]
        self._budget_s = settings.redis_socket_timeout_ms / 1000
        self._lock = threading.Lock()
        self._client: RedisCluster | None = None

    @property
    def client(self) -> RedisCluster:
        """redis-py's cluster client, created at first use: the service starts (and answers
        503) while the cluster cannot be reached."""
        if self._client is None:
            with self._lock:
                if self._client is None:
                    try:
                        self._client = RedisCluster.from_url(self._url, **self._kwargs)
                    except RedisClusterException as exc:
                        raise redis.ConnectionError(f"redis cluster unreachable: {exc}") from exc
        return self._client

    def slot(self, bucket: int) -> int:
        return self._slots[bucket]

    def run(self, calls: Sequence[Call]) -> list[Any]:
        client = self.client
        replies: list[Any] = [None] * len(calls)
        todo = list(range(len(calls)))
        asked: dict[int, ClusterNode] = {}
        # Redirections and a master that does not answer are retried for as long as one
        # reply may take, not more: a request must not outwait its deadline here.
        deadline = time.monotonic() + self._budget_s
        for round_ in range(ROUNDS):
            batches: dict[tuple[str, bool], tuple[ClusterNode, list[int]]] = {}
            for i in todo:
                node = asked.get(i)
                if node is None:
                    try:
                        node = client.nodes_manager.get_node_from_slot(self.slot(calls[i].bucket))
                    except RedisClusterException as exc:  # the slot has no master now
                        replies[i] = NotRun(str(exc))
                        continue
                batches.setdefault((node.name, i in asked), (node, []))[1].append(i)
            started = [
                (indexes, wire.Batch(self._pool(node), [calls[i] for i in indexes], asking).start())
                for (_, asking), (node, indexes) in batches.items()
            ]
            todo, refresh, wait = [], False, False
            asked = {}
            # Every batch is finished (finish() never raises), so that no connection is
            # left behind and no reply of a call that ran is dropped.
            for indexes, batch in started:
                for i, reply in zip(indexes, batch.finish(), strict=True):
                    replies[i] = reply
                    if isinstance(reply, MovedError):
                        refresh = True
                        todo.append(i)
                    elif isinstance(reply, AskError):
                        node = self._node(reply.host, reply.port)
                        if node is None:
                            replies[i] = NotRun.of(reply, "ASK names an unknown node: ")
                        else:
                            asked[i] = node
                            todo.append(i)
                    elif isinstance(reply, wire.REDIRECTS):  # TRYAGAIN, CLUSTERDOWN
                        wait = True
                        todo.append(i)
                    elif isinstance(reply, NotRun) and str(reply).startswith("no connection"):
                        refresh = wait = True  # the master is down: is there a new one?
                        todo.append(i)
            pause = _WAIT_S * 2**round_ if wait else 0.0
            if not todo or round_ == ROUNDS - 1 or time.monotonic() + pause >= deadline:
                break
            time.sleep(pause)
            if refresh:
                self._refresh()
        return [
            NotRun.of(reply, "redirected or unreachable: ")
            if isinstance(reply, wire.REDIRECTS)
            else reply
            for reply in replies
        ]

    def _pool(self, node: ClusterNode) -> redis.ConnectionPool:
        connection = node.redis_connection or self.client.get_redis_connection(node)
        pool: redis.ConnectionPool = connection.connection_pool
        return pool

    def _node(self, host: str, port: int) -> ClusterNode | None:
        manager = self.client.nodes_manager
        node = manager.get_node(host=host, port=port)
        if node is None:
            self._refresh()
            node = manager.get_node(host=host, port=port)
        return node

    def _refresh(self) -> None:
        """Read the slot map again (after MOVED, or a master that does not answer)."""
        try:
            self.client.nodes_manager.initialize()
        except (RedisClusterException, redis.RedisError) as exc:
            log.warning("redis cluster: the slot map could not be read again: %s", error_text(exc))

    def get(self, key: str) -> bytes | None:
        value: bytes | None = self._safe(lambda: self.client.get(key))
        return value

    def delete(self, keys: Sequence[str]) -> None:
        def delete_all() -> None:
            for key in keys:  # one slot each: no cross-slot DEL
                self.client.delete(key)

        self._safe(delete_all)

    def ping(self) -> None:
        self._safe(lambda: self.client.ping(target_nodes=RedisCluster.PRIMARIES))

    def publish(self, channel: str, message: bytes) -> None:
        # Redis Cluster forwards a PUBLISH to every node: a subscriber on any node hears it.
        self._safe(lambda: self.client.publish(channel, message))

    def pubsub(self) -> Any:
        return self.client.pubsub()

    def masters(self) -> list[str]:
        return [node.name for node in self.client.get_primaries()]  # type: ignore[no-untyped-call]

    def describe(self) -> str:
        try:
            masters = ",".join(self.masters())
        except redis.ConnectionError:
            masters = "unreachable"
        return f"cluster {self._url.rpartition('@')[2]} ({self.buckets} buckets; masters {masters})"

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    @staticmethod
    def _safe(command: Any) -> Any:
        try:
            return command()
        except RedisClusterException as exc:
            raise redis.ConnectionError(f"redis cluster: {exc}") from exc
