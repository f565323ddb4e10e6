"""Staff review of users' conversations: flags raised on a conversation or a
single reply, and the access log that tells an owner their conversation was
read."""

from collections.abc import Iterable
from typing import Any

from django.conf import settings
from django.db import models
from django.db.models import Count, Max
from django.utils import timezone

from conversations.models import Conversation, Message


class FlagQuerySet(models.QuerySet["Flag"]):
    def open(self) -> "FlagQuerySet":
        return self.filter(status=Flag.Status.OPEN)

    def resolve(self, user: Any, notes: str = "") -> int:
        """Resolve the open flags among these, by user, in one update; a
        note given replaces none already written."""
        changes: dict[str, Any] = {
            "status": Flag.Status.RESOLVED,
            "resolved_by": user,
            "resolved_at": timezone.now(),
        }
        if notes:
            changes["notes"] = notes
        return self.open().update(**changes)


class Flag(models.Model):
    """A staff member's concern about a conversation, or one of its
    messages, waiting in the review queue until someone resolves it."""

    class Status(models.TextChoices):
        OPEN = "open"
        RESOLVED = "resolved"

    conversation = models.ForeignKey(Conversation, on_delete=models.CASCADE, related_name="flags")
    message = models.ForeignKey(
        Message,
        on_delete=models.CASCADE,
        related_name="flags",
        null=True,
        blank=True,
        help_text="Empty when the flag is on the whole conversation.",
    )
    reason = models.TextField()
    flagged_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="+",
    )
    created = models.DateTimeField(default=timezone.now, editable=False)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.OPEN)
    notes = models.TextField(blank=True, help_text="The reviewers' notes.")
    resolved_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="+",
    )
    resolved_at = models.DateTimeField(null=True, blank=True)

    objects = FlagQuerySet.as_manager()

    class Meta:
        ordering = ["-created"]
        indexes = [models.Index(fields=["status", "-created"], name="flag_queue")]

    def __str__(self) -> str:
        target = "message" if self.message_id else "conversation"
        return f"{self.get_status_display()} flag on a {target}: {self.reason[:60]}"

    def resolve(self, user: Any, notes: str = "") -> None:
        self.status = self.Status.RESOLVED
        self.resolved_by = user
        self.resolved_at = timezone.now()
        fields = ["status", "resolved_by", "resolved_at"]
        if notes:
            self.notes = notes
            fields.append("notes")
        self.save(update_fields=fields)


class AccessLogQuerySet(models.QuerySet["AccessLog"]):
    def record(
        self,
        user: Any,
        conversations: Conversation | Iterable[Conversation],
        action: str,
        detail: str = "",
    ) -> list["AccessLog"]:
        """Write down that staff member `user` did `action` (an
        AccessLog.Action) to each conversation: the one call for the admin's
        pages, its deletions and the export. A user's own conversations are
        not logged: reading them is no review."""
        if isinstance(conversations, Conversation):
            conversations = [conversations]
        now = timezone.now()
        rows = [
            AccessLog(
                created=now,
                staff=user,
                staff_username=user.get_username(),
                conversation=conversation,
                conversation_key=conversation.pk,
                owner_id=conversation.owner_id,
                action=action,
                detail=detail,
            )
            for conversation in conversations
            if conversation.owner_id != user.pk
        ]
        return AccessLog.objects.bulk_create(rows)

    def notices_for(self, owner: Any) -> dict[str, dict[str, Any]]:
        """What the owner is told on each of their conversations' pages:
        when staff last opened it and how often (never who), keyed by the
        conversation's id; empty when the site turned the notice off
        (CHAT_SHOW_REVIEWS). One grouped query for all of them."""
        if not settings.CHAT_SHOW_REVIEWS or not owner.is_authenticated:
            return {}
        seen = (
            self.filter(conversation__owner=owner)
            .order_by()
            .values("conversation")
            .annotate(last=Max("created"), times=Count("pk"))
        )
        return {
            str(row["conversation"]): {"last": row["last"], "times": row["times"]} for row in seen
        }


class AccessLog(models.Model):
    """A staff member opened (or exported, or deleted from) a user's
    conversation. Never changed or deleted through the admin; the rows
    outlive the conversation and its owner, keeping the conversation's id."""

    class Action(models.TextChoices):
        VIEW = "view", "opened the conversation"
        VIEW_MESSAGE = "view_message", "opened a message"
        EXPORT = "export", "exported the conversation"
        DELETE = "delete", "deleted the conversation"
        DELETE_MESSAGE = "delete_message", "deleted a message"

    created = models.DateTimeField(default=timezone.now, editable=False, db_index=True)
    staff = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        related_name="+",
    )
    # Kept as written: the staff account may be deleted later.
    staff_username = models.CharField(max_length=150)
    conversation = models.ForeignKey(
        Conversation, on_delete=models.SET_NULL, null=True, related_name="access_log"
    )
    conversation_key = models.UUIDField(help_text="The conversation's id, kept once it is deleted.")
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, related_name="+"
    )
    action = models.CharField(max_length=16, choices=Action.choices)
    detail = models.CharField(max_length=200, blank=True)

    objects = AccessLogQuerySet.as_manager()

    class Meta:
        ordering = ["-created", "-pk"]
        verbose_name = "access log entry"
        verbose_name_plural = "access log"
        indexes = [models.Index(fields=["conversation", "-created"], name="access_by_conversation")]

    def __str__(self) -> str:
        return f"{self.staff_username} {self.get_action_display()} ({self.created:%Y-%m-%d %H:%M})"
