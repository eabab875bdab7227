"""Errors as go-kratos sends them over gRPC: a status whose code maps from the HTTP code, the
error's message, and one google.rpc.ErrorInfo detail with its reason and metadata."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc
import orjson
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from timeline.errors import TimelineError

#: go-kratos's transport/http/status ToGRPCCode: the HTTP code of an error decides its gRPC
#: code; any other HTTP code is UNKNOWN (a 413 among them, as go-kratos has it).
KRATOS_CODES: dict[int, grpc.StatusCode] = {
    200: grpc.StatusCode.OK,
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.ABORTED,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED,  # go-kratos's ClientClosed
    500: grpc.StatusCode.INTERNAL,
    501: grpc.StatusCode.UNIMPLEMENTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}

#: The header a 503 sends as Retry-After, as a google.rpc.RetryInfo detail beside ErrorInfo
#: (go-kratos clients read ErrorInfo only, and ignore it); sent on RESOURCE_EXHAUSTED too.
RETRY_AFTER_S = 1
#: The codes whose status carries RetryInfo: try again later, the same request.
RETRIED = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)


def grpc_code(http_code: int) -> grpc.StatusCode:
    return KRATOS_CODES.get(http_code, grpc.StatusCode.UNKNOWN)


class DeadlineExceeded(TimelineError):
    """The call's gRPC deadline passed before its work started (gRPC only: HTTP has none)."""

    code = 504
    reason = "TIMELINE_DEADLINE_EXCEEDED"


class Cancelled(TimelineError):
    """The client cancelled the call before its work started."""

    code = 499
    reason = "TIMELINE_CANCELLED"


class TooManyWaiting(TimelineError):
    """The server holds as many calls waiting for entries (Subscribe, reads with wait_ms)
    as it allows (gRPC only: a bound on their memory, timeline.rpc.server.HELD)."""

    code = 429
    reason = "TIMELINE_TOO_MANY_WAITING"


@dataclass(frozen=True, slots=True)
class Status(grpc.Status):
    """A status to abort a call with (grpc.ServicerContext.abort_with_status)."""

    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, str | bytes], ...]


def metadata_value(value: Any) -> str:
    """ErrorInfo.metadata is map<string, string>. The HTTP envelope keeps a list (a send's
    failedMembers) as a JSON list; here it is that list's JSON text, unambiguous whatever
    the ids hold."""
    if isinstance(value, list | tuple):
        return orjson.dumps([str(v) for v in value]).decode()
    return str(value)


def error_status(error: TimelineError, trailing: tuple[tuple[str, str], ...] = ()) -> Status:
    """The status of an error: go-kratos's code, the message, ErrorInfo (and RetryInfo on
    UNAVAILABLE and RESOURCE_EXHAUSTED), in grpc-status-details-bin as google.rpc.Status,
    grpcio-status's way."""
    code = grpc_code(error.code)
    info = error_details_pb2.ErrorInfo(
        reason=error.reason,
        metadata={key: metadata_value(value) for key, value in error.metadata.items()},
    )
    details = [_packed(info)]
    if code in RETRIED:
        retry = error_details_pb2.RetryInfo(
            retry_delay=duration_pb2.Duration(seconds=RETRY_AFTER_S)
        )
        details.append(_packed(retry))
    rich = status_pb2.Status(code=_numeric(code), message=error.message, details=details)
    return Status(
        code=code,
        details=error.message,
        trailing_metadata=(*trailing, ("grpc-status-details-bin", rich.SerializeToString())),
    )


def _packed(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def _numeric(code: grpc.StatusCode) -> int:
    """The status code's number, as google.rpc.Code has it."""
    number: int = code_pb2.Code.Value(code.name)
    return number
