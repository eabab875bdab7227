"""The HTTP front: gunicorn's threaded worker, made so that slow or silent clients hold no thread.

`gunicorn app:app` runs this worker (gunicorn.conf.py's `worker_class`). It is gthread's
ThreadWorker (its selector loop, thread pool and method queue) with the socket work moved out
of the threads:

- The main loop reads every connection non-blocking into a buffer of its own until the request
  is complete: headers, then the Content-Length or chunked body, framed by `Framing` below with
  gunicorn's own rules. A request that does not arrive within `http_read_timeout_ms` (from the
  accept, or from its first byte on a kept-alive connection) is answered 408, when part of it
  came, and the connection closed; an idle kept-alive connection is closed after
  `http_keepalive_ms`.
- Only a complete request goes to a thread (`http_threads` of them per worker). The thread
  parses the buffered bytes with gunicorn's own RequestParser (so limits, errors and the WSGI
  environ are exactly gunicorn's), runs the WSGI app and writes the reply into memory.
- The main loop sends the reply non-blocking; a reply not taken within
  `http_write_timeout_ms` is abandoned and the connection reset.

A thread therefore only ever runs the app: a client that sends nothing, trickles its request or
never reads its reply costs a buffer and a selector slot, never a thread. Every error the HTTP
layer answers (gunicorn's 400, 414, 431, ..., the front's 408 and 413, an exception escaping the
app, a worker aborted mid-request) is the service's JSON envelope with an X-Request-ID.

Kept-alive connections stay with the worker that accepted them, and the app is CPU-bound, so
new connections are shared out by load, as gunicorn's sync workers share them by accepting only
when free: a worker takes none while its threads are all busy, leaves one 2 ms to an idle
worker when it has work in hand, and closes a kept-alive connection whose next request would
wait for a thread (the client reconnects, to a worker with one free).

The master's timeout (SIGABRT) now means a hung main loop, not a long request (threads do not
check in; requests are bounded by request_deadline_ms). An aborted worker answers every request
it was running or reading 503 TIMELINE_UNAVAILABLE, Retry-After: 1, before it exits.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import heapq
import itertools
import logging
import os
import re
import resource
import selectors
import socket
import struct
import sys
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from datetime import datetime
from functools import partial
from http import HTTPStatus
from typing import Any

from gunicorn import util
from gunicorn.http import RequestParser, wsgi
from gunicorn.http.body import Body, ChunkedReader, LengthReader
from gunicorn.http.errors import (
    ChunkMissingTerminator,
    ExpectationFailed,
    ForbiddenProxyRequest,
    InvalidChunkExtension,
    InvalidChunkSize,
    InvalidHeader,
    InvalidHeaderName,
    InvalidHTTPVersion,
    InvalidProxyLine,
    InvalidRequestLine,
    InvalidRequestMethod,
    InvalidSchemeHeaders,
    LimitRequestHeaders,
    LimitRequestLine,
    NoMoreData,
    ObsoleteFolding,
    UnsupportedTransferCoding,
)
from gunicorn.http.unreader import IterUnreader
from gunicorn.workers.gthread import ThreadWorker

from timeline.errors import (
    ExpectationNotMet,
    Forbidden,
    HeadersTooLarge,
    InvalidParam,
    NotImplementedCoding,
    PayloadTooLarge,
    RequestTimeout,
    TimelineError,
    Unavailable,
    UriTooLong,
    envelope_body,
    error_headers,
)
from timeline.logs import REQUEST_ID, REQUEST_ID_PATTERN
from timeline.settings import load_settings
from timeline.wakes import CAN_PARK, PARKED, SETTLED, WAIT_UNTIL, Parked

# --- The envelope -----------------------------------------------------------------------

#: Client text (a bad request line, a header name) quoted in a message at most this long.
_QUOTE_MAX = 200


_RAW_REQUEST_ID_RE = re.compile(
    rb"\r\nX-Request-ID:[ \t]*([A-Za-z0-9._:/+=-]{1,128})[ \t]*\r\n", re.I
)


def _request_id(req: Any, raw: bytes = b"") -> str:
    """The request's own X-Request-ID when it sent a valid one, else a new one. `raw` is the
    request's bytes, looked at when gunicorn refused them before it had headers to give."""
    for name, value in getattr(req, "headers", None) or ():
        if name == "X-REQUEST-ID" and REQUEST_ID_PATTERN.fullmatch(value):
            return str(value)
    if req is None and raw:
        head_end = raw.find(b"\r\n\r\n")
        found = _RAW_REQUEST_ID_RE.search(raw, 0, head_end + 2 if head_end >= 0 else 1 << 16)
        if found:
            return found.group(1).decode("ascii")
    return os.urandom(16).hex()


def envelope(error: TimelineError, request_id: str) -> bytes:
    """A whole HTTP/1.1 reply carrying the error envelope (timeline.errors builds its body
    and headers, for every error reply the service makes), after which the connection
    closes."""
    body = envelope_body(error)
    headers = [
        f"HTTP/1.1 {error.code} {HTTPStatus(error.code).phrase}",
        "Server: gunicorn",
        f"Date: {util.http_date()}",
        "Connection: close",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        f"X-Request-ID: {request_id}",
        *(f"{name}: {value}" for name, value in error_headers(error)),
    ]
    return ("\r\n".join(headers) + "\r\n\r\n").encode("latin-1") + body


def _quote(text: object) -> str:
    text = str(text)
    return text if len(text) <= _QUOTE_MAX else text[:_QUOTE_MAX] + "..."


#: gunicorn's errors that are the client's (as gunicorn's own Worker.handle_error lists them),
#: answered 400 unless mapped below; NoMoreData is a request whose framing the front and
#: gunicorn's parser read differently (it ended where gunicorn still expected bytes).
_CLIENT_ERRORS = (
    InvalidRequestLine,
    InvalidRequestMethod,
    InvalidHTTPVersion,
    InvalidHeader,
    InvalidHeaderName,
    ObsoleteFolding,
    InvalidSchemeHeaders,
    InvalidChunkSize,
    ChunkMissingTerminator,
    InvalidChunkExtension,
    InvalidProxyLine,
    NoMoreData,
)


def http_error(exc: BaseException, cfg: Any) -> TimelineError | None:
    """The envelope error for one of gunicorn's request errors; None when it is not one."""
    if isinstance(exc, LimitRequestLine):
        limit = cfg.limit_request_line
        return UriTooLong(f"the request line is longer than {limit} bytes", limit=limit)
    if isinstance(exc, LimitRequestHeaders):
        fields, size = cfg.limit_request_fields, cfg.limit_request_field_size
        return HeadersTooLarge(
            f"the request headers are too large: at most {fields} fields of at most {size} "
            "bytes each",
            limit_fields=fields,
            limit_field_size=size,
        )
    if isinstance(exc, ExpectationFailed):
        return ExpectationNotMet(f"unsupported expectation: {_quote(exc)}")
    if isinstance(exc, UnsupportedTransferCoding):
        return NotImplementedCoding(f"unsupported transfer coding: {_quote(exc)}")
    if isinstance(exc, ForbiddenProxyRequest):
        return Forbidden("PROXY protocol not allowed from this address")
    if isinstance(exc, NoMoreData):
        return InvalidParam("malformed request: it ended before its framing did")
    if isinstance(exc, _CLIENT_ERRORS):
        return InvalidParam(f"malformed request: {_quote(exc)}")
    return None


def _framing_rules(req: Any) -> None:
    """What RFC 9112 asks of a request that gunicorn's parser lets through: one Host header
    in HTTP/1.1 (3.2: "a server MUST respond with a 400 ... to any HTTP/1.1 request message
    that lacks a Host header field and to any request message that contains more than one"),
    and chunked as the only transfer coding (the framing reads nothing else)."""
    hosts = sum(1 for name, _ in req.headers if name == "HOST")
    if hosts > 1 or (hosts == 0 and req.version >= (1, 1)):
        raise InvalidParam(
            "malformed request: an HTTP/1.1 request carries exactly one Host header",
            header="Host",
        )
    codings = [
        coding.strip(" \t").lower()
        for name, value in req.headers
        if name == "TRANSFER-ENCODING"
        for coding in value.split(",")
    ]
    if codings and codings != ["chunked"]:
        raise NotImplementedCoding(
            f"unsupported transfer coding: {_quote(', '.join(codings))}; only chunked, once"
        )


def _pieces(data: bytes, size: int = 8192) -> list[bytes]:
    """The bytes as gunicorn's socket reader would get them (8 KiB reads)."""
    return [data[i : i + size] for i in range(0, len(data), size)] or [b""]


# --- Framing: where the request at the head of a buffer ends ---------------------------

INCOMPLETE, READY, TOO_LARGE = 0, 1, 2
_HEX = re.compile(rb"[0-9a-fA-F]+")
#: gunicorn's own bounds (gunicorn/http/message.py) when a limit is 0 or out of range.
_MAX_REQUEST_LINE = 8190
_MAX_HEADERS = 32768
_DEFAULT_FIELD_SIZE = 8190


class Limits:
    """The header limits gunicorn's parser applies, as its Message and Request compute them."""

    def __init__(self, cfg: Any, body_max: int) -> None:
        line = cfg.limit_request_line
        # As gunicorn's Request: negative or over the maximum, the maximum; 0 (unlimited), the
        # 1 MiB its fast parser uses.
        self.line = _MAX_REQUEST_LINE if line < 0 else min(line, _MAX_REQUEST_LINE) or 1 << 20
        fields = cfg.limit_request_fields
        fields = _MAX_HEADERS if fields <= 0 or fields > _MAX_HEADERS else fields
        self.field = cfg.limit_request_field_size
        if self.field <= 0:
            self.field = _DEFAULT_FIELD_SIZE
        self.header_buffer = fields * (self.field + 2) + 4
        # A head that has not ended by this size is one gunicorn refuses: hand it over.
        self.head = self.line + 4 + self.header_buffer + 4
        self.body = body_max


class Framing:
    """Reads, incrementally, where the request at the start of a buffer ends.

    It follows gunicorn's parser (gunicorn/http/message.py and body.py) exactly where that
    decides how many bytes make the request: one optional CRLF, then the head up to CRLF CRLF;
    then a chunked body (the last Transfer-Encoding is chunked) up to its last chunk and
    trailers, or Content-Length bytes, or none. Everything else is left to gunicorn's parser:
    a request the framing finds malformed (a bare LF, a bad chunk size, two Content-Lengths,
    a head over the limits) is handed over as it is, at once, for gunicorn to refuse it with
    its own error; the connection then closes. `feed` returns INCOMPLETE, READY (`end` is
    where the request ends) or TOO_LARGE (a chunked body over body_max_bytes).
    """

    __slots__ = (
        "body_start",
        "chunk_pos",
        "chunked",
        "close",
        "decoded",
        "end",
        "expect_continue",
        "head_end",
        "length",
        "limits",
        "scanned",
        "trailers",
        "truncated",
    )

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.head_end = 0  # where the head ends (after its CRLF CRLF); 0 until it has
        self.scanned = 0  # how far the head was searched
        self.body_start = 0
        self.length = 0
        self.chunked = False
        self.chunk_pos = 0  # the next chunk-size line (or the trailers)
        self.trailers = False
        self.decoded = 0  # chunk data bytes so far
        self.end = 0
        #: The connection must close after this request: its bytes were not all taken.
        self.close = False
        #: The body was not buffered (Content-Length over body_max_bytes): the app refuses it.
        self.truncated = False
        self.expect_continue = False

    def _hand_over(self, buf: bytearray) -> int:
        self.end = len(buf)
        self.close = True
        return READY

    def feed(self, buf: bytearray) -> int:
        if not self.head_end:
            verdict = self._head(buf)
            if verdict != READY or self.close or self.truncated:
                return verdict
        if self.chunked:
            return self._chunks(buf)
        if len(buf) >= self.body_start + self.length:
            self.end = self.body_start + self.length
            return READY
        return INCOMPLETE

    def _head(self, buf: bytearray) -> int:
        start = 2 if buf[:2] == b"\r\n" else 0  # RFC 9112 2.2: one empty line is ignored
        lo = max(start, self.scanned - 3)
        found = buf.find(b"\r\n\r\n", lo)
        hi = found + 4 if found >= 0 else len(buf)
        # gunicorn refuses a bare LF in the head at once: so does the framing, by handing over.
        newline = buf.find(b"\n", max(start, self.scanned - 1), hi)
        while newline >= 0:
            if newline == start or buf[newline - 1] != 0x0D:
                return self._hand_over(buf)
            newline = buf.find(b"\n", newline + 1, hi)
        self.scanned = len(buf)
        if found < 0:
            line_open = buf.find(b"\r\n", start) < 0
            if (line_open and len(buf) - start - 2 > self.limits.line) or len(
                buf
            ) > self.limits.head:
                return self._hand_over(buf)  # gunicorn answers 414 or 431
            return INCOMPLETE
        self.head_end = self.body_start = found + 4
        lines = bytes(buf[start:found]).split(b"\r\n")
        lengths: list[bytes] = []
        codings: list[bytes] = []
        expect: list[bytes] = []
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.lower()
            if name == b"content-length":
                lengths.append(value.strip(b" \t"))
            elif name == b"transfer-encoding":
                codings.append(value)
            elif name == b"expect":
                expect.append(value.strip(b" \t").lower())
        if any(value != b"100-continue" for value in expect):
            return self._hand_over(buf)  # gunicorn answers 417
        if codings:
            last = b",".join(codings).split(b",")[-1].strip(b" \t").lower()
            if last != b"chunked" or lengths:
                return self._hand_over(buf)  # gunicorn answers 400 or 501
            self.chunked = True
            self.chunk_pos = self.head_end
        elif lengths:
            if len(lengths) > 1 or not lengths[0].isdigit():
                return self._hand_over(buf)  # gunicorn answers 400
            self.length = int(lengths[0])
            if self.length > self.limits.body:
                # Not buffered: the app answers 413 from the headers alone; what the client
                # still sends is drained, then the connection closes.
                self.end = self.head_end
                self.truncated = self.close = True
                return READY
        self.expect_continue = bool(expect) and lines[0].endswith(b" HTTP/1.1")
        return READY

    def _chunks(self, buf: bytearray) -> int:
        pos = self.chunk_pos
        while not self.trailers:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                if len(buf) - pos > self.limits.field:
                    return self._hand_over(buf)  # gunicorn: InvalidChunkSize
                return INCOMPLETE
            size_text, semicolon, _ = bytes(buf[pos:eol]).partition(b";")
            if semicolon:
                size_text = size_text.rstrip(b" \t")
            if not _HEX.fullmatch(size_text):
                return self._hand_over(buf)  # gunicorn: InvalidChunkSize
            size = int(size_text, 16)
            if size == 0:
                pos = self.chunk_pos = eol + 2
                self.trailers = True
                break
            if self.decoded + size > self.limits.body:
                return TOO_LARGE
            data_end = eol + 2 + size
            if len(buf) < data_end + 2:
                return INCOMPLETE
            if buf[data_end : data_end + 2] != b"\r\n":
                return self._hand_over(buf)  # gunicorn: ChunkMissingTerminator
            self.decoded += size
            pos = self.chunk_pos = data_end + 2
        if buf[pos : pos + 2] == b"\r\n":
            self.end = pos + 2
            return READY
        found = buf.find(b"\r\n\r\n", pos)
        if found >= 0:
            self.end = found + 4
            return READY
        if len(buf) - pos > self.limits.header_buffer:
            return self._hand_over(buf)  # gunicorn: LimitRequestHeaders (trailers)
        return INCOMPLETE


# --- Connections ------------------------------------------------------------------------

READING, BUSY, WRITING, LINGERING = "reading", "busy", "writing", "lingering"
#: A read held until its timeline gets entries (wait_ms): no thread, a timer and a callback.
WAITING = "waiting"
#: What a waiting connection may buffer of a next (pipelined) request before it is closed.
_WAITING_BUF_MAX = 64 * 1024
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
#: After a last reply the connection is half-closed and read (and dropped) for this long at
#: most, so that the kernel does not reset it while the client's last bytes are unread.
_LINGER_SECONDS = 2.0
_LINGER_BYTES = 1 << 20
#: A stopping worker keeps idle kept-alive connections this long at most (gthread's value).
_STOP_LINGER_SECONDS = 2.0
_RECV_SIZE = 64 * 1024
_RECV_MAX = 1 << 20
_IOV_MAX = 64
#: A new connection counts as work for this long (its request is on its way), so that a burst of
#: connections is shared between the workers rather than kept by the first one awake; a silent
#: one stops counting after it, so it never keeps a worker from accepting.
_ACCEPT_GRACE = 0.02
#: A worker with work in hand leaves a new connection this long to an idle worker (which takes
#: it at once) before it takes it itself: the app is CPU-bound, so one request per process
#: first, as gunicorn's sync workers have it.
_ACCEPT_DEFER = 0.002
_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() resets the connection
#: Connections taken at once when the listen queue is deep (a flood of connections): the
#: sharing out by load (_ACCEPT_GRACE) gives way to draining the queue, so that a real
#: client's connection does not wait behind thousands of silent ones.
_ACCEPT_BATCH = 256
#: A reply being sent for longer than this is a slow reader's: over the memory budget, the
#: longest-sending are dropped first.
_SLOW_READER_S = 1.0
#: Replies to pipelined requests the worker will not run (it closes the connection).
_REFUSALS_MAX = 16


def _accept_queue(listener: socket.socket) -> int:
    """Connections waiting in the listen queue (Linux: TCP_INFO of a listening socket gives
    its accept queue's length as tcpi_unacked); 0 when the platform does not say."""
    try:
        info = listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
        return int(struct.unpack_from("8B5I", info)[12])
    except (OSError, AttributeError, struct.error):
        return 0


#: The reply chunks of a connection with no reply to send: one empty list shared by all (never
#: written to: _write changes a list only at an index below its length).
_NO_OUT: list[memoryview] = []


class Conn:
    """One client connection, owned by the main loop."""

    __slots__ = (
        "accepted",
        "buf",
        "client",
        "continued",
        "environ",
        "events",
        "framing",
        "fresh",
        "held",
        "idle",
        "in_thread",
        "keep",
        "lingered",
        "on_event",
        "out",
        "out_index",
        "parked",
        "paused",
        "pending",
        "server",
        "settled",
        "sock",
        "state",
        "ticket",
        "wait_until",
        "wake",
        "woken_at",
        "writing_since",
    )

    def __init__(
        self,
        sock: socket.socket,
        client: Any,
        server: Any,
        limits: Limits,
        on_event: Callable[[Conn], None],
    ) -> None:
        self.sock = sock
        self.client = client
        self.server = server
        self.accepted = time.monotonic()
        self.fresh = True  # no request of it has gone to a thread yet
        self.buf = bytearray()
        self.framing = Framing(limits)
        self.state = READING
        self.idle = False  # kept alive, waiting for the first byte of its next request
        self.continued = False  # 100 Continue sent for the request being read
        self.events = 0  # what the poller watches the socket for; 0: not registered
        self.ticket = -1  # the timer that counts for this connection; -1: none
        self.out: list[memoryview] = _NO_OUT  # between replies: no list of its own
        self.out_index = 0
        self.keep = False
        self.lingered = 0
        self.environ: dict[str, Any] | None = None  # of the request in a thread
        self.held = 0  # bytes of this connection's requests and reply the worker holds
        self.in_thread = 0  # of them, the request a thread is running
        self.writing_since = 0.0
        self.paused = False  # not read while the worker is over its memory budget
        self.pending = b""  # the request a thread runs (run again after a wait)
        self.parked: Parked | None = None  # the wait it is held for
        self.wait_until = 0.0  # its deadline (time.monotonic), across runs of the request
        self.settled: bytes | None = None  # the page it parked on, answered at a quiet deadline
        self.wake: Callable[[], None] | None = None  # what wakes it (from any thread)
        self.woken_at = 0.0
        self.on_event: Callable[[Any], None] | None = partial(on_event, self)


class _Capture:
    """What gunicorn's Response takes for a socket: the reply is kept in memory, by reference,
    for the main loop to send."""

    def __init__(self, raw: bytes = b"") -> None:
        self.chunks: list[bytes] = []
        self.raw = raw  # the request, for its X-Request-ID when gunicorn refuses it

    def sendall(self, data: bytes) -> None:
        self.chunks.append(data if type(data) is bytes else bytes(data))

    def send(self, data: bytes) -> int:
        self.sendall(data)
        return len(data)


class TimelineWorker(ThreadWorker):  # type: ignore[misc]
    """gthread's ThreadWorker with every socket read and write in its main loop."""

    alive: bool  # gunicorn's Worker: False once the worker is to stop
    worker_connections: int  # gthread's: connections at once, capped below the fd limit

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.conns: set[Conn] = set()
        self.timers: list[tuple[float, int, Conn]] = []
        self.tickets = itertools.count()
        self.read_timeout = self.write_timeout = self.keepalive_timeout = 0.0
        self.limits: Limits | None = None
        self.accept_paused_until = 0.0
        self.running = 0  # requests handed to a thread and not yet back
        self.accept_deferred_until = 0.0  # a pending connection left to idle workers until then
        self.arrivals: deque[Conn] = deque()  # connections accepted in the last _ACCEPT_GRACE
        # Connections with no request under way (never sent a byte, or idle kept-alive),
        # oldest first: the first to go when the worker is at its connection cap.
        self.silent: dict[Conn, None] = {}
        self.held = 0  # bytes of requests and replies in flight (Conn.held, summed)
        self.budget = 0  # http_memory_budget_bytes
        self.paused: dict[Conn, None] = {}  # bodies not read on while over the budget
        # gunicorn's own access line (the service writes its own): its fields are only worked
        # out when someone configured a logger that would print them.
        self._gunicorn_access = False

    def init_process(self) -> None:
        if self.cfg.is_ssl:
            raise RuntimeError("timeline's worker serves plain HTTP: terminate TLS before it")
        if getattr(self.cfg, "proxy_protocol", "off") not in ("off", False, None):
            raise RuntimeError("timeline's worker does not read the PROXY protocol")
        settings = load_settings()
        self.read_timeout = settings.http_read_timeout_ms / 1000
        self.write_timeout = settings.http_write_timeout_ms / 1000
        self.keepalive_timeout = settings.http_keepalive_ms / 1000
        self.limits = Limits(self.cfg, settings.body_max_bytes)
        self.budget = settings.http_memory_budget_bytes
        self.worker_connections = settings.http_max_connections
        self._gunicorn_access = bool(
            getattr(self.log, "access_log_enabled", False)
        ) and logging.getLogger("gunicorn.access").isEnabledFor(logging.INFO)
        # Each connection is a file descriptor: stay below the process's limit (with room for
        # Redis, the store, pipes and logs), so that a flood of connections is refused, not
        # met with EMFILE.
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = self.worker_connections + 200
        if soft != resource.RLIM_INFINITY and soft < wanted:
            raised = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
            with contextlib.suppress(ValueError, OSError):
                resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
                soft = raised
        if soft != resource.RLIM_INFINITY:
            self.worker_connections = max(1, min(self.worker_connections, soft - 200))
        super().init_process()

    # --- the main loop ------------------------------------------------------------------

    def run(self) -> None:
        # The app, its modules and settings live as long as the worker: out of the cycle
        # collector's way, so that its passes cost what the connections hold, not them.
        gc.collect()
        gc.freeze()
        # Bound once: a held connection's callbacks then cost one partial each, not a bound
        # method more (the collector walks every object a held connection keeps).
        self._on_event_bound = self._on_event
        self._defer = self.method_queue.defer
        self._woken_bound = self._woken
        self.poller.register(
            self.method_queue.fileno(), selectors.EVENT_READ, self.method_queue.run_callbacks
        )
        self.set_accept_enabled(True)
        while self.alive:
            self.notify()
            can_accept = self._can_accept()
            if can_accept != self._accepting:
                self.set_accept_enabled(can_accept)
            self.wait_for_and_dispatch_events(self._next_wait())
            if not self.is_parent_alive():
                break
            self._expire()
            if self.held > self.budget or self.paused:
                self._relieve()
        self._stop()

    def _stop(self) -> None:
        """Graceful stop: no new connections; requests being read, run or sent finish (within
        graceful_timeout); connections that have sent nothing close within two seconds."""
        self.set_accept_enabled(False)
        now = time.monotonic()
        for conn in list(self.conns):
            if conn.state == READING and not conn.buf:
                self._schedule(conn, now + min(_STOP_LINGER_SECONDS, self.keepalive_timeout))
            elif conn.state == WAITING:
                self._unpark(conn)  # answered now with what is readable
        give_up = now + self.cfg.graceful_timeout
        while self.conns and time.monotonic() < give_up:
            self.notify()
            self.wait_for_and_dispatch_events(self._next_wait())
            self._expire()
        for conn in list(self.conns):
            self._close(conn)
        self.tpool.shutdown(wait=False)
        self.poller.close()
        self.method_queue.close()
        for listener in self.sockets:
            listener.close()

    def _can_accept(self) -> bool:
        """Whether to take new connections now: not over the connection limit, and not while
        this worker's threads are all taken (by requests running, or about to arrive on the
        connections it just accepted). gunicorn's sync workers share connections out the
        same way, by accepting only when free; kept-alive connections stay where they land,
        so a burst must not all land on one worker."""
        if self.nr_conns >= self.worker_connections and not self.silent:
            return False
        now = time.monotonic()
        if now < self.accept_paused_until or now < self.accept_deferred_until:
            return False
        return bool(self._load(now) < self.cfg.threads)

    def _load(self, now: float) -> int:
        """Requests running in this worker's threads, and about to (on connections accepted
        in the last _ACCEPT_GRACE that have not sent theirs yet)."""
        arrivals = self.arrivals
        while arrivals and (not arrivals[0].fresh or arrivals[0].accepted + _ACCEPT_GRACE <= now):
            arrivals.popleft()
        return self.running + sum(1 for conn in arrivals if conn.fresh)

    def _next_wait(self) -> float:
        timers = self.timers
        while timers and timers[0][2].ticket != timers[0][1]:
            heapq.heappop(timers)  # a timer since replaced or cancelled
        now = time.monotonic()
        self._load(now)  # drops the arrivals that no longer count
        wait = 1.0
        if self.arrivals:  # when the oldest arrival stops counting, accepting may resume
            wait = self.arrivals[0].accepted + _ACCEPT_GRACE - now
        if self.accept_deferred_until > now:  # when the deferral ends
            wait = min(wait, self.accept_deferred_until - now)
        if timers:
            wait = min(wait, timers[0][0] - now)
        return min(1.0, max(0.0, wait))

    def _schedule(self, conn: Conn, deadline: float) -> None:
        conn.ticket = next(self.tickets)
        heapq.heappush(self.timers, (deadline, conn.ticket, conn))

    def _expire(self) -> None:
        now = time.monotonic()
        timers = self.timers
        while timers and timers[0][0] <= now:
            _, ticket, conn = heapq.heappop(timers)
            if conn.ticket == ticket:
                conn.ticket = -1
                self._timed_out(conn)

    def _timed_out(self, conn: Conn) -> None:
        if conn.state == READING:
            if conn.buf:
                # Part of a request came: say why the connection closes, if it still listens.
                error = RequestTimeout(
                    f"the request did not arrive within {round(self.read_timeout * 1000)} ms",
                    limit_ms=round(self.read_timeout * 1000),
                )
                self.log.info("Request timeout from %s: %d bytes read", conn.client, len(conn.buf))
                self._reply_and_close(conn, envelope(error, _request_id(None, bytes(conn.buf))))
            else:
                self._close(conn)  # silent, or idle after its last reply
        elif conn.state == WAITING:
            self._unpark(conn)  # its wait is over: the request runs once more, and answers
        elif conn.state == WRITING:
            self.log.info("Reply not taken within its timeout: abandoned (%s)", conn.client)
            self._close(conn, reset=True)
        elif conn.state == LINGERING:
            self._close(conn)

    def _watch(self, conn: Conn, events: int) -> None:
        if conn.events == events:
            return
        if conn.events:
            self.poller.modify(conn.sock, events, conn.on_event)
        else:
            self.poller.register(conn.sock, events, conn.on_event)
        conn.events = events

    def _unwatch(self, conn: Conn) -> None:
        if conn.events:
            self.poller.unregister(conn.sock)
            conn.events = 0

    def _close(self, conn: Conn, reset: bool = False) -> None:
        if conn not in self.conns:
            return
        self.conns.discard(conn)
        self.nr_conns -= 1
        self.silent.pop(conn, None)
        self.paused.pop(conn, None)
        if conn.state == WAITING and conn.parked is not None and conn.wake is not None:
            conn.parked.wakes.cancel(conn.parked.key, conn.wake)
        self.held -= conn.held
        conn.held = conn.in_thread = 0
        conn.ticket = -1
        conn.fresh = False
        with contextlib.suppress(OSError, KeyError, ValueError):
            self._unwatch(conn)
        if reset:
            with contextlib.suppress(OSError):
                conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
        util.close(conn.sock)
        conn.buf = bytearray()
        conn.out = _NO_OUT
        # Its callbacks refer to it: dropped, it is freed when the last reference goes, not
        # left to the cycle collector (whose passes grow with every connection alive).
        conn.on_event = conn.wake = conn.parked = None

    # --- reading --------------------------------------------------------------------------

    def accept(self, listener: socket.socket) -> None:
        now = time.monotonic()
        queued = _accept_queue(listener)
        # A flood: more connections wait than this worker has threads. Drain the queue (a
        # real client's connection is somewhere in it), shedding silent ones at the cap.
        flood = queued > self.cfg.threads
        deferred = self.accept_deferred_until
        # A deferral just ended: the connection is still there, no idle worker took it. Long
        # ended: an idle worker took that one; this is another.
        if not flood and not (deferred and now < deferred + _ACCEPT_GRACE) and self._load(now):
            # Busy: an idle worker, woken too, takes the connection at once; if none has
            # when the deferral ends, this one does.
            self.accept_deferred_until = now + _ACCEPT_DEFER
            self.set_accept_enabled(False)
            return
        self.accept_deferred_until = 0.0
        for _ in range(min(queued, _ACCEPT_BATCH) if flood else 1):
            if self.nr_conns >= self.worker_connections:
                if not self.silent:
                    return  # every connection has a request under way: the queue waits
                self._close(next(iter(self.silent)))  # the oldest that has sent nothing
            if not self._accept_one(listener, flood):
                return

    def _accept_one(self, listener: socket.socket, flood: bool) -> bool:
        """Take one connection; False when none is waiting or none can be taken now."""
        try:
            sock, client = listener.accept()
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                return False
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                # Out of descriptors or memory: the connections being served go on; new ones
                # wait in the listen backlog (or go to another worker) for a second.
                self.log.warning("Cannot accept connections (%s): pausing 1 s", exc.strerror)
                self.accept_paused_until = time.monotonic() + 1.0
                self.set_accept_enabled(False)
                return False
            raise
        sock.setblocking(False)
        assert self.limits is not None
        conn = Conn(sock, client, listener.getsockname(), self.limits, self._on_event_bound)
        self.conns.add(conn)
        self.silent[conn] = None
        if not flood:  # in a flood, sharing by load gives way to draining the queue
            self.arrivals.append(conn)
        self.nr_conns += 1
        self._schedule(conn, time.monotonic() + self.read_timeout)
        self._read(conn)  # the request often arrived with the connection
        return True

    def _on_event(self, conn: Conn, _fileobj: Any = None) -> None:
        if conn not in self.conns:
            return
        try:
            if conn.state == READING:
                self._read(conn)
            elif conn.state == WAITING:
                self._read_while_waiting(conn)
            elif conn.state == WRITING:
                self._write(conn)
            elif conn.state == LINGERING:
                self._drain(conn)
        except Exception:
            # One connection's trouble must never end the loop that serves all the others.
            self.log.exception("Error on a connection from %s", conn.client)
            self._close(conn)

    def _recv(self, conn: Conn, size: int) -> bytes | None:
        """What the socket has (b"": the client closed its side); None when there is
        nothing yet (the connection is watched again) or it failed (it is closed)."""
        try:
            return conn.sock.recv(size)
        except (BlockingIOError, InterruptedError):
            self._watch(conn, selectors.EVENT_READ)
        except OSError:
            self._close(conn)
        return None

    def _read(self, conn: Conn) -> None:
        framing = conn.framing
        size = _RECV_SIZE
        if framing.head_end and not framing.chunked:
            size = min(max(size, framing.body_start + framing.length - len(conn.buf)), _RECV_MAX)
        data = self._recv(conn, size)
        if data is None:
            return
        if not data:
            self._close(conn)  # the client left before its request was complete (or idle)
            return
        if conn.idle:
            # The next request on a kept-alive connection starts: it has the read timeout.
            conn.idle = False
            self._schedule(conn, time.monotonic() + self.read_timeout)
        self.silent.pop(conn, None)
        conn.buf += data
        self._hold(conn, len(data))
        self._frame(conn)

    def _hold(self, conn: Conn, size: int) -> None:
        conn.held += size
        self.held += size

    def _frame(self, conn: Conn) -> None:
        framing = conn.framing
        verdict = framing.feed(conn.buf)
        if verdict == READY:
            self._dispatch(conn)
        elif verdict == TOO_LARGE:
            assert self.limits is not None
            limit = self.limits.body
            error = PayloadTooLarge(f"request body is larger than {limit} bytes", limit=limit)
            head = bytes(memoryview(conn.buf)[: framing.head_end])
            self._reply_and_close(conn, envelope(error, _request_id(None, head)))
        elif framing.head_end and self.held > self.budget:
            # Over the memory budget: this body is not read on (nor continued) until the
            # worker has drained; the read timeout still runs.
            conn.paused = True
            self.paused[conn] = None
            self._unwatch(conn)
        else:
            if framing.expect_continue and not conn.continued:
                conn.continued = True
                with contextlib.suppress(OSError):
                    conn.sock.send(_CONTINUE)
            self._watch(conn, selectors.EVENT_READ)

    def _relieve(self) -> None:
        """Over the memory budget: drop the slowest readers (replies being sent for longest,
        more than _SLOW_READER_S) until under it. Back under three quarters of it: read the
        bodies that were paused."""
        if self.held > self.budget:
            now = time.monotonic()
            slow = [
                conn
                for conn in self.conns
                if conn.state == WRITING and now - conn.writing_since > _SLOW_READER_S
            ]
            slow.sort(key=lambda conn: conn.writing_since)
            for conn in slow:
                if self.held <= self.budget:
                    break
                self.log.warning(
                    "Memory budget (%d bytes) exceeded: dropping a slow reader (%s, %d bytes "
                    "unsent for %.1f s)",
                    self.budget,
                    conn.client,
                    conn.held,
                    now - conn.writing_since,
                )
                self._close(conn, reset=True)
        elif self.held <= self.budget * 3 // 4:
            for conn in list(self.paused):
                conn.paused = False
                del self.paused[conn]
                self._watch(conn, selectors.EVENT_READ)

    def _dispatch(self, conn: Conn) -> None:
        """The request is complete: a thread runs it while the connection waits, unwatched.
        Over the memory budget it is not run: 503, Retry-After, and the connection closes."""
        if self.held > self.budget:
            error = Unavailable(
                "the server is over its memory budget for requests in flight; retry shortly",
                budget_bytes=self.budget,
            )
            head = bytes(memoryview(conn.buf)[: conn.framing.head_end])
            self._hold(conn, -len(conn.buf))
            conn.buf = bytearray()
            self._reply_and_close(conn, envelope(error, _request_id(None, head)))
            return
        framing = conn.framing
        end = framing.end
        if end == len(conn.buf):
            data = bytes(conn.buf)
            conn.buf = bytearray()
        else:
            data = bytes(memoryview(conn.buf)[:end])
            del conn.buf[:end]
        assert self.limits is not None
        conn.framing = Framing(self.limits)
        conn.continued = False
        conn.fresh = False
        conn.state = BUSY
        conn.ticket = -1
        conn.in_thread = len(data)
        conn.pending = data
        self.running += 1
        self._unwatch(conn)
        future = self.tpool.submit(self._serve, conn, data, framing.close)
        future.add_done_callback(lambda done: self.method_queue.defer(self._served, conn, done))

    # --- writing --------------------------------------------------------------------------

    def _served(self, conn: Conn, done: Future[tuple[list[bytes], bool]]) -> None:
        self.running -= 1
        if conn not in self.conns:
            return  # closed meanwhile (an abort)
        self._hold(conn, -conn.in_thread)
        conn.in_thread = 0
        conn.environ = None
        conn.settled = None
        if conn.woken_at:
            from timeline.metrics import WAKE_LATENCY  # not at import: see timeline.wakes

            WAKE_LATENCY.observe(time.monotonic() - conn.woken_at)
            conn.woken_at = 0.0
        if conn.parked is not None:
            self._park(conn)
            return
        conn.pending = b""
        conn.wait_until = 0.0
        try:
            chunks, keep = done.result()
        except BaseException:  # _serve answers every error itself: this is a bug of ours
            self.log.exception("Error serving a request")
            error = Unavailable("the request was interrupted before it completed; retry it")
            chunks, keep = [envelope(error, os.urandom(16).hex())], False
        self._send(conn, chunks, keep)

    def _park(self, conn: Conn) -> None:
        """Hold a read that has nothing to return yet (wait_ms): no thread, a timer at its
        deadline, and a wake-up callback that hands it back to this loop. Parking refused
        (a wake-up came since the read took its token): it runs again at once."""
        parked = conn.parked
        assert parked is not None
        conn.state = WAITING
        conn.wait_until = parked.deadline
        conn.wake = partial(self._defer, self._woken_bound, conn, parked)
        if not parked.wakes.park(parked.key, parked.token, conn.wake):
            self._rerun(conn)
            return
        self._schedule(conn, parked.deadline)
        self._watch(conn, selectors.EVENT_READ)  # to see the client leave

    def _woken(self, conn: Conn, parked: Parked) -> None:
        if conn in self.conns and conn.state == WAITING and conn.parked is parked:
            conn.woken_at = time.monotonic()
            self._rerun(conn)

    def _unpark(self, conn: Conn) -> None:
        """The wait is over (its deadline, or the worker stops): the request runs once more
        and answers with what is readable then; or, when the page it parked on is one only
        a wake-up could change (Parked.page) and none can have come, with that page,
        without reading again."""
        parked, wake = conn.parked, conn.wake
        if parked is not None and wake is not None and parked.wakes.cancel(parked.key, wake):
            conn.settled = parked.page
        conn.wait_until = min(conn.wait_until, time.monotonic())
        self._rerun(conn)

    def _rerun(self, conn: Conn) -> None:
        """Run the held request again in a thread, with the same deadline."""
        conn.parked = conn.wake = None
        conn.state = BUSY
        conn.ticket = -1
        self.running += 1
        self._unwatch(conn)
        data = conn.pending
        future = self.tpool.submit(self._serve, conn, data, conn.framing.close)
        future.add_done_callback(lambda done: self.method_queue.defer(self._served, conn, done))

    def _read_while_waiting(self, conn: Conn) -> None:
        """A waiting connection is readable: the client left (closed), or pipelines its
        next request (kept for after the reply, up to _WAITING_BUF_MAX)."""
        data = self._recv(conn, _RECV_SIZE)
        if data is None:
            return
        if not data or len(conn.buf) + len(data) > _WAITING_BUF_MAX:
            self._close(conn)
            return
        conn.buf += data
        self._hold(conn, len(data))

    def _reply_and_close(self, conn: Conn, reply: bytes) -> None:
        self._send(conn, [reply], keep=False)

    def _send(self, conn: Conn, chunks: list[bytes], keep: bool) -> None:
        conn.state = WRITING
        conn.keep = keep
        conn.out = [memoryview(chunk) for chunk in chunks if chunk]
        conn.out_index = 0
        conn.writing_since = time.monotonic()
        self._hold(conn, sum(len(view) for view in conn.out))
        self._schedule(conn, time.monotonic() + self.write_timeout)
        self._write(conn)

    def _write(self, conn: Conn) -> None:
        out = conn.out
        while conn.out_index < len(out):
            try:
                sent = conn.sock.sendmsg(out[conn.out_index : conn.out_index + _IOV_MAX])
            except (BlockingIOError, InterruptedError):
                self._watch(conn, selectors.EVENT_WRITE)
                return
            except OSError:
                self._close(conn)
                return
            self._hold(conn, -sent)
            while sent:
                view = out[conn.out_index]
                if sent >= len(view):
                    sent -= len(view)
                    conn.out_index += 1
                else:
                    out[conn.out_index] = view[sent:]
                    sent = 0
        conn.out = _NO_OUT
        self._replied(conn)

    def _replied(self, conn: Conn) -> None:
        if not conn.keep:
            refusals = self._refusals(conn) if conn.buf else []
            if refusals:
                self._send(conn, refusals, keep=False)
            else:
                self._linger(conn)
            return
        conn.state = READING
        if conn.buf:
            # The client sent its next request already (pipelining): it is read on.
            self._schedule(conn, time.monotonic() + self.read_timeout)
            self._frame(conn)
            return
        conn.idle = True
        self.silent[conn] = None
        wait = self.keepalive_timeout if self.alive else _STOP_LINGER_SECONDS
        self._schedule(conn, time.monotonic() + min(wait, self.keepalive_timeout))
        self._watch(conn, selectors.EVENT_READ)

    def _refusals(self, conn: Conn) -> list[bytes]:
        """503s, with Retry-After, for the complete requests the client pipelined behind one
        whose reply closes the connection: none of them was run, and a client cannot tell
        that of a POST from silence. What is buffered is dropped (the connection closes)."""
        assert self.limits is not None
        buf, replies = conn.buf, list[bytes]()
        error = Unavailable("the connection closed before this pipelined request; it was not run")
        while buf and len(replies) < _REFUSALS_MAX:
            framing = Framing(self.limits)
            if framing.feed(buf) != READY or framing.close:
                break  # incomplete, or framed by gunicorn's parser alone: not answered
            replies.append(envelope(error, _request_id(None, bytes(buf[: framing.head_end]))))
            buf = buf[framing.end :]
        self._hold(conn, -len(conn.buf))
        conn.buf = bytearray()
        return replies

    def _linger(self, conn: Conn) -> None:
        """Close after a last reply as RFC 9112 9.6 says: half-close, read what the client
        still sends (dropped) until it closes too, then close."""
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(conn)
            return
        conn.state = LINGERING
        self._hold(conn, -len(conn.buf))
        conn.buf = bytearray()
        self._schedule(conn, time.monotonic() + _LINGER_SECONDS)
        self._drain(conn)

    def _drain(self, conn: Conn) -> None:
        data = self._recv(conn, _RECV_SIZE)
        if data is None:
            return
        conn.lingered += len(data)
        if not data or conn.lingered > _LINGER_BYTES:
            self._close(conn)
        else:
            self._watch(conn, selectors.EVENT_READ)

    # --- in a thread: one complete request ------------------------------------------------

    def _serve(self, conn: Conn, data: bytes, close: bool) -> tuple[list[bytes], bool]:
        """Parse the buffered request with gunicorn's parser, run the app, return the reply
        (and whether the connection stays open). Never touches the socket."""
        out = _Capture()
        req = None
        try:
            # A request the framing handed over unframed (malformed, or a head over the
            # limits) is given in socket-sized pieces, as gunicorn reads a socket: its parser
            # checks the head's size after each read, so a head over the limits is its 431,
            # not the 400 of one read that ended before the head did.
            pieces = _pieces(data) if close else [data]
            req = next(RequestParser(self.cfg, pieces, conn.client))
            _framing_rules(req)
            if isinstance(req.body.reader, ChunkedReader):
                # All of it is here: reading it now makes a bad chunk gunicorn's 400, before
                # the app, instead of an error inside the app.
                body = req.body.read()
                req.body = Body(LengthReader(IterUnreader([body]), len(body)))
            req._expected_100_continue = False  # answered by the main loop, if at all
            keep = self._handle_request(req, conn, out, close)
            return out.chunks, keep
        except (Exception, SystemExit) as exc:
            # Nothing was sent yet (the reply is in memory): the error replaces it whole.
            out = _Capture(data)
            self.handle_error(req, out, conn.client, exc)
            return out.chunks, False

    def _handle_request(self, req: Any, conn: Conn, out: _Capture, close: bool) -> bool:
        environ: dict[str, Any] = {}
        resp = None
        try:
            self.cfg.pre_request(self, req)
            started = datetime.now()
            resp, environ = wsgi.create(req, out, conn.client, conn.server, self.cfg)
            environ["wsgi.multithread"] = True
            environ[CAN_PARK] = True
            if conn.wait_until:
                environ[WAIT_UNTIL] = conn.wait_until
            if conn.settled is not None:
                environ[SETTLED] = conn.settled
            conn.environ = environ
            self.nr += 1
            if self.nr >= self.max_requests:
                if self.alive:
                    self.log.info("Autorestarting worker after current request.")
                    self.alive = False
                resp.force_close()
            if close or not self.alive:
                resp.force_close()
            elif self.running > self.cfg.threads and not conn.buf:
                # Requests wait for this worker's threads: the client reconnects, to whichever
                # worker has one free (a busy worker accepts none), instead of waiting here.
                # Not while it has pipelined requests buffered: those are served here.
                resp.force_close()
            respiter = self.wsgi(environ, resp.start_response)
            parked = environ.get(PARKED)
            if parked is not None:
                conn.parked = parked  # held by the main loop (_park), no reply yet
                return True
            try:
                for item in respiter:
                    resp.write(item)
                resp.close()
            finally:
                if self._gunicorn_access:
                    self.log.access(resp, req, environ, datetime.now() - started)
                if hasattr(respiter, "close"):
                    respiter.close()
            return not resp.should_close()
        finally:
            try:
                self.cfg.post_request(self, req, environ, resp)
            except Exception:
                self.log.exception("Exception in post_request hook")

    def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        """gunicorn's error replies, as the service's envelope instead of HTML."""
        error = exc if isinstance(exc, TimelineError) else http_error(exc, self.cfg)
        if error is not None:
            ip = addr[0] if isinstance(addr, tuple) else addr
            self.log.warning("Invalid request from ip=%s: %s", ip, _quote(exc))
        else:
            # Anything else escaping the app: whether it did its work is unknown, so the
            # client is told to retry (safe with a client_msg_id), never that it failed.
            if getattr(req, "uri", None) is not None:
                self.log.exception("Error handling request %s %s", req.method, req.uri)
            else:
                self.log.exception("Error handling request (no URI read)")
            error = Unavailable("the request was interrupted before it completed; retry it")
        try:
            client.sendall(envelope(error, _request_id(req, getattr(client, "raw", b""))))
        except Exception:
            self.log.debug("Failed to send error message.")

    def handle_abort(self, sig: int, frame: Any) -> None:
        """SIGABRT (gunicorn's worker timeout): every request in a thread or partly read is
        answered 503 before the worker exits; a reply already on its way is cut off."""
        error = Unavailable("the worker serving this request was stopped; retry it")
        for conn in list(self.conns):
            if conn.state in (BUSY, WAITING) or (conn.state == READING and conn.buf):
                environ = conn.environ
                request_id = environ.get(REQUEST_ID) if environ else None
                with contextlib.suppress(OSError):
                    conn.sock.send(envelope(error, request_id or os.urandom(16).hex()))
            self._close(conn, reset=conn.state == WRITING)
        sys.stderr.flush()
        super().handle_abort(sig, frame)
