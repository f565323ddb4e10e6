"""The admin's usage page: replies and tokens per user, per model and per
day over a date range, with timings, failures and feedback, all computed by
the database (one grouped query per table)."""

import csv
from datetime import date, datetime, time, timedelta
from typing import Any

from django import forms
from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.db.models import Avg, Count, F, FloatField, Q, QuerySet, Sum
from django.db.models.functions import Cast, Coalesce, Greatest, TruncDate
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.utils import timezone

from conversations.models import Feedback, Message

DEFAULT_DAYS = 30
FAILED = [Message.Status.ERROR, Message.Status.INTERRUPTED]

# The same figures for every grouping. Tokens per second as Message.timing()
# computes them: completion tokens over the time after the first token.
_rate = Cast(F("completion_tokens") * 1000, FloatField()) / Greatest(
    F("duration_ms") - F("ttft_ms"), 1
)
_timed = Q(completion_tokens__gt=0, duration_ms__isnull=False, ttft_ms__isnull=False)
# (Named apart from the fields they sum: an annotation called completion_tokens
# would stand for the field in the tokens-per-second expression.)
FIGURES = {
    "replies": Count("pk"),
    "input_tokens": Coalesce(Sum("prompt_tokens"), 0),
    "output_tokens": Coalesce(Sum("completion_tokens"), 0),
    "failed": Count("pk", filter=Q(status__in=FAILED)),
    "avg_ttft_ms": Avg("ttft_ms"),
    "avg_tokens_per_s": Avg(_rate, filter=_timed),
    "thumbs_up": Count("feedback", filter=Q(feedback__rating=Feedback.Rating.UP)),
    "thumbs_down": Count("feedback", filter=Q(feedback__rating=Feedback.Rating.DOWN)),
}
GROUPS = {
    "user": F("conversation__owner__username"),
    "model": F("model"),
    "day": TruncDate("created"),
}
COLUMNS = ["group", "name", *FIGURES, "error_rate"]


class UsageForm(forms.Form):
    start = forms.DateField(required=False, widget=forms.DateInput(attrs={"type": "date"}))
    end = forms.DateField(required=False, widget=forms.DateInput(attrs={"type": "date"}))

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean() or {}
        start, end = cleaned.get("start"), cleaned.get("end")
        if start and end and start > end:
            raise forms.ValidationError("The start comes after the end.")
        return cleaned

    def period(self) -> tuple[date, date]:
        """The days asked for, both included: the last DEFAULT_DAYS by default."""
        today = timezone.localdate()
        data = self.cleaned_data if self.is_valid() else {}
        end = data.get("end") or today
        start = data.get("start") or end - timedelta(days=DEFAULT_DAYS - 1)
        return start, end


def replies_between(start: date, end: date) -> QuerySet[Message]:
    zone = timezone.get_current_timezone()
    since = datetime.combine(start, time.min, tzinfo=zone)
    until = datetime.combine(end + timedelta(days=1), time.min, tzinfo=zone)
    return Message.objects.filter(
        role=Message.Role.ASSISTANT, created__gte=since, created__lt=until
    )


def _with_error_rate(row: dict[str, Any]) -> dict[str, Any]:
    row["error_rate"] = row["failed"] / row["replies"] if row["replies"] else None
    return row


def usage(start: date, end: date) -> dict[str, Any]:
    replies = replies_between(start, end)
    tables = {
        group: [
            _with_error_rate(dict(row))
            for row in replies.annotate(name=key)
            .order_by("name")
            .values("name")
            .annotate(**FIGURES)
        ]
        for group, key in GROUPS.items()
    }
    total = {"name": "All", **replies.aggregate(**FIGURES)}
    return {"tables": tables, "total": _with_error_rate(total)}


# A spreadsheet runs a cell that starts with one of these as a formula; user
# names and model names come from users and model servers.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _cell(value: Any) -> Any:
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def as_csv(figures: dict[str, Any], start: date, end: date) -> HttpResponse:
    response = HttpResponse(content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="usage-{start}-to-{end}.csv"'
    writer = csv.writer(response)
    writer.writerow(COLUMNS)
    rows = [(group, row) for group, table in figures["tables"].items() for row in table]
    rows.append(("total", figures["total"]))
    for group, row in rows:
        writer.writerow([group, _cell(row["name"]), *(row[column] for column in COLUMNS[2:])])
    return response


def usage_view(request: HttpRequest) -> HttpResponse:
    # Staff who may read messages may read their totals; admin_view has
    # already sent anyone else to the admin's login.
    if not request.user.has_perm("conversations.view_message"):
        raise PermissionDenied
    form = UsageForm(request.GET or None)
    start, end = form.period()
    if not form.is_bound:
        form = UsageForm(initial={"start": start, "end": end})
    figures = usage(start, end)
    if request.GET.get("format") == "csv":
        return as_csv(figures, start, end)
    query = request.GET.copy()
    query["format"] = "csv"
    return TemplateResponse(
        request,
        "admin/review/usage.html",
        {
            **admin.site.each_context(request),
            "title": "Usage",
            "form": form,
            "start": start,
            "end": end,
            "figures": figures,
            "csv_query": query.urlencode(),
        },
    )
