"""The Redis Cluster and Redis Sentinel fixtures (tests/topologies.py) do what they say.

Start-up, failover and rejoin times are printed: `pytest -s tests/test_topologies.py`.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import redis
from redis.cluster import RedisCluster

from topologies import SLOTS, ClusterServers, SentinelServers

PASSWORD = "topology-secret"
FAILOVER_WITHIN = 15.0


def covered(ranges: list[tuple[int, int]]) -> bool:
    """The ranges cover slots 0-16383 exactly once."""
    expected = 0
    for low, high in sorted(ranges):
        if low != expected:
            return False
        expected = high + 1
    return expected == SLOTS


# --- Redis Cluster ----------------------------------------------------------------------------


def test_cluster_has_three_masters_each_with_a_replica(redis_cluster: ClusterServers) -> None:
    print(f"\ncluster start-up: {redis_cluster.startup_seconds:.2f} s")
    masters = redis_cluster.masters()
    assert len(masters) == 3
    for port in masters:
        assert len(redis_cluster.replicas_of(port)) == 1
    for port in redis_cluster.ports:  # every node sees all 16384 slots served, by the same
        view = redis_cluster.view(port)
        assert covered([r for n in view if n.is_master for r in n.slots])
        assert sorted(n.port for n in view if n.is_master and n.slots) == masters
        client = redis_cluster.client(port)
        try:
            info = client.cluster("INFO")
        finally:
            client.close()
        assert info["cluster_state"] == "ok"
        assert int(info["cluster_slots_ok"]) == SLOTS


def test_cluster_client_reaches_every_master(
    redis_cluster: ClusterServers, key_prefix: str
) -> None:
    client = RedisCluster.from_url(redis_cluster.url)
    try:
        for port in redis_cluster.masters():
            key = redis_cluster.key_on(port, key_prefix)
            assert client.set(key, f"on {port}")
            assert client.get(key) == f"on {port}".encode()
            node = redis_cluster.client(port)  # the key is on that master itself
            try:
                assert node.get(key) == f"on {port}".encode()
            finally:
                node.close()
    finally:
        client.close()


@pytest.mark.slow
def test_cluster_failover_and_rejoin(
    redis_cluster_factory: Callable[..., ClusterServers], key_prefix: str
) -> None:
    cluster = redis_cluster_factory(password=PASSWORD)
    print(f"\ncluster start-up (with a password): {cluster.startup_seconds:.2f} s")
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=cluster.masters()[0]).ping()
    client = RedisCluster.from_url(cluster.url)
    try:
        keys = {port: cluster.key_on(port, key_prefix) for port in cluster.masters()}
        for port, key in keys.items():
            node = cluster.client(port)
            try:  # written on the master itself, so that WAIT (same connection) says the
                node.set(key, "before")  # replica has it too before the master dies
                assert node.wait(1, 2000) == 1
            finally:
                node.close()
        victim = cluster.masters()[0]
        replicas = cluster.replicas_of(victim)
        assert cluster.kill_master_of(keys[victim]) == victim

        seconds = cluster.wait_failover(victim, timeout=FAILOVER_WITHIN)
        print(f"cluster failover: {seconds:.2f} s")
        assert seconds < FAILOVER_WITHIN
        assert cluster.master_of(keys[victim]) in replicas
        assert len(cluster.masters()) == 3
        for key in keys.values():  # the same client, its topology refreshed on the error
            assert client.get(key) == b"before"
            assert client.set(key, "after")
            assert client.get(key) == b"after"

        seconds = cluster.restart(victim)
        print(f"cluster: the killed master rejoined as a replica in {seconds:.2f} s")
        assert victim in cluster.replicas_of(cluster.master_of(keys[victim]))
        node = cluster.client(victim)
        try:  # it came back empty and resynced from its old replica
            node.readonly()
            assert node.get(keys[victim]) == b"after"
        finally:
            node.close()
        cluster.flushall()
        assert client.get(keys[victim]) is None
    finally:
        client.close()


# --- Redis Sentinel ---------------------------------------------------------------------------


def test_sentinel_sees_primary_replica_and_each_other(
    redis_sentinel: SentinelServers, key_prefix: str
) -> None:
    print(f"\nsentinel start-up: {redis_sentinel.startup_seconds:.2f} s")
    assert len(redis_sentinel.sentinels.split(",")) == 3
    primary = redis_sentinel.primary_port()
    assert redis_sentinel.replica_ports() == [p for p in redis_sentinel.data if p != primary]
    sentinel = redis_sentinel.sentinel()
    assert sentinel.discover_master(redis_sentinel.master_name) == ("127.0.0.1", primary)
    for node in redis_sentinel.sentinel_nodes.values():
        assert len(node.call("SENTINEL", "SENTINELS", redis_sentinel.master_name)) == 2
        assert len(node.call("SENTINEL", "REPLICAS", redis_sentinel.master_name)) == 1
    master = sentinel.master_for(redis_sentinel.master_name)
    try:
        assert master.set(f"{key_prefix}k", "v")
        assert master.get(f"{key_prefix}k") == b"v"
    finally:
        master.close()


@pytest.mark.slow
def test_sentinel_failover_and_rejoin(
    redis_sentinel_factory: Callable[..., SentinelServers], key_prefix: str
) -> None:
    servers = redis_sentinel_factory(password=PASSWORD)
    print(f"\nsentinel start-up (with a password): {servers.startup_seconds:.2f} s")
    key = f"{key_prefix}k"
    master = servers.sentinel().master_for(servers.master_name)
    try:
        assert master.set(key, "before")
        assert master.wait(1, 2000) == 1  # the replica has it (same connection as the SET)
        old = servers.kill_primary()

        seconds = servers.wait_failover(timeout=FAILOVER_WITHIN)
        print(f"sentinel failover: {seconds:.2f} s")
        assert seconds < FAILOVER_WITHIN
        assert servers.primary_port() != old
        assert master.get(key) == b"before"  # the same client, rediscovered
        assert master.set(key, "after")

        seconds = servers.restart(old)
        print(f"sentinel: the old primary was made a replica in {seconds:.2f} s")
        assert servers.replica_ports() == [old]
        node = servers.client(old)
        try:
            assert node.get(key) == b"after"
        finally:
            node.close()
    finally:
        master.close()
