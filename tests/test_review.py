"""Staff review in the Django admin (issue 12): nothing said can be changed,
the conversation list and transcript, the Reviewers group, flags, the access
log the owner is told about, and the usage page."""

import csv
import io
import json
import os
import re
import subprocess
import sys
from datetime import timedelta
from unittest.mock import ANY

import pytest
from django.contrib.auth.models import Group, Permission
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from conversations.models import Conversation, Feedback, Message
from review.models import AccessLog, Flag
from review.usage import usage
from tests.helpers import logged_in
from tests.live import ROOT

pytestmark = pytest.mark.django_db

HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)>'


def change_url(obj) -> str:
    opts = obj._meta
    return reverse(f"admin:{opts.app_label}_{opts.model_name}_change", args=[obj.pk])


def delete_url(obj) -> str:
    opts = obj._meta
    return reverse(f"admin:{opts.app_label}_{opts.model_name}_delete", args=[obj.pk])


def a_conversation(owner, *, title="Chat", model="fake", replies=1, **reply_fields):
    """A conversation with `replies` turns, each a user message and a
    finished reply carrying reply_fields."""
    conversation = Conversation.objects.create(owner=owner, title=title, model=model)
    for turn in range(replies):
        conversation.messages.create(role="user", content=f"Question {turn}")
        figures = {
            "content": f"Answer {turn}",
            "model": model,
            "prompt_tokens": 10,
            "completion_tokens": 20,
            "ttft_ms": 100,
            "duration_ms": 1100,
            **reply_fields,
        }
        conversation.messages.create(role="assistant", **figures)
    return conversation


@pytest.fixture
def reviewer(django_user_model):
    user = django_user_model.objects.create_user("rita", password="x", is_staff=True)
    user.groups.add(Group.objects.get(name="Reviewers"))
    return user


@pytest.fixture
def superuser(django_user_model):
    return django_user_model.objects.create_superuser("root", password="x")


@pytest.fixture
def chat(alice):
    return a_conversation(alice, title="Holiday plans")


# ---------------------------------------------------------------- 1. nothing said can be changed


def test_a_superuser_posting_a_message_change_form_changes_nothing(superuser, chat):
    client = logged_in(superuser)
    reply = chat.messages.get(role="assistant")
    form = {
        "content": "Rewritten",
        "reasoning": "Rewritten",
        "role": "user",
        "model": "other",
        "prompt_tokens": "1",
        "completion_tokens": "1",
    }
    response = client.post(change_url(reply), form)
    assert response.status_code == 403
    reply.refresh_from_db()
    assert (reply.content, reply.reasoning, reply.role, reply.model) == (
        "Answer 0",
        "",
        "assistant",
        "fake",
    )
    assert (reply.prompt_tokens, reply.completion_tokens) == (10, 20)


def test_a_superuser_posting_a_conversation_change_form_changes_nothing(superuser, chat):
    client = logged_in(superuser)
    response = client.post(
        change_url(chat), {"title": "Rewritten", "system_prompt": "Rewritten", "model": "other"}
    )
    assert response.status_code == 403
    chat.refresh_from_db()
    assert (chat.title, chat.system_prompt, chat.model) == ("Holiday plans", "", "fake")


def test_no_one_can_add_a_message_or_a_conversation_through_the_admin(superuser):
    client = logged_in(superuser)
    for name in ("message", "conversation", "feedback"):
        assert client.get(reverse(f"admin:conversations_{name}_add")).status_code == 403
        assert client.post(reverse(f"admin:conversations_{name}_add"), {}).status_code == 403
    assert not Message.objects.exists()


def test_the_message_page_is_read_only_for_a_superuser(superuser, chat):
    page = logged_in(superuser).get(change_url(chat.messages.get(role="assistant")))
    assert page.status_code == 200
    html = page.content.decode()
    assert 'name="content"' not in html and "<textarea" not in html
    assert 'name="_save"' not in html


def test_a_superuser_deletes_a_message_and_the_deletion_is_logged(superuser, chat):
    client = logged_in(superuser)
    reply = chat.messages.get(role="assistant")
    response = client.post(delete_url(reply), {"post": "yes"})
    assert response.status_code == 302
    assert not Message.objects.filter(pk=reply.pk).exists()
    entry = AccessLog.objects.get(action=AccessLog.Action.DELETE_MESSAGE)
    assert entry.staff == superuser and entry.conversation == chat and entry.owner == chat.owner
    assert str(reply.pk) in entry.detail


def test_a_superuser_deletes_a_conversation_and_the_log_keeps_its_id(superuser, chat):
    client = logged_in(superuser)
    response = client.post(delete_url(chat), {"post": "yes"})
    assert response.status_code == 302
    assert not Conversation.objects.filter(pk=chat.pk).exists()
    entry = AccessLog.objects.get(action=AccessLog.Action.DELETE)
    assert entry.conversation is None and entry.conversation_key == chat.pk
    assert entry.staff_username == "root"


def test_bulk_deletions_by_a_superuser_are_logged_one_by_one(superuser, alice):
    chats = [a_conversation(alice, title=f"Doomed {i}") for i in range(2)]
    keep = a_conversation(alice, title="Kept")
    client = logged_in(superuser)
    messages = reverse("admin:conversations_message_changelist")
    replies = [keep.messages.get(role="assistant").pk, keep.messages.get(role="user").pk]
    selected = {"action": "delete_selected", "_selected_action": replies, "post": "yes"}
    assert client.post(messages, selected).status_code == 302
    selected["_selected_action"] = [c.pk for c in chats]
    assert client.post(LIST, selected).status_code == 302
    assert list(Conversation.objects.all()) == [keep] and not keep.messages.exists()
    logged = AccessLog.objects.values_list("action", "conversation_key")
    assert sorted(logged) == sorted(
        [("delete_message", keep.pk)] * 2 + [("delete", c.pk) for c in chats]
    )


def test_a_superuser_can_still_delete_a_user_whose_conversations_were_reviewed(superuser, chat):
    client = logged_in(superuser)
    client.get(change_url(chat))
    Flag.objects.create(conversation=chat, reason="check", flagged_by=superuser)
    response = client.post(delete_url(chat.owner), {"post": "yes"})
    assert response.status_code == 302
    assert not Conversation.objects.exists()
    assert AccessLog.objects.get().owner is None  # the record stays, without the owner


def test_staff_who_are_not_superusers_cannot_delete(reviewer, django_user_model, chat):
    # Even given Django's delete permissions: deleting is a superuser's.
    reviewer.user_permissions.add(*Permission.objects.filter(codename__startswith="delete_"))
    client = logged_in(django_user_model.objects.get(pk=reviewer.pk))
    reply = chat.messages.get(role="assistant")
    for obj in (reply, chat):
        assert client.post(delete_url(obj), {"post": "yes"}).status_code == 403
    assert Message.objects.filter(pk=reply.pk).exists()


# ---------------------------------------------------------------- 2. the conversation list


LIST = reverse("admin:conversations_conversation_changelist")


def test_the_list_shows_owner_model_messages_tokens_flags_and_dates(admin_client, chat):
    Flag.objects.create(conversation=chat, reason="look")
    page = admin_client.get(LIST).content.decode()
    assert "Holiday plans" in page and ">alice</a>" in page
    assert '<td class="field-message_count">2</td>' in page
    assert '<td class="field-tokens">30</td>' in page
    assert "status__exact=open" in page and f"conversation__id__exact={chat.pk}" in page
    for column in ("column-model", "column-created", "column-updated", "column-flags"):
        assert column in page


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        pytest.param({"last_status": "error"}, {"Failed"}, id="last reply failed"),
        pytest.param({"last_status": "complete"}, {"Fine", "Rated"}, id="last reply complete"),
        pytest.param({"flagged": "open"}, {"Failed"}, id="open flags"),
        pytest.param({"flagged": "ever"}, {"Failed", "Fine"}, id="ever flagged"),
        pytest.param({"flagged": "never"}, {"Rated"}, id="never flagged"),
        pytest.param({"feedback": "yes"}, {"Rated"}, id="with feedback"),
        pytest.param({"feedback": "no"}, {"Failed", "Fine"}, id="without feedback"),
        pytest.param({"model": "other"}, {"Rated"}, id="model"),
        pytest.param({"q": "Answer 0"}, {"Failed", "Fine", "Rated"}, id="search message text"),
        pytest.param({"q": "bob"}, {"Rated"}, id="search owner"),
        pytest.param({"q": "Fine"}, {"Fine"}, id="search title"),
    ],
)
def test_the_list_filters_and_searches(admin_client, alice, bob, query, expected):
    failed = a_conversation(alice, title="Failed")
    failed.messages.create(role="user", content="again")
    failed.messages.create(role="assistant", status="error", error_code="timeout")
    Flag.objects.create(conversation=failed, reason="errors")
    fine = a_conversation(alice, title="Fine")
    Flag.objects.create(conversation=fine, reason="ok", status="resolved")
    rated = a_conversation(bob, title="Rated", model="other")
    Feedback.objects.create(message=rated.messages.get(role="assistant"), rating=1)
    response = admin_client.get(LIST, query)
    assert response.status_code == 200
    shown = {str(c) for c in response.context["cl"].result_list}
    assert shown == expected


def test_the_list_can_filter_by_owner(admin_client, alice, bob):
    a_conversation(alice, title="Alice's")
    a_conversation(bob, title="Bob's")
    response = admin_client.get(LIST, {"owner__id__exact": bob.pk})
    assert [str(c) for c in response.context["cl"].result_list] == ["Bob's"]


def list_queries(client, rows: int, owner) -> int:
    Conversation.objects.all().delete()
    for index in range(rows):
        chat = a_conversation(owner, title=f"Chat {index}", replies=2)
        Flag.objects.create(conversation=chat, reason="why")
        Feedback.objects.create(message=chat.messages.filter(role="assistant").first(), rating=-1)
    with CaptureQueriesContext(connection) as queries:
        response = client.get(LIST)
    assert response.status_code == 200
    assert len(response.context["cl"].result_list) == rows
    return len(queries)


def test_the_list_takes_as_many_queries_for_25_rows_as_for_5(admin_client, alice):
    assert list_queries(admin_client, 5, alice) == list_queries(admin_client, 25, alice)


# ---------------------------------------------------------------- 3. the transcript


def test_the_transcript_shows_every_message_in_order_with_its_figures(admin_client, alice):
    chat = Conversation.objects.create(owner=alice, model="fake", system_prompt="Be brief.")
    chat.messages.create(role="user", content="First question")
    chat.messages.create(
        role="assistant",
        content="Replaced answer",
        superseded=True,
        model="old-model",
        status="stopped",
        system_prompt="Be thorough.",
    )
    chat.messages.create(
        role="assistant",
        content="Final answer",
        reasoning="Thinking it over",
        model="new-model",
        options={"temperature": 0.5},
        system_prompt="Be brief.",
        prompt_tokens=12,
        completion_tokens=40,
        ttft_ms=250,
        duration_ms=2250,
    )
    page = admin_client.get(change_url(chat)).content.decode()
    transcript = page[page.index('class="transcript"') :]
    articles = transcript.split("<article")[1:]
    assert [
        next(t for t in ("First question", "Replaced answer", "Final answer") if t in a)
        for a in articles
    ] == ["First question", "Replaced answer", "Final answer"]
    user, replaced, final = articles
    assert "User" in user and "transcript-figures" not in user
    # Two versions of the reply: the regenerated one is off the active path.
    assert "transcript-superseded" in replaced and "not on the active path" in replaced
    assert "version 1 of 2" in replaced
    assert "old-model" in replaced and "Stopped" in replaced
    assert "transcript-superseded" not in final and "not on the active path" not in final
    assert "version 2 of 2" in final and "transcript-active" in final
    assert "new-model" in final and "Complete" in final
    assert "12 in, 40 out" in final and "250 ms" in final and "20.0 tokens/s" in final
    assert '<details class="transcript-reasoning">' in final and "Thinking it over" in final
    assert "&quot;temperature&quot;: 0.5" in final
    # Each reply with the system prompt it was written with.
    assert "Be thorough." in replaced and "Be brief." not in replaced
    assert '<details class="transcript-system">' in final and "Be brief." in final
    # A transcript, not a grid of form fields.
    assert "<textarea" not in page and "tabular" not in page


def finish(reply: Message, content: str) -> None:
    reply.content, reply.status = content, "complete"
    reply.save(update_fields=["content", "status"])


def a_branched_conversation(owner) -> Conversation:
    """Made as the site makes it (issue 13): a reply regenerated, a turn
    after the new version, then the first question edited and answered."""
    chat = Conversation.objects.create(owner=owner, title="Travel", model="fake")
    question, reply, _ = chat.start_turn("Where should I go in May?", "fake", {})
    finish(reply, "Lisbon.")
    _, reply, _ = chat.start_turn(None, "fake", {})
    finish(reply, "Porto.")
    _, reply, _ = chat.start_turn("And in June?", "fake", {})
    finish(reply, "Madeira.")
    _, reply, _ = chat.start_turn("Where should I go in October?", "fake", {}, editing=question)
    finish(reply, "Seville.")
    return chat


def transcript_rows(page: str) -> list[tuple[str, str, str, str, str]]:
    """Each article of the transcript as (level, text, version label,
    path badge, class marking the path), in page order."""
    transcript = page[page.index('class="transcript"') :]
    rows = []
    for article in transcript.split("<article")[1:]:
        article = article.split("</article>")[0]
        level = re.search(r'data-level="(\d+)"', article)
        text = re.search(r'<pre class="transcript-content">(.*?)</pre>', article, re.S)
        version = re.search(r'<span class="transcript-version">(.*?)</span>', article)
        badge = re.search(r'<span class="transcript-badge[^"]*">(.*?)</span>', article)
        marked = "transcript-active" if "transcript-active" in article else "transcript-superseded"
        assert level and text and marked in article.split(">")[0], article
        rows.append(
            (
                level[1],
                text[1],
                version[1] if version else "",
                badge[1] if badge else "",
                marked,
            )
        )
    return rows


ON, OFF = "transcript-active", "transcript-superseded"
OFF_PATH = "not on the active path"


def test_the_transcript_shows_the_tree_in_order_with_versions_and_the_active_path(
    admin_client, alice
):
    chat = a_branched_conversation(alice)
    page = admin_client.get(change_url(chat)).content.decode()
    # Depth-first, versions oldest first, each version one level in from
    # the message it follows; the edited question's branch is the path.
    assert transcript_rows(page) == [
        ("1", "Where should I go in May?", "version 1 of 2", OFF_PATH, OFF),
        ("2", "Lisbon.", "version 1 of 2", OFF_PATH, OFF),
        ("2", "Porto.", "version 2 of 2", OFF_PATH, OFF),
        ("2", "And in June?", "", OFF_PATH, OFF),
        ("2", "Madeira.", "", OFF_PATH, OFF),
        ("1", "Where should I go in October?", "version 2 of 2", "active path", ON),
        ("1", "Seville.", "", "active path", ON),
    ]
    first = 'class="transcript-message transcript-user transcript-level-1 transcript-superseded"'
    assert first in page
    assert "The 2 messages marked" in page and "its 7 messages" in page

    # Switching back to the regenerated reply moves the marks, not the order.
    porto = chat.messages.get(content="Porto.")
    chat.switch(porto.pk)
    page = admin_client.get(change_url(chat)).content.decode()
    assert [(text, badge) for _, text, _, badge, _ in transcript_rows(page)] == [
        ("Where should I go in May?", "active path"),
        ("Lisbon.", OFF_PATH),
        ("Porto.", "active path"),
        ("And in June?", "active path"),
        ("Madeira.", "active path"),
        ("Where should I go in October?", OFF_PATH),
        ("Seville.", OFF_PATH),
    ]


def test_a_conversation_without_versions_is_one_unlabelled_level(admin_client, chat):
    page = admin_client.get(change_url(chat)).content.decode()
    assert transcript_rows(page) == [
        ("0", "Question 0", "", "", ON),
        ("0", "Answer 0", "", "", ON),
    ]
    assert "transcript-legend" not in page


def test_versions_deeper_than_the_indents_keep_their_level_and_labels(admin_client, alice):
    chat = Conversation.objects.create(owner=alice, model="fake")
    for depth in range(8):
        _, reply, _ = chat.start_turn(f"Q{depth}", "fake", {})
        finish(reply, f"A{depth}")
        _, reply, _ = chat.start_turn(None, "fake", {})
        finish(reply, f"A{depth} again")
    page = admin_client.get(change_url(chat)).content.decode()
    rows = transcript_rows(page)
    assert len(rows) == 24 and rows[-1] == ("8", "A7 again", "version 2 of 2", "active path", ON)
    assert 'transcript-level-6 transcript-active" data-status="complete" data-level="8"' in page


def test_a_reviewer_reads_every_version_of_a_branched_conversation(reviewer, alice):
    chat = a_branched_conversation(alice)
    page = logged_in(reviewer).get(change_url(chat))
    assert page.status_code == 200
    texts = [text for _, text, _, _, _ in transcript_rows(page.content.decode())]
    assert texts == [
        "Where should I go in May?",
        "Lisbon.",
        "Porto.",
        "And in June?",
        "Madeira.",
        "Where should I go in October?",
        "Seville.",
    ]


def transcript_queries(client, chat) -> int:
    with CaptureQueriesContext(connection) as queries:
        response = client.get(change_url(chat))
    assert response.status_code == 200
    return len(queries)


def test_the_transcript_takes_as_many_queries_however_big_the_tree(admin_client, alice):
    chat = a_branched_conversation(alice)
    Flag.objects.create(conversation=chat, reason="why")
    few = transcript_queries(admin_client, chat)
    for turn in range(5):
        question, reply, _ = chat.start_turn(f"More {turn}", "fake", {})
        finish(reply, f"Reply {turn}")
        Feedback.objects.create(message=reply, rating=1)
        _, reply, _ = chat.start_turn(None, "fake", {})
        finish(reply, f"Reply {turn} again")
        _, reply, _ = chat.start_turn(f"Edited {turn}", "fake", {}, editing=question)
        finish(reply, f"Reply {turn} edited")
        Flag.objects.create(conversation=chat, message=reply, reason="why")
    assert chat.messages.count() == 7 + 5 * 5
    assert transcript_queries(admin_client, chat) == few


def test_the_message_page_shows_what_it_follows_and_its_versions(admin_client, alice):
    chat = a_branched_conversation(alice)
    lisbon, porto = chat.messages.get(content="Lisbon."), chat.messages.get(content="Porto.")
    page = admin_client.get(change_url(porto)).content.decode()
    may = chat.messages.get(content="Where should I go in May?")
    assert f'<a href="{change_url(may)}">user: Where should I go in May?</a>' in page
    assert f'version 2 of 2 (the others: <a href="{change_url(lisbon)}">1</a>)' in page
    on_path = page.split("On the active path:")[1].split("</div>")[0]
    assert 'alt="False"' in on_path
    seville = chat.messages.get(content="Seville.")
    page = admin_client.get(change_url(seville)).content.decode()
    assert "the only version" in page
    assert 'alt="True"' in page.split("On the active path:")[1].split("</div>")[0]
    october = chat.messages.get(content="Where should I go in October?")
    assert "- (the first message)" in admin_client.get(change_url(october)).content.decode()


def test_the_message_list_filters_by_the_active_path(admin_client, alice):
    a_branched_conversation(alice)
    url = reverse("admin:conversations_message_changelist")
    shown = admin_client.get(url, {"on_path": "yes"}).context["cl"].result_list
    assert sorted(m.content for m in shown) == ["Seville.", "Where should I go in October?"]
    shown = admin_client.get(url, {"on_path": "no"}).context["cl"].result_list
    assert len(shown) == 5


def test_a_reply_keeps_the_system_prompt_it_was_written_with(alice):
    chat = Conversation.objects.create(owner=alice, model="fake", system_prompt="Be brief.")
    _, first, _ = chat.start_turn("Hi", "fake", {})
    first.status = "complete"
    first.save()
    chat.change_settings({"system_prompt": "Be thorough."})
    _, again, replaced = chat.start_turn(None, "fake", {})
    replaced.refresh_from_db()
    assert (replaced.system_prompt, again.system_prompt) == ("Be brief.", "Be thorough.")
    assert chat.messages.get(role="user").system_prompt == ""


def test_hostile_stored_text_is_escaped_in_the_transcript(admin_client, alice):
    chat = Conversation.objects.create(
        owner=alice, model=HOSTILE[:40], title=HOSTILE, system_prompt=HOSTILE
    )
    chat.messages.create(role="user", content=HOSTILE)
    reply = chat.messages.create(
        role="assistant",
        content=HOSTILE,
        reasoning=HOSTILE,
        model=HOSTILE[:40],
        options={"stop": [HOSTILE]},
        system_prompt=HOSTILE,
        status="error",
        error_code="timeout",
        error=HOSTILE,
        error_detail=HOSTILE,
    )
    Feedback.objects.create(message=reply, rating=-1, comment=HOSTILE)
    Flag.objects.create(conversation=chat, message=reply, reason=HOSTILE, notes=HOSTILE)
    pages = [
        change_url(chat),
        change_url(reply),
        LIST,
        reverse("admin:review_flag_changelist"),
        reverse("admin:conversations_feedback_changelist"),
        reverse("admin:conversations_message_changelist"),
    ]
    for url in pages:
        page = admin_client.get(url).content.decode()
        assert "<script>alert" not in page and "<img src=x" not in page, url
        assert "&lt;script&gt;alert" in page, url


# ---------------------------------------------------------------- 4. reviewers


def test_the_reviewers_group_has_only_the_reviewing_permissions():
    group = Group.objects.get(name="Reviewers")
    granted = {
        f"{p.content_type.app_label}.{p.codename}"
        for p in group.permissions.select_related("content_type")
    }
    assert granted == {
        "conversations.view_conversation",
        "conversations.view_message",
        "conversations.view_feedback",
        "review.view_flag",
        "review.add_flag",
        "review.change_flag",
        "review.view_accesslog",
    }


def test_a_reviewer_reads_a_transcript_but_cannot_change_or_delete(reviewer, chat):
    client = logged_in(reviewer)
    reply = chat.messages.get(role="assistant")
    page = client.get(change_url(chat))
    assert page.status_code == 200 and "Answer 0" in page.content.decode()
    assert client.get(change_url(reply)).status_code == 200
    assert client.post(change_url(reply), {"content": "Rewritten"}).status_code == 403
    assert client.post(change_url(chat), {"title": "Rewritten"}).status_code == 403
    assert client.get(delete_url(reply)).status_code == 403
    assert client.get(delete_url(chat)).status_code == 403
    reply.refresh_from_db()
    chat.refresh_from_db()
    assert reply.content == "Answer 0" and chat.title == "Holiday plans"
    assert "delete_selected" not in client.get(LIST).content.decode()


def test_a_reviewer_sees_nothing_but_the_review_pages(reviewer):
    client = logged_in(reviewer)
    for name in ("auth_user", "auth_group", "conversations_apitoken"):
        assert client.get(reverse(f"admin:{name}_changelist")).status_code == 403, name
    index = client.get(reverse("admin:index")).content.decode()
    assert reverse("admin:review_flag_changelist") in index
    assert reverse("admin-usage") in index
    assert reverse("admin:auth_user_changelist") not in index


# ---------------------------------------------------------------- 5. flags


def test_a_reviewer_flags_a_message_from_the_transcript(reviewer, chat):
    client = logged_in(reviewer)
    reply = chat.messages.get(role="assistant")
    page = client.get(change_url(chat)).content.decode()
    add = reverse("admin:review_flag_add")
    assert f"{add}?conversation={chat.pk}&amp;message={reply.pk}" in page
    response = client.post(
        add, {"conversation": chat.pk, "message": reply.pk, "reason": "Rude answer"}
    )
    assert response.status_code == 302 and response["Location"] == change_url(chat)
    flag = Flag.objects.get()
    assert (flag.message, flag.flagged_by, flag.status) == (reply, reviewer, "open")
    page = client.get(change_url(chat)).content.decode()
    assert "Rude answer" in page
    flagged = page.split(f'id="message-{reply.pk}"')[1].split("</article>")[0]
    assert "transcript-flagged" in flagged
    assert page.count("transcript-flagged") == 1


def test_a_flag_on_a_message_of_another_conversation_is_refused(reviewer, alice, chat):
    other = a_conversation(alice, title="Other")
    client = logged_in(reviewer)
    response = client.post(
        reverse("admin:review_flag_add"),
        {
            "conversation": chat.pk,
            "message": other.messages.first().pk,
            "reason": "Mismatch",
        },
    )
    assert response.status_code == 200 and not Flag.objects.exists()


def test_a_reviewer_resolves_a_flag_with_notes(reviewer, chat):
    flag = Flag.objects.create(conversation=chat, reason="Check this")
    client = logged_in(reviewer)
    response = client.post(change_url(flag), {"status": "resolved", "notes": "Looked fine"})
    assert response.status_code == 302
    flag.refresh_from_db()
    assert (flag.status, flag.notes, flag.resolved_by) == ("resolved", "Looked fine", reviewer)
    assert flag.resolved_at is not None and flag.reason == "Check this"


def test_conversations_are_flagged_in_bulk_with_a_reason(reviewer, alice):
    chats = [a_conversation(alice, title=f"Bulk {i}") for i in range(3)]
    client = logged_in(reviewer)
    selected = {"action": "flag_selected", "_selected_action": [c.pk for c in chats[:2]]}
    asked = client.post(LIST, selected)
    assert asked.status_code == 200 and 'name="reason"' in asked.content.decode()
    assert not Flag.objects.exists()
    done = client.post(LIST, {**selected, "apply": "1", "reason": "Spam run"})
    assert done.status_code == 302
    assert sorted(f.conversation.title for f in Flag.objects.all()) == ["Bulk 0", "Bulk 1"]
    assert {f.flagged_by for f in Flag.objects.all()} == {reviewer}


def test_messages_are_flagged_in_bulk(reviewer, chat):
    reply = chat.messages.get(role="assistant")
    client = logged_in(reviewer)
    url = reverse("admin:conversations_message_changelist")
    client.post(
        url,
        {"action": "flag_selected", "_selected_action": [reply.pk], "apply": "1", "reason": "x"},
    )
    flag = Flag.objects.get()
    assert flag.message == reply and flag.conversation == chat


def test_flags_are_resolved_in_bulk_and_the_queue_splits_open_from_resolved(reviewer, alice):
    open_, done, other = (
        Flag.objects.create(conversation=a_conversation(alice), reason=r) for r in "abc"
    )
    client = logged_in(reviewer)
    queue = reverse("admin:review_flag_changelist")
    client.post(queue, {"action": "resolve_selected", "_selected_action": [done.pk, other.pk]})
    done.refresh_from_db()
    assert done.status == "resolved" and done.resolved_by == reviewer
    waiting = client.get(queue, {"status__exact": "open"}).context["cl"].result_list
    assert list(waiting) == [open_]
    resolved = client.get(queue, {"status__exact": "resolved"}).context["cl"].result_list
    assert set(resolved) == {done, other}


# ---------------------------------------------------------------- 6. the access log


def test_opening_a_conversation_or_a_message_is_logged(reviewer, chat):
    client = logged_in(reviewer)
    before = timezone.now()
    client.get(change_url(chat))
    client.get(change_url(chat.messages.get(role="assistant")))
    entries = list(AccessLog.objects.order_by("pk"))
    assert [e.action for e in entries] == ["view", "view_message"]
    assert {(e.staff, e.conversation, e.owner) for e in entries} == {(reviewer, chat, chat.owner)}
    assert all(e.created >= before for e in entries)


def test_lists_and_refused_posts_are_not_logged_as_openings(reviewer, chat):
    client = logged_in(reviewer)
    client.get(LIST)
    client.post(change_url(chat), {"title": "x"})
    assert not AccessLog.objects.exists()


def test_staff_opening_their_own_conversation_is_no_review(superuser):
    own = a_conversation(superuser)
    logged_in(superuser).get(change_url(own))
    assert not AccessLog.objects.exists()


def test_the_export_records_its_access_through_record(reviewer, alice, bob):
    chats = [a_conversation(alice), a_conversation(bob), a_conversation(reviewer)]
    rows = AccessLog.objects.record(reviewer, Conversation.objects.all(), AccessLog.Action.EXPORT)
    assert len(rows) == 2
    assert {e.conversation for e in AccessLog.objects.filter(action="export")} == set(chats[:2])


def test_a_reviewer_downloads_selected_conversations_as_json_lines_and_it_is_logged(
    reviewer, alice, bob
):
    """Item 8: the admin action, one conversation a line in the schema of
    docs/export.md; each owner's conversation shows the export in the log."""
    chats = [a_conversation(alice, title="One"), a_conversation(bob, title="Two")]
    a_conversation(alice, title="Not selected")
    response = logged_in(reviewer).post(
        LIST, {"action": "download_jsonl", "_selected_action": [c.pk for c in chats]}
    )
    assert response.status_code == 200
    assert response["Content-Type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in response.content.decode().splitlines()]
    assert sorted(line["title"] for line in lines) == ["One", "Two"]
    assert {line["schema"] for line in lines} == {"chatsite.conversations/1"}
    assert [m["content"] for m in lines[0]["messages"]] == ["Question 0", "Answer 0"]
    logged = AccessLog.objects.filter(action=AccessLog.Action.EXPORT)
    assert {e.conversation for e in logged} == set(chats)


def test_the_access_log_is_read_only_even_for_superusers(superuser, chat):
    client = logged_in(superuser)
    client.get(change_url(chat))
    entry = AccessLog.objects.get()
    assert client.get(reverse("admin:review_accesslog_changelist")).status_code == 200
    assert client.get(reverse("admin:review_accesslog_add")).status_code == 403
    assert client.post(change_url(entry), {"staff_username": "nobody"}).status_code == 403
    assert client.post(delete_url(entry), {"post": "yes"}).status_code == 403
    listing = client.post(
        reverse("admin:review_accesslog_changelist"),
        {"action": "delete_selected", "_selected_action": [entry.pk], "post": "yes"},
    )
    assert listing.status_code in (200, 302)
    entry.refresh_from_db()
    assert entry.staff_username == "root"


NOTICE_SHOWN = '<p id="review-notice" class="review-notice">'
NOTICE_HIDDEN = '<p id="review-notice" class="review-notice" hidden>'


def reviews_listed(page: str) -> dict:
    """The page's #reviews: when each of the user's conversations was reviewed."""
    data = page.split('<script id="reviews" type="application/json">')[1].split("</script>")[0]
    return json.loads(data)


def test_the_owner_is_told_when_staff_reviewed_the_conversation(client, alice, reviewer, chat):
    client.force_login(alice)
    page = client.get(chat.get_absolute_url()).content.decode()
    assert NOTICE_HIDDEN in page and reviews_listed(page) == {}
    logged_in(reviewer).get(change_url(chat))
    logged_in(reviewer).get(change_url(chat))
    page = client.get(chat.get_absolute_url()).content.decode()
    assert NOTICE_SHOWN in page and "Staff reviewed this conversation" in page
    assert "(2 times)" in page
    last = AccessLog.objects.latest("created").created
    assert f'datetime="{last.isoformat()}"' in page
    assert "rita" not in page  # not by whom
    # Only on the conversation that was reviewed; the page knows which that
    # is, for switching to it without a reload.
    other = a_conversation(alice, title="Unseen")
    page = client.get(other.get_absolute_url()).content.decode()
    assert NOTICE_HIDDEN in page
    assert reviews_listed(page) == {str(chat.pk): {"last": ANY, "times": 2}}
    assert NOTICE_HIDDEN in client.get(reverse("conversations:chat")).content.decode()


def test_nobody_is_told_of_reviews_of_another_users_conversations(client, bob, reviewer, chat):
    logged_in(reviewer).get(change_url(chat))
    client.force_login(bob)
    assert reviews_listed(client.get(reverse("conversations:chat")).content.decode()) == {}


def test_chat_show_reviews_off_hides_the_notice(client, alice, reviewer, chat, settings):
    settings.CHAT_SHOW_REVIEWS = False
    logged_in(reviewer).get(change_url(chat))
    client.force_login(alice)
    page = client.get(chat.get_absolute_url()).content.decode()
    assert NOTICE_HIDDEN in page and reviews_listed(page) == {}
    assert AccessLog.objects.count() == 1  # still logged


def read_setting(value: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CHAT_SHOW_REVIEWS": value, "DJANGO_SETTINGS_MODULE": "chatsite.settings"}
    code = "from django.conf import settings; print(settings.CHAT_SHOW_REVIEWS)"
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )


def test_chat_show_reviews_is_parsed_strictly():
    assert read_setting("off").stdout.strip() == "False"
    assert read_setting("").stdout.strip() == "True"
    typo = read_setting("of")
    assert typo.returncode != 0 and "CHAT_SHOW_REVIEWS='of'" in typo.stderr


# ---------------------------------------------------------------- 7. usage


USAGE = reverse("admin-usage")


@pytest.fixture
def traffic(alice, bob):
    """alice: two fake replies (one failed, one thumbs up); bob: one other
    reply (thumbs down); and an old reply outside the last 30 days."""
    first = a_conversation(alice, replies=2)
    failed = first.messages.filter(role="assistant").last()
    failed.status, failed.completion_tokens = "error", 0
    failed.save()
    Feedback.objects.create(message=first.messages.filter(role="assistant").first(), rating=1)
    second = a_conversation(bob, model="other", ttft_ms=300, duration_ms=600, completion_tokens=30)
    Feedback.objects.create(message=second.messages.get(role="assistant"), rating=-1)
    old = a_conversation(bob, model="ancient")
    old.messages.update(created=timezone.now() - timedelta(days=40))
    return old


def test_usage_per_user_model_and_day_over_the_last_30_days(admin_client, traffic):
    response = admin_client.get(USAGE)
    assert response.status_code == 200
    figures = response.context["figures"]
    by_user = {row["name"]: row for row in figures["tables"]["user"]}
    assert by_user["alice"]["replies"] == 2 and by_user["alice"]["output_tokens"] == 20
    assert by_user["bob"]["replies"] == 1
    by_model = {row["name"]: row for row in figures["tables"]["model"]}
    assert set(by_model) == {"fake", "other"}  # the 40-day-old reply is outside
    assert by_model["fake"]["error_rate"] == 0.5 and by_model["other"]["error_rate"] == 0
    assert by_model["fake"]["avg_ttft_ms"] == 100
    assert by_model["fake"]["avg_tokens_per_s"] == pytest.approx(20.0)
    assert by_model["other"]["avg_tokens_per_s"] == pytest.approx(100.0)
    assert (by_model["fake"]["thumbs_up"], by_model["other"]["thumbs_down"]) == (1, 1)
    (today,) = figures["tables"]["day"]
    assert today["name"] == timezone.localdate() and today["replies"] == 3
    assert figures["total"]["replies"] == 3 and figures["total"]["input_tokens"] == 30
    page = response.content.decode()
    assert "Per model" in page and "50 %" in page


def test_usage_over_a_chosen_date_range(admin_client, traffic):
    day = (timezone.now() - timedelta(days=40)).date()
    response = admin_client.get(USAGE, {"start": day.isoformat(), "end": day.isoformat()})
    models = [row["name"] for row in response.context["figures"]["tables"]["model"]]
    assert models == ["ancient"]
    backwards = admin_client.get(USAGE, {"start": "2026-02-01", "end": "2026-01-01"})
    assert "The start comes after the end." in backwards.content.decode()


def test_usage_downloads_as_csv(admin_client, traffic):
    response = admin_client.get(USAGE, {"format": "csv"})
    assert response["Content-Type"].startswith("text/csv")
    assert "attachment" in response["Content-Disposition"]
    rows = list(csv.DictReader(io.StringIO(response.content.decode())))
    groups = {(row["group"], row["name"]): row for row in rows}
    assert groups["user", "alice"]["replies"] == "2"
    assert groups["model", "other"]["thumbs_down"] == "1"
    assert groups["total", "All"]["replies"] == "3"


def test_usage_csv_cells_never_start_a_formula(admin_client, alice):
    a_conversation(alice, model='=HYPERLINK("http://127.0.0.2/","x")')
    a_conversation(alice, model="@SUM(1)")
    rows = list(
        csv.reader(io.StringIO(admin_client.get(USAGE, {"format": "csv"}).content.decode()))
    )
    models = sorted(row[1] for row in rows if row[0] == "model")
    assert models == ['\'=HYPERLINK("http://127.0.0.2/","x")', "'@SUM(1)"]


def test_usage_takes_the_same_queries_however_many_replies(admin_client, alice):
    def queries() -> int:
        with CaptureQueriesContext(connection) as captured:
            usage(timezone.localdate() - timedelta(days=29), timezone.localdate())
        return len(captured)

    a_conversation(alice, replies=1)
    few = queries()
    for model in ("a", "b", "c"):
        a_conversation(alice, model=model, replies=5)
    assert queries() == few == 4


def test_usage_is_for_staff_who_may_read_messages(client, alice, reviewer, django_user_model):
    assert logged_in(reviewer).get(USAGE).status_code == 200
    client.force_login(alice)
    assert client.get(USAGE).status_code == 302  # to the admin's login
    bare = django_user_model.objects.create_user("staff", is_staff=True)
    assert logged_in(bare).get(USAGE).status_code == 403


def test_the_admin_index_links_to_the_usage_page(admin_client):
    assert reverse("admin-usage") in admin_client.get(reverse("admin:index")).content.decode()
