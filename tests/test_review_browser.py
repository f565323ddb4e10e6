"""Issue 12 in Chromium: the owner of a conversation sees that staff opened
it in the admin, and the README's pictures of the transcript and usage
pages. Plain `def` tests, as in test_browser.py, whose Chromium, contexts
and site they share."""

import os
import shutil

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
)

pytestmark = [pytest.mark.browser, pytest.mark.slow]

browser = test_browser.browser
new_context = test_browser.new_context
site = test_browser.site
finished = test_browser.finished

RECORD_CSP_VIOLATIONS = test_browser.RECORD_CSP_VIOLATIONS


def make_staff(site, username: str, *, superuser: bool = False) -> None:
    """Make a signed-up user staff: a member of the Reviewers group, or a superuser."""
    site.manage(
        "shell",
        "-c",
        "from django.contrib.auth.models import Group, User; "
        f"user = User.objects.get(username={username!r}); "
        f"user.is_staff = True; user.is_superuser = {superuser!r}; user.save(); "
        "user.groups.add(Group.objects.get(name='Reviewers'))",
    )


def admin_transcript(site, conversation: str) -> str:
    return f"{site.url()}/admin/conversations/conversation/{conversation}/change/"


def test_the_owner_sees_that_staff_reviewed_the_conversation(new_context, site):
    owner = new_context().new_page()
    sign_up(owner, site, unique("owner"))
    send(owner, "Plan a week in Lisbon")
    finished(last_reply(owner))
    reviewed = conversation_id(owner)
    owner.locator("#new-chat").click()
    send(owner, "Nobody reads this one")
    finished(last_reply(owner))
    unread = conversation_id(owner)
    assert unread != reviewed
    notice = owner.locator("#review-notice")
    owner.goto(f"{site.url()}/c/{reviewed}/")
    expect(owner.locator("#messages article.message.assistant")).to_have_count(1)
    expect(notice).to_be_hidden()

    staff = new_context()
    staff.add_init_script(RECORD_CSP_VIOLATIONS)
    reviewer = staff.new_page()
    name = unique("reviewer")
    sign_up(reviewer, site, name)
    make_staff(site, name)
    reviewer.goto(admin_transcript(site, reviewed))
    transcript = reviewer.locator(".transcript")
    expect(transcript).to_contain_text("Plan a week in Lisbon")
    expect(transcript.locator("article.transcript-assistant")).to_have_count(1)
    assert reviewer.evaluate("window.__cspViolations") == []

    # The owner opens the other conversation, then the reviewed one from the
    # sidebar, without a reload: the notice follows the conversation on screen.
    owner.goto(f"{site.url()}/c/{unread}/")
    expect(owner.locator("#chat-title")).to_have_text("Nobody reads this one")
    expect(notice).to_be_hidden()
    owner.locator(f'#conversation-list li[data-id="{reviewed}"] a.conversation-link').click()
    expect(owner.locator("#chat-title")).to_have_text("Plan a week in Lisbon")
    expect(notice).to_be_visible()
    expect(notice).to_contain_text("Staff reviewed this conversation, last on")
    expect(notice).not_to_contain_text(name)
    owner.locator("#new-chat").click()
    expect(notice).to_be_hidden()
    owner.go_back()
    expect(owner.locator("#chat-title")).to_have_text("Plan a week in Lisbon")
    expect(notice).to_be_visible()
    owner.reload()
    expect(notice).to_be_visible()


def test_screenshots_of_the_admin_transcript_and_usage_pages(new_context, site):
    owner = new_context().new_page()
    sign_up(owner, site, unique("traveller"))
    owner.locator("#settings summary").click()
    owner.locator("#system").fill("You are a travel guide. Keep answers short.")
    choose_model(owner, "fake-think")
    send(owner, "Which three sights in Lisbon should I not miss?")
    finished(last_reply(owner))
    # A regenerated reply: the transcript shows the replaced one as such.
    last_reply(owner).get_by_role("button", name="Regenerate").click()
    expect(owner.locator("#messages article.message.assistant")).to_have_count(1)
    finished(last_reply(owner))
    choose_model(owner, "fake")
    send(owner, "And where should I eat?")
    expect(owner.locator("#messages article.message.assistant")).to_have_count(2)
    finished(last_reply(owner))
    conversation = conversation_id(owner)

    staff = new_context(viewport={"width": 1280, "height": 900})
    admin = staff.new_page()
    name = unique("admin")
    sign_up(admin, site, name)
    make_staff(site, name, superuser=True)

    # A flag on the last reply, through the transcript's own link and form.
    admin.goto(admin_transcript(site, conversation))
    admin.locator("article.transcript-assistant").last.get_by_role("link", name="Flag").click()
    admin.get_by_label("Reason").fill("Recommends a restaurant that closed last year.")
    admin.get_by_role("button", name="Save", exact=True).click()
    expect(admin).to_have_url(admin_transcript(site, conversation))
    expect(admin.locator(".review-flags")).to_contain_text("closed last year")

    test_browser.SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    expect(admin.locator(".transcript-superseded")).to_have_count(1)
    expect(admin.locator(".transcript-system").first).to_be_visible()
    expect(admin.locator(".transcript-reasoning").first).to_be_visible()
    shots = {"admin-transcript": admin.locator("#content")}
    path = test_browser.SCREENSHOTS / "admin-transcript.png"
    shots["admin-transcript"].screenshot(path=str(path), animations="disabled")

    admin.goto(site.url() + "/admin/")
    admin.get_by_role("link", name="Usage").click()
    expect(admin.locator("h2", has_text="Per model")).to_be_visible()
    expect(admin.locator(".usage")).to_contain_text("fake-think")
    usage = test_browser.SCREENSHOTS / "admin-usage.png"
    admin.locator("#content").screenshot(path=str(usage), animations="disabled")

    for picture in (path, usage):
        assert picture.stat().st_size > 10_000
        if os.environ.get("UPDATE_SCREENSHOTS"):
            shutil.copyfile(picture, test_browser.DOCS / f"screenshot-{picture.name}")
