"""Issue 10, item 5: every shape of model-server fault, through the socket.
Each ends its reply with an `end` of the right status, keeps the text the
server sent before the fault, says what happened in plain words, and leaves
the conversation ready: the next message gets its answer."""

import re
from dataclasses import dataclass

import pytest

from conversations import llm
from conversations.models import Conversation, Message
from tests.fake_llm import FakeLLM, expected_text, tokens_for
from tests.helpers import (
    chat_socket,
    finish_replies,
    free_port,
    receive_until,
    self_signed_tls,
    streamed_text,
)

pytestmark = pytest.mark.django_db(transaction=True)

KEY = "sk-the-right-key"
FIRST_TOKEN_TIMEOUT = 3.0
READ_TIMEOUT = 1.0


def endless_text(tokens: int) -> str:
    """What fake:endless streams first: w1 w2 w3 …"""
    return "".join(f"w{i} " for i in range(1, tokens + 1))


@dataclass(frozen=True)
class Fault:
    model: str
    status: str  # of the reply, in end and in its row
    code: str | None  # end.error.code; None for a reply without error
    message: str | None  # end.error.message, whole
    sent: str  # the answer text the server sent before the fault
    # Where the site looks for its model server: "fake" (the shared fake),
    # "closed" (a port nobody listens on), "keyed" (a fake that wants
    # another key) or "tls" (a fake whose certificate nobody trusts).
    server: str = "fake"
    requests: int = 1  # chat requests the shared fake gets for the reply
    finish_reason: str | None = None
    settings: tuple[tuple[str, int], ...] = ()


def first(n: int) -> str:
    return "".join(tokens_for("fake")[:n])


BUSY = "The model server is busy (HTTP {}); try again in a moment."
NOT_STARTED = "The model did not start answering within 3 seconds."
ENDED_EARLY = "The model server ended the answer before finishing it."

FAULTS = [
    pytest.param(
        Fault("fake", "error", "upstream_unavailable", llm.UNAVAILABLE_TEXT, "", "closed", 0),
        id="refused-connection",
    ),
    pytest.param(
        Fault("fake", "error", "upstream_unavailable", llm.UNTRUSTED_TEXT, "", "tls", 0),
        id="untrusted-certificate",
    ),
    pytest.param(
        Fault(
            "fake",
            "error",
            "upstream_error",
            "The model server refused our API key (HTTP 401)."
            " An administrator must set LLM_API_KEY.",
            "",
            "keyed",
            0,
        ),
        id="401-bad-key",
    ),
    pytest.param(
        Fault(
            "llama-not-pulled",
            "error",
            "model_not_found",
            'model "llama-not-pulled" not found, try pulling it first',
            "",
        ),
        id="404-model",
    ),
    pytest.param(
        Fault("fake:fault=429,times=1", "complete", None, None, expected_text("fake"), requests=2),
        id="429-once-then-answered",
    ),
    pytest.param(
        Fault("fake:fault=503,times=1", "complete", None, None, expected_text("fake"), requests=2),
        id="503-once-then-answered",
    ),
    pytest.param(
        Fault(
            "fake:fault=429,times=2", "error", "upstream_error", BUSY.format(429), "", requests=2
        ),
        id="429-twice",
    ),
    pytest.param(
        Fault("fake:fault=503", "error", "upstream_error", BUSY.format(503), "", requests=2),
        id="503-always",
    ),
    pytest.param(
        Fault("fake:fault=500", "error", "upstream_error", "fake internal error", ""),
        id="500",
    ),
    pytest.param(
        Fault("fake:fault=html", "error", "upstream_error", llm.WEB_PAGE_TEXT, ""),
        id="html-page-for-a-stream",
    ),
    pytest.param(
        Fault(
            "fake:fault=proxy", "error", "upstream_error", "The model server answered HTTP 502.", ""
        ),
        id="proxy-502-html-page",
    ),
    pytest.param(
        Fault("fake:ttft=30", "error", "timeout", NOT_STARTED, ""),
        id="stall-before-the-headers",
    ),
    pytest.param(
        Fault("fake:fault=stall,after=0,stall=30", "error", "timeout", NOT_STARTED, ""),
        id="stall-after-the-headers-before-the-first-token",
    ),
    pytest.param(
        Fault(
            "fake:fault=stall,after=4,stall=30",
            "interrupted",
            "timeout",
            "The model server stopped sending for 1 second.",
            first(4),
        ),
        id="stall-mid-stream",
    ),
    pytest.param(
        Fault("fake:fault=nodone,after=4", "interrupted", "upstream_error", ENDED_EARLY, first(4)),
        id="ends-without-done-or-finish-reason",
    ),
    pytest.param(
        Fault("fake:fault=nodone,after=0", "error", "upstream_error", ENDED_EARLY, ""),
        id="ends-without-done-or-finish-reason-or-text",
    ),
    pytest.param(
        Fault("fake:fault=nodone-finish", "complete", None, None, expected_text("fake")),
        id="finish-reason-without-done",
    ),
    pytest.param(
        Fault(
            "fake:fault=cut,after=4",
            "interrupted",
            "upstream_error",
            "The model server broke off the answer.",
            first(4),
        ),
        id="connection-cut-mid-stream",
    ),
    pytest.param(
        Fault(
            "fake:fault=malformed,after=4",
            "interrupted",
            "upstream_error",
            "The model server sent a malformed chunk.",
            first(4),
        ),
        id="malformed-chunk",
    ),
    pytest.param(
        Fault(
            "fake:endless=1,delay=0",
            "complete",
            None,
            None,
            endless_text(300),
            finish_reason="length",
            settings=(("CHAT_MAX_TOKENS", 300),),
        ),
        id="runaway-cut-at-the-token-cap",
    ),
    pytest.param(
        Fault(
            "fake:endless=1,delay=0",
            "complete",
            None,
            None,
            endless_text(300)[:1000],
            finish_reason="length",
            settings=(("CHAT_MAX_REPLY_CHARS", 1000),),
        ),
        id="runaway-cut-at-the-character-cap",
    ),
]

CAMEL_CASE = re.compile(r"[a-z][A-Z]")  # a class name: ConnectError, SSLCertVerificationError


def assert_plain_words(text: str) -> None:
    assert 0 < len(text) < 300, text
    for jargon in ("http://", "https://", "127.0.0.1", "Error(", "Traceback", "httpx", "openai"):
        assert jargon not in text, text
    assert "Exception" not in text and "_ssl" not in text, text
    assert not CAMEL_CASE.search(text), text


@pytest.fixture(scope="module")
def keyed_llm():
    server = FakeLLM(api_key=KEY).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tls_llm(tmp_path_factory):
    context, _ = self_signed_tls(tmp_path_factory.mktemp("tls"))
    server = FakeLLM(tls=context).start()
    yield server
    server.stop()


async def turn(ws, conversation_id: str, request_id: str, **fields) -> tuple[list[dict], dict]:
    """Send in the conversation; the frames up to the reply's end, and the
    error frame that follows the end of a failed reply (else {})."""
    frame = {"type": "send", "id": request_id, "conversation": conversation_id, "content": "hi"}
    await ws.send_json_to({**frame, **fields})
    frames = await receive_until(ws, "end", timeout=30)
    error = await ws.receive_json_from(timeout=10) if "error" in frames[-1] else {}
    return frames, error


@pytest.mark.parametrize("fault", FAULTS)
async def test_every_fault_ends_truly_keeps_the_text_says_why_and_the_next_message_works(
    alice, fake_llm, keyed_llm, tls_llm, settings, fault
):
    settings.LLM_FIRST_TOKEN_TIMEOUT = FIRST_TOKEN_TIMEOUT
    settings.LLM_READ_TIMEOUT = READ_TIMEOUT
    for name, value in fault.settings:
        setattr(settings, name, value)
    if fault.server == "closed":
        settings.LLM_BASE_URL = f"http://127.0.0.1:{free_port()}/v1"
    elif fault.server == "keyed":
        settings.LLM_BASE_URL, settings.LLM_API_KEY = keyed_llm.base_url, "sk-a-wrong-key"
    elif fault.server == "tls":
        settings.LLM_BASE_URL = tls_llm.base_url
    llm.forget_models()
    conversation = await Conversation.objects.acreate(owner=alice, model=fault.model)
    conversation_id = str(conversation.pk)

    async with chat_socket(alice) as ws:
        frames, error = await turn(ws, conversation_id, "f1")
        end = frames[-1]
        # An administrator mends what was wrong with the server itself.
        if fault.server == "keyed":
            settings.LLM_API_KEY = KEY
        elif fault.server != "fake":
            settings.LLM_BASE_URL = fake_llm.base_url
        llm.forget_models()
        next_frames, next_error = await turn(ws, conversation_id, "f2", model="fake")
        await finish_replies()

    assert end["status"] == fault.status, end
    assert end.get("finish_reason") == fault.finish_reason, end
    assert streamed_text(frames) == fault.sent
    reply = await Message.objects.aget(pk=end["message"])
    assert (reply.status, reply.content, reply.seq) == (fault.status, fault.sent, end["seq"])
    if fault.code is None:
        assert "error" not in end and error == {}
        assert reply.error_code == ""
    else:
        assert end["error"] == {"code": fault.code, "message": fault.message}
        assert_plain_words(end["error"]["message"])
        assert (error["type"], error["code"], error["id"]) == ("error", fault.code, "f1")
        assert error["message"] == fault.message
        assert (reply.error_code, reply.error) == (fault.code, fault.message)
    if fault.server == "fake":
        asked = [r for r in fake_llm.requests if r["model"] == fault.model]
        assert len(asked) == fault.requests

    next_end = next_frames[-1]
    assert next_end["status"] == "complete" and next_error == {}, next_end
    assert streamed_text(next_frames) == expected_text("fake")
    answer = await Message.objects.aget(pk=next_end["message"])
    assert (answer.status, answer.content) == ("complete", expected_text("fake"))
    assert answer.conversation_id == conversation.pk
