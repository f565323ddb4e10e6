"""Conversation and Message: querysets, history sent to the model, turns."""

import contextlib
import threading
from datetime import timedelta

import pytest
from django.contrib.auth.models import AnonymousUser
from django.db import connection
from django.utils import timezone

from conversations import models, replies
from conversations.models import Busy, Conversation, Message, NothingToAnswer
from conversations.protocol import FrameError, SendRequest

pytestmark = pytest.mark.django_db

COMPLETE = Message.Status.COMPLETE


@pytest.fixture
def chat(alice):
    return Conversation.objects.create(owner=alice, model="fake")


def add(conversation, role, content, status=COMPLETE, **fields):
    """A message created one second after the previous one, so that the
    order never depends on the clock's resolution."""
    last = conversation.messages.order_by("-created").first()
    created = last.created + timedelta(seconds=1) if last else timezone.now() - timedelta(hours=1)
    return conversation.messages.create(
        role=role, content=content, status=status, created=created, **fields
    )


def user(conversation, content):
    return add(conversation, Message.Role.USER, content)


def assistant(conversation, content, status=COMPLETE, **fields):
    return add(conversation, Message.Role.ASSISTANT, content, status, **fields)


# for_user


def test_for_user_returns_only_the_users_own_conversations(alice, bob):
    mine = Conversation.objects.create(owner=alice, title="mine")
    theirs = Conversation.objects.create(owner=bob, title="theirs")

    assert list(Conversation.objects.for_user(alice)) == [mine]
    assert list(Conversation.objects.for_user(bob)) == [theirs]


def test_for_user_returns_nothing_for_an_anonymous_user(alice):
    Conversation.objects.create(owner=alice, title="mine")

    assert list(Conversation.objects.for_user(AnonymousUser())) == []


def test_conversations_are_listed_newest_first(alice):
    old = Conversation.objects.create(owner=alice, updated=timezone.now() - timedelta(days=1))
    new = Conversation.objects.create(owner=alice, updated=timezone.now())

    assert list(Conversation.objects.for_user(alice)) == [new, old]


# history


def test_history_is_in_order_with_the_system_prompt_first(chat):
    chat.system_prompt = "Be brief."
    chat.save()
    user(chat, "one")
    assistant(chat, "two")
    user(chat, "three")

    assert chat.history() == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "two"},
        {"role": "user", "content": "three"},
    ]


def test_history_without_a_system_prompt_has_no_system_turn(chat):
    user(chat, "hello")

    assert chat.history() == [{"role": "user", "content": "hello"}]


def test_history_excludes_superseded_messages(chat):
    user(chat, "question")
    assistant(chat, "first try", superseded=True)
    assistant(chat, "second try")

    assert chat.history() == [
        {"role": "user", "content": "question"},
        {"role": "assistant", "content": "second try"},
    ]


@pytest.mark.parametrize(
    "status",
    [
        Message.Status.ERROR,
        Message.Status.INTERRUPTED,
        Message.Status.STREAMING,
        Message.Status.PENDING,
    ],
)
def test_history_excludes_unfinished_or_failed_replies(chat, status):
    user(chat, "question")
    assistant(chat, "partial text", status=status)
    user(chat, "again")

    assert chat.history() == [
        {"role": "user", "content": "question"},
        {"role": "user", "content": "again"},
    ]


@pytest.mark.parametrize("status", [Message.Status.COMPLETE, Message.Status.STOPPED])
def test_history_includes_complete_and_stopped_replies(chat, status):
    user(chat, "question")
    assistant(chat, "an answer", status=status)
    user(chat, "again")

    assert chat.history() == [
        {"role": "user", "content": "question"},
        {"role": "assistant", "content": "an answer"},
        {"role": "user", "content": "again"},
    ]


def test_history_never_includes_reasoning(chat):
    user(chat, "question")
    assistant(chat, "the answer", reasoning="secret chain of thought")
    user(chat, "again")

    history = chat.history()

    assert history == [
        {"role": "user", "content": "question"},
        {"role": "assistant", "content": "the answer"},
        {"role": "user", "content": "again"},
    ]
    assert all("secret" not in turn["content"] for turn in history)


def long_turns(chat):
    """Five turns of 40 characters: 11 estimated tokens each."""
    user(chat, "u1" * 20)
    assistant(chat, "a1" * 20)
    user(chat, "u2" * 20)
    assistant(chat, "a2" * 20)
    user(chat, "u3" * 20)


def contents(history):
    return [turn["content"][:2] for turn in history]


def test_history_fits_the_budget_by_dropping_the_oldest_turns(chat):
    long_turns(chat)

    assert contents(chat.history(budget=55)) == ["u1", "a1", "u2", "a2", "u3"]
    assert contents(chat.history(budget=33)) == ["u2", "a2", "u3"]
    assert contents(chat.history(budget=11)) == ["u3"]


def test_history_budget_defaults_to_the_setting(chat, settings):
    long_turns(chat)
    settings.CHAT_CONTEXT_BUDGET = 33

    assert contents(chat.history()) == ["u2", "a2", "u3"]


def test_history_trimmed_starts_with_a_user_turn(chat):
    long_turns(chat)

    # 44 tokens would fit a1 onwards, and 22 a2 and u3, but the model must
    # not be sent a conversation that opens with its own reply.
    assert contents(chat.history(budget=44)) == ["u2", "a2", "u3"]
    assert contents(chat.history(budget=22)) == ["u3"]


def test_history_always_keeps_the_newest_turn_even_over_budget(chat):
    long_turns(chat)

    assert contents(chat.history(budget=1)) == ["u3"]


def test_history_budget_counts_the_system_prompt_and_always_keeps_it(chat):
    chat.system_prompt = "s" * 40  # 11 tokens
    chat.save()
    long_turns(chat)

    history = chat.history(budget=44)

    assert history[0] == {"role": "system", "content": "s" * 40}
    assert contents(history[1:]) == ["u2", "a2", "u3"]
    assert chat.history(budget=1)[0]["role"] == "system"
    assert contents(chat.history(budget=1)[1:]) == ["u3"]


# start_turn


def test_start_turn_saves_the_user_message_and_a_streaming_reply(chat):
    before = chat.updated

    user_message, reply, superseded = chat.start_turn("Hello there", "fake", {"seed": 3})

    assert superseded is None
    user_message.refresh_from_db()
    reply.refresh_from_db()
    assert user_message.role == Message.Role.USER
    assert user_message.content == "Hello there"
    assert user_message.status == Message.Status.COMPLETE
    assert reply.role == Message.Role.ASSISTANT
    assert reply.status == Message.Status.STREAMING
    assert reply.content == ""
    assert reply.model == "fake"
    assert reply.options == {"seed": 3}
    assert list(chat.visible_messages()) == [user_message, reply]
    chat.refresh_from_db()
    assert chat.updated > before


def test_start_turn_raises_busy_while_a_reply_is_live(chat):
    chat.start_turn("first", "fake", {})

    with pytest.raises(Busy):
        chat.start_turn("second", "fake", {})

    assert chat.messages.count() == 2
    assert not chat.messages.filter(content="second").exists()


def test_start_turn_regenerate_raises_busy_while_a_reply_is_live(chat):
    chat.start_turn("first", "fake", {})

    with pytest.raises(Busy):
        chat.start_turn(None, "fake", {})

    assert chat.messages.count() == 2
    assert not chat.messages.filter(superseded=True).exists()


def test_start_turn_interrupts_a_stale_live_reply_instead_of_raising_busy(chat):
    _, stale, _ = chat.start_turn("first", "fake", {})
    Message.objects.filter(pk=stale.pk).update(updated=timezone.now() - timedelta(minutes=5))

    user_message, reply, _ = chat.start_turn("second", "fake", {})

    stale.refresh_from_db()
    assert stale.status == Message.Status.INTERRUPTED
    assert stale.error_code == "interrupted"
    assert user_message.content == "second"
    assert reply.status == Message.Status.STREAMING
    assert chat.reply_in_progress() == reply


def test_start_turn_after_a_finished_reply_is_not_busy(chat):
    _, reply, _ = chat.start_turn("first", "fake", {})
    Message.objects.filter(pk=reply.pk).update(status=Message.Status.COMPLETE, content="ok")

    user_message, _, _ = chat.start_turn("second", "fake", {})

    assert user_message.content == "second"


def test_regenerate_supersedes_the_last_reply(chat):
    user(chat, "question")
    old = assistant(chat, "old answer")

    user_message, reply, superseded = chat.start_turn(None, "fake", {})

    assert user_message is None
    assert superseded == old
    old.refresh_from_db()
    assert old.superseded is True
    assert old.content == "old answer"  # kept in the database
    assert reply.status == Message.Status.STREAMING
    assert reply.superseded is False
    assert [m.pk for m in chat.visible_messages()] == [
        chat.messages.get(content="question").pk,
        reply.pk,
    ]
    assert chat.history() == [{"role": "user", "content": "question"}]


def test_regenerate_after_a_user_message_without_reply_supersedes_nothing(chat):
    question = user(chat, "question")

    user_message, reply, superseded = chat.start_turn(None, "fake", {})

    assert user_message is None
    assert superseded is None
    assert list(chat.visible_messages()) == [question, reply]


def test_regenerate_without_a_user_message_raises_nothing_to_answer(chat):
    with pytest.raises(NothingToAnswer):
        chat.start_turn(None, "fake", {})

    assert chat.messages.count() == 0


def test_regenerate_with_only_assistant_messages_raises_nothing_to_answer(chat):
    greeting = assistant(chat, "Hi, how can I help?")

    with pytest.raises(NothingToAnswer):
        chat.start_turn(None, "fake", {})

    greeting.refresh_from_db()
    assert greeting.superseded is False
    assert chat.messages.count() == 1


# titles


def test_title_comes_from_the_first_message_with_whitespace_folded(chat):
    chat.start_turn("  What   is\n\tthe  answer?  ", "fake", {})

    chat.refresh_from_db()
    assert chat.title == "What is the answer?"


def test_title_is_not_replaced_by_later_messages(chat):
    _, reply, _ = chat.start_turn("first question", "fake", {})
    Message.objects.filter(pk=reply.pk).update(status=Message.Status.COMPLETE)
    chat.start_turn("second question", "fake", {})

    chat.refresh_from_db()
    assert chat.title == "first question"


def test_title_of_80_characters_is_kept_whole(chat):
    chat.start_turn("x" * 80, "fake", {})

    chat.refresh_from_db()
    assert chat.title == "x" * 80


def test_title_past_80_characters_is_truncated_with_an_ellipsis(chat):
    chat.start_turn("y" * 81, "fake", {})

    chat.refresh_from_db()
    assert chat.title == "y" * 79 + "…"
    assert len(chat.title) == 80


def test_title_truncation_does_not_end_in_a_space_before_the_ellipsis(chat):
    content = "word " * 40

    assert chat.title_from(content) == ("word " * 16).rstrip() + "…"


def test_conversation_without_a_title_is_a_new_chat(chat):
    assert str(chat) == "New chat"
    assert chat.as_frame()["title"] == "New chat"


def test_conversation_frame_fields(chat):
    chat.title = "Trip"
    chat.system_prompt = "Be kind."
    chat.save()

    assert chat.as_frame() == {
        "id": str(chat.pk),
        "title": "Trip",
        "model": "fake",
        "system": "Be kind.",
        "created": chat.created.isoformat(),
        "updated": chat.updated.isoformat(),
        "active": None,
    }


# interrupt_orphans


def test_interrupt_orphans_marks_live_rows_from_before_start_interrupted(
    chat, settings, monkeypatch
):
    settings.REDIS_URL = ""
    streaming = assistant(chat, "half an ans", status=Message.Status.STREAMING)
    pending = assistant(chat, "", status=Message.Status.PENDING)
    done = assistant(chat, "a whole answer")
    monkeypatch.setattr(models, "PROCESS_STARTED", timezone.now() + timedelta(seconds=1))

    assert Message.objects.interrupt_orphans() == 2

    for message in (streaming, pending):
        message.refresh_from_db()
        assert message.status == Message.Status.INTERRUPTED
        assert message.error_code == "interrupted"
        assert message.error
    assert streaming.content == "half an ans"
    done.refresh_from_db()
    assert done.status == Message.Status.COMPLETE
    assert done.error_code == ""


def test_interrupt_orphans_leaves_live_rows_of_this_process_alone(chat, settings, monkeypatch):
    settings.REDIS_URL = ""
    monkeypatch.setattr(models, "PROCESS_STARTED", timezone.now() - timedelta(hours=1))
    live = assistant(chat, "still coming", status=Message.Status.STREAMING)
    Message.objects.filter(pk=live.pk).update(updated=timezone.now())

    assert Message.objects.interrupt_orphans() == 0

    live.refresh_from_db()
    assert live.status == Message.Status.STREAMING


def test_interrupt_orphans_with_redis_only_takes_rows_whose_writer_stopped_beating(chat, settings):
    settings.REDIS_URL = "redis://127.0.0.1:6379/0"  # only read, never connected to
    beating = assistant(chat, "fresh", status=Message.Status.STREAMING)
    silent = assistant(chat, "old", status=Message.Status.STREAMING)
    Message.objects.filter(pk=beating.pk).update(updated=timezone.now())
    Message.objects.filter(pk=silent.pk).update(updated=timezone.now() - timedelta(minutes=1))

    assert Message.objects.interrupt_orphans() == 1

    beating.refresh_from_db()
    silent.refresh_from_db()
    assert beating.status == Message.Status.STREAMING
    assert silent.status == Message.Status.INTERRUPTED


# frames and timing


def test_user_message_frame_fields(chat):
    message = user(chat, "hello")

    frame = message.as_frame()

    assert frame["id"] == str(message.pk)
    assert frame["role"] == "user"
    assert frame["content"] == "hello"
    assert frame["reasoning"] == ""
    assert frame["status"] == "complete"
    assert frame["model"] == ""
    assert frame["created"] == message.created.isoformat()
    assert frame["seq"] == 0
    assert "usage" not in frame
    assert "timing" not in frame
    assert "error" not in frame


def test_reply_frame_has_usage_and_timing(chat):
    reply = assistant(
        chat,
        "the answer",
        reasoning="thinking",
        model="fake",
        prompt_tokens=7,
        completion_tokens=50,
        ttft_ms=100,
        duration_ms=2600,
        seq=12,
    )

    frame = reply.as_frame()

    assert frame["id"] == str(reply.pk)
    assert frame["role"] == "assistant"
    assert frame["content"] == "the answer"
    assert frame["reasoning"] == "thinking"
    assert frame["status"] == "complete"
    assert frame["model"] == "fake"
    assert frame["created"] == reply.created.isoformat()
    assert frame["seq"] == 12
    assert frame["usage"] == {"prompt_tokens": 7, "completion_tokens": 50}
    assert frame["timing"] == {"ttft_ms": 100, "duration_ms": 2600, "tokens_per_s": 20.0}
    assert "error" not in frame


def test_failed_reply_frame_carries_the_error(chat):
    reply = assistant(
        chat,
        "",
        status=Message.Status.ERROR,
        error_code="upstream_unavailable",
        error="Cannot reach the model server.",
    )

    frame = reply.as_frame()

    assert frame["status"] == "error"
    assert frame["error"] == {
        "code": "upstream_unavailable",
        "message": "Cannot reach the model server.",
    }
    assert frame["usage"] == {"prompt_tokens": None, "completion_tokens": None}
    assert frame["timing"] == {"ttft_ms": None, "duration_ms": None, "tokens_per_s": None}


@pytest.mark.parametrize(
    ("completion", "ttft", "duration", "rate"),
    [
        (50, 100, 2600, 20.0),  # 50 tokens over the 2.5 s after the first
        (10, 0, 3000, 3.3),  # rounded to one decimal
        (1, 250, 250, 1000.0),  # no time after the first token: counted as 1 ms
        (None, 100, 2600, None),
        (0, 100, 2600, None),
        (50, None, 2600, None),
        (50, 100, None, None),
    ],
)
def test_timing_tokens_per_second(completion, ttft, duration, rate):
    message = Message(
        role=Message.Role.ASSISTANT,
        completion_tokens=completion,
        ttft_ms=ttft,
        duration_ms=duration,
    )

    assert message.timing() == {"ttft_ms": ttft, "duration_ms": duration, "tokens_per_s": rate}


@pytest.mark.django_db
def test_for_send_creates_or_finds_only_my_conversation_and_applies_settings(alice, bob):
    new, created, changed = Conversation.objects.for_send(
        alice, None, model=None, system="Be kind.", options=None, default_model="fake"
    )
    assert created and not changed
    assert (new.owner, new.model, new.system_prompt) == (alice, "fake", "Be kind.")
    same, created, changed = Conversation.objects.for_send(
        alice, new.pk, model="fake", system=None, options=None, default_model="x"
    )
    assert same == new and not created and not changed
    same, _, changed = Conversation.objects.for_send(
        alice, new.pk, model="fake-think", system=None, options={"seed": 1}, default_model="x"
    )
    assert changed
    new.refresh_from_db()
    assert (new.model, new.system_prompt, new.options) == ("fake-think", "Be kind.", {"seed": 1})
    with pytest.raises(Conversation.DoesNotExist):
        Conversation.objects.for_send(
            bob, new.pk, model="evil", system=None, options=None, default_model="x"
        )


def test_title_leaves_out_markdown_markers(chat):
    chat.start_turn("## Binary search\n\n- in Python\n```python\nprint(1)\n```", "fake", {})

    chat.refresh_from_db()
    assert chat.title == "Binary search in Python print(1)"


# begin_send


def send_request(conversation=None, content="Hello", **fields) -> SendRequest:
    values = {"model": None, "system": None, "options": None, **fields}
    return SendRequest(conversation and str(conversation), content, **values)


def test_begin_send_to_no_conversation_starts_one_with_the_turn(alice):
    turn = Conversation.objects.begin_send(alice, send_request(system="Be kind."), "fake")
    assert turn.created and not turn.changed
    assert (turn.conversation.owner, turn.conversation.model) == (alice, "fake")
    assert (turn.user_message.content, turn.reply.status) == ("Hello", "streaming")
    assert turn.reply.model == "fake"
    assert list(turn.conversation.visible_messages()) == [turn.user_message, turn.reply]


def test_begin_send_applies_the_settings_to_the_reply(chat):
    request = send_request(chat.pk, model="fake-think", options={"seed": 2})
    turn = Conversation.objects.begin_send(chat.owner, request, "x")
    assert turn.changed and not turn.created
    assert (turn.reply.model, turn.reply.options) == ("fake-think", {"seed": 2})


def test_begin_send_to_another_users_conversation_saves_nothing(chat, bob):
    with pytest.raises(Conversation.DoesNotExist):
        Conversation.objects.begin_send(bob, send_request(chat.pk, model="evil"), "x")
    chat.refresh_from_db()
    assert chat.model == "fake" and not chat.messages.exists()


def test_a_busy_begin_send_changes_no_setting(chat):
    chat.start_turn("first", "fake", {})
    with pytest.raises(Busy):
        Conversation.objects.begin_send(
            chat.owner, send_request(chat.pk, model="fake-think", system="Be long."), "x"
        )
    chat.refresh_from_db()
    assert (chat.model, chat.system_prompt, chat.messages.count()) == ("fake", "", 2)


# stop_and_delete


@pytest.fixture
def stops(monkeypatch) -> list:
    asked = []

    async def request_stop(conversation_id, message_id):
        asked.append((conversation_id, message_id))

    monkeypatch.setattr(replies, "request_stop", request_stop)
    return asked


def test_stop_and_delete_stops_the_live_reply_then_deletes(chat, stops):
    _, reply, _ = chat.start_turn("hi", "fake", {})
    pk = chat.pk
    chat.stop_and_delete()
    assert stops == [(pk, reply.pk)]
    assert not Conversation.objects.filter(pk=pk).exists()
    assert not Message.objects.exists()


def test_stop_and_delete_without_a_live_reply_only_deletes(chat, stops):
    _, reply, _ = chat.start_turn("hi", "fake", {})
    Message.objects.filter(pk=reply.pk).update(status=COMPLETE)
    pk = chat.pk
    chat.stop_and_delete()
    assert stops == []
    assert not Conversation.objects.filter(pk=pk).exists()


# The dead-writer rule


def test_a_live_reply_is_stale_only_after_three_heartbeats_of_silence(chat):
    _, reply, _ = chat.start_turn("hi", "fake", {})
    assert Message.stale_after() == 3 * Message.HEARTBEAT
    reply.updated = timezone.now() - Message.stale_after() + timedelta(seconds=1)
    assert not reply.is_stale()
    reply.updated = timezone.now() - Message.stale_after() - timedelta(seconds=1)
    assert reply.is_stale()
    reply.status = COMPLETE
    assert not reply.is_stale()


def silent_reply(chat) -> Message:
    """A streaming reply, read after its writer had been silent past the
    dead-writer limit."""
    _, reply, _ = chat.start_turn("hi", "fake", {})
    silent = timezone.now() - Message.stale_after() - timedelta(seconds=1)
    Message.objects.filter(pk=reply.pk).update(content="kept", updated=silent)
    return Message.objects.get(pk=reply.pk)


def test_a_silent_reply_is_marked_interrupted_with_its_saved_text(chat):
    reply = silent_reply(chat)

    assert reply.mark_interrupted()

    stored = Message.objects.get(pk=reply.pk)
    assert (stored.status, stored.error_code, stored.content) == (
        "interrupted",
        "interrupted",
        "kept",
    )
    assert (reply.status, reply.error) == ("interrupted", stored.error)


def test_a_reply_saved_after_it_was_read_as_silent_is_not_marked_interrupted(chat):
    # Its writer was only slow (a final save retried while the database
    # was away): the save it made meanwhile stands.
    reply = silent_reply(chat)
    Message.objects.filter(pk=reply.pk).update(
        content="kept, and the rest", status=COMPLETE, updated=timezone.now()
    )

    assert not reply.mark_interrupted()

    stored = Message.objects.get(pk=reply.pk)
    assert (stored.status, stored.error_code, stored.content) == (
        COMPLETE,
        "",
        "kept, and the rest",
    )
    assert reply.status == Message.Status.STREAMING


def test_a_turn_waits_for_a_silent_reply_whose_writer_saved_meanwhile(chat, monkeypatch):
    reply = silent_reply(chat)
    # The writer's save lands between the turn's reading and its verdict.
    mark = Message.mark_interrupted

    def saved_first(message: Message) -> bool:
        Message.objects.filter(pk=reply.pk).update(updated=timezone.now())
        return mark(message)

    monkeypatch.setattr(Message, "mark_interrupted", saved_first)

    with pytest.raises(Busy):
        chat.start_turn("again", "fake", {})
    assert Message.objects.get(pk=reply.pk).status == Message.Status.STREAMING
    assert chat.messages.count() == 2


# Replies at once (issue 9, item 2)


def live_replies(owner, n: int) -> list[Conversation]:
    """n conversations of owner, each with a reply being written."""
    conversations = [Conversation.objects.create(owner=owner, model="fake") for _ in range(n)]
    for conversation in conversations:
        conversation.start_turn("go", "fake", {})
    return conversations


def test_start_turn_refuses_a_reply_past_the_users_cap_and_saves_nothing(alice, settings):
    settings.CHAT_MAX_REPLIES_PER_USER = 2
    live_replies(alice, 2)
    chat = Conversation.objects.create(owner=alice, model="fake")

    with pytest.raises(FrameError) as refused:
        chat.start_turn("one too many", "fake", {})

    assert refused.value.code == "too_many_replies"
    assert refused.value.message == (
        "At most 2 of your replies may be written at once; wait for one to end."
    )
    assert not chat.messages.exists()


def test_begin_send_past_the_cap_creates_no_conversation(alice, settings):
    settings.CHAT_MAX_REPLIES_PER_USER = 1
    live_replies(alice, 1)
    request = SendRequest(None, "hello", None, None, None)

    with pytest.raises(FrameError):
        Conversation.objects.begin_send(alice, request, "fake")

    assert Conversation.objects.filter(owner=alice).count() == 1


def test_replies_whose_writer_went_silent_no_longer_count_against_the_cap(alice, settings):
    settings.CHAT_MAX_REPLIES_PER_USER = 2
    live_replies(alice, 2)
    silent = timezone.now() - Message.stale_after() - timedelta(seconds=1)
    Message.objects.filter(status=Message.Status.STREAMING).update(updated=silent)
    chat = Conversation.objects.create(owner=alice, model="fake")

    _, reply, _ = chat.start_turn("my turn", "fake", {})

    assert reply.status == Message.Status.STREAMING


def test_the_site_cap_counts_every_users_replies_and_zero_means_none(alice, bob, settings):
    settings.CHAT_MAX_REPLIES = 2
    live_replies(alice, 1)
    live_replies(bob, 1)
    chat = Conversation.objects.create(owner=bob, model="fake")
    with pytest.raises(FrameError) as refused:
        chat.start_turn("one too many", "fake", {})
    assert "The site is writing 2 replies at once" in refused.value.message

    settings.CHAT_MAX_REPLIES = 0
    _, reply, _ = chat.start_turn("no site cap", "fake", {})
    assert reply.status == Message.Status.STREAMING


@pytest.mark.django_db(transaction=True)
def test_two_sends_at_the_same_instant_cannot_both_pass_at_one_below_the_cap(
    alice, settings, monkeypatch
):
    """Each send counts, then waits (up to 3 s) for the other to have
    counted too: without a lock both count 2 of 3 and both start a reply;
    with one, the second cannot count until the first has committed."""
    if connection.vendor == "sqlite":
        # SQLite's in-memory test database fails a second writer at once
        # ("table is locked") where the site's file database, in IMMEDIATE
        # mode, queues it: only a server database can show the lock here.
        pytest.skip("needs Postgres: SQLite serialises writers by itself")
    settings.CHAT_MAX_REPLIES_PER_USER = 3
    live_replies(alice, 2)
    chats = [Conversation.objects.create(owner=alice, model="fake") for _ in range(2)]
    both_counted = threading.Barrier(2, timeout=3)
    check = Conversation.check_reply_caps

    def check_then_wait(self):
        check(self)
        with contextlib.suppress(threading.BrokenBarrierError):
            both_counted.wait()

    monkeypatch.setattr(Conversation, "check_reply_caps", check_then_wait)
    outcomes: list[str] = []

    def send(chat):
        try:
            chat.start_turn("at the same instant", "fake", {})
            outcomes.append("started")
        except FrameError as exc:
            outcomes.append(exc.code)
        finally:
            connection.close()

    threads = [threading.Thread(target=send, args=(chat,)) for chat in chats]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert sorted(outcomes) == ["started", "too_many_replies"]
    assert Message.objects.running().filter(conversation__owner=alice).count() == 3


def test_a_turn_in_a_conversation_deleted_since_it_was_read_is_not_found(chat):
    """A delete that commits between reading the conversation and starting
    the turn: on Postgres the messages were written into a row that was
    gone, and the send failed at COMMIT with a 500 (issue 10, the soak)."""
    Conversation.objects.filter(pk=chat.pk).delete()
    with pytest.raises(Conversation.DoesNotExist):
        chat.start_turn("hi", "fake", {})
    with pytest.raises(Conversation.DoesNotExist):
        chat.start_turn(None, "fake", {})
    assert not Message.objects.exists()


def waiting_on_a_lock() -> bool:
    """Whether some other Postgres session waits on a lock (bounded poll)."""
    for _ in range(100):
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'")
            if cursor.fetchone()[0]:
                return True
        threading.Event().wait(0.05)
    return False


@pytest.mark.django_db(transaction=True)
def test_a_delete_racing_a_send_stops_the_reply_that_send_started(alice, stops, monkeypatch):
    """The send has locked its turn and is writing its reply row when the
    delete comes: the delete waits for it, then finds that reply and stops
    it. Before, it looked for a live reply first, found none, and deleted
    the row under a reply that went on asking the model."""
    if connection.vendor == "sqlite":
        pytest.skip("needs Postgres: SQLite serialises writers by itself")
    chat = Conversation.objects.create(owner=alice, model="fake")
    turn_begun, go_on = threading.Event(), threading.Event()
    check = Conversation.check_reply_caps

    def check_then_hold(self):
        check(self)
        turn_begun.set()
        go_on.wait(5)

    monkeypatch.setattr(Conversation, "check_reply_caps", check_then_hold)
    started = []

    def send():
        try:
            started.append(chat.start_turn("hi", "fake", {})[1].pk)
        finally:
            connection.close()

    def delete():
        try:
            Conversation.objects.get(pk=chat.pk).stop_and_delete()
        finally:
            connection.close()

    sender, deleter = threading.Thread(target=send), threading.Thread(target=delete)
    sender.start()
    try:
        assert turn_begun.wait(5)
        deleter.start()
        assert waiting_on_a_lock()
    finally:
        go_on.set()
        sender.join(10)
        if deleter.ident is not None:  # started
            deleter.join(10)
    assert stops == [(chat.pk, started[0])]
    assert not Conversation.objects.filter(pk=chat.pk).exists()
    assert not Message.objects.exists()
