"""Issue 10, items 6 to 8: our own parts fail, not the model server's. A
daphne process is killed mid-reply, Redis dies and comes back, the database
is away while a reply ends. Whatever happens, a stored reply ends with a
status that tells the truth about its text, and the site recovers without a
restart.

The live tests run the site on a redis-server of their own (killed and
started again at will), so they run in CI's SQLite pass too; skipped where
`redis-server` is not installed."""

import asyncio
import json
import sqlite3
import time
from datetime import timedelta

import pytest
import websockets
from asgiref.sync import sync_to_async
from django.db import connection, connections
from django.utils import timezone

from conversations import replies
from conversations.consumers import ChatConsumer
from conversations.models import Message
from tests.fake_llm import expected_text
from tests.helpers import TcpProxy, chat_socket, finish_replies, orphaned_reply, receive_until
from tests.live import (
    Browser,
    Site,
    connect,
    have_redis,
    joined_text,
    private_redis,
    receive,
    running_site,
)

needs_redis = pytest.mark.skipif(not have_redis(), reason="needs redis-server on PATH")

# The dead-writer limit (docs/protocol.md, "interrupted"): 15 s of silence,
# noticed by a socket's watchdog, which looks every 5 s. A generous bound on
# "told at all", not a measure of speed.
TOLD_WITHIN = 45.0


@pytest.fixture
def redis(tmp_path):
    with private_redis(tmp_path) as server:
        yield server


@pytest.fixture
def two_processes(tmp_path, fake_llm_server, redis):
    with running_site(tmp_path, fake_llm_server.base_url, processes=2, REDIS_URL=redis.url) as site:
        yield site


async def send(ws, model: str, conversation: str | None = None) -> None:
    frame = {"type": "send", "conversation": conversation, "content": "Hi", "model": model}
    await ws.send(json.dumps(frame))


async def reply_of(ws) -> tuple[str, str]:
    """The conversation and reply ids of the send just made on ws."""
    frames = await receive(ws, "start")
    return frames[-1]["conversation"], frames[-1]["message"]


def stored(site: Site, message_id: str) -> tuple[str, str, str]:
    """A reply's content, status and error code, as the database holds it."""
    ((content, status, code),) = site.messages(
        "content", "status", "error_code", message=message_id
    )
    return content, status, code


def is_live(message: dict) -> bool:
    return message["status"] in ("pending", "streaming")


class Timeline:
    """A subscriber's frames, each with when it arrived: what the tab
    showed at any moment."""

    def __init__(self) -> None:
        self.frames: list[dict] = []
        self.times: list[float] = []

    async def read(self, ws, until, timeout: float) -> dict:
        """Frames up to the first for which until(frame) is true; that frame."""
        async with asyncio.timeout(timeout):
            while True:
                frame = json.loads(await ws.recv())
                self.frames.append(frame)
                self.times.append(time.monotonic())
                if until(frame):
                    return frame

    def text_at(self, moment: float) -> str:
        return joined_text([f for f, t in zip(self.frames, self.times, strict=True) if t <= moment])


@needs_redis
@pytest.mark.slow
async def test_a_killed_process_leaves_its_reply_interrupted_with_its_saved_text(
    two_processes,
):
    site = two_processes
    browser = Browser(site.url(0))
    await asyncio.to_thread(browser.sign_up, "kate")
    a = await connect(site, 0, browser)  # on the process that will die
    c = await connect(site, 1, browser)  # on the one that lives
    # A finished conversation, and a reply another process writes meanwhile:
    # neither may lose a word.
    await send(a, "fake")
    done_conversation, done_reply = await reply_of(a)
    assert (await receive(a, "end"))[-1]["status"] == "complete"
    before = site.messages(conversation=done_conversation)

    doomed = "fake:n=600,delay=0.1"  # a minute, unless its process dies
    await send(a, doomed)
    conversation, reply = await reply_of(a)
    # Two tabs on the other process hold the reply: whichever notices the
    # silence first ends it, for both.
    b, d = await connect(site, 1, browser), await connect(site, 1, browser)
    for ws in (b, d):
        await ws.send(json.dumps({"type": "subscribe", "conversation": conversation}))
    seen, seen_d = Timeline(), Timeline()
    await seen.read(b, lambda f: f["type"] == "delta", timeout=20)
    # Long enough for saves (CHAT_SAVE_INTERVAL, 1 s) to have happened.
    first = time.monotonic()
    await seen.read(b, lambda f: time.monotonic() - first > 3, timeout=20)

    other = "fake:n=100,delay=0.1"
    await send(c, other)
    _, other_reply = await reply_of(c)
    site.kill(0)
    killed = time.monotonic()

    end = await seen.read(b, lambda f: f["type"] == "end", timeout=TOLD_WITHIN)
    end_d = await seen_d.read(d, lambda f: f["type"] == "end", timeout=TOLD_WITHIN)
    assert end["message"] == end_d["message"] == reply
    assert end["status"] == end_d["status"] == "interrupted"
    assert end["error"]["code"] == end_d["error"]["code"] == "interrupted"
    content, status, code = stored(site, reply)
    assert (status, code) == ("interrupted", "interrupted")
    # At most one save interval's text is lost: what the tab had shown a
    # save interval before the kill (and a margin as long again) is kept.
    streamed = [f for f in seen.frames if f["type"] != "message" or is_live(f["message"])]
    shown = joined_text(streamed)
    assert expected_text(doomed).startswith(shown)
    assert shown.startswith(content)
    assert len(content) >= len(seen.text_at(killed - 2.0)) > 0
    # Each tab is given the reply as it is kept, not the longer text it saw.
    for timeline in (seen, seen_d):
        kept = [
            f for f in timeline.frames if f["type"] == "message" and f["message"]["id"] == reply
        ]
        assert kept[-1]["message"]["content"] == content
        assert kept[-1]["message"]["status"] == "interrupted"

    # The tab on the dead process lost its connection; nothing else was lost.
    with pytest.raises(websockets.ConnectionClosed):
        await receive(a, "end", timeout=10)
    other_end = (await receive(c, "end", timeout=30))[-1]
    assert (other_end["message"], other_end["status"]) == (other_reply, "complete")
    assert stored(site, other_reply) == (expected_text(other), "complete", "")
    assert site.messages(conversation=done_conversation) == before
    assert stored(site, done_reply)[1] == "complete"

    site.restart(0)
    again = await connect(site, 0, browser)
    await send(again, "fake")
    frames = await receive(again, "end")
    assert frames[-1]["status"] == "complete"
    assert joined_text(frames) == expected_text("fake")
    for ws in (again, b, c, d):
        await ws.close()


@pytest.fixture
def one_process(tmp_path, fake_llm_server, redis):
    with running_site(tmp_path, fake_llm_server.base_url, REDIS_URL=redis.url) as site:
        yield site


async def told_or_closed(ws, timeout: float = 30.0) -> dict:
    """What a socket hears once Redis is gone: an `error` frame, or the
    close of the connection (as {"close": code}). Frames before either are
    dropped."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                frame = json.loads(await ws.recv())
                if frame["type"] == "error":
                    return frame
    except websockets.ConnectionClosed:
        return {"close": ws.close_code}


async def stored_when_ended(site: Site, message_id: str, seconds: float = 30.0) -> tuple:
    """The reply as stored, once its row is no longer live."""
    for _ in range(int(seconds / 0.2)):
        row = await asyncio.to_thread(stored, site, message_id)
        if row[1] != "streaming":
            return row
        await asyncio.sleep(0.2)
    raise AssertionError(f"reply {message_id} still streaming after {seconds} s")


@needs_redis
@pytest.mark.slow
async def test_replies_end_true_while_redis_is_gone_and_the_site_recovers_when_it_is_back(
    one_process, redis
):
    site = one_process
    browser = Browser(site.url())
    await asyncio.to_thread(browser.sign_up, "leo")
    short, long = "fake:n=60,delay=0.05", "fake:n=600,delay=0.05"
    a, b = await connect(site, 0, browser), await connect(site, 0, browser)
    await send(a, short)
    await send(b, long)
    _, ends_while_gone = await reply_of(a)
    outlives, outliving = await reply_of(b)
    await receive(a, "delta")
    await receive(b, "delta")

    redis.kill()
    for ws in (a, b):
        heard = await told_or_closed(ws)
        told = (heard.get("type"), heard.get("code")) == ("error", "server_error")
        assert told or heard == {"close": 1011}, heard
    # Redis is gone for the whole end of this one: its end reaches nobody,
    # and it is stored as it ended, the whole text.
    assert await stored_when_ended(site, ends_while_gone) == (expected_text(short), "complete", "")

    redis.start()
    fresh = Browser(site.url())
    await asyncio.to_thread(fresh.log_in, "leo")
    ws = await connect(site, 0, fresh)
    # The reply that outlived the outage streams to a new tab, and a stop
    # reaches it.
    await ws.send(json.dumps({"type": "subscribe", "conversation": outlives, "id": "s"}))
    frames = await receive(ws, "delta")
    snapshot = next(f for f in frames if f["type"] == "message" and f["message"]["id"] == outliving)
    assert snapshot["message"]["status"] == "streaming"
    await ws.send(json.dumps({"type": "stop", "conversation": outlives}))
    frames += await receive(ws, "end", timeout=10)
    assert frames[-1]["status"] == "stopped"
    content, status, _ = stored(site, outliving)
    assert status == "stopped"
    assert joined_text(frames) == content
    assert expected_text(long).startswith(content)
    # And a new reply is written, streamed and stored as before.
    await send(ws, "fake")
    frames = await receive(ws, "end")
    assert frames[-1]["status"] == "complete"
    assert joined_text(frames) == expected_text("fake") == stored(site, frames[-1]["message"])[0]
    await ws.close()


# The database away while a reply ends: in this process, on the test
# database itself, made unavailable for real.


class SqliteLock:
    """Another connection holds the (in-memory, shared-cache) test database
    exclusively: every other connection's reads and writes fail at once."""

    def __init__(self, name: str):
        self.name = name
        self.holder: sqlite3.Connection | None = None

    def cut(self) -> None:
        self.holder = sqlite3.connect(self.name, uri=True, isolation_level=None)
        self.holder.execute("BEGIN EXCLUSIVE")

    def restore(self) -> None:
        if self.holder is not None:
            self.holder.execute("ROLLBACK")
            self.holder.close()
            self.holder = None


@pytest.fixture
async def database_outage(transactional_db):
    """cut() makes the database unavailable, restore() brings it back.
    Postgres is reached through a TcpProxy for the test's duration."""
    settings_dict = connection.settings_dict
    if connection.vendor == "sqlite":
        outage = SqliteLock(settings_dict["NAME"])
        yield outage
        outage.restore()
        return
    proxy = TcpProxy(settings_dict["HOST"] or "127.0.0.1", int(settings_dict["PORT"] or 5432))
    saved = {key: settings_dict[key] for key in ("HOST", "PORT", "OPTIONS")}
    options = dict(settings_dict["OPTIONS"])
    if isinstance(options.get("pool"), dict):
        # A save waits this long for a pooled connection through the cut
        # proxy, not the site's 5 s, so that the retries end within the test.
        options["pool"] = {**options["pool"], "timeout": 1.0}
    settings_dict.update(HOST="127.0.0.1", PORT=str(proxy.port), OPTIONS=options)
    # The ORM's async calls share one worker thread: its connection, made
    # before (or the pool's), would not go through the proxy.
    await sync_to_async(reconnect_all)()
    try:
        yield proxy
    finally:
        proxy.restore()
        settings_dict.update(saved)
        await sync_to_async(reconnect_all)()
        proxy.close()


def reconnect_all() -> None:
    """The next query of every connection opens a new one, from the
    settings as they are now: a pool (Postgres) is closed as well."""
    for conn in connections.all():
        conn.close()
        if hasattr(conn, "close_pool"):
            conn.close_pool()


def fast_save_tries(monkeypatch) -> None:
    monkeypatch.setattr(replies, "FINAL_SAVE_DELAYS", (0.1, 0.2))
    monkeypatch.setattr(replies, "LATER_SAVE_DELAYS", (0.5, 0.5, 1.0, 2.0, 5.0))


async def a_message_about(ws, message_id: str) -> dict:
    """The next `message` frame about that message."""
    async with asyncio.timeout(20):
        while True:
            frame = await ws.receive_json_from(timeout=20)
            if frame["type"] == "message" and frame["message"]["id"] == message_id:
                return frame["message"]


async def end_while_away(ws, watcher, database_outage, model: str) -> tuple[str, dict]:
    """Start a reply on ws, watched from another socket; cut the database
    mid-reply and bring it back once the reply has ended. The reply's id
    and its `end`, checked to say it could not be saved."""
    await ws.send_json_to({"type": "send", "id": "s", "content": "Hello", "model": model})
    frames = await receive_until(ws, "delta")
    conversation = frames[0]["conversation"]["id"]
    reply = frames[-1]["message"]
    await watcher.send_json_to({"type": "subscribe", "conversation": conversation})
    await a_message_about(watcher, reply)
    database_outage.cut()
    try:
        frames = await receive_until(ws, "error", timeout=20)
    finally:
        database_outage.restore()
    end = [f for f in frames if f["type"] == "end"][-1]
    assert (end["message"], end["status"]) == (reply, "error")
    assert end["error"] == {"code": "server_error", "message": replies.UNSAVED_TEXT}
    assert frames[-1] == {
        "type": "error",
        "code": "server_error",
        "message": replies.UNSAVED_TEXT,
        "id": "s",
        "conversation": conversation,
    }
    assert (await receive_until(watcher, "end"))[-1] == end
    return reply, end


async def kept_whole(reply: str, model: str) -> Message:
    """The reply once its writer is done, checked to be stored complete
    with the model's whole text."""
    await finish_replies()
    stored = await Message.objects.aget(pk=reply)
    assert (stored.status, stored.content, stored.error_code) == (
        "complete",
        expected_text(model),
        "",
    )
    return stored


@pytest.mark.slow
async def test_a_reply_that_ends_while_the_database_is_away_is_kept_once_it_is_back(
    alice, fake_llm, database_outage, monkeypatch
):
    fast_save_tries(monkeypatch)
    model = "fake:n=40,delay=0.05"
    async with chat_socket(alice) as ws, chat_socket(alice) as watcher:
        reply, _ = await end_while_away(ws, watcher, database_outage, model)
        # The later save stores the reply as it really ended, and every tab
        # is given it: their `end` said it could not be saved.
        for socket in (ws, watcher):
            shown = await a_message_about(socket, reply)
            assert (shown["status"], shown["content"]) == ("complete", expected_text(model))
            assert "error" not in shown
    stored = await kept_whole(reply, model)
    assert stored.seq == shown["seq"] > 0


@pytest.mark.slow
async def test_a_reply_marked_interrupted_while_its_save_waits_is_kept_with_its_true_status(
    alice, fake_llm, database_outage, monkeypatch
):
    fast_save_tries(monkeypatch)
    # The later save waits for the test, so that the reply's row is found
    # silent in between, as another process would after 15 s.
    later = asyncio.Event()
    save_later = replies.ReplyWriter._save_later

    async def held_back(self, values, message):
        await later.wait()
        await save_later(self, values, message)

    monkeypatch.setattr(replies.ReplyWriter, "_save_later", held_back)
    model = "fake:n=40,delay=0.05"
    async with chat_socket(alice) as ws, chat_socket(alice) as watcher:
        reply, _ = await end_while_away(ws, watcher, database_outage, model)
        silent = timezone.now() - Message.stale_after() - timedelta(seconds=1)
        await Message.objects.filter(pk=reply).aupdate(updated=silent)
        async with chat_socket(alice) as late:
            conversation = (await Message.objects.aget(pk=reply)).conversation_id
            await late.send_json_to({"type": "subscribe", "conversation": str(conversation)})
            shown = await a_message_about(late, reply)
            assert shown["status"] == "interrupted"
            assert expected_text(model).startswith(shown["content"])
            assert (await Message.objects.aget(pk=reply)).status == "interrupted"

            later.set()
            # The later save wins: the reply is stored, and shown, whole.
            for socket in (late, ws):
                while (shown := await a_message_about(socket, reply))["status"] != "complete":
                    assert shown["status"] == "interrupted"
                assert shown["content"] == expected_text(model)
    await kept_whole(reply, model)


@pytest.mark.slow
async def test_a_tab_is_told_of_a_dead_writer_though_the_database_was_away_when_it_looked(
    alice, database_outage, monkeypatch
):
    monkeypatch.setattr(Message, "HEARTBEAT", timedelta(seconds=0.5))
    failed = asyncio.Event()
    look_again = ChatConsumer.look_again

    async def looking(self, message_id):
        try:
            await look_again(self, message_id)
        except Exception:
            failed.set()
            raise

    monkeypatch.setattr(ChatConsumer, "look_again", looking)
    conversation, reply = await orphaned_reply(alice)
    async with chat_socket(alice) as ws:
        await ws.send_json_to({"type": "subscribe", "conversation": str(conversation.pk)})
        assert (await a_message_about(ws, str(reply.pk)))["status"] == "streaming"
        database_outage.cut()
        try:
            # The socket's watchdog finds the reply silent, and cannot look it up.
            await asyncio.wait_for(failed.wait(), timeout=20)
        finally:
            database_outage.restore()
        # It looks again after another silence, and tells the tab.
        frames = await receive_until(ws, "end", timeout=15)
    assert (frames[-1]["message"], frames[-1]["status"]) == (str(reply.pk), "interrupted")
    await reply.arefresh_from_db()
    assert (reply.status, reply.content) == ("interrupted", "half an")
