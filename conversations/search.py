"""Search in a user's own conversations, titles and message text (issue 12,
item 9), as the sidebar shows it: one hit per matching title or message,
each with a snippet whose matching runs are marked.

The queries are on the querysets (`Conversation.objects.for_user(user).search`,
`Message.objects.search`); this module only bounds and shapes their answers.
A snippet is a list of runs, {"text", "mark"}, rather than HTML: the page
builds it with text nodes and <mark>, so nothing in a message is ever parsed."""

from dataclasses import dataclass
from typing import Any

from .models import MATCH_START, MATCH_STOP, Conversation, Message, search_terms

# Characters of a message around the first match, where SQLite cuts the
# snippet itself (Postgres' headline takes words: models.MessageQuerySet).
BEFORE, AFTER = 40, 120

Snippet = list[dict[str, Any]]


@dataclass(frozen=True)
class Hit:
    conversation: Conversation
    message: Message | None  # None: the title matched
    snippet: Snippet

    def as_dict(self) -> dict[str, Any]:
        return {
            "conversation": str(self.conversation.pk),
            "title": str(self.conversation),
            "url": self.conversation.get_absolute_url(),
            "message": str(self.message.pk) if self.message else None,
            "role": self.message.role if self.message else None,
            "created": self.message.created.isoformat() if self.message else None,
            "snippet": self.snippet,
        }


def search(user, text: str, limit: int) -> list[Hit]:
    """At most `limit` hits: titles first, then messages, each best first.
    Only ever the user's own conversations."""
    titles = Conversation.objects.for_user(user).search(text).only("id", "title")[:limit]
    hits = [Hit(c, None, marked(str(c), search_terms(text))) for c in titles]
    if len(hits) < limit:
        for message in Message.objects.search(user, text)[: limit - len(hits)]:
            hits.append(Hit(message.conversation, message, message_snippet(message, text)))
    return hits


def message_snippet(message: Message, text: str) -> Snippet:
    headline = getattr(message, "headline", None)
    if headline is not None:
        return from_headline(headline)
    terms = search_terms(text)
    return marked(cut_around(message.content, terms), terms)


def from_headline(headline: str) -> Snippet:
    """Postgres' headline, its matches between MATCH_START and MATCH_STOP,
    as runs."""
    runs: Snippet = []
    for i, piece in enumerate(headline.split(MATCH_START)):
        if i == 0:
            _add(runs, piece, False)
            continue
        match, _, rest = piece.partition(MATCH_STOP)
        _add(runs, match, True)
        _add(runs, rest, False)
    return runs


def cut_around(content: str, terms: list[str]) -> str:
    """The part of content around the first of the terms, on one line,
    with an ellipsis where it was cut."""
    text = " ".join(content.split())
    folded = text.casefold()
    found = [at for at in (folded.find(term.casefold()) for term in terms) if at >= 0]
    at = min(found, default=0)
    start, end = max(at - BEFORE, 0), min(at + AFTER, len(text))
    # Not in the middle of a word.
    if start > 0 and " " in text[start:at]:
        start = text.index(" ", start) + 1
    if end < len(text) and " " in text[at:end]:
        end = text.rindex(" ", at, end)
    return ("…" if start > 0 else "") + text[start:end] + ("…" if end < len(text) else "")


def marked(text: str, terms: list[str]) -> Snippet:
    """text as runs, every occurrence of a term (in any case) marked."""
    folded = text.casefold()
    wanted = [term.casefold() for term in terms if term]
    runs: Snippet = []
    plain_from = at = 0
    # casefold() can change a string's length (ß becomes ss): then the
    # positions found would not be the text's, and nothing is marked.
    while wanted and len(folded) == len(text) and at < len(text):
        length = next((len(t) for t in wanted if folded.startswith(t, at)), 0)
        if not length:
            at += 1
            continue
        _add(runs, text[plain_from:at], False)
        _add(runs, text[at : at + length], True)
        at = plain_from = at + length
    _add(runs, text[plain_from:], False)
    return runs


def _add(runs: Snippet, text: str, mark: bool) -> None:
    if text:
        runs.append({"text": text, "mark": mark})
