"""The account page and deletion (issue 12, items 10 and 13): deleting a
conversation takes its messages with it; deleting an account takes
everything the user owns, tokens and open sockets included, and nothing of
anybody else's."""

import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth import get_user_model
from django.test import Client
from django.urls import reverse

from conversations import protocol, replies
from conversations.models import ApiToken, Conversation, Feedback, Message
from tests.helpers import (
    PASSWORD,
    answers,
    finish_replies,
    logged_in,
    receive_until,
    session_socket,
    token_socket,
)

pytestmark = pytest.mark.django_db


def conversation_of(owner, title: str = "chat") -> Conversation:
    conversation = Conversation.objects.create(owner=owner, title=title, model="fake")
    conversation.messages.create(role="user", content="hi")
    reply = conversation.messages.create(role="assistant", content="hello")
    Feedback.objects.create(message=reply, rating=1, comment="nice")
    return conversation


def everything_of(user_id: int) -> dict[str, int]:
    """How many rows of each kind the user with this id still owns."""
    return {
        "user": get_user_model().objects.filter(pk=user_id).count(),
        "conversations": Conversation.objects.filter(owner_id=user_id).count(),
        "messages": Message.objects.filter(conversation__owner_id=user_id).count(),
        "feedback": Feedback.objects.filter(message__conversation__owner_id=user_id).count(),
        "tokens": ApiToken.objects.filter(user_id=user_id).count(),
    }


NOTHING = {"user": 0, "conversations": 0, "messages": 0, "feedback": 0, "tokens": 0}


# deleting a conversation


def test_deleting_a_conversation_deletes_its_messages_and_their_feedback(client, alice):
    conversation = conversation_of(alice)
    kept = conversation_of(alice, "kept")
    client.force_login(alice)

    response = client.post(reverse("conversations:delete", args=[conversation.pk]))

    assert response.status_code == 302
    assert not Message.objects.filter(conversation_id=conversation.pk).exists()
    assert not Feedback.objects.filter(message__conversation_id=conversation.pk).exists()
    assert kept.messages.count() == 2


# the account page


def test_the_account_page_requires_login(client):
    response = client.get(reverse("conversations:account"))

    assert response.status_code == 302


def test_the_account_page_offers_export_import_and_deletion(client, alice):
    conversation_of(alice)
    client.force_login(alice)

    page = client.get(reverse("conversations:account")).content.decode()

    assert reverse("conversations:export-all") in page
    assert reverse("conversations:import") in page
    assert reverse("conversations:delete-account") in page
    assert 'enctype="multipart/form-data"' in page
    assert "All your conversations (1)" in page


def test_every_page_links_to_the_account_page(client, alice):
    client.force_login(alice)

    page = client.get(reverse("conversations:tokens")).content.decode()

    assert f'href="{reverse("conversations:account")}"' in page


def test_the_chat_page_offers_each_conversation_as_markdown_and_json(client, alice):
    conversation = conversation_of(alice)
    client.force_login(alice)

    page = client.get(reverse("conversations:chat")).content.decode()

    assert reverse("conversations:export-markdown", args=[conversation.pk]) in page
    assert reverse("conversations:export-json", args=[conversation.pk]) in page
    # And their patterns, for the conversations the page adds itself.
    assert 'data-url-export-markdown="/c/00000000-0000-0000-0000-000000000000/export.md"' in page


@pytest.mark.parametrize(
    ("key", "name"),
    [("export_markdown", "export-markdown"), ("export_json", "export-json")],
)
def test_the_export_url_templates_become_a_conversations_urls(client, alice, key, name):
    conversation = conversation_of(alice)
    client.force_login(alice)
    templates = client.get(reverse("conversations:chat")).context["url_templates"]

    url = templates[key].replace("00000000-0000-0000-0000-000000000000", str(conversation.pk))

    assert url == reverse(f"conversations:{name}", args=[conversation.pk])


# deleting an account


def test_a_wrong_password_deletes_nothing(client, alice):
    conversation_of(alice)
    client.force_login(alice)

    response = client.post(reverse("conversations:delete-account"), {"password": "wrong"})

    assert response.status_code == 400
    assert "That is not your password." in response.content.decode()
    assert everything_of(alice.pk) == {
        "user": 1,
        "conversations": 1,
        "messages": 2,
        "feedback": 1,
        "tokens": 0,
    }


def test_deleting_an_account_needs_a_post_and_a_login(client, alice):
    assert client.post(reverse("conversations:delete-account")).status_code == 302
    client.force_login(alice)
    assert client.get(reverse("conversations:delete-account")).status_code == 405
    assert get_user_model().objects.filter(pk=alice.pk).exists()


def test_deleting_an_account_deletes_everything_the_user_owns_and_nothing_else(client, alice, bob):
    for title in ("one", "two"):
        conversation_of(alice, title)
    ApiToken.issue(alice, "laptop")
    ApiToken.issue(alice, "revoked")[0].revoke()
    conversation_of(bob)
    ApiToken.issue(bob, "bob's")
    bobs_before = everything_of(bob.pk)
    client.force_login(alice)

    response = client.post(reverse("conversations:delete-account"), {"password": PASSWORD})

    assert response.status_code == 302
    assert response["Location"] == reverse("login")
    assert everything_of(alice.pk) == NOTHING
    assert everything_of(bob.pk) == bobs_before
    # Signed out: the next request is a stranger's.
    assert client.get(reverse("conversations:chat")).status_code == 302


@pytest.mark.django_db(transaction=True)
async def test_deleting_an_account_closes_every_open_socket_of_the_user(alice, bob):
    """The browser that deletes, another browser of the same user, a script
    with a token: all closed. Bob's socket goes on."""
    deleting, other = [await sync_to_async(logged_in)(alice) for _ in range(2)]
    sockets = [
        await session_socket(deleting),
        await session_socket(other),
        await token_socket(alice),
    ]
    bobs = await token_socket(bob)
    user_id = alice.pk

    response = await sync_to_async(deleting.post)(
        reverse("conversations:delete-account"), {"password": PASSWORD}
    )

    assert response.status_code == 302
    for ws in sockets:
        closed = await ws.receive_output(timeout=5)
        assert closed["type"] == "websocket.close"
        assert closed["code"] in (protocol.CLOSE_SIGNED_OUT, protocol.CLOSE_TOKEN_REVOKED)
    assert await answers(bobs)
    assert await sync_to_async(everything_of)(user_id) == NOTHING
    for ws in [*sockets, bobs]:
        await ws.disconnect()


@pytest.mark.django_db(transaction=True)
async def test_a_user_deleted_elsewhere_has_their_cookie_sockets_closed(alice, bob):
    """Deleted by the admin or a shell, with no logout to tell the sockets:
    they close all the same."""
    ws = await session_socket(await sync_to_async(logged_in)(alice))
    bobs = await session_socket(await sync_to_async(logged_in)(bob))

    await sync_to_async(alice.delete)()

    closed = await ws.receive_output(timeout=5)
    assert closed == {"type": "websocket.close", "code": protocol.CLOSE_SIGNED_OUT}
    assert await answers(bobs)
    for socket in (ws, bobs):
        await socket.disconnect()


@pytest.mark.django_db(transaction=True)
async def test_deleting_an_account_stops_its_reply_in_progress(alice, fake_llm, monkeypatch):
    """A reply being written when the account goes is told to stop at once,
    in whichever process writes it, rather than streaming on until its next
    save finds its row gone."""
    stops = []
    request_stop = replies.request_stop

    async def spy(conversation_id, message_id):
        stops.append((str(conversation_id), str(message_id)))
        await request_stop(conversation_id, message_id)

    monkeypatch.setattr(replies, "request_stop", spy)
    client = await sync_to_async(logged_in)(alice)
    ws = await session_socket(client)
    await ws.send_json_to({"type": "send", "id": "s", "content": "Tell me", "model": "fake-slow"})
    frames = await receive_until(ws, "start")
    reply = frames[-1]
    user_id = alice.pk

    response = await sync_to_async(client.post)(
        reverse("conversations:delete-account"), {"password": PASSWORD}
    )

    assert response.status_code == 302
    assert stops == [(reply["conversation"], reply["message"])]
    await finish_replies(timeout=5)
    assert await sync_to_async(everything_of)(user_id) == NOTHING
    await ws.disconnect()


def test_importing_and_deleting_the_account_need_the_csrf_token(alice):
    client = Client(enforce_csrf_checks=True)
    client.force_login(alice)
    conversation_of(alice)

    refused = [
        client.post(reverse("conversations:delete-account"), {"password": PASSWORD}),
        client.post(reverse("conversations:import"), {}),
    ]

    assert [r.status_code for r in refused] == [403, 403]
    assert everything_of(alice.pk)["conversations"] == 1
