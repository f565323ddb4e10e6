"""The chat page in a real browser: Debian's chromium driven by Playwright,
against real daphne processes and the fake model server, as a user would.

Every test signs up a user of its own on a site shared by the module. The
tests are plain `def` functions: Playwright's sync API cannot run inside the
event loop pytest-asyncio gives async tests."""

import json
import os
import re
import shutil
import urllib.request
from datetime import datetime, timedelta
from urllib.parse import urlparse
from zoneinfo import ZoneInfo

import pytest
from django.conf import settings
from playwright.sync_api import expect, sync_playwright

from tests.browser_support import (
    CHROMIUM,
    LAUNCH_ARGS,
    PASSWORD,
    RecordingServer,
    SocketTap,
    all_prefixes,
    answer,
    answer_text,
    axe_violations,
    choose_model,
    conversation_id,
    describe_violations,
    eventually,
    last_reply,
    record_replies,
    samples,
    send,
    set_updated,
    sign_up,
    site_message,
    unique,
    wait_until_ready,
)
from tests.fake_llm import expected_text
from tests.helpers import free_port
from tests.live import ROOT, running_site

pytestmark = [pytest.mark.browser, pytest.mark.slow]

if not CHROMIUM.exists():
    pytest.skip(
        "Debian's chromium is not installed at /usr/bin/chromium (apt-get install chromium); "
        "the browser tests never download a browser of their own",
        allow_module_level=True,
    )

expect.set_options(timeout=15_000)

SCREENSHOTS = ROOT / "test-artifacts" / "screenshots"
# UPDATE_SCREENSHOTS=1 copies them over the README's pictures in docs/.
DOCS = ROOT / "docs"
REPLY_DONE = 30_000  # ms: the slowest fake reply takes about 6 s

# A reply with the markdown a README screenshot should show off; short
# enough that the whole reply fits a desktop window.
MARKDOWN = """## Binary search in Python

Binary search finds an item in a **sorted** list in `O(log n)` steps:

- compare the target with the middle item
- keep the half that can still hold it

| items | steps at most |
|---:|---:|
| 1,000 | 10 |
| 1,000,000 | 20 |

```python
def search(items, target):
    lo, hi = 0, len(items) - 1
    while lo <= hi:
        mid = (lo + hi) // 2
        if items[mid] < target: lo = mid + 1
        elif items[mid] > target: hi = mid - 1
        else: return mid
    return -1
```"""

# The same without a code block (see test_code_blocks_pass_axe).
MARKDOWN_WITHOUT_CODE = MARKDOWN.split("```")[0].strip()

# What a model steered by a hostile document might write. {origin} is a
# loopback host the page must never contact.
HOSTILE = """Here is what you asked for.

<img src=x onerror="window.__pwned=1">

<script>window.__pwned=2</script>

[click](javascript:window.__pwned=3)

<svg onload="window.__pwned=4"></svg>

![x]({origin}/evil.png)

Inline: <img src=x onerror="window.__pwned=5"> and <a href="javascript:window.__pwned=6">this</a>.

<iframe src="{origin}/frame"></iframe>

<img src="{origin}/raw.png">

[encoded](&#106;avascript:window.__pwned=7) and [by reference][evil].

[evil]: javascript:window.__pwned=8
"""

# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def site(tmp_path_factory, fake_llm_server):
    with running_site(tmp_path_factory.mktemp("browser-site"), fake_llm_server.base_url) as site:
        yield site


@pytest.fixture(scope="module")
def down_site(tmp_path_factory):
    """A site whose model server is a closed loopback port."""
    closed = f"http://127.0.0.1:{free_port()}/v1"
    with running_site(tmp_path_factory.mktemp("down-site"), closed) as site:
        yield site


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def limited_site(tmp_path_factory, fake_llm_server):
    """A site that lets each user send one message a minute."""
    with running_site(
        tmp_path_factory.mktemp("limited-site"), fake_llm_server.base_url, CHAT_RATE_LIMIT="1"
    ) as site:
        yield site


@pytest.fixture
def new_context(browser):
    """Make browser contexts (closed after the test). Any uncaught script
    error, or any request that leaves 127.0.0.1, fails the test."""
    contexts, errors, elsewhere = [], [], []

    def on_request(request):
        url = urlparse(request.url)
        if url.scheme in ("http", "https", "ws", "wss") and url.hostname != "127.0.0.1":
            elsewhere.append(request.url)

    def make(**options):
        context = browser.new_context(**options)
        context.set_default_timeout(15_000)
        context.on("weberror", lambda error: errors.append(str(error.error)))
        context.on("request", on_request)
        contexts.append(context)
        return context

    yield make
    for context in contexts:
        context.close()
    assert not errors, f"uncaught errors in the page: {errors}"
    assert not elsewhere, f"requests that left 127.0.0.1: {elsewhere}"


@pytest.fixture
def page(new_context, site):
    """A new user on the chat page."""
    page = new_context().new_page()
    sign_up(page, site, unique("user"))
    return page


def finished(reply, status: str = "complete") -> None:
    expect(reply).to_have_attribute("data-status", status, timeout=REPLY_DONE)


# ---------------------------------------------------------------- accounts


def test_sign_up_log_out_and_log_in(new_context, site):
    page = new_context().new_page()
    page.goto(site.url() + "/")
    expect(page).to_have_url(re.compile(r"/accounts/login/\?next=/$"))
    page.get_by_role("link", name="Create an account").click()
    expect(page.get_by_role("heading", name="Create an account")).to_be_visible()

    username = unique("newcomer")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password", exact=True).fill(PASSWORD)
    page.get_by_label("Password confirmation").fill(PASSWORD)
    page.get_by_role("button", name="Sign up").click()
    expect(page).to_have_url(site.url() + "/")
    expect(page.locator(".account-nav .username")).to_have_text(username)
    expect(page.locator("#connection-status")).to_have_text("connected")
    expect(page.locator("#prompt")).to_be_focused()

    page.get_by_role("button", name="Log out").click()
    expect(page).to_have_url(re.compile(r"/accounts/login/$"))
    page.goto(site.url() + "/")
    expect(page).to_have_url(re.compile(r"/accounts/login/\?next=/$"))

    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill("not the password")
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("alert")).to_contain_text("enter a correct username and password")

    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    expect(page).to_have_url(site.url() + "/")
    expect(page.locator(".account-nav .username")).to_have_text(username)
    wait_until_ready(page)


# ---------------------------------------------------------------- streaming


def test_answer_arrives_in_several_steps(page, site):
    model = "fake-slow"  # 40 words, 0.15 s apart
    full = expected_text(model)
    choose_model(page, model)
    record_replies(page)
    send(page, "Tell me a story")

    reply = last_reply(page)
    expect(reply).to_have_attribute("data-status", "streaming")
    expect(page.locator("#stop")).to_be_visible()
    expect(page.locator("#send")).to_be_hidden()
    expect(page.locator("#prompt")).to_be_disabled()
    finished(reply)

    assert answer_text(reply) == full
    reply_id = reply.get_attribute("data-id")
    seen = [s["answer"] for s in samples(page) if s["id"] == reply_id]
    assert seen == sorted(seen), f"the answer shrank while streaming: {seen}"
    assert all_prefixes(samples(page), full)
    partial = {s["answer"] for s in samples(page) if s["status"] == "streaming"} - {0, len(full)}
    assert len(partial) >= 3, f"the answer arrived in too few steps: {sorted(partial)}"

    expect(reply.locator(".meta-model")).to_have_text(model)
    expect(reply.locator(".meta-tokens")).to_have_text("40 tokens")
    expect(reply.locator(".meta-speed")).to_be_visible()
    expect(page.locator("#send")).to_be_visible()
    expect(page.locator("#prompt")).to_be_enabled()
    assert site_message(site, reply_id) == ("assistant", full, "complete", model)
    # Copy answer puts the exact text on the clipboard.
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    reply.get_by_role("button", name="Copy answer").click()
    expect(reply.get_by_role("button", name="Copy answer")).to_have_text("Copied")
    assert page.evaluate("() => navigator.clipboard.readText()") == full


def test_stop_keeps_the_partial_answer(page, site, fake_llm_server):
    model = "fake-slow"
    full = expected_text(model)
    cancelled_before = fake_llm_server.cancelled
    choose_model(page, model)
    send(page, "Count slowly")

    reply = last_reply(page)
    expect(answer(reply)).to_contain_text("w3")
    page.locator("#stop").click()
    finished(reply, "stopped")
    expect(reply.locator(".meta-status")).to_have_text("Stopped")

    text = answer_text(reply)
    words = text.split()
    assert 3 <= len(words) < len(full.split()), text
    assert words == full.split()[: len(words)], "the kept text is not a prefix of the answer"
    # The model server was told to stop, and the database keeps what was shown.
    assert fake_llm_server.wait_cancelled(cancelled_before + 1)
    row = eventually(
        lambda: site_message(site, reply.get_attribute("data-id")),
        lambda row: row and row[2] == "stopped",
    )
    assert row[2] == "stopped" and row[1].split() == words
    expect(page.locator("#prompt")).to_be_enabled()
    expect(reply.get_by_role("button", name="Regenerate")).to_be_visible()


def test_a_reply_cut_at_the_length_limit_says_so(page):
    """The page's sends get max_tokens 3 on their way to the server (the page
    has no such setting); the fake model stops there with finish_reason
    "length", which the page shows, live and after a reload (issue 9, item 2)."""

    def short_sends(ws):
        server = ws.connect_to_server()

        def to_server(message):
            frame = json.loads(message)
            if frame.get("type") == "send":
                frame["options"] = {**(frame.get("options") or {}), "max_tokens": 3}
                message = json.dumps(frame)
            server.send(message)

        ws.on_message(to_server)

    page.route_web_socket(re.compile(r"/ws/chat/$"), short_sends)
    page.reload()
    wait_until_ready(page)
    send(page, "Go on and on")
    reply = last_reply(page)
    finished(reply)
    expect(reply.locator(".meta-status")).to_have_text("Cut off at the length limit")
    assert answer_text(reply).split() == ["w1", "w2", "w3"]

    page.reload()
    wait_until_ready(page)
    expect(last_reply(page).locator(".meta-status")).to_have_text("Cut off at the length limit")


def test_reload_mid_reply_continues_without_gap_or_repeat(page, site):
    model = "fake:n=60,delay=0.1"
    choose_model(page, model)
    send(page, "A long answer, please")
    expect(answer(last_reply(page))).to_contain_text("w5")
    reply_id = last_reply(page).get_attribute("data-id")

    page.reload()
    record_replies(page)
    wait_until_ready(page)
    reply = page.locator(f'#messages > article[data-id="{reply_id}"]')
    # Still being written after the reload: the page picks the stream up again.
    expect(reply).to_have_attribute("data-status", "streaming")
    finished(reply)
    assert answer_text(reply) == expected_text(model)
    history = samples(page)
    assert any(s["status"] == "streaming" for s in history)
    assert all_prefixes(history, expected_text(model)), "a word was repeated or skipped"
    assert site_message(site, reply_id)[1:3] == (expected_text(model), "complete")


# What the conversation area holds when the page's own scripts have run,
# before any frame from the socket could have arrived.
AT_DOM_READY = """() => {
    document.addEventListener("DOMContentLoaded", () => {
        const box = document.querySelector("#messages");
        window.__atReady = {
            connection: document.querySelector("#connection-status").textContent,
            messages: [...box.querySelectorAll(":scope > article")].map((a) => ({
                role: a.classList.contains("user") ? "user" : "assistant",
                text: a.querySelector(".content").textContent.trim(),
                bold: a.querySelectorAll("strong").length,
            })),
        };
    });
}"""


def first_message(new_context, site, model: str, text: str):
    """A new user's tab, in a context of its own, that has sent `text` to `model`."""
    page = new_context().new_page()
    sign_up(page, site, unique("user"))
    choose_model(page, model)
    send(page, text)
    return page


def test_reload_shows_the_saved_messages_at_once(new_context, site):
    page = first_message(new_context, site, "fake:echo=raw", "Say **this** back")
    context = page.context
    finished(last_reply(page))
    url = page.url

    # In the page itself: readable even before (or without) any script.
    bare = new_context(storage_state=context.storage_state(), java_script_enabled=False).new_page()
    bare.goto(url)
    expect(bare.locator("#messages > article.user")).to_have_text("Say **this** back")
    expect(bare.locator("#messages > article.assistant")).to_have_text("Say **this** back")

    page.add_init_script(f"({AT_DOM_READY})()")
    page.reload()
    at_ready = page.evaluate("() => window.__atReady")
    assert at_ready["connection"] == "connecting…", "the socket was faster than the page"
    assert at_ready["messages"] == [
        {"role": "user", "text": "Say **this** back", "bold": 0},
        {"role": "assistant", "text": "Say this back", "bold": 1},
    ]
    # The socket's snapshot replaces them in place: nothing twice.
    wait_until_ready(page)
    expect(page.locator("#messages > article")).to_have_count(2)
    expect(answer(last_reply(page)).locator("strong")).to_have_text("this")
    expect(last_reply(page).get_by_role("button", name="Regenerate")).to_be_visible()


def test_two_tabs_show_the_same_stream(new_context, site):
    first = first_message(new_context, site, "fake-slow", "Hello, both of you")
    expect(answer(last_reply(first))).to_contain_text("w2")

    second = first.context.new_page()
    second.goto(f"{site.url()}/c/{conversation_id(first)}/")
    wait_until_ready(second)
    record_replies(second)
    expect(second.locator("#messages > article.user")).to_have_text("Hello, both of you")
    expect(last_reply(second)).to_have_attribute("data-status", "streaming")
    expect(second.locator("#stop")).to_be_visible()

    finished(last_reply(first))
    finished(last_reply(second))
    full = expected_text("fake-slow")
    assert answer_text(last_reply(first)) == full
    assert answer_text(last_reply(second)) == full
    grew = {s["answer"] for s in samples(second) if s["status"] == "streaming"}
    assert len(grew - {0, len(full)}) >= 2, "the second tab did not see the reply stream in"


def test_stop_in_the_other_tab_stops_the_reply(new_context, site):
    first = first_message(new_context, site, "fake-slow", "Stop me from the other tab")
    expect(answer(last_reply(first))).to_contain_text("w2")

    second = first.context.new_page()
    second.goto(f"{site.url()}/c/{conversation_id(first)}/")
    wait_until_ready(second)
    expect(last_reply(second)).to_have_attribute("data-status", "streaming")
    second.locator("#stop").click()

    finished(last_reply(second), "stopped")
    finished(last_reply(first), "stopped")
    expect(answer(last_reply(first))).to_have_text(answer_text(last_reply(second)))
    words = answer_text(last_reply(first)).split()
    assert words == expected_text("fake-slow").split()[: len(words)]
    for tab in (first, second):
        expect(tab.locator("#send")).to_be_visible()
        expect(tab.locator("#prompt")).to_be_enabled()


# ---------------------------------------------------------------- conversations and models


def test_rename_and_delete_conversations(page, site):
    send(page, "First topic")
    finished(last_reply(page))
    first_id = conversation_id(page)
    first = page.locator(f'#conversation-list li[data-id="{first_id}"]')
    expect(first.locator(".conversation-title")).to_have_text("First topic")

    first.get_by_role("button", name="Rename conversation").click()
    field = first.get_by_label("Conversation title")
    expect(field).to_be_focused()
    field.fill("Renamed in the browser")
    field.press("Enter")
    expect(field).to_have_count(0)
    expect(first.locator(".conversation-title")).to_have_text("Renamed in the browser")
    expect(page.locator("#chat-title")).to_have_text("Renamed in the browser")
    page.reload()
    wait_until_ready(page)
    expect(page.locator("#chat-title")).to_have_text("Renamed in the browser")
    expect(page).to_have_title(re.compile("^Renamed in the browser"))

    page.locator("#new-chat").click()
    expect(page).to_have_url(site.url() + "/")
    send(page, "Second topic")
    finished(last_reply(page))
    second_id = conversation_id(page)
    items = page.locator("#conversation-list li[data-id]")
    expect(items).to_have_count(2)
    expect(items.first).to_have_attribute("data-id", second_id)  # newest first

    # Dismissing the confirmation keeps the conversation.
    questions = []
    page.once("dialog", lambda dialog: (questions.append(dialog.message), dialog.dismiss()))
    first.get_by_role("button", name="Delete conversation").click()
    assert questions and "Renamed in the browser" in questions[0]
    expect(items).to_have_count(2)

    page.on("dialog", lambda dialog: dialog.accept())
    first.get_by_role("button", name="Delete conversation").click()
    expect(first).to_have_count(0)
    expect(page).to_have_url(re.compile(f"/c/{second_id}/$"))  # another one: we stay
    page.locator(f'li[data-id="{second_id}"]').get_by_role(
        "button", name="Delete conversation"
    ).click()
    expect(items).to_have_count(0)
    expect(page).to_have_url(site.url() + "/")  # the open one: back to a new chat
    expect(page.locator("#chat-title")).to_have_text("New chat")
    expect(page.locator("#no-conversations")).to_be_visible()

    page.reload()
    expect(items).to_have_count(0)
    for gone in (first_id, second_id):
        assert page.request.get(f"{site.url()}/c/{gone}/").status == 404


SIDEBAR_FIT = """(li) => {
    const title = li.querySelector(".conversation-title");
    return {
        cut: title.scrollWidth > title.clientWidth,
        gap: li.getBoundingClientRect().right - title.getBoundingClientRect().right,
    };
}"""


def test_sidebar_groups_by_day_and_uses_its_width(new_context, site):
    zone = ZoneInfo("Europe/Berlin")
    page = new_context(timezone_id=zone.key).new_page()
    sign_up(page, site, unique("user"))
    long_title = "How do swallows find their way back across the Mediterranean every spring"
    topics = ["Older topic", "Last week's topic", "Yesterday's topic", long_title]
    ids = []
    for topic in topics:
        page.locator("#new-chat").click()
        send(page, topic)
        finished(last_reply(page))
        ids.append(conversation_id(page))
    # Noon of a local day, so the groups do not depend on when the test runs.
    noon = datetime.now(zone).replace(hour=12, minute=0, second=0, microsecond=0)
    for conversation, days in zip(ids, (40, 4, 1), strict=False):
        set_updated(site, conversation, noon - timedelta(days=days))
    page.reload()
    wait_until_ready(page)

    groups = page.locator("#conversation-list .conversation-group")
    expect(groups.locator("h2")).to_have_text(["Today", "Yesterday", "Previous 7 days", "Older"])
    for group, topic in zip(groups.all(), reversed(topics), strict=True):
        expect(group.locator(".conversation-title")).to_have_text([topic])
    expect(page.get_by_role("group", name="Yesterday")).to_be_visible()

    # A long title takes the whole item, ends at its edge and is in full in the tooltip.
    page.mouse.move(900, 400)
    page.locator("#prompt").focus()
    item = page.locator(f'#conversation-list li[data-id="{ids[-1]}"]')
    expect(item.locator(".conversation-link")).to_have_attribute("title", long_title)
    fit = item.evaluate(SIDEBAR_FIT)
    assert fit["cut"] and fit["gap"] < 16, fit
    # Its buttons still appear for the pointer and the keyboard.
    item.hover()
    expect(item.get_by_role("button", name="Rename conversation")).to_be_visible()
    shown = item.get_by_role("button", name="Delete conversation")
    expect(shown).to_have_css("opacity", "1")


def test_other_tabs_follow_a_rename_new_settings_and_a_delete(new_context, site):
    """Needs the server to broadcast them (issue 8, item 7)."""
    first = first_message(new_context, site, "fake", "Shared topic")
    finished(last_reply(first))
    chat_id = conversation_id(first)
    second = first.context.new_page()
    second.goto(first.url)
    wait_until_ready(second)
    item = f'#conversation-list li[data-id="{chat_id}"]'

    mine = first.locator(item)
    mine.get_by_role("button", name="Rename conversation").click()
    mine.get_by_label("Conversation title").fill("Renamed elsewhere")
    mine.get_by_label("Conversation title").press("Enter")
    expect(second.locator("#chat-title")).to_have_text("Renamed elsewhere")
    expect(second.locator(f"{item} .conversation-title")).to_have_text("Renamed elsewhere")

    first.locator("#settings > summary").click()
    first.locator("#system").fill("Answer in French.")
    first.locator("#save-settings").click()
    expect(first.locator("#settings-status")).to_have_text("Saved.")
    first.locator("#model").select_option("fake-long")
    expect(second.locator("#system")).to_have_value("Answer in French.")
    expect(second.locator("#model")).to_have_value("fake-long")

    first.on("dialog", lambda dialog: dialog.accept())
    mine.get_by_role("button", name="Delete conversation").click()
    expect(second).to_have_url(site.url() + "/")
    expect(second.locator("#notice-text")).to_have_text("This conversation was deleted.")
    expect(second.locator(item)).to_have_count(0)
    expect(second.locator("#chat-title")).to_have_text("New chat")
    expect(second.locator("#messages > article")).to_have_count(0)
    # The tab that deleted it says nothing of the kind.
    expect(first).to_have_url(site.url() + "/")
    expect(first.locator("#notice")).to_be_hidden()


def test_conversation_and_deleted_frames_update_the_page(page, site):
    """The page side alone, with the frames put into the socket by the test."""
    send(page, "Topic to change")
    finished(last_reply(page))
    chat_id = conversation_id(page)
    tap = SocketTap(page)
    page.reload()
    wait_until_ready(page)
    # The page's own subscribe answers with the stored conversation frame: a
    # frame put in before that answer is through would be overwritten by it.
    tap.heard(lambda f: f.get("type") == "message", count=2)
    item = page.locator(f'#conversation-list li[data-id="{chat_id}"]')

    changed = {
        "id": chat_id,
        "title": "Changed in another tab",
        "model": "fake-long",
        "system": "Be brief.",
        "created": "2026-05-01T10:00:00+00:00",
        "updated": "2026-05-01T10:00:00+00:00",
    }
    tap.send({"type": "conversation", "conversation": changed})
    expect(page.locator("#chat-title")).to_have_text("Changed in another tab")
    expect(item.locator(".conversation-title")).to_have_text("Changed in another tab")
    expect(item.locator(".conversation-link")).to_have_attribute("title", "Changed in another tab")
    expect(page.locator("#model")).to_have_value("fake-long")
    expect(page.locator("#system")).to_have_value("Be brief.")

    tap.send({"type": "deleted", "conversation": chat_id})
    expect(page).to_have_url(site.url() + "/")
    expect(page.locator("#notice-text")).to_have_text("This conversation was deleted.")
    expect(item).to_have_count(0)
    expect(page.locator("#no-conversations")).to_be_visible()
    expect(page.locator("#chat-title")).to_have_text("New chat")
    expect(page.locator("#messages > article")).to_have_count(0)


def test_switching_model_applies_to_the_next_reply(page, site, fake_llm_server):
    send(page, "Hello")
    first = last_reply(page)
    finished(first)
    expect(first.locator(".meta-model")).to_have_text("fake")
    assert fake_llm_server.requests[-1]["model"] == "fake"

    expect(page.locator("#model")).to_have_value("fake")
    page.locator("#model").select_option("fake-long")
    send(page, "Hello again")
    replies = page.locator("#messages > article.message.assistant")
    expect(replies).to_have_count(2)
    finished(replies.nth(1))
    expect(replies.nth(1).locator(".meta-model")).to_have_text("fake-long")
    expect(replies.nth(0).locator(".meta-model")).to_have_text("fake")
    assert answer_text(replies.nth(1)) == expected_text("fake-long")
    assert fake_llm_server.requests[-1]["model"] == "fake-long"

    # The choice belongs to the conversation: it is still there after a reload.
    page.reload()
    wait_until_ready(page)
    expect(page.locator("#model")).to_have_value("fake-long")
    reply_id = replies.nth(1).get_attribute("data-id")
    assert site_message(site, reply_id)[3] == "fake-long"


# ---------------------------------------------------------------- what the model writes


INERT_CHECK = """() => {
    const box = document.querySelector("#messages");
    const handlers = [];
    for (const el of box.querySelectorAll("*")) {
        for (const attr of el.attributes) {
            const name = attr.name.toLowerCase();
            if (name.startsWith("on")) handlers.push(`${el.tagName} ${name}`);
        }
    }
    const links = [...box.querySelectorAll("a[href]")];
    return {
        pwned: typeof window.__pwned,
        scripts: box.querySelectorAll("script").length,
        svgOnload: box.querySelectorAll("svg[onload]").length,
        imgOnerror: box.querySelectorAll("img[onerror]").length,
        embedded: box.querySelectorAll("img, svg, iframe, object, embed").length,
        handlers,
        javascriptHref: box.querySelectorAll('a[href^="javascript:" i]').length,
        javascriptLinks: links.filter((a) => a.protocol === "javascript:").length,
        resources: performance.getEntriesByType("resource")
            .map((entry) => entry.name)
            .filter((name) => name.includes("127.0.0.2")),
    };
}"""


@pytest.mark.parametrize("bypass_csp", [False, True], ids=["with-csp", "sanitiser-alone"])
def test_hostile_model_output_is_inert(new_context, site, bypass_csp):
    """The page's CSP would block script and remote images by itself, so the
    test also runs with CSP bypassed: the sanitiser alone must be enough."""
    with RecordingServer("127.0.0.2") as evil:
        urllib.request.urlopen(evil.origin + "/control", timeout=5).read()
        assert evil.requests == ["GET /control"], "the recording server does not record"
        evil.requests.clear()

        context = new_context(bypass_csp=bypass_csp)
        page = context.new_page()
        dialogs, to_evil = [], []
        page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
        context.on(
            "request",
            lambda request: to_evil.append(request.url) if "127.0.0.2" in request.url else None,
        )
        sign_up(page, site, unique("user"))
        choose_model(page, "fake:echo=raw")
        hostile = HOSTILE.format(origin=evil.origin)
        send(page, hostile)

        reply = last_reply(page)
        finished(reply)
        # What the user typed is shown as typed; what the model wrote is shown
        # as text, and the image as a link to it.
        user = page.locator("#messages > article.user .content")
        assert user.evaluate("(el) => el.textContent") == hostile
        expect(answer(reply)).to_contain_text("<script>window.__pwned=2</script>")
        expect(answer(reply)).to_contain_text('<svg onload="window.__pwned=4"></svg>')
        image = answer(reply).locator("a.image-link")
        expect(image).to_have_text("Image: x")
        expect(image).to_have_attribute("href", f"{evil.origin}/evil.png")
        # A reader clicking the javascript: links runs nothing.
        for name in ("click", "encoded", "by reference"):
            answer(reply).get_by_text(name, exact=True).click()

        page.wait_for_timeout(500)  # a window for any late request or script to show up
        found = page.evaluate(INERT_CHECK)
        assert found == {
            "pwned": "undefined",
            "scripts": 0,
            "svgOnload": 0,
            "imgOnerror": 0,
            "embedded": 0,
            "handlers": [],
            "javascriptHref": 0,
            "javascriptLinks": 0,
            "resources": [],
        }
        assert dialogs == []
        assert to_evil == []
        assert evil.requests == []
        assert context.pages == [page], "a click opened another window"


def test_raw_html_blocks_are_shown_as_preformatted_text(page):
    """The sanitiser's class allow-list and the CSS must agree: the renderer's
    own raw-html wrapper keeps its class (so its style applies), while a class
    the model writes itself is still stripped."""
    choose_model(page, "fake:echo=raw")
    send(page, '<div class="composer">\n  <b>indented</b>\n</div>')
    reply = last_reply(page)
    finished(reply)
    block = answer(reply).locator("div.raw-html")
    expect(block).to_have_count(1)
    expect(block).to_have_text('<div class="composer">\n  <b>indented</b>\n</div>')
    assert block.evaluate("(el) => getComputedStyle(el).whiteSpace") == "pre-wrap"
    assert answer(reply).locator(".composer, b").count() == 0


def test_reasoning_shows_in_a_thinking_block(page):
    model = "fake-think:delay=0.2"
    choose_model(page, model)
    record_replies(page)
    send(page, "Think before you answer")

    reply = last_reply(page)
    details = reply.locator("details.reasoning")
    expect(details).to_be_visible()
    finished(reply)

    reasoning = reply.locator(".reasoning-text").evaluate("(el) => el.textContent")
    assert reasoning.split() == [f"r{i}" for i in range(1, 7)]
    text = answer_text(reply)
    assert text == expected_text(model)
    assert "r1" not in text and "think>" not in text
    expect(details).to_have_js_property("open", False)
    expect(reply.locator(".reasoning-label")).to_have_text("Thinking")

    history = samples(page)
    assert any(s["open"] and s["reasoningShown"] and s["reasoning"] for s in history), (
        "the thinking block was never open while the model was thinking"
    )
    assert not [s for s in history if s["answer"] and s["open"]], (
        "the thinking block stayed open after the answer started"
    )

    details.locator("summary").click()
    expect(details).to_have_js_property("open", True)
    expect(reply.locator(".reasoning-text")).to_be_visible()
    expect(reply.locator(".reasoning-text")).to_contain_text("r6")


def test_model_server_down_shows_an_error_and_retry(new_context, down_site):
    page = new_context().new_page()
    sign_up(page, down_site, unique("user"))
    expect(page.locator("#llm-status")).to_be_visible()
    expect(page.locator("#llm-status")).to_have_text("Model server unreachable")

    send(page, "Is anyone there?")
    reply = last_reply(page)
    finished(reply, "error")
    error = reply.locator(".message-error")
    expect(error).to_be_visible()
    expect(error.locator(".error-text")).to_contain_text("model server is not reachable")
    shown = error.inner_text()
    for jargon in ("Traceback", "Exception", "httpx", "Errno", "[object"):
        assert jargon not in shown, shown
    retry = reply.get_by_role("button", name="Retry")
    expect(retry).to_be_visible()
    # A failed reply without text offers what makes sense: Retry, not Copy.
    expect(reply.locator(".copy-answer")).to_be_hidden()
    expect(reply.get_by_role("button")).to_have_count(1)
    failed_id = reply.get_attribute("data-id")

    retry.click()
    expect(page.locator(f'#messages > article[data-id="{failed_id}"]')).to_have_count(0)
    replies = page.locator("#messages > article.message.assistant")
    expect(replies).to_have_count(1)
    finished(replies.first, "error")
    expect(replies.first.get_by_role("button", name="Retry")).to_be_visible()

    # The page is still usable: another message, another readable error.
    send(page, "Still nobody?")
    expect(replies).to_have_count(2)
    finished(replies.nth(1), "error")
    expect(replies.nth(1).locator(".error-text")).to_contain_text("not reachable")
    expect(replies.first.get_by_role("button", name="Retry")).to_have_count(0)
    expect(replies.nth(1).get_by_role("button", name="Retry")).to_be_visible()
    expect(page.locator("#prompt")).to_be_enabled()
    expect(page.locator("#send")).to_be_visible()
    expect(page.locator("#connection-status")).to_have_text("connected")


def test_keyboard_enter_shift_enter_and_escape(page):
    prompt = page.locator("#prompt")
    expect(prompt).to_be_focused()
    choose_model(page, "fake-slow")
    prompt.click()
    page.keyboard.type("line one")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("line two")
    expect(prompt).to_have_value("line one\nline two")
    expect(page.locator("#messages > article")).to_have_count(0)

    page.keyboard.press("Enter")
    user = page.locator("#messages > article.user .content")
    expect(user).to_have_text("line one\nline two")
    reply = last_reply(page)
    expect(answer(reply)).to_contain_text("w2")
    page.keyboard.press("Escape")
    finished(reply, "stopped")
    expect(prompt).to_be_focused()


HINT_BOX = """() => {
    const hint = document.querySelector(".composer-hint");
    const box = hint.getBoundingClientRect();
    return {
        text: hint.innerText.trim(),
        lines: Math.round(box.height / parseFloat(getComputedStyle(hint).lineHeight)),
        cut: hint.scrollWidth > hint.clientWidth,
        inside: box.top >= 0 && box.bottom <= innerHeight
            && box.left >= 0 && box.right <= innerWidth,
    };
}"""


def test_phone_shows_a_keyboard_hint_that_fits(new_context, site):
    login = new_context().new_page()
    sign_up(login, site, unique("user"))
    phone = new_context(
        storage_state=login.context.storage_state(),
        viewport={"width": 360, "height": 740},
        is_mobile=True,
        has_touch=True,
    ).new_page()
    phone.goto(site.url() + "/")
    wait_until_ready(phone)
    expect(phone.locator(".composer-hint")).to_be_visible()
    hint = phone.evaluate(HINT_BOX)
    assert hint["text"].startswith("Enter sends"), hint
    # One whole line inside the screen, and no key a phone keyboard lacks.
    assert hint["lines"] == 1 and not hint["cut"] and hint["inside"], hint
    assert "Escape" not in hint["text"], hint


WAIT_NOTICE = re.compile(r"^You're sending too fast — try again in [1-9][0-9]* s\.$")


def test_rate_limit_says_how_long_to_wait(new_context, limited_site):
    """Needs the server's `retry_after` (issue 8, item 5)."""
    page = first_message(new_context, limited_site, "fake", "One")
    finished(last_reply(page))
    send(page, "Two, too soon")
    expect(page.locator("#notice-text")).to_have_text(WAIT_NOTICE)
    expect(page.locator("#prompt")).to_have_value("Two, too soon")


def test_rate_limit_notice_uses_the_frames_retry_after(page):
    """The page side alone: the server's answer to a send is replaced by a
    rate_limited error carrying retry_after."""

    def answer_sends(ws):
        server = ws.connect_to_server()

        def to_server(message):
            frame = json.loads(message)
            if frame.get("type") != "send":
                server.send(message)
                return
            error = {"code": "rate_limited", "message": "Too many messages.", "retry_after": 42}
            ws.send(json.dumps({"type": "error", "id": frame["id"], **error}))

        ws.on_message(to_server)

    page.route_web_socket(re.compile(r"/ws/chat/$"), answer_sends)
    page.reload()
    wait_until_ready(page)
    send(page, "Too fast")
    notice = page.locator("#notice-text")
    expect(notice).to_have_text("You're sending too fast — try again in 42 s.")
    expect(page.locator("#prompt")).to_have_value("Too fast")
    expect(page.locator("#messages > article")).to_have_count(0)


def test_a_message_over_the_servers_limit_stays_in_the_box(page):
    limit = settings.CHAT_MAX_CONTENT
    too_long = "x" * (limit + 1)
    prompt = page.locator("#prompt")
    prompt.fill(too_long)
    prompt.press("Enter")
    expect(page.locator("#notice-text")).to_have_text(
        f"That message is too long (the limit is {limit:,} characters)."
    )
    expect(page.locator("#messages > article")).to_have_count(0)
    expect(prompt).to_have_value(too_long)


def test_back_and_forward_switch_between_conversations(page, site):
    send(page, "First topic")
    finished(last_reply(page))
    first_id = conversation_id(page)
    page.locator("#new-chat").click()
    send(page, "Second topic")
    finished(last_reply(page))
    second_id = conversation_id(page)
    user = page.locator("#messages > article.user .content")

    page.go_back()
    expect(page).to_have_url(site.url() + "/")
    expect(page.locator("#chat-title")).to_have_text("New chat")
    expect(page.locator("#messages > article")).to_have_count(0)
    page.go_back()
    expect(page).to_have_url(f"{site.url()}/c/{first_id}/")
    expect(user).to_have_text("First topic")
    expect(page.locator(f'li[data-id="{first_id}"] .conversation-link')).to_have_attribute(
        "aria-current", "page"
    )
    page.go_forward()
    page.go_forward()
    expect(page).to_have_url(f"{site.url()}/c/{second_id}/")
    expect(user).to_have_text("Second topic")


# ---------------------------------------------------------------- accessibility


def assert_accessible(page) -> None:
    violations = axe_violations(page)
    if violations:
        print(describe_violations(violations))
    assert not violations, describe_violations(violations)


def test_login_and_signup_pages_pass_axe(new_context, site):
    # The checker is injected as an inline script, which the page's CSP refuses.
    page = new_context(bypass_csp=True).new_page()
    page.goto(site.url() + "/accounts/login/")
    assert_accessible(page)
    page.get_by_label("Username").fill("nobody")
    page.get_by_label("Password").fill("wrong")
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("alert")).to_be_visible()
    assert_accessible(page)
    page.goto(site.url() + "/accounts/signup/")
    assert_accessible(page)


def chat_with_replies(new_context, site, scheme: str, markdown: str):
    page = new_context(bypass_csp=True, color_scheme=scheme).new_page()
    sign_up(page, site, unique("user"))
    choose_model(page, "fake:echo=raw")
    send(page, markdown)
    finished(last_reply(page))
    choose_model(page, "fake-think")
    send(page, "And think about it")
    # Until the second reply starts, the last reply is the first, finished:
    # without this the page could be checked mid-stream (a pulsing label).
    expect(page.locator("#messages > article.message.assistant")).to_have_count(2)
    finished(last_reply(page))
    page.locator("#settings > summary").click()
    return page


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_chat_page_with_replies_passes_axe(new_context, site, scheme):
    """Headings, lists, a table, inline code, a thinking block, the footers
    and the open settings; code blocks have a test of their own below."""
    page = chat_with_replies(new_context, site, scheme, MARKDOWN_WITHOUT_CODE)
    expect(page.locator("#messages table")).to_be_visible()
    assert_accessible(page)


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_code_blocks_pass_axe(new_context, site, scheme):
    page = chat_with_replies(new_context, site, scheme, MARKDOWN)
    expect(page.locator("#messages pre code.hljs")).to_be_visible()
    assert_accessible(page)


def test_failed_reply_passes_axe(new_context, down_site):
    page = new_context(bypass_csp=True).new_page()
    sign_up(page, down_site, unique("user"))
    send(page, "Anyone?")
    finished(last_reply(page), "error")
    expect(page.locator("#llm-status")).to_be_visible()
    assert_accessible(page)


# ---------------------------------------------------------------- screenshots

SIZES = {
    "desktop": {"viewport": {"width": 1280, "height": 800}},
    "phone": {
        "viewport": {"width": 390, "height": 844},
        "device_scale_factor": 2,
        "is_mobile": True,
        "has_touch": True,
    },
}


def test_screenshots_light_and_dark_desktop_and_phone(new_context, site):
    context = new_context(viewport=SIZES["desktop"]["viewport"])
    page = context.new_page()
    sign_up(page, site, unique("reader"))
    choose_model(page, "fake:echo=raw")
    send(page, MARKDOWN)
    finished(last_reply(page))
    # As a user would tidy up: a readable title, and a model from the server's
    # list for the next reply (the fake's echo model is not listed).
    item = page.locator("#conversation-list li[data-id]").first
    item.get_by_role("button", name="Rename conversation").click()
    item.get_by_label("Conversation title").fill("Binary search in Python")
    item.get_by_label("Conversation title").press("Enter")
    expect(page.locator("#chat-title")).to_have_text("Binary search in Python")
    with page.expect_response(lambda response: response.url.endswith("/settings/")) as saved:
        page.locator("#model").select_option("fake")
    assert saved.value.ok
    url = page.url
    login = context.storage_state()

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    backgrounds = {}
    for scheme in ("light", "dark"):
        for size, options in SIZES.items():
            shot = new_context(storage_state=login, **options).new_page()
            shot.emulate_media(color_scheme=scheme)
            shot.goto(url)
            wait_until_ready(shot)
            reply = last_reply(shot)
            finished(reply)
            expect(reply.locator("pre code.hljs")).to_be_visible()
            expect(reply.locator("table")).to_be_visible()
            shot.evaluate("() => document.fonts.ready")
            path = SCREENSHOTS / f"chat-{scheme}-{size}.png"
            shot.screenshot(path=str(path), animations="disabled", caret="hide")
            assert path.stat().st_size > 10_000
            if os.environ.get("UPDATE_SCREENSHOTS"):
                shutil.copyfile(path, DOCS / f"screenshot-{scheme}-{size}.png")
            backgrounds[scheme, size] = shot.evaluate(
                "() => getComputedStyle(document.body).backgroundColor"
            )
            if size == "phone" and scheme == "light":
                # The collapsed sidebar opens over the conversation.
                shot.locator("#sidebar-toggle").click()
                expect(shot.locator("#conversation-list li[data-id]")).to_be_visible()
                sidebar = SCREENSHOTS / "chat-light-phone-sidebar.png"
                shot.screenshot(path=str(sidebar), animations="disabled", caret="hide")
    # The dark theme follows the system setting.
    for size in SIZES:
        assert backgrounds["light", size] != backgrounds["dark", size]


# ---------------------------------------------------------------- the admin

# Registered before any page script runs; init scripts are not subject to CSP.
RECORD_CSP_VIOLATIONS = """
window.__cspViolations = [];
document.addEventListener("securitypolicyviolation", (event) => {
  window.__cspViolations.push(`${event.violatedDirective} ${event.blockedURI || "inline"}`);
});
"""


def test_the_admin_works_under_the_content_security_policy(new_context, site):
    context = new_context()
    context.add_init_script(RECORD_CSP_VIOLATIONS)
    page = context.new_page()
    refused = []
    page.on("console", lambda m: refused.append(m.text) if "Content Security" in m.text else None)
    name = unique("staff")
    sign_up(page, site, name)
    site.manage(
        "shell",
        "-c",
        "from django.contrib.auth.models import User; "
        f"User.objects.filter(username={name!r}).update(is_staff=True, is_superuser=True)",
    )
    seen = {}
    for path, ready in [
        ("/admin/", "#content-main"),
        ("/admin/conversations/conversation/", "#changelist"),
        # The user form's scripts build the two-list group picker and the
        # date and time shortcuts: the admin's busiest page for scripts.
        ("/admin/auth/user/?q=" + name, "#result_list"),
    ]:
        response = page.goto(site.url() + path)
        assert response.headers["content-security-policy"].startswith("default-src 'self'")
        expect(page.locator(ready)).to_be_visible()
        seen[path] = page.evaluate("window.__cspViolations")
    page.locator("#result_list a", has_text=name).click()
    expect(page.locator("#id_groups_from")).to_be_visible()  # built by SelectFilter2.js
    expect(page.locator(".datetimeshortcuts").first).to_be_visible()  # DateTimeShortcuts.js
    page.locator(".datetimeshortcuts a", has_text="Today").first.click()
    seen["user change form"] = page.evaluate("window.__cspViolations")
    assert all(not violations for violations in seen.values()), seen
    assert not refused, refused


def test_deleting_a_conversation_that_is_already_gone_says_so(page, site):
    send(page, "Deleted behind the page's back")
    finished(last_reply(page))
    gone = conversation_id(page)
    # Deleted without a `deleted` frame (which Redis would carry from the
    # shell to the page), as if this tab had missed it.
    site.manage(
        "shell",
        "-c",
        "from django.db.models.signals import post_delete; from conversations import models; "
        "post_delete.disconnect(models.tell_subscribers_of_deletion, models.Conversation); "
        f"models.Conversation.objects.filter(pk={gone!r}).delete()",
    )
    item = page.locator(f'#conversation-list li[data-id="{gone}"]')
    page.on("dialog", lambda dialog: dialog.accept())
    item.get_by_role("button", name="Delete conversation").click()

    expect(item).to_have_count(0)
    expect(page.locator("#notice-text")).to_have_text(
        "This conversation does not exist or was deleted."
    )
