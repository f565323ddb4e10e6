"""U+0000 is never stored: Postgres cannot hold it in text and SQLite can, so
every way in refuses it, and a site behaves the same on either database.
(The socket's refusals are in test_protocol.py and test_consumer.py.)"""

import pytest
from django.contrib.auth.models import User
from django.urls import reverse

from conversations.models import ApiToken, Conversation
from tests.helpers import PASSWORD, logged_in

pytestmark = pytest.mark.django_db

JSON = {"HTTP_ACCEPT": "application/json"}


@pytest.fixture
def chat(alice):
    return Conversation.objects.create(owner=alice, title="Alice's chat", system_prompt="Be kind.")


def test_a_system_prompt_with_nul_is_refused_and_the_prompt_kept(alice, chat):
    url = reverse("conversations:settings", args=[chat.pk])
    response = logged_in(alice).post(url, {"system": "Be\x00 kind."}, **JSON)

    assert response.status_code == 400
    assert response.json()["error"] == "bad_request"
    chat.refresh_from_db()
    assert chat.system_prompt == "Be kind."


def test_a_token_name_with_nul_is_refused_and_no_token_made(alice):
    response = logged_in(alice).post(reverse("conversations:tokens"), {"name": "lap\x00top"})

    assert response.status_code == 400
    assert not ApiToken.objects.exists()


def test_a_username_with_nul_is_refused_at_sign_up(client):
    response = client.post(
        reverse("signup"),
        {"username": "eve\x00", "password1": PASSWORD, "password2": PASSWORD},
    )

    assert response.status_code == 200  # the form again, with its error
    assert "Null characters are not allowed" in response.content.decode()
    assert not User.objects.exists()
