"""Through a real daphne process with a real WebSocket client, as a user's
browser or script would: sign up over HTTP, then chat over the socket."""

import asyncio
import contextlib
import json

import pytest
import websockets

from tests.fake_llm import expected_text
from tests.helpers import streamed_text
from tests.live import Browser, receive, running_site

pytestmark = pytest.mark.slow


@pytest.fixture
def site(tmp_path, fake_llm_server):
    with running_site(tmp_path, fake_llm_server.base_url) as site:
        yield site


async def test_sign_up_chat_leave_mid_answer_and_come_back(site):
    browser = Browser(site.url())
    await asyncio.to_thread(browser.sign_up, "carol")
    model = "fake:n=80,delay=0.02"
    async with websockets.connect(site.ws_url(), additional_headers=browser.ws_headers()) as ws:
        ready = json.loads(await ws.recv())
        assert ready["type"] == "ready" and ready["user"] == "carol" and ready["llm"] == "ok"
        await ws.send(
            json.dumps({"type": "send", "conversation": None, "content": "Hi", "model": model})
        )
        frames = await receive(ws, "delta")
        conversation_id = frames[0]["conversation"]["id"]
    # Like a reload: a new socket, subscribe, and the answer keeps coming.
    async with websockets.connect(site.ws_url(), additional_headers=browser.ws_headers()) as ws:
        await receive(ws, "ready")
        await ws.send(json.dumps({"type": "subscribe", "conversation": conversation_id}))
        frames = await receive(ws, "end")
    reply = [f for f in frames if f["type"] == "message"][-1]["message"]
    assert reply["role"] == "assistant" and reply["status"] == "streaming"
    deltas = [f for f in frames if f["type"] == "delta"]
    assert [d["seq"] for d in deltas] == list(
        range(reply["seq"] + 1, reply["seq"] + 1 + len(deltas))
    )
    assert reply["content"] + streamed_text(frames) == expected_text(model)
    assert frames[-1]["status"] == "complete"
    rows = await asyncio.to_thread(site.messages)
    assert rows == [("user", "Hi", "complete"), ("assistant", expected_text(model), "complete")]


async def test_anonymous_and_foreign_origin_sockets_are_refused(site):
    with pytest.raises(websockets.InvalidStatus) as refused:
        async with websockets.connect(site.ws_url()):
            pass
    assert refused.value.response.status_code == 403
    browser = Browser(site.url())
    await asyncio.to_thread(browser.sign_up, "dave")
    headers = {**browser.ws_headers(), "Origin": "http://evil.example"}
    with pytest.raises(websockets.InvalidStatus):
        async with websockets.connect(site.ws_url(), additional_headers=headers):
            pass


async def test_a_reply_cut_by_a_server_shutdown_is_saved_and_ended_as_interrupted(site):
    browser = Browser(site.url())
    await asyncio.to_thread(browser.sign_up, "erin")
    model = "fake:n=200,delay=0.03"
    async with websockets.connect(site.ws_url(), additional_headers=browser.ws_headers()) as ws:
        await receive(ws, "ready")
        frame = {"type": "send", "conversation": None, "content": "Hi", "model": model}
        await ws.send(json.dumps(frame))
        frames = await receive(ws, "delta")
        site.processes[0].terminate()  # SIGTERM, as a deploy or Ctrl-C would
        # The end may lose the race with the socket's close.
        with contextlib.suppress(websockets.ConnectionClosed):
            frames += await receive(ws, "end")
    # It exits; with the in-memory layer CPython 3.11 may then crash while
    # collecting the loop (python/cpython#113566), so the code is not checked:
    # what matters is what was saved before.
    await asyncio.to_thread(site.processes[0].wait, 10)
    (_, _, user_status), (_, content, status) = await asyncio.to_thread(site.messages)
    assert (user_status, status) == ("complete", "interrupted")
    assert content and expected_text(model).startswith(content)
    ends = [f for f in frames if f["type"] == "end"]
    assert all(f["status"] == "interrupted" for f in ends)
