"""Issue 13: a conversation is a tree. The tree itself (conversations/tree.py),
the models' edit, regenerate, switch and history along a branch, the
migration that made the old flat conversations trees, and the `edit` and
`switch` frames through WebsocketCommunicator against the fake model server."""

import asyncio
import contextlib
import uuid
from unittest import mock

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from django.utils import timezone

from conversations.models import Conversation, Message
from conversations.tree import Node, Tree
from tests.fake_llm import expected_text
from tests.helpers import chat_socket, finish_replies, receive_until

ECHO = "fake:echo=1"  # answers with the words of the last user message
SLOW = "fake:n=40,delay=0.1"


# The tree, as plain Python.


def sample_tree() -> Tree:
    # q1 ─ a1
    #    ├ a1b            (a regenerated reply)
    #    │   └ q2 ─ a2
    # q1b ─ a3            (an edited first question)
    return Tree(
        [
            Node("q1", None, "user"),
            Node("a1", "q1", "assistant"),
            Node("a1b", "q1", "assistant"),
            Node("q2", "a1b", "user"),
            Node("q1b", None, "user"),
            Node("a2", "q2", "assistant"),
            Node("a3", "q1b", "assistant"),
        ]
    )


def test_a_path_runs_from_the_root_down_to_the_leaf():
    tree = sample_tree()
    assert tree.path("a2") == ["q1", "a1b", "q2", "a2"]
    assert tree.path("a3") == ["q1b", "a3"]
    assert tree.path(None) == []


def test_versions_share_a_parent_and_a_role_oldest_first():
    tree = sample_tree()
    assert tree.siblings("a1b") == ["a1", "a1b"]
    assert tree.siblings("q1b") == ["q1", "q1b"]
    assert tree.siblings("a2") == ["a2"]


def test_a_switch_lands_on_the_newest_leaf_under_the_message():
    tree = sample_tree()
    assert tree.newest_leaf_under("q1") == "a2"
    assert tree.newest_leaf_under("a1") == "a1"
    assert tree.newest_leaf_under("q1b") == "a3"
    assert tree.newest_leaf() == "a3"


def test_a_cycle_made_by_hand_does_not_hang_the_path():
    tree = Tree([Node("x", "y", "user"), Node("y", "x", "assistant")])
    assert tree.path("x") == ["y", "x"]


# The models.


def finish(reply: Message, text: str) -> None:
    reply.content, reply.status = text, Message.Status.COMPLETE
    reply.save(update_fields=["content", "status"])


def answered(conversation: Conversation, question: str, answer: str, **turn) -> Message:
    user_message, reply, _ = conversation.start_turn(question, "fake", {}, **turn)
    finish(reply, answer)
    return user_message


def texts(messages) -> list[str]:
    return [m.content for m in messages]


@pytest.fixture
def chat(alice):
    return Conversation.objects.create(owner=alice, model="fake")


@pytest.mark.django_db
def test_sends_make_a_chain_and_the_last_reply_is_the_active_leaf(chat):
    first = answered(chat, "one", "1")
    second = answered(chat, "two", "2")

    chat.refresh_from_db()
    path = chat.path()
    assert texts(path) == ["one", "1", "two", "2"]
    assert [m.parent_id for m in path] == [None, first.pk, path[1].pk, second.pk]
    assert chat.active_id == path[-1].pk
    assert all(m.sibling_ids == [m.pk] for m in path)


@pytest.mark.django_db
def test_an_edit_is_a_new_version_and_keeps_the_old_branch_whole(chat):
    first = answered(chat, "one", "1")
    answered(chat, "two", "2")

    edited = answered(chat, "ONE", "I", editing=first)

    chat.refresh_from_db()
    assert texts(chat.path()) == ["ONE", "I"]
    assert edited.parent_id is None
    assert chat.path()[0].sibling_ids == [first.pk, edited.pk]
    old = Message.objects.filter(conversation=chat, superseded=True).order_by("created")
    assert texts(old) == ["one", "1", "two", "2"]
    assert chat.history() == [
        {"role": "user", "content": "ONE"},
        {"role": "assistant", "content": "I"},
    ]


@pytest.mark.django_db
def test_regenerate_writes_a_version_of_the_last_reply(chat):
    answered(chat, "one", "1")

    _, reply, replaced = chat.start_turn(None, "fake", {})

    assert replaced is not None and replaced.content == "1" and replaced.superseded
    assert reply.parent_id == replaced.parent_id
    assert reply.sibling_ids == [replaced.pk, reply.pk]
    assert replaced.sibling_ids == [replaced.pk, reply.pk]
    finish(reply, "1b")
    chat.refresh_from_db()
    assert texts(chat.path()) == ["one", "1b"]


@pytest.mark.django_db
def test_a_switch_shows_the_newest_branch_under_the_version_chosen(chat):
    first = answered(chat, "one", "1")
    answered(chat, "two", "2")
    answered(chat, "ONE", "I", editing=first)

    path = chat.switch(first.pk)

    assert texts(Message.objects.filter(pk__in=path).order_by("created")) == [
        "one",
        "1",
        "two",
        "2",
    ]
    chat.refresh_from_db()
    assert texts(chat.path()) == ["one", "1", "two", "2"]
    assert set(Message.objects.filter(superseded=True).values_list("content", flat=True)) == {
        "ONE",
        "I",
    }
    # And the history sent with the next send is this branch's.
    assert [t["content"] for t in chat.history()] == ["one", "1", "two", "2"]


@pytest.mark.django_db
def test_a_switch_to_a_message_of_another_conversation_is_refused(chat, alice):
    other = Conversation.objects.create(owner=alice, model="fake")
    stranger = answered(other, "elsewhere", "there")

    with pytest.raises(Message.DoesNotExist):
        chat.switch(stranger.pk)


@pytest.mark.django_db
def test_history_along_a_branch_is_that_branch_whatever_the_active_path(chat):
    first = answered(chat, "one", "1")
    answered(chat, "two", "2")
    _, reply, _ = chat.start_turn("ONE", "fake", {}, editing=first)
    # Another tab switches back before the new reply asks the model.
    chat.switch(first.pk)

    assert chat.history(upto=reply.parent_id) == [{"role": "user", "content": "ONE"}]
    assert [t["content"] for t in chat.history()] == ["one", "1", "two", "2"]


@pytest.mark.django_db
def test_a_send_after_a_switch_continues_the_branch_on_screen(chat):
    first = answered(chat, "one", "1")
    answered(chat, "ONE", "I", editing=first)
    chat.switch(first.pk)

    answered(chat, "two", "2")

    chat.refresh_from_db()
    assert texts(chat.path()) == ["one", "1", "two", "2"]


@pytest.mark.django_db
def test_a_message_added_without_a_parent_follows_the_active_leaf(chat):
    question = chat.messages.create(role="user", content="hi")
    old = chat.messages.create(role="assistant", content="old", superseded=True)
    new = chat.messages.create(role="assistant", content="new")

    chat.refresh_from_db()
    assert old.parent_id == question.pk and new.parent_id == question.pk
    assert chat.active_id == new.pk
    assert new.siblings() == [old.pk, new.pk]


@pytest.mark.django_db
def test_a_reply_switched_away_from_still_blocks_a_second_reply(chat):
    first = answered(chat, "one", "1")
    _, live, _ = chat.start_turn("ONE", "fake", {}, editing=first)
    chat.switch(first.pk)

    assert chat.reply_in_progress() == live


@contextlib.contextmanager
def between_the_reads(action):
    """Run action when a conversation's tree is read: after its messages, as
    another tab's send or a delete can fall between the two queries."""
    real_tree = Conversation.tree

    def tree(self):
        action()
        return real_tree(self)

    with mock.patch.object(Conversation, "tree", tree):
        yield


@pytest.mark.django_db
def test_a_send_between_the_reads_of_a_replay_is_not_an_error(chat):
    answered(chat, "one", "1")
    with between_the_reads(lambda: answered(chat, "two", "2")):
        messages, _ = chat.replay()

    assert texts(messages) == ["one", "1"]
    assert all(m.sibling_ids == [m.pk] for m in messages)


@pytest.mark.django_db
def test_a_conversation_deleted_between_the_reads_of_a_replay_is_gone(chat):
    answered(chat, "one", "1")
    deleted = between_the_reads(lambda: Conversation.objects.filter(pk=chat.pk).delete())
    with deleted, pytest.raises(Conversation.DoesNotExist):
        chat.replay()


@pytest.mark.django_db
def test_a_message_deleted_alone_between_the_reads_is_not_shown(chat):
    answered(chat, "one", "1")
    answer = chat.messages.get(content="1")
    with between_the_reads(lambda: Message.objects.filter(pk=answer.pk).delete()):
        assert texts(chat.path()) == ["one"]


@pytest.mark.django_db
def test_a_page_whose_conversation_is_deleted_while_it_renders_is_not_found(client, alice, chat):
    answered(chat, "one", "1")
    client.force_login(alice)
    with between_the_reads(lambda: Conversation.objects.filter(pk=chat.pk).delete()):
        response = client.get(chat.get_absolute_url())
    assert response.status_code == 404


# The migration.


@pytest.mark.django_db(transaction=True)
def test_the_migration_makes_old_conversations_trees(alice):
    executor = MigrationExecutor(connection)
    before = [("conversations", "0007_search_indexes")]
    executor.migrate(before)
    old = executor.loader.project_state(before).apps
    OldConversation = old.get_model("conversations", "Conversation")
    OldMessage = old.get_model("conversations", "Message")
    start = timezone.now()

    def at(seconds: int):
        return start + timezone.timedelta(seconds=seconds)

    chat = OldConversation.objects.create(id=uuid.uuid4(), owner_id=alice.pk, title="old")
    rows = [
        ("user", "one", False),
        ("assistant", "first try", True),  # regenerated
        ("assistant", "second try", True),  # regenerated again
        ("assistant", "1", False),
        ("user", "two", False),
        ("assistant", "2", False),
    ]
    for i, (role, content, superseded) in enumerate(rows):
        OldMessage.objects.create(
            id=uuid.uuid4(),
            conversation_id=chat.pk,
            role=role,
            content=content,
            superseded=superseded,
            created=at(i),
        )
    empty = OldConversation.objects.create(id=uuid.uuid4(), owner_id=alice.pk)

    executor = MigrationExecutor(connection)
    executor.loader.build_graph()
    executor.migrate(executor.loader.graph.leaf_nodes())

    conversation = Conversation.objects.get(pk=chat.pk)
    by_text = {m.content: m for m in conversation.messages.all()}
    assert texts(conversation.path()) == ["one", "1", "two", "2"]
    assert conversation.active_id == by_text["2"].pk
    assert by_text["1"].siblings() == [
        by_text["first try"].pk,
        by_text["second try"].pk,
        by_text["1"].pk,
    ]
    assert by_text["first try"].parent_id == by_text["one"].pk
    assert by_text["two"].parent_id == by_text["1"].pk
    assert Conversation.objects.get(pk=empty.pk).active_id is None


# The protocol.

pytestmark_consumer = pytest.mark.django_db(transaction=True)


async def conversation_with_two_turns(ws) -> tuple[str, list[dict]]:
    """A conversation of two turns with the echo model; its id and the
    path's message snapshots, oldest first."""
    await ws.send_json_to(
        {"type": "send", "conversation": None, "content": "red fish", "model": ECHO}
    )
    conversation_id = (await receive_until(ws, "conversation"))[-1]["conversation"]["id"]
    await receive_until(ws, "end")
    await ws.send_json_to({"type": "send", "conversation": conversation_id, "content": "blue fish"})
    await receive_until(ws, "end")
    return conversation_id, await path_of(ws, conversation_id)


async def path_of(ws, conversation_id: str) -> list[dict]:
    await ws.send_json_to({"type": "subscribe", "id": "s", "conversation": conversation_id})
    frames = await receive_until(ws, "conversation")
    assert frames[-1]["conversation"]["id"] == conversation_id
    await ws.send_json_to({"type": "ping", "id": "end-of-path"})
    frames = await receive_until(ws, "pong")
    return [f["message"] for f in frames if f["type"] == "message"]


def path_answer(frames: list[dict]) -> tuple[dict, list[dict]]:
    """The conversation frame answering an edit or a switch, and the
    message snapshots after it."""
    [at] = [i for i, f in enumerate(frames) if f["type"] == "conversation" and "path" in f]
    after = [f["message"] for f in frames[at + 1 :] if f["type"] == "message"]
    return frames[at], after


@pytestmark_consumer
async def test_edit_answers_with_the_new_path_and_streams_the_new_reply(alice, fake_llm):
    async with chat_socket(alice) as ws:
        conversation_id, path = await conversation_with_two_turns(ws)
        first_question = path[0]
        await ws.send_json_to(
            {
                "type": "edit",
                "id": "e1",
                "conversation": conversation_id,
                "message": first_question["id"],
                "content": "green fish",
            }
        )
        frames = await receive_until(ws, "end")
    answer, messages = path_answer(frames)
    assert answer["id"] == "e1"
    assert [m["content"] for m in messages] == ["green fish", ""]
    question, reply = messages
    assert answer["path"] == [question["id"], reply["id"]]
    assert answer["conversation"]["active"] == reply["id"]
    assert question["parent"] is None
    assert question["siblings"] == [first_question["id"], question["id"]]
    assert reply["parent"] == question["id"] and reply["status"] == "streaming"
    start = next(f for f in frames if f["type"] == "start")
    assert start["message"] == reply["id"] and start["siblings"] == [reply["id"]]
    assert frames[-1]["status"] == "complete"
    assert "".join(f.get("content", "") for f in frames if f["type"] == "delta") == "green fish"
    # The model was asked the new question alone: the old branch is not history.
    assert fake_llm.requests[-1]["messages"] == [{"role": "user", "content": "green fish"}]
    old = await Message.objects.filter(conversation_id=conversation_id, superseded=True).acount()
    assert old == 4


@pytestmark_consumer
async def test_edit_of_a_later_question_keeps_the_turns_before_it(alice, fake_llm):
    async with chat_socket(alice) as ws:
        conversation_id, path = await conversation_with_two_turns(ws)
        await ws.send_json_to(
            {
                "type": "edit",
                "conversation": conversation_id,
                "message": path[2]["id"],
                "content": "one fish",
            }
        )
        frames = await receive_until(ws, "end")
        answer, messages = path_answer(frames)
        assert answer["path"][:2] == [path[0]["id"], path[1]["id"]]
        assert [m["content"] for m in messages] == ["red fish", "red fish", "one fish", ""]
        assert fake_llm.requests[-1]["messages"] == [
            {"role": "user", "content": "red fish"},
            {"role": "assistant", "content": "red fish"},
            {"role": "user", "content": "one fish"},
        ]
        assert [m["content"] for m in await path_of(ws, conversation_id)] == [
            "red fish",
            "red fish",
            "one fish",
            "one fish",
        ]


@pytestmark_consumer
async def test_edit_while_a_reply_streams_is_busy(alice, fake_llm):
    async with chat_socket(alice) as ws:
        await ws.send_json_to(
            {"type": "send", "conversation": None, "content": "hi", "model": SLOW}
        )
        frames = await receive_until(ws, "start")
        conversation_id = frames[0]["conversation"]["id"]
        question = next(f["message"] for f in frames if f["type"] == "message")
        await ws.send_json_to(
            {
                "type": "edit",
                "id": "e",
                "conversation": conversation_id,
                "message": question["id"],
                "content": "hello",
            }
        )
        frames = await receive_until(ws, "error")
        assert frames[-1]["code"] == "busy" and frames[-1]["id"] == "e"
        await ws.send_json_to({"type": "stop", "conversation": conversation_id})
        await receive_until(ws, "end")
    assert await Message.objects.filter(conversation_id=conversation_id).acount() == 2


@pytest.mark.parametrize(
    ("which", "code"),
    [("reply", "bad_request"), ("bob", "not_found"), ("other", "not_found"), ("junk", "not_found")],
)
@pytestmark_consumer
async def test_edit_of_what_is_not_a_question_of_this_conversation_is_refused(
    alice, bob, fake_llm, which, code
):
    bobs = await Conversation.objects.acreate(owner=bob, model="fake")
    bobs_question = await bobs.messages.acreate(role="user", content="bob's")
    async with chat_socket(alice) as ws:
        conversation_id, path = await conversation_with_two_turns(ws)
        other_id, other_path = await conversation_with_two_turns(ws)
        target = {
            "reply": path[1]["id"],
            "bob": str(bobs_question.pk),
            "other": other_path[0]["id"],
            "junk": "not-a-uuid",
        }[which]
        await ws.send_json_to(
            {
                "type": "edit",
                "id": "e",
                "conversation": conversation_id,
                "message": target,
                "content": "changed",
            }
        )
        error = (await receive_until(ws, "error"))[-1]
        assert error["code"] == code and error["id"] == "e"
        for frame_type in ("edit", "switch"):
            await ws.send_json_to(
                {
                    "type": frame_type,
                    "id": "b",
                    "conversation": str(bobs.pk),
                    "message": str(bobs_question.pk),
                    "content": "mine now",
                }
            )
            error = (await receive_until(ws, "error"))[-1]
            assert error["code"] == "not_found"
    assert await Message.objects.filter(conversation_id=conversation_id).acount() == 4
    assert await Message.objects.filter(conversation_id=other_id).acount() == 4
    await bobs_question.arefresh_from_db()
    assert bobs_question.content == "bob's"


@pytestmark_consumer
async def test_two_subscribers_see_the_same_switch(alice, fake_llm):
    async with chat_socket(alice) as tab1, chat_socket(alice) as tab2:
        conversation_id, path = await conversation_with_two_turns(tab1)
        await path_of(tab2, conversation_id)
        await tab1.send_json_to(
            {
                "type": "edit",
                "conversation": conversation_id,
                "message": path[0]["id"],
                "content": "green",
            }
        )
        await receive_until(tab1, "end")
        await receive_until(tab2, "end")
        await tab1.send_json_to(
            {"type": "switch", "id": "w", "conversation": conversation_id, "message": path[0]["id"]}
        )
        mine = await receive_path(tab1)
        theirs = await receive_path(tab2)
    for (answer, messages), request_id in ((mine, "w"), (theirs, None)):
        assert answer.get("id") == request_id
        assert answer["path"] == [m["id"] for m in path]
        assert answer["conversation"]["active"] == path[-1]["id"]
        assert [m["content"] for m in messages] == [m["content"] for m in path]
        assert messages[0]["siblings"][0] == path[0]["id"] and len(messages[0]["siblings"]) == 2


async def receive_path(ws) -> tuple[dict, list[dict]]:
    """The next path answer on the socket and the message frames of its path."""
    async with asyncio.timeout(10):
        while "path" not in (answer := await ws.receive_json_from(timeout=10)):
            assert answer["type"] != "error", answer
        messages = [(await ws.receive_json_from(timeout=10)) for _ in answer["path"]]
    assert all(m["type"] == "message" for m in messages), messages
    return answer, [m["message"] for m in messages]


@pytestmark_consumer
async def test_a_reply_switched_away_from_goes_on_unseen_and_comes_back_live(alice, fake_llm):
    async with chat_socket(alice) as ws:
        conversation_id, path = await conversation_with_two_turns(ws)
        await ws.send_json_to(
            {
                "type": "edit",
                "conversation": conversation_id,
                "message": path[2]["id"],
                "content": "slow one",
                "model": SLOW,
            }
        )
        frames = await receive_until(ws, "delta")
        _, messages = path_answer(frames)
        live = messages[-1]["id"]
        # Away to the old branch while it streams.
        await ws.send_json_to(
            {
                "type": "switch",
                "id": "away",
                "conversation": conversation_id,
                "message": path[2]["id"],
            }
        )
        frames = await receive_until(ws, "conversation")
        while frames[-1].get("id") != "away":
            frames += await receive_until(ws, "conversation")
        answer = frames[-1]
        assert answer["path"] == [m["id"] for m in path]
        await asyncio.sleep(0.5)
        await ws.send_json_to({"type": "ping", "id": "p"})
        seen = await receive_until(ws, "pong")
        assert not [f for f in seen if f.get("message") == live], seen
        # A send meanwhile is busy, naming the reply, which it cannot see.
        await ws.send_json_to(
            {"type": "send", "id": "s", "conversation": conversation_id, "content": "more"}
        )
        refused = (await receive_until(ws, "error"))[-1]
        assert (refused["code"], refused["id"], refused["reply"]) == ("busy", "s", live)
        # And back: its text so far, then the rest live.
        await ws.send_json_to(
            {"type": "switch", "id": "back", "conversation": conversation_id, "message": live}
        )
        frames = await receive_until(ws, "end", timeout=20)
    answer, messages = path_answer(frames)
    assert answer["path"][-1] == live
    snapshot = messages[-1]
    assert snapshot["id"] == live and snapshot["status"] == "streaming"
    deltas = [f for f in frames if f["type"] == "delta" and f["message"] == live]
    assert deltas and deltas[0]["seq"] == snapshot["seq"] + 1
    assert snapshot["content"] + "".join(d.get("content", "") for d in deltas) == expected_text(
        SLOW
    )
    assert frames[-1]["status"] == "complete"
    reply = await Message.objects.aget(pk=live)
    assert reply.content == expected_text(SLOW) and not reply.superseded


@pytestmark_consumer
async def test_a_subscribe_sends_the_active_path_only(alice, fake_llm):
    async with chat_socket(alice) as ws:
        conversation_id, path = await conversation_with_two_turns(ws)
        await ws.send_json_to({"type": "regenerate", "conversation": conversation_id})
        frames = await receive_until(ws, "end")
    superseded = frames[0]["message"]
    assert superseded["id"] == path[3]["id"] and superseded["superseded"] is True
    start = next(f for f in frames if f["type"] == "start")
    assert start["siblings"] == [path[3]["id"], start["message"]]
    assert start["parent"] == path[2]["id"]
    async with chat_socket(alice) as ws:
        now = await path_of(ws, conversation_id)
    assert [m["id"] for m in now] == [m["id"] for m in path[:3]] + [start["message"]]
    assert now[3]["siblings"] == [path[3]["id"], start["message"]]
    await finish_replies()


@pytest.mark.django_db
def test_the_page_is_rendered_with_the_active_path(client, alice, chat):
    first = answered(chat, "one", "1")
    answered(chat, "ONE", "I", editing=first)
    client.force_login(alice)

    page = client.get(chat.get_absolute_url()).content.decode()

    assert '"content": "ONE"' in page and '"content": "one"' not in page
