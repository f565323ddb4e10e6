"""Two real daphne processes sharing Postgres and Redis: a reply started
through one is watched, joined and stopped through the other."""

import asyncio
import json
import os

import pytest
import websockets

from conversations import protocol
from tests.fake_llm import expected_text
from tests.live import Browser, connect, joined_text, receive, running_site

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not os.environ.get("REDIS_URL")
        or not os.environ.get("DATABASE_URL", "").startswith("postgres"),
        reason="needs DATABASE_URL (Postgres) and REDIS_URL: run in CI's second pass",
    ),
]


@pytest.fixture
def two_processes(tmp_path, fake_llm_server):
    with running_site(tmp_path, fake_llm_server.base_url, processes=2) as site:
        yield site


async def start_reply(site, browser, model):
    a = await connect(site, 0, browser)
    await a.send(
        json.dumps({"type": "send", "conversation": None, "content": "Hi", "model": model})
    )
    first = await receive(a, "delta")
    return a, first[0]["conversation"]["id"]


async def test_reply_started_in_one_process_streams_to_a_tab_in_the_other(two_processes):
    browser = Browser(two_processes.url(0))
    await asyncio.to_thread(browser.sign_up, "frank")
    model = "fake:n=120,delay=0.02"
    a, conversation_id = await start_reply(two_processes, browser, model)
    b = await connect(two_processes, 1, browser)
    await b.send(json.dumps({"type": "subscribe", "conversation": conversation_id}))
    frames_b = await receive(b, "end")
    frames_a = await receive(a, "end")
    snapshot = [f for f in frames_b if f["type"] == "message"][-1]["message"]
    assert snapshot["status"] == "streaming" and snapshot["seq"] > 0
    assert joined_text(frames_b) == expected_text(model)
    assert frames_a[-1] == frames_b[-1]
    await a.close()
    await b.close()


async def test_stop_through_one_process_stops_the_reply_in_the_other(
    two_processes, fake_llm_server
):
    browser = Browser(two_processes.url(0))
    await asyncio.to_thread(browser.sign_up, "grace")
    model = "fake:n=200,delay=0.05"  # ten seconds if nobody stops it
    fake_llm_server.reset()
    a, conversation_id = await start_reply(two_processes, browser, model)
    b = await connect(two_processes, 1, browser)
    await b.send(json.dumps({"type": "subscribe", "conversation": conversation_id}))
    await receive(b, "delta")
    await b.send(json.dumps({"type": "stop", "conversation": conversation_id}))
    frames_b = await receive(b, "end", timeout=5)
    end = frames_b[-1]
    assert end["status"] == "stopped"
    frames_a = await receive(a, "end", timeout=5)
    assert frames_a[-1]["status"] == "stopped"
    assert await asyncio.to_thread(fake_llm_server.wait_cancelled)
    # The text kept is what was streamed up to the stop, not the whole answer.
    await b.send(json.dumps({"type": "subscribe", "conversation": conversation_id}))
    replay = await receive(b, "message")
    replay += [json.loads(await b.recv())]
    reply = replay[-1]["message"]
    assert reply["status"] == "stopped"
    assert 0 < len(reply["content"]) < len(expected_text(model))
    assert expected_text(model).startswith(reply["content"])
    await a.close()
    await b.close()


@pytest.fixture
def uncoalesced(tmp_path, fake_llm_server):
    """Every token its own delta, so 5,000 of them hit the channel layer."""
    with running_site(
        tmp_path, fake_llm_server.base_url, processes=2, CHAT_COALESCE_MS="0"
    ) as site:
        yield site


async def test_a_fast_long_reply_reaches_a_slow_reader_in_another_process_whole(uncoalesced):
    browser = Browser(uncoalesced.url(0))
    await asyncio.to_thread(browser.sign_up, "heidi")
    model = "fake:n=5000,delay=0"
    b = await connect(uncoalesced, 1, browser)
    a = await connect(uncoalesced, 0, browser)
    await a.send(
        json.dumps({"type": "send", "conversation": None, "content": "Go", "model": model})
    )
    conversation_id = (await receive(a, "conversation"))[-1]["conversation"]["id"]
    await b.send(json.dumps({"type": "subscribe", "conversation": conversation_id}))
    frames = await receive(b, "end", timeout=120, pause=0.0005)
    errors = [f for f in frames if f["type"] == "error"]
    # Exactly the model's text, or an error said out loud: never silently less.
    assert errors or joined_text(frames) == expected_text(model)
    assert frames[-1]["status"] == "complete"
    await receive(a, "end", timeout=60)
    await a.close()
    await b.close()


async def closed_with(ws, code: int, seconds: float = 5.0) -> bool:
    """The server closes the socket with code within seconds; any frame
    still on its way before the close is read and dropped."""
    try:
        async with asyncio.timeout(seconds):
            while True:
                await ws.recv()
    except websockets.ConnectionClosed:
        return ws.close_code == code
    except TimeoutError:
        return False


async def answers(ws) -> bool:
    await ws.send(json.dumps({"type": "ping", "id": "still"}))
    return (await receive(ws, "pong", timeout=5))[-1].get("id") == "still"


async def test_logging_out_through_one_process_closes_that_sessions_socket_in_the_other(
    two_processes,
):
    leaving = Browser(two_processes.url(0))
    await asyncio.to_thread(leaving.sign_up, "ivan")
    staying = Browser(two_processes.url(0))
    await asyncio.to_thread(staying.log_in, "ivan")
    gone, kept = await connect(two_processes, 1, leaving), await connect(two_processes, 1, staying)
    await asyncio.to_thread(leaving.log_out)
    assert await closed_with(gone, protocol.CLOSE_SIGNED_OUT)
    assert await answers(kept)
    await kept.close()


async def test_a_new_password_or_deactivation_in_a_shell_closes_sockets_in_every_process(
    two_processes,
):
    browser = Browser(two_processes.url(0))
    await asyncio.to_thread(browser.sign_up, "judy")
    token = two_processes.manage("create_token", "judy").strip()
    by_token = {"Authorization": f"Bearer {token}"}
    cookies = [await connect(two_processes, i, browser) for i in (0, 1)]
    tokens = [
        await websockets.connect(two_processes.ws_url(i), additional_headers=by_token)
        for i in (0, 1)
    ]
    for ws in tokens:
        await receive(ws, "ready")
    shell = "from django.contrib.auth.models import User; u = User.objects.get(username='judy'); "
    await asyncio.to_thread(
        two_processes.manage, "shell", "-c", shell + "u.set_password('x'); u.save()"
    )
    for ws in cookies:
        assert await closed_with(ws, protocol.CLOSE_SIGNED_OUT)
    for ws in tokens:
        assert await answers(ws)  # a token does not depend on the password
    await asyncio.to_thread(
        two_processes.manage, "shell", "-c", shell + "u.is_active = False; u.save()"
    )
    for ws in tokens:
        assert await closed_with(ws, protocol.CLOSE_SIGNED_OUT)
