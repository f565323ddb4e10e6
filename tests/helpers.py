"""Helpers shared by the tests, imported by name (`from tests.helpers import
...`): conftest.py holds fixtures only.

The benchmarks and tests/live.py import this module without configuring
Django, so the few helpers that need the app import it when called."""

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from channels.testing import WebsocketCommunicator
from django.test import Client

PASSWORD = "correct horse battery staple"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def logged_in(user: Any) -> Client:
    """A test client with user's session, for tests that need more than one."""
    client = Client()
    client.force_login(user)
    return client


def streamed_text(frames: list[dict], field: str = "content") -> str:
    """The text the delta frames carried, in order."""
    return "".join(f.get(field, "") for f in frames if f["type"] == "delta")


async def finish_replies(timeout: float = 10.0) -> None:
    """Replies outlive their sockets by design; a test waits for them so
    none writes to the database after the test has ended."""
    from conversations import replies

    await replies.wait_all(timeout)


@asynccontextmanager
async def chat_socket(user: Any, *, ready: bool = True) -> AsyncIterator[WebsocketCommunicator]:
    """A connected WebsocketCommunicator for user, past the ready frame."""
    from conversations.consumers import ChatConsumer

    communicator = WebsocketCommunicator(ChatConsumer.as_asgi(), "/ws/chat/")
    communicator.scope["user"] = user
    connected, _ = await communicator.connect()
    assert connected
    try:
        if ready:
            frame = await communicator.receive_json_from(timeout=10)
            assert frame["type"] == "ready"
            communicator.ready = frame
        yield communicator
    finally:
        await communicator.disconnect()


async def receive_until(
    communicator: WebsocketCommunicator, frame_type: str, timeout: float = 10.0
) -> list[dict]:
    """Every frame up to and including the first of frame_type."""
    frames = []
    async with asyncio.timeout(timeout):
        while True:
            frame = await communicator.receive_json_from(timeout=timeout)
            frames.append(frame)
            if frame["type"] == frame_type:
                return frames
