"""What a user does with their own data (issue 12, items 9, 10 and 13):
search it, export and import it, delete their account and all of it."""

import uuid

from asgiref.sync import async_to_sync
from django.contrib import messages
from django.contrib.auth import logout
from django.contrib.auth.decorators import login_required
from django.db import transaction
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils import timezone
from django.views.decorators.http import require_GET, require_POST

from . import exports, replies
from .forms import DeleteAccountForm, ImportForm, SearchForm
from .models import Conversation, Message
from .search import search as search_conversations
from .views import Refused, json_errors

# The most hits one search answers with: the sidebar shows them all.
SEARCH_RESULTS = 20


@login_required
@require_GET
@json_errors
def search(request: HttpRequest) -> HttpResponse:
    form = SearchForm(request.GET)
    if not form.is_valid():
        raise Refused.from_form(form)
    text = form.cleaned_data["q"]
    hits = search_conversations(request.user, text, SEARCH_RESULTS)
    return JsonResponse(
        {"query": text, "limit": SEARCH_RESULTS, "results": [hit.as_dict() for hit in hits]}
    )


def _exportable(request: HttpRequest, pk: uuid.UUID) -> Conversation:
    # Someone else's conversation is a 404, as everywhere (views._own).
    mine = exports.exportable(Conversation.objects.for_user(request.user))
    return get_object_or_404(mine, pk=pk)


# A conversation's downloads: the file's extension -> (how, content type).
FORMATS = {
    "md": (exports.as_markdown, "text/markdown; charset=utf-8"),
    "json": (exports.as_json, "application/json; charset=utf-8"),
}


@login_required
@require_GET
def export_conversation(request: HttpRequest, pk: uuid.UUID, extension: str) -> HttpResponse:
    conversation = _exportable(request, pk)
    write, content_type = FORMATS[extension]
    return HttpResponse(
        write(conversation),
        content_type=content_type,
        headers=exports.attachment(exports.download_name(conversation, extension)),
    )


@login_required
@require_GET
def export_all(request: HttpRequest) -> StreamingHttpResponse:
    stamp = timezone.now().strftime("%Y%m%d")
    name = f"chatsite-{request.user.get_username()}-{stamp}.json"
    return StreamingHttpResponse(
        exports.export_all(request.user),
        content_type="application/json; charset=utf-8",
        headers=exports.attachment(name),
    )


def _account_page(
    request: HttpRequest,
    import_form: ImportForm | None = None,
    delete_form: DeleteAccountForm | None = None,
    status: int = 200,
) -> HttpResponse:
    return render(
        request,
        "conversations/account.html",
        {
            "import_form": import_form or ImportForm(),
            "delete_form": delete_form or DeleteAccountForm(request.user),
            "conversation_count": Conversation.objects.for_user(request.user).count(),
        },
        status=status,
    )


@login_required
@require_GET
def account(request: HttpRequest) -> HttpResponse:
    return _account_page(request)


@login_required
@require_POST
def account_import(request: HttpRequest) -> HttpResponse:
    form = ImportForm(request.POST, request.FILES)
    if form.is_valid():
        try:
            data = exports.parse_export(form.cleaned_data["file"].read())
            created = exports.import_records(request.user, data)
        except exports.ImportRefused as refusal:
            form.add_error("file", str(refusal))
        else:
            count = len(created)
            messages.success(request, f"Imported {count} conversation{'' if count == 1 else 's'}.")
            return redirect("conversations:account")
    return _account_page(request, import_form=form, status=400)


def delete_account(user) -> None:
    """Delete the user and everything they own: conversations, messages,
    feedback, API tokens. Replies being written stop now; every socket of
    theirs closes (the token sockets as their tokens go, the others as
    signins.py hears the user is gone)."""
    live = Message.objects.running().filter(conversation__owner=user)
    for message in live.only("id", "conversation_id"):
        async_to_sync(replies.request_stop)(message.conversation_id, message.pk)
    with transaction.atomic():
        user.delete()


@login_required
@require_POST
def account_delete(request: HttpRequest) -> HttpResponse:
    form = DeleteAccountForm(request.user, request.POST)
    if not form.is_valid():
        return _account_page(request, delete_form=form, status=400)
    user = request.user
    # Signed out first, while the user still exists to be signed out.
    logout(request)
    delete_account(user)
    return redirect("login")
