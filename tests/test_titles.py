"""Issue 12, item 11: after a conversation's first reply the model suggests
its title, in the background, through the socket to every tab; a rename by
hand wins for good, and a failed suggestion leaves the first title."""

import asyncio

import pytest
from asgiref.sync import sync_to_async

from conversations import llm, replies, titles
from conversations.models import Conversation, Message
from tests.helpers import chat_socket, finish_replies, receive_until

pytestmark = pytest.mark.django_db(transaction=True)

QUESTION = "Tell me about prime numbers, please"


@pytest.fixture(autouse=True)
def suggested_titles(settings):
    settings.CHAT_SUGGEST_TITLES = True


async def first_reply(ws, model: str, content: str = QUESTION) -> tuple[str, list[dict]]:
    """Start a new conversation; its id, and its frames up to the reply's end."""
    await ws.send_json_to(
        {"type": "send", "id": "s1", "conversation": None, "content": content, "model": model}
    )
    frames = await receive_until(ws, "end")
    assert frames[0]["type"] == "conversation"
    assert frames[-1]["status"] == "complete"
    return frames[0]["conversation"]["id"], frames


def title_requests(fake_llm) -> list[dict]:
    return [body for body in fake_llm.requests if not body.get("stream")]


async def test_the_model_titles_a_conversation_after_its_first_reply(alice, fake_llm):
    async with chat_socket(alice) as ws:
        conversation_id, frames = await first_reply(ws, "fake:n=3,title=Prime numbers")
        assert frames[0]["conversation"]["title"] == QUESTION
        titled = (await receive_until(ws, "conversation"))[-1]
    assert titled["conversation"]["id"] == conversation_id
    assert titled["conversation"]["title"] == "Prime numbers"
    assert "id" not in titled
    conversation = await Conversation.objects.aget(pk=conversation_id)
    assert (conversation.title, conversation.title_by_user) == ("Prime numbers", False)
    # Asked once, not streamed, with a small cap, about the first exchange.
    [request] = title_requests(fake_llm)
    assert request["max_tokens"] == llm.TITLE_MAX_TOKENS
    assert QUESTION in request["messages"][-1]["content"]
    assert "w1 w2 w3" in request["messages"][-1]["content"]


async def test_waiting_for_the_replies_also_waits_for_their_titles(alice, fake_llm):
    # As the shutdown hook and the tests' finish_replies() do.
    async with chat_socket(alice) as ws:
        conversation_id, _ = await first_reply(ws, "fake:n=3,title=Prime numbers")
        await replies.wait_all()
        assert titles.running() == []
        conversation = await Conversation.objects.aget(pk=conversation_id)
    assert conversation.title == "Prime numbers"


async def test_a_suggested_title_reaches_a_tab_not_subscribed_to_the_conversation(alice, fake_llm):
    async with chat_socket(alice) as ws, chat_socket(alice) as elsewhere:
        conversation_id, _ = await first_reply(ws, "fake:n=3,title=Prime numbers")
        titled = (await receive_until(elsewhere, "conversation"))[-1]
    assert titled["conversation"]["id"] == conversation_id
    assert titled["conversation"]["title"] == "Prime numbers"


async def test_a_rename_reaches_a_tab_not_subscribed_to_the_conversation(alice, fake_llm):
    async with chat_socket(alice) as ws, chat_socket(alice) as elsewhere:
        conversation_id, _ = await first_reply(ws, "fake:n=3,title=Prime numbers")
        await receive_until(elsewhere, "conversation")
        conversation = await Conversation.objects.aget(pk=conversation_id)
        await sync_to_async(conversation.rename)("My primes")
        renamed = (await receive_until(elsewhere, "conversation"))[-1]
    assert renamed["conversation"]["title"] == "My primes"


async def test_another_users_tabs_hear_nothing_of_the_title(alice, bob, fake_llm):
    async with chat_socket(alice) as ws, chat_socket(bob) as other:
        await first_reply(ws, "fake:n=3,title=Prime numbers")
        await receive_until(ws, "conversation")
        await finish_replies()
        assert await other.receive_nothing(timeout=0.2)


@pytest.mark.parametrize(
    ("answer", "title"),
    [
        pytest.param(
            "<think>They ask about primes.</think>Prime numbers", "Prime numbers", id="think"
        ),
        pytest.param('"Prime numbers."', "Prime numbers", id="quotes-and-full-stop"),
        pytest.param("Title: **Prime numbers**!", "Prime numbers", id="label-and-markdown"),
        pytest.param("“Prime numbers”…", "Prime numbers", id="curly-quotes"),
        pytest.param("Prime numbers\nA talk about primes", "Prime numbers", id="first-line"),
    ],
)
async def test_the_suggestion_is_tidied_into_a_title(alice, fake_llm, answer, title):
    async with chat_socket(alice) as ws:
        await first_reply(ws, f"fake:n=3,title={answer}")
        titled = (await receive_until(ws, "conversation"))[-1]
    assert titled["conversation"]["title"] == title


async def test_reasoning_in_a_field_of_its_own_stays_out_of_the_title(alice, fake_llm):
    # fake-reasoning-field answers with a reasoning_content field besides the content.
    text = await llm.complete_title(titles.prompt("q", "a"), "fake-reasoning-field")
    assert text == "w1 w2 w3 w4 w5 w6 w7 w8 w9 w10 w11 w12"
    assert "r1" not in text


@pytest.mark.parametrize(
    "model",
    [
        pytest.param("fake:n=3,titlefault=500", id="model-error"),
        pytest.param("fake:n=3,title=", id="empty"),
        pytest.param("fake:n=3,title=?!…", id="no-letters"),
        pytest.param("fake:n=3,title=<think>Still thinking about", id="unclosed-think"),
        pytest.param(
            "fake:n=3,title=Sure! Here is a good title for this conversation about the primes",
            id="a-sentence",
        ),
    ],
)
async def test_a_failed_suggestion_keeps_the_first_title(alice, fake_llm, model):
    async with chat_socket(alice) as ws:
        conversation_id, _ = await first_reply(ws, model)
        await finish_replies()
        assert len(title_requests(fake_llm)) == 1
        assert await ws.receive_nothing(timeout=0.2)
    conversation = await Conversation.objects.aget(pk=conversation_id)
    assert conversation.title == QUESTION


async def test_a_title_request_that_never_answers_gives_up_and_keeps_the_first_title(
    alice, fake_llm, monkeypatch
):
    monkeypatch.setattr(llm, "TITLE_TIMEOUT", 0.3)
    async with chat_socket(alice) as ws:
        conversation_id, _ = await first_reply(ws, "fake:n=3,titlefault=stall")
        # Without the timeout, the fake would stay silent for 30 s: wait_all
        # would cancel the task rather than see it end.
        task = next(iter(titles._running))
        await asyncio.wait({task}, timeout=10)
        assert task.done() and not task.cancelled()
        assert task.result() is None
    conversation = await Conversation.objects.aget(pk=conversation_id)
    assert conversation.title == QUESTION


class Gate:
    """Holds every title request until opened, so a test can act while one
    is in flight."""

    def __init__(self, monkeypatch):
        self.asked = asyncio.Event()
        self.open = asyncio.Event()
        real = llm.complete_title

        async def held(messages, model):
            self.asked.set()
            await self.open.wait()
            return await real(messages, model)

        monkeypatch.setattr(llm, "complete_title", held)


async def test_the_reply_ends_before_its_title_is_asked_for_and_the_next_send_is_not_held(
    alice, fake_llm, settings, monkeypatch
):
    gate = Gate(monkeypatch)
    # One reply at a time for this user: a title request in flight must not count as one.
    settings.CHAT_MAX_REPLIES_PER_USER = 1
    async with chat_socket(alice) as ws:
        conversation_id, frames = await first_reply(ws, "fake:n=3,title=Prime numbers")
        # The end came, and the title is still to come.
        await asyncio.wait_for(gate.asked.wait(), 10)
        assert [f["type"] for f in frames if f["type"] == "conversation"] == ["conversation"]
        await ws.send_json_to(
            {"type": "send", "id": "s2", "conversation": conversation_id, "content": "More"}
        )
        second = await receive_until(ws, "end")
        assert second[-1]["status"] == "complete"
        assert "conversation" not in [f["type"] for f in second]
        gate.open.set()
        titled = (await receive_until(ws, "conversation"))[-1]
    assert titled["conversation"]["title"] == "Prime numbers"


async def test_a_rename_while_the_title_is_being_asked_for_wins(alice, fake_llm, monkeypatch):
    gate = Gate(monkeypatch)
    async with chat_socket(alice) as ws:
        conversation_id, _ = await first_reply(ws, "fake:n=3,title=Prime numbers")
        await asyncio.wait_for(gate.asked.wait(), 10)
        conversation = await Conversation.objects.aget(pk=conversation_id)
        await sync_to_async(conversation.rename)("Mine")
        renamed = (await receive_until(ws, "conversation"))[-1]
        assert renamed["conversation"]["title"] == "Mine"
        gate.open.set()
        await finish_replies()
        assert await ws.receive_nothing(timeout=0.2)
    conversation = await Conversation.objects.aget(pk=conversation_id)
    assert (conversation.title, conversation.title_by_user) == ("Mine", True)


async def test_a_conversation_renamed_before_its_first_reply_ends_is_not_titled(alice, fake_llm):
    async with chat_socket(alice) as ws:
        await ws.send_json_to(
            {"type": "send", "conversation": None, "content": QUESTION, "model": "fake-slow"}
        )
        conversation_id = (await receive_until(ws, "conversation"))[-1]["conversation"]["id"]
        conversation = await Conversation.objects.aget(pk=conversation_id)
        await sync_to_async(conversation.rename)("Mine")
        await receive_until(ws, "end")
        await finish_replies()
    assert title_requests(fake_llm) == []
    assert (await Conversation.objects.aget(pk=conversation_id)).title == "Mine"


async def test_later_replies_and_regenerates_ask_for_no_title(alice, fake_llm):
    async with chat_socket(alice) as ws:
        conversation_id, _ = await first_reply(ws, "fake:n=3,title=Prime numbers")
        await receive_until(ws, "conversation")
        await ws.send_json_to({"type": "regenerate", "conversation": conversation_id})
        await receive_until(ws, "end")
        await ws.send_json_to({"type": "send", "conversation": conversation_id, "content": "More"})
        await receive_until(ws, "end")
        await finish_replies()
    assert len(title_requests(fake_llm)) == 1


async def test_a_first_reply_that_fails_asks_for_no_title_and_the_next_complete_one_does(
    alice, fake_llm
):
    async with chat_socket(alice) as ws:
        await ws.send_json_to(
            {"type": "send", "conversation": None, "content": QUESTION, "model": "fake:fault=500"}
        )
        conversation_id = (await receive_until(ws, "conversation"))[-1]["conversation"]["id"]
        assert (await receive_until(ws, "end"))[-1]["status"] == "error"
        await finish_replies()
        assert title_requests(fake_llm) == []
        conversation = await Conversation.objects.aget(pk=conversation_id)
        await sync_to_async(conversation.change_settings)({"model": "fake:n=3,title=Primes"})
        await ws.send_json_to({"type": "regenerate", "conversation": conversation_id})
        await receive_until(ws, "end")
        titled = (await receive_until(ws, "conversation"))[-1]
        # The settings change came first; the title after the end.
        while titled["conversation"]["title"] != "Primes":
            titled = (await receive_until(ws, "conversation"))[-1]
    assert len(title_requests(fake_llm)) == 1


async def test_a_suggested_title_costs_no_send_of_the_rate_limit(alice, fake_llm, settings):
    settings.CHAT_RATE_LIMIT = 2
    async with chat_socket(alice) as ws:
        conversation_id, _ = await first_reply(ws, "fake:n=3,title=Prime numbers")
        await receive_until(ws, "conversation")
        await ws.send_json_to({"type": "send", "conversation": conversation_id, "content": "More"})
        frames = await receive_until(ws, "end")
        assert frames[-1]["status"] == "complete"
        await ws.send_json_to(
            {"type": "send", "conversation": conversation_id, "content": "Too many"}
        )
        refused = await ws.receive_json_from(timeout=5)
    assert refused["code"] == "rate_limited"


async def test_with_the_setting_off_no_title_is_asked_for(alice, fake_llm, settings):
    settings.CHAT_SUGGEST_TITLES = False
    async with chat_socket(alice) as ws:
        conversation_id, _ = await first_reply(ws, "fake:n=3,title=Prime numbers")
        await finish_replies()
        assert await ws.receive_nothing(timeout=0.2)
    assert title_requests(fake_llm) == []
    assert (await Conversation.objects.aget(pk=conversation_id)).title == QUESTION


async def test_a_stopped_first_reply_asks_for_no_title(alice, fake_llm):
    async with chat_socket(alice) as ws:
        await ws.send_json_to(
            {"type": "send", "conversation": None, "content": QUESTION, "model": "fake-slow"}
        )
        conversation_id = (await receive_until(ws, "delta"))[0]["conversation"]["id"]
        await ws.send_json_to({"type": "stop", "conversation": conversation_id})
        assert (await receive_until(ws, "end"))[-1]["status"] == "stopped"
        await finish_replies()
    assert title_requests(fake_llm) == []
    assert await Message.objects.filter(conversation_id=conversation_id).acount() == 2


@pytest.mark.parametrize(
    ("text", "title"),
    [
        pytest.param("Prime numbers", "Prime numbers", id="as-is"),
        pytest.param("  ## Prime   numbers  ", "Prime numbers", id="heading-and-spaces"),
        pytest.param("'Prime numbers'.", "Prime numbers", id="single-quotes"),
        pytest.param("Title - Prime numbers", "Prime numbers", id="dash-label"),
        pytest.param("Prime\x1b[31m numbers", "Prime [31m numbers", id="control-characters"),
        pytest.param("x" * 100, "x" * 79 + "…", id="cut-to-80"),
        pytest.param("", None, id="empty"),
        pytest.param("\n\n  \n", None, id="blank-lines"),
        pytest.param('""', None, id="only-quotes"),
        pytest.param(" ".join(["word"] * 11), None, id="eleven-words"),
    ],
)
def test_tidy(text, title):
    assert titles.tidy(text) == title


@pytest.mark.parametrize(
    ("text", "kept"),
    [
        pytest.param("<think>hm</think>\n\nPrimes", "\n\nPrimes", id="a-block"),
        pytest.param("hm</think>Primes", "Primes", id="opened-by-the-template"),
        pytest.param("<think>hm, still", "", id="never-closed"),
        pytest.param("Primes", "Primes", id="none"),
    ],
)
def test_without_reasoning(text, kept):
    assert llm.without_reasoning(text) == kept
