"""Export and import (issue 12, items 8 and 10): one schema for a
conversation's JSON, all of a user's, the admin's JSON Lines and the import;
Markdown for reading. Nobody exports or imports into another's account, and
a file with anything wrong in it imports nothing."""

import copy
import json
import subprocess
import sys
from datetime import timedelta

import pytest
from django.contrib.admin.sites import site as admin_site
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from conversations import exports
from conversations.exports import SCHEMA, ImportRefused, import_records
from conversations.models import Conversation, Feedback, Message
from tests.live import ROOT

pytestmark = pytest.mark.django_db


@pytest.fixture
def full_chat(alice):
    """A conversation with everything a record holds: a system prompt,
    options, a rated reply, a failed one and a superseded one."""
    conversation = Conversation.objects.create(
        owner=alice,
        title="Binary search",
        title_by_user=True,
        model="fake",
        system_prompt="Be brief.",
        options={"temperature": 0.5},
    )
    now = timezone.now()
    conversation.messages.create(role="user", content="How does it work?", created=now)
    old = conversation.messages.create(
        role="assistant",
        content="An old answer",
        superseded=True,
        created=now + timedelta(seconds=0.5),
    )
    reply = conversation.messages.create(
        role="assistant",
        content="Halve the list **each** step.",
        reasoning="Think about halves.",
        model="fake",
        prompt_tokens=12,
        completion_tokens=7,
        ttft_ms=40,
        duration_ms=300,
        created=now + timedelta(seconds=1),
    )
    Feedback.objects.create(message=reply, rating=1, comment="clear")
    conversation.messages.create(
        role="user", content="And then?", created=now + timedelta(seconds=2)
    )
    conversation.messages.create(
        role="assistant",
        status="error",
        error_code="upstream_unavailable",
        error="The model server is not reachable.",
        error_detail="connect to 10.0.0.5:11434 refused",
        created=now + timedelta(seconds=3),
    )
    assert old.superseded
    return conversation


def record_of(conversation: Conversation) -> dict:
    [conversation] = exports.exportable(Conversation.objects.filter(pk=conversation.pk))
    return exports.conversation_record(conversation)


def export_file(*conversations: Conversation) -> dict:
    return {"schema": SCHEMA, "conversations": [record_of(c) for c in conversations]}


def without_ids(record: dict) -> dict:
    """record with its own ids and owner taken out, and the ids it points to
    (parents, the active leaf) as positions in its list of messages: what an
    import must bring back as it was."""
    record = copy.deepcopy(record)
    position = {m["id"]: i for i, m in enumerate(record["messages"])}
    record.pop("id")
    record.pop("owner")
    record["active"] = position.get(record["active"])
    for message in record["messages"]:
        message.pop("id")
        message["parent"] = position.get(message["parent"])
    return record


def answer(reply: Message, text: str) -> None:
    """Finish a reply start_turn began, as its writer would."""
    reply.content, reply.status = text, Message.Status.COMPLETE
    reply.save(update_fields=["content", "status"])


@pytest.fixture
def branched_chat(alice):
    """A conversation as the page makes one (issue 13): a reply regenerated,
    the question then edited and followed up, and the user switched back to
    the first question's newest reply, so that the active path is neither
    the newest branch nor the chain the messages were written in."""
    conversation = Conversation.objects.create(owner=alice, title="Branches", model="fake")
    question, first, _ = conversation.start_turn("Two plus two?", "fake", {})
    answer(first, "Four.")
    _, second, _ = conversation.start_turn(None, "fake", {})
    answer(second, "It is 4.")
    _, third, _ = conversation.start_turn("2 + 2 = ?", "fake", {}, editing=question)
    answer(third, "4")
    _, fourth, _ = conversation.start_turn("And times three?", "fake", {})
    answer(fourth, "12")
    conversation.switch(question.pk)
    conversation.refresh_from_db()
    assert conversation.active_id == second.pk
    return conversation


def tree_of(conversation: Conversation) -> tuple[dict, list[str]]:
    """Each message's text with its parent's text (every text in these tests
    is unique), and the texts of the active path, root first."""
    messages = list(conversation.messages.order_by("created", "pk"))
    text = {m.pk: m.content for m in messages}
    parents = {m.content: text.get(m.parent_id) for m in messages}
    return parents, [m.content for m in conversation.visible_messages()]


# the record


def test_a_record_holds_the_conversation_and_every_message_with_its_feedback(full_chat):
    record = record_of(full_chat)

    assert record["title"] == "Binary search"
    assert record["title_by_user"] is True
    assert record["system"] == "Be brief."
    assert record["options"] == {"temperature": 0.5}
    assert record["owner"] == "alice"
    assert [m["role"] for m in record["messages"]] == [
        "user",
        "assistant",
        "assistant",
        "user",
        "assistant",
    ]
    old, reply = record["messages"][1:3]
    assert old["superseded"] is True
    assert reply["feedback"]["rating"] == 1 and reply["feedback"]["comment"] == "clear"
    assert reply["usage"] == {"prompt_tokens": 12, "completion_tokens": 7}
    assert reply["timing"] == {"ttft_ms": 40, "duration_ms": 300}
    assert reply["reasoning"] == "Think about halves."
    assert record["messages"][0]["feedback"] is None
    failed = record["messages"][4]
    assert failed["error"] == {
        "code": "upstream_unavailable",
        "message": "The model server is not reachable.",
    }


def test_a_record_never_holds_the_staff_only_error_detail(full_chat):
    text = json.dumps(record_of(full_chat))

    assert "10.0.0.5" not in text
    assert "error_detail" not in text


def test_exporting_many_conversations_costs_a_fixed_number_of_queries(alice, full_chat):
    for i in range(5):
        chat = Conversation.objects.create(owner=alice, title=f"chat {i}")
        chat.messages.create(role="user", content="hi")
        reply = chat.messages.create(role="assistant", content="hello")
        Feedback.objects.create(message=reply, rating=-1)

    with CaptureQueriesContext(connection) as queries:
        records = [
            exports.conversation_record(c)
            for c in exports.exportable(Conversation.objects.for_user(alice))
        ]

    assert len(records) == 6
    assert len(queries) == 2  # conversations with owners; messages with feedback


# what a user downloads


@pytest.fixture
def alice_client(client, alice):
    client.force_login(alice)
    return client


def test_one_conversation_downloads_as_json_in_the_schema(alice_client, full_chat):
    response = alice_client.get(reverse("conversations:export-json", args=[full_chat.pk]))

    assert response.status_code == 200
    assert response["Content-Type"].startswith("application/json")
    assert response["Content-Disposition"].startswith('attachment; filename="binary-search-')
    data = json.loads(response.content)
    assert data["schema"] == SCHEMA
    assert [c["id"] for c in data["conversations"]] == [str(full_chat.pk)]


def test_one_conversation_downloads_as_markdown_as_it_reads(alice_client, full_chat):
    response = alice_client.get(reverse("conversations:export-markdown", args=[full_chat.pk]))

    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/markdown")
    text = response.content.decode()
    assert text.startswith("# Binary search\n")
    assert "## You\n\nHow does it work?" in text
    assert "## Assistant (fake)\n\nHalve the list **each** step." in text
    assert "> Be brief." in text
    assert "An old answer" not in text  # superseded: not on screen either
    assert "The reply failed: The model server is not reachable." in text


@pytest.mark.parametrize("name", ["conversations:export-json", "conversations:export-markdown"])
def test_another_users_conversation_does_not_export(client, bob, full_chat, name):
    client.force_login(bob)

    response = client.get(reverse(name, args=[full_chat.pk]))

    assert response.status_code == 404


def test_exports_require_login(client, full_chat):
    for url in [
        reverse("conversations:export-json", args=[full_chat.pk]),
        reverse("conversations:export-markdown", args=[full_chat.pk]),
        reverse("conversations:export-all"),
    ]:
        assert client.get(url).status_code == 302, url


@pytest.mark.django_db(transaction=True)
async def test_export_all_streams_every_conversation_of_the_user_and_nobody_elses(
    async_client, alice, bob
):
    for owner, title in [(alice, "first"), (alice, "second"), (bob, "bob's")]:
        conversation = await Conversation.objects.acreate(owner=owner, title=title)
        await conversation.messages.acreate(role="user", content=f"{title} text")
    await async_client.aforce_login(alice)

    response = await async_client.get(reverse("conversations:export-all"))

    assert response.status_code == 200
    assert response.streaming
    assert "attachment" in response["Content-Disposition"]
    body = "".join([piece.decode() async for piece in response.streaming_content])
    data = json.loads(body)
    assert data["schema"] == SCHEMA
    assert sorted(c["title"] for c in data["conversations"]) == ["first", "second"]
    assert all(c["owner"] == "alice" for c in data["conversations"])
    assert "bob's text" not in body


@pytest.mark.django_db(transaction=True)
async def test_export_all_of_a_user_with_nothing_is_an_empty_list(async_client, alice):
    await async_client.aforce_login(alice)

    response = await async_client.get(reverse("conversations:export-all"))

    body = "".join([piece.decode() async for piece in response.streaming_content])
    assert json.loads(body)["conversations"] == []


# the admin's JSON Lines


def test_the_admin_action_downloads_one_record_a_line(rf, admin_user, full_chat, bob):
    bobs = Conversation.objects.create(owner=bob, title="Bob's")
    bobs.messages.create(role="user", content="hello")
    request = rf.post("/admin/conversations/conversation/")
    request.user = admin_user

    response = exports.export_jsonl(
        admin_site._registry[Conversation], request, Conversation.objects.all()
    )

    assert response["Content-Type"].startswith("application/x-ndjson")
    assert response["Content-Disposition"].startswith('attachment; filename="conversations-')
    lines = response.content.decode().splitlines()
    records = [json.loads(line) for line in lines]
    assert {r["title"]: r["owner"] for r in records} == {"Binary search": "alice", "Bob's": "bob"}
    assert all(r["schema"] == SCHEMA for r in records)
    alices = next(r for r in records if r["owner"] == "alice")
    assert alices == {"schema": SCHEMA, **record_of(full_chat)}


def test_the_admin_action_says_what_it_does():
    assert exports.export_jsonl.short_description == "Download as JSON Lines"


# import


def test_an_export_imports_back_as_new_conversations_of_the_importer(full_chat, bob):
    data = export_file(full_chat)

    [imported] = import_records(bob, data)

    assert imported.owner == bob and imported.pk != full_chat.pk
    # Everything but the ids and the owner comes back as it was.
    assert without_ids(record_of(imported)) == without_ids(record_of(full_chat))
    assert Conversation.objects.for_user(bob).count() == 1
    assert Conversation.objects.for_user(full_chat.owner).count() == 1


def test_a_record_holds_the_tree_parents_and_the_active_leaf(branched_chat):
    record = record_of(branched_chat)

    ids = {m["content"]: m["id"] for m in record["messages"]}
    parents = {m["content"]: m["parent"] for m in record["messages"]}
    assert parents == {
        "Two plus two?": None,
        "Four.": ids["Two plus two?"],
        "It is 4.": ids["Two plus two?"],
        "2 + 2 = ?": None,
        "4": ids["2 + 2 = ?"],
        "And times three?": ids["4"],
        "12": ids["And times three?"],
    }
    assert record["active"] == ids["It is 4."]
    on_path = [m["content"] for m in record["messages"] if not m["superseded"]]
    assert on_path == ["Two plus two?", "It is 4."]


def test_a_branched_conversation_imports_with_its_tree_and_active_path(branched_chat, bob):
    [imported] = import_records(bob, export_file(branched_chat))

    assert tree_of(imported) == tree_of(branched_chat)
    assert tree_of(imported)[1] == ["Two plus two?", "It is 4."]
    assert without_ids(record_of(imported)) == without_ids(record_of(branched_chat))
    # New ids throughout: the imported tree points only at its own messages.
    new_ids = set(imported.messages.values_list("pk", flat=True))
    assert imported.active_id in new_ids
    assert set(imported.messages.exclude(parent=None).values_list("parent", flat=True)) <= new_ids
    assert not new_ids & set(branched_chat.messages.values_list("pk", flat=True))
    # And it goes on like any conversation: versions, history, a switch.
    reply = imported.messages.get(content="It is 4.")
    assert [imported.messages.get(pk=m).content for m in reply.siblings()] == ["Four.", "It is 4."]
    assert imported.history() == [
        {"role": "user", "content": "Two plus two?"},
        {"role": "assistant", "content": "It is 4."},
    ]
    imported.switch(imported.messages.get(content="2 + 2 = ?").pk)
    assert tree_of(imported)[1] == ["2 + 2 = ?", "4", "And times three?", "12"]


def test_the_markdown_export_shows_the_active_path_only(branched_chat):
    text = exports.as_markdown(branched_chat)

    assert "Two plus two?" in text and "It is 4." in text
    for elsewhere in ("Four.", "2 + 2 = ?", "And times three?", "12"):
        assert f"\n{elsewhere}\n" not in text


def old_style(record: dict) -> dict:
    """record as exported before conversations were trees: no parents, no
    active leaf."""
    record = copy.deepcopy(record)
    record.pop("active")
    for message in record["messages"]:
        message.pop("parent")
    return record


def test_an_export_from_before_the_tree_imports_as_a_chain_with_replaced_replies_as_versions(
    full_chat, bob
):
    data = export_file(full_chat)
    data["conversations"] = [old_style(r) for r in data["conversations"]]

    [imported] = import_records(bob, data)

    parents, path = tree_of(imported)
    assert parents == {
        "How does it work?": None,
        "An old answer": "How does it work?",
        "Halve the list **each** step.": "How does it work?",
        "And then?": "Halve the list **each** step.",
        "": "And then?",  # the failed reply
    }
    assert path == ["How does it work?", "Halve the list **each** step.", "And then?", ""]
    assert imported.active == imported.messages.get(role="assistant", status="error")
    reply = imported.messages.get(content="Halve the list **each** step.")
    old = imported.messages.get(content="An old answer")
    assert reply.siblings() == [old.pk, reply.pk]
    assert old.superseded and not reply.superseded
    # The same tree the site's own export of the original has.
    assert without_ids(record_of(imported)) == without_ids(record_of(full_chat))


def test_superseded_is_made_to_agree_with_the_active_path(branched_chat, bob):
    data = export_file(branched_chat)
    for message in data["conversations"][0]["messages"]:
        message["superseded"] = not message["superseded"]  # all wrong

    [imported] = import_records(bob, data)

    assert tree_of(imported)[1] == ["Two plus two?", "It is 4."]
    assert imported.messages.filter(superseded=False).count() == 2


def test_a_parent_in_another_conversation_of_the_file_is_refused(branched_chat, full_chat, bob):
    data = export_file(full_chat, branched_chat)
    elsewhere = data["conversations"][0]["messages"][0]["id"]
    data["conversations"][1]["messages"][1]["parent"] = elsewhere

    with pytest.raises(ImportRefused) as refused:
        import_records(bob, data)

    assert str(refused.value) == (
        "conversations[1].messages[1].parent: not the id of an earlier message of its conversation."
    )
    assert not Conversation.objects.for_user(bob).exists()
    assert not Message.objects.filter(conversation__owner=bob).exists()


def test_a_reply_exported_mid_stream_imports_as_interrupted(alice, bob):
    conversation = Conversation.objects.create(owner=alice, title="live")
    conversation.messages.create(role="user", content="go")
    conversation.messages.create(role="assistant", status="streaming", content="half")

    [imported] = import_records(bob, export_file(conversation))

    reply = imported.messages.get(role="assistant")
    assert reply.status == Message.Status.INTERRUPTED and reply.error_code == "interrupted"
    assert reply.content == "half"


def test_a_minimal_file_imports_with_defaults(bob):
    data = {
        "schema": SCHEMA,
        "conversations": [{"title": "By hand", "messages": [{"role": "user", "content": "hi"}]}],
    }

    [imported] = import_records(bob, data)

    assert imported.title == "By hand"
    assert [(m.role, m.content, m.status) for m in imported.messages.all()] == [
        ("user", "hi", "complete")
    ]


def test_options_a_model_does_not_take_are_dropped_on_import(bob):
    data = {
        "schema": SCHEMA,
        "conversations": [{"options": {"temperature": 1, "api_base": "http://evil.example"}}],
    }

    [imported] = import_records(bob, data)

    assert imported.options == {"temperature": 1.0}


def mangled(full_chat, change) -> dict:
    data = copy.deepcopy(export_file(full_chat))
    change(data)
    return data


BAD_FILES = [
    pytest.param(lambda d: d.pop("schema"), "no schema field", id="no-schema"),
    pytest.param(lambda d: d.update(schema="other.app/1"), "not a chatsite export", id="foreign"),
    pytest.param(
        lambda d: d.update(schema="chatsite.conversations/2"), "cannot read", id="newer-version"
    ),
    pytest.param(lambda d: d.update(conversations={}), "expected a list", id="not-a-list"),
    pytest.param(
        lambda d: d["conversations"].append("text"), "conversations[1]: expected", id="not-object"
    ),
    pytest.param(
        lambda d: d["conversations"][0]["messages"][0].update(role="wizard"),
        "conversations[0].messages[0].role: must be one of",
        id="bad-role",
    ),
    pytest.param(
        lambda d: d["conversations"][0]["messages"][0].pop("role"),
        "messages[0].role",
        id="no-role",
    ),
    pytest.param(
        lambda d: d["conversations"][0].update(title="x" * 201), "longer than", id="long-title"
    ),
    pytest.param(
        lambda d: d["conversations"][0]["messages"][0].update(content=5),
        "content: expected a string",
        id="number-for-text",
    ),
    pytest.param(
        lambda d: d["conversations"][0]["messages"][0].update(created="yesterday"),
        "ISO 8601",
        id="bad-date",
    ),
    pytest.param(
        lambda d: d["conversations"][0]["messages"][2]["feedback"].update(rating=5),
        "rating: must be 1",
        id="bad-rating",
    ),
    pytest.param(
        lambda d: d["conversations"][0]["messages"][2]["feedback"].update(rating=True),
        "rating",
        id="bool-rating",
    ),
    pytest.param(
        lambda d: d["conversations"][0]["messages"][2]["usage"].update(prompt_tokens=-1),
        "must not be negative",
        id="negative-count",
    ),
    pytest.param(
        lambda d: d["conversations"][0]["messages"][0].update(content="a\x00b"),
        "NUL",
        id="nul",
    ),
    pytest.param(
        lambda d: d["conversations"][0].update(options={"temperature": 50}),
        "options: options.temperature must be between",
        id="option-out-of-range",
    ),
    pytest.param(
        lambda d: d["conversations"][0]["messages"][4]["error"].update(code="made_up"),
        "error.code",
        id="unknown-error-code",
    ),
    pytest.param(
        lambda d: d["conversations"][0]["messages"][1].update(
            parent=d["conversations"][0]["messages"][3]["id"]
        ),
        "conversations[0].messages[1].parent: not the id of an earlier message",
        id="parent-later",
    ),
    pytest.param(
        lambda d: d["conversations"][0]["messages"][1].update(
            parent="6fa459ea-ee8a-4ca4-894e-db77e160355e"
        ),
        "conversations[0].messages[1].parent: not the id of an earlier message",
        id="parent-unknown",
    ),
    pytest.param(
        lambda d: d["conversations"][0]["messages"][0].update(
            parent=d["conversations"][0]["messages"][0]["id"]
        ),
        "conversations[0].messages[0].parent: not the id of an earlier message",
        id="parent-itself",
    ),
    pytest.param(
        lambda d: d["conversations"][0]["messages"][1].update(parent=1),
        "conversations[0].messages[1].parent: expected a string",
        id="parent-not-a-string",
    ),
    pytest.param(
        lambda d: d["conversations"][0]["messages"][2].update(
            id=d["conversations"][0]["messages"][1]["id"]
        ),
        "conversations[0].messages[2].id: the id of an earlier message too",
        id="duplicate-id",
    ),
    pytest.param(
        lambda d: d["conversations"][0].update(active="6fa459ea-ee8a-4ca4-894e-db77e160355e"),
        "conversations[0].active: not the id of a message of this conversation",
        id="active-unknown",
    ),
]


@pytest.mark.parametrize(("change", "says"), BAD_FILES)
def test_a_malformed_or_foreign_file_imports_nothing_and_says_why(full_chat, bob, change, says):
    data = mangled(full_chat, change)

    with pytest.raises(ImportRefused, match=says.replace("[", r"\[").replace("]", r"\]")):
        import_records(bob, data)

    assert not Conversation.objects.for_user(bob).exists()
    assert Message.objects.filter(conversation__owner=bob).count() == 0


def test_a_failure_while_writing_leaves_nothing_behind(full_chat, bob, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(Feedback.objects, "bulk_create", broken)

    with pytest.raises(RuntimeError):
        import_records(bob, export_file(full_chat, full_chat))

    assert not Conversation.objects.for_user(bob).exists()
    assert not Message.objects.filter(conversation__owner=bob).exists()


def upload(data, name: str = "export.json") -> SimpleUploadedFile:
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    return SimpleUploadedFile(name, raw, content_type="application/json")


def test_the_account_page_imports_a_file_into_the_users_own_account(client, bob, full_chat):
    client.force_login(bob)

    response = client.post(
        reverse("conversations:import"), {"file": upload(export_file(full_chat))}, follow=True
    )

    assert response.status_code == 200
    assert "Imported 1 conversation." in response.content.decode()
    assert Conversation.objects.for_user(bob).get().title == "Binary search"
    # Alice's own conversation is untouched, and still only hers.
    assert Conversation.objects.for_user(full_chat.owner).get() == full_chat


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        pytest.param(b"\x89PNG\r\n not json", "not JSON", id="binary"),
        pytest.param(b"[1, 2", "not JSON", id="truncated"),
        pytest.param(b'{"schema": "other/1"}', "not a chatsite export", id="foreign"),
    ],
)
def test_the_account_page_refuses_a_bad_file_and_says_why(client, bob, raw, says):
    client.force_login(bob)

    response = client.post(reverse("conversations:import"), {"file": upload(raw)})

    assert response.status_code == 400
    assert says in response.content.decode()
    assert not Conversation.objects.for_user(bob).exists()


def test_the_account_page_refuses_a_file_over_the_size_limit(client, bob, full_chat, settings):
    client.force_login(bob)
    raw = json.dumps(export_file(full_chat)).encode()
    settings.CHAT_IMPORT_MAX_BYTES = len(raw) - 1

    response = client.post(reverse("conversations:import"), {"file": upload(raw)})

    assert response.status_code == 400
    assert f"the most this site imports is {len(raw) - 1}" in response.content.decode()
    assert not Conversation.objects.for_user(bob).exists()


def test_the_account_page_asks_for_a_file(client, bob):
    client.force_login(bob)

    response = client.post(reverse("conversations:import"), {})

    assert response.status_code == 400
    assert "Choose a file to import." in response.content.decode()


def test_import_is_post_only_and_requires_login(client, bob):
    assert client.post(reverse("conversations:import")).status_code == 302
    client.force_login(bob)
    assert client.get(reverse("conversations:import")).status_code == 405


@pytest.mark.parametrize("value", ["10MB", "0", "-5", "1e6", "²"])
def test_a_bad_import_limit_stops_the_site_naming_the_variable(value):
    env = {"PATH": "/usr/bin:/bin", "CHAT_IMPORT_MAX_BYTES": value}
    result = subprocess.run(
        [sys.executable, "-c", "import chatsite.settings"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode != 0
    assert "CHAT_IMPORT_MAX_BYTES" in result.stderr and "ImproperlyConfigured" in result.stderr
