"""Issue 9, items 2 and 9: a user cannot hog the model server (replies at
once, a reply's length, its time), and users never see the model server's
address, our exceptions or a megabyte of someone else's error text."""

import asyncio
import json
from pathlib import Path

import pytest
from asgiref.sync import sync_to_async
from django.urls import reverse

from conversations.models import Conversation, Message
from tests.helpers import chat_socket, finish_replies, receive_until, streamed_text

pytestmark = pytest.mark.django_db(transaction=True)

# A runaway model server: streams w1 w2 w3 … until the client hangs up.
ENDLESS = "fake:endless=1,delay=0.05"
RUNAWAY = "fake:endless=1,delay=0"


def endless_text(tokens: int) -> str:
    return "".join(f"w{i} " for i in range(1, tokens + 1))


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


async def receive_first(ws, matches, timeout: float = 10.0) -> dict:
    """The first frame that matches, past the deltas of other live replies."""
    async with asyncio.timeout(timeout):
        while True:
            frame = await ws.receive_json_from(timeout=timeout)
            if matches(frame):
                return frame


async def answer_to(ws, request_id: str) -> dict:
    return await receive_first(
        ws, lambda f: f.get("id") == request_id and f["type"] in ("conversation", "error")
    )


async def start_reply(ws, model=ENDLESS, conversation=None, content="Go on forever") -> dict:
    """Send, and return the answer to it: a conversation once its reply has
    started, or an error."""
    frame = {"type": "send", "id": "s", "conversation": conversation, "content": content}
    await ws.send_json_to({**frame, "model": model})
    first = await answer_to(ws, "s")
    if first["type"] == "conversation":
        started = first["conversation"]["id"]
        await receive_first(ws, lambda f: f["type"] == "start" and f["conversation"] == started)
    return first


async def end_of(ws, conversation_id: str) -> dict:
    return await receive_first(
        ws, lambda f: f["type"] == "end" and f["conversation"] == conversation_id
    )


async def stop_all(ws, conversation_ids) -> None:
    for conversation_id in conversation_ids:
        await ws.send_json_to({"type": "stop", "conversation": conversation_id})
    await finish_replies()


# Item 2: replies at once.


async def test_a_fourth_reply_at_once_is_refused_while_bob_can_still_send(alice, bob, fake_llm):
    async with chat_socket(alice) as ws, chat_socket(bob) as bob_ws:
        # One finished conversation, to regenerate in later.
        done = await start_reply(ws, model="fake")
        await receive_until(ws, "end")
        running = []
        for _ in range(3):
            first = await start_reply(ws)
            assert first["type"] == "conversation", first
            running.append(first["conversation"]["id"])

        refused = await start_reply(ws)
        assert refused["type"] == "error" and refused["code"] == "too_many_replies", refused
        assert refused["id"] == "s" and "3" in refused["message"]
        await ws.send_json_to(
            {"type": "regenerate", "id": "g", "conversation": done["conversation"]["id"]}
        )
        regenerate = await answer_to(ws, "g")
        assert regenerate["code"] == "too_many_replies" and regenerate["id"] == "g"

        bobs = await start_reply(bob_ws)
        assert bobs["type"] == "conversation", bobs

        await stop_all(ws, running)
        await stop_all(bob_ws, [bobs["conversation"]["id"]])
    # The refused send saved nothing: no conversation, no message.
    assert await Conversation.objects.filter(owner=alice).acount() == 4
    assert await Message.objects.filter(conversation__owner=alice).acount() == 8


async def test_a_reply_ending_frees_its_place(alice, fake_llm, settings):
    settings.CHAT_MAX_REPLIES_PER_USER = 1
    async with chat_socket(alice) as ws:
        first = await start_reply(ws)
        assert (await start_reply(ws))["code"] == "too_many_replies"
        await stop_all(ws, [first["conversation"]["id"]])
        again = await start_reply(ws, model="fake")
        assert again["type"] == "conversation", again
        assert (await end_of(ws, again["conversation"]["id"]))["status"] == "complete"


async def test_the_site_cap_counts_every_users_replies(alice, bob, fake_llm, settings):
    settings.CHAT_MAX_REPLIES = 2
    async with chat_socket(alice) as ws, chat_socket(bob) as bob_ws:
        alices = await start_reply(ws)
        bobs = await start_reply(bob_ws)
        refused = await start_reply(bob_ws)
        assert refused["code"] == "too_many_replies", refused
        assert "site" in refused["message"] and "2" in refused["message"]
        await stop_all(ws, [alices["conversation"]["id"]])
        await stop_all(bob_ws, [bobs["conversation"]["id"]])


# Item 2: a reply's length.


async def test_max_tokens_over_the_cap_is_refused_and_nothing_is_saved(alice, fake_llm):
    async with chat_socket(alice) as ws:
        frame = {"type": "send", "id": "m", "conversation": None, "content": "hi"}
        await ws.send_json_to({**frame, "options": {"max_tokens": 32_001}})
        refused = await ws.receive_json_from(timeout=10)
        assert refused["code"] == "bad_request" and "32000" in refused["message"], refused
    assert not await Conversation.objects.filter(owner=alice).aexists()
    assert fake_llm.requests == []


async def test_a_reply_without_max_tokens_asks_the_server_for_the_cap(alice, fake_llm, settings):
    settings.CHAT_MAX_TOKENS = 1234
    async with chat_socket(alice) as ws:
        await start_reply(ws, model="fake")
        await receive_until(ws, "end")
    assert fake_llm.requests[-1]["max_tokens"] == 1234


async def test_a_reply_the_server_cuts_at_max_tokens_ends_with_finish_reason_length(
    alice, fake_llm
):
    async with chat_socket(alice) as ws:
        frame = {"type": "send", "conversation": None, "content": "hi", "model": "fake"}
        await ws.send_json_to({**frame, "options": {"max_tokens": 4}})
        end = (await receive_until(ws, "end"))[-1]
    assert end["status"] == "complete" and end["finish_reason"] == "length", end
    reply = await Message.objects.aget(pk=end["message"])
    # A frame names the reply's versions: built off the event loop, as the
    # site builds it, since that reads the database.
    assert (await sync_to_async(reply.as_frame)())["finish_reason"] == "length"


async def test_a_runaway_reply_stops_at_the_character_cap_with_its_text_kept(
    alice, fake_llm, settings
):
    settings.CHAT_MAX_REPLY_CHARS = 5000
    async with chat_socket(alice) as ws:
        await start_reply(ws, model=RUNAWAY)
        frames = await receive_until(ws, "end", timeout=30)
    end = frames[-1]
    assert end["status"] == "complete" and end["finish_reason"] == "length", end
    assert "error" not in end
    reply = await Message.objects.aget(pk=end["message"])
    assert reply.content == endless_text(2000)[:5000] == streamed_text(frames)
    assert reply.finish_reason == "length"
    assert fake_llm.wait_cancelled()  # the model server was told to stop


async def test_a_runaway_reply_stops_at_the_token_cap(alice, fake_llm, settings):
    settings.CHAT_MAX_TOKENS = 40
    async with chat_socket(alice) as ws:
        await start_reply(ws, model=RUNAWAY)
        end = (await receive_until(ws, "end", timeout=30))[-1]
    assert end["status"] == "complete" and end["finish_reason"] == "length", end
    reply = await Message.objects.aget(pk=end["message"])
    assert reply.content == endless_text(40)
    assert fake_llm.wait_cancelled()


async def test_a_runaway_reply_at_the_default_caps_keeps_memory_bounded(alice, fake_llm):
    async with chat_socket(alice) as ws:
        before = rss_mb()
        await start_reply(ws, model=RUNAWAY)
        frames = await receive_until(ws, "end", timeout=120)
        grown = rss_mb() - before
    end = frames[-1]
    assert end["finish_reason"] == "length", end
    reply = await Message.objects.aget(pk=end["message"])
    assert len(reply.content) == 200_000  # the character cap comes first
    assert grown < 50, f"RSS grew {grown:.0f} MB"


# Item 2: a reply's time.


async def test_the_deadline_ends_a_slow_endless_reply_with_timeout_and_keeps_the_text(
    alice, fake_llm, settings
):
    settings.CHAT_REPLY_DEADLINE = 1.0
    settings.LLM_READ_TIMEOUT = 120.0  # per read: never reached by a steady stream
    async with chat_socket(alice) as ws:
        await start_reply(ws, model=ENDLESS)
        frames = await receive_until(ws, "end", timeout=30)
        error = await ws.receive_json_from(timeout=10)
    end = frames[-1]
    assert end["status"] == "interrupted" and end["error"]["code"] == "timeout", end
    assert error["type"] == "error" and error["code"] == "timeout" and error["id"] == "s"
    reply = await Message.objects.aget(pk=end["message"])
    text = streamed_text(frames)
    assert text.startswith("w1 w2 ") and reply.content == text
    assert reply.error_code == "timeout"
    assert fake_llm.wait_cancelled()


# Item 9: internal details.


async def test_a_huge_upstream_error_reaches_users_cut_short(alice, fake_llm):
    async with chat_socket(alice) as ws:
        await start_reply(ws, model="fake:fault=huge")
        end = (await receive_until(ws, "end"))[-1]
        error = await ws.receive_json_from(timeout=10)
    assert end["error"]["code"] == "upstream_error"
    assert end["error"]["message"].startswith("fake huge error xxx")
    assert len(end["error"]["message"]) <= 300
    assert error["code"] == "upstream_error" and len(error["message"]) <= 300
    reply = await Message.objects.aget(pk=end["message"])
    assert len(reply.error) <= 300
    assert reply.error_detail.startswith("HTTP 500") and len(reply.error_detail) <= 4096


async def test_a_refused_connection_shows_users_no_address(alice, settings):
    port = settings.LLM_BASE_URL.rsplit(":", 1)[1].split("/")[0]
    async with chat_socket(alice) as ws:
        await start_reply(ws, model="fake")
        frames = await receive_until(ws, "end")
        frames.append(await ws.receive_json_from(timeout=10))
    end, error = frames[-2], frames[-1]
    assert end["error"] == {
        "code": "upstream_unavailable",
        "message": "The model server is not reachable.",
    }
    assert error["code"] == "upstream_unavailable"
    seen = json.dumps(frames)
    assert port not in seen and "127.0.0.1" not in seen and "http" not in seen
    reply = await Message.objects.aget(pk=end["message"])
    assert port not in reply.error
    # Staff still learn where the site looked.
    assert settings.LLM_BASE_URL in reply.error_detail
    assert "error_detail" not in json.dumps(await sync_to_async(reply.as_frame)())


def test_the_admin_shows_the_staff_only_detail_escaped(admin_client, alice):
    conversation = Conversation.objects.create(owner=alice, model="fake")
    _, reply, _ = conversation.start_turn("hi", "fake", {})
    reply.status, reply.error_code = Message.Status.ERROR, "upstream_error"
    reply.error = "The model server answered HTTP 500."
    reply.error_detail = "HTTP 500 from the model server: <b>boom</b> at http://10.0.0.7:8080/v1"
    reply.save()

    page = admin_client.get(reverse("admin:conversations_message_change", args=[reply.pk]))

    html = page.content.decode()
    assert page.status_code == 200
    assert "&lt;b&gt;boom&lt;/b&gt; at http://10.0.0.7:8080/v1" in html
    assert "<b>boom</b>" not in html
