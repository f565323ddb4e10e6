"""Replies over the WebSocket frame limit (issue 10, item 3): daphne sends
no frame over 1 MiB, and a stored reply of megabytes made its conversation
unreadable (every subscribe closed the socket with 1011). Text that big goes
out in pieces, each under the limit: a snapshot as `message` with
`continues: true` and `more` frames, a delta as several deltas."""

import asyncio
import json
import sys
import uuid

import pytest
from asgiref.sync import sync_to_async

from conversations import protocol
from conversations.models import Conversation, Message
from tests.helpers import chat_socket, finish_replies, receive_until, streamed_text

pytestmark = pytest.mark.django_db(transaction=True)

ROOM = protocol.FRAME_LIMIT - protocol.FRAME_SPARE
# Five megabytes of text whose bytes are not its characters: ASCII, CJK and
# emoji, with characters JSON escapes.
FIVE_MB = 'plain words あいう 😀 "quoted"\n' * 140_000
REASONING = "思考 " * 100_000


def stored_reply(owner, content: str, reasoning: str = "") -> Message:
    conversation = Conversation.objects.create(owner=owner, title="big")
    Message.objects.create(conversation=conversation, role="user", content="Say a lot")
    return Message.objects.create(
        conversation=conversation,
        role="assistant",
        content=content,
        reasoning=reasoning,
        model="fake",
        seq=3,
    )


async def raw_frames_until(ws, done, timeout: float = 30.0) -> list[tuple[int, dict]]:
    """(bytes, frame) of every frame up to and including the first that done()
    accepts."""
    frames = []
    async with asyncio.timeout(timeout):
        while True:
            text = await ws.receive_from(timeout=timeout)
            frames.append((len(text.encode("utf-8")), json.loads(text)))
            if done(frames[-1][1]):
                return frames


def last_piece(message_id: str):
    def done(frame: dict) -> bool:
        if frame["type"] == "more" and frame["message"] == message_id:
            return not frame["continues"]
        is_snapshot = frame["type"] == "message" and frame["message"]["id"] == message_id
        return is_snapshot and not frame.get("continues")

    return done


def assembled(frames: list[dict], message_id: str) -> dict:
    """The snapshot of message_id put together from its pieces."""
    message: dict = {}
    for frame in frames:
        if frame["type"] == "message" and frame["message"]["id"] == message_id:
            message = dict(frame["message"])
        elif frame["type"] == "more" and frame["message"] == message_id:
            message["content"] += frame.get("content", "")
            message["reasoning"] += frame.get("reasoning", "")
    return message


def test_the_test_text_is_over_the_limit():
    assert len(FIVE_MB.encode()) > 5_000_000


async def test_subscribe_sends_a_5_mb_stored_reply_whole_in_frames_under_the_limit(alice):
    reply = await sync_to_async(stored_reply)(alice, FIVE_MB, REASONING)
    async with chat_socket(alice) as ws:
        await ws.send_json_to(
            {"type": "subscribe", "id": "s1", "conversation": str(reply.conversation_id)}
        )
        received = await raw_frames_until(ws, last_piece(str(reply.pk)))
        await ws.send_json_to({"type": "ping", "id": "p1"})
        assert await ws.receive_json_from(timeout=10) == {"type": "pong", "id": "p1"}
    sizes, frames = zip(*received, strict=True)
    assert max(sizes) <= protocol.FRAME_LIMIT
    assert max(sizes) > protocol.FRAME_LIMIT - 2 * protocol.FRAME_SPARE  # pieces are full
    assert [frame["type"] for frame in frames[:2]] == ["conversation", "message"]
    assert {frame["type"] for frame in frames[3:]} == {"more"}
    assert all(frame["id"] == "s1" for frame in frames)
    snapshot = assembled(list(frames), str(reply.pk))
    assert snapshot["content"] == FIVE_MB
    assert snapshot["reasoning"] == REASONING
    assert snapshot["seq"] == 3 and snapshot["status"] == "complete"


async def test_a_conversation_with_a_5_mb_reply_can_be_continued(alice, fake_llm):
    """After the big snapshot, the socket is usable: a new message gets its
    reply, and its history sent to the model holds the big reply."""
    reply = await sync_to_async(stored_reply)(alice, FIVE_MB)
    conversation = str(reply.conversation_id)
    async with chat_socket(alice) as ws:
        await ws.send_json_to({"type": "subscribe", "id": "s1", "conversation": conversation})
        await raw_frames_until(ws, last_piece(str(reply.pk)))
        await ws.send_json_to(
            {"type": "send", "id": "r1", "conversation": conversation, "content": "More?"}
        )
        frames = await receive_until(ws, "end")
    assert frames[-1]["status"] == "complete"
    await finish_replies()


async def test_regenerate_sends_the_superseded_5_mb_reply_in_pieces(alice, fake_llm):
    reply = await sync_to_async(stored_reply)(alice, FIVE_MB)
    conversation = str(reply.conversation_id)
    async with chat_socket(alice) as ws:
        await ws.send_json_to({"type": "subscribe", "id": "s1", "conversation": conversation})
        await raw_frames_until(ws, last_piece(str(reply.pk)))
        await ws.send_json_to({"type": "regenerate", "id": "g1", "conversation": conversation})
        received = await raw_frames_until(ws, lambda frame: frame["type"] == "end")
    sizes, frames = zip(*received, strict=True)
    assert max(sizes) <= protocol.FRAME_LIMIT
    superseded = assembled(list(frames), str(reply.pk))
    assert superseded["superseded"] is True
    assert superseded["content"] == FIVE_MB
    assert frames[-1]["status"] == "complete"
    await finish_replies()


async def test_a_streamed_delta_over_the_limit_goes_as_deltas_with_consecutive_seq(
    alice, fake_llm, settings
):
    """The fake model sends 2.4 MB in 8 chunks at once; coalesced, they are
    more than one frame can hold."""
    settings.CHAT_MAX_REPLY_CHARS = 2_000_000
    settings.CHAT_COALESCE_MS = 300
    model = "fake:n=8,pad=100000,delay=0"
    async with chat_socket(alice) as ws:
        await ws.send_json_to(
            {"type": "send", "id": "r1", "conversation": None, "content": "hi", "model": model}
        )
        received = await raw_frames_until(ws, lambda frame: frame["type"] == "end")
    sizes, frames = zip(*received, strict=True)
    deltas = [frame for frame in frames if frame["type"] == "delta"]
    assert max(sizes) <= protocol.FRAME_LIMIT
    assert any(size > protocol.FRAME_LIMIT - 2 * protocol.FRAME_SPARE for size in sizes)
    assert [delta["seq"] for delta in deltas] == list(range(1, len(deltas) + 1))
    end = frames[-1]
    assert end["status"] == "complete" and end["seq"] == len(deltas)
    expected = "".join(f"w{i}" + "あ" * 100_000 + " " for i in range(1, 9)).rstrip()
    assert streamed_text(list(frames)) == expected
    stored = await Message.objects.aget(pk=end["message"])
    assert stored.content == expected and stored.seq == len(deltas)
    await finish_replies()


# Through real daphne, whose limit this is.

# 3 MB of UTF-8, built the same way in the site's shell (a command line
# could not carry the text itself).
LINE, LINES = 'word あいう 😀 "q"\n', 120_000
THREE_MB = LINE * LINES

STORE_REPLY = f"""
from django.contrib.auth import get_user_model
from conversations.models import Conversation, Message
owner = get_user_model().objects.get(username="dora")
conversation = Conversation.objects.create(owner=owner, title="big")
Message.objects.create(conversation=conversation, role="user", content="Say a lot")
text = {LINE!r} * {LINES}
Message.objects.create(conversation=conversation, role="assistant", content=text, seq=2)
print(conversation.pk)
"""


@pytest.fixture(scope="module")
def live_site(tmp_path_factory, fake_llm_server):
    from tests.live import running_site, user_with_token

    with running_site(
        tmp_path_factory.mktemp("big-frames-site"),
        fake_llm_server.base_url,
        CHAT_MAX_REPLY_CHARS="2000000",
    ) as site:
        site.token = user_with_token(site, "dora")
        yield site


async def live_frames_until(ws, done, timeout: float = 60.0) -> list[tuple[int, dict]]:
    frames = []
    async with asyncio.timeout(timeout):
        while True:
            text = await ws.recv()
            frames.append((len(text.encode("utf-8")), json.loads(text)))
            if done(frames[-1][1]):
                return frames


def live_socket(site):
    import websockets

    headers = {"Authorization": f"Bearer {site.token}"}
    return websockets.connect(site.ws_url(), additional_headers=headers, max_size=None)


@pytest.mark.slow
async def test_a_3_mb_stored_reply_can_be_opened_through_daphne(live_site):
    conversation = live_site.manage("shell", "-c", STORE_REPLY).strip().splitlines()[-1]
    (reply_id,) = [m for (m,) in live_site.messages("id", conversation=conversation)][1:]
    reply_id = str(uuid.UUID(str(reply_id)))
    async with live_socket(live_site) as ws:
        assert json.loads(await ws.recv())["type"] == "ready"
        for attempt in ("first", "again"):  # opened twice: nothing left broken
            frame = {"type": "subscribe", "id": attempt, "conversation": conversation}
            await ws.send(json.dumps(frame))
            received = await live_frames_until(ws, last_piece(reply_id))
            sizes, frames = zip(*received, strict=True)
            assert max(sizes) <= protocol.FRAME_LIMIT
            # At the limit: the pieces fill the frames up to the spare room.
            assert max(sizes) > protocol.FRAME_LIMIT - 2 * protocol.FRAME_SPARE
            assert assembled(list(frames), reply_id)["content"] == THREE_MB
            await ws.send(json.dumps({"type": "unsubscribe", "conversation": conversation}))
        await ws.send(json.dumps({"type": "ping", "id": "p"}))
        assert json.loads(await ws.recv()) == {"type": "pong", "id": "p"}


@pytest.mark.slow
async def test_a_fast_3_mb_stream_arrives_whole_through_daphne(live_site):
    model = "fake:n=10,pad=100000,delay=0"
    expected = "".join(f"w{i}" + "あ" * 100_000 + " " for i in range(1, 11)).rstrip()
    async with live_socket(live_site) as ws:
        assert json.loads(await ws.recv())["type"] == "ready"
        frame = {"type": "send", "id": "r1", "conversation": None, "content": "hi", "model": model}
        await ws.send(json.dumps(frame))
        received = await live_frames_until(ws, lambda frame: frame["type"] == "end")
        await ws.send(json.dumps({"type": "ping", "id": "p"}))
        assert json.loads(await ws.recv()) == {"type": "pong", "id": "p"}
    sizes, frames = zip(*received, strict=True)
    assert max(sizes) <= protocol.FRAME_LIMIT
    assert len(expected.encode()) > 3_000_000
    assert streamed_text(list(frames)) == expected
    end = frames[-1]
    assert end["status"] == "complete"
    assert live_site.messages("content", "status", message=end["message"]) == [
        (expected, "complete")
    ]


# The terminal client.


def load_client():
    import importlib.util

    from tests.live import ROOT

    spec = importlib.util.spec_from_file_location("chat_client", ROOT / "clients" / "chat.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # Its dataclasses look their module up by name.
    sys.modules["chat_client"] = module
    spec.loader.exec_module(module)
    return module


def test_the_client_puts_a_snapshot_in_pieces_back_together():
    message = {"id": "R", "role": "assistant", "content": FIVE_MB, "reasoning": REASONING}
    message |= {"status": "complete", "seq": 3}
    frames = [{**f, "id": "s1"} for f in protocol.message_frames("C", message)]
    assert len(frames) > 5
    pieces = load_client().Continuations()
    taken = [pieces.take(frame) for frame in frames]
    assert taken[:-1] == [None] * (len(frames) - 1)
    assert taken[-1] == {"type": "message", "conversation": "C", "message": message, "id": "s1"}
    # Frames around the pieces pass as they are; a `more` whose message
    # frame was never seen (an earlier connection's) is dropped.
    delta = {"type": "delta", "conversation": "C", "message": "R", "seq": 4, "content": "x"}
    assert pieces.take(delta) == delta
    assert pieces.take(frames[-1]) is None


@pytest.mark.slow
def test_the_client_prints_a_fast_3_mb_reply_whole(live_site):
    import subprocess

    from tests.live import ROOT

    expected = "".join(f"w{i}" + "あ" * 100_000 + " " for i in range(1, 11)).rstrip()
    env = {"PATH": "/usr/bin:/bin", "CHATSITE_URL": live_site.ws_url()}
    env["CHATSITE_TOKEN"] = live_site.token
    result = subprocess.run(
        [sys.executable, "clients/chat.py", "--model", "fake:n=10,pad=100000,delay=0", "hi"],
        capture_output=True,
        timeout=120,
        env=env,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    assert result.stdout.decode() == expected + "\n"
