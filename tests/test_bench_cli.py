"""timeline-bench's command line: what it prints, and its exit status, run or not."""

from __future__ import annotations

import re
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from werkzeug.serving import WSGIRequestHandler, make_server

from support import free_port
from timeline.bench.cli import main
from timeline.factory import close_app, create_app
from timeline.settings import Settings


class Quiet(WSGIRequestHandler):
    """No access lines on stderr: stderr is what the tests read."""

    def log(self, type: str, message: str, *args: object) -> None:
        pass


@contextmanager
def serving(settings: Settings) -> Iterator[str]:
    """The service on a free port, in a thread of this process; gives its URL."""
    app = create_app(settings)
    server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(10)
        close_app(app)


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
