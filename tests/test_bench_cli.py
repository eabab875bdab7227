"""timeline-bench's command line: what it prints, and its exit status, run or not."""

from __future__ import annotations

import random
import re
import socket
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from support import free_port, serving
from timeline.bench import cli
from timeline.bench.cli import EXIT_NO_MATPLOTLIB, latency_figure, main, plot
from timeline.bench.harness import Client, Result, Sample
from timeline.settings import Settings


@pytest.fixture
def url(settings: Settings) -> Iterator[str]:
    with serving(settings) as running:
        yield running


def pretend_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """The captured stderr says it is a terminal: where the progress bar would be drawn."""
    # In the test itself: capsys puts its own stream in sys.stderr only once the test runs.
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)


def args(url: str, *more: str) -> list[str]:
    return ["--url", url, "--scenario", "sendGroup", "--group-size", "3", *more]


def test_nothing_listening_is_one_line_and_a_failure(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    assert main(args(url, "--requests", "5")) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [f"timeline-bench: cannot reach {url}: Connection refused"]


def test_a_refused_preparation_is_one_line_and_a_failure(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    with serving(settings.replace(api_token="secret")) as url:
        assert main(args(url, "--requests", "5", "--token", "")) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == ["timeline-bench: preparing the sendGroup scenario failed: 401"]


def test_a_url_without_a_scheme_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(args("localhost:8000", "--requests", "5"))
    assert stopped.value.code == 2
    assert "--url must be http://host[:port]" in capsys.readouterr().err


def test_plot_without_matplotlib_stops_before_the_run(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Given a Python where matplotlib cannot be imported (None in sys.modules: an ImportError)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    started: list[str] = []
    monkeypatch.setattr(cli, "run", lambda *a, **k: started.append("run"))
    # When a run asks for a plot (of a service that is not even there)
    url = f"http://127.0.0.1:{free_port()}"
    status = main(args(url, "--requests", "5", "--plot", str(tmp_path / "out.png")))
    # Then it stops at once with its own status, says how to install it, and ran nothing
    assert status == EXIT_NO_MATPLOTLIB == 3
    assert started == []
    assert not (tmp_path / "out.png").exists()
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("timeline-bench: --plot needs matplotlib")
    assert "nothing was run" in err
    assert "make install" in err  # a checkout
    assert ".venv/bin/pip install -e '.[bench]'" in err  # a checkout, the extra alone
    assert "pip install 'timeline[bench]'" in err  # an installed package


def test_help_lists_every_exit_status(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(["--help"])
    assert stopped.value.code == 0
    epilog = capsys.readouterr().out.split("exit status:", 1)[1]
    assert [line.split()[0] for line in epilog.splitlines() if line[2:3].isdigit()] == [
        "0",
        "1",
        "2",
        "3",
    ]
    assert "matplotlib" in epilog


def slow_tail_result(fast: int = 9_990, slow: int = 10) -> Result:
    """A run whose latencies are 1-10 ms but for a few outliers up to 163 ms."""
    rng = random.Random(7)
    latencies = [rng.uniform(1.0, 10.0) for _ in range(fast)]
    latencies += [rng.uniform(100.0, 163.0) for _ in range(slow - 1)] + [163.0]
    samples = [Sample(i / 1000, latency, 200) for i, latency in enumerate(latencies)]
    return Result("send", 8, 10.0, samples, Counter(), 0.1)


def test_the_histogram_stops_at_p999_and_counts_what_lies_beyond(tmp_path: Path) -> None:
    # Given a run where 0.1% of the requests took 10-16 times longer than the rest
    result = slow_tail_result()
    p999 = result.percentile(0.999)
    assert p999 < 10.0 < 163.0 == max(s.latency_ms for s in result.samples)
    # When it is plotted
    figure = latency_figure(result)
    histogram = figure.axes[1]
    # Then the histogram's axis ends at p99.9, not at the maximum, and the plot says so
    assert histogram.get_xlim()[1] == pytest.approx(p999)
    assert "p99.9" in histogram.get_title()
    assert histogram.get_xlabel().splitlines() == [
        "latency (ms)",
        "10 of 10,000 requests beyond p99.9, not shown (max 163.00 ms)",
    ]
    # And its bars hold every request up to p99.9
    assert sum(bar.get_height() for bar in histogram.patches) == 9_990
    plot(result, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes().startswith(b"\x89PNG")


def test_quiet_hides_the_progress_bar_and_keeps_the_table(
    url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    pretend_a_terminal(monkeypatch)
    run = ("--requests", "20", "--concurrency", "1", "--verify", "--quiet")
    assert main(args(url, *run)) == 0
    out, err = capsys.readouterr()
    table = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in out.splitlines())
    assert table["scenario"] == "sendGroup (group of 3)"
    assert table["requests"] == "20"
    assert table["verify"] == "ok (4 timelines)"  # the group's history and 3 members
    assert "requests/s" in table
    assert "\r[" not in err  # no bar


def test_without_quiet_a_terminal_gets_the_bar_too(
    url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    pretend_a_terminal(monkeypatch)
    assert main(args(url, "--duration", "0.5")) == 0
    out, err = capsys.readouterr()
    assert "requests/s" in out
    assert "\r[" in err


# --- the harness's HTTP client, against a server that does what servers may ----------------


class RawServer:
    """Answers each request on a connection with the next scripted reply; a reply of None
    closes the connection without answering (a kept-alive connection the server dropped)."""

    def __init__(self, replies: list[bytes | None]) -> None:
        self.replies = list(replies)
        self.connections = 0
        self.requests: list[bytes] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while self.replies:
            conn, _ = self.sock.accept()
            self.connections += 1
            with conn:
                while self.replies:
                    data = b""
                    while b"\r\n\r\n" not in data:
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        data += chunk
                    if not data:
                        break
                    head, _, body = data.partition(b"\r\n\r\n")
                    length = (
                        int(re.search(rb"Content-Length: (\d+)", head).group(1))
                        if (b"Content-Length" in head)
                        else 0
                    )
                    while len(body) < length:
                        body += conn.recv(65536)
                    reply = self.replies.pop(0)
                    if reply is None:
                        break  # closed without a reply
                    self.requests.append(head.split(b"\r\n", 1)[0])
                    conn.sendall(reply)
                    if b"Connection: close" in reply:
                        break


def reply(body: bytes, *headers: str) -> bytes:
    extra = "".join(f"{h}\r\n" for h in headers)
    return f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


def test_the_client_reads_replies_by_length_and_honours_connection_close() -> None:
    big = b'{"entrySet": "' + b"x" * 300_000 + b'"}'
    server = RawServer([reply(b'{"a": 1}'), reply(big, "Connection: close"), reply(b"{}")])
    client = Client(server.url)
    assert client.request("GET", "/one") == (200, {"a": 1})
    status, document = client.request("GET", "/big")
    assert (status, len(document["entrySet"])) == (200, 300_000)
    assert client.request("POST", "/after", {"x": 1}) == (200, {})
    assert server.connections == 2  # the server said close: the third went on a new one
    client.close()


def test_a_kept_alive_connection_dropped_before_the_reply_is_sent_again_once() -> None:
    # The server answers one request, then drops the connection on reading the second
    # (a keep-alive timeout): that request never reached the service; it goes again.
    server = RawServer([reply(b"{}"), None, reply(b'{"ok": true}')])
    client = Client(server.url)
    assert client.request("POST", "/first", {"n": 1}) == (200, {})
    assert client.request("POST", "/second", {"n": 2}) == (200, {"ok": True})
    assert server.connections == 2
    assert server.requests == [b"POST /first HTTP/1.1", b"POST /second HTTP/1.1"]
    client.close()
