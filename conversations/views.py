import math
import uuid
from collections.abc import Callable
from functools import wraps

from asgiref.sync import async_to_sync
from axes.helpers import get_client_ip_address
from django import forms
from django.conf import settings
from django.contrib.auth import login
from django.contrib.auth.decorators import login_required
from django.core.exceptions import BadRequest
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.http import require_POST

from review.models import AccessLog

from . import llm, ratelimit
from .forms import MODEL_LENGTH, RenameForm, SearchForm, SettingsForm, SignupForm, TokenForm
from .models import TITLE_LENGTH, ApiToken, Conversation, Feedback
from .protocol import NOT_FOUND_TEXT, ErrorCode, model_not_found

# The page's JS puts a conversation's id in place of this one.
PLACEHOLDER_ID = uuid.UUID(int=0)


def _wants_json(request: HttpRequest) -> bool:
    return "application/json" in request.headers.get("Accept", "")


class Refused(BadRequest):
    """Input a view will not take. Django renders it as its 400 page; a
    request asking for JSON gets the protocol's error code instead."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    @classmethod
    def from_form(cls, form: forms.Form) -> "Refused":
        too_large = any(form.has_error(name, "max_length") for name in form.errors)
        message = next(iter(form.errors.values()))[0]
        # ErrorList.__getitem__ returns the message; the stubs give the item
        # type of its UserList of ValidationErrors instead.
        code = ErrorCode.TOO_LARGE if too_large else ErrorCode.BAD_REQUEST
        return cls(code, message)  # type: ignore[arg-type]


def json_errors(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    """Answers a 404 or a refusal as {"error", "message"} when the request
    asks for JSON; otherwise Django renders its error page as usual."""

    @wraps(view)
    def wrapped(request: HttpRequest, *args, **kwargs) -> HttpResponse:
        try:
            return view(request, *args, **kwargs)
        except Http404:
            if not _wants_json(request):
                raise
            return _json_error(404, ErrorCode.NOT_FOUND, NOT_FOUND_TEXT)
        except Refused as refusal:
            if not _wants_json(request):
                raise
            return _json_error(400, refusal.code, refusal.message)

    return wrapped


def _json_error(status: int, code: str, message: str) -> JsonResponse:
    return JsonResponse({"error": code, "message": message}, status=status)


def _own(request: HttpRequest, pk) -> Conversation:
    # Someone else's conversation is a 404: a 403 would confirm it exists.
    return get_object_or_404(Conversation.objects.for_user(request.user), pk=pk)


def _url_templates() -> dict[str, str]:
    # Keyed with underscores: the template reads them as url_templates.<key>.
    return {
        name.replace("-", "_"): reverse(f"conversations:{name}", args=[PLACEHOLDER_ID])
        for name in (
            "conversation",
            "rename",
            "delete",
            "settings",
            "export-markdown",
            "export-json",
        )
    }


def _chat_page(request: HttpRequest, conversation: Conversation | None) -> HttpResponse:
    # The saved messages go into the page itself, so a reload shows them at
    # once instead of a blank conversation until the socket's snapshot.
    try:
        saved = [m.as_frame() for m in conversation.path()] if conversation else []
    except Conversation.DoesNotExist:
        raise Http404 from None  # deleted (in another tab) while it was read
    # When staff last opened each of the user's conversations (review.models).
    reviews = AccessLog.objects.notices_for(request.user)
    return render(
        request,
        "conversations/chat.html",
        {
            "conversations": Conversation.objects.for_user(request.user).only(
                "id", "title", "model", "updated"
            ),
            "conversation": conversation,
            "saved_messages": [m for m in saved if m["role"] != "system"],
            "default_model": settings.DEFAULT_MODEL,
            "ws_path": "/ws/chat/",
            "limits": {
                "max_content": settings.CHAT_MAX_CONTENT,
                "max_title": TITLE_LENGTH,
                "max_model": MODEL_LENGTH,
                "max_comment": Feedback.COMMENT_LENGTH,
            },
            "url_templates": _url_templates(),
            "reviews": reviews,
            "review_notice": reviews.get(str(conversation.pk)) if conversation else None,
            "search_form": SearchForm(),
        },
    )


@login_required
def chat(request: HttpRequest) -> HttpResponse:
    return _chat_page(request, None)


@login_required
def conversation(request: HttpRequest, pk: uuid.UUID) -> HttpResponse:
    return _chat_page(request, _own(request, pk))


@login_required
@require_POST
@json_errors
def rename(request: HttpRequest, pk: uuid.UUID) -> HttpResponse:
    conversation = _own(request, pk)
    form = RenameForm(request.POST)
    if not form.is_valid():
        raise Refused.from_form(form)
    conversation.rename(form.cleaned_data["title"])
    if _wants_json(request):
        return JsonResponse({"id": str(conversation.pk), "title": conversation.title})
    return redirect(conversation)


@login_required
@require_POST
@json_errors
def delete(request: HttpRequest, pk: uuid.UUID) -> HttpResponse:
    conversation = _own(request, pk)
    deleted = str(conversation.pk)
    conversation.stop_and_delete()
    if _wants_json(request):
        return JsonResponse({"deleted": deleted})
    return redirect("conversations:chat")


@login_required
@require_POST
@json_errors
def conversation_settings(request: HttpRequest, pk: uuid.UUID) -> HttpResponse:
    conversation = _own(request, pk)
    form = SettingsForm(request.POST)
    if not form.is_valid():
        raise Refused.from_form(form)
    changes = form.changes()
    if "model" in changes and not async_to_sync(llm.model_exists)(changes["model"]):
        refusal = model_not_found(changes["model"])
        raise Refused(refusal.code, refusal.message)
    conversation.change_settings(changes)
    if _wants_json(request):
        return JsonResponse(conversation.as_frame())
    return redirect(conversation)


SIGNUP_LIMITED_TEXT = (
    "Too many accounts were created from your network in the last hour. Try again later."
)


def signup(request: HttpRequest) -> HttpResponse:
    if request.user.is_authenticated:
        return redirect("conversations:chat")
    form = SignupForm(request.POST or None)
    status = 200
    if request.method == "POST" and form.is_valid():
        # Counted once the form is valid, so typos cost nothing; the same IP
        # as the login lockout's, so a proxy is handled in one place.
        if ratelimit.allow_signup(get_client_ip_address(request) or ""):
            user = form.save()
            login(request, user, backend="django.contrib.auth.backends.ModelBackend")
            return redirect("conversations:chat")
        form.add_error(None, SIGNUP_LIMITED_TEXT)
        status = 429
    return render(request, "registration/signup.html", {"form": form}, status=status)


def locked_out(
    request: HttpRequest, original_response: HttpResponse | None, credentials: dict | None
) -> HttpResponse:
    """django-axes' answer to a login (site or admin) while the lock holds."""
    minutes = math.ceil(settings.AXES_COOLOFF_TIME.total_seconds() / 60)
    return render(
        request,
        "registration/locked_out.html",
        {"failure_limit": settings.AXES_FAILURE_LIMIT, "cooloff_minutes": minutes},
        status=429,
    )


# A new token waits here for the page the post redirects to, which shows it
# once: so reloading that page shows the list and creates nothing.
NEW_TOKEN_SESSION_KEY = "new_token"


@login_required
def tokens(request: HttpRequest) -> HttpResponse:
    form = TokenForm(request.POST if request.method == "POST" else None)
    if form.is_valid():
        _, request.session[NEW_TOKEN_SESSION_KEY] = ApiToken.issue(
            request.user, form.cleaned_data["name"]
        )
        return redirect("conversations:tokens")
    return render(
        request,
        "conversations/tokens.html",
        {
            "tokens": ApiToken.objects.for_user(request.user).active(),
            "new_token": request.session.pop(NEW_TOKEN_SESSION_KEY, None),
            "form": form,
        },
        status=400 if form.errors else 200,
    )


@login_required
@require_POST
def token_revoke(request: HttpRequest, pk: int) -> HttpResponse:
    token = get_object_or_404(ApiToken.objects.for_user(request.user).active(), pk=pk)
    token.revoke()
    return redirect("conversations:tokens")
