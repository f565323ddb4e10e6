"""Admins and reviewers read users' conversations in the Django admin."""

import pytest
from django.contrib.contenttypes.models import ContentType
from django.urls import reverse

from conversations.models import ApiToken, Conversation

pytestmark = pytest.mark.django_db


@pytest.fixture
def html_chat(alice):
    conversation = Conversation.objects.create(owner=alice, model="fake", title="<b>Hi</b>")
    conversation.start_turn("What is <script>up</script>?", "fake", {})
    return conversation


def test_reviewers_see_conversations_with_their_owner_and_messages(admin_client, html_chat):
    listing = admin_client.get(reverse("admin:conversations_conversation_changelist"))
    assert listing.status_code == 200
    page = listing.content.decode()
    owner = reverse("admin:auth_user_change", args=[html_chat.owner_id])
    assert f'<a href="{owner}">alice</a>' in page
    assert "&lt;b&gt;Hi&lt;/b&gt;" in page and "<b>Hi</b>" not in page
    detail = admin_client.get(
        reverse("admin:conversations_conversation_change", args=[html_chat.pk])
    )
    assert detail.status_code == 200
    assert "What is &lt;script&gt;up&lt;/script&gt;?" in detail.content.decode()


def test_reviewers_can_search_messages_and_open_one(admin_client, html_chat):
    url = reverse("admin:conversations_message_changelist")
    found = admin_client.get(url, {"q": "script"})
    assert found.status_code == 200 and "What is" in found.content.decode()
    message = html_chat.messages.get(role="user")
    page = admin_client.get(reverse("admin:conversations_message_change", args=[message.pk]))
    assert page.status_code == 200


def test_admins_revoke_tokens_with_an_action(admin_client, alice):
    token, _ = ApiToken.issue(alice, "laptop")
    response = admin_client.post(
        reverse("admin:conversations_apitoken_changelist"),
        {"action": "revoke", "_selected_action": [token.pk]},
    )
    assert response.status_code == 302
    token.refresh_from_db()
    assert token.revoked is not None


def test_users_who_are_not_staff_cannot_open_the_admin(client, alice):
    client.force_login(alice)
    response = client.get(reverse("admin:conversations_conversation_changelist"))
    assert response.status_code == 302


def test_a_conversation_in_the_admin_has_no_view_on_site_link(admin_client, html_chat):
    # The site's conversation page is owner-only: the link would be a 404 for staff.
    page = admin_client.get(reverse("admin:conversations_conversation_change", args=[html_chat.pk]))
    assert page.status_code == 200
    html = page.content.decode()
    content_type = ContentType.objects.get_for_model(Conversation).pk
    assert reverse("admin:view_on_site", args=[content_type, html_chat.pk]) not in html
    assert "View on site" not in html


def test_the_message_count_is_the_same_when_a_search_matches_message_text(admin_client, alice):
    conversation = Conversation.objects.create(owner=alice, model="fake", title="Counting")
    for i in range(6):
        conversation.messages.create(role="user", content=f"needle {i}")
        conversation.messages.create(role="assistant", content=f"needle reply {i}")
    Conversation.objects.create(owner=alice, model="fake", title="Counting nothing")
    url = reverse("admin:conversations_conversation_changelist")
    for query in ({}, {"q": "needle"}, {"q": "needle", "o": "4"}, {"q": "Counting"}):
        page = admin_client.get(url, query).content.decode()
        assert '<td class="field-message_count">12</td>' in page, query
    page = admin_client.get(url, {"q": "Counting nothing"}).content.decode()
    assert '<td class="field-message_count">0</td>' in page
