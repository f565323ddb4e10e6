"""Issue 12, item 12: a thumbs up or down, with an optional comment, on any
finished reply, over the socket: set, changed, taken back, shown in the
snapshots and sent to the owner's other tabs; nobody else's to rate."""

import uuid

import pytest
from asgiref.sync import sync_to_async

from conversations import protocol
from conversations.models import Conversation, Feedback, Message
from tests.helpers import chat_socket, finish_replies, logged_in, receive_until

pytestmark = pytest.mark.django_db(transaction=True)


async def conversation_with_reply(ws, model: str = "fake:n=3") -> tuple[str, str, str]:
    """A new conversation with one finished reply: its id, the user
    message's id and the reply's."""
    await ws.send_json_to(
        {"type": "send", "id": "s1", "conversation": None, "content": "Hi", "model": model}
    )
    frames = await receive_until(ws, "end")
    conversation = frames[0]["conversation"]["id"]
    user = next(f for f in frames if f["type"] == "message")["message"]["id"]
    return conversation, user, frames[-1]["message"]


async def rate(ws, conversation: str, message: str, rating, **fields) -> dict:
    frame = {"type": "feedback", "id": "f1", "conversation": conversation, "message": message}
    await ws.send_json_to({**frame, "rating": rating, **fields})
    return await ws.receive_json_from(timeout=10)


async def subscribed(ws, conversation: str) -> list[dict]:
    await ws.send_json_to({"type": "subscribe", "id": "sub", "conversation": conversation})
    await receive_until(ws, "conversation")
    user = await ws.receive_json_from(timeout=10)
    reply = await ws.receive_json_from(timeout=10)
    return [user, reply]


async def test_a_thumbs_up_is_saved_and_answered(alice, fake_llm):
    async with chat_socket(alice) as ws:
        conversation, _, reply = await conversation_with_reply(ws)
        answer = await rate(ws, conversation, reply, "up")
    assert answer == {
        "type": "feedback",
        "id": "f1",
        "conversation": conversation,
        "message": reply,
        "feedback": {"rating": "up", "comment": ""},
    }
    feedback = await Feedback.objects.aget(message_id=reply)
    assert (feedback.rating, feedback.comment) == (Feedback.Rating.UP, "")


async def test_feedback_can_be_changed_with_a_comment_and_stays_one_row(alice, fake_llm):
    async with chat_socket(alice) as ws:
        conversation, _, reply = await conversation_with_reply(ws)
        await rate(ws, conversation, reply, "up")
        answer = await rate(ws, conversation, reply, "down", comment="  Wrong about 7.  ")
        assert answer["feedback"] == {"rating": "down", "comment": "Wrong about 7."}
        # A rating again without the comment clears it: the frame is the whole feedback.
        again = await rate(ws, conversation, reply, "down")
    assert again["feedback"] == {"rating": "down", "comment": ""}
    rows = [f async for f in Feedback.objects.filter(message_id=reply)]
    assert [(f.rating, f.comment) for f in rows] == [(Feedback.Rating.DOWN, "")]
    assert rows[0].updated >= rows[0].created


async def test_feedback_can_be_taken_back(alice, fake_llm):
    async with chat_socket(alice) as ws:
        conversation, _, reply = await conversation_with_reply(ws)
        await rate(ws, conversation, reply, "up", comment="Nice")
        answer = await rate(ws, conversation, reply, None)
        # Taking back feedback there is none of is no error.
        again = await rate(ws, conversation, reply, None)
    assert answer["feedback"] is None and again["feedback"] is None
    assert not await Feedback.objects.filter(message_id=reply).aexists()


async def test_the_snapshots_carry_the_feedback(alice, fake_llm):
    async with chat_socket(alice) as ws:
        conversation, _, reply = await conversation_with_reply(ws)
        await rate(ws, conversation, reply, "down", comment="Too short")
        async with chat_socket(alice) as later:
            user_frame, reply_frame = await subscribed(later, conversation)
        await rate(ws, conversation, reply, None)
        async with chat_socket(alice) as after:
            _, cleared = await subscribed(after, conversation)
    assert reply_frame["message"]["id"] == reply
    assert reply_frame["message"]["feedback"] == {"rating": "down", "comment": "Too short"}
    assert "feedback" not in user_frame["message"]
    assert "feedback" not in cleared["message"]


async def test_the_owners_other_tab_gets_the_feedback(alice, fake_llm):
    async with chat_socket(alice) as ws, chat_socket(alice) as other:
        conversation, _, reply = await conversation_with_reply(ws)
        await subscribed(other, conversation)
        await rate(ws, conversation, reply, "up", comment="Spot on")
        heard = await other.receive_json_from(timeout=10)
        await rate(ws, conversation, reply, None)
        cleared = await other.receive_json_from(timeout=10)
        # The tab that rated hears its answer once, not the broadcast too.
        assert await ws.receive_nothing(timeout=0.2)
    assert heard == {
        "type": "feedback",
        "conversation": conversation,
        "message": reply,
        "feedback": {"rating": "up", "comment": "Spot on"},
    }
    assert cleared["feedback"] is None


async def test_another_users_reply_is_not_found(alice, bob, fake_llm):
    async with chat_socket(alice) as ws:
        conversation, _, reply = await conversation_with_reply(ws)
    async with chat_socket(bob) as intruder:
        answer = await rate(intruder, conversation, reply, "down")
    assert (answer["type"], answer["code"], answer["id"]) == ("error", "not_found", "f1")
    assert not await Feedback.objects.aexists()


async def test_a_reply_named_with_another_conversation_is_not_found(alice, fake_llm):
    async with chat_socket(alice) as ws:
        _, _, reply = await conversation_with_reply(ws)
        other, _, _ = await conversation_with_reply(ws)
        answer = await rate(ws, other, reply, "up")
        unknown = await rate(ws, other, str(uuid.uuid4()), "up")
        not_an_id = await rate(ws, other, "R1", "up")
    assert [a["code"] for a in (answer, unknown, not_an_id)] == ["not_found"] * 3
    assert not await Feedback.objects.aexists()


async def test_a_superseded_reply_is_not_found(alice, fake_llm):
    async with chat_socket(alice) as ws:
        conversation, _, reply = await conversation_with_reply(ws)
        await ws.send_json_to({"type": "regenerate", "conversation": conversation})
        await receive_until(ws, "end")
        answer = await rate(ws, conversation, reply, "up")
    assert answer["code"] == "not_found"


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param({"rating": "sideways"}, id="unknown-rating"),
        pytest.param({"rating": 1}, id="a-number"),
        pytest.param({"rating": True}, id="a-boolean"),
        pytest.param({}, id="no-rating"),
        pytest.param({"rating": None, "comment": "but why"}, id="a-comment-without-a-rating"),
        pytest.param({"rating": "up", "comment": 5}, id="a-comment-not-text"),
        pytest.param({"rating": "up", "comment": "a\x00b"}, id="a-comment-with-nul"),
    ],
)
async def test_a_bad_feedback_frame_is_a_bad_request(alice, fake_llm, fields):
    async with chat_socket(alice) as ws:
        conversation, _, reply = await conversation_with_reply(ws)
        frame = {"type": "feedback", "id": "f1", "conversation": conversation, "message": reply}
        await ws.send_json_to({**frame, **fields})
        answer = await ws.receive_json_from(timeout=10)
    assert (answer["type"], answer["code"], answer["id"]) == ("error", "bad_request", "f1")
    assert not await Feedback.objects.aexists()


async def test_a_comment_over_the_limit_is_too_large(alice, fake_llm):
    async with chat_socket(alice) as ws:
        conversation, _, reply = await conversation_with_reply(ws)
        answer = await rate(ws, conversation, reply, "up", comment="x" * (protocol.MAX_COMMENT + 1))
        at_limit = await rate(ws, conversation, reply, "up", comment="x" * protocol.MAX_COMMENT)
    assert answer["code"] == "too_large"
    assert at_limit["feedback"]["comment"] == "x" * protocol.MAX_COMMENT


async def test_only_finished_replies_are_rated(alice, fake_llm):
    async with chat_socket(alice) as ws:
        conversation, user, _ = await conversation_with_reply(ws)
        user_answer = await rate(ws, conversation, user, "up")
        await ws.send_json_to(
            {
                "type": "send",
                "conversation": conversation,
                "content": "Slowly",
                "model": "fake-slow",
            }
        )
        live = (await receive_until(ws, "delta"))[-1]["message"]
        live_answer = await rate(ws, conversation, live, "up")
        while live_answer["type"] != "error":
            live_answer = await ws.receive_json_from(timeout=10)
        await ws.send_json_to({"type": "stop", "conversation": conversation})
        await receive_until(ws, "end")
        # Stopped is finished.
        stopped = await rate(ws, conversation, live, "down")
        while stopped["type"] != "feedback":
            stopped = await ws.receive_json_from(timeout=10)
        await finish_replies()
    assert (user_answer["code"], user_answer["message"]) == (
        "bad_request",
        protocol.ONLY_REPLIES_TEXT,
    )
    assert (live_answer["code"], live_answer["message"]) == (
        "bad_request",
        protocol.NOT_FINISHED_TEXT,
    )
    assert stopped["feedback"] == {"rating": "down", "comment": ""}
    assert await Message.objects.filter(pk=live, status="stopped").aexists()


async def test_feedback_is_not_counted_against_the_send_rate_limit(alice, fake_llm, settings):
    settings.CHAT_RATE_LIMIT = 1
    async with chat_socket(alice) as ws:
        conversation, _, reply = await conversation_with_reply(ws)
        answers = [await rate(ws, conversation, reply, r) for r in ("up", "down", None, "up")]
    assert [a["type"] for a in answers] == ["feedback"] * 4


async def test_the_chat_page_shows_saved_feedback(alice, fake_llm):
    async with chat_socket(alice) as ws:
        conversation, _, reply = await conversation_with_reply(ws)
        await rate(ws, conversation, reply, "up", comment="Good")
    client = await sync_to_async(logged_in)(alice)
    chat = await Conversation.objects.aget(pk=conversation)
    response = await sync_to_async(client.get)(chat.get_absolute_url())
    saved = response.context["saved_messages"]
    assert saved[-1]["feedback"] == {"rating": "up", "comment": "Good"}


@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        pytest.param({"rating": "up"}, ("up", ""), id="up"),
        pytest.param({"rating": "down", "comment": " why "}, ("down", "why"), id="down-comment"),
        pytest.param({"rating": None}, (None, ""), id="cleared"),
        pytest.param({"rating": None, "comment": "   "}, (None, ""), id="cleared-blank-comment"),
        pytest.param({"rating": "up", "comment": None}, ("up", ""), id="null-comment"),
    ],
)
def test_feedback_request(frame, expected):
    conversation, message = str(uuid.uuid4()), str(uuid.uuid4())
    request = protocol.feedback_request(
        {"type": "feedback", "conversation": conversation, "message": message, **frame}
    )
    assert (request.conversation, request.message) == (conversation, message)
    assert (request.rating, request.comment) == expected
