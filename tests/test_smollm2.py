"""Real answers from the bundled model (SmolLM2-135M under llama.cpp's
OpenAI-compatible server, started as `serve` starts it), streamed through
the consumer."""

import asyncio
import re

import pytest

from conversations import llm
from conversations.management.commands.serve import MODEL_ALIAS, bundled_model
from conversations.models import Message
from conversations.supervisor import Supervisor
from tests.helpers import chat_socket, free_port, receive_until, streamed_text

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")

pytestmark = pytest.mark.slow

GREEDY = {"temperature": 0, "seed": 1}


@pytest.fixture(scope="module")
def supervised(tmp_path_factory):
    supervisor = Supervisor(print)
    model = bundled_model(free_port(), tmp_path_factory.mktemp("logs"))
    supervisor.start(model)
    try:
        assert supervisor.wait_ready(model, seconds=120), model.tail()
        yield supervisor, model
    finally:
        supervisor.stop()


@pytest.fixture
def smollm2(supervised, settings):
    _, model = supervised
    settings.LLM_BASE_URL = model.probe.removesuffix("/models")
    settings.DEFAULT_MODEL = MODEL_ALIAS
    llm.forget_models()
    return model


def send(content: str, max_tokens: int) -> dict:
    options = {"max_tokens": max_tokens, **GREEDY}
    return {"type": "send", "conversation": None, "content": content, "options": options}


def test_the_bundled_llama_cpp_is_a_portable_build():
    """A -march=native build on this machine uses AMX or AVX-512, which its VM
    advertises but traps: the first answer would kill the server (SIGILL)."""
    import llama_cpp

    info = llama_cpp.llama_print_system_info().decode()
    assert re.search(r"AVX2 = 1", info), info
    assert not re.search(r"(AVX512\w* = 1|AMX\w* = 1)", info), info


@pytest.mark.django_db(transaction=True)
async def test_bundled_model_streams_a_real_answer(alice, smollm2):
    async with chat_socket(alice) as ws:
        assert ws.ready["models"] == [MODEL_ALIAS] and ws.ready["llm"] == "ok"
        await ws.send_json_to(send("Name three colours.", max_tokens=40))
        frames = await receive_until(ws, "end", timeout=120)
    end = frames[-1]
    assert end["status"] == "complete", end
    text = streamed_text(frames)
    assert len(text.split()) >= 3
    assert len([f for f in frames if f["type"] == "delta"]) > 1  # token by token
    reply = await Message.objects.aget(pk=end["message"])
    assert reply.content == text and reply.model == MODEL_ALIAS
    assert reply.completion_tokens and reply.ttft_ms is not None


STORY = "Write a long story about a dragon who learns to bake bread."


@pytest.mark.django_db(transaction=True)
async def test_a_second_user_and_a_new_tab_do_not_cut_off_a_streaming_answer(alice, bob, smollm2):
    async with chat_socket(alice) as ws:
        await ws.send_json_to(send(STORY, max_tokens=200))
        alone = await receive_until(ws, "end", timeout=180)
    assert alone[-1]["status"] == "complete", alone[-1]

    async with chat_socket(alice) as alice_ws, chat_socket(bob) as bob_ws:
        await alice_ws.send_json_to(send(STORY, max_tokens=200))
        alice_frames = await receive_until(alice_ws, "delta", timeout=120)
        await bob_ws.send_json_to(send("What is 1 + 1?", max_tokens=20))
        # A tab opened meanwhile asks for the model list, and gets it while
        # alice's answer is still streaming.
        llm.forget_models()
        async with chat_socket(alice) as new_tab:
            assert new_tab.ready["llm"] == "ok" and new_tab.ready["models"] == [MODEL_ALIAS]
            streaming = await Message.objects.aget(pk=alice_frames[-1]["message"])
            assert streaming.status == "streaming"
        alice_frames += await receive_until(alice_ws, "end", timeout=180)
        bob_frames = await receive_until(bob_ws, "end", timeout=180)

    for frames in (alice_frames, bob_frames):
        end = frames[-1]
        assert end["status"] == "complete", end
        reply = await Message.objects.aget(pk=end["message"])
        assert reply.status == "complete" and reply.content == streamed_text(frames)
    # Alice got her whole answer: the same one she gets when nobody else asks.
    assert streamed_text(alice_frames) == streamed_text(alone)
    assert streamed_text(bob_frames).strip()


@pytest.mark.django_db(transaction=True)
async def test_a_killed_model_server_is_unavailable_then_restarted(alice, supervised, smollm2):
    supervisor, model = supervised
    model.process.kill()
    await asyncio.to_thread(model.process.wait)
    async with chat_socket(alice) as ws:
        await ws.send_json_to(send("Hello!", max_tokens=10))
        frames = await receive_until(ws, "end", timeout=60)
    end = frames[-1]
    assert end["status"] == "error" and end["error"]["code"] == "upstream_unavailable", end

    supervisor.check()  # sees the death, schedules a restart
    assert model.restarts == 1
    assert await asyncio.to_thread(supervisor.wait_ready, model, 120), model.tail()
    llm.forget_models()
    async with chat_socket(alice) as ws:
        assert ws.ready["llm"] == "ok"
        await ws.send_json_to(send("Hello!", max_tokens=10))
        frames = await receive_until(ws, "end", timeout=120)
    assert frames[-1]["status"] == "complete", frames[-1]
