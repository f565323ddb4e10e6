from asgiref.sync import async_to_sync
from django.conf import settings
from django.contrib.auth import login
from django.contrib.auth.decorators import login_required
from django.contrib.auth.forms import UserCreationForm
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST

from . import replies
from .models import TITLE_LENGTH, ApiToken, Conversation


def _wants_json(request: HttpRequest) -> bool:
    return "application/json" in request.headers.get("Accept", "")


def _own(request: HttpRequest, pk) -> Conversation:
    # Someone else's conversation is a 404: a 403 would confirm it exists.
    return get_object_or_404(Conversation.objects.for_user(request.user), pk=pk)


def _chat_page(request: HttpRequest, conversation: Conversation | None) -> HttpResponse:
    return render(
        request,
        "conversations/chat.html",
        {
            "conversations": Conversation.objects.for_user(request.user).only(
                "id", "title", "model", "updated"
            ),
            "conversation": conversation,
            "default_model": settings.DEFAULT_MODEL,
            "ws_path": "/ws/chat/",
        },
    )


@login_required
def chat(request: HttpRequest) -> HttpResponse:
    return _chat_page(request, None)


@login_required
def conversation(request: HttpRequest, pk) -> HttpResponse:
    return _chat_page(request, _own(request, pk))


@login_required
@require_POST
def rename(request: HttpRequest, pk) -> HttpResponse:
    conversation = _own(request, pk)
    title = " ".join(request.POST.get("title", "").split())[:TITLE_LENGTH].rstrip()
    if not title:
        return JsonResponse({"error": "bad_request", "message": "A title is needed."}, status=400)
    conversation.title = title
    conversation.save(update_fields=["title"])
    if _wants_json(request):
        return JsonResponse({"id": str(conversation.pk), "title": conversation.title})
    return redirect(conversation)


@login_required
@require_POST
def delete(request: HttpRequest, pk) -> HttpResponse:
    conversation = _own(request, pk)
    deleted = str(conversation.pk)
    reply = conversation.reply_in_progress()
    if reply is not None:
        # Stop it now rather than when it next fails to save.
        async_to_sync(replies.request_stop)(conversation.pk, reply.pk)
    conversation.delete()
    if _wants_json(request):
        return JsonResponse({"deleted": deleted})
    return redirect("chat")


@login_required
@require_POST
def conversation_settings(request: HttpRequest, pk) -> HttpResponse:
    conversation = _own(request, pk)
    fields = []
    model = request.POST.get("model")
    if model is not None and model.strip():
        conversation.model = model.strip()[:200]
        fields.append("model")
    system = request.POST.get("system")
    if system is not None:
        if len(system) > settings.CHAT_MAX_CONTENT:
            return JsonResponse(
                {"error": "too_large", "message": "The system prompt is too long."}, status=400
            )
        conversation.system_prompt = system
        fields.append("system_prompt")
    if fields:
        conversation.save(update_fields=fields)
    if _wants_json(request):
        return JsonResponse(conversation.as_frame())
    return redirect(conversation)


def signup(request: HttpRequest) -> HttpResponse:
    if request.user.is_authenticated:
        return redirect("chat")
    form = UserCreationForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        user = form.save()
        login(request, user, backend="django.contrib.auth.backends.ModelBackend")
        return redirect("chat")
    return render(request, "registration/signup.html", {"form": form})


@login_required
def tokens(request: HttpRequest) -> HttpResponse:
    new_token = None
    if request.method == "POST":
        name = " ".join(request.POST.get("name", "").split())[:100] or "token"
        _, new_token = ApiToken.issue(request.user, name)
    return render(
        request,
        "conversations/tokens.html",
        {"tokens": ApiToken.objects.for_user(request.user).active(), "new_token": new_token},
    )


@login_required
@require_POST
def token_revoke(request: HttpRequest, pk: int) -> HttpResponse:
    token = get_object_or_404(ApiToken.objects.for_user(request.user).active(), pk=pk)
    token.revoke()
    return redirect("tokens")
