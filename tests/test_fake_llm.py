"""The fake LLM server, driven through the real openai client (no database)."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

try:  # the openai 3.x line ships its HTTP client as httpx2
    import httpx2 as httpx
except ImportError:
    import httpx

from tests.fake_llm import MODELS, FakeLLM, expected_text, reasoning_for, tokens_for

MESSAGES = [{"role": "user", "content": "say something nice"}]


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeLLM]:
    server = FakeLLM().start()
    yield server
    server.stop()


@pytest.fixture
def openai_client(fake: FakeLLM) -> openai.OpenAI:
    return openai.OpenAI(base_url=fake.base_url, api_key="x", max_retries=0, timeout=10)


def stream(client: openai.OpenAI, model: str, **kwargs) -> list:
    chunks = client.chat.completions.create(
        model=model, messages=kwargs.pop("messages", MESSAGES), stream=True, **kwargs
    )
    return list(chunks)


def content(chunks: list) -> list[str]:
    return [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]


def test_models(openai_client: openai.OpenAI) -> None:
    assert [m.id for m in openai_client.models.list()] == list(MODELS)


def test_stream_full_text_and_usage(fake: FakeLLM, openai_client: openai.OpenAI) -> None:
    before = fake.completed
    chunks = stream(
        openai_client, "fake", stream_options={"include_usage": True}, temperature=0.2, seed=1
    )
    assert (
        "".join(content(chunks))
        == expected_text("fake")
        == "w1 w2 w3 w4 w5 w6 w7 w8 w9 w10 w11 w12"
    )
    assert content(chunks) == tokens_for("fake")
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage.prompt_tokens == 3
    assert chunks[-1].usage.completion_tokens == 12
    assert fake.requests[-1]["seed"] == 1
    # The server counts a stream after its last write, which can land just
    # after the client has read [DONE].
    assert eventually(lambda: fake.completed == before + 1)


def eventually(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_params_in_model_name(openai_client: openai.OpenAI) -> None:
    text = "".join(content(stream(openai_client, "fake:n=500,delay=0")))
    assert text == expected_text("fake:n=500,delay=0")
    assert text.split()[-1] == "w500"


def test_non_streaming(openai_client: openai.OpenAI) -> None:
    result = openai_client.chat.completions.create(model="fake", messages=MESSAGES)
    assert result.choices[0].message.content == expected_text("fake")
    assert result.usage is not None and result.usage.completion_tokens == 12


def test_unknown_model_is_404(openai_client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError, match="try pulling it first"):
        stream(openai_client, "llama3")


def test_500(openai_client: openai.OpenAI) -> None:
    with pytest.raises(openai.InternalServerError):
        stream(openai_client, "fake:fault=500")


def test_cut_after_partial_content(openai_client: openai.OpenAI) -> None:
    received: list[str] = []
    with pytest.raises((httpx.HTTPError, openai.APIError)):  # noqa: PT012 - cut mid-stream
        for chunk in openai_client.chat.completions.create(
            model="fake:fault=cut,after=5", messages=MESSAGES, stream=True
        ):
            received.extend(content([chunk]))
    assert received == tokens_for("fake")[:5]


def test_malformed(openai_client: openai.OpenAI) -> None:
    # Whichever ValueError the client's JSON parser raises: the client does not wrap it.
    with pytest.raises(ValueError):  # noqa: PT011
        stream(openai_client, "fake:fault=malformed")


def test_stall_times_out_and_counts_cancel(fake: FakeLLM) -> None:
    client = openai.OpenAI(base_url=fake.base_url, api_key="x", max_retries=0, timeout=0.5)
    before = fake.cancelled
    started = time.monotonic()
    with pytest.raises((httpx.TimeoutException, openai.APITimeoutError)):
        stream(client, "fake:fault=stall")
    assert time.monotonic() - started < 5
    assert fake.wait_cancelled(before + 1)


def test_think_tags_split_across_chunks(openai_client: openai.OpenAI) -> None:
    parts = content(stream(openai_client, "fake-think"))
    pairs = list(itertools.pairwise(parts))
    assert any(a.endswith("<th") and b.startswith("ink>") for a, b in pairs)
    assert any(a.endswith("</th") and b.startswith("ink>") for a, b in pairs)
    reasoning, answer = reasoning_for("fake-think"), expected_text("fake-think")
    assert "".join(parts) == f"<think>{reasoning}</think>{answer}"
    assert reasoning_for("fake-think") == "r1 r2 r3 r4 r5 r6"


def test_reasoning_fields(openai_client: openai.OpenAI) -> None:
    chunks = stream(openai_client, "fake-reasoning-field")
    extras = [c.choices[0].delta.model_extra or {} for c in chunks if c.choices]
    assert {"reasoning_content", "reasoning"} <= {k for e in extras for k in e}
    reasoning = "".join(e.get("reasoning_content") or e.get("reasoning") or "" for e in extras)
    assert reasoning == reasoning_for("fake-reasoning-field")
    assert "".join(content(chunks)) == expected_text("fake-reasoning-field")


def test_max_tokens(openai_client: openai.OpenAI) -> None:
    chunks = stream(openai_client, "fake", max_tokens=4)
    assert content(chunks) == tokens_for("fake", max_tokens=4) == ["w1 ", "w2 ", "w3 ", "w4 "]
    assert chunks[-1].choices[0].finish_reason == "length"


def test_client_closing_mid_stream_is_counted(fake: FakeLLM, openai_client: openai.OpenAI) -> None:
    before = fake.cancelled
    response = openai_client.chat.completions.create(
        model="fake-slow", messages=MESSAGES, stream=True
    )
    next(iter(response))
    response.close()
    assert fake.wait_cancelled(before + 1)


def test_echo(openai_client: openai.OpenAI) -> None:
    attack = [{"role": "user", "content": "look: <img src=x onerror=alert(1)> **bold**"}]
    raw = content(stream(openai_client, "fake:echo=raw", messages=attack))
    assert "".join(raw) == attack[0]["content"]
    assert raw == tokens_for("fake:echo=raw", attack) and max(map(len, raw)) == 5
    words = content(stream(openai_client, "fake:echo=1", messages=attack))
    assert words == tokens_for("fake:echo=1", attack) and words[0] == "look: "


def test_concurrent_streams(fake: FakeLLM) -> None:
    model = "fake:n=50,delay=0.002"
    results: list[str] = []

    def run() -> None:
        client = openai.OpenAI(base_url=fake.base_url, api_key="x", max_retries=0, timeout=10)
        results.append("".join(content(stream(client, model))))

    threads = [threading.Thread(target=run) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == [expected_text(model)] * 20


def test_other_path_is_404(fake: FakeLLM) -> None:
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(fake.base_url + "/nope", timeout=5)
    assert info.value.code == 404
    assert json.load(info.value)["error"]["type"] == "invalid_request_error"


def test_standalone_process() -> None:
    script = Path(__file__).with_name("fake_llm.py")
    argv = [sys.executable, str(script), "--port", "0"]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline().strip()
            assert line.startswith("listening http://127.0.0.1:")
            url = line.split()[1]
            client = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=10)
            assert "".join(content(stream(client, "fake"))) == expected_text("fake")
        finally:
            proc.terminate()
            proc.wait(5)
