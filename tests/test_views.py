"""Pages and form endpoints: login required, another user's conversation is
a 404, POST-only actions answer JSON when asked and redirect otherwise."""

import uuid

import pytest
from django.conf import settings as django_settings
from django.contrib.auth import get_user_model
from django.urls import resolve, reverse

from conversations.models import TITLE_LENGTH, Conversation, Feedback, Message
from tests.helpers import PASSWORD

pytestmark = pytest.mark.django_db

JSON = {"HTTP_ACCEPT": "application/json"}


@pytest.fixture
def chat(alice):
    conversation = Conversation.objects.create(owner=alice, title="Alice's chat", model="fake")
    conversation.messages.create(role=Message.Role.USER, content="hi")
    conversation.messages.create(role=Message.Role.ASSISTANT, content="hello")
    return conversation


@pytest.fixture
def alice_client(client, alice):
    client.force_login(alice)
    return client


@pytest.fixture
def bob_client(client, bob):
    client.force_login(bob)
    return client


def login_redirect(next_url: str) -> str:
    return f"{reverse('login')}?next={next_url}"


# pages


def test_chat_page_requires_login(client):
    response = client.get(reverse("conversations:chat"))

    assert response.status_code == 302
    assert response["Location"] == login_redirect("/")


def test_conversation_page_requires_login(client, chat):
    url = reverse("conversations:conversation", args=[chat.pk])

    response = client.get(url)

    assert response.status_code == 302
    assert response["Location"] == login_redirect(url)


def test_chat_page_lists_only_the_users_conversations(alice_client, chat, bob):
    Conversation.objects.create(owner=bob, title="Bob's chat")

    response = alice_client.get(reverse("conversations:chat"))

    assert response.status_code == 200
    assert list(response.context["conversations"]) == [chat]
    assert response.context["conversation"] is None
    assert response.context["default_model"] == "fake"
    assert response.context["ws_path"] == "/ws/chat/"


def test_chat_page_gives_the_script_the_server_limits(alice_client):
    limits = alice_client.get(reverse("conversations:chat")).context["limits"]

    assert limits == {
        "max_content": django_settings.CHAT_MAX_CONTENT,
        "max_title": TITLE_LENGTH,
        "max_model": Conversation._meta.get_field("model").max_length,
        "max_comment": Feedback._meta.get_field("comment").max_length,
    }


@pytest.mark.parametrize("name", ["conversation", "rename", "delete", "settings"])
def test_chat_page_url_templates_become_a_conversations_urls(alice_client, chat, name):
    templates = alice_client.get(reverse("conversations:chat")).context["url_templates"]

    url = templates[name].replace("00000000-0000-0000-0000-000000000000", str(chat.pk))

    assert url == reverse(f"conversations:{name}", args=[chat.pk])
    assert resolve(url).kwargs == {"pk": chat.pk}


def test_conversation_page_is_shown_to_its_owner(alice_client, chat):
    response = alice_client.get(reverse("conversations:conversation", args=[chat.pk]))

    assert response.status_code == 200
    assert response.context["conversation"] == chat
    assert list(response.context["conversations"]) == [chat]


def test_other_users_conversation_is_a_404(bob_client, chat):
    response = bob_client.get(reverse("conversations:conversation", args=[chat.pk]))

    assert response.status_code == 404


def test_unknown_conversation_is_a_404(alice_client):
    response = alice_client.get(reverse("conversations:conversation", args=[uuid.uuid4()]))

    assert response.status_code == 404


# rename


def test_rename_answers_json_when_asked(alice_client, chat):
    response = alice_client.post(
        reverse("conversations:rename", args=[chat.pk]), {"title": "  Trip   plans "}, **JSON
    )

    assert response.status_code == 200
    assert response.json() == {"id": str(chat.pk), "title": "Trip plans"}
    chat.refresh_from_db()
    assert chat.title == "Trip plans"


def test_rename_redirects_to_the_conversation_without_json(alice_client, chat):
    response = alice_client.post(reverse("conversations:rename", args=[chat.pk]), {"title": "New"})

    assert response.status_code == 302
    assert response["Location"] == reverse("conversations:conversation", args=[chat.pk])
    chat.refresh_from_db()
    assert chat.title == "New"


def test_rename_cuts_a_long_title_to_80_characters(alice_client, chat):
    alice_client.post(reverse("conversations:rename", args=[chat.pk]), {"title": "t" * 300}, **JSON)

    chat.refresh_from_db()
    assert chat.title == "t" * 80


@pytest.mark.parametrize("title", ["", "   \n\t "])
def test_rename_rejects_an_empty_title(alice_client, chat, title):
    response = alice_client.post(
        reverse("conversations:rename", args=[chat.pk]), {"title": title}, **JSON
    )

    assert response.status_code == 400
    assert response.json()["error"] == "bad_request"
    chat.refresh_from_db()
    assert chat.title == "Alice's chat"


def test_rename_rejects_a_missing_title(alice_client, chat):
    response = alice_client.post(reverse("conversations:rename", args=[chat.pk]), {})

    assert response.status_code == 400
    chat.refresh_from_db()
    assert chat.title == "Alice's chat"


def test_rename_refuses_a_title_with_a_null_character(alice_client, chat):
    response = alice_client.post(
        reverse("conversations:rename", args=[chat.pk]), {"title": "a\x00b"}, **JSON
    )

    assert response.status_code == 400
    assert response.json()["error"] == "bad_request"
    chat.refresh_from_db()
    assert chat.title == "Alice's chat"


def test_rename_refusal_without_json_is_a_page(alice_client, chat):
    response = alice_client.post(reverse("conversations:rename", args=[chat.pk]), {"title": " "})

    assert response.status_code == 400
    assert response["Content-Type"].startswith("text/html")


def test_rename_of_other_users_conversation_is_a_404(bob_client, chat):
    response = bob_client.post(
        reverse("conversations:rename", args=[chat.pk]), {"title": "Mine now"}, **JSON
    )

    assert response.status_code == 404
    chat.refresh_from_db()
    assert chat.title == "Alice's chat"


# delete


def test_delete_removes_the_conversation_and_its_messages(alice_client, chat):
    assert Message.objects.filter(conversation=chat).count() == 2

    response = alice_client.post(reverse("conversations:delete", args=[chat.pk]))

    assert response.status_code == 302
    assert response["Location"] == reverse("conversations:chat")
    assert not Conversation.objects.filter(pk=chat.pk).exists()
    assert Message.objects.filter(conversation_id=chat.pk).count() == 0


def test_delete_answers_json_when_asked(alice_client, chat):
    response = alice_client.post(reverse("conversations:delete", args=[chat.pk]), **JSON)

    assert response.status_code == 200
    assert response.json() == {"deleted": str(chat.pk)}
    assert not Conversation.objects.filter(pk=chat.pk).exists()


def test_delete_of_other_users_conversation_is_a_404(bob_client, chat):
    response = bob_client.post(reverse("conversations:delete", args=[chat.pk]), **JSON)

    assert response.status_code == 404
    assert Conversation.objects.filter(pk=chat.pk).exists()
    assert Message.objects.filter(conversation=chat).count() == 2


# settings


def test_settings_saves_model_and_system_prompt(alice_client, chat):
    response = alice_client.post(
        reverse("conversations:settings", args=[chat.pk]),
        {"model": " fake-think ", "system": "Answer in French."},
        **JSON,
    )

    assert response.status_code == 200
    chat.refresh_from_db()
    assert chat.model == "fake-think"
    assert chat.system_prompt == "Answer in French."
    assert response.json() == chat.as_frame()


def test_settings_naming_a_model_the_server_lacks_is_refused_and_saves_nothing(
    alice_client, chat, fake_llm
):
    before = chat.model
    response = alice_client.post(
        reverse("conversations:settings", args=[chat.pk]),
        {"model": "gpt-4", "system": "Answer in French."},
        **JSON,
    )
    assert response.status_code == 400
    assert response.json()["error"] == "model_not_found" and response.json()["message"]
    chat.refresh_from_db()
    assert (chat.model, chat.system_prompt) == (before, "")


def test_settings_take_any_model_when_the_server_cannot_be_reached(alice_client, chat):
    response = alice_client.post(
        reverse("conversations:settings", args=[chat.pk]), {"model": "gpt-4"}, **JSON
    )
    assert response.status_code == 200 and response.json()["model"] == "gpt-4"


def test_settings_redirects_to_the_conversation_without_json(alice_client, chat):
    response = alice_client.post(
        reverse("conversations:settings", args=[chat.pk]), {"model": "fake-slow", "system": ""}
    )

    assert response.status_code == 302
    assert response["Location"] == reverse("conversations:conversation", args=[chat.pk])
    chat.refresh_from_db()
    assert chat.model == "fake-slow"
    assert chat.system_prompt == ""


def test_settings_with_a_blank_model_keeps_the_model(alice_client, chat):
    alice_client.post(
        reverse("conversations:settings", args=[chat.pk]), {"model": "  ", "system": "Hi"}, **JSON
    )

    chat.refresh_from_db()
    assert chat.model == "fake"
    assert chat.system_prompt == "Hi"


def test_settings_rejects_a_system_prompt_over_the_limit(alice_client, chat):
    too_long = "s" * (django_settings.CHAT_MAX_CONTENT + 1)

    response = alice_client.post(
        reverse("conversations:settings", args=[chat.pk]),
        {"model": "fake-think", "system": too_long},
        **JSON,
    )

    assert response.status_code == 400
    assert response.json()["error"] == "too_large"
    chat.refresh_from_db()
    assert chat.model == "fake"
    assert chat.system_prompt == ""


def test_settings_of_other_users_conversation_is_a_404(bob_client, chat):
    response = bob_client.post(
        reverse("conversations:settings", args=[chat.pk]),
        {"model": "fake-think", "system": "pwned"},
        **JSON,
    )

    assert response.status_code == 404
    chat.refresh_from_db()
    assert chat.model == "fake"
    assert chat.system_prompt == ""


# POST only, login required


ACTIONS = ["conversations:rename", "conversations:delete", "conversations:settings"]


@pytest.mark.parametrize("name", ACTIONS)
def test_actions_on_a_missing_conversation_answer_a_json_404_when_asked(alice_client, name):
    response = alice_client.post(reverse(name, args=[uuid.uuid4()]), {"title": "x"}, **JSON)

    assert response.status_code == 404
    assert response.json()["error"] == "not_found"


@pytest.mark.parametrize("name", ACTIONS)
def test_actions_on_a_missing_conversation_are_a_page_without_json(alice_client, name):
    response = alice_client.post(reverse(name, args=[uuid.uuid4()]), {"title": "x"})

    assert response.status_code == 404
    assert response["Content-Type"].startswith("text/html")


@pytest.mark.parametrize("name", ACTIONS)
def test_actions_refuse_get(alice_client, chat, name):
    response = alice_client.get(reverse(name, args=[chat.pk]), {"title": "x"})

    assert response.status_code == 405
    chat.refresh_from_db()
    assert chat.title == "Alice's chat"


@pytest.mark.parametrize("name", ACTIONS)
def test_actions_require_login(client, chat, name):
    url = reverse(name, args=[chat.pk])

    response = client.post(url, {"title": "x", "model": "x"})

    assert response.status_code == 302
    assert response["Location"] == login_redirect(url)
    chat.refresh_from_db()
    assert chat.title == "Alice's chat"
    assert chat.model == "fake"


# accounts


def test_signup_creates_a_user_and_logs_them_in(client):
    response = client.post(
        reverse("signup"),
        {"username": "carol", "password1": PASSWORD, "password2": PASSWORD},
    )

    assert response.status_code == 302
    assert response["Location"] == reverse("conversations:chat")
    carol = get_user_model().objects.get(username="carol")
    assert carol.check_password(PASSWORD)
    assert client.session["_auth_user_id"] == str(carol.pk)


def test_signup_rejects_mismatched_passwords(client):
    response = client.post(
        reverse("signup"),
        {"username": "carol", "password1": PASSWORD, "password2": PASSWORD + "!"},
    )

    assert response.status_code == 200
    assert "password2" in response.context["form"].errors
    assert not get_user_model().objects.filter(username="carol").exists()
    assert "_auth_user_id" not in client.session


def test_signup_page_renders_a_form(client):
    response = client.get(reverse("signup"))

    assert response.status_code == 200
    assert not response.context["form"].is_bound


def test_signup_when_logged_in_goes_to_the_chat(alice_client):
    response = alice_client.get(reverse("signup"))

    assert response.status_code == 302
    assert response["Location"] == reverse("conversations:chat")


def test_login_page_renders(client):
    response = client.get(reverse("login"))

    assert response.status_code == 200
    assert "form" in response.context


def test_login_with_the_right_password_goes_to_the_chat(client, alice):
    response = client.post(reverse("login"), {"username": "alice", "password": PASSWORD})

    assert response.status_code == 302
    assert response["Location"] == reverse("conversations:chat")
    assert client.session["_auth_user_id"] == str(alice.pk)


def test_login_with_a_wrong_password_is_refused(client, alice):
    response = client.post(reverse("login"), {"username": "alice", "password": "wrong"})

    assert response.status_code == 200
    assert response.context["form"].errors
    assert "_auth_user_id" not in client.session


def test_logout_is_post(alice_client, alice):
    response = alice_client.get(reverse("logout"))

    assert response.status_code == 405
    assert alice_client.session["_auth_user_id"] == str(alice.pk)


def test_logout_logs_out_and_goes_to_login(alice_client):
    response = alice_client.post(reverse("logout"))

    assert response.status_code == 302
    assert response["Location"] == reverse("login")
    assert "_auth_user_id" not in alice_client.session
    assert alice_client.get(reverse("conversations:chat")).status_code == 302


def test_pages_forbid_scripts_and_images_from_elsewhere(client, alice, admin_client):
    client.force_login(alice)
    policy = client.get(reverse("conversations:chat"))["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "img-src 'self' data:" in policy
    assert admin_client.get("/admin/")["Content-Security-Policy"] == policy
