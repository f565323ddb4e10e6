"""conversations/llm.py against the fake server over real HTTP, and the
<think> splitter on its own."""

import asyncio
import email.utils
import itertools
import ssl

import httpx2 as httpx
import openai
import pytest

from conversations import llm
from conversations.llm import Delta, LLMError, ServedBy, SurrogateMender, ThinkSplitter, Usage
from tests.fake_llm import (
    BAD_USAGE,
    MODELS,
    FakeLLM,
    expected_text,
    mended_text,
    reasoning_for,
    tokens_for,
)
from tests.helpers import free_port, self_signed_tls

MESSAGES = [{"role": "user", "content": "say something nice"}]  # 3 prompt tokens


async def collect(model, options=None, messages=MESSAGES):
    return [item async for item in llm.stream_chat(messages, model, options)]


def text_of(items, field="content"):
    return "".join(getattr(i, field) for i in items if isinstance(i, Delta))


async def collect_until_error(model, options=None):
    """The deltas yielded before the LLMError, and the error."""
    items = []
    with pytest.raises(LLMError) as caught:  # noqa: PT012 - the error ends a stream begun here
        async for item in llm.stream_chat(MESSAGES, model, options):
            items.append(item)
    return items, caught.value


# list_models


async def test_list_models_returns_the_servers_models(fake_llm):
    assert await llm.list_models() == sorted(MODELS)


async def test_list_models_is_cached(settings):
    server = FakeLLM().start()
    settings.LLM_BASE_URL = server.base_url
    first = await llm.list_models()
    server.stop()

    # The server is gone, but the list from a moment ago still answers.
    assert await llm.list_models() == first

    llm.forget_models()
    with pytest.raises(LLMError) as caught:
        await llm.list_models()
    assert caught.value.code == "upstream_unavailable"


async def test_a_failure_to_list_models_is_cached_per_server(fake_llm, settings):
    settings.LLM_BASE_URL = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(LLMError):
        await llm.list_models()
    settings.LLM_BASE_URL = fake_llm.base_url
    assert "fake" in await llm.list_models()


async def test_list_models_cache_expires(fake_llm, settings):
    settings.LLM_MODELS_CACHE_SECONDS = 0
    await llm.list_models()
    settings.LLM_BASE_URL = f"http://127.0.0.1:{free_port()}/v1"

    with pytest.raises(LLMError) as caught:
        await llm.list_models()
    assert caught.value.code == "upstream_unavailable"


@pytest.mark.parametrize(
    ("model", "exists"),
    [
        pytest.param("fake-think", True, id="listed"),
        pytest.param("fake:n=3", True, id="unlisted-but-found-by-name"),
        pytest.param("gpt-4", False, id="lacking"),
    ],
)
async def test_model_exists_asks_the_server(fake_llm, model, exists):
    assert await llm.model_exists(model) is exists


async def test_a_model_found_by_name_is_not_asked_for_again_within_the_cache_time(
    fake_llm, settings
):
    settings.LLM_MODELS_CACHE_SECONDS = 60
    fake_llm.reset()
    assert await llm.model_exists("fake:n=3")
    assert await llm.model_exists("fake:n=3")
    assert await llm.model_exists("fake:n=4")
    assert fake_llm.lookups == ["/v1/models", "/v1/models/fake:n=3", "/v1/models/fake:n=4"]


async def test_every_model_exists_when_the_server_cannot_be_reached():
    assert await llm.model_exists("gpt-4")


async def test_list_models_without_a_server_is_upstream_unavailable():
    with pytest.raises(LLMError) as caught:
        await llm.list_models()

    assert caught.value.code == "upstream_unavailable"


async def test_default_model_is_the_setting(fake_llm, settings):
    settings.DEFAULT_MODEL = "fake-think"

    assert await llm.default_model() == "fake-think"


async def test_default_model_falls_back_to_the_first_listed(fake_llm, settings):
    settings.DEFAULT_MODEL = ""

    assert await llm.default_model() == sorted(MODELS)[0]


async def test_default_model_without_setting_or_server_is_empty(settings):
    settings.DEFAULT_MODEL = ""

    assert await llm.default_model() == ""


# stream_chat


async def test_stream_chat_yields_the_text_then_the_usage(fake_llm):
    items = await collect("fake")

    served, deltas, usage = items[0], items[1:-1], items[-1]
    assert served == ServedBy("fake")
    assert all(isinstance(d, Delta) for d in deltas)
    assert text_of(deltas) == expected_text("fake")
    assert text_of(deltas, "reasoning") == ""
    assert usage == Usage(prompt_tokens=3, completion_tokens=len(tokens_for("fake")))
    assert len(deltas) == len(tokens_for("fake"))  # one delta per token, none merged


async def test_stream_chat_says_once_which_model_the_server_answered_with(fake_llm):
    items = await collect("fake:served=smollm2")
    assert [i for i in items if isinstance(i, ServedBy)] == [ServedBy("smollm2")]


async def test_stream_chat_asks_for_usage_and_streams(fake_llm):
    await collect("fake")

    body = fake_llm.requests[-1]
    assert body["model"] == "fake"
    assert body["messages"] == MESSAGES
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}


async def test_stream_chat_sends_the_options(fake_llm):
    options = {"temperature": 0.3, "top_p": 0.9, "max_tokens": 5, "seed": 42}

    items = await collect("fake", options)

    body = fake_llm.requests[-1]
    assert {k: body[k] for k in options} == options
    # The fake honours max_tokens, so the answer is cut there.
    assert text_of(items) == "".join(tokens_for("fake", max_tokens=5))
    assert items[-1] == Usage(prompt_tokens=3, completion_tokens=5)


async def test_stream_chat_drops_unknown_and_empty_options(fake_llm):
    await collect("fake", {"temperature": 0.5, "seed": None, "stop": ["x"], "tools": []})

    body = fake_llm.requests[-1]
    assert body["temperature"] == 0.5
    for dropped in ("seed", "stop", "tools", "top_p", "max_tokens"):
        assert dropped not in body


async def test_stream_chat_splits_think_tags_out_of_the_content(fake_llm):
    items = await collect("fake-think")

    content = text_of(items)
    assert content == expected_text("fake-think")
    assert "think" not in content
    assert "<" not in content
    assert text_of(items, "reasoning") == reasoning_for("fake-think")
    assert isinstance(items[-1], Usage)


async def test_stream_chat_reads_reasoning_delta_fields(fake_llm):
    items = await collect("fake-reasoning-field")

    assert text_of(items) == expected_text("fake-reasoning-field")
    assert text_of(items, "reasoning") == reasoning_for("fake-reasoning-field")
    assert isinstance(items[-1], Usage)


@pytest.mark.parametrize("mangle", ["split", "high", "low", "nul"])
async def test_stream_chat_mends_surrogates_and_removes_nul_in_content_and_reasoning(
    fake_llm, mangle
):
    model = f"fake-reasoning-field:mangle={mangle}"

    items = await collect(model)

    assert (text_of(items), text_of(items, "reasoning")) == mended_text(model)
    for field in ("content", "reasoning"):
        text_of(items, field).encode("utf-8")  # no lone surrogate left to fail here


@pytest.mark.parametrize("bad", sorted(BAD_USAGE))
async def test_stream_chat_gives_bad_usage_counts_as_none(fake_llm, bad):
    items = await collect(f"fake:usage={bad}")

    # "7" and true too: a count is a JSON number, and a server that sends
    # anything else is not to be trusted with it.
    assert items[-1] == Usage(None, None)


@pytest.mark.parametrize(
    ("value", "count"),
    [
        (0, 0),
        (7, 7),
        (2**31 - 1, 2**31 - 1),
        (2**31, None),
        (-1, None),
        (3.0, None),
        ("7", None),
        (True, None),
        (None, None),
    ],
)
def test_token_count_keeps_only_whole_numbers_the_database_can_hold(value, count):
    assert llm.token_count(value) == count


@pytest.mark.parametrize(
    ("text", "clean"),
    [
        ("plain", "plain"),
        ("a\x00b", "ab"),
        ("\ud83d\ude00", "\U0001f600"),
        ("x\ud800y", "x\ufffdy"),
        ("x\udc00", "x\ufffd"),
        ("\ude00\ud83d", "\ufffd\ufffd"),
        ("é\x00\ud800", "é\ufffd"),
    ],
)
def test_clean_joins_pairs_marks_lone_surrogates_and_removes_nul(text, clean):
    assert llm.clean(text) == clean


def test_a_pair_split_across_pieces_is_joined():
    mender = SurrogateMender()

    assert mender.feed("a\ud83d") == "a"
    assert mender.feed("\ude00b") == "\U0001f600b"
    assert mender.flush() == ""


def test_a_high_surrogate_that_ends_the_stream_is_marked():
    mender = SurrogateMender()

    assert mender.feed("a\ud83d") == "a"
    assert mender.flush() == "\ufffd"


def test_a_high_surrogate_followed_by_other_text_is_marked():
    mender = SurrogateMender()

    assert mender.feed("\ud83d") == ""
    assert mender.feed("b") == "\ufffdb"


async def test_refused_connection_is_upstream_unavailable():
    items, error = await collect_until_error("fake")

    assert items == []
    assert error.code == "upstream_unavailable"


async def test_unknown_model_is_model_not_found(fake_llm):
    items, error = await collect_until_error("nope")

    assert items == []
    assert error.code == "model_not_found"
    assert "nope" in error.message


async def test_server_error_is_upstream_error(fake_llm):
    items, error = await collect_until_error("fake:fault=500")

    assert items == []
    assert error.code == "upstream_error"


async def test_cut_stream_is_upstream_error_after_the_text_so_far(fake_llm):
    items, error = await collect_until_error("fake:fault=cut,after=3")

    assert error.code == "upstream_error"
    assert text_of(items) == "".join(tokens_for("fake")[:3])
    assert not any(isinstance(i, Usage) for i in items)


async def test_malformed_chunk_is_upstream_error(fake_llm):
    items, error = await collect_until_error("fake:fault=malformed,after=3")

    assert error.code == "upstream_error"
    assert text_of(items) == "".join(tokens_for("fake")[:3])


async def test_non_sse_answer_is_upstream_error(fake_llm):
    items, error = await collect_until_error("fake:fault=html")

    assert items == []
    assert error.code == "upstream_error"


async def test_a_web_page_where_the_stream_should_be_says_so(fake_llm):
    _, error = await collect_until_error("fake:fault=html")

    assert error.message == "The model server answered with a web page, not a chat answer."
    assert "text/html" in error.detail


async def test_a_proxys_error_page_gives_the_status_not_the_page(fake_llm):
    items, error = await collect_until_error("fake:fault=proxy")

    assert items == []
    assert (error.code, error.message) == ("upstream_error", "The model server answered HTTP 502.")
    assert "<h1>502 Bad Gateway</h1>" in error.detail  # staff see what answered


async def test_a_stream_that_ends_without_finish_reason_or_done_is_unfinished(fake_llm):
    items, error = await collect_until_error("fake:fault=nodone,after=4")

    assert error.code == "upstream_error"
    assert error.message == "The model server ended the answer before finishing it."
    assert text_of(items) == "".join(tokens_for("fake")[:4])


async def test_a_stream_with_its_finish_reason_but_no_done_is_complete(fake_llm):
    # What llama.cpp and Ollama may send: the finish reason is the end.
    items = await collect("fake:fault=nodone-finish")

    assert text_of(items) == expected_text("fake")
    assert items[-1] == Usage(prompt_tokens=3, completion_tokens=len(tokens_for("fake")))


@pytest.mark.parametrize("status", ["429", "503"])
async def test_a_busy_server_is_asked_once_more_and_its_answer_streams(fake_llm, status):
    model = f"fake:fault={status},times=1,retry_after=0"

    items = await collect(model)

    assert text_of(items) == expected_text("fake")
    assert fake_llm.refused == {model: 1}
    assert [r["model"] for r in fake_llm.requests] == [model, model]


@pytest.mark.parametrize("status", ["429", "503"])
async def test_a_server_busy_twice_is_asked_only_twice_and_the_error_says_busy(fake_llm, status):
    model = f"fake:fault={status},times=2,retry_after=0"

    items, error = await collect_until_error(model)

    assert items == []
    assert error.code == "upstream_error"
    assert error.message == f"The model server is busy (HTTP {status}); try again in a moment."
    assert len(fake_llm.requests) == 2


async def test_no_retry_when_its_wait_would_pass_the_first_token_timeout(fake_llm, settings):
    settings.LLM_FIRST_TOKEN_TIMEOUT = 0.5
    model = "fake:fault=429,times=1,retry_after=3"

    _, error = await collect_until_error(model)

    assert "busy (HTTP 429)" in error.message
    assert len(fake_llm.requests) == 1


NOW = 1_800_000_000.0


@pytest.mark.parametrize(
    ("retry_after", "delay"),
    [
        (None, llm.RETRY_DELAY),
        ("", llm.RETRY_DELAY),
        ("2", 2.0),
        ("0.5", 0.5),
        ("0", 0.0),
        ("-3", 0.0),
        ("3600", llm.RETRY_AFTER_CAP),
        ("nan", llm.RETRY_DELAY),
        ("soon", llm.RETRY_DELAY),
        (email.utils.formatdate(NOW + 3, usegmt=True), 3.0),
        (email.utils.formatdate(NOW - 60, usegmt=True), 0.0),
        (email.utils.formatdate(NOW + 600, usegmt=True), llm.RETRY_AFTER_CAP),
    ],
)
def test_the_retry_waits_what_retry_after_says_within_the_cap(retry_after, delay):
    assert llm.retry_delay(retry_after, now=NOW) == delay


async def test_a_refused_api_key_says_who_can_fix_it(settings):
    server = FakeLLM(api_key="sk-right").start()
    try:
        settings.LLM_BASE_URL = server.base_url
        settings.LLM_API_KEY = "sk-wrong"
        items, error = await collect_until_error("fake")
        settings.LLM_API_KEY = "sk-right"
        answered = await collect("fake")
    finally:
        server.stop()

    assert items == []
    assert error.code == "upstream_error"
    assert error.message == (
        "The model server refused our API key (HTTP 401). An administrator must set LLM_API_KEY."
    )
    assert "Incorrect API key provided" in error.detail
    assert text_of(answered) == expected_text("fake")


async def test_an_untrusted_certificate_is_upstream_unavailable_in_plain_words(settings, tmp_path):
    context, _ = self_signed_tls(tmp_path)
    server = FakeLLM(tls=context).start()
    try:
        settings.LLM_BASE_URL = server.base_url
        items, error = await collect_until_error("fake")
    finally:
        server.stop()

    assert items == []
    assert error.code == "upstream_unavailable"
    assert error.message == "The model server's certificate is not trusted."
    assert "CERTIFICATE_VERIFY_FAILED" in error.detail


def test_a_tls_failure_other_than_trust_is_upstream_unavailable_in_plain_words():
    # As httpx and openai wrap, say, TLS spoken to a plain-HTTP port.
    cause = ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number")
    request = httpx.Request("POST", "https://127.0.0.1:1/v1/chat/completions")
    try:
        try:
            raise httpx.ConnectError(str(cause), request=request) from cause
        except httpx.ConnectError as connect:
            raise openai.APIConnectionError(request=request) from connect
    except openai.APIConnectionError as exc:
        error = llm._as_llm_error(exc)

    assert error.code == "upstream_unavailable"
    assert error.message == "A secure connection to the model server could not be made."
    assert "WRONG_VERSION_NUMBER" in error.detail


async def test_closing_the_stream_early_cancels_the_request(fake_llm):
    stream = llm.stream_chat(MESSAGES, "fake-slow")
    first = [await anext(stream) for _ in range(3)]  # which model, then two deltas

    await stream.aclose()

    assert text_of(first) == "".join(tokens_for("fake-slow")[:2])
    assert await asyncio.to_thread(fake_llm.wait_cancelled)
    assert fake_llm.cancelled == 1
    assert fake_llm.completed == 0


# The timeout tests wait for the fake to notice the abandoned request, so
# that its count cannot leak into the next test.


# A pause that would end is cut all the same: LLM_FIRST_TOKEN_TIMEOUT (120 s
# here) no longer applies once text has come.
@pytest.mark.parametrize("fault", ["stall", "pause"])
async def test_stalled_stream_is_a_timeout(fake_llm, settings, fault):
    settings.LLM_READ_TIMEOUT = 0.5

    items, error = await collect_until_error(f"fake:fault={fault},after=2,stall=5")

    assert error.code == "timeout"
    assert error.message == "The model server stopped sending for 0.5 seconds."
    assert text_of(items) == "".join(tokens_for("fake")[:2])
    assert await asyncio.to_thread(fake_llm.wait_cancelled)


# Before the first token the wait is LLM_FIRST_TOKEN_TIMEOUT's, whether the
# server holds back its headers (ttft) or sends them and then nothing.
@pytest.mark.parametrize("model", ["fake:ttft=5", "fake:fault=stall,after=0,stall=5"])
async def test_no_first_token_within_the_first_token_timeout_is_a_timeout(
    fake_llm, settings, model
):
    settings.LLM_FIRST_TOKEN_TIMEOUT = 0.5
    settings.LLM_READ_TIMEOUT = 120

    items, error = await collect_until_error(model)

    assert [i for i in items if isinstance(i, Delta)] == []
    assert error.code == "timeout"
    assert error.message == "The model did not start answering within 0.5 seconds."
    assert await asyncio.to_thread(fake_llm.wait_cancelled)


@pytest.mark.parametrize("model", ["fake:ttft=1", "fake:fault=pause,after=0,stall=1"])
async def test_a_model_slower_to_start_than_the_read_timeout_still_answers(
    fake_llm, settings, model
):
    # A CPU server loading its model is silent long before its first token,
    # then streams at its usual pace: only the first wait is long.
    settings.LLM_FIRST_TOKEN_TIMEOUT = 30
    settings.LLM_READ_TIMEOUT = 0.2

    items = await collect(model)

    assert text_of(items) == expected_text("fake")


# ThinkSplitter


def split(*chunks):
    """Feed the chunks, flush, and return (content, reasoning) with every
    piece along the way."""
    splitter = ThinkSplitter()
    pieces = [splitter.feed(c) for c in chunks] + [splitter.flush()]
    return "".join(p.content for p in pieces), "".join(p.reasoning for p in pieces)


TAGGED = "<think>abc</think>answer"


def test_think_block_is_split_from_the_answer():
    assert split(TAGGED) == ("answer", "abc")


@pytest.mark.parametrize("at", range(1, len(TAGGED)))
def test_think_tags_cut_across_chunks_are_split(at):
    assert split(TAGGED[:at], TAGGED[at:]) == ("answer", "abc")


@pytest.mark.parametrize(
    ("text", "content", "reasoning"),
    [
        (TAGGED, "answer", "abc"),
        ("<think>abc</think>\n\nanswer", "answer", "abc"),
        ("<think></think>answer", "answer", ""),
        (" \n<think>t<i</think>c</d", "c</d", "t<i"),
        ("pre <think>x</think> post", "pre <think>x</think> post", ""),
        ("<think>a</think>b<think>c</think>d", "b<think>c</think>d", "a"),
    ],
)
def test_think_tags_cut_at_every_pair_of_positions_are_split(text, content, reasoning):
    for a, b in itertools.combinations(range(len(text) + 1), 2):
        chunks = (text[:a], text[a:b], text[b:])
        assert split(*chunks) == (content, reasoning), chunks


def test_think_block_fed_one_character_at_a_time_is_split():
    assert split(*TAGGED) == ("answer", "abc")


def test_nothing_that_could_be_a_tag_is_let_out_early():
    splitter = ThinkSplitter()

    assert splitter.feed("\n<thi") == Delta()
    assert splitter.feed("nk>why") == Delta(reasoning="why")
    assert splitter.feed(" so</th") == Delta(reasoning=" so")
    assert splitter.feed("ink> ok") == Delta(content="ok")
    assert splitter.flush() == Delta()


def test_blank_line_after_the_think_block_is_not_part_of_the_answer():
    assert split("<think>plan</think>\n\n", "Answer.") == ("Answer.", "plan")


def test_a_think_block_after_the_start_of_the_answer_is_text():
    text = "Sure. <think>hmm</think> Here it is."
    assert split(text) == (text, "")


EXPLAINED = "The <think> tag opens a model's reasoning; </think> closes it."


@pytest.mark.parametrize("at", range(1, len(EXPLAINED)))
def test_an_answer_explaining_the_tags_keeps_them_as_text(at):
    assert split(EXPLAINED[:at], EXPLAINED[at:]) == (EXPLAINED, "")


NOT_A_TAG = "a < b and <b> <thin> <thinking>"


@pytest.mark.parametrize("at", range(1, len(NOT_A_TAG)))
def test_a_less_than_sign_that_is_not_a_tag_is_content(at):
    assert split(NOT_A_TAG[:at], NOT_A_TAG[at:]) == (NOT_A_TAG, "")


def test_held_text_that_never_became_a_tag_is_flushed_as_content():
    splitter = ThinkSplitter()

    assert splitter.feed("  <thin") == Delta()
    assert splitter.flush() == Delta(content="  <thin")


def test_an_unclosed_think_block_is_streamed_as_reasoning_then_given_as_the_answer():
    splitter = ThinkSplitter()

    assert splitter.feed("<think>still going</thi") == Delta(reasoning="still going")
    assert splitter.flush() == Delta(content="still going</thi", reasoning="</thi")


UNCLOSED = "<think>The answer is 42."


@pytest.mark.parametrize("at", range(1, len(UNCLOSED)))
def test_an_unclosed_think_block_cut_anywhere_still_gives_the_answer(at):
    content, reasoning = split(UNCLOSED[:at], UNCLOSED[at:])
    assert (content, reasoning) == ("The answer is 42.", "The answer is 42.")


# A template that opens the block itself: the model's output starts mid-thought.
IMPLICIT = "let me see</think>\n\nIt is 42."


@pytest.mark.parametrize("at", range(1, len(IMPLICIT)))
def test_a_block_opened_by_the_template_is_reasoning_up_to_its_end_tag(at):
    splitter = ThinkSplitter(undecided=100)
    pieces = [splitter.feed(IMPLICIT[:at]), splitter.feed(IMPLICIT[at:]), splitter.flush()]
    assert "".join(p.reasoning for p in pieces) == "let me see"
    assert "".join(p.content for p in pieces) == "It is 42."


def test_a_block_opened_by_the_template_is_held_back_until_its_end_tag():
    splitter = ThinkSplitter(undecided=100)

    assert splitter.feed("hmm, ") == Delta()
    assert splitter.feed("yes</th") == Delta()
    assert splitter.feed("ink>Yes.") == Delta(content="Yes.", reasoning="hmm, yes")
    assert splitter.feed(" </think> stays") == Delta(content=" </think> stays")


def test_an_answer_without_an_end_tag_is_content_past_the_undecided_limit():
    splitter = ThinkSplitter(undecided=10)

    assert splitter.feed("Hello, ") == Delta()
    assert splitter.feed("world") == Delta(content="Hello, world")
    assert splitter.feed("</think> is text now") == Delta(content="</think> is text now")


def test_an_opening_tag_before_the_end_tag_makes_the_held_answer_content():
    splitter = ThinkSplitter(undecided=100)

    assert splitter.feed("Use <think> and ") == Delta(content="Use <think> and ")
    assert splitter.feed("</think>.") == Delta(content="</think>.")


def test_a_short_answer_without_tags_is_content_at_the_end_of_the_stream():
    assert split_undecided("Hi", " there.") == ("Hi there.", "")


def test_without_an_undecided_limit_an_end_tag_alone_is_text():
    assert split(IMPLICIT) == (IMPLICIT, "")


def split_undecided(*chunks, limit=100):
    splitter = ThinkSplitter(undecided=limit)
    pieces = [splitter.feed(c) for c in chunks] + [splitter.flush()]
    return "".join(p.content for p in pieces), "".join(p.reasoning for p in pieces)


def test_text_without_think_tags_passes_through():
    splitter = ThinkSplitter()

    assert splitter.feed("Hello ") == Delta(content="Hello ")
    assert splitter.feed("world, ") == Delta(content="world, ")
    assert splitter.feed("no tags here.") == Delta(content="no tags here.")
    assert splitter.flush() == Delta()


def test_a_second_think_block_is_text():
    assert split("<think>a</think>b<think>c</think>d") == ("b<think>c</think>d", "a")


def test_leading_whitespace_of_an_answer_without_thinking_is_kept():
    splitter = ThinkSplitter()
    assert splitter.feed("    indented code").content == "    indented code"
