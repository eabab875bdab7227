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


# --- Conversations, read positions and devices (issue 26) ----------------------------------

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "wbr"}


class Tree(HTMLParser):
    """Each start tag with the ids of the elements around it, and the text of each element
    by those ids."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[tuple[str, ...], str, dict[str, str | None]]] = []
        self.texts: list[tuple[tuple[str, ...], str, str]] = []
        self._open: list[tuple[str, str]] = []

    def _around(self) -> tuple[str, ...]:
        return tuple(id_ for _, id_ in self._open if id_)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        self.tags.append((self._around(), tag, found))
        if tag not in VOID:
            self._open.append((tag, found.get("id") or ""))

    def handle_endtag(self, tag: str) -> None:
        while self._open:
            if self._open.pop()[0] == tag:
                break

    def handle_data(self, data: str) -> None:
        if self._open and data.strip():
            self.texts.append((self._around(), self._open[-1][0], data.strip()))

    def inside(self, id_: str) -> list[tuple[str, dict[str, str | None]]]:
        return [(tag, attrs) for around, tag, attrs in self.tags if id_ in around]


def tree(html: str) -> Tree:
    parser = Tree()
    parser.feed(html)
    return parser


def served_script(console: Any) -> str:
    """The script as the page loads it: from its hashed URL."""
    urls = asset_urls(console.get("/").get_data(as_text=True))
    script = console.get(next(url for url in urls if url.endswith(".js")))
    assert script.status_code == 200
    return str(script.get_data(as_text=True))


def input_names(found: Tree, form: str) -> set[str | None]:
    return {attrs.get("name") for tag, attrs in found.inside(form) if tag in ("input", "select")}


def test_the_page_has_the_conversation_list_and_the_device_box(console: Any) -> None:
    found = tree(console.get("/").get_data(as_text=True))
    ids = {attrs.get("id") for _, _, attrs in found.tags}
    # The conversation list: its member, a count, Refresh and Next page, the rows and the
    # outcome of a mark read.
    for id_ in (
        "conversations-form",
        "conversations-member",
        "conversations-next",
        "conversations-result",
        "read-result",
    ):
        assert id_ in ids, id_
    assert input_names(found, "conversations-form") == {"count"}
    buttons = [a for tag, a in found.inside("conversations-form") if tag == "button"]
    assert [b.get("type") for b in buttons] == ["submit", "button"]
    # The device box is in the sync form, beside member; the list of devices in the panel.
    assert {"member", "device", "last_read", "count", "follow"} <= input_names(found, "sync-form")
    for id_ in ("devices-member", "devices-refresh", "devices-result"):
        assert id_ in ids, id_
    # sendGroup's sender, optional and empty by default (today's requests unchanged).
    sender = [a for tag, a in found.inside("group-form") if a.get("name") == "from"]
    assert len(sender) == 1
    assert not sender[0].get("value")
    device = [a for tag, a in found.inside("sync-form") if a.get("name") == "device"]
    assert not device[0].get("value")
    # The followed entries name their conversation, as the sync pages do.
    headings = [text for around, tag, text in found.texts if "follow-entries" in around]
    assert headings == ["seq", "conversation", "stored (UTC)", "message"]


def test_the_script_calls_the_new_routes_with_the_device(console: Any) -> None:
    script = served_script(console)
    assert "`/timeline/conversations?${query}`" in script
    assert 'api("POST", "/timeline/read", body)' in script
    assert "`/timeline/devices?${new URLSearchParams({ member })}`" in script
    assert 'query.set("before", before)' in script
    # device on the sync (a page at a time, and following) and on the ack; empty: not sent.
    assert script.count('if (device) query.set("device", device);') == 1
    assert 'if (state.device) query.set("device", state.device);' in script
    assert "if (device) body.device = device;" in script
    assert "if (sender) body.from = sender;" in script
    # Every value shown goes through textContent (h() and its String(child)); see
    # test_the_script_never_writes_html_or_style for what it never uses.
    assert "node.append(child instanceof Node ? child : String(child));" in script


def test_every_field_the_console_shows_is_in_the_replies(console: Any) -> None:
    """The script reads each field by name: each is in the service's replies, so the list,
    the devices and the sync entries do not show blanks."""
    client = console

    def post(path: str, body: dict[str, Any]) -> dict[str, Any]:
        reply = client.post(path, data=json.dumps(body), content_type="application/json")
        assert reply.status_code == 200, reply.get_json()
        return dict(reply.get_json())

    def get(path: str, **query: Any) -> dict[str, Any]:
        reply = client.get(path, query_string=query)
        assert reply.status_code == 200, reply.get_json()
        return dict(reply.get_json())

    post("/timeline/send", {"from": "a", "to": "b", "message": '{"text":"hi"}'})
    group = {"group_name": "g", "group_members": ["a", "b"], "message": '{"t":1}', "from": "a"}
    post("/timeline/sendGroup", group)
    entries = get("/timeline/sync", member="b", last_read=0, device="phone")["entrySet"]
    post("/timeline/ack", {"member": "b", "seq": "2", "device": "phone"})
    page = get("/timeline/conversations", member="b", count=10)
    listed = {c["type"]: c for c in page["conversations"]}
    assert set(listed) == {"single", "group"}
    # As the console sends it: latestSeq, a string, as seq.
    latest = listed["group"]["latestSeq"]
    body = {"member": "b", "type": "group", "conversation": "g", "seq": latest}
    read = post("/timeline/read", body)
    devices = get("/timeline/devices", member="b")["devices"]

    script = served_script(console)

    def reads(field: str) -> bool:
        return re.search(rf"\.{field}\b", script) is not None

    shown = {
        "conversation": ["type", "conversation", "latestSeq", "readSeq", "unread", "lastMessage"],
        "last message": ["message", "timestamp"],
        "conversations": ["conversations", "next"],
        "read": ["readSeq", "unread"],
        "device": ["device", "position", "lastSeen"],
        "sync entry": ["type", "conversation", "conversationSeq"],
    }
    replies = {
        "conversation": listed["group"],
        "last message": listed["group"]["lastMessage"],
        "conversations": page,
        "read": read,
        "device": devices[0],
        "sync entry": entries[1],
    }
    for what, fields in shown.items():
        for field in fields:
            assert field in replies[what], (what, field)
            assert reads(field), (what, field)
    assert read == {"readSeq": "1", "unread": 0}
    assert [(d["device"], d["position"]) for d in devices] == [("phone", "2")]
    assert (entries[1]["type"], entries[1]["conversation"], entries[1]["conversationSeq"]) == (
        "group",
        "g",
        "1",
    )
