"""Issue 10, item 3 in Chromium: a reply stored over the WebSocket frame
limit reaches the page in pieces, which the page puts back together. Plain
`def` tests, as in test_browser.py, whose Chromium, contexts and site they
share."""

import pytest
from playwright.sync_api import expect

from tests import test_browser
from tests.browser_support import answer_text, last_reply, sign_up, unique, wait_until_ready

pytestmark = [pytest.mark.browser, pytest.mark.slow]

browser = test_browser.browser
new_context = test_browser.new_context
site = test_browser.site

# One paragraph, so the rendered text is the text: 1.5 MB of UTF-8, which
# goes in two pieces, and which a page without the continuation would cut
# at about 1 MB. (Rendering megabytes of markdown takes Chromium seconds.)
WORDS, COUNT = "word あいう 😀 ", 75_000
RENDERED = 90_000  # ms

STORE_REPLY = """
from django.contrib.auth import get_user_model
from conversations.models import Conversation, Message
owner = get_user_model().objects.get(username={username!r})
conversation = Conversation.objects.create(owner=owner, title="A long one")
Message.objects.create(conversation=conversation, role="user", content="Say a lot")
text = {words!r} * {count} + "the end"
Message.objects.create(conversation=conversation, role="assistant", content=text, seq=2)
print(conversation.pk)
"""


def test_the_page_shows_a_reply_stored_over_the_frame_limit_whole(new_context, site):
    page = new_context().new_page()
    username = unique("big")
    sign_up(page, site, username)
    code = STORE_REPLY.format(username=username, words=WORDS, count=COUNT)
    conversation = site.manage("shell", "-c", code).strip().splitlines()[-1]
    assert len((WORDS * COUNT).encode()) > 1.4 * 2**20
    page.reload()
    wait_until_ready(page)
    # Opened from the sidebar: the text comes from the socket alone.
    page.locator(f'li[data-id="{conversation}"] .conversation-link').click()
    reply = last_reply(page)
    expect(reply).to_have_attribute("data-status", "complete", timeout=RENDERED)
    expect(reply.locator(".content")).to_contain_text("the end", timeout=RENDERED)
    assert answer_text(reply) == (WORDS * COUNT + "the end").strip()
    expect(page.locator("#connection-status")).to_have_text("connected")
