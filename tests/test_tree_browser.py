"""Issue 13 in Chromium: edit a question, regenerate a reply and move
between the versions with the previous and next buttons, the exact texts
of every branch checked, by mouse and by keyboard; a reload shows the
same branch; a switch keeps the message where it was on screen; a reply
goes on on a branch switched away from, and a send meanwhile says so and
offers to show it; a refused edit gives its text back. Plain `def` tests
sharing test_browser.py's Chromium, contexts and site, as
test_feedback_browser.py does.

The fake model server's answer tells which branch the model was asked
along: `fake:echo=1` says the branch's last question back, `fake:n=2`
says "w1 w2" whatever it is asked."""

import pytest
from playwright.sync_api import expect

from tests import test_browser
from tests.browser_support import (
    answer,
    choose_model,
    conversation_id,
    eventually,
    last_reply,
    send,
    sign_up,
    unique,
    wait_until_ready,
)
from tests.fake_llm import expected_text

pytestmark = [pytest.mark.browser, pytest.mark.slow]

browser = test_browser.browser
new_context = test_browser.new_context
site = test_browser.site
limited_site = test_browser.limited_site
finished = test_browser.finished
assert_accessible = test_browser.assert_accessible

ECHO = "fake:echo=1"
WORDS = "fake:n=2"
FIRST = "Apples are red"
SECOND = "Bananas are yellow"

# Each message on screen, oldest first: role, text, the versions it
# offers ("" for none) and status.
SHOWN = """() => [...document.querySelectorAll("#messages > article.message")].map((el) => {
    const group = el.querySelector(".versions");
    return [
        el.classList.contains("user") ? "user" : "assistant",
        el.querySelector(".content").textContent.trim(),
        group && !group.hidden ? group.getAttribute("aria-label") : "",
        el.dataset.status,
    ];
})"""


def echoed(question: str) -> str:
    return expected_text(ECHO, [{"role": "user", "content": question}])


def shown(page) -> list[tuple]:
    return [tuple(row) for row in page.evaluate(SHOWN)]


def expect_shown(page, *messages: tuple[str, str, str]) -> None:
    """The conversation on screen is exactly these (role, text, versions),
    every message finished; waits for it as expect() would."""
    wanted = [(*m, "complete") for m in messages]
    seen = eventually(lambda: shown(page), lambda rows: rows == wanted, timeout=30)
    assert seen == wanted


def user_message(page):
    return page.locator("#messages > article.user").last


def edit(page, message, text: str) -> None:
    message.get_by_role("button", name="Edit").click()
    box = message.get_by_label("Edit your message")
    expect(box).to_be_focused()
    box.fill(text)
    box.press("Enter")


def test_edit_regenerate_and_switch_back_and_forth_with_each_branchs_own_answers(new_context, site):
    first, second = ("user", FIRST, "Version 1 of 2"), ("user", SECOND, "Version 2 of 2")
    page = new_context().new_page()
    sign_up(page, site, unique("brancher"))
    choose_model(page, WORDS)
    send(page, FIRST)
    expect_shown(page, ("user", FIRST, ""), ("assistant", expected_text(WORDS), ""))
    url = page.url
    conversation_id(page)

    # The question again in other words, to the echo model: a second version.
    choose_model(page, ECHO)
    question = user_message(page)
    question.get_by_role("button", name="Edit").click()
    box = question.get_by_label("Edit your message")
    expect(box).to_have_value(FIRST)
    box.fill(SECOND)
    box.press("Enter")
    second_answer = ("assistant", echoed(SECOND), "")
    expect_shown(page, second, second_answer)
    expect(page).to_have_url(url)

    # Back to the first question, with the answer it had.
    user_message(page).get_by_role("button", name="Previous version").click()
    expect_shown(page, first, ("assistant", expected_text(WORDS), ""))

    # Regenerate there: the conversation's model is the echo model now, and
    # it is asked along this branch, so it says the first question back.
    last_reply(page).get_by_role("button", name="Regenerate").click()
    regenerated = ("assistant", echoed(FIRST), "Version 2 of 2")
    expect_shown(page, first, regenerated)

    # Between the two answers to the first question…
    last_reply(page).get_by_role("button", name="Previous version").click()
    expect_shown(page, first, ("assistant", expected_text(WORDS), "Version 1 of 2"))
    last_reply(page).get_by_role("button", name="Next version").click()
    expect_shown(page, first, regenerated)
    # …and between the two questions: each comes back with its newest answer.
    user_message(page).get_by_role("button", name="Next version").click()
    expect_shown(page, second, second_answer)
    user_message(page).get_by_role("button", name="Previous version").click()
    expect_shown(page, first, regenerated)
    expect(user_message(page).locator(".version-count")).to_have_text("1/2")
    expect(last_reply(page).locator(".version-count")).to_have_text("2/2")

    # A reload, and a tab of its own, show the branch last chosen.
    page.reload()
    wait_until_ready(page)
    expect_shown(page, first, regenerated)
    other = page.context.new_page()
    other.goto(url)
    wait_until_ready(other)
    expect_shown(other, first, regenerated)

    # A switch in one tab shows in the other, without a reload.
    user_message(page).get_by_role("button", name="Next version").click()
    expect_shown(page, second, second_answer)
    expect_shown(other, second, second_answer)


def test_the_editor_and_the_versions_work_from_the_keyboard(new_context, site):
    page = new_context().new_page()
    sign_up(page, site, unique("typist"))
    choose_model(page, ECHO)
    send(page, FIRST)
    expect_shown(page, ("user", FIRST, ""), ("assistant", echoed(FIRST), ""))

    question = user_message(page)
    edit_button = question.get_by_role("button", name="Edit")
    edit_button.focus()
    page.keyboard.press("Enter")
    box = question.get_by_label("Edit your message")
    expect(box).to_be_focused()
    # Shift+Enter writes a new line; Escape gives up, changing nothing.
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("and round")
    expect(box).to_have_value(f"{FIRST}\nand round")
    page.keyboard.press("Escape")
    expect(box).to_have_count(0)
    expect(edit_button).to_be_focused()
    expect_shown(page, ("user", FIRST, ""), ("assistant", echoed(FIRST), ""))

    # Cancel does the same.
    page.keyboard.press("Enter")
    expect(box).to_be_focused()
    question.get_by_role("button", name="Cancel").click()
    expect(box).to_have_count(0)

    # Enter saves. A slow reply: while it is written, no message can be edited.
    choose_model(page, "fake:n=20,delay=0.1")
    edit_button.focus()
    page.keyboard.press("Enter")
    expect(box).to_be_focused()
    page.keyboard.press("End")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("and round")
    page.keyboard.press("Enter")
    reply = last_reply(page)
    expect(reply).to_have_attribute("data-status", "streaming")
    expect(user_message(page).get_by_role("button", name="Edit")).to_be_disabled()
    finished(reply)
    expect(user_message(page).get_by_role("button", name="Edit")).to_be_enabled()
    expect_shown(
        page,
        ("user", f"{FIRST}\nand round", "Version 2 of 2"),
        ("assistant", expected_text("fake:n=20"), ""),
    )

    # The version buttons are buttons: Enter on one switches, and the focus
    # stays on the buttons of the version now shown (the first has no
    # previous one, so on its next).
    previous = user_message(page).get_by_role("button", name="Previous version")
    previous.focus()
    page.keyboard.press("Enter")
    expect_shown(page, ("user", FIRST, "Version 1 of 2"), ("assistant", echoed(FIRST), ""))
    following = user_message(page).get_by_role("button", name="Next version")
    expect(following).to_be_focused()
    expect(user_message(page).get_by_role("button", name="Previous version")).to_be_disabled()
    page.keyboard.press("Space")
    expect_shown(
        page,
        ("user", f"{FIRST}\nand round", "Version 2 of 2"),
        ("assistant", expected_text("fake:n=20"), ""),
    )
    expect(user_message(page).get_by_role("button", name="Previous version")).to_be_focused()


# Where a message's top is, in pixels below the top of the scrolled view.
TOP_IN_VIEW = """(el) => el.getBoundingClientRect().top
    - document.querySelector("#messages-scroll").getBoundingClientRect().top"""


def test_a_switch_keeps_the_message_where_it_was_on_screen(new_context, site):
    page = new_context(viewport={"width": 900, "height": 600}).new_page()
    sign_up(page, site, unique("scroller"))
    long = "fake:n=400,delay=0"
    choose_model(page, long)
    send(page, "A long answer first")
    finished(last_reply(page))
    send(page, FIRST)
    expect_shown(
        page,
        ("user", "A long answer first", ""),
        ("assistant", expected_text(long), ""),
        ("user", FIRST, ""),
        ("assistant", expected_text(long), ""),
    )
    edit(page, user_message(page), SECOND)
    expect_shown(
        page,
        ("user", "A long answer first", ""),
        ("assistant", expected_text(long), ""),
        ("user", SECOND, "Version 2 of 2"),
        ("assistant", expected_text(long), ""),
    )
    # The question 100 px below the top of the view, its long answer under it.
    question = user_message(page)
    question.evaluate(
        """(el) => {
            const view = document.querySelector("#messages-scroll");
            const top = el.getBoundingClientRect().top - view.getBoundingClientRect().top;
            view.scrollTop += top - 100;
        }"""
    )
    before = question.evaluate(TOP_IN_VIEW)
    assert abs(before - 100) <= 1
    question.get_by_role("button", name="Previous version").click()
    expect(user_message(page).locator(".content")).to_have_text(FIRST)
    expect_shown(
        page,
        ("user", "A long answer first", ""),
        ("assistant", expected_text(long), ""),
        ("user", FIRST, "Version 1 of 2"),
        ("assistant", expected_text(long), ""),
    )
    after = user_message(page).evaluate(TOP_IN_VIEW)
    assert abs(after - before) <= 1, f"the question moved from {before} px to {after} px"
    expect(user_message(page).get_by_role("button", name="Next version")).to_be_in_viewport()


def test_a_refused_edit_says_why_and_gives_its_text_back(new_context, limited_site):
    """The rate limit counts edits as sends: one a minute on this site."""
    page = new_context().new_page()
    sign_up(page, limited_site, unique("hasty"))
    choose_model(page, ECHO)
    send(page, FIRST)
    expect_shown(page, ("user", FIRST, ""), ("assistant", echoed(FIRST), ""))
    edit(page, user_message(page), SECOND)
    expect(page.locator("#notice-text")).to_have_text(test_browser.WAIT_NOTICE)
    box = user_message(page).get_by_label("Edit your message")
    expect(box).to_have_value(SECOND)
    expect(box).to_be_focused()
    expect_shown(page, ("user", FIRST, ""), ("assistant", echoed(FIRST), ""))


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_versions_and_the_editor_pass_axe(new_context, site, scheme):
    page = new_context(bypass_csp=True, color_scheme=scheme).new_page()
    sign_up(page, site, unique("checked"))
    choose_model(page, ECHO)
    send(page, FIRST)
    expect_shown(page, ("user", FIRST, ""), ("assistant", echoed(FIRST), ""))
    edit(page, user_message(page), SECOND)
    expect_shown(page, ("user", SECOND, "Version 2 of 2"), ("assistant", echoed(SECOND), ""))
    last_reply(page).get_by_role("button", name="Regenerate").click()
    expect_shown(
        page, ("user", SECOND, "Version 2 of 2"), ("assistant", echoed(SECOND), "Version 2 of 2")
    )
    assert_accessible(page)
    user_message(page).get_by_role("button", name="Edit").click()
    expect(user_message(page).get_by_label("Edit your message")).to_be_focused()
    assert_accessible(page)
    expect(answer(last_reply(page))).to_have_text(echoed(SECOND))


def away_from_a_reply_being_written(page, site, slow: str) -> None:
    """An answered FIRST, edited to SECOND, whose reply from slow is being
    written when the page moves back to FIRST's version."""
    sign_up(page, site, unique("wanderer"))
    choose_model(page, ECHO)
    send(page, FIRST)
    expect_shown(page, ("user", FIRST, ""), ("assistant", echoed(FIRST), ""))
    choose_model(page, slow)
    edit(page, user_message(page), SECOND)
    expect(answer(last_reply(page))).to_contain_text("w2")
    user_message(page).get_by_role("button", name="Previous version").click()
    expect_shown(page, ("user", FIRST, "Version 1 of 2"), ("assistant", echoed(FIRST), ""))


def test_a_reply_goes_on_while_another_version_is_shown_and_comes_back_live(new_context, site):
    page = new_context().new_page()
    slow = "fake:n=60,delay=0.1"
    # Away while it is written: the first branch as it was…
    away_from_a_reply_being_written(page, site, slow)
    # …and back: the reply shown live, then whole.
    user_message(page).get_by_role("button", name="Next version").click()
    expect(user_message(page).locator(".content")).to_have_text(SECOND)
    expect(last_reply(page)).to_have_attribute("data-status", "streaming")
    expect(page.locator("#stop")).to_be_visible()
    expect_shown(page, ("user", SECOND, "Version 2 of 2"), ("assistant", expected_text(slow), ""))


def test_a_send_while_another_version_is_written_offers_to_show_it(new_context, site):
    page = new_context().new_page()
    away_from_a_reply_being_written(page, site, "fake:n=300,delay=0.1")

    # The page shows a finished branch and offers Send; the server says why
    # not, the text is kept, and the reply it waits on is one click away.
    send(page, "Third")
    notice = page.locator("#notice")
    expect(notice).to_contain_text("another version of this conversation")
    expect(page.locator("#prompt")).to_have_value("Third")
    assert page.locator("#messages > article.user").count() == 1
    notice.get_by_role("button", name="Show it").click()
    expect(notice).to_be_hidden()
    expect(user_message(page).locator(".content")).to_have_text(SECOND)
    expect(last_reply(page)).to_have_attribute("data-status", "streaming")
    page.locator("#stop").click()
    expect(last_reply(page)).to_have_attribute("data-status", "stopped")

    choose_model(page, WORDS)
    page.locator("#send").click()  # "Third" is still in the box
    expect(user_message(page).locator(".content")).to_have_text("Third")
    expect(last_reply(page)).to_have_attribute("data-status", "complete")
    expect(answer(last_reply(page))).to_have_text(expected_text(WORDS))
