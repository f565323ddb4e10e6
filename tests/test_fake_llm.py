"""The fake LLM server, driven through the real openai client (no database)."""

from __future__ import annotations

import itertools
import json
import ssl
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
from tests.helpers import self_signed_tls

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


def raw_stream(fake: FakeLLM, model: str) -> bytes:
    """The whole body of a streamed answer, as the server sent it."""
    body = json.dumps({"model": model, "messages": MESSAGES, "stream": True}).encode()
    request = urllib.request.Request(
        fake.base_url + "/chat/completions", body, {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.read()


def test_nodone_ends_cleanly_with_neither_finish_reason_nor_done(
    fake: FakeLLM, openai_client: openai.OpenAI
) -> None:
    chunks = stream(openai_client, "fake:fault=nodone,after=4")
    assert content(chunks) == tokens_for("fake")[:4]
    assert all(c.choices[0].finish_reason is None for c in chunks if c.choices)
    assert b"[DONE]" not in raw_stream(fake, "fake:fault=nodone,after=4")


def test_nodone_finish_sends_every_chunk_and_the_finish_reason_but_no_done(
    fake: FakeLLM, openai_client: openai.OpenAI
) -> None:
    chunks = stream(openai_client, "fake:fault=nodone-finish")
    assert content(chunks) == tokens_for("fake")
    assert chunks[-1].choices[0].finish_reason == "stop"
    body = raw_stream(fake, "fake:fault=nodone-finish")
    assert b'"finish_reason": "stop"' in body and b"[DONE]" not in body


def test_pause_is_silent_then_sends_the_whole_answer(openai_client: openai.OpenAI) -> None:
    assert content(stream(openai_client, "fake:fault=pause,after=2,stall=0.2")) == tokens_for(
        "fake"
    )


@pytest.mark.parametrize(
    ("fault", "error"), [("429", openai.RateLimitError), ("503", openai.InternalServerError)]
)
def test_busy_faults_refuse_the_first_times_requests_of_a_model_then_answer(
    fake: FakeLLM, openai_client: openai.OpenAI, fault: str, error: type
) -> None:
    fake.reset()
    model = f"fake:fault={fault},times=2,retry_after=7"
    for _ in range(2):
        with pytest.raises(error) as caught:
            stream(openai_client, model)
        assert caught.value.status_code == int(fault)
        # Only a 429 says when to come back.
        assert caught.value.response.headers.get("retry-after") == ("7" if fault == "429" else None)
    assert "".join(content(stream(openai_client, model))) == expected_text("fake")
    assert fake.refused == {model: 2}
    # Another model name has its own count; without times, every request is refused.
    for _ in range(3):
        with pytest.raises(error):
            stream(openai_client, f"fake:fault={fault}")


def test_a_proxy_fault_is_a_502_html_page(openai_client: openai.OpenAI) -> None:
    with pytest.raises(openai.APIStatusError) as caught:
        stream(openai_client, "fake:fault=proxy")
    assert caught.value.status_code == 502
    assert caught.value.response.headers["content-type"] == "text/html"
    assert "502 Bad Gateway" in caught.value.response.text


def test_with_an_api_key_the_fake_answers_401_to_any_other_key() -> None:
    server = FakeLLM(api_key="sk-right").start()
    try:
        wrong = openai.OpenAI(base_url=server.base_url, api_key="sk-wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as caught:
            wrong.models.list()
        assert caught.value.status_code == 401
        assert caught.value.body == {
            "message": "Incorrect API key provided",
            "type": "invalid_request_error",
            "code": "invalid_api_key",
        }
        with pytest.raises(openai.AuthenticationError):
            stream(wrong, "fake")
        right = openai.OpenAI(base_url=server.base_url, api_key="sk-right", max_retries=0)
        assert "".join(content(stream(right, "fake"))) == expected_text("fake")
    finally:
        server.stop()


def test_with_tls_the_fake_serves_https_to_a_client_that_trusts_its_certificate(
    tmp_path: Path,
) -> None:
    context, cert = self_signed_tls(tmp_path)
    server = FakeLLM(tls=context).start()
    trust = ssl.create_default_context(cafile=str(cert))
    try:
        assert server.base_url.startswith("https://127.0.0.1:")
        with httpx.Client(verify=trust) as trusting:
            client = openai.OpenAI(
                base_url=server.base_url, api_key="x", max_retries=0, http_client=trusting
            )
            assert "".join(content(stream(client, "fake"))) == expected_text("fake")
        with pytest.raises(openai.APIConnectionError):
            openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0).models.list()
    finally:
        server.stop()


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


def test_the_sent_log_holds_a_finished_streams_request_and_whole_text(
    fake: FakeLLM, openai_client: openai.OpenAI
) -> None:
    stream(openai_client, "fake:n=7")
    record = fake.sent[-1]
    assert record.model == "fake:n=7" and record.messages == MESSAGES
    assert record.content == expected_text("fake:n=7") and record.reasoning == ""
    assert record.events == 7 and record.finished
    assert record.id == fake.sent_log()[-1]["id"]


def test_the_sent_log_of_a_cut_stream_holds_exactly_what_went_out_before_the_cut(
    fake: FakeLLM, openai_client: openai.OpenAI
) -> None:
    received: list[str] = []
    with pytest.raises((httpx.HTTPError, openai.APIError)):  # noqa: PT012 - cut mid-stream
        for chunk in openai_client.chat.completions.create(
            model="fake:fault=cut,after=4", messages=MESSAGES, stream=True
        ):
            received.extend(content([chunk]))
    record = fake.sent[-1]
    assert record.content == "".join(received) == "".join(tokens_for("fake")[:4])
    assert record.events == 4 and not record.finished


def test_the_sent_log_of_a_stream_the_client_left_stops_where_the_server_stopped_writing(
    fake: FakeLLM, openai_client: openai.OpenAI
) -> None:
    model = "fake:n=500,delay=0.01"
    before = fake.cancelled
    response = openai_client.chat.completions.create(model=model, messages=MESSAGES, stream=True)
    chunks = iter(response)
    received = "".join(content([next(chunks) for _ in range(3)]))
    response.close()
    assert fake.wait_cancelled(before + 1)
    record = fake.sent[-1]
    # What the client read went out; what went out is the start of the answer, not all of it.
    assert record.content.startswith(received)
    assert expected_text(model).startswith(record.content)
    assert len(record.content) < len(expected_text(model)) and not record.finished
    assert record.events == len(record.content.split())


def test_the_sent_log_keeps_reasoning_fields_apart_and_think_tags_in_content(
    fake: FakeLLM, openai_client: openai.OpenAI
) -> None:
    stream(openai_client, "fake-reasoning-field")
    assert fake.sent[-1].reasoning == reasoning_for("fake-reasoning-field")
    assert fake.sent[-1].content == expected_text("fake-reasoning-field")
    stream(openai_client, "fake-think")
    assert fake.sent[-1].reasoning == ""
    assert fake.sent[-1].content.startswith("<think>r1 ")


def test_the_sent_log_of_a_refused_request_holds_no_text(
    fake: FakeLLM, openai_client: openai.OpenAI
) -> None:
    with pytest.raises(openai.InternalServerError):
        stream(openai_client, "fake:fault=500")
    record = fake.sent[-1]
    assert record.model == "fake:fault=500"
    assert (record.content, record.events, record.finished) == ("", 0, False)


def test_the_sent_log_counts_an_answer_finished_by_its_finish_reason_not_by_done(
    fake: FakeLLM, openai_client: openai.OpenAI
) -> None:
    stream(openai_client, "fake:fault=nodone-finish")
    assert fake.sent[-1].finished and fake.sent[-1].content == expected_text("fake")
    stream(openai_client, "fake:fault=nodone,after=4")
    assert not fake.sent[-1].finished
    assert fake.sent[-1].content == "".join(tokens_for("fake")[:4])


def test_a_non_streamed_answer_is_in_the_sent_log_once_written(
    fake: FakeLLM, openai_client: openai.OpenAI
) -> None:
    openai_client.chat.completions.create(model="fake:n=3", messages=MESSAGES)
    record = fake.sent[-1]
    assert (record.content, record.finished) == (expected_text("fake:n=3"), True)


def test_a_standalone_server_serves_its_bounded_sent_log_over_http_and_resets_it() -> None:
    script = Path(__file__).with_name("fake_llm.py")
    argv = [sys.executable, str(script), "--port", "0", "--sent-limit", "2"]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            url = proc.stdout.readline().split()[1]
            root = url.removesuffix("/v1")
            client = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=10)
            for n in (1, 2, 3):
                stream(client, f"fake:n={n}")
            with urllib.request.urlopen(root + "/fake/sent", timeout=5) as response:
                log = json.load(response)
            # The oldest request went: the log keeps the newest two.
            assert [r["id"] for r in log] == [2, 3]
            assert [r["content"] for r in log] == [expected_text("fake:n=2"), "w1 w2 w3"]
            assert log[-1]["messages"] == MESSAGES and log[-1]["finished"] is True
            reset = urllib.request.Request(root + "/fake/reset", method="POST")
            with urllib.request.urlopen(reset, timeout=5) as response:
                assert json.load(response) == {"reset": True}
            with urllib.request.urlopen(root + "/fake/sent", timeout=5) as response:
                assert json.load(response) == []
        finally:
            proc.terminate()
            proc.wait(5)
