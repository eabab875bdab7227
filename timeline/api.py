"""The Flask layer: parse and validate, call the service, encode protojson. Nothing more."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from http import HTTPStatus
from typing import Any, cast
from urllib.parse import parse_qsl, unquote_to_bytes

import orjson
from flask import Flask, Response, current_app, request
from flask.json.provider import JSONProvider
from werkzeug.exceptions import HTTPException

from timeline import metrics, ops
from timeline.errors import (
    InvalidParam,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    TimelineError,
    envelope_body,
    error_headers,
)
from timeline.model import Entry, Kind, Message, Timeline, conversation_id
from timeline.service import TimelineService
from timeline.service.conversations import parse_cursor
from timeline.store import ConversationState, Device
from timeline.validation import (
    Limits,
    check_batch,
    check_bearer,
    check_documents,
    check_fan_out,
    decode_body,
    field,
    parse_conversation_kind,
    parse_count,
    parse_device,
    parse_id,
    parse_int64,
    parse_members,
    parse_message,
    reread_message,
)
from timeline.wakes import CAN_PARK, PARKED, SETTLED, WAIT_UNTIL, Parked, Wakes, key_of

log = logging.getLogger(__name__)

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


@dataclass(frozen=True, slots=True)
class Context:
    """What the handlers need of the app, looked up once: the service and the limits."""

    service: TimelineService
    limits: Limits
    wakes: Wakes | None = None  # readers waiting for entries (wait_ms)
    wait_max_ms: int = 30_000


class Call:
    """One API request as the handlers see it, read from the WSGI environ alone (no
    framework): the query's parameters and the body's bytes. The path's ids are the
    handlers' arguments."""

    __slots__ = ("_args", "_body_max", "environ")

    def __init__(self, environ: dict[str, Any], body_max: int | None) -> None:
        self.environ = environ
        self._args: dict[str, list[str]] | None = None
        self._body_max = body_max

    def body(self) -> bytes:
        """The whole body, whatever the Content-Type said (curl -d sends JSON as a form by
        default); refused when larger than the limit or shorter than its Content-Length."""
        environ, limit = self.environ, self._body_max
        stream = environ["wsgi.input"]
        length = environ.get("CONTENT_LENGTH")
        if length:
            try:
                declared = int(length)
            except ValueError:
                raise InvalidParam("Content-Length is not a number") from None
            if limit is not None and declared > limit:
                raise PayloadTooLarge(f"request body is larger than {limit} bytes", limit=limit)
            data: bytes = stream.read(declared) if declared > 0 else b""
            if len(data) != declared:
                raise InvalidParam(f"request body has {len(data)} of its {declared} bytes")
            return data
        if not environ.get("wsgi.input_terminated"):
            return b""  # neither a length nor a server that ends the stream: no body
        # Chunked: read one byte past the limit, never the whole of a huge body.
        data = stream.read() if limit is None else stream.read(limit + 1)
        if limit is not None and len(data) > limit:
            raise PayloadTooLarge(f"request body is larger than {limit} bytes", limit=limit)
        return data

    def query(self, proto_name: str, json_name: str | None = None) -> str | None:
        """One query parameter by either spelling; repeating it is an error, not a silent
        pick."""
        args = self._args
        if args is None:
            args = self._args = _parse_query(self.environ.get("QUERY_STRING", ""))
        values = args.get(proto_name, ())
        if json_name and json_name != proto_name:
            other = args.get(json_name, ())
            if values and other:
                raise InvalidParam(f"{proto_name} and {json_name} are the same parameter; send one")
            values = values or other
        if len(values) > 1:
            raise InvalidParam(f"{proto_name} is given more than once", field=proto_name)
        return values[0] if values else None


def _wsgi_text(value: str) -> str:
    """A WSGI environ string (bytes as latin-1, PEP 3333) as the UTF-8 text it carries;
    invalid UTF-8 reads as U+FFFD, which the id rules refuse."""
    return value if value.isascii() else value.encode("latin-1").decode("utf-8", "replace")


def _parse_query(raw: str) -> dict[str, list[str]]:
    """The query's parameters, each name with its values in order. Checked strictly first:
    %-sequences (or raw bytes) that are not UTF-8 are a 400, as in a path; otherwise
    ?member=%FF would read as "%FF", the member ?member=%25FF names."""
    encoded = raw.encode("latin-1")
    if not (encoded.isascii() and b"%" not in encoded) and not _utf8(encoded):
        # Name the parameter: '&' and '=' are ASCII, so the bad bytes lie within one pair.
        for pair in encoded.split(b"&"):
            name, _, value = pair.partition(b"=")
            if not _utf8(value):
                key = unquote_to_bytes(name.replace(b"+", b" ")).decode(errors="replace")[:64]
                raise InvalidParam(f"query parameter {key!r} is not valid UTF-8", field=key)
        raise InvalidParam("a query parameter's name is not valid UTF-8")
    args: dict[str, list[str]] = {}
    for key, text in parse_qsl(encoded.decode(), keep_blank_values=True):
        args.setdefault(key, []).append(text)
    return args


def _utf8(encoded: bytes) -> bool:
    """Whether %-encoded text decodes to valid UTF-8."""
    try:
        unquote_to_bytes(encoded).decode()
    except UnicodeDecodeError:
        return False
    return True


def _body(call: Call) -> tuple[dict[str, Any], bytes]:
    data = call.body()
    return decode_body(data), data


def _messages(body: dict[str, Any], data: bytes, limits: Limits) -> tuple[list[Message], bool]:
    """`message`, or extension `messages` (a batch); returns them and whether it is a batch."""
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
    check_batch(len(batch), limits)
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


def _sync_entries(entries: list[Entry]) -> list[dict[str, str]]:
    """Sync entries, each with its conversation (extension) when its copy recorded it."""
    out = _entries(entries)
    for entry, item in zip(entries, out, strict=True):
        if entry.conv_kind:
            item["type"] = entry.conv_kind
            item["conversation"] = entry.conv
            item["conversationSeq"] = str(entry.conv_seq)
    return out


def _conversation(state: ConversationState) -> dict[str, Any]:
    last = state.last
    return {
        "type": state.kind.value,
        "conversation": state.peer,
        "latestSeq": str(state.latest),
        "readSeq": str(state.read),
        "unread": state.unread,
        "lastMessage": (
            {
                "sequence": str(last.seq),
                "message": last.message,
                "timestamp": _timestamp(last.created_at_ms),
            }
            if last is not None
            else None
        ),
    }


def _device_reply(device: Device) -> dict[str, str]:
    return {
        "device": device.device,
        "position": str(device.position),
        "lastSeen": _timestamp(device.last_seen_ms),
    }


# --- The handlers: one per route, framework-free ---------------------------------------------


def send(ctx: Context, call: Call) -> dict[str, Any]:
    body, data = _body(call)
    limits = ctx.limits
    sender = parse_id(body.get("from"), "from", limits)
    receiver = parse_id(body.get("to"), "to", limits)
    messages, batch = _messages(body, data, limits)
    # The receiver's copy and the sender's (one when they are the same user).
    check_documents(1 if sender == receiver else 2, len(messages), limits)
    client_msg_id = _client_msg_id(body, limits)
    sequences = ctx.service.send(sender, receiver, messages, client_msg_id)
    reply: dict[str, Any] = {"sequence": str(sequences[-1])}
    if batch:
        reply["sequences"] = [str(seq) for seq in sequences]
    return reply


def send_group(ctx: Context, call: Call) -> dict[str, Any]:
    body, data = _body(call)
    limits = ctx.limits
    group = parse_id(field(body, "group_name", "groupName"), "group_name", limits)
    members = parse_members(field(body, "group_members", "groupMembers"), "group_members", limits)
    messages, _ = _messages(body, data, limits)
    check_documents(len(members), len(messages), limits)
    check_fan_out(members, messages, limits)
    client_msg_id = _client_msg_id(body, limits)
    # Extension: the sender, whose read position moves to the message (go-timeline's
    # sendGroup names none: then the message is unread for every member).
    sender = body.get("from")
    sender = "" if sender is None or sender == "" else parse_id(sender, "from", limits)
    failed = ctx.service.send_group(group, members, messages, client_msg_id, sender)
    return {"failedMembers": failed}


def ack(ctx: Context, call: Call) -> dict[str, Any]:
    """Extension: the member's device has what it pulled up to `seq`; release it."""
    body, _ = _body(call)
    member = parse_id(body.get("member"), "member", ctx.limits)
    if body.get("seq") is None:
        raise InvalidParam("seq is required", field="seq")
    seq = parse_int64(body.get("seq"), "seq")
    device = parse_device(body.get("device"), ctx.limits)
    return {"minSeq": str(ctx.service.ack(member, seq, device))}


def read(ctx: Context, call: Call) -> dict[str, Any]:
    """Extension: the member has read a conversation up to `seq`."""
    body, _ = _body(call)
    limits = ctx.limits
    member = parse_id(body.get("member"), "member", limits)
    kind = parse_conversation_kind(body.get("type"))
    name = parse_id(body.get("conversation"), "conversation", limits)
    if body.get("seq") is None:
        raise InvalidParam("seq is required", field="seq")
    seq = parse_int64(body.get("seq"), "seq")
    state = ctx.service.read(member, kind, name, seq)
    return {"readSeq": str(state.read), "unread": state.unread}


def conversations(ctx: Context, call: Call) -> dict[str, Any]:
    """Extension: the member's conversations, most recent activity first."""
    limits = ctx.limits
    member = parse_id(call.query("member"), "member", limits)
    count = parse_count(call.query("count"), "count", limits)
    before = call.query("before")
    cursor = parse_cursor(before) if before else None
    page = ctx.service.conversation_list(member, count, cursor)
    return {"conversations": [_conversation(c) for c in page.conversations], "next": page.next}


def devices(ctx: Context, call: Call) -> dict[str, Any]:
    """Extension: the member's devices, each one's acked position and when it was seen."""
    member = parse_id(call.query("member"), "member", ctx.limits)
    return {"devices": [_device_reply(d) for d in ctx.service.devices(member)]}


def sync(ctx: Context, call: Call) -> dict[str, Any]:
    limits = ctx.limits
    member = parse_id(call.query("member"), "member", limits)
    last_read = parse_int64(call.query("last_read", "lastRead"), "last_read")
    count = parse_count(call.query("count"), "count", limits)
    wait_ms = _wait_ms(ctx, call)
    device = parse_device(call.query("device"), limits)

    def page() -> dict[str, Any]:
        result = ctx.service.sync(member, last_read, count, device)
        return {
            "latestSeq": str(result.latest_seq),
            "entrySetLastSeq": str(result.entries[-1].seq if result.entries else 0),
            "entrySet": _sync_entries(result.entries),
            "minSeq": str(result.min_seq),
        }

    def settled(page: dict[str, Any]) -> bool:
        # Nothing allocated past last_read (latestSeq is read after the store): whatever
        # comes next is a write that publishes its wake-up once stored.
        return int(page["latestSeq"]) <= last_read

    return _waiting(ctx, call, Timeline(Kind.SYNC, member), wait_ms, page, settled)


def _wait_ms(ctx: Context, call: Call) -> int:
    """Extension: how long a read may wait for entries, clamped to sync_wait_max_ms."""
    wait = parse_int64(call.query("wait_ms", "waitMs"), "wait_ms")
    return min(wait, ctx.wait_max_ms)


def _waiting(
    ctx: Context,
    call: Call,
    timeline: Timeline,
    wait_ms: int,
    read: Callable[[], dict[str, Any]],
    settled: Callable[[dict[str, Any]], bool] = lambda page: False,
) -> dict[str, Any]:
    """`read()`, held for up to wait_ms while its entrySet is empty. The token is taken
    before each read: a wake-up between the read and the park (a message stored after the
    read looked) makes the park fail, and the read runs again at once.

    `settled(page)`: an empty page that only a wake-up can change (nothing allocated past
    last_read). When its wait ends with no wake-up for it, and the listener held the channel
    all along, that page is the answer, as of when it was read: the read does not run again
    (it would find the same, at the cost of a store read and a Redis round trip for every
    wait that times out). Otherwise the wait ends with a read."""
    wakes = ctx.wakes
    if not wait_ms or wakes is None:
        return read()
    environ = call.environ
    kept = environ.get(SETTLED)
    if kept is not None:  # the worker's deadline, nothing woke it: the page it parked on
        metrics.WAITS_TIMED_OUT.inc()
        page: dict[str, Any] = orjson.loads(kept)
        return page
    deadline = environ.get(WAIT_UNTIL) or time.monotonic() + wait_ms / 1000
    key = key_of(timeline)
    while True:
        token = wakes.watch(key)
        try:
            page = read()
        except BaseException:
            wakes.unwatch(key)
            raise
        left = deadline - time.monotonic()
        if page["entrySet"] or left <= 0:
            wakes.unwatch(key)
            if not page["entrySet"]:
                metrics.WAITS_TIMED_OUT.inc()
            return page
        if environ.get(CAN_PARK):  # the worker holds it: no thread
            raise Parked(wakes, key, token, deadline, orjson.dumps(page) if settled(page) else None)
        # A thread to spare (another WSGI server, tests).
        if wakes.wait(key, token, left) and settled(page):
            metrics.WAITS_TIMED_OUT.inc()
            return page


def _history(ctx: Context, call: Call, timeline_id: str) -> dict[str, Any]:
    count = parse_count(call.query("count"), "count", ctx.limits)
    direction = (call.query("direction") or "forward").lower()
    if direction == "backward":
        before = parse_int64(call.query("before"), "before")
        page = ctx.service.history_backward(timeline_id, before, count)
        return {"entrySet": _entries(page.entries), "nextBefore": str(page.next_before)}
    if direction != "forward":
        raise InvalidParam("direction must be forward or backward", field="direction")
    last_read = parse_int64(call.query("last_read", "lastRead"), "last_read")
    wait_ms = _wait_ms(ctx, call)

    def forward() -> dict[str, Any]:
        return {"entrySet": _entries(ctx.service.history(timeline_id, last_read, count))}

    return _waiting(ctx, call, Timeline(Kind.HISTORY, timeline_id), wait_ms, forward)


def history_single(ctx: Context, call: Call, sender: str, receiver: str) -> dict[str, Any]:
    a = parse_id(sender, "from", ctx.limits)
    b = parse_id(receiver, "to", ctx.limits)
    return _history(ctx, call, conversation_id(a, b))


def history_group(ctx: Context, call: Call, group: str) -> dict[str, Any]:
    return _history(ctx, call, parse_id(group, "group", ctx.limits))


Handler = Callable[..., dict[str, Any]]

PREFIX = "/timeline"
#: The routes: method, the route as metrics and logs name it, the handler.
ROUTES: tuple[tuple[str, str, Handler], ...] = (
    ("POST", "/send", send),
    ("POST", "/sendGroup", send_group),
    ("POST", "/ack", ack),
    ("GET", "/sync", sync),
    ("GET", "/history/single/<sender>/<receiver>", history_single),
    ("GET", "/history/group/<group>", history_group),
    ("POST", "/read", read),
    ("GET", "/conversations", conversations),
    ("GET", "/devices", devices),
)


class Routes:
    """The route table of the API: a path under /timeline to its route's name, its
    handlers by method and the ids the path carries. Exact paths are one dict lookup; the
    two history routes are told apart by their segments (an id never holds '/')."""

    def __init__(self, routes: tuple[tuple[str, str, Handler], ...]) -> None:
        self._exact: dict[str, tuple[str, dict[str, Handler]]] = {}
        self._history: dict[tuple[str, int], tuple[str, dict[str, Handler]]] = {}
        for method, rule, handler in routes:
            route = PREFIX + rule
            if "<" not in rule:
                self._exact.setdefault(route, (route, {}))[1][method] = handler
            else:
                parts = route.split("/")  # '', 'timeline', 'history', kind, <id>[, <id>]
                key = (parts[3], len(parts))
                self._history.setdefault(key, (route, {}))[1][method] = handler

    def match(self, path: str) -> tuple[str, dict[str, Handler], tuple[str, ...]] | None:
        found = self._exact.get(path)
        if found is not None:
            return found[0], found[1], ()
        if not path.startswith("/timeline/history/"):
            return None
        parts = path.split("/")
        if len(parts) < 5:
            return None
        matched = self._history.get((parts[3], len(parts)))
        if matched is None or "" in parts[4:]:
            return None
        return matched[0], matched[1], tuple(_wsgi_text(part) for part in parts[4:])


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


# --- The API: one WSGI pipeline for everything under /timeline ----------------------------

_STATUS = {code.value: f"{code.value} {code.phrase.upper()}" for code in HTTPStatus}
_JSON = ("Content-Type", "application/json")


class Api:
    """Every request under /timeline, whatever its method or path, goes through here: one
    route table, one token check, one CORS rule, one error mapping (the envelope of
    timeline.errors), one request id, one access line, one metric. Flask serves the rest
    (the console, health, metrics, the OpenAPI document) and never sees an API request, so
    its hooks and signals fire for none of them; to instrument every request, wrap `app`
    (or app.wsgi_app) in a WSGI middleware, as OpenTelemetry's and Sentry's are.

    HEAD is GET without the body; OPTIONS on a route is a browser's preflight (204, the
    CORS headers, no token asked); another method on a route is 405 with Allow; a path
    that is no route is 404."""

    def __init__(self, app: Flask, wsgi_app: Callable[..., Any]) -> None:
        self.app = app
        self.wsgi_app = wsgi_app
        extension = app.extensions[EXTENSION]
        self.context: Context = extension["context"]
        self.token: str = extension["settings"].api_token
        self.cors: list[tuple[str, str]] = extension["cors_headers"]
        self.routes = Routes(ROUTES)

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        path = environ.get("PATH_INFO", "")
        if not path.startswith(PREFIX) or (len(path) > len(PREFIX) and path[len(PREFIX)] != "/"):
            return self.wsgi_app(environ, start_response)
        method = environ["REQUEST_METHOD"]
        started = ops.begin(environ)
        headers: list[tuple[str, str]] = [_JSON]
        route = "unmatched"
        try:
            found = self.routes.match(path)
            if method == "OPTIONS" and found is not None:
                route = found[0]
                code, body, headers = 204, b"", []  # a preflight: no token asked
            else:
                # The token first: without it, no route is told from another (401 for all).
                check_bearer(self.token, environ.get("HTTP_AUTHORIZATION", ""))
                if found is None:
                    raise NotFound(f"no route {method} {_wsgi_text(path)}")
                route, handlers, params = found
                handler = handlers.get("GET" if method == "HEAD" else method)
                if handler is None:
                    allowed = {*handlers, "OPTIONS"} | ({"HEAD"} if "GET" in handlers else set())
                    headers.append(("Allow", ", ".join(sorted(allowed))))
                    raise MethodNotAllowed(f"{method} is not allowed on {_wsgi_text(path)}")
                call = Call(environ, self.app.config["MAX_CONTENT_LENGTH"])
                try:
                    body = orjson.dumps(handler(self.context, call, *params))
                except Parked as parked:
                    # Held by the worker, which runs the request again: no reply, no line.
                    # Without its traceback: the handler's frames (the environ, gunicorn's
                    # request) would otherwise stay in a cycle only a full collection frees.
                    environ[PARKED] = parked.with_traceback(None)
                    return []  # (the finally below unbinds its request id)
                code = 200
        except TimelineError as error:
            code = error.code
            if code >= 500:
                log.warning("%s %s: %s (%s)", method, _wsgi_text(path), error.reason, error.message)
            body = envelope_body(error)
            headers.extend(error_headers(error))
        except Exception:
            log.exception("unhandled error on %s %s", method, _wsgi_text(path))
            internal = TimelineError("internal error")
            code, body = internal.code, envelope_body(internal)
        finally:
            request_id = ops.end(environ)
        headers.append(("Content-Length", str(len(body))))
        headers.append(("X-Request-ID", request_id))
        if self.cors and "HTTP_ORIGIN" in environ:
            headers.extend(self.cors)
        start_response(_STATUS[code], headers)
        ops.record(environ, route, method, code, _wsgi_text(path), started, request_id)
        return [] if method == "HEAD" else [body]


# --- Flask's pages: the same envelope for their errors -------------------------------------


def flask_envelope(error: TimelineError) -> Response:
    """An error of a page Flask serves, as the envelope, with the code as status."""
    response = current_app.response_class(
        envelope_body(error), status=error.code, mimetype="application/json"
    )
    response.headers.extend(error_headers(error))
    return response


def _on_timeline_error(error: TimelineError) -> Response:
    if error.code >= 500:
        log.warning("%s %s: %s (%s)", request.method, request.path, error.reason, error.message)
    return flask_envelope(error)


def _on_http_error(error: HTTPException) -> Response:
    code = error.code or 500
    mapped: TimelineError
    if code == 404:
        mapped = NotFound(f"no route {request.method} {request.path}")
    elif code == 405:
        mapped = MethodNotAllowed(f"{request.method} is not allowed on {request.path}")
    elif code == 413:
        limit = current_app.config.get("MAX_CONTENT_LENGTH")
        mapped = PayloadTooLarge(f"request body is larger than {limit} bytes", limit=limit)
    elif code < 500:
        mapped = InvalidParam(error.description or error.name)
    else:
        mapped = TimelineError(error.description or error.name)
    response = flask_envelope(mapped)
    if code not in (404, 405, 413):
        response.status_code = code  # the envelope says what Werkzeug said
    allowed = dict(error.get_headers()).get("Allow")
    if allowed:
        response.headers["Allow"] = allowed
    return response


def _on_unexpected(error: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.path)
    return flask_envelope(TimelineError("internal error"))


def _cors(response: Response) -> Response:
    """The same CORS headers on Flask's pages, for a browser that calls them from another
    origin."""
    if "HTTP_ORIGIN" in request.environ:
        headers = current_app.extensions[EXTENSION]["cors_headers"]
        if headers:
            response.headers.extend(headers)
    return response


def register(app: Flask) -> None:
    """Put the API in front of Flask (it needs the extension's context), and map every error
    of Flask's own pages, expected or not, to the envelope."""
    # '//timeline/sync' would be answered with an HTML redirect; let it be a 404 envelope.
    app.url_map.merge_slashes = False
    app.after_request(_cors)
    app.register_error_handler(TimelineError, _on_timeline_error)
    app.register_error_handler(HTTPException, _on_http_error)
    app.register_error_handler(Exception, _on_unexpected)
    app.wsgi_app = Api(app, app.wsgi_app)  # type: ignore[method-assign]
