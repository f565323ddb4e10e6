"""Titles the model suggests (issue 12, item 11). A new conversation is named
at once after its first message (Conversation.title_from); once its first
reply has completed, the model is asked, in the background, for a title of
a few words, which replaces that one unless the owner has renamed it.

The request never holds up the reply, its `end` or the next send: it runs
in a task of its own, after the reply has ended, outside the user's rate
limit and the reply caps, and bounded by llm.TITLE_TIMEOUT. Whatever goes
wrong (the model server fails, answers nothing, or answers something that
is no title), the first title stays."""

import asyncio
import logging
import re
import unicodedata
from typing import Any

from channels.db import database_sync_to_async
from django.conf import settings

from . import llm
from .models import TITLE_LENGTH, Conversation

logger = logging.getLogger(__name__)

# Every title request running, by its task: the strong references the loop
# does not keep, and what replies.wait_all() waits for.
_running: set[asyncio.Task] = set()

# How much of the first exchange the model is shown: a title needs the
# gist, and a long reply would cost a CPU server seconds of prompt reading.
EXCERPT = 1500
MAX_WORDS = 10
INSTRUCTION = (
    "Write a title of at most six words for the conversation below. "
    "Answer with the title only: no quotes, no punctuation at the end, no explanation."
)
LABEL = re.compile(r"^\W*title\s*[:\-–—]\s*", re.IGNORECASE)
QUOTES = "\"'`“”‘’«»„*_"
TRAILING = ".,;:!?…。、"


def prompt(question: str, answer: str) -> list[dict[str, str]]:
    exchange = f"User: {question[:EXCERPT]}\n\nAssistant: {answer[:EXCERPT]}"
    return [{"role": "user", "content": f"{INSTRUCTION}\n\n{exchange}"}]


def tidy(text: str) -> str | None:
    """The model's answer as a title: its first line of text, without a
    "Title:" label, markdown, quotes around it or punctuation after it, cut
    to the title length; None if that leaves no title (nothing, or no
    letter nor digit) or something longer than a title (a sentence)."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return None
    line = "".join(" " if unicodedata.category(c) in ("Cc", "Cf") else c for c in lines[0])
    line = LABEL.sub("", line.strip().lstrip("#>-+ ").strip())
    previous = None
    while previous != line:
        previous = line
        line = line.strip().strip(QUOTES).rstrip(TRAILING)
    words = line.split()
    if not words or len(words) > MAX_WORDS or not any(c.isalnum() for c in line):
        return None
    title = " ".join(words)
    if len(title) > TITLE_LENGTH:
        title = title[: TITLE_LENGTH - 1].rstrip() + "…"
    return title


def suggest_later(conversation_id: Any, reply_id: Any) -> asyncio.Task | None:
    """After a reply has completed: ask for a title in the background, if
    the setting is on. The task is kept until it ends (see running())."""
    if not settings.CHAT_SUGGEST_TITLES:
        return None
    task = asyncio.get_running_loop().create_task(
        suggest(conversation_id, reply_id), name=f"title-{conversation_id}"
    )
    _running.add(task)
    task.add_done_callback(_running.discard)
    return task


async def suggest(conversation_id: Any, reply_id: Any) -> str | None:
    """Ask the model for a title and give it to the conversation; the title
    taken, or None (not wanted, the request failed, no title in the answer,
    or renamed meanwhile). Never raises but for a cancellation."""
    try:
        conversation = await Conversation.objects.filter(pk=conversation_id).afirst()
        if conversation is None or not await database_sync_to_async(
            conversation.wants_suggested_title
        )(reply_id):
            return None
        question, answer = await database_sync_to_async(conversation.first_exchange)()
        model = conversation.model or await llm.default_model()
        try:
            text = await llm.complete_title(prompt(question, answer), model)
        except llm.LLMError as exc:
            logger.info("no title for %s: %s (%s)", conversation_id, exc.message, exc.detail)
            return None
        title = tidy(text)
        if title is None:
            logger.info("no title for %s in the model's answer %r", conversation_id, text[:200])
            return None
        if not await database_sync_to_async(conversation.take_suggested_title)(title):
            return None
        return title
    except Exception:
        # A database or channel-layer failure costs the title, nothing else.
        logger.exception("suggesting a title for %s failed", conversation_id)
        return None


def running() -> list[asyncio.Task]:
    """The title requests running now (replies.wait_all waits for them)."""
    return list(_running)
