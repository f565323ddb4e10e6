"""Conversations as files (issue 12, items 8 and 10): the one schema,
"chatsite.conversations/1", documented field by field in docs/export.md.

A user exports one conversation (JSON or Markdown) or all of them (JSON),
and imports such a file back as new conversations of their own; staff
download conversations from the admin as JSON Lines, one record a line.
Every one of them is built from conversation_record()."""

import json
import uuid
from collections.abc import AsyncIterator, Iterable
from datetime import UTC, datetime
from typing import Any

from django.conf import settings
from django.contrib import admin
from django.db import transaction
from django.db.models import Prefetch, QuerySet
from django.http import HttpRequest, HttpResponse
from django.utils import timezone
from django.utils.dateparse import parse_datetime
from django.utils.http import content_disposition_header
from django.utils.text import slugify

from . import protocol
from .forms import max_length
from .models import Conversation, Feedback, Message
from .protocol import INTERRUPTED_TEXT, MAX_MODEL, ErrorCode, FrameError
from .tree import Node, Tree

SCHEMA = "chatsite.conversations/1"
SCHEMA_FAMILY = SCHEMA.rsplit("/", 1)[0] + "/"

# Conversations read per query when exporting many: two queries per batch
# (conversations with owners, then their messages with feedback).
BATCH = 100


def exportable(conversations: QuerySet[Conversation]) -> QuerySet[Conversation]:
    """conversations with everything a record holds, in two queries."""
    messages = Message.objects.select_related("feedback").order_by("created", "pk")
    return (
        conversations.select_related("owner")
        .prefetch_related(Prefetch("messages", queryset=messages))
        .order_by("created", "pk")
    )


def _time(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def message_record(message: Message) -> dict[str, Any]:
    # getattr: the reverse one-to-one raises (an AttributeError) when a
    # reply has no feedback.
    feedback: Feedback | None = getattr(message, "feedback", None)
    return {
        "id": str(message.pk),
        # The tree (issue 13): the message it follows, in the same record.
        "parent": str(message.parent_id) if message.parent_id else None,
        "role": message.role,
        "content": message.content,
        "reasoning": message.reasoning,
        "status": message.status,
        "model": message.model,
        "options": message.options,
        "created": _time(message.created),
        "updated": _time(message.updated),
        "superseded": message.superseded,
        # error_detail is for staff only, never in a user's hands.
        "error": {"code": message.error_code, "message": message.error}
        if message.error_code
        else None,
        "finish_reason": message.finish_reason,
        "usage": message.usage(),
        "timing": {"ttft_ms": message.ttft_ms, "duration_ms": message.duration_ms},
        "feedback": {
            "rating": feedback.rating,
            "comment": feedback.comment,
            "created": _time(feedback.created),
            "updated": _time(feedback.updated),
        }
        if feedback is not None
        else None,
    }


def conversation_record(conversation: Conversation) -> dict[str, Any]:
    """One conversation with all its messages (every branch, those off the
    active path marked superseded), oldest first. Read through exportable() to make it cost
    no query of its own."""
    return {
        "id": str(conversation.pk),
        "owner": conversation.owner.get_username(),
        "title": conversation.title,
        "title_by_user": conversation.title_by_user,
        "model": conversation.model,
        "system": conversation.system_prompt,
        "options": conversation.options,
        "created": _time(conversation.created),
        "updated": _time(conversation.updated),
        "active": str(conversation.active_id) if conversation.active_id else None,
        "messages": [message_record(m) for m in conversation.messages.all()],
    }


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _envelope(records: list[dict[str, Any]]) -> dict[str, Any]:
    return {"schema": SCHEMA, "exported": _time(timezone.now()), "conversations": records}


def as_json(conversation: Conversation) -> str:
    """One conversation as an export file (the same shape as export_all's)."""
    return _dumps(_envelope([conversation_record(conversation)]))


async def export_all(user) -> AsyncIterator[str]:
    """Every conversation of the user's as one export file, in pieces: a
    user with thousands of conversations never sits in memory at once."""
    head = _dumps(_envelope([]))
    # The envelope with its (empty, last) list opened up.
    opening, closing = head[: -len("[]}")] + "[", "]}"
    yield opening
    separator = ""
    conversations = exportable(Conversation.objects.for_user(user))
    async for conversation in conversations.aiterator(chunk_size=BATCH):
        yield separator + _dumps(conversation_record(conversation))
        separator = ", "
    yield closing


def as_markdown(conversation: Conversation) -> str:
    """The conversation as it reads on screen: the visible messages, each
    under a heading saying who wrote it. Reasoning is left out; the JSON
    export has everything."""
    lines = [f"# {conversation}", ""]
    lines.append(f"- Exported: {_time(timezone.now())}")
    lines.append(f"- Created: {_time(conversation.created)}")
    if conversation.model:
        lines.append(f"- Model: {conversation.model}")
    if conversation.system_prompt:
        lines += ["", "System prompt:", ""]
        lines += [f"> {line}" if line else ">" for line in conversation.system_prompt.splitlines()]
    for message in conversation.messages.all():
        if message.superseded or message.role == Message.Role.SYSTEM:
            continue
        who = "You" if message.role == Message.Role.USER else "Assistant"
        if message.role == Message.Role.ASSISTANT and message.model:
            who += f" ({message.model})"
        lines += ["", "---", "", f"## {who}", "", message.content.rstrip()]
        if message.error_code:
            lines += ["", f"*The reply failed: {message.error or message.error_code}*"]
    return "\n".join(lines).rstrip() + "\n"


def download_name(conversation: Conversation, extension: str) -> str:
    return f"{slugify(str(conversation)) or 'conversation'}-{str(conversation.pk)[:8]}.{extension}"


def attachment(filename: str) -> dict[str, str]:
    return {"Content-Disposition": content_disposition_header(True, filename) or ""}


@admin.action(description="Download as JSON Lines")
def export_jsonl(modeladmin, request: HttpRequest, queryset: QuerySet[Conversation]):
    """The selected conversations, one record a line, each with the schema
    it follows. Built in memory (two queries a hundred conversations): an
    admin selection is a page of the change list."""
    lines = (
        _dumps({"schema": SCHEMA, **conversation_record(c)}) + "\n"
        for c in exportable(queryset).iterator(chunk_size=BATCH)
    )
    stamp = timezone.now().strftime("%Y%m%d-%H%M%S")
    return HttpResponse(
        "".join(lines),
        content_type="application/x-ndjson; charset=utf-8",
        headers=attachment(f"conversations-{stamp}.jsonl"),
    )


# Import.


class ImportRefused(Exception):
    """A file import_records() will not take; nothing was created. The
    message says what is wrong and where, for the user to read."""


def _refuse(path: str, problem: str) -> ImportRefused:
    return ImportRefused(f"{path}: {problem}" if path else problem)


def parse_export(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise ImportRefused("This file is not JSON: it cannot be a chatsite export.") from None


def _get(record: dict, name: str, kind: type, path: str, default: Any) -> Any:
    """record[name], which must be of kind (or null, where the default is)."""
    value = record.get(name, default)
    if value is None and default is None:
        return None
    # bool is an int: a count or a rating must not be true or false.
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise _refuse(f"{path}.{name}", f"expected {KIND_NAMES.get(kind, kind.__name__)}.")
    return value


KIND_NAMES = {
    str: "a string",
    bool: "true or false",
    int: "a whole number",
    dict: "an object",
    list: "a list",
}


def _text(record: dict, name: str, path: str, limit: int | None = None) -> str:
    value = _get(record, name, str, path, "")
    if limit is not None and len(value) > limit:
        raise _refuse(f"{path}.{name}", f"longer than {limit} characters.")
    if "\x00" in value:  # Postgres cannot keep it
        raise _refuse(f"{path}.{name}", "holds a NUL character.")
    return value


def _when(record: dict, name: str, path: str, default: datetime) -> datetime:
    value = _get(record, name, str, path, None)
    if value is None:
        return default
    parsed = parse_datetime(value)
    if parsed is None:
        raise _refuse(f"{path}.{name}", "not an ISO 8601 date and time.")
    return parsed if timezone.is_aware(parsed) else parsed.replace(tzinfo=UTC)


def _count(record: dict, name: str, path: str) -> int | None:
    value = _get(record, name, int, path, None)
    if value is not None and value < 0:
        raise _refuse(f"{path}.{name}", "must not be negative.")
    return value


def _choice(record: dict, name: str, path: str, choices: Iterable[str], default: str) -> str:
    value = _text(record, name, path)
    value = value or default
    allowed = list(choices)
    if value not in allowed:
        raise _refuse(f"{path}.{name}", f"must be one of {', '.join(allowed)}.")
    return value


def _options(record: dict, path: str) -> dict[str, Any]:
    """A conversation's options go to the model with its next reply: held
    to the ranges a send's options are (protocol.py), unknown ones dropped."""
    try:
        return protocol._options(_get(record, "options", dict, path, {})) or {}
    except FrameError as exc:
        raise _refuse(f"{path}.options", exc.message) from None


def _conversation(
    user, record: Any, path: str, now: datetime
) -> tuple[Conversation, list[tuple[Message, Feedback | None]], Message | None]:
    """The conversation of a record, its messages with their feedback, and
    its active leaf (one of them, or None)."""
    if not isinstance(record, dict):
        raise _refuse(path, "expected an object.")
    created = _when(record, "created", path, now)
    conversation = Conversation(
        id=uuid.uuid4(),
        owner=user,
        title=_text(record, "title", path, max_length(Conversation, "title")),
        title_by_user=_get(record, "title_by_user", bool, path, False),
        model=_text(record, "model", path, MAX_MODEL),
        system_prompt=_text(record, "system", path, settings.CHAT_MAX_CONTENT),
        options=_options(record, path),
        created=created,
        updated=_when(record, "updated", path, created),
    )
    records = _get(record, "messages", list, path, [])
    rows = [_message(conversation, m, f"{path}.messages[{i}]") for i, m in enumerate(records)]
    leaf = _rebuild_tree(record, records, [message for message, _ in rows], path)
    return conversation, rows, leaf


def _rebuild_tree(
    record: dict, records: list[dict], messages: list[Message], path: str
) -> Message | None:
    """Give the new messages their parents, and find the active leaf,
    through the file's ids (which the new rows do not keep), and make
    `superseded` say what it means now: off the active path. A file from
    before conversations were trees has no `parent`s: each message follows
    the last one not superseded before it, and that last one is the active
    leaf (the rule of migration 0008 and of Message.save())."""
    known: dict[str, Message] = {}  # the file's id -> the new row, of earlier messages
    tip: Message | None = None  # the last message not superseded so far
    for i, (given, message) in enumerate(zip(records, messages, strict=True)):
        where = f"{path}.messages[{i}]"
        if "parent" in given:
            parent_id = _get(given, "parent", str, where, None)
            parent = None if parent_id is None else known.get(parent_id)
            if parent_id is not None and parent is None:
                raise _refuse(
                    f"{where}.parent", "not the id of an earlier message of its conversation."
                )
        else:
            parent = tip
        # bulk_create does not run Message.save(), which would place it.
        message.parent_id = parent.pk if parent is not None else None
        own_id = _get(given, "id", str, where, None)
        if own_id is not None:
            if own_id in known:
                raise _refuse(f"{where}.id", "the id of an earlier message too.")
            known[own_id] = message
        if not message.superseded:
            tip = message
    active_id = _get(record, "active", str, path, None)
    if active_id is not None and active_id not in known:
        raise _refuse(f"{path}.active", "not the id of a message of this conversation.")
    leaf = known[active_id] if active_id is not None else tip
    tree = Tree(Node(m.pk, m.parent_id, m.role) for m in messages)
    on_path = set(tree.path(leaf.pk if leaf is not None else None))
    for message in messages:
        message.superseded = message.pk not in on_path
    return leaf


def _message(conversation: Conversation, record: Any, path: str) -> tuple[Message, Feedback | None]:
    if not isinstance(record, dict):
        raise _refuse(path, "expected an object.")
    status = _choice(record, "status", path, Message.Status.values, Message.Status.COMPLETE)
    error = _get(record, "error", dict, path, None) or {}
    error_code = _choice(error, "code", f"{path}.error", ["", *ErrorCode.values], "")
    error_text = _text(error, "message", f"{path}.error", settings.CHAT_MAX_CONTENT)
    if status in Message.LIVE_STATUSES:
        # Exported mid-reply: no writer will ever finish it here.
        status, error_code = Message.Status.INTERRUPTED, ErrorCode.INTERRUPTED
        error_text = error_text or INTERRUPTED_TEXT
    usage = _get(record, "usage", dict, path, None) or {}
    timing = _get(record, "timing", dict, path, None) or {}
    created = _when(record, "created", path, conversation.created)
    longest = max(settings.CHAT_MAX_CONTENT, settings.CHAT_MAX_REPLY_CHARS)
    message = Message(
        id=uuid.uuid4(),
        conversation=conversation,
        role=_choice(record, "role", path, Message.Role.values, ""),
        content=_text(record, "content", path, longest),
        reasoning=_text(record, "reasoning", path, longest),
        status=status,
        error_code=error_code,
        error=error_text,
        finish_reason=_text(record, "finish_reason", path, max_length(Message, "finish_reason")),
        model=_text(record, "model", path, MAX_MODEL),
        options=_get(record, "options", dict, path, {}),
        prompt_tokens=_count(usage, "prompt_tokens", f"{path}.usage"),
        completion_tokens=_count(usage, "completion_tokens", f"{path}.usage"),
        ttft_ms=_count(timing, "ttft_ms", f"{path}.timing"),
        duration_ms=_count(timing, "duration_ms", f"{path}.timing"),
        superseded=_get(record, "superseded", bool, path, False),
        created=created,
        updated=_when(record, "updated", path, created),
    )
    return message, _feedback(message, record, path)


def _feedback(message: Message, record: dict, path: str) -> Feedback | None:
    given = _get(record, "feedback", dict, path, None)
    if given is None:
        return None
    path = f"{path}.feedback"
    if message.role != Message.Role.ASSISTANT:
        raise _refuse(path, "only a reply can have feedback.")
    rating = _get(given, "rating", int, path, None)
    if rating not in Feedback.Rating.values:
        raise _refuse(f"{path}.rating", "must be 1 (thumbs up) or -1 (thumbs down).")
    created = _when(given, "created", path, message.created)
    return Feedback(
        message=message,
        rating=rating,
        comment=_text(given, "comment", path, Feedback.COMMENT_LENGTH),
        created=created,
        updated=_when(given, "updated", path, created),
    )


def import_records(user, data: Any) -> list[Conversation]:
    """The conversations of an export file (parsed JSON), created anew for
    user: new ids, the user as owner, whoever exported them. All or
    nothing: ImportRefused, and nothing created, on anything amiss."""
    if not isinstance(data, dict) or not isinstance(data.get("schema"), str):
        raise ImportRefused("This is not a chatsite export: it has no schema field.")
    schema = data["schema"]
    if schema != SCHEMA:
        if schema.startswith(SCHEMA_FAMILY):
            raise ImportRefused(
                f"This export is in {schema}, which this site cannot read (it reads {SCHEMA})."
            )
        raise ImportRefused(f"This is not a chatsite export: its schema is {schema!r}.")
    records = data.get("conversations")
    if not isinstance(records, list):
        raise _refuse("conversations", "expected a list.")
    now = timezone.now()
    conversations, messages, feedback = [], [], []
    with_leaf = []
    for i, record in enumerate(records):
        conversation, rows, leaf = _conversation(user, record, f"conversations[{i}]", now)
        conversations.append(conversation)
        if leaf is not None:
            with_leaf.append((conversation, leaf))
        for message, given in rows:
            messages.append(message)
            if given is not None:
                feedback.append(given)
    with transaction.atomic():
        Conversation.objects.bulk_create(conversations)
        Message.objects.bulk_create(messages, batch_size=500)
        Feedback.objects.bulk_create(feedback, batch_size=500)
        # The leaf is set once it exists, as a foreign key must be.
        for conversation, leaf in with_leaf:
            conversation.active = leaf
        Conversation.objects.bulk_update([c for c, _ in with_leaf], ["active"], batch_size=500)
    return conversations
