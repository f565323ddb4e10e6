"""Issue 12, item 9 in Chromium: search from the sidebar, choose a hit, and
the conversation opens with the message scrolled into view and highlighted.
Plain `def` tests, as in test_browser.py, whose Chromium, contexts and site
they share."""

import json
import re
import uuid

import pytest
from playwright.sync_api import expect

from tests import test_browser
from tests.browser_support import sign_up, unique, wait_until_ready

pytestmark = [pytest.mark.browser, pytest.mark.slow]

browser = test_browser.browser
new_context = test_browser.new_context
site = test_browser.site

# A long conversation of the user's, the word to find in its third message
# (so that opening it at the bottom leaves that message far out of view),
# and the same word in another user's conversation, which must never show.
STORE = """
import json
from datetime import timedelta
from django.contrib.auth import get_user_model
from django.utils import timezone
from conversations.models import Conversation, Message
users = get_user_model().objects
owner = users.get(username={username!r})
stranger = users.create_user({stranger!r}, password="x")
start = timezone.now() - timedelta(hours=1)
long = Conversation.objects.create(owner=owner, title="A long talk", model="fake")
ids = []
for i in range(40):
    text = {hostile!r} if i == 2 else "filler paragraph number %d. " % i * 6
    role = "user" if i % 2 == 0 else "assistant"
    m = Message.objects.create(
        conversation=long, role=role, content=text, created=start + timedelta(seconds=i)
    )
    ids.append(str(m.pk))
other = Conversation.objects.create(owner=stranger, title="Not yours", model="fake")
Message.objects.create(conversation=other, role="user", content="{word} belongs to someone else")
print(json.dumps({{"conversation": str(long.pk), "message": ids[2]}}))
"""

# The class the page gives the message a hit brought into view.
HIGHLIGHTED = re.compile(r"(^|\s)search-target(\s|$)")


def seeded_page(new_context, site):
    page = new_context(viewport={"width": 1100, "height": 700}).new_page()
    username = unique("seeker")
    sign_up(page, site, username)
    word = f"aardvark{uuid.uuid4().hex[:8]}"
    hostile = f'The {word} lives here. <img src=x onerror="window.__pwned=1"> done'
    code = STORE.format(username=username, stranger=unique("stranger"), word=word, hostile=hostile)
    seeded = json.loads(site.manage("shell", "-c", code).strip().splitlines()[-1])
    page.reload()
    wait_until_ready(page)
    return page, word, seeded


def test_a_search_hit_opens_its_conversation_at_the_message_highlighted(new_context, site):
    page, word, seeded = seeded_page(new_context, site)

    page.get_by_role("searchbox", name="Search conversations").fill(word)

    hits = page.locator("#search-list a.search-hit")
    expect(hits).to_have_count(1)  # the stranger's conversation never shows
    hit = hits.first
    expect(hit.locator(".search-hit-title")).to_have_text("A long talk")
    expect(hit.locator("mark")).to_have_text(word)
    # The message's markup is text in the snippet, never an element.
    assert hit.locator("img").count() == 0
    expect(page.locator("#conversation-list")).to_be_hidden()

    hit.click()

    expect(page).to_have_url(f"{site.url()}/c/{seeded['conversation']}/")
    target = page.locator(f'#messages article.message[data-id="{seeded["message"]}"]')
    expect(target).to_have_class(HIGHLIGHTED)
    expect(target).to_be_in_viewport()
    # The newest message, where a conversation opens, is out of view.
    expect(page.locator("#messages article.message").last).not_to_be_in_viewport()
    assert page.evaluate("() => window.__pwned") is None


def test_escape_clears_the_search_and_brings_the_list_back(new_context, site):
    page, word, _ = seeded_page(new_context, site)
    box = page.get_by_role("searchbox", name="Search conversations")
    box.fill(word)
    expect(page.locator("#search-list a.search-hit")).to_have_count(1)

    box.press("Escape")

    expect(box).to_have_value("")
    expect(page.locator("#search-results")).to_be_hidden()
    expect(page.locator("#conversation-list")).to_be_visible()


def test_the_keyboard_reaches_a_hit_from_the_search_box_and_opens_it(new_context, site):
    page, word, seeded = seeded_page(new_context, site)
    box = page.get_by_role("searchbox", name="Search conversations")
    box.fill(word)
    hit = page.locator("#search-list a.search-hit").first
    expect(hit).to_be_visible()

    box.press("ArrowDown")
    expect(hit).to_be_focused()
    hit.press("ArrowUp")
    expect(box).to_be_focused()
    box.press("ArrowDown")
    hit.press("Enter")

    target = page.locator(f'#messages article.message[data-id="{seeded["message"]}"]')
    expect(target).to_have_class(HIGHLIGHTED)
    expect(target).to_be_focused()
    expect(target).to_be_in_viewport()


def test_a_hit_opened_in_a_new_tab_shows_the_message_highlighted(new_context, site):
    page, word, seeded = seeded_page(new_context, site)
    page.get_by_role("searchbox", name="Search conversations").fill(word)
    href = page.locator("#search-list a.search-hit").first.get_attribute("href")

    page.goto(site.url() + href)

    target = page.locator(f'#messages article.message[data-id="{seeded["message"]}"]')
    expect(target).to_have_class(HIGHLIGHTED)
    expect(target).to_be_in_viewport()
