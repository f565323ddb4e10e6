"""Issue 9, items 1, 4 and 5: what one socket may cost the server, which
sockets outlive their sign-in, and which pages may open a cookie socket.
Consumer and unit tests here; the live-daphne ones are marked slow."""

import asyncio
import json
import time

import pytest
import websockets
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.core.cache import cache

from chatsite import sendbuffer
from conversations import protocol, replies, signins
from conversations.auth import origin_allowed
from conversations.budget import FrameBudget
from conversations.models import Conversation, Message
from tests.helpers import (
    answers,
    chat_socket,
    logged_in,
    session_socket,
    site_socket,
    token_socket,
)
from tests.live import (
    Browser,
    RawSocket,
    flood,
    long_conversation,
    receive,
    rss_mb,
    running_site,
)

pytestmark = pytest.mark.django_db(transaction=True)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# Item 1: the frame budget.


def test_the_frame_budget_serves_a_burst_then_refills_at_its_rate():
    clock = Clock()
    budget = FrameBudget(rate=2, burst=3, clock=clock)
    assert [budget.take() for _ in range(3)] == [0, 0, 0]
    assert budget.take() == pytest.approx(0.5)
    clock.now += 0.5
    assert budget.take() == 0
    assert budget.take() == pytest.approx(0.5)
    clock.now += 10  # a long pause refills only up to the burst
    assert [budget.take() for _ in range(3)] == [0, 0, 0]
    assert budget.take() > 0


def test_the_frame_budget_is_overrun_by_a_burst_of_refusals_in_a_row():
    clock = Clock()
    budget = FrameBudget(rate=1, burst=2, clock=clock)
    budget.take(), budget.take()
    for _ in range(2):
        assert budget.take() > 0
        assert not budget.overrun
    budget.take()
    assert budget.overrun
    clock.now += 1
    assert budget.take() == 0 and not budget.overrun


async def test_a_socket_past_its_frame_budget_is_refused_then_closed(alice, settings):
    settings.CHAT_FRAME_RATE = 0.001  # no refill while the test runs
    settings.CHAT_FRAME_BURST = 3
    async with chat_socket(alice) as ws:
        for n in range(3):
            await ws.send_json_to({"type": "ping", "id": f"p{n}"})
            assert await ws.receive_json_from() == {"type": "pong", "id": f"p{n}"}
        for n in range(3):
            await ws.send_json_to({"type": "ping", "id": f"q{n}"})
            refused = await ws.receive_json_from()
            assert refused["type"] == "error" and refused["code"] == "rate_limited"
            assert refused["id"] == f"q{n}" and refused["retry_after"] >= 1
        await ws.send_json_to({"type": "ping", "id": "last"})
        assert await ws.receive_output() == {
            "type": "websocket.close",
            "code": protocol.CLOSE_TOO_MANY_FRAMES,
        }
        await ws.send_json_to({"type": "ping"})
        assert await ws.receive_nothing()


async def test_frames_past_the_budget_cost_no_database_work(alice, settings, monkeypatch):
    settings.CHAT_FRAME_RATE = 0.001
    settings.CHAT_FRAME_BURST = 1
    async with chat_socket(alice) as ws:
        await ws.send_json_to({"type": "ping"})
        await ws.receive_json_from()

        def no_query(*args, **kwargs):
            raise AssertionError("a refused frame reached the database")

        monkeypatch.setattr(Conversation.objects, "for_user", no_query)
        await ws.send_json_to({"type": "subscribe", "conversation": "x"})
        assert (await ws.receive_json_from())["code"] == "rate_limited"


# Item 1: subscribing again.


async def small_conversation(owner, messages: int = 6) -> Conversation:
    conversation = await Conversation.objects.acreate(owner=owner, title="long")
    for n in range(messages):
        role = Message.Role.USER if n % 2 == 0 else Message.Role.ASSISTANT
        await Message.objects.acreate(conversation=conversation, role=role, content=f"m{n}")
    return conversation


async def replay(ws, conversation: Conversation, request_id: str) -> list[dict]:
    """The frames answering one subscribe, up to a ping sent after it."""
    frame = {"type": "subscribe", "id": request_id, "conversation": str(conversation.pk)}
    await ws.send_json_to(frame)
    await ws.send_json_to({"type": "ping", "id": f"{request_id}:end"})
    frames = []
    async with asyncio.timeout(10):
        while (frame := await ws.receive_json_from(timeout=10))["type"] != "pong":
            frames.append(frame)
    return frames


async def test_subscribing_again_on_one_socket_replays_only_the_live_replies(alice):
    conversation = await small_conversation(alice)
    async with chat_socket(alice) as ws:
        first = await replay(ws, conversation, "s1")
        assert [f["type"] for f in first] == ["conversation"] + ["message"] * 6
        assert "replay" not in first[0]
        again = await replay(ws, conversation, "s2")
        assert again == [{**first[0], "id": "s2", "replay": "live"}]
        live = await Message.objects.acreate(
            conversation=conversation,
            role=Message.Role.ASSISTANT,
            status=Message.Status.STREAMING,
            content="so far",
        )
        again = await replay(ws, conversation, "s3")
        assert [f["type"] for f in again] == ["conversation", "message"]
        assert again[1]["message"]["id"] == str(live.pk)
        assert again[1]["message"]["content"] == "so far"


async def test_subscribing_again_after_news_of_the_conversation_replays_it_whole(alice):
    """The socket was sent something about it (here a message from another
    tab), so it may have missed more: a gap, an end's tail."""
    conversation = await small_conversation(alice)
    async with chat_socket(alice) as ws:
        await replay(ws, conversation, "s1")
        news = protocol.message_frame(conversation.pk, {"id": "x", "role": "user"})
        await replies.broadcast(conversation.pk, news)
        assert await ws.receive_json_from(timeout=5) == news
        again = await replay(ws, conversation, "s2")
        assert [f["type"] for f in again] == ["conversation"] + ["message"] * 6
        assert "replay" not in again[0]
        assert (await replay(ws, conversation, "s3"))[0]["replay"] == "live"


async def test_subscribing_after_an_unsubscribe_replays_the_whole_conversation(alice):
    conversation = await small_conversation(alice)
    async with chat_socket(alice) as ws:
        await replay(ws, conversation, "s1")
        await ws.send_json_to({"type": "unsubscribe", "conversation": str(conversation.pk)})
        again = await replay(ws, conversation, "s2")
        assert [f["type"] for f in again] == ["conversation"] + ["message"] * 6


# Item 1: the bound on what a socket may leave unread (chatsite/sendbuffer.py).


class FakeTransport:
    """Twisted's FileDescriptor fields that say what is not yet written."""

    def __init__(self, unsent: int) -> None:
        self.dataBuffer = b"x" * (unsent + 10)
        self.offset = 10
        self._tempDataLen = 0


class FakeWebSocket:
    # autobahn's values
    STATE_CLOSED = 0
    STATE_CONNECTING = 1
    STATE_CLOSING = 2
    STATE_OPEN = 3

    def __init__(self, unsent: int) -> None:
        self.transport = FakeTransport(unsent)
        self.state = self.STATE_OPEN
        self.closed_with: int | None = None

    def sendClose(self, code: int) -> None:  # autobahn's name
        self.closed_with = code
        self.state = self.STATE_CLOSING


def recording_reply():
    sent = []

    async def handle_reply(server, protocol, message):
        sent.append(message)

    return sent, sendbuffer.bounded(handle_reply)


def test_unsent_bytes_counts_both_of_twisteds_buffers():
    transport = FakeTransport(100)
    transport._tempDataLen = 7
    assert sendbuffer.unsent_bytes(transport) == 107
    assert sendbuffer.unsent_bytes(object()) == 0


HI = {"type": "websocket.send", "text": "hi"}


async def test_a_send_with_room_goes_through_at_once(settings):
    settings.CHAT_SEND_BUFFER = 1000
    sent, handle_reply = recording_reply()
    socket = FakeWebSocket(unsent=1000)
    await handle_reply(None, socket, HI)
    assert (sent, socket.closed_with) == ([HI], None)


async def test_a_send_waits_while_the_client_catches_up(settings):
    settings.CHAT_SEND_BUFFER, settings.CHAT_SEND_TIMEOUT = 1000, 30
    sent, handle_reply = recording_reply()
    socket = FakeWebSocket(unsent=5000)
    task = asyncio.create_task(handle_reply(None, socket, HI))
    await asyncio.sleep(3 * sendbuffer.POLL)
    assert sent == [] and not task.done()
    socket.transport.offset = len(socket.transport.dataBuffer)  # the client read it all
    await asyncio.wait_for(task, 10)
    assert (sent, socket.closed_with) == ([HI], None)


async def test_a_client_that_does_not_read_is_closed_as_too_slow(settings):
    settings.CHAT_SEND_BUFFER, settings.CHAT_SEND_TIMEOUT = 1000, 0.2
    sent, handle_reply = recording_reply()
    socket = FakeWebSocket(unsent=1001)
    await asyncio.wait_for(handle_reply(None, socket, HI), 10)
    assert sent == []
    assert socket.closed_with == protocol.CLOSE_TOO_SLOW
    # A closing socket gets no more sends (autobahn would raise them into the
    # consumer, killing it before disconnect()), and no more waits; the
    # consumer's own close still goes through.
    await handle_reply(None, socket, {"type": "websocket.send", "text": "more"})
    await handle_reply(None, socket, {"type": "websocket.close", "code": 1000})
    assert sent == [{"type": "websocket.close", "code": 1000}]


async def test_a_send_after_the_close_began_is_dropped_not_raised(settings):
    """The client went away (its close handshake begun or done) while a
    reply streamed to it: the frames that follow are dropped quietly."""
    sent, handle_reply = recording_reply()
    socket = FakeWebSocket(unsent=0)
    for state in (FakeWebSocket.STATE_CLOSING, FakeWebSocket.STATE_CLOSED):
        socket.state = state
        await handle_reply(None, socket, HI)
    assert sent == []


# Item 1 against a real daphne: the attack of the issue, repeated.

FLOOD = 3000  # subscribe frames, as in the issue


def flood_and_watch(site, browser: Browser, conversation: str, frames: list[dict]) -> dict:
    """One socket that never reads sends FLOOD frames, cycling through
    frames; daphne's RSS before, at its peak while the socket is unread,
    and once the socket is gone; how the server ended the socket."""
    pid = site.processes[0].pid
    before = rss_mb(pid)
    ws = RawSocket(site.ws_url(), browser.ws_headers())
    sent = flood(ws, conversation, FLOOD, frames)
    peak = before
    for _ in range(75):  # 15 s of not reading
        peak = max(peak, rss_mb(pid))
        time.sleep(0.2)
    code = ws.drain(seconds=30)  # TimeoutError: the server never closed it
    ws.close()
    after = rss_mb(pid)
    for _ in range(150):  # up to 30 s for the memory to come back
        if after - before < 25:
            break
        time.sleep(0.2)
        after = rss_mb(pid)
    return {"before": before, "peak": peak, "after": after, "sent": sent, "code": code}


async def still_serves(site, browser: Browser, conversation: str, messages: int) -> None:
    async with websockets.connect(site.ws_url(), additional_headers=browser.ws_headers()) as ws:
        await receive(ws, "ready")
        await ws.send(json.dumps({"type": "subscribe", "conversation": conversation}))
        await ws.send(json.dumps({"type": "ping"}))
        frames = await receive(ws, "pong")
    assert [f["type"] for f in frames] == ["conversation"] + ["message"] * messages + ["pong"]


async def attack(site, frames: list[dict], close_code: int) -> None:
    """The flood, by a new user on a 200-message conversation of 2 KB each:
    daphne grows by less than 50 MB, gives it back, closes the socket with
    close_code (a client this far behind may see only the drop) and goes
    on serving."""
    browser = Browser(site.url())
    await asyncio.to_thread(browser.sign_up, "mallory")
    conversation = await asyncio.to_thread(long_conversation, site, "mallory")
    figures = await asyncio.to_thread(flood_and_watch, site, browser, conversation, frames)
    print(figures)
    assert figures["peak"] - figures["before"] < 50, figures
    assert figures["after"] - figures["before"] < 25, figures
    assert figures["code"] in (close_code, None), figures
    await still_serves(site, browser, conversation, 200)


@pytest.mark.slow
async def test_a_subscribe_flood_from_a_socket_that_never_reads_leaves_daphne_small(
    tmp_path, fake_llm_server
):
    with running_site(tmp_path, fake_llm_server.base_url) as site:
        await attack(site, [{"type": "subscribe"}], protocol.CLOSE_TOO_MANY_FRAMES)


@pytest.mark.slow
async def test_a_socket_that_never_reads_is_closed_once_its_backlog_is_full(
    tmp_path, fake_llm_server
):
    """Without the frame budget (set out of reach) and the no-replay rule
    (each subscribe follows an unsubscribe), only the send buffer's bound is
    left: each replay is 400 KB, FLOOD / 2 of them would be 600 MB."""
    budget = {"CHAT_FRAME_RATE": "100000", "CHAT_FRAME_BURST": "100000"}
    with running_site(tmp_path, fake_llm_server.base_url, CHAT_SEND_TIMEOUT="2", **budget) as site:
        cycle = [{"type": "subscribe"}, {"type": "unsubscribe"}]
        await attack(site, cycle, protocol.CLOSE_TOO_SLOW)


# Item 5: which pages may open a cookie socket.


def handshake(host: str | None, scheme: str = "ws", **headers: str) -> dict:
    pairs = [(k.lower().replace("_", "-").encode(), v.encode()) for k, v in headers.items()]
    if host is not None:
        pairs.append((b"host", host.encode()))
    return {"type": "websocket", "scheme": scheme, "headers": pairs}


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        pytest.param("http://127.0.0.1:8000", True, id="the-site-itself"),
        pytest.param("http://127.0.0.1:18998", False, id="another-port"),
        pytest.param("http://127.0.0.1", False, id="the-default-port"),
        pytest.param("http://localhost:1", False, id="another-host-name"),
        pytest.param("https://127.0.0.1:8000", False, id="https-when-served-over-http"),
        pytest.param("ws://127.0.0.1:8000", False, id="ws-scheme"),
        pytest.param("null", False, id="null"),
        pytest.param("http://evil.example", False, id="another-site"),
        pytest.param("http://127.0.0.1:8000.evil.example", False, id="a-longer-host"),
        pytest.param("", False, id="empty"),
    ],
)
def test_a_cookie_socket_origin_must_be_the_sites_own_scheme_host_and_port(origin, allowed):
    assert origin_allowed(handshake("127.0.0.1:8000"), origin) is allowed


def test_behind_tls_the_origin_is_https(settings):
    assert origin_allowed(handshake("127.0.0.1", "wss"), "https://127.0.0.1")
    assert not origin_allowed(handshake("127.0.0.1", "wss"), "http://127.0.0.1")
    # A TLS proxy in front says so in the header Django is told to trust.
    settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    proxied = handshake("chat.example", x_forwarded_proto="https")
    settings.ALLOWED_HOSTS = ["chat.example"]
    assert origin_allowed(proxied, "https://chat.example")
    assert not origin_allowed(proxied, "http://chat.example")


def test_a_host_outside_allowed_hosts_has_no_own_origin(settings):
    assert not origin_allowed(handshake("evil.example"), "http://evil.example")
    assert not origin_allowed(handshake(None), "http://127.0.0.1:8000")


def test_csrf_trusted_origins_are_allowed_too_with_wildcard_subdomains(settings):
    settings.CSRF_TRUSTED_ORIGINS = ["https://app.example", "https://*.example.org"]
    scope = handshake("127.0.0.1:8000")
    assert origin_allowed(scope, "https://app.example")
    assert not origin_allowed(scope, "http://app.example")
    assert origin_allowed(scope, "https://chat.example.org")
    assert not origin_allowed(scope, "http://chat.example.org")
    assert not origin_allowed(scope, "https://example.org.evil.example")


async def cookie_socket(user, **headers: str) -> WebsocketCommunicator:
    client = await sync_to_async(logged_in)(user)
    return site_socket(Cookie=f"sessionid={client.cookies['sessionid'].value}", **headers)


@pytest.mark.parametrize(
    "origin",
    [
        pytest.param({"Origin": "http://127.0.0.1:18998"}, id="another-port"),
        pytest.param({"Origin": "http://localhost:1"}, id="another-host"),
        pytest.param({"Origin": "https://127.0.0.1:8000"}, id="https"),
        pytest.param({"Origin": "ws://127.0.0.1:8000"}, id="ws"),
        pytest.param({"Origin": "null"}, id="null"),
        pytest.param({}, id="no-origin"),
    ],
)
async def test_a_cookie_socket_from_another_origin_is_refused_at_the_handshake(alice, origin):
    ws = await cookie_socket(alice, Host="127.0.0.1:8000", **origin)
    connected, _ = await ws.connect()
    assert not connected
    await ws.disconnect()


async def test_a_cookie_socket_from_the_sites_own_page_is_let_in(alice):
    ws = await cookie_socket(alice, Host="127.0.0.1:8000", Origin="http://127.0.0.1:8000")
    connected, _ = await ws.connect()
    assert connected
    assert (await ws.receive_json_from(timeout=10))["user"] == "alice"
    await ws.disconnect()


# Item 4: sockets end with the sign-in they were opened with.


async def signed_out(ws) -> bool:
    """The socket is closed with 4003 (within a few seconds)."""
    closed = await ws.receive_output(timeout=5)
    return closed == {"type": "websocket.close", "code": protocol.CLOSE_SIGNED_OUT}


async def two_sessions(user):
    return [await sync_to_async(logged_in)(user) for _ in range(2)]


async def test_logging_out_closes_the_cookie_sockets_of_that_session_only(alice):
    leaving, staying = await two_sessions(alice)
    sockets = [
        await session_socket(leaving),
        await session_socket(staying),
        await token_socket(alice),
    ]
    response = await sync_to_async(leaving.post)("/accounts/logout/")
    assert response.status_code == 302
    assert await signed_out(sockets[0])
    assert await answers(sockets[1]) and await answers(sockets[2])
    for ws in sockets:
        await ws.disconnect()


async def test_a_new_password_closes_the_cookie_sockets_of_every_session_but_not_tokens(alice):
    """The session that changes it stays signed in over HTTP, under a new
    key (update_session_auth_hash): its socket, opened with the old key, is
    closed too, and a new one with the new cookie is let in."""
    await sync_to_async(type(alice).objects.filter(pk=alice.pk).update)(
        is_staff=True, is_superuser=True
    )
    changing, other = await two_sessions(alice)
    sockets = [
        await session_socket(changing),
        await session_socket(other),
        await token_socket(alice),
    ]
    new = "another horse battery staple"
    response = await sync_to_async(changing.post)(
        f"/admin/auth/user/{alice.pk}/password/",
        {"password1": new, "password2": new},
    )
    assert response.status_code == 302, response.content[:500]
    assert await signed_out(sockets[0]) and await signed_out(sockets[1])
    assert await answers(sockets[2])
    again = await session_socket(changing)
    assert await answers(again)
    for ws in [*sockets, again]:
        await ws.disconnect()


async def test_deactivating_a_user_closes_every_socket_of_theirs(alice, bob):
    client = await sync_to_async(logged_in)(alice)
    sockets = [await session_socket(client), await token_socket(alice)]
    bobs = await token_socket(bob)
    alice.is_active = False
    await sync_to_async(alice.save)()  # as the admin's form or a shell would
    assert await signed_out(sockets[0]) and await signed_out(sockets[1])
    assert await answers(bobs)
    for ws in [*sockets, bobs]:
        await ws.disconnect()


async def test_saving_a_user_without_a_new_password_or_deactivation_closes_nothing(alice):
    client = await sync_to_async(logged_in)(alice)
    ws = await session_socket(client)
    alice.first_name = "Alice"
    await sync_to_async(alice.save)()
    await sync_to_async(alice.save)(update_fields=["last_login"])
    assert await answers(ws)
    await ws.disconnect()


async def test_a_sign_out_whose_check_fails_closes_the_socket_as_signed_out(alice, monkeypatch):
    """The cache or the database away just when a sign-out is announced:
    the socket is closed with 4003 (a page then asks the site whether it is
    still signed in), not killed with 1011 and left reconnecting."""
    client = await sync_to_async(logged_in)(alice)
    ws = await session_socket(client)

    def unreachable(self):
        raise ConnectionError("the cache is away")

    monkeypatch.setattr(signins.SignIn, "holds", unreachable)
    await sync_to_async(signins.signed_out)(alice.pk)
    assert await signed_out(ws)
    await ws.disconnect()


async def test_a_frame_that_races_the_sign_out_event_is_not_served(alice):
    """The epoch is moved before the group hears of it: a frame in between
    is checked against the database, found signed out, and not answered."""
    ws = await token_socket(alice)
    # Deactivated without a signal, the epoch moved without an event.
    await sync_to_async(type(alice).objects.filter(pk=alice.pk).update)(is_active=False)
    await cache.aset(signins._epoch_key(alice.pk), "moved")
    await ws.send_json_to({"type": "ping", "id": "raced"})
    assert await signed_out(ws)
    assert await ws.receive_nothing()
    await ws.disconnect()


@pytest.mark.slow
async def test_daphne_lets_a_cookie_socket_in_only_from_the_sites_own_origin(
    tmp_path, fake_llm_server
):
    with running_site(tmp_path, fake_llm_server.base_url) as site:
        browser = Browser(site.url())
        await asyncio.to_thread(browser.sign_up, "oscar")
        port = site.ports[0]
        cookie = {"Cookie": browser.cookie_header()}
        for origin in [
            "http://127.0.0.1:18998",
            "http://localhost:1",
            f"https://127.0.0.1:{port}",
            f"ws://127.0.0.1:{port}",
            "null",
            None,
        ]:
            headers = cookie if origin is None else {**cookie, "Origin": origin}
            with pytest.raises(websockets.InvalidStatus) as refused:
                async with websockets.connect(site.ws_url(), additional_headers=headers):
                    pass
            assert refused.value.response.status_code == 403, origin
        async with websockets.connect(site.ws_url(), additional_headers=browser.ws_headers()) as ws:
            assert (await receive(ws, "ready"))[-1]["user"] == "oscar"
        token = (await asyncio.to_thread(site.manage, "create_token", "oscar")).strip()
        by_token = {"Authorization": f"Bearer {token}"}  # and no Origin
        async with websockets.connect(site.ws_url(), additional_headers=by_token) as ws:
            assert (await receive(ws, "ready"))[-1]["user"] == "oscar"
