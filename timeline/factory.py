"""create_app: settings, clients, the service and the routes, wired once per process."""

from __future__ import annotations

import logging

from flask import Flask

from timeline import api, console, ops
from timeline.allocator import open_allocator
from timeline.embedded import ensure_redis
from timeline.service import Policy, TimelineService, _now_ms
from timeline.settings import Settings, load_settings
from timeline.store import Preparer, Purger, Store, open_store, retention_ms
from timeline.validation import Limits
from timeline.wakes import CHANNEL, Wakes

log = logging.getLogger(__name__)


def redis_url(settings: Settings) -> str | None:
    """The configured Redis, or the embedded redis-server (started if need be); None in
    sentinel mode (the sentinels name the primary)."""
    if settings.redis_url or not settings.embedded_redis:
        return settings.redis_url
    url, _ = ensure_redis(settings.data_dir)
    return url


def close_app(app: Flask) -> None:
    """Close the app's Redis and store clients (a worker exiting cleanly)."""
    service: TimelineService = app.extensions[api.EXTENSION]["service"]
    app.extensions[api.EXTENSION]["wakes"].stop()
    app.extensions[api.EXTENSION]["purger"].stop()
    app.extensions[api.EXTENSION]["preparer"].stop()
    service.allocator.close()
    service.store.close()


def create_app(settings: Settings | None = None, *, store: Store | None = None) -> Flask:
    """Build the WSGI app. Call it after gunicorn forks: the clients it creates are per process.

    `store` replaces the store the settings name (tests use it for mongomock).
    """
    settings = settings or load_settings()
    app = Flask("timeline")
    app.json = api.OrjsonProvider(app)
    app.config["MAX_CONTENT_LENGTH"] = settings.body_max_bytes

    allocator = open_allocator(settings, redis_url(settings))
    store = store or open_store(settings)
    policy = Policy.from_settings(settings)
    wakes = Wakes(allocator.redis, settings.redis_key_prefix + CHANNEL)
    wakes.start()  # readers waiting for entries (wait_ms) hear of every process's writes
    service = TimelineService(allocator, store, policy, notify=wakes.publish)
    purger = Purger(store, retention_ms(settings), settings.purge_interval_seconds, _now_ms)
    purger.start()  # expired entries leave in the background
    preparer = Preparer(store)
    preparer.start()  # MongoDB's indexes, built beside the requests; /readyz tells
    limits = Limits.from_settings(settings)
    app.extensions[api.EXTENSION] = {
        "settings": settings,
        "service": service,
        "limits": limits,
        "context": api.Context(service, limits, wakes, settings.sync_wait_max_ms),
        "wakes": wakes,
        "cors_headers": api.cors_headers(settings.cors_allow_origin),
        "purger": purger,
        "preparer": preparer,
    }
    ops.register(app)  # first: the request id exists before anything can log
    api.register(app)
    if settings.console:
        console.register(app)  # GET / and its assets; off, / is a 404 like any other
    log.info(
        "timeline ready: store=%s redis=%s",
        store.backend,
        "embedded" if settings.embedded_redis else allocator.describe(),
    )
    return app
