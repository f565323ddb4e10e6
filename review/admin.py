from typing import Any

from django import forms
from django.contrib import admin, messages
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html

from .models import AccessLog, Flag


class FlagForm(forms.ModelForm):
    class Meta:
        model = Flag
        fields = ["conversation", "message", "reason", "status", "notes"]

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean() or {}
        conversation, message = cleaned.get("conversation"), cleaned.get("message")
        if conversation and message and message.conversation_id != conversation.pk:
            self.add_error("message", "This message is not in that conversation.")
        return cleaned


@admin.register(Flag)
class FlagAdmin(admin.ModelAdmin):
    """The review queue: open flags first filtered in, resolved ones kept
    with who resolved them, when, and the reviewers' notes."""

    form = FlagForm
    list_display = [
        "created",
        "conversation_link",
        "target",
        "reason",
        "flagged_by",
        "status",
        "resolved_by",
        "resolved_at",
    ]
    list_filter = ["status", "created"]
    search_fields = ["reason", "notes", "conversation__title", "conversation__owner__username"]
    list_select_related = ["conversation", "flagged_by", "resolved_by"]
    raw_id_fields = ["conversation", "message"]
    actions = ["resolve_selected"]

    # A new flag names its target and reason; after that those stay as
    # written and only the status and the notes change.
    add_fields = ("conversation", "message", "reason")
    shown_fields = ("conversation_link", "target", "reason", "flagged_by", "created")
    resolution_fields = ("resolved_by", "resolved_at")

    def get_fields(self, request: HttpRequest, obj: Flag | None = None) -> list[str]:  # type: ignore[override]
        if obj is None:
            return list(self.add_fields)
        return [*self.shown_fields, "status", "notes", *self.resolution_fields]

    def get_readonly_fields(self, request: HttpRequest, obj: Flag | None = None) -> list[str]:
        return [] if obj is None else [*self.shown_fields, *self.resolution_fields]

    @admin.display(description="conversation", ordering="conversation__title")
    def conversation_link(self, obj: Flag) -> str:
        url = reverse("admin:conversations_conversation_change", args=[obj.conversation_id])
        return format_html('<a href="{}">{}</a>', url, obj.conversation)

    @admin.display(description="on")
    def target(self, obj: Flag) -> str:
        if not obj.message_id:
            return "the conversation"
        url = reverse("admin:conversations_conversation_change", args=[obj.conversation_id])
        return format_html('<a href="{}#message-{}">a message</a>', url, obj.message_id)

    def save_model(self, request: HttpRequest, obj: Flag, form, change: bool) -> None:
        if not change:
            obj.flagged_by_id = request.user.pk
        elif "status" in form.changed_data:
            resolved = obj.status == Flag.Status.RESOLVED
            obj.resolved_by_id = request.user.pk if resolved else None
            obj.resolved_at = timezone.now() if resolved else None
        super().save_model(request, obj, form, change)

    def response_add(self, request: HttpRequest, obj: Flag, post_url_continue=None) -> HttpResponse:
        # Back to the transcript the reviewer flagged from.
        self.message_user(request, "Flagged for review.", messages.SUCCESS)
        url = reverse("admin:conversations_conversation_change", args=[obj.conversation_id])
        return HttpResponseRedirect(url)

    @admin.action(description="Resolve selected flags", permissions=["change"])
    def resolve_selected(self, request: HttpRequest, queryset) -> None:
        resolved = queryset.resolve(request.user)
        self.message_user(request, f"{resolved} flags resolved.", messages.SUCCESS)


@admin.register(AccessLog)
class AccessLogAdmin(admin.ModelAdmin):
    """Read-only for everyone, superusers included: a record that could be
    edited would promise the owners nothing."""

    list_display = ["created", "staff_username", "action", "conversation_link", "owner", "detail"]
    list_filter = ["action"]
    search_fields = ["staff_username", "owner__username", "detail"]
    list_select_related = ["conversation", "owner"]
    date_hierarchy = "created"
    fields = readonly_fields = (
        "created",
        "staff_username",
        "action",
        "conversation_link",
        "conversation_key",
        "owner",
        "detail",
    )

    @admin.display(description="conversation")
    def conversation_link(self, obj: AccessLog) -> str:
        if obj.conversation_id is None:
            return format_html("(deleted) {}", obj.conversation_key)
        url = reverse("admin:conversations_conversation_change", args=[obj.conversation_id])
        return format_html('<a href="{}">{}</a>', url, obj.conversation)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False
