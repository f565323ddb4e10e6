"""Staff review in the Django admin: conversations and their messages are
read, flagged and (by superusers only) deleted, never edited. Every opening
of a user's conversation is written to the access log (review.models)."""

import json
from typing import TYPE_CHECKING, Any, TypedDict

from django import forms
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.db.models import Count, Exists, IntegerField, OuterRef, Subquery, Sum, Value
from django.db.models.functions import Coalesce
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils.html import format_html, format_html_join

from review.models import AccessLog, Flag

from . import exports
from .models import ApiToken, Conversation, Feedback, Message
from .tree import Node, Tree

if TYPE_CHECKING:  # django-stubs-ext is a dev requirement only
    from django_stubs_ext import WithAnnotations


class ConversationFigures(TypedDict):
    """What ConversationAdmin.get_queryset annotates each row with."""

    message_total: int
    token_total: int
    open_flags: int
    last_status: str | None
    has_feedback: bool


class ReadOnlyAdmin(admin.ModelAdmin):
    """Nothing said can be changed, by anyone, superusers included: no add,
    no change (a posted change form is refused with 403). Only a superuser
    deletes (a user's right to erasure), and that is logged."""

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return request.user.is_superuser


class FlagReasonForm(forms.Form):
    reason = forms.CharField(widget=forms.Textarea(attrs={"rows": 3, "cols": 60}), max_length=2000)


class FlagActionMixin:
    """A bulk "flag" action, asking for the reason on a page of its own
    (as Django's delete action asks to confirm)."""

    def has_flag_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("review.add_flag")

    def flags_for(self, queryset, reason: str, user) -> list[Flag]:
        raise NotImplementedError

    @admin.action(description="Flag selected for review", permissions=["flag"])
    def flag_selected(self, request: HttpRequest, queryset) -> HttpResponse | None:
        model_admin: admin.ModelAdmin = self  # type: ignore[assignment]
        form = FlagReasonForm(request.POST if "apply" in request.POST else None)
        if form.is_valid():
            flags = Flag.objects.bulk_create(
                self.flags_for(queryset, form.cleaned_data["reason"], request.user)
            )
            model_admin.message_user(request, f"{len(flags)} flagged for review.", messages.SUCCESS)
            return None
        opts = model_admin.model._meta
        return TemplateResponse(
            request,
            "admin/review/flag_selected.html",
            {
                **model_admin.admin_site.each_context(request),
                "title": f"Flag {opts.verbose_name_plural} for review",
                "opts": opts,
                "form": form,
                "queryset": queryset,
                "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
            },
        )


class LastReplyStatusFilter(admin.SimpleListFilter):
    title = "status of the last reply"
    parameter_name = "last_status"

    def lookups(self, request, model_admin):
        return Message.Status.choices

    def queryset(self, request, queryset):
        return queryset.filter(last_status=self.value()) if self.value() else queryset


class FlaggedFilter(admin.SimpleListFilter):
    title = "flagged"
    parameter_name = "flagged"

    def lookups(self, request, model_admin):
        return [("open", "open flags"), ("ever", "ever flagged"), ("never", "never flagged")]

    def queryset(self, request, queryset):
        if self.value() == "open":
            return queryset.filter(open_flags__gt=0)
        ever = Exists(Flag.objects.filter(conversation=OuterRef("pk")))
        if self.value() == "ever":
            return queryset.filter(ever)
        if self.value() == "never":
            return queryset.exclude(ever)
        return queryset


class HasFeedbackFilter(admin.SimpleListFilter):
    title = "has feedback"
    parameter_name = "feedback"

    def lookups(self, request, model_admin):
        return [("yes", "yes"), ("no", "no")]

    def queryset(self, request, queryset):
        if self.value() in ("yes", "no"):
            return queryset.filter(has_feedback=self.value() == "yes")
        return queryset


class OnPathFilter(admin.SimpleListFilter):
    """`superseded` by its meaning since conversations are trees."""

    title = "on the active path"
    parameter_name = "on_path"

    def lookups(self, request, model_admin):
        return [("yes", "on the active path"), ("no", "other versions and branches")]

    def queryset(self, request, queryset):
        if self.value() in ("yes", "no"):
            return queryset.filter(superseded=self.value() == "no")
        return queryset


def _per_conversation(queryset, aggregate) -> Subquery:
    """One figure per conversation as a subquery, not a join: a search on
    messages__content joins the messages again, and a join-based count
    would multiply."""
    return Subquery(
        queryset.filter(conversation=OuterRef("pk"))
        .order_by()
        .values("conversation")
        .annotate(figure=aggregate)
        .values("figure")
    )


@admin.register(Conversation)
class ConversationAdmin(FlagActionMixin, ReadOnlyAdmin):
    list_display = [
        "__str__",
        "owner_link",
        "model",
        "message_count",
        "tokens",
        "flags",
        "created",
        "updated",
    ]
    list_filter = [
        "model",
        ("owner", admin.RelatedOnlyFieldListFilter),
        LastReplyStatusFilter,
        FlaggedFilter,
        HasFeedbackFilter,
    ]
    search_fields = ["title", "owner__username", "messages__content"]
    list_select_related = ["owner"]
    date_hierarchy = "updated"
    # Tuples of plain names, as they are the read-only fields too (`fields`
    # alone may hold groups of names, and a list is invariant).
    fields = readonly_fields = (
        "id",
        "owner",
        "title",
        "model",
        "system_prompt",
        "options",
        "created",
        "updated",
    )
    actions = ["flag_selected", "download_jsonl"]
    change_form_template = "admin/conversations/conversation/transcript.html"
    # The site's conversation page is owner-only: the link would be a 404 for staff.
    view_on_site = False

    def get_queryset(self, request):
        tokens = Coalesce("prompt_tokens", 0) + Coalesce("completion_tokens", 0)
        last_reply = Message.objects.filter(
            conversation=OuterRef("pk"), role=Message.Role.ASSISTANT, superseded=False
        ).order_by("-created", "-pk")
        return (
            super()
            .get_queryset(request)
            .annotate(
                message_total=Coalesce(_per_conversation(Message.objects, Count("pk")), 0),
                token_total=Coalesce(
                    _per_conversation(Message.objects, Sum(tokens)),
                    Value(0),
                    output_field=IntegerField(),
                ),
                open_flags=Coalesce(_per_conversation(Flag.objects.open(), Count("pk")), 0),
                last_status=Subquery(last_reply.values("status")[:1]),
                has_feedback=Exists(Feedback.objects.filter(message__conversation=OuterRef("pk"))),
            )
        )

    @admin.display(description="owner", ordering="owner__username")
    def owner_link(self, obj: Conversation) -> str:
        url = reverse("admin:auth_user_change", args=[obj.owner_id])
        return format_html('<a href="{}">{}</a>', url, obj.owner.get_username())

    @admin.display(description="messages", ordering="message_total")
    def message_count(self, obj: "WithAnnotations[Conversation, ConversationFigures]") -> int:
        return obj.message_total

    @admin.display(description="total tokens", ordering="token_total")
    def tokens(self, obj: "WithAnnotations[Conversation, ConversationFigures]") -> int:
        return obj.token_total

    @admin.display(description="open flags", ordering="open_flags")
    def flags(self, obj: "WithAnnotations[Conversation, ConversationFigures]") -> str:
        if not obj.open_flags:
            return "-"
        url = reverse("admin:review_flag_changelist")
        return format_html(
            '<a href="{}?conversation__id__exact={}&amp;status__exact=open">{}</a>',
            url,
            obj.pk,
            obj.open_flags,
        )

    def flags_for(self, queryset, reason: str, user) -> list[Flag]:
        return [Flag(conversation=c, reason=reason, flagged_by=user) for c in queryset]

    @admin.action(description="Download as JSON Lines (docs/export.md)")
    def download_jsonl(self, request, queryset) -> HttpResponse:
        # An export is a reading of each conversation: the owners are told.
        AccessLog.objects.record(request.user, list(queryset), AccessLog.Action.EXPORT)
        return exports.export_jsonl(self, request, queryset)

    def change_view(self, request, object_id, form_url="", extra_context=None):
        response = super().change_view(request, object_id, form_url, extra_context)
        if request.method == "GET" and response.status_code == 200:
            conversation = response.context_data["original"]  # type: ignore[attr-defined]
            AccessLog.objects.record(request.user, conversation, AccessLog.Action.VIEW)
        return response

    def render_change_form(self, request, context, add=False, change=False, form_url="", obj=None):
        if obj is not None:
            context["transcript"] = transcript(obj)
            context["flag_list"] = obj.flags.select_related("flagged_by", "resolved_by")
            context["can_flag"] = self.has_flag_permission(request)
        return super().render_change_form(request, context, add, change, form_url, obj)

    def delete_model(self, request, obj: Conversation) -> None:
        AccessLog.objects.record(request.user, obj, AccessLog.Action.DELETE)
        obj.stop_and_delete()

    def delete_queryset(self, request, queryset) -> None:
        conversations = list(queryset)
        AccessLog.objects.record(request.user, conversations, AccessLog.Action.DELETE)
        for conversation in conversations:
            conversation.stop_and_delete()


# Versions are indented one step per fork above them, up to this many (the
# stylesheet has a class for each): deeper forks stay readable by their
# "version n of m" labels.
MAX_LEVEL = 6


def tree_order(tree: Tree) -> list[tuple[Any, int]]:
    """Every message id of the tree, depth-first from the first message,
    versions oldest first, each with its level: how many messages with
    versions lie on its way from the root, itself included. A chain stays
    at level 0 however long it is; each version starts a branch one level
    in. Iterative, as a long conversation is a deep tree."""
    order: list[tuple[Any, int]] = []
    seen: set[Any] = set()
    stack = [(root, 0) for root in reversed(tree.children.get(None, []))]
    while stack:
        message_id, level = stack.pop()
        if message_id in seen:
            continue
        seen.add(message_id)
        if len(tree.siblings(message_id)) > 1:
            level += 1
        order.append((message_id, level))
        below = tree.children.get(message_id, [])
        stack.extend((child, level) for child in reversed(below))
    # A row whose parent chain was broken by hand is shown all the same,
    # at the end: the transcript is every message.
    order.extend((m, 0) for m in tree.nodes if m not in seen)
    return order


def transcript(conversation: Conversation) -> dict[str, Any]:
    """Every message of the conversation as a tree (issue 13): in tree
    order, each with its version label, its level and whether it is on the
    active path (what the user sees), with what the transcript page shows
    (escaped by its template). The tree is built from the same single query
    as the messages, so the page takes the same queries however big the
    tree is, and cannot show a tree and messages of two different moments."""
    open_flags = set(
        Flag.objects.open()
        .filter(conversation=conversation, message__isnull=False)
        .values_list("message_id", flat=True)
    )
    messages_ = list(conversation.messages.order_by("created", "pk").select_related("feedback"))
    tree = Tree(Node(m.pk, m.parent_id, m.role) for m in messages_)
    path = set(tree.path(conversation.active_leaf(tree)))
    by_id = {message.pk: message for message in messages_}
    rows = []
    for message_id, level in tree_order(tree):
        message = by_id[message_id]
        try:
            feedback: Feedback | None = message.feedback
        except Feedback.DoesNotExist:
            feedback = None
        versions = tree.siblings(message_id)
        rows.append(
            {
                "message": message,
                "on_path": message_id in path,
                "version": versions.index(message_id) + 1,
                "versions": len(versions),
                "level": level,
                "indent": min(level, MAX_LEVEL),
                "timing": message.timing(),
                "options": json.dumps(message.options, indent=2, sort_keys=True)
                if message.options
                else "",
                "feedback": feedback,
                "flagged": message.pk in open_flags,
            }
        )
    return {
        "rows": rows,
        "branched": len(path) < len(rows),
        "on_path": sum(row["on_path"] for row in rows),
    }


@admin.register(Message)
class MessageAdmin(FlagActionMixin, ReadOnlyAdmin):
    list_display = ["__str__", "conversation_link", "role", "status", "model", "created"]
    list_filter = ["role", "status", "model", OnPathFilter]
    search_fields = ["content", "conversation__title", "conversation__owner__username"]
    list_select_related = ["conversation"]
    fields = readonly_fields = (
        "id",
        "conversation_link",
        "parent_link",
        "versions",
        "on_path",
        "role",
        "content",
        "reasoning",
        "status",
        "model",
        "options",
        "prompt_tokens",
        "completion_tokens",
        "ttft_ms",
        "duration_ms",
        "seq",
        "created",
        "updated",
        "error_code",
        "error",
        "error_details",
        "finish_reason",
    )
    actions = ["flag_selected"]

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
        return format_html('<a href="{}#message-{}">{}</a>', url, obj.pk, obj.conversation)

    @admin.display(description="follows")
    def parent_link(self, obj: Message) -> str:
        if obj.parent is None:
            return "- (the first message)"
        url = reverse("admin:conversations_message_change", args=[obj.parent_id])
        return format_html('<a href="{}">{}</a>', url, obj.parent)

    @admin.display(description="version")
    def versions(self, obj: Message) -> str:
        # The versions of a message: an edited question's or a regenerated
        # reply's others, each a link to its own page.
        versions = obj.siblings()
        if len(versions) < 2:
            return "the only version"
        links = format_html_join(
            ", ",
            '<a href="{}">{}</a>',
            (
                (reverse("admin:conversations_message_change", args=[pk]), number)
                for number, pk in enumerate(versions, 1)
                if pk != obj.pk
            ),
        )
        return format_html(
            "version {} of {} (the others: {})", versions.index(obj.pk) + 1, len(versions), links
        )

    @admin.display(description="on the active path", boolean=True)
    def on_path(self, obj: Message) -> bool:
        # `superseded` is kept true of exactly the messages off the path
        # (Conversation.set_active); the name is protocol v1's.
        return not obj.superseded

    def flags_for(self, queryset, reason: str, user) -> list[Flag]:
        return [
            Flag(conversation_id=m.conversation_id, message=m, reason=reason, flagged_by=user)
            for m in queryset
        ]

    def change_view(self, request, object_id, form_url="", extra_context=None):
        response = super().change_view(request, object_id, form_url, extra_context)
        if request.method == "GET" and response.status_code == 200:
            message = response.context_data["original"]  # type: ignore[attr-defined]
            AccessLog.objects.record(
                request.user,
                message.conversation,
                AccessLog.Action.VIEW_MESSAGE,
                detail=f"{message.role} message {message.pk}",
            )
        return response

    def delete_model(self, request, obj: Message) -> None:
        self.delete_queryset(request, Message.objects.filter(pk=obj.pk))

    def delete_queryset(self, request, queryset) -> None:
        for message in queryset.select_related("conversation"):
            AccessLog.objects.record(
                request.user,
                message.conversation,
                AccessLog.Action.DELETE_MESSAGE,
                detail=f"{message.role} message {message.pk}",
            )
            message.delete()


@admin.register(Feedback)
class FeedbackAdmin(ReadOnlyAdmin):
    list_display = ["rating", "comment", "message_link", "created"]
    list_filter = ["rating"]
    list_select_related = ["message__conversation"]
    fields = readonly_fields = ("message_link", "rating", "comment", "created", "updated")

    @admin.display(description="reply")
    def message_link(self, obj: Feedback) -> str:
        # To the reply in its transcript, where reading it is logged: the
        # link itself shows none of its text.
        conversation = obj.message.conversation
        url = reverse("admin:conversations_conversation_change", args=[conversation.pk])
        return format_html(
            '<a href="{}#message-{}">a reply in “{}”</a>', url, obj.message_id, conversation
        )


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
