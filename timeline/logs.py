"""Structured logs: one JSON object per line, each request's id on every line it causes."""

from __future__ import annotations

import logging
import re
import time
from contextvars import ContextVar, Token
from functools import lru_cache
from typing import Any

import orjson

#: Where the current request's id is kept in its WSGI environ (set by timeline.ops).
REQUEST_ID = "timeline.request_id"
#: An X-Request-ID a client may choose; any other is replaced by one of ours. Here, not in
#: timeline.ops: gunicorn's master loads the HTTP front (timeline.worker), which must not
#: import Flask or the metrics.
REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")


class JsonFormatter(logging.Formatter):
    """`{"ts", "level", "logger", "msg", "request_id", ...fields, "error"}` on one line.

    Structured fields travel as one dict: `log.info("...", extra={"fields": {...}})`.
    """

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": f"{_second(int(record.created))}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id is not None:
            line["request_id"] = request_id
        fields = getattr(record, "fields", None)
        if fields:
            line.update(fields)
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


#: The id of the request the current thread is serving, for every line it logs meanwhile.
_request_id: ContextVar[str | None] = ContextVar("timeline_request_id", default=None)


def bind_request_id(request_id: str) -> Token[str | None]:
    """Put the id on every line logged from here on, until unbind_request_id."""
    return _request_id.set(request_id)


def unbind_request_id(token: Token[str | None]) -> None:
    try:
        _request_id.reset(token)
    except ValueError:  # set in another context: clear it there rather than fail a request
        _request_id.set(None)


@lru_cache(maxsize=64)
def _second(seconds: int) -> str:
    """A second in RFC 3339, UTC: formatted once for all the lines logged within it (the
    access line is written on every request)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))


class RequestIdFilter(logging.Filter):
    """Adds the current request's id (when there is one) to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            request_id = _request_id.get()
            if request_id is not None:
                record.request_id = request_id
        return True


def logging_config(level: str) -> dict[str, Any]:
    """A logging.config dict: JSON lines on stderr for the service and gunicorn alike.

    Also turns off what each record would otherwise gather and no line of ours prints (the
    caller's frame, thread and process names), as the logging HOWTO's "Optimization"
    section describes: the access line is written on every request.
    """
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = {
        "class": "logging.StreamHandler",
        "formatter": "json",
        "filters": ["request_id"],
        "stream": "ext://sys.stderr",
    }
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": JsonFormatter}},
        "filters": {"request_id": {"()": RequestIdFilter}},
        "handlers": {"stderr": handler},
        "root": {"level": level.upper(), "handlers": ["stderr"]},
        "loggers": {
            "gunicorn.error": {"level": level.upper(), "handlers": ["stderr"], "propagate": False},
            "gunicorn.access": {"level": "WARNING", "handlers": ["stderr"], "propagate": False},
        },
    }
