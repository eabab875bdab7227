"""Typed settings: defaults in code, then a YAML file, then TIMELINE_* environment variables."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

ENV_PREFIX = "TIMELINE_"
DEFAULT_CONFIG_PATH = Path("configs/timeline.yaml")
#: MongoDB's TTL index removes what the purge missed this long after the retention.
TTL_BACKSTOP_SECONDS = 86_400
#: The longest retention: MongoDB keeps a TTL index's expireAfterSeconds in a 32-bit integer
#: (about 68 years), and the backstop comes on top.
RETENTION_MAX_SECONDS = 2**31 - 1 - TTL_BACKSTOP_SECONDS


class SettingsError(ValueError):
    """A settings file or variable that cannot be used; raised at start-up."""


@dataclass(frozen=True, slots=True)
class Settings:
    """Every knob of the service; `configs/timeline.yaml` documents each one."""

    # Redis: the sequence allocator. None means the embedded redis-server under data_dir.
    redis_url: str | None = None
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
    sqlite_path: str = "var/timeline.sqlite3"
    sqlite_busy_timeout_ms: int = 1000
    # How often expired entries are removed (by one worker; MongoDB's TTL index is a backstop).
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

    # CORS headers on every reply to a browser, as go-timeline sends them; empty: none.
    cors_allow_origin: str = "*"

    # Idempotent sends: how long a client_msg_id's record (its sequences) is kept.
    idempotency_ttl_seconds: int = 86_400
    # A store write that fails is tried again, this many times in all, backing off from
    # store_retry_backoff_ms (doubling), before the copies are reported as not stored.
    store_write_attempts: int = 4
    store_retry_backoff_ms: int = 100
    # Before anything is stored a request stops retrying after this long: a fast 503.
    store_retry_budget_ms: int = 1000

    # When set, every /timeline/* route needs `Authorization: Bearer <api_token>`.
    api_token: str | None = None

    # A reader never steps over a sequence whose write may still be in flight; after
    # this long the writer is known to have failed and the hole is passed over.
    gap_grace_ms: int = 30_000

    @property
    def embedded_redis(self) -> bool:
        return not self.redis_url

    @property
    def store_backend(self) -> str:
        return "mongo" if self.mongo_uri else "sqlite"

    def validate(self) -> Settings:
        """Reject values that would only fail later, at the first request."""
        positive = (
            "redis_connect_timeout_ms",
            "redis_socket_timeout_ms",
            "redis_max_connections",
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
            "store_write_attempts",
            "purge_interval_seconds",
            "batch_max_messages",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise SettingsError(f"{name} must be positive")
        for name in (
            "store_retry_backoff_ms",
            "store_retry_budget_ms",
            "sync_retention_seconds",
            "history_retention_seconds",
        ):
            if getattr(self, name) < 0:
                raise SettingsError(f"{name} must not be negative")
        for name in ("sync_retention_seconds", "history_retention_seconds"):
            if getattr(self, name) > RETENTION_MAX_SECONDS:
                raise SettingsError(
                    f"{name} must be at most {RETENTION_MAX_SECONDS} (about 68 years: MongoDB's "
                    "TTL index counts seconds in 32 bits); 0 keeps entries forever"
                )
        if self.gap_grace_ms < 0:
            raise SettingsError("gap_grace_ms must not be negative")
        if self.count_default > self.count_max:
            raise SettingsError("count_default must not exceed count_max")
        if self.log_level.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise SettingsError("log_level must be debug, info, warning, error or critical")
        if not self.redis_key_prefix:
            raise SettingsError("redis_key_prefix must not be empty")
        if self.redis_url and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise SettingsError("redis_url must start with redis://, rediss:// or unix://")
        return self

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes).validate()


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
    if base == "str":
        if not isinstance(raw, str | int | float) or isinstance(raw, bool):
            raise SettingsError(f"{origin}: {name} must be a string")
        return str(raw)
    raise SettingsError(f"{origin}: {name} has unsupported type {kind}")  # pragma: no cover


def load_settings(
    environ: Mapping[str, str] | None = None, config_path: str | Path | None = None
) -> Settings:
    """Build Settings from the defaults, the YAML file and the environment, in that order."""
    env = os.environ if environ is None else environ
    types = {f.name: f.type for f in fields(Settings)}
    values: dict[str, Any] = {}

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
                raise SettingsError(f"{path}: unknown setting {name!r}")
            values[name] = _coerce(name, types[name], raw, str(path))
    elif explicit:
        raise SettingsError(f"settings file {path} does not exist")

    for name, kind in types.items():
        var = ENV_PREFIX + name.upper()
        if var in env:
            values[name] = _coerce(name, kind, env[var], var)

    return Settings(**values).validate()
