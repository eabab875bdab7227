"""Typed settings: defaults in code, then a YAML file, then TIMELINE_* environment variables."""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from timeline.embedded import SOCKET_PATH_MAX, socket_path

ENV_PREFIX = "TIMELINE_"
#: TIMELINE_* variables that are read but are not settings: the settings file's name, and
#: the test suite's servers (tests/conftest.py). Any other unknown TIMELINE_* variable is a
#: typo that would otherwise be ignored in silence, so it stops the service at start-up.
NOT_SETTINGS = frozenset({"TIMELINE_CONFIG", "TIMELINE_TEST_MONGO_URI", "TIMELINE_TEST_REDIS_URL"})
DEFAULT_CONFIG_PATH = Path("configs/timeline.yaml")
#: The longest retention, about 68 years: the bound earlier versions had (their TTL index
#: kept seconds in 32 bits, and a day's backstop came on top), kept so that a configuration
#: is valid in every version or in none.
RETENTION_MAX_SECONDS = 2**31 - 1 - 86_400
#: How the service finds its Redis (redis_mode).
REDIS_MODES = ("standalone", "cluster", "sentinel")
#: Where timeline-grpc listens when grpc_bind is unset, and the grpc_bind that turns it off.
GRPC_DEFAULT_BIND = "127.0.0.1:9000"
GRPC_OFF = "off"
#: The most timeline-grpc processes gunicorn's master runs (grpc_processes).
GRPC_PROCESSES_MAX = 64


def check_grpc_bind(value: str) -> None:
    """A gRPC listening address: host:port ([::]:9000 for IPv6) or unix:/path; ValueError
    when malformed. Port 0 lets the system pick one."""
    if value.startswith("unix:"):
        if not value.removeprefix("unix:").lstrip("/"):
            raise ValueError(f"{value!r} names no socket path")
        return
    host, sep, port = value.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    if (
        not sep
        or not host.strip("[]")
        or not port.isdigit()
        or int(port) > 65535
        or (":" in host and not bracketed)  # an IPv6 address needs its brackets
    ):
        raise ValueError(
            f"must be host:port (127.0.0.1:9000, 0.0.0.0:9000, [::]:9000), unix:/path or "
            f"{GRPC_OFF}, got {value!r}"
        )


def sentinel_addresses(value: str) -> list[tuple[str, int]]:
    """`host:port,host:port,...` (redis_sentinels) as (host, port) pairs; ValueError when
    malformed."""
    addresses = []
    for part in value.split(","):
        host, sep, port = part.strip().rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{part.strip()!r} is not host:port")
        addresses.append((host.strip("[]"), int(port)))
    return addresses


class SettingsError(ValueError):
    """A settings file or variable that cannot be used; raised at start-up."""

    def __init__(self, message: str, *, names: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        #: The settings the complaint is about, so the loader can say where each was set.
        self.names = names


@dataclass(frozen=True, slots=True)
class Settings:
    """Every knob of the service; `configs/timeline.yaml` documents each one."""

    # Redis: the sequence allocator. None means the embedded redis-server under data_dir.
    redis_url: str | None = None
    # standalone (one Redis, or the embedded one), cluster (redis_url names any node) or
    # sentinel (redis_sentinels and redis_sentinel_master name the primary).
    redis_mode: str = "standalone"
    redis_sentinels: str | None = None  # host:port,host:port,...
    redis_sentinel_master: str | None = None
    # The password of the Redis nodes (not the sentinels'), in any mode; one in redis_url
    # is used too.
    redis_password: str | None = None
    # cluster: counters are spread over this many buckets (hash tags); fixed for the life
    # of a deployment (changing it is a migration: see the README).
    redis_buckets: int = 64
    redis_key_prefix: str = "timeline:"
    redis_connect_timeout_ms: int = 200
    redis_socket_timeout_ms: int = 500
    redis_max_connections: int = 64

    # Store: MongoDB when mongo_uri is set, else SQLite.
    mongo_uri: str | None = None
    mongo_database: str = "im"
    mongo_timeout_ms: int = 500
    # Each MongoDB operation in all, server selection to reply (pymongo's timeoutMS, which
    # also sends maxTimeMS so the server stops too); index builds are exempt.
    mongo_operation_timeout_ms: int = 2000
    # Each index build the service starts (0: none). Past it MongoDB aborts the build, and
    # the service stops trying until an operator acts (timeline-admin migrate has none).
    mongo_index_build_timeout_seconds: int = 6 * 3600
    sqlite_path: str = "var/timeline.sqlite3"
    sqlite_busy_timeout_ms: int = 1000
    # How often expired entries are removed (by one worker, raising floors first).
    purge_interval_seconds: int = 60

    # Retention: entries older than this are never returned and are removed in the
    # background; 0 keeps them forever. The sync store is an inbox; history is the archive.
    sync_retention_seconds: int = 30 * 86_400
    history_retention_seconds: int = 0

    # Most messages one send or sendGroup may carry in `messages`.
    batch_max_messages: int = 100

    # Log level of the service's JSON log lines (one access line per request at info).
    log_level: str = "info"

    # Where the embedded default keeps its redis-server data and socket.
    data_dir: str = "var"

    # Request limits: going over one is a 4xx, never a silent cut.
    count_default: int = 100
    count_max: int = 1000
    group_members_max: int = 10_000
    message_max_bytes: int = 64 * 1024
    message_max_depth: int = 64
    id_max_length: int = 128
    body_max_bytes: int = 4 * 1024 * 1024
    # What one sendGroup may write in all: (members + 1) x the message's bytes.
    fanout_max_bytes: int = 64 * 1024 * 1024
    # Sync copies one request may write: members x messages of its batch.
    request_documents_max: int = 200_000

    # CORS headers on every reply to a browser, as go-timeline sends them; empty: none.
    cors_allow_origin: str = "*"
    # The console page (GET / and its assets under /console/, timeline/console/); false:
    # the API alone, and / is a 404 as any unknown route.
    console: bool = True

    # Idempotent sends: how long a client_msg_id's record (its sequences) is kept in the
    # store, the authority; and in Redis, a hint that makes a prompt retry a replay (at most
    # idempotency_ttl_seconds). A retry after Redis forgot is answered from the store.
    idempotency_ttl_seconds: int = 86_400
    idempotency_redis_seconds: int = 300
    # A store write that fails is tried again, this many times in all, backing off from
    # store_retry_backoff_ms (doubling), before the copies are reported as not stored.
    store_write_attempts: int = 4
    store_retry_backoff_ms: int = 100
    # Before anything is stored a request stops retrying after this long: a fast 503.
    store_retry_budget_ms: int = 1000

    # When set, every /timeline/* route needs `Authorization: Bearer <api_token>`.
    api_token: str | None = None

    # A request starts no new work after this long (a fan-out then reports the members it
    # could not write): far below gunicorn's timeout, so that no request runs into it.
    request_deadline_ms: int = 3_000
    # A reader never steps over a sequence whose write may still be in flight; after
    # this long the writer is known to have failed and the hole is passed over. At least
    # request_deadline_ms + the longest store operation + 1 s (validated).
    gap_grace_ms: int = 6_000

    # The HTTP front (gunicorn's worker, timeline/worker.py): a request's headers and body
    # must arrive within http_read_timeout_ms, its reply be taken within
    # http_write_timeout_ms, and a kept-alive connection idle for http_keepalive_ms is
    # closed; http_threads requests run at once in each worker process.
    http_read_timeout_ms: int = 10_000
    http_write_timeout_ms: int = 10_000
    http_keepalive_ms: int = 5_000
    http_threads: int = 4
    # Connections a worker holds at once (gunicorn's worker_connections; kept below the open
    # files limit). At the cap, connections that have sent nothing are closed, oldest first,
    # to take new ones.
    http_max_connections: int = 10_000
    # Bytes a worker holds for requests and replies in flight. Over it, bodies are not read
    # on, new requests are answered 503 (Retry-After) and the slowest readers are dropped.
    http_memory_budget_bytes: int = 256 * 1024 * 1024
    # A sync or history page holds at most this many bytes of entries (as JSON encodes
    # them), and at least one entry: clients page on by entrySetLastSeq.
    page_max_bytes: int = 4 * 1024 * 1024
    # The longest a sync or forward history read waits for entries (wait_ms); a larger
    # wait_ms is clamped to it.
    sync_wait_max_ms: int = 30_000
    # A device (the `device` of a sync or ack) not seen for longer stops holding back its
    # member's sync entries: they are released below the other devices' positions.
    device_idle_seconds: int = 30 * 86_400

    # The gRPC API (timeline-grpc, timeline/rpc/): host:port or unix:/path. Unset,
    # timeline-grpc listens on GRPC_DEFAULT_BIND and gunicorn serves HTTP alone; set, gunicorn's
    # master also runs timeline-grpc beside its workers (make run and the image set it). "off":
    # no gRPC at all.
    grpc_bind: str | None = None
    # How many timeline-grpc processes gunicorn's master runs, sharing grpc_bind's port
    # (SO_REUSEPORT): 0, as many as it has HTTP workers. A unix:/path serves one.
    grpc_processes: int = 0

    @property
    def grpc_listen(self) -> str | None:
        """Where timeline-grpc listens; None when grpc_bind is off."""
        if self.grpc_bind == GRPC_OFF:
            return None
        return self.grpc_bind or GRPC_DEFAULT_BIND

    @property
    def embedded_redis(self) -> bool:
        return self.redis_mode == "standalone" and not self.redis_url

    @property
    def store_backend(self) -> str:
        return "mongo" if self.mongo_uri else "sqlite"

    def validate(self) -> Settings:
        """Reject values that would only fail later, at the first request."""
        positive = (
            "redis_connect_timeout_ms",
            "redis_socket_timeout_ms",
            "redis_max_connections",
            "redis_buckets",
            "mongo_timeout_ms",
            "mongo_operation_timeout_ms",
            "sqlite_busy_timeout_ms",
            "count_default",
            "count_max",
            "group_members_max",
            "message_max_bytes",
            "message_max_depth",
            "id_max_length",
            "body_max_bytes",
            "fanout_max_bytes",
            "idempotency_ttl_seconds",
            "idempotency_redis_seconds",
            "store_write_attempts",
            "purge_interval_seconds",
            "batch_max_messages",
            "request_documents_max",
            "request_deadline_ms",
            "http_read_timeout_ms",
            "http_write_timeout_ms",
            "http_keepalive_ms",
            "http_threads",
            "http_max_connections",
            "http_memory_budget_bytes",
            "page_max_bytes",
            "sync_wait_max_ms",
            "device_idle_seconds",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise SettingsError(f"{name} must be positive", names=(name,))
        for name in (
            "store_retry_backoff_ms",
            "store_retry_budget_ms",
            "mongo_index_build_timeout_seconds",
            "sync_retention_seconds",
            "history_retention_seconds",
        ):
            if getattr(self, name) < 0:
                raise SettingsError(f"{name} must not be negative", names=(name,))
        for name in ("sync_retention_seconds", "history_retention_seconds"):
            if getattr(self, name) > RETENTION_MAX_SECONDS:
                raise SettingsError(
                    f"{name} must be at most {RETENTION_MAX_SECONDS} (about 68 years); 0 keeps "
                    "entries forever",
                    names=(name,),
                )
        longest_write = max(self.mongo_operation_timeout_ms, self.sqlite_busy_timeout_ms) + 1000
        if self.gap_grace_ms < self.request_deadline_ms + longest_write:
            raise SettingsError(
                f"gap_grace_ms must be at least {self.request_deadline_ms + longest_write}: "
                "request_deadline_ms + the longest store operation + 1 s, or a reader could "
                "step over a write still in flight",
                names=("gap_grace_ms", "request_deadline_ms"),
            )
        if self.idempotency_redis_seconds > self.idempotency_ttl_seconds:
            raise SettingsError(
                "idempotency_redis_seconds must not exceed idempotency_ttl_seconds: Redis's "
                "record of a message is a hint of the store's",
                names=("idempotency_redis_seconds", "idempotency_ttl_seconds"),
            )
        if self.count_default > self.count_max:
            raise SettingsError(
                "count_default must not exceed count_max", names=("count_default", "count_max")
            )
        if self.log_level.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise SettingsError(
                "log_level must be debug, info, warning, error or critical", names=("log_level",)
            )
        if not self.redis_key_prefix:
            raise SettingsError("redis_key_prefix must not be empty", names=("redis_key_prefix",))
        if self.redis_url and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise SettingsError(
                "redis_url must start with redis://, rediss:// or unix://", names=("redis_url",)
            )
        self._validate_redis_mode()
        if self.grpc_bind is not None and self.grpc_bind != GRPC_OFF:
            try:
                check_grpc_bind(self.grpc_bind)
            except ValueError as exc:
                raise SettingsError(f"grpc_bind {exc}", names=("grpc_bind",)) from None
        self._validate_grpc_processes()
        if self.embedded_redis:
            # The embedded redis-server listens on a unix socket under data_dir, and a socket
            # path longer than the kernel's sun_path is cut short by redis-server (it would
            # listen elsewhere and never be found): refuse the directory now.
            sock = socket_path(self.data_dir)
            if len(os.fsencode(sock)) > SOCKET_PATH_MAX:
                raise SettingsError(
                    f"data_dir is too deep for the embedded redis-server: its socket {sock} "
                    f"would be {len(os.fsencode(sock))} bytes, over the {SOCKET_PATH_MAX} a unix "
                    "socket path holds; choose a shorter data_dir",
                    names=("data_dir",),
                )
        return self

    def _validate_grpc_processes(self) -> None:
        if not 0 <= self.grpc_processes <= GRPC_PROCESSES_MAX:
            raise SettingsError(
                f"grpc_processes must be between 0 (as many as the HTTP workers) and "
                f"{GRPC_PROCESSES_MAX}",
                names=("grpc_processes",),
            )
        unix = (self.grpc_listen or "").startswith("unix:")
        if unix and self.grpc_processes > 1:
            raise SettingsError(
                "grpc_processes must be 0 or 1 with a unix:/path grpc_bind: processes share a "
                "TCP port, never a unix socket",
                names=("grpc_processes", "grpc_bind"),
            )

    def grpc_process_count(self, http_workers: int) -> int:
        """How many timeline-grpc processes serve beside `http_workers` HTTP workers."""
        if (self.grpc_listen or "").startswith("unix:"):
            return 1
        return self.grpc_processes or max(1, min(http_workers, GRPC_PROCESSES_MAX))

    def _validate_redis_mode(self) -> None:
        mode = self.redis_mode
        if mode not in REDIS_MODES:
            raise SettingsError(
                f"redis_mode must be one of {', '.join(REDIS_MODES)}, got {mode!r}",
                names=("redis_mode",),
            )
        if mode == "cluster":
            if not self.redis_url or self.redis_url.startswith("unix://"):
                raise SettingsError(
                    "redis_mode cluster needs redis_url: redis://[:password@]host:port/0 of "
                    "any one node (the others are discovered from it)",
                    names=("redis_mode", "redis_url"),
                )
            if not 1 <= self.redis_buckets <= 16384:
                raise SettingsError(
                    "redis_buckets must be between 1 and 16384 (the cluster's hash slots)",
                    names=("redis_buckets",),
                )
            if "{" in self.redis_key_prefix or "}" in self.redis_key_prefix:
                raise SettingsError(
                    "redis_key_prefix must not contain { or } in cluster mode: the bucket's "
                    "hash tag must be the key's first",
                    names=("redis_key_prefix",),
                )
        if mode == "sentinel":
            if not self.redis_sentinels or not self.redis_sentinel_master:
                raise SettingsError(
                    "redis_mode sentinel needs redis_sentinels (host:port,host:port,...) and "
                    "redis_sentinel_master (the monitored primary's name)",
                    names=("redis_mode", "redis_sentinels", "redis_sentinel_master"),
                )
            try:
                sentinel_addresses(self.redis_sentinels)
            except ValueError as exc:
                raise SettingsError(
                    f"redis_sentinels must be host:port,host:port,...: {exc}",
                    names=("redis_sentinels",),
                ) from None
            if self.redis_url:
                raise SettingsError(
                    "redis_url is not used in sentinel mode (the sentinels name the primary)",
                    names=("redis_mode", "redis_url"),
                )

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes).validate()


#: How a TIMELINE_* variable spells a boolean setting.
_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})


def _coerce(name: str, kind: Any, raw: Any, origin: str) -> Any:
    """Turn a YAML value or an environment string into the field's type."""
    optional = kind == "str | None"
    base = "str" if optional else kind
    if raw is None or (optional and isinstance(raw, str) and raw == ""):
        if optional:
            return None
        raise SettingsError(f"{origin}: {name} must not be empty")
    if base == "int":
        if isinstance(raw, bool):
            raise SettingsError(f"{origin}: {name} must be an integer")
        try:
            return int(str(raw).replace("_", ""))
        except ValueError as exc:
            raise SettingsError(f"{origin}: {name} must be an integer, got {raw!r}") from exc
    if base == "bool":
        # YAML gives a boolean; a variable gives text, read in the usual spellings.
        if isinstance(raw, bool):
            return raw
        word = raw.strip().lower() if isinstance(raw, str) else None
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
        raise SettingsError(f"{origin}: {name} must be true or false, got {raw!r}")
    if base == "str":
        if not isinstance(raw, str | int | float) or isinstance(raw, bool):
            raise SettingsError(f"{origin}: {name} must be a string")
        return str(raw)
    raise SettingsError(f"{origin}: {name} has unsupported type {kind}")  # pragma: no cover


def _did_you_mean(name: str, known: list[str], prefix: str = "") -> str:
    """`; did you mean X?` for the closest known name, or nothing when none is close."""
    # Compared without the prefix they share, which would make any two names look alike.
    bare = {k.removeprefix(prefix): k for k in known}
    close = difflib.get_close_matches(name.removeprefix(prefix), list(bare), n=1)
    return f"; did you mean {bare[close[0]]}?" if close else ""


#: The last settings loaded from this process's environment, with what they were read from:
#: a gunicorn worker's front and its app ask for them once each, and get one object.
_loaded: tuple[tuple[Any, ...], Settings] | None = None


def load_settings(
    environ: Mapping[str, str] | None = None, config_path: str | Path | None = None
) -> Settings:
    """Build Settings from the defaults, the YAML file and the environment, in that order.
    From the process's own environment, read once while neither it nor the file changes."""
    global _loaded
    if environ is not None:
        return _load_settings(environ, config_path)
    explicit = config_path or os.environ.get(ENV_PREFIX + "CONFIG")
    path = Path(explicit) if explicit else DEFAULT_CONFIG_PATH
    try:
        stat = path.stat()
        version: Any = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
    except OSError:
        version = None
    key = (
        str(path.resolve()),
        version,
        tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(ENV_PREFIX))),
    )
    if _loaded is not None and _loaded[0] == key:
        return _loaded[1]
    settings = _load_settings(os.environ, config_path)
    _loaded = (key, settings)
    return settings


def _load_settings(environ: Mapping[str, str], config_path: str | Path | None) -> Settings:
    env = environ
    types = {f.name: f.type for f in fields(Settings)}
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}  # where each value that is not a default came from

    variables = {ENV_PREFIX + name.upper(): name for name in types}
    unknown = sorted(v for v in env if v.startswith(ENV_PREFIX) and v not in variables)
    for var in unknown:
        if var not in NOT_SETTINGS:
            known = sorted(variables.keys() | NOT_SETTINGS)
            hint = _did_you_mean(var, known, ENV_PREFIX)
            raise SettingsError(f"{var} is not a timeline setting{hint}")

    explicit = config_path or env.get(ENV_PREFIX + "CONFIG")
    path = Path(explicit) if explicit else DEFAULT_CONFIG_PATH
    if path.exists():
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise SettingsError(f"{path}: not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise SettingsError(f"{path}: expected a mapping of setting names to values")
        for name, raw in loaded.items():
            if name not in types:
                hint = _did_you_mean(str(name), sorted(types))
                raise SettingsError(f"{path}: unknown setting {name!r}{hint}")
            values[name] = _coerce(name, types[name], raw, str(path))
            origins[name] = str(path)
    elif explicit:
        raise SettingsError(f"settings file {path} does not exist")

    for var, name in variables.items():
        if var in env:
            values[name] = _coerce(name, types[name], env[var], var)
            origins[name] = var

    try:
        return Settings(**values).validate()
    except SettingsError as exc:
        # Say where the offending value was set, so the message names the variable to fix.
        where = sorted({origins[name] for name in exc.names if name in origins})
        if not where:
            raise
        raise SettingsError(f"{', '.join(where)}: {exc}", names=exc.names) from None
