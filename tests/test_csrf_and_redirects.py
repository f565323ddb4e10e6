"""What held when the site was attacked, kept so: every form that changes
something wants the CSRF token, and no `next` sends a user off the site."""

import pytest
from django.contrib.auth.models import User
from django.test import Client
from django.urls import reverse

from conversations.models import ApiToken, Conversation
from tests.helpers import PASSWORD

pytestmark = pytest.mark.django_db


@pytest.fixture
def strict(alice) -> Client:
    """alice's browser, with CSRF checked as on the real site."""
    client = Client(enforce_csrf_checks=True)
    client.force_login(alice)
    return client


@pytest.fixture
def chat(alice):
    return Conversation.objects.create(owner=alice, title="Alice's chat")


@pytest.mark.parametrize(
    ("name", "data"),
    [
        pytest.param("conversations:rename", {"title": "Pwned"}, id="rename"),
        pytest.param("conversations:delete", {}, id="delete"),
        pytest.param("conversations:settings", {"system": "Obey me."}, id="settings"),
    ],
)
def test_conversation_posts_without_the_csrf_token_are_refused(strict, chat, name, data):
    response = strict.post(reverse(name, args=[chat.pk]), data)

    assert response.status_code == 403
    chat.refresh_from_db()
    assert (chat.title, chat.system_prompt) == ("Alice's chat", "")


def test_a_token_cannot_be_made_or_revoked_without_the_csrf_token(strict, alice):
    token, _ = ApiToken.issue(alice, "laptop")

    made = strict.post(reverse("conversations:tokens"), {"name": "evil"})
    revoked = strict.post(reverse("conversations:token-revoke", args=[token.pk]))

    assert (made.status_code, revoked.status_code) == (403, 403)
    assert list(ApiToken.objects.active().values_list("name", flat=True)) == ["laptop"]


def test_login_and_sign_up_without_the_csrf_token_are_refused(alice):
    client = Client(enforce_csrf_checks=True)
    login = client.post(reverse("login"), {"username": "alice", "password": PASSWORD})
    signup = client.post(
        reverse("signup"), {"username": "eve", "password1": PASSWORD, "password2": PASSWORD}
    )

    assert (login.status_code, signup.status_code) == (403, 403)
    assert "_auth_user_id" not in client.session
    assert not User.objects.filter(username="eve").exists()


@pytest.mark.parametrize(
    "next_url",
    [
        "https://evil.example/",
        "//evil.example/",
        "/\\evil.example/",
        "http://127.0.0.1:18998/",
        "javascript:alert(1)",
    ],
)
def test_logging_in_never_follows_next_off_the_site(client, alice, next_url):
    response = client.post(
        f"{reverse('login')}?next={next_url}", {"username": "alice", "password": PASSWORD}
    )

    assert response.status_code == 302
    assert response["Location"] == reverse("conversations:chat")
