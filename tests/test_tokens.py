"""API tokens: the page, the command, and who may open a socket with what."""

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.core.management import CommandError, call_command
from django.urls import reverse

from chatsite.asgi import application
from conversations.models import ApiToken
from tests.helpers import logged_in

# Sync tests share the test's transaction; the async ones reach the database
# from another thread, so they need real commits.
pytestmark = pytest.mark.django_db


def socket(headers: dict[str, str]) -> WebsocketCommunicator:
    return WebsocketCommunicator(
        application,
        "/ws/chat/",
        headers=[(k.lower().encode(), v.encode()) for k, v in headers.items()],
    )


async def ready_token_socket(plain: str) -> WebsocketCommunicator:
    """A socket opened with the token, past its ready frame."""
    ws = socket({"Authorization": f"Bearer {plain}"})
    connected, _ = await ws.connect()
    assert connected
    await ws.receive_json_from(timeout=10)
    return ws


def test_a_new_token_is_shown_once_and_only_its_hash_is_kept(alice):
    client = logged_in(alice)
    response = client.post(reverse("conversations:tokens"), {"name": "laptop"}, follow=True)
    plain = response.context["new_token"]
    assert plain.startswith("cs_") and plain in response.content.decode()
    token = ApiToken.objects.get()
    assert (token.user, token.name) == (alice, "laptop")
    assert token.key_hash == ApiToken.hash(plain) and plain not in token.key_hash
    page = client.get(reverse("conversations:tokens")).content.decode()
    assert "laptop" in page and plain not in page and token.prefix in page


def test_reloading_the_page_after_creating_a_token_makes_no_other_token(alice):
    client = logged_in(alice)
    url = reverse("conversations:tokens")
    created = client.post(url, {"name": "laptop"})
    assert created.status_code == 302 and created["Location"] == url
    shown = client.get(url)
    plain = shown.context["new_token"]
    assert plain.startswith("cs_") and plain in shown.content.decode()
    reloaded = client.get(url)
    assert reloaded.context["new_token"] is None and plain not in reloaded.content.decode()
    assert ApiToken.objects.count() == 1


@pytest.mark.parametrize(
    ("name", "kept"),
    [
        pytest.param("  my \n  laptop ", "my laptop", id="one-line"),
        pytest.param("", "token", id="blank"),
        pytest.param("n" * 300, "n" * ApiToken._meta.get_field("name").max_length, id="long"),
    ],
)
def test_a_token_name_is_kept_as_one_line_within_the_field(alice, name, kept):
    logged_in(alice).post(reverse("conversations:tokens"), {"name": name})
    assert ApiToken.objects.get().name == kept


def test_the_token_page_lists_only_my_live_tokens(alice, bob):
    mine, _ = ApiToken.issue(alice, "mine")
    ApiToken.issue(bob, "bobs")
    old, _ = ApiToken.issue(alice, "old")
    old.revoke()
    response = logged_in(alice).get(reverse("conversations:tokens"))
    assert list(response.context["tokens"]) == [mine]


def test_the_token_page_needs_a_login(client):
    response = client.get(reverse("conversations:tokens"))
    assert response.status_code == 302 and "/accounts/login/" in response["Location"]


def test_other_users_cannot_revoke_my_token(alice, bob):
    token, _ = ApiToken.issue(alice, "mine")
    response = logged_in(bob).post(reverse("conversations:token-revoke", args=[token.pk]))
    assert response.status_code == 404
    token.refresh_from_db()
    assert token.revoked is None


def test_create_token_command_prints_a_working_token(alice, capsys):
    call_command("create_token", "alice", "--name", "ci")
    plain = capsys.readouterr().out.strip()
    assert ApiToken.objects.authenticate(plain).user == alice
    with pytest.raises(CommandError, match="No user named"):
        call_command("create_token", "nobody")


@pytest.mark.django_db(transaction=True)
async def test_a_token_socket_needs_no_origin(alice):
    _, plain = await sync_to_async(ApiToken.issue)(alice, "script")
    ws = socket({"Authorization": f"Bearer {plain}"})
    connected, _ = await ws.connect()
    assert connected
    ready = await ws.receive_json_from(timeout=10)
    assert ready["user"] == "alice"
    await ws.disconnect()
    token = await ApiToken.objects.aget()
    assert token.last_used is not None


@pytest.mark.parametrize("header", ["Bearer cs_wrong", "Bearer ", "Basic abc"])
@pytest.mark.django_db(transaction=True)
async def test_a_bad_token_is_refused_at_the_handshake(alice, header):
    ws = socket({"Authorization": header})
    connected, _ = await ws.connect()
    assert not connected
    await ws.disconnect()


@pytest.mark.django_db(transaction=True)
async def test_a_revoked_token_is_refused(alice):
    token, plain = await sync_to_async(ApiToken.issue)(alice, "script")
    await sync_to_async(token.revoke)()
    ws = socket({"Authorization": f"Bearer {plain}"})
    connected, _ = await ws.connect()
    assert not connected
    await ws.disconnect()


@pytest.mark.django_db(transaction=True)
async def test_revoking_a_token_closes_its_open_sockets(alice):
    token, plain = await sync_to_async(ApiToken.issue)(alice, "script")
    ws = await ready_token_socket(plain)
    client = await sync_to_async(logged_in)(alice)
    response = await sync_to_async(client.post)(
        reverse("conversations:token-revoke", args=[token.pk])
    )
    assert response.status_code == 302
    closed = await ws.receive_output(timeout=5)
    assert closed == {"type": "websocket.close", "code": 4001}
    await ws.disconnect()


@pytest.mark.django_db(transaction=True)
async def test_a_cookie_socket_must_come_from_an_allowed_origin(alice):
    client = await sync_to_async(logged_in)(alice)
    cookie = f"sessionid={client.cookies['sessionid'].value}"
    for origin, allowed in [
        ("http://127.0.0.1:8000", True),
        ("http://evil.example", False),
        (None, False),
    ]:
        headers = {"Cookie": cookie, "Host": "127.0.0.1:8000"}  # as a browser sends
        if origin:
            headers["Origin"] = origin
        ws = socket(headers)
        connected, _ = await ws.connect()
        assert connected is allowed, origin
        if connected:
            assert (await ws.receive_json_from(timeout=10))["user"] == "alice"
        await ws.disconnect()


@pytest.mark.django_db(transaction=True)
async def test_revoking_a_token_anywhere_closes_its_sockets(alice):
    token, plain = await sync_to_async(ApiToken.issue)(alice, "script")
    ws = await ready_token_socket(plain)
    # As the admin's action or a shell would: the model method, no view.
    await sync_to_async(token.revoke)()
    assert await ws.receive_output(timeout=5) == {"type": "websocket.close", "code": 4001}
    await ws.disconnect()


@pytest.mark.django_db(transaction=True)
async def test_deleting_a_token_closes_its_sockets(alice):
    token, plain = await sync_to_async(ApiToken.issue)(alice, "script")
    ws = await ready_token_socket(plain)
    await sync_to_async(ApiToken.objects.filter(pk=token.pk).delete)()
    assert await ws.receive_output(timeout=5) == {"type": "websocket.close", "code": 4001}
    await ws.disconnect()
