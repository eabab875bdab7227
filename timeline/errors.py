"""The error hierarchy; each error knows its HTTP code and Kratos-style reason."""

from __future__ import annotations

from typing import Any, ClassVar

import orjson


class TimelineError(Exception):
    """Base of every error the service reports to a caller."""

    code: ClassVar[int] = 500
    reason: ClassVar[str] = "TIMELINE_INTERNAL"

    def __init__(self, message: str, **metadata: Any) -> None:
        super().__init__(message)
        self.message = message
        self.metadata = metadata


class InvalidParam(TimelineError):
    """The request is malformed or breaks a rule; the caller must change it."""

    code = 400
    reason = "TIMELINE_INVALID_PARAM"


class Unauthorized(TimelineError):
    """The request lacks valid credentials."""

    code = 401
    reason = "TIMELINE_UNAUTHORIZED"


class NotFound(TimelineError):
    """No such route."""

    code = 404
    reason = "TIMELINE_NOT_FOUND"


class MethodNotAllowed(TimelineError):
    """The route exists, but not with this method."""

    code = 405
    reason = "TIMELINE_METHOD_NOT_ALLOWED"


class Forbidden(TimelineError):
    """A PROXY protocol line from a peer that may not send one (the HTTP front)."""

    code = 403
    reason = "TIMELINE_FORBIDDEN"


class RequestTimeout(TimelineError):
    """The request's headers and body did not arrive within http_read_timeout_ms."""

    code = 408
    reason = "TIMELINE_REQUEST_TIMEOUT"


class UriTooLong(TimelineError):
    """The request line is over gunicorn's limit_request_line."""

    code = 414
    reason = "TIMELINE_URI_TOO_LONG"


class ExpectationNotMet(TimelineError):
    """An Expect header other than 100-continue."""

    code = 417
    reason = "TIMELINE_EXPECTATION_FAILED"


class HeadersTooLarge(TimelineError):
    """Too many header fields, or one too large (gunicorn's limit_request_fields and
    limit_request_field_size)."""

    code = 431
    reason = "TIMELINE_HEADERS_TOO_LARGE"


class NotImplementedCoding(TimelineError):
    """A Transfer-Encoding gunicorn does not implement."""

    code = 501
    reason = "TIMELINE_NOT_IMPLEMENTED"


class ClientMsgIdReused(TimelineError):
    """A client_msg_id already names another message of the conversation."""

    code = 409
    reason = "TIMELINE_CLIENT_MSG_ID_REUSED"


class PayloadTooLarge(TimelineError):
    """The body or the message is over its size limit."""

    code = 413
    reason = "TIMELINE_PAYLOAD_TOO_LARGE"


class Unavailable(TimelineError):
    """Redis or the store cannot be reached; the caller may retry later."""

    code = 503
    reason = "TIMELINE_UNAVAILABLE"


class PartialWrite(Unavailable):
    """The store failed after the history copy was stored; sync copies may be partly stored."""

    history_stored = True


class WriteFailed(TimelineError):
    """Sequences were allocated but some documents could not be stored."""

    code = 503
    reason = "TIMELINE_WRITE_FAILED"


# --- The error envelope: the one place that builds it -------------------------------------


def envelope_body(error: TimelineError) -> bytes:
    """The Kratos error body, `{code, reason, message, metadata}`, of every error reply the
    service makes over HTTP: the API's, the operator pages', and the HTTP front's own (a
    malformed request, a timeout, a worker over its budget). Metadata is Kratos's
    map<string, string>, except that lists (failedMembers) stay lists of strings."""
    metadata = {
        key: [str(item) for item in value] if isinstance(value, list) else str(value)
        for key, value in error.metadata.items()
    }
    return orjson.dumps(
        {"code": error.code, "reason": error.reason, "message": error.message, "metadata": metadata}
    )


def error_headers(error: TimelineError) -> list[tuple[str, str]]:
    """What an error reply adds to its headers: when to retry, how to authenticate."""
    if error.code == 503:
        return [("Retry-After", "1")]
    if error.code == 401:
        return [("WWW-Authenticate", 'Bearer realm="timeline"')]
    return []
