"""Issue 10, items 1 and 2: whatever text and counts a model server sends,
the reply is streamed, saved and ended with a status that says what was
saved. Run on SQLite and on Postgres + Redis (DATABASE_URL, REDIS_URL)."""

import asyncio

import pytest
from django.db import OperationalError

from conversations import replies
from conversations.models import Message
from tests.fake_llm import mended_text
from tests.helpers import chat_socket, finish_replies, receive_until, streamed_text

pytestmark = pytest.mark.django_db(transaction=True)


async def send_and_wait(user, model: str) -> list[dict]:
    """Every frame of a new conversation's reply, up to its end."""
    async with chat_socket(user) as ws:
        await ws.send_json_to({"type": "send", "id": "s", "content": "Hello", "model": model})
        frames = await receive_until(ws, "end", timeout=20)
    return frames


@pytest.mark.parametrize(
    "model",
    [
        pytest.param("fake-reasoning-field:mangle=split", id="split-pair"),
        pytest.param("fake-reasoning-field:mangle=high", id="lone-high"),
        pytest.param("fake-reasoning-field:mangle=low", id="lone-low"),
        pytest.param("fake-reasoning-field:mangle=nul", id="nul"),
    ],
)
async def test_mangled_model_text_is_mended_streamed_saved_and_ended(alice, fake_llm, model):
    content, reasoning = mended_text(model)

    frames = await send_and_wait(alice, model)
    await finish_replies()

    end = frames[-1]
    assert end["status"] == "complete", end
    assert streamed_text(frames) == content
    assert streamed_text(frames, "reasoning") == reasoning
    reply = await Message.objects.aget(pk=end["message"])
    assert (reply.status, reply.content, reply.reasoning) == ("complete", content, reasoning)


@pytest.mark.parametrize("bad", ["neg", "huge", "float", "string", "bool"])
async def test_bad_usage_counts_are_stored_as_null_and_the_reply_saved(alice, fake_llm, bad):
    frames = await send_and_wait(alice, f"fake:usage={bad}")
    await finish_replies()

    end = frames[-1]
    assert end["status"] == "complete", end
    assert end["usage"] == {"prompt_tokens": None, "completion_tokens": None}
    reply = await Message.objects.aget(pk=end["message"])
    assert (reply.prompt_tokens, reply.completion_tokens) == (None, None)
    assert reply.content == mended_text("fake")[0]
    assert reply.timing() == end["timing"]


def failing_final_saves(monkeypatch, times: int) -> list[int]:
    """Make the next `times` final saves (those that set the status) fail
    with a database error; returns the list of attempts, one entry each."""
    attempts: list[int] = []
    save = replies.ReplyWriter._save

    async def flaky(self, **extra):
        if "status" in extra:
            attempts.append(1)
            if len(attempts) <= times:
                raise OperationalError("the database is away")
        await save(self, **extra)

    monkeypatch.setattr(replies.ReplyWriter, "_save", flaky)
    monkeypatch.setattr(replies, "FINAL_SAVE_DELAYS", (0.01, 0.01))
    monkeypatch.setattr(replies, "LATER_SAVE_DELAYS", (0.01, 0.02, 0.04))
    return attempts


async def test_a_reply_whose_final_save_fails_says_so_and_is_saved_later(
    alice, fake_llm, monkeypatch
):
    # The three tries at the end fail, the first later one works.
    attempts = failing_final_saves(monkeypatch, times=3)

    frames = await send_and_wait(alice, "fake")
    end = frames[-1]
    assert end["status"] == "error", end
    assert end["error"] == {"code": "server_error", "message": replies.UNSAVED_TEXT}

    await finish_replies()
    assert len(attempts) == 4
    reply = await Message.objects.aget(pk=end["message"])
    assert reply.status == "complete"
    assert reply.content == mended_text("fake")[0] == streamed_text(frames)


async def test_a_reply_that_can_never_be_saved_says_so_and_stops_trying(
    alice, fake_llm, monkeypatch, caplog
):
    attempts = failing_final_saves(monkeypatch, times=1000)

    frames = await send_and_wait(alice, "fake")
    async with asyncio.timeout(10):
        await finish_replies()

    end = frames[-1]
    assert end["status"] == "error"
    assert end["error"]["code"] == "server_error"
    assert len(attempts) == len(replies.FINAL_SAVE_DELAYS) + 1 + len(replies.LATER_SAVE_DELAYS)
    reply = await Message.objects.aget(pk=end["message"])
    assert reply.status == "streaming"  # what the last save that worked left
    assert f"reply {end['message']} could not be saved" in caplog.text
