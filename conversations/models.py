import hashlib
import re
import secrets
import uuid
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from typing import Any, cast

from asgiref.sync import async_to_sync
from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import connection, connections, models, transaction
from django.db.models.signals import post_delete
from django.dispatch import receiver
from django.urls import reverse
from django.utils import timezone

from .layers import channel_layer
from .protocol import (
    INTERRUPTED_TEXT,
    MAX_COMMENT,
    MAX_MODEL,
    NOT_FINISHED_TEXT,
    ONLY_QUESTIONS_TEXT,
    ONLY_REPLIES_TEXT,
    EditRequest,
    ErrorCode,
    SendRequest,
    bad_request,
    too_many_replies,
)
from .tree import Node, Tree

TITLE_LENGTH = 80
CODE_FENCE = re.compile(r"```[\w+-]*")
MARKDOWN_MARKERS = re.compile(r"(?m)^[ \t]*(?:#{1,6}|>|[-*+]|\d+[.)])[ \t]+")

# Search (issue 12, item 9). On Postgres, full-text search in this text
# search configuration: the GIN indexes of migration 0006 are built with the
# same one, and a query naming another could not use them.
SEARCH_CONFIG = "english"
# Where a Postgres headline's matches start and stop: characters of Unicode's
# private use area, which chat text has no business holding, so search.py
# can split a headline into plain and matching runs.
MATCH_START, MATCH_STOP = "\ue000", "\ue001"


def search_terms(text: str) -> list[str]:
    """The words a search looks for where the database has no full-text
    search (SQLite): each must appear, in any case. Quotes and a leading
    minus, web-search syntax for Postgres, are dropped."""
    words = (word.strip('"').lstrip("-") for word in text.split())
    return [word for word in words if word]


def full_text(queryset: models.QuerySet) -> bool:
    return connections[queryset.db].vendor == "postgresql"


class ConversationQuerySet(models.QuerySet):
    def for_user(self, user) -> "ConversationQuerySet":
        if not user.is_authenticated:
            return self.none()
        return self.filter(owner=user)

    def search(self, text: str) -> "ConversationQuerySet":
        """These conversations (call it on for_user()) whose title matches
        text, best first: full-text search on Postgres, every word found in
        any case elsewhere."""
        if full_text(self):
            from django.contrib.postgres.search import SearchQuery, SearchRank, SearchVector

            vector = SearchVector("title", config=SEARCH_CONFIG)
            query = SearchQuery(text, config=SEARCH_CONFIG, search_type="websearch")
            return (
                self.annotate(found=vector)
                .filter(found=query)
                .annotate(rank=SearchRank(vector, query))
                .order_by("-rank", "-updated")
            )
        matching = self
        for term in search_terms(text) or [text]:
            matching = matching.filter(title__icontains=term)
        return matching.order_by("-updated")

    def for_send(
        self,
        user,
        pk: Any,
        *,
        model: str | None,
        system: str | None,
        options: dict[str, Any] | None,
        default_model: str,
    ) -> tuple["Conversation", bool, bool]:
        """Where a user's `send` goes, with the settings it carries applied:
        a new conversation when pk is None, else one of the user's own
        (DoesNotExist otherwise). Also says whether it is new and whether
        its settings changed."""
        if pk is None:
            # django-stubs types `self` in a QuerySet subclass with an unbound
            # model type, so create() says _Model; it makes a Conversation.
            conversation = cast(
                "Conversation",
                self.create(
                    owner=user,
                    model=model or default_model,
                    system_prompt=system or "",
                    options=options or {},
                ),
            )
            return conversation, True, False
        conversation = self.for_user(user).get(pk=pk)
        wanted = {"model": model, "system_prompt": system, "options": options}
        changed = [
            field
            for field, value in wanted.items()
            if value is not None and getattr(conversation, field) != value
        ]
        for field in changed:
            setattr(conversation, field, wanted[field])
        if not conversation.model:
            conversation.model = default_model
            changed.append("model")
        if changed:
            conversation.save(update_fields=changed)
        return conversation, False, bool(changed)

    @transaction.atomic
    def begin_send(self, user, request: SendRequest, default_model: str) -> "Turn":
        """A `send`, in one trip to the database: where it goes (DoesNotExist
        if not the user's), its settings applied, the saved user message and
        the reply row to stream into (or Busy, or too_many_replies)."""
        # Before for_send, which may lock the conversation's row: the locks
        # are always taken in the same order, or two sends would deadlock.
        lock_turns(user.pk)
        conversation, created, changed = self.for_send(
            user,
            request.conversation,
            model=request.model,
            system=request.system,
            options=request.options,
            default_model=default_model,
        )
        user_message, reply, _ = conversation.start_turn(
            request.content, conversation.model, conversation.options
        )
        # A send always carries content, so start_turn saved a user message.
        assert user_message is not None
        return Turn(conversation, created, changed, user_message, reply)

    @transaction.atomic
    def begin_edit(self, user, request: "EditRequest", default_model: str) -> "Turn":
        """An `edit`: a new version of one of the user's messages, and the
        reply row to stream the answer to it into. DoesNotExist (of the
        conversation or the message) if either is not the user's; a
        bad_request FrameError for a message that is not the user's own
        words; Busy while the conversation has a reply in progress."""
        lock_turns(user.pk)
        conversation, _, changed = self.for_send(
            user,
            request.conversation,
            model=request.model,
            system=None,
            options=request.options,
            default_model=default_model,
        )
        editing = conversation.messages.get(pk=request.message)
        if editing.role != Message.Role.USER:
            raise bad_request(ONLY_QUESTIONS_TEXT)
        user_message, reply, _ = conversation.start_turn(
            request.content, conversation.model, conversation.options, editing=editing
        )
        assert user_message is not None
        return Turn(conversation, False, changed, user_message, reply)


class Busy(Exception):
    """A reply is already being written in this conversation: reply_id,
    on the active path or off it."""

    def __init__(self, reply_id: Any) -> None:
        super().__init__(reply_id)
        self.reply_id = reply_id


# Any fixed number: the key of the Postgres advisory lock that turns take.
TURN_LOCK = 0x63686174


def lock_turns(owner_id: Any) -> None:
    """Serialise the start of turns, so that two sends at the same instant
    cannot both pass the reply caps at one below the limit. SQLite needs
    nothing: its IMMEDIATE transactions already serialise every writer.
    On Postgres the user's row is locked for the per-user cap, and, with a
    site cap, an advisory lock held until the transaction ends covers the
    site-wide count: it makes every turn start wait its turn, which costs
    a few milliseconds each, little beside a reply's seconds."""
    if connection.vendor != "postgresql":
        return
    if settings.CHAT_MAX_REPLIES:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [TURN_LOCK])
    get_user_model().objects.select_for_update().filter(pk=owner_id).first()


class NothingToAnswer(Exception):
    """Regenerate was asked of a conversation with no user message."""


class Conversation(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="conversations"
    )
    title = models.CharField(max_length=200, blank=True)
    # Renamed by its owner: a title the model suggests never replaces it.
    title_by_user = models.BooleanField(default=False)
    model = models.CharField(max_length=MAX_MODEL, blank=True)
    system_prompt = models.TextField(blank=True)
    options = models.JSONField(default=dict, blank=True)
    created = models.DateTimeField(default=timezone.now, editable=False)
    updated = models.DateTimeField(default=timezone.now)
    # The leaf of the active path (issue 13): the branch the page shows,
    # subscribe sends and the model is asked along.
    active = models.ForeignKey(
        "Message", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )

    objects = ConversationQuerySet.as_manager()

    class Meta:
        ordering = ["-updated"]
        indexes = [models.Index(fields=["owner", "-updated"], name="conversation_owner_list")]

    def __str__(self) -> str:
        return self.title or "New chat"

    def get_absolute_url(self) -> str:
        return reverse("conversations:conversation", args=[self.pk])

    def as_frame(self) -> dict[str, Any]:
        return {
            "id": str(self.pk),
            "title": str(self),
            "model": self.model,
            "system": self.system_prompt,
            "created": self.created.isoformat(),
            "updated": self.updated.isoformat(),
            "active": str(self.active_id) if self.active_id else None,
        }

    def visible_messages(self) -> models.QuerySet["Message"]:
        """The active path, oldest first: `superseded` is kept true of every
        message off it (set_active), so one indexed filter finds the path.
        With their feedback, which their frames carry (Message.as_frame)."""
        return (
            self.messages.filter(superseded=False)
            .select_related("feedback")
            .order_by("created", "pk")
        )

    def tree(self) -> Tree:
        """The shape of the conversation, in one query of three columns."""
        rows = self.messages.order_by("created", "pk").values_list("id", "parent_id", "role")
        return Tree(Node(*row) for row in rows)

    def path(self) -> list["Message"]:
        """The messages of the active path, oldest first, each knowing its
        versions (Message.siblings), for their frames. DoesNotExist if the
        conversation is deleted while it is read."""
        return self._with_versions(list(self.visible_messages()))

    def replay(self, only_live: bool = False) -> tuple[list["Message"], list[Any]]:
        """What a subscribe sends: the active path (or only its replies in
        progress), and the ids of the replies in progress off the path,
        whose events a socket showing the path drops. DoesNotExist if the
        conversation is deleted while it is read."""
        messages = self.visible_messages()
        if only_live:
            messages = messages.filter(status__in=Message.LIVE_STATUSES)
        off_path = self.messages.filter(status__in=Message.LIVE_STATUSES, superseded=True)
        return self._with_versions(list(messages)), list(off_path.values_list("pk", flat=True))

    def _with_versions(self, messages: list["Message"]) -> list["Message"]:
        # The messages are read before the tree, not after: a message made
        # between the two reads (another tab's send) is then in the tree,
        # and one missing from it was deleted since: with the conversation,
        # or alone by staff in the admin, when it is simply not shown.
        if not messages:
            return messages  # nothing to name versions of: no tree query
        tree = self.tree()
        if any(message.pk not in tree for message in messages):
            if not Conversation.objects.filter(pk=self.pk).exists():
                raise Conversation.DoesNotExist
            messages = [message for message in messages if message.pk in tree]
        for message in messages:
            message.sibling_ids = tree.siblings(message.pk)
        return messages

    def active_leaf(self, tree: Tree) -> Any:
        if self.active_id is not None and self.active_id in tree:
            return self.active_id
        return tree.newest_leaf()

    def set_active(self, leaf: Any, tree: Tree) -> list[Any]:
        """Make leaf's branch the active path; its ids, root first. Two
        UPDATEs keep `superseded` true of exactly the messages off it."""
        path = tree.path(leaf)
        self.messages.filter(pk__in=path, superseded=True).update(superseded=False)
        self.messages.filter(superseded=False).exclude(pk__in=path).update(superseded=True)
        self.active_id = leaf
        self.save(update_fields=["active"])
        return path

    @transaction.atomic
    def switch(self, message_id: Any) -> list[Any]:
        """Show another version of a message: the active leaf becomes the
        newest leaf under it. The new path's ids, root first; DoesNotExist
        if the message is not one of this conversation's. A reply in
        progress goes on, on or off the path."""
        Conversation.objects.select_for_update().filter(pk=self.pk).first()
        tree = self.tree()
        message_id = uuid.UUID(str(message_id))  # the tree's ids are UUIDs
        if message_id not in tree:
            raise Message.DoesNotExist
        return self.set_active(tree.newest_leaf_under(message_id), tree)

    def history(self, budget: int | None = None, upto: Any = None) -> list[dict[str, str]]:
        """What the model is sent: the system prompt, then earlier user and
        finished assistant messages, oldest dropped first to fit the budget
        (in tokens, estimated at four characters each). Reasoning never goes
        back to the model. Along the active path, or, given upto (a message
        id), along the branch from the root down to that message: a reply's
        own branch, whatever the path is by the time it asks."""
        budget = settings.CHAT_CONTEXT_BUDGET if budget is None else budget
        if upto is None:
            branch = self.visible_messages()
        else:
            branch = self.messages.filter(pk__in=self.tree().path(upto)).order_by("created", "pk")
        turns = [
            {"role": m.role, "content": m.content}
            for m in branch.filter(
                models.Q(role=Message.Role.USER)
                | models.Q(
                    role=Message.Role.ASSISTANT,
                    status__in=[Message.Status.COMPLETE, Message.Status.STOPPED],
                )
            )
            if m.content
        ]
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        used = sum(estimate_tokens(t["content"]) for t in system + turns)
        # The newest turn always goes, even alone over budget: the model
        # must see the question it is answering.
        while len(turns) > 1 and used > budget:
            used -= estimate_tokens(turns.pop(0)["content"])
        # Chat templates expect the conversation to open with a user turn.
        while len(turns) > 1 and turns[0]["role"] != Message.Role.USER:
            turns.pop(0)
        return system + turns

    def rename(self, title: str) -> None:
        self.title = title
        self.title_by_user = True
        self.save(update_fields=["title", "title_by_user"])
        self.announce()

    def change_settings(self, changes: dict[str, Any]) -> None:
        for field, value in changes.items():
            setattr(self, field, value)
        if changes:
            self.save(update_fields=list(changes))
            self.announce()

    def announce(self) -> None:
        """Send the conversation as it now is to every open tab of its owner,
        in any process, once the change is committed: subscribed to it or
        not, every tab lists it in its sidebar."""
        from . import protocol, replies

        frame = protocol.conversation_frame(self)
        tell = partial(async_to_sync(replies.announce_to_owner), self.owner_id, self.pk, frame)
        transaction.on_commit(tell)

    def wants_suggested_title(self, reply_id: Any) -> bool:
        """Whether a title is to be suggested now that reply_id has completed:
        only after the first reply that completes (a regenerated one keeps
        the title the first got), never once the owner has renamed it."""
        if self.title_by_user:
            return False
        replies = self.messages.filter(role=Message.Role.ASSISTANT, status=Message.Status.COMPLETE)
        return not replies.exclude(pk=reply_id).exists()

    def first_exchange(self) -> tuple[str, str]:
        """The first user message and the first complete reply (superseded or
        not): what a suggested title is made from."""
        first = self.messages.order_by("created", "pk")
        question = first.filter(role=Message.Role.USER).first()
        answer = first.filter(role=Message.Role.ASSISTANT, status=Message.Status.COMPLETE).first()
        return (question.content if question else "", answer.content if answer else "")

    def take_suggested_title(self, title: str) -> bool:
        """Give the conversation a title the model suggested, unless its owner
        has renamed it, also while the suggestion was being made: the check
        and the write are one UPDATE. Announced to the owner's tabs."""
        taken = Conversation.objects.filter(pk=self.pk, title_by_user=False).update(title=title)
        if not taken:
            return False
        self.refresh_from_db()
        self.announce()
        return True

    def stop_and_delete(self) -> None:
        """Delete the conversation, stopping its live reply now rather than
        when the reply next fails to save into a row that is gone."""
        from . import replies  # replies is built on these models

        # The locks start_turn takes, in its order: a send racing this
        # delete either starts its turn first (and its reply is found and
        # stopped here) or finds the conversation gone.
        with transaction.atomic():
            lock_turns(self.owner_id)
            Conversation.objects.select_for_update().filter(pk=self.pk).first()
            reply = self.reply_in_progress()
            if reply is not None:
                async_to_sync(replies.request_stop)(self.pk, reply.pk)
            self.delete()

    def title_from(self, content: str) -> str:
        # Markdown markers at the start of lines ("## ", "> ", "- ") and code
        # fences say nothing about the subject.
        plain = CODE_FENCE.sub(" ", MARKDOWN_MARKERS.sub("", content))
        line = " ".join(plain.split()) or " ".join(content.split())
        return line if len(line) <= TITLE_LENGTH else line[: TITLE_LENGTH - 1].rstrip() + "…"

    def reply_in_progress(self) -> "Message | None":
        return (
            # On the active path or off it: a reply goes on when the user
            # switches away, and one conversation never runs two at once.
            self.messages.filter(status__in=Message.LIVE_STATUSES).order_by("-created").first()
        )

    def check_reply_caps(self) -> None:
        """Raise too_many_replies if the owner, or the site, already has as
        many replies being written as the settings allow. Called under
        lock_turns()."""
        live = Message.objects.running()
        per_user = settings.CHAT_MAX_REPLIES_PER_USER
        if live.filter(conversation__owner_id=self.owner_id).count() >= per_user:
            raise too_many_replies(per_user, site_wide=False)
        site = settings.CHAT_MAX_REPLIES
        if site and live.count() >= site:
            raise too_many_replies(site, site_wide=True)

    @transaction.atomic
    def start_turn(
        self,
        content: str | None,
        model: str,
        options: dict[str, Any],
        *,
        editing: "Message | None" = None,
    ) -> tuple["Message | None", "Message", "Message | None"]:
        """Save the user's message (if any) and the reply row that will be
        streamed into, or raise Busy (or too_many_replies, or DoesNotExist
        if the conversation was deleted meanwhile). The new reply's branch
        becomes the active path.
        - send: content, after the active leaf;
        - edit: content and editing (a user message): a new version of
          that message, a sibling of it, with the old branch kept whole;
        - regenerate: content=None: a new version of the reply to the last
          user message of the path; the one it replaces is returned third,
          now superseded (off the path)."""
        # Locks the conversation row on Postgres; SQLite serialises the
        # whole transaction (IMMEDIATE mode), so two sends cannot both pass.
        lock_turns(self.owner_id)
        row = Conversation.objects.select_for_update().filter(pk=self.pk).first()
        if row is None:
            # Deleted since it was read: the messages would be written into
            # a row that is gone, and fail only at COMMIT.
            raise Conversation.DoesNotExist
        # The leaf as it is now, under the lock: another tab may have
        # switched since this object was read.
        self.active_id = row.active_id
        live = self.reply_in_progress()
        if live is not None and not (live.is_stale() and live.mark_interrupted()):
            raise Busy(live.pk)
        self.check_reply_caps()
        appending = content is not None and editing is None
        tree: Tree | None = None
        if appending and self.active_id is not None:
            leaf = self.active_id  # a send needs no more of the tree than that
        else:
            tree = self.tree()
            leaf = self.active_leaf(tree)
        user_message = replaced = None
        if content is not None:
            parent = editing.parent_id if editing is not None else leaf
            user_message = Message(
                conversation=self,
                role=Message.Role.USER,
                content=content,
                status=Message.Status.COMPLETE,
                parent_id=parent,
            )
            user_message.starts_tree = parent is None
            user_message.save(force_insert=True)
            parent = user_message.pk
        else:
            assert tree is not None
            path = [tree.nodes[m] for m in tree.path(leaf)]
            asked = [node for node in path if node.role == Message.Role.USER]
            if not asked:
                raise NothingToAnswer
            parent = asked[-1].id
            if path[-1].role == Message.Role.ASSISTANT:
                replaced = self.messages.select_related("feedback").get(pk=path[-1].id)
        reply = self.messages.create(
            role=Message.Role.ASSISTANT,
            status=Message.Status.STREAMING,
            model=model,
            options=options,
            system_prompt=self.system_prompt,
            parent_id=parent,
        )
        if tree is None:
            # The path grows by two at its end, under a leaf: nothing leaves
            # it, and neither new message has another version.
            self.active_id = reply.pk
            fields = ["updated", "active"]
            assert user_message is not None
            user_message.sibling_ids = [user_message.pk]
            reply.sibling_ids = [reply.pk]
        else:
            if user_message is not None:
                tree.add(Node(user_message.pk, user_message.parent_id, Message.Role.USER))
            tree.add(Node(reply.pk, parent, Message.Role.ASSISTANT))
            self.set_active(reply.pk, tree)
            fields = ["updated"]
            for message in (user_message, reply, replaced):
                if message is not None:
                    message.sibling_ids = tree.siblings(message.pk)
        if replaced is not None:
            replaced.superseded = True
        self.updated = timezone.now()
        if not self.title and content:
            self.title = self.title_from(content)
            fields.append("title")
        self.save(update_fields=fields)
        return user_message, reply, replaced


@dataclass(frozen=True)
class Turn:
    conversation: Conversation
    created: bool  # a new conversation
    changed: bool  # its settings changed
    user_message: "Message"
    reply: "Message"


def estimate_tokens(text: str) -> int:
    return len(text) // 4 + 1


PROCESS_STARTED = timezone.now()


class MessageQuerySet(models.QuerySet):
    def for_user(self, user) -> "MessageQuerySet":
        if not user.is_authenticated:
            return self.none()
        return self.filter(conversation__owner=user)

    def search(self, user, text: str) -> "MessageQuerySet":
        """The user's own messages, as their conversations show them (no
        superseded replies, no system rows), whose text matches text, best
        first, with their conversation. On Postgres each has `headline`, a
        snippet of it with the matches between MATCH_START and MATCH_STOP,
        and the content itself is not read; elsewhere search.py cuts the
        snippet from the content."""
        if not user.is_authenticated:
            return self.none()
        mine = (
            self.filter(
                conversation__owner=user,
                superseded=False,
                role__in=[Message.Role.USER, Message.Role.ASSISTANT],
            )
            .select_related("conversation")
            .only("id", "role", "created", "conversation", "conversation__title")
        )
        if full_text(self):
            from django.contrib.postgres.search import (
                SearchHeadline,
                SearchQuery,
                SearchRank,
                SearchVector,
            )

            vector = SearchVector("content", config=SEARCH_CONFIG)
            query = SearchQuery(text, config=SEARCH_CONFIG, search_type="websearch")
            headline = SearchHeadline(
                "content",
                query,
                config=SEARCH_CONFIG,
                start_sel=MATCH_START,
                stop_sel=MATCH_STOP,
                max_words=24,
                min_words=8,
            )
            # Postgres computes the headlines after the sort and the limit,
            # so only for the rows a page of results shows.
            return (
                mine.annotate(found=vector)
                .filter(found=query)
                .annotate(rank=SearchRank(vector, query), headline=headline)
                .order_by("-rank", "-created")
            )
        mine = mine.only("id", "role", "created", "content", "conversation", "conversation__title")
        for term in search_terms(text) or [text]:
            mine = mine.filter(content__icontains=term)
        return mine.order_by("-created")

    def for_frame(self, pk: Any) -> "Message | None":
        """One message as its frame needs it: with its feedback and its
        versions. Sync: call it through database_sync_to_async."""
        message = cast("Message | None", self.select_related("feedback").filter(pk=pk).first())
        if message is not None:
            message.siblings()
        return message

    def running(self) -> "MessageQuerySet":
        """Replies being written now: live, and not silent past the
        dead-writer limit (a reply whose process died stops counting
        against the caps within Message.stale_after())."""
        cutoff = timezone.now() - Message.stale_after()
        return self.filter(status__in=Message.LIVE_STATUSES, updated__gt=cutoff)

    def interrupt_orphans(self) -> int:
        """Replies left streaming by a process that died; called at start-up.
        With the in-memory layer there is one process, so every live row
        from before it started is an orphan. Processes that share Redis may
        still be writing theirs: only rows whose writer stopped beating
        count."""
        cutoff = (timezone.now() - Message.stale_after()) if settings.REDIS_URL else PROCESS_STARTED
        return self.filter(status__in=Message.LIVE_STATUSES, updated__lte=cutoff).update(
            status=Message.Status.INTERRUPTED,
            error_code=ErrorCode.INTERRUPTED,
            error=INTERRUPTED_TEXT,
        )


class Message(models.Model):
    class Role(models.TextChoices):
        SYSTEM = "system"
        USER = "user"
        ASSISTANT = "assistant"

    class Status(models.TextChoices):
        PENDING = "pending"
        STREAMING = "streaming"
        COMPLETE = "complete"
        STOPPED = "stopped"
        ERROR = "error"
        INTERRUPTED = "interrupted"

    LIVE_STATUSES = [Status.PENDING, Status.STREAMING]
    # A writer saves at least this often while it streams (see replies.py).
    HEARTBEAT = timedelta(seconds=5)

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    conversation = models.ForeignKey(
        Conversation, on_delete=models.CASCADE, related_name="messages"
    )
    # The turn this message follows (None for the first): versions of a
    # message share a parent (conversations/tree.py).
    parent = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.CASCADE, related_name="children"
    )
    role = models.CharField(max_length=16, choices=Role.choices)
    content = models.TextField(blank=True)
    reasoning = models.TextField(blank=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.COMPLETE)
    error_code = models.CharField(max_length=32, blank=True, choices=ErrorCode.choices)
    error = models.TextField(blank=True)
    error_detail = models.TextField(
        blank=True,
        help_text="For staff only, never sent to users: what the model server or the "
        "server said when the reply failed (its address, the exception, the answer's body).",
    )
    finish_reason = models.CharField(
        max_length=16,
        blank=True,
        help_text='"length" when the reply was cut at a length cap.',
    )
    model = models.CharField(max_length=MAX_MODEL, blank=True)
    options = models.JSONField(default=dict, blank=True)
    system_prompt = models.TextField(
        blank=True,
        help_text="A reply's: the conversation's system prompt when it was written "
        "(for staff review; the model is sent the conversation's own).",
    )
    prompt_tokens = models.PositiveIntegerField(null=True, blank=True)
    completion_tokens = models.PositiveIntegerField(null=True, blank=True)
    ttft_ms = models.PositiveIntegerField(null=True, blank=True)
    duration_ms = models.PositiveIntegerField(null=True, blank=True)
    # The number of deltas this reply had sent when the row was last saved;
    # clients use it to join a stream without gaps or repeats.
    seq = models.PositiveIntegerField(default=0)
    # Off the active path: an older version, or on a branch not shown. The
    # name is protocol v1's, from when only regenerated replies left it.
    superseded = models.BooleanField(default=False)
    created = models.DateTimeField(default=timezone.now, editable=False)
    updated = models.DateTimeField(default=timezone.now)

    objects = MessageQuerySet.as_manager()

    class Meta:
        ordering = ["created", "pk"]
        indexes = [models.Index(fields=["conversation", "created"], name="message_history")]

    def __str__(self) -> str:
        return f"{self.role}: {self.content[:60]}"

    # Set on a new message whose parent is None on purpose (a new version
    # of a conversation's first message); see save().
    starts_tree = False

    def save(self, *args: Any, **kwargs: Any) -> None:
        """A new message saved without a parent follows the active leaf, as
        every message did before conversations were trees: code that adds
        messages in order (imports, fixtures, the admin) makes a chain, and
        a superseded one becomes a version beside the one that follows it
        (the rule of migration 0008). Unless superseded, it becomes the
        active leaf. start_turn places its messages itself."""
        follows = self._state.adding and self.parent_id is None and not self.starts_tree
        if follows:
            leaf = Conversation.objects.filter(pk=self.conversation_id).values_list(
                "active_id", flat=True
            ).first() or (
                Message.objects.filter(conversation_id=self.conversation_id, superseded=False)
                .order_by("-created", "-pk")
                .values_list("id", flat=True)
                .first()
            )
            self.parent_id = leaf
        super().save(*args, **kwargs)
        if follows and not self.superseded:
            Conversation.objects.filter(pk=self.conversation_id).update(active=self.pk)

    @property
    def is_live(self) -> bool:
        return self.status in self.LIVE_STATUSES

    @classmethod
    def stale_after(cls) -> timedelta:
        """The dead-writer rule: a live reply whose writer has been silent
        (no save, no heartbeat) this long has lost its process."""
        return 3 * cls.HEARTBEAT

    def is_stale(self) -> bool:
        return self.is_live and self.updated < timezone.now() - self.stale_after()

    def mark_interrupted(self) -> bool:
        """Mark a reply whose writer is gone interrupted, with its last saved
        text; False, and nothing changed, if the row is no longer as it was
        read. The verdict was made on that reading: a writer that saved since
        is alive, and its save (a late final one, say) must not be undone."""
        interrupted = {
            "status": self.Status.INTERRUPTED,
            "error_code": ErrorCode.INTERRUPTED,
            "error": INTERRUPTED_TEXT,
        }
        as_read = Message.objects.filter(
            pk=self.pk, status__in=self.LIVE_STATUSES, updated=self.updated
        )
        if not as_read.update(**interrupted):
            return False
        for field, value in interrupted.items():
            setattr(self, field, value)
        return True

    def usage(self) -> dict[str, int | None]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens}

    def timing(self) -> dict[str, float | int | None]:
        rate = None
        if self.completion_tokens and self.duration_ms and self.ttft_ms is not None:
            generating = max(self.duration_ms - self.ttft_ms, 1)
            rate = round(self.completion_tokens * 1000 / generating, 1)
        return {"ttft_ms": self.ttft_ms, "duration_ms": self.duration_ms, "tokens_per_s": rate}

    def rate(self, rating: str | None, comment: str = "") -> "Feedback | None":
        """Set or change the owner's feedback on this reply (rating "up" or
        "down"), or take it back (None); the feedback as it now is. Only a
        finished reply is rated: a bad_request FrameError otherwise."""
        if self.role != self.Role.ASSISTANT:
            raise bad_request(ONLY_REPLIES_TEXT)
        if self.is_live:
            raise bad_request(NOT_FINISHED_TEXT)
        if rating is None:
            Feedback.objects.filter(message=self).delete()
            return None
        feedback, _ = Feedback.objects.update_or_create(
            message=self,
            defaults={
                "rating": Feedback.Rating[rating.upper()],
                "comment": comment,
                "updated": timezone.now(),
            },
        )
        return feedback

    # The ids of this message's versions, oldest first, itself included, as
    # loaded with it (Conversation.path(), start_turn, MessageQuerySet.
    # for_frame): frames are built in async code too, which may not query.
    sibling_ids: list[Any]

    def siblings(self) -> list[Any]:
        if not hasattr(self, "sibling_ids"):
            self.sibling_ids = list(
                Message.objects.filter(
                    conversation_id=self.conversation_id, parent_id=self.parent_id, role=self.role
                )
                .order_by("created", "pk")
                .values_list("id", flat=True)
            )
        return self.sibling_ids

    def cached_feedback(self) -> "Feedback | None":
        """The feedback as loaded with the message (select_related), never a
        query: frames are built in async code too, which may not make one."""
        return self._state.fields_cache.get("feedback")

    def as_frame(self) -> dict[str, Any]:
        frame: dict[str, Any] = {
            "id": str(self.pk),
            "role": self.role,
            "content": self.content,
            "reasoning": self.reasoning,
            "status": self.status,
            "model": self.model,
            "created": self.created.isoformat(),
            "seq": self.seq,
            "superseded": self.superseded,
            "parent": str(self.parent_id) if self.parent_id else None,
            "siblings": [str(m) for m in self.siblings()],
        }
        if self.role == self.Role.ASSISTANT:
            frame["usage"] = self.usage()
            frame["timing"] = self.timing()
            if self.error_code:
                frame["error"] = {"code": self.error_code, "message": self.error}
            if self.finish_reason:
                frame["finish_reason"] = self.finish_reason
            if (feedback := self.cached_feedback()) is not None:
                frame["feedback"] = feedback.as_frame()
        return frame


class Feedback(models.Model):
    """The owner's rating of one reply, with an optional comment; changeable,
    so one row per reply."""

    class Rating(models.IntegerChoices):
        DOWN = -1, "thumbs down"
        UP = 1, "thumbs up"

    COMMENT_LENGTH = MAX_COMMENT

    message = models.OneToOneField(Message, on_delete=models.CASCADE, related_name="feedback")
    rating = models.SmallIntegerField(choices=Rating.choices)
    comment = models.TextField(blank=True, max_length=COMMENT_LENGTH)
    created = models.DateTimeField(default=timezone.now, editable=False)
    updated = models.DateTimeField(default=timezone.now)

    class Meta:
        verbose_name_plural = "feedback"

    def __str__(self) -> str:
        return f"{self.get_rating_display()} on {self.message_id}"

    def as_frame(self) -> dict[str, str]:
        return {"rating": self.Rating(self.rating).name.lower(), "comment": self.comment}


class ApiTokenQuerySet(models.QuerySet):
    def active(self) -> "ApiTokenQuerySet":
        return self.filter(revoked__isnull=True)

    def for_user(self, user) -> "ApiTokenQuerySet":
        return self.filter(user=user) if user.is_authenticated else self.none()

    def authenticate(self, plain: str) -> "ApiToken | None":
        token = (
            self.active()
            .select_related("user")
            .filter(key_hash=ApiToken.hash(plain), user__is_active=True)
            .first()
        )
        if token is not None:
            token.last_used = timezone.now()
            token.save(update_fields=["last_used"])
        return token


class ApiToken(models.Model):
    """A personal token for scripts and terminal clients. Only a hash is
    kept: the token itself is shown once, when it is made."""

    PREFIX = "cs_"

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens"
    )
    name = models.CharField(max_length=100)
    prefix = models.CharField(max_length=16, editable=False)
    key_hash = models.CharField(max_length=64, unique=True, editable=False)
    created = models.DateTimeField(default=timezone.now, editable=False)
    last_used = models.DateTimeField(null=True, blank=True, editable=False)
    revoked = models.DateTimeField(null=True, blank=True)

    objects = ApiTokenQuerySet.as_manager()

    class Meta:
        ordering = ["-created"]

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    @staticmethod
    def hash(plain: str) -> str:
        # Tokens are 256 random bits: a fast hash is enough, no key stretching.
        return hashlib.sha256(plain.encode()).hexdigest()

    @classmethod
    def issue(cls, user, name: str) -> tuple["ApiToken", str]:
        plain = cls.PREFIX + secrets.token_urlsafe(32)
        token = cls.objects.create(
            user=user, name=name, prefix=plain[: len(cls.PREFIX) + 6], key_hash=cls.hash(plain)
        )
        return token, plain

    @property
    def group(self) -> str:
        """The channel-layer group of the sockets opened with this token."""
        return f"token.{self.pk}"

    def revoke(self) -> None:
        self.revoked = timezone.now()
        self.save(update_fields=["revoked"])
        self.close_sockets()

    def close_sockets(self) -> None:
        close_token_sockets(self.group)


def close_token_sockets(group: str) -> None:
    """Sockets opened with a token close now, in whichever process."""
    async_to_sync(channel_layer().group_send)(group, {"type": "token.revoked"})


@receiver(post_delete, sender=Conversation)
def tell_subscribers_of_deletion(sender, instance: Conversation, **kwargs) -> None:
    # However it is deleted: the view, the admin, a user's deletion.
    from . import replies

    announce = async_to_sync(replies.announce_deleted)
    transaction.on_commit(partial(announce, str(instance.pk)))


@receiver(post_delete, sender=ApiToken)
def close_deleted_token_sockets(sender, instance: ApiToken, **kwargs) -> None:
    # Deleting a token (the admin's delete, a user's deletion) revokes it
    # too. The group is named now: the instance loses its pk after this.
    transaction.on_commit(partial(close_token_sockets, instance.group))
