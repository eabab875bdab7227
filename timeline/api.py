"""The Flask layer: parse and validate, call the service, encode protojson. Nothing more."""

from __future__ import annotations

import hmac
import logging
import time
from functools import lru_cache
from typing import Any, cast
from urllib.parse import unquote_to_bytes

import orjson
from flask import Blueprint, Flask, Response, current_app, request
from flask.json.provider import JSONProvider
from werkzeug.exceptions import HTTPException

from timeline.errors import (
    InvalidParam,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    TimelineError,
    Unauthorized,
)
from timeline.model import Entry, Message, conversation_id
from timeline.service import TimelineService
from timeline.validation import (
    Limits,
    check_documents,
    check_fan_out,
    decode_body,
    field,
    parse_count,
    parse_id,
    parse_int64,
    parse_members,
    parse_message,
    reread_message,
)

log = logging.getLogger(__name__)

bp = Blueprint("timeline", __name__, url_prefix="/timeline")

EXTENSION = "timeline"


class OrjsonProvider(JSONProvider):
    """Flask's JSON through orjson: the replies are most of what the service encodes."""

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        return orjson.dumps(obj).decode()

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        return orjson.loads(s)

    def response(self, *args: Any, **kwargs: Any) -> Response:
        obj = self._prepare_response_obj(args, kwargs)
        app = cast(Flask, self._app)
        return app.response_class(orjson.dumps(obj), mimetype="application/json")


def _service() -> TimelineService:
    service: TimelineService = current_app.extensions[EXTENSION]["service"]
    return service


def _limits() -> Limits:
    limits: Limits = current_app.extensions[EXTENSION]["limits"]
    return limits


def _body() -> tuple[dict[str, Any], bytes]:
    # Read raw, whatever the Content-Type: curl -d sends JSON as a form by default.
    data = request.get_data(cache=False)
    declared = request.content_length
    if declared is None:
        # A chunked body is cut at the limit rather than refused: refuse it here.
        limit = current_app.config["MAX_CONTENT_LENGTH"]
        if limit is not None and len(data) >= limit:
            raise PayloadTooLarge(f"request body is larger than {limit} bytes", limit=limit)
    elif len(data) != declared:
        raise InvalidParam(f"request body has {len(data)} of its {declared} bytes")
    return decode_body(data), data


def _messages(body: dict[str, Any], data: bytes) -> tuple[list[Message], bool]:
    """`message`, or extension `messages` (a batch); returns them and whether it is a batch."""
    limits = _limits()
    if "messages" not in body:
        message = parse_message(
            body.get("message"), limits, source=lambda: reread_message(data, "message")
        )
        return [message], False
    if "message" in body:
        raise InvalidParam("send either message or messages, not both")
    batch = body["messages"]
    if not isinstance(batch, list) or not batch:
        raise InvalidParam("messages must be a non-empty list", field="messages")
    if len(batch) > limits.batch_max_messages:
        raise InvalidParam(
            f"messages holds {len(batch)}; at most {limits.batch_max_messages} are allowed",
            field="messages",
            limit=limits.batch_max_messages,
        )
    return [
        parse_message(
            value,
            limits,
            source=lambda i=i: reread_message(data, "messages", i),  # type: ignore[misc]
            name=f"messages[{i}]",
        )
        for i, value in enumerate(batch)
    ], True


def _client_msg_id(body: dict[str, Any], limits: Limits) -> str | None:
    """Extension: the sender's id for this message, making retries idempotent."""
    value = field(body, "client_msg_id", "clientMsgId")
    if value is None or value == "":
        return None
    return parse_id(value, "client_msg_id", limits, routable=False)


def _strict_query() -> None:
    """A query string whose %-sequences (or raw bytes) are not UTF-8 is a 400, as in a path.

    Werkzeug keeps such a sequence as its text: ?member=%FF would read as "%FF", the member
    ?member=%25FF names. Checked once per request, before its parameters are read."""
    raw: bytes = request.query_string
    if (raw.isascii() and b"%" not in raw) or _utf8(raw):
        return
    # Name the parameter: '&' and '=' are ASCII, so the bad bytes lie within one pair.
    for pair in raw.split(b"&"):
        name, _, value = pair.partition(b"=")
        if not _utf8(value):
            key = unquote_to_bytes(name.replace(b"+", b" ")).decode(errors="replace")[:64]
            raise InvalidParam(f"query parameter {key!r} is not valid UTF-8", field=key)
    raise InvalidParam("a query parameter's name is not valid UTF-8")


def _utf8(encoded: bytes) -> bool:
    """Whether %-encoded text decodes to valid UTF-8."""
    try:
        unquote_to_bytes(encoded).decode()
    except UnicodeDecodeError:
        return False
    return True


def _query(proto_name: str, json_name: str | None = None) -> str | None:
    """One query parameter by either spelling; repeating it is an error, not a silent pick."""
    values = request.args.getlist(proto_name)
    if json_name and json_name != proto_name:
        other = request.args.getlist(json_name)
        if values and other:
            raise InvalidParam(f"{proto_name} and {json_name} are the same parameter; send one")
        values = values or other
    if len(values) > 1:
        raise InvalidParam(f"{proto_name} is given more than once", field=proto_name)
    return values[0] if values else None


def _timestamp(ms: int) -> str:
    """RFC 3339, UTC, to the millisecond; "" when the store does not know (old documents)."""
    if ms <= 0:
        return ""
    seconds, millis = divmod(ms, 1000)
    return f"{_second(seconds)}.{millis:03d}Z"


@lru_cache(maxsize=4096)
def _second(seconds: int) -> str:
    """The formatted second: entries of a page mostly share a few."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))


def _entries(entries: list[Entry]) -> list[dict[str, str]]:
    return [
        {"sequence": str(e.seq), "message": e.message, "timestamp": _timestamp(e.created_at_ms)}
        for e in entries
    ]


@bp.post("/send")
def send() -> dict[str, Any]:
    body, data = _body()
    limits = _limits()
    sender = parse_id(body.get("from"), "from", limits)
    receiver = parse_id(body.get("to"), "to", limits)
    messages, batch = _messages(body, data)
    # The receiver's copy and the sender's (one when they are the same user).
    check_documents(1 if sender == receiver else 2, len(messages), limits)
    client_msg_id = _client_msg_id(body, limits)
    sequences = _service().send(sender, receiver, messages, client_msg_id)
    reply: dict[str, Any] = {"sequence": str(sequences[-1])}
    if batch:
        reply["sequences"] = [str(seq) for seq in sequences]
    return reply


@bp.post("/sendGroup")
def send_group() -> dict[str, Any]:
    body, data = _body()
    limits = _limits()
    group = parse_id(field(body, "group_name", "groupName"), "group_name", limits)
    members = parse_members(field(body, "group_members", "groupMembers"), "group_members", limits)
    messages, _ = _messages(body, data)
    check_documents(len(members), len(messages), limits)
    check_fan_out(members, messages, limits)
    client_msg_id = _client_msg_id(body, limits)
    failed = _service().send_group(group, members, messages, client_msg_id)
    return {"failedMembers": failed}


@bp.post("/ack")
def ack() -> dict[str, Any]:
    """Extension: the member's device has what it pulled up to `seq`; release it."""
    body, _ = _body()
    member = parse_id(body.get("member"), "member", _limits())
    if body.get("seq") is None:
        raise InvalidParam("seq is required", field="seq")
    seq = parse_int64(body.get("seq"), "seq")
    return {"minSeq": str(_service().ack(member, seq))}


@bp.get("/sync")
def sync() -> dict[str, Any]:
    limits = _limits()
    _strict_query()
    member = parse_id(_query("member"), "member", limits)
    last_read = parse_int64(_query("last_read", "lastRead"), "last_read")
    count = parse_count(_query("count"), "count", limits)
    result = _service().sync(member, last_read, count)
    return {
        "latestSeq": str(result.latest_seq),
        "entrySetLastSeq": str(result.entries[-1].seq if result.entries else 0),
        "entrySet": _entries(result.entries),
        "minSeq": str(result.min_seq),
    }


def _history(timeline_id: str) -> dict[str, Any]:
    _strict_query()
    count = parse_count(_query("count"), "count", _limits())
    direction = (_query("direction") or "forward").lower()
    if direction == "backward":
        before = parse_int64(_query("before"), "before")
        page = _service().history_backward(timeline_id, before, count)
        return {"entrySet": _entries(page.entries), "nextBefore": str(page.next_before)}
    if direction != "forward":
        raise InvalidParam("direction must be forward or backward", field="direction")
    last_read = parse_int64(_query("last_read", "lastRead"), "last_read")
    return {"entrySet": _entries(_service().history(timeline_id, last_read, count))}


@bp.get("/history/single/<sender>/<receiver>")
def history_single(sender: str, receiver: str) -> dict[str, Any]:
    limits = _limits()
    a = parse_id(sender, "from", limits)
    b = parse_id(receiver, "to", limits)
    return _history(conversation_id(a, b))


@bp.get("/history/group/<group>")
def history_group(group: str) -> dict[str, Any]:
    return _history(parse_id(group, "group", _limits()))


def envelope(
    code: int, reason: str, message: str, metadata: dict[str, Any] | None = None
) -> Response:
    """The Kratos error body: {code, reason, message, metadata}, with the code as status."""
    body = {
        "code": code,
        "reason": reason,
        "message": message,
        "metadata": {key: _metadata_value(value) for key, value in (metadata or {}).items()},
    }
    response = current_app.response_class(
        orjson.dumps(body), status=code, mimetype="application/json"
    )
    if code == 503:
        response.headers["Retry-After"] = "1"
    elif code == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="timeline"'
    return response


def _metadata_value(value: Any) -> Any:
    # Kratos metadata is map<string, string>; lists (failedMembers) stay lists for callers.
    if isinstance(value, list):
        return [str(v) for v in value]
    return str(value)


def _on_timeline_error(error: TimelineError) -> Response:
    if error.code >= 500:
        log.warning("%s %s: %s (%s)", request.method, request.path, error.reason, error.message)
    return envelope(error.code, error.reason, error.message, error.metadata)


def _on_http_error(error: HTTPException) -> Response:
    code = error.code or 500
    mapped: TimelineError | None = None
    if code == 404:
        mapped = NotFound(f"no route {request.method} {request.path}")
    elif code == 405:
        mapped = MethodNotAllowed(f"{request.method} is not allowed on {request.path}")
    elif code == 413:
        limit = current_app.config.get("MAX_CONTENT_LENGTH")
        mapped = PayloadTooLarge(f"request body is larger than {limit} bytes", limit=limit)
    if mapped is not None:
        response = envelope(mapped.code, mapped.reason, mapped.message, mapped.metadata)
    else:
        reason = InvalidParam.reason if code < 500 else TimelineError.reason
        response = envelope(code, reason, error.description or error.name)
    allowed = dict(error.get_headers()).get("Allow")
    if allowed:
        response.headers["Allow"] = allowed
    return response


def _on_unexpected(error: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.path)
    return envelope(TimelineError.code, TimelineError.reason, "internal error")


def _before() -> Response | None:
    """A browser's preflight (OPTIONS on a known route) gets an empty 204; with an api_token
    set, everything else under /timeline needs `Authorization: Bearer <token>`."""
    req = request._get_current_object()  # type: ignore[attr-defined]
    if req.method == "OPTIONS" and req.routing_exception is None:
        return current_app.response_class(status=204)
    token = current_app.extensions[EXTENSION]["settings"].api_token
    if not token or not req.path.startswith(bp.url_prefix or ""):
        return None
    scheme, _, given = req.headers.get("Authorization", "").partition(" ")
    # compare_digest takes as long whatever the first wrong byte: no timing oracle.
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        given.strip().encode(), token.encode()
    ):
        raise Unauthorized("a valid bearer token is required")
    return None


def _cors(response: Response) -> Response:
    """go-timeline's browser demo calls the API from another origin: answer browsers (they
    send Origin on every cross-origin request) with the CORS headers."""
    if "HTTP_ORIGIN" in request.environ:
        headers = current_app.extensions[EXTENSION]["cors_headers"]
        if headers:
            response.headers.extend(headers)
    return response


def cors_headers(origin: str) -> list[tuple[str, str]]:
    """The CORS headers of every reply, worked out once; none when origin is empty."""
    if not origin:
        return []
    return [
        ("Access-Control-Allow-Origin", origin),
        ("Access-Control-Allow-Methods", "GET, POST, OPTIONS"),
        (
            "Access-Control-Allow-Headers",
            "Content-Type, Authorization, X-Requested-With, X-Request-ID",
        ),
        ("Access-Control-Max-Age", "600"),
        # Without this a page's script cannot read them: the id to quote in a report, and
        # how long to wait after a 503.
        ("Access-Control-Expose-Headers", "X-Request-ID, Retry-After"),
    ]


def register(app: Flask) -> None:
    """Mount the routes and map every error, expected or not, to the envelope."""
    # '//timeline/sync' would be answered with an HTML redirect; let it be a 404 envelope.
    app.url_map.merge_slashes = False
    app.register_blueprint(bp)
    app.before_request(_before)
    app.after_request(_cors)
    app.register_error_handler(TimelineError, _on_timeline_error)
    app.register_error_handler(HTTPException, _on_http_error)
    app.register_error_handler(Exception, _on_unexpected)
