"""Issue 12, items 10 and 13 in Chromium: a conversation's export buttons,
the Account page's export of everything (streamed by daphne), its import
and the deletion of the account. Plain `def` tests, as in test_browser.py,
whose Chromium, contexts and site they share."""

import json

import pytest
from playwright.sync_api import expect

from tests import test_browser
from tests.browser_support import (
    axe_violations,
    conversation_id,
    describe_violations,
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


def chatted(new_context, site, **options):
    page = new_context(accept_downloads=True, **options).new_page()
    sign_up(page, site, unique("exporter"))
    send(page, "Export me, please")
    finished(last_reply(page))
    return page, conversation_id(page)


def downloaded(page, click) -> tuple[str, str]:
    """(file name, text) of the download a click starts."""
    with page.expect_download() as info:
        click()
    download = info.value
    return download.suggested_filename, open(download.path(), encoding="utf-8").read()


def test_a_conversation_exports_as_markdown_and_json_from_the_sidebar(new_context, site):
    page, conversation = chatted(new_context, site)
    item = page.locator(f'#conversation-list li[data-id="{conversation}"]')
    item.hover()

    name, markdown = downloaded(
        page, lambda: item.get_by_role("link", name="Export as Markdown").click()
    )
    assert name.endswith(".md")
    assert "## You\n\nExport me, please" in markdown

    name, text = downloaded(page, lambda: item.get_by_role("link", name="Export as JSON").click())
    data = json.loads(text)
    assert name.endswith(".json")
    assert data["schema"] == "chatsite.conversations/1"
    assert [c["id"] for c in data["conversations"]] == [conversation]
    # The page stays as it was.
    expect(page).to_have_url(f"{site.url()}/c/{conversation}/")


def test_export_everything_then_import_it_on_another_account(new_context, site, tmp_path):
    page, conversation = chatted(new_context, site)
    page.get_by_role("link", name="Account").click()
    expect(page.get_by_role("heading", name="Your account", exact=True)).to_be_visible()

    _, text = downloaded(
        page, lambda: page.get_by_role("link", name="Export all conversations").click()
    )
    data = json.loads(text)
    assert [c["id"] for c in data["conversations"]] == [conversation]

    export = tmp_path / "export.json"
    export.write_text(text, encoding="utf-8")
    other = new_context().new_page()
    sign_up(other, site, unique("importer"))
    other.goto(site.url() + "/account/")
    other.get_by_label("Export file (JSON)").set_input_files(export)
    other.get_by_role("button", name="Import").click()
    expect(other.get_by_role("status")).to_have_text("Imported 1 conversation.")
    other.goto(site.url() + "/")
    expect(other.locator("#conversation-list li[data-id]")).to_have_count(1)
    imported = other.locator("#conversation-list li[data-id]").first
    assert imported.get_attribute("data-id") != conversation


def test_a_bad_file_is_refused_on_the_account_page(new_context, site, tmp_path):
    page = new_context().new_page()
    sign_up(page, site, unique("importer"))
    page.goto(site.url() + "/account/")
    bad = tmp_path / "notes.json"
    bad.write_text('{"schema": "someone.else/1"}', encoding="utf-8")

    page.get_by_label("Export file (JSON)").set_input_files(bad)
    page.get_by_role("button", name="Import").click()

    expect(page.get_by_role("alert")).to_contain_text("not a chatsite export")


def test_deleting_the_account_signs_out_and_its_login_is_gone(new_context, site):
    page, _ = chatted(new_context, site)
    username = page.locator(".account-nav .username").inner_text()
    page.goto(site.url() + "/account/")
    page.on("dialog", lambda dialog: dialog.accept())

    page.get_by_label("Your password").fill(test_browser.PASSWORD)
    page.get_by_role("button", name="Delete my account").click()

    expect(page).to_have_url(f"{site.url()}/accounts/login/")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(test_browser.PASSWORD)
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("alert")).to_be_visible()  # no such account any more


def test_the_account_page_passes_axe(new_context, site):
    # The checker is injected as an inline script, which the page's CSP refuses.
    page = new_context(bypass_csp=True).new_page()
    sign_up(page, site, unique("axe"))
    page.goto(site.url() + "/account/")
    violations = axe_violations(page)
    assert not violations, describe_violations(violations)


def test_on_a_touch_screen_only_the_open_conversation_shows_its_export_links(new_context, site):
    """Without hover the actions always show; four buttons on every item
    would leave the titles no room."""
    page = new_context(
        viewport={"width": 390, "height": 740}, is_mobile=True, has_touch=True
    ).new_page()
    sign_up(page, site, unique("phone"))
    send(page, "The first one")
    finished(last_reply(page))
    first = conversation_id(page)
    page.locator("#sidebar-toggle").tap()
    page.locator("#new-chat").tap()
    send(page, "The second one")
    finished(last_reply(page))
    second = conversation_id(page)
    page.locator("#sidebar-toggle").tap()

    def exports_of(conversation):
        return page.locator(f'#conversation-list li[data-id="{conversation}"] a.export')

    expect(exports_of(second)).to_have_count(2)
    for link in exports_of(second).all():
        expect(link).to_be_visible()
    for link in exports_of(first).all():
        expect(link).to_be_hidden()
    expect(page.locator(f'li[data-id="{first}"] .delete')).to_be_visible()
