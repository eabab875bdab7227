"""The console in a real browser: the system's Chromium, headless, driven by Playwright,
against the service on a free port (tests/support.py's `serving`).

Skipped, with the reason, when Playwright (the dev extra) or a `chromium` binary (Debian's
package: `apt-get install -y chromium`; .ci/run installs it) is missing. Playwright's own
browser download is never used.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from support import sample, serving
from timeline.settings import Settings


def chromium_binary() -> str | None:
    """The system's Chromium: on PATH as chromium or chromium-browser, or Debian's path."""
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None


CHROMIUM = chromium_binary()
if CHROMIUM is None:
    pytest.skip(
        "console browser tests: no Chromium (chromium, chromium-browser or /usr/bin/chromium); "
        "install it with `apt-get install -y chromium`",
        allow_module_level=True,
    )
playwright_api = pytest.importorskip(
    "playwright.sync_api",
    reason="console browser tests: Playwright is not installed (pip install -e '.[dev]')",
)
expect = playwright_api.expect

#: Where the screenshot is copied too when set (`CONSOLE_SCREENSHOT=docs/console.png`), to
#: refresh the README's picture. Not a TIMELINE_* name: those are the service's settings.
SCREENSHOT_COPY = os.environ.get("CONSOLE_SCREENSHOT")
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}")

# Run in the page before its own script: every Content-Security-Policy violation is kept, so
# that a test fails if the page tries anything inline.
WATCH_POLICY = """
window.__violations = [];
document.addEventListener("securitypolicyviolation", (event) => {
  window.__violations.push(event.violatedDirective + " " + (event.blockedURI || "inline"));
});
"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with playwright_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield launched
        launched.close()


@dataclass
class Console:
    """A tab on the console, and what went wrong in it: script errors, policy violations and
    requests that left the service's origin."""

    url: str
    page: Any
    errors: list[str] = field(default_factory=list)
    elsewhere: list[str] = field(default_factory=list)

    def check_clean(self) -> None:
        violations = self.page.evaluate("window.__violations")
        assert violations == []
        assert self.errors == []
        assert self.elsewhere == []


def open_console(context: Any, url: str) -> Console:
    page = context.new_page()
    console = Console(url, page)
    page.on("pageerror", lambda error: console.errors.append(str(error)))

    def on_message(message: Any) -> None:
        # A 4xx reply is logged by Chromium as a failed resource: the tests ask for some.
        if message.type == "error" and not message.text.startswith("Failed to load resource"):
            console.errors.append(message.text)

    page.on("console", on_message)

    def on_request(request: Any) -> None:
        if not request.url.startswith((url + "/", "data:")):
            console.elsewhere.append(request.url)

    page.on("request", on_request)
    page.add_init_script(WATCH_POLICY)
    page.goto(url + "/")
    expect(page.locator("#health")).to_have_text("ready")
    return console


@pytest.fixture
def service(settings: Settings) -> Iterator[str]:
    with serving(settings) as url:
        yield url


@pytest.fixture
def context(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    yield context
    context.close()


def send(page: Any, sender: str, receiver: str, message: str, **options: Any) -> None:
    form = page.locator("#send-form")
    form.locator("[name=from]").fill(sender)
    form.locator("[name=to]").fill(receiver)
    form.locator("[name=message]").fill(message)
    form.locator("[name=client_msg_id]").fill(options.get("client_msg_id", ""))
    form.locator("[name=batch]").set_checked(options.get("batch", False))
    form.get_by_role("button", name="Send", exact=True).click()


def sync(page: Any, member: str, last_read: str, count: str) -> None:
    form = page.locator("#sync-form")
    form.locator("[name=member]").fill(member)
    form.locator("[name=last_read]").fill(last_read)
    form.locator("[name=count]").fill(count)
    form.get_by_role("button", name="Sync").click()


def seqs(where: Any) -> list[str]:
    texts: list[str] = where.locator("td.seq").all_inner_texts()
    return texts


def figure(page: Any, key: str) -> Any:
    """The value shown for one of the service panel's figures."""
    return page.locator(f'[data-figure="{key}"] td').nth(1)


@pytest.mark.slow
def test_send_sync_ack_and_history(
    service: str, context: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    console = open_console(context, service)
    page = console.page
    result = page.locator("#send-result .summary")

    # Given a message from a to b: b's sync sequence 1.
    send(page, "a", "b", '{"text":"hi b"}')
    expect(result).to_have_text("stored: sequence 1 of b's sync timeline")
    # A client_msg_id sent twice: the same answer, stored once.
    send(page, "a", "b", '{"text":"once"}', client_msg_id="m-1")
    expect(result).to_have_text("stored: sequence 2 of b's sync timeline")
    page.locator("#send-result").evaluate("node => node.replaceChildren()")
    send(page, "a", "b", '{"text":"once"}', client_msg_id="m-1")
    expect(result).to_have_text("stored: sequence 2 of b's sync timeline")
    # A batch, one message per line.
    send(page, "a", "b", '{"text":"one"}\n{"text":"two"}', batch=True)
    expect(result).to_have_text("stored: sequence 4 of b's sync timeline (the batch: 3, 4)")
    # And a group message to a, c and d.
    group = page.locator("#group-form")
    group.locator("[name=group_name]").fill("group_a")
    group.locator("[name=group_members]").fill("a, c d")
    group.locator("[name=message]").fill('{"text":"hello, all"}')
    group.get_by_role("button", name="Send to group").click()
    expect(page.locator("#group-result .summary")).to_have_text(
        "stored for 3 member(s); failedMembers is empty"
    )

    # When a syncs from 0, two entries a page, as a device does:
    sync(page, "a", "0", "2")
    out = page.locator("#sync-result")
    expect(out.locator(".done")).to_have_text("Up to date at 5.")
    # then three pages arrive, in order, each with latestSeq and minSeq, and stamped.
    pages = out.locator(".page")
    expect(pages).to_have_count(3)
    assert [seqs(pages.nth(i)) for i in range(3)] == [["1", "2"], ["3", "4"], ["5"]]
    assert pages.locator(".latest-seq code").all_inner_texts() == ["5", "5", "5"]
    assert pages.locator(".entry-set-last-seq code").all_inner_texts() == ["2", "4", "5"]
    assert pages.locator(".last-read code").all_inner_texts() == ["0", "2", "4"]
    assert pages.locator(".min-seq code").all_inner_texts() == ["1", "1", "1"]
    assert out.locator("td.message").all_inner_texts() == [
        '{"text":"hi b"}',
        '{"text":"once"}',
        '{"text":"one"}',
        '{"text":"two"}',
        '{"text":"hello, all"}',
    ]
    assert all(TIMESTAMP.fullmatch(t) for t in out.locator("td.time").all_inner_texts())
    assert out.locator(".gap").count() == 0
    # The device's position follows: the next sync and the ack start from it.
    expect(page.locator("#sync-form [name=last_read]")).to_have_value("5")
    expect(page.locator("#ack-form [name=seq]")).to_have_value("5")

    # The service panel, read again, shows what was sent.
    page.locator("#service-refresh").click()
    expect(figure(page, "messages")).not_to_have_text("0")

    shot = tmp_path / "console.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    with capsys.disabled():
        print(f"\nconsole screenshot after a sync: {shot}")
    if SCREENSHOT_COPY:
        shutil.copyfile(shot, SCREENSHOT_COPY)

    # c, another member (another device): one page, its own sequence 1.
    sync(page, "c", "0", "2")
    expect(out.locator(".done")).to_have_text("Up to date at 1.")
    expect(out.locator(".page")).to_have_count(1)
    assert seqs(out) == ["1"]
    assert out.locator("td.message").all_inner_texts() == ['{"text":"hello, all"}']

    # Back on a, whose position the page remembers: ack up to 3, and see minSeq move.
    page.locator("#sync-form [name=member]").fill("a")
    expect(page.locator("#sync-form [name=last_read]")).to_have_value("5")
    page.locator("#ack-form [name=seq]").fill("3")
    page.locator("#ack-form").get_by_role("button", name="Ack").click()
    expect(page.locator("#ack-result .min-seq code")).to_have_text("4")

    # A device of a's still at 0 now missed 1 to 3: the page says so.
    sync(page, "a", "0", "10")
    expect(out.locator(".done")).to_have_text("Up to date at 5.")
    first = out.locator(".page").first
    expect(first.locator(".min-seq code")).to_have_text("4")
    expect(first.locator(".gap")).to_contain_text("entries 1 to 3 are no longer in this timeline")
    assert seqs(first) == ["4", "5"]

    # History of a and b, backward two at a time, older page after older page.
    history = page.locator("#history-form")
    history.locator("[name=kind]").select_option("single")
    history.locator("[name=from]").fill("b")
    history.locator("[name=to]").fill("a")
    history.locator("[name=direction]").select_option("backward")
    history.locator("[name=count]").fill("2")
    history.get_by_role("button", name="Read").click()
    shown = page.locator("#history-result")
    expect(shown.locator(".next-before code")).to_have_text("3")
    assert seqs(shown) == ["4", "3"]
    assert all(TIMESTAMP.fullmatch(t) for t in shown.locator("td.time").all_inner_texts())
    older = page.locator("#history-next")
    expect(older).to_have_text("Older page")
    read = seqs(shown)
    for _ in range(3):
        if older.is_disabled():
            break
        before = shown.locator(".next-before code").inner_text()
        older.click()
        expect(shown.locator(".position code")).to_have_text(before)
        read += seqs(shown)
    assert read == ["4", "3", "2", "1"]
    expect(older).to_be_disabled()
    expect(shown.locator(".done")).to_have_text("Nothing older.")

    # And the group's history forward, from the start.
    history.locator("[name=kind]").select_option("group")
    history.locator("[name=group]").fill("group_a")
    history.locator("[name=direction]").select_option("forward")
    history.get_by_role("button", name="Read").click()
    expect(shown.locator("td.message")).to_have_text(['{"text":"hello, all"}'])

    # The service panel: the figures are /metrics' own.
    text = urllib.request.urlopen(service + "/metrics", timeout=10).read().decode()
    page.locator("#service-refresh").click()
    messages = int(sample(text, "timeline_fan_out_recipients_count"))
    assert messages >= 5
    # (Retried until a refresh made after the last write is shown; none happened since.)
    expect(figure(page, "messages")).to_have_text(f"{messages:,}")
    acks = int(sample(text, "timeline_acks_total"))
    assert acks >= 1
    expect(figure(page, "acks")).to_have_text(f"{acks:,}")
    repairs = [
        f"{int(sample(text, 'timeline_sequence_repairs_total', repair=repair)):,}"
        for repair in ("seeded", "moved", "restored")
    ]
    assert int(repairs[0].replace(",", "")) >= 5  # a, b, c, d and the conversations: new
    expect(figure(page, "repairs")).to_have_text(" / ".join(repairs))
    written = [
        f"{int(sample(text, 'timeline_messages_written_total', kind=kind)):,}"
        for kind in ("history", "sync")
    ]
    expect(figure(page, "written")).to_have_text(" / ".join(written))
    assert "POST /timeline/send" in page.locator("#routes td.mono").all_inner_texts()
    expect(page.locator("#service-checks")).to_contain_text("redis: ok")
    # Every call the page made is listed, newest first.
    expect(page.locator("#activity summary").first).to_contain_text(
        "GET /timeline/history/group/group_a?"
    )
    console.check_clean()


def test_an_error_is_shown_with_its_envelope(service: str, context: Any) -> None:
    console = open_console(context, service)
    page = console.page
    # A bad id: the envelope's code, reason, message and metadata.
    send(page, "a:x", "b", '{"text":"hi"}')
    error = page.locator("#send-result .error")
    expect(error.locator(".reason")).to_have_text("400 TIMELINE_INVALID_PARAM")
    expect(error.locator(".message")).to_have_text("from must not contain ':'")
    assert error.locator("dt").all_inner_texts() == ["field"]
    assert error.locator("dd").all_inner_texts() == ["from"]
    expect(error).to_contain_text("X-Request-ID")
    # A limit: its metadata says which.
    sync(page, "a", "0", "5000")
    error = page.locator("#sync-result .error")
    expect(error.locator(".message")).to_have_text("count must be at most 1000")
    assert error.locator("dt").all_inner_texts() == ["field", "limit"]
    assert error.locator("dd").all_inner_texts() == ["count", "1000"]
    # A message that is no JSON object.
    send(page, "a", "b", "not json")
    expect(page.locator("#send-result .error .reason")).to_have_text("400 TIMELINE_INVALID_PARAM")
    console.check_clean()


def test_the_token_is_asked_for_and_kept_for_the_tab_only(settings: Settings, context: Any) -> None:
    with serving(settings.replace(api_token="s3cret")) as url:
        # The page and /readyz need no token.
        console = open_console(context, url)
        page = console.page
        dialog = page.locator("#token-dialog")
        expect(dialog).to_be_hidden()
        # The first API call is refused: the page asks.
        sync(page, "a", "0", "10")
        expect(dialog).to_be_visible()
        expect(page.locator("#token-reason")).to_contain_text("needs a bearer token")
        # A wrong token is refused, and the page asks again.
        page.locator("#token-input").fill("wrong")
        dialog.get_by_role("button", name="Use it").click()
        expect(page.locator("#token-reason")).to_contain_text("refused this token")
        expect(dialog).to_be_visible()
        page.locator("#token-input").fill("s3cret")
        dialog.get_by_role("button", name="Use it").click()
        # Then the sync goes through.
        expect(dialog).to_be_hidden()
        expect(page.locator("#sync-result .done")).to_have_text("Up to date at 0.")
        expect(page.locator("#token-button")).to_have_text("Token: set")
        stored = page.evaluate("[sessionStorage.length, localStorage.length]")
        assert stored == [1, 0]
        send(page, "a", "b", '{"text":"with a token"}')
        expect(page.locator("#send-result .summary")).to_have_text(
            "stored: sequence 1 of b's sync timeline"
        )
        console.check_clean()

        # Another tab has its own session: it asks again; cancelled, the 401 is shown.
        other = open_console(context, url)
        sync(other.page, "a", "0", "10")
        expect(other.page.locator("#token-dialog")).to_be_visible()
        other.page.locator("#token-cancel").click()
        expect(other.page.locator("#sync-result .error .reason")).to_have_text(
            "401 TIMELINE_UNAUTHORIZED"
        )
        other.check_clean()


def post(url: str, sender: str, receiver: str, text: str) -> None:
    """A message sent through the API from outside the page, as another device sends it."""
    message = json.dumps({"text": text}, separators=(",", ":"))
    body = json.dumps({"from": sender, "to": receiver, "message": message})
    request = urllib.request.Request(url + "/timeline/send", data=body.encode(), method="POST")
    with urllib.request.urlopen(request, timeout=10) as reply:
        assert reply.status == 200


def hide(page: Any) -> None:
    """What the browser does when the tab goes to the background."""
    page.evaluate(
        "Object.defineProperty(document, 'hidden', {configurable: true, get: () => true});"
        "document.dispatchEvent(new Event('visibilitychange'));"
    )


@pytest.mark.slow
def test_follow_shows_messages_as_they_arrive(service: str, context: Any) -> None:
    console = open_console(context, service)
    page = console.page
    form = page.locator("#sync-form")
    toggle = form.locator("[name=follow]")
    status = page.locator("#follow-status")
    live = page.locator("#follow-result td.message")
    # Given b, synced by the page up to its one message,
    post(service, "a", "b", "before")
    sync(page, "b", "0", "10")
    expect(page.locator("#sync-result .done")).to_have_text("Up to date at 1.")
    # when the page follows b,
    toggle.check()
    expect(status).to_have_text("Following b: waiting for entries after 1…")
    # then a message sent to b from elsewhere appears as it arrives, and the next one too,
    # each moving the device's position on.
    post(service, "a", "b", "live one")
    expect(live).to_have_text(['{"text":"live one"}'])
    expect(form.locator("[name=last_read]")).to_have_value("2")
    post(service, "c", "b", "live two")
    expect(live).to_have_text(['{"text":"live one"}', '{"text":"live two"}'])
    expect(form.locator("[name=last_read]")).to_have_value("3")
    expect(page.locator("#ack-form [name=seq]")).to_have_value("3")
    expect(page.locator("#follow-result td.seq")).to_have_text(["2", "3"])
    expect(status).to_have_text("Following b: waiting for entries after 3…")

    # Toggled off, the waiting sync is let go: what comes next is not shown,
    toggle.uncheck()
    expect(status).to_have_text("Stopped following b at 3.")
    post(service, "a", "b", "while off")
    page.wait_for_timeout(500)  # time enough for a request still waiting to show it
    expect(live).to_have_count(2)
    # until the page follows again, from where it got to.
    toggle.check()
    expect(live).to_have_text(['{"text":"while off"}'])
    expect(form.locator("[name=last_read]")).to_have_value("4")

    # Hidden, the page stops following and says why.
    hide(page)
    expect(toggle).not_to_be_checked()
    expect(status).to_have_text("Stopped following: the page was hidden.")
    # (A last message lets go of the request the service still holds for the page.)
    post(service, "a", "b", "bye")
    console.check_clean()


def test_a_policy_violation_would_be_caught(service: str, context: Any) -> None:
    # The check the other tests end with can fail: an inline style is refused and recorded.
    console = open_console(context, service)
    console.page.evaluate("document.body.setAttribute('style', 'color: red')")
    console.page.wait_for_function("window.__violations.length > 0")
    with pytest.raises(AssertionError):
        console.check_clean()


# --- Conversations, read positions and devices (issue 26) ----------------------------------


def get_json(url: str, path: str, **query: str) -> Any:
    """A GET of the API from outside the page: what the service holds."""
    address = f"{url}{path}?{urllib.parse.urlencode(query)}"
    with urllib.request.urlopen(address, timeout=10) as reply:
        return json.loads(reply.read())


def send_group(page: Any, group: str, members: str, message: str, sender: str = "") -> None:
    form = page.locator("#group-form")
    form.locator("[name=group_name]").fill(group)
    form.locator("[name=group_members]").fill(members)
    form.locator("[name=from]").fill(sender)
    form.locator("[name=message]").fill(message)
    form.locator("[name=batch]").set_checked(False)
    form.get_by_role("button", name="Send to group").click()


def listed(page: Any, column: str) -> Any:
    """One column of the conversation list shown, row by row."""
    return page.locator(f"#conversations-result tbody td.{column}")


@pytest.mark.slow
def test_conversations_unread_counts_mark_read_and_devices(service: str, context: Any) -> None:
    console = open_console(context, service)
    page = console.page
    sent = page.locator("#send-result .summary")
    # Given, from the page, a to b, then a batch of two; a group message a sends to a, b and c;
    # and c to b from outside the page, a message with markup in it.
    send(page, "a", "b", '{"text":"hi b"}')
    expect(sent).to_have_text("stored: sequence 1 of b's sync timeline")
    send(page, "a", "b", '{"text":"one"}\n{"text":"two"}', batch=True)
    expect(sent).to_have_text("stored: sequence 3 of b's sync timeline (the batch: 2, 3)")
    send_group(page, "group_a", "a, b, c", '{"text":"hello, all"}', sender="a")
    expect(page.locator("#group-result .summary")).to_have_text(
        "stored for 3 member(s); failedMembers is empty"
    )
    markup = '<img src=x onerror="window.__xss=1"><b>bold</b>'
    post(service, "c", "b", markup)
    shown_markup = json.dumps({"text": markup}, separators=(",", ":"))

    # When the page syncs b,
    sync(page, "b", "0", "10")
    out = page.locator("#sync-result")
    expect(out.locator(".done")).to_have_text("Up to date at 5.")
    # then each entry names its conversation and its place in it,
    expect(out.locator("td.conversation")).to_have_text(
        ["single a #1", "single a #2", "single a #3", "group group_a #1", "single c #1"]
    )
    # and b's conversations are listed, most recent first, with what b has not read.
    expect(page.locator("#conversations-member")).to_have_text("b")
    expect(listed(page, "conv-name")).to_have_text(["c", "group_a", "a"])
    expect(listed(page, "conv-type")).to_have_text(["single", "group", "single"])
    expect(listed(page, "conv-unread")).to_have_text(["1", "1", "3"])
    expect(listed(page, "conv-latest")).to_have_text(["1", "1", "3"])
    expect(listed(page, "conv-read")).to_have_text(["0", "0", "0"])
    expect(listed(page, "message")).to_have_text(
        [shown_markup, '{"text":"hello, all"}', '{"text":"two"}']
    )
    # User data is text: the markup is shown as it was sent, never made into elements.
    expect(out.locator("td.message").last).to_have_text(shown_markup)
    assert page.locator("main img, main b:has-text('bold')").count() == 0
    assert page.evaluate("window.__xss") is None
    expect(page.locator("#conversations-result .done")).to_have_text("The end of the list.")

    # Marking a's conversation read zeroes its count, here and in the service.
    row = page.locator('#conversations-result tr[data-conversation="a"]')
    row.get_by_role("button", name="Mark read").click()
    expect(page.locator("#read-result .unread code")).to_have_text("0")
    expect(page.locator("#read-result .read-seq code")).to_have_text("3")
    expect(row.locator("td.conv-unread")).to_have_text("0")
    expect(row.locator("td.conv-read")).to_have_text("3")
    expect(row.get_by_role("button", name="Mark read")).to_be_disabled()
    expect(listed(page, "conv-unread")).to_have_text(["1", "1", "0"])
    held = get_json(service, "/timeline/conversations", member="b", count="10")
    counts = {c["conversation"]: (c["readSeq"], c["unread"]) for c in held["conversations"]}
    assert counts == {"c": ("0", 1), "group_a": ("0", 1), "a": ("3", 0)}

    # a, the sender, has read everything: another member's list, with Refresh.
    lists = page.locator("#conversations-form")
    page.locator("#sync-form [name=member]").fill("a")
    expect(page.locator("#conversations-member")).to_have_text("a")
    expect(listed(page, "conv-name")).to_have_count(0)
    lists.get_by_role("button", name="Refresh").click()
    expect(listed(page, "conv-name")).to_have_text(["group_a", "b"])
    expect(listed(page, "conv-unread")).to_have_text(["0", "0"])

    # Back on b, two a page: Next page goes on from `next` to the end of the list.
    page.locator("#sync-form [name=member]").fill("b")
    lists.locator("[name=count]").fill("2")
    lists.get_by_role("button", name="Refresh").click()
    expect(listed(page, "conv-name")).to_have_text(["c", "group_a"])
    expect(page.locator("#conversations-result .done")).to_have_count(0)
    next_page = page.locator("#conversations-next")
    expect(next_page).to_be_enabled()
    next_page.click()
    expect(listed(page, "conv-name")).to_have_text(["a"])
    expect(page.locator("#conversations-result .done")).to_have_text("The end of the list.")
    expect(next_page).to_be_disabled()

    # Without a device name the page's syncs and acks name none, as before: no devices.
    assert get_json(service, "/timeline/devices", member="b") == {"devices": []}
    # With one, the sync and the ack carry it: the service knows the device and its position.
    device = page.locator("#sync-form [name=device]")
    device.fill("phone")
    expect(page.locator("#sync-form [name=last_read]")).to_have_value("0")  # a new device
    sync(page, "b", "0", "10")
    expect(out.locator(".done")).to_have_text("Up to date at 5.")
    expect(out.locator(".page .device code")).to_have_text("phone")
    devices = page.locator("#devices-result tbody tr")
    expect(devices.locator("td.device-name")).to_have_text(["phone"])
    expect(devices.locator("td.device-position")).to_have_text(["0"])
    expect(page.locator("#devices-result tr.current td.device-name")).to_have_text("phone")
    known = get_json(service, "/timeline/devices", member="b")["devices"]
    assert [(d["device"], d["position"]) for d in known] == [("phone", "0")]
    page.locator("#ack-form [name=seq]").fill("4")
    page.locator("#ack-form").get_by_role("button", name="Ack").click()
    expect(page.locator("#ack-result")).to_contain_text("device phone acked up to 4")
    expect(devices.locator("td.device-position")).to_have_text(["4"])
    known = get_json(service, "/timeline/devices", member="b")["devices"]
    assert [(d["device"], d["position"]) for d in known] == [("phone", "4")]

    # A second device: listed beside the first, and its own position here.
    device.fill("laptop")
    expect(page.locator("#sync-form [name=last_read]")).to_have_value("0")
    sync(page, "b", "0", "10")
    expect(out.locator(".done")).to_have_text("Up to date at 5.")
    expect(devices.locator("td.device-name")).to_have_text(["laptop", "phone"])
    expect(page.locator("#devices-result tr.current td.device-name")).to_have_text("laptop")
    known = get_json(service, "/timeline/devices", member="b")["devices"]
    assert sorted((d["device"], d["position"]) for d in known) == [("laptop", "0"), ("phone", "4")]
    device.fill("phone")
    expect(page.locator("#sync-form [name=last_read]")).to_have_value("5")

    # Following b: a message from outside shows its conversation, and the list is read again
    # from the top as it arrives.
    page.locator("#sync-form [name=follow]").check()
    expect(page.locator("#follow-status")).to_have_text("Following b: waiting for entries after 5…")
    post(service, "a", "b", "live")
    expect(page.locator("#follow-result td.conversation")).to_have_text(["single a #4"])
    expect(listed(page, "conv-name")).to_have_text(["a", "c"])
    expect(listed(page, "conv-unread")).to_have_text(["1", "1"])
    expect(listed(page, "conv-latest")).to_have_text(["4", "1"])
    expect(listed(page, "conv-read")).to_have_text(["3", "0"])
    page.locator("#sync-form [name=follow]").uncheck()
    # (A last message lets go of the request the service still holds for the page.)
    post(service, "a", "b", "bye")
    console.check_clean()
