"""Through a real daphne process with a real WebSocket client, as a user's
browser or script would: sign up over HTTP, then chat over the socket."""

import asyncio
import json
import sqlite3
from urllib.parse import urlparse

import pytest
import websockets

from tests.fake_llm import expected_text
from tests.live import Browser, Site, site_database

pytestmark = pytest.mark.slow


@pytest.fixture
def site(tmp_path, fake_llm_server):
    with site_database(tmp_path) as database_url:
        env = {
            "DATABASE_URL": database_url,
            "LLM_BASE_URL": fake_llm_server.base_url,
            "DEFAULT_MODEL": "fake",
        }
        site = Site(env).start(tmp_path)
        try:
            yield site
        finally:
            site.stop()


async def receive(ws, frame_type: str, timeout: float = 10.0) -> list[dict]:
    frames = []
    async with asyncio.timeout(timeout):
        while True:
            frames.append(json.loads(await ws.recv()))
            if frames[-1]["type"] == frame_type:
                return frames


def text_of(frames: list[dict]) -> str:
    return "".join(f.get("content", "") for f in frames if f["type"] == "delta")


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
    assert reply["content"] + text_of(frames) == expected_text(model)
    assert frames[-1]["status"] == "complete"
    rows = await asyncio.to_thread(site_rows, site)
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


def site_rows(site: Site) -> list[tuple[str, str, str]]:
    query = "SELECT role, content, status FROM conversations_message ORDER BY created"
    url = site.env["DATABASE_URL"]
    if url.startswith("sqlite"):
        with sqlite3.connect(urlparse(url).path) as db:
            return db.execute(query).fetchall()
    import psycopg

    with psycopg.connect(url) as db:
        return db.execute(query).fetchall()
