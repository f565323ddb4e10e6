import asyncio
import copy
import socket
import uuid
from contextlib import asynccontextmanager

import pytest
from channels.testing import WebsocketCommunicator

from conversations import llm, replies
from conversations.consumers import ChatConsumer
from tests.fake_llm import FakeLLM

PASSWORD = "correct horse battery staple"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(autouse=True)
def own_cache(settings):
    """A Redis cache shared across runs would carry rate-limit counters from
    one test's users into the next: every test gets its own key prefix."""
    if settings.REDIS_URL:
        caches = copy.deepcopy(settings.CACHES)
        caches["default"]["KEY_PREFIX"] = f"test-{uuid.uuid4().hex}"
        settings.CACHES = caches


@pytest.fixture(autouse=True)
def no_model_server(settings):
    """By default the model server is a closed loopback port: no test can
    reach a real server by accident."""
    settings.LLM_BASE_URL = f"http://127.0.0.1:{free_port()}/v1"
    settings.DEFAULT_MODEL = "fake"
    llm.forget_models()
    yield
    llm.forget_models()


@pytest.fixture(scope="session")
def fake_llm_server():
    server = FakeLLM().start()
    yield server
    server.stop()


@pytest.fixture
def fake_llm(fake_llm_server, settings, no_model_server):
    settings.LLM_BASE_URL = fake_llm_server.base_url
    fake_llm_server.reset()
    return fake_llm_server


@pytest.fixture
def alice(django_user_model):
    return django_user_model.objects.create_user("alice", password=PASSWORD)


@pytest.fixture
def bob(django_user_model):
    return django_user_model.objects.create_user("bob", password=PASSWORD)


async def finish_replies(timeout: float = 10.0) -> None:
    """Replies outlive their sockets by design; a test waits for them so
    none writes to the database after the test has ended."""
    await replies.wait_all(timeout)


@asynccontextmanager
async def chat_socket(user, *, ready: bool = True):
    """A connected WebsocketCommunicator for user, past the ready frame."""
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


async def receive_until(communicator, frame_type: str, timeout: float = 10.0) -> list[dict]:
    """Every frame up to and including the first of frame_type."""
    frames = []
    async with asyncio.timeout(timeout):
        while True:
            frame = await communicator.receive_json_from(timeout=timeout)
            frames.append(frame)
            if frame["type"] == frame_type:
                return frames


def streamed_text(frames: list[dict], field: str = "content") -> str:
    return "".join(f.get(field, "") for f in frames if f["type"] == "delta")
