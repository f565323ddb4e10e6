"""Issue 9, items 1, 4 and 5 in Chromium: the chat page keeps working with
the socket's new rules, and a page from elsewhere on the same host cannot
use alice's cookie to open her socket. Plain `def` tests, as in
test_browser.py, whose Chromium, contexts and site they share."""

import contextlib
import http.server
import threading

import pytest
from playwright.sync_api import expect

from tests import test_browser
from tests.browser_support import (
    SocketTap,
    answer,
    conversation_id,
    last_reply,
    send,
    sign_up,
    unique,
    wait_until_ready,
)

pytestmark = [pytest.mark.browser, pytest.mark.slow]

browser = test_browser.browser
new_context = test_browser.new_context
page = test_browser.page
site = test_browser.site
finished = test_browser.finished

# Items 1, 4 and 5 in Chromium: the page, and a page from elsewhere.

OPEN_CHAT_SOCKET = """(url) => new Promise((resolve) => {
    const seen = {frames: [], closed: null};
    const ws = new WebSocket(url);
    ws.onmessage = (event) => {
        seen.frames.push(JSON.parse(event.data));
        if (seen.frames.length === 1) {
            ws.send(JSON.stringify({type: "send", conversation: null, content: "as alice"}));
        }
    };
    ws.onclose = (event) => { seen.closed = event.code; resolve(seen); };
    setTimeout(() => { ws.close(); }, 3000);
})"""


@contextlib.contextmanager
def page_server(html: str):
    """Serves one page on another port of 127.0.0.1: the same host as the
    site, so the browser sends the site's cookie with its requests."""

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = html.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def test_a_page_on_another_port_cannot_open_the_chat_socket_with_the_cookie(new_context, site):
    context = new_context()
    page = context.new_page()
    sign_up(page, site, unique("alice"))
    own = page.evaluate(OPEN_CHAT_SOCKET, site.ws_url())
    assert own["frames"][0]["type"] == "ready", own  # the site's own page gets in
    with page_server("<!doctype html><title>elsewhere</title>") as elsewhere:
        foreign = context.new_page()
        foreign.goto(elsewhere)
        seen = foreign.evaluate(OPEN_CHAT_SOCKET, site.ws_url())
    assert seen == {"frames": [], "closed": 1006}, seen
    # The own page's socket sent as alice; the foreign page's sent nothing.
    assert site.messages("content").count(("as alice",)) == 1


def test_logging_out_in_one_tab_signs_the_other_tabs_socket_out(new_context, site):
    context = new_context()
    chat = context.new_page()
    sign_up(chat, site, unique("user"))
    other = context.new_page()
    other.goto(site.url() + "/")
    other.get_by_role("button", name="Log out").click()
    expect(chat.locator("#notice-text")).to_have_text("You were signed out.")
    expect(chat.locator("#connection-status")).to_have_text("signed out")


def test_a_resubscribe_on_the_same_socket_keeps_the_messages_on_screen(page, site):
    """A gap makes the page subscribe again on its socket; the answer now
    replays only live replies, and the page keeps what it shows."""
    send(page, "Keep me")
    finished(last_reply(page))
    tap = SocketTap(page)
    page.reload()
    wait_until_ready(page)
    expect(page.locator("#messages > article")).to_have_count(2)
    assert tap.heard(lambda f: f["type"] == "pong")  # the page's replay is through
    gap = {"type": "delta", "conversation": conversation_id(page), "message": "m", "seq": 5}
    tap.send({**gap, "content": "?"})
    assert tap.heard(lambda f: f.get("replay") == "live")
    assert tap.heard(lambda f: f["type"] == "pong", count=2)
    expect(page.locator("#messages > article")).to_have_count(2)
    expect(answer(last_reply(page))).not_to_be_empty()
