from typing import TYPE_CHECKING, TypedDict

from django.contrib import admin
from django.db.models import Count, OuterRef, Subquery
from django.db.models.functions import Coalesce
from django.urls import reverse
from django.utils.html import format_html

from .models import ApiToken, Conversation, Message

if TYPE_CHECKING:  # django-stubs-ext is a dev requirement only
    from django_stubs_ext import WithAnnotations


class MessageTotal(TypedDict):
    """What ConversationAdmin.get_queryset annotates each row with."""

    message_total: int


# Plain names, as they are the read-only fields too (`fields` alone may hold
# groups of names). A tuple, as the admin's attributes accept either and only
# a tuple of str is also a tuple of "str or group" (a list is invariant).
MESSAGE_FIELDS = ("created", "role", "status", "model", "content", "superseded")


class MessageInline(admin.TabularInline):
    model = Message
    extra = 0
    can_delete = False
    show_change_link = True
    ordering = ["created", "pk"]
    fields = readonly_fields = MESSAGE_FIELDS

    def has_add_permission(self, request, obj=None) -> bool:
        return False


@admin.register(Conversation)
class ConversationAdmin(admin.ModelAdmin):
    list_display = ["__str__", "owner_link", "model", "message_count", "updated"]
    list_filter = ["model", "updated"]
    search_fields = ["title", "owner__username", "messages__content"]
    list_select_related = ["owner"]
    date_hierarchy = "updated"
    readonly_fields = ["id", "owner", "created", "updated"]
    fields = ["id", "owner", "title", "model", "system_prompt", "options", "created", "updated"]
    inlines = [MessageInline]
    # The site's conversation page is owner-only: the link would be a 404 for staff.
    view_on_site = False

    def get_queryset(self, request):
        # A subquery, not Count("messages"): a search on messages__content
        # joins the messages again, and a join-based count would multiply.
        per_conversation = (
            Message.objects.filter(conversation=OuterRef("pk"))
            .order_by()
            .values("conversation")
            .annotate(total=Count("pk"))
            .values("total")
        )
        return (
            super()
            .get_queryset(request)
            .annotate(message_total=Coalesce(Subquery(per_conversation), 0))
        )

    @admin.display(description="owner", ordering="owner__username")
    def owner_link(self, obj: Conversation) -> str:
        url = reverse("admin:auth_user_change", args=[obj.owner_id])
        return format_html('<a href="{}">{}</a>', url, obj.owner.get_username())

    @admin.display(description="messages", ordering="message_total")
    def message_count(self, obj: "WithAnnotations[Conversation, MessageTotal]") -> int:
        return obj.message_total


@admin.register(Message)
class MessageAdmin(admin.ModelAdmin):
    list_display = ["__str__", "conversation_link", "role", "status", "model", "created"]
    list_filter = ["role", "status", "model", "superseded"]
    search_fields = ["content", "conversation__title", "conversation__owner__username"]
    list_select_related = ["conversation"]
    readonly_fields = [
        "id",
        "conversation_link",
        "role",
        "status",
        "model",
        "options",
        "prompt_tokens",
        "completion_tokens",
        "ttft_ms",
        "duration_ms",
        "seq",
        "superseded",
        "created",
        "updated",
        "error_code",
        "error",
        "error_details",
        "finish_reason",
    ]
    fields = [*readonly_fields[:2], "content", "reasoning", *readonly_fields[2:]]

    @admin.display(description="error detail (staff only)")
    def error_details(self, obj: Message) -> str:
        # Kept whole (up to llm.DETAIL_LIMIT) with its line breaks: a
        # server's address, an exception, the start of an error body.
        return (
            format_html('<pre class="error-detail">{}</pre>', obj.error_detail)
            if obj.error_detail
            else "-"
        )

    @admin.display(description="conversation")
    def conversation_link(self, obj: Message) -> str:
        url = reverse("admin:conversations_conversation_change", args=[obj.conversation_id])
        return format_html('<a href="{}">{}</a>', url, obj.conversation)


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    list_display = ["name", "user", "prefix", "created", "last_used", "revoked"]
    list_filter = ["revoked"]
    search_fields = ["name", "user__username", "prefix"]
    list_select_related = ["user"]
    readonly_fields = ["user", "prefix", "created", "last_used", "revoked"]
    fields = ["user", "name", "prefix", "created", "last_used", "revoked"]
    actions = ["revoke"]

    @admin.action(description="Revoke selected tokens")
    def revoke(self, request, queryset) -> None:
        for token in queryset.active():
            token.revoke()

    def has_add_permission(self, request) -> bool:
        return False  # a token is shown once: make it on the API tokens page
