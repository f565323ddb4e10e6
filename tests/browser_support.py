"""Helpers for the browser tests (tests/test_browser.py): launching Debian's
chromium, driving the chat page like a user, reading the site's database,
a loopback server that records whether anything tried to reach it, and the
vendored axe-core accessibility checker."""

import http.server
import json
import re
import sqlite3
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlparse

from playwright.sync_api import Locator, Page, expect

from tests.helpers import PASSWORD
from tests.live import Site

CHROMIUM = Path("/usr/bin/chromium")
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
CONVERSATION_URL = re.compile(r"/c/([0-9a-f-]{36})/$")
AXE = Path(__file__).resolve().parent / "vendor" / "axe-core-4.14.1" / "axe.min.js"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# ---------------------------------------------------------------- the page


def sign_up(page: Page, site: Site, username: str, password: str = PASSWORD) -> None:
    """Create an account through the sign-up form; ends on the chat page."""
    page.goto(site.url() + "/accounts/signup/")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password", exact=True).fill(password)
    page.get_by_label("Password confirmation").fill(password)
    page.get_by_role("button", name="Sign up").click()
    expect(page).to_have_url(site.url() + "/")
    wait_until_ready(page)


def wait_until_ready(page: Page) -> None:
    """Connected, and the server's `ready` frame has filled the model picker
    (a "fake" option exists whether or not the model server answered).

    The picker shows the default model before `ready` arrives, and `ready`
    refills it, so only `data-llm` (set by `ready` alone) proves it was read;
    waiting for less let an option a test added vanish under it."""
    expect(page.locator("#connection-status")).to_have_text("connected")
    expect(page.locator("#chat[data-llm]")).to_be_attached()
    expect(page.locator('#model option[value="fake"]')).to_be_attached()


def choose_model(page: Page, name: str) -> None:
    """Pick a model as a user would; a name the server does not list (the
    fake's parametrised ones) is added to the picker first, once `ready` has
    filled it (see wait_until_ready)."""
    expect(page.locator("#chat[data-llm]")).to_be_attached()
    page.evaluate(
        """(name) => {
            const select = document.querySelector("#model");
            const known = [...select.options].some((o) => o.value === name);
            if (!known) select.add(new Option(name, name));
        }""",
        name,
    )
    page.locator("#model").select_option(name)
    expect(page.locator("#model")).to_have_value(name)


def send(page: Page, text: str) -> None:
    prompt = page.locator("#prompt")
    expect(prompt).to_be_enabled()
    prompt.fill(text)
    prompt.press("Enter")


def last_reply(page: Page) -> Locator:
    return page.locator("#messages > article.message.assistant").last


def answer(reply: Locator) -> Locator:
    return reply.locator(".content.markdown")


def answer_text(reply: Locator) -> str:
    """The rendered answer's text, less the newline marked ends each block with."""
    return answer(reply).evaluate("(el) => el.textContent").strip()


def conversation_id(page: Page) -> str:
    expect(page).to_have_url(CONVERSATION_URL)
    return CONVERSATION_URL.search(page.url).group(1)


# A MutationObserver that writes down the last reply's state at every change
# of #messages: how the answer grew, whether reasoning was open meanwhile.
RECORD_REPLIES = """() => {
    window.__samples = [];
    const box = document.querySelector("#messages");
    const record = () => {
        const replies = box.querySelectorAll("article.message.assistant");
        const reply = replies[replies.length - 1];
        if (!reply) return;
        const details = reply.querySelector("details.reasoning");
        window.__samples.push({
            id: reply.dataset.id || "",
            status: reply.dataset.status,
            answer: reply.querySelector(".content").textContent.length,
            text: reply.querySelector(".content").textContent,
            reasoning: reply.querySelector(".reasoning-text").textContent,
            reasoningShown: !details.hidden,
            open: details.open,
        });
    };
    new MutationObserver(record).observe(box, {
        subtree: true, childList: true, characterData: true, attributes: true,
    });
}"""


def record_replies(page: Page) -> None:
    page.evaluate(RECORD_REPLIES)


def samples(page: Page) -> list[dict]:
    return page.evaluate("() => window.__samples")


def all_prefixes(history: list[dict], full: str) -> bool:
    """Whether the answer, at every recorded moment, was the start of `full`
    word for word: nothing repeated, nothing skipped, even for a moment."""
    words = full.split()
    return all(s["text"].split() == words[: len(s["text"].split())] for s in history)


# ---------------------------------------------------------------- the site's database


def site_write(site: Site, query: str, params: tuple) -> None:
    """Run one writing statement on the site's own database (reads go through
    Site.messages()). A uuid.UUID parameter is passed as each database keeps it."""
    url = site.env["DATABASE_URL"]
    if url.startswith("sqlite"):
        # Django keeps a UUID as 32 hex digits, and a datetime as UTC text, in SQLite.
        params = tuple(
            p.hex
            if isinstance(p, uuid.UUID)
            else p.astimezone(UTC).replace(tzinfo=None).isoformat(" ")
            if isinstance(p, datetime)
            else p
            for p in params
        )
        with sqlite3.connect(urlparse(url).path) as db:
            db.execute(query.replace("%s", "?"), params)
    else:
        import psycopg

        with psycopg.connect(url) as db:
            db.execute(query, params)


def site_message(site: Site, message_id: str) -> tuple[str, str, str, str] | None:
    """(role, content, status, model) of one message, read from the site's own database."""
    rows = site.messages("role", "content", "status", "model", message=message_id)
    return rows[0] if rows else None


def set_updated(site: Site, conversation: str, when: datetime) -> None:
    """Make a conversation look last used at `when` (an aware datetime)."""
    query = "UPDATE conversations_conversation SET updated = %s WHERE id = %s"
    site_write(site, query, (when, uuid.UUID(conversation)))


def eventually(read, until, timeout: float = 10.0):
    """Call read() until until(value) holds; return the last value either way."""
    deadline = time.monotonic() + timeout
    value = read()
    while not until(value) and time.monotonic() < deadline:
        time.sleep(0.05)
        value = read()
    return value


class SocketTap:
    """The page's chat sockets, routed through the test: every frame the
    server sends is recorded in frames, and send() puts a frame of the
    test's own into the newest socket, as if the server had sent it."""

    def __init__(self, page: Page):
        self.page = page
        self.routes: list = []
        self.frames: list[dict] = []
        page.route_web_socket(re.compile(r"/ws/chat/$"), self._pass_through)

    def _pass_through(self, ws) -> None:
        self.routes.append(ws)
        server = ws.connect_to_server()

        def forward(message):
            self.frames.append(json.loads(message))
            ws.send(message)

        server.on_message(forward)

    def send(self, frame: dict) -> None:
        self.routes[-1].send(json.dumps(frame))

    def heard(self, wanted, count: int = 1) -> bool:
        """Wait (up to 10 s) for count recorded frames that are wanted.
        Playwright runs the route's handlers only while the page is waited
        on, hence the page's own timeout rather than a sleep."""
        for _ in range(200):
            if sum(1 for f in self.frames if wanted(f)) >= count:
                return True
            self.page.wait_for_timeout(50)
        return False


# ---------------------------------------------------------------- a host the page must not reach


class RecordingServer:
    """An HTTP server on another loopback address (127.0.0.2) that answers
    everything with a tiny PNG and writes down every request it gets."""

    PNG = bytes.fromhex(
        "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
        "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082"
    )

    def __init__(self, host: str = "127.0.0.2"):
        self.requests: list[str] = []
        recorder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self):
                recorder.requests.append(f"{self.command} {self.path}")
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(recorder.PNG)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(recorder.PNG)

            do_GET = do_POST = do_HEAD = _answer

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer((host, 0), Handler)
        self.host, self.port = self.httpd.server_address[:2]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def origin(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> "RecordingServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# ---------------------------------------------------------------- accessibility


def axe_violations(page: Page) -> list[dict]:
    """Run axe-core's WCAG 2 A and AA rules on the page; the page's context
    must bypass CSP, since the checker is injected as an inline script."""
    if not page.evaluate("() => typeof window.axe !== 'undefined'"):
        page.add_script_tag(path=str(AXE))
    return page.evaluate(
        """async () => {
            const result = await axe.run(document, {runOnly: ["wcag2a", "wcag2aa"]});
            return result.violations.map((v) => ({
                id: v.id,
                impact: v.impact,
                help: v.help,
                nodes: v.nodes.map((n) => ({
                    target: n.target.join(" "),
                    summary: n.failureSummary,
                })),
            }));
        }"""
    )


def describe_violations(violations: list[dict]) -> str:
    lines = []
    for v in violations:
        lines.append(f"{v['id']} ({v['impact']}): {v['help']}")
        for node in v["nodes"]:
            summary = " ".join((node["summary"] or "").split())
            lines.append(f"    {node['target']}: {summary}")
    return "\n".join(lines)
