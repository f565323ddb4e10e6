"""The WebSocket protocol v1, driven through WebsocketCommunicator against
the fake model server over real HTTP."""

import asyncio
import contextlib
import json
import time

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.urls import reverse
from django.utils import timezone

from chatsite.asgi import application
from conversations import replies
from conversations.consumers import ChatConsumer
from conversations.layers import channel_layer
from conversations.models import Conversation, Message
from tests.fake_llm import expected_text, reasoning_for, tokens_for
from tests.helpers import (
    chat_socket,
    finish_replies,
    logged_in,
    orphaned_reply,
    receive_until,
    streamed_text,
)

pytestmark = pytest.mark.django_db(transaction=True)


async def send(communicator, content="Hello there", conversation=None, **fields) -> dict:
    frame = {"type": "send", "id": "r1", "conversation": conversation, "content": content}
    await communicator.send_json_to({**frame, **fields})
    first = await communicator.receive_json_from(timeout=10)
    return first


async def new_conversation(communicator, model="fake", content="Hello there") -> str:
    """Sends a first message and waits for the reply to end; the id."""
    first = await send(communicator, content, model=model)
    assert first["type"] == "conversation", first
    await receive_until(communicator, "end")
    return first["conversation"]["id"]


async def test_ready_frame_lists_models_and_default(alice, fake_llm):
    async with chat_socket(alice) as ws:
        ready = ws.ready
    assert ready == {
        "type": "ready",
        "user": "alice",
        "protocol": 1,
        "models": sorted(["fake", "fake-slow", "fake-think", "fake-reasoning-field", "fake-long"]),
        "default_model": "fake",
        "llm": "ok",
    }


async def test_ready_says_unavailable_when_model_server_is_down(alice):
    async with chat_socket(alice) as ws:
        assert ws.ready["llm"] == "unavailable"
        assert ws.ready["models"] == []


async def test_anonymous_socket_is_refused_at_handshake(db):
    communicator = WebsocketCommunicator(application, "/ws/chat/")
    connected, _ = await communicator.connect()
    assert not connected
    assert await communicator.receive_nothing()
    await communicator.disconnect()


async def test_send_creates_conversation_saves_and_streams_reply(alice, fake_llm):
    async with chat_socket(alice) as ws:
        first = await send(ws, "What is up?", model="fake")
        assert first["type"] == "conversation" and first["id"] == "r1"
        conversation_id = first["conversation"]["id"]
        assert first["conversation"]["title"] == "What is up?"
        user_frame = await ws.receive_json_from(timeout=5)
        assert user_frame["type"] == "message" and user_frame["id"] == "r1"
        assert user_frame["message"]["role"] == "user"
        assert user_frame["message"]["content"] == "What is up?"
        frames = await receive_until(ws, "end")
    start, *deltas, end = frames
    assert start == {
        "type": "start",
        "conversation": conversation_id,
        "message": start["message"],
        "model": "fake",
        "parent": user_frame["message"]["id"],
        "siblings": [start["message"]],
    }
    assert [d["seq"] for d in deltas] == list(range(1, len(deltas) + 1))
    assert streamed_text(frames) == expected_text("fake")
    assert end["status"] == "complete"
    assert end["usage"]["completion_tokens"] == 12
    assert end["usage"]["prompt_tokens"] > 0
    assert end["timing"]["duration_ms"] >= end["timing"]["ttft_ms"] >= 0
    reply = await Message.objects.aget(pk=start["message"])
    assert reply.content == expected_text("fake")
    assert reply.status == "complete"
    assert reply.seq == len(deltas)
    assert reply.completion_tokens == 12


async def test_first_token_is_sent_at_once_then_deltas_are_coalesced(alice, fake_llm, settings):
    settings.CHAT_COALESCE_MS = 200
    async with chat_socket(alice) as ws:
        await send(ws, "hi", model="fake:n=30,delay=0.01")
        await ws.receive_json_from()  # the user message
        began = time.monotonic()
        frames = await receive_until(ws, "end")
        streamed_for = time.monotonic() - began
    deltas = [f for f in frames if f["type"] == "delta"]
    # 30 tokens 10 ms apart in 200 ms windows: the first alone, then batches,
    # at most one a window (a loaded machine streams for longer than 300 ms).
    assert deltas[0]["content"] == "w1 "
    assert 2 <= len(deltas) <= streamed_for / 0.2 + 3
    assert streamed_text(frames) == expected_text("fake:n=30")


async def test_reasoning_is_streamed_and_kept_apart_from_the_answer(alice, fake_llm):
    async with chat_socket(alice) as ws:
        await send(ws, "think", model="fake-think")
        await ws.receive_json_from()
        frames = await receive_until(ws, "end")
    assert streamed_text(frames) == expected_text("fake-think")
    assert streamed_text(frames, "reasoning") == reasoning_for("fake-think")
    reply = await Message.objects.aget(pk=frames[0]["message"])
    assert reply.reasoning == reasoning_for("fake-think")
    assert "<think>" not in reply.content and "r1" not in reply.content


async def test_reasoning_never_goes_back_to_the_model(alice, fake_llm):
    async with chat_socket(alice) as ws:
        conversation_id = await new_conversation(ws, model="fake-think")
        await send(ws, "again", conversation=conversation_id)
        await receive_until(ws, "end")
    sent = fake_llm.requests[-1]["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "user"]
    assert sent[1]["content"] == expected_text("fake-think")
    assert all("r1" not in m["content"] for m in sent)


async def test_history_sends_system_prompt_and_earlier_turns(alice, fake_llm):
    async with chat_socket(alice) as ws:
        first = await send(ws, "one", model="fake", system="Be brief.")
        conversation_id = first["conversation"]["id"]
        await receive_until(ws, "end")
        await send(ws, "two", conversation=conversation_id)
        await receive_until(ws, "end")
    assert fake_llm.requests[-1]["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": expected_text("fake")},
        {"role": "user", "content": "two"},
    ]


async def test_options_are_saved_and_sent_to_the_model(alice, fake_llm):
    options = {"temperature": 0.2, "top_p": 0.9, "max_tokens": 5, "seed": 7}
    async with chat_socket(alice) as ws:
        await send(ws, "hi", model="fake", options=options)
        await ws.receive_json_from()
        frames = await receive_until(ws, "end")
    body = fake_llm.requests[-1]
    assert {k: body[k] for k in options} == options
    assert streamed_text(frames) == "".join(tokens_for("fake", max_tokens=5))
    reply = await Message.objects.aget(pk=frames[0]["message"])
    assert reply.options == options


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("not json", "bad_request"),
        ("[1, 2]", "bad_request"),
        ('"send"', "bad_request"),
        ('{"type": "dance"}', "bad_request"),
        ('{"no": "type"}', "bad_request"),
        ('{"type": "send", "conversation": null}', "bad_request"),
        ('{"type": "send", "conversation": null, "content": 5}', "bad_request"),
        ('{"type": "send", "conversation": null, "content": "   "}', "bad_request"),
        ('{"type": "send", "conversation": 12, "content": "hi"}', "bad_request"),
        ('{"type": "send", "conversation": null, "content": "hi", "model": 3}', "bad_request"),
        ('{"type": "send", "conversation": null, "content": "hi", "options": []}', "bad_request"),
        (
            '{"type": "send", "conversation": null, "content": "hi",'
            ' "options": {"temperature": "hot"}}',
            "bad_request",
        ),
        (
            '{"type": "send", "conversation": null, "content": "hi", "options": {"max_tokens": 0}}',
            "bad_request",
        ),
        ('{"type": "subscribe"}', "bad_request"),
        ('{"type": "stop", "conversation": ["x"]}', "bad_request"),
        ('{"type": "ping", "id": 12}', "bad_request"),
        ('{"type": "ping", "id": "' + "x" * 65 + '"}', "bad_request"),
        ('{"type": []}', "bad_request"),
        pytest.param("[" * 100_000 + "]" * 100_000, "bad_request", id="deeply-nested"),
        ('{"type": {"a": 1}}', "bad_request"),
        ('{"type": "send", "conversation": null, "content": "\\ud800 hi"}', "bad_request"),
        pytest.param(
            '{"type": "send", "conversation": null, "content": "a\\u0000b"}',
            "bad_request",
            id="a-nul-in-content",
        ),
        pytest.param(
            '{"type": "send", "conversation": null, "content": "hi", "system": "\\u0000"}',
            "bad_request",
            id="a-nul-in-system",
        ),
        pytest.param(
            '{"type": "send", "conversation": null, "content": "\\u200b\\u2060"}',
            "bad_request",
            id="only-zero-width-content",
        ),
        (
            '{"type": "send", "conversation": null, "content": "hi", "model": "\\udfff"}',
            "bad_request",
        ),
        (
            '{"type": "send", "conversation": null, "content": "hi", "options": {"seed": 1'
            + "0" * 400
            + "}}",
            "bad_request",
        ),
    ],
)
async def test_bad_frames_get_an_error_and_the_socket_stays_usable(alice, fake_llm, frame, code):
    async with chat_socket(alice) as ws:
        await ws.send_to(text_data=frame)
        error = await ws.receive_json_from()
        assert error["type"] == "error" and error["code"] == code
        assert error["message"]
        await ws.send_json_to({"type": "ping", "id": "p"})
        assert await ws.receive_json_from() == {"type": "pong", "id": "p"}
    assert await Message.objects.acount() == 0
    assert await Conversation.objects.acount() == 0


async def test_unknown_fields_are_ignored(alice, fake_llm):
    async with chat_socket(alice) as ws:
        await ws.send_json_to({"type": "ping", "id": "p", "colour": "blue"})
        assert await ws.receive_json_from() == {"type": "pong", "id": "p"}


async def test_content_over_the_limit_is_too_large_and_nothing_is_saved(alice, fake_llm):
    async with chat_socket(alice) as ws:
        error = await send(ws, "x" * 32_001, model="fake")
        assert error == {
            "type": "error",
            "code": "too_large",
            "message": error["message"],
            "id": "r1",
        }
        first = await send(ws, "x" * 32_000, model="fake")
        assert first["type"] == "conversation"
        await receive_until(ws, "end")
    assert await Message.objects.filter(role="user").acount() == 1


async def test_a_frame_over_the_size_limit_is_too_large(alice):
    async with chat_socket(alice) as ws:
        await ws.send_to(text_data=json.dumps({"type": "ping", "pad": "x" * 300_000}))
        assert (await ws.receive_json_from())["code"] == "too_large"


async def test_other_users_cannot_send_to_my_conversation(alice, bob, fake_llm):
    async with chat_socket(alice) as ws:
        conversation_id = await new_conversation(ws)
    async with chat_socket(bob) as ws:
        error = await send(ws, "let me in", conversation=conversation_id)
        assert error["type"] == "error" and error["code"] == "not_found"
        assert await ws.receive_nothing()
    assert await Message.objects.acount() == 2
    assert len(fake_llm.requests) == 1


@pytest.mark.parametrize("frame_type", ["subscribe", "stop", "regenerate", "unsubscribe"])
async def test_other_users_cannot_touch_my_conversation(alice, bob, fake_llm, frame_type):
    async with chat_socket(alice) as ws:
        conversation_id = await new_conversation(ws)
    async with chat_socket(bob) as ws:
        await ws.send_json_to({"type": frame_type, "id": "x", "conversation": conversation_id})
        if frame_type == "unsubscribe":
            # Unsubscribing from what one never had is a no-op, not a leak.
            assert await ws.receive_nothing()
        else:
            error = await ws.receive_json_from()
            assert error == {
                "type": "error",
                "code": "not_found",
                "message": error["message"],
                "id": "x",
            }
            assert await ws.receive_nothing()
    assert await Message.objects.acount() == 2


async def test_a_conversation_that_does_not_exist_is_not_found(alice, fake_llm):
    async with chat_socket(alice) as ws:
        for conversation in ["0b8f2c36-7d7e-4c4e-9d55-2d8c2f1a0c11", "not-a-uuid"]:
            error = await send(ws, "hi", conversation=conversation)
            assert error["code"] == "not_found"
    assert await Message.objects.acount() == 0


async def test_second_send_while_replying_is_busy(alice, fake_llm):
    async with chat_socket(alice) as ws:
        first = await send(ws, "hi", model="fake-slow")
        conversation_id = first["conversation"]["id"]
        reply = (await receive_until(ws, "delta"))[-1]["message"]
        await ws.send_json_to(
            {"type": "send", "id": "r2", "conversation": conversation_id, "content": "more"}
        )
        frames = await receive_until(ws, "error")
        assert frames[-1]["code"] == "busy" and frames[-1]["id"] == "r2"
        assert frames[-1]["reply"] == reply
        await ws.send_json_to({"type": "stop", "conversation": conversation_id})
        await receive_until(ws, "end")
    assert await Message.objects.filter(content="more").acount() == 0


async def test_stop_keeps_the_text_so_far_and_cancels_the_model_request(alice, fake_llm):
    async with chat_socket(alice) as ws:
        first = await send(ws, "hi", model="fake-slow")
        conversation_id = first["conversation"]["id"]
        await ws.receive_json_from()
        frames = await receive_until(ws, "delta")
        frames += await receive_until(ws, "delta")
        await ws.send_json_to({"type": "stop", "conversation": conversation_id})
        frames += await receive_until(ws, "end")
    end = frames[-1]
    assert end["status"] == "stopped"
    reply = await Message.objects.aget(pk=end["message"])
    assert reply.status == "stopped"
    assert reply.content == streamed_text(frames)
    assert 0 < len(reply.content) < len(expected_text("fake-slow"))
    assert await asyncio.to_thread(fake_llm.wait_cancelled)


async def test_stopped_replies_stay_in_the_history(alice, fake_llm):
    async with chat_socket(alice) as ws:
        first = await send(ws, "hi", model="fake-slow")
        conversation_id = first["conversation"]["id"]
        await receive_until(ws, "delta")
        await ws.send_json_to({"type": "stop", "conversation": conversation_id})
        frames = await receive_until(ws, "end")
        reply = await Message.objects.aget(pk=frames[-1]["message"])
        await send(ws, "next", conversation=conversation_id, model="fake")
        await receive_until(ws, "end")
    sent = fake_llm.requests[-1]["messages"]
    assert sent[1] == {"role": "assistant", "content": reply.content}


async def test_closing_the_socket_mid_reply_still_saves_the_whole_reply(alice, fake_llm):
    async with chat_socket(alice) as ws:
        await send(ws, "hi", model="fake:n=40,delay=0.02")
        frames = await receive_until(ws, "delta")
    reply = await Message.objects.aget(pk=frames[-2]["message"])
    assert reply.status == "streaming"
    await finish_replies()
    await reply.arefresh_from_db()
    assert reply.status == "complete"
    assert reply.content == expected_text("fake:n=40")


async def test_reply_text_is_saved_while_streaming_not_per_token(alice, fake_llm, settings):
    settings.CHAT_SAVE_INTERVAL = 0.3
    async with chat_socket(alice) as ws:
        await send(ws, "hi", model="fake:n=60,delay=0.02")
        await ws.receive_json_from()
        start = await ws.receive_json_from()
        await asyncio.sleep(0.8)
        reply = await Message.objects.aget(pk=start["message"])
        # Part of the text is already in the database mid-reply.
        assert reply.status == "streaming"
        assert reply.content and reply.content != expected_text("fake:n=60")
        assert expected_text("fake:n=60").startswith(reply.content)
        await receive_until(ws, "end")


async def test_subscribe_replays_messages_oldest_first(alice, fake_llm):
    async with chat_socket(alice) as ws:
        conversation_id = await new_conversation(ws, content="first")
        await send(ws, "second", conversation=conversation_id)
        await receive_until(ws, "end")
    async with chat_socket(alice) as ws:
        await ws.send_json_to({"type": "subscribe", "id": "s", "conversation": conversation_id})
        conversation = await ws.receive_json_from()
        assert conversation["type"] == "conversation" and conversation["id"] == "s"
        assert conversation["conversation"]["id"] == conversation_id
        messages = [await ws.receive_json_from() for _ in range(4)]
        assert await ws.receive_nothing()
    # Every frame answering the subscribe carries its id.
    assert {m["id"] for m in messages} == {"s"}
    assert [m["message"]["role"] for m in messages] == ["user", "assistant"] * 2
    assert [m["message"]["content"] for m in messages[::2]] == ["first", "second"]
    reply = messages[1]["message"]
    assert reply["status"] == "complete" and reply["content"] == expected_text("fake")
    assert reply["seq"] >= 1 and reply["usage"]["completion_tokens"] == 12
    assert set(reply["timing"]) == {"ttft_ms", "duration_ms", "tokens_per_s"}


async def test_joining_mid_reply_gets_text_so_far_then_every_later_delta(alice, fake_llm):
    model = "fake:n=60,delay=0.02"
    async with chat_socket(alice) as writer, chat_socket(alice) as reader:
        first = await send(writer, "hi", model=model)
        conversation_id = first["conversation"]["id"]
        await receive_until(writer, "delta")
        await asyncio.sleep(0.3)
        await reader.send_json_to({"type": "subscribe", "conversation": conversation_id})
        frames = await receive_until(reader, "end")
        await receive_until(writer, "end")
    snapshot = [f for f in frames if f["type"] == "message"][-1]["message"]
    assert snapshot["status"] == "streaming" and snapshot["seq"] > 0
    later = [f for f in frames if f["type"] == "delta"]
    assert [d["seq"] for d in later] == list(range(snapshot["seq"] + 1, later[-1]["seq"] + 1))
    assert snapshot["content"] + streamed_text(frames) == expected_text(model)


async def test_other_tabs_see_the_same_stream_and_the_user_message(alice, fake_llm):
    async with chat_socket(alice) as tab1, chat_socket(alice) as tab2:
        conversation_id = await new_conversation(tab1)
        await tab2.send_json_to({"type": "subscribe", "conversation": conversation_id})
        await receive_until(tab2, "message")
        await receive_until(tab2, "message")
        await send(tab1, "second", conversation=conversation_id)
        frames1 = await receive_until(tab1, "end")
        frames2 = await receive_until(tab2, "end")
    assert frames2[0]["type"] == "message" and frames2[0]["message"]["content"] == "second"
    assert "id" not in frames2[0]
    assert frames2[1:] == frames1


async def test_unsubscribe_stops_live_events(alice, fake_llm):
    async with chat_socket(alice) as tab1, chat_socket(alice) as tab2:
        conversation_id = await new_conversation(tab1)
        await tab2.send_json_to({"type": "subscribe", "conversation": conversation_id})
        await receive_until(tab2, "message")
        await receive_until(tab2, "message")
        await tab2.send_json_to({"type": "unsubscribe", "conversation": conversation_id})
        await send(tab1, "second", conversation=conversation_id)
        await receive_until(tab1, "end")
        assert await tab2.receive_nothing(timeout=0.3)


async def test_regenerate_replaces_the_last_reply_and_keeps_the_old_one(alice, fake_llm):
    async with chat_socket(alice) as ws:
        conversation_id = await new_conversation(ws)
        old = await Message.objects.filter(role="assistant").aget()
        await ws.send_json_to({"type": "regenerate", "conversation": conversation_id})
        frames = await receive_until(ws, "end")
    superseded = frames[0]
    assert superseded["type"] == "message" and superseded["message"]["id"] == str(old.pk)
    assert superseded["message"]["superseded"] is True
    assert frames[-1]["status"] == "complete" and frames[-1]["message"] != str(old.pk)
    await old.arefresh_from_db()
    assert old.superseded
    conversation = await Conversation.objects.aget(pk=conversation_id)
    history = await asyncio.to_thread(conversation.history)
    assert [m["role"] for m in history] == ["user", "assistant"]
    # The model was asked the same question again, without the old answer.
    assert fake_llm.requests[-1]["messages"] == [{"role": "user", "content": "Hello there"}]


async def test_regenerate_with_no_user_message_is_a_bad_request(alice, fake_llm):
    conversation = await Conversation.objects.acreate(owner=alice, model="fake")
    async with chat_socket(alice) as ws:
        await ws.send_json_to({"type": "regenerate", "conversation": str(conversation.pk)})
        assert (await ws.receive_json_from())["code"] == "bad_request"


async def test_model_change_in_send_applies_to_the_next_reply(alice, fake_llm):
    async with chat_socket(alice) as ws:
        conversation_id = await new_conversation(ws, model="fake")
        await send(ws, "again", conversation=conversation_id, model="fake-think")
        frames = await receive_until(ws, "end")
    update = next(f for f in frames if f["type"] == "conversation")
    assert update["conversation"]["model"] == "fake-think"
    start = next(f for f in frames if f["type"] == "start")
    assert start["model"] == "fake-think"
    assert fake_llm.requests[-1]["model"] == "fake-think"


async def test_rate_limit(alice, fake_llm, settings):
    settings.CHAT_RATE_LIMIT = 2
    async with chat_socket(alice) as ws:
        conversation_id = await new_conversation(ws)
        await send(ws, "two", conversation=conversation_id)
        await receive_until(ws, "end")
        error = await send(ws, "three", conversation=conversation_id)
    assert error["code"] == "rate_limited"
    assert 1 <= error["retry_after"] <= 60
    assert f"wait {error['retry_after']} second" in error["message"]
    assert not await Message.objects.filter(content="three").aexists()


async def test_a_burst_of_sends_over_several_sockets_passes_exactly_the_limit(
    alice, fake_llm, settings
):
    settings.CHAT_RATE_LIMIT = 5
    settings.CHAT_MAX_REPLIES_PER_USER = 16  # the rate limit alone, not the cap on replies at once

    async def answers(ws, socket: int) -> list[dict]:
        ids = {f"s{socket}-{n}" for n in range(4)}
        for request_id in sorted(ids):
            frame = {"type": "send", "id": request_id, "conversation": None, "content": "hi"}
            await ws.send_json_to(frame)
        first = {}
        while ids - first.keys():
            frame = await ws.receive_json_from(timeout=10)
            if frame["type"] in ("conversation", "error"):
                first.setdefault(frame["id"], frame)
        return list(first.values())

    async with (
        chat_socket(alice) as a,
        chat_socket(alice) as b,
        chat_socket(alice) as c,
        chat_socket(alice) as d,
    ):
        results = await asyncio.gather(*(answers(ws, n) for n, ws in enumerate((a, b, c, d))))
        await finish_replies()
    kinds = [frame["type"] for frames in results for frame in frames]
    assert kinds.count("conversation") == 5 and kinds.count("error") == 11
    assert await Conversation.objects.filter(owner=alice).acount() == 5


async def test_refused_connection_is_upstream_unavailable_and_keeps_the_question(alice):
    async with chat_socket(alice) as ws:
        await send(ws, "anyone?", model="fake")
        frames = await receive_until(ws, "end", timeout=5)
        error = await ws.receive_json_from(timeout=5)
    end = frames[-1]
    assert end["status"] == "error" and end["error"]["code"] == "upstream_unavailable"
    assert error["type"] == "error" and error["code"] == "upstream_unavailable"
    assert error["id"] == "r1"
    assert await Message.objects.filter(role="user", content="anyone?").aexists()
    reply = await Message.objects.aget(role="assistant")
    assert reply.status == "error" and reply.error_code == "upstream_unavailable"
    assert "model server" in reply.error


@pytest.mark.parametrize(
    ("model", "code"),
    [
        # Chosen when the server had it: a send naming no model is not checked.
        ("llama-not-pulled", "model_not_found"),
        ("fake:fault=500", "upstream_error"),
        ("fake:fault=html", "upstream_error"),
    ],
)
async def test_upstream_failures_before_any_text(alice, fake_llm, model, code):
    conversation = await Conversation.objects.acreate(owner=alice, model=model)
    async with chat_socket(alice) as ws:
        await send(ws, "hi", conversation=str(conversation.pk))
        frames = await receive_until(ws, "end")
        error = await ws.receive_json_from()
    assert frames[-1]["status"] == "error" and frames[-1]["error"]["code"] == code
    assert error["code"] == code
    reply = await Message.objects.aget(role="assistant")
    assert (reply.status, reply.error_code, reply.content) == ("error", code, "")


@pytest.mark.parametrize(
    ("model", "code"),
    [
        ("fake:fault=cut,after=4", "upstream_error"),
        ("fake:fault=malformed,after=4", "upstream_error"),
        ("fake:fault=stall,after=4,stall=5", "timeout"),
    ],
)
async def test_upstream_failures_mid_stream_keep_the_text_so_far(
    alice, fake_llm, settings, model, code
):
    settings.LLM_READ_TIMEOUT = 0.5
    async with chat_socket(alice) as ws:
        await send(ws, "hi", model=model)
        frames = await receive_until(ws, "end")
    end = frames[-1]
    assert end["status"] == "interrupted" and end["error"]["code"] == code
    assert streamed_text(frames) == "w1 w2 w3 w4 "
    reply = await Message.objects.aget(role="assistant")
    assert (reply.status, reply.error_code, reply.content) == ("interrupted", code, "w1 w2 w3 w4 ")


@pytest.mark.parametrize("coalesce_ms", [0, 30])
async def test_a_fast_long_reply_is_sent_and_saved_whole(alice, fake_llm, settings, coalesce_ms):
    settings.CHAT_COALESCE_MS = coalesce_ms
    model = "fake:n=2000,delay=0"
    async with chat_socket(alice) as ws:
        await send(ws, "go", model=model)
        await ws.receive_json_from()
        frames = await receive_until(ws, "end", timeout=60)
    deltas = [f for f in frames if f["type"] == "delta"]
    # Every delta up to the end's seq, the last one too.
    assert [d["seq"] for d in deltas] == list(range(1, frames[-1]["seq"] + 1))
    assert streamed_text(frames) == expected_text(model)
    reply = await Message.objects.aget(pk=frames[-1]["message"])
    assert reply.content == expected_text(model) and reply.seq == len(deltas)


async def test_a_reply_whose_writer_died_is_shown_interrupted_to_every_tab(alice, fake_llm):
    conversation, reply = await orphaned_reply(alice)
    async with chat_socket(alice) as watcher, chat_socket(alice) as ws:
        # While its heartbeat is recent, the reply is shown as still coming.
        await watcher.send_json_to({"type": "subscribe", "conversation": str(conversation.pk)})
        frames = await receive_until(watcher, "message")
        frames += await receive_until(watcher, "message")
        assert frames[-1]["message"]["status"] == "streaming"
        # No heartbeat for a minute, and no process answers for it.
        await Message.objects.filter(pk=reply.pk).aupdate(
            updated=reply.updated - timezone.timedelta(minutes=1)
        )
        await ws.send_json_to({"type": "subscribe", "conversation": str(conversation.pk)})
        frames = await receive_until(ws, "end")
        shown = [f for f in frames if f["type"] == "message"][-1]["message"]
        assert (shown["status"], shown["content"]) == ("interrupted", "half an")
        frames = await receive_until(watcher, "end")
        end = frames[-1]
    assert end["status"] == "interrupted" and end["message"] == str(reply.pk)
    # The watcher too is given the text as kept, which may be shorter than
    # the deltas it was shown.
    shown = [f for f in frames if f["type"] == "message"][-1]["message"]
    assert (shown["status"], shown["content"]) == ("interrupted", "half an")
    await reply.arefresh_from_db()
    assert reply.status == "interrupted"


async def test_a_tab_waiting_on_a_reply_whose_writer_died_is_told_without_asking(
    alice, fake_llm, monkeypatch
):
    monkeypatch.setattr(Message, "HEARTBEAT", timezone.timedelta(seconds=1))
    conversation, reply = await orphaned_reply(alice)
    async with chat_socket(alice) as ws:
        await ws.send_json_to({"type": "subscribe", "conversation": str(conversation.pk)})
        frames = await receive_until(ws, "message")
        frames += await receive_until(ws, "message")
        assert frames[-1]["message"]["status"] == "streaming"
        # Nothing more is sent by the client; the dead writer sends nothing.
        frames = await receive_until(ws, "end", timeout=10)
    assert frames[-1]["status"] == "interrupted" and frames[-1]["message"] == str(reply.pk)
    await reply.arefresh_from_db()
    assert reply.status == "interrupted"


async def test_a_quiet_reply_that_is_still_alive_is_not_ended(alice, fake_llm, monkeypatch):
    monkeypatch.setattr(Message, "HEARTBEAT", timezone.timedelta(seconds=0.2))
    async with chat_socket(alice) as ws:
        # Two seconds before the first token: ten heartbeats of silence.
        await send(ws, "hi", model="fake:ttft=2,n=3")
        frames = await receive_until(ws, "end", timeout=15)
    assert frames[-1]["status"] == "complete"
    assert streamed_text(frames) == expected_text("fake:n=3")


async def test_deleting_a_conversation_mid_reply_stops_the_model(alice, fake_llm):
    async with chat_socket(alice) as ws:
        first = await send(ws, "hi", model="fake-slow")
        conversation_id = first["conversation"]["id"]
        await receive_until(ws, "delta")
        client = await sync_to_async(logged_in)(alice)
        url = reverse("conversations:delete", args=[conversation_id])
        response = await sync_to_async(client.post)(url, HTTP_ACCEPT="application/json")
        assert response.status_code == 200
        await receive_until(ws, "deleted")
    assert await asyncio.to_thread(fake_llm.wait_cancelled)
    assert not await Message.objects.filter(conversation_id=conversation_id).aexists()


async def post_json(user, name: str, conversation_id: str, **data):
    client = await sync_to_async(logged_in)(user)
    url = reverse(f"conversations:{name}", args=[conversation_id])
    return await sync_to_async(client.post)(url, data, HTTP_ACCEPT="application/json")


async def subscribed_tab(ws, conversation_id: str) -> None:
    await ws.send_json_to({"type": "subscribe", "conversation": conversation_id})
    await receive_until(ws, "message")
    await receive_until(ws, "message")


@pytest.mark.parametrize(
    ("name", "data", "field", "value"),
    [
        pytest.param("rename", {"title": "Plans"}, "title", "Plans", id="rename"),
        pytest.param("settings", {"model": "fake-think"}, "model", "fake-think", id="model"),
        pytest.param("settings", {"system": "Be brief."}, "system", "Be brief.", id="system"),
    ],
)
async def test_a_change_made_on_the_page_reaches_every_subscribed_tab(
    alice, fake_llm, name, data, field, value
):
    async with chat_socket(alice) as ws, chat_socket(alice) as other:
        conversation_id = await new_conversation(ws)
        await subscribed_tab(other, conversation_id)
        response = await post_json(alice, name, conversation_id, **data)
        assert response.status_code == 200
        frames = [(await receive_until(tab, "conversation"))[-1] for tab in (ws, other)]
    assert [f["conversation"][field] for f in frames] == [value, value]
    assert {f["conversation"]["id"] for f in frames} == {conversation_id}


async def test_a_deleted_conversation_leaves_every_tab_however_it_is_deleted(alice, fake_llm):
    async with chat_socket(alice) as ws, chat_socket(alice) as other:
        conversation_id = await new_conversation(ws)
        await subscribed_tab(other, conversation_id)
        # Not the view: a bulk delete, as the admin's or a user's deletion does.
        await sync_to_async(Conversation.objects.filter(pk=conversation_id).delete)()
        frames = [(await receive_until(tab, "deleted"))[-1] for tab in (ws, other)]
        # Both tabs have left it: a later event for it reaches neither.
        await replies.broadcast(conversation_id, {"type": "pong"})
        assert await ws.receive_nothing() and await other.receive_nothing()
    assert frames == [{"type": "deleted", "conversation": conversation_id}] * 2


def deleting_first(monkeypatch) -> None:
    """Conversation.start_turn deletes its conversation before it runs: a
    delete from another tab landing between the consumer's read and the
    turn (issue 10: the soak found it as a 500 on Postgres)."""
    original = Conversation.start_turn

    def delete_then_run(self, *args, **kwargs):
        Conversation.objects.filter(pk=self.pk).delete()
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Conversation, "start_turn", delete_then_run)


async def test_a_regenerate_of_a_conversation_deleted_meanwhile_is_not_found(
    alice, fake_llm, monkeypatch
):
    async with chat_socket(alice) as ws:
        conversation_id = await new_conversation(ws)
        deleting_first(monkeypatch)
        await ws.send_json_to({"type": "regenerate", "id": "g1", "conversation": conversation_id})
        frames = await receive_until(ws, "error")
    assert (frames[-1]["code"], frames[-1]["id"]) == ("not_found", "g1")
    assert not await Message.objects.filter(conversation_id=conversation_id).aexists()


def deleting_while_looking(monkeypatch, conversation) -> None:
    """replies.current deletes the conversation before it looks a message up."""
    current = replies.current

    async def delete_then_look(message):
        await Conversation.objects.filter(pk=conversation.pk).adelete()
        return await current(message)

    monkeypatch.setattr(replies, "current", delete_then_look)


async def test_a_subscribe_racing_a_delete_is_not_found(alice, fake_llm, monkeypatch):
    """The conversation is read, then deleted while its live reply is being
    looked up: not_found, not server_error."""
    conversation, _ = await orphaned_reply(alice)
    deleting_while_looking(monkeypatch, conversation)
    async with chat_socket(alice) as ws:
        await ws.send_json_to(
            {"type": "subscribe", "id": "s1", "conversation": str(conversation.pk)}
        )
        frames = await receive_until(ws, "error")
    assert (frames[-1]["code"], frames[-1]["id"]) == ("not_found", "s1")


async def test_a_reply_deleted_while_the_watchdog_looks_it_up_is_let_go(alice, monkeypatch):
    """The watchdog looks again at a silent reply just as its conversation is
    deleted: it lets the reply go instead of failing its beat (a traceback
    in the soak's log)."""
    conversation, reply = await orphaned_reply(alice)
    deleting_while_looking(monkeypatch, conversation)
    consumer = ChatConsumer()
    consumer.held.hold(str(reply.pk), 3, str(conversation.pk))
    await consumer.look_again(str(reply.pk))
    assert str(reply.pk) not in consumer.held


async def test_a_gap_in_a_reply_deleted_meanwhile_lets_it_go(alice):
    """A delta out of order for a reply whose conversation has just been
    deleted: the socket lets the reply go and lives on (it died of a
    DoesNotExist, in the soak)."""
    conversation, reply = await orphaned_reply(alice)
    ids = str(conversation.pk), str(reply.pk)
    await Conversation.objects.filter(pk=conversation.pk).adelete()
    consumer = ChatConsumer()
    consumer.channel_name = "test.channel"
    consumer.subscriptions.add(ids[0])
    consumer.held.hold(ids[1], 3, ids[0])
    delta = {"type": "delta", "conversation": ids[0], "message": ids[1], "seq": 9, "content": "x"}
    await consumer.chat_event({"type": "chat.event", "conversation": ids[0], "frame": delta})
    assert ids[1] not in consumer.held


async def test_a_reply_whose_conversation_is_deleted_before_it_begins_ends_quietly(
    alice, fake_llm, caplog
):
    """Deleted between the turn and the history load: no traceback, no
    error for the user (the `deleted` frame says it all), no model call."""
    conversation = await Conversation.objects.acreate(owner=alice, model="fake")
    _, reply, _ = await sync_to_async(conversation.start_turn)("hi", "fake", {})
    await Conversation.objects.filter(pk=conversation.pk).adelete()
    requests_before = len(fake_llm.requests)
    await replies.ReplyWriter(conversation, reply, "", None).run()
    assert [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")] == []
    assert len(fake_llm.requests) == requests_before


async def test_a_busy_send_changes_nothing(alice, fake_llm):
    async with chat_socket(alice) as ws:
        first = await send(ws, "hi", model="fake-slow", system="Be brief.")
        conversation_id = first["conversation"]["id"]
        await receive_until(ws, "delta")
        error = await send(
            ws, "more", conversation=conversation_id, model="fake-think", system="Be long."
        )
        while error["type"] != "error":
            error = await ws.receive_json_from()
        assert error["code"] == "busy"
        await ws.send_json_to({"type": "stop", "conversation": conversation_id})
        await receive_until(ws, "end")
    conversation = await Conversation.objects.aget(pk=conversation_id)
    assert (conversation.model, conversation.system_prompt) == ("fake-slow", "Be brief.")


async def test_a_stop_that_comes_before_the_reply_starts_listening_still_stops_it(alice, fake_llm):
    conversation = await Conversation.objects.acreate(owner=alice, model="fake-slow")
    _, reply, _ = await sync_to_async(conversation.start_turn)("hi", "fake-slow", {})
    # As when the stop goes through another process before this one has
    # even started the reply.
    await replies.request_stop(conversation.pk, reply.pk)
    await replies.start(conversation, reply)
    await reply.arefresh_from_db()
    assert reply.status == "stopped"
    assert len(reply.content) < len(expected_text("fake-slow"))


async def test_wait_all_returns_once_every_running_reply_has_ended(alice, fake_llm):
    conversation = await Conversation.objects.acreate(owner=alice, model="fake")
    _, reply, _ = await sync_to_async(conversation.start_turn)("hi", "fake", {})
    replies.start(conversation, reply)
    await replies.wait_all()
    await reply.arefresh_from_db()
    assert (reply.status, reply.content) == ("complete", expected_text("fake"))


async def test_an_internal_failure_is_logged_not_shown(alice, fake_llm, monkeypatch, caplog):
    def broken(self):
        raise RuntimeError("secret internals at /srv/chatsite")

    monkeypatch.setattr(replies.ReplyWriter, "_history", broken)
    async with chat_socket(alice) as ws:
        await send(ws, "hi", model="fake")
        frames = await receive_until(ws, "error")
    end = next(f for f in frames if f["type"] == "end")
    assert (end["status"], end["error"]["code"]) == ("error", "upstream_error")
    assert all("secret" not in json.dumps(f) for f in frames)
    assert "secret internals" in caplog.text


async def test_a_send_naming_a_model_the_server_lacks_is_refused_and_saves_nothing(alice, fake_llm):
    async with chat_socket(alice) as ws:
        error = await send(ws, "hi", model="gpt-4")
        conversation_id = await new_conversation(ws, model="fake")
        refused = await send(ws, "more", conversation=conversation_id, model="gpt-4")
    assert (error["code"], refused["code"]) == ("model_not_found", "model_not_found")
    assert await Conversation.objects.acount() == 1
    conversation = await Conversation.objects.aget()
    assert conversation.model == "fake"
    assert not await Message.objects.filter(content="more").aexists()


async def test_any_model_name_is_taken_when_the_servers_list_cannot_be_had(alice):
    async with chat_socket(alice) as ws:
        first = await send(ws, "hi", model="gpt-4")
        await receive_until(ws, "end", timeout=10)
    assert first["type"] == "conversation" and first["conversation"]["model"] == "gpt-4"


async def test_a_reply_stores_the_model_the_server_says_answered(alice, fake_llm):
    async with chat_socket(alice) as ws:
        await send(ws, "hi", model="fake:served=smollm2")
        frames = await receive_until(ws, "end")
    reply = await Message.objects.aget(pk=frames[-1]["message"])
    assert reply.model == "smollm2"


def watchdogs() -> list[asyncio.Task]:
    return [
        task
        for task in asyncio.all_tasks()
        if getattr(task.get_coro(), "__qualname__", "") == "ChatConsumer.watch_replies"
    ]


async def test_a_socket_whose_channel_layer_fails_leaves_no_watchdog_behind(alice, monkeypatch):
    # As when Redis dies: the consumer's wait for channel-layer events
    # raises, the consumer ends (daphne closes the socket with 1011), and
    # disconnect() never runs.
    gone = asyncio.Event()
    layer = type(replies.channel_layer())

    async def receive(self, channel):
        await gone.wait()
        raise ConnectionError("Redis is gone")

    monkeypatch.setattr(layer, "receive", receive)
    before = set(watchdogs())
    ws = WebsocketCommunicator(ChatConsumer.as_asgi(), "/ws/chat/")
    ws.scope["user"] = alice
    try:
        assert (await ws.connect())[0]
        assert (await ws.receive_json_from(timeout=10))["type"] == "ready"
        assert len(set(watchdogs()) - before) == 1
        gone.set()
        with pytest.raises(ConnectionError):
            await ws.receive_output(timeout=5)
        await asyncio.sleep(0)  # the cancellation is delivered
        assert set(watchdogs()) - before == set()
    finally:
        with contextlib.suppress(ConnectionError):  # the consumer's own end
            await ws.disconnect()


async def test_a_socket_that_dies_of_an_error_still_leaves_its_groups(alice, fake_llm, settings):
    """An exception out of a handler kills the consumer before disconnect():
    its groups stayed in the channel layer (a day on Redis), and every
    event for them went on to a dead channel (issue 10, the soak)."""
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    layer = channel_layer()
    communicator = WebsocketCommunicator(ChatConsumer.as_asgi(), "/ws/chat/")
    communicator.scope["user"] = alice
    assert (await communicator.connect())[0]
    await receive_until(communicator, "ready")
    conversation_id = await new_conversation(communicator)
    group = replies.conversation_group(conversation_id)
    assert len(layer.groups[group]) == 1

    await layer.group_send(group, {"type": "no.such.handler"})  # ValueError in dispatch
    with pytest.raises(ValueError, match="No handler"):
        await communicator.wait(timeout=10)
    assert not layer.groups.get(group)
    assert all(not members for members in layer.groups.values())
