"""Issue 10, item 5 in Chromium: between a reply's start and its first
token the bubble says the page is waiting for the model, and says it no
longer once the answer begins or the reply ends. Plain `def` tests, as in
test_browser.py, whose Chromium, contexts and site they share."""

import pytest
from playwright.sync_api import expect

from tests import test_browser
from tests.browser_support import (
    answer_text,
    choose_model,
    last_reply,
    send,
    sign_up,
    unique,
)
from tests.fake_llm import expected_text

pytestmark = [pytest.mark.browser, pytest.mark.slow]

browser = test_browser.browser
new_context = test_browser.new_context
site = test_browser.site

WAITING = "Waiting for the model…"
REPLY_DONE = 30_000  # ms

# Every change of the last reply, with whether the waiting line showed then.
RECORD_WAITING = """() => {
    window.__waiting = [];
    const box = document.querySelector("#messages");
    new MutationObserver(() => {
        const replies = box.querySelectorAll("article.message.assistant");
        const reply = replies[replies.length - 1];
        if (!reply) return;
        const waiting = reply.querySelector(".waiting");
        window.__waiting.push({
            status: reply.dataset.status,
            shown: Boolean(waiting) && !waiting.hidden && waiting.offsetParent !== null,
            answer: reply.querySelector(".content").textContent.length,
        });
    }).observe(box, {subtree: true, childList: true, characterData: true, attributes: true});
}"""


def waiting_samples(page) -> list[dict]:
    return page.evaluate("() => window.__waiting")


def test_a_slow_first_token_shows_waiting_for_the_model_until_the_answer_begins(new_context, site):
    page = new_context().new_page()
    sign_up(page, site, unique("waiting"))
    model = "fake:ttft=2"
    choose_model(page, model)
    page.evaluate(RECORD_WAITING)
    send(page, "Take your time")

    reply = last_reply(page)
    expect(reply).to_have_attribute("data-status", "streaming")
    expect(reply.locator(".waiting")).to_be_visible()
    expect(reply.locator(".waiting")).to_have_text(WAITING)
    expect(reply).to_have_attribute("data-status", "complete", timeout=REPLY_DONE)
    expect(reply.locator(".waiting")).to_be_hidden()
    assert answer_text(reply) == expected_text(model)

    samples = waiting_samples(page)
    assert any(s["shown"] for s in samples), samples
    # Never beside any answer text, nor on a finished reply.
    assert not [s for s in samples if s["shown"] and (s["answer"] or s["status"] != "streaming")]


def test_a_reply_that_fails_before_its_first_token_stops_waiting(new_context, site):
    page = new_context().new_page()
    sign_up(page, site, unique("waiting"))
    choose_model(page, "fake:ttft=2,fault=500")
    send(page, "Take your time")

    reply = last_reply(page)
    expect(reply.locator(".waiting")).to_be_visible()
    expect(reply).to_have_attribute("data-status", "error", timeout=REPLY_DONE)
    expect(reply.locator(".waiting")).to_be_hidden()
    expect(reply.locator(".error-detail")).to_have_text("fake internal error")
