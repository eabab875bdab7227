"""The compose stack's reverse proxy, configs/nginx.conf: the compose file publishes it alone,
its limits and timeouts agree with the service's, and a real nginx running it in front of a
real gunicorn is driven over real sockets.

nginx runs the shipped file with these changes only, each checked to apply exactly once: the
upstream address (gunicorn on a free port instead of `timeline:8000`), the listen address, and
temporary directories of the test's own; a test that needs a timeout short enough to wait for
says which. Without an nginx binary those tests skip, saying so (Debian: `apt-get install -y
nginx`; .ci/run installs it when it can).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from gunicorn.config import Config as GunicornConfig

from support import free_port, readable
from test_deploy import load_gunicorn_conf
from test_e2e import Service, service_env
from timeline.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
NGINX_CONF = ROOT / "configs" / "nginx.conf"
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]

LIMIT = Settings().body_max_bytes
GENERATED_ID = re.compile(r"[0-9a-f]{32}")  # nginx's $request_id


def nginx_binary() -> str | None:
    """nginx on PATH, or where packages put it (/usr/sbin is not on every user's PATH)."""
    found = shutil.which("nginx")
    if found:
        return found
    for candidate in ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


NGINX = nginx_binary()
needs_nginx = pytest.mark.skipif(
    NGINX is None,
    reason="no nginx binary (PATH, /usr/sbin): the proxy's tests run a real one; "
    "install it with `apt-get install -y nginx` (.ci/run does when it can)",
)


# --- The shipped file, read as nginx reads it (enough of it) ------------------------------


def directives(name: str) -> list[str]:
    """The arguments of every `name ...;` line of configs/nginx.conf, comments left out."""
    found = []
    for line in NGINX_CONF.read_text().splitlines():
        match = re.fullmatch(rf"\s*{re.escape(name)}\s+(.+);\s*", line)
        if match:
            found.append(match.group(1))
    return found


def directive(name: str) -> str:
    [value] = directives(name)
    return value


def size(value: str) -> int:
    """nginx's sizes: 4m, 64k, 1024."""
    units = {"k": 1024, "m": 1024 * 1024}
    if value[-1].lower() in units:
        return int(value[:-1]) * units[value[-1].lower()]
    return int(value)


def seconds(value: str) -> float:
    """nginx's times: 10s, 500ms, 1m (a bare number is seconds)."""
    match = re.fullmatch(r"(\d+)(ms|s|m)?", value)
    assert match, value
    number, unit = int(match.group(1)), match.group(2) or "s"
    return number * {"ms": 0.001, "s": 1, "m": 60}[unit]


# --- No nginx needed: the compose file and the config's numbers ---------------------------


def test_compose_publishes_http_through_the_proxy_alone() -> None:
    published = {name for name, service in SERVICES.items() if service.get("ports")}
    assert published == {"proxy", "timeline"}
    proxy, timeline = SERVICES["proxy"], SERVICES["timeline"]
    # timeline publishes gRPC only, on go-timeline's host port (nginx.conf proxies HTTP).
    assert timeline["ports"] == ["9322:9000"]
    # go-timeline's mapping, now nginx's: the host port clients know did not change.
    assert proxy["ports"] == ["9321:8000"]
    assert re.fullmatch(r"nginx:1\.\d+(-alpine)?", proxy["image"])
    assert "./configs/nginx.conf:/etc/nginx/nginx.conf:ro" in proxy["volumes"]
    # The container port published is the one nginx listens on.
    assert directive("listen") == "8000 default_server"
    # gunicorn is reached over the compose network only, on the port its image binds.
    assert timeline.get("expose", ["8000"]) == ["8000"]
    assert re.search(r"^\s*PORT=8000\b", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert directives("server") == ["timeline:8000"]
    assert set(proxy["networks"]) == set(timeline["networks"])
    # The proxy starts once gunicorn answers, and again whenever compose recreates it (nginx
    # resolves the upstream's address when it starts).
    assert proxy["depends_on"] == {"timeline": {"condition": "service_healthy", "restart": True}}
    check = " ".join(proxy["healthcheck"]["test"])
    assert "http://127.0.0.1:8000/healthz" in check
    assert proxy["restart"] == "unless-stopped"


def test_the_proxy_limits_and_timeouts_agree_with_the_service(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # What the image runs with: configs/timeline.yaml, and no TIMELINE_* variable of the
    # compose file overriding a setting the proxy mirrors.
    settings = load_settings(environ={}, config_path=ROOT / "configs" / "timeline.yaml")
    mirrored = {
        "body_max_bytes",
        "http_read_timeout_ms",
        "http_write_timeout_ms",
        "http_keepalive_ms",
    }
    overridden = {
        name.lower().removeprefix("timeline_") for name in SERVICES["timeline"]["environment"]
    }
    assert not overridden & mirrored
    conf = load_gunicorn_conf(monkeypatch, tmp_path)
    # The body limit is the service's, to the byte (and nginx lets exactly that through).
    assert size(directive("client_max_body_size")) == settings.body_max_bytes
    # The client-facing timeouts are the service's own HTTP timeouts.
    assert seconds(directive("client_header_timeout")) * 1000 == settings.http_read_timeout_ms
    assert seconds(directive("client_body_timeout")) * 1000 == settings.http_read_timeout_ms
    assert seconds(directive("send_timeout")) * 1000 == settings.http_write_timeout_ms
    # nginx drops an idle upstream connection before gunicorn would.
    upstream = re.search(r"\n    upstream timeline \{(.*?)\n    \}", NGINX_CONF.read_text(), re.S)
    assert upstream
    [upstream_idle] = re.findall(r"keepalive_timeout (\w+);", upstream.group(1))
    gunicorn_idle_ms = min(settings.http_keepalive_ms, conf.keepalive * 1000)
    assert seconds(upstream_idle) * 1000 < gunicorn_idle_ms
    # nginx never gives up on a request the service may still complete: a sync held on
    # wait_ms (at most sync_wait_max_ms, then read once more) is held for its whole wait.
    assert seconds(directive("proxy_read_timeout")) > conf.timeout
    wait_s = settings.sync_wait_max_ms / 1000
    assert seconds(directive("proxy_read_timeout")) >= wait_s + settings.request_deadline_ms / 1000
    # Each held sync is two connections in nginx (the client's, gunicorn's): room for
    # thousands per worker, each connection a descriptor.
    assert int(directive("worker_connections")) // 2 >= 10_000
    assert int(directive("worker_rlimit_nofile")) >= 2 * int(directive("worker_connections"))
    # A request line nginx lets through is one gunicorn accepts (4 KiB buffers hold 4,094
    # bytes and the CRLF): longer ones get nginx's envelope, not gunicorn's HTML.
    count, buffer = directive("large_client_header_buffers").split()
    limit_request_line = getattr(conf, "limit_request_line", GunicornConfig().limit_request_line)
    assert size(buffer) - 2 == limit_request_line
    assert int(count) * size(buffer) >= 16 * 1024  # room for a bearer token and the rest
    # Buffered both ways, the service's own errors untouched, HTTP/1.1 kept alive upstream.
    assert directive("proxy_request_buffering") == "on"
    assert directive("proxy_buffering") == "on"
    assert directive("proxy_intercept_errors") == "off"
    assert directive("proxy_http_version") == "1.1"
    assert 'Connection ""' in directives("proxy_set_header")
    assert int(directive("keepalive")) > 0


EXPECTED_ERRORS = {
    400: "TIMELINE_INVALID_PARAM",
    404: "TIMELINE_NOT_FOUND",
    408: "TIMELINE_REQUEST_TIMEOUT",
    413: "TIMELINE_PAYLOAD_TOO_LARGE",
    414: "TIMELINE_URI_TOO_LONG",
    431: "TIMELINE_HEADERS_TOO_LARGE",
    500: "TIMELINE_INTERNAL",
    502: "TIMELINE_UNAVAILABLE",
    503: "TIMELINE_UNAVAILABLE",
    504: "TIMELINE_UNAVAILABLE",
}


def test_every_error_nginx_writes_is_an_envelope() -> None:
    """Each code nginx may answer with has an error page; each page is the envelope, with
    the code it is sent with, also those no test provokes (nginx closes a timed-out connection
    without writing its 408; a 500 needs nginx itself to fail)."""
    text = NGINX_CONF.read_text()
    pages: dict[int, tuple[int, str]] = {}  # code: (status sent, location)
    for line in directives("error_page"):
        *codes, target = line.split()
        sent = None
        if codes[-1].startswith("="):
            sent = int(codes.pop()[1:])
        for code in codes:
            pages[int(code)] = (sent or int(code), target)
    # 494: nginx's own code for headers too large, sent as 431.
    assert set(pages) == set(EXPECTED_ERRORS) - {431} | {494}
    for code, (status, target) in pages.items():
        block = re.search(rf"location = {re.escape(target)} \{{(.*?)\n        \}}", text, re.S)
        assert block, target
        assert "internal;" in block.group(1)
        [body] = re.findall(r"return \d+ '(.*)';", block.group(1))
        envelope = json.loads(body.replace("$status", str(status)))
        assert envelope["code"] == status, code
        assert envelope["reason"] == EXPECTED_ERRORS[status], code
        assert envelope["message"]
        assert isinstance(envelope["metadata"], dict)
        if status in (502, 503, 504):
            assert "add_header Retry-After 1 always;" in block.group(1)
        if "add_header" in block.group(1):  # it replaces the server's: the id must be repeated
            assert "add_header X-Request-ID $timeline_request_id always;" in block.group(1)


# --- A real nginx in front of a real gunicorn ---------------------------------------------


class Nginx:
    """configs/nginx.conf run by a real nginx, in the foreground, in a directory of its own."""

    def __init__(self, directory: Path, upstream_port: int, **changes: str) -> None:
        self.directory = directory
        self.port = free_port()
        self.upstream_port = upstream_port
        self.changes = changes
        self.access_log = directory / "access.log"  # nginx's stdout (access_log /dev/stdout)
        self.error_log = directory / "error.log"  # its stderr (error_log stderr)
        self.process: subprocess.Popen[bytes] | None = None

    def render(self, *, listen: bool = True) -> Path:
        replacements = {"server timeline:8000;": f"server 127.0.0.1:{self.upstream_port};"}
        if listen:
            replacements["listen 8000 default_server;"] = (
                f"listen 127.0.0.1:{self.port} default_server;"
            )
        temp = "".join(
            f"    {kind}_temp_path {self.directory / kind};\n"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        replacements["http {\n"] = "http {\n" + temp
        replacements.update(self.changes)
        text = NGINX_CONF.read_text()
        for old, new in replacements.items():
            assert text.count(old) == 1, f"configs/nginx.conf should hold {old!r} once"
            text = text.replace(old, new)
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / "nginx.conf"
        path.write_text(text)
        return path

    def command(self, config: Path, *main: str) -> list[str]:
        """nginx on `config`, its pid file here, with these main-context directives."""
        assert NGINX is not None
        directives = [f"pid {self.directory / 'nginx.pid'};", *main]
        if os.geteuid() == 0:
            # Workers would run as nobody, who cannot enter pytest's private directories.
            directives.append("user root;")
        # One -g: nginx keeps only the last one given.
        return [NGINX, "-p", str(self.directory), "-c", str(config), "-g", " ".join(directives)]

    def start(self) -> Nginx:
        command = self.command(self.render(), "daemon off;")  # in the foreground, a child
        with self.access_log.open("ab") as out, self.error_log.open("ab") as err:
            self.process = subprocess.Popen(command, stdout=out, stderr=err)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    log = self.error_log.read_text()
                    raise RuntimeError(f"nginx did not start:\n{log}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGTERM)  # fast shutdown, workers included
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
            self.process = None

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, http.client.HTTPMessage, bytes]:
        return fetch(self.port, method, path, body, headers)

    def raw(self, data: bytes, method: str = "GET") -> tuple[int, http.client.HTTPMessage, bytes]:
        """Bytes as they are, for requests http.client would not send; the reply parsed."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=30) as sock:
            sock.sendall(data)
            reply = http.client.HTTPResponse(sock, method=method)
            reply.begin()
            return reply.status, reply.headers, reply.read()


def fetch(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, http.client.HTTPMessage, bytes]:
    """One request on a connection of its own: status, headers and body as they came."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        reply = connection.getresponse()
        return reply.status, reply.headers, reply.read()
    finally:
        connection.close()


def json_lines(path: Path) -> list[dict[str, Any]]:
    lines = []
    for line in path.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):  # not JSON, or the last line half written
            lines.append(json.loads(line))
    return [line for line in lines if isinstance(line, dict)]


def logged(path: Path, request_id: str, logger: str, timeout: float = 5.0) -> dict[str, Any]:
    """The access line of `logger` carrying this request id (lines are written at the end)."""
    deadline = time.monotonic() + timeout
    while True:
        found = [
            line
            for line in json_lines(path)
            if line.get("logger") == logger and line.get("request_id") == request_id
        ]
        if found or time.monotonic() > deadline:
            assert len(found) == 1, f"{logger} lines with request_id {request_id}: {found}"
            return found[0]
        time.sleep(0.05)


def never_logged(path: Path, request_id: str) -> bool:
    time.sleep(0.3)  # a line the service were writing would be there by now
    return all(line.get("request_id") != request_id for line in json_lines(path))


def envelope(
    reply: tuple[int, http.client.HTTPMessage, bytes], code: int, reason: str
) -> dict[str, Any]:
    """Assert an error reply is go-timeline's envelope, with an X-Request-ID; return it."""
    status, headers, body = reply
    assert status == code, body
    assert headers["Content-Type"] == "application/json"
    error = json.loads(body)
    assert error["code"] == code
    assert error["reason"] == reason
    assert isinstance(error["message"], str)
    assert error["message"]
    assert isinstance(error["metadata"], dict)
    assert headers["X-Request-ID"]
    return error


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[Service]:
    """One gunicorn for the tests that leave it running (each uses users of its own)."""
    directory = tmp_path_factory.mktemp("proxied")
    env = service_env(directory, redis_url, f"test:{uuid.uuid4().hex[:12]}:")
    running = Service(env, directory / "gunicorn.log").start()
    yield running
    running.stop()


@pytest.fixture
def nginx_factory(tmp_path: Path) -> Iterator[Callable[..., Nginx]]:
    started: list[Nginx] = []

    def make(upstream_port: int, **changes: str) -> Nginx:
        proxy = Nginx(tmp_path / f"nginx-{len(started)}", upstream_port, **changes)
        started.append(proxy)
        return proxy.start()

    yield make
    for proxy in started:
        proxy.stop()


@pytest.fixture
def nginx(service: Service, nginx_factory: Callable[..., Nginx]) -> Nginx:
    """The shipped config, as it is, in front of the module's gunicorn."""
    return nginx_factory(service.port)


def user() -> str:
    return f"u{uuid.uuid4().hex[:10]}"


@needs_nginx
def test_nginx_accepts_the_shipped_config(tmp_path: Path) -> None:
    # `nginx -t` on the file as shipped, listen included; only `timeline` (a compose network
    # name) is given an address this machine resolves.
    proxy = Nginx(tmp_path / "check", 8000)
    config = proxy.render(listen=False)
    done = subprocess.run(
        [*proxy.command(config), "-t"], capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "syntax is ok" in done.stderr
    assert "test is successful" in done.stderr


@needs_nginx
@pytest.mark.e2e
def test_requests_go_through_and_the_service_errors_pass_unchanged(
    service: Service, nginx: Nginx
) -> None:
    a, b = user(), user()
    body = json.dumps({"from": a, "to": b, "message": {"text": "hi"}}).encode()
    status, _, reply = nginx.request("POST", "/timeline/send", body)
    assert (status, json.loads(reply)) == (200, {"sequence": "1"})

    # Two requests on one kept-alive client connection.
    connection = http.client.HTTPConnection("127.0.0.1", nginx.port, timeout=10)
    for _ in range(2):
        connection.request("GET", f"/timeline/sync?member={b}&last_read=0")
        answer = connection.getresponse()
        sync = json.loads(answer.read())
        assert answer.status == 200
        assert [json.loads(e["message"]) for e in sync["entrySet"]] == [{"text": "hi"}]
        assert sync["latestSeq"] == "1"
    connection.close()

    # The service's own errors are its own, byte for byte, not replaced by nginx's pages.
    bad = json.dumps({"from": "a:x", "to": b, "message": "{}"}).encode()
    through = nginx.request("POST", "/timeline/send", bad)
    direct = fetch(service.port, "POST", "/timeline/send", bad)
    assert envelope(through, 400, "TIMELINE_INVALID_PARAM")["metadata"] == {"field": "from"}
    assert through[2] == direct[2]
    missing = envelope(nginx.request("GET", "/timeline/unknown"), 404, "TIMELINE_NOT_FOUND")
    assert missing["message"] == "no route GET /timeline/unknown"
    # The error pages themselves cannot be asked for.
    page = envelope(nginx.request("GET", "/.errors/413"), 404, "TIMELINE_NOT_FOUND")
    assert page["message"] == "no such route"


@needs_nginx
@pytest.mark.e2e
def test_the_request_id_is_kept_or_made_and_both_logs_carry_it(
    service: Service, nginx: Nginx
) -> None:
    path = f"/timeline/sync?member={user()}"
    # Given: kept, sent upstream, echoed once.
    status, headers, _ = nginx.request("GET", path, headers={"X-Request-ID": "proxy-req-42"})
    assert status == 200
    assert headers.get_all("X-Request-ID") == ["proxy-req-42"]
    assert logged(service.log, "proxy-req-42", "timeline.access")["path"] == "/timeline/sync"
    line = logged(nginx.access_log, "proxy-req-42", "nginx.access")
    assert (line["method"], line["path"], line["status"]) == ("GET", "/timeline/sync", 200)

    # Absent, or one the service would not keep: nginx's own, the same on both sides.
    for given in ({}, {"X-Request-ID": "not valid!"}, {"X-Request-ID": "x" * 129}):
        status, headers, _ = nginx.request("GET", path, headers=given)
        assert status == 200
        [made] = headers.get_all("X-Request-ID")
        assert GENERATED_ID.fullmatch(made), made
        assert logged(service.log, made, "timeline.access")["status"] == 200
        assert logged(nginx.access_log, made, "nginx.access")["upstream_status"] == "200"

    # nginx's own error replies carry it too, and its log says what the client sent.
    reply = nginx.request(
        "POST",
        "/timeline/send",
        b"{}",
        headers={"X-Request-ID": "huge-header", "X-Pad": "p" * 5000},
    )
    envelope(reply, 431, "TIMELINE_HEADERS_TOO_LARGE")
    assert reply[1].get_all("X-Request-ID") == ["huge-header"]
    line = logged(nginx.access_log, "huge-header", "nginx.access")
    assert (line["method"], line["path"], line["status"]) == ("POST", "/timeline/send", 431)
    assert never_logged(service.log, "huge-header")


def chunked(data: bytes, piece: int = 65_536) -> Iterator[bytes]:
    for start in range(0, len(data), piece):
        yield data[start : start + piece]


@needs_nginx
@pytest.mark.e2e
def test_the_body_limit_is_the_service_s_own(service: Service, nginx: Nginx) -> None:
    a, b = user(), user()
    valid = json.dumps({"from": a, "to": b, "message": {"n": 1}}).encode()
    exactly = valid + b" " * (LIMIT - len(valid))  # JSON allows the padding
    assert len(exactly) == 4 * 1024 * 1024

    # Exactly 4 MiB: through nginx to the service, which stores it.
    status, _, reply = nginx.request(
        "POST", "/timeline/send", exactly, headers={"X-Request-ID": "exact-4mib"}
    )
    assert (status, json.loads(reply)) == (200, {"sequence": "1"})
    assert logged(service.log, "exact-4mib", "timeline.access")["status"] == 200

    # Chunked, exactly 4 MiB: nginx gathers it and hands it on whole, with its length, and
    # the service takes it as it takes the declared one.
    connection = http.client.HTTPConnection("127.0.0.1", nginx.port, timeout=30)
    connection.request("POST", "/timeline/send", body=chunked(exactly), encode_chunked=True)
    answer = connection.getresponse()
    assert (answer.status, json.loads(answer.read())) == (200, {"sequence": "2"})
    connection.close()

    # One byte more, declared: nginx's 413, before the body is sent or the service sees it.
    head = (
        "POST /timeline/send HTTP/1.1\r\nHost: proxy\r\nX-Request-ID: over-4mib\r\n"
        f"Content-Length: {LIMIT + 1}\r\n\r\n"
    )
    error = envelope(nginx.raw(head.encode(), "POST"), 413, "TIMELINE_PAYLOAD_TOO_LARGE")
    assert error["metadata"] == {"limit": str(LIMIT)}
    assert never_logged(service.log, "over-4mib")

    # One byte more, chunked: nginx counts as it reads.
    connection = http.client.HTTPConnection("127.0.0.1", nginx.port, timeout=30)
    connection.request(
        "POST",
        "/timeline/send",
        body=chunked(exactly + b" "),
        headers={"X-Request-ID": "over-4mib-chunked"},
        encode_chunked=True,
    )
    answer = connection.getresponse()
    over = (answer.status, answer.headers, answer.read())
    connection.close()
    envelope(over, 413, "TIMELINE_PAYLOAD_TOO_LARGE")
    assert never_logged(service.log, "over-4mib-chunked")

    status, _, reply = nginx.request("GET", f"/timeline/sync?member={b}")
    assert [e["sequence"] for e in json.loads(reply)["entrySet"]] == ["1", "2"]


@needs_nginx
@pytest.mark.e2e
def test_long_lines_large_headers_and_malformed_requests_get_envelopes(
    service: Service, nginx: Nginx
) -> None:
    member = user()

    def line_of(length: int) -> str:
        """A request line of exactly `length` bytes (CRLF aside)."""
        path = f"/timeline/sync?member={member}&pad="
        return path + "x" * (length - len(f"GET {path} HTTP/1.1"))

    # The longest request line nginx lets through is the longest gunicorn takes.
    limit = GunicornConfig().limit_request_line
    status, _, reply = nginx.request("GET", line_of(limit))
    assert status == 200
    assert json.loads(reply)["latestSeq"] == "0"
    error = envelope(nginx.request("GET", line_of(limit + 1)), 414, "TIMELINE_URI_TOO_LONG")
    assert error["metadata"] == {"limit": str(limit)}
    envelope(
        nginx.request("GET", "/timeline/sync?member=" + "a" * 5000), 414, "TIMELINE_URI_TOO_LONG"
    )

    # One huge header, or many large ones.
    huge = nginx.request("GET", "/healthz", headers={"X-Huge": "h" * 5000})
    envelope(huge, 431, "TIMELINE_HEADERS_TOO_LARGE")
    many = nginx.request("GET", "/healthz", headers={f"X-Big-{i}": "b" * 3000 for i in range(8)})
    envelope(many, 431, "TIMELINE_HEADERS_TOO_LARGE")
    # ... while a 4,000-byte header (a long token, say) passes.
    status, _, _ = nginx.request("GET", "/healthz", headers={"X-Fine": "f" * 4000})
    assert status == 200

    # Malformed: HTTP/1.1 without Host, and no HTTP at all.
    envelope(nginx.raw(b"GET /healthz HTTP/1.1\r\n\r\n"), 400, "TIMELINE_INVALID_PARAM")
    envelope(nginx.raw(b"HELLO\r\n\r\n"), 400, "TIMELINE_INVALID_PARAM")


def closed_after(sock: socket.socket, dribble: bytes = b"", every: float = 0.2) -> float:
    """Seconds until nginx closes the connection (EOF or reset), sending `dribble` a byte at a
    time meanwhile; nothing nginx sends before that may be a reply."""
    started = time.monotonic()
    sent = 0
    while time.monotonic() - started < 15:
        try:
            if sent < len(dribble):
                sock.sendall(dribble[sent : sent + 1])
                sent += 1
            if readable(sock, every):
                data = sock.recv(65_536)
                assert not data, f"nginx answered instead of closing: {data[:200]!r}"
                return time.monotonic() - started
        except (ConnectionResetError, BrokenPipeError):
            return time.monotonic() - started
    raise AssertionError("nginx kept the connection open")


def gunicorn_connections(port: int) -> set[tuple[str, int]]:
    """The peers of the TCP connections established to gunicorn's port (nginx's ends)."""
    return {
        (connection.raddr.ip, connection.raddr.port)
        for connection in psutil.net_connections(kind="tcp")
        if connection.laddr
        and connection.laddr.port == port
        and connection.raddr
        and connection.status == psutil.CONN_ESTABLISHED
    }


@needs_nginx
@pytest.mark.e2e
@pytest.mark.slow
def test_slow_clients_are_cut_off_and_never_reach_gunicorn(
    service: Service, nginx: Nginx, nginx_factory: Callable[..., Nginx]
) -> None:
    # With the shipped timeouts (10 s): clients stuck halfway through their bodies are
    # nginx's alone; not one connection to gunicorn is opened for them, others are served
    # meanwhile, and a body that does come whole reaches the service whole.
    a, b = user(), user()
    body = json.dumps({"from": a, "to": b, "message": {"n": 1}}).encode()
    before = gunicorn_connections(service.port)
    stuck = []
    for i in range(8):
        sock = socket.create_connection(("127.0.0.1", nginx.port), timeout=10)
        sock.sendall(
            b"POST /timeline/send HTTP/1.1\r\nHost: proxy\r\nX-Request-ID: stuck-%d\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (i, len(body), body[:10])
        )
        stuck.append(sock)
    try:
        time.sleep(0.5)
        assert gunicorn_connections(service.port) - before == set()
        started = time.monotonic()
        status, _, _ = nginx.request("GET", f"/timeline/sync?member={user()}")
        assert status == 200
        assert time.monotonic() - started < 5  # not held until the stuck bodies time out (10 s)
        stuck[0].sendall(body[10:])
        reply = http.client.HTTPResponse(stuck[0], method="POST")
        reply.begin()
        assert (reply.status, json.loads(reply.read())) == (200, {"sequence": "1"})
        assert logged(service.log, "stuck-0", "timeline.access")["status"] == 200
    finally:
        for sock in stuck:
            sock.close()

    # With 1 s timeouts, to wait for them: each slow client is closed, without a reply, after
    # about that long (asserted generously), and the service never sees its request.
    quick = nginx_factory(
        service.port,
        **{
            "client_header_timeout 10s;": "client_header_timeout 1s;",
            "client_body_timeout 10s;": "client_body_timeout 1s;",
        },
    )
    address = ("127.0.0.1", quick.port)
    with socket.create_connection(address) as sock:  # connects, sends nothing
        assert 0.8 < closed_after(sock) < 5
    with socket.create_connection(address) as sock:  # a header dribbled a byte at a time
        header = b"GET /healthz HTTP/1.1\r\nHost: proxy\r\nX-Request-ID: dribbled\r\nX-Slow: "
        assert 0.8 < closed_after(sock, header + b"z" * 200) < 5
    with socket.create_connection(address) as sock:  # a body that stops halfway
        sock.sendall(
            b"POST /timeline/send HTTP/1.1\r\nHost: proxy\r\nX-Request-ID: half-body\r\n"
            b'Content-Length: 100\r\n\r\n{"from":'
        )
        assert 0.8 < closed_after(sock) < 5
    for request_id in ("dribbled", "half-body", *(f"stuck-{i}" for i in range(1, 8))):
        assert never_logged(service.log, request_id)
    assert logged(quick.access_log, "half-body", "nginx.access")["status"] == 408


@needs_nginx
@pytest.mark.e2e
def test_connections_to_gunicorn_are_kept_alive(
    service: Service, nginx_factory: Callable[..., Nginx]
) -> None:
    # A fresh nginx, one client connection (one nginx worker), requests one after the other:
    # they all travel on one connection to gunicorn, still open between them.
    nginx = nginx_factory(service.port)
    before = gunicorn_connections(service.port)
    client = http.client.HTTPConnection("127.0.0.1", nginx.port, timeout=10)
    seen: set[tuple[str, int]] = set()
    for i in range(10):
        method, path = ("POST", "/timeline/send") if i % 2 else ("GET", "/healthz")
        body = json.dumps({"from": user(), "to": user(), "message": "{}"}).encode()
        client.request(method, path, body=body if method == "POST" else None)
        answer = client.getresponse()
        answer.read()
        assert answer.status == 200
        seen |= gunicorn_connections(service.port) - before
    client.close()
    assert len(seen) == 1, seen


def answered(connection: http.client.HTTPConnection) -> bool:
    """Whether a byte of the reply to the request sent on `connection` has come."""
    assert connection.sock is not None
    return readable(connection.sock, 0)


def messages(body: bytes) -> list[Any]:
    return [json.loads(entry["message"]) for entry in json.loads(body)["entrySet"]]


@needs_nginx
@pytest.mark.e2e
@pytest.mark.slow
def test_a_sync_that_waits_is_held_through_the_proxy(
    service: Service, nginx: Nginx, nginx_factory: Callable[..., Nginx]
) -> None:
    a, b = user(), user()
    # Given a sync of b that may wait 3 s for its next message, through nginx,
    held = http.client.HTTPConnection("127.0.0.1", nginx.port, timeout=30)
    held.request("GET", f"/timeline/sync?member={b}&last_read=0&wait_ms=3000")
    time.sleep(1.0)
    assert not answered(held)  # held, by gunicorn and by nginx
    # when a's message to b is sent meanwhile (through nginx too),
    body = json.dumps({"from": a, "to": b, "message": {"text": "meanwhile"}}).encode()
    status, _, reply = nginx.request("POST", "/timeline/send", body)
    assert (status, json.loads(reply)) == (200, {"sequence": "1"})
    # then the held sync answers 200 with that message.
    answer = held.getresponse()
    assert answer.status == 200
    assert messages(answer.read()) == [{"text": "meanwhile"}]

    # A wait with nothing to wake it is held for all of its 3 s, then the normal empty page,
    # on the same kept-alive connection.
    started = time.monotonic()
    held.request("GET", f"/timeline/sync?member={b}&last_read=1&wait_ms=3000")
    answer = held.getresponse()
    assert (answer.status, messages(answer.read())) == (200, [])
    assert time.monotonic() - started >= 3.0
    held.close()

    # What the read timeout is for: a proxy that reads for less than the wait cuts it (504).
    short = nginx_factory(service.port, **{"proxy_read_timeout 35s;": "proxy_read_timeout 1s;"})
    cut = short.request("GET", f"/timeline/sync?member={b}&last_read=1&wait_ms=3000")
    unavailable(cut, 504)


def unavailable(reply: tuple[int, http.client.HTTPMessage, bytes], code: int) -> None:
    envelope(reply, code, "TIMELINE_UNAVAILABLE")
    assert reply[1]["Retry-After"] == "1"


@needs_nginx
@pytest.mark.e2e
@pytest.mark.slow
def test_gunicorn_hung_or_down_is_unavailable_with_retry_after(
    tmp_path: Path, redis_factory: Any, key_prefix: str, nginx_factory: Callable[..., Nginx]
) -> None:
    redis_server = redis_factory()
    env = service_env(tmp_path, redis_server.url, key_prefix)
    gunicorn = Service(env, tmp_path / "gunicorn.log").start()
    try:
        # A proxy read timeout short enough to wait for.
        nginx = nginx_factory(
            gunicorn.port, **{"proxy_read_timeout 35s;": "proxy_read_timeout 1s;"}
        )
        send = json.dumps({"from": "a", "to": "b", "message": "{}"}).encode()

        # The service's own 503 is its own: nginx's page does not replace it.
        redis_server.stop()
        error = envelope(nginx.request("GET", "/readyz"), 503, "TIMELINE_UNAVAILABLE")
        assert error["metadata"]["redis"] == "down"
        assert nginx.request("GET", "/healthz")[0] == 200

        # gunicorn hung (stopped, not dead): no reply within the read timeout is a 504.
        assert gunicorn.process is not None
        processes = [psutil.Process(gunicorn.process.pid)]
        processes += processes[0].children()
        for process in processes:
            process.suspend()
        try:
            started = time.monotonic()
            unavailable(nginx.request("GET", "/healthz"), 504)
            unavailable(nginx.request("POST", "/timeline/send", send), 504)
            assert time.monotonic() - started < 10
        finally:
            for process in processes:
                process.resume()

        # gunicorn gone: 502, GET or POST, with the request's id.
        gunicorn.stop()
        reply = nginx.request("GET", "/healthz", headers={"X-Request-ID": "while-down"})
        unavailable(reply, 502)
        assert reply[1]["X-Request-ID"] == "while-down"
        unavailable(nginx.request("POST", "/timeline/send", send), 502)
        assert "connect() failed" in nginx.error_log.read_text()
    finally:
        gunicorn.stop()
