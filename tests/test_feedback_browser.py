"""Issue 12, items 11 and 12 in Chromium: a thumbs up on a reply stays
pressed after a reload and shows in the owner's other tab; a title the
model suggests replaces the first one in the sidebar and the toolbar of
every tab, without a reload. Plain `def` tests, as in test_browser.py,
whose Chromium and contexts they share; the site is one of their own, with
suggested titles on."""

import pytest
from playwright.sync_api import expect

from tests import test_browser
from tests.browser_support import (
    choose_model,
    conversation_id,
    last_reply,
    send,
    sign_up,
    unique,
    wait_until_ready,
)
from tests.live import running_site

pytestmark = [pytest.mark.browser, pytest.mark.slow]

browser = test_browser.browser
new_context = test_browser.new_context

REPLY_DONE = 30_000  # ms
QUESTION = "Tell me about prime numbers, please"


@pytest.fixture(scope="module")
def titled_site(tmp_path_factory, fake_llm_server):
    with running_site(
        tmp_path_factory.mktemp("titled-site"), fake_llm_server.base_url, CHAT_SUGGEST_TITLES="1"
    ) as site:
        yield site


def sidebar_item(page, conversation: str):
    return page.locator(f'#conversation-list li[data-id="{conversation}"]')


def test_a_thumbs_up_stays_pressed_after_a_reload_and_shows_in_the_other_tab(
    new_context, titled_site
):
    context = new_context()
    page = context.new_page()
    sign_up(page, titled_site, unique("rater"))
    choose_model(page, "fake:n=3")
    send(page, "Rate this")
    reply = last_reply(page)
    expect(reply).to_have_attribute("data-status", "complete", timeout=REPLY_DONE)
    url = page.url
    conversation_id(page)

    other = context.new_page()
    other.goto(url)
    wait_until_ready(other)
    other_up = last_reply(other).get_by_role("button", name="Good reply")
    expect(other_up).to_have_attribute("aria-pressed", "false")

    up = reply.get_by_role("button", name="Good reply")
    down = reply.get_by_role("button", name="Bad reply")
    up.click()
    expect(up).to_have_attribute("aria-pressed", "true")
    expect(down).to_have_attribute("aria-pressed", "false")
    # Rating opens the optional comment box.
    comment = reply.get_by_label("Your comment on this reply (optional)")
    expect(comment).to_be_focused()
    comment.fill("Short and right")
    reply.get_by_role("button", name="Save comment").click()
    expect(comment).to_be_hidden()
    # The other tab hears of it from the server, which has saved it by then.
    expect(other_up).to_have_attribute("aria-pressed", "true")
    other_reply = last_reply(other)
    other_reply.get_by_role("button", name="Comment on this reply").click()
    expect(other_reply.get_by_label("Your comment on this reply (optional)")).to_have_value(
        "Short and right"
    )

    page.reload()
    wait_until_ready(page)
    reply = last_reply(page)
    expect(reply.get_by_role("button", name="Good reply")).to_have_attribute("aria-pressed", "true")
    expect(reply.get_by_role("button", name="Bad reply")).to_have_attribute("aria-pressed", "false")
    reply.get_by_role("button", name="Comment on this reply").click()
    expect(reply.get_by_label("Your comment on this reply (optional)")).to_have_value(
        "Short and right"
    )

    # Pressing the pressed thumb takes the rating back, in both tabs.
    reply.get_by_role("button", name="Good reply").click()
    expect(reply.get_by_role("button", name="Good reply")).to_have_attribute(
        "aria-pressed", "false"
    )
    expect(other_up).to_have_attribute("aria-pressed", "false")
    page.reload()
    wait_until_ready(page)
    expect(last_reply(page).get_by_role("button", name="Good reply")).to_have_attribute(
        "aria-pressed", "false"
    )


def test_a_suggested_title_replaces_the_first_in_every_tab_without_a_reload(
    new_context, titled_site
):
    context = new_context()
    page = context.new_page()
    sign_up(page, titled_site, unique("titled"))
    # A tab on the new-chat page: subscribed to nothing.
    elsewhere = context.new_page()
    elsewhere.goto(titled_site.url() + "/")
    wait_until_ready(elsewhere)

    choose_model(page, "fake:n=3,title=<think>Primes then.</think>Prime numbers")
    send(page, QUESTION)
    expect(last_reply(page)).to_have_attribute("data-status", "complete", timeout=REPLY_DONE)
    conversation = conversation_id(page)

    title = sidebar_item(page, conversation).locator(".conversation-title")
    expect(title).to_have_text("Prime numbers")
    expect(page.locator("#chat-title")).to_have_text("Prime numbers")
    expect(page).to_have_title("Prime numbers · chatsite")
    expect(sidebar_item(elsewhere, conversation).locator(".conversation-title")).to_have_text(
        "Prime numbers"
    )
    # The other tab still shows its new chat.
    expect(elsewhere.locator("#chat-title")).to_have_text("New chat")
