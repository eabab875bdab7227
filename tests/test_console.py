"""The console without a browser: GET / and its assets, their headers, cache busting, the
page's markup (nothing inline, nothing from elsewhere) and the setting that turns it off."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from timeline.console import routes
from timeline.factory import create_app
from timeline.settings import Settings, SettingsError, load_settings

ASSETS = Path(routes.__file__).parent / "assets"
POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


class Markup(HTMLParser):
    """Every start tag of a page with its attributes, and the text found inside scripts and
    style elements."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.inline: list[str] = []
        self._open: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        self._open = tag if tag in ("script", "style") else None

    def handle_endtag(self, tag: str) -> None:
        self._open = None

    def handle_data(self, data: str) -> None:
        if self._open and data.strip():
            self.inline.append(f"<{self._open}>{data.strip()[:60]}")


def markup(html: str) -> Markup:
    parser = Markup()
    parser.feed(html)
    return parser


def asset_urls(html: str) -> list[str]:
    """The page's own script and stylesheet URLs."""
    found = markup(html)
    scripts = [a["src"] for tag, a in found.tags if tag == "script" and a.get("src")]
    sheets = [a["href"] for tag, a in found.tags if tag == "link" and a.get("rel") == "stylesheet"]
    return [url for url in scripts + sheets if url]


def envelope_404(path: str) -> dict[str, Any]:
    return {"code": 404, "reason": "TIMELINE_NOT_FOUND", "message": f"no route GET {path}"} | {
        "metadata": {}
    }


@pytest.fixture
def console(settings: Settings, sqlite_store: Any) -> Any:
    return create_app(settings, store=sqlite_store).test_client()


# --- The page --------------------------------------------------------------------------------


def test_the_page_is_served_with_a_strict_policy_and_revalidated(console: Any) -> None:
    reply = console.get("/")
    assert reply.status_code == 200
    assert reply.mimetype == "text/html"
    assert reply.headers["Content-Security-Policy"] == POLICY
    assert reply.headers["X-Content-Type-Options"] == "nosniff"
    assert reply.headers["Referrer-Policy"] == "no-referrer"
    # The page names the current assets, so a browser asks for it again every time...
    assert reply.headers["Cache-Control"] == "no-cache"
    assert reply.headers["X-Request-ID"]
    # ...and gets a 304 while it has not changed.
    again = console.get("/", headers={"If-None-Match": reply.headers["ETag"]})
    assert again.status_code == 304
    assert again.data == b""
    assert console.head("/").status_code == 200


def test_the_page_has_no_inline_script_style_or_handler(console: Any) -> None:
    html = console.get("/").get_data(as_text=True)
    found = markup(html)
    assert found.tags, "nothing parsed"
    assert not found.inline, found.inline  # no <script> body, no <style> element
    scripts = [attrs for tag, attrs in found.tags if tag == "script"]
    assert scripts
    assert all(attrs.get("src") for attrs in scripts)
    for tag, attrs in found.tags:
        assert tag != "style"
        for name, value in attrs.items():
            assert name != "style", tag
            assert not name.startswith("on"), f"<{tag} {name}>"
            assert not (value or "").strip().lower().startswith("javascript:"), f"<{tag} {name}>"


def test_everything_the_page_loads_comes_from_the_service(console: Any) -> None:
    html = console.get("/").get_data(as_text=True)
    found = markup(html)
    for _tag, attrs in found.tags:
        for name in ("src", "href", "action"):
            url = attrs.get(name)
            if url is None:
                continue
            # Paths of this origin, or the empty data: icon that keeps browsers from asking for
            # /favicon.ico; never another host (a CDN), nor a protocol-relative URL.
            assert (url.startswith("/") and not url.startswith("//")) or url == "data:,", url
    for text in (html, *(p.read_text() for p in ASSETS.glob("*.*"))):
        assert not re.search(r"https?://|@import|url\(", text)


def test_the_script_never_writes_html_or_style(console: Any) -> None:
    # Messages and ids are user data: the script builds nodes with textContent only. The
    # policy would refuse a style attribute; the script never tries.
    script = (ASSETS / "console.js").read_text()
    for forbidden in (
        "innerHTML",
        "outerHTML",
        "insertAdjacentHTML",
        "document.write",
        "eval(",
        "new Function",
        ".style",
        "localStorage",
    ):
        assert forbidden not in script, forbidden
    assert "sessionStorage" in script  # the token: this tab only


# --- The assets --------------------------------------------------------------------------


def test_the_assets_are_served_under_their_hash_for_a_year(console: Any) -> None:
    urls = asset_urls(console.get("/").get_data(as_text=True))
    assert len(urls) == 2
    types = {"js": "text/javascript", "css": "text/css"}
    for url in urls:
        match = re.fullmatch(r"/console/(console)\.([0-9a-f]{16})\.(js|css)", url)
        assert match, url
        reply = console.get(url)
        assert reply.status_code == 200, url
        assert reply.mimetype == types[match[3]]
        assert reply.headers["Cache-Control"] == "public, max-age=31536000, immutable"
        assert reply.headers["Content-Security-Policy"] == POLICY
        assert reply.headers["X-Content-Type-Options"] == "nosniff"
        # The name is the content's: what is on disk, hashed.
        assert reply.data == (ASSETS / f"{match[1]}.{match[3]}").read_bytes()
        assert hashlib.sha256(reply.data).hexdigest()[:16] == match[2]
        assert console.get(url, headers={"If-None-Match": reply.headers["ETag"]}).status_code == 304


@pytest.mark.parametrize(
    "path",
    [
        "/console/console.js",  # the bare name: never served, so never cached under it
        "/console/console.0000000000000000.js",  # an old hash
        "/console/index.html",
        "/console/",
        "/console",
        "/index.html",
    ],
)
def test_an_unknown_or_stale_asset_is_the_404_envelope(console: Any, path: str) -> None:
    reply = console.get(path)
    assert reply.status_code == 404
    assert reply.mimetype == "application/json"
    assert reply.get_json() == envelope_404(path)


def test_another_method_on_the_page_is_the_405_envelope(console: Any) -> None:
    reply = console.post("/", data="{}")
    assert reply.status_code == 405
    assert reply.get_json()["reason"] == "TIMELINE_METHOD_NOT_ALLOWED"
    assert "GET" in reply.headers["Allow"]


def test_an_asset_that_changes_gets_a_new_url(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Given a copy of the package's files, read by build() in their place,
    shutil.copytree(ASSETS, tmp_path / "assets")
    monkeypatch.setattr(routes, "files", lambda _package: tmp_path)
    before = routes.build()
    # when the script changes,
    script = tmp_path / "assets" / "console.js"
    script.write_text(script.read_text() + "\n// changed\n")
    after = routes.build()
    # then it has a new URL, which the page names (a new page, a new ETag); the style's is kept.
    assert set(before.assets) != set(after.assets)
    new_script = next(name for name in after.assets if name.endswith(".js"))
    assert new_script not in before.assets
    assert f'"/console/{new_script}"'.encode() in after.page.body
    assert after.page.etag != before.page.etag
    assert {n for n in before.assets if n.endswith(".css")} == {
        n for n in after.assets if n.endswith(".css")
    }


def test_a_page_that_does_not_name_an_asset_stops_the_start(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    shutil.copytree(ASSETS, tmp_path / "assets")
    page = tmp_path / "assets" / "index.html"
    page.write_text(page.read_text().replace('"console.css"', '"other.css"'))
    monkeypatch.setattr(routes, "files", lambda _package: tmp_path)
    with pytest.raises(RuntimeError, match=r"console\.css 0 times"):
        routes.build()


# --- The token and the setting -------------------------------------------------------------


def test_the_page_needs_no_token_but_the_api_still_does(
    settings: Settings, sqlite_store: Any
) -> None:
    client = create_app(settings.replace(api_token="s3cret"), store=sqlite_store).test_client()
    page = client.get("/")
    assert page.status_code == 200
    for url in asset_urls(page.get_data(as_text=True)):
        assert client.get(url).status_code == 200
    refused = client.get("/timeline/sync?member=a")
    assert refused.status_code == 401
    assert refused.get_json()["reason"] == "TIMELINE_UNAUTHORIZED"
    allowed = client.get("/timeline/sync?member=a", headers={"Authorization": "Bearer s3cret"})
    assert allowed.status_code == 200


def test_with_the_console_off_the_page_and_its_assets_are_404s(
    settings: Settings, sqlite_store: Any
) -> None:
    urls = asset_urls(
        create_app(settings, store=sqlite_store).test_client().get("/").get_data(True)
    )
    off = create_app(settings.replace(console=False), store=sqlite_store).test_client()
    for path in ["/", *urls]:
        reply = off.get(path)
        assert reply.status_code == 404, path
        assert reply.get_json() == envelope_404(path)
        assert "Content-Security-Policy" not in reply.headers
    # The API is all there is, and it is unchanged.
    assert off.get("/timeline/sync?member=a").status_code == 200
    assert off.get("/healthz").status_code == 200


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        *[("false", False), ("FALSE", False), ("0", False), ("no", False), ("off", False)],
        *[("true", True), ("True", True), ("1", True), ("yes", True), ("on", True)],
    ],
)
def test_timeline_console_is_read_as_a_boolean(tmp_path: Path, given: str, expected: bool) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_settings({"TIMELINE_CONSOLE": given}, config_path=empty).console is expected


def test_the_console_is_on_by_default_and_the_file_can_turn_it_off(tmp_path: Path) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_settings({}, config_path=empty).console is True
    off = tmp_path / "off.yaml"
    off.write_text("console: false\n")
    assert load_settings({}, config_path=off).console is False
    # The variable wins over the file, as for every setting.
    assert load_settings({"TIMELINE_CONSOLE": "true"}, config_path=off).console is True


@pytest.mark.parametrize(
    ("text", "env", "complaint"),
    [
        ("", {"TIMELINE_CONSOLE": "maybe"}, "TIMELINE_CONSOLE: console must be true or false"),
        ("", {"TIMELINE_CONSOLE": ""}, "TIMELINE_CONSOLE: console must be true or false"),
        ("console: 1\n", {}, "console must be true or false"),
        ("console: disabled\n", {}, "console must be true or false"),
        ("", {"TIMELINE_CONSOL": "false"}, "did you mean TIMELINE_CONSOLE?"),
    ],
)
def test_a_malformed_console_setting_stops_the_start(
    tmp_path: Path, text: str, env: dict[str, str], complaint: str
) -> None:
    config = tmp_path / "t.yaml"
    config.write_text(text)
    with pytest.raises(SettingsError, match=re.escape(complaint)):
        load_settings(env, config_path=config)


def test_the_openapi_document_is_not_the_consoles(console: Any) -> None:
    # The console is a page, not part of the API: the document describes /timeline/* and the
    # operators' routes only, whether the console is on or not.
    paths = json.loads(console.get("/openapi.json").data)["paths"]
    assert "/" not in paths
    assert not [p for p in paths if p.startswith("/console")]
