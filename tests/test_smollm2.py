"""A real answer from the bundled model (SmolLM2-135M under llama.cpp's
OpenAI-compatible server), streamed through the consumer."""

import pytest

from conversations.management.commands.serve import MODEL_ALIAS, start_bundled_model, wait_for
from conversations.models import Message
from tests.conftest import chat_socket, free_port, receive_until, streamed_text

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


@pytest.fixture(scope="module")
def smollm2():
    port = free_port()
    process = start_bundled_model(port)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        wait_for(f"{base_url}/models", process, seconds=120)
        yield base_url
    finally:
        process.terminate()
        process.wait(timeout=10)


async def test_bundled_model_streams_a_real_answer(alice, smollm2, settings):
    settings.LLM_BASE_URL = smollm2
    settings.DEFAULT_MODEL = MODEL_ALIAS
    async with chat_socket(alice) as ws:
        assert ws.ready["models"] == [MODEL_ALIAS] and ws.ready["llm"] == "ok"
        await ws.send_json_to(
            {
                "type": "send",
                "conversation": None,
                "content": "Name three colours.",
                "options": {"max_tokens": 40, "temperature": 0, "seed": 1},
            }
        )
        frames = await receive_until(ws, "end", timeout=120)
    end = frames[-1]
    assert end["status"] == "complete", end
    text = streamed_text(frames)
    assert len(text.split()) >= 3
    assert len([f for f in frames if f["type"] == "delta"]) > 1  # token by token
    reply = await Message.objects.aget(pk=end["message"])
    assert reply.content == text and reply.model == MODEL_ALIAS
    assert reply.completion_tokens and reply.ttft_ms is not None
